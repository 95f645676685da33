//! API tests: one binary, each test on its own server and database, most run
//! over both SQLite and a real PostgreSQL 15.

mod helpers;

mod agents;
mod apt;
mod auth;
mod backups;
mod bad_input;
mod cli;
mod db;
mod events;
mod hosts;
mod logs;
mod metrics;
mod nodes;
mod offsite;
mod openapi;
mod retention;
mod servers;
mod topology;
mod ui;
