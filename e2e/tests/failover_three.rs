//! Three db nodes in `sync` mode, writes through nginx all along: the
//! primary node is frozen whole (agent, Consul agent, postgres) until a
//! standby has been promoted, then thawed at once. A standby still
//! connected to the frozen primary would, once it thaws, acknowledge
//! commits the promoted node lacks (found by the HA property tests,
//! `agents/src/drivers/ha_sim.rs`); standbys stop following a primary
//! whose lock is free, and the candidate waits for them. Afterwards one
//! server takes writes and every acknowledged write is on it and on both
//! standbys.

use corral_e2e::faults::{Frozen, node_processes, signal_all};
use corral_e2e::pg::{sql, sync_mode};
use corral_e2e::writes::{LONG, Writer, settled};
use corral_e2e::{Cluster, eventually};
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thawed_primary_of_three_gets_no_write_acknowledged_that_is_then_lost() {
    let c = Cluster::up(37, 1, 3).await.expect("cluster up");
    sync_mode(&c, 1, 3).await.expect("sync mode");
    let w = Writer::start(&c, "nginx1");
    let first = settled(&c, &w, "start").await.expect("start");

    let frozen = Frozen(node_processes(&c, &first).expect("the primary's processes"));
    assert!(
        frozen.0.len() >= 3,
        "agent, consul, postgres: {:?}",
        frozen.0
    );
    signal_all(&frozen.0, Signal::SIGSTOP);
    let standbys: Vec<String> = ["pg1", "pg2", "pg3"]
        .into_iter()
        .filter(|n| *n != first)
        .map(String::from)
        .collect();
    // Thaw the moment another node runs as primary: the window in which a
    // standby still connected to the old one could acknowledge its commits.
    let promoted = eventually("a standby to be promoted", LONG, || async {
        for node in &standbys {
            if sql(&c, node, "SELECT pg_is_in_recovery()").await? == "f" {
                return Ok(Some(node.clone()));
            }
        }
        Ok(None)
    })
    .await
    .expect("promotion");
    drop(frozen);
    let now = settled(&c, &w, "the frozen primary thawed")
        .await
        .expect("after the thaw");
    assert_eq!(now, promoted, "the promoted node stays primary");
    // The standby that was not promoted stopped following the frozen
    // primary before anyone was promoted.
    let log = std::fs::read_to_string(
        c.node_root(
            standbys
                .iter()
                .find(|n| **n != promoted)
                .expect("a third node"),
        )
        .join("agent.log"),
    )
    .unwrap_or_default();
    assert!(
        log.contains("no longer streaming from the last primary"),
        "the third node never stopped following the frozen primary"
    );
    drop(w);
}
