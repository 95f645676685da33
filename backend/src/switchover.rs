//! The rules a planned change of PostgreSQL primary must pass before an order
//! is filed: a pure function of the db nodes as their agents last reported
//! them, so every refusal is decided (and tested) without a database.

use corral_proto::{NodeState, ReplicationRole, ReplicationStatus, Role};

/// How far behind (bytes of WAL) the target may be when a switchover is
/// asked for; the agent lets it catch up fully before promoting it.
pub const MAX_LAG_BYTES: u64 = 16 * 1024 * 1024;

/// A node as the switchover rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Standing {
    pub name: String,
    pub role: Role,
    pub state: NodeState,
    /// Its last heartbeat is recent (the node's health is `healthy`).
    pub fresh: bool,
    pub replication: Option<ReplicationStatus>,
}

/// Why a switchover is refused; each has its own HTTP status and code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no node named {0}")]
    UnknownNode(String),
    #[error("{name} is a {role} node; only a db node can become primary")]
    NotDb { name: String, role: Role },
    #[error("{name} is draining: it is leaving the cluster and cannot become primary")]
    Leaving { name: String },
    #[error("no db node with a recent heartbeat reports itself primary{}", stale_note(.stale))]
    NoPrimary { stale: Vec<String> },
    #[error(
        "{} all report themselves primary; refusing to pick one (wait for the next heartbeats or fencing)",
        .0.join(", ")
    )]
    SeveralPrimaries(Vec<String>),
    #[error("{0} is already the primary")]
    AlreadyPrimary(String),
    #[error(
        "{0} has not sent a heartbeat recently; only a standby known to be streaming can be promoted"
    )]
    Stale(String),
    #[error("{name} is not a standby (it reports {})", describe_role(.role.as_ref()))]
    NotStandby {
        name: String,
        role: Option<ReplicationRole>,
    },
    #[error("{name} is {} behind the primary; at most {max} bytes allowed", describe_lag(*.lag_bytes))]
    NotCaughtUp {
        name: String,
        lag_bytes: Option<u64>,
        max: u64,
    },
}

impl Refusal {
    /// The machine-readable code of a refusal answered with 409.
    pub fn conflict_code(&self) -> &'static str {
        match self {
            Refusal::UnknownNode(_) | Refusal::NotDb { .. } => "conflict",
            Refusal::Leaving { .. } => "node_leaving",
            Refusal::NoPrimary { .. } | Refusal::SeveralPrimaries(_) => "no_primary",
            Refusal::AlreadyPrimary(_) => "already_primary",
            Refusal::Stale(_) | Refusal::NotStandby { .. } => "not_a_standby",
            Refusal::NotCaughtUp { .. } => "not_caught_up",
        }
    }
}

fn stale_note(stale: &[String]) -> String {
    if stale.is_empty() {
        String::new()
    } else {
        format!(
            " ({} last said primary, but has not been heard from recently)",
            stale.join(", ")
        )
    }
}

fn describe_role(role: Option<&ReplicationRole>) -> &'static str {
    match role {
        None => "no replication role: PostgreSQL is not running there yet",
        Some(ReplicationRole::Primary) => "primary",
        Some(ReplicationRole::Replica) => "replica",
        Some(ReplicationRole::Fenced) => "fenced",
    }
}

fn describe_lag(lag: Option<u64>) -> String {
    match lag {
        Some(bytes) => format!("{bytes} bytes"),
        None => "an unknown number of bytes".into(),
    }
}

/// Checks that `to` may take over from the current primary and names that
/// primary, which is where the order goes.
///
/// `nodes` holds every db node and, if it is of another role, the node
/// named `to`. The primary is the one db node with a recent heartbeat that
/// reports `primary`: a stale report may predate a failover, and with two
/// claims nobody can say which is real.
pub fn check(to: &str, nodes: &[Standing], max_lag_bytes: u64) -> Result<String, Refusal> {
    let target = nodes
        .iter()
        .find(|n| n.name == to)
        .ok_or_else(|| Refusal::UnknownNode(to.to_string()))?;
    if target.role != Role::Db {
        return Err(Refusal::NotDb {
            name: to.to_string(),
            role: target.role,
        });
    }
    if target.state == NodeState::Draining {
        return Err(Refusal::Leaving {
            name: to.to_string(),
        });
    }
    let claims = |fresh: bool| -> Vec<String> {
        nodes
            .iter()
            .filter(|n| n.role == Role::Db && n.fresh == fresh)
            .filter(|n| {
                n.replication
                    .as_ref()
                    .is_some_and(|r| r.role == ReplicationRole::Primary)
            })
            .map(|n| n.name.clone())
            .collect()
    };
    let primaries = claims(true);
    let primary = match primaries.as_slice() {
        [] => {
            return Err(Refusal::NoPrimary {
                stale: claims(false),
            });
        }
        [one] => one.clone(),
        _ => return Err(Refusal::SeveralPrimaries(primaries)),
    };
    if primary == to {
        return Err(Refusal::AlreadyPrimary(primary));
    }
    if !target.fresh {
        return Err(Refusal::Stale(to.to_string()));
    }
    let replication = target.replication.as_ref();
    if replication.map(|r| r.role) != Some(ReplicationRole::Replica) {
        return Err(Refusal::NotStandby {
            name: to.to_string(),
            role: replication.map(|r| r.role),
        });
    }
    let lag_bytes = replication.and_then(|r| r.lag_bytes);
    if lag_bytes.is_none_or(|lag| lag > max_lag_bytes) {
        return Err(Refusal::NotCaughtUp {
            name: to.to_string(),
            lag_bytes,
            max: max_lag_bytes,
        });
    }
    Ok(primary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(name: &str, role: Option<ReplicationRole>, lag: Option<u64>) -> Standing {
        Standing {
            name: name.into(),
            role: Role::Db,
            state: NodeState::Active,
            fresh: true,
            replication: role.map(|role| ReplicationStatus {
                lag_bytes: lag,
                ..ReplicationStatus::new(role)
            }),
        }
    }

    fn pair() -> Vec<Standing> {
        vec![
            db("pg1", Some(ReplicationRole::Primary), Some(0)),
            db("pg2", Some(ReplicationRole::Replica), Some(1024)),
        ]
    }

    #[test]
    fn a_caught_up_streaming_standby_takes_over_from_the_one_primary() {
        assert_eq!(check("pg2", &pair(), MAX_LAG_BYTES), Ok("pg1".into()));
    }

    #[test]
    fn the_target_must_exist_and_be_a_db_node_that_stays() {
        let mut nodes = pair();
        assert_eq!(
            check("pg9", &nodes, MAX_LAG_BYTES),
            Err(Refusal::UnknownNode("pg9".into()))
        );
        nodes.push(Standing {
            role: Role::Web,
            ..db("nginx1", None, None)
        });
        assert!(matches!(
            check("nginx1", &nodes, MAX_LAG_BYTES),
            Err(Refusal::NotDb { .. })
        ));
        nodes[1].state = NodeState::Draining;
        assert!(matches!(
            check("pg2", &nodes, MAX_LAG_BYTES),
            Err(Refusal::Leaving { .. })
        ));
    }

    #[test]
    fn without_exactly_one_live_primary_nothing_is_filed() {
        let mut nodes = pair();
        nodes[0].fresh = false;
        let refusal = check("pg2", &nodes, MAX_LAG_BYTES).unwrap_err();
        assert_eq!(refusal.conflict_code(), "no_primary");
        assert!(
            refusal.to_string().contains("pg1 last said primary"),
            "{refusal}"
        );
        nodes[0].fresh = true;
        nodes.push(db("pg3", Some(ReplicationRole::Primary), None));
        assert_eq!(
            check("pg2", &nodes, MAX_LAG_BYTES),
            Err(Refusal::SeveralPrimaries(vec!["pg1".into(), "pg3".into()]))
        );
    }

    #[test]
    fn the_primary_itself_or_a_node_that_is_no_streaming_standby_is_refused() {
        let mut nodes = pair();
        assert_eq!(
            check("pg1", &nodes, MAX_LAG_BYTES),
            Err(Refusal::AlreadyPrimary("pg1".into()))
        );
        nodes[1].fresh = false;
        assert_eq!(
            check("pg2", &nodes, MAX_LAG_BYTES),
            Err(Refusal::Stale("pg2".into()))
        );
        nodes[1] = db("pg2", Some(ReplicationRole::Fenced), Some(0));
        assert_eq!(
            check("pg2", &nodes, MAX_LAG_BYTES).map_err(|r| r.conflict_code()),
            Err("not_a_standby")
        );
        nodes[1] = db("pg2", None, None);
        assert!(matches!(
            check("pg2", &nodes, MAX_LAG_BYTES),
            Err(Refusal::NotStandby { role: None, .. })
        ));
    }

    #[test]
    fn a_standby_too_far_behind_or_with_no_lag_figure_is_not_caught_up() {
        let mut nodes = pair();
        nodes[1] = db(
            "pg2",
            Some(ReplicationRole::Replica),
            Some(MAX_LAG_BYTES + 1),
        );
        let refusal = check("pg2", &nodes, MAX_LAG_BYTES).unwrap_err();
        assert_eq!(refusal.conflict_code(), "not_caught_up");
        assert!(
            refusal
                .to_string()
                .contains(&format!("{} bytes", MAX_LAG_BYTES + 1)),
            "{refusal}"
        );
        nodes[1] = db("pg2", Some(ReplicationRole::Replica), Some(MAX_LAG_BYTES));
        assert!(check("pg2", &nodes, MAX_LAG_BYTES).is_ok());
        nodes[1] = db("pg2", Some(ReplicationRole::Replica), None);
        assert_eq!(
            check("pg2", &nodes, MAX_LAG_BYTES).map_err(|r| r.conflict_code()),
            Err("not_caught_up")
        );
    }
}
