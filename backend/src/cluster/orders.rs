//! Orders on their way to agents: long polls that wait for them, marking
//! them delivered, and the results agents report.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::Utc;
use corral_proto::{
    Order, OrderKind, OrderResult, OrderStatus, PollResponse, order::MAX_RESULT_LEN,
};
use tokio::sync::mpsc;

use super::ClusterError;
use super::rows::order_from_row;
use super::{Cluster, MAX_LIST_LIMIT, MAX_POLL_ORDERS};
use crate::auth::Caller;
use crate::store::{self, NewEvent, Store};

impl Cluster {
    /// Long polls waiting over all nodes right now.
    pub fn waiting_polls_total(&self) -> usize {
        self.orders.waiting_total()
    }

    /// How many long polls are waiting for `name`'s orders right now.
    pub async fn waiting_polls(&self, name: &str) -> Result<usize, ClusterError> {
        let row = self.node_row(self.store.conn(), name).await?;
        Ok(self.orders.waiting(row.id))
    }

    /// The orders of a node after `after`, oldest first.
    pub async fn orders(
        &self,
        name: &str,
        after: i64,
        limit: u64,
    ) -> Result<Vec<Order>, ClusterError> {
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
    ) -> Result<PollResponse, ClusterError> {
        caller.require_node(name)?;
        let turn = self.lookups.acquire().await;
        let row = self.node_row(self.store.conn(), name).await?;
        if after > row.last_seq {
            return Err(ClusterError::conflict(format!(
                "after={after} is beyond {name}'s last order ({}); the agent's state belongs to another life of this node: reset it and enroll again",
                row.last_seq
            )));
        }
        // Subscribe before looking, so an order filed in between still wakes us.
        let mut rx = self.orders.subscribe(row.id, name);
        let orders = store::orders_after(self.store.conn(), row.id, after, MAX_POLL_ORDERS).await?;
        drop(turn);
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
                        return Err(ClusterError::NotFound(format!("node {name} was removed")));
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Ok(PollResponse { orders: Vec::new(), last_seq: row.last_seq });
                }
            }
            let batch = rx.borrow_and_update().clone();
            let Some(batch) = batch else { continue };
            // A batch of orders this poll already has is not for it; an
            // empty one (another server may have filed) sends it to the
            // database, as does a batch that starts past `after`.
            if !batch.orders.is_empty() && batch.last_seq() <= after {
                continue;
            }
            let (mut orders, last_seq) = match batch.after(after) {
                Some(orders) => (orders, batch.last_seq()),
                None => {
                    let orders =
                        store::orders_after(self.store.conn(), row.id, after, MAX_POLL_ORDERS)
                            .await?
                            .iter()
                            .map(|o| order_from_row(o, name))
                            .collect::<Result<Vec<_>, _>>()?;
                    let last = orders.last().map_or(after, |o| o.seq);
                    (orders, last)
                }
            };
            if orders.is_empty() {
                continue;
            }
            orders.truncate(MAX_POLL_ORDERS as usize);
            return Ok(self.delivered(row.id, orders, last_seq));
        }
    }

    fn delivered(&self, node_id: i32, mut orders: Vec<Order>, last_seq: i64) -> PollResponse {
        if let Some(last) = orders.last() {
            let _ = self.delivered.send((node_id, last.seq));
        }
        self.counters.orders_delivered.add(orders.len() as u64);
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

    /// Records how an order went. An applied drain removes the node.
    #[tracing::instrument(skip(self, result, caller), fields(actor = %caller.actor()))]
    pub async fn order_result(
        &self,
        name: &str,
        seq: i64,
        result: OrderResult,
        caller: &Caller,
    ) -> Result<Order, ClusterError> {
        caller.require_node(name)?;
        let length = result.message.chars().count();
        if length > MAX_RESULT_LEN {
            return Err(ClusterError::Invalid(format!(
                "message is {length} characters; at most {MAX_RESULT_LEN} allowed"
            )));
        }
        let row = self.node_row(self.store.conn(), name).await?;
        let order = store::order(self.store.conn(), row.id, seq)
            .await?
            .ok_or_else(|| ClusterError::NotFound(format!("{name} has no order {seq}")))?;
        let status = OrderStatus::from(result.outcome);
        let current = OrderStatus::from(order.status);
        if current.is_finished() {
            if current == status {
                return order_from_row(&order, name);
            }
            return Err(ClusterError::conflict(format!(
                "order {seq} of {name} is already {current}"
            )));
        }
        let kind = OrderKind::from(order.kind);
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
            let txn = self.begin_change(&mut desired).await?;
            store::finish_order(&txn, order.id, status.into(), &result.message, now).await?;
            let mut finished = order.clone();
            finished.status = status.into();
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
            status.into(),
            &result.message,
            now,
        )
        .await?;
        self.record_events(vec![finished_event]).await?;
        if kind == OrderKind::Backup && status == OrderStatus::Failed {
            self.backup_order_failed(&order.payload, &result.message)
                .await;
        }
        let updated = store::order(self.store.conn(), row.id, seq)
            .await?
            .ok_or_else(|| ClusterError::NotFound(format!("{name} has no order {seq}")))?;
        order_from_row(&updated, name)
    }
}

/// How long delivered marks gather before they are written: long enough that
/// a fan-out to thousands of agents finishes before the database write
/// competes with it for the CPU, short enough for people watching.
const DELIVERED_BATCH_WINDOW: Duration = Duration::from_millis(500);

/// Marks orders delivered in batches: a fan-out to 10,000 long polls would
/// otherwise cost 10,000 single-row writes on the delivery path.
pub(super) async fn mark_delivered(store: Store, mut rx: mpsc::UnboundedReceiver<(i32, i64)>) {
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

async fn write_delivered(store: &Store, upto: &HashMap<i32, i64>) -> Result<(), ClusterError> {
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
