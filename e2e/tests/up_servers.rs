//! `corral up --servers 2`: two control-plane servers on adm1's and adm2's
//! addresses, sharing the state database `up` runs for them (a PostgreSQL
//! primary on adm1's address, a standby on adm2's). One server killed with
//! SIGKILL, a web node added through the other still comes to serve
//! TodoMVC, and `up` starts the killed one again; Ctrl-C then stops
//! everything, and nothing is left running.
//!
//! Addresses: 127.0.36.0/24 (adm1 .5, adm2 .6, pg1 .11, nginx1 .21, nginx2
//! .22).

use std::time::Duration;

use corral_e2e::{Cluster, eventually};
use corral_server::provider::reaper;
use nix::sys::signal::{Signal, kill};
use serde_json::{Value, json};

fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).replace('\0', " ")
}

/// The `corral serve` process of cluster `c` listening on `address`.
fn server_pid(c: &Cluster, address: &str) -> Option<u32> {
    c.processes().into_iter().find(|pid| {
        let line = cmdline(*pid);
        line.contains(" serve ") && line.contains(&format!("--listen {address}:7000"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_keep_the_cluster_growing_when_one_is_killed() -> anyhow::Result<()> {
    let mut c = Cluster::up_with(36, 1, 1, &["--servers", "2"]).await?;
    let said = std::fs::read_to_string(c.up_log())?;
    for url in ["http://127.0.36.5:7000/", "http://127.0.36.6:7000/"] {
        assert!(
            said.contains(url),
            "corral up does not print {url}:\n{said}"
        );
    }
    // Every agent was given both servers.
    let agent = c
        .processes()
        .into_iter()
        .map(cmdline)
        .find(|line| line.contains("corral-agent") && line.contains("--node nginx1"))
        .expect("nginx1's agent");
    assert!(
        agent.contains("127.0.36.5:7000") && agent.contains("127.0.36.6:7000"),
        "nginx1's agent is not given both servers: {agent}"
    );

    // Kill the server that leads (it runs the machine controller): the
    // other must take the work over and make the new node.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut leader = None;
    for address in ["127.0.36.5", "127.0.36.6"] {
        let health: Value = http
            .get(format!("http://{address}:7000/healthz"))
            .send()
            .await?
            .json()
            .await?;
        if health["leader"] == true {
            leader = Some(address);
        }
    }
    let leader = leader.expect("one server leads");
    let other = if leader == "127.0.36.5" {
        "127.0.36.6"
    } else {
        "127.0.36.5"
    };
    let pid = server_pid(&c, leader).expect("the leading server's pid");
    kill(reaper::pid(pid), Signal::SIGKILL)?;

    let added: Value = http
        .post(format!("http://{other}:7000/api/v1/nodes"))
        .bearer_auth(&c.token)
        .json(&json!({"role": "web"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(added["name"], "nginx2");
    let url = c.lb("nginx2", "/todos");
    eventually("nginx2 to serve TodoMVC", Duration::from_secs(120), || {
        let http = http.clone();
        let url = url.clone();
        async move {
            Ok(http
                .get(&url)
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ()))
        }
    })
    .await?;

    // `up` started the killed server again.
    let health = format!("http://{leader}:7000/healthz");
    eventually(
        "the killed server to be started again",
        Duration::from_secs(30),
        || {
            let http = http.clone();
            let health = health.clone();
            async move {
                Ok(http
                    .get(&health)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ()))
            }
        },
    )
    .await?;
    assert_ne!(server_pid(&c, leader), Some(pid), "the same process?");

    // Ctrl-C: everything stops, nothing of the cluster is left running.
    c.stop().await?;
    let left = c.processes();
    assert!(
        left.is_empty(),
        "left running after corral up stopped: {left:?}"
    );
    Ok(())
}
