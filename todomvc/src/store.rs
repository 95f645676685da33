//! The SQL behind the API, one function per operation, each on one
//! connection the caller chose (primary or replica; see `cluster`).
//!
//! Every read starts with a *fence*: in the same statement, and so evaluated
//! after the statement's snapshot was taken, it reports whether the server
//! is in recovery, its WAL position (replayed on a replica, inserted on a
//! primary) and its start time. The position is then at or past everything
//! the read saw, which is what the client's session cookie must carry.

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use sqlx::migrate::{MigrateError, Migration, MigrationType, Migrator};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use crate::lsn::Lsn;
use crate::todo::{NewTodo, Todo, TodoPatch, TodoUrl, TodoView};

/// The schema, embedded in the binary and applied to a primary when it is
/// first found (sqlx's migrator takes an advisory lock, so several app
/// instances starting together apply it once).
pub fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        Cow::Borrowed("create todos"),
        MigrationType::Simple,
        sqlx::SqlSafeStr::into_sql_str(include_str!("../migrations/0001_create_todos.sql")),
        false,
    )])
}

/// Applies the schema on `conn`. `run_direct` rather than `run`: the
/// `Acquire` bound of `run` is not general enough for a future that must be
/// `Send` (a spawned task); sqlx keeps `run_direct` public for exactly that.
pub fn migrate(conn: &mut PgConnection) -> BoxFuture<'_, Result<(), MigrateError>> {
    Box::pin(async move { migrator().run_direct(None, conn, false).await })
}

/// What a server said about itself in the same statement as a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    /// In recovery, i.e. a replica.
    pub standby: bool,
    /// Replayed (replica) or inserted (primary) WAL position.
    pub lsn: Option<Lsn>,
    /// Postmaster start time, in microseconds: tells one run of a server from
    /// the next, across which a replica's position may go backwards.
    pub started: i64,
}

/// Prefixes a read with the fence; `MATERIALIZED` evaluates it exactly once.
macro_rules! fenced {
    ($query:literal) => {
        concat!(
            "WITH fence AS MATERIALIZED (SELECT pg_is_in_recovery() AS standby, \
             (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                   ELSE pg_current_wal_insert_lsn() END)::text AS lsn, \
             (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::int8 AS started) ",
            $query
        )
    };
}

fn fence(row: &PgRow) -> Result<Fence, sqlx::Error> {
    let lsn: Option<String> = row.try_get("lsn")?;
    Ok(Fence {
        standby: row.try_get("standby")?,
        lsn: lsn.and_then(|l| l.parse().ok()),
        started: row.try_get("started")?,
    })
}

/// A todo from a row whose todo columns may be NULL (the fence's outer join
/// when there is no todo).
fn maybe_todo(row: &PgRow) -> Result<Option<Todo>, sqlx::Error> {
    let Some(id) = row.try_get::<Option<i64>, _>("id")? else {
        return Ok(None);
    };
    Ok(Some(Todo {
        id,
        title: row.try_get("title")?,
        completed: row.try_get("completed")?,
        order: row.try_get("order")?,
    }))
}

fn todo(row: &PgRow) -> Result<Todo, sqlx::Error> {
    Ok(Todo {
        id: row.try_get("id")?,
        title: row.try_get("title")?,
        completed: row.try_get("completed")?,
        order: row.try_get("order")?,
    })
}

/// The todos of a list read, still in the rows they came in: decoding them
/// into owned todos would copy every title once more on the way to JSON,
/// and the list is the hot path.
pub struct TodoRows(Vec<PgRow>);

impl TodoRows {
    /// Borrowed views of the todos, in list order (the fence's row, the one
    /// without a todo, is skipped).
    pub fn views<'r>(&'r self, base: &'r str) -> Result<Vec<TodoView<'r>>, sqlx::Error> {
        let mut views = Vec::with_capacity(self.0.len());
        for row in &self.0 {
            // Columns by position, as selected in `list`: 3 id, 4 title,
            // 5 completed, 6 order.
            let Some(id) = row.try_get::<Option<i64>, _>(3)? else {
                continue;
            };
            views.push(TodoView {
                id,
                title: row.try_get(4)?,
                completed: row.try_get(5)?,
                order: row.try_get(6)?,
                url: TodoUrl { base, id },
            });
        }
        // The query's UNION ALL keeps the sorted branch's order in every
        // plan PostgreSQL makes for it, but SQL does not promise that
        // without an outer ORDER BY, which would sort every list a second
        // time on the server. Sorting here costs one pass when the rows
        // are already in order (a stable sort finds the single run).
        views.sort_by_key(|v| (v.order.is_none(), v.order, v.id));
        Ok(views)
    }

    /// The todos, owned (for the list cache, which outlives the rows).
    pub fn todos(&self) -> Result<Vec<Todo>, sqlx::Error> {
        self.views("")?
            .into_iter()
            .map(|v| {
                Ok(Todo {
                    id: v.id,
                    title: v.title.to_string(),
                    completed: v.completed,
                    order: v.order,
                })
            })
            .collect()
    }
}

/// Up to `limit` todos from `offset` on, in the client's `order` and then in
/// creation order.
///
/// The fence comes once, in a row of its own (its todo columns NULL), rather
/// than joined onto every todo: that join repeated three columns a hundred
/// times over the wire and made the server sort the list twice (the
/// profile of `GET /todos` had PostgreSQL at 40 % of the machine; this shape
/// answers about 25 % more of these queries per second on the same server).
pub async fn list(
    conn: &mut PgConnection,
    limit: i64,
    offset: i64,
) -> Result<(Fence, TodoRows), sqlx::Error> {
    let rows = sqlx::query(fenced!(
        "(SELECT f.standby, f.lsn, f.started, NULL::int8 AS id, NULL::text AS title, \
           NULL::bool AS completed, NULL::int8 AS \"order\" FROM fence f) \
         UNION ALL \
         (SELECT NULL, NULL, NULL, id, title, completed, \"order\" FROM todos \
           ORDER BY \"order\" NULLS LAST, id LIMIT $1 OFFSET $2)"
    ))
    .bind(limit)
    .bind(offset)
    .fetch_all(conn)
    .await?;
    let mut fenced = None;
    for row in &rows {
        if row.try_get::<Option<i64>, _>(3)?.is_none() {
            fenced = Some(fence(row)?);
            break;
        }
    }
    let fenced = fenced.ok_or_else(|| sqlx::Error::Protocol("the fence returned no row".into()))?;
    Ok((fenced, TodoRows(rows)))
}

pub async fn get(conn: &mut PgConnection, id: i64) -> Result<(Fence, Option<Todo>), sqlx::Error> {
    let row = sqlx::query(fenced!(
        "SELECT f.standby, f.lsn, f.started, t.id, t.title, t.completed, t.\"order\" \
         FROM fence f LEFT JOIN todos t ON t.id = $1"
    ))
    .bind(id)
    .fetch_one(conn)
    .await?;
    Ok((fence(&row)?, maybe_todo(&row)?))
}

pub async fn insert(conn: &mut PgConnection, new: NewTodo) -> Result<Todo, sqlx::Error> {
    let row = sqlx::query(
        "INSERT INTO todos (title, completed, \"order\") VALUES ($1, $2, $3) \
         RETURNING id, title, completed, \"order\"",
    )
    .bind(new.title)
    .bind(new.completed)
    .bind(new.order)
    .fetch_one(conn)
    .await?;
    todo(&row)
}

pub async fn update(
    conn: &mut PgConnection,
    id: i64,
    patch: TodoPatch,
) -> Result<Option<Todo>, sqlx::Error> {
    let row = sqlx::query(
        "UPDATE todos SET title = COALESCE($2, title), completed = COALESCE($3, completed), \
         \"order\" = CASE WHEN $4 THEN $5 ELSE \"order\" END \
         WHERE id = $1 RETURNING id, title, completed, \"order\"",
    )
    .bind(id)
    .bind(patch.title)
    .bind(patch.completed)
    .bind(patch.order.is_some())
    .bind(patch.order.flatten())
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(todo).transpose()
}

/// True when there was such a todo.
pub async fn delete(conn: &mut PgConnection, id: i64) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM todos WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

pub async fn delete_all(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("DELETE FROM todos").execute(conn).await?;
    Ok(done.rows_affected())
}

/// A floor for the list cache: writes a tiny non-transactional WAL record
/// (a logical decoding message; nothing decodes it, and it needs no flush)
/// and returns the position right after it. Any position a client was given
/// before is below it, even on an idle server.
pub async fn wal_floor(conn: &mut PgConnection) -> Result<Option<Lsn>, sqlx::Error> {
    let lsn: Option<String> =
        sqlx::query_scalar("SELECT pg_logical_emit_message(false, 'todomvc', '')::text")
            .fetch_one(conn)
            .await?;
    Ok(lsn.and_then(|l| l.parse().ok()))
}

/// The primary's WAL insert position, asked right after a write committed:
/// it is at or past the write's commit record (the flushed position need not
/// be, with asynchronous commit), so a replica that has replayed this far
/// shows the write.
pub async fn insert_lsn(conn: &mut PgConnection) -> Result<Option<Lsn>, sqlx::Error> {
    let lsn: Option<String> = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(conn)
        .await?;
    Ok(lsn.and_then(|l| l.parse().ok()))
}

/// A server's role and position, as the prober sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerStatus {
    pub standby: bool,
    /// Replayed (replica) or inserted (primary) position.
    pub lsn: Option<Lsn>,
    /// Received from the primary (replica only).
    pub received: Option<Lsn>,
    pub replay_paused: bool,
    pub started: i64,
    /// The timeline a primary writes on. Each promotion starts a higher one,
    /// so of two servers out of recovery the higher timeline is the newer
    /// primary (the other, an old primary back without being fenced).
    pub timeline: Option<u32>,
}

pub async fn server_status(conn: &mut PgConnection) -> Result<ServerStatus, sqlx::Error> {
    let row = sqlx::query(
        "SELECT pg_is_in_recovery() AS standby, \
         (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
               ELSE pg_current_wal_insert_lsn() END)::text AS lsn, \
         pg_last_wal_receive_lsn()::text AS received, \
         (CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END) AS paused, \
         (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::int8 AS started, \
         (CASE WHEN pg_is_in_recovery() THEN NULL \
               ELSE substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8) END) AS timeline",
    )
    .fetch_one(conn)
    .await?;
    let lsn = |name: &str| -> Result<Option<Lsn>, sqlx::Error> {
        let text: Option<String> = row.try_get(name)?;
        Ok(text.and_then(|l| l.parse().ok()))
    };
    Ok(ServerStatus {
        standby: row.try_get("standby")?,
        lsn: lsn("lsn")?,
        received: lsn("received")?,
        replay_paused: row.try_get("paused")?,
        started: row.try_get("started")?,
        // A WAL file's name starts with its timeline, in hex.
        timeline: row
            .try_get::<Option<String>, _>("timeline")?
            .and_then(|t| u32::from_str_radix(&t, 16).ok()),
    })
}
