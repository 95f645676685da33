//! `POST /db/switchover` and the db events heartbeats raise; agents are
//! simulated through the real agent endpoints.

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::*;

/// A heartbeat reporting PostgreSQL in `role` with `lag` bytes of lag.
pub fn db_heartbeat(role: &str, lag: u64, timeline: u32) -> Value {
    json!({"observed": {
        "agent_version": "0.1.0",
        "applied_seq": 0,
        "services": [{"name": "postgres", "state": "running"}],
        "replication": {"role": role, "lag_bytes": lag, "timeline": timeline, "state": "streaming"},
    }})
}

pub async fn beat(app: &TestApp, token: &str, node: &str, body: Value) {
    let res = app
        .as_token(
            token,
            Method::POST,
            &format!("/api/v1/agents/{node}/heartbeat"),
        )
        .json(&body)
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(res.status(), 200, "heartbeat of {node}");
}

/// pg1 and pg2 enrolled, plus nginx1; their agent tokens.
pub async fn db_pair(app: &TestApp) -> (String, String) {
    app.set_topology(1, 2, "round_robin").await;
    app.enroll("nginx1").await;
    (app.enroll("pg1").await, app.enroll("pg2").await)
}

async fn switchover(app: &TestApp, to: &str) -> reqwest::Response {
    app.post("/api/v1/db/switchover", json!({ "to": to })).await
}

async fn switchover_orders(app: &TestApp, node: &str) -> Vec<Value> {
    app.get_json(&format!("/api/v1/nodes/{node}/orders"))
        .await
        .as_array()
        .expect("array")
        .iter()
        .filter(|o| o["payload"]["kind"] == "switchover")
        .cloned()
        .collect()
}

both_backends! {
    async fn a_switchover_that_cannot_happen_is_refused_and_changes_nothing(app) {
        let (pg1, pg2) = db_pair(&app).await;
        let events_before = app.events().await.len();
        let last_seq = |n: Value| n["last_seq"].as_i64();
        let seqs_before = (
            last_seq(app.get_json("/api/v1/nodes/pg1").await),
            last_seq(app.get_json("/api/v1/nodes/pg2").await),
        );

        assert_error(switchover(&app, "pg9").await, 404, "not_found").await;
        assert_error(switchover(&app, "Not a name!").await, 404, "not_found").await;
        assert_error(switchover(&app, "nginx1").await, 422, "unprocessable_entity").await;
        // Nobody reports primary yet.
        let body = assert_error(switchover(&app, "pg2").await, 409, "no_primary").await;
        assert!(body["message"].as_str().is_some_and(|m| m.contains("primary")), "{body}");

        beat(&app, &pg1, "pg1", db_heartbeat("primary", 0, 1)).await;
        beat(&app, &pg2, "pg2", db_heartbeat("replica", 64 << 20, 1)).await;
        assert_error(switchover(&app, "pg1").await, 409, "already_primary").await;
        let body = assert_error(switchover(&app, "pg2").await, 409, "not_caught_up").await;
        assert!(
            body["message"].as_str().is_some_and(|m| m.contains(&(64u64 << 20).to_string())),
            "the lag figure is in {body}"
        );
        // Two claim primary: no guessing.
        beat(&app, &pg2, "pg2", db_heartbeat("primary", 0, 2)).await;
        assert_error(switchover(&app, "pg2").await, 409, "no_primary").await;

        let raw = |body: &'static str| {
            app.request(Method::POST, "/api/v1/db/switchover")
                .header("content-type", "application/json")
                .body(body)
                .send()
        };
        assert_error(raw(r#"{"to":"pg2","force":true}"#).await.expect("post"), 422, "unprocessable_entity").await;
        assert_error(raw(r#"{"to":7}"#).await.expect("post"), 422, "unprocessable_entity").await;
        assert_error(raw(r#"{}"#).await.expect("post"), 422, "unprocessable_entity").await;
        assert_error(raw(r#"{"to":"#).await.expect("post"), 400, "bad_request").await;
        let res = app
            .as_token(&pg1, Method::POST, "/api/v1/db/switchover")
            .json(&json!({"to": "pg2"}))
            .send()
            .await
            .expect("post");
        assert_error(res, 403, "forbidden").await;

        assert!(switchover_orders(&app, "pg1").await.is_empty());
        assert!(switchover_orders(&app, "pg2").await.is_empty());
        assert_eq!(
            (
                last_seq(app.get_json("/api/v1/nodes/pg1").await),
                last_seq(app.get_json("/api/v1/nodes/pg2").await),
            ),
            seqs_before
        );
        let events = app.events().await;
        let new: Vec<_> = events[events_before..]
            .iter()
            .filter(|e| !e["kind"].as_str().is_some_and(|k| k.starts_with("node.") || k.starts_with("db.promoted")))
            .collect();
        assert!(new.is_empty(), "a refused request left events: {new:?}");
    }

    async fn a_switchover_files_one_order_on_the_primary_and_wakes_its_agent(app) {
        let (pg1, pg2) = db_pair(&app).await;
        beat(&app, &pg1, "pg1", db_heartbeat("primary", 0, 1)).await;
        beat(&app, &pg2, "pg2", db_heartbeat("replica", 4096, 1)).await;
        let last_seq = app.get_json("/api/v1/nodes/pg1").await["last_seq"].as_i64().expect("seq");
        let waiting = {
            let (url, token) = (app.url.clone(), pg1.clone());
            tokio::spawn(async move {
                reqwest::Client::new()
                    .get(format!("{url}/api/v1/agents/pg1/orders?after={last_seq}&wait=30s"))
                    .bearer_auth(token)
                    .send().await.expect("poll")
                    .json::<Value>().await.expect("json")
            })
        };
        eventually("pg1's poll to park", std::time::Duration::from_secs(10), || async {
            app.cluster.waiting_polls("pg1").await.unwrap_or(0) == 1
        }).await;

        let res = switchover(&app, "pg2").await;
        assert_eq!(res.status(), 202);
        let accepted: Value = res.json().await.expect("json");
        assert_eq!(accepted, json!({"from": "pg1", "to": "pg2", "seq": last_seq + 1}));

        let polled = waiting.await.expect("poll task");
        assert_eq!(polled["orders"].as_array().map(Vec::len), Some(1));
        assert_eq!(
            polled["orders"][0]["payload"],
            json!({"kind": "switchover", "to": "pg2", "max_lag_bytes": 16 * 1024 * 1024})
        );
        let filed = switchover_orders(&app, "pg1").await;
        assert_eq!(filed.len(), 1, "{filed:?}");
        assert_eq!(filed[0]["seq"].as_i64(), Some(last_seq + 1));
        assert!(switchover_orders(&app, "pg2").await.is_empty());
        let events = app.events().await;
        let requested: Vec<_> = events.iter().filter(|e| e["kind"] == "db.switchover_requested").collect();
        assert_eq!(requested.len(), 1);
        assert_eq!(requested[0]["actor"], "admin");
        assert!(requested[0]["message"].as_str().is_some_and(|m| m.contains("switchover pg1 -> pg2 requested")));

        // Asking again while the order is out files nothing more.
        assert_error(switchover(&app, "pg2").await, 409, "switchover_in_progress").await;
        // The reconciler does not answer the order with orders of its own.
        let change = app.set_topology(1, 2, "round_robin").await;
        assert_eq!(change["orders_filed"], 0);

        // The agent carries it out; the roles swap in the next heartbeats.
        let res = app
            .as_token(&pg1, Method::POST, &format!("/api/v1/agents/pg1/orders/{}/result", last_seq + 1))
            .json(&json!({"outcome": "applied", "message": "pg2 promoted at 0/3000060; pg1 follows it"}))
            .send().await.expect("result");
        assert_eq!(res.status(), 200);
        beat(&app, &pg2, "pg2", db_heartbeat("primary", 0, 2)).await;
        beat(&app, &pg1, "pg1", db_heartbeat("replica", 0, 2)).await;
        let kinds = app.event_kinds().await;
        assert!(kinds.contains(&"db.promoted pg2".to_string()), "{kinds:?}");
        assert!(kinds.contains(&"db.demoted pg1".to_string()), "{kinds:?}");
        // And back: now pg2 is the primary the order goes to.
        let res = switchover(&app, "pg1").await;
        assert_eq!(res.status(), 202);
        assert_eq!(res.json::<Value>().await.expect("json")["from"], "pg2");
    }

    async fn a_role_change_in_heartbeats_is_an_event_but_the_first_report_is_not(app) {
        let (pg1, _) = db_pair(&app).await;
        beat(&app, &pg1, "pg1", db_heartbeat("replica", 0, 1)).await;
        beat(&app, &pg1, "pg1", db_heartbeat("replica", 10, 1)).await;
        let db_events = |events: Vec<Value>| -> Vec<Value> {
            events.into_iter().filter(|e| e["kind"].as_str().is_some_and(|k| k.starts_with("db."))).collect()
        };
        assert!(db_events(app.events().await).is_empty());
        beat(&app, &pg1, "pg1", db_heartbeat("primary", 0, 2)).await;
        let events = db_events(app.events().await);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["kind"], "db.promoted");
        assert_eq!(events[0]["subject"], "pg1");
        assert_eq!(events[0]["message"], "pg1 is now primary (timeline 2)");
        assert_eq!(events[0]["actor"], "agent:pg1");
        let mut degraded = db_heartbeat("primary", 0, 2);
        degraded["observed"]["replication"]["degraded"] = json!(true);
        beat(&app, &pg1, "pg1", degraded.clone()).await;
        beat(&app, &pg1, "pg1", degraded).await;
        beat(&app, &pg1, "pg1", db_heartbeat("primary", 0, 2)).await;
        let kinds: Vec<_> = db_events(app.events().await).iter().map(|e| e["kind"].as_str().unwrap_or("").to_string()).collect();
        assert_eq!(kinds, vec!["db.promoted", "db.sync_degraded", "db.sync_restored"]);
    }
}
