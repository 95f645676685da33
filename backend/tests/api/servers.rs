//! `GET /api/v1/servers` and the CORS answers that let the console loaded
//! from one server call its peers: only the configured servers' pages, only
//! the API, errors readable too, and nothing else changed.

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

const PEER: &str = "http://127.0.0.2:7070";

fn header(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[tokio::test]
async fn the_servers_are_listed_and_only_their_pages_may_call_across() {
    let app = spawn_with(Backend::Sqlite, |c| {
        // As given on the command line: a trailing slash, and the same
        // peer twice.
        c.peers = vec![format!("{PEER}/"), PEER.into()];
    })
    .await;
    let body = app.get_json("/api/v1/servers").await;
    assert_eq!(body, json!({"servers": [app.url, PEER]}));

    // The peer's page asks first (its call carries a token), then calls.
    let preflight = |origin: &str, path: &str| {
        app.http
            .request(Method::OPTIONS, format!("{}{path}", app.url))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization, content-type",
            )
            .send()
    };
    let res = preflight(PEER, "/api/v1/nodes").await.expect("preflight");
    assert_eq!(res.status(), 204);
    assert_eq!(
        header(&res, "access-control-allow-origin").as_deref(),
        Some(PEER)
    );
    let allowed = header(&res, "access-control-allow-headers").unwrap_or_default();
    assert!(allowed.contains("authorization"), "{allowed}");
    let methods = header(&res, "access-control-allow-methods").unwrap_or_default();
    assert!(
        methods.contains("POST") && methods.contains("DELETE"),
        "{methods}"
    );

    let res = app
        .request(Method::POST, "/api/v1/nodes")
        .header("Origin", PEER)
        .json(&json!({"role": "web"}))
        .send()
        .await
        .expect("add");
    assert_eq!(res.status(), 201);
    assert_eq!(
        header(&res, "access-control-allow-origin").as_deref(),
        Some(PEER)
    );
    assert!(
        header(&res, "access-control-expose-headers")
            .unwrap_or_default()
            .contains("location")
    );
    // A refused token is readable to the page too, so it can say so.
    let res = app
        .http
        .get(format!("{}/api/v1/nodes", app.url))
        .header("Origin", PEER)
        .send()
        .await
        .expect("no token");
    assert_eq!(
        header(&res, "access-control-allow-origin").as_deref(),
        Some(PEER)
    );
    assert_error(res, 401, "unauthorized").await;

    // Any other page, or a path outside the API, gets no CORS answer: the
    // browser keeps the answer from it.
    for (origin, path) in [
        ("http://127.0.0.3:7070", "/api/v1/nodes"),
        ("http://127.0.0.2:7071", "/api/v1/nodes"),
        ("https://127.0.0.2:7070", "/api/v1/nodes"),
        ("null", "/api/v1/nodes"),
        (PEER, "/healthz"),
    ] {
        let res = preflight(origin, path).await.expect("preflight");
        assert_ne!(res.status(), 204, "{origin} {path}");
        assert_eq!(
            header(&res, "access-control-allow-origin"),
            None,
            "{origin} {path}"
        );
        let res = app
            .request(Method::GET, path)
            .header("Origin", origin)
            .send()
            .await
            .expect("get");
        assert_eq!(res.status(), 200, "{origin} {path}");
        assert_eq!(
            header(&res, "access-control-allow-origin"),
            None,
            "{origin} {path}"
        );
    }

    // The preflights made nothing: the one node is the one added.
    let nodes = app.get_json("/api/v1/nodes").await;
    let names: Vec<&str> = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, ["adm1", "nginx1"], "{nodes}");
}

#[tokio::test]
async fn a_server_without_peers_lists_itself_and_answers_no_preflight() {
    let app = spawn_app(Backend::Sqlite).await;
    assert_eq!(
        app.get_json("/api/v1/servers").await,
        json!({"servers": [app.url]})
    );
    let res = app
        .http
        .request(Method::OPTIONS, format!("{}/api/v1/nodes", app.url))
        .header("Origin", PEER)
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .expect("preflight");
    assert_eq!(header(&res, "access-control-allow-origin"), None);
}
