//! The Todo-Backend API: `/todos` and `/todos/{id}`. Handlers are thin:
//! read the session's WAL position from its cookie, parse and check the body,
//! call the cluster with a store function, and shape the answer.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, HttpResponseBuilder, web};
use futures_util::StreamExt;

use crate::AppState;
use crate::cluster::Role;
use crate::error::ApiError;
use crate::http::READ_FROM;
use crate::lsn::Lsn;
use crate::store;
use crate::todo::{BODY_LIMIT_BYTES, NewTodo, TodoPatch, list_json, parse_id};

/// The cookie carrying the WAL position a browser session has written or
/// seen; reads are served only by servers that have replayed that far.
pub const SESSION_COOKIE: &str = "todomvc_lsn";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/todos")
            .route(web::get().to(list))
            .route(web::post().to(create))
            .route(web::delete().to(clear))
            .default_service(web::to(|req: HttpRequest| async move {
                method_not_allowed(&req, "GET, POST, DELETE, OPTIONS")
            })),
    )
    .service(
        web::resource("/todos/{id}")
            .route(web::get().to(show))
            .route(web::patch().to(update))
            .route(web::delete().to(remove))
            .default_service(web::to(|req: HttpRequest| async move {
                method_not_allowed(&req, "GET, PATCH, DELETE, OPTIONS")
            })),
    );
}

fn method_not_allowed(req: &HttpRequest, allowed: &'static str) -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed {
        method: req.method().to_string(),
        allowed,
    })
}

/// The session's position from its cookie; a missing or garbled cookie
/// just means a session that has not written (it is not worth a 400).
pub fn session_lsn(req: &HttpRequest) -> Option<Lsn> {
    req.headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .and_then(|(_, value)| value.trim_matches('"').parse().ok())
}

fn session_cookie(lsn: Lsn) -> HeaderValue {
    let cookie = format!("{SESSION_COOKIE}={lsn}; Path=/; HttpOnly; SameSite=Lax");
    HeaderValue::from_str(&cookie).unwrap_or(HeaderValue::from_static(""))
}

/// `scheme://host` as the client sees it: behind nginx that is what
/// `X-Forwarded-Proto` and `Host` (or `Forwarded`, `X-Forwarded-Host`) say.
fn base_url(req: &HttpRequest) -> String {
    let info = req.connection_info();
    format!("{}://{}", info.scheme(), info.host())
}

/// An API answer: never cached (a cached list would be stale after a write)
/// and carrying the session's new position.
fn answer(status: StatusCode, lsn: Lsn, read_from: Option<Role>) -> HttpResponseBuilder {
    let mut response = HttpResponse::build(status);
    response
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::SET_COOKIE, session_cookie(lsn)));
    if let Some(role) = read_from {
        response.insert_header((READ_FROM, role.as_str()));
    }
    response
}

/// Reads the body up to the limit; a larger one is refused without reading
/// it all when its length is announced.
async fn read_body(req: &HttpRequest, mut payload: web::Payload) -> Result<Vec<u8>, ApiError> {
    let too_large = ApiError::PayloadTooLarge {
        limit: BODY_LIMIT_BYTES,
    };
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > BODY_LIMIT_BYTES as u64) {
        return Err(too_large);
    }
    let mut body = Vec::with_capacity(announced.unwrap_or(0) as usize);
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadBody(e.to_string()))?;
        if body.len() + chunk.len() > BODY_LIMIT_BYTES {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn mime_json() -> HeaderValue {
    HeaderValue::from_static("application/json")
}

fn todo_id(req: &HttpRequest, raw: &str) -> Result<i64, ApiError> {
    parse_id(raw).ok_or_else(|| ApiError::NotFound(req.path().to_string()))
}

/// The most todos one `GET /todos` answers with; `Link: <…>; rel="next"`
/// points at the rest.
pub const MAX_PAGE: i64 = 1000;

/// `?limit=N&offset=M` of a list read: limit 1..=1000 (default 1000),
/// offset 0 or more.
fn page(req: &HttpRequest) -> Result<(i64, i64), ApiError> {
    let mut limit = MAX_PAGE;
    let mut offset = 0;
    for pair in req.query_string().split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = |min: i64, max: i64| {
            value
                .parse::<i64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| {
                    ApiError::BadQuery(format!(
                        "{name}={value:?} is not a number from {min} to {max}"
                    ))
                })
        };
        match name {
            "limit" => limit = number(1, MAX_PAGE)?,
            "offset" => offset = number(0, i64::MAX / 2)?,
            _ => {}
        }
    }
    Ok((limit, offset))
}

/// The `Link` to the page after `limit` todos from `offset`.
fn next_page(base: &str, limit: i64, offset: i64) -> String {
    format!(
        "<{base}/todos?limit={limit}&offset={}>; rel=\"next\"",
        offset + limit
    )
}

async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let (limit, offset) = page(&req)?;
    // The whole list, for a session whose writes the cached one holds (a
    // client without the cookie could have written anywhere: never).
    let session = session_lsn(&req).filter(|s| *s != Lsn::MAX);
    if let Some(wanted) = session.filter(|_| limit == MAX_PAGE && offset == 0) {
        let cluster = &state.cluster;
        let cached = match cluster.cached_list(wanted) {
            Some(hit) => Some(hit),
            None => cluster.fill_list(wanted, MAX_PAGE).await,
        };
        if let Some(list) = cached {
            let body = list
                .body(&base_url(&req))
                .map_err(|e| ApiError::Internal(format!("encoding todos: {e}")))?;
            return Ok(answer(StatusCode::OK, list.seen(wanted), Some(Role::Cache))
                .content_type(mime_json())
                .body(body));
        }
    }
    // A client without a position, reading the whole list: its read is
    // shared with the others that arrive meanwhile (see `coalesce`).
    if session_lsn(&req).is_none() && limit == MAX_PAGE && offset == 0 {
        let fresh = state.cluster.read_fresh_list(MAX_PAGE).await?;
        let base = base_url(&req);
        let body = fresh
            .list
            .body(&base)
            .map_err(|e| ApiError::Internal(format!("encoding todos: {e}")))?;
        let mut response = answer(StatusCode::OK, fresh.seen, Some(fresh.from));
        if fresh.more {
            response.insert_header((header::LINK, next_page(&base, limit, offset)));
        }
        return Ok(response.content_type(mime_json()).body(body));
    }
    // One more than asked: whether there is a next page.
    let read = state
        .cluster
        .read(session_lsn(&req), move |conn| {
            Box::pin(store::list(conn, limit + 1, offset))
        })
        .await?;
    let base = base_url(&req);
    let mut todos = read
        .value
        .views(&base)
        .map_err(|e| ApiError::Internal(format!("decoding todos: {e}")))?;
    let mut response = answer(StatusCode::OK, read.seen, Some(read.from));
    if todos.len() as i64 > limit {
        todos.truncate(limit as usize);
        response.insert_header((header::LINK, next_page(&base, limit, offset)));
    }
    let body = list_json(&todos).map_err(|e| ApiError::Internal(format!("encoding todos: {e}")))?;
    Ok(response.content_type(mime_json()).body(body))
}

async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let new = NewTodo::parse(&read_body(&req, payload).await?)?;
    let written = state
        .cluster
        .write(move |conn| Box::pin(store::insert(conn, new)))
        .await?;
    let base = base_url(&req);
    let view = written.value.view(&base);
    let mut response = answer(StatusCode::CREATED, written.lsn, None);
    if let Ok(location) = HeaderValue::from_str(&view.url.to_string()) {
        response.insert_header((header::LOCATION, location));
    }
    Ok(response.json(view))
}

async fn clear(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let written = state
        .cluster
        .write(|conn| Box::pin(store::delete_all(conn)))
        .await?;
    tracing::info!(deleted = written.value, "cleared all todos");
    Ok(answer(StatusCode::NO_CONTENT, written.lsn, None).finish())
}

async fn show(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = todo_id(&req, &path)?;
    let read = state
        .cluster
        .read(session_lsn(&req), move |conn| {
            Box::pin(store::get(conn, id))
        })
        .await?;
    match read.value {
        Some(todo) => {
            Ok(answer(StatusCode::OK, read.seen, Some(read.from)).json(todo.view(&base_url(&req))))
        }
        None => Err(ApiError::NotFound(req.path().to_string())),
    }
}

async fn update(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = todo_id(&req, &path)?;
    let patch = TodoPatch::parse(&read_body(&req, payload).await?)?;
    if patch.is_empty() {
        // Nothing to change: answer with the todo as it is, writing nothing.
        return show(req, state, path).await;
    }
    let written = state
        .cluster
        .write(move |conn| Box::pin(store::update(conn, id, patch)))
        .await?;
    match written.value {
        Some(todo) => {
            Ok(answer(StatusCode::OK, written.lsn, None).json(todo.view(&base_url(&req))))
        }
        None => Err(ApiError::NotFound(req.path().to_string())),
    }
}

async fn remove(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = todo_id(&req, &path)?;
    let written = state
        .cluster
        .write(move |conn| Box::pin(store::delete(conn, id)))
        .await?;
    if written.value {
        Ok(answer(StatusCode::NO_CONTENT, written.lsn, None).finish())
    } else {
        Err(ApiError::NotFound(req.path().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn session_position_comes_from_its_cookie_only() {
        let req = TestRequest::default()
            .insert_header((header::COOKIE, "a=b; todomvc_lsn=1/2A; c=d"))
            .to_http_request();
        assert_eq!(session_lsn(&req), Some("1/2A".parse().unwrap()));
        let req = TestRequest::default()
            .insert_header((header::COOKIE, "todomvc_lsn=garbage"))
            .to_http_request();
        assert_eq!(session_lsn(&req), None);
        assert_eq!(session_lsn(&TestRequest::default().to_http_request()), None);
    }

    #[test]
    fn urls_follow_forwarded_proto_and_host() {
        let req = TestRequest::default()
            .insert_header(("Host", "todo.example"))
            .insert_header(("X-Forwarded-Proto", "https"))
            .to_http_request();
        assert_eq!(base_url(&req), "https://todo.example");
    }
}
