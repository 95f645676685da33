//! `corral up` and `corral down`: the whole cluster on this machine. `up`
//! runs the control plane on adm1's address with its machine controller
//! (local processes by default, LXC containers with `--provider lxc`), makes
//! the topology's nodes (the seed's five on a new cluster), shows each
//! node's progress until it serves, prints where everything is, and on
//! Ctrl-C or SIGTERM stops the cluster in order. `down` stops a running `up`
//! from another terminal, or stops the machines a killed one left running;
//! `down --purge` deletes them and the cluster's state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use corral_proto::{Node, NodeHealth, NodeState, Provider, Role, ServiceState, TopologyUpdate};
use nix::sys::signal::{Signal, kill};

use crate::auth::Caller;
use crate::cluster::Cluster;
use crate::provider::{
    LocalConfig, LocalProvider, LxcConfig, LxcProvider, MachineController, Machines, ProviderEvent,
    Reaper, reaper,
};
use crate::startup::{Application, Config};

/// What `up` needs beyond the server's own settings.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub web: Option<u32>,
    pub db: Option<u32>,
    /// The port nginx listens on at local nodes (LXC nodes use 80).
    pub nginx_port: u16,
    pub ready_timeout: Duration,
}

fn pid_file(state_dir: &Path) -> PathBuf {
    state_dir.join("up.pid")
}

/// The pid of a running `corral up` on this state directory.
fn running_up(state_dir: &Path) -> Option<u32> {
    reaper::read_pid_file(&pid_file(state_dir))
        .filter(|pid| *pid != std::process::id() && reaper::alive_with(*pid, "corral"))
}

pub async fn up(mut config: Config, options: UpOptions) -> anyhow::Result<()> {
    let state_dir = config.state_dir.clone();
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    if let Some(pid) = running_up(&state_dir) {
        bail!(
            "corral up is already running on {} (pid {pid}); stop it with `corral down`",
            state_dir.display()
        );
    }
    // Become the subreaper before anything is started.
    Reaper::global();
    let started = Instant::now();
    config.run_machines = true;
    // The HTTP server lives until the machines are stopped (below).
    config.stop_on_signals = false;
    let provider = config.default_provider;
    if provider == Provider::Lxc {
        eprintln!(
            "checking the LXC provider (bridge {} at {}, base image) ...",
            config.lxc_bridge,
            config.lxc_network.host_address()
        );
    }

    let mut app = Application::build(config)
        .await
        .context("starting the corral server")?;
    std::fs::write(pid_file(&state_dir), format!("{}\n", std::process::id()))
        .context("writing up.pid")?;
    let url = app.url();
    let cluster = app.cluster();
    let machines = app
        .take_machines()
        .context("the server runs no machine controller")?;
    let controller = machines.controller.clone();
    let progress = tokio::spawn(show_progress(controller.subscribe()));
    eprintln!(
        "corral {} on {url} (state in {}, {}; new nodes: {provider})",
        corral_proto::VERSION,
        state_dir.display(),
        app.database()
    );
    if let Some(token) = app.new_admin_token() {
        eprintln!(
            "admin token (shown once; also in {}):",
            app.secrets().admin_token_path.display()
        );
        println!("{token}");
    }

    let current = TopologyUpdate::from(&cluster.topology().await?);
    let mut spec = current.clone();
    if current.web == 0 && current.db == 0 && options.web.is_none() && options.db.is_none() {
        spec = TopologyUpdate {
            lb_policy: current.lb_policy,
            replication: current.replication,
            ..TopologyUpdate::seed()
        };
    }
    if let Some(web) = options.web {
        spec.web = web;
    }
    if let Some(db) = options.db {
        spec.db = db;
    }
    if spec != current {
        let (change, _) = cluster
            .set_topology(spec.clone(), &Caller::Admin)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        eprintln!(
            "topology: {} web, {} db ({} new node(s))",
            spec.web,
            spec.db,
            change.created.len()
        );
    }

    let handle = app.handle();
    let server = tokio::spawn(app.run_until_stopped());
    let ready = wait_until_ready(&cluster, options.nginx_port, started, options.ready_timeout);
    tokio::select! {
        outcome = ready => {
            match outcome {
                Ok(nodes) => print_ready(&url, &nodes, options.nginx_port, &state_dir, started),
                Err(waiting) => eprintln!(
                    "not every node is ready after {:.0} s; still waiting on:\n{waiting}\n(the cluster keeps running; see `corral nodes list` and {}/nodes/<node>/logs)",
                    options.ready_timeout.as_secs_f64(),
                    state_dir.display()
                ),
            }
            wait_for_signal().await;
        }
        _ = wait_for_signal() => {}
    }

    eprintln!("stopping the cluster ...");
    machines.stop().await;
    controller.stop_all().await;
    handle.stop(true).await;
    let _ = server.await;
    // The progress task ends once it has printed everything said.
    drop(controller);
    let _ = tokio::time::timeout(Duration::from_secs(1), progress).await;
    let _ = std::fs::remove_file(pid_file(&state_dir));
    eprintln!("cluster stopped; `corral up` resumes it");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn show_progress(mut events: tokio::sync::broadcast::Receiver<ProviderEvent>) {
    loop {
        match events.recv().await {
            Ok(ProviderEvent::Ensuring { node, provider }) => {
                eprintln!("  {node:<8} making its {provider} machine")
            }
            Ok(ProviderEvent::Ensured { node, detail }) => eprintln!("  {node:<8} {detail}"),
            Ok(ProviderEvent::Adopted { node }) => {
                eprintln!("  {node:<8} already running, adopted")
            }
            Ok(ProviderEvent::Exited { node, how }) => eprintln!("  {node:<8} ended ({how})"),
            Ok(ProviderEvent::Stopped { node }) => eprintln!("  {node:<8} stopped"),
            Ok(ProviderEvent::Destroyed { node }) => eprintln!("  {node:<8} deleted"),
            Ok(ProviderEvent::Failed { node, message }) => eprintln!("  {node:<8} {message}"),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(_) => break,
        }
    }
}

/// The services an agent runs on a node of `role`.
pub fn expected_services(role: Role) -> &'static [&'static str] {
    match role {
        Role::Web => &["consul", "todomvc", "nginx"],
        Role::Db => &["consul", "postgres"],
        Role::Adm => &["consul"],
    }
}

/// Why a node is not ready yet, or `None` when it is: enrolled, heard from,
/// every order applied and every service of its role running.
pub fn not_ready(node: &Node) -> Option<String> {
    if node.state == NodeState::Provisioning {
        return Some("waiting for its agent to enroll".into());
    }
    if node.state == NodeState::Draining {
        return Some("draining".into());
    }
    let Some(observed) = node.observed.as_ref() else {
        return Some("waiting for its first heartbeat".into());
    };
    if node.health != NodeHealth::Healthy {
        return Some("heartbeats stopped".into());
    }
    if observed.applied_seq < node.last_seq {
        return Some(format!(
            "applying orders ({} of {})",
            observed.applied_seq, node.last_seq
        ));
    }
    for name in expected_services(node.role) {
        match observed.services.iter().find(|s| s.name == *name) {
            None => return Some(format!("{name} not started")),
            Some(s) if s.state != ServiceState::Running => {
                let detail = s.detail.as_deref().unwrap_or_default();
                return Some(format!("{name} {:?} {detail}", s.state).to_lowercase());
            }
            Some(_) => {}
        }
    }
    None
}

/// Polls until every node is ready and every load balancer answers the
/// TodoMVC API; reports each node the moment it is ready.
async fn wait_until_ready(
    cluster: &Arc<Cluster>,
    nginx_port: u16,
    started: Instant,
    timeout: Duration,
) -> Result<Vec<Node>, String> {
    let deadline = Instant::now() + timeout;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| e.to_string())?;
    let mut reported: HashMap<String, String> = HashMap::new();
    loop {
        let nodes = cluster.nodes().await.map_err(|e| e.to_string())?;
        let mut waiting = Vec::new();
        for node in &nodes {
            let mut status = not_ready(node);
            if status.is_none() && node.role == Role::Web {
                let url = format!(
                    "http://{}:{}/todos",
                    node.address,
                    lb_port(node, nginx_port)
                );
                status = match http.get(&url).send().await {
                    Ok(res) if res.status().is_success() => None,
                    Ok(res) => Some(format!("load balancer answers {}", res.status())),
                    Err(_) => Some("load balancer not answering yet".into()),
                };
            }
            let key = status.clone().unwrap_or_else(|| "ready".into());
            if reported.get(&node.name) != Some(&key) {
                let line = match &status {
                    Some(why) => why.clone(),
                    None => format!("ready after {:.1} s", started.elapsed().as_secs_f64()),
                };
                eprintln!("  {:<8} {:<13} {line}", node.name, node.address);
                reported.insert(node.name.clone(), key);
            }
            if let Some(why) = status {
                waiting.push(format!("  {}: {why}", node.name));
            }
        }
        if waiting.is_empty() && !nodes.is_empty() {
            return Ok(nodes);
        }
        if Instant::now() >= deadline {
            return Err(waiting.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The port a web node's nginx listens on: `--nginx-port` applies to
/// local nodes only; containers have a port 80 of their own.
fn lb_port(node: &Node, nginx_port: u16) -> u16 {
    if node.provider == Provider::Local {
        nginx_port
    } else {
        corral_proto::ports::NGINX
    }
}

fn print_ready(url: &str, nodes: &[Node], nginx_port: u16, state_dir: &Path, started: Instant) {
    let adm = nodes.iter().find(|n| n.role == Role::Adm);
    eprintln!(
        "\ncluster ready in {:.1} s\n",
        started.elapsed().as_secs_f64()
    );
    eprintln!("  corral UI/API   {url}/   (API docs {url}/docs/)");
    if let Some(adm) = adm {
        eprintln!(
            "  Consul UI       http://{}:8500/ui   (log in with {})",
            adm.address,
            state_dir.join("consul-management-token").display()
        );
    }
    for web in nodes.iter().filter(|n| n.role == Role::Web) {
        let port = match lb_port(web, nginx_port) {
            80 => String::new(),
            port => format!(":{port}"),
        };
        eprintln!(
            "  TodoMVC         http://{}{port}/   (via {}, {})",
            web.address, web.name, web.provider
        );
    }
    eprintln!(
        "  admin token     in {}\n\nCtrl-C stops the cluster.",
        state_dir.join("admin-token").display()
    );
}

/// `corral down`: stop a running `up` (it stops its nodes in order), or,
/// when none runs, stop the machines left in the state dir. With `purge`,
/// then delete every machine with its data, and the cluster's state.
pub async fn down(config: Config, purge: bool) -> anyhow::Result<()> {
    let state_dir = config.state_dir.clone();
    if let Some(pid) = running_up(&state_dir) {
        eprintln!("stopping corral up (pid {pid}) ...");
        kill(reaper::pid(pid), Signal::SIGTERM).context("signalling corral up")?;
        let deadline = Instant::now() + Duration::from_secs(180);
        while reaper::alive_with(pid, "corral") {
            if Instant::now() >= deadline {
                bail!("corral up (pid {pid}) is still running after 180 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !purge {
            eprintln!("cluster stopped");
            return Ok(());
        }
    }
    Reaper::global();
    let mut providers: Vec<Arc<dyn Machines>> = vec![LocalProvider::new(LocalConfig {
        state_dir: state_dir.clone(),
        agent_bin: config.agent_bin.clone(),
        agent_args: Vec::new(),
    })];
    if state_dir.join("lxc").is_dir() {
        let plan = config.lxc_network;
        let mut lxc = LxcConfig::new(&state_dir, plan.host_address(), plan.prefix_len());
        lxc.bridge = config.lxc_bridge.clone();
        lxc.debs_dir = config.lxc_packages.clone();
        providers.push(LxcProvider::new(lxc));
    }
    let controller = MachineController::new(providers, String::new(), None);
    let progress = tokio::spawn(show_progress(controller.subscribe()));
    if purge {
        controller.destroy_all().await;
    } else {
        controller.stop_all().await;
    }
    drop(controller);
    let _ = tokio::time::timeout(Duration::from_secs(1), progress).await;
    let _ = std::fs::remove_file(pid_file(&state_dir));
    if purge {
        for name in ["corral.db", "corral.db-wal", "corral.db-shm"] {
            let _ = std::fs::remove_file(state_dir.join(name));
        }
        let _ = std::fs::remove_dir_all(state_dir.join("nodes"));
        let _ = std::fs::remove_dir_all(state_dir.join("lxc"));
        eprintln!(
            "cluster deleted: its machines, their data and the control plane's database in {} (secrets kept)",
            state_dir.display()
        );
    } else {
        eprintln!("cluster stopped");
    }
    Ok(())
}
