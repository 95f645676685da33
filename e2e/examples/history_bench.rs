//! The history checker for as long as asked: rounds of the list-append
//! workload (`corral_e2e::workload`), each with one fault of the schedule
//! in turn, in `sync` mode, every round's history checked on its own
//! (`corral_e2e::history`). Prints a line per round and the totals; exits
//! non-zero if any round found an anomaly.
//!
//!   cargo run --release -p corral-e2e --example history_bench -- \
//!       [--minutes 30] [--round-seconds 40] [--db 2] [--octet 39] [--lxc]
//!
//! Local clusters run on 127.0.OCTET.0/24; with `--lxc`, containers on
//! 192.168.OCTET.0/24, where the schedule partitions the primary instead of
//! killing its node. Run it through `scripts/bench/history.sh`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use corral_e2e::Cluster;
use corral_e2e::pg::sync_mode;
use corral_e2e::workload::{Fault, round};

fn take_flag(args: &mut Vec<String>, flag: &str) -> bool {
    let before = args.len();
    args.retain(|a| a != flag);
    args.len() != before
}

fn take_number(args: &mut Vec<String>, flag: &str, default: u64) -> anyhow::Result<u64> {
    let Some(i) = args.iter().position(|a| a == flag) else {
        return Ok(default);
    };
    args.remove(i);
    if i >= args.len() {
        bail!("{flag} needs a number");
    }
    let value = args.remove(i);
    value
        .parse()
        .map_err(|_| anyhow::anyhow!("{flag} {value:?}: not a number"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let lxc = take_flag(&mut args, "--lxc");
    let minutes = take_number(&mut args, "--minutes", 30)?;
    let round_seconds = take_number(&mut args, "--round-seconds", 40)?;
    let db = take_number(&mut args, "--db", 2)? as u32;
    let octet = take_number(&mut args, "--octet", 39)?;
    if let Some(other) = args.first() {
        bail!(
            "unexpected {other:?}; usage: history_bench [--minutes N] [--round-seconds N] [--db N] [--octet N] [--lxc]"
        );
    }
    if !(10..=60).contains(&round_seconds) {
        bail!("--round-seconds {round_seconds}: from 10 to 60 (a round's list must stay one page)");
    }
    let octet = u8::try_from(octet).map_err(|_| anyhow::anyhow!("--octet {octet}: 0 to 255"))?;
    let c = if lxc {
        eprintln!("==> corral up --provider lxc (1 web, {db} db) on 192.168.{octet}.0/24");
        Cluster::up_lxc(octet, 1, db).await?
    } else {
        eprintln!("==> corral up (1 web, {db} db) on 127.0.{octet}.0/24");
        Cluster::up(octet, 1, db).await?
    };
    sync_mode(&c, 1, db).await?;
    let password = std::fs::read_to_string(c.state_dir().join("db-password"))?
        .trim()
        .to_string();
    let schedule = Fault::schedule(c.machines);
    let start = Instant::now();
    let until = Duration::from_secs(minutes * 60);
    eprintln!(
        "==> {minutes} min of {round_seconds} s rounds in sync mode, faults in turn: {}",
        schedule
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut per_fault: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let (mut ok, mut unknown, mut failed, mut reads, mut anomalies) = (0, 0, 0, 0, Vec::new());
    let mut i = 0;
    while start.elapsed() < until {
        let fault = schedule[i % schedule.len()];
        let r = round(
            &c,
            &["nginx1"],
            &password,
            i,
            Duration::from_secs(round_seconds),
            fault,
        )
        .await;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                let logs = c.logs_for_failure().await;
                anyhow::bail!("round {i} ({}): {e:#}\n{logs}", fault.name());
            }
        };
        let s = &r.summary;
        println!(
            "[{:>3}:{:02}] round {i:>3} {:<24} {:>5} appends ok, {:>3} unknown ({} present), {} failed, {:>6} reads ({} from a replica), {} anomalies",
            start.elapsed().as_secs() / 60,
            start.elapsed().as_secs() % 60,
            fault.name(),
            s.ok,
            s.unknown,
            s.unknown_present,
            s.failed,
            s.reads,
            s.replica_reads,
            r.anomalies.len()
        );
        for a in &r.anomalies {
            println!("    {a}");
        }
        let entry = per_fault.entry(fault.name()).or_default();
        entry.0 += 1;
        entry.1 += r.anomalies.len();
        ok += s.ok;
        unknown += s.unknown;
        failed += s.failed;
        reads += s.reads;
        anomalies.extend(r.anomalies);
        i += 1;
    }
    println!();
    println!(
        "history checker: {i} rounds in {:.1} min, sync mode, 1 web + {db} db nodes ({})",
        start.elapsed().as_secs_f64() / 60.0,
        if lxc { "LXC" } else { "local" }
    );
    println!(
        "  {} appends ({ok} acknowledged, {unknown} unknown, {failed} failed), {reads} reads",
        ok + unknown + failed
    );
    for (fault, (rounds, n)) in &per_fault {
        println!("  {fault:<24} {rounds:>3} rounds, {n} anomalies");
    }
    println!("  anomalies: {}", anomalies.len());
    if !anomalies.is_empty() {
        // exit() skips destructors: stop the cluster (containers, bridge,
        // processes) first.
        drop(c);
        std::process::exit(1);
    }
    Ok(())
}
