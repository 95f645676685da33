//! Orders and events are pruned to the configured retention, so a cluster
//! that runs for months keeps a database of bounded size.

use std::time::Duration;

use corral_server::cluster::Retention;
use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::*;

const KEEP_ORDERS: u64 = 5;
const KEEP_EVENTS: u64 = 50;

fn small(c: &mut corral_server::startup::Config) {
    c.retention = Retention {
        orders_per_node: KEEP_ORDERS,
        events: KEEP_EVENTS,
        event_age: Duration::from_secs(3600),
        every: Duration::from_millis(200),
    };
}

/// Polls nginx1's new orders and reports each applied; returns the last seq.
async fn apply_all(app: &TestApp, token: &str, after: i64) -> i64 {
    let res = app
        .as_token(
            token,
            Method::GET,
            &format!("/api/v1/agents/nginx1/orders?after={after}&wait=0s"),
        )
        .send()
        .await
        .expect("poll");
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.expect("json");
    let mut last = after;
    for o in body["orders"].as_array().expect("orders") {
        let seq = o["seq"].as_i64().expect("seq");
        let res = app
            .as_token(
                token,
                Method::POST,
                &format!("/api/v1/agents/nginx1/orders/{seq}/result"),
            )
            .json(&json!({"outcome": "applied", "message": "ok"}))
            .send()
            .await
            .expect("result");
        assert_eq!(
            res.status(),
            200,
            "{}",
            res.text().await.unwrap_or_default()
        );
        last = last.max(seq);
    }
    last
}

/// `count` heartbeats from nginx1, each flipping what it reports, so each
/// is logged as an event; four at a time.
async fn heartbeats(app: &TestApp, token: &str, count: usize) {
    let mut senders = Vec::new();
    for lane in 0..4 {
        let (http, url, token) = (app.http.clone(), app.url.clone(), token.to_string());
        senders.push(tokio::spawn(async move {
            for i in (lane..count).step_by(4) {
                let state = if i % 2 == 0 { "running" } else { "failed" };
                let res = http
                    .post(format!("{url}/api/v1/agents/nginx1/heartbeat"))
                    .bearer_auth(&token)
                    .json(
                        &json!({"observed": {"agent_version": "0.1.0", "applied_seq": 0,
                        "services": [{"name": "todomvc", "state": state}]}}),
                    )
                    .send()
                    .await
                    .expect("heartbeat");
                assert_eq!(res.status(), 200);
            }
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
}

async fn event_count(app: &TestApp) -> usize {
    app.events().await.len()
}

both_backends! {
    with small;

    async fn orders_and_events_stay_bounded_over_ten_thousand_heartbeats(app) {
        app.set_topology(1, 0, "round_robin").await;
        let token = app.enroll("nginx1").await;
        let mut seq = apply_all(&app, &token, 0).await;
        // Forty balancing changes: forty load_balancer orders, each applied.
        for i in 0..40 {
            let policy = if i % 2 == 0 { "least_conn" } else { "round_robin" };
            app.set_topology(1, 0, policy).await;
            seq = apply_all(&app, &token, seq).await;
        }
        // One more, left pending: pending orders are never pruned.
        app.set_topology(1, 0, "uri_hash").await;

        let mut sizes = Vec::new();
        for _ in 0..2 {
            heartbeats(&app, &token, 5_000).await;
            eventually("events pruned to the retention", Duration::from_secs(30), || async {
                event_count(&app).await <= KEEP_EVENTS as usize
            })
            .await;
            let orders = app.get_json("/api/v1/nodes/nginx1/orders?limit=1000").await;
            sizes.push((event_count(&app).await, orders.as_array().expect("orders").len()));
        }
        eprintln!("(events, nginx1 orders) after 5,000 and 10,000 heartbeats: {sizes:?}");
        assert_eq!(sizes[0], sizes[1], "the tables kept growing");

        let orders = app.get_json("/api/v1/nodes/nginx1/orders?limit=1000").await;
        let orders = orders.as_array().expect("orders");
        // The newest finished ones, the newest of each kind and the pending
        // one: nothing else.
        let kinds: Vec<&str> = orders.iter().map(|o| o["payload"]["kind"].as_str().unwrap_or("")).collect();
        for kind in ["consul", "webapp", "load_balancer"] {
            assert!(kinds.contains(&kind), "no {kind} order left: {kinds:?}");
        }
        assert!(orders.len() as u64 <= KEEP_ORDERS + 3, "{} orders kept", orders.len());
        assert!(orders.iter().any(|o| o["status"] == "pending"));
        // The newest event is the last heartbeat's, not an old one.
        let events = app.events().await;
        assert!(events.iter().any(|e| e["kind"] == "node.observed"), "{events:?}");
        // A fresh agent (after=0) still gets every order it needs.
        let res = app
            .as_token(&token, Method::GET, "/api/v1/agents/nginx1/orders?after=0&wait=0s")
            .send()
            .await
            .expect("poll");
        let body: Value = res.json().await.expect("json");
        let fresh: Vec<&str> = body["orders"].as_array().expect("orders").iter()
            .map(|o| o["payload"]["kind"].as_str().unwrap_or("")).collect();
        for kind in ["consul", "webapp", "load_balancer"] {
            assert!(fresh.contains(&kind), "a fresh agent gets no {kind} order: {fresh:?}");
        }
    }
}
