//! Synchronous replication on the primary: `synchronous_standby_names`
//! for the mode, and the `sync` mode's fallback while no standby streams.

use corral_proto::PostgresSpec;

use super::*;
use crate::drivers::DriverError;
use crate::drivers::ha::{self, Member};

impl PostgresDriver {
    /// Commits wait for a standby in `sync` and `strict` mode; `sync` stops
    /// waiting while no standby streams and says so.
    pub(super) async fn manage_sync(
        &self,
        spec: &PostgresSpec,
        local: &ha::SqlStatus,
        others: &[Member],
    ) -> Result<(), DriverError> {
        let mut standbys: Vec<String> = others.iter().map(|m| m.node.clone()).collect();
        standbys.sort();
        let (names, degraded) =
            ha::sync_standby_names(spec.replication, &standbys, &local.streaming);
        if names != local.sync_names {
            let sql = if names.is_empty() {
                "ALTER SYSTEM RESET synchronous_standby_names".to_string()
            } else {
                format!(
                    "ALTER SYSTEM SET synchronous_standby_names = {}",
                    literal(&names)
                )
            };
            self.query(spec.port, &sql).await?;
            self.query(spec.port, "SELECT pg_reload_conf()").await?;
            tracing::info!(names, mode = %spec.replication, "set synchronous_standby_names");
        }
        let mut was = self.degraded.lock().expect("lock");
        if *was != degraded {
            if degraded {
                tracing::warn!(
                    "sync mode: no standby streams, commits no longer wait for one (fallback to async)"
                );
            } else {
                tracing::info!("sync mode: a standby streams again, commits wait for it");
            }
            *was = degraded;
        }
        Ok(())
    }
}
