//! Metric points in the database: raw 10-second samples as agents send
//! them, 5-minute aggregates made from them, and the pruning that bounds
//! both. Every statement runs the same on SQLite and PostgreSQL.
//!
//! Aggregation follows `metric_dirty`: an ingest marks the (node, 5-minute
//! bucket) pairs it wrote into, in its own transaction, and the leader's
//! roll-up claims the marks of closed buckets by deleting them *first*, then
//! (re)computes those buckets' aggregates. An ingest racing the roll-up on
//! PostgreSQL either committed before the aggregate's statement (seen) or
//! marks its bucket again once the roll-up commits (re-aggregated next
//! time), so late samples — an agent's backlog after an outage — land in
//! the aggregate too.

use corral_proto::metrics::{RAW_KEEP_SECS, ROLLUP_KEEP_SECS, ROLLUP_SECS, SAMPLE_SECS};
use corral_proto::{MetricName, MetricPoint};
use sea_orm::sea_query::{OnConflict, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Statement, TransactionTrait, Value,
};

use super::Result;
use super::entity::metric_point;

/// The start of the slot of `step` seconds that `at` falls in.
pub fn slot(at: i64, step: i64) -> i64 {
    at.div_euclid(step) * step
}

/// The step a range is served at: raw points while the range starts within
/// the raw retention and spans at most six hours (at most 2,160 points per
/// node), 5-minute aggregates otherwise.
pub fn step_for(from: i64, to: i64, now: i64) -> i64 {
    if from >= now - RAW_KEEP_SECS && to - from <= 6 * 3600 {
        SAMPLE_SECS
    } else {
        ROLLUP_SECS
    }
}

/// One raw value to store.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RawPoint {
    pub name: MetricName,
    /// Any second: filed under its 10-second slot.
    pub at: i64,
    pub value: f64,
}

/// Stores raw points of `node` (a point already in its slot is replaced)
/// and marks their 5-minute buckets for the roll-up, in one transaction.
pub async fn insert_raw(c: &DatabaseConnection, node: &str, points: &[RawPoint]) -> Result<u64> {
    if points.is_empty() {
        return Ok(0);
    }
    let txn = c.begin().await?;
    let mut written = 0;
    // 6 values a row: far below SQLite's 32,766 bound variables.
    for chunk in points.chunks(1000) {
        let rows = chunk.iter().map(|p| metric_point::ActiveModel {
            node: sea_orm::Set(node.to_string()),
            name: sea_orm::Set(p.name.code()),
            step: sea_orm::Set(SAMPLE_SECS as i16),
            at: sea_orm::Set(slot(p.at, SAMPLE_SECS)),
            value: sea_orm::Set(p.value),
            max: sea_orm::Set(p.value),
        });
        written += metric_point::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::columns([
                    metric_point::Column::Node,
                    metric_point::Column::Name,
                    metric_point::Column::Step,
                    metric_point::Column::At,
                ])
                .update_columns([metric_point::Column::Value, metric_point::Column::Max])
                .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
    }
    let mut buckets: Vec<i64> = points.iter().map(|p| slot(p.at, ROLLUP_SECS)).collect();
    buckets.sort_unstable();
    buckets.dedup();
    let mut mark = Query::insert();
    mark.into_table("metric_dirty")
        .columns(["node", "bucket"])
        .on_conflict(
            OnConflict::columns(["node", "bucket"])
                .do_nothing()
                .to_owned(),
        );
    for bucket in buckets {
        mark.values_panic([node.into(), bucket.into()]);
    }
    let backend = txn.get_database_backend();
    txn.execute_raw(backend.build(&mark)).await?;
    txn.commit().await?;
    Ok(written)
}

/// The newest 5-minute bucket that has closed by `cutoff`.
pub fn last_closed_bucket(cutoff: i64) -> i64 {
    slot(cutoff, ROLLUP_SECS) - ROLLUP_SECS
}

/// Aggregates every marked bucket that closed before `cutoff` (seconds since
/// the epoch) into 5-minute points (mean and max); returns how many buckets.
pub async fn roll_up(c: &DatabaseConnection, cutoff: i64) -> Result<u64> {
    let txn = c.begin().await?;
    let backend = txn.get_database_backend();
    let last_bucket = last_closed_bucket(cutoff);
    // `last_bucket` is a number computed here, not input: formatted in.
    let claimed = txn
        .query_all_raw(Statement::from_string(
            backend,
            format!(
                "DELETE FROM metric_dirty WHERE bucket <= {last_bucket} RETURNING node, bucket"
            ),
        ))
        .await?;
    let mut pairs = Vec::with_capacity(claimed.len());
    for row in &claimed {
        pairs.push((
            row.try_get::<String>("", "node")?,
            row.try_get::<i64>("", "bucket")?,
        ));
    }
    for chunk in pairs.chunks(500) {
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 2);
        let mut rows = Vec::with_capacity(chunk.len());
        for (node, bucket) in chunk {
            let n = values.len();
            rows.push(match backend {
                DbBackend::Postgres => format!("(${}, ${}::bigint)", n + 1, n + 2),
                _ => "(?, ?)".to_string(),
            });
            values.push(node.clone().into());
            values.push((*bucket).into());
        }
        // SQLite needs a WHERE in an INSERT ... SELECT with an upsert (its
        // parser would take the ON of a join for the conflict clause).
        let sql = format!(
            "WITH d(node, bucket) AS (VALUES {rows}) \
             INSERT INTO metric_points (node, name, step, at, value, max) \
             SELECT p.node, p.name, {ROLLUP_SECS}, d.bucket, AVG(p.value), MAX(p.max) \
             FROM metric_points p JOIN d ON p.node = d.node \
             WHERE p.step = {SAMPLE_SECS} AND p.at >= d.bucket AND p.at < d.bucket + {ROLLUP_SECS} \
             GROUP BY p.node, p.name, d.bucket \
             ON CONFLICT (node, name, step, at) DO UPDATE SET value = excluded.value, max = excluded.max",
            rows = rows.join(", "),
        );
        txn.execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?;
    }
    txn.commit().await?;
    Ok(pairs.len() as u64)
}

/// Deletes raw points older than a day and aggregates older than 30 days
/// (both before `now`); returns how many rows went.
pub async fn prune<C: ConnectionTrait>(c: &C, now: i64) -> Result<u64> {
    let mut gone = 0;
    for (step, keep) in [
        (SAMPLE_SECS, RAW_KEEP_SECS),
        (ROLLUP_SECS, ROLLUP_KEEP_SECS),
    ] {
        gone += metric_point::Entity::delete_many()
            .filter(metric_point::Column::Step.eq(step as i16))
            .filter(metric_point::Column::At.lt(now - keep))
            .exec(c)
            .await?
            .rows_affected;
    }
    Ok(gone)
}

/// The points of `name` of each of `nodes` at `step` in `from..=to`, per
/// node (nodes without points left out), oldest first.
pub async fn series<C: ConnectionTrait>(
    c: &C,
    nodes: &[String],
    name: MetricName,
    step: i64,
    from: i64,
    to: i64,
) -> Result<Vec<(String, Vec<MetricPoint>)>> {
    let rows: Vec<(String, i64, f64, f64)> = metric_point::Entity::find()
        .select_only()
        .columns([
            metric_point::Column::Node,
            metric_point::Column::At,
            metric_point::Column::Value,
            metric_point::Column::Max,
        ])
        .filter(metric_point::Column::Node.is_in(nodes.iter().cloned()))
        .filter(metric_point::Column::Name.eq(name.code()))
        .filter(metric_point::Column::Step.eq(step as i16))
        .filter(metric_point::Column::At.between(slot(from, step), to))
        .order_by_asc(metric_point::Column::Node)
        .order_by_asc(metric_point::Column::At)
        .into_tuple()
        .all(c)
        .await?;
    let mut out: Vec<(String, Vec<MetricPoint>)> = Vec::new();
    for (node, at, value, max) in rows {
        let point = MetricPoint { at, value, max };
        match out.last_mut() {
            Some((n, points)) if *n == node => points.push(point),
            _ => out.push((node, vec![point])),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_filed_under_the_slot_they_fall_in() {
        assert_eq!(slot(1_700_000_007, 10), 1_700_000_000);
        assert_eq!(slot(1_700_000_010, 10), 1_700_000_010);
        assert_eq!(slot(1_700_000_299, 300), 1_700_000_100);
        assert_eq!(slot(-1, 10), -10, "before the epoch still floors");
    }

    #[test]
    fn only_buckets_that_closed_before_the_cutoff_are_rolled_up() {
        // Bucket 600 covers 600..900: closed at 900.
        assert_eq!(last_closed_bucket(900), 600);
        assert_eq!(last_closed_bucket(1199), 600);
        assert_eq!(last_closed_bucket(1200), 900);
    }

    #[test]
    fn short_recent_ranges_are_served_raw_and_the_rest_aggregated() {
        let now = 10_000_000;
        assert_eq!(step_for(now - 3600, now, now), SAMPLE_SECS);
        assert_eq!(step_for(now - 6 * 3600, now, now), SAMPLE_SECS);
        assert_eq!(
            step_for(now - 7 * 3600, now, now),
            ROLLUP_SECS,
            "too long for raw"
        );
        assert_eq!(
            step_for(now - 2 * RAW_KEEP_SECS, now - 2 * RAW_KEEP_SECS + 60, now),
            ROLLUP_SECS,
            "raw points of then are pruned"
        );
    }
}
