use reqwest::Method;
use serde_json::json;

use crate::both_backends;
use crate::helpers::*;

both_backends! {
    async fn every_api_call_but_enroll_needs_a_token(app) {
        for path in ["/api/v1/topology", "/api/v1/nodes", "/api/v1/nodes/adm1", "/api/v1/events",
                     "/api/v1/nodes/adm1/orders", "/api/v1/agents/adm1/orders", "/api/v1/events/stream",
                     "/api/v1/servers"] {
            let res = app.http.get(format!("{}{path}", app.url)).send().await.expect("get");
            assert_eq!(
                res.headers().get("www-authenticate").and_then(|v| v.to_str().ok()),
                Some("Bearer realm=\"corral\""),
                "{path}"
            );
            assert_error(res, 401, "unauthorized").await;
        }
        let res = app.as_token("corral-admin-guess", Method::GET, "/api/v1/nodes").send().await.expect("get");
        assert_error(res, 401, "unauthorized").await;
        let res = app
            .http
            .get(format!("{}/api/v1/nodes", app.url))
            .header("Authorization", "Basic YWRtaW46YWRtaW4=")
            .send().await.expect("get");
        assert_error(res, 401, "unauthorized").await;
        // Outside the API: no token needed.
        assert_eq!(app.http.get(format!("{}/healthz", app.url)).send().await.expect("h").status(), 200);
        assert_eq!(app.http.get(format!("{}/version", app.url)).send().await.expect("v").status(), 200);
    }

    async fn an_agent_token_reaches_only_its_own_node(app) {
        app.set_topology(2, 0, "round_robin").await;
        let token = app.enroll("nginx1").await;
        let own = app.as_token(&token, Method::GET, "/api/v1/agents/nginx1/orders").send().await.expect("own");
        assert_eq!(own.status(), 200);
        let own_list = app.as_token(&token, Method::GET, "/api/v1/nodes/nginx1/orders").send().await.expect("own");
        assert_eq!(own_list.status(), 200);
        for (method, path) in [
            (Method::GET, "/api/v1/agents/nginx2/orders"),
            (Method::GET, "/api/v1/nodes/nginx2/orders"),
            (Method::GET, "/api/v1/nodes"),
            (Method::GET, "/api/v1/topology"),
            (Method::GET, "/api/v1/events"),
            (Method::GET, "/api/v1/servers"),
            (Method::DELETE, "/api/v1/nodes/nginx2"),
        ] {
            let res = app.as_token(&token, method.clone(), path).send().await.expect("req");
            assert_error(res, 403, "forbidden").await;
        }
        let res = app
            .as_token(&token, Method::POST, "/api/v1/agents/nginx2/heartbeat")
            .json(&json!({"observed": {"agent_version": "x", "applied_seq": 0}}))
            .send().await.expect("hb");
        assert_error(res, 403, "forbidden").await;
        let res = app
            .as_token(&token, Method::POST, "/api/v1/agents/nginx2/orders/1/result")
            .json(&json!({"outcome": "applied"}))
            .send().await.expect("result");
        assert_error(res, 403, "forbidden").await;
        assert_eq!(app.get_json("/api/v1/nodes/nginx2/orders").await[0]["status"], "pending");
    }

    async fn enrolling_again_revokes_the_previous_token(app) {
        app.add_node("db").await;
        let old = app.enroll("pg1").await;
        let new = app.enroll("pg1").await;
        assert_ne!(old, new);
        let res = app.as_token(&old, Method::GET, "/api/v1/agents/pg1/orders").send().await.expect("old");
        assert_error(res, 401, "unauthorized").await;
        let res = app.as_token(&new, Method::GET, "/api/v1/agents/pg1/orders").send().await.expect("new");
        assert_eq!(res.status(), 200);
    }

    async fn a_token_revoked_while_requests_use_it_is_refused_at_once(app) {
        // Requests authenticating with the old token race the enrollment
        // that revokes it; once that enrollment has answered, the old token
        // must be refused, whatever the racing lookups cached.
        app.add_node("db").await;
        let mut token = app.enroll("pg1").await;
        for round in 0..30 {
            let racers: Vec<_> = (0..6)
                .map(|_| {
                    let req = app.as_token(&token, Method::GET, "/api/v1/agents/pg1/orders?wait=0s");
                    tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()) })
                })
                .collect();
            let old = std::mem::replace(&mut token, app.enroll("pg1").await);
            for r in racers {
                let status = r.await.expect("racer").expect("request");
                assert!(status == 200 || status == 401, "round {round}: {status}");
            }
            let res = app.as_token(&old, Method::GET, "/api/v1/agents/pg1/orders?wait=0s").send().await.expect("old");
            assert_eq!(res.status(), 401, "round {round}: the revoked token still works");
        }
    }
}

#[tokio::test]
async fn tokens_are_stored_hashed_and_the_admin_token_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let app = spawn_app(Backend::Sqlite).await;
    app.add_node("web").await;
    let token = app.enroll("nginx1").await;
    let mode = std::fs::metadata(app.state.join("admin-token"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let db = std::fs::read(app.state.join("corral.db")).expect("db");
    let wal = std::fs::read(app.state.join("corral.db-wal")).unwrap_or_default();
    let needle = token.as_bytes();
    let contains = |hay: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(
        !contains(&db) && !contains(&wal),
        "the agent token is stored in clear"
    );
}
