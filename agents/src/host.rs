//! The process layer the drivers stand on: long-running services the agent
//! supervises and one-shot commands it runs (`nginx -t`, `initdb`, `psql`).
//! [`crate::supervisor::Supervisor`] is the real one; [`fake::FakeHost`]
//! records what drivers ask for, so their logic is unit-tested without
//! processes.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;

/// An unprivileged account a process runs as (PostgreSQL refuses root;
/// nginx workers and consul need not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl Account {
    /// The account named `name`, if it exists.
    pub fn lookup(name: &str) -> Option<Self> {
        let user = nix::unistd::User::from_name(name).ok()??;
        Some(Self {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        })
    }
}

/// A long-running service the agent keeps alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// `consul`, `nginx`, `postgres`, `todomvc`: also the pid and log file name.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Drop to this account (through `setpriv`) when the agent is root.
    pub run_as: Option<Account>,
    /// A string in `/proc/<pid>/cmdline` that identifies this node's
    /// instance, so a restarted agent adopts only its own processes.
    pub marker: String,
    /// How to ask it to stop (postgres: SIGINT = fast shutdown).
    pub stop_signal: Signal,
    /// Whether the supervisor restarts it when it dies. PostgreSQL is not:
    /// whether it comes back as primary or standby is the HA loop's call.
    pub restart: bool,
}

impl ServiceSpec {
    /// A stable fingerprint of what the process was started with: a changed
    /// command line or environment means a restart.
    pub fn fingerprint(&self) -> String {
        // FNV-1a: deterministic across builds, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |s: &str| {
            for b in s.bytes().chain(std::iter::once(0)) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(&self.program.to_string_lossy());
        for a in &self.args {
            eat(a);
        }
        for (k, v) in &self.env {
            eat(k);
            eat(v);
        }
        if let Some(a) = &self.run_as {
            eat(&a.name);
        }
        format!("{h:016x}")
    }
}

/// What `ensure` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// It was already running as asked.
    Running,
    /// A running instance left by an earlier agent was taken over.
    Adopted,
    /// It was started.
    Started,
    /// It ran with another command line and was restarted.
    Restarted,
}

/// A one-shot command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneShot {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub run_as: Option<Account>,
    pub stdin: Option<String>,
    pub timeout: Duration,
}

impl OneShot {
    pub fn new(program: impl Into<PathBuf>, args: &[&str]) -> Self {
        Self {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            run_as: None,
            stdin: None,
            timeout: Duration::from_secs(30),
        }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn run_as(mut self, account: Option<Account>) -> Self {
        self.run_as = account;
        self
    }

    pub fn stdin(mut self, input: impl Into<String>) -> Self {
        self.stdin = Some(input.into());
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// The command as a person would type it, for error messages.
    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
}

/// How a one-shot command ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Output {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Turns a failed run into an error naming the command and its stderr.
    pub fn check(self, cmd: &OneShot) -> Result<Output, HostError> {
        if self.success {
            Ok(self)
        } else {
            let mut text = format!("{}\n{}", self.stderr.trim(), self.stdout.trim());
            text = text.trim().to_string();
            text.truncate(2000);
            Err(HostError::Failed {
                command: cmd.display(),
                output: text,
            })
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {output}")]
    Failed { command: String, output: String },
    #[error("{command} did not finish within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("service {0} is not supervised")]
    Unknown(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A supervised service as the heartbeat reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub name: String,
    pub pid: Option<u32>,
    pub running: bool,
    pub restarts: u32,
    /// Why it last stopped, when it is not running.
    pub last_exit: Option<String>,
}

#[async_trait]
pub trait Host: Send + Sync {
    /// Makes `spec` run: adopts or keeps a matching instance, restarts one
    /// started differently, starts one otherwise; keeps it alive after.
    async fn ensure(&self, spec: &ServiceSpec) -> Result<Ensured, HostError>;
    /// Takes over an instance an earlier agent left running (whatever its
    /// command line), without ever starting one; says whether it runs.
    async fn adopt(&self, spec: &ServiceSpec) -> Result<bool, HostError>;
    /// Stops the service gracefully (killing it after a grace period) and
    /// forgets it. Stopping what does not run is fine.
    async fn stop(&self, name: &str) -> Result<(), HostError>;
    /// Sends a signal (nginx reload: SIGHUP).
    fn signal(&self, name: &str, signal: Signal) -> Result<(), HostError>;
    /// The supervised services.
    fn services(&self) -> Vec<ServiceInfo>;
    /// Runs a command to completion.
    async fn run(&self, cmd: &OneShot) -> Result<Output, HostError>;
}

#[cfg(test)]
pub mod fake {
    //! A host that runs nothing and remembers everything.

    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        Start(String),
        Restart(String),
        Stop(String),
        Signal(String, Signal),
        Run(String),
    }

    #[derive(Default)]
    pub struct FakeHost {
        pub calls: Mutex<Vec<Call>>,
        running: Mutex<BTreeMap<String, ServiceSpec>>,
        /// Commands whose display contains the key fail with the value.
        pub failing: Mutex<Vec<(String, String)>>,
    }

    impl FakeHost {
        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().expect("lock").clone()
        }

        pub fn fail_when(&self, command_contains: &str, stderr: &str) {
            self.failing
                .lock()
                .expect("lock")
                .push((command_contains.into(), stderr.into()));
        }

        pub fn starts(&self) -> usize {
            self.calls()
                .iter()
                .filter(|c| matches!(c, Call::Start(_) | Call::Restart(_)))
                .count()
        }
    }

    #[async_trait]
    impl Host for FakeHost {
        async fn ensure(&self, spec: &ServiceSpec) -> Result<Ensured, HostError> {
            let mut running = self.running.lock().expect("lock");
            let outcome = match running.get(&spec.name) {
                Some(s) if s == spec => return Ok(Ensured::Running),
                Some(_) => Ensured::Restarted,
                None => Ensured::Started,
            };
            running.insert(spec.name.clone(), spec.clone());
            self.calls.lock().expect("lock").push(match outcome {
                Ensured::Restarted => Call::Restart(spec.name.clone()),
                _ => Call::Start(spec.name.clone()),
            });
            Ok(outcome)
        }

        async fn adopt(&self, spec: &ServiceSpec) -> Result<bool, HostError> {
            Ok(self.running.lock().expect("lock").contains_key(&spec.name))
        }

        async fn stop(&self, name: &str) -> Result<(), HostError> {
            if self.running.lock().expect("lock").remove(name).is_some() {
                self.calls
                    .lock()
                    .expect("lock")
                    .push(Call::Stop(name.into()));
            }
            Ok(())
        }

        fn signal(&self, name: &str, signal: Signal) -> Result<(), HostError> {
            if !self.running.lock().expect("lock").contains_key(name) {
                return Err(HostError::Unknown(name.into()));
            }
            self.calls
                .lock()
                .expect("lock")
                .push(Call::Signal(name.into(), signal));
            Ok(())
        }

        fn services(&self) -> Vec<ServiceInfo> {
            self.running
                .lock()
                .expect("lock")
                .keys()
                .map(|name| ServiceInfo {
                    name: name.clone(),
                    pid: Some(1),
                    running: true,
                    restarts: 0,
                    last_exit: None,
                })
                .collect()
        }

        async fn run(&self, cmd: &OneShot) -> Result<Output, HostError> {
            let line = cmd.display();
            self.calls
                .lock()
                .expect("lock")
                .push(Call::Run(line.clone()));
            let failing = self.failing.lock().expect("lock");
            if let Some((_, err)) = failing.iter().find(|(k, _)| line.contains(k.as_str())) {
                return Ok(Output {
                    success: false,
                    stdout: String::new(),
                    stderr: err.clone(),
                });
            }
            Ok(Output {
                success: true,
                ..Output::default()
            })
        }
    }
}
