//! What the PostgreSQL HA loop needs from its distributed configuration
//! store (Patroni's `AbstractDCS`): one snapshot of the cluster per tick,
//! its own member record, the leader lock and the switchover record.
//! [`ConsulDcs`] is the real one; [`MemoryDcs`] keeps everything in memory
//! on an injectable clock, with Consul's session semantics (sessions bound
//! to checks, lock-delay after a session ends), for tests of the decisions.

use async_trait::async_trait;

use super::ha::{ClusterView, Keys, LeaderKey, Member, Switchover};
use super::leader::{LeaderLock, LockState};
use crate::consul_api::{ConsulApi, ConsulError};

#[derive(Debug, thiserror::Error)]
pub enum DcsError {
    #[error(transparent)]
    Consul(#[from] ConsulError),
    #[error("the DCS is unreachable from {0}")]
    Unreachable(String),
}

/// One node's handle on the cluster's DCS. Every call names the cluster by
/// its [`Keys`] (from the Postgres order).
#[async_trait]
pub trait Dcs: Send + Sync {
    /// The leader key, every member record and the switchover record, read
    /// at once.
    async fn snapshot(&self, keys: &Keys) -> Result<ClusterView, DcsError>;
    /// Writes this node's member record.
    async fn publish(&self, keys: &Keys, me: &Member) -> Result<(), DcsError>;
    /// Deletes a member record (a node that left).
    async fn forget(&self, keys: &Keys, node: &str) -> Result<(), DcsError>;
    /// This node's leader session, as last created.
    fn session(&self) -> Option<String>;
    /// Takes the lock when it is free, with a session of this node (made
    /// first when ours ended).
    async fn take_lock(&self, keys: &Keys) -> Result<LockState, DcsError>;
    /// Whether this node's session holds the lock, and whether the node's
    /// own agent answered (false: a server did, the local agent being
    /// away).
    async fn confirm_lock(&self, keys: &Keys) -> Result<(bool, bool), DcsError>;
    /// Releases the lock, with no lock-delay for the next holder (a planned
    /// hand-over, or a primary that died).
    async fn let_go(&self, keys: &Keys) -> Result<(), DcsError>;
    /// Ends this node's session (whatever it holds is released); the next
    /// lock is taken with a new one.
    async fn end_session(&self);
    /// Ends a session this node no longer knows (from an earlier life).
    async fn end_stale_session(&self, id: &str) -> Result<(), DcsError>;
    async fn write_switchover(&self, keys: &Keys, record: &Switchover) -> Result<(), DcsError>;
    async fn clear_switchover(&self, keys: &Keys) -> Result<(), DcsError>;
}

/// Parses a member record; one that is not ours (an address that is no IP,
/// a field missing) never reaches a connection string.
fn member(key: &str, value: &str) -> Option<Member> {
    match serde_json::from_str::<Member>(value) {
        Ok(m) => Some(m),
        Err(error) => {
            tracing::warn!(key, %error, "ignoring a malformed member record");
            None
        }
    }
}

/// The DCS in Consul KV, through the node's Consul agent.
pub struct ConsulDcs {
    consul: ConsulApi,
    lock: LeaderLock,
}

impl ConsulDcs {
    pub fn new(consul: ConsulApi, lock: LeaderLock) -> Self {
        Self { consul, lock }
    }
}

#[async_trait]
impl Dcs for ConsulDcs {
    async fn snapshot(&self, keys: &Keys) -> Result<ClusterView, DcsError> {
        // One recursive read of the cluster's prefix: one consistent index.
        let mut entries = self.consul.kv_list(&keys.prefix).await?;
        if !keys.leader.starts_with(&keys.prefix)
            && let Some(e) = self.consul.kv_get(&keys.leader).await?
        {
            entries.push(e);
        }
        let mut view = ClusterView {
            now_ms: super::ha::now_ms(),
            ..ClusterView::default()
        };
        for e in entries {
            if e.key == keys.leader {
                view.leader = Some(LeaderKey {
                    node: e.value,
                    session: e.session,
                });
            } else if e.key == keys.switchover {
                view.switchover = serde_json::from_str(&e.value).ok();
            } else if e.key.starts_with(&keys.members)
                && let Some(m) = member(&e.key, &e.value)
            {
                view.members.push(m);
            }
        }
        Ok(view)
    }

    async fn publish(&self, keys: &Keys, me: &Member) -> Result<(), DcsError> {
        let record = serde_json::to_string(me).expect("a member serializes");
        Ok(self.consul.kv_put(&keys.member(&me.node), &record).await?)
    }

    async fn forget(&self, keys: &Keys, node: &str) -> Result<(), DcsError> {
        Ok(self.consul.kv_delete(&keys.member(node)).await?)
    }

    fn session(&self) -> Option<String> {
        self.lock.session()
    }

    async fn take_lock(&self, keys: &Keys) -> Result<LockState, DcsError> {
        Ok(self.lock.take(&keys.leader).await?)
    }

    async fn confirm_lock(&self, keys: &Keys) -> Result<(bool, bool), DcsError> {
        let Some(mine) = self.lock.session() else {
            return Ok((false, true));
        };
        let (entry, local) = self.consul.kv_get_any(&keys.leader).await?;
        Ok((
            entry.is_some_and(|e| e.session.as_deref() == Some(mine.as_str())),
            local,
        ))
    }

    async fn let_go(&self, keys: &Keys) -> Result<(), DcsError> {
        Ok(self.lock.let_go(&keys.leader).await?)
    }

    async fn end_session(&self) {
        self.lock.release().await
    }

    async fn end_stale_session(&self, id: &str) -> Result<(), DcsError> {
        Ok(self.consul.destroy_session(id).await?)
    }

    async fn write_switchover(&self, keys: &Keys, record: &Switchover) -> Result<(), DcsError> {
        let json = serde_json::to_string(record).expect("json");
        Ok(self.consul.kv_put(&keys.switchover, &json).await?)
    }

    async fn clear_switchover(&self, keys: &Keys) -> Result<(), DcsError> {
        Ok(self.consul.kv_delete(&keys.switchover).await?)
    }
}

#[cfg(test)]
pub use memory::{Clock, MemoryDcs, MemoryStore, SESSION_CHECKS};

/// The in-memory DCS, for tests only (it stays out of the agent's binary).
#[cfg(test)]
mod memory {
    use std::collections::{BTreeMap, HashMap, HashSet};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use async_trait::async_trait;

    use super::{Dcs, DcsError, member};
    use crate::drivers::ha::{ClusterView, Keys, LOCK_DELAY, LeaderKey, Member, Switchover};
    use crate::drivers::leader::LockState;

    /// The checks a leader session is bound to, as in Consul: the node's
    /// gossip health and its PostgreSQL answering.
    pub const SESSION_CHECKS: [&str; 2] = ["serfHealth", crate::drivers::leader::ALIVE_CHECK];

    /// A clock in Unix milliseconds.
    pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

    struct Session {
        node: String,
    }

    #[derive(Default)]
    struct Store {
        /// key -> (value, locking session)
        kv: BTreeMap<String, (String, Option<String>)>,
        sessions: HashMap<String, Session>,
        /// key -> no acquire before (ms)
        lock_delay: HashMap<String, u64>,
        /// (node, check) -> last passed (ms)
        checks: HashMap<(String, String), u64>,
        next_session: u64,
        /// Nodes that cannot reach the DCS at all.
        cut_off: HashSet<String>,
        /// Nodes whose own agent is away (a server still answers
        /// [`Dcs::confirm_lock`]).
        local_down: HashSet<String>,
    }

    /// A DCS in memory shared by simulated nodes: KV with locks, sessions bound
    /// to checks that expire after a TTL unless renewed ([`MemoryStore::pass`],
    /// as Consul's failure detection), lock-delay, all on `clock`.
    pub struct MemoryStore {
        clock: Clock,
        /// How long a check stays passing without a new pass.
        check_ttl: HashMap<String, u64>,
        state: Mutex<Store>,
    }

    impl MemoryStore {
        /// `check_ttl`: how long each of [`SESSION_CHECKS`] stays passing after
        /// its last [`MemoryStore::pass`].
        pub fn new(clock: Clock, check_ttl: &[(&str, Duration)]) -> Arc<Self> {
            Arc::new(Self {
                clock,
                check_ttl: check_ttl
                    .iter()
                    .map(|(c, d)| (c.to_string(), d.as_millis() as u64))
                    .collect(),
                state: Mutex::new(Store::default()),
            })
        }

        pub fn now(&self) -> u64 {
            (self.clock)()
        }

        /// `node`'s `check` passes now.
        pub fn pass(&self, node: &str, check: &str) {
            let now = self.now();
            let mut s = self.state.lock().expect("store");
            s.checks.insert((node.into(), check.into()), now);
        }

        /// Whether `node` (or its own agent) can reach the DCS.
        pub fn set_cut_off(&self, node: &str, cut_off: bool) {
            let mut s = self.state.lock().expect("store");
            if cut_off {
                s.cut_off.insert(node.into());
            } else {
                s.cut_off.remove(node);
            }
        }

        pub fn set_local_down(&self, node: &str, down: bool) {
            let mut s = self.state.lock().expect("store");
            if down {
                s.local_down.insert(node.into());
            } else {
                s.local_down.remove(node);
            }
        }

        /// A handle for `node`.
        pub fn node(self: &Arc<Self>, node: &str) -> MemoryDcs {
            MemoryDcs {
                store: self.clone(),
                node: node.into(),
                session: Mutex::new(None),
            }
        }

        /// Ends every session whose node's checks are no longer passing, as
        /// Consul does when it declares a check critical.
        pub fn expire(&self) {
            let now = self.now();
            let mut s = self.state.lock().expect("store");
            let dead: Vec<String> = s
                .sessions
                .iter()
                .filter(|(_, sess)| !self.passing(&s, &sess.node, now))
                .map(|(id, _)| id.clone())
                .collect();
            for id in dead {
                Self::invalidate(&mut s, &id, now);
            }
        }

        /// The node holding the lock on `key`, if any.
        pub fn holder(&self, key: &str) -> Option<String> {
            let s = self.state.lock().expect("store");
            let (_, session) = s.kv.get(key)?;
            session
                .as_ref()
                .and_then(|id| s.sessions.get(id))
                .map(|sess| sess.node.clone())
        }

        fn passing(&self, s: &Store, node: &str, now: u64) -> bool {
            SESSION_CHECKS.iter().all(|c| {
                let ttl = self.check_ttl.get(*c).copied().unwrap_or(u64::MAX);
                s.checks
                    .get(&(node.to_string(), c.to_string()))
                    .is_some_and(|at| now.saturating_sub(*at) <= ttl)
            })
        }

        /// A session ends (not a release): what it locked is free, but nobody
        /// may take it for the lock-delay.
        fn invalidate(s: &mut Store, id: &str, now: u64) {
            s.sessions.remove(id);
            let mut delayed = Vec::new();
            for (key, (_, session)) in s.kv.iter_mut() {
                if session.as_deref() == Some(id) {
                    *session = None;
                    delayed.push(key.clone());
                }
            }
            for key in delayed {
                s.lock_delay
                    .insert(key, now + LOCK_DELAY.as_millis() as u64);
            }
        }
    }

    /// One node's handle on a [`MemoryStore`].
    pub struct MemoryDcs {
        store: Arc<MemoryStore>,
        node: String,
        session: Mutex<Option<String>>,
    }

    impl MemoryDcs {
        fn reach(&self, via_server: bool) -> Result<std::sync::MutexGuard<'_, Store>, DcsError> {
            self.store.expire();
            let s = self.store.state.lock().expect("store");
            if s.cut_off.contains(&self.node) || (!via_server && s.local_down.contains(&self.node))
            {
                return Err(DcsError::Unreachable(self.node.clone()));
            }
            Ok(s)
        }

        /// Forgets the session id, as an agent whose file is lost.
        pub fn forget_session(&self) {
            *self.session.lock().expect("session") = None;
        }
    }

    #[async_trait]
    impl Dcs for MemoryDcs {
        async fn snapshot(&self, keys: &Keys) -> Result<ClusterView, DcsError> {
            let s = self.reach(false)?;
            let mut view = ClusterView {
                now_ms: self.store.now(),
                ..ClusterView::default()
            };
            if let Some((node, session)) = s.kv.get(&keys.leader) {
                view.leader = Some(LeaderKey {
                    node: node.clone(),
                    session: session.clone(),
                });
            }
            view.switchover =
                s.kv.get(&keys.switchover)
                    .and_then(|(v, _)| serde_json::from_str(v).ok());
            view.members =
                s.kv.range(keys.members.clone()..)
                    .take_while(|(k, _)| k.starts_with(&keys.members))
                    .filter_map(|(k, (v, _))| member(k, v))
                    .collect();
            Ok(view)
        }

        async fn publish(&self, keys: &Keys, me: &Member) -> Result<(), DcsError> {
            let mut s = self.reach(false)?;
            let record = serde_json::to_string(me).expect("a member serializes");
            s.kv.insert(keys.member(&me.node), (record, None));
            Ok(())
        }

        async fn forget(&self, keys: &Keys, node: &str) -> Result<(), DcsError> {
            self.reach(false)?.kv.remove(&keys.member(node));
            Ok(())
        }

        fn session(&self) -> Option<String> {
            self.session.lock().expect("session").clone()
        }

        async fn take_lock(&self, keys: &Keys) -> Result<LockState, DcsError> {
            let mut s = self.reach(false)?;
            let now = self.store.now();
            let mine = self.session().filter(|id| s.sessions.contains_key(id));
            let id = match mine {
                Some(id) => id,
                None => {
                    if !self.store.passing(&s, &self.node, now) {
                        return Ok(LockState::Pending("a session check is not passing".into()));
                    }
                    s.next_session += 1;
                    let id = format!("{}-{}", self.node, s.next_session);
                    s.sessions.insert(
                        id.clone(),
                        Session {
                            node: self.node.clone(),
                        },
                    );
                    *self.session.lock().expect("session") = Some(id.clone());
                    id
                }
            };
            match s.kv.get(&keys.leader) {
                Some((_, Some(holder))) if *holder == id => Ok(LockState::Held),
                Some((_, Some(holder))) => Ok(LockState::HeldElsewhere(holder.clone())),
                _ if s.lock_delay.get(&keys.leader).is_some_and(|t| now < *t) => {
                    Ok(LockState::Pending("lock-delay".into()))
                }
                _ => {
                    s.kv.insert(keys.leader.clone(), (self.node.clone(), Some(id)));
                    Ok(LockState::Held)
                }
            }
        }

        async fn confirm_lock(&self, keys: &Keys) -> Result<(bool, bool), DcsError> {
            let local = {
                let s = self.reach(true)?;
                !s.local_down.contains(&self.node)
            };
            let s = self.store.state.lock().expect("store");
            let mine = self.session();
            let held = mine.is_some()
                && s.kv
                    .get(&keys.leader)
                    .is_some_and(|(_, session)| *session == mine);
            Ok((held, local))
        }

        async fn let_go(&self, keys: &Keys) -> Result<(), DcsError> {
            let mut s = self.reach(false)?;
            let mine = self.session();
            if let Some((_, session)) = s.kv.get_mut(&keys.leader)
                && mine.is_some()
                && *session == mine
            {
                *session = None;
            }
            Ok(())
        }

        async fn end_session(&self) {
            let Some(id) = self.session.lock().expect("session").take() else {
                return;
            };
            if let Ok(mut s) = self.reach(false) {
                let now = self.store.now();
                MemoryStore::invalidate(&mut s, &id, now);
            }
        }

        async fn end_stale_session(&self, id: &str) -> Result<(), DcsError> {
            let mut s = self.reach(false)?;
            let now = self.store.now();
            MemoryStore::invalidate(&mut s, id, now);
            Ok(())
        }

        async fn write_switchover(&self, keys: &Keys, record: &Switchover) -> Result<(), DcsError> {
            let mut s = self.reach(false)?;
            let json = serde_json::to_string(record).expect("json");
            s.kv.insert(keys.switchover.clone(), (json, None));
            Ok(())
        }

        async fn clear_switchover(&self, keys: &Keys) -> Result<(), DcsError> {
            self.reach(false)?.kv.remove(&keys.switchover);
            Ok(())
        }
    }
}

/// Runs a future of the in-memory DCS, which never waits.
#[cfg(test)]
pub(crate) fn now<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("the in-memory DCS never waits"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::drivers::ha::MemberRole;

    fn store() -> (Arc<AtomicU64>, Arc<MemoryStore>) {
        let t = Arc::new(AtomicU64::new(1_000_000));
        let clock = t.clone();
        let store = MemoryStore::new(
            Arc::new(move || clock.load(Ordering::SeqCst)),
            &[
                ("serfHealth", Duration::from_millis(4500)),
                ("postgres-alive", Duration::from_millis(1000)),
            ],
        );
        (t, store)
    }

    fn pass(store: &MemoryStore, node: &str) {
        for c in SESSION_CHECKS {
            store.pass(node, c);
        }
    }

    #[test]
    fn a_session_that_ends_blocks_the_lock_for_the_lock_delay_and_a_release_does_not() {
        let (t, store) = store();
        let keys = Keys::new("service/postgres/leader");
        let (pg1, pg2) = (store.node("pg1"), store.node("pg2"));
        pass(&store, "pg1");
        pass(&store, "pg2");
        assert_eq!(now(pg1.take_lock(&keys)).unwrap(), LockState::Held);
        assert!(matches!(
            now(pg2.take_lock(&keys)).unwrap(),
            LockState::HeldElsewhere(_)
        ));
        assert_eq!(now(pg1.confirm_lock(&keys)).unwrap(), (true, true));
        // pg1's postgres stops answering: its check expires, the session ends.
        t.fetch_add(1500, Ordering::SeqCst);
        pass(&store, "pg2");
        store.pass("pg1", "serfHealth");
        assert!(matches!(
            now(pg2.take_lock(&keys)).unwrap(),
            LockState::Pending(_)
        ));
        let view = now(pg2.snapshot(&keys)).unwrap();
        assert_eq!(view.holder(), None);
        assert_eq!(view.last_leader(), Some("pg1"));
        assert_eq!(now(pg1.confirm_lock(&keys)).unwrap(), (false, true));
        t.fetch_add(1000, Ordering::SeqCst);
        pass(&store, "pg2");
        assert_eq!(now(pg2.take_lock(&keys)).unwrap(), LockState::Held);
        // A release hands over at once.
        now(pg2.let_go(&keys)).unwrap();
        pass(&store, "pg1");
        assert_eq!(now(pg1.take_lock(&keys)).unwrap(), LockState::Held);
        assert_eq!(store.holder(&keys.leader).as_deref(), Some("pg1"));
    }

    #[test]
    fn a_cut_off_node_reads_nothing_and_a_node_without_its_agent_confirms_through_a_server() {
        let (_, store) = store();
        let keys = Keys::new("service/postgres/leader");
        let pg1 = store.node("pg1");
        pass(&store, "pg1");
        assert_eq!(now(pg1.take_lock(&keys)).unwrap(), LockState::Held);
        let me = Member {
            node: "pg1".into(),
            address: [127, 0, 0, 1].into(),
            port: 5432,
            role: MemberRole::Primary,
            lsn: 7,
            timeline: 1,
            at_ms: 1,
            following: false,
        };
        now(pg1.publish(&keys, &me)).unwrap();
        assert_eq!(now(pg1.snapshot(&keys)).unwrap().members, vec![me]);
        store.set_local_down("pg1", true);
        assert!(now(pg1.snapshot(&keys)).is_err());
        assert_eq!(now(pg1.confirm_lock(&keys)).unwrap(), (true, false));
        store.set_cut_off("pg1", true);
        assert!(now(pg1.confirm_lock(&keys)).is_err());
    }
}
