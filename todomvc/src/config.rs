//! Command-line flags and their `TODOMVC_*` environment equivalents: where to
//! listen, who we are, and where the databases are (Consul or a static list).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::discovery::Endpoint;

/// The TodoMVC webapp: Todo-Backend API and TodoMVC page on PostgreSQL.
///
/// Databases come either from Consul (`--consul`, service `postgres` tagged
/// `primary` / `replica`) or from a static list (`--db-primary`,
/// `--db-replica`). Either way every candidate is probed and only a server
/// that is not in recovery ever receives a write.
#[derive(Clone, Debug, Parser)]
#[command(name = "todomvc", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "TODOMVC_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// More addresses to listen on as well, e.g. the node's IPv6 one
    /// (repeatable; comma-separated in the env).
    #[arg(long, env = "TODOMVC_ALSO_LISTEN", value_delimiter = ',')]
    pub also_listen: Vec<SocketAddr>,

    /// Name sent in the `X-Served-By` header and logs [default: host name].
    #[arg(long, env = "TODOMVC_NODE_NAME")]
    pub node_name: Option<String>,

    /// HTTP worker threads [default: number of CPUs].
    #[arg(long, env = "TODOMVC_WORKERS")]
    pub workers: Option<usize>,

    /// Consul HTTP API to discover PostgreSQL from, e.g. http://127.0.0.1:8500.
    #[arg(long, env = "TODOMVC_CONSUL", conflicts_with_all = ["db_primary", "db_replica"])]
    pub consul: Option<String>,

    /// Consul ACL token for the catalog reads (only the environment: a
    /// flag would show in `ps`).
    #[arg(skip = std::env::var("CONSUL_HTTP_TOKEN").ok().filter(|t| !t.is_empty()))]
    pub consul_token: Option<String>,

    /// Consul service naming the PostgreSQL servers.
    #[arg(long, env = "TODOMVC_CONSUL_SERVICE", default_value = "postgres")]
    pub consul_service: String,

    /// Static primary `host[:port]` (repeatable; comma-separated in the env).
    #[arg(long, env = "TODOMVC_DB_PRIMARY", value_delimiter = ',')]
    pub db_primary: Vec<Endpoint>,

    /// Static replica `host[:port]` (repeatable; comma-separated in the env).
    #[arg(long, env = "TODOMVC_DB_REPLICAS", value_delimiter = ',')]
    pub db_replica: Vec<Endpoint>,

    /// Database holding the todos.
    #[arg(long, env = "TODOMVC_DB_NAME", default_value = "todomvc")]
    pub db_name: String,

    /// Database user.
    #[arg(long, env = "TODOMVC_DB_USER", default_value = "todomvc")]
    pub db_user: String,

    /// Database password (prefer the environment: flags show in `ps`).
    #[arg(long, env = "TODOMVC_DB_PASSWORD", hide_env_values = true)]
    pub db_password: Option<String>,

    /// Most connections each worker keeps open to each database server.
    #[arg(long, env = "TODOMVC_DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: u32,

    /// Longest wait, in milliseconds, for a database connection.
    #[arg(long, env = "TODOMVC_DB_CONNECT_TIMEOUT_MS", default_value_t = 2000)]
    pub db_connect_timeout_ms: u64,

    /// Longest a statement may run, in milliseconds, on the server and as
    /// seen from here (a server that stops answering is given up on too).
    #[arg(long, env = "TODOMVC_DB_STATEMENT_TIMEOUT_MS", default_value_t = 5000)]
    pub db_statement_timeout_ms: u64,

    /// How often, in milliseconds, every database server is probed for its
    /// role and replay position (also at once after a connection error).
    #[arg(long, env = "TODOMVC_PROBE_INTERVAL_MS", default_value_t = 500)]
    pub probe_interval_ms: u64,

    /// How long, in milliseconds, a whole list read from the primary may be
    /// served again to sessions it holds every write of (0: no list cache).
    /// Other clients' writes through other webapps show within this time.
    #[arg(long, env = "TODOMVC_LIST_CACHE_MS", default_value_t = 250)]
    pub list_cache_ms: u64,

    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "TODOMVC_SHUTDOWN_TIMEOUT", default_value_t = 10)]
    pub shutdown_timeout_secs: u64,

    /// Log format on stdout.
    #[arg(long, env = "TODOMVC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// For tests running the app in-process: leave SIGTERM/SIGINT to the host.
    #[arg(skip)]
    pub ignore_signals: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("no database given: pass --consul URL, or --db-primary / --db-replica host:port")]
    NoDatabase,
    #[error("--consul must be an http:// URL, got {0:?}")]
    ConsulUrl(String),
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
}

impl Config {
    /// Checks what clap cannot: at least one source of databases, sane numbers.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.consul {
            Some(url) if !url.starts_with("http://") => {
                return Err(ConfigError::ConsulUrl(url.clone()));
            }
            None if self.db_primary.is_empty() && self.db_replica.is_empty() => {
                return Err(ConfigError::NoDatabase);
            }
            _ => {}
        }
        for (name, value) in [
            ("--db-pool-size", u64::from(self.db_pool_size)),
            ("--db-connect-timeout-ms", self.db_connect_timeout_ms),
            ("--db-statement-timeout-ms", self.db_statement_timeout_ms),
            ("--probe-interval-ms", self.probe_interval_ms),
            ("--workers", self.workers.unwrap_or(1) as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        Ok(())
    }

    /// The node name, defaulting to the host name.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "todomvc".to_string())
        })
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.db_connect_timeout_ms)
    }

    pub fn statement_timeout(&self) -> Duration {
        Duration::from_millis(self.db_statement_timeout_ms)
    }

    pub fn list_cache_max_age(&self) -> Duration {
        Duration::from_millis(self.list_cache_ms)
    }

    pub fn probe_interval(&self) -> Duration {
        Duration::from_millis(self.probe_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("todomvc").chain(args.iter().copied()))
    }

    #[test]
    fn static_endpoints_are_repeatable_and_default_to_port_5432() {
        let c = parse(&[
            "--db-primary",
            "127.0.11.11",
            "--db-replica",
            "127.0.11.12:6543",
            "--db-replica",
            "[::1]:5433",
        ])
        .unwrap();
        assert_eq!(c.db_primary[0].to_string(), "127.0.11.11:5432");
        assert_eq!(c.db_replica[0].to_string(), "127.0.11.12:6543");
        assert_eq!(c.db_replica[1].to_string(), "[::1]:5433");
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn consul_and_static_list_exclude_each_other() {
        assert!(parse(&["--consul", "http://127.0.0.1:8500", "--db-primary", "a:1"]).is_err());
    }

    #[test]
    fn a_database_source_is_required() {
        assert_eq!(parse(&[]).unwrap().validate(), Err(ConfigError::NoDatabase));
        let c = parse(&["--consul", "127.0.0.1:8500"]).unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::ConsulUrl(_))));
    }

    #[test]
    fn zero_timeouts_are_refused() {
        let c = parse(&["--db-primary", "a", "--db-statement-timeout-ms", "0"]).unwrap();
        assert_eq!(
            c.validate(),
            Err(ConfigError::Zero("--db-statement-timeout-ms"))
        );
    }
}
