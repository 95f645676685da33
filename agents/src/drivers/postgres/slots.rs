//! Replication slots on the primary: one per standby (slots are not
//! replicated, so a new primary makes them), none for nodes that left.

use corral_proto::PostgresSpec;

use super::*;
use crate::drivers::DriverError;
use crate::drivers::ha::{self, Member};

impl PostgresDriver {
    /// Makes a slot for every member lacking one.
    pub(super) async fn ensure_slots(
        &self,
        spec: &PostgresSpec,
        local: &ha::SqlStatus,
        members: &[Member],
    ) -> Result<(), DriverError> {
        for m in members {
            let slot = slot_name(&m.node);
            if !local.streaming.contains(&format!("slot:{slot}")) {
                self.query(
                    spec.port,
                    &format!(
                        "SELECT pg_create_physical_replication_slot({}, true)",
                        literal(&slot)
                    ),
                )
                .await?;
                tracing::info!(slot, "created a replication slot");
            }
        }
        Ok(())
    }

    /// Drops the slots of standbys that left the cluster: inactive slots
    /// named after no node in Consul's catalog (a drained node leaves it; a
    /// node that merely crashed, or is still cloning, stays in it), so the
    /// primary does not keep their WAL forever.
    pub(super) async fn drop_orphan_slots(
        &self,
        port: u16,
        catalog: &[String],
    ) -> Result<(), DriverError> {
        let inactive = self
            .query(
                port,
                "SELECT slot_name FROM pg_replication_slots WHERE NOT active AND slot_type = 'physical'",
            )
            .await?;
        if inactive.is_empty() {
            return Ok(());
        }
        let known: Vec<String> = catalog.iter().map(|n| slot_name(n)).collect();
        for slot in inactive.lines().map(str::trim) {
            if !slot.is_empty() && !known.iter().any(|k| k == slot) {
                self.query(
                    port,
                    &format!("SELECT pg_drop_replication_slot({})", literal(slot)),
                )
                .await?;
                tracing::info!(slot, "dropped the slot of a standby that left");
            }
        }
        Ok(())
    }
}
