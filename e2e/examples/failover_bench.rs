//! Failover benchmark: eight concurrent writers (four through nginx and the
//! webapp, four straight into PostgreSQL) insert unique ids and log each
//! acknowledgement; then the primary fails: every postgres process killed
//! with SIGKILL (`--kill postgres`, the default), the whole node killed as
//! a crashed machine (`--kill node`), its agent and postgres killed with its
//! Consul agent left alive (`--kill agent+postgres`), or, on the LXC provider,
//! its container frozen whole (`--kill freeze`) or partitioned from every
//! other node (`--kill partition`), undone once writes resume elsewhere.
//! After the cluster has recovered, the acknowledged ids missing from the
//! new primary are counted and the write outage measured (last
//! acknowledged write before the fault to the first after). Rounds per
//! replication mode.
//!
//!   cargo run --release -p corral-e2e --example failover_bench -- \
//!       [ROUNDS] [MODES] [OCTET] [--kill postgres|node|agent+postgres|freeze|partition] [--lxc]
//!   cargo run --release -p corral-e2e --example failover_bench -- \
//!       --soak MINUTES [MODE] [OCTET] [--lxc]
//!
//! `--soak`: no fault at all, the same eight writers for MINUTES (the
//! machine loaded by them and the cluster), to count false failovers: every
//! change of primary or timeline, every fence the agents logged, the longest
//! pause between two acknowledged writes, and the acknowledged writes lost.
//!
//! (defaults: 20 rounds, `sync,async`, cluster on 127.0.24.0/24, or on
//! 192.168.OCTET.0/24 in containers with `--lxc`). Run it through
//! `scripts/bench/failover.sh`, which builds what it needs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use corral_e2e::faults::{self, Freeze, Partition};
use corral_e2e::pg::{
    commits_wait, connect_primary, db_nodes, kill_postgres, sole_primary, sql, streams_from,
};
use corral_e2e::{Cluster, eventually};
use nix::sys::signal::Signal;
use reqwest::Method;
use serde_json::json;
use sqlx::postgres::PgConnection;

const LONG: Duration = Duration::from_secs(180);

/// An acknowledged write.
#[derive(Clone)]
struct Ack {
    id: String,
    sent: Instant,
    acked: Instant,
}

type Acks = Arc<Mutex<Vec<Ack>>>;

/// Writes through the load balancer until told to stop.
async fn web_writer(url: String, prefix: String, acks: Acks, stop: Arc<AtomicBool>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let id = format!("{prefix}-{n}");
        n += 1;
        let sent = Instant::now();
        let ok = http
            .post(&url)
            .json(&json!({ "title": id }))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            acks.lock().expect("lock").push(Ack {
                id,
                sent,
                acked: Instant::now(),
            });
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Writes straight into whichever db node takes writes, reconnecting after
/// every error.
async fn direct_writer(
    nodes: Vec<(String, String)>,
    password: String,
    prefix: String,
    acks: Acks,
    stop: Arc<AtomicBool>,
) {
    let mut conn: Option<PgConnection> = None;
    let mut n = 0u64;
    let mut next = 0usize;
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            let (_, addr) = &nodes[next % nodes.len()];
            next += 1;
            match connect_primary(addr, &password).await {
                Ok(Some(c)) => conn = Some(c),
                Ok(None) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
            continue;
        }
        let id = format!("{prefix}-{n}");
        n += 1;
        let c = conn.as_mut().expect("connected");
        let sent = Instant::now();
        let res = tokio::time::timeout(
            Duration::from_secs(6),
            sqlx::query("INSERT INTO todos (title) VALUES ($1)")
                .bind(&id)
                .execute(c),
        )
        .await;
        match res {
            Ok(Ok(_)) => acks.lock().expect("lock").push(Ack {
                id,
                sent,
                acked: Instant::now(),
            }),
            _ => conn = None,
        }
    }
}

/// Four writers through nginx1 and four straight into PostgreSQL, ids
/// starting with `prefix`, until `stop`.
fn writers(
    c: &Cluster,
    prefix: &str,
    password: &str,
    acks: &Acks,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let nodes: Vec<(String, String)> = db_nodes(c)
        .into_iter()
        .map(|n| {
            let a = c.address(&n);
            (n, a)
        })
        .collect();
    let mut tasks = Vec::new();
    for w in 0..4 {
        tasks.push(tokio::spawn(web_writer(
            c.lb("nginx1", "/todos"),
            format!("{prefix}-web{w}"),
            acks.clone(),
            stop.clone(),
        )));
        tasks.push(tokio::spawn(direct_writer(
            nodes.clone(),
            password.to_string(),
            format!("{prefix}-sql{w}"),
            acks.clone(),
            stop.clone(),
        )));
    }
    tasks
}

struct Round {
    outage: Duration,
    acked: usize,
    lost: usize,
}

fn other(c: &Cluster, node: &str) -> anyhow::Result<String> {
    db_nodes(c)
        .into_iter()
        .find(|n| n != node)
        .context("a second db node")
}

/// One primary and a standby streaming from it; in the synchronous modes
/// also with commits waiting for it again (the rounds measure the steady
/// state, not `sync` mode's fallback while a standby is away).
async fn healthy(c: &Cluster, synchronous: bool) -> anyhow::Result<String> {
    eventually("a primary with a streaming standby", LONG, || async {
        let primary = sole_primary(c).await?;
        let standby = other(c, &primary)?;
        let ok = streams_from(c, &standby, &primary).await?
            && (!synchronous || commits_wait(c, &primary).await?);
        Ok(ok.then_some(primary))
    })
    .await
}

/// How the primary fails in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Postgres,
    /// The whole node (agent, Consul agent, every postgres process)
    /// SIGKILLed at once, as a crashed machine; the local provider starts
    /// its agent again, which brings the rest back.
    Node,
    /// The agent and postgres SIGKILLed, the node's Consul agent left
    /// alive (Patroni's crash test).
    AgentPostgres,
    Freeze,
    Partition,
}

/// A fault in force, undone by [`Injected::undo`].
enum Injected {
    None,
    Frozen(Freeze),
    Cut(Partition),
}

impl Injected {
    async fn undo(self) -> anyhow::Result<()> {
        match self {
            Injected::None => Ok(()),
            Injected::Frozen(f) => f.thaw().await,
            Injected::Cut(p) => {
                p.heal().await;
                Ok(())
            }
        }
    }
}

async fn inject(c: &Cluster, fault: Fault, primary: &str) -> anyhow::Result<Injected> {
    Ok(match fault {
        Fault::Postgres => {
            kill_postgres(c, primary).await?;
            Injected::None
        }
        Fault::Node => {
            let pids = faults::node_processes(c, primary)?;
            // Stopped first, so none notices the others dying.
            faults::signal_all(&pids, Signal::SIGSTOP);
            faults::signal_all(&pids, Signal::SIGKILL);
            Injected::None
        }
        Fault::AgentPostgres => {
            let agent = faults::service_pid(c, primary, "agent")?;
            faults::signal_all(&[agent], Signal::SIGSTOP);
            kill_postgres(c, primary).await?;
            faults::signal_all(&[agent], Signal::SIGKILL);
            Injected::None
        }
        Fault::Freeze => Injected::Frozen(Freeze::node(c, primary).await?),
        Fault::Partition => {
            let others: Vec<String> = c
                .machine_names()
                .into_iter()
                .filter(|n| n != primary)
                .collect();
            let others: Vec<&str> = others.iter().map(String::as_str).collect();
            Injected::Cut(Partition::cut(c, &[primary], &others).await?)
        }
    })
}

async fn round(
    c: &Cluster,
    mode: &str,
    fault: Fault,
    index: usize,
    password: &str,
) -> anyhow::Result<Round> {
    let synchronous = mode != "async";
    let primary = healthy(c, synchronous).await?;
    let acks: Acks = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let prefix = format!("bench-{mode}-{index}");
    let tasks = writers(c, &prefix, password, &acks, &stop);
    let count = || acks.lock().expect("lock").len();
    eventually("writers to get going", LONG, || async {
        Ok((count() > 200).then_some(()))
    })
    .await?;
    // The moment the fault is complete: every postgres process gone
    // (finding the backends in /proc takes milliseconds, during which writes
    // still succeed), the container frozen, the rules in place.
    let injected = inject(c, fault, &primary).await?;
    let killed_at = Instant::now();
    // The first write sent after the kill and acknowledged; writes in
    // flight at the kill do not count as resumed.
    let first_after = eventually("writes to resume", LONG, || async {
        Ok(acks
            .lock()
            .expect("lock")
            .iter()
            .filter(|a| a.sent > killed_at)
            .map(|a| a.acked)
            .min()
            .filter(|t| t.elapsed() > Duration::from_secs(1)))
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    injected.undo().await?;
    let acks = acks.lock().expect("lock").clone();
    let last_before = acks
        .iter()
        .filter(|a| a.acked <= killed_at)
        .map(|a| a.acked)
        .max()
        .context("no write before the kill")?;
    if std::env::var_os("BENCH_DEBUG").is_some() {
        let first = acks
            .iter()
            .filter(|a| a.sent > killed_at)
            .min_by_key(|a| a.acked)
            .expect("first");
        eprintln!(
            "first after the kill: {} sent +{} ms acked +{} ms; primary was {primary}",
            first.id,
            (first.sent - killed_at).as_millis(),
            (first.acked - killed_at).as_millis()
        );
    }
    // Every node back: the old primary rejoined as a standby.
    let new_primary = healthy(c, mode != "async").await?;
    let stored: std::collections::HashSet<String> = sql(
        c,
        &new_primary,
        &format!("SELECT title FROM todos WHERE title LIKE '{prefix}-%'"),
    )
    .await?
    .lines()
    .map(String::from)
    .collect();
    let lost = acks.iter().filter(|a| !stored.contains(&a.id)).count();
    Ok(Round {
        outage: first_after - last_before,
        acked: acks.len(),
        lost,
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The primary's name and timeline, as its own server says.
async fn primary_and_timeline(c: &Cluster) -> anyhow::Result<(String, String)> {
    let primary = sole_primary(c).await?;
    let wal = sql(c, &primary, "SELECT pg_walfile_name(pg_current_wal_lsn())").await?;
    Ok((primary, wal.chars().take(8).collect()))
}

/// Lines of the db nodes' agent logs that say a primary fenced itself.
fn fences(c: &Cluster) -> Vec<String> {
    db_nodes(c)
        .iter()
        .flat_map(|n| {
            let text =
                std::fs::read_to_string(c.node_root(n).join("agent.log")).unwrap_or_default();
            text.lines()
                .filter(|l| l.contains("fencing"))
                .map(|l| format!("{n}: {l}"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// No fault: the writers for `minutes`, watching for failovers.
async fn soak(c: &Cluster, mode: &str, minutes: u64, password: &str) -> anyhow::Result<()> {
    let synchronous = mode != "async";
    healthy(c, synchronous).await?;
    let fences_before = fences(c).len();
    let (first_primary, first_tl) = primary_and_timeline(c).await?;
    let acks: Acks = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let prefix = format!("soak-{mode}");
    let tasks = writers(c, &prefix, password, &acks, &stop);
    let started = Instant::now();
    let end = started + Duration::from_secs(minutes * 60);
    let mut last = (first_primary.clone(), first_tl.clone());
    let mut changes = Vec::new();
    let mut unclear = 0usize;
    let mut next_report = started + Duration::from_secs(300);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(2)).await;
        match primary_and_timeline(c).await {
            Ok(now) if now != last => {
                let at = started.elapsed().as_secs();
                println!(
                    "{at:>5} s: primary {} timeline {} -> {} timeline {}",
                    last.0, last.1, now.0, now.1
                );
                changes.push(at);
                last = now;
            }
            Ok(_) => {}
            Err(e) => {
                unclear += 1;
                println!("{:>5} s: {e:#}", started.elapsed().as_secs());
            }
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(300);
            println!(
                "{:>5} s: {} writes acknowledged, {} primary changes so far",
                started.elapsed().as_secs(),
                acks.lock().expect("lock").len(),
                changes.len()
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let mut acks = acks.lock().expect("lock").clone();
    acks.sort_by_key(|a| a.acked);
    let mut gaps: Vec<Duration> = acks.windows(2).map(|w| w[1].acked - w[0].acked).collect();
    gaps.sort();
    let longest = gaps.last().copied().unwrap_or_default();
    let over_1s = gaps.iter().filter(|g| **g > Duration::from_secs(1)).count();
    let primary = healthy(c, synchronous).await?;
    let stored: std::collections::HashSet<String> = sql(
        c,
        &primary,
        &format!("SELECT title FROM todos WHERE title LIKE '{prefix}-%'"),
    )
    .await?
    .lines()
    .map(String::from)
    .collect();
    let lost = acks.iter().filter(|a| !stored.contains(&a.id)).count();
    let fenced: Vec<String> = fences(c).into_iter().skip(fences_before).collect();
    for f in &fenced {
        println!("fence: {f}");
    }
    println!(
        "\nsoak ({mode} mode, no fault, 4 writers through nginx and 4 direct, {minutes} min): \
         {} writes acknowledged ({:.0}/s), {lost} lost; {} primary/timeline changes, {} fences, \
         {unclear} samples without a sole primary; longest pause between acknowledged writes \
         {:.2} s, {over_1s} pauses over 1 s; primary {first_primary} -> {primary}",
        acks.len(),
        acks.len() as f64 / (minutes * 60) as f64,
        changes.len(),
        fenced.len(),
        longest.as_secs_f64(),
    );
    if !changes.is_empty() || !fenced.is_empty() || lost > 0 {
        bail!("false failovers or lost writes under no fault");
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let lxc = take_flag(&mut args, "--lxc");
    if let Some(minutes) = take_value(&mut args, "--soak") {
        let minutes: u64 = minutes.parse().context("--soak MINUTES")?;
        let mode = args.first().cloned().unwrap_or_else(|| "sync".into());
        let octet: u8 = args.get(1).map_or(Ok(24), |a| a.parse())?;
        let c = if lxc {
            eprintln!("==> corral up --provider lxc (1 web, 2 db) on 192.168.{octet}.0/24");
            Cluster::up_lxc(octet, 1, 2).await?
        } else {
            eprintln!("==> corral up (1 web, 2 db) on 127.0.{octet}.0/24");
            Cluster::up(octet, 1, 2).await?
        };
        let password = std::fs::read_to_string(c.state_dir().join("db-password"))?
            .trim()
            .to_string();
        set_mode(&c, &mode).await?;
        return soak(&c, &mode, minutes, &password).await;
    }
    let fault = match take_value(&mut args, "--kill").as_deref() {
        None | Some("postgres") => Fault::Postgres,
        Some("node") => Fault::Node,
        Some("agent+postgres") => Fault::AgentPostgres,
        Some("freeze") => Fault::Freeze,
        Some("partition") => Fault::Partition,
        Some(other) => {
            bail!("--kill {other}: expected postgres, node, agent+postgres, freeze or partition")
        }
    };
    if matches!(fault, Fault::Node | Fault::AgentPostgres) && lxc {
        bail!("--kill node and --kill agent+postgres run on the local provider (without --lxc)");
    }
    if matches!(fault, Fault::Freeze | Fault::Partition) && !lxc {
        bail!("--kill freeze and --kill partition need --lxc (real isolation)");
    }
    let rounds: usize = args.first().map_or(Ok(20), |a| a.parse())?;
    let modes: Vec<String> = args
        .get(1)
        .map_or("sync,async", String::as_str)
        .split(',')
        .map(String::from)
        .collect();
    let octet: u8 = args.get(2).map_or(Ok(24), |a| a.parse())?;
    let c = if lxc {
        eprintln!("==> corral up --provider lxc (1 web, 2 db) on 192.168.{octet}.0/24");
        Cluster::up_lxc(octet, 1, 2).await?
    } else {
        eprintln!("==> corral up (1 web, 2 db) on 127.0.{octet}.0/24");
        Cluster::up(octet, 1, 2).await?
    };
    let password = std::fs::read_to_string(c.state_dir().join("db-password"))?
        .trim()
        .to_string();
    let seq = AtomicU64::new(0);
    let mut summary = Vec::new();
    for mode in &modes {
        set_mode(&c, mode).await?;
        let mut outages = Vec::new();
        let (mut acked, mut lost) = (0, 0);
        for i in 0..rounds {
            let n = seq.fetch_add(1, Ordering::Relaxed) as usize;
            let r = round(&c, mode, fault, n, &password).await?;
            println!(
                "{mode:>6} round {:>2}: outage {:>6} ms, {:>6} writes acknowledged, {} lost",
                i + 1,
                r.outage.as_millis(),
                r.acked,
                r.lost
            );
            outages.push(r.outage);
            acked += r.acked;
            lost += r.lost;
        }
        outages.sort();
        summary.push(format!(
            "{mode:>6}: {rounds} rounds, write outage p50 {:.2} s, max {:.2} s; {acked} writes acknowledged, {lost} lost",
            percentile(&outages, 50.0).as_secs_f64(),
            outages.last().copied().unwrap_or_default().as_secs_f64()
        ));
    }
    let what = match fault {
        Fault::Postgres => "kill -9 of every postgres process of the primary",
        Fault::Node => "the whole primary node (agent, Consul agent, postgres) killed at once",
        Fault::AgentPostgres => "the primary's agent and postgres killed, its Consul agent alive",
        Fault::Freeze => "the primary's container frozen (lxc-freeze) until writes resume",
        Fault::Partition => "the primary partitioned from every other node until writes resume",
    };
    println!("\nsummary ({what}; 4 writers through nginx, 4 direct)");
    for line in summary {
        println!("{line}");
    }
    Ok(())
}

/// Puts the cluster in replication `mode` and waits for the primary to
/// agree.
async fn set_mode(c: &Cluster, mode: &str) -> anyhow::Result<()> {
    let res = c
        .api(Method::PUT, "/topology")
        .await
        .json(&json!({"web": 1, "db": 2, "lb_policy": "round_robin", "replication": mode}))
        .send()
        .await?;
    if !res.status().is_success() {
        bail!(
            "PUT topology {mode}: {} {}",
            res.status(),
            res.text().await?
        );
    }
    let want_sync = mode != "async";
    eventually(&format!("{mode} mode on the primary"), LONG, || async {
        let p = sole_primary(c).await?;
        let names = sql(c, &p, "SHOW synchronous_standby_names").await?;
        Ok((names.is_empty() != want_sync).then_some(()))
    })
    .await?;
    Ok(())
}

/// Removes `flag` from `args`; whether it was there.
fn take_flag(args: &mut Vec<String>, flag: &str) -> bool {
    let before = args.len();
    args.retain(|a| a != flag);
    args.len() != before
}

/// Removes `flag VALUE` from `args`; the value.
fn take_value(args: &mut Vec<String>, flag: &str) -> Option<String> {
    let i = args.iter().position(|a| a == flag)?;
    args.remove(i);
    (i < args.len()).then(|| args.remove(i))
}
