//! The audit log: every change to the cluster's desired or observed state,
//! who made it and when. Append-only; also streamed live to the UI.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    /// Strictly increasing; resume a stream with `Last-Event-ID`.
    pub id: i64,
    pub at: DateTime<Utc>,
    /// `admin`, `agent:<node>` or `reconciler`.
    #[cfg_attr(feature = "openapi", schema(example = "admin"))]
    pub actor: String,
    /// Dotted kind, e.g. `node.created`, `order.applied`, `topology.updated`.
    #[cfg_attr(feature = "openapi", schema(example = "node.created"))]
    pub kind: String,
    /// What it is about: a node name, `topology`, ...
    #[cfg_attr(feature = "openapi", schema(example = "nginx3"))]
    pub subject: String,
    pub message: String,
}
