//! The web UI in a real headless Chromium against a real corral server.
//! One binary; each test starts its own server and browser. (`servers.rs`
//! beside it is a binary of its own: it starts PostgreSQL with the testkit,
//! whose `wait` the e2e reaper of `cluster.rs` would take from it.)

mod cluster;
mod simulated;
