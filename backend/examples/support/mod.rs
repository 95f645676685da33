//! What the load generators of `scripts/bench/` share: the server's RSS and
//! CPU from /proc, many web nodes made and enrolled as a provider would,
//! percentiles. (A directory with `mod.rs`, so Cargo does not take it for an
//! example of its own.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// Resident set size and peak RSS in KiB, and user+system CPU ticks.
pub fn proc_stats(pid: u32) -> Option<(u64, u64, u64)> {
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

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Makes `n` web nodes (`nginx1`..) in one topology change, then mints
/// each its enrollment secret (as a provider would) and enrolls it,
/// `concurrency` at a time. Returns each node's name and agent token, and
/// prints how long both steps took.
pub async fn create_and_enroll(
    http: &reqwest::Client,
    url: &str,
    admin: &str,
    n: u32,
    concurrency: usize,
) -> anyhow::Result<Vec<(String, String)>> {
    let started = Instant::now();
    let res = http
        .put(format!("{url}/api/v1/topology"))
        .bearer_auth(admin)
        .json(&json!({"web": n, "db": 0, "lb_policy": "round_robin", "replication": "async"}))
        .send()
        .await?;
    if !res.status().is_success() {
        bail!("creating {n} nodes: {} {}", res.status(), res.text().await?);
    }
    println!(
        "created {n} web nodes in one topology change: {}",
        ms(started.elapsed())
    );

    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut enrolls = Vec::with_capacity(n as usize);
    for i in 1..=n {
        let (http, url, admin, gate) = (
            http.clone(),
            url.to_string(),
            admin.to_string(),
            gate.clone(),
        );
        enrolls.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let node = format!("nginx{i}");
            let res = http
                .post(format!("{url}/api/v1/nodes/{node}/enroll-secret"))
                .bearer_auth(&admin)
                .send()
                .await?;
            if !res.status().is_success() {
                bail!("minting {node}'s secret: {}", res.status());
            }
            let minted: Value = res.json().await?;
            let secret = minted["secret"].as_str().unwrap_or_default().to_string();
            let res = http
                .post(format!("{url}/api/v1/agents/enroll"))
                .json(&json!({"node": node, "secret": secret}))
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
    println!(
        "minted secrets for and enrolled {n} agents: {}",
        ms(started.elapsed())
    );
    Ok(agents)
}
