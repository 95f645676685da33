//! Backups: the admin lists them, takes one now and restores one
//! (`/backups`, `/db/restore`); db agents upload a backup's files and the
//! archived WAL, and a restoring agent downloads them
//! (`/agents/{name}/backups/...`, `/agents/{name}/wal/...`). Files travel
//! as raw bodies with their SHA-256 in `X-Content-Sha256`, streamed to and
//! from disk.

use actix_web::http::header::ContentType;
use actix_web::{HttpRequest, HttpResponse, web};
use corral_proto::{
    Backup, BackupFile, BackupReport, BackupsStatus, ErrorBody, RestoreAccepted, RestoreRequest,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{Body, limit};
use crate::auth::Caller;
use crate::backup_store::file_stream;
use crate::cluster::Cluster;
use crate::error::ApiError;

/// The header carrying a file's hex SHA-256, both ways.
pub const SHA256_HEADER: &str = "x-content-sha256";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/backups")
            .route(web::get().to(list_backups))
            .route(web::post().to(backup_now)),
    )
    .service(web::resource("/backups/status").route(web::get().to(backups_status)))
    .service(web::resource("/db/restore").route(web::post().to(restore)))
    .service(
        web::resource("/agents/{name}/backups/{id}/files/{file}")
            .route(web::put().to(upload_backup_file))
            .route(web::get().to(download_backup_file)),
    )
    .service(web::resource("/agents/{name}/backups/{id}/report").route(web::post().to(report)))
    .service(web::resource("/agents/{name}/wal").route(web::get().to(list_wal)))
    .service(
        web::resource("/agents/{name}/wal/{file}")
            .route(web::put().to(upload_wal))
            .route(web::get().to(download_wal)),
    );
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ListQuery {
    /// How many, newest first (1-1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
}

/// The backups, newest first: running, done (every file in adm1's store
/// with its checksum verified) or failed (with the reason).
#[utoipa::path(
    get,
    path = "/api/v1/backups",
    tag = "backups",
    security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "Backups, newest first", body = [Backup]),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
    )
)]
pub async fn list_backups(
    cluster: web::Data<Cluster>,
    caller: Caller,
    query: web::Query<ListQuery>,
) -> Result<web::Json<Vec<Backup>>, ApiError> {
    let n = limit(query.limit, 100)?;
    Ok(web::Json(cluster.backups(n, &caller).await?))
}

/// The backup schedule, the last backup that finished done, and whether a
/// scheduled backup is overdue (due over an hour ago, none done since).
#[utoipa::path(
    get,
    path = "/api/v1/backups/status",
    tag = "backups",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Where backups stand", body = BackupsStatus),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
    )
)]
pub async fn backups_status(
    cluster: web::Data<Cluster>,
    caller: Caller,
) -> Result<web::Json<BackupsStatus>, ApiError> {
    Ok(web::Json(cluster.backups_status(&caller).await?))
}

/// Takes a base backup now: files a `backup` order on the streaming
/// standby least behind (the primary when none streams), whose agent runs
/// `pg_basebackup` and uploads the files to adm1's store.
#[utoipa::path(
    post,
    path = "/api/v1/backups",
    tag = "backups",
    security(("bearer" = [])),
    responses(
        (status = 202, description = "The backup is recorded as running and its order filed", body = Backup),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
        (status = 409, description = "`backup_in_progress`, or `no_db_node` (none can take one)", body = ErrorBody),
    )
)]
pub async fn backup_now(
    cluster: web::Data<Cluster>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let backup = cluster.backup_now(&caller).await?;
    Ok(HttpResponse::Accepted().json(backup))
}

/// Restores the newest backup finished before `time`, plus the archived
/// WAL up to `time`, into a new PostgreSQL instance `to` on adm1 or, with
/// `new_node`, on a new node `restoreN` made for it (its own address,
/// agent, Consul client and firewall; not counted by the topology). The
/// restored database never joins replication or failover. The restoring
/// agent verifies it (row counts, the last replayed commit) and reports
/// that as the order's result.
#[utoipa::path(
    post,
    path = "/api/v1/db/restore",
    tag = "backups",
    security(("bearer" = [])),
    request_body = RestoreRequest,
    responses(
        (status = 202, description = "The restore order is filed on adm1, or on the new node", body = RestoreAccepted),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
        (status = 409, description = "`restore_in_progress` (on adm1), `address_pool_exhausted`, `host_agent_missing`", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Bad name, port or time (in the future), a provider without `new_node`, `provider_not_configured`, or `no_backup_before`: no backup finished before that time", body = ErrorBody),
    )
)]
pub async fn restore(
    cluster: web::Data<Cluster>,
    caller: Caller,
    body: Body<RestoreRequest>,
) -> Result<HttpResponse, ApiError> {
    let accepted = cluster.restore(body.into_inner(), &caller).await?;
    Ok(HttpResponse::Accepted().json(accepted))
}

fn sha256_header(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get(SHA256_HEADER)
        .map(|v| v.to_str().unwrap_or("not ascii").to_string())
}

/// An agent uploads one file of the backup it is taking. The body is the
/// file; `X-Content-Sha256` its hex SHA-256, checked before the file is
/// kept.
#[utoipa::path(
    put,
    path = "/api/v1/agents/{name}/backups/{id}/files/{file}",
    tag = "agents",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$"),
        ("id" = i64, Path, description = "Backup id", minimum = 1),
        ("file" = String, Path, description = "base.tar, pg_wal.tar or backup_manifest", pattern = "^(base\\.tar|pg_wal\\.tar|backup_manifest)$"),
        ("X-Content-Sha256" = String, Header, description = "Hex SHA-256 of the body", pattern = "^[0-9a-f]{64}$"),
    ),
    request_body(content = String, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored and verified", body = BackupFile),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Another node's token", body = ErrorBody),
        (status = 404, description = "The node takes no such backup", body = ErrorBody),
        (status = 409, description = "The backup is already finished", body = ErrorBody),
        (status = 422, description = "Not a backup file name, no or bad checksum header, or `checksum_mismatch`", body = ErrorBody),
    )
)]
pub async fn upload_backup_file(
    cluster: web::Data<Cluster>,
    caller: Caller,
    req: HttpRequest,
    path: web::Path<(String, i64, String)>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (name, id, file) = path.into_inner();
    let stored = cluster
        .receive_backup_file(
            &name,
            id,
            &file,
            sha256_header(&req).as_deref(),
            body,
            &caller,
        )
        .await?;
    Ok(HttpResponse::Created().json(stored))
}

/// A file of a backup, for the agent restoring it (or the admin: an
/// offsite copy); `X-Content-Sha256` carries its checksum.
#[utoipa::path(
    get,
    path = "/api/v1/agents/{name}/backups/{id}/files/{file}",
    tag = "agents",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$"),
        ("id" = i64, Path, description = "Backup id", minimum = 1),
        ("file" = String, Path, description = "base.tar, pg_wal.tar or backup_manifest", pattern = "^(base\\.tar|pg_wal\\.tar|backup_manifest)$"),
    ),
    responses(
        (status = 200, description = "The file", content_type = "application/octet-stream", body = String),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Another node's token, or a node restoring no such backup", body = ErrorBody),
        (status = 404, description = "No such file (in the store nor the offsite bucket)", body = ErrorBody),
        (status = 503, description = "Not in the store, and the offsite bucket cannot be read now", body = ErrorBody),
    )
)]
pub async fn download_backup_file(
    cluster: web::Data<Cluster>,
    caller: Caller,
    path: web::Path<(String, i64, String)>,
) -> Result<HttpResponse, ApiError> {
    let (name, id, file) = path.into_inner();
    let (f, sum) = cluster.backup_file(&name, id, &file, &caller).await?;
    Ok(stream_file(f, sum))
}

fn stream_file(f: tokio::fs::File, sum: String) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(ContentType::octet_stream())
        .insert_header((SHA256_HEADER, sum))
        .streaming(file_stream(f))
}

/// The agent says how its backup went: the files it uploaded with their
/// checksums and the WAL range, or the error.
#[utoipa::path(
    post,
    path = "/api/v1/agents/{name}/backups/{id}/report",
    tag = "agents",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$"),
        ("id" = i64, Path, description = "Backup id", minimum = 1),
    ),
    request_body = BackupReport,
    responses(
        (status = 200, description = "The backup as recorded", body = Backup),
        (status = 400, description = "Malformed JSON or path", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Another node's token", body = ErrorBody),
        (status = 404, description = "The node takes no such backup", body = ErrorBody),
        (status = 409, description = "The backup is already finished", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Bad report, or `files_missing`: a named file is not stored with that size and checksum", body = ErrorBody),
    )
)]
pub async fn report(
    cluster: web::Data<Cluster>,
    caller: Caller,
    path: web::Path<(String, i64)>,
    body: Body<BackupReport>,
) -> Result<web::Json<Backup>, ApiError> {
    let (name, id) = path.into_inner();
    Ok(web::Json(
        cluster
            .finish_backup(&name, id, body.into_inner(), &caller)
            .await?,
    ))
}

/// An agent ships one archived WAL file. Uploading the same file again is
/// accepted; other contents under a stored name are refused.
#[utoipa::path(
    put,
    path = "/api/v1/agents/{name}/wal/{file}",
    tag = "agents",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$"),
        ("file" = String, Path, description = "WAL file name, e.g. 000000010000000000000003", pattern = "^([0-9A-F]{24}(\\.partial|\\.[0-9A-F]{8}\\.backup)?|[0-9A-F]{8}\\.history)$"),
        ("X-Content-Sha256" = String, Header, description = "Hex SHA-256 of the body", pattern = "^[0-9a-f]{64}$"),
    ),
    request_body(content = String, content_type = "application/octet-stream"),
    responses(
        (status = 204, description = "Stored and verified"),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Another node's token", body = ErrorBody),
        (status = 409, description = "`already_stored` with other contents", body = ErrorBody),
        (status = 422, description = "Not a WAL file name, no or bad checksum header, `checksum_mismatch` or `too_large` (over 64 MiB)", body = ErrorBody),
    )
)]
pub async fn upload_wal(
    cluster: web::Data<Cluster>,
    caller: Caller,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (name, file) = path.into_inner();
    cluster
        .receive_wal(&name, &file, sha256_header(&req).as_deref(), body, &caller)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The archived WAL files, for the agent restoring a backup: the store's
/// and, when an offsite bucket is configured, the bucket's.
#[utoipa::path(
    get,
    path = "/api/v1/agents/{name}/wal",
    tag = "agents",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$")),
    responses(
        (status = 200, description = "WAL file names, sorted", body = [String]),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Another node's token, or a node restoring nothing", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    )
)]
pub async fn list_wal(
    cluster: web::Data<Cluster>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<web::Json<Vec<String>>, ApiError> {
    Ok(web::Json(
        cluster.wal_names(&path.into_inner(), &caller).await?,
    ))
}

/// One archived WAL file; `X-Content-Sha256` carries its checksum.
#[utoipa::path(
    get,
    path = "/api/v1/agents/{name}/wal/{file}",
    tag = "agents",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$"),
        ("file" = String, Path, description = "WAL file name", pattern = "^([0-9A-F]{24}(\\.partial|\\.[0-9A-F]{8}\\.backup)?|[0-9A-F]{8}\\.history)$"),
    ),
    responses(
        (status = 200, description = "The file", content_type = "application/octet-stream", body = String),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Another node's token, or a node restoring nothing", body = ErrorBody),
        (status = 404, description = "No such file (in the store nor the offsite bucket)", body = ErrorBody),
        (status = 503, description = "Not in the store, and the offsite bucket cannot be read now", body = ErrorBody),
    )
)]
pub async fn download_wal(
    cluster: web::Data<Cluster>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (name, file) = path.into_inner();
    let (f, sum) = cluster.wal_file(&name, &file, &caller).await?;
    Ok(stream_file(f, sum))
}
