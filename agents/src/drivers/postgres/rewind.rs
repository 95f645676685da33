//! A former primary rejoining as a standby: the rejoin mark, `pg_rewind`
//! from the new primary, or a fresh clone when it fails three times.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use corral_proto::PostgresSpec;

use super::*;
use crate::drivers::DriverError;
use crate::drivers::ha::Member;
use crate::host::OneShot;

impl PostgresDriver {
    pub(super) fn rejoin_marker(&self) -> PathBuf {
        self.ctx.path("run/postgres-rejoin")
    }

    /// Remembers that this data dir was a primary's that lost its role: it
    /// must be rewound before it may follow another primary.
    pub(super) fn mark_rejoin(&self) {
        if let Err(e) = crate::durable::write_atomic(&self.rejoin_marker(), b"rejoin\n", 0o600) {
            tracing::error!(error = %e, "cannot record that postgres must rejoin");
        }
    }

    pub(super) fn rejoin_marked(&self) -> bool {
        self.rejoin_marker().exists()
    }

    pub(super) fn clear_rejoin(&self) {
        let _ = std::fs::remove_file(self.rejoin_marker());
    }

    /// Makes a former primary's data dir a standby of `leader`: pg_rewind,
    /// or a fresh clone when rewinding is impossible.
    pub(super) async fn rejoin(
        &self,
        spec: &PostgresSpec,
        leader: &Member,
    ) -> Result<(), DriverError> {
        let started = Instant::now();
        let source = format!(
            "host={} port={} user={REWIND_USER} dbname=postgres connect_timeout=5",
            leader.address, leader.port
        );
        let cmd = OneShot::new(self.bin("pg_rewind"), &["--target-pgdata"])
            .arg(self.pgdata().display().to_string())
            .arg("--source-server")
            .arg(source)
            .env("PGPASSWORD", spec.replication_password().to_string())
            .run_as(Self::account())
            .timeout(Duration::from_secs(600));
        let out = self.ctx.host.run(&cmd).await?;
        if out.success {
            tracing::warn!(
                leader = %leader.node,
                ms = started.elapsed().as_millis() as u64,
                output = %out.stderr.trim(),
                "rewound with pg_rewind: rejoining as a standby"
            );
        } else {
            // A crashed primary's backends may outlive it for a moment and
            // keep its shared memory: try again before giving up on it.
            let failures = {
                let mut f = self.rewind_failures.lock().expect("lock");
                *f += 1;
                *f
            };
            if failures < 3 {
                tracing::warn!(
                    leader = %leader.node,
                    error = %out.stderr.trim(),
                    failures,
                    "pg_rewind failed; trying again"
                );
                return Err(DriverError::Refused(format!(
                    "pg_rewind from {} failed (attempt {failures}): {}",
                    leader.node,
                    out.stderr.trim()
                )));
            }
            tracing::warn!(
                leader = %leader.node,
                error = %out.stderr.trim(),
                "pg_rewind failed three times: cloning the primary afresh"
            );
            let what = self.make_data_dir(spec).await?;
            tracing::warn!(%what, "re-cloned");
        }
        *self.rewind_failures.lock().expect("lock") = 0;
        self.clear_rejoin();
        Ok(())
    }
}
