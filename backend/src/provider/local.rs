//! The local provider: every node of provider `local` is a state directory
//! (`<state>/nodes/<name>`) and its own loopback address on this machine,
//! with one `corral-agent` process for it. The provider starts an agent for
//! each such node, restarts it with backoff when it dies, adopts agents that
//! are already running (after the control plane itself was restarted), and
//! once a node is gone from the control plane stops its agent and services
//! and deletes its directory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_proto::{Node, Provider, Role};
use tokio::sync::{Mutex, broadcast, watch};

use super::reaper::{self, Reaper};
use crate::cluster::Cluster;

/// How the provider starts agents.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// URL agents reach the control plane at.
    pub server_url: String,
    /// The control plane's state directory: node directories go under
    /// `nodes/`, and agents read the join token from `join-token`.
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

/// What the provider tells whoever shows progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderEvent {
    AgentStarted { node: String, pid: u32 },
    AgentAdopted { node: String, pid: u32 },
    AgentExited { node: String, how: String },
    NodeStopped { node: String },
    Failed { node: String, message: String },
}

#[derive(Debug)]
enum Process {
    /// Started by us: the reaper reports its end.
    Child(tokio::sync::oneshot::Receiver<reaper::Exit>),
    /// Found running from its pid file: watched by polling.
    Adopted,
}

#[derive(Debug)]
struct Agent {
    pid: u32,
    process: Process,
    /// Consecutive quick deaths, for the restart backoff.
    failures: u32,
    started: Instant,
}

#[derive(Debug, Default)]
struct State {
    agents: HashMap<String, Agent>,
    /// Nodes whose agent died, and when to try again.
    retry_at: HashMap<String, (Instant, u32)>,
    /// Nodes being stopped and cleaned up right now.
    stopping: HashMap<String, tokio::task::JoinHandle<()>>,
}

pub struct LocalProvider {
    config: LocalConfig,
    state: Mutex<State>,
    events: broadcast::Sender<ProviderEvent>,
}

/// An agent that lived at least this long before dying is restarted at once.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl LocalProvider {
    pub fn new(config: LocalConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            state: Mutex::new(State::default()),
            events: broadcast::channel(1024).0,
        })
    }

    pub fn config(&self) -> &LocalConfig {
        &self.config
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ProviderEvent> {
        self.events.subscribe()
    }

    fn say(&self, event: ProviderEvent) {
        let _ = self.events.send(event);
    }

    /// Keeps one agent per local node until `shutdown` turns true: on every
    /// change the control plane publishes and at least once a second.
    pub async fn run(self: Arc<Self>, cluster: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) {
        let mut changes = cluster.subscribe_events();
        loop {
            match cluster.nodes().await {
                Ok(nodes) => self.converge(&nodes).await,
                Err(e) => tracing::warn!(error = %e, "cannot list nodes"),
            }
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = changes.recv() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if *shutdown.borrow() {
                break;
            }
        }
    }

    /// One pass: start or adopt missing agents, notice dead ones, stop the
    /// agents of nodes that are gone.
    pub async fn converge(&self, nodes: &[Node]) {
        let wanted: BTreeMap<&str, &Node> = nodes
            .iter()
            .filter(|n| n.provider == Provider::Local)
            .map(|n| (n.name.as_str(), n))
            .collect();
        let mut state = self.state.lock().await;
        state.stopping.retain(|_, task| !task.is_finished());

        // Agents that died.
        let names: Vec<String> = state.agents.keys().cloned().collect();
        for name in names {
            let Some(agent) = state.agents.get_mut(&name) else {
                continue;
            };
            let ended = match &mut agent.process {
                Process::Child(rx) => match rx.try_recv() {
                    Ok(exit) => Some(exit.to_string()),
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => None,
                    Err(_) => Some("ended".into()),
                },
                Process::Adopted => {
                    (!reaper::alive_with(agent.pid, "corral-agent")).then(|| "ended".into())
                }
            };
            if let Some(how) = ended {
                let failures = if agent.started.elapsed() >= HEALTHY_RUN {
                    0
                } else {
                    agent.failures + 1
                };
                state.agents.remove(&name);
                let backoff = backoff(failures);
                state
                    .retry_at
                    .insert(name.clone(), (Instant::now() + backoff, failures));
                self.say(ProviderEvent::AgentExited {
                    node: name.clone(),
                    how: format!("{how}; restarting in {:.1} s", backoff.as_secs_f64()),
                });
            }
        }

        // Nodes that are gone: stop their agent and services, then forget them.
        let mut gone: Vec<String> = state
            .agents
            .keys()
            .filter(|n| !wanted.contains_key(n.as_str()))
            .cloned()
            .collect();
        if let Ok(dirs) = std::fs::read_dir(self.config.nodes_dir()) {
            for entry in dirs.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !wanted.contains_key(name.as_str()) && !gone.contains(&name) {
                    gone.push(name);
                }
            }
        }
        for name in gone {
            if state.stopping.contains_key(&name) {
                continue;
            }
            state.agents.remove(&name);
            state.retry_at.remove(&name);
            let config = self.config.clone();
            let events = self.events.clone();
            let key = name.clone();
            let task = tokio::spawn(async move {
                match stop_node(&config, &name).await {
                    Ok(()) => {
                        let _ = std::fs::remove_dir_all(config.node_dir(&name));
                        let _ = events.send(ProviderEvent::NodeStopped { node: name });
                    }
                    Err(message) => {
                        let _ = events.send(ProviderEvent::Failed {
                            node: name,
                            message,
                        });
                    }
                }
            });
            state.stopping.insert(key, task);
        }

        // Nodes without an agent.
        for (name, node) in wanted {
            if state.agents.contains_key(name) {
                continue;
            }
            let failures = match state.retry_at.get(name) {
                Some((at, _)) if *at > Instant::now() => continue,
                Some((_, failures)) => *failures,
                None => 0,
            };
            match self.start_agent(node) {
                Ok(agent) => {
                    let pid = agent.pid;
                    let adopted = matches!(agent.process, Process::Adopted);
                    state
                        .agents
                        .insert(name.to_string(), Agent { failures, ..agent });
                    state.retry_at.remove(name);
                    self.say(if adopted {
                        ProviderEvent::AgentAdopted {
                            node: name.to_string(),
                            pid,
                        }
                    } else {
                        ProviderEvent::AgentStarted {
                            node: name.to_string(),
                            pid,
                        }
                    });
                }
                Err(message) => {
                    let failures = failures + 1;
                    state.retry_at.insert(
                        name.to_string(),
                        (Instant::now() + backoff(failures), failures),
                    );
                    self.say(ProviderEvent::Failed {
                        node: name.to_string(),
                        message,
                    });
                }
            }
        }
    }

    fn start_agent(&self, node: &Node) -> Result<Agent, String> {
        let dir = self.config.node_dir(&node.name);
        std::fs::create_dir_all(dir.join("run"))
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        if let Some(pid) = reaper::read_pid_file(&dir.join("run").join("agent.pid"))
            && reaper::alive_with(pid, "corral-agent")
        {
            return Ok(Agent {
                pid,
                process: Process::Adopted,
                failures: 0,
                started: Instant::now(),
            });
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .map_err(|e| format!("cannot open the agent log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot open the agent log: {e}"))?;
        let mut cmd = Command::new(&self.config.agent_bin);
        cmd.arg("run")
            .arg("--server")
            .arg(&self.config.server_url)
            .arg("--node")
            .arg(&node.name)
            .arg("--address")
            .arg(&node.address)
            .arg("--state-dir")
            .arg(&dir)
            .arg("--join-token-file")
            .arg(self.config.state_dir.join("join-token"))
            .args(&self.config.agent_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        new_session(&mut cmd);
        let spawned = Reaper::global().spawn(&mut cmd).map_err(|e| {
            format!(
                "cannot start {} for {}: {e}",
                self.config.agent_bin.display(),
                node.name
            )
        })?;
        Ok(Agent {
            pid: spawned.pid,
            process: Process::Child(spawned.exit),
            failures: 0,
            started: Instant::now(),
        })
    }

    /// Stops every local node's agent and services: web nodes first (they
    /// hold the clients), then databases, then the admin node.
    pub async fn stop_all(&self) {
        let mut state = self.state.lock().await;
        for (_, task) in state.stopping.drain() {
            let _ = task.await;
        }
        state.agents.clear();
        state.retry_at.clear();
        drop(state);
        let mut nodes: Vec<String> = std::fs::read_dir(self.config.nodes_dir())
            .map(|dirs| {
                dirs.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let rank = |name: &str| match Role::parse_node_name(name).map(|(r, _)| r) {
            Some(Role::Web) => 0,
            Some(Role::Db) => 1,
            _ => 2,
        };
        nodes.sort_by_key(|n| (rank(n), n.clone()));
        for tier in 0..3 {
            let stops = nodes.iter().filter(|n| rank(n) == tier).map(|name| {
                let config = self.config.clone();
                let name = name.clone();
                async move {
                    let result = stop_node(&config, &name).await;
                    (name, result)
                }
            });
            for (name, result) in futures_util::future::join_all(stops).await {
                match result {
                    Ok(()) => self.say(ProviderEvent::NodeStopped { node: name }),
                    Err(message) => self.say(ProviderEvent::Failed {
                        node: name,
                        message,
                    }),
                }
            }
        }
    }
}

fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::from_millis(200);
    }
    let secs = 1u64 << failures.min(5).saturating_sub(1);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

/// `corral-agent stop-all` for one node directory.
pub async fn stop_node(config: &LocalConfig, name: &str) -> Result<(), String> {
    let dir = config.node_dir(name);
    if !dir.exists() {
        return Ok(());
    }
    let mut cmd = Command::new(&config.agent_bin);
    cmd.arg("stop-all").arg("--state-dir").arg(&dir);
    new_session(&mut cmd);
    let out = Reaper::global()
        .output(&mut cmd)
        .await
        .map_err(|e| format!("cannot run {}: {e}", config.agent_bin.display()))?;
    if out.exit.success() {
        Ok(())
    } else {
        Err(format!(
            "stopping {name} failed ({}): {}",
            out.exit,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap() {
        assert_eq!(backoff(0), Duration::from_millis(200));
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(50), Duration::from_secs(16));
    }
}
