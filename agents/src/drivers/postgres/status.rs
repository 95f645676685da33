//! What the local server says: the HA tick's one status query, and the
//! heartbeat's and the metrics sampler's views.

use corral_proto::{PostgresSpec, ReplicationRole, ReplicationStatus};

use super::*;
use crate::drivers::DriverError;
use crate::drivers::ha::{self};

impl PostgresDriver {
    /// One SQL round trip: role, timeline, WAL position, standbys, settings.
    pub(super) async fn local(&self, port: u16) -> Result<ha::SqlStatus, DriverError> {
        let row = self.query(port, ha::STATUS_QUERY).await?;
        ha::SqlStatus::parse(&row).map_err(DriverError::Refused)
    }

    /// The local server as one tick sees it.
    pub(super) async fn local_status(
        &self,
        spec: &PostgresSpec,
    ) -> Result<ha::LocalStatus, DriverError> {
        let running = self.ctx.host.adopt(&self.service_spec(spec)).await?;
        let sql = if running {
            self.local(spec.port).await.ok()
        } else {
            None
        };
        Ok(ha::LocalStatus {
            running,
            sql,
            data_dir: self.pgdata().join("PG_VERSION").exists(),
            standby_signal: self.pgdata().join("standby.signal").exists(),
            rejoin_marked: self.rejoin_marked(),
        })
    }

    /// What the metrics sampler reads: transactions committed so far (every
    /// database), client connections now, and replication lag in bytes (as
    /// in [`Self::replication`]). `None` while no postgres is ordered or it
    /// does not answer.
    pub async fn activity(&self) -> Option<PgActivity> {
        let port = self.desired.lock().expect("lock").as_ref()?.port;
        let row = self
            .query(
                port,
                "SELECT (SELECT COALESCE(sum(xact_commit), 0) FROM pg_stat_database), \
                 (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'), \
                 CASE WHEN pg_is_in_recovery() \
                 THEN COALESCE(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0) \
                 ELSE COALESCE((SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)) FROM pg_stat_replication), 0) END",
            )
            .await
            .ok()?;
        let mut cols = row.split('|');
        let mut next = || cols.next()?.trim().parse::<f64>().ok();
        Some(PgActivity {
            commits: next()?.max(0.0) as u64,
            connections: next()?.max(0.0) as u64,
            lag_bytes: next()?.max(0.0) as u64,
        })
    }

    /// Role, state, lag and timeline for the heartbeat.
    pub async fn replication(&self) -> Option<ReplicationStatus> {
        let port = self.desired.lock().expect("lock").as_ref()?.port;
        let leader = self.seen_leader.lock().expect("lock").clone();
        let row = match self
            .query(
                port,
                "SELECT pg_is_in_recovery(), \
                 COALESCE((SELECT received_tli FROM pg_stat_wal_receiver), (SELECT timeline_id FROM pg_control_checkpoint())), \
                 CASE WHEN pg_is_in_recovery() \
                 THEN COALESCE(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0) \
                 ELSE COALESCE((SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)) FROM pg_stat_replication), 0) END, \
                 CASE WHEN pg_is_in_recovery() \
                 THEN CASE WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0 \
                      ELSE COALESCE(extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000, 0) END \
                 ELSE COALESCE((SELECT max(extract(epoch FROM replay_lag)) * 1000 FROM pg_stat_replication), 0) END, \
                 CASE WHEN pg_is_in_recovery() THEN COALESCE((SELECT status FROM pg_stat_wal_receiver), 'recovering') ELSE 'running' END, \
                 COALESCE((SELECT string_agg(application_name, ',') FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')), '')",
            )
            .await
        {
            Ok(row) => row,
            Err(_) => {
                let mut status = ReplicationStatus::new(ReplicationRole::Fenced);
                status.state = Some(if self.rejoin_marked() {
                    "fenced".into()
                } else {
                    "stopped".into()
                });
                status.leader = leader;
                return Some(status);
            }
        };
        let cols: Vec<&str> = row.split('|').collect();
        let col = |i: usize| cols.get(i).copied().unwrap_or("");
        let role = match col(0) {
            "t" => ReplicationRole::Replica,
            _ => ReplicationRole::Primary,
        };
        let mut status = ReplicationStatus::new(role);
        status.timeline = col(1).parse().ok();
        status.lag_bytes = col(2).parse::<f64>().ok().map(|l| l.max(0.0) as u64);
        status.lag_ms = col(3).parse::<f64>().ok().map(|l| l.max(0.0) as u64);
        status.state = Some(col(4).chars().take(32).collect());
        status.sync_standby =
            Some(col(5).chars().take(64).collect()).filter(|s: &String| !s.is_empty());
        status.degraded = role == ReplicationRole::Primary && *self.degraded.lock().expect("lock");
        status.leader = leader;
        Some(status)
    }
}
