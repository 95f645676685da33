//! Metrics: agents send their samples (`POST /agents/{node}/metrics`), the
//! UI and scripts read series back (`GET /metrics?node=&name=&from=&to=`),
//! and Prometheus scrapes the control plane itself (`GET /metrics` at the
//! root, without a token, like `/healthz`).

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use corral_proto::{ErrorBody, MetricName, MetricSeries, MetricsAccepted, MetricsBatch};
use serde::Deserialize;
use utoipa::IntoParams;

use super::Body;
use crate::auth::Caller;
use crate::cluster::{Cluster, SeriesQuery};
use crate::error::ApiError;

/// Latest time a query may name: the end of year 9999, as RFC 3339 can.
const MAX_TIME: i64 = 253_402_300_799;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/agents/{name}/metrics").route(web::post().to(post_metrics)))
        .service(web::resource("/metrics").route(web::get().to(get_metrics)));
}

/// The root route for Prometheus, outside `/api/v1`.
pub fn exposition_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/metrics").route(web::get().to(exposition)));
}

/// Stores a batch of the node's samples (raw for a day, 5-minute
/// aggregates for 30 days). Samples older than a day or more than 5
/// minutes ahead of the server's clock are skipped and counted.
#[utoipa::path(
    post,
    path = "/api/v1/agents/{name}/metrics",
    tag = "agents",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$")),
    request_body = MetricsBatch,
    responses(
        (status = 200, description = "Stored", body = MetricsAccepted),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Another node's agent token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Unknown field or metric name, over 100 samples, a value that is not finite", body = ErrorBody),
    )
)]
pub async fn post_metrics(
    cluster: web::Data<Cluster>,
    caller: Caller,
    name: web::Path<String>,
    body: Body<MetricsBatch>,
) -> Result<web::Json<MetricsAccepted>, ApiError> {
    caller.require_node(&name)?;
    Ok(web::Json(
        cluster.record_metrics(&name, &body.into_inner()).await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct MetricsQuery {
    /// One node's series (default: every node that has points).
    #[param(pattern = "^[a-z][a-z0-9-]{0,62}$")]
    node: Option<String>,
    /// The metric: `cpu.host`, `cpu.node`, `mem.used`, `mem.node_rss`,
    /// `disk.used_pct`, `net.rx`, `net.tx`, `nginx.requests`, `nginx.5xx`,
    /// `webapp.requests`, `webapp.latency_ms`, `webapp.latency_p95_ms`,
    /// `pg.commits`, `pg.connections`, `pg.lag_bytes`.
    #[param(example = "nginx.requests", value_type = MetricName)]
    name: String,
    /// Start: RFC 3339 or seconds since the Unix epoch (default: an hour
    /// before `to`).
    #[param(
        example = "2026-12-03T15:00:00Z",
        pattern = "^([0-9]{1,12}|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2}))?$"
    )]
    from: Option<String>,
    /// End: RFC 3339 or seconds since the Unix epoch (default: now; also
    /// when empty, as is `from`).
    #[param(
        pattern = "^([0-9]{1,12}|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2}))?$"
    )]
    to: Option<String>,
    /// Seconds between points, 10 (raw) or 300 (5-minute aggregates);
    /// default: raw for ranges within the last day of at most six hours.
    step: Option<i64>,
}

/// A time as the query gives it: RFC 3339 or seconds since the epoch.
fn parse_time(what: &str, value: &str) -> Result<i64, ApiError> {
    let seconds = match value.trim().parse::<i64>() {
        Ok(s) => s,
        // An offset's `+` arrives as a space when the query was not
        // percent-encoded (`from=2026-12-03T16:00:00+01:00` typed in curl).
        Err(_) => DateTime::parse_from_rfc3339(&value.trim().replace(' ', "+"))
            .map(|t| t.timestamp())
            .map_err(|e| {
                ApiError::BadRequest(format!(
                    "{what}={value:?} is not a time: give RFC 3339 (2026-12-03T15:00:00Z) \
                     or seconds since the Unix epoch ({e})"
                ))
            })?,
    };
    if !(0..=MAX_TIME).contains(&seconds) {
        return Err(ApiError::BadRequest(format!(
            "{what}={seconds} is outside 0..={MAX_TIME} seconds since the Unix epoch"
        )));
    }
    Ok(seconds)
}

/// The parsed query: a bad name or time is a 400 naming it.
fn series_query(q: &MetricsQuery, now: i64) -> Result<SeriesQuery, ApiError> {
    let name: MetricName = q.name.parse().map_err(ApiError::BadRequest)?;
    // An empty value is no value (`to=` from a form left blank).
    let given = |v: &Option<String>| v.clone().filter(|v| !v.trim().is_empty());
    let to = match given(&q.to) {
        Some(t) => parse_time("to", &t)?,
        None => now,
    };
    let from = match given(&q.from) {
        Some(f) => parse_time("from", &f)?,
        None => (to - 3600).max(0),
    };
    Ok(SeriesQuery {
        node: q.node.clone(),
        name,
        from,
        to,
        step: q.step,
    })
}

/// A metric over a time range, per node, oldest point first.
#[utoipa::path(
    get,
    path = "/api/v1/metrics",
    tag = "metrics",
    security(("bearer" = [])),
    params(MetricsQuery),
    responses(
        (status = 200, description = "The series", body = MetricSeries),
        (status = 400, description = "Unknown metric name, a time that does not parse or is out of range, a malformed query", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 422, description = "from after to, or a step other than 10 or 300", body = ErrorBody),
    )
)]
pub async fn get_metrics(
    cluster: web::Data<Cluster>,
    caller: Caller,
    query: web::Query<MetricsQuery>,
) -> Result<web::Json<MetricSeries>, ApiError> {
    caller.require_admin()?;
    let q = series_query(&query, Utc::now().timestamp())?;
    Ok(web::Json(cluster.metric_series(q).await?))
}

/// The control plane's own figures in Prometheus text format: nodes by
/// state, orders filed and delivered, long polls held, event streams open,
/// HTTP responses by class. No token, like `/healthz`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses(
        (status = 200, description = "Prometheus text exposition 0.0.4", content_type = "text/plain; version=0.0.4", body = String),
        (status = 503, description = "The state database is unreachable", body = ErrorBody),
    )
)]
pub async fn exposition(cluster: web::Data<Cluster>) -> Result<HttpResponse, ApiError> {
    let snapshot = crate::prometheus::Snapshot {
        nodes: crate::store::node_states(cluster.store().conn())
            .await
            .map_err(crate::cluster::ClusterError::from)?,
        long_polls: cluster.waiting_polls_total() as u64,
        leader: cluster.is_leader(),
    };
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(crate::prometheus::render(cluster.counters(), &snapshot)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, from: Option<&str>, to: Option<&str>) -> MetricsQuery {
        MetricsQuery {
            node: None,
            name: name.into(),
            from: from.map(String::from),
            to: to.map(String::from),
            step: None,
        }
    }

    #[test]
    fn times_parse_as_rfc3339_or_epoch_seconds_and_default_to_the_last_hour() {
        let q = series_query(&query("cpu.host", None, None), 10_000).expect("ok");
        assert_eq!((q.from, q.to), (6_400, 10_000));
        let q = series_query(
            &query(
                "pg.lag_bytes",
                Some("2026-12-03T15:00:00Z"),
                Some("1796310000"),
            ),
            0,
        )
        .expect("ok");
        assert_eq!(q.from, 1_796_310_000);
        assert_eq!(q.name, MetricName::PgLagBytes);
        let q = series_query(
            &query("cpu.host", Some("2026-12-03T16:00:00 01:00"), None),
            0,
        )
        .expect("an unencoded + reads as a space");
        assert_eq!(q.from, 1_796_310_000);
    }

    #[test]
    fn bad_names_and_times_are_400_naming_what_is_wrong() {
        for (q, needle) in [
            (query("cpu.hots", None, None), "unknown metric"),
            (
                query("cpu.host", Some("yesterday"), None),
                "from=\"yesterday\"",
            ),
            (query("cpu.host", None, Some("-5")), "outside"),
            (
                query("cpu.host", Some("99999999999999999999"), None),
                "not a time",
            ),
            (
                query("cpu.host", Some("10000-01-01T00:00:00Z"), None),
                "not a time",
            ),
        ] {
            match series_query(&q, 0) {
                Err(ApiError::BadRequest(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("{q:?}: {other:?}"),
            }
        }
    }
}
