//! `/api/v1/db`: operations on the PostgreSQL cluster as a whole, such as a
//! planned switchover of the primary.

use actix_web::{HttpResponse, web};
use corral_proto::{ErrorBody, SwitchoverAccepted, SwitchoverRequest};

use super::Body;
use crate::auth::Caller;
use crate::cluster::Cluster;
use crate::error::ApiError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/db/switchover").route(web::post().to(switchover)));
}

/// Hands the primary role to the standby `to` without losing a write: files
/// a `switchover` order on the current primary, whose agent demotes it
/// cleanly and promotes `to` once it has caught up. Follow the order in
/// `GET /nodes/{from}/orders`; its result says how it went.
#[utoipa::path(
    post,
    path = "/api/v1/db/switchover",
    tag = "db",
    security(("bearer" = [])),
    request_body = SwitchoverRequest,
    responses(
        (status = 202, description = "The order is filed on the current primary", body = SwitchoverAccepted),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "The cluster cannot switch over now: `no_primary` (none, or more than one, reports primary), `already_primary`, `not_a_standby` (the target is not a replica with a recent heartbeat), `not_caught_up` (more than 16 MiB behind), `node_leaving` (draining) or `switchover_in_progress`", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Unknown field, or the node is not a db node", body = ErrorBody),
    )
)]
pub async fn switchover(
    cluster: web::Data<Cluster>,
    caller: Caller,
    body: Body<SwitchoverRequest>,
) -> Result<HttpResponse, ApiError> {
    let accepted = cluster.switchover(body.into_inner(), &caller).await?;
    Ok(HttpResponse::Accepted().json(accepted))
}
