//! Load generator for `scripts/bench/metrics.sh`: N simulated agents each
//! send one metrics batch every 10 s (`POST /agents/{node}/metrics`, one
//! sample of the 12 values a web node measures), spread evenly over the
//! interval as real agents' clocks are, for `--seconds`.
//!
//! Prints: batches sent and refused, the batch request's latency
//! p50/p99/max, values stored, and the server's CPU (share of one core over
//! the sending window) and RSS (read from /proc of `--server-pid`). The
//! storage figures come from the script, which reads the database after.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use corral_proto::{MetricName, MetricReading, MetricsAccepted, MetricsBatch};

mod support;
use support::{create_and_enroll, ms, percentile, proc_stats};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(long)]
    token: String,
    #[arg(long, default_value_t = 1_000)]
    agents: u32,
    /// How long every agent keeps sending (one batch per 10 s each).
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// PID of the server, for RSS and CPU figures.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Requests in flight while enrolling.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

/// What a web node's agent measures: everything but PostgreSQL's.
const WEB_METRICS: [MetricName; 12] = [
    MetricName::CpuHost,
    MetricName::CpuNode,
    MetricName::MemUsed,
    MetricName::MemNode,
    MetricName::DiskUsed,
    MetricName::NetRx,
    MetricName::NetTx,
    MetricName::NginxRequests,
    MetricName::Nginx5xx,
    MetricName::WebappRequests,
    MetricName::WebappLatency,
    MetricName::WebappLatencyP95,
];

fn sample(i: u32, round: u64) -> MetricsBatch {
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let values: BTreeMap<MetricName, f64> = WEB_METRICS
        .iter()
        .enumerate()
        .map(|(k, name)| (*name, (i as f64) * 0.5 + (round as f64) + k as f64 * 1.25))
        .collect();
    MetricsBatch {
        samples: vec![MetricReading { at, values }],
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .timeout(Duration::from_secs(60))
        .build()?;
    let url = args.url.trim_end_matches('/').to_string();
    let n = args.agents;
    let agents = create_and_enroll(&http, &url, &args.token, n, args.concurrency).await?;

    let interval = Duration::from_secs(corral_proto::metrics::SAMPLE_SECS as u64);
    let rounds = (args.seconds / interval.as_secs()).max(1);
    let before = args.server_pid.and_then(proc_stats);
    println!(
        "sending: {n} agents, one batch of {} values each every {}s, {rounds} rounds ({} batches/s)",
        WEB_METRICS.len(),
        interval.as_secs(),
        f64::from(n) / interval.as_secs_f64()
    );
    let started = Instant::now();
    let mut senders = Vec::with_capacity(agents.len());
    for (i, (node, token)) in agents.into_iter().enumerate() {
        let (http, url) = (http.clone(), url.clone());
        // Agent i sends at i/N of the interval, then every interval.
        let offset = interval.mul_f64(i as f64 / f64::from(n));
        senders.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(rounds as usize);
            let (mut stored, mut refused) = (0u64, 0u64);
            let first = tokio::time::Instant::from_std(started) + offset;
            let mut tick = tokio::time::interval_at(first, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for round in 0..rounds {
                tick.tick().await;
                let batch = sample(i as u32, round);
                let sent = Instant::now();
                let res = http
                    .post(format!("{url}/api/v1/agents/{node}/metrics"))
                    .bearer_auth(&token)
                    .json(&batch)
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status().is_success() => {
                        let accepted: MetricsAccepted = r.json().await?;
                        latencies.push(sent.elapsed());
                        stored += accepted.stored;
                    }
                    Ok(r) => {
                        refused += 1;
                        eprintln!(
                            "{node}: {} {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        );
                    }
                    Err(e) => {
                        refused += 1;
                        eprintln!("{node}: {e}");
                    }
                }
            }
            Ok::<_, anyhow::Error>((latencies, stored, refused))
        }));
    }
    // The server's peak RSS while sending, sampled every 250 ms.
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = args.server_pid.map(|pid| {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some((rss, _, _)) = proc_stats(pid) {
                    peak.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    });
    let (mut latencies, mut stored, mut refused) = (Vec::new(), 0u64, 0u64);
    for s in senders {
        let (l, st, r) = s.await.context("a sender panicked")??;
        latencies.extend(l);
        stored += st;
        refused += r;
    }
    let wall = started.elapsed();
    if let Some(s) = sampler {
        s.abort();
    }
    latencies.sort();
    println!(
        "sent {} batches in {:.1} s, {refused} refused; {stored} values stored",
        latencies.len() as u64 + refused,
        wall.as_secs_f64()
    );
    println!(
        "batch request latency: p50 {}, p99 {}, max {}",
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 99.0)),
        ms(latencies.last().copied().unwrap_or_default())
    );
    if let (Some(pid), Some((_, _, t0))) = (args.server_pid, before)
        && let Some((rss, hwm, t1)) = proc_stats(pid)
    {
        // Clock ticks are 1/100 s on Linux.
        let cpu = (t1 - t0) as f64 / 100.0 / wall.as_secs_f64() * 100.0;
        println!(
            "server CPU while sending: {cpu:.1} % of one core; RSS at the end {:.1} MiB, peak while sending {:.1} MiB (peak since start {:.1} MiB)",
            rss as f64 / 1024.0,
            peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
    }
    if refused > 0 {
        anyhow::bail!("{refused} batches were refused");
    }
    Ok(())
}
