//! PostgreSQL 15 on the node, as the unprivileged `postgres` account even
//! when the agent is root. The bootstrap node initialises an empty cluster
//! (checksums on, for pg_rewind later) and creates the replication and
//! application roles; every other node clones the primary it finds in Consul
//! with `pg_basebackup -R` into a replication slot of its own and runs as a
//! hot standby. A keeper loop registers the server in Consul tagged with its
//! actual role (checked by SQL through `corral-agent check-postgres`), and
//! the primary holds the leader lock ([`super::leader`]).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_proto::{
    POSTGRES_SERVICE, PostgresSpec, ReplicationMode, ReplicationRole, ReplicationStatus,
};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use super::leader::{LeaderLock, LockState};
use super::{DriverError, NodeContext, mkdir};
use crate::host::{Account, OneShot, ServiceSpec};

pub const SERVICE: &str = "postgres";
/// The role standbys replicate as.
pub const REPLICATION_USER: &str = "replicator";
/// How long a new standby waits for a primary to appear in Consul.
const PRIMARY_WAIT: Duration = Duration::from_secs(300);

pub struct PostgresDriver {
    ctx: Arc<NodeContext>,
    desired: Mutex<Option<PostgresSpec>>,
    leader: LeaderLock,
}

/// A SQL string literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A SQL identifier.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Replication slot names allow only `[a-z0-9_]`.
pub fn slot_name(node: &str) -> String {
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Why `account` cannot reach `path`: every ancestor must be searchable.
pub fn unreachable_ancestor(path: &Path, account: &Account) -> Option<PathBuf> {
    let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
    ancestors.reverse();
    for dir in ancestors {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        let mode = meta.permissions().mode();
        let ok = if meta.uid() == account.uid {
            mode & 0o100 != 0
        } else if meta.gid() == account.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            return Some(dir.to_path_buf());
        }
    }
    None
}

impl PostgresDriver {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        let leader = LeaderLock::new(
            ctx.consul.clone(),
            &ctx.node,
            ctx.path("run/postgres-leader-session"),
        );
        Self {
            ctx,
            desired: Mutex::new(None),
            leader,
        }
    }

    pub fn pgdata(&self) -> PathBuf {
        self.ctx.path("pgdata")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.ctx.path("pgsock")
    }

    fn service_id(&self) -> String {
        format!("{POSTGRES_SERVICE}-{}", self.ctx.node)
    }

    fn check_id(&self) -> String {
        format!("service:{}", self.service_id())
    }

    fn account() -> Option<Account> {
        if nix::unistd::geteuid().is_root() {
            Account::lookup("postgres")
        } else {
            None
        }
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.ctx.bins.pg_bin.join(name)
    }

    fn service_spec(&self, spec: &PostgresSpec) -> ServiceSpec {
        let pgdata = self.pgdata().display().to_string();
        let mut args = vec!["-D".to_string(), pgdata.clone()];
        for (k, v) in [
            ("listen_addresses", self.ctx.address.clone()),
            ("port", spec.port.to_string()),
            (
                "unix_socket_directories",
                self.socket_dir().display().to_string(),
            ),
            ("wal_level", "replica".into()),
            ("max_wal_senders", "10".into()),
            ("max_replication_slots", "10".into()),
            ("hot_standby", "on".into()),
            ("wal_log_hints", "on".into()),
            ("hba_file", format!("{pgdata}/pg_hba.conf")),
        ] {
            args.push("-c".into());
            args.push(format!("{k}={v}"));
        }
        ServiceSpec {
            name: SERVICE.into(),
            program: self.bin("postgres"),
            args,
            env: Vec::new(),
            run_as: Self::account(),
            marker: pgdata,
            // Fast shutdown: roll back sessions, checkpoint, exit.
            stop_signal: Signal::SIGINT,
        }
    }

    /// `psql` on the local socket as the superuser (trust: the socket
    /// directory is private to the postgres account).
    fn psql(&self, port: u16, sql: &str) -> OneShot {
        OneShot::new(
            self.bin("psql"),
            &[
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-d",
                "postgres",
            ],
        )
        .arg("-h")
        .arg(self.socket_dir().display().to_string())
        .arg("-p")
        .arg(port.to_string())
        .arg("-c")
        .arg(sql)
        .timeout(Duration::from_secs(10))
    }

    async fn query(&self, port: u16, sql: &str) -> Result<String, DriverError> {
        let cmd = self.psql(port, sql);
        let out = self.ctx.host.run(&cmd).await?.check(&cmd)?;
        Ok(out.stdout.trim().to_string())
    }

    /// Makes `dir` exist, owned by the postgres account, mode 0700.
    fn private_dir(&self, dir: &Path) -> Result<(), DriverError> {
        mkdir(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(DriverError::io(format!("chmod {}", dir.display())))?;
        if let Some(a) = Self::account() {
            nix::unistd::chown(
                dir,
                Some(nix::unistd::Uid::from_raw(a.uid)),
                Some(nix::unistd::Gid::from_raw(a.gid)),
            )
            .map_err(|e| DriverError::Refused(format!("chown {}: {e}", dir.display())))?;
        }
        Ok(())
    }

    fn check_reachable(&self) -> Result<(), DriverError> {
        if let Some(account) = Self::account()
            && let Some(dir) = unreachable_ancestor(&self.pgdata(), &account)
        {
            return Err(DriverError::Refused(format!(
                "the {} account cannot reach {}: {} is not searchable by it (chmod o+x it, or use another --state-dir)",
                account.name,
                self.pgdata().display(),
                dir.display()
            )));
        }
        Ok(())
    }

    async fn wait_ready(&self, port: u16) -> Result<(), DriverError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.query(port, "SELECT 1").await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(DriverError::Refused(format!(
                        "postgres did not accept connections within 60s: {e}"
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn initdb(&self, pgdata: &Path) -> Result<(), DriverError> {
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

    async fn create_roles(&self, spec: &PostgresSpec) -> Result<(), DriverError> {
        let sql = format!(
            "DO $$BEGIN \
             IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {repl_lit}) THEN CREATE ROLE {repl} WITH REPLICATION LOGIN; END IF; \
             IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {user_lit}) THEN CREATE ROLE {user} WITH LOGIN; END IF; \
             END$$; \
             ALTER ROLE {repl} WITH PASSWORD {pw}; ALTER ROLE {user} WITH PASSWORD {pw};",
            repl_lit = literal(REPLICATION_USER),
            repl = ident(REPLICATION_USER),
            user_lit = literal(&spec.user),
            user = ident(&spec.user),
            pw = literal(&spec.password),
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
                    "CREATE DATABASE {} OWNER {}",
                    ident(&spec.database),
                    ident(&spec.user)
                ),
            )
            .await?;
        }
        Ok(())
    }

    /// Sync: commits wait for any one standby. Set with ALTER SYSTEM and a
    /// reload, so switching modes restarts nothing; standbys copy the
    /// setting with the data and it takes effect if they are promoted.
    async fn set_replication_mode(&self, spec: &PostgresSpec) -> Result<(), DriverError> {
        let sql = match spec.replication {
            ReplicationMode::Sync => "ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (*)'",
            ReplicationMode::Async => "ALTER SYSTEM RESET synchronous_standby_names",
        };
        self.query(spec.port, sql).await?;
        self.query(spec.port, "SELECT pg_reload_conf()").await?;
        Ok(())
    }

    /// Drops the slots of standbys that left the cluster: inactive slots
    /// named after no node in Consul's catalog (a drained node leaves it; a
    /// node that merely crashed, or is still cloning, stays in it), so the
    /// primary does not keep their WAL forever.
    async fn drop_orphan_slots(&self, port: u16) -> Result<(), DriverError> {
        let inactive = self
            .query(
                port,
                "SELECT slot_name FROM pg_replication_slots WHERE NOT active AND slot_type = 'physical'",
            )
            .await?;
        if inactive.is_empty() {
            return Ok(());
        }
        let known: Vec<String> = self
            .ctx
            .consul
            .catalog_nodes()
            .await?
            .iter()
            .map(|n| slot_name(n))
            .collect();
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

    /// Whether a PostgreSQL cluster already runs somewhere: a leader lock
    /// is held or a primary is registered. A bootstrap node whose data was
    /// lost must clone that cluster, never start a second one. Waits for
    /// Consul to have a leader (it cannot answer before).
    async fn cluster_exists(&self, leader_key: &str) -> Result<bool, DriverError> {
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
    async fn find_primary(&self) -> Result<(String, u16), DriverError> {
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
                    return Ok((list[0].address.clone(), list[0].port));
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

    async fn clone_primary(
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
            .env("PGPASSWORD", spec.password.clone())
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

    #[tracing::instrument(skip_all, fields(node = %self.ctx.node))]
    pub async fn apply(&self, spec: &PostgresSpec) -> Result<String, DriverError> {
        self.check_reachable()?;
        let pgdata = self.pgdata();
        self.private_dir(&self.socket_dir())?;
        let mut what = String::new();
        if !pgdata.join("PG_VERSION").exists() {
            // Made beside the data dir and renamed into place when complete,
            // so an agent killed mid-way never leaves a half-made data dir
            // that looks usable; the next attempt starts the staging afresh.
            let staging = self.ctx.path("pgdata.partial");
            self.private_dir(&staging)?;
            empty_dir(&staging)?;
            if spec.bootstrap && !self.cluster_exists(&spec.leader_key).await? {
                self.initdb(&staging).await?;
                what = "initialised a new cluster".into();
            } else {
                what = self.clone_primary(spec, &staging).await?;
            }
            if pgdata.exists() {
                std::fs::remove_dir_all(&pgdata)
                    .map_err(DriverError::io(format!("removing {}", pgdata.display())))?;
            }
            std::fs::rename(&staging, &pgdata)
                .map_err(DriverError::io(format!("renaming {}", staging.display())))?;
        }
        let ensured = self.ctx.host.ensure(&self.service_spec(spec)).await?;
        self.wait_ready(spec.port).await?;
        let in_recovery = self.query(spec.port, "SELECT pg_is_in_recovery()").await? == "t";
        if !in_recovery {
            self.create_roles(spec).await?;
            self.set_replication_mode(spec).await?;
        }
        *self.desired.lock().expect("lock") = Some(spec.clone());
        // Register at once when Consul is up; the keeper retries otherwise.
        let _ = self.keep().await;
        let role = if in_recovery { "replica" } else { "primary" };
        Ok(format!(
            "postgres {ensured:?} as {role} on {}:{}{}{}",
            self.ctx.address,
            spec.port,
            if what.is_empty() { "" } else { "; " },
            what
        )
        .to_lowercase())
    }

    /// The Consul definition of this server with the role it has now, as a
    /// configuration file (script checks are refused over HTTP).
    fn registration(&self, port: u16, role: &str) -> Value {
        json!({ "service": {
            "id": self.service_id(),
            "name": POSTGRES_SERVICE,
            "address": self.ctx.address,
            "port": port,
            "tags": [role],
            "check": {
                "id": self.check_id(),
                "name": format!("postgres is {role} (SQL)"),
                "args": [
                    self.ctx.bins.agent.display().to_string(),
                    "check-postgres",
                    "--pg-bin", self.ctx.bins.pg_bin.display().to_string(),
                    "--socket-dir", self.socket_dir().display().to_string(),
                    "--port", port.to_string(),
                    "--expect", role,
                ],
                "interval": "2s",
                "timeout": "5s",
                "deregister_critical_service_after": "30m",
            },
        }})
    }

    fn registration_file(&self) -> PathBuf {
        self.ctx
            .path(crate::drivers::consul::CONF_DIR)
            .join("postgres.json")
    }

    /// One round of the keeper: registration with the right tag, and the
    /// leader lock while primary.
    async fn keep(&self) -> Result<(), DriverError> {
        let Some(spec) = self.desired.lock().expect("lock").clone() else {
            return Ok(());
        };
        let role = match self.query(spec.port, "SELECT pg_is_in_recovery()").await? {
            r if r == "f" => "primary",
            _ => "replica",
        };
        let tags = self
            .ctx
            .consul
            .local_service_tags(&self.service_id())
            .await?;
        if tags.as_deref() != Some(&[role.to_string()][..]) {
            let text =
                serde_json::to_string_pretty(&self.registration(spec.port, role)).expect("json");
            super::write_if_changed(&self.registration_file(), &text, 0o644)?;
            self.ctx.consul.reload().await?;
            tracing::info!(role, "registered postgres in consul");
        }
        if role == "primary" {
            if let Err(e) = self.drop_orphan_slots(spec.port).await {
                tracing::debug!(error = %e, "checking replication slots");
            }
            match self.leader.hold(&spec.leader_key, &self.check_id()).await? {
                LockState::Held => {}
                LockState::HeldElsewhere(s) => {
                    tracing::warn!(session = %s, "another node holds the leader lock")
                }
                LockState::Pending(why) => tracing::debug!(%why, "leader lock pending"),
            }
        }
        Ok(())
    }

    /// Runs forever: keeps the registration and the lock.
    pub async fn keeper(self: Arc<Self>) {
        loop {
            if let Err(e) = self.keep().await {
                tracing::debug!(error = %e, "postgres keeper");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Role, lag and timeline for the heartbeat, when PostgreSQL answers.
    pub async fn replication(&self) -> Option<ReplicationStatus> {
        let port = self.desired.lock().expect("lock").as_ref()?.port;
        let row = self
            .query(
                port,
                "SELECT pg_is_in_recovery(), (SELECT timeline_id FROM pg_control_checkpoint()), \
                 CASE WHEN pg_is_in_recovery() \
                 THEN COALESCE(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0) \
                 ELSE COALESCE((SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)) FROM pg_stat_replication), 0) END",
            )
            .await
            .ok()?;
        let mut cols = row.split('|');
        let role = match cols.next()? {
            "t" => ReplicationRole::Replica,
            _ => ReplicationRole::Primary,
        };
        let timeline = cols.next().and_then(|t| t.parse().ok());
        let lag_bytes = cols
            .next()
            .and_then(|l| l.parse::<f64>().ok())
            .map(|l| l.max(0.0) as u64);
        Some(ReplicationStatus {
            role,
            lag_bytes,
            timeline,
        })
    }

    /// Deregisters (so webapps stop using it), releases the lock and stops
    /// PostgreSQL with a fast shutdown (drain).
    pub async fn stop(&self) -> Result<(), DriverError> {
        if self.desired.lock().expect("lock").take().is_some() {
            let _ = std::fs::remove_file(self.registration_file());
            let _ = self.ctx.consul.deregister_service(&self.service_id()).await;
            self.leader.release().await;
        }
        self.ctx.host.stop(SERVICE).await?;
        Ok(())
    }
}

fn empty_dir(dir: &Path) -> Result<(), DriverError> {
    let entries =
        std::fs::read_dir(dir).map_err(DriverError::io(format!("listing {}", dir.display())))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let result = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        result.map_err(DriverError::io(format!("removing {}", path.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_quoting_doubles_quotes() {
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn slot_names_are_sql_safe() {
        assert_eq!(slot_name("pg-2"), "pg_2");
        assert_eq!(slot_name("pg12"), "pg12");
    }

    #[test]
    fn a_private_ancestor_is_named() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let locked = dir.path().join("locked");
        std::fs::create_dir(&locked).expect("mkdir");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let nobody = Account {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        let target = locked.join("state/pgdata");
        assert_eq!(unreachable_ancestor(&target, &nobody), Some(locked));
    }
}
