//! The one way desired state changes: plan against the state inside the
//! change's transaction, write the plan there (new nodes, drains, orders with
//! their per-node `seq`, audit events), commit, then wake long polls and
//! event streams.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use corral_proto::{Order, OrderKind, Provider, Role, TopologyUpdate, WorkOrder};
use sea_orm::DatabaseTransaction;

use super::ClusterError;
use super::peers::Wake;
use super::rows::{node_view, order_row};
use super::{Cluster, Desired};
use crate::bus::OrderBatch;
use crate::reconcile::{self, PlanError};
use crate::store::{self, NewEvent, NewNodeRow, event, node};

/// How long the phases of a change took, for the log and the standard
/// `Server-Timing` response header (shown by browsers' developer tools).
#[derive(Debug, Default, Clone)]
pub struct Timings(Vec<(&'static str, Duration)>);

impl Timings {
    pub(super) fn record(&mut self, phase: &'static str, took: Duration) {
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

    /// Adds the phases of `later` after these.
    pub(super) fn append(&mut self, later: Timings) {
        self.0.extend(later.0);
    }

    fn total(&self) -> Duration {
        self.0.iter().map(|(_, d)| *d).sum()
    }
}

/// What a committed change has to announce.
#[derive(Default)]
pub(super) struct Outcome {
    pub(super) created: Vec<String>,
    /// Nodes put into `draining`.
    pub(super) draining: Vec<String>,
    /// Nodes deleted: id and name.
    pub(super) removed: Vec<(i32, String)>,
    /// Orders filed, per node name, for the cache of last orders.
    pub(super) filed: Vec<(String, WorkOrder)>,
    pub(super) orders_filed: u64,
    pub(super) batches: Vec<(i32, OrderBatch)>,
    pub(super) events: Vec<event::Model>,
    /// Nodes the plan looked at, for the log.
    pub(super) nodes_seen: usize,
    pub(super) timings: Timings,
}

/// What a plan that cannot be made means to the caller.
pub(super) fn plan_refused(e: PlanError) -> ClusterError {
    match e {
        PlanError::AddressPoolExhausted { .. } => ClusterError::Conflict {
            code: "address_pool_exhausted",
            message: format!("{e}; widen that network or remove nodes"),
        },
    }
}

impl Cluster {
    /// Plans against the state inside `txn` and writes the plan there: new
    /// nodes, drains, orders (with their per-node `seq`) and audit events.
    pub(super) async fn apply_plan(
        &self,
        txn: &DatabaseTransaction,
        desired: &mut Desired,
        spec: &TopologyUpdate,
        provider: Provider,
        actor: &str,
        mut events: Vec<NewEvent>,
    ) -> Result<Outcome, ClusterError> {
        let now = Utc::now();
        let clock = std::time::Instant::now();
        let rows = store::reconcile_nodes(txn).await?;
        let views = rows.iter().map(node_view).collect::<Result<Vec<_>, _>>()?;
        if !desired.loaded {
            let names: HashMap<i32, &str> = rows.iter().map(|r| (r.id, r.name.as_str())).collect();
            desired.last.clear();
            for (node_id, kind, payload) in store::latest_orders(txn).await? {
                let Some(name) = names.get(&node_id) else {
                    continue;
                };
                let kind = OrderKind::from(kind);
                let order: WorkOrder = serde_json::from_str(&payload).map_err(|e| {
                    ClusterError::Internal(format!("stored order of {name} is corrupt: {e}"))
                })?;
                desired.last.insert((name.to_string(), kind), order);
            }
            desired.loaded = true;
        }
        let last = &desired.last;
        let loaded = clock.elapsed();
        let plan = reconcile::plan(spec, &views, last, &self.config.settings, provider)
            .map_err(plan_refused)?;
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
                    role: n.role.into(),
                    address: n.address.to_string(),
                    provider: n.provider.into(),
                    state: node::State::Provisioning,
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
                    Role::from(row.role),
                    row.name,
                    row.address,
                    Provider::from(row.provider)
                ),
            });
            outcome.created.push(row.name.clone());
        }
        let never_enrolled: HashSet<&str> = rows
            .iter()
            .filter(|r| r.state == node::State::Provisioning)
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
            store::set_node_state(txn, id, node::State::Draining, now).await?;
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
    pub(super) async fn commit(
        &self,
        txn: DatabaseTransaction,
        mut outcome: Outcome,
        desired: &mut Desired,
    ) -> Result<Timings, ClusterError> {
        let clock = std::time::Instant::now();
        let wake = Wake {
            orders: outcome
                .batches
                .iter()
                .map(|(id, b)| (*id, b.first_seq(), b.last_seq()))
                .collect(),
            events: outcome.events.iter().map(|e| e.id).collect(),
            nodes: !outcome.created.is_empty()
                || !outcome.draining.is_empty()
                || !outcome.removed.is_empty(),
            removed: outcome.removed.iter().map(|(id, _)| *id).collect(),
            tokens: Vec::new(),
            logs: false,
        };
        if let Err(e) = self.notify_peers(&txn, &wake).await {
            desired.loaded = false;
            return Err(e);
        }
        // As this change leaves orders and nodes, for the next one to tell
        // whether another server changed them meanwhile.
        let leaves = if self.store.postgres().is_some() {
            match store::orders_generation(&txn).await {
                Ok(generation) => Some(generation),
                Err(e) => {
                    desired.loaded = false;
                    return Err(e.into());
                }
            }
        } else {
            None
        };
        if let Err(e) = txn.commit().await {
            // Whether it committed is unknown: reload the cache next time.
            desired.loaded = false;
            return Err(e.into());
        }
        let committed = clock.elapsed();
        self.counters.orders_filed.add(outcome.orders_filed);
        desired.seen = leaves;
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
        if created > 0 || draining > 0 || !outcome.removed.is_empty() {
            self.nodes_changed();
        }
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
            self.publish_event(e);
        }
    }
}
