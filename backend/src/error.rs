//! The one place where what went wrong becomes an HTTP status and the JSON
//! body `{"error": code, "message": text}`: the request's own errors here,
//! the cluster's ([`ClusterError`]) mapped in. Every error a user can cause
//! has its own variant; nothing a user sends may end up as `Internal`.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use corral_proto::ErrorBody;

use crate::cluster::ClusterError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed request: bad JSON, a query parameter of the wrong type.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated, but not allowed here (an agent outside its node).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The request clashes with the current state.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Well-formed but breaks a rule: an unknown field, a value out of range.
    #[error("{0}")]
    Unprocessable(String),
    /// Well-formed, but asks for what this server is not set up to give (a
    /// provider it does not run): 422 with a code of its own.
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// The database cannot be reached; try again later.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict { code, .. } => code,
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Unprocessable(_) => "unprocessable_entity",
            ApiError::Invalid { code, .. } => code,
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::Conflict {
            code: "conflict",
            message: message.into(),
        }
    }

    pub fn body(&self) -> ErrorBody {
        let message = match self {
            // Details of internal failures go to the log, not to the caller.
            ApiError::Internal(_) => "internal error; see the server log".to_string(),
            other => other.to_string(),
        };
        ErrorBody {
            error: self.code().to_string(),
            message,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) | ApiError::Invalid { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(detail) = self {
            tracing::error!(error = %detail, "internal error");
        }
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unauthorized(_) => {
                response.insert_header((
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"corral\""),
                ));
            }
            ApiError::Unavailable(_) => {
                response.insert_header((header::RETRY_AFTER, HeaderValue::from_static("5")));
            }
            _ => {}
        }
        response.json(self.body())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_unique_violation() {
            ApiError::conflict(format!("the change clashes with an existing record: {e}"))
        } else if e.is_unavailable() {
            ApiError::Unavailable(format!("the state database is unavailable: {e}"))
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Unauthenticated(m) => ApiError::Unauthorized(m),
            ClusterError::NotAllowed(m) => ApiError::Forbidden(m),
            ClusterError::NotFound(m) => ApiError::NotFound(m),
            ClusterError::Invalid(m) => ApiError::Unprocessable(m),
            e @ ClusterError::ProviderNotConfigured { .. } => ApiError::Invalid {
                code: "provider_not_configured",
                message: e.to_string(),
            },
            ClusterError::Conflict { code, message } => ApiError::Conflict { code, message },
            ClusterError::Refused { code, message } => ApiError::Invalid { code, message },
            ClusterError::Store(e) => e.into(),
            ClusterError::Internal(m) => ApiError::Internal(m),
            ClusterError::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(e: sea_orm::DbErr) -> Self {
        StoreError::from(e).into()
    }
}

pub fn query_error(err: actix_web::error::QueryPayloadError) -> ApiError {
    ApiError::BadRequest(format!("invalid query string: {err}"))
}

pub fn path_error(err: actix_web::error::PathError) -> ApiError {
    ApiError::BadRequest(format!("invalid path: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_stay_out_of_the_body() {
        let body = ApiError::Internal("password=hunter2".into()).body();
        assert_eq!(body.error, "internal");
        assert!(!body.message.contains("hunter2"));
    }

    #[test]
    fn cluster_errors_get_their_status_and_code_at_the_edge() {
        use corral_proto::Provider;
        let refused = ApiError::from(ClusterError::ProviderNotConfigured {
            provider: Provider::Virtualbox,
            configured: vec![Provider::Local, Provider::Lxc],
        });
        assert_eq!(refused.status_code(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(refused.body().error, "provider_not_configured");
        assert_eq!(
            refused.body().message,
            "provider virtualbox is not configured on this server (configured: local, lxc)"
        );
        for (e, status, code) in [
            (
                ClusterError::Unauthenticated("x".into()),
                StatusCode::UNAUTHORIZED,
                "unauthorized",
            ),
            (
                ClusterError::NotAllowed("x".into()),
                StatusCode::FORBIDDEN,
                "forbidden",
            ),
            (
                ClusterError::NotFound("x".into()),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                ClusterError::Invalid("x".into()),
                StatusCode::UNPROCESSABLE_ENTITY,
                "unprocessable_entity",
            ),
            (
                ClusterError::Conflict {
                    code: "switchover_in_progress",
                    message: "x".into(),
                },
                StatusCode::CONFLICT,
                "switchover_in_progress",
            ),
            (
                ClusterError::Internal("x".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
            ),
        ] {
            let e = ApiError::from(e);
            assert_eq!((e.status_code(), e.code()), (status, code));
        }
    }

    #[test]
    fn statuses_match_codes() {
        assert_eq!(
            ApiError::Unprocessable("x".into()).status_code(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(ApiError::conflict("x").code(), "conflict");
        assert_eq!(
            ApiError::PayloadTooLarge("x".into()).status_code(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
