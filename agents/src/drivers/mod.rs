//! The drivers: one per kind of service a node runs, each making one kind of
//! work order true on top of the [`Host`] process layer and the local Consul
//! agent. Applying an order twice is a no-op; a newer order of a kind
//! replaces the older one.

pub mod backup;
pub mod consul;
pub mod dcs;
pub mod firewall;
pub mod ha;
#[cfg(test)]
mod ha_sim;
pub mod leader;
pub mod nginx;
pub mod postgres;
pub mod webapp;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::consul_api::{ConsulApi, ConsulError};
use crate::host::{Host, HostError};

/// The programs the drivers run.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub consul: PathBuf,
    pub nginx: PathBuf,
    pub todomvc: PathBuf,
    /// Directory of `postgres`, `initdb`, `psql`, `pg_basebackup`.
    pub pg_bin: PathBuf,
    /// This agent's own executable (Consul runs `check-postgres` from it).
    pub agent: PathBuf,
}

/// What every driver needs to know about its node.
pub struct NodeContext {
    pub node: String,
    pub address: std::net::IpAddr,
    pub state_dir: PathBuf,
    pub bins: Binaries,
    /// nginx listens here instead of on the order's port.
    pub nginx_port: Option<u16>,
    pub host: Arc<dyn Host>,
    pub consul: ConsulApi,
    /// How long an order waits for a service it started to answer (Consul's
    /// HTTP API, the webapp's health check) before it reports; zero in unit
    /// tests, where nothing really starts.
    pub start_wait: std::time::Duration,
    /// Whether firewall orders are loaded into this machine's nftables
    /// (`--firewall on`) or only written out.
    pub firewall: bool,
}

impl NodeContext {
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.state_dir.join(rel)
    }

    /// A node for drivers' unit tests: `host` records what they run, Consul
    /// at `address` is unreachable, services count as started at once.
    #[cfg(test)]
    pub fn for_test(
        node: &str,
        address: std::net::Ipv4Addr,
        state_dir: &Path,
        host: Arc<dyn Host>,
        firewall: bool,
    ) -> NodeContext {
        NodeContext {
            node: node.into(),
            address: address.into(),
            state_dir: state_dir.to_path_buf(),
            bins: Binaries {
                consul: "consul".into(),
                nginx: "nginx".into(),
                todomvc: "todomvc".into(),
                pg_bin: "/pg".into(),
                agent: "corral-agent".into(),
            },
            nginx_port: None,
            host,
            consul: ConsulApi::new(&address.to_string()),
            start_wait: std::time::Duration::ZERO,
            firewall,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Consul(#[from] ConsulError),
    #[error(transparent)]
    Dcs(#[from] dcs::DcsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
}

impl DriverError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
        let what = what.into();
        move |source| DriverError::Io { what, source }
    }
}

/// Creates `dir` (and parents).
pub fn mkdir(dir: &Path) -> Result<(), DriverError> {
    std::fs::create_dir_all(dir).map_err(DriverError::io(format!("creating {}", dir.display())))
}

/// Writes `content` to `path` unless it already holds exactly that; says
/// whether it changed.
pub fn write_if_changed(path: &Path, content: &str, mode: u32) -> Result<bool, DriverError> {
    if std::fs::read_to_string(path).is_ok_and(|c| c == content) {
        return Ok(false);
    }
    crate::durable::write_atomic(path, content.as_bytes(), mode)
        .map_err(DriverError::io(format!("writing {}", path.display())))?;
    Ok(true)
}
