//! The history checker under every fault of the schedule, one round each,
//! in `sync` mode (so no acknowledged append may be lost): a primary's
//! postgres killed, a switchover, the primary node frozen for 10 s, the
//! primary node killed. Each round's history (appends and reads through
//! nginx and straight on the primary, with invoke and complete times) must
//! check clean. `scripts/bench/history.sh` runs the same rounds for longer.

use std::time::Duration;

use corral_e2e::Cluster;
use corral_e2e::pg::sync_mode;
use corral_e2e::workload::{Fault, round};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_and_reads_check_clean_under_every_fault_of_the_schedule() {
    let c = Cluster::up(38, 1, 2).await.expect("cluster up");
    sync_mode(&c, 1, 2).await.expect("sync mode");
    let password = std::fs::read_to_string(c.state_dir().join("db-password"))
        .expect("db password")
        .trim()
        .to_string();
    let mut failed = Vec::new();
    for (i, fault) in Fault::schedule(c.machines).into_iter().enumerate() {
        let r = round(
            &c,
            &["nginx1"],
            &password,
            i,
            Duration::from_secs(24),
            fault,
        )
        .await;
        let r = match r {
            Ok(r) => r,
            Err(e) => panic!(
                "round {i} ({}): {e:#}\n{}",
                fault.name(),
                c.logs_for_failure().await
            ),
        };
        eprintln!(
            "round {i} ({}): {:?}, {} anomalies",
            fault.name(),
            r.summary,
            r.anomalies.len()
        );
        // Enough happened for the check to mean something.
        if r.anomalies.is_empty() {
            assert!(
                r.summary.ok >= 20 && r.summary.reads >= 100,
                "round {i}: too little traffic: {:?}",
                r.summary
            );
        }
        failed.extend(
            r.anomalies
                .into_iter()
                .map(|a| format!("round {i} ({}): {a}", fault.name())),
        );
    }
    assert!(failed.is_empty(), "anomalies:\n{}", failed.join("\n"));
}
