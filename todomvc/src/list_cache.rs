//! The whole todo list as last read from the primary, kept for a short while
//! and served to sessions it provably holds every write of, so the hot path
//! (`GET /todos` from the page) skips PostgreSQL.
//!
//! Why it cannot be older than a session's own writes: a fill first writes a
//! tiny non-transactional WAL record (`pg_logical_emit_message`, which
//! nothing decodes) and notes the insert position after it, the *floor*;
//! only then, in the next statement, is the list read. A write's answer
//! gives its client the insert position read after the write committed (see
//! `Cluster::write`); positions only grow, so a client position below the
//! floor was handed out before the floor was taken, by a write already
//! visible then, and so in the list's later snapshot. A session is served
//! only when its `todomvc_lsn` is below the floor, whichever webapp it wrote
//! through; the floor record makes sure the session that caused a fill is.
//! A client without the cookie could have written anywhere, so it is never
//! served from here. A session served from here gets `floor - 1` as its
//! position.
//!
//! The cache only bounds how stale *other* clients' writes may look: an
//! entry is dropped by every write through this webapp (a fill that started
//! before the write is not installed), when the primary changes, and after
//! `--list-cache-ms` (writes through other webapps show within that time,
//! as they do on a replica within its lag).

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use actix_web::web::Bytes;

use crate::cluster::Node;
use crate::lsn::Lsn;
use crate::todo::Todo;

/// How many client-visible base URLs (scheme and host) one entry keeps a
/// serialized body for; the todo URLs in a list depend on it.
const BODIES_KEPT: usize = 4;

/// Todos read once and answered many times: each client-visible base URL's
/// JSON body is serialized once.
pub struct TodoList {
    todos: Vec<Todo>,
    bodies: Mutex<Vec<(String, Bytes)>>,
}

impl TodoList {
    pub fn new(todos: Vec<Todo>) -> Self {
        TodoList {
            todos,
            bodies: Mutex::new(Vec::new()),
        }
    }

    /// The JSON body for clients that address the API at `base`.
    pub fn body(&self, base: &str) -> Result<Bytes, serde_json::Error> {
        let mut bodies = self.bodies.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, body)) = bodies.iter().find(|(b, _)| b == base) {
            return Ok(body.clone());
        }
        let views: Vec<_> = self.todos.iter().map(|t| t.view(base)).collect();
        let body = Bytes::from(crate::todo::list_json(&views)?);
        if bodies.len() >= BODIES_KEPT {
            bodies.remove(0);
        }
        bodies.push((base.to_string(), body.clone()));
        Ok(body)
    }

    pub fn len(&self) -> usize {
        self.todos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.todos.is_empty()
    }
}

/// One whole list, as read after its floor.
pub struct ListSnapshot {
    floor: Lsn,
    primary: Arc<Node>,
    filled: Instant,
    list: TodoList,
}

impl ListSnapshot {
    pub fn new(floor: Lsn, primary: Arc<Node>, todos: Vec<Todo>) -> Self {
        ListSnapshot {
            floor,
            primary,
            filled: Instant::now(),
            list: TodoList::new(todos),
        }
    }

    /// Holds every write whose client was told a position below the floor.
    pub fn covers(&self, wanted: Lsn) -> bool {
        wanted < self.floor
    }

    /// The position a session served this list has seen.
    pub fn seen(&self, wanted: Lsn) -> Lsn {
        wanted.max(Lsn(self.floor.0.saturating_sub(1)))
    }

    /// The JSON body for clients that address the API at `base`.
    pub fn body(&self, base: &str) -> Result<Bytes, serde_json::Error> {
        self.list.body(base)
    }
}

#[derive(Default)]
struct Current {
    /// Bumped by every write, so a fill that raced one is not installed.
    generation: u64,
    entry: Option<Arc<ListSnapshot>>,
}

pub struct ListCache {
    max_age: Duration,
    current: RwLock<Current>,
    /// One fill at a time; other misses read the database as before.
    pub(crate) filling: tokio::sync::Mutex<()>,
}

impl ListCache {
    /// `max_age` zero disables the cache.
    pub fn new(max_age: Duration) -> Self {
        ListCache {
            max_age,
            current: RwLock::new(Current::default()),
            filling: tokio::sync::Mutex::new(()),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.max_age.is_zero()
    }

    /// The entry, if it is young, from `primary`, and holds `wanted`.
    pub fn lookup(&self, wanted: Lsn, primary: &Arc<Node>) -> Option<Arc<ListSnapshot>> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current
            .entry
            .as_ref()
            .filter(|e| {
                e.covers(wanted)
                    && Arc::ptr_eq(&e.primary, primary)
                    && e.filled.elapsed() < self.max_age
            })
            .cloned()
    }

    pub fn generation(&self) -> u64 {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .generation
    }

    /// Drops the entry; called after every write through this webapp.
    pub fn invalidate(&self) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        current.generation += 1;
        current.entry = None;
    }

    /// Installs a fill unless a write happened since `generation` was read.
    pub fn install(&self, generation: u64, entry: Arc<ListSnapshot>) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.generation == generation {
            current.entry = Some(entry);
        }
    }
}
