//! The node's metrics, sampled every `--metrics-interval` (10 s) and sent
//! to the control plane in batches (`POST /agents/{node}/metrics`):
//!
//! - host CPU, memory, disk (the file system of the state directory) and
//!   network bytes over every interface, from `/proc` and `statvfs`; on the
//!   local provider, where nodes are processes of one host, these are the
//!   host's figures, and `cpu.node` / `mem.node_rss` (the agent plus every
//!   process in its services' process groups) are the node's own;
//! - nginx: requests from `stub_status` (on the node address, port 8081),
//!   5xx answers from a log nginx writes two bytes to per 5xx;
//! - the webapp's `/metrics` (Prometheus text): requests, mean and p95
//!   latency over the interval;
//! - PostgreSQL: commits/s, client connections, replication lag.
//!
//! Counters become rates between two samples; a counter that went back (a
//! restarted service) gives no rate that time. Samples the server did not
//! take are kept in memory, at most [`BUFFERED`] (an hour), oldest dropped.
//! One sample is a small map; the scans reuse their buffers.

pub mod exposition;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_proto::metrics::MAX_BATCH_SAMPLES;
use corral_proto::{MetricName, MetricReading, MetricsBatch, ports};
use reqwest::StatusCode;

use crate::control::{ControlError, ControlPlane};
use crate::node::Node;
use crate::procfs;
use exposition::WebappCounters;

/// Samples kept while the control plane does not take them: an hour at 10 s.
pub const BUFFERED: usize = 360;
/// A request to the node's own services that takes longer gives no figure.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// nginx's 5xx log is emptied past this size (two bytes per 5xx).
const FIVE_XX_LOG_MAX: u64 = 1 << 20;

/// The file nginx appends `5\n` to for every 5xx it answers.
pub fn five_xx_log(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("nginx/logs/5xx.log")
}

/// The counters read at one sample, for the rates at the next.
#[derive(Debug, Default)]
struct Counters {
    at: Option<Instant>,
    cpu: Option<(u64, u64)>,
    node_ticks: Option<u64>,
    net: Option<(u64, u64)>,
    nginx_requests: Option<u64>,
    nginx_5xx: Option<u64>,
    webapp: Option<WebappCounters>,
    pg_commits: Option<u64>,
}

/// Per second between two readings of a counter; none when either is
/// missing or the counter went back.
fn rate(before: Option<u64>, now: Option<u64>, secs: f64) -> Option<f64> {
    let (b, n) = (before?, now?);
    (n >= b && secs > 0.0).then(|| (n - b) as f64 / secs)
}

pub struct Sampler {
    node: Arc<Node>,
    last: Counters,
    buf: String,
    clock_ticks: f64,
    page_bytes: u64,
    /// 5xx counted before the log was last emptied.
    five_xx_base: u64,
}

impl Sampler {
    pub fn new(node: Arc<Node>) -> Self {
        use nix::unistd::{SysconfVar, sysconf};
        let sys = |v, default: i64| sysconf(v).ok().flatten().map_or(default, i64::from).max(1);
        Self {
            node,
            last: Counters::default(),
            buf: String::with_capacity(4096),
            clock_ticks: sys(SysconfVar::CLK_TCK, 100) as f64,
            page_bytes: sys(SysconfVar::PAGE_SIZE, 4096) as u64,
            five_xx_base: 0,
        }
    }

    fn read(&mut self, path: &str) -> Option<&str> {
        use std::io::Read;
        self.buf.clear();
        std::fs::File::open(path)
            .ok()?
            .read_to_string(&mut self.buf)
            .ok()?;
        Some(&self.buf)
    }

    /// CPU ticks and resident bytes of this agent and every process in its
    /// services' process groups (each service leads its own group).
    fn node_processes(&mut self) -> (u64, u64) {
        let groups: Vec<u32> = self
            .node
            .ctx
            .host
            .services()
            .into_iter()
            .filter_map(|s| s.pid)
            .collect();
        let me = std::process::id();
        let (mut ticks, mut pages) = (0, 0);
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                    continue;
                };
                let Some(stat) = procfs::read_stat(pid, &mut self.buf) else {
                    continue;
                };
                if pid == me || groups.contains(&stat.pgrp) {
                    ticks += stat.cpu_ticks;
                    pages += stat.rss_pages;
                }
            }
        }
        (ticks, pages * self.page_bytes)
    }

    async fn get(&self, url: String) -> Option<String> {
        let res = self
            .node
            .ctx
            .consul
            .http()
            .get(url)
            .timeout(SCRAPE_TIMEOUT)
            .send()
            .await
            .ok()?;
        if !res.status().is_success() {
            return None;
        }
        res.text().await.ok()
    }

    fn running(&self, service: &str) -> bool {
        self.node
            .ctx
            .host
            .services()
            .iter()
            .any(|s| s.name == service && s.running)
    }

    /// 5xx nginx answered so far, from the size of its 5xx log (emptied now
    /// and then, the count carried over).
    fn nginx_5xx(&mut self) -> Option<u64> {
        let path = five_xx_log(&self.node.ctx.state_dir);
        let len = std::fs::metadata(&path).ok()?.len();
        let count = self.five_xx_base + len / 2;
        if len > FIVE_XX_LOG_MAX
            && std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(0))
                .is_ok()
        {
            self.five_xx_base = count;
        }
        Some(count)
    }

    /// Takes one sample: gauges always, rates from the second sample on.
    pub async fn sample(&mut self) -> MetricReading {
        let now = Instant::now();
        let secs = self
            .last
            .at
            .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        let mut values = BTreeMap::new();
        let mut next = Counters {
            at: Some(now),
            ..Counters::default()
        };

        next.cpu = self.read("/proc/stat").and_then(procfs::parse_cpu_totals);
        if let (Some((b0, t0)), Some((b1, t1))) = (self.last.cpu, next.cpu)
            && t1 > t0
            && b1 >= b0
        {
            values.insert(
                MetricName::CpuHost,
                100.0 * (b1 - b0) as f64 / (t1 - t0) as f64,
            );
        }
        if let Some((total, available)) = self.read("/proc/meminfo").and_then(procfs::parse_meminfo)
        {
            values.insert(MetricName::MemUsed, total.saturating_sub(available) as f64);
        }
        if let Ok(fs) = nix::sys::statvfs::statvfs(&self.node.ctx.state_dir) {
            let frsize = fs.fragment_size() as f64;
            let used = (fs.blocks() as f64 - fs.blocks_free() as f64) * frsize;
            let usable = used + fs.blocks_available() as f64 * frsize;
            if usable > 0.0 {
                values.insert(MetricName::DiskUsed, 100.0 * used / usable);
            }
        }
        next.net = self.read("/proc/net/dev").map(procfs::parse_net_dev);
        if let (Some(b), Some(n)) = (self.last.net, next.net) {
            for (name, before, after) in
                [(MetricName::NetRx, b.0, n.0), (MetricName::NetTx, b.1, n.1)]
            {
                if let Some(r) = rate(Some(before), Some(after), secs) {
                    values.insert(name, r);
                }
            }
        }
        let (ticks, rss) = self.node_processes();
        next.node_ticks = Some(ticks);
        values.insert(MetricName::MemNode, rss as f64);
        if let Some(r) = rate(self.last.node_ticks, next.node_ticks, secs) {
            values.insert(MetricName::CpuNode, 100.0 * r / self.clock_ticks);
        }

        let address = self.node.ctx.address;
        if self.running(crate::drivers::nginx::SERVICE) {
            let url = format!(
                "http://{}/nginx_status",
                SocketAddr::new(address, ports::NGINX_STATUS)
            );
            next.nginx_requests = self
                .get(url)
                .await
                .as_deref()
                .and_then(exposition::stub_status_requests);
            next.nginx_5xx = self.nginx_5xx();
            // Each reading counts its own request to stub_status.
            if let Some(r) = rate(
                self.last.nginx_requests,
                next.nginx_requests.map(|n| n.saturating_sub(1)),
                secs,
            ) {
                values.insert(MetricName::NginxRequests, r);
            }
            if let Some(r) = rate(self.last.nginx_5xx, next.nginx_5xx, secs) {
                values.insert(MetricName::Nginx5xx, r);
            }
        }
        if let Some(port) = self.node.webapp_port()
            && self.running("todomvc")
        {
            let url = format!("http://{}/metrics", SocketAddr::new(address, port));
            if let Some(page) = self.get(url).await {
                let before = self.last.webapp.take();
                let mut counters = WebappCounters::default();
                exposition::webapp_counters(&page, &mut counters);
                if let Some(before) = before
                    && secs > 0.0
                    && counters.requests >= before.requests
                {
                    let requests = counters.requests - before.requests;
                    values.insert(MetricName::WebappRequests, requests / secs);
                    if requests > 0.0 {
                        values.insert(
                            MetricName::WebappLatency,
                            1000.0 * (counters.latency_sum_secs - before.latency_sum_secs).max(0.0)
                                / requests,
                        );
                        if let Some(p95) =
                            exposition::quantile(0.95, &before.buckets, &counters.buckets)
                        {
                            values.insert(MetricName::WebappLatencyP95, 1000.0 * p95);
                        }
                    }
                }
                next.webapp = Some(counters);
            }
        }
        if let Some(pg) = self.node.postgres.activity().await {
            next.pg_commits = Some(pg.commits);
            values.insert(MetricName::PgConnections, pg.connections as f64);
            values.insert(MetricName::PgLagBytes, pg.lag_bytes as f64);
            if let Some(r) = rate(self.last.pg_commits, next.pg_commits, secs) {
                values.insert(MetricName::PgCommits, r);
            }
        }
        self.last = next;
        values.retain(|_, v| v.is_finite());
        MetricReading {
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            values,
        }
    }
}

/// Samples not yet taken by the control plane, oldest first, at most
/// [`BUFFERED`].
#[derive(Debug, Default)]
pub struct Outbox {
    samples: VecDeque<MetricReading>,
}

impl Outbox {
    pub fn push(&mut self, sample: MetricReading) {
        if self.samples.len() == BUFFERED {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Sends everything in batches of at most 100, oldest first. A batch
    /// the server refuses as bad (4xx other than 401, which the client
    /// handles by enrolling again) is dropped, so one bad sample cannot
    /// block the rest; on any other failure the rest stays for next time.
    pub async fn flush(&mut self, control: &ControlPlane) -> Result<(), ControlError> {
        while !self.samples.is_empty() {
            let n = self.samples.len().min(MAX_BATCH_SAMPLES);
            let batch = MetricsBatch {
                samples: self.samples.range(..n).cloned().collect(),
            };
            match control.metrics(&batch).await {
                Ok(()) => {}
                Err(e)
                    if e.status()
                        .is_some_and(|s| s.is_client_error() && s != StatusCode::UNAUTHORIZED) =>
                {
                    tracing::warn!(error = %e, samples = n, "metrics refused; dropped");
                }
                Err(e) => return Err(e),
            }
            self.samples.drain(..n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(at: i64) -> MetricReading {
        MetricReading {
            at,
            values: BTreeMap::new(),
        }
    }

    #[test]
    fn the_outbox_keeps_the_newest_hour_only() {
        let mut outbox = Outbox::default();
        for at in 0..(BUFFERED as i64 + 5) {
            outbox.push(reading(at));
        }
        assert_eq!(outbox.len(), BUFFERED);
        assert_eq!(outbox.samples.front().map(|s| s.at), Some(5));
    }

    #[test]
    fn rates_need_two_readings_and_a_counter_that_did_not_go_back() {
        assert_eq!(rate(Some(10), Some(30), 10.0), Some(2.0));
        assert_eq!(rate(None, Some(30), 10.0), None);
        assert_eq!(rate(Some(30), Some(10), 10.0), None, "a restart");
        assert_eq!(rate(Some(10), Some(30), 0.0), None);
    }
}
