//! PostgreSQL 15 on the node, as the unprivileged `postgres` account even
//! when the agent is root. The bootstrap node initialises an empty cluster
//! (checksums on, for pg_rewind) and creates the replication and
//! application roles; every other node clones the primary it finds in Consul
//! with `pg_basebackup` into a replication slot of its own and runs as a hot
//! standby.
//!
//! After that the HA loop (`ha_loop.rs`, decisions in [`super::ha`])
//! owns the server: only the holder of the Consul leader lock
//! runs as primary; a primary that loses the lock, or cannot confirm it for
//! [`FENCE_AFTER`], stops itself (fencing); when the lock is free the best
//! standby takes it and promotes; the others follow the new primary, and a
//! former primary is rewound with `pg_rewind` (or cloned afresh) and rejoins
//! as a standby. The supervisor never restarts PostgreSQL on its own.
//!
//! By concern: `bootstrap` (a first data dir), `ha_loop` (observe, decide,
//! act; confirmer, watchdog), `rewind`, `slots`, `sync`, `switchover` and
//! `status` (the local server's status queries); this file holds the
//! driver, the order (`apply`), the server's settings and registration.

mod bootstrap;
mod ha_loop;
mod rewind;
mod slots;
mod status;
mod switchover;
mod sync;

use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_proto::{POSTGRES_SERVICE, PostgresSpec};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use super::ha::Keys;

use super::dcs::{ConsulDcs, Dcs};
use super::leader::{ALIVE_CHECK, LeaderLock};
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
    /// The lock holder as last seen, for the heartbeat.
    seen_leader: Mutex<Option<String>>,
    /// The latest answer to the status query, and when: the heartbeat
    /// reports it while it is fresh instead of running psql again.
    last_sql: Mutex<Option<(Instant, super::ha::SqlStatus)>>,
    /// A standby's streaming last worked then (or it started then).
    streamed_at: Mutex<Option<Instant>>,
    /// Sync mode has fallen back to asynchronous commits.
    degraded: Mutex<bool>,
    /// pg_rewind attempts that failed in a row.
    rewind_failures: Mutex<u32>,
    /// A running postgres that does not answer: its recovery's progress
    /// ([`super::ha::recovery_progress`]) as last seen, and since when.
    stalled: Mutex<Option<(String, Instant)>>,
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
            seen_leader: Mutex::new(None),
            last_sql: Mutex::new(None),
            streamed_at: Mutex::new(None),
            degraded: Mutex::new(false),
            rewind_failures: Mutex::new(0),
            stalled: Mutex::new(None),
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

    pub(super) fn service_id(&self) -> String {
        format!("{POSTGRES_SERVICE}-{}", self.ctx.node)
    }

    pub(super) fn check_id(&self) -> String {
        format!("service:{}", self.service_id())
    }

    pub(crate) fn account() -> Option<Account> {
        if nix::unistd::geteuid().is_root() {
            Account::lookup("postgres")
        } else {
            None
        }
    }

    /// The address the rest of the cluster knows this server by: its IPv6
    /// one in a dual-stack cluster, else its IPv4 one.
    pub(super) fn cluster_address(&self) -> IpAddr {
        self.desired
            .lock()
            .expect("lock")
            .as_ref()
            .and_then(|spec| spec.address_v6)
            .map_or(self.ctx.address, IpAddr::V6)
    }

    pub(crate) fn bin(&self, name: &str) -> PathBuf {
        self.ctx.bins.pg_bin.join(name)
    }

    pub(super) fn service_spec(&self, spec: &PostgresSpec) -> ServiceSpec {
        let pgdata = self.pgdata().display().to_string();
        let mut args = vec!["-D".to_string(), pgdata.clone()];
        for (k, v) in [
            (
                "listen_addresses",
                match spec.address_v6 {
                    Some(v6) => format!("{},{v6}", self.ctx.address),
                    None => self.ctx.address.to_string(),
                },
            ),
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
    pub(super) fn archive_command(&self) -> String {
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
    pub(super) fn psql(&self, port: u16, sql: &str) -> OneShot {
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

    pub(super) async fn query(&self, port: u16, sql: &str) -> Result<String, DriverError> {
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

    pub(super) fn check_reachable(&self) -> Result<(), DriverError> {
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

    pub(super) async fn wait_ready(&self, port: u16) -> Result<(), DriverError> {
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
    pub(super) fn registration(&self, port: u16, role: &str) -> Value {
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
                "address": self.cluster_address().to_string(),
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

    pub(super) fn registration_file(&self) -> PathBuf {
        self.ctx
            .path(crate::drivers::consul::CONF_DIR)
            .join("postgres.json")
    }

    /// Registers the server in Consul tagged with `role`, if not already.
    pub(super) async fn register(&self, port: u16, role: &str) -> Result<(), DriverError> {
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

    pub(super) fn write_standby_signal(&self) -> Result<(), DriverError> {
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
    pub(super) fn set_auto_conf(&self, settings: &[(&str, &str)]) -> Result<(), DriverError> {
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
    pub(super) fn conninfo(&self, spec: &PostgresSpec, address: IpAddr, port: u16) -> String {
        format!(
            "host={address} port={port} user={REPLICATION_USER} password={} application_name={} connect_timeout=2",
            conninfo_value(spec.replication_password()),
            conninfo_value(&self.ctx.node)
        )
    }

    /// Deregisters (so webapps stop using it), leaves the member list,
    /// releases the lock and stops PostgreSQL with a fast shutdown (drain).
    pub async fn stop(&self) -> Result<(), DriverError> {
        let spec = self.desired.lock().expect("lock").take();
        let _ha = self.ha.lock().await;
        self.forget_confirmed();
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
