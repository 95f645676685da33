//! The control plane's business rules, behind the thin HTTP handlers: every
//! change to desired state runs the reconciler in the same transaction and
//! writes its audit events there too, so a change is all-or-nothing. After
//! the commit, waiting long polls and event streams are woken.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use corral_proto::{
    CreateNode, EnrollRequest, EnrollResponse, Event, Heartbeat, MAX_NODES_PER_ROLE, Node,
    NodeHealth, NodeState, ObservedState, Order, OrderKind, OrderResult, OrderStatus, PollResponse,
    Provider, ReplicationStatus, Role, SwitchoverAccepted, SwitchoverRequest, SwitchoverSpec,
    Topology, TopologyChange, TopologyUpdate, WorkOrder, order::MAX_RESULT_LEN, validate_node_name,
};
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tokio::sync::{broadcast, mpsc};

use crate::auth::{Caller, NodeRef, Secrets, TokenCache, hash_token, new_token};
use crate::bus::{EventBus, OrderBatch, OrderBus};
use crate::error::ApiError;
use crate::reconcile::{self, ClusterSettings, LastOrders, NodeView, PlanError};
use crate::store::{self, NewEvent, NewNodeRow, NewOrderRow, Store, event, node, work_order};
use crate::switchover;

/// The most orders one poll answer carries; the agent polls again for more.
pub const MAX_POLL_ORDERS: u64 = 100;
/// The most rows a list call returns.
pub const MAX_LIST_LIMIT: u64 = 1000;

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub settings: ClusterSettings,
    /// Provider of nodes created without one.
    pub default_provider: Provider,
    /// Longest a long poll may hold (the `wait` parameter is capped to it).
    pub max_poll_wait: Duration,
    /// A node is `stale` when its last heartbeat is older than this.
    pub heartbeat_stale_after: Duration,
}

/// The outcome of removing a node.
#[derive(Debug)]
pub enum Removal {
    /// The node's agent was told to drain; it is removed once it has.
    Draining(Box<Node>),
    /// The node is gone.
    Removed,
}

/// How long the phases of a change took, for the log and the standard
/// `Server-Timing` response header (shown by browsers' developer tools).
#[derive(Debug, Default, Clone)]
pub struct Timings(Vec<(&'static str, Duration)>);

impl Timings {
    fn record(&mut self, phase: &'static str, took: Duration) {
        self.0.push((phase, took));
    }

    /// `lock;dur=0.0, load;dur=41.2, ...` in milliseconds.
    pub fn server_timing(&self) -> String {
        self.0
            .iter()
            .map(|(phase, took)| format!("{phase};dur={:.1}", took.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn total(&self) -> Duration {
        self.0.iter().map(|(_, d)| *d).sum()
    }
}

/// What a committed change has to announce.
#[derive(Default)]
struct Outcome {
    created: Vec<String>,
    draining: Vec<String>,
    /// Nodes deleted: id and name.
    removed: Vec<(i32, String)>,
    /// Orders filed, per node name, for the cache of last orders.
    filed: Vec<(String, WorkOrder)>,
    orders_filed: u64,
    batches: Vec<(i32, OrderBatch)>,
    events: Vec<event::Model>,
    /// Nodes the plan looked at, for the log.
    nodes_seen: usize,
    timings: Timings,
}

/// What the reconciler needs besides the nodes: the last order of each kind
/// of each node. Kept in memory (it would cost a scan of every order and a
/// JSON parse each per change otherwise), loaded from the database on first
/// use and after any commit whose outcome is unknown. This assumes one
/// server per database, which is how corral runs.
#[derive(Default)]
struct Desired {
    last: LastOrders,
    loaded: bool,
}

pub struct Cluster {
    store: Store,
    config: ClusterConfig,
    secrets: Secrets,
    orders: OrderBus,
    events: EventBus,
    tokens: TokenCache,
    /// Serialises changes to desired state: the reconciler reads the whole
    /// cluster and must not interleave with another run.
    write: tokio::sync::Mutex<Desired>,
    delivered: mpsc::UnboundedSender<(i32, i64)>,
    stale: Mutex<HashSet<i32>>,
}

impl Cluster {
    /// Sets up the cluster state (topology row, `adm1`) and starts the
    /// background tasks, which end when the returned `Arc` is dropped.
    pub async fn start(
        store: Store,
        config: ClusterConfig,
        secrets: Secrets,
    ) -> Result<Arc<Self>, ApiError> {
        let (delivered, delivered_rx) = mpsc::unbounded_channel();
        let cluster = Arc::new(Self {
            store,
            config,
            secrets,
            orders: OrderBus::default(),
            events: EventBus::default(),
            tokens: TokenCache::default(),
            write: tokio::sync::Mutex::new(Desired::default()),
            delivered,
            stale: Mutex::new(HashSet::new()),
        });
        cluster.init().await?;
        tokio::spawn(mark_delivered(cluster.store.clone(), delivered_rx));
        tokio::spawn(watch_heartbeats(Arc::downgrade(&cluster)));
        Ok(cluster)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// First start: an empty topology and the admin node.
    async fn init(&self) -> Result<(), ApiError> {
        let mut desired = self.write.lock().await;
        let txn = self.store.begin().await?;
        let now = Utc::now();
        let spec = match store::load_topology(&txn).await? {
            Some(row) => update_from_row(&row)?,
            None => {
                let spec = TopologyUpdate {
                    web: 0,
                    db: 0,
                    lb_policy: Default::default(),
                    replication: Default::default(),
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

    // ---- authentication ---------------------------------------------------

    pub async fn authenticate(&self, token: &str) -> Result<Caller, ApiError> {
        if self.secrets.is_admin(token) {
            return Ok(Caller::Admin);
        }
        let hash = hash_token(token);
        if let Some(node) = self.tokens.get(&hash) {
            return Ok(Caller::Agent(node));
        }
        match store::node_by_token_hash(self.store.conn(), &hash).await? {
            Some(row) => {
                let node = NodeRef {
                    id: row.id,
                    name: row.name,
                };
                self.tokens.insert(hash, node.clone());
                Ok(Caller::Agent(node))
            }
            None => Err(ApiError::Unauthorized("unknown or revoked token".into())),
        }
    }

    // ---- topology ---------------------------------------------------------

    pub async fn topology(&self) -> Result<Topology, ApiError> {
        let row = store::load_topology(self.store.conn())
            .await?
            .ok_or_else(|| ApiError::Internal("topology row missing".into()))?;
        topology_from_row(&row)
    }

    #[tracing::instrument(skip(self, caller), fields(actor = %caller.actor()))]
    pub async fn set_topology(
        &self,
        update: TopologyUpdate,
        caller: &Caller,
    ) -> Result<(TopologyChange, Timings), ApiError> {
        caller.require_admin()?;
        update.validate().map_err(ApiError::Unprocessable)?;
        let waited = std::time::Instant::now();
        let mut desired = self.write.lock().await;
        let waited = waited.elapsed();
        let txn = self.store.begin().await?;
        let now = Utc::now();
        let current = store::load_topology(&txn)
            .await?
            .map(|row| update_from_row(&row))
            .transpose()?;
        let mut events = Vec::new();
        if current.as_ref() != Some(&update) {
            save_spec(&txn, &update, now).await?;
            events.push(NewEvent {
                actor: caller.actor(),
                kind: "topology.updated".into(),
                subject: "topology".into(),
                message: format!(
                    "web={} db={} lb_policy={} replication={}",
                    update.web, update.db, update.lb_policy, update.replication
                ),
            });
        }
        let outcome = self
            .apply_plan(
                &txn,
                &mut desired,
                &update,
                self.config.default_provider,
                &caller.actor(),
                events,
            )
            .await?;
        let row = store::load_topology(&txn)
            .await?
            .ok_or_else(|| ApiError::Internal("topology row missing".into()))?;
        let change = TopologyChange {
            topology: topology_from_row(&row)?,
            created: outcome.created.clone(),
            draining: outcome.draining.clone(),
            orders_filed: outcome.orders_filed,
        };
        let mut timings = Timings::default();
        timings.record("lock", waited);
        timings
            .0
            .extend(self.commit(txn, outcome, &mut desired).await?.0);
        Ok((change, timings))
    }

    // ---- nodes ------------------------------------------------------------

    pub async fn nodes(&self) -> Result<Vec<Node>, ApiError> {
        let now = Utc::now();
        store::all_nodes(self.store.conn())
            .await?
            .iter()
            .map(|row| self.node_from_row(row, now))
            .collect()
    }

    pub async fn node(&self, name: &str) -> Result<Node, ApiError> {
        let row = self.node_row(self.store.conn(), name).await?;
        self.node_from_row(&row, Utc::now())
    }

    async fn node_row<C: ConnectionTrait>(
        &self,
        c: &C,
        name: &str,
    ) -> Result<node::Model, ApiError> {
        validate_node_name(name).map_err(ApiError::NotFound)?;
        store::node_by_name(c, name)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no node named {name}")))
    }

    #[tracing::instrument(skip(self, caller), fields(actor = %caller.actor()))]
    pub async fn create_node(&self, req: CreateNode, caller: &Caller) -> Result<Node, ApiError> {
        caller.require_admin()?;
        let role = Role::from(req.role);
        let provider = req.provider.unwrap_or(self.config.default_provider);
        let mut desired = self.write.lock().await;
        let txn = self.store.begin().await?;
        let now = Utc::now();
        let mut spec = self.spec(&txn).await?;
        let count = match role {
            Role::Web => &mut spec.web,
            _ => &mut spec.db,
        };
        if *count >= MAX_NODES_PER_ROLE {
            return Err(ApiError::conflict(format!(
                "the topology already has the most {role} nodes allowed ({MAX_NODES_PER_ROLE})"
            )));
        }
        *count += 1;
        save_spec(&txn, &spec, now).await?;
        let outcome = self
            .apply_plan(
                &txn,
                &mut desired,
                &spec,
                provider,
                &caller.actor(),
                Vec::new(),
            )
            .await?;
        let name = outcome
            .created
            .iter()
            .find(|n| Role::parse_node_name(n).is_some_and(|(r, _)| r == role))
            .cloned()
            .ok_or_else(|| ApiError::Internal("the plan created no node".into()))?;
        let row = self.node_row(&txn, &name).await?;
        self.commit(txn, outcome, &mut desired).await?;
        self.node_from_row(&row, now)
    }

    #[tracing::instrument(skip(self, caller), fields(actor = %caller.actor()))]
    pub async fn remove_node(
        &self,
        name: &str,
        force: bool,
        caller: &Caller,
    ) -> Result<Removal, ApiError> {
        caller.require_admin()?;
        let mut desired = self.write.lock().await;
        let txn = self.store.begin().await?;
        let now = Utc::now();
        let row = self.node_row(&txn, name).await?;
        let role = parse_role(&row.role)?;
        if role == Role::Adm {
            return Err(ApiError::conflict(format!(
                "{name} hosts the control plane and cannot be removed"
            )));
        }
        let state = parse_state(&row.state)?;
        if state == NodeState::Draining && !force {
            drop(txn);
            return Ok(Removal::Draining(Box::new(self.node_from_row(&row, now)?)));
        }
        let mut spec = self.spec(&txn).await?;
        if state != NodeState::Draining {
            let count = if role == Role::Web {
                &mut spec.web
            } else {
                &mut spec.db
            };
            *count = count.saturating_sub(1);
            save_spec(&txn, &spec, now).await?;
        }
        let mut events = Vec::new();
        let removed_now = force || state == NodeState::Provisioning;
        if removed_now {
            store::delete_node(&txn, row.id).await?;
            events.push(NewEvent {
                actor: caller.actor(),
                kind: "node.removed".into(),
                subject: name.into(),
                message: if force {
                    format!("{name} removed without draining (forced)")
                } else {
                    format!("{name} removed; its agent had never enrolled")
                },
            });
        } else {
            store::set_node_state(&txn, row.id, NodeState::Draining.as_str(), now).await?;
            events.push(NewEvent {
                actor: caller.actor(),
                kind: "node.draining".into(),
                subject: name.into(),
                message: format!("{name} told to drain; it is removed once it has"),
            });
        }
        let mut outcome = self
            .apply_plan(
                &txn,
                &mut desired,
                &spec,
                self.config.default_provider,
                &caller.actor(),
                events,
            )
            .await?;
        let result = if removed_now {
            outcome.removed.push((row.id, name.to_string()));
            Removal::Removed
        } else {
            let row = self.node_row(&txn, name).await?;
            Removal::Draining(Box::new(self.node_from_row(&row, now)?))
        };
        self.commit(txn, outcome, &mut desired).await?;
        Ok(result)
    }

    // ---- databases --------------------------------------------------------

    /// Files a switchover to the current primary, after checking that the
    /// target is a caught-up streaming standby (see [`switchover::check`]).
    /// A refused request changes nothing.
    #[tracing::instrument(skip(self, caller), fields(actor = %caller.actor()))]
    pub async fn switchover(
        &self,
        req: SwitchoverRequest,
        caller: &Caller,
    ) -> Result<SwitchoverAccepted, ApiError> {
        caller.require_admin()?;
        let to = req.to;
        if validate_node_name(&to).is_err() {
            return Err(ApiError::NotFound(format!("no node named {to}")));
        }
        let mut desired = self.write.lock().await;
        let txn = self.store.begin().await?;
        let now = Utc::now();
        let rows = store::db_nodes_and(&txn, &to).await?;
        let standings = rows
            .iter()
            .map(|row| {
                Ok(switchover::Standing {
                    name: row.name.clone(),
                    role: parse_role(&row.role)?,
                    state: parse_state(&row.state)?,
                    fresh: self.is_fresh(row.last_heartbeat, now),
                    replication: row
                        .observed
                        .as_deref()
                        .and_then(|s| serde_json::from_str::<ObservedState>(s).ok())
                        .and_then(|o| o.replication),
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let from =
            switchover::check(&to, &standings, switchover::MAX_LAG_BYTES).map_err(|refusal| {
                match refusal {
                    switchover::Refusal::UnknownNode(_) => ApiError::NotFound(refusal.to_string()),
                    switchover::Refusal::NotDb { .. } => {
                        ApiError::Unprocessable(refusal.to_string())
                    }
                    other => ApiError::Conflict {
                        code: other.conflict_code(),
                        message: other.to_string(),
                    },
                }
            })?;
        let primary = rows
            .iter()
            .find(|r| r.name == from)
            .ok_or_else(|| ApiError::Internal("the primary vanished from its own list".into()))?;
        if let Some(running) =
            store::unfinished_order(&txn, primary.id, OrderKind::Switchover.as_str()).await?
        {
            return Err(ApiError::Conflict {
                code: "switchover_in_progress",
                message: format!(
                    "{from} has not finished switchover order {} yet; follow it in GET /api/v1/nodes/{from}/orders",
                    running.seq
                ),
            });
        }
        let order = WorkOrder::Switchover(SwitchoverSpec {
            to: to.clone(),
            max_lag_bytes: switchover::MAX_LAG_BYTES,
        });
        let seq = primary.last_seq + 1;
        store::advance_last_seq(&txn, &[primary.id], 1).await?;
        let mut outcome = Outcome {
            orders_filed: store::insert_orders(
                &txn,
                vec![order_row(primary.id, seq, &order)?],
                now,
            )
            .await?,
            ..Outcome::default()
        };
        outcome.events = store::insert_events(
            &txn,
            vec![NewEvent {
                actor: caller.actor(),
                kind: "db.switchover_requested".into(),
                subject: from.clone(),
                message: format!("switchover {from} -> {to} requested (order {seq} on {from})"),
            }],
            now,
        )
        .await?;
        outcome.filed.push((from.clone(), order.clone()));
        outcome.batches.push((
            primary.id,
            OrderBatch {
                orders: vec![Order::pending(from.clone(), seq, order, now)],
            },
        ));
        self.commit(txn, outcome, &mut desired).await?;
        Ok(SwitchoverAccepted { from, to, seq })
    }

    async fn spec<C: ConnectionTrait>(&self, c: &C) -> Result<TopologyUpdate, ApiError> {
        let row = store::load_topology(c)
            .await?
            .ok_or_else(|| ApiError::Internal("topology row missing".into()))?;
        update_from_row(&row)
    }

    // ---- reconciling ------------------------------------------------------

    /// Plans against the state inside `txn` and writes the plan there: new
    /// nodes, drains, orders (with their per-node `seq`) and audit events.
    async fn apply_plan(
        &self,
        txn: &DatabaseTransaction,
        desired: &mut Desired,
        spec: &TopologyUpdate,
        provider: Provider,
        actor: &str,
        mut events: Vec<NewEvent>,
    ) -> Result<Outcome, ApiError> {
        let now = Utc::now();
        let clock = std::time::Instant::now();
        let rows = store::reconcile_nodes(txn).await?;
        let views = rows.iter().map(node_view).collect::<Result<Vec<_>, _>>()?;
        if !desired.loaded {
            let names: HashMap<i32, &str> = rows.iter().map(|r| (r.id, r.name.as_str())).collect();
            desired.last.clear();
            for (node_id, kind, payload) in store::latest_orders(txn).await? {
                let (Some(name), Ok(kind)) = (names.get(&node_id), kind.parse::<OrderKind>())
                else {
                    continue;
                };
                let order: WorkOrder = serde_json::from_str(&payload).map_err(|e| {
                    ApiError::Internal(format!("stored order of {name} is corrupt: {e}"))
                })?;
                desired.last.insert((name.to_string(), kind), order);
            }
            desired.loaded = true;
        }
        let last = &desired.last;
        let loaded = clock.elapsed();
        let plan =
            reconcile::plan(spec, &views, last, &self.config.settings, provider).map_err(|e| {
                match e {
                    PlanError::AddressPoolExhausted { .. } => ApiError::Conflict {
                        code: "address_pool_exhausted",
                        message: format!("{e}; widen --network or remove nodes"),
                    },
                }
            })?;
        let planned = clock.elapsed();
        let mut outcome = Outcome::default();
        if plan.is_empty() {
            outcome.events = store::insert_events(txn, events, now).await?;
            return Ok(outcome);
        }

        // Nodes first: their ids are needed for the orders.
        let created = store::insert_nodes(
            txn,
            plan.create
                .iter()
                .map(|n| NewNodeRow {
                    name: &n.name,
                    role: n.role.as_str(),
                    address: n.address.to_string(),
                    provider: n.provider.as_str(),
                    state: NodeState::Provisioning.as_str(),
                })
                .collect(),
            now,
        )
        .await?;
        let mut by_name: HashMap<String, (i32, i64)> = rows
            .iter()
            .map(|r| (r.name.clone(), (r.id, r.last_seq)))
            .collect();
        for row in &created {
            by_name.insert(row.name.clone(), (row.id, 0));
            events.push(NewEvent {
                actor: actor.into(),
                kind: "node.created".into(),
                subject: row.name.clone(),
                message: format!(
                    "{} node {} at {} ({})",
                    row.role, row.name, row.address, row.provider
                ),
            });
            outcome.created.push(row.name.clone());
        }
        let never_enrolled: HashSet<&str> = rows
            .iter()
            .filter(|r| r.state == NodeState::Provisioning.as_str())
            .map(|r| r.name.as_str())
            .collect();
        let mut removed_names = HashSet::new();
        for name in &plan.drain {
            let (id, _) = by_name[name];
            if never_enrolled.contains(name.as_str()) {
                // No agent to drain: it goes at once, as with DELETE.
                store::delete_node(txn, id).await?;
                events.push(NewEvent {
                    actor: actor.into(),
                    kind: "node.removed".into(),
                    subject: name.clone(),
                    message: format!(
                        "{name} is surplus to the topology and removed; its agent had never enrolled"
                    ),
                });
                outcome.removed.push((id, name.clone()));
                removed_names.insert(name.clone());
                continue;
            }
            store::set_node_state(txn, id, NodeState::Draining.as_str(), now).await?;
            events.push(NewEvent {
                actor: actor.into(),
                kind: "node.draining".into(),
                subject: name.clone(),
                message: format!("{name} is surplus to the topology and told to drain"),
            });
            outcome.draining.push(name.clone());
        }

        // Orders, with seq allocated per node in filing order.
        let mut per_node: BTreeMap<i32, (String, Vec<WorkOrder>)> = BTreeMap::new();
        for (name, order) in plan.orders {
            if removed_names.contains(&name) {
                continue;
            }
            let (id, _) = by_name[&name];
            per_node
                .entry(id)
                .or_insert_with(|| (name.clone(), Vec::new()))
                .1
                .push(order);
        }
        // The orders as agents will see them, built here rather than read
        // back: RETURNING 10,000 rows costs more than writing them.
        let mut rows_to_insert = Vec::new();
        let mut kinds: BTreeMap<OrderKind, u64> = BTreeMap::new();
        let mut by_count: BTreeMap<i64, Vec<i32>> = BTreeMap::new();
        for (id, (name, orders)) in per_node.iter_mut() {
            let (_, last_seq) = by_name[name.as_str()];
            by_count.entry(orders.len() as i64).or_default().push(*id);
            let mut batch = Vec::with_capacity(orders.len());
            for (i, order) in orders.drain(..).enumerate() {
                *kinds.entry(order.kind()).or_default() += 1;
                let seq = last_seq + 1 + i as i64;
                rows_to_insert.push(order_row(*id, seq, &order)?);
                outcome.filed.push((name.clone(), order.clone()));
                batch.push(Order::pending(name.clone(), seq, order, now));
            }
            outcome.batches.push((*id, OrderBatch { orders: batch }));
        }
        // One UPDATE per distinct number of new orders (usually one or two),
        // not one per node.
        for (count, ids) in by_count {
            store::advance_last_seq(txn, &ids, count).await?;
        }
        outcome.orders_filed = store::insert_orders(txn, rows_to_insert, now).await?;
        if !per_node.is_empty() {
            let kinds = kinds
                .iter()
                .map(|(k, n)| format!("{k}×{n}"))
                .collect::<Vec<_>>()
                .join(", ");
            let nodes: Vec<&str> = per_node.values().map(|(n, _)| n.as_str()).collect();
            let subject = if nodes.len() == 1 {
                nodes[0].to_string()
            } else {
                "cluster".into()
            };
            let listed = if nodes.len() <= 10 {
                nodes.join(", ")
            } else {
                format!("{} nodes", nodes.len())
            };
            events.push(NewEvent {
                actor: "reconciler".into(),
                kind: "orders.filed".into(),
                subject,
                message: format!(
                    "filed {} orders ({kinds}) for {listed}",
                    outcome.orders_filed
                ),
            });
        }
        outcome.events = store::insert_events(txn, events, now).await?;
        outcome.nodes_seen = rows.len();
        outcome.timings.record("load", loaded);
        outcome.timings.record("plan", planned - loaded);
        outcome.timings.record("write", clock.elapsed() - planned);
        Ok(outcome)
    }

    /// Commits a change, then brings the cache of last orders up to date and
    /// wakes long polls and event streams.
    async fn commit(
        &self,
        txn: DatabaseTransaction,
        mut outcome: Outcome,
        desired: &mut Desired,
    ) -> Result<Timings, ApiError> {
        let clock = std::time::Instant::now();
        if let Err(e) = txn.commit().await {
            // Whether it committed is unknown: reload the cache next time.
            desired.loaded = false;
            return Err(e.into());
        }
        let committed = clock.elapsed();
        if desired.loaded {
            let removed: HashSet<&str> = outcome.removed.iter().map(|(_, n)| n.as_str()).collect();
            if !removed.is_empty() {
                desired
                    .last
                    .retain(|(name, _), _| !removed.contains(name.as_str()));
            }
            for (name, order) in &outcome.filed {
                desired
                    .last
                    .insert((name.clone(), order.kind()), order.clone());
            }
        }
        let mut timings = std::mem::take(&mut outcome.timings);
        timings.record("commit", committed);
        let (nodes, created, draining, orders) = (
            outcome.nodes_seen,
            outcome.created.len(),
            outcome.draining.len(),
            outcome.orders_filed,
        );
        self.announce(outcome);
        timings.record("announce", clock.elapsed() - committed);
        if orders > 0 || created > 0 || draining > 0 {
            tracing::info!(
                nodes,
                created,
                draining,
                orders,
                ms = timings.total().as_millis() as u64,
                phases = %timings.server_timing(),
                "change committed"
            );
        }
        Ok(timings)
    }

    /// Wakes long polls and event streams after a commit.
    fn announce(&self, outcome: Outcome) {
        for (id, _) in outcome.removed {
            self.tokens.forget_node(id);
            self.orders.remove(id);
        }
        self.orders.publish_all(outcome.batches);
        for e in &outcome.events {
            self.events.publish(event_from_row(e));
        }
    }

    async fn record_events(&self, events: Vec<NewEvent>) -> Result<(), ApiError> {
        let rows = store::insert_events(self.store.conn(), events, Utc::now()).await?;
        for e in &rows {
            self.events.publish(event_from_row(e));
        }
        Ok(())
    }

    // ---- orders -----------------------------------------------------------

    /// Long polls waiting over all nodes right now.
    pub fn waiting_polls_total(&self) -> usize {
        self.orders.waiting_total()
    }

    /// How many long polls are waiting for `name`'s orders right now.
    pub async fn waiting_polls(&self, name: &str) -> Result<usize, ApiError> {
        let row = self.node_row(self.store.conn(), name).await?;
        Ok(self.orders.waiting(row.id))
    }

    pub async fn orders(&self, name: &str, after: i64, limit: u64) -> Result<Vec<Order>, ApiError> {
        let row = self.node_row(self.store.conn(), name).await?;
        store::orders_after(self.store.conn(), row.id, after, limit.min(MAX_LIST_LIMIT))
            .await?
            .iter()
            .map(|o| order_from_row(o, name))
            .collect()
    }

    /// Answers at once when orders after `after` exist; otherwise waits for
    /// one to be filed (woken through the order bus, not by polling the
    /// database) or for `wait` to pass, then answers with none.
    pub async fn poll(
        &self,
        name: &str,
        after: i64,
        wait: Duration,
        caller: &Caller,
    ) -> Result<PollResponse, ApiError> {
        caller.require_node(name)?;
        let row = self.node_row(self.store.conn(), name).await?;
        if after > row.last_seq {
            return Err(ApiError::conflict(format!(
                "after={after} is beyond {name}'s last order ({}); the agent's state belongs to another life of this node: reset it and enroll again",
                row.last_seq
            )));
        }
        // Subscribe before looking, so an order filed in between still wakes us.
        let mut rx = self.orders.subscribe(row.id);
        let orders = store::orders_after(self.store.conn(), row.id, after, MAX_POLL_ORDERS).await?;
        if !orders.is_empty() {
            let orders = orders
                .iter()
                .map(|o| order_from_row(o, name))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(self.delivered(row.id, orders, row.last_seq));
        }
        let deadline = tokio::time::Instant::now() + wait.min(self.config.max_poll_wait);
        let _parked = self.orders.park(row.id);
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        // The node was removed while we waited.
                        return Err(ApiError::NotFound(format!("node {name} was removed")));
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Ok(PollResponse { orders: Vec::new(), last_seq: row.last_seq });
                }
            }
            let batch = rx.borrow_and_update().clone();
            let Some(batch) = batch else { continue };
            if batch.last_seq() <= after {
                continue;
            }
            let last_seq = batch.last_seq();
            let orders = match batch.after(after) {
                Some(orders) => orders,
                None => store::orders_after(self.store.conn(), row.id, after, MAX_POLL_ORDERS)
                    .await?
                    .iter()
                    .map(|o| order_from_row(o, name))
                    .collect::<Result<Vec<_>, _>>()?,
            };
            let mut orders = orders;
            orders.truncate(MAX_POLL_ORDERS as usize);
            return Ok(self.delivered(row.id, orders, last_seq));
        }
    }

    fn delivered(&self, node_id: i32, mut orders: Vec<Order>, last_seq: i64) -> PollResponse {
        if let Some(last) = orders.last() {
            let _ = self.delivered.send((node_id, last.seq));
        }
        for o in &mut orders {
            if o.status == OrderStatus::Pending {
                o.status = OrderStatus::Delivered;
            }
        }
        PollResponse {
            last_seq: last_seq.max(orders.last().map_or(0, |o| o.seq)),
            orders,
        }
    }

    #[tracing::instrument(skip(self, result, caller), fields(actor = %caller.actor()))]
    pub async fn order_result(
        &self,
        name: &str,
        seq: i64,
        result: OrderResult,
        caller: &Caller,
    ) -> Result<Order, ApiError> {
        caller.require_node(name)?;
        let length = result.message.chars().count();
        if length > MAX_RESULT_LEN {
            return Err(ApiError::Unprocessable(format!(
                "message is {length} characters; at most {MAX_RESULT_LEN} allowed"
            )));
        }
        let row = self.node_row(self.store.conn(), name).await?;
        let order = store::order(self.store.conn(), row.id, seq)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("{name} has no order {seq}")))?;
        let status = OrderStatus::from(result.outcome);
        let current: OrderStatus = order.status.parse().map_err(ApiError::Internal)?;
        if current.is_finished() {
            if current == status {
                return order_from_row(&order, name);
            }
            return Err(ApiError::conflict(format!(
                "order {seq} of {name} is already {current}"
            )));
        }
        let kind: OrderKind = order.kind.parse().map_err(ApiError::Internal)?;
        let now = Utc::now();
        let summary: String = result.message.chars().take(200).collect();
        let finished_event = NewEvent {
            actor: caller.actor(),
            kind: format!("order.{status}"),
            subject: name.into(),
            message: format!("order {seq} ({kind}) {status}: {summary}"),
        };
        if kind == OrderKind::Drain && status == OrderStatus::Applied {
            // The node has drained: it leaves the cluster now.
            let mut desired = self.write.lock().await;
            let txn = self.store.begin().await?;
            store::finish_order(&txn, order.id, status.as_str(), &result.message, now).await?;
            let mut finished = order.clone();
            finished.status = status.as_str().into();
            finished.result = Some(result.message.clone());
            finished.updated_at = now;
            store::delete_node(&txn, row.id).await?;
            let events = vec![
                finished_event,
                NewEvent {
                    actor: caller.actor(),
                    kind: "node.removed".into(),
                    subject: name.into(),
                    message: format!("{name} drained and left the cluster"),
                },
            ];
            let spec = self.spec(&txn).await?;
            let mut outcome = self
                .apply_plan(
                    &txn,
                    &mut desired,
                    &spec,
                    self.config.default_provider,
                    "reconciler",
                    events,
                )
                .await?;
            outcome.removed.push((row.id, name.to_string()));
            self.commit(txn, outcome, &mut desired).await?;
            return order_from_row(&finished, name);
        }
        store::finish_order(
            self.store.conn(),
            order.id,
            status.as_str(),
            &result.message,
            now,
        )
        .await?;
        self.record_events(vec![finished_event]).await?;
        let updated = store::order(self.store.conn(), row.id, seq)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("{name} has no order {seq}")))?;
        order_from_row(&updated, name)
    }

    // ---- agents -----------------------------------------------------------

    #[tracing::instrument(skip(self, req), fields(node = %req.node))]
    pub async fn enroll(&self, req: EnrollRequest) -> Result<EnrollResponse, ApiError> {
        if !self.secrets.is_join_token(&req.join_token) {
            return Err(ApiError::Unauthorized("invalid join token".into()));
        }
        validate_node_name(&req.node).map_err(ApiError::Unprocessable)?;
        let _guard = self.write.lock().await;
        let row = self.node_row(self.store.conn(), &req.node).await?;
        let token = new_token("corral-node-");
        let state = match parse_state(&row.state)? {
            NodeState::Draining => NodeState::Draining,
            _ => NodeState::Active,
        };
        let txn = self.store.begin().await?;
        store::set_node_token(
            &txn,
            row.id,
            &hash_token(&token),
            state.as_str(),
            Utc::now(),
        )
        .await?;
        let again = row.token_hash.is_some();
        let events = store::insert_events(
            &txn,
            vec![NewEvent {
                actor: format!("agent:{}", row.name),
                kind: "node.enrolled".into(),
                subject: row.name.clone(),
                message: if again {
                    format!("{} enrolled again; its previous token is revoked", row.name)
                } else {
                    format!("{} enrolled", row.name)
                },
            }],
            Utc::now(),
        )
        .await?;
        txn.commit().await?;
        self.tokens.forget_node(row.id);
        for e in &events {
            self.events.publish(event_from_row(e));
        }
        Ok(EnrollResponse {
            node: row.name,
            token,
            address: row.address,
            role: parse_role(&row.role)?,
        })
    }

    pub async fn heartbeat(
        &self,
        name: &str,
        heartbeat: Heartbeat,
        caller: &Caller,
    ) -> Result<Node, ApiError> {
        caller.require_node(name)?;
        heartbeat
            .observed
            .validate()
            .map_err(ApiError::Unprocessable)?;
        let row = self.node_row(self.store.conn(), name).await?;
        let previous: Option<ObservedState> = row
            .observed
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok());
        let now = Utc::now();
        let json = serde_json::to_string(&heartbeat.observed)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        store::record_heartbeat(self.store.conn(), row.id, &json, now).await?;
        let mut events = Vec::new();
        let actor = format!("agent:{name}");
        if row.last_heartbeat.is_none() {
            events.push(NewEvent {
                actor: actor.clone(),
                kind: "node.online".into(),
                subject: name.into(),
                message: format!("first heartbeat from {name}"),
            });
        }
        let recovered = self
            .stale
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&row.id);
        if recovered {
            events.push(NewEvent {
                actor: actor.clone(),
                kind: "node.recovered".into(),
                subject: name.into(),
                message: format!("{name} is heard from again"),
            });
        }
        if let Some(change) = describe_change(previous.as_ref(), &heartbeat.observed) {
            events.push(NewEvent {
                actor: actor.clone(),
                kind: "node.observed".into(),
                subject: name.into(),
                message: change,
            });
        }
        let before = previous.as_ref().and_then(|p| p.replication.as_ref());
        for (kind, message) in db_events(name, before, heartbeat.observed.replication.as_ref()) {
            events.push(NewEvent {
                actor: actor.clone(),
                kind: kind.into(),
                subject: name.into(),
                message,
            });
        }
        if !events.is_empty() {
            self.record_events(events).await?;
        }
        let mut row = row;
        row.last_heartbeat = Some(now);
        row.observed = Some(json);
        self.node_from_row(&row, now)
    }

    // ---- events -----------------------------------------------------------

    pub async fn events(&self, after: Option<i64>, limit: u64) -> Result<Vec<Event>, ApiError> {
        let limit = limit.min(MAX_LIST_LIMIT);
        let rows = match after {
            Some(after) => store::events_after(self.store.conn(), after, limit).await?,
            None => store::latest_events(self.store.conn(), limit).await?,
        };
        Ok(rows.iter().map(event_from_row).collect())
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    // ---- conversions ------------------------------------------------------

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

    fn node_from_row(&self, row: &node::Model, now: DateTime<Utc>) -> Result<Node, ApiError> {
        let health = self.health(row.last_heartbeat, now);
        Ok(Node {
            name: row.name.clone(),
            role: parse_role(&row.role)?,
            address: row.address.clone(),
            provider: row.provider.parse().map_err(ApiError::Internal)?,
            state: parse_state(&row.state)?,
            health,
            last_seq: row.last_seq,
            last_heartbeat: row.last_heartbeat,
            observed: row
                .observed
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| ApiError::Internal(format!("observed state of {}: {e}", row.name)))?,
            created_at: row.created_at,
        })
    }
}

async fn save_spec<C: ConnectionTrait>(
    c: &C,
    spec: &TopologyUpdate,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    store::save_topology(
        c,
        spec.web,
        spec.db,
        spec.lb_policy.as_str(),
        spec.replication.as_str(),
        now,
    )
    .await?;
    Ok(())
}

fn parse_role(s: &str) -> Result<Role, ApiError> {
    s.parse().map_err(ApiError::Internal)
}

fn parse_state(s: &str) -> Result<NodeState, ApiError> {
    s.parse().map_err(ApiError::Internal)
}

fn node_view(row: &store::NodeBrief) -> Result<NodeView, ApiError> {
    let (role, index) = Role::parse_node_name(&row.name).ok_or_else(|| {
        ApiError::Internal(format!("stored node name {:?} is off-scheme", row.name))
    })?;
    let address: Ipv4Addr = row
        .address
        .parse()
        .map_err(|_| ApiError::Internal(format!("stored address {:?} is corrupt", row.address)))?;
    Ok(NodeView {
        name: row.name.clone(),
        role,
        index,
        address,
        state: parse_state(&row.state)?,
        observed: row
            .observed
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok()),
    })
}

fn update_from_row(row: &store::topology::Model) -> Result<TopologyUpdate, ApiError> {
    Ok(TopologyUpdate {
        web: u32::try_from(row.web).map_err(|e| ApiError::Internal(e.to_string()))?,
        db: u32::try_from(row.db).map_err(|e| ApiError::Internal(e.to_string()))?,
        lb_policy: row.lb_policy.parse().map_err(ApiError::Internal)?,
        replication: row.replication.parse().map_err(ApiError::Internal)?,
    })
}

fn topology_from_row(row: &store::topology::Model) -> Result<Topology, ApiError> {
    let spec = update_from_row(row)?;
    Ok(Topology {
        web: spec.web,
        db: spec.db,
        lb_policy: spec.lb_policy,
        replication: spec.replication,
        updated_at: row.updated_at,
    })
}

pub fn order_from_row(row: &work_order::Model, node: &str) -> Result<Order, ApiError> {
    Ok(Order {
        node: node.to_string(),
        seq: row.seq,
        payload: serde_json::from_str(&row.payload)
            .map_err(|e| ApiError::Internal(format!("stored order payload: {e}")))?,
        status: row.status.parse().map_err(ApiError::Internal)?,
        result: row.result.clone(),
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

pub fn event_from_row(row: &event::Model) -> Event {
    Event {
        id: row.id,
        at: row.at,
        actor: row.actor.clone(),
        kind: row.kind.clone(),
        subject: row.subject.clone(),
        message: row.message.clone(),
    }
}

/// A one-line account of what changed between two observations that an
/// operator would care about (service states, replication role), if any.
fn describe_change(before: Option<&ObservedState>, after: &ObservedState) -> Option<String> {
    let mut changes = Vec::new();
    let old: HashMap<&str, _> = before
        .map(|b| {
            b.services
                .iter()
                .map(|s| (s.name.as_str(), s.state))
                .collect()
        })
        .unwrap_or_default();
    for s in &after.services {
        match old.get(s.name.as_str()) {
            Some(state) if *state == s.state => {}
            Some(state) => changes.push(format!(
                "{}: {} -> {}",
                s.name,
                service_state(*state),
                service_state(s.state)
            )),
            None => changes.push(format!("{}: {}", s.name, service_state(s.state))),
        }
    }
    let old_role = before.and_then(|b| b.replication.as_ref()).map(|r| r.role);
    let new_role = after.replication.as_ref().map(|r| r.role);
    if old_role != new_role
        && let Some(role) = new_role
    {
        changes.push(format!("replication role: {}", replication_role(role)));
    }
    (!changes.is_empty()).then(|| changes.join("; "))
}

/// The events a change in a db node's replication report is worth: a
/// promotion or demotion, and a primary's commits ceasing or resuming to
/// wait for a standby. Only changes count: a node first heard from, or one
/// whose PostgreSQL was not reporting, says nothing new.
fn db_events(
    name: &str,
    before: Option<&ReplicationStatus>,
    after: Option<&ReplicationStatus>,
) -> Vec<(&'static str, String)> {
    use corral_proto::ReplicationRole::*;
    let (Some(before), Some(after)) = (before, after) else {
        return Vec::new();
    };
    let mut events = Vec::new();
    match (before.role, after.role) {
        (Replica | Fenced, Primary) => events.push((
            "db.promoted",
            match after.timeline {
                Some(tl) => format!("{name} is now primary (timeline {tl})"),
                None => format!("{name} is now primary"),
            },
        )),
        (Primary, Replica) => events.push((
            "db.demoted",
            format!(
                "{name} is no longer primary: it follows {} as a replica",
                after.leader.as_deref().unwrap_or("the new primary")
            ),
        )),
        (Primary, Fenced) => events.push((
            "db.demoted",
            format!("{name} is no longer primary: fenced, it refuses writes until it rejoins"),
        )),
        _ => {}
    }
    if after.degraded && !before.degraded {
        events.push((
            "db.sync_degraded",
            format!(
                "{name} commits no longer wait for a standby: none is connected (sync mode falls back to async)"
            ),
        ));
    } else if before.degraded && !after.degraded && after.role == Primary {
        events.push((
            "db.sync_restored",
            match after.sync_standby.as_deref() {
                Some(standby) => {
                    format!("{name} commits wait for a standby again ({standby} is synchronous)")
                }
                None => format!("{name} commits wait for a standby again"),
            },
        ));
    }
    events
}

fn service_state(s: corral_proto::ServiceState) -> &'static str {
    use corral_proto::ServiceState::*;
    match s {
        Starting => "starting",
        Running => "running",
        Stopped => "stopped",
        Failed => "failed",
    }
}

fn replication_role(r: corral_proto::ReplicationRole) -> &'static str {
    use corral_proto::ReplicationRole::*;
    match r {
        Primary => "primary",
        Replica => "replica",
        Fenced => "fenced",
    }
}

/// How long delivered marks gather before they are written: long enough that
/// a fan-out to thousands of agents finishes before the database write
/// competes with it for the CPU, short enough for people watching.
const DELIVERED_BATCH_WINDOW: Duration = Duration::from_millis(500);

/// Marks orders delivered in batches: a fan-out to 10,000 long polls would
/// otherwise cost 10,000 single-row writes on the delivery path.
async fn mark_delivered(store: Store, mut rx: mpsc::UnboundedReceiver<(i32, i64)>) {
    while let Some(first) = rx.recv().await {
        let mut upto: HashMap<i32, i64> = HashMap::from([first]);
        // Gather whatever else arrives meanwhile, bounded.
        tokio::time::sleep(DELIVERED_BATCH_WINDOW).await;
        while let Ok((id, seq)) = rx.try_recv() {
            let e = upto.entry(id).or_insert(seq);
            *e = (*e).max(seq);
            if upto.len() >= 50_000 {
                break;
            }
        }
        if let Err(e) = write_delivered(&store, &upto).await {
            tracing::warn!(error = %e, nodes = upto.len(), "marking orders delivered failed");
        }
    }
}

async fn write_delivered(store: &Store, upto: &HashMap<i32, i64>) -> Result<(), ApiError> {
    // After a fan-out most nodes were handed the same seq: one statement per
    // distinct seq (and chunk of nodes), not one per node.
    let mut by_seq: BTreeMap<i64, Vec<i32>> = BTreeMap::new();
    for (id, seq) in upto {
        by_seq.entry(*seq).or_default().push(*id);
    }
    let txn = store.begin().await?;
    let now = Utc::now();
    for (seq, ids) in by_seq {
        store::mark_delivered(&txn, &ids, seq, now).await?;
    }
    txn.commit().await?;
    Ok(())
}

/// Notes nodes whose heartbeats stopped, once each, in the audit log.
async fn watch_heartbeats(cluster: Weak<Cluster>) {
    let period = match cluster.upgrade() {
        Some(c) => (c.config.heartbeat_stale_after / 3).max(Duration::from_secs(1)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let stale_after = chrono::Duration::from_std(cluster.config.heartbeat_stale_after)
            .unwrap_or(chrono::Duration::seconds(15));
        let rows = match store::nodes_with_heartbeat_before(
            cluster.store.conn(),
            Utc::now() - stale_after,
        )
        .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "checking heartbeats failed");
                continue;
            }
        };
        let newly_stale: Vec<_> = {
            let mut stale = cluster.stale.lock().unwrap_or_else(PoisonError::into_inner);
            rows.into_iter().filter(|r| stale.insert(r.id)).collect()
        };
        let events = newly_stale
            .iter()
            .map(|r| NewEvent {
                actor: "reconciler".into(),
                kind: "node.stale".into(),
                subject: r.name.clone(),
                message: format!(
                    "no heartbeat from {} for over {}s",
                    r.name,
                    stale_after.num_seconds()
                ),
            })
            .collect::<Vec<_>>();
        if !events.is_empty()
            && let Err(e) = cluster.record_events(events).await
        {
            tracing::warn!(error = %e, "recording stale nodes failed");
        }
    }
}

/// The database row of an order being filed.
fn order_row(node_id: i32, seq: i64, order: &WorkOrder) -> Result<NewOrderRow, ApiError> {
    Ok(NewOrderRow {
        node_id,
        seq,
        kind: order.kind().as_str().into(),
        payload: serde_json::to_string(order).map_err(|e| ApiError::Internal(e.to_string()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::ReplicationRole;

    fn status(role: ReplicationRole) -> ReplicationStatus {
        ReplicationStatus::new(role)
    }

    fn kinds(events: Vec<(&'static str, String)>) -> Vec<&'static str> {
        events.into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn a_promotion_names_the_new_timeline_and_a_demotion_is_logged() {
        let promoted = ReplicationStatus {
            timeline: Some(3),
            ..status(ReplicationRole::Primary)
        };
        let events = db_events(
            "pg2",
            Some(&status(ReplicationRole::Replica)),
            Some(&promoted),
        );
        assert_eq!(
            events,
            vec![("db.promoted", "pg2 is now primary (timeline 3)".to_string())]
        );
        for after in [ReplicationRole::Replica, ReplicationRole::Fenced] {
            let events = db_events(
                "pg1",
                Some(&status(ReplicationRole::Primary)),
                Some(&status(after)),
            );
            assert_eq!(kinds(events), vec!["db.demoted"]);
        }
    }

    #[test]
    fn nothing_is_logged_without_a_previous_report_or_a_change() {
        let primary = status(ReplicationRole::Primary);
        assert!(db_events("pg1", None, Some(&primary)).is_empty());
        assert!(db_events("pg1", Some(&primary), None).is_empty());
        assert!(db_events("pg1", Some(&primary), Some(&primary)).is_empty());
    }

    #[test]
    fn the_sync_fallback_and_its_end_are_logged_once_each() {
        let ok = status(ReplicationRole::Primary);
        let degraded = ReplicationStatus {
            degraded: true,
            ..status(ReplicationRole::Primary)
        };
        let events = db_events("pg1", Some(&ok), Some(&degraded));
        assert_eq!(kinds(events.clone()), vec!["db.sync_degraded"]);
        assert!(events[0].1.contains("falls back to async"), "{events:?}");
        assert!(db_events("pg1", Some(&degraded), Some(&degraded)).is_empty());
        let restored = ReplicationStatus {
            sync_standby: Some("pg2".into()),
            ..ok
        };
        assert_eq!(
            kinds(db_events("pg1", Some(&degraded), Some(&restored))),
            vec!["db.sync_restored"]
        );
        // A degraded primary that is demoted is not "restored": the
        // demotion says what happened.
        assert_eq!(
            kinds(db_events(
                "pg1",
                Some(&degraded),
                Some(&status(ReplicationRole::Fenced))
            )),
            vec!["db.demoted"]
        );
    }
}
