//! The control plane's business rules, behind the thin HTTP handlers, one
//! file per use case: `topology`, `nodes`, `db` (switchover), `agents`
//! (enrollment and heartbeats), `orders` (long polls and results) and
//! `events`. Every change to desired state goes through `change`: it runs the
//! reconciler in the same transaction and writes its audit events there too,
//! so a change is all-or-nothing; after the commit, waiting long polls and
//! event streams are woken. `rows` turns database rows into API types;
//! `error` names what the use cases refuse, leaving HTTP to `crate::error`.

mod agents;
mod backups;
mod change;
mod db;
mod error;
mod events;
pub mod hosts;
mod leader;
pub mod logs;
mod metrics;
mod nodes;
mod offsite;
mod orders;
mod peers;
mod rows;
mod topology;

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use corral_proto::{Node, NodeHealth, Provider, TopologyUpdate, WorkOrder};
use sea_orm::DatabaseTransaction;
use tokio::sync::{mpsc, watch};

use crate::auth::{Caller, NodeRef, Secrets, TokenCache, hash_token};
use crate::bus::{EventBus, OrderBus};
use crate::reconcile::{ClusterSettings, LastOrders};
use crate::store::{self, Store};

use agents::watch_heartbeats;
use orders::mark_delivered;
use rows::update_from_row;
use topology::save_spec;

pub use backups::{RESTORE_NODE, backup_from_row, backup_source};
pub use change::Timings;
pub use error::ClusterError;
pub use hosts::Hosts;
pub use leader::LEADER_RETRY;
pub use metrics::SeriesQuery;
pub use offsite::Offsite;
pub use rows::{event_from_row, order_from_row};

/// The most orders one poll answer carries; the agent polls again for more.
pub const MAX_POLL_ORDERS: u64 = 100;
/// How many published event ids a server remembers, to publish none twice.
const RECENT_EVENTS: usize = 4096;
/// The most rows a list call returns.
pub const MAX_LIST_LIMIT: u64 = 1000;
/// Agent requests reading the database on their way in at once.
const LOOKUPS: usize = 64;

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub settings: ClusterSettings,
    /// Provider of nodes created without one.
    pub default_provider: Provider,
    /// The providers this server runs: nodes may be created only with one
    /// of these. The default provider always counts as configured.
    pub providers: Vec<Provider>,
    /// Longest a long poll may hold (the `wait` parameter is capped to it).
    pub max_poll_wait: Duration,
    /// A node is `stale` when its last heartbeat is older than this.
    pub heartbeat_stale_after: Duration,
    pub retention: Retention,
    /// Machine orders of the providers whose machines host agents make.
    pub hosts: Arc<hosts::Hosts>,
    /// How long an enrollment secret stays valid once minted.
    pub enroll_secret_ttl: Duration,
    /// adm1's backup store (`<state-dir>/backups`).
    pub backups: crate::backup_store::BackupStore,
    /// The S3-compatible bucket the store is copied to, if configured.
    pub offsite: Option<Arc<Offsite>>,
}

/// Default lifetime of an enrollment secret: long enough for a VM to boot
/// and install, short enough that a secret found later is worthless.
pub const ENROLL_SECRET_TTL: Duration = Duration::from_secs(3600);

/// How much history the database keeps: without bounds, orders and events
/// (a heartbeat that changes what a node reports is one) grow forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Finished orders kept per node, besides the newest of each kind.
    pub orders_per_node: u64,
    /// Events kept at most, newest first.
    pub events: u64,
    /// Events older than this go.
    pub event_age: Duration,
    /// How often the pruning runs (also once at start).
    pub every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            orders_per_node: 200,
            events: 100_000,
            event_age: Duration::from_secs(30 * 24 * 3600),
            every: Duration::from_secs(60),
        }
    }
}

/// The outcome of removing a node.
#[derive(Debug)]
pub enum Removal {
    /// The node's agent was told to drain; it is removed once it has.
    Draining(Box<Node>),
    /// The node is gone.
    Removed,
}

/// What the reconciler needs besides the nodes: the last order of each kind
/// of each node. Kept in memory (it would cost a scan of every order and a
/// JSON parse each per change otherwise), loaded from the database on first
/// use and after any commit whose outcome is unknown. Where other servers
/// share the database (PostgreSQL), it is also loaded again when the orders
/// and nodes are not as this server left them after its last change
/// ([`store::orders_generation`]): another server changed them.
#[derive(Default)]
struct Desired {
    last: LastOrders,
    loaded: bool,
    /// Orders and nodes as of this server's last change (PostgreSQL).
    seen: Option<(i64, i64, i64)>,
}

pub struct Cluster {
    store: Store,
    config: ClusterConfig,
    secrets: Secrets,
    orders: OrderBus,
    events: EventBus,
    tokens: TokenCache,
    /// Bounds how many agent requests read the database at once on their
    /// way in (token lookups, a poll's first look). 10,000 agents
    /// connecting together otherwise each hold a built query waiting for
    /// one of the pool's few connections: ~100 MB of transient memory.
    lookups: tokio::sync::Semaphore,
    /// Serialises changes to desired state: the reconciler reads the whole
    /// cluster and must not interleave with another run.
    write: tokio::sync::Mutex<Desired>,
    delivered: mpsc::UnboundedSender<(i32, i64)>,
    stale: Mutex<HashSet<i32>>,
    /// Bumped after every commit that creates or removes a node or changes
    /// a node's state: what providers watch.
    node_changes: watch::Sender<u64>,
    /// Names this server in the notifications it sends other servers.
    server_id: String,
    /// The newest audit event published to this server's streams.
    last_event: AtomicI64,
    /// The ids of the events published here lately: catching up after
    /// (re)listening reads back events this server already published (its
    /// own, at start), and a stream must not get one twice.
    published_events: Mutex<std::collections::VecDeque<i64>>,
    /// Whether this server does the background work that must run once:
    /// always on SQLite, while it holds the leader lock on PostgreSQL.
    leader: Arc<watch::Sender<bool>>,
    /// Dropped with the cluster: tasks holding sessions of their own end.
    gone: watch::Sender<()>,
    /// What `GET /metrics` exposes about this server.
    counters: crate::prometheus::Counters,
    /// Bumped after log lines were appended, here or (told through the
    /// peers' notifications) on another server: what log followers wait on.
    log_appends: watch::Sender<u64>,
}

impl Cluster {
    /// Sets up the cluster state (topology row, `adm1`) and starts the
    /// background tasks, which end when the returned `Arc` is dropped.
    pub async fn start(
        store: Store,
        mut config: ClusterConfig,
        secrets: Secrets,
    ) -> Result<Arc<Self>, ClusterError> {
        if !config.providers.contains(&config.default_provider) {
            config.providers.push(config.default_provider);
        }
        let (delivered, delivered_rx) = mpsc::unbounded_channel();
        let postgres = store.postgres().cloned();
        let leader = Arc::new(watch::Sender::new(postgres.is_none()));
        let cluster = Arc::new(Self {
            store,
            config,
            secrets,
            orders: OrderBus::default(),
            events: EventBus::default(),
            tokens: TokenCache::default(),
            lookups: tokio::sync::Semaphore::new(LOOKUPS),
            write: tokio::sync::Mutex::new(Desired::default()),
            delivered,
            stale: Mutex::new(HashSet::new()),
            node_changes: watch::Sender::new(0),
            server_id: format!("{:016x}", rand::random::<u64>()),
            last_event: AtomicI64::new(0),
            published_events: Mutex::default(),
            leader: leader.clone(),
            gone: watch::Sender::new(()),
            counters: crate::prometheus::Counters::default(),
            log_appends: watch::Sender::new(0),
        });
        if let Some(pool) = postgres {
            cluster.same_secrets_as_the_cluster().await?;
            // Listen before the first change, so nothing committed by
            // another server from here on is missed.
            let last = store::last_event_id(cluster.store.conn()).await?;
            cluster.last_event.store(last, Ordering::Relaxed);
            tokio::spawn(peers::listen(Arc::downgrade(&cluster), pool.clone()));
            tokio::spawn(leader::lead(pool, leader, cluster.gone.subscribe()));
        }
        cluster.init().await?;
        tokio::spawn(mark_delivered(cluster.store.clone(), delivered_rx));
        tokio::spawn(watch_heartbeats(Arc::downgrade(&cluster)));
        tokio::spawn(prune(Arc::downgrade(&cluster)));
        tokio::spawn(crate::consul_acl::keep(Arc::downgrade(&cluster)));
        tokio::spawn(backups::schedule_backups(Arc::downgrade(&cluster)));
        if let Some(offsite) = cluster.config.offsite.clone() {
            tokio::spawn(offsite::copy_offsite(Arc::downgrade(&cluster), offsite));
        }
        Ok(cluster)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// What this server counted since it started (`GET /metrics`).
    pub fn counters(&self) -> &crate::prometheus::Counters {
        &self.counters
    }

    /// A generation counter of the nodes, bumped after every commit that
    /// creates or removes a node or changes a node's state (provisioning,
    /// active, draining), enrollments included. Whoever turns nodes into
    /// machines waits on it, then reads [`Cluster::nodes`] afresh: a node
    /// gone from that list has been removed.
    pub fn subscribe_node_changes(&self) -> watch::Receiver<u64> {
        self.node_changes.subscribe()
    }

    fn nodes_changed(&self) {
        self.node_changes.send_modify(|generation| *generation += 1);
    }

    /// Whether this server leads now: runs the machine controller, pruning
    /// and stale-node detection. Always true on SQLite (one server).
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Follows this server's leadership.
    pub fn subscribe_leadership(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    /// Begins a change to desired state, to be made under the write mutex
    /// (`desired` is its guard). On PostgreSQL it also takes the lock that
    /// orders changes across servers, and drops the cache of last orders if
    /// another server changed anything since this one last did.
    async fn begin_change(
        &self,
        desired: &mut Desired,
    ) -> Result<DatabaseTransaction, ClusterError> {
        let txn = self.store.begin().await?;
        if self.store.postgres().is_some() {
            store::lock_changes(&txn).await?;
            let now = store::orders_generation(&txn).await?;
            if desired.seen != Some(now) {
                desired.loaded = false;
                desired.seen = Some(now);
            }
        }
        Ok(txn)
    }

    /// Sends an event committed here or elsewhere to this server's streams.
    fn publish_event(&self, row: &store::event::Model) {
        {
            let mut published = self
                .published_events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if published.contains(&row.id) {
                return;
            }
            if published.len() >= RECENT_EVENTS {
                published.pop_front();
            }
            published.push_back(row.id);
        }
        self.last_event.fetch_max(row.id, Ordering::Relaxed);
        self.events.publish(event_from_row(row));
    }

    /// Refuses to serve a database whose orders were made with other
    /// secrets than this server's: it would file every node new orders
    /// (and the next server back again). Servers sharing a database share
    /// the secrets of one state directory.
    async fn same_secrets_as_the_cluster(&self) -> Result<(), ClusterError> {
        let Some(payload) = store::newest_consul_order(self.store.conn()).await? else {
            return Ok(());
        };
        let Ok(WorkOrder::Consul(spec)) = serde_json::from_str::<WorkOrder>(&payload) else {
            return Ok(());
        };
        if spec.encrypt != self.config.settings.gossip_key {
            return Err(ClusterError::Internal(
                "this server's secrets are not the ones the cluster's orders were made with \
                 (the Consul gossip key differs): servers sharing a database must share the \
                 secrets; copy admin-token, gossip-key, db-password, replication-password, \
                 consul-management-token and tls/ca.pem, tls/ca-key.pem from the first \
                 server's state directory"
                    .into(),
            ));
        }
        Ok(())
    }

    /// First start: an empty topology and the admin node.
    async fn init(&self) -> Result<(), ClusterError> {
        let mut desired = self.write.lock().await;
        let txn = self.begin_change(&mut desired).await?;
        let now = Utc::now();
        let spec = match store::load_topology(&txn).await? {
            Some(row) => update_from_row(&row)?,
            None => {
                let spec = TopologyUpdate {
                    web: 0,
                    db: 0,
                    lb_policy: Default::default(),
                    replication: Default::default(),
                    backup: None,
                };
                save_spec(&txn, &spec, now).await?;
                spec
            }
        };
        let outcome = self
            .apply_plan(
                &txn,
                &mut desired,
                &spec,
                self.config.default_provider,
                "reconciler",
                Vec::new(),
            )
            .await?;
        self.commit(txn, outcome, &mut desired).await?;
        Ok(())
    }

    /// Who a bearer token belongs to: the admin, or the agent of a node.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, ClusterError> {
        if self.secrets.is_admin(token) {
            return Ok(Caller::Admin);
        }
        let hash = hash_token(token);
        if let Some(node) = self.tokens.get(&hash) {
            return Ok(Caller::Agent(node));
        }
        let generation = self.tokens.generation();
        let _turn = self.lookups.acquire().await;
        match store::node_by_token_hash(self.store.conn(), &hash).await? {
            Some(row) => {
                let node = NodeRef {
                    id: row.id,
                    name: row.name,
                };
                self.tokens.insert(hash, node.clone(), generation);
                Ok(Caller::Agent(node))
            }
            None => Err(ClusterError::Unauthenticated(
                "unknown or revoked token".into(),
            )),
        }
    }

    /// Whether a heartbeat at `at` still counts as recent: the node is
    /// `healthy` rather than `stale` or `unknown`.
    fn is_fresh(&self, at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
        self.health(at, now) == NodeHealth::Healthy
    }

    fn health(&self, at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> NodeHealth {
        match at {
            None => NodeHealth::Unknown,
            Some(at)
                if (now - at).to_std().unwrap_or_default() > self.config.heartbeat_stale_after =>
            {
                NodeHealth::Stale
            }
            Some(_) => NodeHealth::Healthy,
        }
    }
}

/// Applies the retention now and then, until the cluster is dropped.
async fn prune(cluster: Weak<Cluster>) {
    let every = match cluster.upgrade() {
        Some(c) => c.config.retention.every,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        if !cluster.is_leader() {
            continue;
        }
        if let Err(e) = cluster.prune_now().await {
            tracing::warn!(error = %e, "pruning old orders and events failed");
        }
        if let Err(e) = cluster.prune_metrics(Utc::now().timestamp()).await {
            tracing::warn!(error = %e, "rolling up and pruning metrics failed");
        }
    }
}

impl Cluster {
    /// Deletes what the retention no longer keeps; returns (orders, events)
    /// deleted.
    pub async fn prune_now(&self) -> Result<(u64, u64), ClusterError> {
        let r = self.config.retention;
        let orders = store::prune_orders(self.store.conn(), r.orders_per_node).await?;
        let before = Utc::now()
            - chrono::Duration::from_std(r.event_age).unwrap_or(chrono::Duration::days(30));
        let events = store::prune_events(self.store.conn(), r.events, before).await?;
        let log_lines = store::logs::prune_removed(self.store.conn()).await?;
        if orders + events + log_lines > 0 {
            tracing::info!(
                orders,
                events,
                log_lines,
                "pruned old orders and events, and removed nodes' log lines"
            );
        }
        Ok((orders, events))
    }
}
