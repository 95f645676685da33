//! corral's node agent: it enrolls with the control plane, long-polls the
//! node's work orders, makes them true on the node with the drivers (consul,
//! nginx, todomvc, PostgreSQL), supervises those processes itself and reports
//! what it observes. The binary in `main.rs` is a thin shell around [`run`].

#![forbid(unsafe_code)]

pub mod archive;
pub mod check;
pub mod config;
pub mod consul_api;
pub mod control;
pub mod drivers;
pub mod durable;
pub mod host;
pub mod host_agent;
pub mod logship;
pub mod metrics;
pub mod node;
pub mod observe;
pub mod procfs;
pub mod run;
pub mod stop_all;
pub mod supervisor;
pub mod vbox;
pub mod virtualbox;

pub use config::RunConfig;
pub use run::run;
