//! The one place errors become HTTP answers: every error a client can cause
//! is a 4xx with a JSON body `{"error": code, "message": text}`, and a
//! database that cannot be used right now is a 503 with `Retry-After`.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::cluster::DbError;

/// Seconds a client is asked to wait after a 503: about the time the prober
/// needs to notice a promoted replica.
pub const RETRY_AFTER_SECS: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidTodo(String),
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BadBody(String),
    #[error("{0}")]
    BadQuery(String),
    #[error("no todo at {0}")]
    NotFound(String),
    #[error("{method} is not allowed here; allowed: {allowed}")]
    MethodNotAllowed {
        method: String,
        allowed: &'static str,
    },
    /// The detail (which database, what failed) goes to the log only.
    #[error("database unavailable")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
}

impl ApiError {
    fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidTodo(_) => "invalid_todo",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::BadBody(_) => "bad_body",
            ApiError::BadQuery(_) => "bad_query",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_) | ApiError::BadBody(_) | ApiError::BadQuery(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::InvalidTodo(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((header::CACHE_CONTROL, "no-store"));
        match self {
            ApiError::Unavailable(detail) => {
                // Endpoints and driver errors are for the operator: the
                // client gets the request id to find them in the log.
                tracing::warn!(%detail, "database unavailable");
                response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS.to_string()));
            }
            ApiError::MethodNotAllowed { allowed, .. } => {
                response.insert_header((header::ALLOW, HeaderValue::from_static(allowed)));
            }
            ApiError::Internal(detail) => {
                // The detail is for the operator, not the client.
                tracing::error!(%detail, "internal error");
            }
            _ => {}
        }
        let message = match (self, crate::http::current_request_id()) {
            (ApiError::Unavailable(_) | ApiError::Internal(_), Some(id)) => {
                format!("{self}; request id {id} (the details are in the webapp's log)")
            }
            _ => self.to_string(),
        };
        response.json(ErrorBody {
            error: self.code(),
            message,
        })
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(why) => ApiError::Unavailable(why),
            DbError::Rejected(why) => ApiError::InvalidTodo(why),
            DbError::Bug(why) => ApiError::Internal(why),
        }
    }
}
