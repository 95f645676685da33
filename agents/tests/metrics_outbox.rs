//! The agent's metrics outbox against a real corral server: samples taken
//! while the control plane is down stay in the outbox and reach the server
//! once it is back, in batches, none lost.
//!
//! Address: 127.0.31.5 (the server, started twice on the same port).

use std::collections::BTreeMap;

use corral_agent::metrics::Outbox;
use corral_proto::{MetricName, MetricReading};

mod common;
use common::Server;

#[tokio::test]
async fn samples_taken_while_the_server_is_down_arrive_once_it_is_back() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server =
        Server::start(common::config(&dir.path().join("server"), "127.0.31.5:0")).await;
    assert_eq!(server.create_node("web").await, "nginx1");
    let secret = server.mint("nginx1").await;
    let (control, _) = common::agent(
        std::slice::from_ref(&server.url),
        "nginx1",
        &secret,
        None,
        &dir.path().join("agent"),
    );
    let mut outbox = Outbox::default();
    let now = chrono::Utc::now().timestamp() / 10 * 10;
    let sample = |at: i64| MetricReading {
        at,
        values: BTreeMap::from([(MetricName::MemNode, at as f64)]),
    };
    outbox.push(sample(now - 1500));
    outbox.flush(&control).await.expect("enrolls and sends");
    assert!(outbox.is_empty());

    // The control plane goes away for what would be 25 minutes of samples.
    server.stop().await;
    for i in (0..150).rev() {
        outbox.push(sample(now - i * 10));
    }
    assert!(
        outbox.flush(&control).await.is_err(),
        "nothing answers while the server is down"
    );
    assert_eq!(outbox.len(), 150, "every sample is kept");

    server.restart().await;
    outbox
        .flush(&control)
        .await
        .expect("sends the backlog in batches");
    assert!(outbox.is_empty());
    let series = server
        .get(&format!(
            "/api/v1/metrics?node=nginx1&name=mem.node_rss&from={}&to={now}&step=10",
            now - 1500
        ))
        .await;
    let points = series["series"][0]["points"].as_array().expect("points");
    assert_eq!(points.len(), 151, "{series}");
    assert!(
        points
            .iter()
            .all(|p| p["value"].as_f64() == p["at"].as_f64()),
        "each sample in its own slot"
    );
    server.stop().await;
}
