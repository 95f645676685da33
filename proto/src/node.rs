//! Nodes: the machines (or loopback addresses) of the cluster, their roles,
//! where they come from and where they are in their life.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::agent::ObservedState;

/// What a node is for. Names follow the seed: `nginx1..`, `pg1..`, `adm1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// nginx load balancer + todomvc webapp.
    Web,
    /// PostgreSQL primary or hot standby.
    Db,
    /// The admin node: control plane and Consul UI.
    Adm,
    /// A PostgreSQL instance restored from a backup (`POST /db/restore`
    /// with `new_node`): a node of the cluster (agent, Consul client,
    /// firewall) whose database never joins replication or failover.
    Restore,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Web, Role::Db, Role::Adm, Role::Restore];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Web => "web",
            Role::Db => "db",
            Role::Adm => "adm",
            Role::Restore => "restore",
        }
    }

    /// The prefix of this role's node names (`nginx` for `nginx1`).
    pub fn name_prefix(self) -> &'static str {
        match self {
            Role::Web => "nginx",
            Role::Db => "pg",
            Role::Adm => "adm",
            Role::Restore => "restore",
        }
    }

    /// The role and index of a node name that follows the naming scheme.
    pub fn parse_node_name(name: &str) -> Option<(Role, u32)> {
        Role::ALL.into_iter().find_map(|role| {
            let digits = name.strip_prefix(role.name_prefix())?;
            if digits.is_empty()
                || digits.starts_with('0')
                || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            digits.parse().ok().map(|index| (role, index))
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "web" => Ok(Role::Web),
            "db" => Ok(Role::Db),
            "adm" => Ok(Role::Adm),
            "restore" => Ok(Role::Restore),
            other => Err(format!(
                "unknown role {other:?} (expected web, db, adm or restore)"
            )),
        }
    }
}

/// Where a node's machine comes from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Real processes on a loopback address of this machine.
    #[default]
    Local,
    /// A Debian LXC container.
    Lxc,
    /// A VirtualBox VM driven through VBoxManage.
    Virtualbox,
    /// Installed by hand; its agent enrolls with a secret an admin mints
    /// (`corral nodes reenroll NODE`).
    Manual,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Local => "local",
            Provider::Lxc => "lxc",
            Provider::Virtualbox => "virtualbox",
            Provider::Manual => "manual",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Provider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Provider::Local),
            "lxc" => Ok(Provider::Lxc),
            "virtualbox" => Ok(Provider::Virtualbox),
            "manual" => Ok(Provider::Manual),
            other => Err(format!(
                "unknown provider {other:?} (expected local, lxc, virtualbox or manual)"
            )),
        }
    }
}

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Allocated; its agent has not enrolled yet.
    Provisioning,
    /// Its agent has enrolled and pulls orders.
    Active,
    /// Being taken out: it was told to drain and is removed once it has.
    Draining,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Provisioning => "provisioning",
            NodeState::Active => "active",
            NodeState::Draining => "draining",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodeState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "provisioning" => Ok(NodeState::Provisioning),
            "active" => Ok(NodeState::Active),
            "draining" => Ok(NodeState::Draining),
            other => Err(format!("unknown node state {other:?}")),
        }
    }
}

/// How recently the node's agent was heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum NodeHealth {
    /// No heartbeat yet.
    Unknown,
    /// A heartbeat arrived within the last few intervals.
    Healthy,
    /// Heartbeats stopped: the agent or its machine is down or cut off.
    Stale,
}

/// A node as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Node {
    #[cfg_attr(feature = "openapi", schema(example = "nginx1"))]
    pub name: String,
    pub role: Role,
    #[cfg_attr(feature = "openapi", schema(example = "127.0.11.21"))]
    pub address: String,
    pub provider: Provider,
    pub state: NodeState,
    pub health: NodeHealth,
    /// The highest order sequence number filed for this node.
    pub last_seq: i64,
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// What the agent last reported about its node.
    pub observed: Option<ObservedState>,
    pub created_at: DateTime<Utc>,
}

/// The roles nodes can be added with: there is exactly one `adm` node,
/// made when the control plane first starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ScalableRole {
    Web,
    Db,
}

impl From<ScalableRole> for Role {
    fn from(r: ScalableRole) -> Self {
        match r {
            ScalableRole::Web => Role::Web,
            ScalableRole::Db => Role::Db,
        }
    }
}

impl FromStr for ScalableRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "web" => Ok(ScalableRole::Web),
            "db" => Ok(ScalableRole::Db),
            "adm" => Err("there is exactly one adm node (adm1); add web or db nodes".into()),
            other => Err(format!("unknown role {other:?} (expected web or db)")),
        }
    }
}

impl fmt::Display for ScalableRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Role::from(*self).fmt(f)
    }
}

/// `POST /api/v1/nodes`: the server picks the next name and address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateNode {
    pub role: ScalableRole,
    /// Defaults to the server's `--provider`.
    #[serde(default)]
    pub provider: Option<Provider>,
}

/// Node names are DNS labels: lower-case letters, digits and `-`, starting
/// with a letter, at most 63 characters.
pub fn validate_node_name(name: &str) -> Result<(), String> {
    let ok_len = !name.is_empty() && name.len() <= 63;
    let mut bytes = name.bytes();
    let ok_first = bytes.next().is_some_and(|b| b.is_ascii_lowercase());
    let ok_rest = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok_len && ok_first && ok_rest && !name.ends_with('-') {
        Ok(())
    } else {
        Err(format!(
            "invalid node name {name:?}: use 1-63 lower-case letters, digits and '-', starting with a letter"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_parse_into_role_and_index() {
        assert_eq!(Role::parse_node_name("nginx12"), Some((Role::Web, 12)));
        assert_eq!(Role::parse_node_name("pg1"), Some((Role::Db, 1)));
        assert_eq!(Role::parse_node_name("adm1"), Some((Role::Adm, 1)));
        assert_eq!(Role::parse_node_name("restore3"), Some((Role::Restore, 3)));
        assert_eq!(Role::parse_node_name("nginx"), None);
        assert_eq!(Role::parse_node_name("nginx01"), None);
        assert_eq!(Role::parse_node_name("web1"), None);
    }

    #[test]
    fn node_name_validation_rejects_non_dns_labels() {
        assert!(validate_node_name("nginx1").is_ok());
        assert!(validate_node_name("my-db-2").is_ok());
        for bad in ["", "1abc", "Nginx", "a_b", "a-", &"a".repeat(64), "ä"] {
            assert!(validate_node_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
