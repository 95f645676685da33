//! The REST API under `/api/v1`, `/healthz`, `/version` and the Swagger UI
//! at `/docs`. Handlers are thin: parse, call [`crate::cluster::Cluster`],
//! map the result. The OpenAPI document is derived from them by utoipa;
//! `openapi.yaml` at the repository root is its committed copy.

mod agents;
mod backups;
mod body;
mod db;
mod events;
mod hosts;
mod logs;
mod meta;
mod metrics;
mod nodes;
mod servers;
mod topology;

use std::future::{Ready, ready};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::{StatusCode, header};
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest, HttpResponse, web};
use corral_proto as proto;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use crate::auth::{self, Caller};
use crate::error::{ApiError, path_error, query_error};

use crate::cluster::Cluster;
pub use body::Body;
pub use servers::{ServerUrls, cors};

pub use agents::parse_wait;

/// Largest JSON body the API reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "corral",
        description = "Control plane of a web cluster: nginx load balancers, TodoMVC webapps, PostgreSQL with failover, Consul. Every /api/v1 call but enrollment needs `Authorization: Bearer <token>`: the admin token, or a node's agent token for that node's agent endpoints.",
        license(name = "MIT OR Apache-2.0")
    ),
    paths(
        topology::get_topology,
        topology::put_topology,
        nodes::list_nodes,
        nodes::create_node,
        nodes::get_node,
        nodes::delete_node,
        nodes::list_orders,
        nodes::mint_enroll_secret,
        db::switchover,
        backups::list_backups,
        backups::backups_status,
        backups::backup_now,
        backups::restore,
        backups::upload_backup_file,
        backups::download_backup_file,
        backups::report,
        backups::upload_wal,
        backups::list_wal,
        backups::download_wal,
        events::list_events,
        events::stream_events,
        agents::enroll,
        agents::poll_orders,
        agents::order_result,
        agents::heartbeat,
        hosts::poll,
        hosts::order_result,
        logs::post_logs,
        logs::get_logs,
        metrics::post_metrics,
        metrics::get_metrics,
        metrics::exposition,
        servers::list_servers,
        meta::healthz,
        meta::version,
    ),
    components(schemas(proto::ErrorBody)),
    modifiers(&BearerAuth),
    tags(
        (name = "topology", description = "The desired shape of the cluster"),
        (name = "nodes", description = "Nodes, their lifecycle and their work orders"),
        (name = "db", description = "The PostgreSQL cluster: planned switchover of the primary"),
        (name = "backups", description = "Base backups in adm1's store, the archived WAL, point-in-time restores"),
        (name = "events", description = "The audit log, listed or streamed live"),
        (name = "agents", description = "What node agents call: enroll, long-poll orders, report"),
        (name = "metrics", description = "Samples agents take every 10 s: raw for a day, 5-minute aggregates for 30 days"),
        (name = "hosts", description = "What host agents call: long-poll machine orders (VirtualBox VMs), report"),
        (name = "meta", description = "Liveness, version and the control-plane servers"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The admin token, or a node's agent token"))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document as YAML, exactly as committed in `openapi.yaml`.
pub fn openapi_yaml() -> String {
    ApiDoc::openapi()
        .to_yaml()
        .expect("the OpenAPI document serialises to YAML")
}

/// Registers every route and the extractor configuration on an app.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(MAX_BODY_BYTES))
        .app_data(web::QueryConfig::default().error_handler(|err, _| query_error(err).into()))
        .app_data(web::PathConfig::default().error_handler(|err, _| path_error(err).into()))
        .service(
            web::scope("/api/v1")
                .wrap(actix_web::middleware::from_fn(authenticate))
                .configure(topology::routes)
                .configure(nodes::routes)
                .configure(db::routes)
                .configure(backups::routes)
                .configure(events::routes)
                .configure(agents::routes)
                .configure(hosts::routes)
                .configure(logs::routes)
                .configure(metrics::routes)
                .configure(servers::routes)
                .default_service(web::to(not_found)),
        )
        .configure(meta::routes)
        .configure(metrics::exposition_routes)
        .service(web::redirect("/docs", "/docs/"))
        .service(SwaggerUi::new("/docs/{_:.*}").url("/api-docs/openapi.json", ApiDoc::openapi()))
        .default_service(web::to(not_found));
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "no such endpoint: {} {}",
        req.method(),
        req.path()
    )))
}

/// Gives the errors actix answers by itself (405 with `Allow`, ...) the
/// same JSON body as ours; responses that already have a body pass as they
/// are.
pub async fn json_errors<B: MessageBody + 'static>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    let res = next.call(req).await?;
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error())
        || res.headers().contains_key(header::CONTENT_TYPE)
    {
        return Ok(res.map_into_left_body());
    }
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::NOT_FOUND => "not_found",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let (req, res) = res.into_parts();
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => format!(
            "{} is not allowed on {}; allowed: {}",
            req.method(),
            req.path(),
            res.headers()
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
        ),
        other => other.canonical_reason().unwrap_or("error").to_string(),
    };
    let mut json = HttpResponse::build(status).json(proto::ErrorBody {
        error: code.into(),
        message,
    });
    for (name, value) in res.headers() {
        if name != header::CONTENT_LENGTH {
            json.headers_mut().insert(name.clone(), value.clone());
        }
    }
    Ok(ServiceResponse::new(req, json).map_into_right_body())
}

/// Paths under `/api/v1` reachable without a token.
const PUBLIC: &[&str] = &["/api/v1/agents/enroll"];

/// Resolves the bearer token before anything else runs, so a request
/// without valid credentials gets 401 whatever else is wrong with it.
///
/// A refusal is answered here, as a response rather than an error, so the
/// middleware outside (CORS) sees it like any other answer.
async fn authenticate<B: MessageBody>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    if !PUBLIC.contains(&req.path()) {
        match caller(&req).await {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
            }
            Err(e) => return Ok(req.error_response(e).map_into_right_body()),
        }
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

/// Who the bearer token of `req` belongs to.
async fn caller(req: &ServiceRequest) -> Result<Caller, ApiError> {
    let token = auth::bearer(req.request())?.to_string();
    let cluster = req
        .app_data::<web::Data<Cluster>>()
        .cloned()
        .ok_or_else(|| ApiError::Internal("cluster state missing from app".into()))?;
    Ok(cluster.authenticate(&token).await?)
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(req.extensions().get::<Caller>().cloned().ok_or_else(|| {
            ApiError::Unauthorized("an Authorization: Bearer token is required".into())
        }))
    }
}

/// `201 Created` with a `Location` header.
fn created<T: serde::Serialize>(location: String, body: &T) -> HttpResponse {
    HttpResponse::Created()
        .insert_header((actix_web::http::header::LOCATION, location))
        .json(body)
}

/// Parses a list limit: absent means `default`, otherwise 1..=1000.
fn limit(value: Option<u64>, default: u64) -> Result<u64, ApiError> {
    match value {
        None => Ok(default),
        Some(n) if (1..=crate::cluster::MAX_LIST_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!(
            "limit={n} is out of range 1..={}",
            crate::cluster::MAX_LIST_LIMIT
        ))),
    }
}

fn non_negative(name: &str, value: Option<i64>) -> Result<Option<i64>, ApiError> {
    match value {
        Some(v) if v < 0 => Err(ApiError::BadRequest(format!(
            "{name}={v} must not be negative"
        ))),
        other => Ok(other),
    }
}
