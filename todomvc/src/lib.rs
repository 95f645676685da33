//! The TodoMVC webapp corral deploys to every web node: the Todo-Backend
//! REST API and the TodoMVC page on PostgreSQL, writing to the primary,
//! reading from replicas that have caught up with the client's own writes,
//! and finding the primary again by itself when it fails or moves.
//!
//! `main` and the tests share start-up: [`Application::build`] binds the
//! listener (port 0 in tests) and starts the prober; [`Application::run`]
//! serves until SIGTERM (or a stop through [`Application::handle`]).

pub mod api;
pub mod cluster;
pub mod coalesce;
pub mod config;
pub mod discovery;
pub mod error;
mod health;
mod http;
pub mod list_cache;
pub mod logging;
pub mod lsn;
pub mod metrics;
mod page;
pub mod store;
pub mod todo;

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::dev::{Server, ServerHandle};
use actix_web::http::header::HeaderValue;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};

use crate::cluster::{Cluster, DbSettings, Prober};
use crate::config::{Config, ConfigError};
use crate::discovery::Discovery;

/// What every handler shares.
pub struct AppState {
    pub cluster: Cluster,
    pub node: Arc<str>,
    served_by: HeaderValue,
    /// What `/metrics` reports.
    pub metrics: metrics::RequestMetrics,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the node name {0:?} cannot be sent in a header")]
    NodeName(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Application {
    server: Server,
    addr: SocketAddr,
    cluster: Cluster,
    prober: Prober,
}

impl Application {
    /// Binds the listener and starts discovery and probing; serving starts
    /// with [`Application::run`]. Must be called inside a Tokio runtime.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let node = config.node_name();
        let served_by =
            HeaderValue::from_str(&node).map_err(|_| StartError::NodeName(node.clone()))?;
        let discovery = match &config.consul {
            Some(url) => {
                Discovery::consul(url, &config.consul_service, config.consul_token.as_deref())
            }
            None => Discovery::fixed(&config.db_primary, &config.db_replica),
        };
        let settings = DbSettings {
            name: config.db_name.clone(),
            user: config.db_user.clone(),
            password: config.db_password.clone(),
            pool_size: config.db_pool_size,
            connect_timeout: config.connect_timeout(),
            statement_timeout: config.statement_timeout(),
            probe_interval: config.probe_interval(),
            list_cache_max_age: config.list_cache_max_age(),
        };
        let (cluster, prober) = Cluster::start(settings, discovery);
        let state = web::Data::new(AppState {
            cluster: cluster.clone(),
            node: node.clone().into(),
            served_by,
            metrics: metrics::RequestMetrics::default(),
        });

        let listen_error = |source| StartError::Listen {
            addr: config.listen,
            source,
        };
        let listener = std::net::TcpListener::bind(config.listen).map_err(listen_error)?;
        let addr = listener.local_addr().map_err(listen_error)?;
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .wrap(from_fn(http::around_request))
                .configure(api::routes)
                .configure(page::routes)
                .route("/healthz", web::get().to(health::healthz))
                .route("/metrics", web::get().to(metrics::metrics))
                .default_service(web::to(http::not_found))
        })
        .shutdown_timeout(config.shutdown_timeout_secs)
        .listen(listener)
        .map_err(listen_error)?;
        for also in &config.also_listen {
            let listen_error = |source| StartError::Listen {
                addr: *also,
                source,
            };
            let listener = std::net::TcpListener::bind(also).map_err(listen_error)?;
            server = server.listen(listener).map_err(listen_error)?;
        }
        let workers = config
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        server = server.workers(workers);
        if config.ignore_signals {
            server = server.disable_signals();
        }
        tracing::info!(%addr, %node, workers, "listening");
        Ok(Application {
            server: server.run(),
            addr,
            cluster,
            prober,
        })
    }

    /// Where it listens (the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Serves until stopped; after SIGTERM, in-flight requests finish (up to
    /// `--shutdown-timeout`) before this returns.
    pub async fn run(self) -> std::io::Result<()> {
        let result = self.server.await;
        self.prober.stop();
        tracing::info!("stopped");
        result
    }
}
