//! The desired topology: how many web and db nodes, the load-balancing
//! policy and the replication mode. Setting it reconciles the cluster.

use chrono::{DateTime, Utc};
use corral_proto::{Topology, TopologyChange, TopologyUpdate};
use sea_orm::ConnectionTrait;

use super::ClusterError;
use super::rows::{topology_from_row, update_from_row};
use super::{Cluster, Timings};
use crate::auth::Caller;
use crate::store::{self, NewEvent};

impl Cluster {
    /// The desired topology.
    pub async fn topology(&self) -> Result<Topology, ClusterError> {
        let row = store::load_topology(self.store.conn())
            .await?
            .ok_or_else(|| ClusterError::Internal("topology row missing".into()))?;
        topology_from_row(&row)
    }

    /// Replaces the desired topology and reconciles towards it.
    #[tracing::instrument(skip(self, caller), fields(actor = %caller.actor()))]
    pub async fn set_topology(
        &self,
        update: TopologyUpdate,
        caller: &Caller,
    ) -> Result<(TopologyChange, Timings), ClusterError> {
        caller.require_admin()?;
        update.validate().map_err(ClusterError::Invalid)?;
        let waited = std::time::Instant::now();
        let mut desired = self.write.lock().await;
        let waited = waited.elapsed();
        let txn = self.begin_change(&mut desired).await?;
        let now = Utc::now();
        let current = store::load_topology(&txn)
            .await?
            .map(|row| update_from_row(&row))
            .transpose()?;
        let mut events = Vec::new();
        if current.as_ref() != Some(&update) {
            save_spec(&txn, &update, now).await?;
            events.push(NewEvent {
                actor: caller.actor(),
                kind: "topology.updated".into(),
                subject: "topology".into(),
                message: format!(
                    "web={} db={} lb_policy={} replication={} backup={}",
                    update.web,
                    update.db,
                    update.lb_policy,
                    update.replication,
                    update
                        .backup
                        .as_ref()
                        .map(|b| format!("daily at {} UTC, keep {}", b.schedule, b.keep))
                        .unwrap_or_else(|| "none".into())
                ),
            });
        }
        let outcome = self
            .apply_plan(
                &txn,
                &mut desired,
                &update,
                self.config.default_provider,
                &caller.actor(),
                events,
            )
            .await?;
        let row = store::load_topology(&txn)
            .await?
            .ok_or_else(|| ClusterError::Internal("topology row missing".into()))?;
        let change = TopologyChange {
            topology: topology_from_row(&row)?,
            created: outcome.created.clone(),
            draining: outcome.draining.clone(),
            orders_filed: outcome.orders_filed,
        };
        let mut timings = Timings::default();
        timings.record("lock", waited);
        timings.append(self.commit(txn, outcome, &mut desired).await?);
        Ok((change, timings))
    }

    /// The topology spec as stored.
    pub(super) async fn spec<C: ConnectionTrait>(
        &self,
        c: &C,
    ) -> Result<TopologyUpdate, ClusterError> {
        let row = store::load_topology(c)
            .await?
            .ok_or_else(|| ClusterError::Internal("topology row missing".into()))?;
        update_from_row(&row)
    }
}

pub(super) async fn save_spec<C: ConnectionTrait>(
    c: &C,
    spec: &TopologyUpdate,
    now: DateTime<Utc>,
) -> Result<(), ClusterError> {
    store::save_topology(
        c,
        spec.web,
        spec.db,
        spec.lb_policy.into(),
        spec.replication.into(),
        spec.backup
            .as_ref()
            .map(|b| (b.schedule.clone(), b.keep as i32)),
        now,
    )
    .await?;
    Ok(())
}
