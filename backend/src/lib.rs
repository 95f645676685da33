//! corral's control plane: the desired state of the cluster in its own
//! database, the reconciler that turns it into work orders, and the REST API
//! the web UI, the CLI and every node agent talk to.

pub mod api;
pub mod apt;
pub mod auth;
pub mod backup_store;
pub mod bus;
pub mod cli;
pub mod cluster;
pub mod consul_acl;
pub mod error;
pub mod prometheus;
pub mod provider;
pub mod reconcile;
pub mod s3;
pub mod startup;
pub mod statedb;
pub mod store;
pub mod switchover;
pub mod tls;
pub mod ui;

pub use startup::{Application, Config};
