//! The topology spec: the desired shape of the cluster that the reconciler
//! turns into nodes and work orders.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How nginx spreads requests over the live webapps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    LeastConn,
    /// `hash $request_uri consistent`: the same URI goes to the same webapp.
    UriHash,
}

impl LbPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            LbPolicy::RoundRobin => "round_robin",
            LbPolicy::LeastConn => "least_conn",
            LbPolicy::UriHash => "uri_hash",
        }
    }
}

impl fmt::Display for LbPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LbPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round_robin" => Ok(LbPolicy::RoundRobin),
            "least_conn" => Ok(LbPolicy::LeastConn),
            "uri_hash" => Ok(LbPolicy::UriHash),
            other => Err(format!(
                "unknown load-balancing policy {other:?} (expected round_robin, least_conn or uri_hash)"
            )),
        }
    }
}

/// How the PostgreSQL primary waits for its standbys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReplicationMode {
    /// Commits return before a standby has the WAL (the seed's setup).
    #[default]
    Async,
    /// Commits wait for one synchronous standby; when none is connected the
    /// primary falls back to asynchronous commits and says so (like
    /// Patroni's `synchronous_mode`). An acknowledged write survives a
    /// failover.
    Sync,
    /// Like `sync`, but never falls back: with no synchronous standby,
    /// commits wait (like Patroni's `synchronous_mode_strict`).
    Strict,
}

impl ReplicationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationMode::Async => "async",
            ReplicationMode::Sync => "sync",
            ReplicationMode::Strict => "strict",
        }
    }

    /// Whether commits wait for a standby (sync or strict).
    pub fn is_synchronous(self) -> bool {
        matches!(self, ReplicationMode::Sync | ReplicationMode::Strict)
    }
}

impl fmt::Display for ReplicationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReplicationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "async" => Ok(ReplicationMode::Async),
            "sync" => Ok(ReplicationMode::Sync),
            "strict" => Ok(ReplicationMode::Strict),
            other => Err(format!(
                "unknown replication mode {other:?} (expected async, sync or strict)"
            )),
        }
    }
}

/// The most nodes of one role a topology may ask for.
pub const MAX_NODES_PER_ROLE: u32 = 20_000;

/// The desired shape of the cluster. There is always exactly one `adm` node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Topology {
    /// Desired number of web nodes (nginx + todomvc).
    pub web: u32,
    /// Desired number of db nodes (PostgreSQL primary + standbys).
    pub db: u32,
    pub lb_policy: LbPolicy,
    pub replication: ReplicationMode,
    /// Daily base backups and how many are kept; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSchedule>,
    pub updated_at: DateTime<Utc>,
}

/// When base backups are taken and how many are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BackupSchedule {
    /// Time of day, `HH:MM` in UTC, at which a backup is taken every day.
    #[cfg_attr(
        feature = "openapi",
        schema(example = "03:00", pattern = "^[0-2][0-9]:[0-5][0-9]$")
    )]
    pub schedule: String,
    /// How many finished backups to keep (1-365); older ones and the WAL
    /// only they need are deleted.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 365, example = 7))]
    pub keep: u32,
}

/// The most backups a schedule may keep.
pub const MAX_BACKUPS_KEPT: u32 = 365;

impl BackupSchedule {
    pub fn validate(&self) -> Result<crate::backup::DailyAt, String> {
        let at = crate::backup::DailyAt::parse(&self.schedule)?;
        if !(1..=MAX_BACKUPS_KEPT).contains(&self.keep) {
            return Err(format!(
                "backup keep {} is out of range 1..={MAX_BACKUPS_KEPT}",
                self.keep
            ));
        }
        Ok(at)
    }
}

/// `PUT /api/v1/topology`: the whole desired spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TopologyUpdate {
    #[cfg_attr(feature = "openapi", schema(maximum = 20000, example = 2))]
    pub web: u32,
    #[cfg_attr(feature = "openapi", schema(maximum = 20000, example = 2))]
    pub db: u32,
    pub lb_policy: LbPolicy,
    pub replication: ReplicationMode,
    /// Daily base backups (`{"schedule": "03:00", "keep": 7}`); absent: none
    /// scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSchedule>,
}

impl TopologyUpdate {
    /// The seed cluster: two web nodes, a primary and a standby.
    pub fn seed() -> Self {
        Self {
            web: 2,
            db: 2,
            lb_policy: LbPolicy::RoundRobin,
            replication: ReplicationMode::Async,
            backup: None,
        }
    }

    /// Checks the rules a spec must follow, naming the first it breaks.
    pub fn validate(&self) -> Result<(), String> {
        for (role, count) in [("web", self.web), ("db", self.db)] {
            if count > MAX_NODES_PER_ROLE {
                return Err(format!(
                    "{role}: {count} nodes asked, at most {MAX_NODES_PER_ROLE} allowed"
                ));
            }
        }
        if self.replication.is_synchronous() && self.db < 2 {
            return Err(
                "synchronous replication needs at least 2 db nodes: with no standby every commit would wait forever"
                    .into(),
            );
        }
        if let Some(b) = &self.backup {
            b.validate()?;
        }
        Ok(())
    }
}

/// The answer to a topology change: the new spec and what was done about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TopologyChange {
    pub topology: Topology,
    /// Nodes created to reach the spec.
    pub created: Vec<String>,
    /// Nodes told to drain to reach the spec.
    pub draining: Vec<String>,
    /// Work orders filed, over all nodes.
    pub orders_filed: u64,
}

impl From<&Topology> for TopologyUpdate {
    fn from(t: &Topology) -> Self {
        Self {
            web: t.web,
            db: t.db,
            lb_policy: t.lb_policy,
            replication: t.replication,
            backup: t.backup.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_replication_without_a_standby_is_refused() {
        let mut spec = TopologyUpdate::seed();
        spec.replication = ReplicationMode::Sync;
        assert!(spec.validate().is_ok());
        spec.db = 1;
        assert!(spec.validate().unwrap_err().contains("at least 2 db"));
    }

    #[test]
    fn oversized_topology_is_refused() {
        let mut spec = TopologyUpdate::seed();
        spec.web = MAX_NODES_PER_ROLE + 1;
        assert!(spec.validate().is_err());
    }

    #[test]
    fn a_backup_schedule_that_does_not_parse_is_refused() {
        let mut spec = TopologyUpdate::seed();
        spec.backup = Some(BackupSchedule {
            schedule: "03:00".into(),
            keep: 7,
        });
        assert!(spec.validate().is_ok());
        spec.backup = Some(BackupSchedule {
            schedule: "3am".into(),
            keep: 7,
        });
        assert!(spec.validate().unwrap_err().contains("HH:MM"));
        spec.backup = Some(BackupSchedule {
            schedule: "03:00".into(),
            keep: 0,
        });
        assert!(spec.validate().unwrap_err().contains("keep"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let body = r#"{"web":1,"db":1,"lb_policy":"round_robin","replication":"async","x":1}"#;
        assert!(serde_json::from_str::<TopologyUpdate>(body).is_err());
    }
}

/// The control-plane servers sharing this cluster's state, as clients reach
/// them (`GET /api/v1/servers`): the one answering first, then its peers.
/// The web UI moves to the next when the one it talks to stops answering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Servers {
    /// Base URLs, e.g. `https://192.168.11.5:7070`.
    pub servers: Vec<String>,
}
