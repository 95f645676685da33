use reqwest::Method;
use serde_json::json;

use crate::both_backends;
use crate::helpers::*;

/// method, path, content type, body, expected status and error code.
type BadRequest = (
    Method,
    &'static str,
    &'static str,
    Vec<u8>,
    u16,
    &'static str,
);

both_backends! {
    async fn bad_bodies_get_clear_4xx_errors_and_change_nothing(app) {
        let events_before = app.events().await.len();
        let raw = |method: Method, path: &str, ct: &str, body: Vec<u8>| {
            app.request(method, path).header("content-type", ct).body(body).send()
        };
        let cases: Vec<BadRequest> = vec![
            (Method::POST, "/api/v1/nodes", "application/json", b"{\"role\":".to_vec(), 400, "bad_request"),
            (Method::POST, "/api/v1/nodes", "application/json", b"not json".to_vec(), 400, "bad_request"),
            (Method::POST, "/api/v1/nodes", "application/json", br#"{"role":"web","size":"xl"}"#.to_vec(), 422, "unprocessable_entity"),
            (Method::POST, "/api/v1/nodes", "application/json", br#"{"role":"cache"}"#.to_vec(), 422, "unprocessable_entity"),
            (Method::POST, "/api/v1/nodes", "application/json", br#"{"role":7}"#.to_vec(), 422, "unprocessable_entity"),
            (Method::POST, "/api/v1/nodes", "application/json", b"[]".to_vec(), 422, "unprocessable_entity"),
            (Method::POST, "/api/v1/nodes", "text/plain", br#"{"role":"web"}"#.to_vec(), 415, "unsupported_media_type"),
            (Method::POST, "/api/v1/nodes", "application/problem+json", br#"{"role":"nope"}"#.to_vec(), 422, "unprocessable_entity"),
            (Method::PUT, "/api/v1/topology", "application/json", br#"{"web":-1,"db":0,"lb_policy":"round_robin","replication":"async"}"#.to_vec(), 422, "unprocessable_entity"),
            (Method::PUT, "/api/v1/topology", "application/json", br#"{"web":1.5,"db":0,"lb_policy":"round_robin","replication":"async"}"#.to_vec(), 422, "unprocessable_entity"),
            (Method::PUT, "/api/v1/topology", "application/json", br#"{"web":1,"db":0}"#.to_vec(), 422, "unprocessable_entity"),
            (Method::PUT, "/api/v1/topology", "application/json", br#"{"web":99999999999,"db":0,"lb_policy":"round_robin","replication":"async"}"#.to_vec(), 422, "unprocessable_entity"),
            (Method::PUT, "/api/v1/topology", "application/json", format!("{}1{}", "[".repeat(500), "]".repeat(500)).into_bytes(), 400, "bad_request"),
        ];
        for (method, path, ct, body, status, code) in cases {
            let shown = String::from_utf8_lossy(&body).chars().take(60).collect::<String>();
            let res = raw(method.clone(), path, ct, body).await.expect("request");
            assert_eq!(res.status(), status, "{method} {path} {shown}");
            assert_error(res, status, code).await;
        }
        // A huge body: 413 before it is parsed.
        let huge = format!(r#"{{"role":"web","pad":"{}"}}"#, "x".repeat(200_000));
        let res = raw(Method::POST, "/api/v1/nodes", "application/json", huge.into_bytes()).await.expect("huge");
        assert_error(res, 413, "payload_too_large").await;
        assert_eq!(app.node_names().await, vec!["adm1"]);
        assert_eq!(app.get_json("/api/v1/topology").await["web"], 0);
        assert_eq!(app.events().await.len(), events_before, "a refused request left an event");
    }

    async fn bad_queries_and_paths_are_400(app) {
        app.add_node("web").await;
        let token = app.enroll("nginx1").await;
        for path in [
            "/api/v1/nodes/nginx1/orders?after=-1",
            "/api/v1/nodes/nginx1/orders?after=x",
            "/api/v1/nodes/nginx1/orders?limit=0",
            "/api/v1/nodes/nginx1/orders?limit=1001",
            "/api/v1/events?limit=99999999999999999999999",
            "/api/v1/events?after=-5",
            "/api/v1/nodes?force=maybe&x",
        ] {
            let res = app.get(path).await;
            if path.starts_with("/api/v1/nodes?") {
                // Unknown query parameters are ignored, as browsers add them.
                assert_eq!(res.status(), 200, "{path}");
                continue;
            }
            assert_error(res, 400, "bad_request").await;
        }
        for query in ["after=3&wait=forever", "after=3&wait=-1s", "after=3&wait=1h", "after=3&wait=99999999999s"] {
            let res = app.as_token(&token, Method::GET, &format!("/api/v1/agents/nginx1/orders?{query}")).send().await.expect("poll");
            assert_error(res, 400, "bad_request").await;
        }
        let res = app.as_token(&token, Method::POST, "/api/v1/agents/nginx1/orders/abc/result")
            .json(&json!({"outcome": "applied"})).send().await.expect("result");
        assert_error(res, 400, "bad_request").await;
        let res = app.delete("/api/v1/nodes/nginx1?force=perhaps").await;
        assert_error(res, 400, "bad_request").await;
        assert_eq!(app.get_json("/api/v1/nodes/nginx1").await["state"], "active");
    }

    async fn unknown_routes_are_json_404s_and_wrong_methods_json_405s(app) {
        assert_error(app.get("/api/v1/nope").await, 404, "not_found").await;
        assert_error(app.get("/api/v2/nodes").await, 404, "not_found").await;
        let res = app.request(Method::PATCH, "/api/v1/nodes").send().await.expect("patch");
        assert_eq!(res.headers().get("allow").and_then(|v| v.to_str().ok()).map(|a| a.contains("POST")), Some(true));
        assert_error(res, 405, "method_not_allowed").await;
        let res = app.http.post(format!("{}/healthz", app.url)).send().await.expect("post");
        assert_error(res, 405, "method_not_allowed").await;
    }

    async fn an_over_long_result_message_is_refused(app) {
        app.add_node("web").await;
        let token = app.enroll("nginx1").await;
        let res = app.as_token(&token, Method::POST, "/api/v1/agents/nginx1/orders/1/result")
            .json(&json!({"outcome": "failed", "message": "e".repeat(20_000)}))
            .send().await.expect("result");
        assert_error(res, 422, "unprocessable_entity").await;
        assert_eq!(app.get_json("/api/v1/nodes/nginx1/orders").await[0]["status"], "pending");
    }
}
