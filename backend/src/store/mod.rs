//! The state store: nodes, work orders, the topology spec and the audit log
//! in SQLite (default, a file in the state directory) or PostgreSQL (when
//! `DATABASE_URL` says so), through sea-orm. Functions take any connection,
//! so the service layer can run several in one transaction.

pub mod entity;
pub mod hosts;
pub mod logs;
pub mod metrics;

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use corral_migrations::{Migrator, MigratorTrait};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr,
    EntityTrait, ExprTrait, QueryFilter, QueryOrder, QuerySelect, Statement, TransactionTrait,
};

pub use entity::{backup, event, node, topology, work_order};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    // Not a `source` as well: the message carries it already.
    Db(DbErr),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The database was migrated by a newer corral: this server does not
    /// know its schema and must not write to it.
    /// PostgreSQL could not be reached at start: where, and why.
    #[error("cannot reach PostgreSQL at {target}: {reason}")]
    Unreachable { target: String, reason: String },
    #[error(
        "the database's schema is at {database}, newer than this server's {server}: \
         upgrade this server (every server sharing a database runs the same version)"
    )]
    SchemaNewer { database: String, server: String },
}

impl StoreError {
    /// True when the database refused a row for breaking a unique index.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            StoreError::Db(e) => matches!(
                e.sql_err(),
                Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
            ),
            StoreError::Corrupt(_)
            | StoreError::SchemaNewer { .. }
            | StoreError::Unreachable { .. } => false,
        }
    }

    /// True when the database could not be reached, or went away (or
    /// turned out to be a standby) under a statement: a failover, not a
    /// fault of the request.
    pub fn is_unavailable(&self) -> bool {
        use sea_orm::RuntimeErr;
        match self {
            StoreError::Db(DbErr::ConnectionAcquire(_) | DbErr::Conn(_)) => true,
            StoreError::Db(
                DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)),
            ) => connection_lost(e),
            _ => false,
        }
    }
}

/// A sqlx error that says the server is gone or cannot take the statement
/// now, rather than that the statement is wrong: I/O, the pool, and
/// PostgreSQL's classes 08 (connection exception) and 57P (shutting down,
/// starting up), and 25006 (a read-only standby).
fn connection_lost(e: &sea_orm::sqlx::Error) -> bool {
    use sea_orm::sqlx::Error;
    match e {
        Error::Io(_)
        | Error::Tls(_)
        | Error::Protocol(_)
        | Error::PoolTimedOut
        | Error::PoolClosed
        | Error::WorkerCrashed => true,
        Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "25006"),
        _ => false,
    }
}

impl From<DbErr> for StoreError {
    fn from(e: DbErr) -> Self {
        StoreError::Db(e)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The database behind the control plane.
#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
    /// The PostgreSQL pool, whose connect options (the writable host's)
    /// also make the sessions of their own that wake-ups and leadership
    /// need; none on SQLite.
    postgres: Option<sea_orm::sqlx::PgPool>,
}

/// Advisory lock keys (PostgreSQL, one 64-bit space per database). Spelled
/// as ASCII so `pg_locks` shows where they come from.
pub mod lock_keys {
    /// Held while migrations run: one server migrates, the others wait.
    pub const MIGRATE: i64 = 0x636f_7272_616c_4d47; // "corralMG"
    /// Held by the leader's session for as long as it leads.
    pub const LEADER: i64 = 0x636f_7272_616c_4c44; // "corralLD"
    /// Taken per transaction by every change to desired state, across servers.
    pub const CHANGE: i64 = 0x636f_7272_616c_4348; // "corralCH"
}

/// The SQLite URL of the default store in `state_dir`.
/// The default database's file in the state dir.
pub const SQLITE_FILE: &str = "corral.db";

pub fn sqlite_url(state_dir: &Path) -> String {
    format!(
        "sqlite://{}?mode=rwc",
        state_dir.join(SQLITE_FILE).display()
    )
}

impl Store {
    /// Connects and brings the schema up to date.
    #[tracing::instrument(skip(url), fields(backend = url.split(':').next().unwrap_or("")))]
    pub async fn connect(url: &str) -> Result<Self> {
        let options = |url: &str| {
            let mut opts = ConnectOptions::new(url.to_owned());
            opts.sqlx_logging(false)
                .connect_timeout(Duration::from_secs(10))
                .acquire_timeout(Duration::from_secs(10));
            opts
        };
        if url.starts_with("sqlite:") {
            let mut opts = options(url);
            // WAL lets readers run beside the one writer; NORMAL sync is
            // durable across process crashes, which is what a control plane
            // on one machine needs. busy_timeout rides out writer overlap.
            opts.max_connections(4).map_sqlx_sqlite_opts(|o| {
                o.journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(15))
                    .foreign_keys(true)
                    // Statement journals of multi-row inserts stay in memory
                    // instead of going through a temporary file.
                    .pragma("temp_store", "memory")
                    // Room for a 10,000-order change without spilling pages
                    // into the WAL before the commit (the default is 2 MiB).
                    .pragma("cache_size", "-16384")
            });
            let db = Database::connect(opts).await?;
            Migrator::up(&db, None).await?;
            return Ok(Self { db, postgres: None });
        }
        // One host, or a primary and its standbys: start on the writable one.
        let hosts = hosts::split(url).map_err(|reason| StoreError::Unreachable {
            target: "DATABASE_URL".into(),
            reason,
        })?;
        let writable = reach_postgres(&hosts).await?;
        let Some(host) = hosts.get(writable) else {
            return Err(StoreError::Corrupt("no PostgreSQL host".into()));
        };
        let mut opts = options(&host.url);
        opts.max_connections(16);
        let db = Database::connect(opts).await?;
        migrate_once(&db).await?;
        let pool = db.get_postgres_connection_pool().clone();
        if hosts.len() > 1 {
            tokio::spawn(hosts::follow_writable(pool.clone(), hosts, writable));
        }
        Ok(Self {
            db,
            postgres: Some(pool),
        })
    }

    /// The PostgreSQL pool, when the store is PostgreSQL (several servers
    /// may share it); none on SQLite (one server). Its connect options are
    /// the writable host's, also after a failover.
    pub fn postgres(&self) -> Option<&sea_orm::sqlx::PgPool> {
        self.postgres.as_ref()
    }

    pub fn conn(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Begins a transaction. On SQLite it takes the write lock at once (as
    /// `BEGIN IMMEDIATE` would): a deferred transaction that reads first
    /// cannot upgrade to writing once another connection has committed
    /// since its read (`SQLITE_BUSY_SNAPSHOT`, which no busy timeout waits
    /// out), as heartbeats do all the time. Transactions here read in order
    /// to write, so they wait for the lock up front instead.
    pub async fn begin(&self) -> Result<sea_orm::DatabaseTransaction> {
        let txn = self.db.begin().await?;
        if self.backend() == DbBackend::Sqlite {
            // A write statement that changes nothing still opens the write
            // transaction (busy_timeout applies while it waits).
            txn.execute_unprepared("UPDATE topology SET id = id WHERE 0")
                .await?;
        }
        Ok(txn)
    }

    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    pub async fn close(self) {
        let _ = self.db.close().await;
    }
}

/// Connects once to each host until one is writable, to say at start where
/// PostgreSQL could not be reached and why (the pool only says it timed
/// out); the writable host's index.
async fn reach_postgres(hosts: &[hosts::Host]) -> Result<usize> {
    hosts::find_writable(hosts).await.map_err(|said| {
        let database = hosts
            .first()
            .and_then(|h| h.options.get_database().map(str::to_owned))
            .unwrap_or_else(|| "of the user's name".into());
        let reasons: Vec<String> = said
            .iter()
            .map(|(target, probe)| match probe {
                hosts::Probe::Unreachable(why) => format!("{target}: {why}"),
                hosts::Probe::Standby => format!("{target}: a standby (in recovery), not writable"),
                hosts::Probe::Writable => format!("{target}: writable"),
            })
            .collect();
        match said.as_slice() {
            [(target, hosts::Probe::Unreachable(why))] => StoreError::Unreachable {
                target: format!("{target} (database {database})"),
                reason: why.clone(),
            },
            _ => StoreError::Unreachable {
                target: format!(
                    "any writable host of {} (database {database})",
                    said.iter()
                        .map(|(t, _)| t.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                reason: reasons.join("; "),
            },
        }
    })
}

/// Runs the migrations this server has and the database lacks, under an
/// advisory lock so that servers starting together migrate once. A database
/// already past this server's newest migration is refused, naming both.
async fn migrate_once(db: &DatabaseConnection) -> Result<()> {
    // The lock belongs to a session: hold one connection of the pool for it
    // while the migrations run on others.
    let mut session = db
        .get_postgres_connection_pool()
        .acquire()
        .await
        .map_err(sqlx_error)?;
    sea_orm::sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(lock_keys::MIGRATE)
        .execute(&mut *session)
        .await
        .map_err(sqlx_error)?;
    let result = async {
        let known: Vec<String> = Migrator::migrations()
            .iter()
            .map(|m| m.name().to_string())
            .collect();
        let applied = applied_migrations(db).await?;
        if let Some(unknown) = applied.iter().rev().find(|v| !known.contains(v)) {
            return Err(StoreError::SchemaNewer {
                database: unknown.clone(),
                server: known.last().cloned().unwrap_or_default(),
            });
        }
        Migrator::up(db, None).await?;
        Ok(())
    }
    .await;
    let _ = sea_orm::sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(lock_keys::MIGRATE)
        .execute(&mut *session)
        .await;
    result
}

/// A failure on a session of our own, as sea-orm's errors say it.
pub fn sqlx_error(e: sea_orm::sqlx::Error) -> DbErr {
    DbErr::Conn(sea_orm::RuntimeErr::SqlxError(std::sync::Arc::new(e)))
}

/// The migrations recorded in the database, oldest first (none on a new one).
async fn applied_migrations(db: &DatabaseConnection) -> Result<Vec<String>> {
    let exists = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT to_regclass('seaql_migrations') IS NOT NULL AS present",
        ))
        .await?
        .map(|row| row.try_get::<bool>("", "present"))
        .transpose()?
        .unwrap_or(false);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT version FROM seaql_migrations ORDER BY version",
        ))
        .await?;
    rows.iter()
        .map(|row| Ok(row.try_get::<String>("", "version")?))
        .collect()
}

// ---- topology -------------------------------------------------------------

pub async fn load_topology<C: ConnectionTrait>(c: &C) -> Result<Option<topology::Model>> {
    Ok(topology::Entity::find_by_id(1).one(c).await?)
}

pub async fn save_topology<C: ConnectionTrait>(
    c: &C,
    web: u32,
    db: u32,
    lb_policy: topology::LbPolicy,
    replication: topology::Replication,
    backup: Option<(String, i32)>,
    now: DateTime<Utc>,
) -> Result<()> {
    let (backup_schedule, backup_keep) = backup.map_or((None, None), |(s, k)| (Some(s), Some(k)));
    let row = topology::ActiveModel {
        id: Set(1),
        web: Set(web as i32),
        db: Set(db as i32),
        lb_policy: Set(lb_policy),
        replication: Set(replication),
        backup_schedule: Set(backup_schedule),
        backup_keep: Set(backup_keep),
        updated_at: Set(now),
    };
    topology::Entity::insert(row)
        .on_conflict(
            OnConflict::column(topology::Column::Id)
                .update_columns([
                    topology::Column::Web,
                    topology::Column::Db,
                    topology::Column::LbPolicy,
                    topology::Column::Replication,
                    topology::Column::BackupSchedule,
                    topology::Column::BackupKeep,
                    topology::Column::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(c)
        .await?;
    Ok(())
}

// ---- nodes ----------------------------------------------------------------

pub async fn all_nodes<C: ConnectionTrait>(c: &C) -> Result<Vec<node::Model>> {
    Ok(node::Entity::find()
        .order_by_asc(node::Column::Id)
        .all(c)
        .await?)
}

/// What the reconciler needs of a node: no agent token, and the observed
/// state only of db nodes (the only role whose observations it reads).
#[derive(Debug, Clone)]
pub struct NodeBrief {
    pub id: i32,
    pub name: String,
    pub role: node::Role,
    pub address: String,
    pub provider: node::Provider,
    pub state: node::State,
    pub last_seq: i64,
    pub observed: Option<String>,
}

pub async fn reconcile_nodes<C: ConnectionTrait>(c: &C) -> Result<Vec<NodeBrief>> {
    let sql = "SELECT id, name, role, address, provider, state, last_seq, \
               CASE WHEN role = 'db' THEN observed ELSE NULL END AS observed \
               FROM nodes ORDER BY id";
    let rows = c
        .query_all_raw(Statement::from_string(c.get_database_backend(), sql))
        .await?;
    rows.into_iter()
        .map(|row| {
            Ok(NodeBrief {
                id: row.try_get("", "id")?,
                name: row.try_get("", "name")?,
                role: row.try_get("", "role")?,
                address: row.try_get("", "address")?,
                provider: row.try_get("", "provider")?,
                state: row.try_get("", "state")?,
                last_seq: row.try_get("", "last_seq")?,
                observed: row.try_get("", "observed")?,
            })
        })
        .collect()
}

/// Every node's name and address, and nothing else: what the Consul ACL
/// keeper needs, cheap to read again at 10,000 nodes.
pub async fn node_names<C: ConnectionTrait>(c: &C) -> Result<Vec<(String, String)>> {
    let sql = "SELECT name, address FROM nodes ORDER BY id";
    let rows = c
        .query_all_raw(Statement::from_string(c.get_database_backend(), sql))
        .await?;
    rows.into_iter()
        .map(|row| Ok((row.try_get("", "name")?, row.try_get("", "address")?)))
        .collect()
}

/// How many nodes are in each lifecycle state.
pub async fn node_states<C: ConnectionTrait>(c: &C) -> Result<Vec<(String, u64)>> {
    let sql = "SELECT state, COUNT(*) AS n FROM nodes GROUP BY state ORDER BY state";
    let rows = c
        .query_all_raw(Statement::from_string(c.get_database_backend(), sql))
        .await?;
    rows.into_iter()
        .map(|row| {
            let n: i64 = row.try_get("", "n")?;
            Ok((row.try_get("", "state")?, Ord::max(n, 0) as u64))
        })
        .collect()
}

/// Every db node and the node named `name` whatever its role: what a
/// switchover request is judged on.
pub async fn db_nodes_and<C: ConnectionTrait>(c: &C, name: &str) -> Result<Vec<node::Model>> {
    Ok(node::Entity::find()
        .filter(
            node::Column::Role
                .eq(node::Role::Db)
                .or(node::Column::Name.eq(name)),
        )
        .order_by_asc(node::Column::Id)
        .all(c)
        .await?)
}

pub async fn node_by_name<C: ConnectionTrait>(c: &C, name: &str) -> Result<Option<node::Model>> {
    Ok(node::Entity::find()
        .filter(node::Column::Name.eq(name))
        .one(c)
        .await?)
}

pub async fn node_by_id<C: ConnectionTrait>(c: &C, id: i32) -> Result<Option<node::Model>> {
    Ok(node::Entity::find_by_id(id).one(c).await?)
}

pub async fn node_by_token_hash<C: ConnectionTrait>(
    c: &C,
    hash: &str,
) -> Result<Option<node::Model>> {
    Ok(node::Entity::find()
        .filter(node::Column::TokenHash.eq(hash))
        .one(c)
        .await?)
}

/// A node row to insert.
pub struct NewNodeRow<'a> {
    pub name: &'a str,
    pub role: node::Role,
    pub address: String,
    pub provider: node::Provider,
    pub state: node::State,
}

/// Largest number of rows per multi-row INSERT: SQLite allows 32766 bind
/// parameters per statement, PostgreSQL 65535.
const INSERT_CHUNK: usize = 1000;

/// Rows in groups of [`INSERT_CHUNK`], one multi-row INSERT each.
fn in_chunks<T>(rows: impl IntoIterator<Item = T>) -> impl Iterator<Item = Vec<T>> {
    let mut rows = rows.into_iter();
    std::iter::from_fn(move || {
        let chunk: Vec<T> = rows.by_ref().take(INSERT_CHUNK).collect();
        (!chunk.is_empty()).then_some(chunk)
    })
}

pub async fn insert_nodes<C: ConnectionTrait>(
    c: &C,
    rows: Vec<NewNodeRow<'_>>,
    now: DateTime<Utc>,
) -> Result<Vec<node::Model>> {
    let mut inserted = Vec::with_capacity(rows.len());
    let models = rows.into_iter().map(|r| node::ActiveModel {
        id: NotSet,
        name: Set(r.name.to_owned()),
        role: Set(r.role),
        address: Set(r.address),
        provider: Set(r.provider),
        state: Set(r.state),
        token_hash: Set(None),
        enroll_hash: Set(None),
        enroll_expires_at: Set(None),
        last_seq: Set(0),
        last_heartbeat: Set(None),
        observed: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
    });
    for chunk in in_chunks(models) {
        inserted.extend(
            node::Entity::insert_many(chunk)
                .exec_with_returning(c)
                .await?,
        );
    }
    Ok(inserted)
}

pub async fn set_node_state<C: ConnectionTrait>(
    c: &C,
    id: i32,
    state: node::State,
    now: DateTime<Utc>,
) -> Result<()> {
    node::Entity::update_many()
        .col_expr(node::Column::State, Expr::value(state))
        .col_expr(node::Column::UpdatedAt, Expr::value(now))
        .filter(node::Column::Id.eq(id))
        .exec(c)
        .await?;
    Ok(())
}

/// Trades the node's outstanding enrollment secret (by hash) for a token
/// (by hash), if the secret is still the node's and has not expired; the
/// secret is used up either way it matches. `false`: no such secret, so
/// nothing changed.
pub async fn enroll_node<C: ConnectionTrait>(
    c: &C,
    id: i32,
    secret_hash: &str,
    token_hash: &str,
    state: node::State,
    now: DateTime<Utc>,
) -> Result<bool> {
    let done = node::Entity::update_many()
        .col_expr(node::Column::TokenHash, Expr::value(token_hash))
        .col_expr(
            node::Column::EnrollHash,
            Expr::value(Option::<String>::None),
        )
        .col_expr(
            node::Column::EnrollExpiresAt,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .col_expr(node::Column::State, Expr::value(state))
        .col_expr(node::Column::UpdatedAt, Expr::value(now))
        .filter(node::Column::Id.eq(id))
        .filter(node::Column::EnrollHash.eq(secret_hash))
        .filter(node::Column::EnrollExpiresAt.gt(now))
        .exec(c)
        .await?;
    Ok(done.rows_affected == 1)
}

/// Makes `secret_hash` the node's one outstanding enrollment secret, valid
/// until `expires`; a secret minted before is no longer valid.
pub async fn set_enroll_secret<C: ConnectionTrait>(
    c: &C,
    id: i32,
    secret_hash: &str,
    expires: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<()> {
    node::Entity::update_many()
        .col_expr(node::Column::EnrollHash, Expr::value(secret_hash))
        .col_expr(node::Column::EnrollExpiresAt, Expr::value(expires))
        .col_expr(node::Column::UpdatedAt, Expr::value(now))
        .filter(node::Column::Id.eq(id))
        .exec(c)
        .await?;
    Ok(())
}

pub async fn record_heartbeat<C: ConnectionTrait>(
    c: &C,
    id: i32,
    observed_json: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    node::Entity::update_many()
        .col_expr(node::Column::Observed, Expr::value(observed_json))
        .col_expr(node::Column::LastHeartbeat, Expr::value(now))
        .filter(node::Column::Id.eq(id))
        .exec(c)
        .await?;
    Ok(())
}

pub async fn delete_node<C: ConnectionTrait>(c: &C, id: i32) -> Result<()> {
    // Orders go first explicitly: SQLite only cascades with foreign_keys on,
    // and the result must not depend on a connection setting.
    work_order::Entity::delete_many()
        .filter(work_order::Column::NodeId.eq(id))
        .exec(c)
        .await?;
    node::Entity::delete_many()
        .filter(node::Column::Id.eq(id))
        .exec(c)
        .await?;
    Ok(())
}

// ---- work orders ----------------------------------------------------------

/// The newest order of each kind of each node: `(node_id, kind, payload)`.
pub async fn latest_orders<C: ConnectionTrait>(
    c: &C,
) -> Result<Vec<(i32, work_order::Kind, String)>> {
    let sql = "SELECT w.node_id, w.kind, w.payload FROM work_orders w \
               JOIN (SELECT node_id, kind, MAX(seq) AS seq FROM work_orders GROUP BY node_id, kind) m \
               ON w.node_id = m.node_id AND w.seq = m.seq";
    let rows = c
        .query_all_raw(Statement::from_string(c.get_database_backend(), sql))
        .await?;
    rows.into_iter()
        .map(|row| {
            Ok((
                row.try_get::<i32>("", "node_id")?,
                row.try_get::<work_order::Kind>("", "kind")?,
                row.try_get::<String>("", "payload")?,
            ))
        })
        .collect()
}

/// The payload of the newest Consul order of any node, if there is one.
pub async fn newest_consul_order<C: ConnectionTrait>(c: &C) -> Result<Option<String>> {
    Ok(work_order::Entity::find()
        .filter(work_order::Column::Kind.eq(work_order::Kind::Consul))
        .order_by_desc(work_order::Column::Id)
        .one(c)
        .await?
        .map(|o| o.payload))
}

/// Deletes finished orders beyond the newest `keep` of each node, except the
/// newest order of each kind of each node (the reconciler's desired state
/// and what a fresh agent needs). Pending and delivered orders stay.
/// Returns how many went.
pub async fn prune_orders<C: ConnectionTrait>(c: &C, keep: u64) -> Result<u64> {
    // `keep` is a number from the configuration, not input: formatted in.
    let sql = format!(
        "DELETE FROM work_orders WHERE id IN (SELECT id FROM (\
           SELECT id, status, \
             ROW_NUMBER() OVER (PARTITION BY node_id ORDER BY seq DESC) AS newest, \
             ROW_NUMBER() OVER (PARTITION BY node_id, kind ORDER BY seq DESC) AS newest_of_kind \
           FROM work_orders) ranked \
         WHERE newest > {keep} AND newest_of_kind > 1 AND status IN ('applied', 'failed'))"
    );
    let done = c
        .execute_raw(Statement::from_string(c.get_database_backend(), sql))
        .await?;
    Ok(done.rows_affected())
}

/// Deletes events older than `before` and all but the newest `keep`.
/// Returns how many went.
pub async fn prune_events<C: ConnectionTrait>(
    c: &C,
    keep: u64,
    before: DateTime<Utc>,
) -> Result<u64> {
    let mut gone = event::Entity::delete_many()
        .filter(event::Column::At.lt(before))
        .exec(c)
        .await?
        .rows_affected;
    let oldest_kept = event::Entity::find()
        .select_only()
        .column(event::Column::Id)
        .order_by_desc(event::Column::Id)
        .offset(keep.saturating_sub(1))
        .limit(1)
        .into_tuple::<i64>()
        .one(c)
        .await?;
    if let Some(id) = oldest_kept {
        gone += event::Entity::delete_many()
            .filter(event::Column::Id.lt(id))
            .exec(c)
            .await?
            .rows_affected;
    }
    Ok(gone)
}

/// An order row to insert; `seq` is already allocated.
pub struct NewOrderRow {
    pub node_id: i32,
    pub seq: i64,
    pub kind: work_order::Kind,
    pub payload: String,
}

/// Inserts orders; returns how many.
pub async fn insert_orders<C: ConnectionTrait>(
    c: &C,
    rows: Vec<NewOrderRow>,
    now: DateTime<Utc>,
) -> Result<u64> {
    let mut inserted = 0;
    let models = rows.into_iter().map(|r| work_order::ActiveModel {
        id: NotSet,
        node_id: Set(r.node_id),
        seq: Set(r.seq),
        kind: Set(r.kind),
        payload: Set(r.payload),
        status: Set(work_order::Status::Pending),
        result: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
    });
    for chunk in in_chunks(models) {
        inserted += work_order::Entity::insert_many(chunk)
            .exec_without_returning(c)
            .await?;
    }
    Ok(inserted)
}

/// Adds `count` to the `last_seq` of every node in `ids`.
pub async fn advance_last_seq<C: ConnectionTrait>(c: &C, ids: &[i32], count: i64) -> Result<()> {
    for chunk in ids.chunks(INSERT_CHUNK * 10) {
        node::Entity::update_many()
            .col_expr(
                node::Column::LastSeq,
                Expr::col(node::Column::LastSeq).add(count),
            )
            .filter(node::Column::Id.is_in(chunk.iter().copied()))
            .exec(c)
            .await?;
    }
    Ok(())
}

pub async fn orders_after<C: ConnectionTrait>(
    c: &C,
    node_id: i32,
    after: i64,
    limit: u64,
) -> Result<Vec<work_order::Model>> {
    Ok(work_order::Entity::find()
        .filter(work_order::Column::NodeId.eq(node_id))
        .filter(work_order::Column::Seq.gt(after))
        .order_by_asc(work_order::Column::Seq)
        .limit(limit)
        .all(c)
        .await?)
}

/// Orders `first..=last` of every node in `ids`, by node then seq: the
/// batches another server filed, read back by a server it woke.
pub async fn orders_between<C: ConnectionTrait>(
    c: &C,
    ids: &[i32],
    first: i64,
    last: i64,
) -> Result<Vec<work_order::Model>> {
    let mut out = Vec::new();
    for chunk in ids.chunks(INSERT_CHUNK * 10) {
        out.extend(
            work_order::Entity::find()
                .filter(work_order::Column::NodeId.is_in(chunk.iter().copied()))
                .filter(work_order::Column::Seq.between(first, last))
                .order_by_asc(work_order::Column::NodeId)
                .order_by_asc(work_order::Column::Seq)
                .all(c)
                .await?,
        );
    }
    Ok(out)
}

pub async fn order<C: ConnectionTrait>(
    c: &C,
    node_id: i32,
    seq: i64,
) -> Result<Option<work_order::Model>> {
    Ok(work_order::Entity::find()
        .filter(work_order::Column::NodeId.eq(node_id))
        .filter(work_order::Column::Seq.eq(seq))
        .one(c)
        .await?)
}

/// The newest order of `kind` for a node that its agent has not finished
/// (pending or delivered), if any.
pub async fn unfinished_order<C: ConnectionTrait>(
    c: &C,
    node_id: i32,
    kind: work_order::Kind,
) -> Result<Option<work_order::Model>> {
    Ok(work_order::Entity::find()
        .filter(work_order::Column::NodeId.eq(node_id))
        .filter(work_order::Column::Kind.eq(kind))
        .filter(
            work_order::Column::Status
                .is_in([work_order::Status::Pending, work_order::Status::Delivered]),
        )
        .order_by_desc(work_order::Column::Seq)
        .one(c)
        .await?)
}

pub async fn finish_order<C: ConnectionTrait>(
    c: &C,
    id: i64,
    status: work_order::Status,
    result: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    work_order::Entity::update_many()
        .col_expr(work_order::Column::Status, Expr::value(status))
        .col_expr(work_order::Column::Result, Expr::value(result))
        .col_expr(work_order::Column::UpdatedAt, Expr::value(now))
        .filter(work_order::Column::Id.eq(id))
        .exec(c)
        .await?;
    Ok(())
}

/// Marks the pending orders up to `seq` of the nodes in `ids` delivered.
pub async fn mark_delivered<C: ConnectionTrait>(
    c: &C,
    ids: &[i32],
    upto: i64,
    now: DateTime<Utc>,
) -> Result<u64> {
    let mut affected = 0;
    for chunk in ids.chunks(INSERT_CHUNK) {
        let res = work_order::Entity::update_many()
            .col_expr(
                work_order::Column::Status,
                Expr::value(work_order::Status::Delivered),
            )
            .col_expr(work_order::Column::UpdatedAt, Expr::value(now))
            .filter(work_order::Column::NodeId.is_in(chunk.iter().copied()))
            .filter(work_order::Column::Seq.lte(upto))
            .filter(work_order::Column::Status.eq(work_order::Status::Pending))
            .exec(c)
            .await?;
        affected += res.rows_affected;
    }
    Ok(affected)
}

// ---- events ---------------------------------------------------------------

/// Events by id, oldest first (those pruned meanwhile are simply absent).
pub async fn events_by_id<C: ConnectionTrait>(c: &C, ids: &[i64]) -> Result<Vec<event::Model>> {
    let mut out = Vec::new();
    for chunk in ids.chunks(INSERT_CHUNK * 10) {
        out.extend(
            event::Entity::find()
                .filter(event::Column::Id.is_in(chunk.iter().copied()))
                .order_by_asc(event::Column::Id)
                .all(c)
                .await?,
        );
    }
    Ok(out)
}

/// The newest event's id, 0 for none.
pub async fn last_event_id<C: ConnectionTrait>(c: &C) -> Result<i64> {
    let row = c
        .query_one_raw(Statement::from_string(
            c.get_database_backend(),
            "SELECT COALESCE(MAX(id), 0) AS last FROM events",
        ))
        .await?;
    Ok(row
        .map(|r| r.try_get::<i64>("", "last"))
        .transpose()?
        .unwrap_or(0))
}

/// What the reconciler's cache of last orders depends on, in three numbers:
/// the newest order's id (any order filed moves it; pruning never deletes
/// the newest), the newest node's id and the number of nodes (a node
/// created or removed moves one of them).
pub async fn orders_generation<C: ConnectionTrait>(c: &C) -> Result<(i64, i64, i64)> {
    let row = c
        .query_one_raw(Statement::from_string(
            c.get_database_backend(),
            "SELECT (SELECT COALESCE(MAX(id), 0) FROM work_orders) AS orders, \
             (SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM nodes) AS newest, \
             (SELECT COUNT(*) FROM nodes) AS nodes",
        ))
        .await?
        .ok_or_else(|| StoreError::Corrupt("no row from a SELECT of counts".into()))?;
    Ok((
        row.try_get::<i64>("", "orders")?,
        row.try_get::<i64>("", "newest")?,
        row.try_get::<i64>("", "nodes")?,
    ))
}

/// Waits for, and takes until the transaction ends, the lock every change
/// to desired state takes on PostgreSQL, where other servers change it too.
pub async fn lock_changes<C: ConnectionTrait>(c: &C) -> Result<()> {
    c.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_advisory_xact_lock($1)",
        [lock_keys::CHANGE.into()],
    ))
    .await?;
    Ok(())
}

/// `NOTIFY channel, payload` on PostgreSQL; inside a transaction it is sent
/// only if and when it commits.
pub async fn notify<C: ConnectionTrait>(c: &C, channel: &str, payloads: &[String]) -> Result<()> {
    for payload in payloads {
        c.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_notify($1, $2)",
            [channel.into(), payload.clone().into()],
        ))
        .await?;
    }
    Ok(())
}

pub struct NewEvent {
    pub actor: String,
    pub kind: String,
    pub subject: String,
    pub message: String,
}

pub async fn insert_events<C: ConnectionTrait>(
    c: &C,
    events: Vec<NewEvent>,
    now: DateTime<Utc>,
) -> Result<Vec<event::Model>> {
    let mut inserted = Vec::with_capacity(events.len());
    let models = events.into_iter().map(|e| event::ActiveModel {
        id: NotSet,
        at: Set(now),
        actor: Set(e.actor),
        kind: Set(e.kind),
        subject: Set(e.subject),
        message: Set(e.message),
    });
    for chunk in in_chunks(models) {
        inserted.extend(
            event::Entity::insert_many(chunk)
                .exec_with_returning(c)
                .await?,
        );
    }
    // RETURNING gives no order guarantee for multi-row inserts.
    inserted.sort_by_key(|e| e.id);
    Ok(inserted)
}

pub async fn events_after<C: ConnectionTrait>(
    c: &C,
    after: i64,
    limit: u64,
) -> Result<Vec<event::Model>> {
    Ok(event::Entity::find()
        .filter(event::Column::Id.gt(after))
        .order_by_asc(event::Column::Id)
        .limit(limit)
        .all(c)
        .await?)
}

/// The newest `limit` events, oldest first.
pub async fn latest_events<C: ConnectionTrait>(c: &C, limit: u64) -> Result<Vec<event::Model>> {
    let mut events = event::Entity::find()
        .order_by_desc(event::Column::Id)
        .limit(limit)
        .all(c)
        .await?;
    events.reverse();
    Ok(events)
}

/// Nodes whose last heartbeat is older than `before` (and that have one).
pub async fn nodes_with_heartbeat_before<C: ConnectionTrait>(
    c: &C,
    before: DateTime<Utc>,
) -> Result<Vec<node::Model>> {
    Ok(node::Entity::find()
        .filter(node::Column::LastHeartbeat.lt(before))
        .all(c)
        .await?)
}

// ---- backups ----------------------------------------------------------------

pub async fn insert_backup<C: ConnectionTrait>(
    c: &C,
    node: &str,
    trigger: &str,
    now: DateTime<Utc>,
) -> Result<backup::Model> {
    let row = backup::ActiveModel {
        id: NotSet,
        node: Set(node.to_string()),
        status: Set(backup::Status::Running),
        trigger: Set(trigger.to_string()),
        started_at: Set(now),
        finished_at: Set(None),
        size_bytes: Set(0),
        files: Set("[]".into()),
        wal_start_lsn: Set(None),
        wal_end_lsn: Set(None),
        timeline: Set(None),
        error: Set(None),
        s3_copied_at: Set(None),
    };
    Ok(backup::Entity::insert(row).exec_with_returning(c).await?)
}

pub async fn backup_by_id<C: ConnectionTrait>(c: &C, id: i64) -> Result<Option<backup::Model>> {
    Ok(backup::Entity::find_by_id(id).one(c).await?)
}

/// The newest `limit` backups, newest first.
pub async fn list_backups<C: ConnectionTrait>(c: &C, limit: u64) -> Result<Vec<backup::Model>> {
    Ok(backup::Entity::find()
        .order_by_desc(backup::Column::Id)
        .limit(limit)
        .all(c)
        .await?)
}

/// The newest backup that finished (done) at or before `at`.
pub async fn done_backup_before<C: ConnectionTrait>(
    c: &C,
    at: DateTime<Utc>,
) -> Result<Option<backup::Model>> {
    Ok(backup::Entity::find()
        .filter(backup::Column::Status.eq(backup::Status::Done))
        .filter(backup::Column::FinishedAt.lte(at))
        .order_by_desc(backup::Column::FinishedAt)
        .one(c)
        .await?)
}

/// The backup still being taken, if any.
pub async fn running_backup<C: ConnectionTrait>(c: &C) -> Result<Option<backup::Model>> {
    Ok(backup::Entity::find()
        .filter(backup::Column::Status.eq(backup::Status::Running))
        .order_by_desc(backup::Column::Id)
        .one(c)
        .await?)
}

/// Records how a running backup ended; a backup already finished is left
/// as it is (false).
#[allow(clippy::too_many_arguments)]
pub async fn finish_backup<C: ConnectionTrait>(
    c: &C,
    id: i64,
    status: backup::Status,
    size_bytes: i64,
    files: &str,
    wal: (Option<String>, Option<String>, Option<i32>),
    error: Option<String>,
    now: DateTime<Utc>,
) -> Result<bool> {
    let res = backup::Entity::update_many()
        .col_expr(backup::Column::Status, Expr::value(status))
        .col_expr(backup::Column::SizeBytes, Expr::value(size_bytes))
        .col_expr(backup::Column::Files, Expr::value(files))
        .col_expr(backup::Column::WalStartLsn, Expr::value(wal.0))
        .col_expr(backup::Column::WalEndLsn, Expr::value(wal.1))
        .col_expr(backup::Column::Timeline, Expr::value(wal.2))
        .col_expr(backup::Column::Error, Expr::value(error))
        .col_expr(backup::Column::FinishedAt, Expr::value(Some(now)))
        .filter(backup::Column::Id.eq(id))
        .filter(backup::Column::Status.eq(backup::Status::Running))
        .exec(c)
        .await?;
    Ok(res.rows_affected == 1)
}

/// Notes that every file of backup `id` is in the offsite bucket.
pub async fn mark_backup_in_s3<C: ConnectionTrait>(
    c: &C,
    id: i64,
    at: DateTime<Utc>,
) -> Result<()> {
    backup::Entity::update_many()
        .col_expr(backup::Column::S3CopiedAt, Expr::value(Some(at)))
        .filter(backup::Column::Id.eq(id))
        .exec(c)
        .await?;
    Ok(())
}

pub async fn delete_backup<C: ConnectionTrait>(c: &C, id: i64) -> Result<()> {
    backup::Entity::delete_by_id(id).exec(c).await?;
    Ok(())
}

/// Notes that the leader saw a host agent of `provider` poll at `at`.
pub async fn host_agent_seen<C: ConnectionTrait>(
    c: &C,
    provider: &str,
    at: DateTime<Utc>,
) -> Result<()> {
    let mut upsert = sea_orm::sea_query::Query::insert();
    upsert
        .into_table("host_agents")
        .columns(["provider", "seen_at"])
        .values_panic([provider.into(), at.into()])
        .on_conflict(
            OnConflict::column("provider")
                .update_column("seen_at")
                .to_owned(),
        );
    let backend = c.get_database_backend();
    c.execute_raw(backend.build(&upsert)).await?;
    Ok(())
}

/// When the leader last saw a host agent of `provider` poll.
pub async fn host_agent_seen_at<C: ConnectionTrait>(
    c: &C,
    provider: &str,
) -> Result<Option<DateTime<Utc>>> {
    let mut select = sea_orm::sea_query::Query::select();
    select
        .column("seen_at")
        .from("host_agents")
        .and_where(Expr::col("provider").eq(provider));
    let backend = c.get_database_backend();
    Ok(match c.query_one_raw(backend.build(&select)).await? {
        Some(row) => Some(row.try_get::<DateTime<Utc>>("", "seen_at")?),
        None => None,
    })
}
