//! Service logs: agents ship the lines their children print
//! (`POST /agents/{node}/logs`); the UI reads the newest of them
//! (`GET /nodes/{node}/logs`). Only the last [`KEPT_LOG_LINES`] lines of each
//! (node, service) are kept, in memory: they are a window for a person
//! looking at a node, not an archive, so they do not go to the database.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::PoisonError;

use actix_web::{HttpResponse, web};
use chrono::Utc;
use corral_proto::{ErrorBody, KEPT_LOG_LINES, LogBatch, LogLine, validate_service_name};
use serde::Deserialize;
use utoipa::IntoParams;

use super::Body;
use crate::auth::Caller;
use crate::cluster::{Cluster, ClusterError};
use crate::error::ApiError;

/// Most services one node may keep logs of, so a confused agent cannot
/// grow the server's memory without bound.
pub const MAX_SERVICES_PER_NODE: usize = 16;

/// The kept lines of every (node, service); one per server, shared by all
/// workers.
#[derive(Default)]
pub struct ServiceLogs {
    inner: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    next_seq: u64,
    by_node: HashMap<String, HashMap<String, VecDeque<LogLine>>>,
}

impl ServiceLogs {
    /// Appends a validated batch, dropping the oldest lines past the limit.
    pub fn append(&self, node: &str, batch: LogBatch) -> Result<(), ApiError> {
        let mut kept = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Kept { next_seq, by_node } = &mut *kept;
        let services = by_node.entry(node.to_string()).or_default();
        if !services.contains_key(&batch.service) && services.len() >= MAX_SERVICES_PER_NODE {
            return Err(ApiError::Unprocessable(format!(
                "{node} already keeps logs of {MAX_SERVICES_PER_NODE} services; \
                 {:?} would be one more",
                batch.service
            )));
        }
        let at = Utc::now();
        let lines = services.entry(batch.service.clone()).or_default();
        for line in batch.lines {
            *next_seq += 1;
            lines.push_back(LogLine {
                seq: *next_seq,
                service: batch.service.clone(),
                at,
                line,
            });
        }
        let excess = lines.len().saturating_sub(KEPT_LOG_LINES);
        lines.drain(..excess);
        Ok(())
    }

    /// The newest `limit` lines of a node (of one service, or of all merged
    /// in order of arrival), oldest first.
    pub fn recent(&self, node: &str, service: Option<&str>, limit: usize) -> Vec<LogLine> {
        let kept = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(services) = kept.by_node.get(node) else {
            return Vec::new();
        };
        let mut lines: Vec<LogLine> = services
            .iter()
            .filter(|(name, _)| service.is_none_or(|s| s == name.as_str()))
            .flat_map(|(_, lines)| lines.iter().rev().take(limit).cloned())
            .collect();
        lines.sort_unstable_by_key(|l| l.seq);
        let skip = lines.len().saturating_sub(limit);
        lines.drain(..skip);
        lines
    }

    /// Drops what a node left behind (it was removed).
    pub fn forget(&self, node: &str) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_node
            .remove(node);
    }
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/agents/{name}/logs").route(web::post().to(post_logs)))
        .service(web::resource("/nodes/{name}/logs").route(web::get().to(get_logs)));
}

fn logs_of(req_logs: Option<web::Data<ServiceLogs>>) -> Result<web::Data<ServiceLogs>, ApiError> {
    req_logs.ok_or_else(|| ApiError::Internal("service log store missing from app".into()))
}

/// Ships new lines of one of the node's services. The server keeps the
/// last 500 lines of each (node, service) in memory.
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
    logs: Option<web::Data<ServiceLogs>>,
    caller: Caller,
    name: web::Path<String>,
    body: Body<LogBatch>,
) -> Result<HttpResponse, ApiError> {
    caller.require_node(&name)?;
    let batch = body.into_inner();
    batch.validate().map_err(ApiError::Unprocessable)?;
    // Only nodes that exist keep logs (an admin could name any).
    cluster.node(&name).await?;
    logs_of(logs)?.append(&name, batch)?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct LogsQuery {
    /// Only this service's lines (default: all, merged in order of arrival).
    #[param(pattern = "^[a-z][a-z0-9_-]{0,31}$")]
    service: Option<String>,
    /// The newest this many lines (default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
}

/// The newest kept log lines of a node, oldest first.
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
        (status = 200, description = "Log lines, oldest first", body = Vec<LogLine>),
        (status = 400, description = "Malformed query or service name", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    )
)]
pub async fn get_logs(
    cluster: web::Data<Cluster>,
    logs: Option<web::Data<ServiceLogs>>,
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
        Some(n) if (1..=KEPT_LOG_LINES as u64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::BadRequest(format!(
                "limit={n} is out of range 1..={KEPT_LOG_LINES}"
            )));
        }
    };
    let logs = logs_of(logs)?;
    if let Err(e) = cluster.node(&name).await {
        if matches!(e, ClusterError::NotFound(_)) {
            logs.forget(&name);
        }
        return Err(e.into());
    }
    Ok(web::Json(logs.recent(
        &name,
        query.service.as_deref(),
        limit,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(service: &str, lines: &[&str]) -> LogBatch {
        LogBatch {
            service: service.into(),
            lines: lines.iter().map(|l| l.to_string()).collect(),
        }
    }

    #[test]
    fn only_the_newest_lines_are_kept_per_service() {
        let logs = ServiceLogs::default();
        for i in 0..3 {
            let lines: Vec<String> = (0..200).map(|j| format!("{}", i * 200 + j)).collect();
            let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
            logs.append("nginx1", batch("nginx", &lines))
                .expect("append");
        }
        logs.append("nginx1", batch("consul", &["c"]))
            .expect("append");
        let nginx = logs.recent("nginx1", Some("nginx"), 1000);
        assert_eq!(nginx.len(), KEPT_LOG_LINES);
        assert_eq!(nginx.first().map(|l| l.line.as_str()), Some("100"));
        assert_eq!(nginx.last().map(|l| l.line.as_str()), Some("599"));
        let all = logs.recent("nginx1", None, 2);
        let lines: Vec<_> = all.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(lines, ["599", "c"], "merged in order of arrival");
        assert!(logs.recent("nginx2", None, 10).is_empty());
    }

    #[test]
    fn a_node_keeps_logs_of_a_bounded_number_of_services() {
        let logs = ServiceLogs::default();
        for i in 0..MAX_SERVICES_PER_NODE {
            logs.append("pg1", batch(&format!("s{i}"), &["x"]))
                .expect("append");
        }
        assert!(matches!(
            logs.append("pg1", batch("one-more", &["x"])),
            Err(ApiError::Unprocessable(_))
        ));
        logs.append("pg1", batch("s0", &["y"]))
            .expect("a known service still appends");
    }
}
