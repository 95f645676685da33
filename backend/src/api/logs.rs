//! `POST /agents/{node}/logs` and `GET /nodes/{node}/logs`: the HTTP edge
//! of the service logs (`cluster::logs`, where they are kept and followed).

use std::time::Duration;

use actix_web::{HttpResponse, web};
use corral_proto::{
    ErrorBody, KEPT_LOG_LINES, LogBatch, LogLine, MAX_LOG_GREP_CHARS, validate_service_name,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::Body;
use crate::auth::Caller;
use crate::cluster::Cluster;
use crate::error::ApiError;
use crate::store::logs::LogFilter;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/agents/{name}/logs").route(web::post().to(post_logs)))
        .service(web::resource("/nodes/{name}/logs").route(web::get().to(get_logs)));
}

/// Ships new lines of one of the node's services. The cluster keeps the
/// last 500 lines of each (node, service), and 1 MiB of text a node, in its
/// database.
#[utoipa::path(
    post,
    path = "/api/v1/agents/{name}/logs",
    tag = "agents",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$")),
    request_body = LogBatch,
    responses(
        (status = 204, description = "Kept"),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Another node's agent token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Unknown field, bad service name, too many or too long lines, or too many services", body = ErrorBody),
    )
)]
pub async fn post_logs(
    cluster: web::Data<Cluster>,
    caller: Caller,
    name: web::Path<String>,
    body: Body<LogBatch>,
) -> Result<HttpResponse, ApiError> {
    caller.require_node(&name)?;
    let batch = body.into_inner();
    batch.validate().map_err(ApiError::Unprocessable)?;
    cluster.append_logs(&name, batch).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct LogsQuery {
    /// Only this service's lines (default: all, merged in order of arrival).
    #[param(pattern = "^[a-z][a-z0-9_-]{0,31}$")]
    service: Option<String>,
    /// The newest this many lines (default 100); with `after`, the oldest
    /// this many after it.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
    /// Only lines containing this text (plain, case-sensitive; at most 200
    /// characters).
    #[param(max_length = 200)]
    grep: Option<String>,
    /// Follow: only lines with a `seq` greater than this, oldest first.
    #[param(minimum = 0)]
    after: Option<u64>,
    /// With `after`, how long to hold the request when nothing is new:
    /// `30s`, `500ms`, `1m` or plain seconds; capped at the server's
    /// maximum poll wait (60 s by default). `0` (the default) answers at
    /// once, as does any wait without `after` (the newest lines).
    #[param(pattern = "^[0-9]{1,9}(ms|s|m)?$", example = "30s")]
    wait: Option<String>,
}

/// The newest kept log lines of a node, oldest first; or, with `after`,
/// those after it, held as a long poll until one arrives or `wait` ends.
#[utoipa::path(
    get,
    path = "/api/v1/nodes/{name}/logs",
    tag = "nodes",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$"),
        LogsQuery,
    ),
    responses(
        (status = 200, description = "Log lines, oldest first; empty when the wait ended", body = Vec<LogLine>),
        (status = 400, description = "Malformed query, service name, limit, grep or wait", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    )
)]
pub async fn get_logs(
    cluster: web::Data<Cluster>,
    caller: Caller,
    name: web::Path<String>,
    query: web::Query<LogsQuery>,
) -> Result<web::Json<Vec<LogLine>>, ApiError> {
    caller.require_admin()?;
    if let Some(service) = &query.service {
        validate_service_name(service).map_err(ApiError::BadRequest)?;
    }
    let limit = match query.limit {
        None => 100,
        Some(n) if (1..=KEPT_LOG_LINES as u64).contains(&n) => n,
        Some(n) => {
            return Err(ApiError::BadRequest(format!(
                "limit={n} is out of range 1..={KEPT_LOG_LINES}"
            )));
        }
    };
    if let Some(grep) = &query.grep
        && grep.chars().count() > MAX_LOG_GREP_CHARS
    {
        return Err(ApiError::BadRequest(format!(
            "grep is longer than {MAX_LOG_GREP_CHARS} characters"
        )));
    }
    // Without `after` the answer is the newest lines, at once: a wait
    // (still checked) has nothing to wait for.
    let wait = match (&query.wait, query.after) {
        (None, _) => Duration::ZERO,
        (Some(w), None) => {
            super::agents::parse_wait(w)?;
            Duration::ZERO
        }
        (Some(w), Some(_)) => super::agents::parse_wait(w)?.min(cluster.config().max_poll_wait),
    };
    let filter = LogFilter {
        service: query.service.as_deref(),
        grep: query.grep.as_deref().filter(|g| !g.is_empty()),
    };
    Ok(web::Json(
        cluster
            .log_lines(&name, filter, query.after, limit, wait)
            .await?,
    ))
}
