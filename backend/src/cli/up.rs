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

/// The topology `up` asks for: the seed's on an empty cluster given no
/// sizes, else the current one with the sizes given.
fn wanted_topology(current: &TopologyUpdate, options: &UpOptions) -> TopologyUpdate {
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
    spec
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
    if config.database_url.is_none() && state_dir.join("statedb").is_dir() {
        bail!(
            "{} holds a cluster of several servers (its state database is in statedb/): run `corral up --servers N` on it, or `corral down --purge` first",
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
    let spec = wanted_topology(&current, &options);
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
    let nodes_now = {
        let cluster = cluster.clone();
        move || {
            let cluster = cluster.clone();
            async move { cluster.nodes().await.map_err(|e| e.to_string()) }
        }
    };
    let ready = wait_until_ready(
        nodes_now,
        options.nginx_port,
        started,
        options.ready_timeout,
    );
    tokio::select! {
        outcome = ready => {
            match outcome {
                Ok(nodes) => print_ready(std::slice::from_ref(&url), &nodes, options.nginx_port, &state_dir, started),
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
        // Its database comes with the restore order, and stays after it.
        Role::Restore => &["consul"],
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
async fn wait_until_ready<F, Fut>(
    nodes_now: F,
    nginx_port: u16,
    started: Instant,
    timeout: Duration,
) -> Result<Vec<Node>, String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Node>, String>>,
{
    let deadline = Instant::now() + timeout;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| e.to_string())?;
    let mut reported: HashMap<String, String> = HashMap::new();
    loop {
        let nodes = nodes_now().await?;
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

fn print_ready(
    urls: &[String],
    nodes: &[Node],
    nginx_port: u16,
    state_dir: &Path,
    started: Instant,
) {
    let adm = nodes.iter().find(|n| n.role == Role::Adm);
    eprintln!(
        "\ncluster ready in {:.1} s\n",
        started.elapsed().as_secs_f64()
    );
    for (i, url) in urls.iter().enumerate() {
        let which = if urls.len() > 1 {
            format!(", server adm{}", i + 1)
        } else {
            String::new()
        };
        eprintln!("  corral UI/API   {url}/   (API docs {url}/docs/{which})");
    }
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
    // Servers of an `up --servers N` that is gone, first: one that still
    // leads would make the machines stopped below again.
    kill_left_servers(&state_dir).await;
    let mut providers: Vec<Arc<dyn Machines>> = vec![LocalProvider::new(LocalConfig {
        state_dir: state_dir.clone(),
        agent_bin: config.agent_bin.clone(),
        agent_args: Vec::new(),
    })];
    if state_dir.join("lxc").is_dir() {
        providers.push(LxcProvider::new(lxc_config(&config)));
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
    // The state database a killed `up --servers N` left running.
    crate::statedb::stop_left(&state_dir).await;
    let _ = std::fs::remove_file(pid_file(&state_dir));
    if purge {
        let _ = std::fs::remove_dir_all(state_dir.join("statedb"));
        for name in ["corral.db", "corral.db-wal", "corral.db-shm"] {
            let _ = std::fs::remove_file(state_dir.join(name));
        }
        let _ = std::fs::remove_dir_all(state_dir.join("nodes"));
        let _ = std::fs::remove_dir_all(state_dir.join("lxc"));
        eprintln!(
            "cluster deleted: its machines, their data and the control plane's database(s) in {} (secrets kept)",
            state_dir.display()
        );
    } else {
        eprintln!("cluster stopped");
    }
    Ok(())
}

/// The LXC provider's settings as `serve` would make them from `config`,
/// for the work `up` and `down` do on the machines themselves.
fn lxc_config(config: &Config) -> LxcConfig {
    let plan = config.lxc_network;
    let mut lxc = LxcConfig::new(&config.state_dir, plan.host_address(), plan.prefix_len());
    lxc.bridge = config.lxc_bridge.clone();
    lxc.debs_dir = config.lxc_packages.clone();
    lxc
}

/// Kills the servers a gone `up --servers N` left (their `serve-*.pid`
/// files in the state dir) and waits until they are gone.
async fn kill_left_servers(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("serve-") && name.ends_with(".pid")) {
            continue;
        }
        if let Some(pid) = reaper::read_pid_file(&entry.path())
            && reaper::alive_with(pid, "corral")
        {
            eprintln!("stopping the server left running (pid {pid}) ...");
            let _ = kill(reaper::pid(pid), Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(10);
            while reaper::alive_with(pid, "corral") && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let _ = std::fs::remove_file(entry.path());
    }
}

/// What `up --servers N` (N > 1) needs besides [`UpOptions`]: how many
/// servers, and the `corral serve` arguments they share.
#[derive(Debug, Clone)]
pub struct ServersOptions {
    pub count: u32,
    pub serve_args: Vec<String>,
}

/// The port of the state database's PostgreSQL on each admin address.
pub const STATE_DB_PORT: u16 = 5432;

/// One `corral serve` child of `up --servers N`.
struct ServerProcess {
    name: String,
    url: String,
    args: Vec<String>,
    /// In the environment, not the arguments: it carries the password.
    database_url: String,
    log: PathBuf,
    pid: u32,
    exit: tokio::sync::oneshot::Receiver<reaper::Exit>,
}

impl ServerProcess {
    fn spawn(
        name: String,
        url: String,
        args: Vec<String>,
        database_url: String,
        log: PathBuf,
    ) -> anyhow::Result<ServerProcess> {
        let (pid, exit) = spawn_server(&args, &database_url, &log)?;
        Ok(ServerProcess {
            name,
            url,
            args,
            database_url,
            log,
            pid,
            exit,
        })
    }

    fn respawn(&mut self) -> anyhow::Result<()> {
        let (pid, exit) = spawn_server(&self.args, &self.database_url, &self.log)?;
        self.pid = pid;
        self.exit = exit;
        Ok(())
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        crate::provider::command::tail(&log, 2000)
    }
}

/// Starts `corral serve ARGS` (this very executable) on `database_url`
/// (given as `DATABASE_URL`: a command line is anyone's to read), its log
/// appended to `log`, its pid in `log` with `.pid` for `corral down`. It is
/// killed should this process die (as the one server of a single-server
/// `up` dies with it; the data plane runs on and the next `up` adopts it): a
/// server shutting down at leisure would still lead, and make machines
/// again that `down` stops.
fn spawn_server(
    args: &[String],
    database_url: &str,
    log: &Path,
) -> anyhow::Result<(u32, tokio::sync::oneshot::Receiver<reaper::Exit>)> {
    let exe = std::env::current_exe().context("finding the corral executable")?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--"])
        .arg(exe)
        .arg("serve")
        .args(args)
        .env("DATABASE_URL", database_url)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(file);
    let spawned = Reaper::global()
        .spawn(&mut cmd)
        .context("starting corral serve")?;
    let _ = std::fs::write(log.with_extension("pid"), format!("{}\n", spawned.pid));
    Ok((spawned.pid, spawned.exit))
}

/// Waits until `server` answers `/healthz`, or says why not.
async fn wait_healthy(server: &mut ServerProcess, state_dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let http = http_client(state_dir)?;
        if let Ok(exit) = server.exit.try_recv() {
            bail!(
                "the server {} ended ({exit}) while starting; the end of {}:\n{}",
                server.name,
                server.log.display(),
                server.log_tail()
            );
        }
        if let Ok(r) = http.get(format!("{}/healthz", server.url)).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the server {} does not answer at {} after 120 s; the end of {}:\n{}",
                server.name,
                server.url,
                server.log.display(),
                server.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An HTTP client that trusts the cluster CA once there is one.
fn http_client(state_dir: &Path) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(2));
    if let Ok(pem) = std::fs::read(state_dir.join("tls/ca.pem")) {
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    Ok(builder.build()?)
}

/// Starts again every server that ended, until `stop` says so; a server
/// that keeps ending waits longer each time (1, 2, 4 … 16 s).
async fn keep_servers(
    servers: Arc<tokio::sync::Mutex<Vec<ServerProcess>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff: HashMap<String, (Duration, Instant)> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let mut list = servers.lock().await;
        if *stop.borrow() {
            return;
        }
        for server in list.iter_mut() {
            let (wait, due) = backoff
                .get(&server.name)
                .copied()
                .unwrap_or((Duration::ZERO, Instant::now()));
            if let Ok(exit) = server.exit.try_recv() {
                let wait = (wait * 2).clamp(Duration::from_secs(1), Duration::from_secs(16));
                eprintln!(
                    "  {:<8} server ended ({exit}); starting it again in {} s (log: {})",
                    server.name,
                    wait.as_secs(),
                    server.log.display()
                );
                backoff.insert(server.name.clone(), (wait, Instant::now() + wait));
                // A placeholder until it is started again: a receiver that
                // never says it ended.
                server.exit = tokio::sync::oneshot::channel().1;
                server.pid = 0;
                continue;
            }
            if server.pid == 0 && Instant::now() >= due {
                match server.respawn() {
                    Ok(()) => eprintln!("  {:<8} server started again", server.name),
                    Err(e) => eprintln!("  {:<8} cannot start the server: {e:#}", server.name),
                }
            }
        }
    }
}

/// `corral up --servers N`: the state database (PostgreSQL primary and
/// standbys on the admin addresses, unless `--database-url` names one), N
/// `corral serve` processes on adm1..admN sharing it and naming each other as
/// peers, the nodes, and on Ctrl-C or SIGTERM everything stopped in order.
pub async fn up_servers(
    config: Config,
    options: UpOptions,
    servers: ServersOptions,
) -> anyhow::Result<()> {
    let state_dir = config.state_dir.clone();
    let provider = config.default_provider;
    if !matches!(provider, Provider::Local | Provider::Lxc) {
        bail!(
            "corral up --servers {} runs on the local and lxc providers, not {provider}: its servers and state database run on this host, at addresses the nodes must reach",
            servers.count,
        );
    }
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    if let Some(pid) = running_up(&state_dir) {
        bail!(
            "corral up is already running on {} (pid {pid}); stop it with `corral down`",
            state_dir.display()
        );
    }
    // Its nodes are in SQLite, which several servers cannot share: the new
    // database would make the same nodes again beside their machines.
    if config.database_url.is_none()
        && state_dir.join(crate::store::SQLITE_FILE).is_file()
        && state_dir.join("nodes").is_dir()
    {
        bail!(
            "{} holds a single-server cluster (SQLite, corral.db): run `corral up` without --servers on it, or `corral down --purge` first",
            state_dir.display()
        );
    }
    Reaper::global();
    let started = Instant::now();
    let plan = config.plan_for(provider);
    let admins: Vec<(String, std::net::Ipv4Addr)> = (1..=servers.count)
        .map(|i| {
            plan.admin_address(i)
                .map(|a| (format!("adm{i}"), a))
                .with_context(|| format!("the network has no address for adm{i}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let port = config
        .listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(corral_proto::ports::CONTROL_PLANE);
    if provider == Provider::Lxc {
        // adm1 is the host's address on the bridge; adm2.. are further
        // addresses of the host there, where the containers reach the other
        // servers and the state database's standbys.
        eprintln!(
            "bridge {}: the servers' addresses {}",
            config.lxc_bridge,
            admins
                .iter()
                .map(|(_, a)| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let more: Vec<std::net::Ipv4Addr> = admins[1..].iter().map(|(_, a)| *a).collect();
        LxcProvider::new(lxc_config(&config))
            .ensure_bridge_with(&more)
            .await
            .with_context(|| format!("setting up the bridge {}", config.lxc_bridge))?;
    }
    // The secrets are made here, once, before any server reads them.
    let secrets = crate::auth::Secrets::load_or_create(&state_dir)?;
    std::fs::write(pid_file(&state_dir), format!("{}\n", std::process::id()))
        .context("writing up.pid")?;
    let result = run_servers(
        &config, &options, &servers, &admins, port, &secrets, started,
    )
    .await;
    let _ = std::fs::remove_file(pid_file(&state_dir));
    result
}

async fn run_servers(
    config: &Config,
    options: &UpOptions,
    servers: &ServersOptions,
    admins: &[(String, std::net::Ipv4Addr)],
    port: u16,
    secrets: &crate::auth::Secrets,
    started: Instant,
) -> anyhow::Result<()> {
    let state_dir = &config.state_dir;
    let signal = wait_for_signal();
    tokio::pin!(signal);

    let mut state_db = None;
    let database_url = match &config.database_url {
        Some(url) => url.clone(),
        None => {
            eprintln!(
                "state database: PostgreSQL primary on {} and standby on {} (port {STATE_DB_PORT}, data in {})",
                admins[0].1,
                admins[1..]
                    .iter()
                    .map(|(_, a)| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                state_dir.join("statedb").display()
            );
            let db = crate::statedb::StateDb::start(crate::statedb::StateDbConfig::new(
                state_dir,
                admins.to_vec(),
                STATE_DB_PORT,
            ))
            .await?;
            let url = db.url();
            state_db = Some(db);
            url
        }
    };

    let tls = config.tls.resolve(std::net::IpAddr::V4(admins[0].1))?;
    let scheme = if tls { "https" } else { "http" };
    let urls: Vec<String> = admins
        .iter()
        .map(|(_, a)| format!("{scheme}://{a}:{port}"))
        .collect();
    let mut list = Vec::new();
    let mut outcome = Ok(());
    for (i, (name, address)) in admins.iter().enumerate() {
        let mut args = vec![
            "--state-dir".to_string(),
            state_dir.display().to_string(),
            "--listen".into(),
            format!("{address}:{port}"),
        ];
        for (j, url) in urls.iter().enumerate() {
            if j != i {
                args.push("--peer".into());
                args.push(url.clone());
            }
        }
        args.extend(servers.serve_args.iter().cloned());
        let log = state_dir.join(format!("serve-{name}.log"));
        let spawned = ServerProcess::spawn(
            name.clone(),
            urls[i].clone(),
            args,
            database_url.clone(),
            log,
        );
        match spawned {
            Ok(mut server) => {
                // One at a time: the first makes the schema and the TLS files
                // the others read.
                let healthy = tokio::select! {
                    r = wait_healthy(&mut server, state_dir) => r,
                    _ = &mut signal => Err(anyhow::anyhow!("interrupted while starting the servers")),
                };
                list.push(server);
                if let Err(e) = healthy {
                    outcome = Err(e);
                    break;
                }
                eprintln!("  {name:<8} server on {}", urls[i]);
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    let servers_list = Arc::new(tokio::sync::Mutex::new(list));
    let (stop_keeping, keeping) = tokio::sync::watch::channel(false);
    let keeper = tokio::spawn(keep_servers(servers_list.clone(), keeping));

    if outcome.is_ok() {
        outcome = serve_until_signal(config, options, &urls, secrets, started, &mut signal).await;
    }

    eprintln!("stopping the cluster ...");
    stop_keeping.send_replace(true);
    let _ = keeper.await;
    stop_servers(&servers_list).await;
    stop_machines(config).await;
    if let Some(db) = state_db {
        db.stop().await;
        eprintln!("  state database stopped");
    }
    eprintln!(
        "cluster stopped; `corral up --servers {}` resumes it",
        servers.count
    );
    outcome
}

async fn serve_until_signal(
    config: &Config,
    options: &UpOptions,
    urls: &[String],
    secrets: &crate::auth::Secrets,
    started: Instant,
    signal: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<()> {
    let state_dir = &config.state_dir;
    if let Some(token) = secrets.new_admin_token.as_deref() {
        eprintln!(
            "admin token (shown once; also in {}):",
            secrets.admin_token_path.display()
        );
        println!("{token}");
    }
    let token = std::fs::read_to_string(&secrets.admin_token_path)
        .context("reading the admin token")?
        .trim()
        .to_string();
    let ca = std::fs::read(state_dir.join("tls/ca.pem")).ok();
    let client = super::client::Client::new(urls, Some(token), ca.as_deref());
    let current = TopologyUpdate::from(&client.topology().await?);
    let spec = wanted_topology(&current, options);
    if spec != current {
        let change = client.set_topology(&spec).await?;
        eprintln!(
            "topology: {} web, {} db ({} new node(s))",
            spec.web,
            spec.db,
            change.created.len()
        );
    }
    let nodes_now = || {
        let client = &client;
        // A server that is down is passed over by the client; while none
        // answers, nothing is ready yet.
        async move { Ok(client.nodes().await.unwrap_or_default()) }
    };
    let ready = wait_until_ready(
        nodes_now,
        options.nginx_port,
        started,
        options.ready_timeout,
    );
    tokio::select! {
        outcome = ready => {
            match outcome {
                Ok(nodes) => print_ready(urls, &nodes, options.nginx_port, state_dir, started),
                Err(waiting) => eprintln!(
                    "not every node is ready after {:.0} s; still waiting on:\n{waiting}\n(the cluster keeps running; see `corral nodes list` and {}/nodes/<node>/logs)",
                    options.ready_timeout.as_secs_f64(),
                    state_dir.display()
                ),
            }
            signal.as_mut().await;
        }
        _ = signal.as_mut() => {}
    }
    Ok(())
}

/// SIGTERM to every server, SIGKILL to one still running after 10 s (a
/// server ends its requests within 5 s).
async fn stop_servers(servers: &tokio::sync::Mutex<Vec<ServerProcess>>) {
    let mut list = servers.lock().await;
    for server in list.iter() {
        if server.pid != 0 {
            let _ = kill(reaper::pid(server.pid), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for server in list.iter_mut() {
        if server.pid == 0 {
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, &mut server.exit).await.is_err() {
            let _ = kill(reaper::pid(server.pid), Signal::SIGKILL);
            let _ = (&mut server.exit).await;
        }
        let _ = std::fs::remove_file(server.log.with_extension("pid"));
        eprintln!("  {:<8} server stopped", server.name);
    }
}

/// Stops every machine of the cluster in order, as `down` does: with the
/// servers gone, no controller makes them again meanwhile.
async fn stop_machines(config: &Config) {
    let mut providers: Vec<Arc<dyn Machines>> = vec![LocalProvider::new(LocalConfig {
        state_dir: config.state_dir.clone(),
        agent_bin: config.agent_bin.clone(),
        agent_args: Vec::new(),
    })];
    if config.state_dir.join("lxc").is_dir() {
        providers.push(LxcProvider::new(lxc_config(config)));
    }
    let controller = MachineController::new(providers, String::new(), None);
    let progress = tokio::spawn(show_progress(controller.subscribe()));
    controller.stop_all().await;
    drop(controller);
    let _ = tokio::time::timeout(Duration::from_secs(1), progress).await;
}
