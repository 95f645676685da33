//! The agent's metrics outbox against a real corral server: samples taken
//! while the control plane is down stay in the outbox and reach the server
//! once it is back, in batches, none lost.
//!
//! Address: 127.0.31.5 (the server, started twice on the same port).

use std::collections::BTreeMap;

use corral_agent::config::EnrollSecretSource;
use corral_agent::control::ControlPlane;
use corral_agent::durable::StateDir;
use corral_agent::metrics::Outbox;
use corral_proto::{MetricName, MetricReading};
use corral_server::startup::{Application, Config};
use serde_json::{Value, json};

async fn serve(state: &std::path::Path, listen: &str) -> (String, actix_web::dev::ServerHandle) {
    let mut config = Config::new(state);
    config.listen = listen.into();
    config.workers = Some(1);
    let app = Application::build(config).await.expect("server starts");
    let (url, handle) = (app.url(), app.handle());
    tokio::spawn(app.run_until_stopped());
    (url, handle)
}

#[tokio::test]
async fn samples_taken_while_the_server_is_down_arrive_once_it_is_back() {
    let dir = tempfile::tempdir().expect("tmp");
    let server_state = dir.path().join("server");
    let (url, handle) = serve(&server_state, "127.0.31.5:0").await;
    let admin = std::fs::read_to_string(server_state.join("admin-token"))
        .expect("admin token")
        .trim()
        .to_string();
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{url}/api/v1/nodes"))
        .bearer_auth(&admin)
        .json(&json!({"role": "web"}))
        .send()
        .await
        .expect("create a node");
    assert_eq!(res.status(), 201);
    let res = http
        .post(format!("{url}/api/v1/nodes/nginx1/enroll-secret"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("mint");
    let secret = res.json::<Value>().await.expect("json")["secret"]
        .as_str()
        .expect("secret")
        .to_string();
    let control = ControlPlane::new(
        std::slice::from_ref(&url),
        "nginx1",
        EnrollSecretSource {
            value: Some(secret),
            file: None,
        },
        None,
        StateDir::open(&dir.path().join("agent")).expect("state"),
    )
    .expect("client");
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
    handle.stop(true).await;
    for i in (0..150).rev() {
        outbox.push(sample(now - i * 10));
    }
    assert!(
        outbox.flush(&control).await.is_err(),
        "nothing answers while the server is down"
    );
    assert_eq!(outbox.len(), 150, "every sample is kept");

    let listen = url.trim_start_matches("http://");
    let (_, handle) = serve(&server_state, listen).await;
    outbox
        .flush(&control)
        .await
        .expect("sends the backlog in batches");
    assert!(outbox.is_empty());
    let series: Value = http
        .get(format!(
            "{url}/api/v1/metrics?node=nginx1&name=mem.node_rss&from={}&to={now}&step=10",
            now - 1500
        ))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("metrics")
        .json()
        .await
        .expect("json");
    let points = series["series"][0]["points"].as_array().expect("points");
    assert_eq!(points.len(), 151, "{series}");
    assert!(
        points
            .iter()
            .all(|p| p["value"].as_f64() == p["at"].as_f64()),
        "each sample in its own slot"
    );
    handle.stop(true).await;
}
