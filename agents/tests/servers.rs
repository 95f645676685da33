//! The agent's control-plane client given several servers: one refuses
//! connections, one answers 503 to everything, one is a real corral server.
//! The client enrolls and polls through the real one, stays with it, and its
//! place in the orders (`after=seq`) is its own.
//!
//! Addresses: 127.0.25.5 (the server), .6 (the 503s), .7 (nothing).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use corral_agent::config::EnrollSecretSource;
use corral_agent::control::ControlPlane;
use corral_agent::durable::StateDir;
use corral_server::startup::{Application, Config};
use serde_json::{Value, json};

#[tokio::test]
async fn the_agent_moves_past_a_dead_and_a_failing_server_to_one_that_answers() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = Config::new(dir.path().join("server"));
    config.listen = "127.0.25.5:0".into();
    config.workers = Some(1);
    let app = Application::build(config).await.expect("server starts");
    let good = app.url();
    let handle = app.handle();
    tokio::spawn(app.run_until_stopped());
    let admin = std::fs::read_to_string(dir.path().join("server/admin-token"))
        .expect("admin token")
        .trim()
        .to_string();

    // A server that fails every request with 503, counting them.
    let failed = Arc::new(AtomicUsize::new(0));
    let counter = failed.clone();
    let failing = HttpServer::new(move || {
        let counter = counter.clone();
        App::new().default_service(web::to(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            async { HttpResponse::ServiceUnavailable().body("database unreachable") }
        }))
    })
    .workers(1)
    .bind("127.0.25.6:0")
    .expect("bind");
    let failing_url = format!("http://{}", failing.addrs()[0]);
    let failing = failing.run();
    let failing_handle = failing.handle();
    tokio::spawn(failing);
    // An address where nothing listens.
    let dead = std::net::TcpListener::bind("127.0.25.7:0").expect("bind");
    let dead_url = format!("http://{}", dead.local_addr().expect("addr"));
    drop(dead);

    let http = reqwest::Client::new();
    let res = http
        .post(format!("{good}/api/v1/nodes"))
        .bearer_auth(&admin)
        .json(&json!({"role": "web"}))
        .send()
        .await
        .expect("create a node");
    assert_eq!(res.status(), 201);
    let node = res.json::<Value>().await.expect("json")["name"]
        .as_str()
        .expect("name")
        .to_string();
    let res = http
        .post(format!("{good}/api/v1/nodes/{node}/enroll-secret"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("mint");
    let secret = res.json::<Value>().await.expect("json")["secret"]
        .as_str()
        .expect("secret")
        .to_string();

    let state = StateDir::open(&dir.path().join("agent")).expect("state");
    let agent = ControlPlane::new(
        &[dead_url, failing_url, good.clone()],
        &node,
        EnrollSecretSource {
            value: Some(secret),
            file: None,
        },
        None,
        state.clone(),
    )
    .expect("client");
    let orders = agent
        .poll(0, Duration::ZERO)
        .await
        .expect("enrolls and polls through the server that answers");
    assert!(!orders.is_empty(), "the new node has orders");
    assert!(state.token().is_some(), "enrolled");
    assert_eq!(
        agent.server(),
        good,
        "it stays with the server that answered"
    );
    let seen_failing = failed.load(Ordering::Relaxed);
    assert!(seen_failing >= 1, "the 503 server was tried");

    // Its place is its own: after the last seq there is nothing, and the
    // failing server is not asked again while the good one answers.
    let last = orders.iter().map(|o| o.seq).max().expect("a seq");
    let more = agent
        .poll(last, Duration::from_millis(200))
        .await
        .expect("poll");
    assert!(more.is_empty(), "nothing after {last}: {more:?}");
    assert_eq!(failed.load(Ordering::Relaxed), seen_failing);

    failing_handle.stop(false).await;
    handle.stop(false).await;
}
