//! `corral-agent run`: boot (pid file, state, supervisor, restore what was
//! applied), then three loops — orders (long poll, apply, persist, report),
//! heartbeats with log shipping, and supervision — until SIGTERM/SIGINT,
//! which ends the agent but never its services.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use anyhow::Context;
use corral_proto::OrderKind;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::RunConfig;
use crate::consul_api::ConsulApi;
use crate::control::{ControlPlane, RawOrder};
use crate::drivers::{Binaries, NodeContext};
use crate::durable::{LastResult, Progress, StateDir, StateError, write_atomic};
use crate::logship::LogShipper;
use crate::node::Node;
use crate::observe::Observer;
use crate::supervisor::{LogRotation, Supervisor};

const POLL_WAIT: Duration = Duration::from_secs(30);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Applies the orders of one poll in turn, recording each as done (applied
/// or failed, and unreported) before the next; orders at or below the
/// durable seq were done before and are skipped. Returns the results to
/// report.
pub async fn apply_orders(
    node: &Node,
    state: &StateDir,
    progress: &mut Progress,
    orders: &[RawOrder],
) -> Result<Vec<LastResult>, StateError> {
    let mut results = Vec::new();
    for order in orders {
        if order.seq <= progress.seq {
            continue;
        }
        let (outcome, message) = node.apply_raw(&order.payload).await;
        tracing::info!(seq = order.seq, ?outcome, %message, "order done");
        let result = LastResult {
            seq: order.seq,
            outcome,
            message,
        };
        progress.seq = order.seq;
        progress.last = Some(result.clone());
        progress.unreported.push(result.clone());
        state.save_progress(progress)?;
        results.push(result);
    }
    Ok(results)
}

fn backoff_step(b: Duration) -> Duration {
    (b * 2).min(BACKOFF_CAP)
}

/// Reports every unreported result in turn, each crossed off on disk once
/// the control plane has it.
async fn report_pending(
    control: &ControlPlane,
    state: &StateDir,
    progress: &mut Progress,
) -> Result<(), StateError> {
    for result in progress.pending_reports() {
        report_until_done(control, &result).await;
        progress.unreported.retain(|r| r.seq != result.seq);
        state.save_progress(progress)?;
    }
    Ok(())
}

async fn report_until_done(control: &ControlPlane, result: &LastResult) {
    let mut backoff = Duration::from_millis(500);
    loop {
        match control
            .report(result.seq, result.outcome, &result.message)
            .await
        {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(seq = result.seq, error = %e, "reporting failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = backoff_step(backoff);
            }
        }
    }
}

async fn order_loop(
    node: Arc<Node>,
    state: StateDir,
    control: Arc<ControlPlane>,
    applied: Arc<AtomicI64>,
) -> anyhow::Result<()> {
    let mut progress = state.progress()?;
    applied.store(progress.seq, Ordering::Relaxed);
    // Reports may have been lost when the agent died.
    report_pending(&control, &state, &mut progress).await?;
    let mut backoff = Duration::from_millis(500);
    loop {
        if state.applied(OrderKind::Drain).is_some() {
            // The server removes a drained node; polling on would only meet
            // 401s and 404s. Wait for stop-all.
            tracing::info!("node drained; idle until stopped");
            std::future::pending::<()>().await;
        }
        match control.poll(progress.seq, POLL_WAIT).await {
            Ok(orders) => {
                backoff = Duration::from_millis(500);
                apply_orders(&node, &state, &mut progress, &orders).await?;
                applied.store(progress.seq, Ordering::Relaxed);
                report_pending(&control, &state, &mut progress).await?;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "polling orders failed");
                tokio::time::sleep(backoff).await;
                backoff = backoff_step(backoff);
            }
        }
    }
}

async fn heartbeat_loop(
    node: Arc<Node>,
    control: Arc<ControlPlane>,
    applied: Arc<AtomicI64>,
    interval: Duration,
    log_dir: std::path::PathBuf,
    syslog: Option<crate::logship::Syslog>,
) {
    let observer = Observer::default();
    let mut shipper = LogShipper::new(log_dir).with_syslog(syslog);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if node.drained() {
            continue;
        }
        let observed = observer
            .observe(&node, applied.load(Ordering::Relaxed))
            .await;
        if let Err(e) = observed.validate() {
            tracing::error!(error = %e, "observed state out of bounds; not sent");
        } else if let Err(e) = control.heartbeat(observed).await {
            tracing::debug!(error = %e, "heartbeat failed");
            continue;
        }
        if let Err(e) = shipper.ship(&control).await {
            tracing::debug!(error = %e, "shipping logs failed");
        }
    }
}

/// Samples the node's metrics every `interval` and sends them; what the
/// control plane does not take waits in the outbox (bounded).
async fn metrics_loop(node: Arc<Node>, control: Arc<ControlPlane>, interval: Duration) {
    let mut sampler = crate::metrics::Sampler::new(node.clone());
    let mut outbox = crate::metrics::Outbox::default();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if node.drained() {
            continue;
        }
        outbox.push(sampler.sample().await);
        if let Err(e) = outbox.flush(&control).await {
            tracing::debug!(error = %e, buffered = outbox.len(), "sending metrics failed");
        }
    }
}

/// Claims the node: refuses to run beside a live agent on the same state
/// dir (two agents would fight over the same services).
fn write_pid_file(run_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(run_dir)?;
    let pid_file = run_dir.join("agent.pid");
    if let Some(pid) = crate::supervisor::read_pid(&pid_file)
        && pid != std::process::id()
        && crate::supervisor::pid_alive(pid)
        && crate::supervisor::cmdline(pid).is_some_and(|c| c.contains("corral-agent"))
    {
        anyhow::bail!(
            "another corral-agent (pid {pid}) already runs for {}",
            run_dir.display()
        );
    }
    write_atomic(
        &run_dir.join("agent.pid"),
        format!("{}\n", std::process::id()).as_bytes(),
        0o644,
    )?;
    Ok(())
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating {}", config.state_dir.display()))?;
    let state_dir = std::fs::canonicalize(&config.state_dir)?;
    write_pid_file(&state_dir.join("run"))?;
    let state = StateDir::open(&state_dir)?;
    let supervisor = Arc::new(Supervisor::new(&state_dir)?.with_log_rotation(LogRotation {
        max_bytes: config.log_max_size,
        keep: config.log_keep,
    }));
    let secret = config.enroll_secret();
    if state.token().is_none() {
        // Without a token of its own the agent can do nothing but enroll:
        // say at once when it has nothing to enroll with.
        secret.read().map_err(anyhow::Error::msg)?;
    }
    let ca_pem = match &config.ca_file {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("reading the cluster CA from {}", path.display()))?,
        ),
        None => None,
    };
    let control = Arc::new(ControlPlane::new(
        &config.server,
        &config.node,
        secret,
        ca_pem.as_deref(),
        state.clone(),
    )?);
    let agent_exe = std::env::current_exe().context("locating our own executable")?;
    let ctx = Arc::new(NodeContext {
        node: config.node.clone(),
        address: config.address,
        state_dir: state_dir.clone(),
        bins: Binaries {
            consul: config.consul_bin.clone(),
            nginx: config.nginx_bin.clone(),
            todomvc: config.todomvc_bin(),
            pg_bin: config.pg_bin.clone(),
            agent: agent_exe,
        },
        nginx_port: config.nginx_port,
        host: supervisor.clone(),
        consul: ConsulApi::new(&config.address.to_string()),
        start_wait: Duration::from_secs(10),
        firewall: config.firewall,
    });
    tracing::info!(node = %config.node, address = %config.address, state = %state_dir.display(), "agent starting");

    let sup = supervisor.clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(crate::supervisor::TICK_EVERY);
        loop {
            ticker.tick().await;
            sup.tick();
        }
    });

    let node = Arc::new(Node::new(ctx, state.clone()).with_control(control.clone()));
    node.spawn_keepers();
    let applied = Arc::new(AtomicI64::new(state.progress()?.seq));
    tokio::spawn(heartbeat_loop(
        node.clone(),
        control.clone(),
        applied.clone(),
        config.heartbeat_interval,
        state_dir.join("logs"),
        config
            .syslog
            .as_deref()
            .map(crate::logship::Syslog::from_setting),
    ));

    tokio::spawn(metrics_loop(
        node.clone(),
        control.clone(),
        config.metrics_interval,
    ));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let work = async {
        node.restore().await;
        order_loop(
            node.clone(),
            state.clone(),
            control.clone(),
            applied.clone(),
        )
        .await
    };
    let result = tokio::select! {
        r = work => r,
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    };
    tracing::info!("agent exiting; services keep running");
    let _ = std::fs::remove_file(state_dir.join("run/agent.pid"));
    result
}

#[cfg(test)]
mod tests {
    use corral_proto::{LbPolicy, LoadBalancerSpec, OrderOutcome, WebappSpec, WorkOrder};
    use serde_json::json;

    use super::*;
    use crate::host::fake::{Call, FakeHost};

    struct Fixture {
        _dir: tempfile::TempDir,
        host: Arc<FakeHost>,
        node: Node,
        state: StateDir,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tmp");
        let host = Arc::new(FakeHost::default());
        let state = StateDir::open(dir.path()).expect("state");
        let ctx = Arc::new(NodeContext {
            node: "nginx1".into(),
            // Nothing listens there: Consul calls fail fast.
            address: [127, 0, 99, 1].into(),
            state_dir: dir.path().to_path_buf(),
            bins: Binaries {
                consul: "consul".into(),
                nginx: "nginx".into(),
                todomvc: "todomvc".into(),
                pg_bin: "/pg".into(),
                agent: "corral-agent".into(),
            },
            nginx_port: None,
            host: host.clone(),
            consul: ConsulApi::new("127.0.99.1"),
            start_wait: Duration::ZERO,
            firewall: false,
        });
        Fixture {
            node: Node::new(ctx, state.clone()),
            state,
            host,
            _dir: dir,
        }
    }

    fn order(seq: i64, payload: serde_json::Value) -> RawOrder {
        RawOrder { seq, payload }
    }

    fn webapp() -> serde_json::Value {
        serde_json::to_value(WorkOrder::Webapp(WebappSpec {
            port: 8080,
            database: "todomvc".into(),
            user: "todomvc".into(),
            password: "pw".into(),
            consul_token: None,
            address_v6: None,
        }))
        .expect("json")
    }

    fn lb(policy: LbPolicy) -> serde_json::Value {
        serde_json::to_value(WorkOrder::LoadBalancer(LoadBalancerSpec {
            port: 80,
            service: "todomvc".into(),
            policy,
            address_v6: None,
        }))
        .expect("json")
    }

    #[tokio::test]
    async fn applying_the_same_order_twice_starts_the_service_once() {
        let f = fixture();
        let mut progress = Progress::default();
        let results = apply_orders(
            &f.node,
            &f.state,
            &mut progress,
            &[order(1, webapp()), order(2, webapp())],
        )
        .await
        .expect("apply");
        assert!(
            results.iter().all(|r| r.outcome == OrderOutcome::Applied),
            "{results:?}"
        );
        assert_eq!(f.host.starts(), 1, "{:?}", f.host.calls());
    }

    #[tokio::test]
    async fn a_bad_payload_is_a_failed_order_with_the_reason_and_is_not_retried() {
        let f = fixture();
        let mut progress = Progress::default();
        let results = apply_orders(
            &f.node,
            &f.state,
            &mut progress,
            &[order(1, json!({"kind": "teleport", "to": "mars"}))],
        )
        .await
        .expect("apply");
        assert_eq!(results[0].outcome, OrderOutcome::Failed);
        assert!(
            results[0].message.contains("teleport"),
            "{}",
            results[0].message
        );
        assert_eq!(f.state.progress().expect("progress").seq, 1);
        assert!(f.host.calls().is_empty());
    }

    #[tokio::test]
    async fn orders_at_or_below_the_durable_seq_are_skipped_after_a_restart() {
        let f = fixture();
        let mut progress = Progress::default();
        apply_orders(&f.node, &f.state, &mut progress, &[order(1, webapp())])
            .await
            .expect("apply");
        // A new agent on the same state dir resumes from the durable seq.
        let mut resumed = f.state.progress().expect("progress");
        assert_eq!(resumed.seq, 1);
        let results = apply_orders(
            &f.node,
            &f.state,
            &mut resumed,
            &[order(1, webapp()), order(2, lb(LbPolicy::RoundRobin))],
        )
        .await
        .expect("apply");
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].seq, 2);
        assert_eq!(f.state.progress().expect("progress").seq, 2);
    }

    #[tokio::test]
    async fn every_result_of_a_batch_stays_on_disk_until_reported() {
        let f = fixture();
        let mut progress = Progress::default();
        apply_orders(
            &f.node,
            &f.state,
            &mut progress,
            &[order(1, webapp()), order(2, lb(LbPolicy::RoundRobin))],
        )
        .await
        .expect("apply");
        // The agent dies here, before reporting: a new one on the same state
        // dir reports both, not only the last.
        let resumed = f.state.progress().expect("progress");
        let pending: Vec<i64> = resumed.pending_reports().iter().map(|r| r.seq).collect();
        assert_eq!(pending, [1, 2]);
    }

    #[tokio::test]
    async fn a_new_policy_rerenders_and_reloads_nginx_and_a_repeat_does_not() {
        let f = fixture();
        let mut progress = Progress::default();
        apply_orders(
            &f.node,
            &f.state,
            &mut progress,
            &[
                order(1, lb(LbPolicy::RoundRobin)),
                order(2, lb(LbPolicy::RoundRobin)),
            ],
        )
        .await
        .expect("apply");
        let reloads = |calls: &[Call]| {
            calls
                .iter()
                .filter(|c| matches!(c, Call::Signal(_, nix::sys::signal::Signal::SIGHUP)))
                .count()
        };
        assert_eq!(f.host.starts(), 1);
        assert_eq!(reloads(&f.host.calls()), 0);
        apply_orders(
            &f.node,
            &f.state,
            &mut progress,
            &[order(3, lb(LbPolicy::UriHash))],
        )
        .await
        .expect("apply");
        assert_eq!(f.host.starts(), 1);
        assert_eq!(reloads(&f.host.calls()), 1);
        let conf =
            std::fs::read_to_string(f.state.root().join("nginx/conf/nginx.conf")).expect("conf");
        assert!(conf.contains("policy UriHash"), "{conf}");
    }

    #[tokio::test]
    async fn a_config_nginx_rejects_never_replaces_the_good_one() {
        let f = fixture();
        let mut progress = Progress::default();
        apply_orders(
            &f.node,
            &f.state,
            &mut progress,
            &[order(1, lb(LbPolicy::RoundRobin))],
        )
        .await
        .expect("apply");
        f.host.fail_when("nginx -t", "nginx: [emerg] bad");
        let results = apply_orders(
            &f.node,
            &f.state,
            &mut progress,
            &[order(2, lb(LbPolicy::LeastConn))],
        )
        .await
        .expect("apply");
        assert_eq!(results[0].outcome, OrderOutcome::Failed);
        assert!(
            results[0].message.contains("emerg"),
            "{}",
            results[0].message
        );
        let conf =
            std::fs::read_to_string(f.state.root().join("nginx/conf/nginx.conf")).expect("conf");
        assert!(!conf.contains("least_conn"));
    }
}
