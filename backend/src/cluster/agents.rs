//! Node agents: enrollment, heartbeats with what they observed, and noticing
//! when heartbeats stop.

use std::collections::{HashMap, HashSet};
use std::sync::{PoisonError, Weak};
use std::time::Duration;

use chrono::Utc;
use corral_proto::{
    EnrollRequest, EnrollResponse, EnrollSecret, Heartbeat, Node, ObservedState, ReplicationStatus,
    validate_node_name,
};

use super::Cluster;
use super::ClusterError;
use super::peers::Wake;
use crate::auth::{Caller, hash_token, new_token};
use crate::store::{self, NewEvent, node};

impl Cluster {
    /// Trades a node's enrollment secret for a node token. The secret is
    /// single-use and expires; it exists only once a provider made the
    /// node's machine or an admin minted one ([`Cluster::mint_enroll_secret`]).
    /// Enrolling again (with a new secret) revokes the previous token. A
    /// wrong, used or expired secret, an unknown node and the admin node all
    /// get the same refusal, so the answer says nothing about which nodes
    /// exist. That holds for adm1 too: its agent (the Consul server) has a
    /// secret from its provider like every other node.
    #[tracing::instrument(skip(self, req), fields(node = %req.node))]
    pub async fn enroll(&self, req: EnrollRequest) -> Result<EnrollResponse, ClusterError> {
        validate_node_name(&req.node).map_err(ClusterError::Invalid)?;
        let refused = || {
            ClusterError::NotAllowed(format!(
                "no valid enrollment secret for {}: it is wrong, used or expired \
                 (an admin mints a new one with `corral nodes reenroll {}`)",
                req.node, req.node
            ))
        };
        let _guard = self.write.lock().await;
        let Some(row) = store::node_by_name(self.store.conn(), &req.node).await? else {
            return Err(refused());
        };
        let token = new_token("corral-node-");
        let state = match row.state {
            node::State::Draining => node::State::Draining,
            _ => node::State::Active,
        };
        let now = Utc::now();
        let txn = self.store.begin().await?;
        let used = store::enroll_node(
            &txn,
            row.id,
            &hash_token(&req.secret),
            &hash_token(&token),
            state,
            now,
        )
        .await?;
        if !used {
            return Err(refused());
        }
        let again = row.token_hash.is_some();
        let events = store::insert_events(
            &txn,
            vec![NewEvent {
                actor: format!("agent:{}", row.name),
                kind: "node.enrolled".into(),
                subject: row.name.clone(),
                message: if again {
                    format!("{} enrolled again; its previous token is revoked", row.name)
                } else {
                    format!("{} enrolled", row.name)
                },
            }],
            now,
        )
        .await?;
        self.notify_peers(
            &txn,
            &Wake {
                events: events.iter().map(|e| e.id).collect(),
                nodes: true,
                tokens: vec![row.id],
                ..Wake::default()
            },
        )
        .await?;
        txn.commit().await?;
        self.tokens.forget_node(row.id);
        self.nodes_changed();
        for e in &events {
            self.publish_event(e);
        }
        Ok(EnrollResponse {
            node: row.name,
            token,
            address: row.address,
            role: row.role.into(),
        })
    }

    /// Mints the one enrollment secret of a node (a secret minted before is
    /// void), valid for [`ClusterConfig::enroll_secret_ttl`]. Providers call
    /// this when they make a node's machine, with the secret going into the
    /// machine only; an admin calls it to enroll a node again by hand.
    ///
    /// [`ClusterConfig::enroll_secret_ttl`]: super::ClusterConfig::enroll_secret_ttl
    #[tracing::instrument(skip(self, caller), fields(actor = %caller.actor()))]
    pub async fn mint_enroll_secret(
        &self,
        name: &str,
        caller: &Caller,
    ) -> Result<EnrollSecret, ClusterError> {
        caller.require_admin()?;
        let _guard = self.write.lock().await;
        let row = self.node_row(self.store.conn(), name).await?;
        let secret = new_token("corral-enroll-");
        let now = Utc::now();
        let ttl = chrono::Duration::from_std(self.config.enroll_secret_ttl)
            .unwrap_or(chrono::Duration::hours(1));
        let expires_at = now + ttl;
        store::set_enroll_secret(
            self.store.conn(),
            row.id,
            &hash_token(&secret),
            expires_at,
            now,
        )
        .await?;
        Ok(EnrollSecret {
            node: row.name,
            secret,
            expires_at,
        })
    }

    /// Records what an agent observed on its node, and the events worth
    /// noting in how it changed.
    pub async fn heartbeat(
        &self,
        name: &str,
        heartbeat: Heartbeat,
        caller: &Caller,
    ) -> Result<Node, ClusterError> {
        caller.require_node(name)?;
        heartbeat
            .observed
            .validate()
            .map_err(ClusterError::Invalid)?;
        let row = self.node_row(self.store.conn(), name).await?;
        let previous: Option<ObservedState> = row
            .observed
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok());
        let now = Utc::now();
        let json = serde_json::to_string(&heartbeat.observed)
            .map_err(|e| ClusterError::Internal(e.to_string()))?;
        store::record_heartbeat(self.store.conn(), row.id, &json, now).await?;
        let mut events = Vec::new();
        let actor = format!("agent:{name}");
        if row.last_heartbeat.is_none() {
            events.push(NewEvent {
                actor: actor.clone(),
                kind: "node.online".into(),
                subject: name.into(),
                message: format!("first heartbeat from {name}"),
            });
        }
        // Another server (the leader) may have noted it stale: the gap in
        // its heartbeats says so as well as this server's own note.
        let noted = self
            .stale
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&row.id);
        let recovered = noted
            || (!self.is_leader()
                && row.last_heartbeat.is_some()
                && !self.is_fresh(row.last_heartbeat, now));
        if recovered {
            events.push(NewEvent {
                actor: actor.clone(),
                kind: "node.recovered".into(),
                subject: name.into(),
                message: format!("{name} is heard from again"),
            });
        }
        if let Some(change) = describe_change(previous.as_ref(), &heartbeat.observed) {
            events.push(NewEvent {
                actor: actor.clone(),
                kind: "node.observed".into(),
                subject: name.into(),
                message: change,
            });
        }
        let before = previous.as_ref().and_then(|p| p.replication.as_ref());
        for (kind, message) in db_events(name, before, heartbeat.observed.replication.as_ref()) {
            events.push(NewEvent {
                actor: actor.clone(),
                kind: kind.into(),
                subject: name.into(),
                message,
            });
        }
        if !events.is_empty() {
            self.record_events(events).await?;
        }
        let mut row = row;
        row.last_heartbeat = Some(now);
        row.observed = Some(json);
        self.node_from_row(&row, now)
    }
}

/// Notes nodes whose heartbeats stopped, once each, in the audit log.
pub(super) async fn watch_heartbeats(cluster: Weak<Cluster>) {
    let period = match cluster.upgrade() {
        Some(c) => (c.config.heartbeat_stale_after / 3).max(Duration::from_secs(1)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        if !cluster.is_leader() {
            // The leader notes them; should this server lead later, it
            // starts from what the database says.
            cluster
                .stale
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            continue;
        }
        let stale_after = chrono::Duration::from_std(cluster.config.heartbeat_stale_after)
            .unwrap_or(chrono::Duration::seconds(15));
        let rows = match store::nodes_with_heartbeat_before(
            cluster.store.conn(),
            Utc::now() - stale_after,
        )
        .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "checking heartbeats failed");
                continue;
            }
        };
        let newly_stale: Vec<_> = {
            let mut stale = cluster.stale.lock().unwrap_or_else(PoisonError::into_inner);
            // Nodes heard from again (perhaps by another server) may go
            // stale again later.
            let now_stale: HashSet<i32> = rows.iter().map(|r| r.id).collect();
            stale.retain(|id| now_stale.contains(id));
            rows.into_iter().filter(|r| stale.insert(r.id)).collect()
        };
        let events = newly_stale
            .iter()
            .map(|r| NewEvent {
                actor: "reconciler".into(),
                kind: "node.stale".into(),
                subject: r.name.clone(),
                message: format!(
                    "no heartbeat from {} for over {}s",
                    r.name,
                    stale_after.num_seconds()
                ),
            })
            .collect::<Vec<_>>();
        if !events.is_empty()
            && let Err(e) = cluster.record_events(events).await
        {
            tracing::warn!(error = %e, "recording stale nodes failed");
        }
    }
}

/// A one-line account of what changed between two observations that an
/// operator would care about (service states, replication role), if any.
fn describe_change(before: Option<&ObservedState>, after: &ObservedState) -> Option<String> {
    let mut changes = Vec::new();
    let old: HashMap<&str, _> = before
        .map(|b| {
            b.services
                .iter()
                .map(|s| (s.name.as_str(), s.state))
                .collect()
        })
        .unwrap_or_default();
    for s in &after.services {
        match old.get(s.name.as_str()) {
            Some(state) if *state == s.state => {}
            Some(state) => changes.push(format!(
                "{}: {} -> {}",
                s.name,
                service_state(*state),
                service_state(s.state)
            )),
            None => changes.push(format!("{}: {}", s.name, service_state(s.state))),
        }
    }
    let old_role = before.and_then(|b| b.replication.as_ref()).map(|r| r.role);
    let new_role = after.replication.as_ref().map(|r| r.role);
    if old_role != new_role
        && let Some(role) = new_role
    {
        changes.push(format!("replication role: {}", replication_role(role)));
    }
    (!changes.is_empty()).then(|| changes.join("; "))
}

/// The events a change in a db node's replication report is worth: a
/// promotion or demotion, and a primary's commits ceasing or resuming to
/// wait for a standby. Only changes count: a node first heard from, or one
/// whose PostgreSQL was not reporting, says nothing new.
fn db_events(
    name: &str,
    before: Option<&ReplicationStatus>,
    after: Option<&ReplicationStatus>,
) -> Vec<(&'static str, String)> {
    use corral_proto::ReplicationRole::*;
    let (Some(before), Some(after)) = (before, after) else {
        return Vec::new();
    };
    let mut events = Vec::new();
    match (before.role, after.role) {
        (Replica | Fenced, Primary) => events.push((
            "db.promoted",
            match after.timeline {
                Some(tl) => format!("{name} is now primary (timeline {tl})"),
                None => format!("{name} is now primary"),
            },
        )),
        (Primary, Replica) => events.push((
            "db.demoted",
            format!(
                "{name} is no longer primary: it follows {} as a replica",
                after.leader.as_deref().unwrap_or("the new primary")
            ),
        )),
        (Primary, Fenced) => events.push((
            "db.demoted",
            format!("{name} is no longer primary: fenced, it refuses writes until it rejoins"),
        )),
        _ => {}
    }
    if after.degraded && !before.degraded {
        events.push((
            "db.sync_degraded",
            format!(
                "{name} commits no longer wait for a standby: none is connected (sync mode falls back to async)"
            ),
        ));
    } else if before.degraded && !after.degraded && after.role == Primary {
        events.push((
            "db.sync_restored",
            match after.sync_standby.as_deref() {
                Some(standby) => {
                    format!("{name} commits wait for a standby again ({standby} is synchronous)")
                }
                None => format!("{name} commits wait for a standby again"),
            },
        ));
    }
    events
}

fn service_state(s: corral_proto::ServiceState) -> &'static str {
    use corral_proto::ServiceState::*;
    match s {
        Starting => "starting",
        Running => "running",
        Stopped => "stopped",
        Failed => "failed",
    }
}

fn replication_role(r: corral_proto::ReplicationRole) -> &'static str {
    use corral_proto::ReplicationRole::*;
    match r {
        Primary => "primary",
        Replica => "replica",
        Fenced => "fenced",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::ReplicationRole;

    fn status(role: ReplicationRole) -> ReplicationStatus {
        ReplicationStatus::new(role)
    }

    fn kinds(events: Vec<(&'static str, String)>) -> Vec<&'static str> {
        events.into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn a_promotion_names_the_new_timeline_and_a_demotion_is_logged() {
        let promoted = ReplicationStatus {
            timeline: Some(3),
            ..status(ReplicationRole::Primary)
        };
        let events = db_events(
            "pg2",
            Some(&status(ReplicationRole::Replica)),
            Some(&promoted),
        );
        assert_eq!(
            events,
            vec![("db.promoted", "pg2 is now primary (timeline 3)".to_string())]
        );
        for after in [ReplicationRole::Replica, ReplicationRole::Fenced] {
            let events = db_events(
                "pg1",
                Some(&status(ReplicationRole::Primary)),
                Some(&status(after)),
            );
            assert_eq!(kinds(events), vec!["db.demoted"]);
        }
    }

    #[test]
    fn nothing_is_logged_without_a_previous_report_or_a_change() {
        let primary = status(ReplicationRole::Primary);
        assert!(db_events("pg1", None, Some(&primary)).is_empty());
        assert!(db_events("pg1", Some(&primary), None).is_empty());
        assert!(db_events("pg1", Some(&primary), Some(&primary)).is_empty());
    }

    #[test]
    fn the_sync_fallback_and_its_end_are_logged_once_each() {
        let ok = status(ReplicationRole::Primary);
        let degraded = ReplicationStatus {
            degraded: true,
            ..status(ReplicationRole::Primary)
        };
        let events = db_events("pg1", Some(&ok), Some(&degraded));
        assert_eq!(kinds(events.clone()), vec!["db.sync_degraded"]);
        assert!(events[0].1.contains("falls back to async"), "{events:?}");
        assert!(db_events("pg1", Some(&degraded), Some(&degraded)).is_empty());
        let restored = ReplicationStatus {
            sync_standby: Some("pg2".into()),
            ..ok
        };
        assert_eq!(
            kinds(db_events("pg1", Some(&degraded), Some(&restored))),
            vec!["db.sync_restored"]
        );
        // A degraded primary that is demoted is not "restored": the
        // demotion says what happened.
        assert_eq!(
            kinds(db_events(
                "pg1",
                Some(&degraded),
                Some(&status(ReplicationRole::Fenced))
            )),
            vec!["db.demoted"]
        );
    }
}
