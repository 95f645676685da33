//! `GET|PUT /api/v1/topology`: the desired shape of the cluster.

use actix_web::{HttpResponse, web};
use corral_proto::{ErrorBody, Topology, TopologyChange, TopologyUpdate};

use super::Body;
use crate::auth::Caller;
use crate::cluster::Cluster;
use crate::error::ApiError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/topology")
            .route(web::get().to(get_topology))
            .route(web::put().to(put_topology)),
    );
}

/// The desired topology.
#[utoipa::path(
    get,
    path = "/api/v1/topology",
    tag = "topology",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The current spec", body = Topology),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
    )
)]
pub async fn get_topology(
    cluster: web::Data<Cluster>,
    caller: Caller,
) -> Result<web::Json<Topology>, ApiError> {
    caller.require_admin()?;
    Ok(web::Json(cluster.topology().await?))
}

/// Replaces the desired topology and reconciles at once: nodes are created
/// or told to drain, and work orders filed, in one transaction.
#[utoipa::path(
    put,
    path = "/api/v1/topology",
    tag = "topology",
    security(("bearer" = [])),
    request_body = TopologyUpdate,
    responses(
        (status = 200, description = "The new spec and what it took", body = TopologyChange,
            headers(("Server-Timing" = String, description = "How long each phase took: lock, load, plan, write, commit, announce (ms)"))),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
        (status = 409, description = "No free address left for the nodes asked", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Spec breaks a rule (unknown field, too many nodes, sync replication without a standby)", body = ErrorBody),
    )
)]
pub async fn put_topology(
    cluster: web::Data<Cluster>,
    caller: Caller,
    body: Body<TopologyUpdate>,
) -> Result<HttpResponse, ApiError> {
    let (change, timings) = cluster.set_topology(body.into_inner(), &caller).await?;
    Ok(HttpResponse::Ok()
        .insert_header(("Server-Timing", timings.server_timing()))
        .json(change))
}
