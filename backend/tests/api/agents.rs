use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::*;

async fn poll(app: &TestApp, token: &str, node: &str, query: &str) -> reqwest::Response {
    app.as_token(
        token,
        Method::GET,
        &format!("/api/v1/agents/{node}/orders?{query}"),
    )
    .send()
    .await
    .expect("poll")
}

async fn enroll_with(app: &TestApp, node: &str, secret: &str) -> reqwest::Response {
    app.http
        .post(format!("{}/api/v1/agents/enroll", app.url))
        .json(&json!({"node": node, "secret": secret}))
        .send()
        .await
        .expect("enroll")
}

fn heartbeat_body(services: &[(&str, &str)]) -> Value {
    json!({"observed": {
        "agent_version": "0.1.0",
        "applied_seq": 3,
        "services": services.iter().map(|(n, s)| json!({"name": n, "state": s})).collect::<Vec<_>>(),
    }})
}

both_backends! {
    async fn enrolling_trades_the_nodes_secret_for_a_node_token_once(app) {
        app.add_node("web").await;
        let secret = app.enroll_secret("nginx1").await;
        assert!(secret.starts_with("corral-enroll-"));
        let token = enroll_with(&app, "nginx1", &secret).await;
        let token = token.json::<Value>().await.expect("json")["token"].as_str().expect("token").to_string();
        assert!(token.starts_with("corral-node-"));
        let node = app.get_json("/api/v1/nodes/nginx1").await;
        assert_eq!(node["state"], "active");
        // Single-use: replaying it (an impersonator who copied it) fails,
        // and the node's token stays the one it got.
        assert_error(enroll_with(&app, "nginx1", &secret).await, 403, "forbidden").await;
        assert_eq!(poll(&app, &token, "nginx1", "after=0&wait=0").await.status(), 200);
        // A wrong secret, and a node that does not exist, get the same answer.
        assert_error(enroll_with(&app, "nginx1", "corral-enroll-wrong").await, 403, "forbidden").await;
        assert_error(enroll_with(&app, "nginx7", &secret).await, 403, "forbidden").await;
    }

    async fn a_secret_is_for_one_node_and_a_new_one_voids_the_old(app) {
        app.set_topology(2, 1, "round_robin").await;
        let web = app.enroll_secret("nginx1").await;
        // nginx1's secret does not enroll pg1, nor adm1.
        assert_error(enroll_with(&app, "pg1", &web).await, 403, "forbidden").await;
        assert_error(enroll_with(&app, "adm1", &web).await, 403, "forbidden").await;
        let newer = app.enroll_secret("nginx1").await;
        assert_error(enroll_with(&app, "nginx1", &web).await, 403, "forbidden").await;
        assert_eq!(enroll_with(&app, "nginx1", &newer).await.status(), 200);
        // Minting needs the admin: an agent token gets a 403.
        let token = app.enroll("nginx2").await;
        let res = app.as_token(&token, Method::POST, "/api/v1/nodes/nginx2/enroll-secret").send().await.expect("mint");
        assert_error(res, 403, "forbidden").await;
        assert_error(app.post("/api/v1/nodes/nginx9/enroll-secret", Value::Null).await, 404, "not_found").await;
    }

    async fn reenrolling_with_a_new_secret_revokes_the_old_token_at_once(app) {
        app.add_node("db").await;
        let old = app.enroll("pg1").await;
        assert_eq!(poll(&app, &old, "pg1", "after=0&wait=0").await.status(), 200);
        let new = app.enroll("pg1").await;
        assert_error(poll(&app, &old, "pg1", "after=0&wait=0").await, 401, "unauthorized").await;
        assert_eq!(poll(&app, &new, "pg1", "after=0&wait=0").await.status(), 200);
    }

    async fn the_old_cluster_join_token_enrolls_no_one(app) {
        // A state dir from before per-node secrets holds a cluster-wide
        // join token that every agent knew: it must let no one in.
        app.set_topology(1, 1, "round_robin").await;
        let old = "corral-join-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        std::fs::write(app.state.join("join-token"), format!("{old}\n")).expect("old join token");
        for node in ["adm1", "pg1", "nginx1"] {
            assert_error(enroll_with(&app, node, old).await, 403, "forbidden").await;
            // The request in the old shape is refused as malformed.
            let res = app.http.post(format!("{}/api/v1/agents/enroll", app.url))
                .json(&json!({"node": node, "join_token": old})).send().await.expect("enroll");
            assert_eq!(res.status(), 422, "old request shape for {node}");
        }
        let nodes = app.get_json("/api/v1/nodes").await;
        assert!(nodes.as_array().expect("nodes").iter().all(|n| n["state"] == "provisioning"), "{nodes}");
    }
    async fn a_poll_answers_at_once_with_the_orders_it_has_not_seen(app) {
        app.add_node("web").await;
        let token = app.enroll("nginx1").await;
        let started = Instant::now();
        let res = poll(&app, &token, "nginx1", "after=1&wait=30s").await;
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.expect("json");
        assert!(started.elapsed() < Duration::from_secs(5), "did not hold the request");
        let seqs: Vec<_> = body["orders"].as_array().expect("array").iter().map(|o| o["seq"].as_i64()).collect();
        assert_eq!(seqs, vec![Some(2), Some(3), Some(4)]);
        assert_eq!(body["last_seq"], 4);
        assert_eq!(body["orders"][0]["status"], "delivered");
        // The database follows (marks are written in batches); asking for
        // orders after 1 acknowledges having order 1 as well.
        eventually("orders marked delivered", Duration::from_secs(10), || async {
            let orders = app.get_json("/api/v1/nodes/nginx1/orders").await;
            orders.as_array().is_some_and(|o| o.iter().all(|o| o["status"] == "delivered"))
        }).await;
    }

    async fn a_waiting_poll_returns_within_milliseconds_of_an_order_being_filed(app) {
        app.set_topology(1, 0, "round_robin").await;
        let token = app.enroll("nginx1").await;
        let waiting = {
            let (app_url, token) = (app.url.clone(), token.clone());
            tokio::spawn(async move {
                let res = reqwest::Client::new()
                    .get(format!("{app_url}/api/v1/agents/nginx1/orders?after=4&wait=30s"))
                    .bearer_auth(token)
                    .send().await.expect("poll");
                (Instant::now(), res.json::<Value>().await.expect("json"))
            })
        };
        eventually("the poll to wait on the server", Duration::from_secs(10), || async {
            app.cluster.waiting_polls("nginx1").await.unwrap_or(0) == 1
        }).await;
        let filed = Instant::now();
        app.set_topology(1, 0, "uri_hash").await;
        let (received, body) = waiting.await.expect("poll task");
        let latency = received.duration_since(filed);
        assert_eq!(body["orders"][0]["payload"]["policy"], "uri_hash");
        assert_eq!(body["orders"][0]["seq"], 5);
        assert!(latency < Duration::from_millis(1000), "woken after {latency:?}");
    }

    async fn a_poll_with_nothing_new_answers_empty_when_the_wait_ends(app) {
        app.add_node("web").await;
        let token = app.enroll("nginx1").await;
        let started = Instant::now();
        let res = poll(&app, &token, "nginx1", "after=4&wait=300ms").await;
        let elapsed = started.elapsed();
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.expect("json");
        assert_eq!(body["orders"], json!([]));
        assert_eq!(body["last_seq"], 4);
        assert!(elapsed >= Duration::from_millis(300), "answered after {elapsed:?}");
        // wait=0 answers at once.
        let started = Instant::now();
        let res = poll(&app, &token, "nginx1", "after=4&wait=0").await;
        assert_eq!(res.status(), 200);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    async fn a_poll_beyond_the_last_order_is_a_conflict(app) {
        app.add_node("web").await;
        let token = app.enroll("nginx1").await;
        assert_error(poll(&app, &token, "nginx1", "after=99").await, 409, "conflict").await;
    }

    async fn results_are_recorded_once_and_conflicting_ones_refused(app) {
        app.add_node("web").await;
        let token = app.enroll("nginx1").await;
        let report = |seq: i64, outcome: &'static str| {
            app.as_token(&token, Method::POST, &format!("/api/v1/agents/nginx1/orders/{seq}/result"))
                .json(&json!({"outcome": outcome, "message": "nginx reloaded"}))
                .send()
        };
        let res = report(3, "applied").await.expect("result");
        assert_eq!(res.status(), 200);
        let order: Value = res.json().await.expect("json");
        assert_eq!((order["status"].as_str(), order["result"].as_str()), (Some("applied"), Some("nginx reloaded")));
        // The same report again (a retry after a lost answer) is fine.
        assert_eq!(report(3, "applied").await.expect("again").status(), 200);
        assert_error(report(3, "failed").await.expect("conflict"), 409, "conflict").await;
        assert_error(report(9, "applied").await.expect("missing"), 404, "not_found").await;
        let failed = report(2, "failed").await.expect("failed");
        assert_eq!(failed.status(), 200);
        let orders = app.get_json("/api/v1/nodes/nginx1/orders").await;
        assert_eq!(orders[1]["status"], "failed");
        assert_eq!(orders[2]["status"], "applied");
        assert!(app.event_kinds().await.contains(&"order.failed nginx1".to_string()));
    }

    async fn heartbeats_racing_node_changes_never_make_them_fail(app) {
        // Heartbeats write outside the change transactions; a transaction
        // that read before one of them committed must still be able to write.
        for _ in 0..3 {
            app.add_node("web").await;
        }
        let mut tokens = Vec::new();
        for node in ["nginx1", "nginx2", "nginx3"] {
            tokens.push((node, app.enroll(node).await));
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut beaters = Vec::new();
        for (node, token) in tokens {
            let (http, url, stop) = (app.http.clone(), app.url.clone(), stop.clone());
            beaters.push(tokio::spawn(async move {
                let mut n = 0u32;
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let state = if n.is_multiple_of(2) { "running" } else { "failed" };
                    n += 1;
                    let res = http
                        .post(format!("{url}/api/v1/agents/{node}/heartbeat"))
                        .bearer_auth(&token)
                        .json(&heartbeat_body(&[("todomvc", state)]))
                        .send()
                        .await
                        .expect("heartbeat");
                    statuses.push(res.status().as_u16());
                }
                statuses
            }));
        }
        for _ in 0..15 {
            let res = app.post("/api/v1/nodes", json!({"role": "web"})).await;
            assert_eq!(res.status(), 201, "{}", res.text().await.unwrap_or_default());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for beater in beaters {
            let statuses = beater.await.expect("beater");
            assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        }
        let names = app.node_names().await;
        assert_eq!(names.iter().filter(|n| n.starts_with("nginx")).count(), 18, "{names:?}");
    }

    async fn heartbeats_record_observed_state_and_log_changes(app) {
        app.add_node("web").await;
        let token = app.enroll("nginx1").await;
        let send = |body: Value| {
            app.as_token(&token, Method::POST, "/api/v1/agents/nginx1/heartbeat").json(&body).send()
        };
        let res = send(heartbeat_body(&[("nginx", "running"), ("todomvc", "running")])).await.expect("hb");
        assert_eq!(res.status(), 200);
        let node = app.get_json("/api/v1/nodes/nginx1").await;
        assert_eq!(node["health"], "healthy");
        assert_eq!(node["observed"]["services"][1]["name"], "todomvc");
        send(heartbeat_body(&[("nginx", "running"), ("todomvc", "failed")])).await.expect("hb");
        let events = app.events().await;
        let observed: Vec<_> = events.iter().filter(|e| e["kind"] == "node.observed").collect();
        assert!(
            observed.iter().any(|e| e["message"].as_str().is_some_and(|m| m.contains("todomvc: running -> failed"))),
            "{observed:?}"
        );
        assert!(events.iter().any(|e| e["kind"] == "node.online"));
    }

    async fn an_out_of_bounds_heartbeat_is_refused_and_changes_nothing(app) {
        app.add_node("web").await;
        let token = app.enroll("nginx1").await;
        let services: Vec<_> = (0..33).map(|i| json!({"name": format!("s{i}"), "state": "running"})).collect();
        let res = app
            .as_token(&token, Method::POST, "/api/v1/agents/nginx1/heartbeat")
            .json(&json!({"observed": {"agent_version": "x", "applied_seq": 0, "services": services}}))
            .send().await.expect("hb");
        assert_error(res, 422, "unprocessable_entity").await;
        let node = app.get_json("/api/v1/nodes/nginx1").await;
        assert_eq!(node["observed"], Value::Null);
        assert_eq!(node["last_heartbeat"], Value::Null);
    }
}

#[tokio::test]
async fn the_wait_is_capped_at_the_server_maximum() {
    let app = spawn_with(Backend::Sqlite, |c| {
        c.max_poll_wait = Duration::from_millis(500)
    })
    .await;
    app.add_node("web").await;
    let token = app.enroll("nginx1").await;
    let started = Instant::now();
    let res = poll(&app, &token, "nginx1", "after=3&wait=60s").await;
    assert_eq!(res.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "held for {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_silent_node_turns_stale_and_is_logged_once() {
    let app = spawn_with(Backend::Sqlite, |c| {
        c.heartbeat_stale_after = Duration::from_secs(1)
    })
    .await;
    app.add_node("web").await;
    let token = app.enroll("nginx1").await;
    let res = app
        .as_token(&token, Method::POST, "/api/v1/agents/nginx1/heartbeat")
        .json(&heartbeat_body(&[("nginx", "running")]))
        .send()
        .await
        .expect("hb");
    assert_eq!(res.status(), 200);
    eventually("nginx1 to be stale", Duration::from_secs(15), || async {
        app.get_json("/api/v1/nodes/nginx1").await["health"] == "stale"
    })
    .await;
    eventually("a node.stale event", Duration::from_secs(15), || async {
        app.event_kinds()
            .await
            .contains(&"node.stale nginx1".to_string())
    })
    .await;
    // It speaks again: healthy, and the recovery is logged.
    app.as_token(&token, Method::POST, "/api/v1/agents/nginx1/heartbeat")
        .json(&heartbeat_body(&[("nginx", "running")]))
        .send()
        .await
        .expect("hb");
    assert_eq!(
        app.get_json("/api/v1/nodes/nginx1").await["health"],
        "healthy"
    );
    let kinds = app.event_kinds().await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "node.stale nginx1").count(),
        1
    );
    assert!(kinds.contains(&"node.recovered nginx1".to_string()));
}

mod expiry {
    use super::*;

    both_backends! { with |c| c.enroll_secret_ttl = Duration::ZERO;
        async fn an_expired_secret_is_refused(app) {
            app.add_node("web").await;
            let secret = app.enroll_secret("nginx1").await;
            assert_error(enroll_with(&app, "nginx1", &secret).await, 403, "forbidden").await;
        }
    }
}
