//! Integration tests of the todomvc webapp against real PostgreSQL 15
//! servers (started unprivileged by corral-testkit), a real Consul agent
//! and a real headless Chromium. One test binary, so it links once.

mod api;
mod browser;
mod consul;
mod failover;
mod load_balanced;
mod process;
mod replicas;
mod support;
