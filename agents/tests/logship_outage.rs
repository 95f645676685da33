//! The log shipper against a real corral server: lines written while the
//! control plane is down — some of them in a log rotated meanwhile, and
//! across an agent restart — all reach the server once it is back, in
//! order, none twice, after the lines it kept from before.
//!
//! Address: 127.0.32.1 (the server, started twice on the same port).

use std::io::Write;

use corral_agent::control::ControlPlane;
use corral_agent::logship::LogShipper;
use corral_agent::supervisor::{LogRotation, rotate_log};

mod common;
use common::Server;

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
    server: Server,
    control: ControlPlane,
    logs: std::path::PathBuf,
}

/// A server on `listen` with the node nginx1, and nginx1's agent side: its
/// control-plane client and its (empty) log directory.
async fn enrolled(dir: &std::path::Path, listen: &str) -> Enrolled {
    let server = Server::start(common::config(&dir.join("server"), listen)).await;
    assert_eq!(server.create_node("web").await, "nginx1");
    let secret = server.mint("nginx1").await;
    let (control, _) = common::agent(
        std::slice::from_ref(&server.url),
        "nginx1",
        &secret,
        None,
        &dir.join("agent"),
    );
    let logs = dir.join("agent").join("logs");
    std::fs::create_dir_all(&logs).expect("logs dir");
    Enrolled {
        server,
        control,
        logs,
    }
}

async fn kept_lines(server: &Server, service: &str) -> Vec<String> {
    let kept = server
        .get(&format!(
            "/api/v1/nodes/nginx1/logs?service={service}&limit=500"
        ))
        .await;
    kept.as_array()
        .expect("a list")
        .iter()
        .map(|l| l["line"].as_str().expect("line").to_string())
        .collect()
}

#[tokio::test]
async fn lines_written_while_the_server_is_down_arrive_once_it_is_back_none_twice() {
    let dir = tempfile::tempdir().expect("tmp");
    let Enrolled {
        mut server,
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
    server.stop().await;
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

    server.restart().await;
    // The first rounds after the restart carry the backlog; the same
    // place, kept on disk, is read by an agent started now.
    shipper.ship(&control).await.expect("ships the backlog");
    let mut shipper = LogShipper::new(logs.clone());
    shipper.ship(&control).await.expect("nothing more to ship");

    // The server keeps lines in its database: those shipped before the
    // outage are still there, then every line written during it.
    let lines = kept_lines(&server, "nginx").await;
    let expected: Vec<String> = (0..200).map(|i| format!("line {i}")).collect();
    assert_eq!(
        lines, expected,
        "every line written during the outage, in order, none twice, after those kept from before"
    );
}

#[tokio::test]
async fn a_log_the_server_refuses_does_not_hold_back_the_others() {
    let dir = tempfile::tempdir().expect("tmp");
    let Enrolled {
        server,
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
        kept_lines(&server, "nginx").await,
        ["line 0", "line 1", "line 2"]
    );
}
