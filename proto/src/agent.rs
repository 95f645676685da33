//! What agents send the control plane: enrollment and heartbeats carrying
//! the node's observed state.

use serde::{Deserialize, Serialize};

/// `POST /api/v1/agents/enroll`: trade the node's single-use enrollment
/// secret for a token of this node's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    #[cfg_attr(
        feature = "openapi",
        schema(example = "nginx1", pattern = "^[a-z][a-z0-9-]{0,62}$")
    )]
    pub node: String,
    /// The node's enrollment secret: minted when its provider made the
    /// machine, or by an admin (`corral nodes reenroll NODE`).
    pub secret: String,
}

/// `POST /api/v1/nodes/{name}/enroll-secret`: a node's new enrollment
/// secret, shown once (stored hashed). A secret minted before is void.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollSecret {
    pub node: String,
    pub secret: String,
    /// After this the secret is refused; it is used up by one enrollment.
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollResponse {
    pub node: String,
    /// The node's bearer token; shown once, stored hashed. Enrolling again
    /// replaces it.
    pub token: String,
    pub address: String,
    pub role: crate::node::Role,
}

/// How a supervised service is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    Starting,
    Running,
    Stopped,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceStatus {
    /// `consul`, `nginx`, `postgres`, `todomvc`.
    #[cfg_attr(feature = "openapi", schema(max_length = 64))]
    pub name: String,
    pub state: ServiceState,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 128))]
    pub version: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 1024))]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ReplicationRole {
    Primary,
    Replica,
    /// Lost the leader lock and refuses writes until it has rejoined.
    Fenced,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReplicationStatus {
    pub role: ReplicationRole,
    /// On a replica: bytes of WAL it has yet to receive or replay, behind
    /// the primary it follows. On a primary: the largest such lag of its
    /// standbys.
    #[serde(default)]
    pub lag_bytes: Option<u64>,
    /// Like `lag_bytes`, in milliseconds of replay delay.
    #[serde(default)]
    pub lag_ms: Option<u64>,
    #[serde(default)]
    pub timeline: Option<u32>,
    /// `streaming`, `catchup`, `stopped`, `rejoining`, `fenced`, ...
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 32))]
    pub state: Option<String>,
    /// On a primary: the standby its commits wait for (sync and strict).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 64))]
    pub sync_standby: Option<String>,
    /// On a primary in `sync` mode with no synchronous standby: commits do
    /// not wait for one (the fallback to async).
    #[serde(default)]
    pub degraded: bool,
    /// The node holding the Consul leader lock, as this node sees it.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 64))]
    pub leader: Option<String>,
}

impl ReplicationStatus {
    /// A status with only the role known.
    pub fn new(role: ReplicationRole) -> Self {
        Self {
            role,
            lag_bytes: None,
            lag_ms: None,
            timeline: None,
            state: None,
            sync_standby: None,
            degraded: false,
            leader: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MetricsSample {
    pub load1: f64,
    pub mem_used_bytes: u64,
    pub agent_rss_bytes: u64,
}

/// What an agent last saw on its node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ObservedState {
    #[cfg_attr(feature = "openapi", schema(max_length = 64))]
    pub agent_version: String,
    /// The highest order `seq` the agent has applied.
    #[cfg_attr(feature = "openapi", schema(minimum = 0))]
    pub applied_seq: i64,
    /// At most 32 services.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 32))]
    pub services: Vec<ServiceStatus>,
    #[serde(default)]
    pub replication: Option<ReplicationStatus>,
    #[serde(default)]
    pub metrics: Option<MetricsSample>,
}

impl ObservedState {
    pub const MAX_SERVICES: usize = 32;

    /// Checks the bounds the schema states, naming the first one broken.
    pub fn validate(&self) -> Result<(), String> {
        fn bounded(what: &str, value: &str, max: usize) -> Result<(), String> {
            if value.chars().count() > max {
                Err(format!("{what} is longer than {max} characters"))
            } else {
                Ok(())
            }
        }
        bounded("agent_version", &self.agent_version, 64)?;
        if self.applied_seq < 0 {
            return Err("applied_seq must not be negative".into());
        }
        if self.services.len() > Self::MAX_SERVICES {
            return Err(format!(
                "at most {} services may be reported",
                Self::MAX_SERVICES
            ));
        }
        for s in &self.services {
            bounded("service name", &s.name, 64)?;
            if let Some(v) = &s.version {
                bounded("service version", v, 128)?;
            }
            if let Some(d) = &s.detail {
                bounded("service detail", d, 1024)?;
            }
        }
        if let Some(r) = &self.replication {
            if let Some(state) = &r.state {
                bounded("replication state", state, 32)?;
            }
            for (what, v) in [("sync_standby", &r.sync_standby), ("leader", &r.leader)] {
                if let Some(v) = v {
                    bounded(what, v, 64)?;
                }
            }
        }
        if let Some(m) = &self.metrics
            && !m.load1.is_finite()
        {
            return Err("metrics.load1 must be a finite number".into());
        }
        Ok(())
    }
}

/// `POST /api/v1/agents/{node}/heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub observed: ObservedState,
}
