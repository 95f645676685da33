//! `/api/v1/nodes`: list, create (next name and address), show, remove
//! (drain, then remove), and the orders of a node.

use actix_web::{HttpResponse, web};
use corral_proto::{CreateNode, EnrollSecret, ErrorBody, Node, Order};
use serde::Deserialize;
use utoipa::IntoParams;

use super::Body;
use super::{created, limit, non_negative};
use crate::auth::Caller;
use crate::cluster::{Cluster, Removal};
use crate::error::ApiError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/nodes")
            .route(web::get().to(list_nodes))
            .route(web::post().to(create_node)),
    )
    .service(
        web::resource("/nodes/{name}")
            .route(web::get().to(get_node))
            .route(web::delete().to(delete_node)),
    )
    .service(web::resource("/nodes/{name}/orders").route(web::get().to(list_orders)))
    .service(
        web::resource("/nodes/{name}/enroll-secret").route(web::post().to(mint_enroll_secret)),
    );
}

/// Every node, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/nodes",
    tag = "nodes",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "All nodes", body = Vec<Node>),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
    )
)]
pub async fn list_nodes(
    cluster: web::Data<Cluster>,
    caller: Caller,
) -> Result<web::Json<Vec<Node>>, ApiError> {
    caller.require_admin()?;
    Ok(web::Json(cluster.nodes().await?))
}

/// Adds a node of a role: the topology grows by one, the node gets the next
/// free name and address of the seed scheme, and its orders are filed.
#[utoipa::path(
    post,
    path = "/api/v1/nodes",
    tag = "nodes",
    security(("bearer" = [])),
    request_body = CreateNode,
    responses(
        (status = 201, description = "The new node, state provisioning", body = Node,
            headers(("Location" = String, description = "URL of the node"))),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
        (status = 409, description = "No free address left, the role already has the most nodes allowed, or `host_agent_missing`: no host agent of the node's provider (virtualbox) is connected", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Unknown field or role (adm cannot be added), or `provider_not_configured`: a provider this server does not run", body = ErrorBody),
    )
)]
pub async fn create_node(
    cluster: web::Data<Cluster>,
    caller: Caller,
    body: Body<CreateNode>,
) -> Result<HttpResponse, ApiError> {
    let node = cluster.create_node(body.into_inner(), &caller).await?;
    Ok(created(format!("/api/v1/nodes/{}", node.name), &node))
}

/// One node with its observed state.
#[utoipa::path(
    get,
    path = "/api/v1/nodes/{name}",
    tag = "nodes",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Node name, e.g. nginx1", pattern = "^[a-z][a-z0-9-]{0,62}$")),
    responses(
        (status = 200, description = "The node", body = Node),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    )
)]
pub async fn get_node(
    cluster: web::Data<Cluster>,
    caller: Caller,
    name: web::Path<String>,
) -> Result<web::Json<Node>, ApiError> {
    caller.require_admin()?;
    Ok(web::Json(cluster.node(&name).await?))
}

/// Mints a new single-use enrollment secret for a node (shown once; one
/// minted before is void), to enroll its agent again by hand: a machine
/// that lost its agent's state, a `manual` node. Enrolling with it revokes
/// the node's current token.
#[utoipa::path(
    post,
    path = "/api/v1/nodes/{name}/enroll-secret",
    tag = "nodes",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Node name, e.g. nginx1", pattern = "^[a-z][a-z0-9-]{0,62}$")),
    responses(
        (status = 201, description = "The secret and when it expires", body = EnrollSecret),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    )
)]
pub async fn mint_enroll_secret(
    cluster: web::Data<Cluster>,
    caller: Caller,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let secret = cluster.mint_enroll_secret(&name, &caller).await?;
    Ok(created(format!("/api/v1/nodes/{}", secret.node), &secret))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct RemoveQuery {
    /// Remove at once, without waiting for the agent to drain.
    force: Option<bool>,
}

/// Removes a node. An enrolled node is told to drain first (202, state
/// `draining`) and removed once its agent reports the drain applied; a node
/// whose agent never enrolled, or `force=true`, is removed at once (204).
#[utoipa::path(
    delete,
    path = "/api/v1/nodes/{name}",
    tag = "nodes",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$"),
        RemoveQuery,
    ),
    responses(
        (status = 202, description = "Draining; removed when drained", body = Node),
        (status = 204, description = "Removed"),
        (status = 400, description = "Malformed query", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "adm1 cannot be removed", body = ErrorBody),
    )
)]
pub async fn delete_node(
    cluster: web::Data<Cluster>,
    caller: Caller,
    name: web::Path<String>,
    query: web::Query<RemoveQuery>,
) -> Result<HttpResponse, ApiError> {
    match cluster
        .remove_node(&name, query.force.unwrap_or(false), &caller)
        .await?
    {
        Removal::Draining(node) => Ok(HttpResponse::Accepted().json(node)),
        Removal::Removed => Ok(HttpResponse::NoContent().finish()),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct OrdersQuery {
    /// Only orders with a larger `seq`.
    #[param(minimum = 0)]
    after: Option<i64>,
    /// At most this many (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
}

/// The work orders of a node, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/nodes/{name}/orders",
    tag = "nodes",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$"),
        OrdersQuery,
    ),
    responses(
        (status = 200, description = "Orders after `after`", body = Vec<Order>),
        (status = 400, description = "Malformed query", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token of another node", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    )
)]
pub async fn list_orders(
    cluster: web::Data<Cluster>,
    caller: Caller,
    name: web::Path<String>,
    query: web::Query<OrdersQuery>,
) -> Result<web::Json<Vec<Order>>, ApiError> {
    caller.require_node(&name)?;
    let after = non_negative("after", query.after)?.unwrap_or(0);
    let limit = limit(query.limit, 100)?;
    Ok(web::Json(cluster.orders(&name, after, limit).await?))
}
