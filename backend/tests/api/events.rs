use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use crate::both_backends;

/// Reads server-sent events until `count` `data:` frames have arrived.
async fn read_events(res: reqwest::Response, count: usize) -> Vec<(String, Value)> {
    let mut stream = res.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while out.len() < count {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("events arrive before the deadline")
            .expect("stream open")
            .expect("chunk");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let id = frame
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .map(str::to_string);
            let data = frame.lines().find_map(|l| l.strip_prefix("data: "));
            if let (Some(id), Some(data)) = (id, data) {
                out.push((id, serde_json::from_str(data).expect("event json")));
            }
        }
    }
    out
}

both_backends! {
    async fn events_list_newest_or_after_an_id(app) {
        app.set_topology(2, 0, "round_robin").await;
        let all = app.events().await;
        assert!(all.len() >= 4);
        let ids: Vec<i64> = all.iter().map(|e| e["id"].as_i64().expect("id")).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "oldest first: {ids:?}");
        let newest = app.get_json("/api/v1/events?limit=2").await;
        assert_eq!(newest.as_array().map(Vec::len), Some(2));
        assert_eq!(newest[1]["id"], all[all.len() - 1]["id"]);
        let after = app.get_json(&format!("/api/v1/events?after={}", ids[0])).await;
        assert_eq!(after[0]["id"].as_i64(), Some(ids[1]));
        assert!(all.iter().any(|e| e["kind"] == "topology.updated" && e["actor"] == "admin"));
    }

    async fn the_event_stream_pushes_changes_and_resumes_after_last_event_id(app) {
        let res = app.get("/api/v1/events/stream").await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream"));
        app.add_node("web").await;
        let live = read_events(res, 2).await;
        assert_eq!(live[0].1["kind"], "node.created");
        assert_eq!(live[0].1["subject"], "nginx1");
        assert_eq!(live[0].0, live[0].1["id"].as_i64().expect("id").to_string());
        // Reconnect after the first: the second is replayed, then live ones follow.
        let res = app
            .request(reqwest::Method::GET, "/api/v1/events/stream")
            .header("Last-Event-ID", &live[0].0)
            .send().await.expect("stream");
        app.add_node("db").await;
        let resumed = read_events(res, 2).await;
        assert_eq!(resumed[0].0, live[1].0, "replay starts right after Last-Event-ID");
        assert_eq!(resumed[1].1["subject"], "pg1");
    }

    async fn an_event_recorded_outside_a_change_is_logged_and_streamed(app) {
        let res = app.get("/api/v1/events/stream").await;
        assert_eq!(res.status(), 200);
        app.cluster
            .record_event("provider:lxc", "node.provision_failed", "nginx1", "lxc-create: exit status 1")
            .await
            .expect("recorded");
        let live = read_events(res, 1).await;
        assert_eq!(live[0].1["kind"], "node.provision_failed");
        assert_eq!(live[0].1["actor"], "provider:lxc");
        assert_eq!(live[0].1["message"], "lxc-create: exit status 1");
        let logged = app.events().await;
        assert_eq!(logged.last().map(|e| &e["id"]), Some(&live[0].1["id"]));
    }
}
