//! LXC provider benchmark, with the local provider as the same run's
//! baseline:
//!
//! 1. cold `corral up --provider lxc` (base image already built): the time
//!    until every one of the seed's five nodes serves, over UP_ROUNDS fresh
//!    clusters (each deleted afterwards);
//! 2. "Add webserver": `POST /api/v1/nodes {"role":"web"}` until the new
//!    node answers through both load balancers (its X-Served-By header via
//!    nginx1 and via nginx2), over ADD_ROUNDS rounds (each removes the node
//!    again and waits until its machine is gone), on an LXC cluster and on a
//!    local one.
//!
//!   cargo run --release -p corral-e2e --example lxc_bench -- [UP_ROUNDS] [ADD_ROUNDS]
//!
//! (defaults 5 and 10). Run it through `scripts/bench/lxc.sh`, which builds
//! the binaries and the packages first.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use corral_e2e::{Cluster, eventually};
use reqwest::Method;
use serde_json::json;

const LONG: Duration = Duration::from_secs(180);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(what: &str, mut times: Vec<Duration>) -> String {
    times.sort();
    format!(
        "{what}: {} rounds, p50 {:.2} s, p99 {:.2} s, min {:.2} s, max {:.2} s",
        times.len(),
        percentile(&times, 50.0).as_secs_f64(),
        percentile(&times, 99.0).as_secs_f64(),
        times.first().copied().unwrap_or_default().as_secs_f64(),
        times.last().copied().unwrap_or_default().as_secs_f64(),
    )
}

/// The webapp that answered a request through `lb`.
async fn served_by(http: &reqwest::Client, c: &Cluster, lb: &str) -> Option<String> {
    let res = http.get(c.lb(lb, "/todos")).send().await.ok()?;
    res.headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
}

/// Adds a web node and times it until both load balancers route to it;
/// then removes it and waits until its machine is gone.
async fn add_rounds(c: &Cluster, rounds: usize, label: &str) -> anyhow::Result<Vec<Duration>> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let mut times = Vec::new();
    for i in 0..rounds {
        let started = Instant::now();
        let res = c
            .api(Method::POST, "/nodes")
            .await
            .json(&json!({"role": "web"}))
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("POST /nodes: {} {}", res.status(), res.text().await?);
        }
        let node: serde_json::Value = res.json().await?;
        let name = node["name"].as_str().context("node name")?.to_string();
        for lb in ["nginx1", "nginx2"] {
            eventually(&format!("{name} behind {lb}"), LONG, || async {
                Ok((served_by(&http, c, lb).await.as_deref() == Some(name.as_str())).then_some(()))
            })
            .await?;
        }
        let took = started.elapsed();
        println!(
            "{label} add webserver round {:>2}: {name} serving through both load balancers in {:.2} s",
            i + 1,
            took.as_secs_f64()
        );
        times.push(took);
        let res = c
            .api(Method::DELETE, &format!("/nodes/{name}"))
            .await
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("DELETE {name}: {}", res.status());
        }
        eventually(&format!("{name}'s machine gone"), LONG, || async {
            let gone = !c.machine_names().contains(&name);
            let listed = c.nodes().await?.iter().any(|n| n.name == name);
            Ok((gone && !listed).then_some(()))
        })
        .await?;
    }
    Ok(times)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let up_rounds: usize = args.first().map_or(Ok(5), |a| a.parse())?;
    let add_rounds_n: usize = args.get(1).map_or(Ok(10), |a| a.parse())?;
    if let Some(why) = corral_e2e::lxc_unavailable() {
        bail!("LXC cannot run here: {why}");
    }

    let mut ups = Vec::new();
    for i in 0..up_rounds {
        let started = Instant::now();
        let c = Cluster::up_lxc(113, 2, 2).await?;
        let took = started.elapsed();
        println!(
            "cold corral up --provider lxc round {}: five nodes serving in {:.2} s",
            i + 1,
            took.as_secs_f64()
        );
        ups.push(took);
        if i + 1 < up_rounds {
            drop(c);
            continue;
        }
        let lxc_adds = add_rounds(&c, add_rounds_n, "lxc  ").await?;
        drop(c);
        eprintln!("==> the local provider, same run");
        let local = Cluster::up(51, 2, 1).await?;
        let local_adds = add_rounds(&local, add_rounds_n, "local").await?;
        drop(local);
        println!("\nsummary");
        println!(
            "{}",
            summary(
                "cold corral up --provider lxc (5 nodes serving)",
                ups.clone()
            )
        );
        println!(
            "{}",
            summary("add webserver, lxc   (both load balancers)", lxc_adds)
        );
        println!(
            "{}",
            summary("add webserver, local (both load balancers)", local_adds)
        );
    }
    Ok(())
}
