//! What a use case refuses or fails with, in the cluster's own terms. The
//! HTTP edge gives each its status and code (`From<ClusterError> for
//! ClusterError` in `crate::error`); nothing here knows about HTTP.

use corral_proto::Provider;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// An unknown or revoked token.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this: an agent acting outside its own node, an
    /// enrollment without a valid secret for the node.
    #[error("{0}")]
    NotAllowed(String),
    /// No such node or order.
    #[error("{0}")]
    NotFound(String),
    /// The request breaks a rule: a topology out of range, a node name off
    /// the scheme, a result too long, a switchover to a node that is no db.
    #[error("{0}")]
    Invalid(String),
    /// Well-formed, but nothing can satisfy it (a restore time no backup
    /// precedes, a checksum that does not match): 422 with its own code.
    #[error("{message}")]
    Refused { code: &'static str, message: String },
    /// A node asked for with a provider this server does not run.
    #[error("provider {provider} is not configured on this server (configured: {})", names(.configured))]
    ProviderNotConfigured {
        provider: Provider,
        configured: Vec<Provider>,
    },
    /// The request clashes with the state of the cluster; `code` says how
    /// (`address_pool_exhausted`, `switchover_in_progress`, ...).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Something outside the cluster that the request needs cannot be
    /// reached now (the offsite S3 bucket): 503, try again.
    #[error("{0}")]
    Unavailable(String),
    /// What cannot happen did: a bug, or stored data that is damaged.
    #[error("{0}")]
    Internal(String),
}

impl ClusterError {
    /// A clash with the current state with no more particular code.
    pub fn conflict(message: impl Into<String>) -> Self {
        ClusterError::Conflict {
            code: "conflict",
            message: message.into(),
        }
    }
}

impl From<sea_orm::DbErr> for ClusterError {
    fn from(e: sea_orm::DbErr) -> Self {
        StoreError::from(e).into()
    }
}

fn names(providers: &[Provider]) -> String {
    providers
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
