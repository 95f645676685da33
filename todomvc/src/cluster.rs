//! The PostgreSQL servers as this app sees them, and the rules for using
//! them: writes go only to the one server that says it is not in recovery;
//! reads go to a replica that has replayed the client's own latest write,
//! else to the primary. A background prober keeps the picture current
//! (every `--probe-interval-ms`, and at once after a connection error), so a
//! promoted replica is found without a restart and without middleware.
//!
//! Nothing here waits without a bound: connecting and acquiring are limited
//! by the connect timeout, statements by `statement_timeout` on the server
//! and by a timer here (a server that stops answering is given up on too).
//! A write whose outcome is unknown is never retried: the caller answers 503.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{Connection, PgConnection};
use tokio::sync::Notify;

use crate::coalesce::Coalescer;
use crate::discovery::{Candidate, Candidates, Discovery, Endpoint, Tag};
use crate::list_cache::{ListCache, ListSnapshot, TodoList};
use crate::lsn::Lsn;
use crate::store::{self, Fence, ServerStatus};

/// How to reach and use the servers; from `Config`.
#[derive(Clone, Debug)]
pub struct DbSettings {
    pub name: String,
    pub user: String,
    pub password: Option<String>,
    pub pool_size: u32,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
    pub probe_interval: Duration,
    /// How long a whole list read from the primary may be served again
    /// (zero: never); see `list_cache`.
    pub list_cache_max_age: Duration,
}

impl DbSettings {
    fn connect_options(&self, at: &Endpoint) -> PgConnectOptions {
        let mut options = PgConnectOptions::new_without_pgpass()
            .host(&at.host)
            .port(at.port)
            .username(&self.user)
            .database(&self.name)
            .application_name("todomvc")
            // No TLS support is compiled in; saying so spares a round trip.
            .ssl_mode(PgSslMode::Disable)
            .options([
                (
                    "statement_timeout",
                    self.statement_timeout.as_millis().to_string(),
                ),
                (
                    "idle_in_transaction_session_timeout",
                    self.statement_timeout.as_millis().to_string(),
                ),
            ]);
        if let Some(password) = &self.password {
            options = options.password(password);
        }
        options
    }

    /// How long a probe round waits for a server that answered the last
    /// one; past it the server counts as not answering for that round.
    fn probe_wait(&self) -> Duration {
        Duration::from_secs(1).min(self.statement_timeout)
    }

    /// The most one database operation may take from here, connecting
    /// included; past it the server is treated as gone.
    fn operation_timeout(&self) -> Duration {
        self.connect_timeout + self.statement_timeout + Duration::from_millis(500)
    }
}

/// Why the database could not serve a request.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DbError {
    /// No suitable server right now (none known, down, timed out, or the
    /// outcome of a write is unknown): 503, try again shortly.
    #[error("{0}")]
    Unavailable(String),
    /// The server refused the data (a constraint): the client's fault.
    #[error("{0}")]
    Rejected(String),
    /// Anything else is a bug here, not a condition to handle.
    #[error("{0}")]
    Bug(String),
}

/// Where a read was served from, for the `X-Read-From` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
    /// The list cache (a list read from the primary a moment ago).
    Cache,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Cache => "cache",
        }
    }
}

/// A value read, with the WAL position the session has now seen.
#[derive(Debug)]
pub struct Read<T> {
    pub value: T,
    pub seen: Lsn,
    pub from: Role,
}

/// A value written, with the WAL position of the write.
#[derive(Debug)]
pub struct Written<T> {
    pub value: T,
    pub lsn: Lsn,
}

/// A replay position known to have been reached by one run of a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ReplayMark {
    started: i64,
    lsn: Lsn,
}

/// Records a replay position: the highest seen within one run of a server;
/// a new run replaces the old one's position, since it may have gone
/// backwards (rewind, re-clone).
fn advance(mark: Option<ReplayMark>, started: i64, lsn: Option<Lsn>) -> Option<ReplayMark> {
    match (mark, lsn) {
        (mark, None) => mark,
        (Some(m), Some(lsn)) if m.started == started && m.lsn >= lsn => Some(m),
        (_, Some(lsn)) => Some(ReplayMark { started, lsn }),
    }
}

/// One server and its connection pools, one per HTTP worker thread.
///
/// Each actix worker runs its own single-threaded runtime, and a connection
/// belongs to the runtime that opened it: used from another worker it wakes
/// that runtime for every read, and it dies with it, which happens first
/// during a graceful stop (an idle worker exits while a busy one still
/// finishes its requests). So every worker opens and uses its own.
pub struct Node {
    pub endpoint: Endpoint,
    settings: DbSettings,
    pools: Mutex<HashMap<ThreadId, Arc<WorkerPool>>>,
    /// Replay only moves forward within one run of a server, so a position
    /// seen earlier is a floor for any snapshot taken later by that run.
    mark: Mutex<Option<ReplayMark>>,
}

/// One worker's connections to one server.
///
/// Not sqlx's `Pool`: that one pings every connection as it is released (a
/// Sync round trip, to catch a connection left mid-query by a cancelled
/// future), which doubled the round trips of every request. Here a
/// connection goes back only when its operation finished successfully;
/// one whose operation failed, or was dropped by the timeout in `run`, is
/// closed instead. A connection idle for over a second is pinged before use,
/// as it is the one likely to have lost its server (restart, failover).
struct WorkerPool {
    idle: Mutex<Vec<(PgConnection, Instant)>>,
    /// Connections open or being opened, at most the pool size.
    slots: Arc<tokio::sync::Semaphore>,
}

/// A connection out of a `WorkerPool`; it returns only through `release`.
struct Pooled {
    conn: PgConnection,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl WorkerPool {
    fn new(size: u32) -> Self {
        WorkerPool {
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(size.max(1) as usize)),
        }
    }

    async fn acquire(&self, settings: &DbSettings, at: &Endpoint) -> Result<Pooled, sqlx::Error> {
        let slot =
            tokio::time::timeout(settings.connect_timeout, self.slots.clone().acquire_owned())
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)?
                .map_err(|_| sqlx::Error::PoolClosed)?;
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some((mut conn, since)) = idle else { break };
            if since.elapsed() > Duration::from_secs(60) {
                continue; // the server may well have closed it; a new one is cheaper
            }
            if since.elapsed() <= Duration::from_secs(1) || conn.ping().await.is_ok() {
                return Ok(Pooled { conn, _slot: slot });
            }
        }
        let options = settings.connect_options(at);
        let conn = tokio::time::timeout(
            settings.connect_timeout,
            PgConnection::connect_with(&options),
        )
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
        Ok(Pooled { conn, _slot: slot })
    }

    fn release(&self, pooled: Pooled) {
        let Pooled { conn, _slot } = pooled;
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((conn, Instant::now()));
    }
}

impl Node {
    fn new(endpoint: Endpoint, settings: &DbSettings) -> Self {
        Node {
            endpoint,
            settings: settings.clone(),
            pools: Mutex::new(HashMap::new()),
            mark: Mutex::new(None),
        }
    }

    /// The calling thread's pool for this server, made on first use (empty:
    /// connections are opened as needed, so this never waits).
    fn pool(&self) -> Arc<WorkerPool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(std::thread::current().id())
            .or_insert_with(|| Arc::new(WorkerPool::new(self.settings.pool_size)))
            .clone()
    }

    fn mark(&self) -> Option<ReplayMark> {
        *self.mark.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note(&self, started: i64, lsn: Option<Lsn>) {
        let mut mark = self.mark.lock().unwrap_or_else(|e| e.into_inner());
        *mark = advance(*mark, started, lsn);
    }
}

/// What the last probe found about one server, for `/healthz`.
#[derive(Clone, Debug, Serialize)]
pub struct NodeReport {
    pub address: String,
    /// `primary`, `replica`, `down`, or `excluded` (claims to be a primary
    /// but is not the one chosen).
    pub state: &'static str,
    pub tag: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_paused: Option<bool>,
    /// A replica that has replayed everything it received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caught_up: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The picture of the servers the requests use, replaced whole by each probe.
pub struct Topology {
    /// The server writes go to, once its schema is in place.
    pub primary: Option<Arc<Node>>,
    pub replicas: Vec<Arc<Node>>,
    pub reports: Vec<NodeReport>,
    /// Why there is no primary although servers answered, if that is so.
    pub problem: Option<String>,
    pub discovery_source: &'static str,
    pub discovery_error: Option<String>,
    pub probed_at: Option<Instant>,
}

impl Topology {
    fn empty() -> Self {
        Topology {
            primary: None,
            replicas: Vec::new(),
            reports: Vec::new(),
            problem: Some("not probed yet".into()),
            discovery_source: "",
            discovery_error: None,
            probed_at: None,
        }
    }

    /// A replica that answered the last probe and has replayed all it got.
    pub fn has_caught_up_replica(&self) -> bool {
        self.reports
            .iter()
            .any(|r| r.state == "replica" && r.caught_up == Some(true))
    }
}

struct Inner {
    settings: DbSettings,
    topology: RwLock<Arc<Topology>>,
    reprobe: Notify,
    /// The primary as the prober last decided it, for operations to notice
    /// that theirs was replaced.
    primary: tokio::sync::watch::Sender<Option<Endpoint>>,
    next_replica: AtomicUsize,
    lists: ListCache,
    /// Whole-list reads of clients without a position, shared by the calls
    /// waiting at the same time (see `coalesce`).
    fresh_lists: Coalescer<Result<Arc<FreshList>, DbError>>,
}

/// A whole list read after the calls it answers arrived.
pub struct FreshList {
    pub list: TodoList,
    /// More todos than the limit it was read with exist.
    pub more: bool,
    pub seen: Lsn,
    pub from: Role,
}

/// The app's handle on the database servers; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

/// The running prober; stopping it (or dropping it) ends probing and
/// discovery.
pub struct Prober {
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Cluster {
    /// Starts probing the servers `discovery` names. Must be called inside a
    /// Tokio runtime that outlives the app (the prober runs on it).
    pub fn start(settings: DbSettings, discovery: Discovery) -> (Cluster, Prober) {
        let inner = Arc::new(Inner {
            topology: RwLock::new(Arc::new(Topology::empty())),
            reprobe: Notify::new(),
            primary: tokio::sync::watch::Sender::new(None),
            next_replica: AtomicUsize::new(0),
            lists: ListCache::new(settings.list_cache_max_age),
            fresh_lists: Coalescer::default(),
            settings,
        });
        let task = tokio::spawn(probe_forever(inner.clone(), discovery));
        (Cluster { inner }, Prober { task })
    }

    pub fn topology(&self) -> Arc<Topology> {
        self.inner
            .topology
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How old the prober's picture may get before health says `stale`: a
    /// round of probes can take an operation timeout (a hung server) and a
    /// migration two more.
    pub fn staleness_limit(&self) -> Duration {
        let s = &self.inner.settings;
        s.probe_interval * 4 + s.operation_timeout() * 3
    }

    /// Asks the prober to look again now, after something went wrong.
    fn reprobe(&self) {
        self.inner.reprobe.notify_one();
    }

    /// Runs `op` on one connection of `node`, bounded in time, and sorts its
    /// errors into what the client should hear.
    async fn run<T, F>(&self, node: &Node, op: &F) -> Result<T, DbError>
    where
        F: for<'c> Fn(&'c mut PgConnection) -> BoxFuture<'c, Result<T, sqlx::Error>>,
    {
        let work = async {
            let pool = node.pool();
            let mut pooled = pool.acquire(&self.inner.settings, &node.endpoint).await?;
            let value = op(&mut pooled.conn).await?;
            pool.release(pooled);
            Ok(value)
        };
        // An operation on the primary ends as soon as another server is
        // found to be the primary (a failover while this one hangs): its
        // outcome is unknown either way, and the client may retry at once
        // rather than wait out the timeout on a server that is gone.
        let mut primary = self.inner.primary.subscribe();
        let was_primary = primary.borrow_and_update().as_ref() == Some(&node.endpoint);
        let replaced = async {
            if !was_primary {
                return std::future::pending().await;
            }
            loop {
                if primary.changed().await.is_err() {
                    return std::future::pending().await;
                }
                let now = primary.borrow_and_update().clone();
                if now.is_some_and(|p| p != node.endpoint) {
                    return;
                }
            }
        };
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(self.inner.settings.operation_timeout(), work) => outcome,
            () = replaced => {
                tracing::warn!(server = %node.endpoint, "another server became the primary during an operation");
                return Err(DbError::Unavailable(format!(
                    "the database server {} stopped being the primary during the operation; its outcome is unknown",
                    node.endpoint
                )));
            }
        };
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.classify(&node.endpoint, e)),
            Err(_) => {
                self.reprobe();
                tracing::warn!(server = %node.endpoint, "database did not answer in time");
                Err(DbError::Unavailable(format!(
                    "the database server {} did not answer in time",
                    node.endpoint
                )))
            }
        }
    }

    fn classify(&self, at: &Endpoint, e: sqlx::Error) -> DbError {
        let unavailable = |this: &Self, why: String| {
            this.reprobe();
            tracing::warn!(server = %at, error = %why, "database unavailable");
            DbError::Unavailable(format!("the database is not available right now: {why}"))
        };
        match &e {
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                match code.as_str() {
                    // check, not-null, string too long, bad character: the
                    // data, not the server.
                    "23514" | "23502" | "22001" | "22021" => {
                        DbError::Rejected(db.message().to_string())
                    }
                    // read-only transaction (a write reached a replica),
                    // missing table (schema not there yet), serialization
                    // and deadlock, statement timeout and shutdowns (57...),
                    // connection (08...) and resource (53...) trouble.
                    "25006" | "42P01" | "40001" | "40P01" => unavailable(self, e.to_string()),
                    c if c.starts_with("57") || c.starts_with("08") || c.starts_with("53") => {
                        unavailable(self, e.to_string())
                    }
                    _ => DbError::Bug(format!("database error at {at}: {e}")),
                }
            }
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => unavailable(self, e.to_string()),
            _ => DbError::Bug(format!("database error at {at}: {e}")),
        }
    }

    /// Reads with `op` for a session that has seen `session` (None: a client
    /// that carries no position, which is read from the primary, so that a
    /// client without cookies, such as the cross-origin Todo-Backend spec
    /// runner, still reads its own writes).
    pub async fn read<T, F>(&self, session: Option<Lsn>, op: F) -> Result<Read<T>, DbError>
    where
        F: for<'c> Fn(&'c mut PgConnection) -> BoxFuture<'c, Result<(Fence, T), sqlx::Error>>,
    {
        let topology = self.topology();
        let mut last_error = None;

        // 1. A replica known to have replayed the session's position.
        if let Some(wanted) = session {
            let eligible: Vec<(&Arc<Node>, ReplayMark)> = topology
                .replicas
                .iter()
                .filter_map(|n| n.mark().filter(|m| m.lsn >= wanted).map(|m| (n, m)))
                .collect();
            if !eligible.is_empty() {
                let start = self.inner.next_replica.fetch_add(1, Ordering::Relaxed);
                // Two tries at most: past that the primary is the better bet.
                for i in 0..eligible.len().min(2) {
                    let (node, mark) = eligible[(start + i) % eligible.len()];
                    match self.run(node, &op).await {
                        Ok((fence, value)) => {
                            node.note(fence.started, fence.lsn);
                            // Same run of the server as when the mark was
                            // taken (a promotion keeps the run): its
                            // snapshot holds everything up to the mark.
                            if fence.started == mark.started {
                                return Ok(Read {
                                    value,
                                    seen: fence.lsn.map_or(wanted, |l| l.max(wanted)),
                                    from: Role::Replica,
                                });
                            }
                            self.reprobe();
                        }
                        Err(e) => last_error = Some(e),
                    }
                }
            }
        }

        // 2. The primary.
        if let Some(primary) = &topology.primary {
            match self.run(primary, &op).await {
                Ok((fence, value)) if !fence.standby => {
                    let seen = fence.lsn.unwrap_or(Lsn::MAX);
                    return Ok(Read {
                        value,
                        seen: session.map_or(seen, |s| s.max(seen)),
                        from: Role::Primary,
                    });
                }
                Ok(_) => {
                    // It went back into recovery since the last probe: no
                    // longer the primary, and maybe behind.
                    self.reprobe();
                    last_error = Some(DbError::Unavailable(
                        "the primary has just changed; retry shortly".into(),
                    ));
                }
                Err(e) => last_error = Some(e),
            }
        }

        // 3. No primary: a client that has not written may still read from
        // the freshest replica; one that has must not see its write missing.
        if session.is_none() {
            let mut replicas: Vec<&Arc<Node>> = topology.replicas.iter().collect();
            replicas.sort_by_key(|n| std::cmp::Reverse(n.mark().map(|m| m.lsn)));
            for node in replicas.into_iter().take(2) {
                match self.run(node, &op).await {
                    Ok((fence, value)) => {
                        node.note(fence.started, fence.lsn);
                        return Ok(Read {
                            value,
                            seen: fence.lsn.unwrap_or_default(),
                            from: Role::Replica,
                        });
                    }
                    Err(e) => last_error = Some(e),
                }
            }
        }

        Err(match last_error {
            Some(DbError::Unavailable(_)) | None if session.is_some() => DbError::Unavailable(
                "no database server has caught up with your latest write yet; retry shortly".into(),
            ),
            Some(e) => e,
            None => DbError::Unavailable(
                topology
                    .problem
                    .clone()
                    .unwrap_or_else(|| "no database server is reachable".into()),
            ),
        })
    }

    /// The first `limit` todos for a client without a position (read as
    /// `read` would with no session), from a read that began after this
    /// call: it holds every write committed before the call. Calls made
    /// while another such read runs share the next one.
    pub async fn read_fresh_list(&self, limit: i64) -> Result<Arc<FreshList>, DbError> {
        self.inner
            .fresh_lists
            .run(|| async {
                // One more than asked: whether there is a next page.
                let read = self
                    .read(None, move |conn| {
                        Box::pin(async move {
                            let (fence, rows) = store::list(conn, limit + 1, 0).await?;
                            Ok((fence, rows.todos()?))
                        })
                    })
                    .await?;
                let mut todos = read.value;
                let more = todos.len() as i64 > limit;
                todos.truncate(limit.max(0) as usize);
                Ok(Arc::new(FreshList {
                    list: TodoList::new(todos),
                    more,
                    seen: read.seen,
                    from: read.from,
                }))
            })
            .await
    }

    /// The cached whole list, if it holds everything a session at `wanted`
    /// wrote (see `list_cache`).
    pub fn cached_list(&self, wanted: Lsn) -> Option<Arc<ListSnapshot>> {
        let lists = &self.inner.lists;
        if !lists.enabled() {
            return None;
        }
        let topology = self.topology();
        lists.lookup(wanted, topology.primary.as_ref()?)
    }

    /// Reads the whole list (at most `limit` todos) from the primary after
    /// taking a floor position, caches it and returns it if it holds what a
    /// session at `wanted` wrote. `None` (another fill under way, no
    /// primary, a longer list, an error): read the usual way instead.
    pub async fn fill_list(&self, wanted: Lsn, limit: i64) -> Option<Arc<ListSnapshot>> {
        let lists = &self.inner.lists;
        if !lists.enabled() {
            return None;
        }
        let _filling = lists.filling.try_lock().ok()?;
        let generation = lists.generation();
        let primary = self.topology().primary.clone()?;
        let op = on_connection(|conn| {
            Box::pin(async move {
                let floor = store::wal_floor(conn).await?;
                let (fence, rows) = store::list(conn, limit + 1, 0).await?;
                Ok((floor, fence, rows.todos()?))
            })
        });
        let (floor, fence, todos) = self.run(&primary, &op).await.ok()?;
        if fence.standby || todos.len() as i64 > limit {
            return None;
        }
        let entry = Arc::new(ListSnapshot::new(floor?, primary, todos));
        lists.install(generation, entry.clone());
        entry.covers(wanted).then_some(entry)
    }

    /// Writes with `op` on the primary, once: a write that fails after it
    /// may have reached the server is reported, never retried (retrying an
    /// insert whose commit we did not hear about could store it twice).
    pub async fn write<T, F>(&self, op: F) -> Result<Written<T>, DbError>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, sqlx::Error>>,
    {
        let topology = self.topology();
        let Some(primary) = topology.primary.clone() else {
            self.reprobe();
            return Err(DbError::Unavailable(match &topology.problem {
                Some(p) => format!("no primary database right now ({p}); retry shortly"),
                None => "no primary database right now; retry shortly".into(),
            }));
        };
        // `run` wants an `Fn`; the slot hands the `FnOnce` over exactly once.
        let slot = Mutex::new(Some(op));
        let once = on_connection(|conn| {
            let op = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            match op {
                Some(op) => op(conn),
                None => {
                    Box::pin(async { Err(sqlx::Error::Protocol("write attempted twice".into())) })
                }
            }
        });
        let value = self.run(&primary, &once).await;
        // Whatever the outcome (an unknown one included), the cached list
        // may now be behind.
        self.inner.lists.invalidate();
        let value = value?;
        // The write is committed: from here on, failing to learn its
        // position must not turn it into an error (the client would retry
        // and write twice). The session then reads from the primary only.
        let position = on_connection(|conn| Box::pin(store::insert_lsn(conn)));
        let lsn = match self.run(&primary, &position).await {
            Ok(Some(lsn)) => lsn,
            Ok(None) | Err(_) => Lsn::MAX,
        };
        Ok(Written { value, lsn })
    }
}

/// Pins a closure to the higher-ranked signature `run` needs (closures do
/// not infer it on their own when stored in a variable).
fn on_connection<T, F>(f: F) -> F
where
    F: for<'c> Fn(&'c mut PgConnection) -> BoxFuture<'c, Result<T, sqlx::Error>>,
{
    f
}

/// The outcome of probing one server.
type Probe = Result<ServerStatus, String>;

/// Which server is the primary and which are replicas, from the probes
/// alone: a server in recovery is never the primary, whatever its tag. Two
/// servers out of recovery (an old primary back without being fenced) are
/// told apart by their timelines, the promoted one being on the higher;
/// then by the `primary` tag; if that does not settle it, there is no
/// primary and writes wait, rather than risk writing to the wrong one.
/// (Timelines before tags: after a failover a static list's `--db-primary`
/// names the old primary.)
///
/// A server in recovery is a replica, read from, only once it has streamed
/// since it started (`pg_last_wal_receive_lsn()` is set): one that follows
/// no primary may be a former primary restarted before anything rewound
/// it, replaying writes of its own that no client had acknowledged, to a
/// position past the clients' own. Its position says nothing about what
/// it holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Roles {
    pub primary: Option<usize>,
    pub replicas: Vec<usize>,
    pub problem: Option<String>,
}

pub fn decide_roles(probes: &[(&Candidate, &Probe)]) -> Roles {
    let writable: Vec<usize> = probes
        .iter()
        .enumerate()
        .filter(|(_, (_, p))| matches!(p, Ok(s) if !s.standby))
        .map(|(i, _)| i)
        .collect();
    let replicas = probes
        .iter()
        .enumerate()
        .filter(|(_, (_, p))| matches!(p, Ok(s) if s.standby && s.received.is_some()))
        .map(|(i, _)| i)
        .collect();
    let (primary, problem) = match writable.as_slice() {
        [] if probes.is_empty() => (None, Some("no database servers are known".to_string())),
        [] => (
            None,
            Some("no server out of recovery (no primary)".to_string()),
        ),
        [one] => (Some(*one), None),
        several => {
            let timeline = |i: usize| probes[i].1.as_ref().ok().and_then(|s| s.timeline);
            let newest = several.iter().map(|&i| timeline(i)).max().flatten();
            let on_newest: Vec<usize> = several
                .iter()
                .copied()
                .filter(|&i| newest.is_some() && timeline(i) == newest)
                .collect();
            let tagged: Vec<usize> = several
                .iter()
                .copied()
                .filter(|i| probes[*i].0.tag == Tag::Primary)
                .filter(|i| on_newest.is_empty() || on_newest.contains(i))
                .collect();
            match (on_newest.as_slice(), tagged.as_slice()) {
                ([one], _) | (_, [one]) => (Some(*one), None),
                _ => (
                    None,
                    Some(format!(
                        "{} servers claim to be the primary: {}",
                        several.len(),
                        several
                            .iter()
                            .map(|i| probes[*i].0.endpoint.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                ),
            }
        }
    };
    Roles {
        primary,
        replicas,
        problem,
    }
}

/// Probes one server on the prober's own connection to it (so a saturated
/// pool cannot delay the probe), opening one when needed.
async fn probe_one(
    settings: &DbSettings,
    at: &Endpoint,
    conn: Option<PgConnection>,
) -> (Option<PgConnection>, Probe) {
    if let Some(mut conn) = conn {
        match tokio::time::timeout(settings.statement_timeout, store::server_status(&mut conn))
            .await
        {
            Ok(Ok(status)) => return (Some(conn), Ok(status)),
            Err(_) => return (None, Err("timed out answering the probe".into())),
            // The kept connection may only have outlived a restart of the
            // server: a fresh one decides whether the server is really down.
            Ok(Err(_)) => {}
        }
    }
    let options = settings.connect_options(at);
    let connect = PgConnection::connect_with(&options);
    let mut conn = match tokio::time::timeout(settings.connect_timeout, connect).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return (None, Err(e.to_string())),
        Err(_) => return (None, Err("timed out connecting".into())),
    };
    match tokio::time::timeout(settings.statement_timeout, store::server_status(&mut conn)).await {
        Ok(Ok(status)) => (Some(conn), Ok(status)),
        Ok(Err(e)) => (None, Err(e.to_string())),
        Err(_) => (None, Err("timed out answering the probe".into())),
    }
}

fn tag_name(tag: Tag) -> &'static str {
    match tag {
        Tag::Primary => "primary",
        Tag::Replica => "replica",
        Tag::Untagged => "",
    }
}

/// Probes in flight, one task per server; aborted when dropped (the prober
/// stopped).
/// A probe running on its task: the kept connection and the answer.
type ProbeTask = tokio::task::JoinHandle<(Option<PgConnection>, Probe)>;

#[derive(Default)]
struct Probes(HashMap<Endpoint, (Instant, ProbeTask)>);

impl Probes {
    fn contains(&self, at: &Endpoint) -> bool {
        self.0.contains_key(at)
    }

    fn start(&mut self, at: Endpoint, task: ProbeTask) {
        self.0.insert(at, (Instant::now(), task));
    }

    fn retain(&mut self, keep: impl Fn(&Endpoint) -> bool) {
        self.0.retain(|at, (_, task)| {
            let kept = keep(at);
            if !kept {
                task.abort();
            }
            kept
        });
    }

    /// The probe of `at` if it has finished, waiting until `deadline` if
    /// one is given; otherwise how long it has been running.
    async fn finish(
        &mut self,
        at: &Endpoint,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(Option<PgConnection>, Probe), Duration> {
        let Some((since, task)) = self.0.get_mut(at) else {
            return Err(Duration::ZERO);
        };
        let since = *since;
        let done = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, &mut *task).await.ok(),
            None if task.is_finished() => Some(task.await),
            None => None,
        };
        match done {
            None => Err(since.elapsed()),
            Some(result) => {
                self.0.remove(at);
                Ok(result.unwrap_or_else(|e| (None, Err(format!("the probe failed: {e}")))))
            }
        }
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        for (_, task) in self.0.values() {
            task.abort();
        }
    }
}

/// The prober: probe every candidate, decide roles, make sure the primary
/// has the schema, publish; then wait for the interval, a reprobe request
/// or a change of candidates.
async fn probe_forever(inner: Arc<Inner>, mut discovery: Discovery) {
    let settings = &inner.settings;
    let mut nodes: HashMap<Endpoint, Arc<Node>> = HashMap::new();
    let mut conns: HashMap<Endpoint, PgConnection> = HashMap::new();
    // Runs of servers (endpoint, start time) known to have the schema.
    let mut migrated: HashSet<(Endpoint, i64)> = HashSet::new();
    let mut last_primary: Option<Endpoint> = None;
    let mut running = Probes::default();
    // Servers whose last probe succeeded.
    let mut answered: HashSet<Endpoint> = HashSet::new();
    loop {
        let Candidates {
            list,
            error: discovery_error,
            source,
        } = discovery.candidates.borrow_and_update().clone();

        nodes.retain(|at, _| list.iter().any(|c| &c.endpoint == at));
        conns.retain(|at, _| list.iter().any(|c| &c.endpoint == at));
        for c in list.iter() {
            nodes
                .entry(c.endpoint.clone())
                .or_insert_with(|| Arc::new(Node::new(c.endpoint.clone(), settings)));
        }

        running.retain(|at| list.iter().any(|c| &c.endpoint == at));
        // A probe runs on its own task and may outlive the round: a server
        // that answered last time gets `probe_wait` to answer again, one
        // that did not is not waited for at all, so a hung server (a frozen
        // primary) never holds back what the others say (a promotion).
        let deadline = tokio::time::Instant::now() + settings.probe_wait();
        let mut waited = Vec::new();
        for c in list.iter() {
            if running.contains(&c.endpoint) {
                continue;
            }
            let conn = conns.remove(&c.endpoint);
            let (at, inner) = (c.endpoint.clone(), inner.clone());
            running.start(
                c.endpoint.clone(),
                tokio::spawn(async move { probe_one(&inner.settings, &at, conn).await }),
            );
            if answered.contains(&c.endpoint) {
                waited.push(c.endpoint.clone());
            }
        }
        let mut probes: Vec<Probe> = Vec::with_capacity(list.len());
        for c in list.iter() {
            let wait = waited.contains(&c.endpoint);
            match running.finish(&c.endpoint, wait.then_some(deadline)).await {
                Ok((conn, probe)) => {
                    if let Some(conn) = conn {
                        conns.insert(c.endpoint.clone(), conn);
                    }
                    if probe.is_ok() {
                        answered.insert(c.endpoint.clone());
                    } else {
                        answered.remove(&c.endpoint);
                    }
                    probes.push(probe);
                }
                Err(silent) => {
                    answered.remove(&c.endpoint);
                    probes.push(Err(format!(
                        "has not answered the probe for {:.1} s",
                        silent.as_secs_f64()
                    )));
                }
            }
        }

        let pairs: Vec<(&Candidate, &Probe)> = list.iter().zip(probes.iter()).collect();
        let mut roles = decide_roles(&pairs);

        // The schema goes in before the first write; a primary it cannot be
        // put on is not used.
        if let Some(i) = roles.primary {
            let c = &list[i];
            let started = probes[i].as_ref().map(|s| s.started).unwrap_or_default();
            let key = (c.endpoint.clone(), started);
            if !migrated.contains(&key) {
                match conns.get_mut(&c.endpoint) {
                    Some(conn) => {
                        let run = store::migrate(conn);
                        match tokio::time::timeout(settings.operation_timeout() * 2, run).await {
                            Ok(Ok(())) => {
                                migrated.insert(key);
                            }
                            Ok(Err(e)) => {
                                tracing::error!(server = %c.endpoint, error = %e, "migrating the primary failed");
                                roles.problem =
                                    Some(format!("migrating {} failed: {e}", c.endpoint));
                                roles.primary = None;
                                conns.remove(&c.endpoint);
                            }
                            Err(_) => {
                                roles.problem = Some(format!("migrating {} timed out", c.endpoint));
                                roles.primary = None;
                                conns.remove(&c.endpoint);
                            }
                        }
                    }
                    None => roles.primary = None,
                }
            }
        }

        let primary_lsn = roles
            .primary
            .and_then(|i| probes[i].as_ref().ok())
            .and_then(|s| s.lsn);
        let reports = pairs
            .iter()
            .enumerate()
            .map(|(i, (c, probe))| {
                let mut r = NodeReport {
                    address: c.endpoint.to_string(),
                    state: "down",
                    tag: tag_name(c.tag),
                    lsn: None,
                    lag_bytes: None,
                    replay_paused: None,
                    caught_up: None,
                    error: None,
                };
                match probe {
                    Err(e) => r.error = Some(e.clone()),
                    Ok(s) => {
                        r.lsn = s.lsn.map(|l| l.to_string());
                        if s.standby {
                            r.state = "replica";
                            r.replay_paused = Some(s.replay_paused);
                            // Not streaming since it started: not read from
                            // (see decide_roles), so not caught up either.
                            r.caught_up = Some(
                                !s.replay_paused
                                    && match (s.lsn, s.received) {
                                        (Some(replayed), Some(received)) => replayed >= received,
                                        _ => false,
                                    },
                            );
                            if s.received.is_none() {
                                r.error = Some(
                                    "has not streamed from a primary since it started: not read from"
                                        .into(),
                                );
                            }
                            r.lag_bytes = match (primary_lsn, s.lsn) {
                                (Some(p), Some(l)) => Some(p.bytes_after(l)),
                                _ => None,
                            };
                        } else if roles.primary == Some(i) {
                            r.state = "primary";
                        } else {
                            r.state = "excluded";
                        }
                    }
                }
                r
            })
            .collect();

        for &i in &roles.replicas {
            if let Ok(s) = &probes[i] {
                nodes[&list[i].endpoint].note(s.started, s.lsn);
            }
        }
        let primary = roles.primary.map(|i| nodes[&list[i].endpoint].clone());
        let replicas = roles
            .replicas
            .iter()
            .map(|&i| nodes[&list[i].endpoint].clone())
            .collect();

        let now_primary = primary.as_ref().map(|n| n.endpoint.clone());
        let primary_changed = now_primary != last_primary;
        if primary_changed {
            match &now_primary {
                Some(at) => tracing::info!(server = %at, "primary found"),
                None => tracing::warn!(problem = ?roles.problem, "no primary"),
            }
            last_primary = now_primary;
        }

        let topology = Topology {
            primary,
            replicas,
            reports,
            problem: roles.problem,
            discovery_source: source,
            discovery_error,
            probed_at: Some(Instant::now()),
        };
        *inner.topology.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(topology);
        if primary_changed {
            // After the topology: an operation this ends may retry at once.
            inner.primary.send_replace(last_primary.clone());
        }

        let probed = tokio::time::Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(settings.probe_interval) => {}
            _ = inner.reprobe.notified() => {
                // Many failing requests ask at once; one probe answers them.
                tokio::time::sleep_until(probed + Duration::from_millis(50)).await;
            }
            changed = discovery.candidates.changed() => {
                if changed.is_err() {
                    // Discovery ended (only at shutdown): keep the interval.
                    tokio::time::sleep(settings.probe_interval).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(name: &str, tag: Tag) -> Candidate {
        Candidate {
            endpoint: format!("{name}:5432").parse().unwrap(),
            tag,
        }
    }

    fn up(standby: bool) -> Probe {
        on_timeline(standby, 1)
    }

    fn on_timeline(standby: bool, timeline: u32) -> Probe {
        Ok(ServerStatus {
            standby,
            lsn: Some(Lsn(100)),
            received: standby.then_some(Lsn(100)),
            replay_paused: false,
            started: 1,
            timeline: (!standby).then_some(timeline),
        })
    }

    fn roles(list: &[(Candidate, Probe)]) -> Roles {
        let pairs: Vec<(&Candidate, &Probe)> = list.iter().map(|(c, p)| (c, p)).collect();
        decide_roles(&pairs)
    }

    #[test]
    fn recovery_status_beats_tags() {
        // Consul still says a is the primary, but a is in recovery and b is not.
        let r = roles(&[
            (cand("a", Tag::Primary), up(true)),
            (cand("b", Tag::Replica), up(false)),
        ]);
        assert_eq!(r.primary, Some(1));
        assert_eq!(r.replicas, vec![0]);
        assert_eq!(r.problem, None);
    }

    #[test]
    fn a_standby_that_has_not_streamed_since_it_started_is_no_replica() {
        // A former primary back in recovery, following no one, far ahead of
        // the promoted server on a history of its own.
        let diverged = Ok(ServerStatus {
            standby: true,
            lsn: Some(Lsn(1_000_000)),
            received: None,
            replay_paused: false,
            started: 2,
            timeline: None,
        });
        let r = roles(&[
            (cand("a", Tag::Replica), diverged),
            (cand("b", Tag::Primary), on_timeline(false, 2)),
            (cand("c", Tag::Replica), up(true)),
        ]);
        assert_eq!(r.primary, Some(1));
        assert_eq!(r.replicas, vec![2]);
    }

    #[test]
    fn no_primary_while_only_replicas_answer() {
        let r = roles(&[
            (cand("a", Tag::Primary), Err("connection refused".into())),
            (cand("b", Tag::Replica), up(true)),
        ]);
        assert_eq!(r.primary, None);
        assert_eq!(r.replicas, vec![1]);
        assert!(r.problem.is_some());
    }

    #[test]
    fn two_writable_servers_are_settled_by_the_primary_tag_or_not_at_all() {
        let r = roles(&[
            (cand("a", Tag::Replica), up(false)),
            (cand("b", Tag::Primary), up(false)),
        ]);
        assert_eq!(r.primary, Some(1));
        let r = roles(&[
            (cand("a", Tag::Primary), up(false)),
            (cand("b", Tag::Primary), up(false)),
        ]);
        assert_eq!(r.primary, None);
        assert!(r.problem.unwrap().contains("2 servers claim"));
        let r = roles(&[
            (cand("a", Tag::Untagged), up(false)),
            (cand("b", Tag::Untagged), up(false)),
        ]);
        assert_eq!(r.primary, None);
    }

    #[test]
    fn a_returning_old_primary_loses_to_the_promoted_one_despite_its_tag() {
        // The static list still names a as the primary; b was promoted.
        let r = roles(&[
            (cand("a", Tag::Primary), on_timeline(false, 1)),
            (cand("b", Tag::Replica), on_timeline(false, 2)),
        ]);
        assert_eq!(r.primary, Some(1));
        // Same timeline (two clusters?): the tag decides, or nothing does.
        let r = roles(&[
            (cand("a", Tag::Primary), on_timeline(false, 2)),
            (cand("b", Tag::Replica), on_timeline(false, 2)),
        ]);
        assert_eq!(r.primary, Some(0));
        let r = roles(&[
            (cand("a", Tag::Replica), on_timeline(false, 2)),
            (cand("b", Tag::Replica), on_timeline(false, 2)),
        ]);
        assert_eq!(r.primary, None);
    }

    #[test]
    fn replay_marks_only_grow_within_one_run_of_a_server() {
        let mark = advance(None, 1, Some(Lsn(50)));
        let mark = advance(mark, 1, Some(Lsn(40)));
        assert_eq!(mark.map(|m| m.lsn), Some(Lsn(50)));
        let mark = advance(mark, 1, None);
        assert_eq!(mark.map(|m| m.lsn), Some(Lsn(50)));
        // Restarted (or rewound): its old position means nothing any more.
        let mark = advance(mark, 2, Some(Lsn(10)));
        assert_eq!(
            mark,
            Some(ReplayMark {
                started: 2,
                lsn: Lsn(10)
            })
        );
    }
}
