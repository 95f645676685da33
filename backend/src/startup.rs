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
use crate::reconcile::{AddressPlan, ClusterSettings};
use crate::service::{Cluster, ClusterConfig};
use crate::store::{self, Store, StoreError};

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
    /// HTTP worker threads; one per core when unset.
    pub workers: Option<usize>,
    /// The built web UI served at `/` (`frontend/dist`); none: `/` says how
    /// to build it.
    pub ui_dir: Option<PathBuf>,
    /// corral's apt repository served at `/apt/` (`scripts/package.sh`
    /// builds it); none: not served.
    pub apt_dir: Option<PathBuf>,
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
            max_poll_wait: Duration::from_secs(60),
            heartbeat_stale_after: Duration::from_secs(15),
            workers: None,
            ui_dir: crate::ui::default_dir(),
            apt_dir,
        }
    }
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
    Store(#[from] StoreError),
    #[error("cannot initialise the cluster: {0}")]
    Init(String),
}

pub struct Application {
    addr: SocketAddr,
    server: Server,
    cluster: Arc<Cluster>,
    secrets: Secrets,
    database: String,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let secrets = Secrets::load_or_create(&config.state_dir)?;
        let url = config
            .database_url
            .clone()
            .unwrap_or_else(|| store::sqlite_url(&config.state_dir));
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
                    addressing: config.network,
                    datacenter: config.datacenter.clone(),
                    gossip_key: secrets.gossip_key.clone(),
                    db_password: secrets.db_password.clone(),
                },
                default_provider: config.default_provider,
                max_poll_wait: config.max_poll_wait,
                heartbeat_stale_after: config.heartbeat_stale_after,
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
        let data = web::Data::from(cluster.clone());
        let logs = web::Data::new(crate::api::ServiceLogs::default());
        let ui_dir = config.ui_dir.clone();
        let apt_dir = config.apt_dir.clone();
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(logs.clone())
                .wrap(from_fn(crate::api::json_errors))
                .wrap(from_fn(log_request))
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
        let server = server
            .listen(listener)
            .map_err(|source| StartError::Listen {
                addr: config.listen.clone(),
                source,
            })?
            .run();
        Ok(Self {
            addr,
            server,
            cluster,
            secrets,
            database,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
        self.server.await
    }
}

/// One line per request at debug level; server errors at warn.
async fn log_request(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let start = std::time::Instant::now();
    let res = next.call(req).await?;
    let status = res.status().as_u16();
    let ms = start.elapsed().as_millis() as u64;
    let (method, path) = (res.request().method(), res.request().path());
    if status >= 500 {
        tracing::warn!(%method, path, status, ms, "request failed");
    } else {
        tracing::debug!(%method, path, status, ms, "request");
    }
    Ok(res)
}
