//! What the local server says: the HA tick's one status query, and the
//! heartbeat's and the metrics sampler's views.

use corral_proto::{PostgresSpec, ReplicationRole, ReplicationStatus};

use super::*;
use crate::drivers::DriverError;
use crate::drivers::ha::{self};

/// How old the HA loop's status may be for the heartbeat to report it.
const HEARTBEAT_STATUS_AGE: Duration = Duration::from_secs(2);

impl PostgresDriver {
    /// One SQL round trip: role, timeline, WAL position, standbys, settings.
    pub(super) async fn local(&self, port: u16) -> Result<ha::SqlStatus, DriverError> {
        let row = self.query(port, ha::STATUS_QUERY).await?;
        let status = ha::SqlStatus::parse(&row).map_err(DriverError::Refused)?;
        *self.last_sql.lock().expect("lock") = Some((Instant::now(), status.clone()));
        Ok(status)
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
        if sql.is_none() {
            // Not what the heartbeat should report any longer.
            *self.last_sql.lock().expect("lock") = None;
        }
        Ok(ha::LocalStatus {
            running,
            sql,
            data_dir: self.pgdata().join("PG_VERSION").exists(),
            standby_signal: self.pgdata().join("standby.signal").exists(),
            rejoin_marked: self.rejoin_marked(),
        })
    }

    /// The process titles of the postmaster's children (`postmaster.pid`
    /// names it), as `/proc` shows them; empty when none runs.
    pub(super) fn child_titles(&self) -> Vec<String> {
        let Some(postmaster) = std::fs::read_to_string(self.pgdata().join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse::<u32>().ok())
        else {
            return Vec::new();
        };
        let mut titles = Vec::new();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return titles;
        };
        let mut buf = String::new();
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if crate::procfs::read_stat(pid, &mut buf).is_none_or(|s| s.ppid != postmaster) {
                continue;
            }
            if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                titles.push(
                    String::from_utf8_lossy(&cmdline)
                        .replace('\0', " ")
                        .trim()
                        .to_string(),
                );
            }
        }
        titles
    }

    /// How long a running postgres that does not answer has shown no
    /// recovery progress; zero once it answers or stops.
    pub(super) fn stalled_for(&self, local: &ha::LocalStatus) -> Duration {
        let mut stalled = self.stalled.lock().expect("lock");
        if !local.running || local.sql.is_some() {
            *stalled = None;
            return Duration::ZERO;
        }
        let progress = ha::recovery_progress(&self.child_titles());
        match &*stalled {
            Some((seen, since)) if *seen == progress => since.elapsed(),
            _ => {
                *stalled = Some((progress, Instant::now()));
                Duration::ZERO
            }
        }
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
                concat!(
                    "SELECT (SELECT COALESCE(sum(xact_commit), 0) FROM pg_stat_database), \
                     (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'), ",
                    crate::lag_bytes_sql!()
                ),
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

    /// Role, state, lag and timeline for the heartbeat: the HA loop's
    /// latest status query while it is at most [`HEARTBEAT_STATUS_AGE`]
    /// old (the loop asks every [`ha::TICK`]), else asked now.
    pub async fn replication(&self) -> Option<ReplicationStatus> {
        let port = self.desired.lock().expect("lock").as_ref()?.port;
        let leader = self.seen_leader.lock().expect("lock").clone();
        let fresh = self
            .last_sql
            .lock()
            .expect("lock")
            .as_ref()
            .filter(|(at, _)| at.elapsed() <= HEARTBEAT_STATUS_AGE)
            .map(|(_, sql)| sql.clone());
        let sql = match fresh {
            Some(sql) => sql,
            None => match self.local(port).await {
                Ok(sql) => sql,
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
            },
        };
        let role = if sql.in_recovery {
            ReplicationRole::Replica
        } else {
            ReplicationRole::Primary
        };
        let mut status = ReplicationStatus::new(role);
        status.timeline = Some(sql.timeline).filter(|t| *t > 0);
        status.lag_bytes = Some(sql.lag_bytes);
        status.lag_ms = Some(sql.lag_ms);
        status.state = Some(sql.state.chars().take(32).collect());
        status.sync_standby = Some(sql.sync_standbys.join(","))
            .map(|s| s.chars().take(64).collect::<String>())
            .filter(|s| !s.is_empty());
        status.degraded = role == ReplicationRole::Primary && *self.degraded.lock().expect("lock");
        status.leader = leader;
        Some(status)
    }
}
