//! Database rows to the types of the API and the reconciler, and back.

use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use corral_proto::{Event, Node, Order, Role, Topology, TopologyUpdate, WorkOrder};

use super::Cluster;
use super::ClusterError;
use crate::reconcile::NodeView;
use crate::store::{self, NewOrderRow, event, node, work_order};

impl Cluster {
    /// A node as the API shows it.
    pub(super) fn node_from_row(
        &self,
        row: &node::Model,
        now: DateTime<Utc>,
    ) -> Result<Node, ClusterError> {
        let health = self.health(row.last_heartbeat, now);
        Ok(Node {
            name: row.name.clone(),
            role: row.role.into(),
            address: row.address.clone(),
            provider: row.provider.into(),
            state: row.state.into(),
            health,
            last_seq: row.last_seq,
            last_heartbeat: row.last_heartbeat,
            observed: row
                .observed
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| {
                    ClusterError::Internal(format!("observed state of {}: {e}", row.name))
                })?,
            created_at: row.created_at,
        })
    }
}

pub(super) fn node_view(row: &store::NodeBrief) -> Result<NodeView, ClusterError> {
    let (role, index) = Role::parse_node_name(&row.name).ok_or_else(|| {
        ClusterError::Internal(format!("stored node name {:?} is off-scheme", row.name))
    })?;
    let address: Ipv4Addr = row.address.parse().map_err(|_| {
        ClusterError::Internal(format!("stored address {:?} is corrupt", row.address))
    })?;
    Ok(NodeView {
        name: row.name.clone(),
        role,
        index,
        address,
        provider: row.provider.into(),
        state: row.state.into(),
        observed: row
            .observed
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok()),
    })
}

pub(super) fn update_from_row(
    row: &store::topology::Model,
) -> Result<TopologyUpdate, ClusterError> {
    Ok(TopologyUpdate {
        web: u32::try_from(row.web).map_err(|e| ClusterError::Internal(e.to_string()))?,
        db: u32::try_from(row.db).map_err(|e| ClusterError::Internal(e.to_string()))?,
        lb_policy: row.lb_policy.into(),
        replication: row.replication.into(),
        backup: match (&row.backup_schedule, row.backup_keep) {
            (Some(schedule), Some(keep)) => Some(corral_proto::BackupSchedule {
                schedule: schedule.clone(),
                keep: u32::try_from(keep).map_err(|e| ClusterError::Internal(e.to_string()))?,
            }),
            _ => None,
        },
    })
}

pub(super) fn topology_from_row(row: &store::topology::Model) -> Result<Topology, ClusterError> {
    let spec = update_from_row(row)?;
    Ok(Topology {
        web: spec.web,
        db: spec.db,
        lb_policy: spec.lb_policy,
        replication: spec.replication,
        backup: spec.backup,
        updated_at: row.updated_at,
    })
}

pub fn order_from_row(row: &work_order::Model, node: &str) -> Result<Order, ClusterError> {
    Ok(Order {
        node: node.to_string(),
        seq: row.seq,
        payload: serde_json::from_str(&row.payload)
            .map_err(|e| ClusterError::Internal(format!("stored order payload: {e}")))?,
        status: row.status.into(),
        result: row.result.clone(),
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

pub fn event_from_row(row: &event::Model) -> Event {
    Event {
        id: row.id,
        at: row.at,
        actor: row.actor.clone(),
        kind: row.kind.clone(),
        subject: row.subject.clone(),
        message: row.message.clone(),
    }
}

/// The database row of an order being filed.
pub(super) fn order_row(
    node_id: i32,
    seq: i64,
    order: &WorkOrder,
) -> Result<NewOrderRow, ClusterError> {
    Ok(NewOrderRow {
        node_id,
        seq,
        kind: order.kind().into(),
        payload: serde_json::to_string(order).map_err(|e| ClusterError::Internal(e.to_string()))?,
    })
}
