//! A node's first data dir: a new cluster (`initdb`, the roles and the app
//! database) on the bootstrap node when none exists anywhere, otherwise a
//! clone of the primary (`pg_basebackup` into a slot of its own).

use std::path::Path;
use std::time::{Duration, Instant};

use corral_proto::{POSTGRES_SERVICE, PostgresSpec};

use super::*;
use crate::drivers::DriverError;
use crate::host::OneShot;

impl PostgresDriver {
    pub(super) async fn initdb(&self, pgdata: &Path) -> Result<(), DriverError> {
        let cmd = OneShot::new(
            self.bin("initdb"),
            &[
                "--data-checksums",
                "--username=postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "-D",
            ],
        )
        .arg(pgdata.display().to_string())
        .run_as(Self::account())
        .timeout(Duration::from_secs(120));
        self.ctx.host.run(&cmd).await?.check(&cmd)?;
        // The cluster network: standbys replicate and webapps connect over
        // it, always with a password.
        let hba = format!(
            "# Written by corral-agent.\nlocal all all trust\n\
             host replication {REPLICATION_USER} samenet scram-sha-256\n\
             host all all samenet scram-sha-256\n"
        );
        let hba_path = pgdata.join("pg_hba.conf");
        std::fs::write(&hba_path, hba)
            .map_err(DriverError::io(format!("writing {}", hba_path.display())))?;
        Ok(())
    }

    /// The application's role and the two replication roles, each with
    /// the least it needs: the webapp's password opens neither replication
    /// role, `replicator` can stream but read no file, `rewinder` can read
    /// the files pg_rewind needs but not stream. (A cluster made before the
    /// split had `replicator` holding the file functions: they are revoked.)
    pub(super) async fn create_roles(&self, spec: &PostgresSpec) -> Result<(), DriverError> {
        let functions = [
            "pg_catalog.pg_ls_dir(text, boolean, boolean)",
            "pg_catalog.pg_stat_file(text, boolean)",
            "pg_catalog.pg_read_binary_file(text)",
            "pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)",
        ];
        let grants: String = functions
            .iter()
            .map(|f| {
                format!(
                    "REVOKE EXECUTE ON FUNCTION {f} FROM {repl}; GRANT EXECUTE ON FUNCTION {f} TO {rew}; ",
                    repl = ident(REPLICATION_USER),
                    rew = ident(REWIND_USER),
                )
            })
            .collect();
        // Local commits: these must not wait for a synchronous standby that
        // may not stream yet (the HA step runs this too).
        let sql = format!(
            "SET synchronous_commit TO local; DO $$BEGIN \
             IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {repl_lit}) THEN CREATE ROLE {repl} WITH REPLICATION LOGIN; END IF; \
             IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {rew_lit}) THEN CREATE ROLE {rew} WITH LOGIN; END IF; \
             IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {user_lit}) THEN CREATE ROLE {user} WITH LOGIN; END IF; \
             END$$; \
             ALTER ROLE {repl} WITH REPLICATION LOGIN PASSWORD {repl_pw}; \
             ALTER ROLE {rew} WITH NOREPLICATION LOGIN PASSWORD {repl_pw}; \
             ALTER ROLE {user} WITH NOREPLICATION PASSWORD {pw}; {grants}",
            repl_lit = literal(REPLICATION_USER),
            repl = ident(REPLICATION_USER),
            rew_lit = literal(REWIND_USER),
            rew = ident(REWIND_USER),
            user_lit = literal(&spec.user),
            user = ident(&spec.user),
            pw = literal(&spec.password),
            repl_pw = literal(spec.replication_password()),
        );
        self.query(spec.port, &sql).await?;
        let exists = self
            .query(
                spec.port,
                &format!(
                    "SELECT 1 FROM pg_database WHERE datname = {}",
                    literal(&spec.database)
                ),
            )
            .await?;
        if exists.is_empty() {
            self.query(
                spec.port,
                &format!(
                    "SET synchronous_commit TO local; CREATE DATABASE {} OWNER {}",
                    ident(&spec.database),
                    ident(&spec.user)
                ),
            )
            .await?;
        }
        Ok(())
    }

    /// Whether a PostgreSQL cluster already runs somewhere: a leader lock
    /// is held or a primary is registered. A bootstrap node whose data was
    /// lost must clone that cluster, never start a second one. Waits for
    /// Consul to have a leader (it cannot answer before).
    pub(super) async fn cluster_exists(&self, leader_key: &str) -> Result<bool, DriverError> {
        let deadline = Instant::now() + PRIMARY_WAIT;
        loop {
            if self.ctx.consul.leader().await.is_ok_and(|l| !l.is_empty()) {
                let holder = self.ctx.consul.lock_holder(leader_key).await?;
                let (_, primaries) = self
                    .ctx
                    .consul
                    .health(
                        POSTGRES_SERVICE,
                        Some("primary"),
                        false,
                        None,
                        Duration::ZERO,
                    )
                    .await?;
                return Ok(holder.is_some() || !primaries.is_empty());
            }
            if Instant::now() > deadline {
                return Err(DriverError::Refused(format!(
                    "consul has no leader after {PRIMARY_WAIT:?}: cannot tell whether a cluster exists"
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The primary as Consul sees it, waiting for one to pass its check.
    pub(super) async fn find_primary(&self) -> Result<(String, u16), DriverError> {
        let deadline = Instant::now() + PRIMARY_WAIT;
        loop {
            match self
                .ctx
                .consul
                .health(
                    POSTGRES_SERVICE,
                    Some("primary"),
                    true,
                    None,
                    Duration::ZERO,
                )
                .await
            {
                Ok((_, list)) if !list.is_empty() => {
                    return Ok((list[0].address.to_string(), list[0].port));
                }
                Ok(_) | Err(_) if Instant::now() > deadline => {
                    return Err(DriverError::Refused(format!(
                        "no passing postgres primary in consul after {PRIMARY_WAIT:?}"
                    )));
                }
                _ => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    pub(super) async fn clone_primary(
        &self,
        spec: &PostgresSpec,
        pgdata: &Path,
    ) -> Result<String, DriverError> {
        let (host, port) = self.find_primary().await?;
        let slot = slot_name(&self.ctx.node);
        let basebackup = |create_slot: bool| {
            let mut cmd = OneShot::new(
                self.bin("pg_basebackup"),
                &["-h", &host, "-p", &port.to_string(), "-U", REPLICATION_USER],
            )
            .arg("-D")
            .arg(pgdata.display().to_string())
            .arg("-R")
            .arg("-X")
            .arg("stream")
            .arg("--checkpoint=fast")
            .arg("-S")
            .arg(slot.clone())
            .env("PGPASSWORD", spec.replication_password().to_string())
            .env("PGCONNECT_TIMEOUT", "5")
            .run_as(Self::account())
            .timeout(Duration::from_secs(600));
            if create_slot {
                cmd = cmd.arg("-C");
            }
            cmd
        };
        let first = basebackup(true);
        let out = self.ctx.host.run(&first).await?;
        if !out.success {
            if out.stderr.contains("already exists") {
                // Our slot survived an earlier attempt: reuse it.
                self.private_dir(pgdata)?;
                empty_dir(pgdata)?;
                let again = basebackup(false);
                self.ctx.host.run(&again).await?.check(&again)?;
            } else {
                out.check(&first)?;
            }
        }
        Ok(format!("cloned from {host}:{port} into slot {slot}"))
    }

    /// Creates the data directory: a new cluster on the bootstrap node when
    /// none exists anywhere, else a clone of the primary. Made beside the
    /// data dir and renamed into place when complete, so an agent killed
    /// mid-way never leaves a half-made data dir that looks usable.
    pub(super) async fn make_data_dir(&self, spec: &PostgresSpec) -> Result<String, DriverError> {
        let pgdata = self.pgdata();
        let staging = self.ctx.path("pgdata.partial");
        self.private_dir(&staging)?;
        empty_dir(&staging)?;
        let what = if spec.bootstrap && !self.cluster_exists(&spec.leader_key).await? {
            self.initdb(&staging).await?;
            "initialised a new cluster".to_string()
        } else {
            self.clone_primary(spec, &staging).await?
        };
        if pgdata.exists() {
            std::fs::remove_dir_all(&pgdata)
                .map_err(DriverError::io(format!("removing {}", pgdata.display())))?;
        }
        std::fs::rename(&staging, &pgdata)
            .map_err(DriverError::io(format!("renaming {}", staging.display())))?;
        Ok(what)
    }
}
