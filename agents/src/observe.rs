//! What the heartbeat says about the node: each supervised service (state,
//! pid, restarts, version, Consul check), PostgreSQL replication, and a
//! metrics sample including the agent's own RSS. Always within the bounds
//! `ObservedState::validate` checks, so the server never refuses it.

use std::collections::HashMap;
use std::sync::Mutex;

use corral_proto::{MetricsSample, ObservedState, ServiceState, ServiceStatus};

use crate::host::OneShot;
use crate::node::Node;

fn clip(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Resident set size of this process, from `/proc/self/status`.
pub fn agent_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

pub fn metrics() -> MetricsSample {
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse().ok()))
        .filter(|l: &f64| l.is_finite())
        .unwrap_or(0.0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
    };
    MetricsSample {
        load1,
        mem_used_bytes: field("MemTotal:").saturating_sub(field("MemAvailable:")) * 1024,
        agent_rss_bytes: agent_rss_bytes(),
    }
}

/// Collects observations; remembers each program's version.
#[derive(Default)]
pub struct Observer {
    versions: Mutex<HashMap<String, String>>,
}

impl Observer {
    async fn version(&self, node: &Node, service: &str) -> Option<String> {
        if let Some(v) = self.versions.lock().expect("lock").get(service) {
            return Some(v.clone());
        }
        let bins = &node.ctx.bins;
        let cmd = match service {
            "consul" => OneShot::new(&bins.consul, &["version"]),
            "nginx" => OneShot::new(&bins.nginx, &["-v"]),
            "postgres" => OneShot::new(bins.pg_bin.join("postgres"), &["--version"]),
            "todomvc" => OneShot::new(&bins.todomvc, &["--version"]),
            _ => return None,
        };
        let out = node.ctx.host.run(&cmd).await.ok()?;
        let text = format!("{}{}", out.stdout, out.stderr);
        let line = clip(text.lines().next()?.trim(), 128);
        if line.is_empty() {
            return None;
        }
        self.versions
            .lock()
            .expect("lock")
            .insert(service.into(), line.clone());
        Some(line)
    }

    pub async fn observe(&self, node: &Node, applied_seq: i64) -> ObservedState {
        let checks = node.ctx.consul.local_checks().await.ok();
        let leader = match node.ctx.consul.leader().await {
            Ok(l) if !l.is_empty() => Some(format!("consul cluster leader {l}")),
            Ok(_) => Some("consul cluster has no leader".to_string()),
            Err(_) => None,
        };
        let mut services = Vec::new();
        for info in node
            .ctx
            .host
            .services()
            .into_iter()
            .take(ObservedState::MAX_SERVICES)
        {
            let check_id = format!("service:{}-{}", info.name, node.ctx.node);
            let health = if info.name == "consul" {
                leader.clone()
            } else {
                checks
                    .as_ref()
                    .and_then(|c| c.get(&check_id))
                    .map(|(status, output)| format!("consul check {status}: {}", output.trim()))
            };
            let detail = match (&info.last_exit, health) {
                (Some(exit), _) => Some(exit.clone()),
                (None, Some(h)) => Some(h),
                (None, None) => None,
            };
            services.push(ServiceStatus {
                state: if info.running {
                    ServiceState::Running
                } else {
                    ServiceState::Failed
                },
                pid: info.pid,
                restarts: info.restarts,
                version: self.version(node, &info.name).await,
                detail: detail.map(|d| clip(&d, 1024)),
                name: clip(&info.name, 64),
            });
        }
        ObservedState {
            agent_version: clip(corral_proto::VERSION, 64),
            applied_seq: applied_seq.max(0),
            services,
            replication: node.postgres.replication().await,
            metrics: Some(metrics()),
        }
    }
}
