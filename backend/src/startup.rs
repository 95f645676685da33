//! Building and running the server: one [`Application::build`] used by
//! `corral serve`, the tests (which bind `127.0.0.1:0`) and the benchmarks.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::middleware::{Next, from_fn};
use actix_web::{App, HttpServer, web};
use corral_proto::Provider;

use crate::auth::{Secrets, SecretsError};
use crate::cluster::{Cluster, ClusterConfig, Hosts};
use crate::provider::controller::NodeSource;
use crate::provider::{
    LocalConfig, LocalProvider, LxcConfig, LxcProvider, MachineController, Machines, ProviderError,
    RemoteProvider,
};
use crate::reconcile::addressing::Ula;
use crate::reconcile::{AddressPlan, AddressPlans, ClusterSettings};
use crate::store::{self, Store, StoreError};

/// Providers whose machines a host agent (`corral-agent host`) makes, on a
/// host other than the server's.
pub const HOST_AGENT_PROVIDERS: [Provider; 1] = [Provider::Virtualbox];

/// Everything `corral serve` can be told.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub state_dir: PathBuf,
    /// PostgreSQL (or SQLite) URL; the SQLite file in `state_dir` when unset.
    pub database_url: Option<String>,
    pub network: AddressPlan,
    pub datacenter: String,
    pub default_provider: Provider,
    pub max_poll_wait: Duration,
    pub heartbeat_stale_after: Duration,
    pub retention: crate::cluster::Retention,
    /// How long an enrollment secret stays valid once minted.
    pub enroll_secret_ttl: Duration,
    /// HTTP worker threads; one per core when unset.
    pub workers: Option<usize>,
    /// Whether SIGINT/SIGTERM stop the HTTP server at once (`corral
    /// serve`); `corral up` handles them itself and keeps serving until its
    /// machines are stopped, since a host agent stops its VMs only through
    /// the API.
    pub stop_on_signals: bool,
    /// The built web UI served at `/` (`frontend/dist`); none: `/` says how
    /// to build it.
    pub ui_dir: Option<PathBuf>,
    /// Providers whose nodes this server accepts; `manual` is always
    /// accepted (its agents are installed by hand).
    pub providers: Vec<Provider>,
    /// Whether this server makes machines for the nodes of its providers
    /// (`corral serve` and `corral up` do; tests that simulate agents do not).
    pub run_machines: bool,
    /// How the local provider starts agents.
    pub agent_bin: PathBuf,
    pub agent_args: Vec<String>,
    /// The LXC provider's network: containers' addresses, and the host
    /// bridge's address is adm1's (base+5).
    pub lxc_network: AddressPlan,
    pub lxc_bridge: String,
    /// Where the `.deb` packages LXC containers install are.
    pub lxc_packages: PathBuf,
    /// corral's apt repository served at `/apt/` (`scripts/package.sh`
    /// builds it); none: not served.
    pub apt_dir: Option<PathBuf>,
    /// TLS for the API: by default on unless the listen address is a
    /// loopback one (plain HTTP is refused off loopback).
    pub tls: crate::tls::TlsMode,
    /// Names and addresses the server certificate is for, besides the
    /// listen address (e.g. `adm1`).
    pub tls_names: Vec<String>,
    /// The URLs of other servers sharing this database: the agents of the
    /// machines this server makes are given them after its own.
    pub peers: Vec<String>,
    /// The port SSH listens on at adm1: open to anyone in adm1's firewall
    /// (other nodes take SSH from the cluster's networks only).
    pub ssh_port: u16,
    /// The S3-compatible bucket the backup store is copied to, if any.
    pub s3: Option<crate::s3::S3Config>,
}

impl Config {
    /// Defaults for a server with its state in `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let state_dir = state_dir.into();
        let apt_dir = crate::apt::default_dir(&state_dir);
        Self {
            listen: format!("127.0.11.5:{}", corral_proto::ports::CONTROL_PLANE),
            state_dir,
            database_url: None,
            network: AddressPlan::default(),
            datacenter: "corral".into(),
            default_provider: Provider::Local,
            providers: vec![Provider::Local],
            max_poll_wait: Duration::from_secs(60),
            heartbeat_stale_after: Duration::from_secs(15),
            retention: crate::cluster::Retention::default(),
            enroll_secret_ttl: crate::cluster::ENROLL_SECRET_TTL,
            workers: None,
            stop_on_signals: true,
            ui_dir: crate::ui::default_dir(),
            run_machines: false,
            agent_bin: crate::provider::local::default_agent_bin(),
            agent_args: Vec::new(),
            lxc_network: default_lxc_network(),
            lxc_bridge: "corralbr0".into(),
            lxc_packages: crate::provider::lxc::default_debs_dir(),
            apt_dir,
            tls: crate::tls::TlsMode::Auto,
            tls_names: vec!["adm1".into()],
            peers: Vec::new(),
            ssh_port: corral_proto::ports::SSH,
            s3: None,
        }
    }

    /// The providers this server accepts nodes of: those configured, the
    /// default, `manual`, and `local`, where adm1 (this host) always lives.
    pub fn accepted_providers(&self) -> Vec<Provider> {
        let mut list = self.providers.clone();
        list.push(Provider::Manual);
        list.push(Provider::Local);
        list.push(self.default_provider);
        list.sort_by_key(|p| p.as_str());
        list.dedup();
        list
    }

    /// Every provider's address plan; adm1 lives in the default provider's.
    pub fn address_plans(&self) -> AddressPlans {
        let mut plans = AddressPlans::new(self.plan_for(self.default_provider));
        plans.set(Provider::Local, self.network);
        plans.set(Provider::Lxc, self.lxc_network);
        plans
    }

    /// The address plan of a provider's nodes.
    pub fn plan_for(&self, provider: Provider) -> AddressPlan {
        match provider {
            Provider::Lxc => self.lxc_network,
            _ => self.network,
        }
    }
}

/// The seed's own network, where LXC containers live by default.
pub fn default_lxc_network() -> AddressPlan {
    AddressPlan::new(std::net::Ipv4Addr::new(192, 168, 11, 0), 24).expect("a valid plan")
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("state directory: {0}")]
    Secrets(#[from] SecretsError),
    #[error("cannot open the state database: {0}")]
    // Not a `source` as well: the message carries it already, and `{:#}`
    // would print it twice.
    Store(StoreError),
    #[error("cannot initialise the cluster: {0}")]
    Init(String),
    #[error("{0}")]
    Provider(#[from] ProviderError),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("offsite backups: {0}")]
    S3(#[from] crate::s3::S3Error),
}

impl From<StoreError> for StartError {
    fn from(e: StoreError) -> Self {
        StartError::Store(e)
    }
}

pub struct Application {
    addr: SocketAddr,
    server: Server,
    cluster: Arc<Cluster>,
    secrets: Secrets,
    database: String,
    machines: Option<Machinery>,
    /// The cluster CA (PEM) clients pin, when the API is served over TLS.
    ca_pem: Option<String>,
}

/// The running machine controller and how to end its loop.
pub struct Machinery {
    pub controller: Arc<MachineController>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Machinery {
    /// Ends the controller's loop once calls in flight have finished;
    /// machines keep running.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartError> {
        // Providers check the host first (and make the LXC bridge, which
        // carries the address this server may listen on): a host that cannot
        // run them is told why before any state, node or machine is made.
        let hosts = Arc::new(Hosts::new(
            config
                .accepted_providers()
                .into_iter()
                .filter(|p| HOST_AGENT_PROVIDERS.contains(p)),
        ));
        // LXC nodes are dual-stack in the cluster's own IPv6 prefix, which
        // the provider needs for its bridge and containers.
        let ipv6 = if config.accepted_providers().contains(&Provider::Lxc) {
            Some(crate::auth::ipv6_prefix(&config.state_dir)?)
        } else {
            None
        };
        let providers = if config.run_machines {
            crate::provider::Reaper::global();
            let providers = machine_providers(&config, &hosts, ipv6);
            for provider in &providers {
                provider.preflight().await?;
            }
            providers
        } else {
            Vec::new()
        };

        // Settings that cannot work are refused before anything starts; a
        // bucket that is missing or unreachable is an event of the copy.
        let offsite = match &config.s3 {
            Some(s3) => Some(Arc::new(crate::cluster::Offsite::new(
                crate::s3::S3Bucket::new(s3)?,
            ))),
            None => None,
        };
        let secrets = Secrets::load_or_create(&config.state_dir)?;
        let url = match &config.database_url {
            Some(url) => url.clone(),
            None => {
                crate::auth::private_database_file(&config.state_dir.join(store::SQLITE_FILE))?;
                store::sqlite_url(&config.state_dir)
            }
        };
        let database = if url.starts_with("sqlite:") {
            "sqlite"
        } else {
            "postgresql"
        }
        .to_string();
        let store = Store::connect(&url).await?;
        let cluster = Cluster::start(
            store,
            ClusterConfig {
                settings: ClusterSettings {
                    addressing: {
                        let mut plans = config.address_plans();
                        if let Some(ula) = ipv6 {
                            plans.set_ipv6(Provider::Lxc, ula);
                        }
                        plans
                    },
                    datacenter: config.datacenter.clone(),
                    gossip_key: secrets.gossip_key.clone(),
                    db_password: secrets.db_password.clone(),
                    replication_password: secrets.replication_password.clone(),
                    consul_management: secrets.consul_management.clone(),
                    ssh_port: config.ssh_port,
                    control_plane_port: config
                        .listen
                        .rsplit_once(':')
                        .and_then(|(_, port)| port.parse().ok())
                        .unwrap_or(corral_proto::ports::CONTROL_PLANE),
                },
                default_provider: config.default_provider,
                providers: config.accepted_providers(),
                max_poll_wait: config.max_poll_wait,
                heartbeat_stale_after: config.heartbeat_stale_after,
                retention: config.retention,
                hosts,
                enroll_secret_ttl: config.enroll_secret_ttl,
                backups: crate::backup_store::BackupStore::new(config.state_dir.join("backups")),
                offsite,
            },
            secrets.clone(),
        )
        .await
        .map_err(|e| StartError::Init(e.to_string()))?;

        let listener = TcpListener::bind(&config.listen).map_err(|source| StartError::Listen {
            addr: config.listen.clone(),
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: config.listen.clone(),
            source,
        })?;
        let tls = if config.tls.resolve(addr.ip())? {
            let mut names = config.tls_names.clone();
            if !addr.ip().is_unspecified() {
                names.push(addr.ip().to_string());
            }
            names.dedup();
            Some(crate::tls::load_or_create(&config.state_dir, &names)?)
        } else {
            tracing::warn!(
                %addr,
                "serving plain HTTP: allowed on a loopback address only, where traffic stays on this host"
            );
            None
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let ca_pem = tls.as_ref().map(|t| t.ca_pem.clone());
        let data = web::Data::from(cluster.clone());
        let ui_dir = config.ui_dir.clone();
        let apt_dir = config.apt_dir.clone();
        let server_urls = web::Data::new(crate::api::ServerUrls::new(
            format!("{scheme}://{addr}"),
            &config.peers,
        ));
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(server_urls.clone())
                .wrap(from_fn(crate::api::json_errors))
                .wrap(from_fn(log_request))
                .wrap(from_fn(crate::api::cors))
                .configure(crate::api::configure)
                .configure(|cfg| crate::apt::configure(cfg, apt_dir.clone()))
                .configure(|cfg| crate::ui::configure(cfg, ui_dir.clone()))
        })
        // Thousands of agents hold long polls; let the burst of connects
        // after a restart queue rather than be refused.
        .backlog(8192)
        .shutdown_timeout(5);
        if let Some(workers) = config.workers {
            server = server.workers(workers);
        }
        if !config.stop_on_signals {
            server = server.disable_signals();
        }
        let server = match tls {
            Some(tls) => server.listen_rustls_0_23(listener, tls.config),
            None => server.listen(listener),
        }
        .map_err(|source| StartError::Listen {
            addr: config.listen.clone(),
            source,
        })?
        .run();
        let machines = (config.run_machines).then(|| {
            // Agents take a comma-separated list of servers.
            let mut urls = vec![format!("{scheme}://{addr}")];
            urls.extend(config.peers.iter().cloned());
            let controller = MachineController::new(providers, urls.join(","), ca_pem.clone());
            let (stop, stop_rx) = tokio::sync::watch::channel(false);
            let source: Arc<dyn NodeSource> = cluster.clone();
            let task = tokio::spawn(run_while_leading(
                controller.clone(),
                source,
                cluster.subscribe_leadership(),
                stop_rx,
            ));
            Machinery {
                controller,
                stop,
                task,
            }
        });
        Ok(Self {
            addr,
            server,
            cluster,
            secrets,
            database,
            machines,
            ca_pem,
        })
    }

    /// The machine controller, when this server makes machines.
    pub fn machines(&self) -> Option<Arc<MachineController>> {
        self.machines.as_ref().map(|m| m.controller.clone())
    }

    /// Takes the machine controller out, for a caller that stops it itself
    /// (`corral up` stops it before stopping the machines).
    pub fn take_machines(&mut self) -> Option<Machinery> {
        self.machines.take()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The cluster CA (PEM) to pin, when the API is served over TLS.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// The admin token, when this start created it (it is shown only once).
    pub fn new_admin_token(&self) -> Option<&str> {
        self.secrets.new_admin_token.as_deref()
    }

    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    pub fn cluster(&self) -> Arc<Cluster> {
        self.cluster.clone()
    }

    /// `sqlite` or `postgresql`.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// A handle that stops the server.
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        if let Some(machines) = self.machines {
            machines.stop().await;
        }
        result
    }
}

/// Runs the machine controller while this server leads (always, on SQLite)
/// until `stop` turns true. Losing the lead stops it as `stop` would: calls
/// in flight finish, nothing new starts; the next leader adopts the machines.
async fn run_while_leading(
    controller: Arc<MachineController>,
    source: Arc<dyn NodeSource>,
    mut leader: tokio::sync::watch::Receiver<bool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            led = leader.wait_for(|leads| *leads) => {
                if led.is_err() {
                    return;
                }
            }
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let (inner_stop, inner_rx) = tokio::sync::watch::channel(false);
        let run = tokio::spawn(controller.clone().run(source.clone(), inner_rx));
        let stopping = tokio::select! {
            _ = leader.wait_for(|leads| !*leads) => false,
            _ = stop.wait_for(|stop| *stop) => true,
        };
        let _ = inner_stop.send(true);
        let _ = run.await;
        if stopping {
            return;
        }
        tracing::warn!("machine controller stopped: this server no longer leads");
    }
}

/// The providers this server makes machines with.
fn machine_providers(
    config: &Config,
    hosts: &Arc<Hosts>,
    ipv6: Option<Ula>,
) -> Vec<Arc<dyn Machines>> {
    let mut providers: Vec<Arc<dyn Machines>> = Vec::new();
    let accepted = config.accepted_providers();
    if accepted.contains(&Provider::Local) {
        providers.push(LocalProvider::new(LocalConfig {
            state_dir: config.state_dir.clone(),
            agent_bin: config.agent_bin.clone(),
            agent_args: config.agent_args.clone(),
        }));
    }
    if accepted.contains(&Provider::Lxc) {
        let plan = config.lxc_network;
        let mut lxc = LxcConfig::new(&config.state_dir, plan.host_address(), plan.prefix_len());
        lxc.bridge = config.lxc_bridge.clone();
        lxc.debs_dir = config.lxc_packages.clone();
        lxc.ipv6 = ipv6;
        providers.push(LxcProvider::new(lxc));
    }
    for kind in hosts.providers() {
        providers.push(RemoteProvider::new(kind, hosts.clone()));
    }
    providers
}

/// One line per request at debug level; server errors at warn.
async fn log_request(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let start = std::time::Instant::now();
    let res = next.call(req).await?;
    let status = res.status().as_u16();
    if let Some(cluster) = res.request().app_data::<web::Data<Cluster>>() {
        cluster.counters().response(status);
    }
    let ms = start.elapsed().as_millis() as u64;
    let (method, path) = (res.request().method(), res.request().path());
    if status >= 500 {
        tracing::warn!(%method, path, status, ms, "request failed");
    } else {
        tracing::debug!(%method, path, status, ms, "request");
    }
    Ok(res)
}
