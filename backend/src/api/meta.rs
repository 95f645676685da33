//! `/healthz` and `/version`, outside the authenticated API.

use actix_web::{HttpResponse, web};
use sea_orm::ConnectionTrait;
use serde::Serialize;
use utoipa::ToSchema;

use crate::cluster::Cluster;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/healthz").route(web::get().to(healthz)))
        .service(web::resource("/version").route(web::get().to(version)));
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `unavailable` when the state database cannot be reached.
    status: String,
    /// `sqlite` or `postgres`.
    database: String,
    /// Agent long polls being held right now.
    long_polls: usize,
    /// Whether this server leads: runs the machine controller, pruning and
    /// stale-node detection. Always true on SQLite; on PostgreSQL, one of
    /// the servers sharing the database.
    leader: bool,
}

/// 200 when the server can reach its database, 503 otherwise.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "meta",
    responses(
        (status = 200, description = "Healthy", body = Health),
        (status = 503, description = "The state database is unreachable", body = Health),
    )
)]
pub async fn healthz(cluster: web::Data<Cluster>) -> HttpResponse {
    let conn = cluster.store().conn();
    let backend = format!("{:?}", conn.get_database_backend()).to_lowercase();
    match conn.execute_unprepared("SELECT 1").await {
        Ok(_) => HttpResponse::Ok().json(Health {
            status: "ok".into(),
            database: backend,
            long_polls: cluster.waiting_polls_total(),
            leader: cluster.is_leader(),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "health check: database unreachable");
            HttpResponse::ServiceUnavailable().json(Health {
                status: "unavailable".into(),
                database: backend,
                long_polls: cluster.waiting_polls_total(),
                leader: cluster.is_leader(),
            })
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct Version {
    #[schema(example = "0.1.0")]
    version: String,
    #[schema(example = "v1")]
    api: String,
}

/// The server's version.
#[utoipa::path(
    get,
    path = "/version",
    tag = "meta",
    responses((status = 200, description = "Version", body = Version))
)]
pub async fn version() -> web::Json<Version> {
    web::Json(Version {
        version: corral_proto::VERSION.into(),
        api: "v1".into(),
    })
}
