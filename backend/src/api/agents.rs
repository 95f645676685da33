//! What node agents call: enroll with their node's secret, long-poll their
//! orders, report each order's result, and send heartbeats.

use std::time::Duration;

use actix_web::web;
use corral_proto::{
    EnrollRequest, EnrollResponse, ErrorBody, Heartbeat, Node, Order, OrderResult, PollResponse,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::Body;
use super::non_negative;
use crate::auth::Caller;
use crate::cluster::Cluster;
use crate::error::ApiError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/agents/enroll").route(web::post().to(enroll)))
        .service(web::resource("/agents/{name}/orders").route(web::get().to(poll_orders)))
        .service(
            web::resource("/agents/{name}/orders/{seq}/result").route(web::post().to(order_result)),
        )
        .service(web::resource("/agents/{name}/heartbeat").route(web::post().to(heartbeat)));
}

/// Trades the node's single-use enrollment secret for the node's own agent
/// token. Enrolling again (with a newly minted secret) replaces the
/// previous token.
#[utoipa::path(
    post,
    path = "/api/v1/agents/enroll",
    tag = "agents",
    request_body = EnrollRequest,
    responses(
        (status = 200, description = "The node's token (shown once)", body = EnrollResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 403, description = "No valid secret for this node: wrong, used or expired, or no such node, or adm1", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Unknown field or invalid node name", body = ErrorBody),
    )
)]
pub async fn enroll(
    cluster: web::Data<Cluster>,
    body: Body<EnrollRequest>,
) -> Result<web::Json<EnrollResponse>, ApiError> {
    Ok(web::Json(cluster.enroll(body.into_inner()).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct PollQuery {
    /// The highest `seq` the agent has; orders after it are returned.
    #[param(minimum = 0)]
    after: Option<i64>,
    /// How long to hold the request when nothing is new: `30s`, `500ms`,
    /// `1m` or plain seconds; capped at the server's maximum (60 s by
    /// default). `0` answers at once.
    #[param(pattern = "^[0-9]{1,9}(ms|s|m)?$", example = "30s")]
    wait: Option<String>,
}

/// Parses a wait like `30s`, `500ms`, `1m` or `30` (seconds).
pub fn parse_wait(s: &str) -> Result<Duration, ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "wait={s:?} is not a duration like 30s, 500ms or 1m"
        ))
    };
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    if digits.is_empty() || digits.len() > 9 {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(bad()),
    }
}

/// Long poll: answers at once when orders after `after` exist; otherwise
/// holds until one is filed for this node (a few ms later) or `wait` ends,
/// then answers with none.
#[utoipa::path(
    get,
    path = "/api/v1/agents/{name}/orders",
    tag = "agents",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$"),
        PollQuery,
    ),
    responses(
        (status = 200, description = "Orders after `after`, oldest first (at most 100); empty when the wait ended", body = PollResponse),
        (status = 400, description = "Malformed query", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Another node's agent token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "`after` is beyond the node's last order", body = ErrorBody),
    )
)]
pub async fn poll_orders(
    cluster: web::Data<Cluster>,
    caller: Caller,
    name: web::Path<String>,
    query: web::Query<PollQuery>,
) -> Result<web::Json<PollResponse>, ApiError> {
    let after = non_negative("after", query.after)?.unwrap_or(0);
    let wait = match &query.wait {
        Some(w) => parse_wait(w)?,
        None => Duration::ZERO,
    };
    Ok(web::Json(cluster.poll(&name, after, wait, &caller).await?))
}

/// Reports what became of an order. Reporting the same outcome again is
/// harmless; a different outcome for a finished order is a conflict. An
/// applied `drain` removes the node.
#[utoipa::path(
    post,
    path = "/api/v1/agents/{name}/orders/{seq}/result",
    tag = "agents",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$"),
        ("seq" = i64, Path, description = "The order's seq", minimum = 1),
    ),
    request_body = OrderResult,
    responses(
        (status = 200, description = "The order with its new status", body = Order),
        (status = 400, description = "Malformed JSON or path", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Another node's agent token", body = ErrorBody),
        (status = 404, description = "No such node or order", body = ErrorBody),
        (status = 409, description = "The order already finished otherwise", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Unknown field or message too long", body = ErrorBody),
    )
)]
pub async fn order_result(
    cluster: web::Data<Cluster>,
    caller: Caller,
    path: web::Path<(String, i64)>,
    body: Body<OrderResult>,
) -> Result<web::Json<Order>, ApiError> {
    let (name, seq) = path.into_inner();
    Ok(web::Json(
        cluster
            .order_result(&name, seq, body.into_inner(), &caller)
            .await?,
    ))
}

/// Reports the node's observed state; marks it heard from.
#[utoipa::path(
    post,
    path = "/api/v1/agents/{name}/heartbeat",
    tag = "agents",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$")),
    request_body = Heartbeat,
    responses(
        (status = 200, description = "The node as now recorded", body = Node),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Another node's agent token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Unknown field or a value out of bounds", body = ErrorBody),
    )
)]
pub async fn heartbeat(
    cluster: web::Data<Cluster>,
    caller: Caller,
    name: web::Path<String>,
    body: Body<Heartbeat>,
) -> Result<web::Json<Node>, ApiError> {
    Ok(web::Json(
        cluster.heartbeat(&name, body.into_inner(), &caller).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_parse_with_units() {
        assert_eq!(parse_wait("30s").ok(), Some(Duration::from_secs(30)));
        assert_eq!(parse_wait("30").ok(), Some(Duration::from_secs(30)));
        assert_eq!(parse_wait("250ms").ok(), Some(Duration::from_millis(250)));
        assert_eq!(parse_wait("2m").ok(), Some(Duration::from_secs(120)));
        for bad in ["", "s", "-1s", "1h", "1.5s", "9999999999s", "30 s"] {
            assert!(parse_wait(bad).is_err(), "{bad:?} accepted");
        }
    }
}
