//! Metrics: agents' samples stored and served back, rolled up into 5-minute
//! aggregates and pruned by the retention, bad queries and batches refused
//! with a 4xx, and the control plane's own figures for Prometheus.

use chrono::Utc;
use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::*;

const DAY: i64 = 86_400;

async fn send(app: &TestApp, token: &str, node: &str, body: Value) -> reqwest::Response {
    app.as_token(
        token,
        Method::POST,
        &format!("/api/v1/agents/{node}/metrics"),
    )
    .json(&body)
    .send()
    .await
    .expect("post metrics")
}

fn points(series: &Value, node: &str) -> Vec<(i64, f64, f64)> {
    series["series"]
        .as_array()
        .expect("series")
        .iter()
        .find(|s| s["node"] == node)
        .map(|s| {
            s["points"]
                .as_array()
                .expect("points")
                .iter()
                .map(|p| {
                    (
                        p["at"].as_i64().expect("at"),
                        p["value"].as_f64().expect("value"),
                        p["max"].as_f64().expect("max"),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

both_backends! {
    async fn an_agents_samples_are_served_back_per_node_and_for_every_node(app) {
        app.set_topology(1, 1, "round_robin").await;
        let web = app.enroll("nginx1").await;
        let db = app.enroll("pg1").await;
        let now = Utc::now().timestamp() / 10 * 10;
        let res = send(&app, &web, "nginx1", json!({"samples": [
            {"at": now - 20, "values": {"nginx.requests": 12.5, "cpu.host": 40.0}},
            {"at": now - 10 + 3, "values": {"nginx.requests": 20.0}},
            {"at": now - 2 * DAY, "values": {"nginx.requests": 1.0}},
        ]})).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.expect("json"), json!({"stored": 3, "skipped": 1}));
        let res = send(&app, &db, "pg1", json!({"samples": [
            {"at": now - 10, "values": {"pg.lag_bytes": 4096.0, "pg.commits": 3.0}},
        ]})).await;
        assert_eq!(res.status(), 200);

        let one = app.get_json(&format!("/api/v1/metrics?node=nginx1&name=nginx.requests&from={}&to={now}", now - 60)).await;
        assert_eq!(one["step"], 10);
        assert_eq!(one["unit"], "/s");
        assert_eq!(points(&one, "nginx1"), [(now - 20, 12.5, 12.5), (now - 10, 20.0, 20.0)]);
        assert_eq!(one["series"].as_array().map(Vec::len), Some(1));

        // Without a node: every node that has the metric.
        let lag = app.get_json("/api/v1/metrics?name=pg.lag_bytes").await;
        assert_eq!(points(&lag, "pg1"), [(now - 10, 4096.0, 4096.0)]);
        assert!(points(&lag, "nginx1").is_empty());
        let rfc = app.get_json(&format!(
            "/api/v1/metrics?node=nginx1&name=cpu.host&from={}",
            (Utc::now() - chrono::Duration::minutes(5)).to_rfc3339()
        )).await;
        assert_eq!(points(&rfc, "nginx1").len(), 1);
    }

    async fn closed_buckets_roll_up_into_five_minute_means_and_the_retention_prunes_both(app) {
        app.add_node("web").await;
        let token = app.enroll("nginx1").await;
        let now = Utc::now().timestamp();
        // A 5-minute bucket two hours back, and one sample in the next.
        let bucket = (now - 7200) / 300 * 300;
        let samples: Vec<Value> = [(0, 10.0), (10, 20.0), (290, 60.0), (300, 5.0)]
            .iter()
            .map(|(dt, v)| json!({"at": bucket + dt, "values": {"webapp.requests": v}}))
            .collect();
        assert_eq!(send(&app, &token, "nginx1", json!({"samples": samples})).await.status(), 200);

        app.cluster.prune_metrics(now).await.expect("roll up");
        let q = |step: i64| format!(
            "/api/v1/metrics?node=nginx1&name=webapp.requests&from={}&to={}&step={step}",
            bucket, bucket + 600
        );
        let rolled = app.get_json(&q(300)).await;
        assert_eq!(points(&rolled, "nginx1"), [(bucket, 30.0, 60.0), (bucket + 300, 5.0, 5.0)]);

        // A late sample (an agent's backlog) lands in an aggregated bucket:
        // the next roll-up computes it again.
        let late = json!({"samples": [{"at": bucket + 150, "values": {"webapp.requests": 110.0}}]});
        assert_eq!(send(&app, &token, "nginx1", late).await.status(), 200);
        app.cluster.prune_metrics(now).await.expect("roll up");
        let rolled = app.get_json(&q(300)).await;
        assert_eq!(points(&rolled, "nginx1")[0], (bucket, 50.0, 110.0));

        // A day on, the raw points are gone and the aggregates stay ...
        app.cluster.prune_metrics(now + DAY).await.expect("prune");
        assert!(points(&app.get_json(&q(10)).await, "nginx1").is_empty());
        assert_eq!(points(&app.get_json(&q(300)).await, "nginx1").len(), 2);
        // ... for 30 days.
        app.cluster.prune_metrics(now + 31 * DAY).await.expect("prune");
        assert!(points(&app.get_json(&q(300)).await, "nginx1").is_empty());
    }

    async fn bad_metric_queries_and_batches_get_4xx_never_500(app) {
        app.set_topology(1, 1, "round_robin").await;
        let web = app.enroll("nginx1").await;
        let db = app.enroll("pg1").await;
        for (query, status, code) in [
            ("name=cpu.hots", 400, "bad_request"),
            ("", 400, "bad_request"),
            ("name=cpu.host&from=yesterday", 400, "bad_request"),
            ("name=cpu.host&to=2026-13-45T00:00:00Z", 400, "bad_request"),
            ("name=cpu.host&from=-1", 400, "bad_request"),
            ("name=cpu.host&from=99999999999999999999", 400, "bad_request"),
            ("name=cpu.host&from=9223372036854775807", 400, "bad_request"),
            ("name=cpu.host&step=abc", 400, "bad_request"),
            ("name=cpu.host&from=2000&to=1000", 422, "unprocessable_entity"),
            ("name=cpu.host&step=60", 422, "unprocessable_entity"),
            ("name=cpu.host&step=-9223372036854775808", 422, "unprocessable_entity"),
            ("name=cpu.host&node=nginx9", 404, "not_found"),
            ("name=cpu.host&node=..%2Fetc", 404, "not_found"),
        ] {
            let res = app.get(&format!("/api/v1/metrics?{query}")).await;
            assert_error(res, status, code).await;
        }
        // Extremes that parse are answered, not failed.
        for query in ["name=cpu.host&from=0&to=253402300799", "name=mem.used&from=0&to=0&step=10"] {
            let res = app.get(&format!("/api/v1/metrics?{query}")).await;
            assert_eq!(res.status(), 200, "{query}");
        }
        let res = app.as_token(&web, Method::GET, "/api/v1/metrics?name=cpu.host").send().await.expect("get");
        assert_error(res, 403, "forbidden").await;

        let now = Utc::now().timestamp();
        let res = send(&app, &web, "pg1", json!({"samples": []})).await;
        assert_error(res, 403, "forbidden").await;
        for body in [
            json!({"samples": [{"at": now, "values": {"cpu.hots": 1.0}}]}),
            json!({"samples": [{"at": now, "values": {"cpu.host": "high"}}]}),
            json!({"samples": [{"at": now, "values": {}, "extra": 1}]}),
            json!({"samples": [{"at": 1.5, "values": {}}]}),
            json!({"samples": vec![json!({"at": now, "values": {}}); 101]}),
        ] {
            let res = send(&app, &db, "pg1", body.clone()).await;
            assert!(
                res.status() == 400 || res.status() == 422,
                "{body}: {}", res.status()
            );
        }
        let res = app
            .as_token(&db, Method::POST, "/api/v1/agents/pg1/metrics")
            .header("content-type", "application/json")
            .body(format!(r#"{{"samples": [{{"at": {now}, "values": {{"cpu.host": 1e309}}}}]}}"#))
            .send()
            .await
            .expect("post");
        assert!(res.status() == 400 || res.status() == 422, "{}", res.status());
        let extreme = json!({"samples": [
            {"at": i64::MAX, "values": {"cpu.host": 1.0}},
            {"at": i64::MIN, "values": {"cpu.host": f64::MAX}},
        ]});
        let res = send(&app, &db, "pg1", extreme).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.expect("json")["skipped"], 2);
    }

    async fn prometheus_scrapes_the_control_plane_without_a_token(app) {
        app.set_topology(1, 0, "round_robin").await;
        let token = app.enroll("nginx1").await;
        let res = app
            .as_token(&token, Method::GET, "/api/v1/agents/nginx1/orders?after=0&wait=0s")
            .send()
            .await
            .expect("poll");
        assert_eq!(res.status(), 200);
        let res = app.http.get(format!("{}/metrics", app.url)).send().await.expect("scrape");
        assert_eq!(res.status(), 200);
        assert!(res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")));
        let text = res.text().await.expect("text");
        let value = |line: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("{line} missing from\n{text}"))
        };
        assert!(value("corral_nodes{state=\"active\"}") >= 1.0, "{text}");
        assert!(value("corral_orders_filed_total") >= 3.0, "{text}");
        assert!(value("corral_orders_delivered_total") >= 3.0, "{text}");
        assert!(value("corral_http_responses_total{class=\"2xx\"}") >= 2.0, "{text}");
        assert_eq!(value("corral_long_polls"), 0.0);
        assert_eq!(value("corral_event_streams"), 0.0);
    }
}
