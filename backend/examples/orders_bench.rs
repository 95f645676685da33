//! Load generator for `scripts/bench/orders.sh`: N simulated agents each
//! hold a long poll on a running `corral serve`; one topology change files
//! one order per agent; every agent notes when its order arrives.
//!
//! Prints: time to create and enroll the nodes, the filing request's
//! duration and server phases, order delivery latency p50/p99/max from the
//! commit of the orders (placed by the server's `Server-Timing` phases) and
//! end to end from the moment the filing request was sent, and the server's
//! RSS and CPU time (read from /proc of `--server-pid`). With an
//! `https://` URL every agent's poll is a TLS connection of its own,
//! pinning `--ca`, as real agents do.
//!
//! With `--peer-url` (a second server on the same PostgreSQL database) half
//! the agents poll the peer while the order is filed on `--url`: latencies
//! are given for both halves, so the cross-server figure stands next to the
//! same-run single-server one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};

mod support;
use support::{create_and_enroll, ms, percentile, proc_stats};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(long)]
    token: String,
    /// The cluster CA, for an https:// URL.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 10_000)]
    agents: u32,
    /// PID of the server, for RSS and CPU figures.
    #[arg(long)]
    server_pid: Option<u32>,
    /// A second server sharing the database: every other agent polls it.
    #[arg(long)]
    peer_url: Option<String>,
    /// PID of the second server.
    #[arg(long)]
    peer_pid: Option<u32>,
    /// Requests in flight while enrolling.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Record a CPU profile of the server (perf record -g) from just before
    /// the filing request until the last order arrives.
    #[arg(long)]
    perf_out: Option<String>,
}

/// A poll's connection: plain TCP, or TLS over it.
trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Conn for T {}

/// Sends one request and reads the response; returns when its head arrived,
/// how many orders (`"seq":`) the body holds, and the open connection.
async fn poll_once(
    addr: &str,
    tls: Option<&tokio_rustls::TlsConnector>,
    request: &[u8],
) -> anyhow::Result<(Instant, usize, Box<dyn Conn>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut stream: Box<dyn Conn> = match tls {
        Some(connector) => {
            let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
            let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
            Box::new(connector.connect(name, tcp).await?)
        }
        None => Box::new(tcp),
    };
    stream.write_all(request).await?;
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 2048];
    let mut received = None;
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed mid-response");
        }
        received.get_or_insert_with(Instant::now);
        buf.extend_from_slice(&chunk[..n]);
        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("response without content-length")?;
        if !head.starts_with("http/1.1 200") {
            bail!("poll answered {}", head.lines().next().unwrap_or(""));
        }
        if buf.len() >= head_end + 4 + length {
            let body = &buf[head_end + 4..head_end + 4 + length];
            let orders = body.windows(6).filter(|w| w == b"\"seq\":").count();
            return Ok((received.unwrap_or_else(Instant::now), orders, stream));
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ca_pem = match &args.ca {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    let tls = match &ca_pem {
        Some(pem) => {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots.add(cert.context("the CA file")?)?;
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        }
        None => None,
    };
    let http = corral_server::tls::client_builder(ca_pem.as_deref())
        .map_err(anyhow::Error::msg)?
        .pool_max_idle_per_host(usize::MAX)
        .timeout(Duration::from_secs(120))
        .build()?;
    let url = args.url.trim_end_matches('/').to_string();
    let n = args.agents;

    // 1. N web nodes in one topology change; 2. each enrolled.
    let agents = create_and_enroll(&http, &url, &args.token, n, args.concurrency).await?;

    // Where each node's orders stand now (a firewall, consul, the webapp
    // and nginx for a web node): its poll waits after that.
    let listed: Value = http
        .get(format!("{url}/api/v1/nodes"))
        .bearer_auth(&args.token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let last_seq: std::collections::HashMap<String, i64> = listed
        .as_array()
        .context("GET /api/v1/nodes: not a list")?
        .iter()
        .filter_map(|n| Some((n["name"].as_str()?.to_string(), n["last_seq"].as_i64()?)))
        .collect();

    // 3. Every agent holds a long poll after its current orders.
    // The polls use a bare HTTP/1.1 exchange on their own connection rather
    // than reqwest: the bench shares this machine's two cores with the
    // server, and every cycle it spends delays the arrival times it records.
    let host_port = |url: &str| {
        url.trim_end_matches('/')
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .map(str::to_string)
            .context("--url must be http(s)://host:port")
    };
    let addr = host_port(&url)?;
    let peer = match &args.peer_url {
        Some(peer) => Some((peer.trim_end_matches('/').to_string(), host_port(peer)?)),
        None => None,
    };
    if url.starts_with("https://") && tls.is_none() {
        bail!("an https:// URL needs --ca");
    }
    // Agents keep their connection open afterwards, as real ones do: a
    // close would make the server spend the fan-out tearing sockets down.
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(Instant, usize, bool, Option<Box<dyn Conn>>)>();
    for (i, (node, token)) in agents.into_iter().enumerate() {
        // With a peer, every other agent polls it: orders reach those
        // through PostgreSQL's NOTIFY.
        let (addr, remote) = match &peer {
            Some((_, peer_addr)) if i % 2 == 1 => (peer_addr.clone(), true),
            _ => (addr.clone(), false),
        };
        let (tx, tls) = (tx.clone(), tls.clone());
        let after = last_seq.get(&node).copied().unwrap_or_default();
        tokio::spawn(async move {
            let request = format!(
                "GET /api/v1/agents/{node}/orders?after={after}&wait=60s HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n"
            );
            let outcome = match poll_once(&addr, tls.as_ref(), request.as_bytes()).await {
                Ok((at, orders, stream)) => (at, orders, remote, Some(stream)),
                Err(_) => (Instant::now(), 0, remote, None),
            };
            let _ = tx.send(outcome);
        });
    }
    drop(tx);
    let started = Instant::now();
    let mut servers = vec![url.clone()];
    servers.extend(peer.iter().map(|(u, _)| u.clone()));
    loop {
        let mut parked = 0;
        for server in &servers {
            let health: Value = http
                .get(format!("{server}/healthz"))
                .send()
                .await?
                .json()
                .await?;
            parked += health["long_polls"].as_u64().unwrap_or(0);
        }
        if parked == u64::from(n) {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("only {parked} of {n} polls are waiting after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{n} long polls held by the server after {}",
        ms(started.elapsed())
    );
    let before = args.server_pid.and_then(proc_stats);
    let peer_before = args.peer_pid.and_then(proc_stats);
    let client_before = proc_stats(std::process::id());
    if let Some((rss, hwm, _)) = before {
        println!(
            "server RSS holding {n} long polls: {:.1} MiB (peak so far, node creation and enrollment included: {:.1} MiB)",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
    }

    // 4. One change files one order per agent.
    let mut perf = match (&args.perf_out, args.server_pid) {
        (Some(out), Some(pid)) => {
            let child = std::process::Command::new("perf")
                .args([
                    "record",
                    "-F",
                    "4000",
                    "-g",
                    "-o",
                    out,
                    "-p",
                    &pid.to_string(),
                ])
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting perf record")?;
            // perf needs a moment to attach; nothing is measured meanwhile.
            tokio::time::sleep(Duration::from_millis(500)).await;
            Some(child)
        }
        _ => None,
    };
    let filed = Instant::now();
    let res = http
        .put(format!("{url}/api/v1/topology"))
        .bearer_auth(&args.token)
        .json(&json!({"web": n, "db": 0, "lb_policy": "uri_hash", "replication": "async"}))
        .send()
        .await?;
    let returned = Instant::now();
    // The server's phases (Server-Timing) place the commit in our timeline:
    // on loopback the request reaches the handler within a fraction of a ms.
    let timing = res
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let phase = |name: &str| {
        timing
            .split(',')
            .filter_map(|p| p.trim().split_once(";dur="))
            .find(|(n, _)| *n == name)
            .and_then(|(_, d)| d.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let to_commit: f64 = ["lock", "load", "plan", "write", "commit"]
        .iter()
        .map(|p| phase(p))
        .sum();
    let committed = filed + Duration::from_secs_f64(to_commit / 1000.0);
    let change: Value = res.json().await.context("filing response")?;
    println!(
        "filing request ({} orders): {} — server phases: {timing}",
        change["orders_filed"],
        ms(returned - filed)
    );

    let mut from_sent = Vec::with_capacity(n as usize);
    let mut from_commit = Vec::with_capacity(n as usize);
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    let mut missing = 0;
    let mut open = Vec::with_capacity(n as usize);
    while let Some((received, count, on_peer, stream)) = rx.recv().await {
        open.extend(stream);
        if count != 1 {
            missing += 1;
            continue;
        }
        from_sent.push(received - filed);
        let latency = received.saturating_duration_since(committed);
        from_commit.push(latency);
        if on_peer {
            remote.push(latency);
        } else {
            local.push(latency);
        }
    }
    let done = filed.elapsed();
    if let Some(mut perf) = perf.take() {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait();
    }
    if missing > 0 {
        bail!("{missing} agents did not receive exactly one order");
    }
    from_sent.sort();
    from_commit.sort();
    println!(
        "all {n} orders received {} after the filing request was sent",
        ms(done)
    );
    println!(
        "delivery latency, order committed -> received:      p50 {}  p99 {}  max {}",
        ms(percentile(&from_commit, 50.0)),
        ms(percentile(&from_commit, 99.0)),
        ms(percentile(&from_commit, 100.0)),
    );
    println!(
        "end to end, filing request sent -> order received:  p50 {}  p99 {}  max {}",
        ms(percentile(&from_sent, 50.0)),
        ms(percentile(&from_sent, 99.0)),
        ms(percentile(&from_sent, 100.0)),
    );
    if peer.is_some() {
        local.sort();
        remote.sort();
        for (what, list) in [
            ("agents on the filing server", &local),
            ("agents on the other server ", &remote),
        ] {
            println!(
                "  {what} ({}), committed -> received: p50 {}  p99 {}  max {}",
                list.len(),
                ms(percentile(list, 50.0)),
                ms(percentile(list, 99.0)),
                ms(percentile(list, 100.0)),
            );
        }
        let (p99_local, p99_remote) = (percentile(&local, 99.0), percentile(&remote, 99.0));
        if !p99_local.is_zero() {
            println!(
                "  cross-server p99 / same-server p99: {:.2}x (target <= 1.5x)",
                p99_remote.as_secs_f64() / p99_local.as_secs_f64()
            );
        }
        if let (Some(pid), Some((_, _, ticks_before))) = (args.peer_pid, peer_before)
            && let Some((rss, hwm, ticks_after)) = proc_stats(pid)
        {
            println!(
                "other server: CPU during filing + fan-out {:.2} s, RSS {:.1} MiB (peak {:.1} MiB)",
                (ticks_after - ticks_before) as f64 / 100.0,
                rss as f64 / 1024.0,
                hwm as f64 / 1024.0
            );
        }
    }
    if let (Some(pid), Some((_, _, ticks_before))) = (args.server_pid, before)
        && let Some((rss, hwm, ticks_after)) = proc_stats(pid)
    {
        let cpu = (ticks_after - ticks_before) as f64 / 100.0;
        println!(
            "server CPU during filing + fan-out: {cpu:.2} s over {} wall ({:.0}% of one core)",
            ms(done),
            cpu / done.as_secs_f64() * 100.0
        );
        if let (Some((_, _, c0)), Some((_, _, c1))) =
            (client_before, proc_stats(std::process::id()))
        {
            println!(
                "bench client CPU meanwhile: {:.2} s (the two share this machine's {} cores)",
                (c1 - c0) as f64 / 100.0,
                std::thread::available_parallelism().map_or(0, |n| n.get())
            );
        }
        println!(
            "server RSS after: {:.1} MiB (peak {:.1} MiB)",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
    }
    Ok(())
}
