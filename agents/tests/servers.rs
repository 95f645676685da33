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

mod common;
use common::Server;

#[tokio::test]
async fn the_agent_moves_past_a_dead_and_a_failing_server_to_one_that_answers() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server =
        Server::start(common::config(&dir.path().join("server"), "127.0.25.5:0")).await;
    let good = server.url.clone();

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

    let node = server.create_node("web").await;
    let secret = server.mint(&node).await;
    let (agent, state) = common::agent(
        &[dead_url, failing_url, good.clone()],
        &node,
        &secret,
        None,
        &dir.path().join("agent"),
    );
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
    server.stop().await;
}
