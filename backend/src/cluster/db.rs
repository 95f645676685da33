//! Database use cases: a planned switchover of the PostgreSQL primary.

use chrono::Utc;
use corral_proto::{
    ObservedState, Order, OrderKind, SwitchoverAccepted, SwitchoverRequest, SwitchoverSpec,
    WorkOrder, validate_node_name,
};

use super::Cluster;
use super::ClusterError;
use super::change::Outcome;
use super::rows::order_row;
use crate::auth::Caller;
use crate::bus::OrderBatch;
use crate::store::{self, NewEvent};
use crate::switchover;

impl Cluster {
    /// Files a switchover to the current primary, after checking that the
    /// target is a caught-up streaming standby (see [`switchover::check`]).
    /// A refused request changes nothing.
    #[tracing::instrument(skip(self, caller), fields(actor = %caller.actor()))]
    pub async fn switchover(
        &self,
        req: SwitchoverRequest,
        caller: &Caller,
    ) -> Result<SwitchoverAccepted, ClusterError> {
        caller.require_admin()?;
        let to = req.to;
        if validate_node_name(&to).is_err() {
            return Err(ClusterError::NotFound(format!("no node named {to}")));
        }
        let mut desired = self.write.lock().await;
        let txn = self.begin_change(&mut desired).await?;
        let now = Utc::now();
        let rows = store::db_nodes_and(&txn, &to).await?;
        let standings = rows
            .iter()
            .map(|row| switchover::Standing {
                name: row.name.clone(),
                role: row.role.into(),
                state: row.state.into(),
                fresh: self.is_fresh(row.last_heartbeat, now),
                replication: row
                    .observed
                    .as_deref()
                    .and_then(|s| serde_json::from_str::<ObservedState>(s).ok())
                    .and_then(|o| o.replication),
            })
            .collect::<Vec<_>>();
        let from =
            switchover::check(&to, &standings, switchover::MAX_LAG_BYTES).map_err(|refusal| {
                match refusal {
                    switchover::Refusal::UnknownNode(_) => {
                        ClusterError::NotFound(refusal.to_string())
                    }
                    switchover::Refusal::NotDb { .. } => ClusterError::Invalid(refusal.to_string()),
                    other => ClusterError::Conflict {
                        code: other.conflict_code(),
                        message: other.to_string(),
                    },
                }
            })?;
        let primary = rows.iter().find(|r| r.name == from).ok_or_else(|| {
            ClusterError::Internal("the primary vanished from its own list".into())
        })?;
        if let Some(running) =
            store::unfinished_order(&txn, primary.id, OrderKind::Switchover.into()).await?
        {
            return Err(ClusterError::Conflict {
                code: "switchover_in_progress",
                message: format!(
                    "{from} has not finished switchover order {} yet; follow it in GET /api/v1/nodes/{from}/orders",
                    running.seq
                ),
            });
        }
        let order = WorkOrder::Switchover(SwitchoverSpec {
            to: to.clone(),
            max_lag_bytes: switchover::MAX_LAG_BYTES,
        });
        let seq = primary.last_seq + 1;
        store::advance_last_seq(&txn, &[primary.id], 1).await?;
        let mut outcome = Outcome {
            orders_filed: store::insert_orders(
                &txn,
                vec![order_row(primary.id, seq, &order)?],
                now,
            )
            .await?,
            ..Outcome::default()
        };
        outcome.events = store::insert_events(
            &txn,
            vec![NewEvent {
                actor: caller.actor(),
                kind: "db.switchover_requested".into(),
                subject: from.clone(),
                message: format!("switchover {from} -> {to} requested (order {seq} on {from})"),
            }],
            now,
        )
        .await?;
        outcome.filed.push((from.clone(), order.clone()));
        outcome.batches.push((
            primary.id,
            OrderBatch {
                orders: vec![Order::pending(from.clone(), seq, order, now)],
            },
        ));
        self.commit(txn, outcome, &mut desired).await?;
        Ok(SwitchoverAccepted { from, to, seq })
    }
}
