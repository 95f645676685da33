//! The one error body every failing API call answers with.

use serde::{Deserialize, Serialize};

/// `{"error": code, "message": text}`: `error` is a stable machine-readable
/// code (`not_found`, `conflict`, ...), `message` says what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    #[cfg_attr(feature = "openapi", schema(example = "not_found"))]
    pub error: String,
    #[cfg_attr(feature = "openapi", schema(example = "no node named nginx9"))]
    pub message: String,
}
