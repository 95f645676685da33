//! Several servers on one PostgreSQL database. A commit that files orders,
//! writes audit events or changes nodes also sends `NOTIFY corral_wake` in
//! its transaction (so only once it has committed) saying what it did: node
//! ids with the seqs filed, event ids, nodes changed. Every server `LISTEN`s
//! on a session of its own and, told by another, reads those orders and
//! events back from the database and wakes its own long polls and event
//! streams with them. A server that may have missed notifications (its
//! listening session dropped) sends every parked poll to the database
//! instead, so an order is never skipped; polls answer by `after=seq`, so
//! none is handed out twice. SQLite has one server and none of this.

use std::collections::{BTreeMap, HashMap};
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use sea_orm::ConnectionTrait;
use sea_orm::sqlx::postgres::{PgListener, PgPool, PgPoolOptions};

use super::rows::order_from_row;
use super::{Cluster, ClusterError};
use crate::bus::OrderBatch;
use crate::store;

/// The channel every server listens on.
pub const CHANNEL: &str = "corral_wake";

/// Payloads stay well under PostgreSQL's 8000-byte limit.
const MAX_PAYLOAD: usize = 7000;

/// What a commit tells the other servers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Wake {
    /// Orders filed: node id, first and last seq of the node's batch.
    pub orders: Vec<(i32, i64, i64)>,
    /// Audit events written, by id.
    pub events: Vec<i64>,
    /// Nodes were created, removed or changed state: providers look again.
    pub nodes: bool,
    /// Nodes removed: their polls end and their tokens go.
    pub removed: Vec<i32>,
    /// Nodes whose agent token changed (enrolled again): the cached one goes.
    pub tokens: Vec<i32>,
    /// Log lines were appended: log followers look again.
    pub logs: bool,
}

impl Wake {
    pub fn is_empty(&self) -> bool {
        *self == Wake::default()
    }

    /// Adds what `other` says.
    pub fn merge(&mut self, other: Wake) {
        self.orders.extend(other.orders);
        self.events.extend(other.events);
        self.nodes |= other.nodes;
        self.removed.extend(other.removed);
        self.tokens.extend(other.tokens);
        self.logs |= other.logs;
    }

    /// The NOTIFY payloads: `<server> <kind> <item>,<item>...`, split to fit.
    pub fn encode(&self, server: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut section = |kind: char, items: Vec<String>| {
            let head = format!("{server} {kind} ");
            let mut payload = head.clone();
            for item in items {
                if payload.len() + item.len() + 1 > MAX_PAYLOAD && payload.len() > head.len() {
                    out.push(std::mem::replace(&mut payload, head.clone()));
                }
                if payload.len() > head.len() {
                    payload.push(',');
                }
                payload.push_str(&item);
            }
            if payload.len() > head.len() || kind == 'n' || kind == 'l' {
                out.push(payload);
            }
        };
        let list = |ids: &[i32]| ids.iter().map(i32::to_string).collect::<Vec<_>>();
        if !self.orders.is_empty() {
            section(
                'o',
                self.orders
                    .iter()
                    .map(|(id, first, last)| format!("{id}:{first}:{last}"))
                    .collect(),
            );
        }
        if !self.events.is_empty() {
            section('e', self.events.iter().map(i64::to_string).collect());
        }
        if !self.removed.is_empty() {
            section('r', list(&self.removed));
        }
        if !self.tokens.is_empty() {
            section('t', list(&self.tokens));
        }
        if self.nodes {
            section('n', Vec::new());
        }
        if self.logs {
            section('l', Vec::new());
        }
        out
    }

    /// One payload back: who sent it and what it says; none when it is not
    /// one of ours.
    pub fn decode(payload: &str) -> Option<(&str, Wake)> {
        let mut parts = payload.splitn(3, ' ');
        let server = parts.next()?;
        let kind = parts.next()?;
        let items = parts.next().unwrap_or("");
        let items = items.split(',').filter(|s| !s.is_empty());
        let mut wake = Wake::default();
        match kind {
            "o" => {
                for item in items {
                    let mut f = item.split(':');
                    let id = f.next()?.parse().ok()?;
                    let first = f.next()?.parse().ok()?;
                    let last = f.next()?.parse().ok()?;
                    wake.orders.push((id, first, last));
                }
            }
            "e" => wake.events = items.map(str::parse).collect::<Result<_, _>>().ok()?,
            "r" => wake.removed = items.map(str::parse).collect::<Result<_, _>>().ok()?,
            "t" => wake.tokens = items.map(str::parse).collect::<Result<_, _>>().ok()?,
            "n" => wake.nodes = true,
            "l" => wake.logs = true,
            _ => return None,
        }
        Some((server, wake))
    }
}

impl Cluster {
    /// Tells the other servers what this transaction (or a write just made
    /// on `c`) did; nothing on SQLite.
    pub(super) async fn notify_peers<C: ConnectionTrait>(
        &self,
        c: &C,
        wake: &Wake,
    ) -> Result<(), ClusterError> {
        if self.store.postgres().is_none() || wake.is_empty() {
            return Ok(());
        }
        store::notify(c, CHANNEL, &wake.encode(&self.server_id)).await?;
        Ok(())
    }

    /// Acts here on what another server committed: reads its orders and
    /// events back and wakes this server's polls and streams with them.
    async fn woken(&self, wake: Wake) -> Result<(), ClusterError> {
        for id in &wake.removed {
            self.tokens.forget_node(*id);
            self.orders.remove(*id);
        }
        for id in &wake.tokens {
            self.tokens.forget_node(*id);
        }
        if wake.nodes || !wake.removed.is_empty() {
            self.nodes_changed();
        }
        if wake.logs {
            self.logs_appended();
        }
        if !wake.orders.is_empty() {
            let clock = std::time::Instant::now();
            let watched = self
                .orders
                .watched(wake.orders.iter().map(|(id, _, _)| *id));
            // Most commits file the same seqs for many nodes: one read each.
            let mut by_range: BTreeMap<(i64, i64), Vec<i32>> = BTreeMap::new();
            for (id, first, last) in &wake.orders {
                if watched.contains_key(id) {
                    by_range.entry((*first, *last)).or_default().push(*id);
                }
            }
            let mut batches = Vec::new();
            for ((first, last), ids) in by_range {
                let rows = store::orders_between(self.store.conn(), &ids, first, last).await?;
                let mut per_node: HashMap<i32, Vec<_>> = HashMap::new();
                for row in &rows {
                    let Some(name) = watched.get(&row.node_id) else {
                        continue;
                    };
                    per_node
                        .entry(row.node_id)
                        .or_default()
                        .push(order_from_row(row, name)?);
                }
                for id in ids {
                    // Pruned or the node removed meanwhile: the polls look
                    // in the database themselves.
                    let orders = per_node.remove(&id).unwrap_or_default();
                    let complete = orders.len() as i64 == last - first + 1;
                    batches.push((
                        id,
                        if complete {
                            OrderBatch { orders }
                        } else {
                            OrderBatch::look_again()
                        },
                    ));
                }
            }
            let read = clock.elapsed();
            let nodes = batches.len();
            self.orders.publish_all(batches);
            if nodes > 0 {
                tracing::info!(
                    nodes,
                    read_ms = read.as_millis() as u64,
                    ms = clock.elapsed().as_millis() as u64,
                    "woke polls with orders another server filed"
                );
            }
        }
        if !wake.events.is_empty() {
            for row in store::events_by_id(self.store.conn(), &wake.events).await? {
                self.publish_event(&row);
            }
        }
        Ok(())
    }

    /// After a time this server may have missed notifications: every parked
    /// poll looks in the database, streams get the events written since the
    /// last one seen here, providers look at the nodes again.
    async fn catch_up(&self) -> Result<(), ClusterError> {
        self.orders.look_again_all();
        self.nodes_changed();
        self.logs_appended();
        self.tokens.forget_all();
        let mut after = self.last_event.load(Ordering::Relaxed);
        loop {
            let rows = store::events_after(self.store.conn(), after, 1000).await?;
            let Some(last) = rows.last() else { break };
            after = last.id;
            for row in &rows {
                self.publish_event(row);
            }
        }
        Ok(())
    }
}

/// How long a lost listening session waits before connecting again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Listens for other servers' commits until the cluster is dropped.
pub(super) async fn listen(cluster: Weak<Cluster>, pool: PgPool) {
    let Some(mut gone) = cluster.upgrade().map(|c| c.gone.subscribe()) else {
        return;
    };
    tokio::select! {
        () = listen_loop(cluster, pool) => {}
        _ = gone.changed() => {}
    }
}

async fn listen_loop(cluster: Weak<Cluster>, pool: PgPool) {
    let mut first = true;
    loop {
        if !first {
            tokio::time::sleep(RECONNECT_EVERY).await;
        }
        first = false;
        let mut listener = match listen_session(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to listen for other servers' commits");
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "LISTEN failed");
            continue;
        }
        // Listening again: what was committed meanwhile is read afresh.
        let Some(c) = cluster.upgrade() else { return };
        if let Err(e) = c.catch_up().await {
            tracing::warn!(error = %e, "catching up with other servers failed");
        }
        drop(c);
        // A stream keeps a receive in progress across the polls below, so
        // taking what has arrived without waiting loses nothing.
        let mut notes = Box::pin(futures_util::stream::unfold(listener, |mut l| async move {
            let next = l.try_recv().await;
            Some((next, l))
        }));
        loop {
            let Some(next) = notes.next().await else {
                break;
            };
            // A fan-out comes as many payloads at once: read them back as one.
            let mut arrived = vec![next];
            while arrived.len() < MAX_MERGED {
                match notes.next().now_or_never() {
                    Some(Some(next)) => arrived.push(next),
                    _ => break,
                }
            }
            let Some(c) = cluster.upgrade() else { return };
            let mut wake = Wake::default();
            let (mut reconnected, mut failed) = (false, None);
            for next in arrived {
                match next {
                    Ok(Some(note)) => match Wake::decode(note.payload()) {
                        Some((server, part)) if server != c.server_id => wake.merge(part),
                        Some(_) => {}
                        None => {
                            tracing::warn!(
                                payload = note.payload(),
                                "a notification not understood"
                            );
                        }
                    },
                    // The session dropped and was made again (PgListener
                    // listens again before saying so): catch up.
                    Ok(None) => reconnected = true,
                    Err(e) => failed = Some(e),
                }
            }
            if !wake.is_empty()
                && let Err(e) = c.woken(wake).await
            {
                tracing::warn!(error = %e, "reading another server's commit failed");
                // Whatever it was, the polls find it in the database.
                c.orders.look_again_all();
            }
            if reconnected {
                tracing::warn!("the listening session to PostgreSQL was lost and made again");
                if let Err(e) = c.catch_up().await {
                    tracing::warn!(error = %e, "catching up with other servers failed");
                }
            }
            if let Some(e) = failed {
                tracing::warn!(error = %e, "listening for other servers' commits failed");
                break;
            }
        }
    }
}

/// A listening session on the host the store's pool writes to (after a
/// failover, the new primary). Its pool of one connection is its own, as
/// `PgListener::connect` makes one, so that it reconnects to the same host
/// until it fails and the loop above makes a new one.
async fn listen_session(pool: &PgPool) -> Result<PgListener, sea_orm::sqlx::Error> {
    let options = (*pool.connect_options()).clone();
    let own = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(Duration::from_secs(1))
        .connect_with(options)
        .await?;
    let mut listener = PgListener::connect_with(&own).await?;
    listener.ignore_pool_close_event(true);
    Ok(listener)
}

/// The most notifications read back together.
const MAX_MERGED: usize = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_survives_its_payloads() {
        let wake = Wake {
            orders: vec![(1, 4, 5), (2, 1, 1)],
            events: vec![10, 11],
            nodes: true,
            removed: vec![3],
            tokens: vec![4],
            logs: true,
        };
        let mut back = Wake::default();
        for payload in wake.encode("s1") {
            let (server, part) = Wake::decode(&payload).expect("decodes");
            assert_eq!(server, "s1");
            back.merge(part);
        }
        assert_eq!(back, wake);
    }

    #[test]
    fn a_fan_out_is_split_into_payloads_that_fit() {
        let wake = Wake {
            orders: (0..10_000).map(|id| (id, 7, 8)).collect(),
            ..Wake::default()
        };
        let payloads = wake.encode("0123456789abcdef");
        assert!(payloads.len() > 1);
        assert!(payloads.iter().all(|p| p.len() <= MAX_PAYLOAD));
        let count: usize = payloads
            .iter()
            .map(|p| Wake::decode(p).expect("decodes").1.orders.len())
            .sum();
        assert_eq!(count, 10_000);
    }

    #[test]
    fn foreign_payloads_are_not_understood() {
        assert!(Wake::decode("hello").is_none());
        assert!(Wake::decode("s1 o 1:x:2").is_none());
        assert!(Wake::decode("s1 z 1").is_none());
    }
}
