//! Load generator for `scripts/bench/orders.sh`: N simulated agents each
//! hold a long poll on a running `corral serve`; one topology change files
//! one order per agent; every agent notes when its order arrives.
//!
//! Prints: time to create and enroll the nodes, the filing request's
//! duration, order delivery latency p50/p99/max (from the moment the filing
//! request was sent, and from the moment it returned), and the server's RSS
//! and CPU time (read from /proc of `--server-pid`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(long)]
    token: String,
    #[arg(long)]
    join_token: String,
    #[arg(long, default_value_t = 10_000)]
    agents: u32,
    /// PID of the server, for RSS and CPU figures.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Requests in flight while enrolling.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
}

/// Resident set size and peak RSS in KiB, and user+system CPU ticks.
fn proc_stats(pid: u32) -> Option<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((field("VmRSS:")?, field("VmHWM:")?, ticks))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .timeout(Duration::from_secs(120))
        .build()?;
    let url = args.url.trim_end_matches('/').to_string();
    let n = args.agents;

    // 1. N web nodes in one topology change.
    let started = Instant::now();
    let res = http
        .put(format!("{url}/api/v1/topology"))
        .bearer_auth(&args.token)
        .json(&json!({"web": n, "db": 0, "lb_policy": "round_robin", "replication": "async"}))
        .send()
        .await?;
    if !res.status().is_success() {
        bail!("creating {n} nodes: {} {}", res.status(), res.text().await?);
    }
    let created = started.elapsed();
    println!(
        "created {n} web nodes in one topology change: {}",
        ms(created)
    );

    // 2. Each enrolls with the join token.
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let mut enrolls = Vec::with_capacity(n as usize);
    for i in 1..=n {
        let (http, url, join, gate) = (
            http.clone(),
            url.clone(),
            args.join_token.clone(),
            gate.clone(),
        );
        enrolls.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let node = format!("nginx{i}");
            let res = http
                .post(format!("{url}/api/v1/agents/enroll"))
                .json(&json!({"node": node, "join_token": join}))
                .send()
                .await?;
            if !res.status().is_success() {
                bail!("enrolling {node}: {}", res.status());
            }
            let body: Value = res.json().await?;
            Ok::<_, anyhow::Error>((node, body["token"].as_str().unwrap_or_default().to_string()))
        }));
    }
    let mut agents = Vec::with_capacity(n as usize);
    for e in enrolls {
        agents.push(e.await??);
    }
    println!("enrolled {n} agents: {}", ms(started.elapsed()));

    // 3. Every agent holds a long poll after its current orders (3 each).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, usize)>();
    for (node, token) in agents {
        let (http, url, tx) = (http.clone(), url.clone(), tx.clone());
        tokio::spawn(async move {
            let res = http
                .get(format!(
                    "{url}/api/v1/agents/{node}/orders?after=3&wait=60s"
                ))
                .bearer_auth(&token)
                .send()
                .await;
            let received = Instant::now();
            // Count orders without parsing the JSON: the bench shares the
            // machine's two cores with the server and should cost little.
            let count = match res {
                Ok(r) if r.status().is_success() => r
                    .bytes()
                    .await
                    .map(|b| b.windows(6).filter(|w| w == b"\"seq\":").count())
                    .unwrap_or(0),
                _ => 0,
            };
            let _ = tx.send((received, count));
        });
    }
    drop(tx);
    let started = Instant::now();
    loop {
        let health: Value = http
            .get(format!("{url}/healthz"))
            .send()
            .await?
            .json()
            .await?;
        if health["long_polls"].as_u64() == Some(u64::from(n)) {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "only {} of {n} polls are waiting after 120 s",
                health["long_polls"]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{n} long polls held by the server after {}",
        ms(started.elapsed())
    );
    let before = args.server_pid.and_then(proc_stats);
    if let Some((rss, _, _)) = before {
        println!(
            "server RSS holding {n} long polls: {:.1} MiB",
            rss as f64 / 1024.0
        );
    }

    // 4. One change files one order per agent.
    let filed = Instant::now();
    let res = http
        .put(format!("{url}/api/v1/topology"))
        .bearer_auth(&args.token)
        .json(&json!({"web": n, "db": 0, "lb_policy": "uri_hash", "replication": "async"}))
        .send()
        .await?;
    let returned = Instant::now();
    let change: Value = res.json().await.context("filing response")?;
    println!(
        "filing request ({} orders): {}",
        change["orders_filed"],
        ms(returned - filed)
    );

    let mut from_sent = Vec::with_capacity(n as usize);
    let mut from_returned = Vec::with_capacity(n as usize);
    let mut missing = 0;
    while let Some((received, count)) = rx.recv().await {
        if count != 1 {
            missing += 1;
            continue;
        }
        from_sent.push(received - filed);
        from_returned.push(received.saturating_duration_since(returned));
    }
    let done = filed.elapsed();
    if missing > 0 {
        bail!("{missing} agents did not receive exactly one order");
    }
    from_sent.sort();
    from_returned.sort();
    println!(
        "all {n} orders received {} after the filing request was sent",
        ms(done)
    );
    println!(
        "delivery latency from filing request sent:     p50 {}  p99 {}  max {}",
        ms(percentile(&from_sent, 50.0)),
        ms(percentile(&from_sent, 99.0)),
        ms(percentile(&from_sent, 100.0)),
    );
    println!(
        "delivery latency after the filing commit returned: p50 {}  p99 {}  max {}",
        ms(percentile(&from_returned, 50.0)),
        ms(percentile(&from_returned, 99.0)),
        ms(percentile(&from_returned, 100.0)),
    );
    if let (Some(pid), Some((_, _, ticks_before))) = (args.server_pid, before)
        && let Some((rss, hwm, ticks_after)) = proc_stats(pid)
    {
        let cpu = (ticks_after - ticks_before) as f64 / 100.0;
        println!(
            "server CPU during filing + fan-out: {cpu:.2} s over {} wall ({:.0}% of one core)",
            ms(done),
            cpu / done.as_secs_f64() * 100.0
        );
        println!(
            "server RSS after: {:.1} MiB (peak {:.1} MiB)",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
    }
    Ok(())
}
