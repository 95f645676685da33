//! Service log lines in the database (`log_lines`): appended by the agents'
//! batches, read newest-first or after a seq, and bounded per node as they
//! are appended. Every statement runs the same on SQLite and PostgreSQL;
//! only the function that finds a substring is named per backend.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Alias, Expr, Func};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, ExprTrait, QueryFilter, QueryOrder,
    QuerySelect, Statement, TransactionSession, TransactionTrait,
};

use super::Result;
use super::entity::log_line;

/// Which lines a reader wants.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogFilter<'a> {
    pub service: Option<&'a str>,
    /// Only lines containing this text (as `grep -F`: plain, case-sensitive).
    pub grep: Option<&'a str>,
}

/// Where the rows of a read are.
enum From {
    Newest,
    After(i64),
}

/// The services a node keeps lines of.
pub async fn services<C: ConnectionTrait>(c: &C, node: &str) -> Result<Vec<String>> {
    Ok(log_line::Entity::find()
        .select_only()
        .column(log_line::Column::Service)
        .distinct()
        .filter(log_line::Column::Node.eq(node))
        .into_tuple()
        .all(c)
        .await?)
}

/// Appends lines of one service of `node` in one transaction, then drops
/// what passes the bounds: the service's lines beyond `per_service` and the
/// node's oldest lines (over all its services) beyond `node_bytes` of text.
/// Returns the seq of the last line written.
pub async fn append<C: ConnectionTrait + TransactionTrait>(
    c: &C,
    node: &str,
    service: &str,
    at: DateTime<Utc>,
    lines: Vec<String>,
    per_service: u64,
    node_bytes: u64,
) -> Result<Option<i64>> {
    if lines.is_empty() {
        return Ok(None);
    }
    let txn = c.begin().await?;
    let backend = txn.get_database_backend();
    // 4 values a row: far below SQLite's 32,766 bound variables.
    for chunk in lines.chunks(1000) {
        let rows = chunk.iter().map(|line| log_line::ActiveModel {
            node: sea_orm::Set(node.to_string()),
            service: sea_orm::Set(service.to_string()),
            at: sea_orm::Set(at),
            line: sea_orm::Set(line.clone()),
            ..Default::default()
        });
        log_line::Entity::insert_many(rows)
            .exec_without_returning(&txn)
            .await?;
    }
    let last: Option<i64> = log_line::Entity::find()
        .select_only()
        .column_as(log_line::Column::Id.max(), "last")
        .filter(log_line::Column::Node.eq(node))
        .into_tuple()
        .one(&txn)
        .await?
        .flatten();
    let (p, q) = placeholders(backend);
    // The service's newest `per_service` lines stay.
    txn.execute_raw(Statement::from_sql_and_values(
        backend,
        format!(
            "DELETE FROM log_lines WHERE node = {p} AND service = {q} AND id <= \
             (SELECT id FROM log_lines WHERE node = {p} AND service = {q} \
              ORDER BY id DESC LIMIT 1 OFFSET {per_service})"
        ),
        [node.into(), service.into()],
    ))
    .await?;
    // Then the node's newest `node_bytes` of text, over all services.
    let bytes = match backend {
        DbBackend::Postgres => "octet_length(line)",
        _ => "length(CAST(line AS BLOB))",
    };
    let total: i64 = txn
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            format!("SELECT COALESCE(SUM({bytes}), 0) AS total FROM log_lines WHERE node = {p}"),
            [node.into()],
        ))
        .await?
        .map(|row| row.try_get::<i64>("", "total"))
        .transpose()?
        .unwrap_or(0);
    if total > node_bytes as i64 {
        let sizes = txn
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                format!(
                    "SELECT id, {bytes} AS size FROM log_lines WHERE node = {p} ORDER BY id DESC"
                ),
                [node.into()],
            ))
            .await?;
        let mut kept = 0i64;
        let mut cut = None;
        for row in &sizes {
            kept += row.try_get::<i64>("", "size")?;
            if kept > node_bytes as i64 {
                cut = Some(row.try_get::<i64>("", "id")?);
                break;
            }
        }
        if let Some(cut) = cut {
            log_line::Entity::delete_many()
                .filter(log_line::Column::Node.eq(node))
                .filter(log_line::Column::Id.lte(cut))
                .exec(&txn)
                .await?;
        }
    }
    txn.commit().await?;
    Ok(last)
}

/// The placeholders of a statement whose values are (node, service).
fn placeholders(backend: DbBackend) -> (&'static str, &'static str) {
    match backend {
        DbBackend::Postgres => ("$1", "$2"),
        _ => ("?1", "?2"),
    }
}

async fn read<C: ConnectionTrait>(
    c: &C,
    node: &str,
    filter: LogFilter<'_>,
    from: From,
    limit: u64,
) -> Result<Vec<log_line::Model>> {
    let mut query = log_line::Entity::find().filter(log_line::Column::Node.eq(node));
    if let Some(service) = filter.service {
        query = query.filter(log_line::Column::Service.eq(service));
    }
    if let Some(grep) = filter.grep {
        let position = match c.get_database_backend() {
            DbBackend::Postgres => Func::cust(Alias::new("strpos"))
                .arg(Expr::col(log_line::Column::Line))
                .arg(grep),
            _ => Func::cust(Alias::new("instr"))
                .arg(Expr::col(log_line::Column::Line))
                .arg(grep),
        };
        query = query.filter(Expr::expr(position).gt(0));
    }
    let rows = match from {
        From::Newest => {
            let mut rows = query
                .order_by_desc(log_line::Column::Id)
                .limit(limit)
                .all(c)
                .await?;
            rows.reverse();
            rows
        }
        From::After(after) => {
            query
                .filter(log_line::Column::Id.gt(after))
                .order_by_asc(log_line::Column::Id)
                .limit(limit)
                .all(c)
                .await?
        }
    };
    Ok(rows)
}

/// The newest `limit` lines of a node that pass `filter`, oldest first.
pub async fn recent<C: ConnectionTrait>(
    c: &C,
    node: &str,
    filter: LogFilter<'_>,
    limit: u64,
) -> Result<Vec<log_line::Model>> {
    read(c, node, filter, From::Newest, limit).await
}

/// The oldest `limit` lines of a node after seq `after` that pass `filter`.
pub async fn after<C: ConnectionTrait>(
    c: &C,
    node: &str,
    filter: LogFilter<'_>,
    after: i64,
    limit: u64,
) -> Result<Vec<log_line::Model>> {
    read(c, node, filter, From::After(after), limit).await
}

/// Deletes the lines of nodes that are gone; returns how many.
pub async fn prune_removed<C: ConnectionTrait>(c: &C) -> Result<u64> {
    let backend = c.get_database_backend();
    let done = c
        .execute_raw(Statement::from_string(
            backend,
            "DELETE FROM log_lines WHERE node NOT IN (SELECT name FROM nodes)",
        ))
        .await?;
    Ok(done.rows_affected())
}
