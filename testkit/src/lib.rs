//! Real PostgreSQL 15 servers for tests: initdb into a temporary directory as
//! an unprivileged user (tests run as root, postgres refuses to), listen on a
//! loopback port, and go away when the test does, even when it panics.
//!
//! Every server runs under `setpriv --pdeathsig KILL`, so a test process that
//! dies without unwinding still takes its servers with it.

use std::fmt;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, geteuid};

pub mod s3;

/// Where Debian's PostgreSQL 15 server binaries live; `CORRAL_PG_BIN` overrides.
pub fn pg_bin_dir() -> PathBuf {
    std::env::var_os("CORRAL_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// An error of the harness, with the server log attached when there is one.
#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

fn err(msg: impl Into<String>) -> Error {
    Error(msg.into())
}

/// The account postgres runs as. As root that is the `postgres` system user
/// (created when missing); as any other user it is that user.
#[derive(Clone, Debug)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub drop_privileges: bool,
}

impl RunAs {
    pub fn detect() -> Result<Self> {
        let euid = geteuid();
        if !euid.is_root() {
            let user = User::from_uid(euid)
                .map_err(|e| err(format!("looking up uid {euid}: {e}")))?
                .ok_or_else(|| err(format!("uid {euid} has no passwd entry")))?;
            return Ok(Self {
                name: user.name,
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
                drop_privileges: false,
            });
        }
        let user = match User::from_name("postgres").map_err(|e| err(e.to_string()))? {
            Some(user) => user,
            None => {
                let status = Command::new("useradd")
                    .args([
                        "--system",
                        "--user-group",
                        "--home-dir",
                        "/nonexistent",
                        "--shell",
                        "/usr/sbin/nologin",
                        "postgres",
                    ])
                    .status()
                    .map_err(|e| err(format!("running useradd: {e}")))?;
                if !status.success() {
                    return Err(err("useradd postgres failed"));
                }
                User::from_name("postgres")
                    .map_err(|e| err(e.to_string()))?
                    .ok_or_else(|| err("user postgres missing after useradd"))?
            }
        };
        Ok(Self {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            drop_privileges: true,
        })
    }

    /// A command for `program` that runs as this account and is killed when
    /// the thread that spawned it exits.
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        let mut cmd = Command::new("setpriv");
        if self.drop_privileges {
            cmd.arg(format!("--reuid={}", self.uid))
                .arg(format!("--regid={}", self.gid))
                .arg("--init-groups");
        }
        cmd.arg("--pdeathsig=KILL").arg("--").arg(program.as_ref());
        cmd
    }

    /// Hands `path` (recursively) to this account.
    pub fn chown(&self, path: &Path) -> Result<()> {
        if !self.drop_privileges {
            return Ok(());
        }
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", self.uid, self.gid))
            .arg(path)
            .status()
            .map_err(|e| err(format!("chown: {e}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(err(format!("chown {} failed", path.display())))
        }
    }
}

/// A free TCP port on `host`, found by binding port 0.
pub fn free_port(host: &str) -> Result<u16> {
    let listener =
        TcpListener::bind((host, 0)).map_err(|e| err(format!("binding {host}:0: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| err(e.to_string()))
}

/// Polls `cond` until it holds or `deadline` passes.
pub fn wait_until(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if cond()? {
            return Ok(());
        }
        if start.elapsed() > deadline {
            return Err(err(format!(
                "timed out after {deadline:?} waiting for {what}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Options of a server to start.
#[derive(Clone, Debug)]
pub struct PgOptions {
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    /// Extra `-c name=value` settings.
    pub settings: Vec<(String, String)>,
    /// Name prefix of the temporary directory holding data and log.
    pub dir_prefix: String,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 0,
            settings: Vec::new(),
            dir_prefix: "corral-pg-".into(),
        }
    }
}

/// One running PostgreSQL server, stopped and deleted on drop.
pub struct Postgres {
    dir: tempfile::TempDir,
    host: String,
    port: u16,
    settings: Vec<(String, String)>,
    run_as: RunAs,
    child: Option<Child>,
}

impl fmt::Debug for Postgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Postgres")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("data", &self.data_dir())
            .finish()
    }
}

/// The superuser every test server has; authentication is `trust` on loopback.
pub const SUPERUSER: &str = "postgres";

fn template_dir(run_as: &RunAs) -> Result<PathBuf> {
    static TEMPLATE: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| make_template(run_as).map_err(|e| e.0))
        .clone()
        .map_err(Error)
}

/// initdb is the slow part of starting a server (about a second), so it runs
/// once per test process and every server starts from a copy.
fn make_template(run_as: &RunAs) -> Result<PathBuf> {
    remove_stale_templates();
    let root = std::env::temp_dir().join(format!("corral-pg-template-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).map_err(|e| err(format!("creating {}: {e}", root.display())))?;
    let data = root.join("data");
    run_as.chown(&root)?;
    let output = run_as
        .command(pg_bin_dir().join("initdb"))
        .arg("--pgdata")
        .arg(&data)
        .args([
            "--username",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .output()
        .map_err(|e| err(format!("running initdb: {e}")))?;
    if !output.status.success() {
        return Err(err(format!(
            "initdb failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let hba = "local all all trust\nhost all all 127.0.0.0/8 trust\nhost replication all 127.0.0.0/8 trust\n";
    fs::write(data.join("pg_hba.conf"), hba).map_err(|e| err(e.to_string()))?;
    run_as.chown(&root)?;
    Ok(data)
}

/// Templates (and the shared server's directory) of test processes that have
/// exited; nothing else removes them, as statics are never dropped.
fn remove_stale_templates() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("corral-pg-template-")
            .or_else(|| name.strip_prefix("corral-pg-shared-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .map_err(|e| err(format!("cp: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(err(format!(
            "cp -a {} {} failed",
            from.display(),
            to.display()
        )))
    }
}

fn new_server_dir(run_as: &RunAs, prefix: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| err(format!("tempdir: {e}")))?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
        .map_err(|e| err(e.to_string()))?;
    run_as.chown(dir.path())?;
    Ok(dir)
}

impl Postgres {
    /// Starts a fresh primary on 127.0.0.1 and a free port.
    pub fn start() -> Result<Self> {
        Self::start_with(PgOptions::default())
    }

    pub fn start_with(opts: PgOptions) -> Result<Self> {
        let run_as = RunAs::detect()?;
        let template = template_dir(&run_as)?;
        let dir = new_server_dir(&run_as, &opts.dir_prefix)?;
        copy_dir(&template, &dir.path().join("data"))?;
        let mut pg = Self {
            dir,
            port: if opts.port == 0 {
                free_port(&opts.host)?
            } else {
                opts.port
            },
            host: opts.host,
            settings: opts.settings,
            run_as,
            child: None,
        };
        pg.launch()?;
        Ok(pg)
    }

    /// Starts a hot standby streaming from `self`, made with
    /// `pg_basebackup -R` and a physical replication slot.
    pub fn start_replica(&self) -> Result<Self> {
        self.start_replica_with(PgOptions::default())
    }

    pub fn start_replica_with(&self, opts: PgOptions) -> Result<Self> {
        let dir = new_server_dir(&self.run_as, &opts.dir_prefix)?;
        let data = dir.path().join("data");
        let port = if opts.port == 0 {
            free_port(&opts.host)?
        } else {
            opts.port
        };
        let slot = format!("replica_{port}");
        let output = self
            .run_as
            .command(pg_bin_dir().join("pg_basebackup"))
            .arg("--pgdata")
            .arg(&data)
            .args(["--host", &self.host, "--port", &self.port.to_string()])
            .args(["--username", SUPERUSER, "--write-recovery-conf"])
            .args(["--wal-method=stream", "--checkpoint=fast", "--no-sync"])
            .args(["--create-slot", "--slot", &slot])
            .output()
            .map_err(|e| err(format!("running pg_basebackup: {e}")))?;
        if !output.status.success() {
            return Err(err(format!(
                "pg_basebackup failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        let mut pg = Self {
            dir,
            host: opts.host,
            port,
            settings: opts.settings,
            run_as: self.run_as.clone(),
            child: None,
        };
        pg.launch()?;
        Ok(pg)
    }

    fn launch(&mut self) -> Result<()> {
        let log_path = self.log_path();
        let log = fs::File::create(&log_path).map_err(|e| err(e.to_string()))?;
        self.run_as.chown(&log_path)?;
        let mut cmd = self.run_as.command(pg_bin_dir().join("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-c", &format!("listen_addresses={}", self.host)])
            .args(["-c", &format!("port={}", self.port)])
            .args([
                "-c",
                &format!("unix_socket_directories={}", self.dir.path().display()),
            ])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "shared_buffers=16MB"])
            .args(["-c", "max_connections=200", "-c", "wal_level=replica"])
            .args(["-c", "max_wal_senders=10", "-c", "max_replication_slots=10"])
            .args(["-c", "hot_standby=on", "-c", "wal_keep_size=64MB"])
            .args(["-c", "wal_receiver_status_interval=1s"]);
        for (name, value) in &self.settings {
            cmd.args(["-c", &format!("{name}={value}")]);
        }
        let log_err = log.try_clone().map_err(|e| err(e.to_string()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| err(format!("spawning postgres: {e}")))?;
        self.child = Some(child);
        let deadline = Duration::from_secs(30);
        wait_until("postgres to accept connections", deadline, || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(err(format!(
                    "postgres exited with {status} while starting:\n{}",
                    self.log()
                )));
            }
            Ok(self.is_ready())
        })
        .map_err(|e| err(format!("{e}\n{}", self.log())))
    }

    /// True when the server accepts connections.
    pub fn is_ready(&self) -> bool {
        Command::new(pg_bin_dir().join("pg_isready"))
            .args(["-q", "-h", &self.host, "-p", &self.port.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.log_path()) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// A connection URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@{}:{}/{database}",
            self.host, self.port
        )
    }

    /// Runs SQL through psql and returns its unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let output = Command::new(pg_bin_dir().join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", &self.host, "-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, "-d", database, "-c", sql])
            .output()
            .map_err(|e| err(format!("running psql: {e}")))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
        } else {
            Err(err(format!(
                "psql {sql:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )))
        }
    }

    /// Creates a database and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String> {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url(name))
    }

    /// Pauses WAL replay on a standby, so it lags behind its primary.
    pub fn pause_replay(&self) -> Result<()> {
        self.psql("postgres", "SELECT pg_wal_replay_pause()")
            .map(drop)
    }

    pub fn resume_replay(&self) -> Result<()> {
        self.psql("postgres", "SELECT pg_wal_replay_resume()")
            .map(drop)
    }

    /// Promotes a standby to primary and waits until it accepts writes.
    pub fn promote(&self) -> Result<()> {
        self.psql("postgres", "SELECT pg_promote(true, 30)")?;
        wait_until("promotion", Duration::from_secs(30), || {
            Ok(self.psql("postgres", "SELECT pg_is_in_recovery()")? == "f")
        })
    }

    /// Kills the server the hard way (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server with a fast shutdown and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = kill(pid, Signal::SIGINT);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a stopped server again on the same port and data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A server shared by every test of one test binary; each test asks for its
/// own database with [`shared_database`]. It is spawned from a thread that
/// never ends, so it lives (and its pdeathsig stays armed) until the test
/// process exits.
pub fn shared_server() -> Result<&'static SharedServer> {
    static SHARED: OnceLock<std::result::Result<SharedServer, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("shared-postgres".into())
                .spawn(move || {
                    match Postgres::start_with(PgOptions {
                        dir_prefix: format!("corral-pg-shared-{}-", std::process::id()),
                        ..PgOptions::default()
                    }) {
                        Ok(pg) => {
                            let shared = SharedServer {
                                host: pg.host.clone(),
                                port: pg.port,
                                dir: pg.dir.path().to_path_buf(),
                            };
                            let _ = tx.send(Ok(shared));
                            // Keep the server (and this thread, its pdeathsig
                            // parent) alive for the rest of the process.
                            loop {
                                std::thread::park();
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.0));
                        }
                    }
                })
                .map_err(|e| e.to_string())?;
            rx.recv().map_err(|e| e.to_string())?
        })
        .as_ref()
        .map_err(|e| Error(e.clone()))
}

/// Where the shared server listens.
#[derive(Debug, Clone)]
pub struct SharedServer {
    pub host: String,
    pub port: u16,
    pub dir: PathBuf,
}

/// A new, empty database on the shared server; returns its URL.
pub fn shared_database(prefix: &str) -> Result<String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let server = shared_server()?;
    let name = format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let output = Command::new(pg_bin_dir().join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", &server.host, "-p", &server.port.to_string()])
        .args(["-U", SUPERUSER, "-d", "postgres"])
        .args(["-c", &format!("CREATE DATABASE \"{name}\"")])
        .output()
        .map_err(|e| err(format!("running psql: {e}")))?;
    if !output.status.success() {
        return Err(err(format!(
            "creating database {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(format!(
        "postgres://{SUPERUSER}@{}:{}/{name}",
        server.host, server.port
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_streams_and_pauses() {
        let primary = Postgres::start().expect("primary");
        primary
            .psql(
                "postgres",
                "CREATE TABLE t (v int); INSERT INTO t VALUES (1)",
            )
            .expect("write");
        let replica = primary.start_replica().expect("replica");
        assert_eq!(
            replica
                .psql("postgres", "SELECT pg_is_in_recovery()")
                .expect("q"),
            "t"
        );
        wait_until("replica catches up", Duration::from_secs(20), || {
            Ok(replica.psql("postgres", "SELECT count(*) FROM t")? == "1")
        })
        .expect("catch up");
        replica.pause_replay().expect("pause");
        primary
            .psql("postgres", "INSERT INTO t VALUES (2)")
            .expect("write");
        // Paused: the row must not show up on the replica yet.
        assert_eq!(
            replica
                .psql("postgres", "SELECT count(*) FROM t")
                .expect("q"),
            "1"
        );
        replica.resume_replay().expect("resume");
        wait_until("replay resumes", Duration::from_secs(20), || {
            Ok(replica.psql("postgres", "SELECT count(*) FROM t")? == "2")
        })
        .expect("resume");
    }

    #[test]
    fn server_runs_unprivileged_and_dies_with_drop() {
        let mut pg = Postgres::start().expect("start");
        let user = pg.psql("postgres", "SELECT current_setting('data_directory')");
        assert!(user.is_ok());
        let pid = pg.child.as_ref().map(|c| c.id()).expect("pid");
        let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).expect("uid");
        let uid: u32 = uid_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("uid");
        assert_eq!(uid, RunAs::detect().expect("run as").uid);
        assert_ne!(uid, 0, "postgres must never run as root");
        pg.stop();
        assert!(!pg.is_ready());
    }
}
