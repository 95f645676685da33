//! The machine controller: one loop, started by the server, that keeps every
//! node of a configured provider on a running machine. It holds, once for
//! all providers, what used to live inside the local provider: it notices a
//! machine that died and makes it again with backoff, adopts machines that
//! already run (after the control plane itself restarted), and destroys the
//! machines of nodes that are gone. It wakes on node changes and at least
//! once a second.
//!
//! The decisions are [`Book::decide`], a plain function of the nodes, the
//! providers' inventories and the controller's memory, unit-tested without
//! machines; the loop around it runs the provider calls as tasks, one at a
//! time per node, so a slow container start never holds up another node.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use corral_proto::{Node, Provider, Role};
use tokio::sync::{Mutex, broadcast, mpsc, watch};

use super::{BootConfig, Machine, MachineState, Machines, ProviderError};

/// An agent that ran at least this long before dying is made again at once.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The loop runs at least this often, whatever wakes it.
const TICK: Duration = Duration::from_secs(1);
/// The least time between two ticks woken by node changes.
const CHANGE_GAP: Duration = Duration::from_millis(100);

/// What the controller tells whoever shows progress (`corral up`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderEvent {
    /// A machine is being made or started.
    Ensuring {
        node: String,
        provider: Provider,
    },
    /// The machine runs (`detail` says how it was found or made).
    Ensured {
        node: String,
        detail: String,
    },
    /// A machine that was running already, taken over.
    Adopted {
        node: String,
    },
    /// A machine that was running is not any more.
    Exited {
        node: String,
        how: String,
    },
    /// Stopped, data kept.
    Stopped {
        node: String,
    },
    /// Deleted with its data.
    Destroyed {
        node: String,
    },
    Failed {
        node: String,
        message: String,
    },
}

/// Where the controller reads the nodes from and reports to: the
/// control plane ([`crate::cluster::Cluster`]), or a fake in tests.
#[async_trait]
pub trait NodeSource: Send + Sync + 'static {
    async fn nodes(&self) -> Result<Vec<Node>, String>;
    /// Changes when nodes are created, removed or change state.
    fn node_changes(&self) -> watch::Receiver<u64>;
    /// Writes an audit event about a node (a failed `lxc-*` call, say).
    async fn note(&self, kind: &str, node: &str, message: &str);
    /// Mints the node's enrollment secret for the machine about to be made
    /// (or started again); a secret minted before is void.
    async fn enroll_secret(&self, node: &str) -> Result<String, String>;
}

/// What the controller decided to do about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Ensure { node: String, provider: Provider },
    Destroy { node: String, provider: Provider },
}

/// What the controller remembers of a node between ticks.
#[derive(Debug, Clone, Default)]
struct Track {
    /// A provider call for it is in flight.
    busy: bool,
    /// Since when it has been seen running (or was made to run).
    running_since: Option<Instant>,
    /// Consecutive failures or quick deaths, for the backoff.
    failures: u32,
    retry_at: Option<Instant>,
    /// The last failure reported, so the same one is not reported again.
    last_failure: Option<String>,
}

/// The controller's memory and its decisions; no I/O.
#[derive(Debug, Default)]
pub struct Book {
    tracks: HashMap<String, Track>,
}

impl Book {
    /// What to do now, given the nodes and each provider's machines.
    /// Also notes deaths and adoptions it sees, as events.
    pub fn decide(
        &mut self,
        now: Instant,
        nodes: &[Node],
        inventories: &BTreeMap<Provider, Vec<Machine>>,
    ) -> (Vec<Action>, Vec<ProviderEvent>) {
        let mut actions = Vec::new();
        let mut events = Vec::new();
        for (provider, machines) in inventories {
            let wanted: BTreeMap<&str, &Node> = nodes
                .iter()
                .filter(|n| n.provider == *provider)
                .map(|n| (n.name.as_str(), n))
                .collect();
            let found: BTreeMap<&str, &Machine> =
                machines.iter().map(|m| (m.name.as_str(), m)).collect();
            for name in wanted.keys() {
                let track = self.tracks.entry((*name).to_string()).or_default();
                if track.busy {
                    continue;
                }
                match found.get(name).map(|m| m.state) {
                    Some(MachineState::Running) => {
                        if track.running_since.is_none() {
                            track.running_since = Some(now);
                            events.push(ProviderEvent::Adopted {
                                node: (*name).to_string(),
                            });
                        }
                        track.retry_at = None;
                    }
                    // A hung machine is left alone, as a hung VM would be.
                    Some(MachineState::Frozen) => {}
                    state => {
                        if let Some(since) = track.running_since.take() {
                            track.failures = if now.duration_since(since) >= HEALTHY_RUN {
                                0
                            } else {
                                track.failures + 1
                            };
                            let wait = backoff(track.failures);
                            track.retry_at = Some(now + wait);
                            events.push(ProviderEvent::Exited {
                                node: (*name).to_string(),
                                how: format!(
                                    "{}; again in {:.1} s",
                                    if state.is_some() { "stopped" } else { "gone" },
                                    wait.as_secs_f64()
                                ),
                            });
                        }
                        if track.retry_at.is_some_and(|at| at > now) {
                            continue;
                        }
                        track.busy = true;
                        actions.push(Action::Ensure {
                            node: (*name).to_string(),
                            provider: *provider,
                        });
                    }
                }
            }
            for machine in machines {
                if wanted.contains_key(machine.name.as_str()) {
                    continue;
                }
                let track = self.tracks.entry(machine.name.clone()).or_default();
                if track.busy || track.retry_at.is_some_and(|at| at > now) {
                    continue;
                }
                track.busy = true;
                actions.push(Action::Destroy {
                    node: machine.name.clone(),
                    provider: *provider,
                });
            }
        }
        // Forget nodes that are neither wanted nor found, once idle.
        self.tracks.retain(|name, track| {
            track.busy
                || nodes.iter().any(|n| &n.name == name)
                || inventories
                    .values()
                    .any(|ms| ms.iter().any(|m| &m.name == name))
        });
        (actions, events)
    }

    /// Records how a provider call ended; the failure message to report,
    /// unless it is the same as the last one.
    pub fn finished(
        &mut self,
        now: Instant,
        action: &Action,
        result: &Result<(), String>,
    ) -> Option<String> {
        let name = match action {
            Action::Ensure { node, .. } | Action::Destroy { node, .. } => node,
        };
        let track = self.tracks.entry(name.clone()).or_default();
        track.busy = false;
        match result {
            Ok(()) => {
                if matches!(action, Action::Ensure { .. }) {
                    track.running_since = Some(now);
                }
                track.retry_at = None;
                track.last_failure = None;
                None
            }
            Err(message) => {
                track.failures += 1;
                track.retry_at = Some(now + backoff(track.failures));
                let new = track.last_failure.as_deref() != Some(message.as_str());
                track.last_failure = Some(message.clone());
                new.then(|| message.clone())
            }
        }
    }
}

pub fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::from_millis(200);
    }
    let secs = 1u64 << failures.min(5).saturating_sub(1);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

pub struct MachineController {
    providers: BTreeMap<Provider, Arc<dyn Machines>>,
    /// URL agents reach the control plane at.
    server_url: String,
    /// The cluster CA agents pin (TLS only).
    ca_pem: Option<String>,
    book: Mutex<Book>,
    events: broadcast::Sender<ProviderEvent>,
}

impl MachineController {
    pub fn new(
        providers: Vec<Arc<dyn Machines>>,
        server_url: String,
        ca_pem: Option<String>,
    ) -> Arc<Self> {
        Arc::new(Self {
            providers: providers.into_iter().map(|p| (p.kind(), p)).collect(),
            server_url,
            ca_pem,
            book: Mutex::new(Book::default()),
            events: broadcast::channel(1024).0,
        })
    }

    /// The providers this controller drives.
    pub fn kinds(&self) -> Vec<Provider> {
        self.providers.keys().copied().collect()
    }

    pub fn provider(&self, kind: Provider) -> Option<&Arc<dyn Machines>> {
        self.providers.get(&kind)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ProviderEvent> {
        self.events.subscribe()
    }

    fn say(&self, event: ProviderEvent) {
        let _ = self.events.send(event);
    }

    /// Checks every provider can run here; the first that cannot, with why.
    pub async fn preflight(&self) -> Result<(), ProviderError> {
        for provider in self.providers.values() {
            provider.preflight().await?;
        }
        Ok(())
    }

    /// Keeps every node on a running machine until `shutdown` turns true.
    pub async fn run(
        self: Arc<Self>,
        source: Arc<dyn NodeSource>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut changes = source.node_changes();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Action, Result<String, String>)>();
        loop {
            let ticked = Instant::now();
            self.tick(&source, &done_tx).await;
            tokio::select! {
                _ = shutdown.changed() => {}
                _ = changes.changed() => {
                    // A burst of changes (10,000 agents enrolling) reads
                    // the nodes at most this often, not once per change.
                    let since = ticked.elapsed();
                    if since < CHANGE_GAP {
                        tokio::time::sleep(CHANGE_GAP - since).await;
                    }
                }
                Some((action, result)) = done_rx.recv() => {
                    self.finished(&source, action, result).await;
                    // Take every other result that is ready before the next tick.
                    while let Ok((action, result)) = done_rx.try_recv() {
                        self.finished(&source, action, result).await;
                    }
                }
                _ = tokio::time::sleep(TICK) => {}
            }
            if *shutdown.borrow() {
                break;
            }
        }
        // Let calls in flight finish, so nothing is left half made.
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.busy().await && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(1), done_rx.recv()).await {
                Ok(Some((action, result))) => self.finished(&source, action, result).await,
                Ok(None) => break,
                Err(_) => {}
            }
        }
    }

    async fn busy(&self) -> bool {
        self.book.lock().await.tracks.values().any(|t| t.busy)
    }

    async fn tick(
        self: &Arc<Self>,
        source: &Arc<dyn NodeSource>,
        done: &mpsc::UnboundedSender<(Action, Result<String, String>)>,
    ) {
        let nodes = match source.nodes().await {
            Ok(nodes) => nodes,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list nodes");
                return;
            }
        };
        let mut inventories = BTreeMap::new();
        for (kind, provider) in &self.providers {
            match provider.inventory().await {
                Ok(machines) => {
                    inventories.insert(*kind, machines);
                }
                Err(e) => tracing::warn!(provider = %kind, error = %e, "cannot list machines"),
            }
        }
        let (actions, events) = self
            .book
            .lock()
            .await
            .decide(Instant::now(), &nodes, &inventories);
        for event in events {
            self.say(event);
        }
        for action in actions {
            let this = self.clone();
            let done = done.clone();
            let source = source.clone();
            let node = match &action {
                Action::Ensure { node, .. } => nodes.iter().find(|n| &n.name == node).cloned(),
                Action::Destroy { .. } => None,
            };
            tokio::spawn(async move {
                let result = this.act(&source, &action, node.as_ref()).await;
                let _ = done.send((action, result.map_err(|e| e.to_string())));
            });
        }
    }

    async fn act(
        &self,
        source: &Arc<dyn NodeSource>,
        action: &Action,
        node: Option<&Node>,
    ) -> Result<String, ProviderError> {
        match action {
            Action::Ensure {
                node: name,
                provider,
            } => {
                let provider = self.providers.get(provider).ok_or_else(|| {
                    ProviderError::Other(format!("provider {provider} is not configured"))
                })?;
                let node = node.ok_or_else(|| ProviderError::Other(format!("{name} is gone")))?;
                self.say(ProviderEvent::Ensuring {
                    node: name.clone(),
                    provider: provider.kind(),
                });
                let secret = source.enroll_secret(name).await.map_err(|e| {
                    ProviderError::Other(format!("cannot mint {name}'s enrollment secret: {e}"))
                })?;
                let boot = BootConfig {
                    server_url: self.server_url.clone(),
                    secret,
                    ca_pem: self.ca_pem.clone(),
                };
                provider.ensure(node, &boot).await
            }
            Action::Destroy { node, provider } => {
                let provider = self.providers.get(provider).ok_or_else(|| {
                    ProviderError::Other(format!("provider {provider} is not configured"))
                })?;
                provider.destroy(node).await.map(|()| String::new())
            }
        }
    }

    async fn finished(
        &self,
        source: &Arc<dyn NodeSource>,
        action: Action,
        result: Result<String, String>,
    ) {
        let outcome = result.as_ref().map(|_| ()).map_err(Clone::clone);
        let report = self
            .book
            .lock()
            .await
            .finished(Instant::now(), &action, &outcome);
        match (&action, &result) {
            (Action::Ensure { node, provider }, Ok(detail)) => self.say(ProviderEvent::Ensured {
                node: node.clone(),
                detail: format!("{provider}: {detail}"),
            }),
            (Action::Destroy { node, .. }, Ok(_)) => {
                self.say(ProviderEvent::Destroyed { node: node.clone() })
            }
            (Action::Ensure { node, .. } | Action::Destroy { node, .. }, Err(message)) => {
                tracing::debug!(node = %node, error = %message, "provider call failed");
                self.say(ProviderEvent::Failed {
                    node: node.clone(),
                    message: message.clone(),
                });
                if let Some(message) = report {
                    let kind = match action {
                        Action::Ensure { .. } => "node.provision_failed",
                        Action::Destroy { .. } => "node.destroy_failed",
                    };
                    source.note(kind, node, &message).await;
                }
            }
        }
    }

    /// Stops every machine of every provider, keeping their data: web nodes
    /// first (they hold the clients), then databases, then the admin node;
    /// each tier in parallel.
    pub async fn stop_all(&self) {
        self.for_all(false).await
    }

    /// Deletes every machine of every provider, with its data.
    pub async fn destroy_all(&self) {
        self.for_all(true).await
    }

    async fn for_all(&self, destroy: bool) {
        let mut machines: Vec<(Arc<dyn Machines>, String)> = Vec::new();
        for provider in self.providers.values() {
            match provider.inventory().await {
                Ok(list) => machines.extend(list.into_iter().map(|m| (provider.clone(), m.name))),
                Err(e) => self.say(ProviderEvent::Failed {
                    node: provider.kind().to_string(),
                    message: e.to_string(),
                }),
            }
        }
        let rank = |name: &str| match Role::parse_node_name(name).map(|(r, _)| r) {
            Some(Role::Web) => 0,
            Some(Role::Db) => 1,
            _ => 2,
        };
        for tier in 0..3 {
            let calls = machines.iter().filter(|(_, name)| rank(name) == tier).map(
                |(provider, name)| async move {
                    let result = if destroy {
                        provider.destroy(name).await
                    } else {
                        provider.stop(name).await
                    };
                    (name.clone(), result)
                },
            );
            for (name, result) in futures_util::future::join_all(calls).await {
                match result {
                    Ok(()) if destroy => self.say(ProviderEvent::Destroyed { node: name }),
                    Ok(()) => self.say(ProviderEvent::Stopped { node: name }),
                    Err(e) => self.say(ProviderEvent::Failed {
                        node: name,
                        message: e.to_string(),
                    }),
                }
            }
        }
    }
}

#[async_trait]
impl NodeSource for crate::cluster::Cluster {
    async fn nodes(&self) -> Result<Vec<Node>, String> {
        crate::cluster::Cluster::nodes(self)
            .await
            .map_err(|e| e.to_string())
    }

    fn node_changes(&self) -> watch::Receiver<u64> {
        self.subscribe_node_changes()
    }

    async fn enroll_secret(&self, node: &str) -> Result<String, String> {
        self.mint_enroll_secret(node, &crate::auth::Caller::Admin)
            .await
            .map(|s| s.secret)
            .map_err(|e| e.to_string())
    }

    async fn note(&self, kind: &str, node: &str, message: &str) {
        if let Err(e) = self.record_event("provider", kind, node, message).await {
            tracing::warn!(kind, node, message, error = %e, "cannot record a provider event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::{NodeHealth, NodeState};

    fn node(name: &str, provider: Provider) -> Node {
        let (role, _) = Role::parse_node_name(name).expect("scheme name");
        Node {
            name: name.into(),
            role,
            address: "127.0.11.21".into(),
            provider,
            state: NodeState::Active,
            health: NodeHealth::Healthy,
            last_seq: 0,
            last_heartbeat: None,
            observed: None,
            created_at: chrono::Utc::now(),
        }
    }

    fn machine(name: &str, state: MachineState) -> Machine {
        Machine {
            name: name.into(),
            state,
        }
    }

    fn inv(list: Vec<Machine>) -> BTreeMap<Provider, Vec<Machine>> {
        BTreeMap::from([(Provider::Lxc, list)])
    }

    fn ensure(name: &str) -> Action {
        Action::Ensure {
            node: name.into(),
            provider: Provider::Lxc,
        }
    }

    #[test]
    fn a_node_without_a_machine_is_ensured_once_at_a_time() {
        let mut book = Book::default();
        let now = Instant::now();
        let nodes = [node("nginx1", Provider::Lxc)];
        let (actions, _) = book.decide(now, &nodes, &inv(vec![]));
        assert_eq!(actions, vec![ensure("nginx1")]);
        // Still being made: not asked twice.
        let (actions, _) = book.decide(now, &nodes, &inv(vec![]));
        assert!(actions.is_empty());
    }

    #[test]
    fn a_running_machine_found_at_start_is_adopted_not_made_again() {
        let mut book = Book::default();
        let nodes = [node("pg1", Provider::Lxc)];
        let (actions, events) = book.decide(
            Instant::now(),
            &nodes,
            &inv(vec![machine("pg1", MachineState::Running)]),
        );
        assert!(actions.is_empty());
        assert_eq!(events, vec![ProviderEvent::Adopted { node: "pg1".into() }]);
    }

    #[test]
    fn a_machine_that_dies_quickly_is_made_again_with_growing_backoff() {
        let mut book = Book::default();
        let t0 = Instant::now();
        let nodes = [node("nginx1", Provider::Lxc)];
        let (actions, _) = book.decide(t0, &nodes, &inv(vec![]));
        assert_eq!(book.finished(t0, &actions[0], &Ok(())), None);
        // Dies after 2 s: reported, and made again only after the backoff.
        let t1 = t0 + Duration::from_secs(2);
        let stopped = inv(vec![machine("nginx1", MachineState::Stopped)]);
        let (actions, events) = book.decide(t1, &nodes, &stopped);
        assert!(actions.is_empty(), "{actions:?}");
        assert!(matches!(&events[0], ProviderEvent::Exited { node, .. } if node == "nginx1"));
        let (actions, _) = book.decide(t1 + backoff(1), &nodes, &stopped);
        assert_eq!(actions, vec![ensure("nginx1")]);
    }

    #[test]
    fn a_machine_that_ran_long_is_made_again_at_once() {
        let mut book = Book::default();
        let t0 = Instant::now();
        let nodes = [node("nginx1", Provider::Lxc)];
        let (actions, _) = book.decide(t0, &nodes, &inv(vec![]));
        book.finished(t0, &actions[0], &Ok(()));
        let later = t0 + HEALTHY_RUN + Duration::from_secs(1);
        let stopped = inv(vec![machine("nginx1", MachineState::Stopped)]);
        book.decide(later, &nodes, &stopped);
        let (actions, _) = book.decide(later + backoff(0), &nodes, &stopped);
        assert_eq!(actions, vec![ensure("nginx1")]);
    }

    #[test]
    fn a_failed_ensure_backs_off_and_reports_each_new_failure_once() {
        let mut book = Book::default();
        let t0 = Instant::now();
        let nodes = [node("nginx3", Provider::Lxc)];
        let (actions, _) = book.decide(t0, &nodes, &inv(vec![]));
        let err = Err("lxc-copy: no such container".to_string());
        assert!(book.finished(t0, &actions[0], &err).is_some());
        assert!(book.decide(t0, &nodes, &inv(vec![])).0.is_empty());
        let t1 = t0 + backoff(1);
        let (actions, _) = book.decide(t1, &nodes, &inv(vec![]));
        assert_eq!(actions, vec![ensure("nginx3")]);
        assert_eq!(
            book.finished(t1, &actions[0], &err),
            None,
            "same failure again"
        );
    }

    #[test]
    fn a_frozen_machine_is_left_alone() {
        let mut book = Book::default();
        let nodes = [node("pg1", Provider::Lxc)];
        let now = Instant::now();
        book.decide(
            now,
            &nodes,
            &inv(vec![machine("pg1", MachineState::Running)]),
        );
        let (actions, events) = book.decide(
            now,
            &nodes,
            &inv(vec![machine("pg1", MachineState::Frozen)]),
        );
        assert!(actions.is_empty());
        assert!(events.is_empty());
    }

    #[test]
    fn machines_without_a_node_are_destroyed_and_other_providers_ignored() {
        let mut book = Book::default();
        let nodes = [node("nginx1", Provider::Local)];
        let (actions, _) = book.decide(
            Instant::now(),
            &nodes,
            &inv(vec![machine("nginx3", MachineState::Running)]),
        );
        assert_eq!(
            actions,
            vec![Action::Destroy {
                node: "nginx3".into(),
                provider: Provider::Lxc
            }]
        );
    }

    #[test]
    fn backoff_grows_to_a_cap() {
        assert_eq!(backoff(0), Duration::from_millis(200));
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(50), Duration::from_secs(16));
    }
}
