//! A harness for end-to-end tests: a whole cluster brought up by the real
//! `corral up` (control plane + local provider) in a temporary state
//! directory on a /24 of loopback addresses of its own, so tests can run side
//! by side. Everything it starts is stopped when the [`Cluster`] is dropped,
//! also when a test fails. Tests poll conditions with deadlines.
//!
//! The binaries come from the cargo target directory the test runs from
//! (`corral`, `corral-agent`, `todomvc`): build them first with
//! `cargo build --workspace --bins`, or point `CORRAL_BIN_DIR` elsewhere.

pub mod dns;
pub mod faults;
pub mod history;
pub mod pg;
pub mod workload;
pub mod writes;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use corral_proto::Node;
use corral_server::provider::reaper::{self, Exit, Reaper};
use nix::sys::signal::{Signal, kill};

/// The directory holding the corral binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CORRAL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/debug/deps/<test> -> target/debug
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("exe dir");
    deps.parent().unwrap_or(deps).to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (cargo build --workspace --bins) or set CORRAL_BIN_DIR",
        path.display()
    );
    path
}

/// Polls `check` until it yields `Some`, failing with `what` (and the last
/// error) at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => last = "not yet".into(),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The processes whose parent is one of `parents`.
pub fn children_of(parents: &[u32]) -> Vec<u32> {
    let mut pids = Vec::new();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid.is_some_and(|pp| parents.contains(&pp)) && !parents.contains(&pid) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Runs a command to its end through the process-wide reaper.
pub async fn run(cmd: &mut Command) -> anyhow::Result<reaper::Output> {
    Reaper::global()
        .output(cmd)
        .await
        .with_context(|| format!("running {cmd:?}"))
}

/// Where a test cluster's nodes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machines {
    /// Processes on loopback addresses (the local provider).
    Local,
    /// LXC containers on a bridge of the test's own (the LXC provider);
    /// adm1 is the host, on the bridge.
    Lxc,
}

/// A cluster run by `corral up`.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// The first three octets of the cluster's /24, e.g. `127.0.21`.
    pub net: String,
    pub url: String,
    pub token: String,
    pub http: reqwest::Client,
    pub machines: Machines,
    up: Option<Up>,
    web: u32,
    db: u32,
    /// More arguments for `corral up` (e.g. `--providers virtualbox`).
    extra_args: Vec<String>,
}

/// Why LXC tests cannot run on this host, if they cannot: they need root,
/// the lxc tools, debootstrap, nft and the packages from
/// `scripts/package.sh`.
pub fn lxc_unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    for tool in ["lxc-start", "lxc-copy", "lxc-freeze", "debootstrap", "nft"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()));
        if !found {
            return Some(format!(
                "{tool} is not installed (apt-get install lxc debootstrap nftables)"
            ));
        }
    }
    let debs = lxc_packages();
    for prefix in ["corral-agent_", "todomvc_"] {
        let found = std::fs::read_dir(&debs).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
        });
        if !found {
            return Some(format!(
                "no {prefix}*.deb in {} (run scripts/package.sh)",
                debs.display()
            ));
        }
    }
    None
}

/// The packages LXC test clusters install: `CORRAL_LXC_PACKAGES`, else
/// `target/debian` of this target directory.
pub fn lxc_packages() -> PathBuf {
    if let Ok(dir) = std::env::var("CORRAL_LXC_PACKAGES") {
        return PathBuf::from(dir);
    }
    bin_dir()
        .parent()
        .map(|t| t.join("debian"))
        .unwrap_or_else(|| PathBuf::from("target/debian"))
}

struct Up {
    pid: u32,
    exit: tokio::sync::oneshot::Receiver<Exit>,
}

impl Cluster {
    /// `corral up` with `web` and `db` nodes on `127.0.<octet>.0/24`; returns
    /// once it says the cluster is ready.
    pub async fn up(octet: u8, web: u32, db: u32) -> anyhow::Result<Cluster> {
        Self::up_on(Machines::Local, octet, web, db, &[]).await
    }

    /// [`Cluster::up`] with more arguments for `corral up`.
    pub async fn up_with(octet: u8, web: u32, db: u32, args: &[&str]) -> anyhow::Result<Cluster> {
        Self::up_on(Machines::Local, octet, web, db, args).await
    }

    /// `corral up --provider lxc` with containers on `192.168.<octet>.0/24`
    /// and a bridge of that octet's own.
    pub async fn up_lxc(octet: u8, web: u32, db: u32) -> anyhow::Result<Cluster> {
        Self::up_on(Machines::Lxc, octet, web, db, &[]).await
    }

    /// [`Cluster::up_lxc`] with more `corral up` arguments.
    pub async fn up_lxc_with(
        octet: u8,
        web: u32,
        db: u32,
        args: &[&str],
    ) -> anyhow::Result<Cluster> {
        Self::up_on(Machines::Lxc, octet, web, db, args).await
    }

    async fn up_on(
        machines: Machines,
        octet: u8,
        web: u32,
        db: u32,
        args: &[&str],
    ) -> anyhow::Result<Cluster> {
        for b in ["corral", "corral-agent", "todomvc"] {
            bin(b);
        }
        let dir = tempfile::Builder::new()
            .prefix("corral-e2e-")
            .tempdir_in("/tmp")
            .context("temp dir")?;
        // PostgreSQL runs as `postgres` and must reach its data directory.
        set_mode(dir.path(), 0o755)?;
        let net = match machines {
            Machines::Local => format!("127.0.{octet}"),
            Machines::Lxc => format!("192.168.{octet}"),
        };
        let mut cluster = Cluster {
            url: format!("http://{net}.5:7000"),
            net,
            machines,
            dir,
            token: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            up: None,
            web,
            db,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
        };
        cluster.start().await?;
        Ok(cluster)
    }

    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Consul's management token, which the control plane made: Consul
    /// denies everything else to a caller without a token.
    pub fn consul_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("consul-management-token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default()
    }

    /// The host bridge of an LXC test cluster: one per subnet.
    pub fn bridge(&self) -> String {
        format!("corrale2e{}", self.net.rsplit('.').next().unwrap_or("0"))
    }

    /// The LXC containers' lxcpath.
    pub fn lxc_path(&self) -> PathBuf {
        self.dir.path().join("lxc")
    }

    /// Where a node's agent keeps its state, as seen from this host: its
    /// node directory (local), or inside the container's overlay (LXC).
    pub fn node_root(&self, node: &str) -> PathBuf {
        match (self.machines, node.starts_with("adm")) {
            (Machines::Local, _) | (Machines::Lxc, true) => {
                self.dir.path().join("nodes").join(node)
            }
            (Machines::Lxc, false) => self
                .lxc_path()
                .join(node)
                .join("overlay/delta/var/lib/corral-agent"),
        }
    }

    /// The directory of a node's PostgreSQL socket, reachable from this
    /// host: in the node's directory (local), or through the container's
    /// own view of its files, `/proc/<its init>/root` (LXC: a socket cannot
    /// be reached through the overlay's upper directory).
    pub async fn pg_socket_dir(&self, node: &str) -> anyhow::Result<PathBuf> {
        if self.machines == Machines::Local {
            return Ok(self.node_root(node).join("pgsock"));
        }
        let out = run(Command::new("lxc-info")
            .arg("-P")
            .arg(self.lxc_path())
            .args(["-n", node, "-p", "-H"]))
        .await?;
        let pid: u32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("{node} has no running init"))?;
        Ok(PathBuf::from(format!(
            "/proc/{pid}/root/var/lib/corral-agent/pgsock"
        )))
    }

    /// The names of the nodes that have a machine here.
    pub fn machine_names(&self) -> Vec<String> {
        let mut names: Vec<String> = [self.dir.path().join("nodes"), self.lxc_path()]
            .iter()
            .flat_map(|d| {
                std::fs::read_dir(d)
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            })
            .filter(|n| corral_proto::Role::parse_node_name(n).is_some())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Runs a command inside an LXC node, at most `limit`.
    pub async fn attach(
        &self,
        node: &str,
        args: &[&str],
        limit: Duration,
    ) -> anyhow::Result<reaper::Output> {
        let mut cmd = Command::new("lxc-attach");
        cmd.arg("-P")
            .arg(self.lxc_path())
            .args(["-n", node, "--clear-env", "--"])
            .args(args)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        Reaper::global()
            .output_within(&mut cmd, Some(limit))
            .await
            .with_context(|| format!("lxc-attach {node} {args:?}"))
    }

    pub fn up_log(&self) -> PathBuf {
        self.dir.path().join("up.log")
    }

    /// Starts `corral up` (again) and waits until it reports the cluster
    /// ready.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.up_log())?;
        let mut cmd = Command::new(bin("corral"));
        cmd.arg("up").arg("--state-dir").arg(self.dir.path());
        match self.machines {
            Machines::Local => {
                cmd.arg("--network").arg(format!("{}.0/24", self.net));
            }
            Machines::Lxc => {
                cmd.args(["--provider", "lxc", "--lxc-network"])
                    .arg(format!("{}.0/24", self.net))
                    .arg("--lxc-bridge")
                    .arg(self.bridge())
                    .arg("--lxc-packages")
                    .arg(lxc_packages());
            }
        }
        cmd.arg("--web")
            .arg(self.web.to_string())
            .arg("--db")
            .arg(self.db.to_string())
            .arg("--agent-bin")
            .arg(bin("corral-agent"))
            .arg("--ready-timeout")
            .arg("240s")
            .args(&self.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("E2E_RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let spawned = Reaper::global().spawn(&mut cmd)?;
        let log_len = std::fs::metadata(self.up_log())?.len() as usize;
        self.up = Some(Up {
            pid: spawned.pid,
            exit: spawned.exit,
        });
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let text = std::fs::read_to_string(self.up_log()).unwrap_or_default();
            let text = text.get(log_len..).unwrap_or_default();
            if text.contains("cluster ready in") {
                break;
            }
            let exited = self.up.as_mut().and_then(|u| u.exit.try_recv().ok());
            if let Some(exit) = exited {
                bail!("corral up ended ({exit}):\n{}", self.tail_logs());
            }
            if text.contains("not every node is ready") {
                bail!("corral up gave up:\n{}", self.tail_logs());
            }
            if Instant::now() >= deadline {
                bail!(
                    "corral up did not report the cluster ready in 300 s:\n{}",
                    self.tail_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.token = std::fs::read_to_string(self.dir.path().join("admin-token"))?
            .trim()
            .to_string();
        // Off loopback (LXC) the control plane speaks TLS with the cluster
        // CA it made in the state dir; pin it, as agents and the CLI do.
        if let Ok(ca) = std::fs::read(self.dir.path().join("tls/ca.pem")) {
            if let Some(rest) = self.url.strip_prefix("http://") {
                self.url = format!("https://{rest}");
            }
            self.http = corral_server::tls::client_builder(Some(&ca))
                .map_err(anyhow::Error::msg)?
                .timeout(Duration::from_secs(10))
                .build()?;
        }
        Ok(())
    }

    /// The last lines of `up.log`, every agent log and every service log,
    /// for failure messages.
    pub fn tail_logs(&self) -> String {
        let mut out = String::new();
        let tail = |p: &Path, n: usize| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        out.push_str(&tail(&self.up_log(), 60));
        for node in self.machine_names() {
            let root = self.node_root(&node);
            {
                out.push_str(&format!("\n--- {node} agent.log ---\n"));
                out.push_str(&tail(&root.join("agent.log"), 30));
                if let Ok(logs) = std::fs::read_dir(root.join("logs")) {
                    for l in logs.flatten() {
                        out.push_str(&format!(
                            "\n--- {node} {} ---\n",
                            l.file_name().to_string_lossy()
                        ));
                        out.push_str(&tail(&l.path(), 12));
                    }
                }
            }
        }
        out
    }

    /// [`Cluster::tail_logs`] and, for LXC nodes, whose agent and services
    /// log to the container's journal, the last lines of that journal
    /// (each read with a time limit: a frozen container must not hang the
    /// report).
    pub async fn logs_for_failure(&self) -> String {
        use std::os::unix::process::CommandExt;
        let mut out = self.tail_logs();
        if self.machines != Machines::Lxc {
            return out;
        }
        for node in self.machine_names() {
            if node.starts_with("adm") {
                continue;
            }
            let mut cmd = Command::new("lxc-attach");
            cmd.arg("-P")
                .arg(self.lxc_path())
                .args(["-n", &node, "--", "journalctl", "--no-pager", "-o"])
                .args(["short-precise", "-n", "150"])
                .process_group(0);
            let text = match Reaper::global()
                .output_within(&mut cmd, Some(Duration::from_secs(10)))
                .await
            {
                Ok(o) if o.timed_out => "(journalctl timed out)".to_string(),
                Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
                Err(e) => format!("(journalctl: {e})"),
            };
            out.push_str(&format!("\n--- {node} journal ---\n{text}"));
        }
        out
    }

    /// Stops `corral up` with SIGTERM (it stops the cluster) and waits.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(up) = self.up.take() else {
            return Ok(());
        };
        let _ = kill(reaper::pid(up.pid), Signal::SIGTERM);
        let exit = tokio::time::timeout(Duration::from_secs(180), up.exit)
            .await
            .map_err(|_| anyhow!("corral up did not stop within 180 s"))?
            .map_err(|_| anyhow!("lost corral up"))?;
        if !exit.success() {
            bail!("corral up ended with {exit}:\n{}", self.tail_logs());
        }
        Ok(())
    }

    /// Kills `corral up` with SIGKILL: the control plane is gone, the nodes
    /// keep running.
    pub async fn kill_control_plane(&mut self) -> anyhow::Result<()> {
        let Some(up) = self.up.take() else {
            bail!("corral up is not running");
        };
        kill(reaper::pid(up.pid), Signal::SIGKILL)?;
        let _ = tokio::time::timeout(Duration::from_secs(30), up.exit).await;
        Ok(())
    }

    pub fn address(&self, node: &str) -> String {
        let (role, index) = corral_proto::Role::parse_node_name(node).expect("seed node name");
        let offset = match role {
            corral_proto::Role::Adm => 5,
            corral_proto::Role::Db => 10 + index,
            corral_proto::Role::Web => 20 + index,
            corral_proto::Role::Restore => {
                panic!("{node} has a pool address: read it from GET /nodes/{node}")
            }
        };
        format!("{}.{offset}", self.net)
    }

    /// A URL on a web node's load balancer.
    pub fn lb(&self, node: &str, path: &str) -> String {
        format!("http://{}{path}", self.address(node))
    }

    pub async fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}/api/v1{path}", self.url))
            .bearer_auth(&self.token)
    }

    pub async fn nodes(&self) -> anyhow::Result<Vec<Node>> {
        let res = self
            .api(reqwest::Method::GET, "/nodes")
            .await
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("GET /nodes: {}", res.status());
        }
        Ok(res.json().await?)
    }

    /// Pids of processes whose command line mentions `needle`.
    pub fn pids_with(needle: &str) -> Vec<u32> {
        let mut pids = Vec::new();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                if reaper::alive_with(pid, needle) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Processes running from this cluster's state directory.
    pub fn processes(&self) -> Vec<u32> {
        Self::pids_with(&self.dir.path().to_string_lossy())
    }

    fn cleanup(&mut self) {
        if let Some(up) = self.up.take() {
            let _ = kill(reaper::pid(up.pid), Signal::SIGTERM);
            wait_blocking(up.exit, Duration::from_secs(120));
        }
        // Whatever a killed `up` left: agents and services by pid file,
        // containers (deleted: their overlays live in the temp dir).
        let mut cmd = Command::new(bin_dir().join("corral"));
        cmd.arg("down")
            .arg("--state-dir")
            .arg(self.dir.path())
            .arg("--agent-bin")
            .arg(bin_dir().join("corral-agent"));
        if self.machines == Machines::Lxc {
            cmd.arg("--purge")
                .arg("--lxc-network")
                .arg(format!("{}.0/24", self.net))
                .arg("--lxc-bridge")
                .arg(self.bridge());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Ok(spawned) = Reaper::global().spawn(&mut cmd) {
            wait_blocking(spawned.exit, Duration::from_secs(120));
        }
        // Last resort: anything still running from the state directory.
        for pid in self.processes() {
            let _ = kill(reaper::pid(pid), Signal::SIGKILL);
        }
        if self.machines == Machines::Lxc {
            // The test's own fault rules and bridge go with it.
            let table = self.nft_table();
            for family in ["bridge", "inet"] {
                run_blocking(Command::new("nft").args(["delete", "table", family, &table]));
            }
            run_blocking(Command::new("ip").args(["link", "delete", &self.bridge()]));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- cluster logs ---\n{}", self.tail_logs());
        }
        self.cleanup();
    }
}

/// Runs a command to its end from a context that cannot await (a drop).
pub(crate) fn run_blocking(cmd: &mut Command) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Ok(spawned) = Reaper::global().spawn(cmd) {
        wait_blocking(spawned.exit, Duration::from_secs(30));
    }
}

fn wait_blocking(mut rx: tokio::sync::oneshot::Receiver<Exit>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match rx.try_recv() {
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            _ => return,
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}
