//! `corral-agent host`: the host agent, which makes the machines of a
//! provider the control plane cannot drive itself. It runs on the machine
//! that has VirtualBox and follows corral's pull model: it long-polls the
//! server for machine orders (`POST /api/v1/hosts/{provider}/poll`, with the
//! machines it holds and the orders it is working on), carries each out with
//! `VBoxManage` in a task of its own (one at a time per node) and answers
//! with the result and the machines it holds now.
//!
//! It keeps no state of its own: VirtualBox's list of VMs is the truth, and
//! an order it was given but had not answered when it died is given again
//! by the server, so the next host agent finishes the work.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use corral_proto::{
    HostMachine, HostOrders, HostPoll, MachineOrder, MachineResult, MachineSpec, Provider,
};

use crate::control::Servers;
use crate::vbox::VBoxManage;
use crate::virtualbox::{GuestBoot, MachineError, VirtualBox, VirtualBoxConfig};

/// How long a poll waits for an order before it reports the machines again.
const POLL_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Args)]
pub struct HostConfig {
    /// The provider whose machines this host makes (virtualbox).
    #[arg(long, env = "CORRAL_HOST_PROVIDER", default_value = "virtualbox")]
    pub provider: Provider,
    /// The control plane, e.g. https://192.168.11.5:7000; several servers
    /// comma-separated (or the flag repeated): polls go to one and move to
    /// the next when it cannot be reached or answers 5xx (503 from a server
    /// that does not lead), until the leader answers.
    #[arg(
        long = "server",
        env = "CORRAL_SERVER",
        value_delimiter = ',',
        required = true
    )]
    pub servers: Vec<String>,
    /// The cluster CA (the server's <state-dir>/tls/ca.pem) to trust for an
    /// https:// server, and nothing else.
    #[arg(long, env = "CORRAL_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// A file holding the control plane's admin token.
    #[arg(long, env = "CORRAL_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// The VBoxManage executable.
    #[arg(long, env = "CORRAL_VBOXMANAGE", default_value = "VBoxManage")]
    pub vboxmanage: PathBuf,
    /// The VM new nodes are linked clones of (scripts/vbox-base.sh makes it).
    #[arg(long, env = "CORRAL_VBOX_BASE", default_value = "corral-base")]
    pub base_vm: String,
    /// The base VM's snapshot the clones are linked to.
    #[arg(long, env = "CORRAL_VBOX_SNAPSHOT", default_value = "base")]
    pub base_snapshot: String,
    /// The host-only network of the nodes' second NIC (192.168.11.0/24).
    #[arg(long, env = "CORRAL_VBOX_HOSTONLY", default_value = "vboxnet0")]
    pub hostonly_network: String,
    /// A node's VM is named this prefix and the node's name.
    #[arg(long, default_value = "corral-")]
    pub vm_prefix: String,
    /// The VM group that marks corral's VMs (the Vagrantfile's seed VMs are
    /// in another and are never touched).
    #[arg(long, default_value = "/corral")]
    pub vm_group: String,
    #[arg(long, default_value_t = 1024)]
    pub memory_mb: u32,
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Longest a new VM may take to boot and enroll its agent, in seconds.
    #[arg(long, default_value_t = 300)]
    pub boot_timeout_secs: u64,
    /// Longest one VBoxManage call may take, in seconds.
    #[arg(long, default_value_t = 120)]
    pub vboxmanage_timeout_secs: u64,
}

impl HostConfig {
    fn virtualbox(&self) -> VirtualBoxConfig {
        VirtualBoxConfig {
            vbox: VBoxManage {
                limit: Duration::from_secs(self.vboxmanage_timeout_secs),
                ..VBoxManage::new(&self.vboxmanage)
            },
            base_vm: self.base_vm.clone(),
            base_snapshot: self.base_snapshot.clone(),
            hostonly_network: self.hostonly_network.clone(),
            vm_prefix: self.vm_prefix.clone(),
            vm_group: self.vm_group.clone(),
            memory_mb: self.memory_mb,
            cpus: self.cpus,
            boot_timeout: Duration::from_secs(self.boot_timeout_secs),
        }
    }
}

struct HostAgent {
    /// Polled in turn until one answers: only the leader does.
    servers: Servers,
    token: String,
    provider: Provider,
    http: reqwest::Client,
    machines: VirtualBox,
    /// Orders in progress: reported in every poll, so the server does not
    /// hand them out again.
    working: Mutex<HashSet<u64>>,
    /// One order at a time per node.
    nodes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Numbers each picture of the machines as it begins, so the server
    /// keeps the newest of a poll and a result that cross; `session` tells
    /// the server the numbering of this run starts over.
    inventory_seq: AtomicU64,
    session: u64,
}

/// Runs the host agent until SIGINT/SIGTERM.
pub async fn run(config: HostConfig) -> anyhow::Result<()> {
    if config.provider != Provider::Virtualbox {
        anyhow::bail!(
            "the host agent makes virtualbox machines only, not {}",
            config.provider
        );
    }
    let token = std::fs::read_to_string(&config.token_file)
        .with_context(|| format!("reading the token file {}", config.token_file.display()))?
        .trim()
        .to_string();
    if token.is_empty() {
        anyhow::bail!("the token file {} is empty", config.token_file.display());
    }
    let servers = Servers::new(&config.servers).map_err(anyhow::Error::msg)?;
    let agent = Arc::new(HostAgent {
        http: http_client(&config, &servers)?,
        servers,
        token,
        provider: config.provider,
        machines: VirtualBox::new(config.virtualbox()),
        working: Mutex::new(HashSet::new()),
        nodes: Mutex::new(HashMap::new()),
        inventory_seq: AtomicU64::new(0),
        session: session_id(),
    });
    tracing::info!(servers = %config.servers.join(","), provider = %agent.provider, "host agent started");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        () = agent.clone().poll_loop() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    }
}

impl HostAgent {
    async fn poll_loop(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            match self.poll_once().await {
                Ok((orders, base)) => {
                    failures = 0;
                    for order in orders.orders {
                        let fresh = self.working().insert(order.id);
                        if fresh {
                            tokio::spawn(self.clone().carry_out(order, base.clone()));
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    let wait = Duration::from_millis(500 * u64::from(failures.min(10)));
                    tracing::warn!(error = %format!("{e:#}"), "poll failed; again in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn working(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.working.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The machines as VirtualBox lists them now, and the picture's number.
    async fn inventory(&self) -> Result<(Vec<HostMachine>, u64), crate::vbox::VBoxError> {
        let seq = self.inventory_seq.fetch_add(1, Ordering::SeqCst) + 1;
        Ok((self.machines.inventory().await?, seq))
    }

    /// One poll of the current server; the orders and the server they came
    /// from (their results go back to it).
    async fn poll_once(&self) -> anyhow::Result<(HostOrders, String)> {
        let (machines, inventory_seq) = self.inventory().await.context("listing the VMs")?;
        let poll = HostPoll {
            machines,
            working: self.working().iter().copied().collect(),
            inventory_seq,
            session: self.session,
        };
        let res = self
            .servers
            .send(|base| {
                self.http
                    .post(format!(
                        "{base}/api/v1/hosts/{}/poll?wait={}s",
                        self.provider,
                        POLL_WAIT.as_secs()
                    ))
                    .bearer_auth(&self.token)
                    .json(&poll)
            })
            .await?;
        // The server that answered: its orders' results go back to it.
        let base = self.servers.current().to_string();
        let status = res.status();
        if !status.is_success() {
            anyhow::bail!(
                "{base} answered {status}: {}",
                res.text().await.unwrap_or_default()
            );
        }
        Ok((res.json().await?, base))
    }

    async fn carry_out(self: Arc<Self>, order: MachineOrder, base: String) {
        let node = order.spec.node().to_string();
        let lock = self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node.clone())
            .or_default()
            .clone();
        let outcome = {
            let _one = lock.lock().await;
            tracing::info!(id = order.id, node = %node, spec = ?kind(&order.spec), "machine order");
            self.apply(&order.spec).await
        };
        match &outcome {
            Ok(done) => tracing::info!(id = order.id, node = %node, "{done}"),
            Err(e) => {
                tracing::warn!(id = order.id, node = %node, error = %e, "machine order failed")
            }
        }
        self.answer(&base, order.id, outcome).await;
        self.working().remove(&order.id);
    }

    async fn apply(&self, spec: &MachineSpec) -> Result<String, MachineError> {
        match spec {
            MachineSpec::Ensure {
                node,
                role,
                address,
                server_url,
                secret,
                ca,
            } => {
                self.machines
                    .ensure(&GuestBoot {
                        node,
                        role: *role,
                        address,
                        server_url,
                        secret,
                        ca: ca.as_deref(),
                    })
                    .await
            }
            MachineSpec::Stop { node } => self.machines.stop(node).await,
            MachineSpec::Destroy { node } => self.machines.destroy(node).await,
        }
    }

    /// Sends the result to the server that gave the order, with the
    /// machines as they are now; tries a few times (a server that is gone
    /// hands the order out again anyway, or the next leader files it anew).
    async fn answer(&self, base: &str, id: u64, outcome: Result<String, MachineError>) {
        let (ok, message, permanent) = match outcome {
            Ok(m) => (true, m, false),
            Err(e) => (false, e.message, e.permanent),
        };
        let message: String = message
            .chars()
            .take(corral_proto::machine::MAX_MACHINE_TEXT)
            .collect();
        for attempt in 1..=5u64 {
            let (machines, inventory_seq) = match self.inventory().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the VMs for a result");
                    tokio::time::sleep(Duration::from_secs(attempt)).await;
                    continue;
                }
            };
            let sent = self
                .http
                .post(format!(
                    "{base}/api/v1/hosts/{}/orders/{id}/result",
                    self.provider
                ))
                .bearer_auth(&self.token)
                .json(&MachineResult {
                    ok,
                    message: message.clone(),
                    machines,
                    inventory_seq,
                    session: self.session,
                    permanent,
                })
                .send()
                .await;
            match sent {
                Ok(res) if res.status().is_success() => return,
                // The server no longer waits for it (restarted): nothing to do.
                Ok(res) if res.status() == reqwest::StatusCode::NOT_FOUND => return,
                Ok(res) => tracing::warn!(id, status = %res.status(), "result refused"),
                Err(e) => tracing::warn!(id, error = %e, "cannot send a result"),
            }
            tokio::time::sleep(Duration::from_secs(attempt)).await;
        }
    }
}

/// A number that differs between runs of the host agent: the time it
/// started and its pid.
fn session_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// An order's kind, for logs: never the secret.
fn kind(spec: &MachineSpec) -> &'static str {
    match spec {
        MachineSpec::Ensure { .. } => "ensure",
        MachineSpec::Stop { .. } => "stop",
        MachineSpec::Destroy { .. } => "destroy",
    }
}

/// The client of the control plane: over https it trusts the cluster CA
/// and nothing else.
fn http_client(config: &HostConfig, servers: &Servers) -> anyhow::Result<reqwest::Client> {
    let pem = match &config.ca_file {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("reading the cluster CA {}: {e}", path.display()))?,
        ),
        None => None,
    };
    Ok(
        // One client for every server: pinned to the CA if any speaks TLS.
        crate::control::pinned_client(servers.tls_server(), pem.as_deref())
            .map_err(anyhow::Error::msg)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(POLL_WAIT + Duration::from_secs(30))
            .build()?,
    )
}
