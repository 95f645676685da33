//! What every request goes through: a request id (the client's
//! `X-Request-Id` when sane, else a new one) on a tracing span and in the
//! response, one structured log line per request, `X-Served-By`, and CORS
//! for any origin, answering preflight requests here.

use std::time::Instant;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, ResponseError, web};
use tracing::Instrument;

use crate::AppState;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

tokio::task_local! {
    /// The id of the request being handled, for error bodies that point at
    /// the log instead of carrying details.
    static CURRENT_REQUEST: String;
}

/// The id of the request this task is handling, if any.
pub fn current_request_id() -> Option<String> {
    CURRENT_REQUEST.try_with(Clone::clone).ok()
}
pub const SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");
pub const READ_FROM: HeaderName = HeaderName::from_static("x-read-from");

const ALLOWED_METHODS: &str = "GET, POST, PATCH, DELETE, OPTIONS";

/// The client's request id if it is short and plain, so it can be logged and
/// echoed safely; otherwise a fresh random one.
fn request_id(req: &ServiceRequest) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()))
}

/// Answers a CORS preflight (or any OPTIONS request): any origin may use
/// every method of the API, with whatever request headers it asks for.
fn preflight(req: &ServiceRequest) -> HttpResponse {
    let mut response = HttpResponse::NoContent();
    response
        .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, ALLOWED_METHODS))
        .insert_header((header::ALLOW, ALLOWED_METHODS))
        .insert_header((header::ACCESS_CONTROL_MAX_AGE, "86400"))
        .insert_header((header::VARY, "Access-Control-Request-Headers"));
    let asked = req
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .filter(|v| !v.is_empty())
        .cloned()
        .unwrap_or(HeaderValue::from_static("Content-Type"));
    response.insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, asked));
    response.finish()
}

pub async fn around_request(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let started = Instant::now();
    let id = request_id(&req);
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let node = state.as_ref().map(|s| s.served_by.clone());
    let method = req.method().clone();
    let path = req.path().to_string();
    // Consul checks health every few seconds; those lines would drown the rest.
    let quiet = path == "/healthz";
    let span = tracing::info_span!("request", request_id = %id, %method, %path);

    let mut response = if method == Method::OPTIONS {
        let answer = preflight(&req);
        req.into_response(answer).map_into_right_body()
    } else {
        // Handler and extractor errors arrive here already turned into
        // responses (and get the headers below); an `Err` would come only
        // from the service stack itself. The request must not be cloned
        // before routing, so there is no request left to answer that with.
        CURRENT_REQUEST
            .scope(id.clone(), next.call(req).instrument(span.clone()))
            .await?
            .map_into_left_body()
    };

    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(
            "Link, Location, Retry-After, X-Request-Id, X-Served-By, X-Read-From",
        ),
    );
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID, v);
    }
    if let Some(v) = node {
        headers.insert(SERVED_BY, v);
    }

    let status = response.status();
    let took = started.elapsed();
    if let Some(state) = &state
        && crate::metrics::counted(&path)
    {
        state.metrics.observe(status.as_u16(), took);
    }
    let latency_us = took.as_micros() as u64;
    let read_from = response
        .headers()
        .get(&READ_FROM)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    span.in_scope(|| {
        if quiet {
            tracing::debug!(status = status.as_u16(), latency_us, "request");
        } else if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), latency_us, %read_from, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), latency_us, %read_from, "request");
        }
    });
    Ok(response)
}

/// A JSON error for anything no route matched.
pub async fn not_found(req: actix_web::HttpRequest) -> HttpResponse {
    crate::error::ApiError::NotFound(req.path().to_string()).error_response()
}
