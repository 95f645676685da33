//! Serves the web UI (`frontend/dist`, built by scripts/build-ui.sh) at `/`: its files
//! as they are, and `index.html` for any other page path, so the browser's
//! own routes (`/nodes/nginx1`, `/settings`) survive a reload. Paths of the
//! API (`/api...`) never fall back. Without a built UI, pages answer a
//! short note saying how to build it.

use std::path::{Path, PathBuf};

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Compress;
use actix_web::{HttpRequest, HttpResponse, web};

use crate::error::ApiError;

/// Where a built UI is looked for when `--ui-dir` is not given:
/// `frontend/dist` under the current directory or one of its parents, then
/// under the parents of the executable (`target/release/corral` sits two
/// levels below the workspace).
pub fn default_dir() -> Option<PathBuf> {
    let from_cwd = std::env::current_dir().ok();
    let from_exe = std::env::current_exe().ok();
    [from_cwd, from_exe]
        .into_iter()
        .flatten()
        .flat_map(|start| {
            start
                .ancestors()
                .map(|dir| dir.join("frontend/dist"))
                .collect::<Vec<_>>()
        })
        .find(|dir| dir.join("index.html").is_file())
}

/// The UI's routes; registered after the API so they only see what it
/// does not answer.
pub fn configure(cfg: &mut web::ServiceConfig, dir: Option<PathBuf>) {
    cfg.service(
        web::resource("/{path:.*}")
            .app_data(web::Data::new(UiDir(dir)))
            .wrap(Compress::default())
            .route(web::route().to(serve)),
    );
}

struct UiDir(Option<PathBuf>);

const HOW_TO_BUILD: &str = "the web UI is not built: run scripts/build-ui.sh \
     (scripts/setup.sh --ui installs what it needs), or start corral with --ui-dir pointing at a built dist";

async fn serve(req: HttpRequest, dir: web::Data<UiDir>) -> Result<HttpResponse, ApiError> {
    let path = req.path();
    let no_endpoint = || ApiError::NotFound(format!("no such endpoint: {} {path}", req.method()));
    if !matches!(*req.method(), Method::GET | Method::HEAD)
        || path == "/api"
        || path.starts_with("/api/")
        || path.starts_with("/api-")
    {
        return Err(no_endpoint());
    }
    let relative = safe_relative(path).ok_or_else(no_endpoint)?;
    let is_page = relative.is_empty() || !last_segment(relative).contains('.');
    let Some(dir) = &dir.0 else {
        return if is_page {
            Ok(not_built(&req))
        } else {
            Err(no_endpoint())
        };
    };
    if !relative.is_empty() {
        if let Some(response) = file(&dir.join(relative), false).await {
            return Ok(response);
        }
        if !is_page {
            return Err(ApiError::NotFound(format!("no such file: {path}")));
        }
    }
    match file(&dir.join("index.html"), true).await {
        Some(response) => Ok(response),
        None => Ok(not_built(&req)),
    }
}

/// The request path without its leading `/`, if it names something inside
/// the UI directory: plain ASCII names only, no `..`, no hidden files.
fn safe_relative(path: &str) -> Option<&str> {
    let relative = path.strip_prefix('/')?;
    let plain = relative
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    let segments_ok = relative
        .split('/')
        .all(|s| !s.starts_with('.') && (s.is_empty() || s.len() <= 255));
    (plain && segments_ok && !relative.contains("//")).then_some(relative)
}

fn last_segment(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "wasm" => "application/wasm",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" | "map" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// A file of the UI, or `None` when there is no such regular file.
/// `index.html` is revalidated every time; the build gives every other file a
/// content hash in its name, so those may be cached for good.
async fn file(path: &Path, is_index: bool) -> Option<HttpResponse> {
    if !tokio::fs::metadata(path).await.ok()?.is_file() {
        return None;
    }
    let bytes = tokio::fs::read(path).await.ok()?;
    let cache = if is_index || path.file_name().is_some_and(|n| n == "index.html") {
        "no-cache"
    } else {
        "public, max-age=31536000, immutable"
    };
    Some(
        HttpResponse::Ok()
            .insert_header((header::CONTENT_TYPE, content_type(path)))
            .insert_header((header::CACHE_CONTROL, cache))
            .body(bytes),
    )
}

/// A page for browsers, the usual JSON error for everything else.
fn not_built(req: &HttpRequest) -> HttpResponse {
    let wants_html = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if wants_html {
        HttpResponse::build(StatusCode::NOT_FOUND)
            .insert_header((
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ))
            .body(format!(
                "<!doctype html><meta charset=utf-8><title>corral</title>\
                 <h1>corral</h1><p>{HOW_TO_BUILD}.</p>\
                 <p>The API is at <a href=\"/docs/\">/docs/</a>.</p>"
            ))
    } else {
        HttpResponse::build(StatusCode::NOT_FOUND).json(corral_proto::ErrorBody {
            error: "ui_not_built".into(),
            message: HOW_TO_BUILD.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_paths_inside_the_directory_are_served() {
        assert_eq!(safe_relative("/"), Some(""));
        assert_eq!(
            safe_relative("/corral-frontend-1a2b.wasm"),
            Some("corral-frontend-1a2b.wasm")
        );
        assert_eq!(safe_relative("/nodes/nginx1"), Some("nodes/nginx1"));
        for bad in [
            "/../etc/passwd",
            "/a/../../b",
            "/.env",
            "/a//b",
            "/a%2e%2e/b",
            "/é",
        ] {
            assert_eq!(safe_relative(bad), None, "{bad}");
        }
    }
}
