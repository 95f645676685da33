//! Where nodes come from. A provider turns a node record of the control
//! plane into a machine running a corral-agent for it, and takes the machine
//! away once the node is gone. Every provider is one implementation of
//! [`Machines`]; the one [`MachineController`] the server starts drives them
//! all, and holds once the logic of noticing dead machines, backing off,
//! adopting what already runs and destroying what was removed.
//!
//! - [`local`]: each node is a state directory and a loopback address on this
//!   machine, with one `corral-agent` process (the default).
//! - [`lxc`]: each node is a Debian LXC container on a host bridge, an
//!   overlayfs clone of a base image, running the project's packages.
//! - [`remote`]: machines a host agent makes on another host (VirtualBox),
//!   through machine orders it long-polls.

pub mod command;
pub mod controller;
pub mod local;
pub mod lxc;
pub mod reaper;
pub mod remote;

use async_trait::async_trait;
use corral_proto::{Node, Provider};

pub use controller::{MachineController, ProviderEvent};
pub use local::{LocalConfig, LocalProvider};
pub use lxc::{LxcConfig, LxcProvider};
pub use reaper::Reaper;
pub use remote::RemoteProvider;

/// What one node's agent needs to find and join the control plane.
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// URL agents reach the control plane at; several, comma-separated,
    /// where servers share one database (the agent takes such a list).
    pub server_url: String,
    /// The node's enrollment secret, minted for this `ensure`: single-use,
    /// expiring, and for this node only. It goes into the machine and
    /// nowhere else.
    pub secret: String,
    /// The cluster CA (PEM) the agent pins, when the server speaks TLS.
    pub ca_pem: Option<String>,
}

/// What a provider knows of one of its machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// The node the machine is for.
    pub name: String,
    pub state: MachineState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineState {
    /// Up, with its agent (or the init that runs it).
    Running,
    /// Exists, keeps its data, runs nothing: `ensure` starts it again.
    Stopped,
    /// Exists but hangs (a frozen container): left alone, as a hung VM
    /// would be; the data plane's own failover handles its services.
    Frozen,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider cannot work on this host: a tool, a permission or a
    /// network is missing. Nothing was created.
    #[error("the {provider} provider cannot run here: {reason}")]
    Unavailable { provider: Provider, reason: String },
    /// Refused before anything was created (a name or address taken).
    #[error("{0}")]
    Refused(String),
    /// A command failed: its stderr is in the message.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{0}")]
    Other(String),
}

/// One source of machines. Every method is idempotent: the controller calls
/// `ensure` whenever a node's machine is not running and `destroy` whenever
/// a machine has no node, and may call either again after a crash.
#[async_trait]
pub trait Machines: Send + Sync + 'static {
    fn kind(&self) -> Provider;

    /// Checks that this host can run the provider at all (tools, root, the
    /// network), before the first machine is made, so a cluster is never
    /// half made.
    async fn preflight(&self) -> Result<(), ProviderError>;

    /// The machines this provider holds for this cluster, whatever their
    /// state. Machines it did not make are never listed.
    async fn inventory(&self) -> Result<Vec<Machine>, ProviderError>;

    /// Makes `node`'s machine exist and run its agent: creates it, or starts
    /// it again, or adopts it when it already runs. Says what it did, with
    /// the time its steps took.
    async fn ensure(&self, node: &Node, boot: &BootConfig) -> Result<String, ProviderError>;

    /// Stops a machine and keeps its data (`corral down`).
    async fn stop(&self, name: &str) -> Result<(), ProviderError>;

    /// Stops a machine and deletes it with its data.
    async fn destroy(&self, name: &str) -> Result<(), ProviderError>;
}
