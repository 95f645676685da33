//! The log shipper against a real corral server: lines written while the
//! control plane is down — some of them in a log rotated meanwhile, and
//! across an agent restart — all reach the server once it is back, in
//! order, none twice.
//!
//! Address: 127.0.32.1 (the server, started twice on the same port).

use std::io::Write;

use corral_agent::config::EnrollSecretSource;
use corral_agent::control::ControlPlane;
use corral_agent::durable::StateDir;
use corral_agent::logship::LogShipper;
use corral_agent::supervisor::{LogRotation, rotate_log};
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

/// Stops the server when the test ends, passing or not.
struct Stop(Option<actix_web::dev::ServerHandle>);

impl Drop for Stop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            drop(handle.stop(false));
        }
    }
}

fn append(log: &std::path::Path, from: usize, to: usize) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open log");
    for i in from..to {
        writeln!(file, "line {i}").expect("write");
    }
}

struct Enrolled {
    url: String,
    admin: String,
    stop: Stop,
    control: ControlPlane,
    logs: std::path::PathBuf,
}

/// A server on `listen` with the node nginx1, and nginx1's agent side: its
/// control-plane client and its (empty) log directory.
async fn enrolled(dir: &std::path::Path, listen: &str) -> Enrolled {
    let server_state = dir.join("server");
    let (url, handle) = serve(&server_state, listen).await;
    let stop = Stop(Some(handle));
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
        StateDir::open(&dir.join("agent")).expect("state"),
    )
    .expect("client");
    let logs = dir.join("agent").join("logs");
    std::fs::create_dir_all(&logs).expect("logs dir");
    Enrolled {
        url,
        admin,
        stop,
        control,
        logs,
    }
}

async fn kept_lines(url: &str, admin: &str, service: &str) -> Vec<String> {
    let kept: Vec<Value> = reqwest::Client::new()
        .get(format!(
            "{url}/api/v1/nodes/nginx1/logs?service={service}&limit=500"
        ))
        .bearer_auth(admin)
        .send()
        .await
        .expect("logs")
        .json()
        .await
        .expect("json");
    kept.iter()
        .map(|l| l["line"].as_str().expect("line").to_string())
        .collect()
}

#[tokio::test]
async fn lines_written_while_the_server_is_down_arrive_once_it_is_back_none_twice() {
    let dir = tempfile::tempdir().expect("tmp");
    let server_state = dir.path().join("server");
    let Enrolled {
        url,
        admin,
        mut stop,
        control,
        logs,
    } = enrolled(dir.path(), "127.0.32.1:0").await;
    let log = logs.join("nginx.log");
    let rotation = LogRotation {
        max_bytes: 1000,
        keep: 3,
    };

    append(&log, 0, 10);
    let mut shipper = LogShipper::new(logs.clone());
    shipper.ship(&control).await.expect("enrolls and ships");

    // The control plane goes away. The service writes on; its log is
    // rotated (copy-truncate) past 1000 bytes and written to again, and
    // the agent restarts, all while nothing can be shipped.
    stop.0.take().expect("running").stop(true).await;
    append(&log, 10, 150);
    assert!(
        shipper.ship(&control).await.is_err(),
        "nothing answers while the server is down"
    );
    assert!(rotate_log(&log, rotation).expect("rotate"), "log rotated");
    append(&log, 150, 180);
    assert!(shipper.ship(&control).await.is_err());
    let mut shipper = LogShipper::new(logs.clone());
    append(&log, 180, 200);
    assert!(shipper.ship(&control).await.is_err());

    let listen = url.trim_start_matches("http://");
    let (_, handle) = serve(&server_state, listen).await;
    stop.0 = Some(handle);
    // The first rounds after the restart carry the backlog; the same
    // place, kept on disk, is read by an agent started now.
    shipper.ship(&control).await.expect("ships the backlog");
    let mut shipper = LogShipper::new(logs.clone());
    shipper.ship(&control).await.expect("nothing more to ship");

    let lines = kept_lines(&url, &admin, "nginx").await;
    let expected: Vec<String> = (10..200).map(|i| format!("line {i}")).collect();
    assert_eq!(
        lines, expected,
        "every line written during the outage, in order, none twice (the restarted server kept none before)"
    );
}

#[tokio::test]
async fn a_log_the_server_refuses_does_not_hold_back_the_others() {
    let dir = tempfile::tempdir().expect("tmp");
    let Enrolled {
        url,
        admin,
        stop: _stop,
        control,
        logs,
    } = enrolled(dir.path(), "127.0.32.2:0").await;
    // Not a service name the server files logs under: refused (422).
    append(&logs.join("Bad Name.log"), 0, 3);
    append(&logs.join("nginx.log"), 0, 3);
    let mut shipper = LogShipper::new(logs.clone());
    shipper
        .ship(&control)
        .await
        .expect("a refused batch is skipped, not retried forever");
    assert_eq!(
        kept_lines(&url, &admin, "nginx").await,
        ["line 0", "line 1", "line 2"]
    );
}
