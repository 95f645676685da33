//! In-process notifications: a long poll waits on its node's channel and is
//! woken the moment an order for that node is committed, carrying the new
//! orders with it so most wake-ups answer without touching the database.
//! Events go out on a broadcast channel to every server-sent-events stream.
//! These channels are this server's; commits on other servers sharing the
//! database reach them through `cluster::peers` (PostgreSQL `LISTEN`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use corral_proto::{Event, Order};
use tokio::sync::{broadcast, watch};

/// Orders just filed for one node, in `seq` order without gaps. An empty
/// batch says "orders may have been filed: look in the database" (what a
/// server publishes after it may have missed another server's word).
#[derive(Debug)]
pub struct OrderBatch {
    pub orders: Vec<Order>,
}

impl OrderBatch {
    /// A batch that sends its polls to the database.
    pub fn look_again() -> Self {
        Self { orders: Vec::new() }
    }

    pub fn first_seq(&self) -> i64 {
        self.orders.first().map_or(0, |o| o.seq)
    }

    pub fn last_seq(&self) -> i64 {
        self.orders.last().map_or(0, |o| o.seq)
    }

    /// The orders after `after`, if this batch holds every one of them.
    pub fn after(&self, after: i64) -> Option<Vec<Order>> {
        if self.orders.is_empty() || self.first_seq() > after + 1 {
            return None;
        }
        Some(
            self.orders
                .iter()
                .filter(|o| o.seq > after)
                .cloned()
                .collect(),
        )
    }
}

struct Slot {
    tx: watch::Sender<Option<Arc<OrderBatch>>>,
    /// The node's name, to build the orders another server filed.
    name: String,
    /// Polls of this node parked on the channel (past their database look).
    /// Atomic, so a woken poll leaving does not take the map's lock while a
    /// fan-out holds it.
    parked: Arc<AtomicUsize>,
}

/// One watch channel per node id, created on first use.
#[derive(Default)]
pub struct OrderBus {
    nodes: Mutex<HashMap<i32, Slot>>,
    parked: AtomicUsize,
}

/// Counts a poll as parked until dropped.
pub struct Parked<'a> {
    total: &'a AtomicUsize,
    node: Option<Arc<AtomicUsize>>,
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        if let Some(node) = &self.node {
            node.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl OrderBus {
    /// A receiver that sees every batch published after this call.
    pub fn subscribe(&self, node_id: i32, name: &str) -> watch::Receiver<Option<Arc<OrderBatch>>> {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes
            .entry(node_id)
            .or_insert_with(|| Slot {
                tx: watch::channel(None).0,
                name: name.to_string(),
                parked: Arc::default(),
            })
            .tx
            .subscribe()
    }

    /// Marks a poll as waiting for the next batch.
    pub fn park(&self, node_id: i32) -> Parked<'_> {
        self.parked.fetch_add(1, Ordering::Relaxed);
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let node = nodes.get(&node_id).map(|slot| slot.parked.clone());
        if let Some(node) = &node {
            node.fetch_add(1, Ordering::Relaxed);
        }
        Parked {
            total: &self.parked,
            node,
        }
    }

    /// Wakes every long poll of each node with its new batch, under one lock
    /// (a fan-out after a topology change touches every node). Called after
    /// the commit.
    pub fn publish_all(&self, batches: Vec<(i32, OrderBatch)>) {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        for (node_id, batch) in batches {
            if let Some(slot) = nodes.get(&node_id) {
                slot.tx.send_replace(Some(Arc::new(batch)));
            }
        }
    }

    /// The nodes among `ids` that someone here waits on, with their names:
    /// the only ones worth reading another server's orders for.
    pub fn watched(&self, ids: impl IntoIterator<Item = i32>) -> HashMap<i32, String> {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        ids.into_iter()
            .filter_map(|id| {
                let slot = nodes.get(&id)?;
                (slot.tx.receiver_count() > 0).then(|| (id, slot.name.clone()))
            })
            .collect()
    }

    /// Tells every poll waiting here to look in the database.
    pub fn look_again_all(&self) {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        for slot in nodes.values() {
            if slot.tx.receiver_count() > 0 {
                slot.tx
                    .send_replace(Some(Arc::new(OrderBatch::look_again())));
            }
        }
    }

    /// How many long polls are parked on the node right now.
    pub fn waiting(&self, node_id: i32) -> usize {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes
            .get(&node_id)
            .map_or(0, |slot| slot.parked.load(Ordering::Relaxed))
    }

    /// Long polls parked over all nodes.
    pub fn waiting_total(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    /// Forgets a removed node; its waiting polls see the channel close.
    pub fn remove(&self, node_id: i32) {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes.remove(&node_id);
    }
}

/// Fan-out of committed audit events to live streams.
pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(4096).0,
        }
    }
}

impl EventBus {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    pub fn publish(&self, event: Event) {
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(Arc::new(event));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use corral_proto::WorkOrder;

    fn order(seq: i64) -> Order {
        Order::pending("nginx1".into(), seq, WorkOrder::Drain, Utc::now())
    }

    #[test]
    fn batch_answers_only_when_it_covers_everything_after() {
        let batch = OrderBatch {
            orders: vec![order(4), order(5)],
        };
        assert_eq!(batch.after(3).map(|o| o.len()), Some(2));
        assert_eq!(batch.after(4).map(|o| o.len()), Some(1));
        assert_eq!(batch.after(5).map(|o| o.len()), Some(0));
        // Order 3 is not in the batch: the caller must ask the database.
        assert!(batch.after(2).is_none());
    }

    #[tokio::test]
    async fn subscribers_are_woken_by_a_publish() {
        let bus = OrderBus::default();
        let mut rx = bus.subscribe(7, "nginx1");
        bus.publish_all(vec![(
            7,
            OrderBatch {
                orders: vec![order(1)],
            },
        )]);
        rx.changed().await.expect("changed");
        assert_eq!(rx.borrow().as_ref().map(|b| b.last_seq()), Some(1));
    }

    #[tokio::test]
    async fn removing_a_node_closes_its_channel() {
        let bus = OrderBus::default();
        let mut rx = bus.subscribe(7, "nginx1");
        bus.remove(7);
        assert!(rx.changed().await.is_err());
    }
}
