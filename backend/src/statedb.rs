//! The state database of a control plane of several servers when none is
//! given (`corral up --servers 2` without `--database-url`): a PostgreSQL
//! primary on adm1's address and a streaming standby on adm2's, run by the
//! `corral up` process itself (as the unprivileged `postgres` user when it is
//! root), each with its data in `<state>/statedb/<adm1|adm2>`.
//!
//! The same process promotes the standby when the primary dies or stops
//! answering. It started both on this host, so it can fence the old primary
//! for certain first: it kills the old primary's whole process group (the
//! postmaster and every backend) and sees the group gone before it promotes,
//! so two primaries never take writes. It notes the new primary in
//! `<state>/statedb/primary` before promoting, then makes the old primary's
//! directory again as a standby of the new one (`pg_basebackup`): whatever
//! happened, the next start finds one primary, named in that file, and
//! standbys it can rebuild. Commits wait for a standby while one streams
//! (synchronous replication, relaxed within a second when none does, so a
//! lost standby never stops the control plane): a failover then loses no
//! commit the servers were told of, except one made while no standby
//! streamed.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
use sea_orm::sqlx::{self, Connection};
use tokio::sync::watch;

use crate::provider::command;
use crate::provider::reaper::{self, Reaper};
use crate::store::hosts::{self, Probe};

/// The role and database the servers use (the cluster's own superuser: this
/// PostgreSQL serves corral alone).
pub const USER: &str = "corral";
pub const DATABASE: &str = "corral";
/// How often the supervisor looks at each PostgreSQL.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// Every how many looks it asks the primary whether it answers, and sets
/// whether commits wait for a standby (1 s).
const SYNC_EVERY_TICKS: u64 = 4;
/// A primary that is alive but answers no connection for this long is
/// fenced and replaced, as a dead one is at once.
const HUNG_AFTER: Duration = Duration::from_secs(5);
const START_TIMEOUT: Duration = Duration::from_secs(60);
const COMMAND_LIMIT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
#[error("state database: {0}")]
pub struct StateDbError(String);

fn fail(message: impl Into<String>) -> StateDbError {
    StateDbError(message.into())
}

/// Where the state database's PostgreSQL instances live.
#[derive(Debug, Clone)]
pub struct StateDbConfig {
    /// `<state>/statedb`.
    pub dir: PathBuf,
    /// The password file of the `corral` role (0600).
    pub password_file: PathBuf,
    /// Each instance's name and the address it listens on, the first the
    /// primary of a new cluster.
    pub members: Vec<(String, Ipv4Addr)>,
    pub port: u16,
    /// PostgreSQL's server programs (`initdb`, `postgres`, `pg_ctl`,
    /// `pg_basebackup`).
    pub bin_dir: PathBuf,
}

impl StateDbConfig {
    /// The state database of the cluster in `state_dir`, on these members.
    pub fn new(state_dir: &Path, members: Vec<(String, Ipv4Addr)>, port: u16) -> Self {
        Self {
            dir: state_dir.join("statedb"),
            password_file: state_dir.join("statedb-password"),
            members,
            port,
            bin_dir: std::env::var_os("CORRAL_PG_BIN").map_or_else(
                || PathBuf::from("/usr/lib/postgresql/15/bin"),
                PathBuf::from,
            ),
        }
    }
}

/// The account PostgreSQL runs as: `postgres` when this process is root
/// (PostgreSQL refuses to run as root), else this process's own.
#[derive(Debug, Clone, Copy)]
struct Account {
    ids: Option<(u32, u32)>,
}

impl Account {
    fn detect() -> Result<Self, StateDbError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(Self { ids: None });
        }
        match nix::unistd::User::from_name("postgres") {
            Ok(Some(user)) => Ok(Self {
                ids: Some((user.uid.as_raw(), user.gid.as_raw())),
            }),
            _ => Err(fail(
                "no `postgres` user to run PostgreSQL as (apt-get install postgresql-15)",
            )),
        }
    }

    /// `program` run as this account.
    fn command(&self, program: &Path) -> Command {
        match self.ids {
            Some((uid, gid)) => {
                let mut cmd = Command::new("setpriv");
                cmd.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--init-groups")
                    .arg("--")
                    .arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    fn own(&self, path: &Path) -> Result<(), StateDbError> {
        let Some((uid, gid)) = self.ids else {
            return Ok(());
        };
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(|e| fail(format!("cannot chown {}: {e}", path.display())))
    }
}

/// One PostgreSQL instance of the pair.
#[derive(Debug, Clone)]
struct Member {
    name: String,
    address: Ipv4Addr,
    /// The postmaster's pid while it runs (started here or adopted).
    pid: Option<u32>,
}

/// The running state database: start it, ask where it is, stop it.
pub struct StateDb {
    inner: Arc<Inner>,
    supervisor: Option<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

struct Inner {
    config: StateDbConfig,
    account: Account,
    password: String,
    members: Mutex<Vec<Member>>,
    /// The primary's name.
    primary: Mutex<String>,
    /// Failovers done by this process, for whoever waits for one.
    failovers: watch::Sender<u32>,
}

impl StateDb {
    /// Starts the state database, making it on first use: the primary named
    /// in `<dir>/primary` (the first member on a new cluster) first, then
    /// every other member as its standby, made again from it when its
    /// directory is not a standby's. A PostgreSQL left running by a killed
    /// `corral up` is adopted. Then watches the primary until [`StateDb::stop`].
    pub async fn start(config: StateDbConfig) -> Result<Self, StateDbError> {
        if config.members.is_empty() {
            return Err(fail("no members"));
        }
        if !config.bin_dir.join("postgres").is_file() {
            return Err(fail(format!(
                "PostgreSQL is not installed: no {} (apt-get install postgresql-15, or set CORRAL_PG_BIN)",
                config.bin_dir.join("postgres").display()
            )));
        }
        let account = Account::detect()?;
        let (password, _) =
            crate::auth::secret_file(&config.password_file, || crate::auth::new_token(""))
                .map_err(|e| fail(e.to_string()))?;
        if let Some(state_dir) = config.dir.parent() {
            std::fs::create_dir_all(state_dir)
                .map_err(|e| fail(format!("cannot create {}: {e}", state_dir.display())))?;
            // 0711: PostgreSQL's account passes through to its directory.
            crate::auth::private_state_dir(state_dir).map_err(|e| fail(e.to_string()))?;
        }
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", config.dir.display())))?;
        set_mode(&config.dir, 0o700)?;
        account.own(&config.dir)?;
        let primary = read_primary(&config.dir)
            .filter(|p| config.members.iter().any(|(n, _)| n == p))
            .unwrap_or_else(|| config.members[0].0.clone());
        let members = config
            .members
            .iter()
            .map(|(name, address)| Member {
                name: name.clone(),
                address: *address,
                pid: None,
            })
            .collect();
        let inner = Arc::new(Inner {
            config,
            account,
            password,
            members: Mutex::new(members),
            primary: Mutex::new(primary.clone()),
            failovers: watch::Sender::new(0),
        });
        write_primary(&inner.config.dir, &primary)?;
        let started = async {
            inner.start_primary().await?;
            for name in inner.member_names() {
                if name != primary {
                    inner.start_standby(&name).await?;
                }
            }
            Ok::<(), StateDbError>(())
        }
        .await;
        if let Err(e) = started {
            // Nothing is left running that no one watches.
            for name in inner.member_names() {
                inner.stop_member(&name).await;
            }
            return Err(e);
        }
        let (stop, stopped) = watch::channel(false);
        let supervisor = tokio::spawn(supervise(inner.clone(), stopped));
        Ok(Self {
            inner,
            supervisor: Some(supervisor),
            stop,
        })
    }

    /// The URL servers are given: every member, libpq style; they write to
    /// whichever is the primary.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .inner
            .lock_members()
            .iter()
            .map(|m| format!("{}:{}", m.address, self.inner.config.port))
            .collect();
        format!(
            "postgres://{USER}:{}@{}/{DATABASE}",
            self.inner.password,
            hosts.join(",")
        )
    }

    /// The primary's name and its postmaster's pid.
    pub fn primary(&self) -> (String, Option<u32>) {
        let name = self.inner.primary_name();
        let pid = self.inner.member(&name).and_then(|m| m.pid);
        (name, pid)
    }

    /// Failovers this process has done; changes with each.
    pub fn failovers(&self) -> watch::Receiver<u32> {
        self.inner.failovers.subscribe()
    }

    /// Stops watching, then stops every instance: standbys first, then the
    /// primary (a fast shutdown: open sessions are ended, what was committed
    /// stays).
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.supervisor.take() {
            let _ = task.await;
        }
        let primary = self.inner.primary_name();
        let mut order: Vec<String> = self
            .inner
            .member_names()
            .into_iter()
            .filter(|n| *n != primary)
            .collect();
        order.push(primary);
        for name in order {
            self.inner.stop_member(&name).await;
        }
    }
}

/// Stops whatever PostgreSQL of the state database a killed `corral up`
/// left running in `<state>/statedb` (`corral down`).
pub async fn stop_left(state_dir: &Path) {
    let dir = state_dir.join("statedb");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        if let Some(pid) = running_postmaster(&entry.path()) {
            stop_pid(pid).await;
        }
    }
}

impl Inner {
    fn lock_members(&self) -> std::sync::MutexGuard<'_, Vec<Member>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn member_names(&self) -> Vec<String> {
        self.lock_members().iter().map(|m| m.name.clone()).collect()
    }

    fn member(&self, name: &str) -> Option<Member> {
        self.lock_members().iter().find(|m| m.name == name).cloned()
    }

    fn set_pid(&self, name: &str, pid: Option<u32>) {
        if let Some(m) = self.lock_members().iter_mut().find(|m| m.name == name) {
            m.pid = pid;
        }
    }

    fn primary_name(&self) -> String {
        self.primary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn data_dir(&self, name: &str) -> PathBuf {
        self.config.dir.join(name)
    }

    fn options(&self, address: Ipv4Addr, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host(&address.to_string())
            .port(self.config.port)
            .username(USER)
            .password(&self.password)
            .database(database)
    }

    fn bin(&self, program: &str) -> PathBuf {
        self.config.bin_dir.join(program)
    }

    /// Starts the primary, making it first on a new cluster.
    async fn start_primary(&self) -> Result<(), StateDbError> {
        let name = self.primary_name();
        let member = self
            .member(&name)
            .ok_or_else(|| fail(format!("no member {name}")))?;
        let dir = self.data_dir(&name);
        let new = !dir.join("PG_VERSION").is_file();
        if new {
            self.initdb(&dir).await?;
        } else if dir.join("standby.signal").exists() {
            // Named the primary but left a standby: a failover was cut
            // short after the note and before the promotion.
            self.launch(&member).await?;
            self.promote(&name).await?;
            return Ok(());
        }
        self.launch(&member).await?;
        // Made at every start when missing, so a first start cut short
        // after initdb still ends with the database.
        let err = |e: sqlx::Error| fail(format!("cannot create database {DATABASE}: {e}"));
        let mut conn = PgConnection::connect_with(&self.options(member.address, "postgres"))
            .await
            .map_err(err)?;
        let (there,): (bool,) =
            sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(DATABASE)
                .fetch_one(&mut conn)
                .await
                .map_err(err)?;
        if !there {
            // DATABASE, spelled out: a statement takes no parameter here.
            sqlx::query("CREATE DATABASE corral")
                .execute(&mut conn)
                .await
                .map_err(err)?;
        }
        let _ = conn.close().await;
        Ok(())
    }

    /// Starts a standby, made again from the primary when its directory is
    /// missing or is not a standby's (an old primary after a failover).
    async fn start_standby(&self, name: &str) -> Result<(), StateDbError> {
        let member = self
            .member(name)
            .ok_or_else(|| fail(format!("no member {name}")))?;
        let dir = self.data_dir(name);
        if !dir.join("standby.signal").exists() || !dir.join("PG_VERSION").is_file() {
            self.basebackup(&dir).await?;
        }
        self.launch(&member).await
    }

    async fn initdb(&self, dir: &Path) -> Result<(), StateDbError> {
        let _ = std::fs::remove_dir_all(dir);
        let pwfile = self.config.dir.join(".initdb-password");
        std::fs::write(&pwfile, &self.password)
            .map_err(|e| fail(format!("cannot write {}: {e}", pwfile.display())))?;
        set_mode(&pwfile, 0o600)?;
        self.account.own(&pwfile)?;
        let ran = self
            .run(
                self.account
                    .command(&self.bin("initdb"))
                    .arg("-D")
                    .arg(dir)
                    .args(["--username", USER, "--auth", "scram-sha-256"])
                    .args(["--encoding", "UTF8", "--locale", "C", "--no-instructions"])
                    .arg(format!("--pwfile={}", pwfile.display())),
            )
            .await;
        let _ = std::fs::remove_file(&pwfile);
        ran?;
        // Every setting that differs per instance (address, port) is given
        // on the command line, so a standby's copy of this file fits it too.
        let conf = "\n# corral's state database\n\
                    unix_socket_directories = ''\n\
                    wal_level = replica\n\
                    max_wal_senders = 10\n\
                    wal_keep_size = '256MB'\n\
                    hot_standby = on\n\
                    shared_buffers = '32MB'\n\
                    max_connections = 200\n";
        append(&dir.join("postgresql.conf"), conf)?;
        std::fs::write(
            dir.join("pg_hba.conf"),
            "host all all 0.0.0.0/0 scram-sha-256\n\
             host replication all 0.0.0.0/0 scram-sha-256\n",
        )
        .map_err(|e| fail(format!("cannot write pg_hba.conf: {e}")))?;
        Ok(())
    }

    /// Makes `dir` a standby of the primary: a base backup streaming its
    /// WAL, with `standby.signal` and the primary's address (`-R`).
    async fn basebackup(&self, dir: &Path) -> Result<(), StateDbError> {
        let primary = self
            .member(&self.primary_name())
            .ok_or_else(|| fail("no primary"))?;
        let _ = std::fs::remove_dir_all(dir);
        self.run(
            self.account
                .command(&self.bin("pg_basebackup"))
                .arg("-D")
                .arg(dir)
                .args(["-h", &primary.address.to_string()])
                .args(["-p", &self.config.port.to_string()])
                .args(["-U", USER, "-X", "stream", "-c", "fast", "-R", "-w"])
                .env("PGPASSWORD", &self.password),
        )
        .await
    }

    /// Starts (or adopts) `member`'s postmaster and waits until it accepts
    /// connections.
    async fn launch(&self, member: &Member) -> Result<(), StateDbError> {
        let dir = self.data_dir(&member.name);
        let pid = match running_postmaster(&dir) {
            Some(pid) => pid,
            None => {
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.config.dir.join(format!("{}.log", member.name)))
                    .map_err(|e| fail(format!("cannot open the log of {}: {e}", member.name)))?;
                let mut cmd = self.account.command(&self.bin("postgres"));
                cmd.arg("-D")
                    .arg(&dir)
                    .arg("-c")
                    .arg(format!("listen_addresses={}", member.address))
                    .arg("-p")
                    .arg(self.config.port.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log);
                {
                    use std::os::unix::process::CommandExt;
                    // Its backends share the group: fencing kills them all.
                    cmd.process_group(0);
                }
                let spawned = Reaper::global()
                    .spawn(&mut cmd)
                    .map_err(|e| fail(format!("cannot start PostgreSQL: {e}")))?;
                spawned.pid
            }
        };
        self.set_pid(&member.name, Some(pid));
        let options = self.options(member.address, "postgres");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // Not `alive_with`: until it execs, the child's command line is
            // this process's own.
            if !exists(pid) {
                self.set_pid(&member.name, None);
                let log = self.config.dir.join(format!("{}.log", member.name));
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(fail(format!(
                    "PostgreSQL of {} ended while starting; the end of {}:\n{}",
                    member.name,
                    log.display(),
                    command::tail(&said, 1500)
                )));
            }
            if !matches!(hosts::probe(&options).await, Probe::Unreachable(_)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(fail(format!(
                    "PostgreSQL of {} does not accept connections after {} s",
                    member.name,
                    START_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn promote(&self, name: &str) -> Result<(), StateDbError> {
        self.run(
            self.account
                .command(&self.bin("pg_ctl"))
                .arg("promote")
                .arg("-D")
                .arg(self.data_dir(name))
                .args(["-w", "-t", "60"]),
        )
        .await
    }

    async fn run(&self, cmd: &mut Command) -> Result<(), StateDbError> {
        command::run(cmd, COMMAND_LIMIT)
            .await
            .map(|_| ())
            .map_err(|e| fail(e.to_string()))
    }

    /// Kills `name`'s postmaster with every backend (its process group) and
    /// waits until none is left.
    async fn fence(&self, name: &str) {
        let Some(pid) = self.member(name).and_then(|m| m.pid) else {
            return;
        };
        let group = reaper::pid(pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        while killpg(group, Signal::SIGKILL).is_ok() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.set_pid(name, None);
    }

    async fn stop_member(&self, name: &str) {
        if let Some(pid) = self.member(name).and_then(|m| m.pid) {
            stop_pid(pid).await;
        }
        self.set_pid(name, None);
    }

    /// The primary died or hangs: fence it, note and promote the standby,
    /// and make the old primary again as its standby.
    async fn fail_over(&self, why: &str) -> Result<(), StateDbError> {
        let started = Instant::now();
        let old = self.primary_name();
        let Some(new) = self.member_names().into_iter().find(|n| {
            *n != old
                && self
                    .member(n)
                    .and_then(|m| m.pid)
                    .is_some_and(|pid| reaper::alive_with(pid, "postgres"))
        }) else {
            // Nobody to take over: the same primary starts again (crash
            // recovery), which no other instance can contradict.
            tracing::warn!(primary = %old, why, "state database: no standby runs; starting the primary again");
            self.fence(&old).await;
            let member = self
                .member(&old)
                .ok_or_else(|| fail(format!("no member {old}")))?;
            return self.launch(&member).await;
        };
        tracing::warn!(old = %old, new = %new, why, "state database: failing over");
        self.fence(&old).await;
        write_primary(&self.config.dir, &new)?;
        *self.primary.lock().unwrap_or_else(|p| p.into_inner()) = new.clone();
        self.promote(&new).await?;
        tracing::warn!(
            old = %old,
            new = %new,
            took_ms = started.elapsed().as_millis() as u64,
            "state database: {new} is the primary now"
        );
        self.failovers.send_modify(|n| *n += 1);
        // Its configuration, copied from the old primary, may make commits
        // wait for a standby that is not there yet.
        if let Err(e) = self.keep_sync().await {
            tracing::warn!(error = %e, "state database: synchronous replication");
        }
        if let Err(e) = self.start_standby(&old).await {
            tracing::warn!(member = %old, error = %e, "state database: cannot make the old primary a standby yet");
        }
        Ok(())
    }

    /// Commits wait for a standby while one streams, and only then
    /// (`synchronous_standby_names` '*' or ''): a commit the servers were
    /// told of is on two instances, yet with the standby gone (dead, or
    /// being made again after a failover) changes do not stop.
    async fn keep_sync(&self) -> Result<(), StateDbError> {
        let primary = self
            .member(&self.primary_name())
            .ok_or_else(|| fail("no primary"))?;
        let err = |e: sqlx::Error| fail(format!("keeping synchronous replication: {e}"));
        let mut conn = tokio::time::timeout(
            Duration::from_secs(2),
            PgConnection::connect_with(&self.options(primary.address, "postgres")),
        )
        .await
        .map_err(|_| fail("keeping synchronous replication: no connection within 2 s"))?
        .map_err(err)?;
        let (streaming,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
                .fetch_one(&mut conn)
                .await
                .map_err(err)?;
        let (current,): (String,) =
            sqlx::query_as("SELECT current_setting('synchronous_standby_names')")
                .fetch_one(&mut conn)
                .await
                .map_err(err)?;
        let wait = streaming > 0;
        if wait != (current == "*") {
            let set = if wait {
                "ALTER SYSTEM SET synchronous_standby_names = '*'"
            } else {
                "ALTER SYSTEM SET synchronous_standby_names = ''"
            };
            sqlx::query(set).execute(&mut conn).await.map_err(err)?;
            sqlx::query("SELECT pg_reload_conf()")
                .execute(&mut conn)
                .await
                .map_err(err)?;
            if wait {
                tracing::info!("state database: commits wait for the standby again");
            } else {
                tracing::warn!(
                    "state database: no standby streams; commits no longer wait for one"
                );
            }
        }
        let _ = conn.close().await;
        Ok(())
    }

    /// One look: a primary that died or hangs is failed over from; a
    /// standby that died is started again.
    async fn check(&self, unanswered_since: &mut Option<Instant>, tick: u64) {
        let primary = self.primary_name();
        let Some(member) = self.member(&primary) else {
            return;
        };
        let alive = member
            .pid
            .is_some_and(|pid| reaper::alive_with(pid, "postgres"));
        let why = if !alive {
            Some("died".to_string())
        } else if !tick.is_multiple_of(SYNC_EVERY_TICKS) {
            // Asked whether it answers once a second, not at every look.
            None
        } else if matches!(
            hosts::probe(&self.options(member.address, "postgres")).await,
            Probe::Unreachable(_)
        ) {
            let since = *unanswered_since.get_or_insert_with(Instant::now);
            (since.elapsed() >= HUNG_AFTER)
                .then(|| format!("answered no connection for {} s", HUNG_AFTER.as_secs()))
        } else {
            *unanswered_since = None;
            None
        };
        if let Some(why) = why {
            *unanswered_since = None;
            if let Err(e) = self.fail_over(&why).await {
                tracing::warn!(error = %e, "state database: failover failed; trying again");
            }
            return;
        }
        for name in self.member_names() {
            if name == primary {
                continue;
            }
            let running = self
                .member(&name)
                .and_then(|m| m.pid)
                .is_some_and(|pid| reaper::alive_with(pid, "postgres"));
            if !running {
                self.set_pid(&name, None);
                if let Err(e) = self.start_standby(&name).await {
                    tracing::warn!(member = %name, error = %e, "state database: standby does not start");
                }
            }
        }
        if tick.is_multiple_of(SYNC_EVERY_TICKS)
            && let Err(e) = self.keep_sync().await
        {
            tracing::debug!(error = %e, "state database: synchronous replication");
        }
    }
}

async fn supervise(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut unanswered_since = None;
    let mut tick: u64 = 0;
    loop {
        tick += 1;
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = inner.check(&mut unanswered_since, tick) => {}
        }
    }
}

/// Whether process `pid` is there and not a zombie.
fn exists(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// The postmaster running on `dir`, from its `postmaster.pid`.
fn running_postmaster(dir: &Path) -> Option<u32> {
    reaper::read_pid_file(&dir.join("postmaster.pid"))
        .filter(|pid| reaper::alive_with(*pid, "postgres"))
}

/// A fast shutdown (SIGINT), then SIGKILL to its group after 30 s.
async fn stop_pid(pid: u32) {
    let _ = kill(reaper::pid(pid), Signal::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(30);
    while reaper::alive_with(pid, "postgres") {
        if Instant::now() >= deadline {
            let _ = killpg(reaper::pid(pid), Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_primary(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("primary"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Notes the primary durably (temp file, fsync, rename).
fn write_primary(dir: &Path, name: &str) -> Result<(), StateDbError> {
    use std::io::Write;
    let path = dir.join("primary");
    let tmp = dir.join("primary.tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(format!("{name}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| fail(format!("cannot write {}: {e}", path.display())))
}

fn append(path: &Path, text: &str) -> Result<(), StateDbError> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), StateDbError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail(format!("cannot chmod {}: {e}", path.display())))
}
