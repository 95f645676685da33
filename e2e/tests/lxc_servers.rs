//! `corral up --provider lxc --servers 2`: two control-plane servers on the
//! bridge, at adm1's address (the host's) and adm2's (a second address of
//! the host there), sharing the state database `up` runs for them; the
//! nodes are containers whose agents are given both. The server that leads
//! is killed with SIGKILL; a web node added through the other becomes a
//! container serving TodoMVC, and `up` starts the killed server again.
//! Ctrl-C then stops everything, and nothing is left running.
//!
//! Skipped, with the reason printed, where LXC cannot run (not root, no lxc
//! tools, no packages from scripts/package.sh).
//!
//! Addresses: 192.168.115.0/24 (adm1 .5, adm2 .6, pg1 .11, nginx1 .21,
//! nginx2 .22).

use std::time::Duration;

use corral_e2e::{Cluster, eventually, lxc_unavailable};
use corral_server::provider::reaper;
use nix::sys::signal::{Signal, kill};
use serde_json::{Value, json};

const OCTET: u8 = 115;

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
async fn two_servers_on_the_lxc_bridge_keep_the_cluster_growing_when_one_is_killed()
-> anyhow::Result<()> {
    if let Some(why) = lxc_unavailable() {
        eprintln!("SKIPPED: the LXC end-to-end test cannot run here: {why}");
        return Ok(());
    }
    let (adm1, adm2) = (format!("192.168.{OCTET}.5"), format!("192.168.{OCTET}.6"));
    let mut c = Cluster::up_lxc_with(OCTET, 1, 1, &["--servers", "2"]).await?;
    let said = std::fs::read_to_string(c.up_log())?;
    for address in [&adm1, &adm2] {
        let url = format!("https://{address}:7000/");
        assert!(
            said.contains(&url),
            "corral up does not print {url}:\n{said}"
        );
    }
    // The containers' agents were given both servers.
    let conf = std::fs::read_to_string(
        c.lxc_path()
            .join("nginx1/overlay/delta/etc/corral/agent.conf"),
    )?;
    assert!(
        conf.contains(&format!("{adm1}:7000")) && conf.contains(&format!("{adm2}:7000")),
        "nginx1's agent is not given both servers:\n{conf}"
    );

    // Kill the server that leads (it runs the machine controller, the one
    // that makes containers): the other must take the work over.
    let http = c.http.clone();
    let mut leader = None;
    for address in [&adm1, &adm2] {
        let health: Value = http
            .get(format!("https://{address}:7000/healthz"))
            .send()
            .await?
            .json()
            .await?;
        if health["leader"] == true {
            leader = Some(address.clone());
        }
    }
    let leader = leader.expect("one server leads");
    let other = if leader == adm1 { &adm2 } else { &adm1 };
    let pid = server_pid(&c, &leader).expect("the leading server's pid");
    kill(reaper::pid(pid), Signal::SIGKILL)?;

    let added: Value = http
        .post(format!("https://{other}:7000/api/v1/nodes"))
        .bearer_auth(&c.token)
        .json(&json!({"role": "web"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(added["name"], "nginx2");
    let url = c.lb("nginx2", "/todos");
    eventually(
        "nginx2's container to serve TodoMVC",
        Duration::from_secs(240),
        || {
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
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.tail_logs()))?;
    // `up` started the killed server again.
    let health = format!("https://{leader}:7000/healthz");
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
    assert_ne!(server_pid(&c, &leader), Some(pid), "the same process?");

    // Ctrl-C: everything stops, containers too; nothing is left running.
    c.stop().await?;
    let left = c.processes();
    assert!(
        left.is_empty(),
        "left running after corral up stopped: {left:?}"
    );
    Ok(())
}
