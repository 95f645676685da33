//! The local provider: every node of provider `local` is a state directory
//! (`<state>/nodes/<name>`) and its own loopback address on this machine
//! (any 127.0.0.0/8 address, or an address this host already has, as the
//! LXC bridge's address for adm1), with one `corral-agent` process for it.
//! Its machine "runs" while that agent process lives; making it again means
//! starting the agent, which adopts whatever services still run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use corral_proto::{Node, Provider};

use super::reaper::{self, Reaper};
use super::{BootConfig, Machine, MachineState, Machines, ProviderError};

/// How the provider starts agents.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The control plane's state directory: node directories go under
    /// `nodes/`, and each agent reads its node's enrollment secret
    /// from `nodes/<node>/enroll-secret`.
    pub state_dir: PathBuf,
    /// The `corral-agent` executable.
    pub agent_bin: PathBuf,
    /// More arguments for every `corral-agent run` (e.g. `--nginx-port`).
    pub agent_args: Vec<String>,
}

impl LocalConfig {
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.state_dir.join("nodes").join(node)
    }

    pub fn nodes_dir(&self) -> PathBuf {
        self.state_dir.join("nodes")
    }
}

/// `corral-agent` next to this executable, else on PATH.
pub fn default_agent_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("corral-agent")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("corral-agent"))
}

pub struct LocalProvider {
    config: LocalConfig,
    /// Agents this process started, by node: their pid files may not be
    /// written yet when the next inventory looks.
    started: Mutex<HashMap<String, u32>>,
}

impl LocalProvider {
    pub fn new(config: LocalConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            started: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &LocalConfig {
        &self.config
    }

    fn started(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.started.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn running(&self, name: &str) -> bool {
        let started = self.started().get(name).copied();
        started.is_some_and(|pid| reaper::alive_with(pid, "corral-agent"))
            || agent_alive(&self.config.node_dir(name))
    }

    fn start_agent(&self, node: &Node, boot: &BootConfig) -> Result<u32, ProviderError> {
        let dir = self.config.node_dir(&node.name);
        std::fs::create_dir_all(dir.join("run"))
            .map_err(|e| ProviderError::Other(format!("cannot create {}: {e}", dir.display())))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .map_err(|e| ProviderError::Other(format!("cannot open the agent log: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| ProviderError::Other(format!("cannot open the agent log: {e}")))?;
        // The secret goes in a file (0600) of the node's own directory,
        // never on the command line; the agent reads it when it enrolls.
        let secret_file = dir.join("enroll-secret");
        super::lxc::write_atomic(&secret_file, format!("{}\n", boot.secret).as_bytes(), 0o600)?;
        let ca_file = dir.join("ca.pem");
        if let Some(ca) = &boot.ca_pem {
            super::lxc::write_atomic(&ca_file, ca.as_bytes(), 0o644)?;
        }
        let mut cmd = Command::new(&self.config.agent_bin);
        cmd.arg("run")
            .arg("--server")
            .arg(&boot.server_url)
            .arg("--node")
            .arg(&node.name)
            .arg("--address")
            .arg(&node.address)
            .arg("--state-dir")
            .arg(&dir)
            .arg("--enroll-secret-file")
            .arg(&secret_file)
            .args(
                boot.ca_pem
                    .as_ref()
                    .map(|_| [std::ffi::OsStr::new("--ca-file"), ca_file.as_os_str()])
                    .into_iter()
                    .flatten(),
            )
            .args(&self.config.agent_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        new_session(&mut cmd);
        let spawned = Reaper::global().spawn(&mut cmd).map_err(|e| {
            ProviderError::Other(format!(
                "cannot start {} for {}: {e}",
                self.config.agent_bin.display(),
                node.name
            ))
        })?;
        // The agent writes this file itself once it runs; written here too,
        // at once, so that another server taking over this one's work
        // (it died) in the moment before sees the machine running and does
        // not start a second agent. The agent finds its own pid in it.
        super::lxc::write_atomic(
            &dir.join("run").join("agent.pid"),
            format!("{}\n", spawned.pid).as_bytes(),
            0o644,
        )?;
        Ok(spawned.pid)
    }
}

#[async_trait]
impl Machines for LocalProvider {
    fn kind(&self) -> Provider {
        Provider::Local
    }

    async fn preflight(&self) -> Result<(), ProviderError> {
        let bin = &self.config.agent_bin;
        let found = if bin.components().count() > 1 {
            bin.is_file()
        } else {
            super::command::on_path(&bin.to_string_lossy())
        };
        if found {
            Ok(())
        } else {
            Err(ProviderError::Unavailable {
                provider: Provider::Local,
                reason: format!(
                    "no corral-agent at {}: build it (cargo build -p corral-agent) or pass --agent-bin",
                    bin.display()
                ),
            })
        }
    }

    async fn inventory(&self) -> Result<Vec<Machine>, ProviderError> {
        let mut names: Vec<String> = match std::fs::read_dir(self.config.nodes_dir()) {
            Ok(dirs) => dirs
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(ProviderError::Other(format!(
                    "cannot read {}: {e}",
                    self.config.nodes_dir().display()
                )));
            }
        };
        names.sort();
        Ok(names
            .into_iter()
            .map(|name| {
                let state = if self.running(&name) {
                    MachineState::Running
                } else {
                    MachineState::Stopped
                };
                Machine { name, state }
            })
            .collect())
    }

    async fn ensure(&self, node: &Node, boot: &BootConfig) -> Result<String, ProviderError> {
        if self.running(&node.name) {
            return Ok("agent already running".into());
        }
        let pid = self.start_agent(node, boot)?;
        self.started().insert(node.name.clone(), pid);
        Ok(format!("agent started (pid {pid})"))
    }

    async fn stop(&self, name: &str) -> Result<(), ProviderError> {
        self.started().remove(name);
        stop_node(&self.config, name).await
    }

    async fn destroy(&self, name: &str) -> Result<(), ProviderError> {
        self.stop(name).await?;
        match std::fs::remove_dir_all(self.config.node_dir(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProviderError::Other(format!(
                "cannot delete {}: {e}",
                self.config.node_dir(name).display()
            ))),
        }
    }
}

/// `corral-agent stop-all` for one node directory.
pub async fn stop_node(config: &LocalConfig, name: &str) -> Result<(), ProviderError> {
    let dir = config.node_dir(name);
    if !dir.exists() {
        return Ok(());
    }
    let mut cmd = Command::new(&config.agent_bin);
    cmd.arg("stop-all").arg("--state-dir").arg(&dir);
    new_session(&mut cmd);
    let out = Reaper::global().output(&mut cmd).await.map_err(|e| {
        ProviderError::Other(format!("cannot run {}: {e}", config.agent_bin.display()))
    })?;
    if out.exit.success() {
        Ok(())
    } else {
        Err(ProviderError::Command {
            command: format!("corral-agent stop-all --state-dir {}", dir.display()),
            status: out.exit.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Starts the command in a session of its own, so a Ctrl-C at the terminal
/// reaches corral, which then stops the cluster in order, and not every
/// process at once.
fn new_session(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
}

/// Whether `dir` looks like a node directory with a live agent.
pub fn agent_alive(dir: &Path) -> bool {
    reaper::read_pid_file(&dir.join("run").join("agent.pid"))
        .is_some_and(|pid| reaper::alive_with(pid, "corral-agent"))
}
