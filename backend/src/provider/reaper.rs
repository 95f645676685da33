//! Reaping for a process that starts node agents. With no init system that
//! reaps orphans, every process corral starts, and every process those leave
//! behind when they die, must be waited for by someone: this process makes
//! itself a child subreaper and one thread waits for every child, so agents,
//! the services an agent leaves running when it is killed, and the commands
//! corral runs all end up reaped here.
//!
//! Because that thread waits for any child, nothing else in the process may
//! wait for one: start child processes only through [`Reaper::spawn`] and
//! [`Reaper::output`].

use std::collections::HashMap;
use std::io::{self, Read};
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// A started child: its pid and, once it has ended, how.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    pub exit: oneshot::Receiver<Exit>,
}

/// What [`Reaper::output`] collected.
#[derive(Debug)]
pub struct Output {
    pub exit: Exit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Killed because it outlived its limit.
    pub timed_out: bool,
}

pub struct Reaper {
    /// Children someone waits for, by pid. Held while spawning, so the reaper
    /// thread cannot reap a child before it is listed here.
    waiting: Mutex<HashMap<i32, oneshot::Sender<Exit>>>,
    /// Wakes the reaper thread when there were no children and now are.
    spawned: Condvar,
}

impl Reaper {
    /// The process-wide reaper; the first call makes this process a child
    /// subreaper and starts the reaper thread.
    pub fn global() -> &'static Reaper {
        static REAPER: OnceLock<&'static Reaper> = OnceLock::new();
        REAPER.get_or_init(|| {
            if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
                tracing::warn!(error = %e, "cannot become a child subreaper; orphans go to init");
            }
            let reaper: &'static Reaper = Box::leak(Box::new(Reaper {
                waiting: Mutex::new(HashMap::new()),
                spawned: Condvar::new(),
            }));
            std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || reaper.reap_forever())
                .expect("spawn the reaper thread");
            reaper
        })
    }

    /// Starts `cmd`; its end is reported on the returned receiver.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Spawned> {
        let mut waiting = self.lock();
        let child = cmd.spawn()?;
        let pid = child.id();
        // Dropping a std Child neither kills nor waits for it.
        drop(child);
        let (tx, rx) = oneshot::channel();
        waiting.insert(pid as i32, tx);
        self.spawned.notify_one();
        Ok(Spawned { pid, exit: rx })
    }

    /// Runs `cmd` to its end and collects its output.
    pub async fn output(&self, cmd: &mut Command) -> io::Result<Output> {
        self.output_within(cmd, None).await
    }

    /// Like [`Reaper::output`], but once `limit` has passed the child's
    /// process group is killed (the command must lead a group of its own:
    /// `process_group(0)`); the output is then what it wrote until then and
    /// `timed_out` is set.
    pub async fn output_within(
        &self,
        cmd: &mut Command,
        limit: Option<Duration>,
    ) -> io::Result<Output> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (spawned, stdout, stderr) = {
            let mut waiting = self.lock();
            let mut child = cmd.spawn()?;
            let stdout = child.stdout.take();
            let stderr = child.stderr.take();
            let pid = child.id();
            drop(child);
            let (tx, rx) = oneshot::channel();
            waiting.insert(pid as i32, tx);
            self.spawned.notify_one();
            (Spawned { pid, exit: rx }, stdout, stderr)
        };
        let read = |pipe: Option<Box<dyn Read + Send>>| {
            tokio::task::spawn_blocking(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = read(stdout.map(|p| Box::new(p) as Box<dyn Read + Send>));
        let err = read(stderr.map(|p| Box::new(p) as Box<dyn Read + Send>));
        let mut exit_rx = spawned.exit;
        let mut timed_out = false;
        let exit = match limit {
            None => exit_rx.await,
            Some(limit) => match tokio::time::timeout(limit, &mut exit_rx).await {
                Ok(exit) => exit,
                Err(_) => {
                    timed_out = true;
                    let group = Pid::from_raw(-(spawned.pid as i32));
                    let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
                    exit_rx.await
                }
            },
        }
        .map_err(|_| io::Error::other("the reaper lost the child"))?;
        Ok(Output {
            exit,
            stdout: out.await.unwrap_or_default(),
            stderr: err.await.unwrap_or_default(),
            timed_out,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, oneshot::Sender<Exit>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reap_forever(&self) {
        loop {
            // Wait without reaping first: std's spawn reaps a child whose exec
            // failed itself, under our lock, so we may only reap under it.
            match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    let mut waiting = self.lock();
                    let exit = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                        Ok(WaitStatus::Exited(_, code)) => Exit::Code(code),
                        Ok(WaitStatus::Signaled(_, sig, _)) => Exit::Signal(sig as i32),
                        Ok(_) | Err(_) => continue,
                    };
                    if let Some(tx) = waiting.remove(&pid.as_raw()) {
                        let _ = tx.send(exit);
                    } else {
                        tracing::debug!(pid = pid.as_raw(), %exit, "reaped an orphan");
                    }
                }
                Err(Errno::ECHILD) => {
                    let waiting = self.lock();
                    let _ = self
                        .spawned
                        .wait_timeout(waiting, Duration::from_secs(1))
                        .unwrap_or_else(|p| p.into_inner());
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, "waitid failed");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Whether `pid` is alive and its command line mentions `needle`: a pid
/// file's process may have died and its pid been reused.
pub fn alive_with(pid: u32, needle: &str) -> bool {
    if pid == 0 {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // A zombie is dead, whatever its command line says.
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            !zombie && String::from_utf8_lossy(&cmdline).contains(needle)
        }
        Err(_) => false,
    }
}

/// Reads a pid file: the first line, a positive number.
pub fn read_pid_file(path: &std::path::Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().next()?.trim().parse().ok().filter(|p| *p > 0)
}

/// `Pid` of a `u32` pid, for signalling.
pub fn pid(pid: u32) -> Pid {
    Pid::from_raw(pid as i32)
}
