use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::*;

async fn ship(app: &TestApp, token: &str, node: &str, body: Value) -> reqwest::Response {
    app.as_token(token, Method::POST, &format!("/api/v1/agents/{node}/logs"))
        .json(&body)
        .send()
        .await
        .expect("post logs")
}

fn lines(body: &Value) -> Vec<String> {
    body.as_array()
        .expect("array")
        .iter()
        .map(|l| l["line"].as_str().expect("line").to_string())
        .collect()
}

both_backends! {
    async fn an_agent_ships_log_lines_and_the_admin_reads_the_newest(app) {
        app.add_node("web").await;
        let token = app.enroll("nginx1").await;
        let res = ship(&app, &token, "nginx1", json!({"service": "nginx", "lines": ["started", "GET / 200"]})).await;
        assert_eq!(res.status(), 204);
        let res = ship(&app, &token, "nginx1", json!({"service": "todomvc", "lines": ["listening on :8080"]})).await;
        assert_eq!(res.status(), 204);

        let all = app.get_json("/api/v1/nodes/nginx1/logs").await;
        assert_eq!(lines(&all), ["started", "GET / 200", "listening on :8080"]);
        assert_eq!(all[0]["service"], "nginx");
        assert!(all[0]["at"].as_str().is_some(), "{all}");
        let nginx = app.get_json("/api/v1/nodes/nginx1/logs?service=nginx&limit=1").await;
        assert_eq!(lines(&nginx), ["GET / 200"]);
        let none = app.get_json("/api/v1/nodes/nginx1/logs?service=postgres").await;
        assert_eq!(none, json!([]));
    }

    async fn only_the_last_500_lines_of_a_service_are_kept(app) {
        app.add_node("db").await;
        let token = app.enroll("pg1").await;
        for batch in 0..3 {
            let body: Vec<String> = (0..200).map(|i| format!("line {}", batch * 200 + i)).collect();
            let res = ship(&app, &token, "pg1", json!({"service": "postgres", "lines": body})).await;
            assert_eq!(res.status(), 204);
        }
        let kept = app.get_json("/api/v1/nodes/pg1/logs?service=postgres&limit=500").await;
        let kept = lines(&kept);
        assert_eq!(kept.len(), 500);
        assert_eq!(kept.first().map(String::as_str), Some("line 100"));
        assert_eq!(kept.last().map(String::as_str), Some("line 599"));
    }

    async fn bad_log_batches_get_4xx_and_keep_nothing(app) {
        app.add_node("web").await;
        let token = app.enroll("nginx1").await;
        let too_many: Vec<String> = (0..201).map(|i| i.to_string()).collect();
        let cases = [
            (json!({"service": "Nginx", "lines": ["x"]}), 422, "unprocessable_entity"),
            (json!({"service": "../etc", "lines": ["x"]}), 422, "unprocessable_entity"),
            (json!({"service": "", "lines": ["x"]}), 422, "unprocessable_entity"),
            (json!({"service": "nginx", "lines": too_many}), 422, "unprocessable_entity"),
            (json!({"service": "nginx", "lines": ["x".repeat(1001)]}), 422, "unprocessable_entity"),
            (json!({"service": "nginx", "lines": ["x"], "level": "info"}), 422, "unprocessable_entity"),
            (json!({"service": "nginx", "lines": [1]}), 422, "unprocessable_entity"),
            (json!({"lines": ["x"]}), 422, "unprocessable_entity"),
        ];
        for (body, status, code) in cases {
            let res = ship(&app, &token, "nginx1", body.clone()).await;
            assert_eq!(res.status(), status, "{body}");
            assert_error(res, status, code).await;
        }
        let res = app
            .as_token(&token, Method::POST, "/api/v1/agents/nginx1/logs")
            .header("content-type", "application/json")
            .body("{\"service\":")
            .send().await.expect("post");
        assert_error(res, 400, "bad_request").await;
        assert_eq!(app.get_json("/api/v1/nodes/nginx1/logs").await, json!([]));
        for query in ["limit=0", "limit=501", "limit=x", "service=NGINX"] {
            let res = app.get(&format!("/api/v1/nodes/nginx1/logs?{query}")).await;
            assert_error(res, 400, "bad_request").await;
        }
        // A wait without `after` has nothing to wait for: the newest lines, at once.
        let started = std::time::Instant::now();
        let res = app.get("/api/v1/nodes/nginx1/logs?wait=30s").await;
        assert_eq!(res.status(), 200);
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert_error(app.get("/api/v1/nodes/nginx9/logs").await, 404, "not_found").await;
        let res = ship(&app, &app.admin, "nginx9", json!({"service": "nginx", "lines": ["x"]})).await;
        assert_error(res, 404, "not_found").await;
    }

    async fn agent_tokens_ship_only_their_own_logs_and_read_none(app) {
        app.set_topology(2, 0, "round_robin").await;
        let token = app.enroll("nginx1").await;
        let res = ship(&app, &token, "nginx2", json!({"service": "nginx", "lines": ["forged"]})).await;
        assert_error(res, 403, "forbidden").await;
        let res = app.as_token(&token, Method::GET, "/api/v1/nodes/nginx1/logs").send().await.expect("get");
        assert_error(res, 403, "forbidden").await;
        let res = app
            .http
            .post(format!("{}/api/v1/agents/nginx1/logs", app.url))
            .json(&json!({"service": "nginx", "lines": ["x"]}))
            .send().await.expect("post");
        assert_error(res, 401, "unauthorized").await;
        // The admin may ship on a node's behalf (tools, tests).
        let res = ship(&app, &app.admin, "nginx2", json!({"service": "nginx", "lines": ["by admin"]})).await;
        assert_eq!(res.status(), 204);
        assert_eq!(lines(&app.get_json("/api/v1/nodes/nginx2/logs").await), ["by admin"]);
        assert_eq!(app.get_json("/api/v1/nodes/nginx1/logs").await, json!([]));
    }

    async fn a_follower_long_polls_until_a_matching_line_arrives(app) {
        app.add_node("web").await;
        let token = app.enroll("nginx1").await;
        let res = ship(&app, &token, "nginx1", json!({"service": "nginx", "lines": ["GET /old 200"]})).await;
        assert_eq!(res.status(), 204);
        let seen = app.get_json("/api/v1/nodes/nginx1/logs").await;
        let last = seen[0]["seq"].as_u64().expect("seq");

        let follower = {
            let req = app.request(
                Method::GET,
                &format!("/api/v1/nodes/nginx1/logs?after={last}&wait=30s&grep=POST&service=nginx"),
            );
            tokio::spawn(async move { req.send().await.expect("follow").json::<Value>().await.expect("json") })
        };
        // Lines of another service, or not matching, do not end the poll.
        let res = ship(&app, &token, "nginx1", json!({"service": "consul", "lines": ["POST /v1/agent"]})).await;
        assert_eq!(res.status(), 204);
        let res = ship(&app, &token, "nginx1", json!({"service": "nginx", "lines": ["GET /a 200", "POST /todos 201"]})).await;
        assert_eq!(res.status(), 204);
        let got = tokio::time::timeout(std::time::Duration::from_secs(20), follower)
            .await
            .expect("answered when the line came, well before the 30 s wait")
            .expect("join");
        assert_eq!(lines(&got), ["POST /todos 201"]);
        assert!(got[0]["seq"].as_u64() > Some(last), "{got}");

        // Nothing new: a short wait answers empty.
        let newest = got[0]["seq"].as_u64().expect("seq");
        let none = app.get_json(&format!("/api/v1/nodes/nginx1/logs?after={newest}&wait=50ms&service=nginx")).await;
        assert_eq!(none, json!([]));
        // Without a wait, `after` answers at once with what is new, oldest first.
        let all = app.get_json(&format!("/api/v1/nodes/nginx1/logs?after={last}")).await;
        assert_eq!(lines(&all), ["POST /v1/agent", "GET /a 200", "POST /todos 201"]);
        let searched = app.get_json("/api/v1/nodes/nginx1/logs?grep=GET").await;
        assert_eq!(lines(&searched), ["GET /old 200", "GET /a 200"]);
    }

    async fn bad_follow_queries_get_400_not_500(app) {
        app.add_node("web").await;
        let long = "x".repeat(201);
        for query in [
            "after=-1".to_string(),
            "after=x".to_string(),
            "after=99999999999999999999999".to_string(),
            "after=0&wait=forever".to_string(),
            "after=0&wait=-1s".to_string(),
            "after=0&wait=1h".to_string(),
            "after=0&wait=9999999999".to_string(),
            "wait=forever".to_string(),
            format!("grep={long}"),
        ] {
            let res = app.get(&format!("/api/v1/nodes/nginx1/logs?{query}")).await;
            assert_error(res, 400, "bad_request").await;
        }
        let res = app.get("/api/v1/nodes/nginx9/logs?after=0&wait=10s").await;
        assert_error(res, 404, "not_found").await;
        // The longest search allowed, and non-ASCII text, are fine.
        let ok = format!("/api/v1/nodes/nginx1/logs?grep={}", "é".repeat(200));
        assert_eq!(app.get_json(&ok).await, json!([]));
    }
}
