//! The real process layer: starts the node's services in process groups of
//! their own (so a Ctrl-C to the agent never reaches them), keeps pid files in
//! `<state>/run/`, appends their output to `<state>/logs/<service>.log`
//! (rotated by size: `<service>.log.1` ... `.N`), restarts them with capped backoff, stops them gracefully and reaps them.
//! A restarted agent adopts the instances its predecessor left running
//! (pid file + `/proc/<pid>/cmdline`) and watches those by polling.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;

use crate::host::{Ensured, Host, HostError, OneShot, Output, ServiceInfo, ServiceSpec};

/// The first restart of a service that died young (systemd's default
/// `RestartSec` too): a Consul agent back within a few hundred ms is back
/// before gossip declares its node failed, which would end the primary's
/// leader session. Doubled at each crash in a row.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A run this long counts as healthy: the next crash restarts at once.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How long a service gets to stop before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(30);
/// How often the agent calls [`Supervisor::tick`].
pub const TICK_EVERY: Duration = Duration::from_millis(100);

enum Proc {
    Child(Child),
    Adopted(u32),
    Dead,
}

struct Entry {
    spec: ServiceSpec,
    proc: Proc,
    restarts: u32,
    started: Instant,
    backoff: Duration,
    restart_at: Option<Instant>,
    last_exit: Option<String>,
}

impl Entry {
    fn pid(&self) -> Option<u32> {
        match &self.proc {
            Proc::Child(c) => Some(c.id()),
            Proc::Adopted(pid) => Some(*pid),
            Proc::Dead => None,
        }
    }

    /// Reaps a child that exited; notices an adopted process that vanished.
    fn poll(&mut self) -> bool {
        match &mut self.proc {
            Proc::Child(child) => match child.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    self.last_exit = Some(format!("exited: {status}"));
                    self.proc = Proc::Dead;
                    false
                }
                Err(e) => {
                    self.last_exit = Some(format!("wait failed: {e}"));
                    self.proc = Proc::Dead;
                    false
                }
            },
            Proc::Adopted(pid) => {
                if pid_alive(*pid) {
                    true
                } else {
                    self.last_exit = Some("exited (adopted process)".into());
                    self.proc = Proc::Dead;
                    false
                }
            }
            Proc::Dead => false,
        }
    }
}

/// Whether `pid` is a live (not zombie) process.
pub fn pid_alive(pid: u32) -> bool {
    crate::procfs::read_stat(pid, &mut String::new()).is_some_and(|s| s.alive())
}

/// Whether any live process is in process group `pgid`. Every service is
/// the leader of its own session and group, so this covers its workers and
/// backends too: nginx workers can outlive a killed master and hold the port.
pub fn group_alive(pgid: u32) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else {
        return false;
    };
    let mut buf = String::new();
    entries.flatten().any(|e| {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            return false;
        };
        crate::procfs::read_stat(pid, &mut buf).is_some_and(|s| s.pgrp == pgid && s.alive())
    })
}

/// Kills every process of group `pgid`.
pub fn kill_group(pgid: u32) {
    let _ = nix::sys::signal::killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL);
}

/// The command line of `pid`, arguments joined by spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text = String::from_utf8_lossy(&raw).replace('\0', " ");
    Some(text.trim().to_string())
}

/// Reads a pid file.
pub fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

pub struct Supervisor {
    run_dir: PathBuf,
    log_dir: PathBuf,
    rotation: LogRotation,
    entries: Mutex<HashMap<String, Entry>>,
}

/// When a service log is rotated and how many old ones are kept: logs
/// share a disk with pgdata, so none may grow without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRotation {
    /// A log is rotated once it is larger than this.
    pub max_bytes: u64,
    /// Rotated logs kept (`.1` newest); 0 keeps none.
    pub keep: u32,
}

impl Default for LogRotation {
    fn default() -> Self {
        Self {
            max_bytes: 10 << 20,
            keep: 3,
        }
    }
}

/// Rotates `path` when it is larger than `rotation.max_bytes`: `.N-1` ...
/// `.1` move up one (the oldest goes), a copy becomes `.1` and the log is
/// truncated in place. Services hold their log open in append mode, so they
/// write on at the start of the emptied file; lines written between the
/// copy and the truncation are lost (the copy-truncate trade: a service
/// cannot be told to reopen its stdout). `Ok(true)` when it rotated.
pub fn rotate_log(path: &Path, rotation: LogRotation) -> std::io::Result<bool> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= rotation.max_bytes {
        return Ok(false);
    }
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    let ignore_missing = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    if rotation.keep > 0 {
        ignore_missing(fs::remove_file(numbered(rotation.keep)))?;
        for n in (1..rotation.keep).rev() {
            ignore_missing(fs::rename(numbered(n), numbered(n + 1)))?;
        }
        // fs::copy carries the mode (0640) over.
        fs::copy(path, numbered(1))?;
    }
    OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

impl Supervisor {
    pub fn new(state_dir: &Path) -> std::io::Result<Self> {
        let run_dir = state_dir.join("run");
        let log_dir = state_dir.join("logs");
        fs::create_dir_all(&run_dir)?;
        fs::create_dir_all(&log_dir)?;
        Ok(Self {
            run_dir,
            log_dir,
            rotation: LogRotation::default(),
            entries: Mutex::new(HashMap::new()),
        })
    }

    pub fn with_log_rotation(mut self, rotation: LogRotation) -> Self {
        self.rotation = rotation;
        self
    }

    /// Rotates every service log grown past the limit.
    fn rotate_logs(&self, names: impl Iterator<Item = String>) {
        for name in names {
            let path = self.log_dir.join(format!("{name}.log"));
            match rotate_log(&path, self.rotation) {
                Ok(true) => tracing::info!(service = %name, "log rotated"),
                Ok(false) => {}
                Err(e) => tracing::warn!(service = %name, error = %e, "cannot rotate the log"),
            }
        }
    }

    pub fn pid_file(&self, name: &str) -> PathBuf {
        self.run_dir.join(format!("{name}.pid"))
    }

    fn fingerprint_file(&self, name: &str) -> PathBuf {
        self.run_dir.join(format!("{name}.fingerprint"))
    }

    /// Restarts the services that died, once their backoff has passed.
    /// Called every [`TICK_EVERY`] by the agent.
    pub fn tick(&self) {
        let mut entries = self.entries.lock().expect("supervisor lock");
        self.rotate_logs(entries.keys().cloned());
        let now = Instant::now();
        for entry in entries.values_mut() {
            let was_alive = !matches!(entry.proc, Proc::Dead);
            if entry.poll() {
                if entry.started.elapsed() > STABLE_AFTER {
                    entry.backoff = BACKOFF_START;
                }
                continue;
            }
            if !entry.spec.restart {
                if was_alive {
                    tracing::warn!(
                        service = %entry.spec.name,
                        why = entry.last_exit.as_deref().unwrap_or("?"),
                        "service died; left to its driver"
                    );
                }
                continue;
            }
            match entry.restart_at {
                None => {
                    let delay = if entry.started.elapsed() > STABLE_AFTER {
                        Duration::ZERO
                    } else {
                        entry.backoff
                    };
                    tracing::warn!(
                        service = %entry.spec.name,
                        why = entry.last_exit.as_deref().unwrap_or("?"),
                        delay_ms = delay.as_millis() as u64,
                        "service died; restarting"
                    );
                    entry.restart_at = Some(now + delay);
                }
                Some(at) if at <= now => {
                    entry.restart_at = None;
                    entry.backoff = (entry.backoff * 2).min(BACKOFF_CAP);
                    entry.restarts += 1;
                    entry.started = now;
                    match self.spawn(&entry.spec) {
                        Ok(child) => entry.proc = Proc::Child(child),
                        Err(e) => {
                            entry.last_exit = Some(format!("restart failed: {e}"));
                            tracing::error!(service = %entry.spec.name, error = %e, "restart failed");
                        }
                    }
                }
                Some(_) => {}
            }
        }
    }

    fn spawn(&self, spec: &ServiceSpec) -> Result<Child, HostError> {
        let log_path = self.log_dir.join(format!("{}.log", spec.name));
        // Logs may carry what a service prints about its peers: not for
        // every local user.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&log_path)?;
        let err = log.try_clone()?;
        // The child leads a process group of its own (so a Ctrl-C to the
        // agent never reaches it, and its workers can be killed as a group)
        // and drops to its account, both between fork and exec. std's spawn
        // returns only once the exec of the program itself succeeded, so the
        // pid file written below always names a process whose command line
        // is already the service's: an agent restarting at any moment
        // recognises it and never starts a second copy. (Spawning through
        // the `setsid` and `setpriv` binaries left a window in which the pid
        // still ran the launcher.) Supplementary groups are dropped.
        let mut cmd = Command::new(&spec.program);
        cmd.process_group(0)
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .current_dir("/");
        if let Some(account) = spec.run_as.as_ref().filter(|_| running_as_root()) {
            cmd.gid(account.gid).uid(account.uid);
        }
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CORRAL_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd.spawn().map_err(|source| HostError::Spawn {
            command: spec.program.display().to_string(),
            source,
        })?;
        crate::durable::write_atomic(
            &self.pid_file(&spec.name),
            format!("{}\n", child.id()).as_bytes(),
            0o644,
        )?;
        crate::durable::write_atomic(
            &self.fingerprint_file(&spec.name),
            spec.fingerprint().as_bytes(),
            0o644,
        )?;
        tracing::info!(service = %spec.name, pid = child.id(), "started");
        Ok(child)
    }

    /// An instance an earlier agent left running, if the pid file names a
    /// live process whose command line carries this node's marker.
    fn find_running(&self, spec: &ServiceSpec) -> Option<u32> {
        let pid = read_pid(&self.pid_file(&spec.name))?;
        let line = cmdline(pid)?;
        (pid_alive(pid) && line.contains(&spec.marker)).then_some(pid)
    }

    fn insert(&self, spec: &ServiceSpec, proc: Proc) {
        self.entries.lock().expect("supervisor lock").insert(
            spec.name.clone(),
            Entry {
                spec: spec.clone(),
                proc,
                restarts: 0,
                started: Instant::now(),
                backoff: BACKOFF_START,
                restart_at: None,
                last_exit: None,
            },
        );
    }

    /// Signals `pid` and waits until it is gone, killing it after `grace`.
    async fn terminate(
        &self,
        name: &str,
        pid: u32,
        signal: Signal,
        mut child: Option<Child>,
        grace: Duration,
    ) {
        let _ = kill(Pid::from_raw(pid as i32), signal);
        let start = Instant::now();
        let mut killed = false;
        loop {
            let leader_gone = match &mut child {
                Some(c) => !matches!(c.try_wait(), Ok(None)),
                None => !pid_alive(pid),
            };
            if leader_gone && !group_alive(pid) {
                break;
            }
            if !killed && start.elapsed() > grace {
                tracing::warn!(
                    service = name,
                    pid,
                    "did not stop in time; killing its group"
                );
                kill_group(pid);
                killed = true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(service = name, pid, "stopped");
    }
}

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[async_trait]
impl Host for Supervisor {
    async fn ensure(&self, spec: &ServiceSpec) -> Result<Ensured, HostError> {
        let current = {
            let mut entries = self.entries.lock().expect("supervisor lock");
            let alive = entries.get_mut(&spec.name).map(|e| e.poll());
            match (entries.get(&spec.name), alive) {
                (Some(e), Some(alive)) if e.spec == *spec && (spec.restart || alive) => {
                    // Alive or waiting for its restart: either way it is ours.
                    return Ok(Ensured::Running);
                }
                (Some(e), _) if e.spec == *spec => {
                    // Dead and not restarted by the supervisor: start anew.
                    entries.remove(&spec.name);
                    false
                }
                (Some(_), _) => true,
                _ => false,
            }
        };
        let mut outcome = Ensured::Started;
        if current {
            self.stop(&spec.name).await?;
            outcome = Ensured::Restarted;
        } else if let Some(pid) = self.find_running(spec) {
            let same = fs::read_to_string(self.fingerprint_file(&spec.name))
                .is_ok_and(|f| f.trim() == spec.fingerprint());
            if same {
                tracing::info!(service = %spec.name, pid, "adopted");
                self.insert(spec, Proc::Adopted(pid));
                return Ok(Ensured::Adopted);
            }
            tracing::info!(service = %spec.name, pid, "running with another command line; restarting");
            self.terminate(&spec.name, pid, spec.stop_signal, None, STOP_GRACE)
                .await;
            outcome = Ensured::Restarted;
        }
        let child = self.spawn(spec)?;
        self.insert(spec, Proc::Child(child));
        Ok(outcome)
    }

    async fn adopt(&self, spec: &ServiceSpec) -> Result<bool, HostError> {
        {
            let mut entries = self.entries.lock().expect("supervisor lock");
            if let Some(e) = entries.get_mut(&spec.name) {
                return Ok(e.poll());
            }
        }
        match self.find_running(spec) {
            Some(pid) => {
                tracing::info!(service = %spec.name, pid, "adopted");
                self.insert(spec, Proc::Adopted(pid));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn stop(&self, name: &str) -> Result<(), HostError> {
        let entry = self.entries.lock().expect("supervisor lock").remove(name);
        if let Some(entry) = entry {
            let signal = entry.spec.stop_signal;
            match entry.proc {
                Proc::Child(child) => {
                    let pid = child.id();
                    self.terminate(name, pid, signal, Some(child), STOP_GRACE)
                        .await
                }
                Proc::Adopted(pid) => self.terminate(name, pid, signal, None, STOP_GRACE).await,
                Proc::Dead => {}
            }
        }
        let _ = fs::remove_file(self.pid_file(name));
        let _ = fs::remove_file(self.fingerprint_file(name));
        Ok(())
    }

    fn signal(&self, name: &str, signal: Signal) -> Result<(), HostError> {
        let entries = self.entries.lock().expect("supervisor lock");
        let pid = entries
            .get(name)
            .and_then(Entry::pid)
            .ok_or_else(|| HostError::Unknown(name.into()))?;
        kill(Pid::from_raw(pid as i32), signal)
            .map_err(|e| HostError::Io(std::io::Error::from_raw_os_error(e as i32)))
    }

    fn services(&self) -> Vec<ServiceInfo> {
        let mut entries = self.entries.lock().expect("supervisor lock");
        let mut out: Vec<ServiceInfo> = entries
            .values_mut()
            .map(|e| {
                let running = e.poll();
                ServiceInfo {
                    name: e.spec.name.clone(),
                    pid: e.pid(),
                    running,
                    restarts: e.restarts,
                    last_exit: if running { None } else { e.last_exit.clone() },
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    async fn run(&self, cmd: &OneShot) -> Result<Output, HostError> {
        let mut command = match cmd.run_as.as_ref().filter(|_| running_as_root()) {
            Some(account) => {
                let mut c = tokio::process::Command::new("setpriv");
                c.arg(format!("--reuid={}", account.uid))
                    .arg(format!("--regid={}", account.gid))
                    .arg("--init-groups")
                    .arg("--")
                    .arg(&cmd.program);
                c
            }
            None => tokio::process::Command::new(&cmd.program),
        };
        command
            .args(&cmd.args)
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .stdin(if cmd.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .current_dir("/")
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|source| HostError::Spawn {
            command: cmd.display(),
            source,
        })?;
        if let (Some(input), Some(mut stdin)) = (&cmd.stdin, child.stdin.take()) {
            stdin.write_all(input.as_bytes()).await?;
            drop(stdin);
        }
        let output = tokio::time::timeout(cmd.timeout, child.wait_with_output())
            .await
            .map_err(|_| HostError::Timeout {
                command: cmd.display(),
                timeout: cmd.timeout,
            })??;
        Ok(Output {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Account;
    use std::os::unix::fs::PermissionsExt;

    fn sleeper(dir: &Path) -> ServiceSpec {
        ServiceSpec {
            name: "sleeper".into(),
            program: "sleep".into(),
            // A distinctive argument is the marker.
            args: vec![format!("{}", 1000 + (std::process::id() % 1000))],
            env: vec![("WHERE".into(), dir.display().to_string())],
            run_as: None,
            marker: format!("sleep {}", 1000 + (std::process::id() % 1000)),
            stop_signal: Signal::SIGTERM,
            restart: true,
        }
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `Uid:` line of /proc/<pid>/status: real, effective, saved, fs.
    fn uids(pid: u32) -> String {
        fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("status")
            .lines()
            .find_map(|l| {
                l.strip_prefix("Uid:")
                    .map(|u| u.split_whitespace().collect::<Vec<_>>().join(" "))
            })
            .expect("Uid line")
    }

    #[tokio::test]
    async fn a_service_with_an_account_runs_as_that_account_in_its_own_group() {
        if !running_as_root() {
            eprintln!("skipped: dropping to an account needs root");
            return;
        }
        let account = Account::lookup("nobody").expect("the nobody account");
        let dir = tempfile::tempdir().expect("tmp");
        let mut spec = sleeper(dir.path());
        spec.name = "dropped".into();
        spec.run_as = Some(account.clone());
        let sup = Supervisor::new(dir.path()).expect("supervisor");
        assert_eq!(sup.ensure(&spec).await.expect("start"), Ensured::Started);
        let pid = read_pid(&sup.pid_file("dropped")).expect("pid file");
        let u = account.uid;
        assert_eq!(uids(pid), format!("{u} {u} {u} {u}"));
        assert_eq!(
            nix::unistd::getpgid(Some(Pid::from_raw(pid as i32))).ok(),
            Some(Pid::from_raw(pid as i32))
        );
        sup.stop("dropped").await.expect("stop");
        assert!(!pid_alive(pid));
    }

    #[tokio::test]
    async fn a_missing_program_is_an_error_and_leaves_no_pid_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut spec = sleeper(dir.path());
        spec.program = dir.path().join("no-such-program");
        let sup = Supervisor::new(dir.path()).expect("supervisor");
        assert!(matches!(
            sup.ensure(&spec).await,
            Err(HostError::Spawn { .. })
        ));
        assert!(read_pid(&sup.pid_file("sleeper")).is_none());
    }

    #[tokio::test]
    async fn a_chatty_service_log_is_rotated_by_size_and_keeps_the_newest_lines() {
        let dir = tempfile::tempdir().expect("tmp");
        let marker = format!("chatty-{}", std::process::id());
        let spec = ServiceSpec {
            name: "chatty".into(),
            program: "sh".into(),
            args: vec![
                "-c".into(),
                format!("i=0; while :; do echo \"$0 line $i\"; i=$((i+1)); done"),
                marker.clone(),
            ],
            env: vec![],
            run_as: None,
            marker: marker.clone(),
            stop_signal: Signal::SIGKILL,
            restart: false,
        };
        let rotation = LogRotation {
            max_bytes: 64 << 10,
            keep: 2,
        };
        let sup = Supervisor::new(dir.path())
            .expect("supervisor")
            .with_log_rotation(rotation);
        sup.ensure(&spec).await.expect("start");
        let log = dir.path().join("logs/chatty.log");
        let rotated = |n: u32| dir.path().join(format!("logs/chatty.log.{n}"));
        let mut rotations = 0;
        until("three rotations", || {
            let before = fs::metadata(rotated(1)).ok().map(|m| m.modified().ok());
            sup.tick();
            let after = fs::metadata(rotated(1)).ok().map(|m| m.modified().ok());
            if after.is_some() && after != before {
                rotations += 1;
            }
            rotations >= 3 && rotated(2).exists()
        })
        .await;
        sup.stop("chatty").await.expect("stop");
        assert!(!rotated(3).exists(), "only two rotated logs are kept");
        for path in [rotated(1), rotated(2)] {
            let meta = fs::metadata(&path).expect("rotated log");
            assert_eq!(
                meta.permissions().mode() & 0o777,
                0o640,
                "{}",
                path.display()
            );
            let text = fs::read_to_string(&path).expect("rotated log is text");
            assert!(
                text.lines().any(|l| l.starts_with(&marker)),
                "{}",
                path.display()
            );
        }
        // The service wrote on at the start of the emptied log: no hole of
        // zeros where the old content was.
        let live = fs::read(&log).expect("live log");
        assert!(
            !live.starts_with(&[0]),
            "the live log starts with NUL bytes"
        );
        // And the rotated logs are older than the live one: .2 < .1 < live.
        let first_line = |bytes: &[u8]| -> u64 {
            let text = String::from_utf8_lossy(bytes);
            let line = text
                .lines()
                .find(|l| l.starts_with(&marker))
                .expect("a line")
                .to_string();
            line.rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("line number")
        };
        let (two, one) = (
            first_line(&fs::read(rotated(2)).expect(".2")),
            first_line(&fs::read(rotated(1)).expect(".1")),
        );
        assert!(two < one, ".2 starts at line {two}, .1 at {one}");
        if !live.is_empty() {
            assert!(one < first_line(&live), "the live log continues after .1");
        }
    }

    #[tokio::test]
    async fn a_dead_service_is_restarted_and_a_new_supervisor_adopts_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let spec = sleeper(dir.path());
        let first = Supervisor::new(dir.path()).expect("supervisor");
        assert_eq!(first.ensure(&spec).await.expect("start"), Ensured::Started);
        assert_eq!(first.ensure(&spec).await.expect("again"), Ensured::Running);
        let pid = read_pid(&first.pid_file("sleeper")).expect("pid file");
        let log = fs::metadata(dir.path().join("logs/sleeper.log")).expect("log");
        assert_eq!(log.permissions().mode() & 0o777, 0o640);
        // The pid file names the service itself, already exec'd and leading
        // its own process group, the moment `ensure` returns.
        assert!(cmdline(pid).is_some_and(|c| c.contains(&spec.marker)));
        assert_eq!(
            nix::unistd::getpgid(Some(Pid::from_raw(pid as i32))).ok(),
            Some(Pid::from_raw(pid as i32))
        );

        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill");
        until("a restart", || {
            first.tick();
            read_pid(&first.pid_file("sleeper")).is_some_and(|p| p != pid)
        })
        .await;
        let info = &first.services()[0];
        assert!(info.running);
        assert_eq!(info.restarts, 1);
        let restarted = info.pid.expect("pid");

        // An agent that starts over adopts the running instance.
        let second = Supervisor::new(dir.path()).expect("supervisor");
        assert_eq!(second.ensure(&spec).await.expect("adopt"), Ensured::Adopted);
        assert_eq!(second.services()[0].pid, Some(restarted));

        // A changed command line replaces it.
        let mut changed = spec.clone();
        changed.env.push(("MORE".into(), "1".into()));
        assert_eq!(
            second.ensure(&changed).await.expect("restart"),
            Ensured::Restarted
        );
        let replaced = second.services()[0].pid.expect("pid");
        assert_ne!(replaced, restarted);
        // `first` still holds the reaped child handle; reap the replaced one.
        drop(first);

        second.stop("sleeper").await.expect("stop");
        assert!(!pid_alive(replaced));
        assert!(read_pid(&second.pid_file("sleeper")).is_none());
        assert!(second.services().is_empty());
    }
}
