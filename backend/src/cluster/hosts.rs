//! Host agents: the processes that make machines where this server cannot
//! (VirtualBox VMs when the server itself runs inside one, as adm1 does).
//! They follow the node agents' pull model: a host agent long-polls for
//! machine orders, reporting the machines it holds and the orders it is still
//! working on, and answers each order with its result.
//!
//! [`Hosts`] is the rendezvous, in memory: the machine controller's provider
//! for such a kind ([`crate::provider::RemoteProvider`]) files an order and
//! waits for its answer; the API hands orders to the polling host agent. An
//! order handed out that the next poll does not list as in progress (the host
//! agent was restarted) is handed out again, so an ensure killed half-way is
//! finished by the next host agent. Nothing here outlives the server process:
//! after a restart the machine controller files what is still needed again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use corral_proto::{
    HostMachine, HostOrders, HostPoll, MachineOrder, MachineResult, MachineSpec, Provider,
};
use tokio::sync::{oneshot, watch};

use super::{Cluster, ClusterError};
use crate::auth::Caller;

/// A host agent counts as connected while it polls, and this long after
/// its last poll ended (it polls again at once).
pub const CONNECTED_GRACE: Duration = Duration::from_secs(10);

/// A host agent seen polling the leader this recently counts as connected
/// on the other servers: a poll waits at most the server's longest poll
/// wait (60 s by default), and the next follows at once.
pub const SEEN_WITHIN: Duration = Duration::from_secs(75);

/// What became of a machine order: what was done, or why it failed.
pub type MachineOutcome = Result<String, MachineFailure>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineFailure {
    pub message: String,
    /// Trying again will not help (see [`MachineResult::permanent`]).
    pub permanent: bool,
}

/// The machine orders of every provider whose machines host agents make.
pub struct Hosts {
    providers: BTreeSet<Provider>,
    state: Mutex<HashMap<Provider, Host>>,
    /// Bumped when an order is filed for a provider: wakes its polls.
    filed: HashMap<Provider, watch::Sender<u64>>,
}

impl std::fmt::Debug for Hosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hosts")
            .field("providers", &self.providers)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Host {
    /// Polls parked now.
    polls: usize,
    /// When the last poll ended (or began).
    last_seen: Option<Instant>,
    /// The machines the host agent last reported, and the number of that
    /// report.
    machines: Option<Vec<HostMachine>>,
    machines_seq: u64,
    machines_session: u64,
    next_id: u64,
    orders: BTreeMap<u64, Pending>,
    /// Numbers polls as they come: only the newest hands out orders. A host
    /// agent has one poll in flight; an older one still parked belongs to a
    /// host agent that was killed, whose connection nobody reads.
    poll_generation: u64,
}

struct Pending {
    spec: MachineSpec,
    handed_out: bool,
    reply: oneshot::Sender<MachineOutcome>,
}

impl Host {
    /// Takes a report of the machines unless a newer one of the same run of
    /// the host agent was applied (a new run starts its numbering over).
    fn report(&mut self, machines: Vec<HostMachine>, seq: u64, session: u64) {
        if self.machines.is_none() || session != self.machines_session || seq >= self.machines_seq {
            self.machines = Some(machines);
            self.machines_seq = seq;
            self.machines_session = session;
        }
    }

    fn connected(&self, now: Instant) -> bool {
        self.polls > 0
            || self
                .last_seen
                .is_some_and(|at| now.duration_since(at) < CONNECTED_GRACE)
    }

    /// Orders not handed out yet, marked handed out.
    fn take_new(&mut self) -> Vec<MachineOrder> {
        self.orders
            .iter_mut()
            .filter(|(_, p)| !p.handed_out)
            .map(|(id, p)| {
                p.handed_out = true;
                MachineOrder {
                    id: *id,
                    spec: p.spec.clone(),
                }
            })
            .collect()
    }
}

/// Counts a parked poll for as long as it lives (a dropped request too).
struct Parked<'a> {
    hosts: &'a Hosts,
    provider: Provider,
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        let mut state = self.hosts.lock();
        let host = state.entry(self.provider).or_default();
        host.polls = host.polls.saturating_sub(1);
        host.last_seen = Some(Instant::now());
    }
}

impl Hosts {
    /// Machine orders for `providers`, whose machines host agents make.
    pub fn new(providers: impl IntoIterator<Item = Provider>) -> Self {
        let providers: BTreeSet<Provider> = providers.into_iter().collect();
        Self {
            filed: providers
                .iter()
                .map(|p| (*p, watch::Sender::new(0)))
                .collect(),
            providers,
            state: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Provider, Host>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether host agents make this provider's machines.
    pub fn serves(&self, provider: Provider) -> bool {
        self.providers.contains(&provider)
    }

    pub fn providers(&self) -> Vec<Provider> {
        self.providers.iter().copied().collect()
    }

    /// Polls parked now.
    #[cfg(test)]
    fn parked(&self, provider: Provider) -> usize {
        self.lock().get(&provider).map_or(0, |h| h.polls)
    }

    /// Whether a host agent of this provider polls now (or did moments ago).
    pub fn connected(&self, provider: Provider) -> bool {
        self.lock()
            .get(&provider)
            .is_some_and(|h| h.connected(Instant::now()))
    }

    /// The machines a connected host agent reported last; `None` while none
    /// is connected (nothing is known, so nothing may be acted on).
    pub fn machines(&self, provider: Provider) -> Option<Vec<HostMachine>> {
        let state = self.lock();
        let host = state.get(&provider)?;
        if !host.connected(Instant::now()) {
            return None;
        }
        host.machines.clone()
    }

    /// Files an order for the provider's host agent; its outcome arrives on
    /// the receiver. Refused when no host agent is connected. An unanswered
    /// order for the same node is dropped (its waiter hears so).
    pub fn file(
        &self,
        provider: Provider,
        spec: MachineSpec,
    ) -> Result<(u64, oneshot::Receiver<MachineOutcome>), String> {
        if !self.serves(provider) {
            return Err(format!("no host agents make {provider} machines here"));
        }
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut state = self.lock();
            let host = state.entry(provider).or_default();
            if !host.connected(Instant::now()) {
                return Err(missing_host_agent(provider));
            }
            host.orders.retain(|_, p| p.spec.node() != spec.node());
            host.next_id += 1;
            let id = host.next_id;
            host.orders.insert(
                id,
                Pending {
                    spec,
                    handed_out: false,
                    reply: tx,
                },
            );
            id
        };
        if let Some(filed) = self.filed.get(&provider) {
            filed.send_modify(|n| *n += 1);
        }
        Ok((id, rx))
    }

    /// Takes back an order nobody waits for any more (its host agent went
    /// away), so a later host agent is not handed work that is no longer
    /// wanted; the machine controller files again what still is.
    pub fn withdraw(&self, provider: Provider, id: u64) {
        if let Some(host) = self.lock().get_mut(&provider) {
            host.orders.remove(&id);
        }
    }

    /// A host agent's poll: records what it holds, hands out new orders (and
    /// again those it no longer works on), or waits up to `wait` for one.
    pub async fn poll(&self, provider: Provider, report: HostPoll, wait: Duration) -> HostOrders {
        let Some(filed) = self.filed.get(&provider) else {
            return HostOrders::default();
        };
        let mut rx = filed.subscribe();
        let generation = {
            let mut state = self.lock();
            let host = state.entry(provider).or_default();
            host.report(report.machines, report.inventory_seq, report.session);
            host.last_seen = Some(Instant::now());
            for (id, pending) in host.orders.iter_mut() {
                if pending.handed_out && !report.working.contains(id) {
                    pending.handed_out = false;
                }
            }
            host.poll_generation += 1;
            let orders = host.take_new();
            if !orders.is_empty() || wait.is_zero() {
                return HostOrders { orders };
            }
            host.polls += 1;
            host.poll_generation
        };
        let _parked = Parked {
            hosts: self,
            provider,
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return HostOrders::default();
                    }
                    let mut state = self.lock();
                    let host = state.entry(provider).or_default();
                    if host.poll_generation != generation {
                        // A newer poll came: this one's caller is gone.
                        return HostOrders::default();
                    }
                    let orders = host.take_new();
                    if !orders.is_empty() {
                        return HostOrders { orders };
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return HostOrders::default(),
            }
        }
    }

    /// A host agent's answer to an order, with the machines it holds now.
    pub fn finish(&self, provider: Provider, id: u64, result: MachineResult) -> Result<(), String> {
        let mut state = self.lock();
        let host = state.entry(provider).or_default();
        host.report(result.machines, result.inventory_seq, result.session);
        host.last_seen = Some(Instant::now());
        let pending = host
            .orders
            .remove(&id)
            .ok_or_else(|| format!("no machine order {id} is waiting for an answer"))?;
        let outcome = if result.ok {
            Ok(result.message)
        } else {
            Err(MachineFailure {
                message: result.message,
                permanent: result.permanent,
            })
        };
        let _ = pending.reply.send(outcome);
        Ok(())
    }
}

/// Why a machine of this provider cannot be made now, and what to do.
pub fn missing_host_agent(provider: Provider) -> String {
    format!(
        "no host agent for the {provider} provider is connected: on the machine that runs {provider}, start `corral-agent host --provider {provider} --server <this server's URL> --token-file <a file with the admin token>`"
    )
}

impl Cluster {
    /// `POST /hosts/{provider}/poll`, for the admin token.
    pub async fn host_poll(
        &self,
        provider: Provider,
        report: HostPoll,
        wait: Duration,
        caller: &Caller,
    ) -> Result<HostOrders, ClusterError> {
        caller.require_admin()?;
        self.require_host_provider(provider)?;
        report.validate().map_err(ClusterError::Invalid)?;
        // Only the leader runs the machine controller that files orders; a
        // host agent given several servers moves on to the next.
        if !self.is_leader() {
            return Err(ClusterError::Unavailable(format!(
                "this server does not lead: {provider} machine orders come from the leading server; ask another"
            )));
        }
        // The other servers learn here that a host agent is connected.
        if let Err(e) =
            crate::store::host_agent_seen(self.store.conn(), &provider.to_string(), Utc::now())
                .await
        {
            tracing::warn!(error = %e, "noting the host agent's poll failed");
        }
        Ok(self
            .config
            .hosts
            .poll(provider, report, wait.min(self.config.max_poll_wait))
            .await)
    }

    /// `POST /hosts/{provider}/orders/{id}/result`, for the admin token.
    pub fn host_result(
        &self,
        provider: Provider,
        id: u64,
        result: MachineResult,
        caller: &Caller,
    ) -> Result<(), ClusterError> {
        caller.require_admin()?;
        self.require_host_provider(provider)?;
        result.validate().map_err(ClusterError::Invalid)?;
        self.config
            .hosts
            .finish(provider, id, result)
            .map_err(ClusterError::NotFound)
    }

    fn require_host_provider(&self, provider: Provider) -> Result<(), ClusterError> {
        if self.config.hosts.serves(provider) {
            Ok(())
        } else {
            Err(ClusterError::ProviderNotConfigured {
                provider,
                configured: self.config.hosts.providers(),
            })
        }
    }

    /// A node of a provider whose machines a host agent makes can be added
    /// only while one is connected: otherwise it would wait for a machine
    /// that nobody makes.
    ///
    /// Connected here, or — with several servers, where host agents poll the
    /// leader — seen polling the leader within [`SEEN_WITHIN`].
    pub(super) async fn require_host_agent(&self, provider: Provider) -> Result<(), ClusterError> {
        if !self.config.hosts.serves(provider) || self.config.hosts.connected(provider) {
            return Ok(());
        }
        let seen = crate::store::host_agent_seen_at(self.store.conn(), &provider.to_string())
            .await?
            .is_some_and(|at| {
                (Utc::now() - at)
                    .to_std()
                    .is_ok_and(|ago| ago < SEEN_WITHIN)
            });
        if seen && !self.is_leader() {
            return Ok(());
        }
        Err(ClusterError::Conflict {
            code: "host_agent_missing",
            message: missing_host_agent(provider),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::MachineStatus;

    fn destroy(node: &str) -> MachineSpec {
        MachineSpec::Destroy { node: node.into() }
    }

    fn report(working: Vec<u64>) -> HostPoll {
        HostPoll {
            machines: vec![HostMachine {
                node: "nginx3".into(),
                status: MachineStatus::Running,
            }],
            working,
            inventory_seq: 0,
            session: 0,
        }
    }

    #[tokio::test]
    async fn no_order_is_filed_while_no_host_agent_polls() {
        let hosts = Hosts::new([Provider::Virtualbox]);
        assert!(!hosts.connected(Provider::Virtualbox));
        assert_eq!(hosts.machines(Provider::Virtualbox), None);
        let err = hosts
            .file(Provider::Virtualbox, destroy("nginx3"))
            .expect_err("refused");
        assert!(err.contains("corral-agent host"), "{err}");
        assert!(hosts.file(Provider::Lxc, destroy("x")).is_err());
    }

    #[tokio::test]
    async fn a_parked_poll_wakes_with_the_order_and_the_answer_reaches_the_waiter() {
        let hosts = std::sync::Arc::new(Hosts::new([Provider::Virtualbox]));
        hosts
            .poll(Provider::Virtualbox, report(vec![]), Duration::ZERO)
            .await;
        let poller = {
            let hosts = hosts.clone();
            tokio::spawn(async move {
                hosts
                    .poll(
                        Provider::Virtualbox,
                        report(vec![]),
                        Duration::from_secs(30),
                    )
                    .await
            })
        };
        // The poll is parked before the order is filed, or finds it at once.
        let (_, reply) = hosts
            .file(Provider::Virtualbox, destroy("nginx3"))
            .expect("connected");
        let got = tokio::time::timeout(Duration::from_secs(5), poller)
            .await
            .expect("woken")
            .expect("joined");
        assert_eq!(got.orders.len(), 1);
        let id = got.orders[0].id;
        hosts
            .finish(
                Provider::Virtualbox,
                id,
                MachineResult {
                    ok: true,
                    message: "deleted".into(),
                    machines: vec![],
                    inventory_seq: 0,
                    session: 0,
                    permanent: false,
                },
            )
            .expect("waiting");
        assert_eq!(reply.await.expect("answered"), Ok("deleted".into()));
        assert_eq!(hosts.machines(Provider::Virtualbox), Some(vec![]));
        assert!(
            hosts
                .finish(
                    Provider::Virtualbox,
                    id,
                    MachineResult {
                        ok: true,
                        message: String::new(),
                        machines: vec![],
                        inventory_seq: 0,
                        session: 0,
                        permanent: false,
                    }
                )
                .is_err(),
            "answered once"
        );
    }

    #[tokio::test]
    async fn an_order_the_host_agent_no_longer_works_on_is_handed_out_again() {
        let hosts = Hosts::new([Provider::Virtualbox]);
        hosts
            .poll(Provider::Virtualbox, report(vec![]), Duration::ZERO)
            .await;
        let _reply = hosts
            .file(Provider::Virtualbox, destroy("nginx3"))
            .expect("connected");
        let first = hosts
            .poll(Provider::Virtualbox, report(vec![]), Duration::ZERO)
            .await;
        let id = first.orders[0].id;
        // Still working on it: not handed out twice.
        let again = hosts
            .poll(Provider::Virtualbox, report(vec![id]), Duration::ZERO)
            .await;
        assert!(again.orders.is_empty());
        // A restarted host agent works on nothing: it gets the order again.
        let restarted = hosts
            .poll(Provider::Virtualbox, report(vec![]), Duration::ZERO)
            .await;
        assert_eq!(restarted.orders, first.orders);
    }

    #[tokio::test]
    async fn a_withdrawn_order_is_not_handed_out() {
        let hosts = Hosts::new([Provider::Virtualbox]);
        hosts
            .poll(Provider::Virtualbox, report(vec![]), Duration::ZERO)
            .await;
        let (id, _reply) = hosts
            .file(Provider::Virtualbox, destroy("nginx3"))
            .expect("connected");
        hosts.withdraw(Provider::Virtualbox, id);
        let got = hosts
            .poll(Provider::Virtualbox, report(vec![]), Duration::ZERO)
            .await;
        assert!(got.orders.is_empty());
    }

    #[tokio::test]
    async fn an_older_picture_of_the_machines_does_not_replace_a_newer_one() {
        let hosts = Hosts::new([Provider::Virtualbox]);
        hosts
            .poll(Provider::Virtualbox, HostPoll::default(), Duration::ZERO)
            .await;
        let (id, _reply) = hosts
            .file(Provider::Virtualbox, destroy("nginx3"))
            .expect("connected");
        // The result (picture 5) arrives before a poll whose picture (4)
        // was taken earlier.
        hosts
            .finish(
                Provider::Virtualbox,
                id,
                MachineResult {
                    ok: true,
                    message: String::new(),
                    machines: vec![],
                    inventory_seq: 5,
                    session: 1,
                    permanent: false,
                },
            )
            .expect("waiting");
        let mut older = report(vec![]);
        older.inventory_seq = 4;
        older.session = 1;
        hosts
            .poll(Provider::Virtualbox, older, Duration::ZERO)
            .await;
        assert_eq!(hosts.machines(Provider::Virtualbox), Some(vec![]));
        // A restarted host agent numbers from 1 again: its pictures count.
        let mut restarted = report(vec![]);
        restarted.inventory_seq = 1;
        restarted.session = 2;
        hosts
            .poll(Provider::Virtualbox, restarted, Duration::ZERO)
            .await;
        assert_eq!(
            hosts.machines(Provider::Virtualbox).map(|m| m.len()),
            Some(1)
        );
    }

    #[tokio::test]
    async fn a_poll_left_parked_by_a_killed_host_agent_hands_out_nothing() {
        let hosts = std::sync::Arc::new(Hosts::new([Provider::Virtualbox]));
        let park = |hosts: std::sync::Arc<Hosts>| {
            tokio::spawn(async move {
                hosts
                    .poll(
                        Provider::Virtualbox,
                        report(vec![]),
                        Duration::from_secs(30),
                    )
                    .await
            })
        };
        // The killed host agent's poll, then its successor's.
        let parked = |n: usize| {
            let hosts = hosts.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(5), async {
                    while hosts.parked(Provider::Virtualbox) < n {
                        tokio::task::yield_now().await;
                    }
                })
                .await
                .expect("the poll parks");
            }
        };
        let dead = park(hosts.clone());
        parked(1).await;
        let live = park(hosts.clone());
        parked(2).await;
        let (_, _reply) = hosts
            .file(Provider::Virtualbox, destroy("nginx3"))
            .expect("connected");
        let live = tokio::time::timeout(Duration::from_secs(5), live)
            .await
            .expect("woken")
            .expect("joined");
        assert_eq!(live.orders.len(), 1, "the newest poll gets the order");
        let dead = tokio::time::timeout(Duration::from_secs(5), dead)
            .await
            .expect("woken")
            .expect("joined");
        assert!(dead.orders.is_empty());
    }
}
