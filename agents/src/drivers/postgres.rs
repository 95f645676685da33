//! PostgreSQL 15 on the node, as the unprivileged `postgres` account even
//! when the agent is root. The bootstrap node initialises an empty cluster
//! (checksums on, for pg_rewind) and creates the replication and
//! application roles; every other node clones the primary it finds in Consul
//! with `pg_basebackup` into a replication slot of its own and runs as a hot
//! standby.
//!
//! After that the HA loop ([`PostgresDriver::ha_loop`], decisions in
//! [`super::ha`]) owns the server: only the holder of the Consul leader lock
//! runs as primary; a primary that loses the lock, or cannot confirm it for
//! [`FENCE_AFTER`], stops itself (fencing); when the lock is free the best
//! standby takes it and promotes; the others follow the new primary, and a
//! former primary is rewound with `pg_rewind` (or cloned afresh) and rejoins
//! as a standby. The supervisor never restarts PostgreSQL on its own.

use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_proto::{
    POSTGRES_SERVICE, PostgresSpec, ReplicationRole, ReplicationStatus, SwitchoverSpec,
};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use super::ha::{self, FENCE_AFTER, Keys, Member, MemberRole};

/// How often a primary confirms its lock apart from the HA step.
const CONFIRM_EVERY: Duration = Duration::from_millis(250);
/// How long after its local Consul agent stopped answering a primary may
/// still confirm its lock through a Consul server. Its lock's session dies
/// only once the cluster's gossip declares the node failed (with Consul's
/// LAN defaults at least ~4.5 s after the agent went: a failed probe, then
/// a 4 s suspicion), and nobody may take the lock for [`super::ha::LOCK_DELAY`]
/// after that; so a primary whose agent is gone fences at the latest
/// `REMOTE_GRACE + FENCE_AFTER` = 4 s after, before anyone can promote
/// (≥ 5.5 s), yet rides out a local agent restart of a second or two.
const REMOTE_GRACE: Duration = Duration::from_secs(2);
use super::dcs::{ConsulDcs, Dcs};
use super::leader::{ALIVE_CHECK, LeaderLock, LockState};
use super::{DriverError, NodeContext, mkdir};
use crate::host::{Account, HostError, OneShot, ServiceSpec};

pub const SERVICE: &str = "postgres";
/// The role standbys replicate as: REPLICATION and LOGIN, nothing else.
pub const REPLICATION_USER: &str = "replicator";
/// The role pg_rewind reads the new primary's files as: LOGIN plus the
/// four functions pg_rewind calls, and no replication.
pub const REWIND_USER: &str = "rewinder";
/// How long a new standby waits for a primary to appear in Consul.
const PRIMARY_WAIT: Duration = Duration::from_secs(300);

/// PostgreSQL's counters as the metrics sampler reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgActivity {
    pub commits: u64,
    pub connections: u64,
    pub lag_bytes: u64,
}

pub struct PostgresDriver {
    ctx: Arc<NodeContext>,
    desired: Mutex<Option<PostgresSpec>>,
    /// The cluster's DCS (Consul KV): snapshot, member records, the leader
    /// lock, the switchover record.
    dcs: Arc<dyn Dcs>,
    /// Held by one HA step or a switchover at a time.
    ha: tokio::sync::Mutex<()>,
    /// While primary: when the lock was last confirmed ours.
    confirmed: Mutex<Option<Instant>>,
    /// The roles and the app database were made (or checked) as primary in
    /// this agent's life.
    roles_made: std::sync::atomic::AtomicBool,
    /// Since when a running primary has been seen that this agent never
    /// confirmed the lock for (one it adopted after a restart, say): the
    /// watchdog fences it too once that is older than [`FENCE_AFTER`], so an
    /// agent restarted while Consul is unreachable cannot leave a writable
    /// primary behind.
    unconfirmed_since: Mutex<Option<Instant>>,
    /// Since when the local Consul agent has not answered the confirmer.
    local_consul_down_since: Mutex<Option<Instant>>,
    /// The lock holder as last seen, for the heartbeat.
    seen_leader: Mutex<Option<String>>,
    /// A standby's streaming last worked then (or it started then).
    streamed_at: Mutex<Option<Instant>>,
    /// Sync mode has fallen back to asynchronous commits.
    degraded: Mutex<bool>,
    /// pg_rewind attempts that failed in a row.
    rewind_failures: Mutex<u32>,
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
            dcs: Arc::new(ConsulDcs::new(ctx.consul.clone(), leader)),
            ctx,
            desired: Mutex::new(None),
            ha: tokio::sync::Mutex::new(()),
            confirmed: Mutex::new(None),
            roles_made: std::sync::atomic::AtomicBool::new(false),
            unconfirmed_since: Mutex::new(None),
            local_consul_down_since: Mutex::new(None),
            seen_leader: Mutex::new(None),
            streamed_at: Mutex::new(None),
            degraded: Mutex::new(false),
            rewind_failures: Mutex::new(0),
        }
    }

    pub fn pgdata(&self) -> PathBuf {
        self.ctx.path("pgdata")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.ctx.path("pgsock")
    }

    /// Where `archive_command` puts each finished WAL segment until the
    /// agent has shipped it to adm1's store.
    pub fn spool_dir(&self) -> PathBuf {
        self.ctx.path("wal-spool")
    }

    /// The PostgreSQL order this node runs, if any.
    pub fn desired_spec(&self) -> Option<PostgresSpec> {
        self.desired.lock().expect("lock").clone()
    }

    fn service_id(&self) -> String {
        format!("{POSTGRES_SERVICE}-{}", self.ctx.node)
    }

    fn check_id(&self) -> String {
        format!("service:{}", self.service_id())
    }

    pub(crate) fn account() -> Option<Account> {
        if nix::unistd::geteuid().is_root() {
            Account::lookup("postgres")
        } else {
            None
        }
    }

    pub(crate) fn bin(&self, name: &str) -> PathBuf {
        self.ctx.bins.pg_bin.join(name)
    }

    fn service_spec(&self, spec: &PostgresSpec) -> ServiceSpec {
        let pgdata = self.pgdata().display().to_string();
        let mut args = vec!["-D".to_string(), pgdata.clone()];
        for (k, v) in [
            ("listen_addresses", self.ctx.address.to_string()),
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
            // A former primary rewinds by reading its own WAL back to the
            // last checkpoint before the timelines forked: keep enough that
            // a checkpoint after the fork has not recycled it (else
            // pg_rewind fails and the node is cloned whole).
            ("wal_keep_size", "256MB".into()),
            // A standby retries its primary (a new one after a failover)
            // every half second instead of every five.
            ("wal_retrieve_retry_interval", "500ms".into()),
            ("hba_file", format!("{pgdata}/pg_hba.conf")),
            // Every finished segment goes to the spool (only a primary
            // archives), which the agent ships to adm1's store: point-in-
            // time restores replay it. A copy that fails fails the command,
            // so PostgreSQL keeps the segment and tries again.
            ("archive_mode", "on".into()),
            ("archive_command", self.archive_command()),
            // A quiet primary still ships its last writes within a minute.
            ("archive_timeout", "60s".into()),
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
            restart: false,
        }
    }

    /// The shell command PostgreSQL runs per finished WAL file.
    fn archive_command(&self) -> String {
        let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "'\\''"));
        format!(
            "{} archive-wal --spool {} %p %f",
            quote(&self.ctx.bins.agent),
            quote(&self.spool_dir())
        )
    }

    /// `psql` on the local socket as the superuser (trust: the socket
    /// directory is private to the postgres account). The SQL goes in on
    /// stdin, never on the command line: it may carry the database password
    /// (roles, `primary_conninfo`), and a command line is visible to every
    /// local user in `ps` and ends up in error messages.
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
        // Terminated, as a script's last statement must be.
        .stdin(format!("{};\n", sql.trim_end().trim_end_matches(';')))
        .timeout(Duration::from_secs(10))
    }

    async fn query(&self, port: u16, sql: &str) -> Result<String, DriverError> {
        let cmd = self.psql(port, sql);
        let out = self
            .ctx
            .host
            .run(&cmd)
            .await?
            .check(&cmd)
            .map_err(|e| match e {
                // psql quotes the statement it failed on ("LINE 1: ALTER
                // ROLE … PASSWORD '…'"): not for order results and logs.
                HostError::Failed { command, output } => HostError::Failed {
                    command,
                    output: redact_passwords(&output),
                },
                other => other,
            })?;
        Ok(out.stdout.trim().to_string())
    }

    /// Makes `dir` exist, owned by the postgres account, mode 0700.
    pub(crate) fn private_dir(&self, dir: &Path) -> Result<(), DriverError> {
        mkdir(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(DriverError::io(format!("chmod {}", dir.display())))?;
        self.give(dir)
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

    /// The application's role and the two replication roles, each with
    /// the least it needs: the webapp's password opens neither replication
    /// role, `replicator` can stream but read no file, `rewinder` can read
    /// the files pg_rewind needs but not stream. (A cluster made before the
    /// split had `replicator` holding the file functions: they are revoked.)
    async fn create_roles(&self, spec: &PostgresSpec) -> Result<(), DriverError> {
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

    /// Drops the slots of standbys that left the cluster: inactive slots
    /// named after no node in Consul's catalog (a drained node leaves it; a
    /// node that merely crashed, or is still cloning, stays in it), so the
    /// primary does not keep their WAL forever.
    async fn drop_orphan_slots(&self, port: u16, catalog: &[String]) -> Result<(), DriverError> {
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
    async fn make_data_dir(&self, spec: &PostgresSpec) -> Result<String, DriverError> {
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

    /// Sets up the node's PostgreSQL: makes the data dir when there is none
    /// and starts it; an existing one is adopted if it runs and otherwise
    /// left to the HA loop, which decides whether it may come back as
    /// primary (only with the leader lock) or as a standby.
    #[tracing::instrument(skip_all, fields(node = %self.ctx.node))]
    pub async fn apply(&self, spec: &PostgresSpec) -> Result<String, DriverError> {
        let (what, running) = {
            let _ha = self.ha.lock().await;
            self.check_reachable()?;
            self.private_dir(&self.socket_dir())?;
            self.private_dir(&self.spool_dir())?;
            let fresh = !self.pgdata().join("PG_VERSION").exists();
            // The HA loop owns the server from here (and takes the new
            // replication mode at once), also when making the data dir
            // fails below (a clone while no primary answers): it makes it
            // again each tick, so a transient failure never strands the
            // node until the next topology change.
            *self.desired.lock().expect("lock") = Some(spec.clone());
            let mut what = String::new();
            if fresh {
                what = self.make_data_dir(spec).await?;
            }
            let service = self.service_spec(spec);
            let running = if fresh {
                self.ctx.host.ensure(&service).await?;
                true
            } else {
                self.ctx.host.adopt(&service).await?
            };
            (what, running)
        };
        let mut role = "stopped: the HA loop brings it back";
        if running {
            self.wait_ready(spec.port).await?;
            let in_recovery = self.query(spec.port, "SELECT pg_is_in_recovery()").await? == "t";
            if in_recovery {
                role = "replica";
            } else {
                self.create_roles(spec).await?;
                self.roles_made
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                role = "primary";
            }
        }
        Ok(format!(
            "postgres on {}:{} ({role}, {} replication){}{}",
            self.ctx.address,
            spec.port,
            spec.replication,
            if what.is_empty() { "" } else { "; " },
            what
        ))
    }

    /// The Consul definition of this server with the role it has now, as a
    /// configuration file (script checks are refused over HTTP), and the
    /// role-agnostic check the leader session is bound to.
    fn registration(&self, port: u16, role: &str) -> Value {
        let check_args = |expect: &str| {
            json!([
                self.ctx.bins.agent.display().to_string(),
                "check-postgres",
                "--pg-bin",
                self.ctx.bins.pg_bin.display().to_string(),
                "--socket-dir",
                self.socket_dir().display().to_string(),
                "--port",
                port.to_string(),
                "--expect",
                expect,
            ])
        };
        let mut definition = json!({
            "service": {
                "id": self.service_id(),
                "name": POSTGRES_SERVICE,
                "address": self.ctx.address,
                "port": port,
                "tags": [role],
                "check": {
                    "id": self.check_id(),
                    "name": format!("postgres is {role} (SQL)"),
                    "args": check_args(role),
                    "interval": "1s",
                    "timeout": "3s",
                    "deregister_critical_service_after": "30m",
                },
            },
            "check": {
                "id": ALIVE_CHECK,
                "name": "postgres answers SQL (leader session)",
                "args": check_args("any"),
                "interval": "1s",
                "timeout": "3s",
                // A restarted Consul agent starts a script check critical
                // until its first run, and the leader session (bound to this
                // check) dies with it: a primary fenced itself over every
                // local Consul agent restart. Passing until the first run, a
                // second at most; the first run decides.
                "status": "passing",
            },
        });
        // Consul syncs the service and its checks to the catalog with the
        // service's own token: the node's, which may write `postgres`.
        if let Some(token) = self.ctx.consul.token() {
            definition["service"]["token"] = json!(token);
            definition["check"]["token"] = json!(token);
        }
        definition
    }

    fn registration_file(&self) -> PathBuf {
        self.ctx
            .path(crate::drivers::consul::CONF_DIR)
            .join("postgres.json")
    }

    /// Registers the server in Consul tagged with `role`, if not already.
    async fn register(&self, port: u16, role: &str) -> Result<(), DriverError> {
        let text = serde_json::to_string_pretty(&self.registration(port, role)).expect("json");
        let changed = super::write_if_changed(&self.registration_file(), &text, 0o600)?;
        let tags = self
            .ctx
            .consul
            .local_service_tags(&self.service_id())
            .await?;
        if changed || tags.as_deref() != Some(&[role.to_string()][..]) {
            self.ctx.consul.reload().await?;
            tracing::info!(role, "registered postgres in consul");
        }
        Ok(())
    }

    fn rejoin_marker(&self) -> PathBuf {
        self.ctx.path("run/postgres-rejoin")
    }

    /// Remembers that this data dir was a primary's that lost its role: it
    /// must be rewound before it may follow another primary.
    fn mark_rejoin(&self) {
        if let Err(e) = crate::durable::write_atomic(&self.rejoin_marker(), b"rejoin\n", 0o600) {
            tracing::error!(error = %e, "cannot record that postgres must rejoin");
        }
    }

    fn rejoin_marked(&self) -> bool {
        self.rejoin_marker().exists()
    }

    fn clear_rejoin(&self) {
        let _ = std::fs::remove_file(self.rejoin_marker());
    }

    /// Gives `path` to the postgres account.
    pub(crate) fn give(&self, path: &Path) -> Result<(), DriverError> {
        if let Some(a) = Self::account() {
            nix::unistd::chown(
                path,
                Some(nix::unistd::Uid::from_raw(a.uid)),
                Some(nix::unistd::Gid::from_raw(a.gid)),
            )
            .map_err(|e| DriverError::Refused(format!("chown {}: {e}", path.display())))?;
        }
        Ok(())
    }

    fn write_standby_signal(&self) -> Result<(), DriverError> {
        let path = self.pgdata().join("standby.signal");
        if !path.exists() {
            std::fs::write(&path, b"")
                .map_err(DriverError::io(format!("writing {}", path.display())))?;
            self.give(&path)?;
        }
        Ok(())
    }

    /// Sets `key = 'value'` lines in `postgresql.auto.conf` of the stopped
    /// server (ALTER SYSTEM's file); an empty value removes the key.
    fn set_auto_conf(&self, settings: &[(&str, &str)]) -> Result<(), DriverError> {
        let path = self.pgdata().join("postgresql.auto.conf");
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let mut out: Vec<String> = old
            .lines()
            .filter(|line| {
                let key = line.split('=').next().unwrap_or("").trim();
                !settings.iter().any(|(k, _)| *k == key)
            })
            .map(String::from)
            .collect();
        for (k, v) in settings {
            if !v.is_empty() {
                out.push(format!("{k} = {}", literal(v)));
            }
        }
        let text = out.join("\n") + "\n";
        crate::durable::write_atomic(&path, text.as_bytes(), 0o600)
            .map_err(DriverError::io(format!("writing {}", path.display())))?;
        self.give(&path)
    }

    /// How a standby of this node connects to the primary at `address`.
    fn conninfo(&self, spec: &PostgresSpec, address: IpAddr, port: u16) -> String {
        format!(
            "host={address} port={port} user={REPLICATION_USER} password={} application_name={} connect_timeout=2",
            conninfo_value(spec.replication_password()),
            conninfo_value(&self.ctx.node)
        )
    }

    /// One SQL round trip: role, timeline, WAL position, standbys, settings.
    async fn local(&self, port: u16) -> Result<ha::SqlStatus, DriverError> {
        let row = self.query(port, ha::STATUS_QUERY).await?;
        ha::SqlStatus::parse(&row).map_err(DriverError::Refused)
    }

    /// Runs forever: the HA loop, the lock confirmer and the fencing
    /// watchdog.
    pub async fn keeper(self: Arc<Self>) {
        tokio::spawn(self.clone().watchdog());
        tokio::spawn(self.clone().confirmer());
        loop {
            if let Err(e) = self.step().await {
                tracing::debug!(error = %e, "postgres HA step");
            }
            tokio::time::sleep(ha::TICK).await;
        }
    }

    /// Confirms a primary's lock on its own clock, every [`CONFIRM_EVERY`],
    /// with one Consul read, outside the HA mutex. The HA step confirms too,
    /// but one step (psql, about ten Consul calls, a reload) can take longer
    /// than [`FENCE_AFTER`] on a loaded machine, and a healthy primary
    /// fenced itself. Only a primary that confirmed its lock before is kept
    /// confirmed: this never makes a node primary, and a fence between the
    /// read and the write wins (both hold the same mutex).
    async fn confirmer(self: Arc<Self>) {
        loop {
            tokio::time::sleep(CONFIRM_EVERY).await;
            if self.confirmed.lock().expect("lock").is_none() {
                continue;
            }
            let Some(keys) = self
                .desired
                .lock()
                .expect("lock")
                .as_ref()
                .map(|s| Keys::new(&s.leader_key))
            else {
                continue;
            };
            if self.dcs.session().is_none() {
                continue;
            }
            let asked = Instant::now();
            let (held, local) = self.dcs.confirm_lock(&keys).await.unwrap_or((false, false));
            // Through a server only within REMOTE_GRACE of the local agent's
            // last answer (see there why that is safe).
            let within_grace = {
                let mut down = self.local_consul_down_since.lock().expect("lock");
                if local {
                    *down = None;
                    true
                } else {
                    asked.duration_since(*down.get_or_insert(asked)) <= REMOTE_GRACE
                }
            };
            if held && within_grace {
                let mut confirmed = self.confirmed.lock().expect("lock");
                if let Some(last) = *confirmed {
                    // As of when we asked: a slow answer confirms no later.
                    *confirmed = Some(last.max(asked));
                }
            }
        }
    }

    /// Stops a primary whose lock has not been confirmed for [`FENCE_AFTER`]
    /// — also while the HA step hangs on an unresponsive Consul.
    async fn watchdog(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let confirmed = *self.confirmed.lock().expect("lock");
            let unconfirmed = *self.unconfirmed_since.lock().expect("lock");
            let stale = confirmed
                .or(unconfirmed)
                .is_some_and(|t| t.elapsed() > FENCE_AFTER);
            if stale {
                self.fence(&format!(
                    "the leader lock could not be confirmed for {FENCE_AFTER:?} (Consul unreachable?)"
                ))
                .await;
            }
        }
    }

    /// Stops PostgreSQL at once: it may no longer take writes. It comes back
    /// as a standby, rewound first.
    async fn fence(&self, why: &str) {
        *self.confirmed.lock().expect("lock") = None;
        *self.unconfirmed_since.lock().expect("lock") = None;
        tracing::error!(why, "fencing: stopping the primary");
        self.mark_rejoin();
        if let Err(e) = self.ctx.host.stop(SERVICE).await {
            tracing::error!(error = %e, "fencing: stopping postgres failed");
        }
        if let Err(e) = self.write_standby_signal() {
            tracing::error!(error = %e, "fencing: cannot write standby.signal");
        }
    }

    /// One round of the HA loop: one status query, one snapshot of the
    /// cluster, one decision ([`ha::decide`]), then act on it.
    async fn step(&self) -> Result<(), DriverError> {
        let Some(spec) = self.desired.lock().expect("lock").clone() else {
            return Ok(());
        };
        let _ha = self.ha.lock().await;
        let keys = Keys::new(&spec.leader_key);
        let local = self.local_status(&spec).await?;
        {
            // Start the fencing clock of a primary whose lock this agent has
            // not confirmed yet, before asking the DCS anything.
            let primary = local.sql.as_ref().is_some_and(|l| !l.in_recovery);
            let confirmed = self.confirmed.lock().expect("lock").is_some();
            let mut since = self.unconfirmed_since.lock().expect("lock");
            if primary && !confirmed {
                since.get_or_insert_with(Instant::now);
            } else {
                *since = None;
            }
        }
        // The DCS unreachable: do nothing; the watchdog fences a primary.
        let view = self.dcs.snapshot(&keys).await?;
        *self.seen_leader.lock().expect("lock") = view.holder().map(String::from);
        let me = ha::member_record(
            &self.ctx.node,
            self.ctx.address,
            spec.port,
            local.sql.as_ref(),
            view.member(&self.ctx.node),
            ha::now_ms(),
        );
        self.dcs.publish(&keys, &me).await?;
        let view = view.with_member(&me);
        let not_streaming_for = match &local.sql {
            Some(sql) if sql.in_recovery => {
                let mut at = self.streamed_at.lock().expect("lock");
                if sql.receiving || at.is_none() {
                    *at = Some(Instant::now());
                }
                at.map_or(Duration::ZERO, |t| t.elapsed())
            }
            _ => Duration::ZERO,
        };
        let memory = ha::Memory {
            node: self.ctx.node.clone(),
            mode: spec.replication,
            session: self.dcs.session(),
            confirmed: self.confirmed.lock().expect("lock").is_some(),
            not_streaming_for,
        };
        let action = ha::decide(&view, &local, &memory);
        self.act(&spec, &keys, &view, &local, &me, action).await
    }

    /// The local server as one tick sees it.
    async fn local_status(&self, spec: &PostgresSpec) -> Result<ha::LocalStatus, DriverError> {
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

    /// Carries out the decision of a tick.
    async fn act(
        &self,
        spec: &PostgresSpec,
        keys: &Keys,
        view: &ha::ClusterView,
        local: &ha::LocalStatus,
        me: &Member,
        action: ha::Action,
    ) -> Result<(), DriverError> {
        use ha::Action;
        match &local.sql {
            Some(sql) if sql.in_recovery && !matches!(action, Action::EndStaleSession(_)) => {
                *self.confirmed.lock().expect("lock") = None;
                *self.degraded.lock().expect("lock") = false;
                self.register(spec.port, "replica").await?;
            }
            None if !local.running => *self.confirmed.lock().expect("lock") = None,
            _ => {}
        }
        match action {
            Action::Wait(why) => {
                tracing::debug!(%why, "postgres HA: waiting");
                Ok(())
            }
            Action::Abstain(why) => {
                tracing::info!(%why, "the leader lock is free; not promoting");
                Ok(())
            }
            Action::EndStaleSession(stale) => {
                tracing::warn!(session = %stale, "ending a leader session this node no longer knows");
                self.dcs.end_stale_session(&stale).await?;
                Ok(())
            }
            Action::TakeLockAsPrimary => {
                // A new cluster, or a restarted agent whose session died:
                // the lock is free, take it.
                self.register(spec.port, "primary").await?;
                match self.dcs.take_lock(keys).await? {
                    LockState::Held => {
                        let clear = view
                            .switchover
                            .as_ref()
                            .is_some_and(|s| s.to == self.ctx.node);
                        self.lead(spec, keys, view, local, clear).await
                    }
                    LockState::Pending(why) => {
                        tracing::debug!(%why, "leader lock pending");
                        Ok(())
                    }
                    LockState::HeldElsewhere(_) => {
                        self.fence("another node took the leader lock").await;
                        Ok(())
                    }
                }
            }
            Action::Lead { clear_switchover } => {
                self.lead(spec, keys, view, local, clear_switchover).await
            }
            Action::Fence(why) => {
                self.fence(&why).await;
                Ok(())
            }
            Action::Promote => self.promote(spec).await,
            Action::TakeLockAndPromote => {
                match self.dcs.take_lock(keys).await? {
                    LockState::Held => {
                        tracing::warn!(
                            "the leader lock was free and this standby is the best candidate: promoting"
                        );
                        self.promote(spec).await?;
                        // Say so at once: a record still saying replica
                        // would count as a standby that stopped reporting.
                        let mut me = me.clone();
                        me.role = MemberRole::Primary;
                        me.at_ms = ha::now_ms();
                        self.dcs.publish(keys, &me).await?;
                    }
                    other => tracing::debug!(?other, "leader lock not taken"),
                }
                Ok(())
            }
            Action::StopToRewind { leader } => {
                // Our history may have forked from the leader's: rewind.
                tracing::warn!(%leader, "cannot follow the leader as is: stopping to rewind");
                self.mark_rejoin();
                self.ctx.host.stop(SERVICE).await?;
                *self.streamed_at.lock().expect("lock") = None;
                Ok(())
            }
            Action::Follow(leader) => match &local.sql {
                Some(sql) => self.follow(spec, sql, &leader).await,
                None => Ok(()),
            },
            Action::Detach => {
                tracing::warn!(
                    "the leader lock is free: no longer streaming from the last primary (it may only be frozen)"
                );
                self.query(spec.port, "ALTER SYSTEM RESET primary_conninfo")
                    .await?;
                self.query(spec.port, "SELECT pg_reload_conf()").await?;
                *self.streamed_at.lock().expect("lock") = Some(Instant::now());
                // Say so at once: the candidate waits for it.
                let mut me = me.clone();
                me.following = false;
                me.at_ms = ha::now_ms();
                self.dcs.publish(keys, &me).await?;
                Ok(())
            }
            Action::MakeDataDir => {
                *self.confirmed.lock().expect("lock") = None;
                let what = self.make_data_dir(spec).await?;
                tracing::info!(%what, "made the data dir");
                Ok(())
            }
            Action::Start {
                was_primary,
                let_go,
                rewind,
                leader,
            } => {
                self.start_stopped(spec, keys, was_primary, let_go, rewind, leader.as_ref())
                    .await
            }
        }
    }

    /// A primary holding the lock: confirm it, register, make the roles
    /// once, clear a switchover record that named it, forget members whose
    /// node left, keep the synchronous standbys and the slots right.
    async fn lead(
        &self,
        spec: &PostgresSpec,
        keys: &Keys,
        view: &ha::ClusterView,
        local: &ha::LocalStatus,
        clear_switchover: bool,
    ) -> Result<(), DriverError> {
        let Some(local) = &local.sql else {
            return Ok(());
        };
        *self.confirmed.lock().expect("lock") = Some(Instant::now());
        self.clear_rejoin();
        self.register(spec.port, "primary").await?;
        // A primary the HA loop started or promoted (its order applied
        // while it was stopped, say) makes the roles and the app database
        // itself, once per agent life.
        if !self.roles_made.load(std::sync::atomic::Ordering::Relaxed) {
            match self.create_roles(spec).await {
                Ok(()) => self
                    .roles_made
                    .store(true, std::sync::atomic::Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "cannot make the roles yet"),
            }
        }
        if clear_switchover {
            self.dcs.clear_switchover(keys).await?;
        }
        // Members whose node left Consul's catalog (drained) are forgotten,
        // in case their own agent could not delete its record.
        let catalog = self.ctx.consul.catalog_nodes().await?;
        let mut live = Vec::new();
        for m in view.members.iter().filter(|m| m.node != self.ctx.node) {
            if catalog.contains(&m.node) {
                live.push(m.clone());
            } else {
                self.dcs.forget(keys, &m.node).await?;
                tracing::info!(node = %m.node, "forgot the member record of a node that left");
            }
        }
        self.manage_sync(spec, local, &live).await?;
        for m in &live {
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
        if let Err(e) = self.drop_orphan_slots(spec.port, &catalog).await {
            tracing::debug!(error = %e, "checking replication slots");
        }
        Ok(())
    }

    /// Commits wait for a standby in `sync` and `strict` mode; `sync` stops
    /// waiting while no standby streams and says so.
    async fn manage_sync(
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

    /// Points a standby at `leader` when it is not already.
    async fn follow(
        &self,
        spec: &PostgresSpec,
        local: &ha::SqlStatus,
        leader: &Member,
    ) -> Result<(), DriverError> {
        let conninfo = self.conninfo(spec, leader.address, leader.port);
        let slot = slot_name(&self.ctx.node);
        if local.conninfo != conninfo || local.slot_name != slot {
            self.query(
                spec.port,
                &format!("ALTER SYSTEM SET primary_conninfo = {}", literal(&conninfo)),
            )
            .await?;
            self.query(
                spec.port,
                &format!("ALTER SYSTEM SET primary_slot_name = {}", literal(&slot)),
            )
            .await?;
            self.query(spec.port, "SELECT pg_reload_conf()").await?;
            *self.streamed_at.lock().expect("lock") = Some(Instant::now());
            tracing::info!(leader = %leader.node, "following the primary");
        }
        Ok(())
    }

    /// Ends recovery: this standby becomes the primary.
    async fn promote(&self, spec: &PostgresSpec) -> Result<(), DriverError> {
        let started = Instant::now();
        self.query(spec.port, "SELECT pg_promote(true, 60)").await?;
        *self.confirmed.lock().expect("lock") = Some(Instant::now());
        self.clear_rejoin();
        // pg_rewind of the old primary reads the new timeline from the
        // control file, which the checkpoint brings up to date.
        self.query(spec.port, "CHECKPOINT").await?;
        self.register(spec.port, "primary").await?;
        tracing::warn!(
            ms = started.elapsed().as_millis() as u64,
            "promoted to primary"
        );
        Ok(())
    }

    /// PostgreSQL is not running: it comes back as a standby (of the leader
    /// if there is one), rewound first if it was a primary.
    async fn start_stopped(
        &self,
        spec: &PostgresSpec,
        keys: &Keys,
        was_primary: bool,
        let_go: bool,
        rewind: bool,
        leader: Option<&Member>,
    ) -> Result<(), DriverError> {
        if was_primary {
            // It ran as primary and died (or was stopped with the node).
            if let_go {
                self.dcs.let_go(keys).await?;
                // And end the session: after a crash of the whole node it is
                // one from before (its Consul agent restarted), which Consul
                // may still end for that; a promotion that reused it was
                // fenced a second later (seen in the failover e2e). A
                // new session is made with the checks as they are now.
                self.dcs.end_session().await;
                tracing::warn!("postgres died as primary: released the leader lock for a standby");
            }
            self.mark_rejoin();
            self.write_standby_signal()?;
        }
        if rewind && let Some(leader) = leader {
            self.rejoin(spec, leader).await?;
        }
        let conninfo = leader
            .map(|l| self.conninfo(spec, l.address, l.port))
            .unwrap_or_default();
        let slot = if leader.is_some() {
            slot_name(&self.ctx.node)
        } else {
            String::new()
        };
        self.set_auto_conf(&[
            ("primary_conninfo", &conninfo),
            ("primary_slot_name", &slot),
        ])?;
        self.write_standby_signal()?;
        self.ctx.host.ensure(&self.service_spec(spec)).await?;
        *self.streamed_at.lock().expect("lock") = Some(Instant::now());
        tracing::info!(
            leader = leader.map(|l| l.node.as_str()).unwrap_or("none yet"),
            "started postgres as a standby"
        );
        Ok(())
    }

    /// Makes a former primary's data dir a standby of `leader`: pg_rewind,
    /// or a fresh clone when rewinding is impossible.
    async fn rejoin(&self, spec: &PostgresSpec, leader: &Member) -> Result<(), DriverError> {
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

    /// The start of the last checkpoint record of the stopped server.
    async fn checkpoint_lsn(&self) -> Result<u64, DriverError> {
        let cmd = OneShot::new(self.bin("pg_controldata"), &[])
            .arg(self.pgdata().display().to_string())
            .run_as(Self::account())
            .timeout(Duration::from_secs(30));
        let out = self.ctx.host.run(&cmd).await?.check(&cmd)?;
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix("Latest checkpoint location:"))
            .and_then(ha::parse_lsn)
            .ok_or_else(|| DriverError::Refused("pg_controldata shows no checkpoint".into()))
    }

    /// Whether this primary may hand over to `order.to` now: the target, or
    /// why not.
    async fn switchover_check(
        &self,
        spec: &PostgresSpec,
        keys: &Keys,
        order: &SwitchoverSpec,
    ) -> Result<Result<Member, String>, DriverError> {
        let node = &self.ctx.node;
        let to = &order.to;
        let local = match self.local(spec.port).await {
            Ok(l) => l,
            Err(e) => return Ok(Err(format!("postgres does not answer: {e}"))),
        };
        if local.in_recovery {
            return Ok(Err(format!("{node} is not the primary")));
        }
        let view = self.dcs.snapshot(keys).await?;
        let lock = view.leader.and_then(|l| l.session);
        if lock.is_none() || lock != self.dcs.session() {
            return Ok(Err(format!("{node} does not hold the leader lock")));
        }
        if to == node {
            return Ok(Err(format!("{node} is already the primary")));
        }
        let Some(t) = view.members.into_iter().find(|m| m.node == *to) else {
            return Ok(Err(format!(
                "{to} is not a member of the PostgreSQL cluster"
            )));
        };
        if t.role != MemberRole::Replica || !t.fresh(ha::now_ms()) {
            return Ok(Err(format!("{to} is not a running standby that reports")));
        }
        if !local.streaming.contains(to) {
            return Ok(Err(format!("{to} does not stream from {node}")));
        }
        let lag = local.lsn.saturating_sub(t.lsn);
        if lag > order.max_lag_bytes {
            return Ok(Err(format!(
                "{to} is {lag} bytes behind (at most {} allowed)",
                order.max_lag_bytes
            )));
        }
        Ok(Ok(t))
    }

    /// A planned change of primary, run on the primary: checks the target
    /// is caught up, shuts down cleanly (the standbys receive every WAL
    /// record first), waits until the target has the shutdown checkpoint,
    /// then hands the lock over; this node follows the target.
    pub async fn switchover(&self, order: &SwitchoverSpec) -> Result<String, DriverError> {
        let started = Instant::now();
        let spec =
            self.desired.lock().expect("lock").clone().ok_or_else(|| {
                DriverError::Refused("postgres is not set up on this node".into())
            })?;
        let node = self.ctx.node.clone();
        let to = order.to.clone();
        let keys = Keys::new(&spec.leader_key);
        // The control plane saw the target as a caught-up standby in its
        // last heartbeat; give our own view a moment to agree (a standby
        // that just restarted reports within a tick). Waiting happens
        // outside the HA mutex, so the lock stays confirmed meanwhile.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.switchover_check(&spec, &keys, order).await? {
                Ok(_) => break,
                Err(why) if Instant::now() > deadline => return Err(DriverError::Refused(why)),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
        let _ha = self.ha.lock().await;
        let t = self
            .switchover_check(&spec, &keys, order)
            .await?
            .map_err(DriverError::Refused)?;
        let target = |members: &[Member]| members.iter().find(|m| m.node == to).cloned();
        let mut record = ha::Switchover {
            from: node.clone(),
            to: to.clone(),
            at_ms: ha::now_ms(),
            min_lsn: 0,
        };
        self.dcs.write_switchover(&keys, &record).await?;
        tracing::warn!(%to, "switchover: shutting down cleanly");
        *self.confirmed.lock().expect("lock") = None;
        self.ctx.host.stop(SERVICE).await?;
        let end = self.checkpoint_lsn().await?;
        // The target may promote only past this, even if the lock frees
        // before it has the last records (it does: our leader session dies
        // with its postgres-alive check during the shutdown).
        record.min_lsn = end;
        self.dcs.write_switchover(&keys, &record).await?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let members = self
                .dcs
                .snapshot(&keys)
                .await
                .map(|v| v.members)
                .unwrap_or_default();
            if target(&members).is_some_and(|t| t.lsn > end) {
                break;
            }
            if Instant::now() > deadline {
                return Err(self.give_up_switchover(&spec, &keys, &to).await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let conninfo = self.conninfo(&spec, t.address, t.port);
        self.set_auto_conf(&[
            ("primary_conninfo", &conninfo),
            ("primary_slot_name", &slot_name(&node)),
        ])?;
        self.write_standby_signal()?;
        self.dcs.let_go(&keys).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let view = self.dcs.snapshot(&keys).await.unwrap_or_default();
            if view.holder() == Some(to.as_str())
                && target(&view.members).is_some_and(|t| t.role == MemberRole::Primary)
            {
                break;
            }
            if Instant::now() > deadline {
                self.ctx.host.ensure(&self.service_spec(&spec)).await?;
                return Err(DriverError::Refused(format!(
                    "{node} stepped down but {to} did not take over within 30 s; the cluster elects a new primary"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.ctx.host.ensure(&self.service_spec(&spec)).await?;
        *self.streamed_at.lock().expect("lock") = Some(Instant::now());
        Ok(format!(
            "switched over from {node} to {to} in {:.1} s; {node} follows it as a standby",
            started.elapsed().as_secs_f64()
        ))
    }

    /// A switchover whose target did not get the final WAL in time: this
    /// node has the newest WAL, so it comes back, but as primary only while
    /// it still holds the leader lock. Its session usually died during the
    /// shutdown (postgres-alive failed), freeing the lock: then it comes
    /// back as a standby of nothing and wins the election that follows
    /// (no one is ahead of it), rather than writing without the lock.
    async fn give_up_switchover(&self, spec: &PostgresSpec, keys: &Keys, to: &str) -> DriverError {
        let node = &self.ctx.node;
        let held = self
            .dcs
            .confirm_lock(keys)
            .await
            .is_ok_and(|(held, _)| held);
        let _ = self.dcs.clear_switchover(keys).await;
        if held {
            if let Err(e) = self.ctx.host.ensure(&self.service_spec(spec)).await {
                return e.into();
            }
            *self.confirmed.lock().expect("lock") = Some(Instant::now());
            return DriverError::Refused(format!(
                "{to} did not receive the final WAL within 15 s; {node} stays primary"
            ));
        }
        if let Err(e) = self.write_standby_signal() {
            return e;
        }
        if let Err(e) = self.ctx.host.ensure(&self.service_spec(spec)).await {
            return e.into();
        }
        DriverError::Refused(format!(
            "{to} did not receive the final WAL within 15 s, and {node} lost the leader lock \
             while shut down: it is back as a standby and, holding the newest WAL, wins the \
             election that follows"
        ))
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

    /// Deregisters (so webapps stop using it), leaves the member list,
    /// releases the lock and stops PostgreSQL with a fast shutdown (drain).
    pub async fn stop(&self) -> Result<(), DriverError> {
        let spec = self.desired.lock().expect("lock").take();
        let _ha = self.ha.lock().await;
        *self.confirmed.lock().expect("lock") = None;
        if let Some(spec) = spec {
            let _ = std::fs::remove_file(self.registration_file());
            let _ = self.ctx.consul.deregister_service(&self.service_id()).await;
            let _ = self.ctx.consul.reload().await;
            self.dcs.end_session().await;
            let keys = Keys::new(&spec.leader_key);
            let _ = self.dcs.forget(&keys, &self.ctx.node).await;
        }
        self.ctx.host.stop(SERVICE).await?;
        Ok(())
    }
}

/// `output` with the quoted value after every `password` (SQL's `PASSWORD
/// '…'`, conninfo's `password='…'` or `password=…`) replaced by `***`.
pub fn redact_passwords(output: &str) -> String {
    let lower = output.to_ascii_lowercase();
    let mut out = String::with_capacity(output.len());
    let mut at = 0;
    while let Some(found) = lower[at..].find("password") {
        let key_end = at + found + "password".len();
        out.push_str(&output[at..key_end]);
        let rest = &output[key_end..];
        let gap = rest.len() - rest.trim_start_matches([' ', '=']).len();
        out.push_str(&rest[..gap]);
        let value = &rest[gap..];
        let skip = if let Some(quoted) = value.strip_prefix('\'') {
            // Up to the closing quote ('' is an escaped quote), or the end.
            let mut end = quoted.len();
            let bytes = quoted.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                // conninfo escapes with a backslash; erring towards hiding
                // more is fine for SQL, where a backslash is plain.
                if bytes[i] == b'\\' {
                    i += 2;
                    continue;
                }
                if bytes[i] == b'\'' {
                    if bytes.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    end = i + 1;
                    break;
                }
                i += 1;
            }
            out.push_str("'***'");
            1 + end
        } else {
            let end = value
                .find(|c: char| c.is_whitespace() || c == ';')
                .unwrap_or(value.len());
            if end > 0 {
                out.push_str("***");
            }
            end
        };
        at = key_end + gap + skip;
    }
    out.push_str(&output[at..]);
    out
}

/// A conninfo value, quoted.
fn conninfo_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
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
    fn passwords_are_redacted_from_psql_errors() {
        let err = "ERROR:  syntax error at or near \"WITH\"\n\
                   LINE 1: ALTER ROLE app WITH PASSWORD 's3cr''et' x;\n\
                   primary_conninfo = 'host=10.0.0.1 password=\\'qx\\'zz\\' user=r'\n\
                   password=plain next";
        let red = redact_passwords(err);
        for secret in ["s3cr", "et'", "qx", "zz", "plain"] {
            assert!(!red.contains(secret), "{secret} left in {red}");
        }
        assert!(red.contains("PASSWORD '***' x;"), "{red}");
        assert!(red.contains("password=*** next"), "{red}");
        assert!(red.contains("syntax error"), "{red}");
        assert_eq!(redact_passwords("no secrets here"), "no secrets here");
        assert_eq!(redact_passwords("password"), "password");
    }

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
