//! What host agents call (`corral-agent host`): long-poll machine orders
//! while reporting the machines they hold, and answer each order.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use corral_proto::{ErrorBody, HostOrders, HostPoll, MachineResult, Provider};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{Body, parse_wait};
use crate::auth::Caller;
use crate::cluster::Cluster;
use crate::error::ApiError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/hosts/{provider}/poll").route(web::post().to(poll)))
        .service(
            web::resource("/hosts/{provider}/orders/{id}/result")
                .route(web::post().to(order_result)),
        );
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct HostPollQuery {
    /// How long to hold the request when there is no order: `30s`, `500ms`,
    /// `1m` or plain seconds; capped at the server's maximum. `0` answers
    /// at once.
    #[param(pattern = "^[0-9]{1,9}(ms|s|m)?$", example = "30s")]
    wait: Option<String>,
}

/// Long poll of a host agent: records the machines it holds, answers at
/// once with new orders (and those it was given but no longer works on),
/// else holds until one is filed or `wait` ends. While a host agent polls,
/// nodes of its provider can be added (through any server: the leader,
/// which alone answers these polls, notes them in the database).
#[utoipa::path(
    post,
    path = "/api/v1/hosts/{provider}/poll",
    tag = "hosts",
    security(("bearer" = [])),
    params(
        ("provider" = Provider, Path, description = "The provider the host agent makes machines of"),
        HostPollQuery,
    ),
    request_body = HostPoll,
    responses(
        (status = 200, description = "Machine orders, possibly none (the wait ended)", body = HostOrders),
        (status = 400, description = "Malformed JSON, path or query", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Not the admin token", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Unknown field, a bad machine name, or `provider_not_configured`: no host agents make this provider's machines here", body = ErrorBody),
        (status = 503, description = "This server does not lead (with several servers, only the leader files machine orders): ask another", body = ErrorBody),
    )
)]
pub async fn poll(
    cluster: web::Data<Cluster>,
    caller: Caller,
    provider: web::Path<Provider>,
    query: web::Query<HostPollQuery>,
    body: Body<HostPoll>,
) -> Result<web::Json<HostOrders>, ApiError> {
    let wait = match &query.wait {
        Some(w) => parse_wait(w)?,
        None => Duration::ZERO,
    };
    Ok(web::Json(
        cluster
            .host_poll(provider.into_inner(), body.into_inner(), wait, &caller)
            .await?,
    ))
}

/// A host agent's answer to a machine order, with the machines it holds
/// now.
#[utoipa::path(
    post,
    path = "/api/v1/hosts/{provider}/orders/{id}/result",
    tag = "hosts",
    security(("bearer" = [])),
    params(
        ("provider" = Provider, Path, description = "The provider the host agent makes machines of"),
        ("id" = u64, Path, description = "The machine order's id", minimum = 0),
    ),
    request_body = MachineResult,
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "Malformed JSON or path", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Not the admin token", body = ErrorBody),
        (status = 404, description = "No such order waits for an answer (answered already, or the server restarted)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Unknown field, message too long, or `provider_not_configured`", body = ErrorBody),
    )
)]
pub async fn order_result(
    cluster: web::Data<Cluster>,
    caller: Caller,
    path: web::Path<(Provider, u64)>,
    body: Body<MachineResult>,
) -> Result<HttpResponse, ApiError> {
    let (provider, id) = path.into_inner();
    cluster.host_result(provider, id, body.into_inner(), &caller)?;
    Ok(HttpResponse::NoContent().finish())
}
