//! `corral-agent run` flags and their `CORRAL_*` environment equivalents.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct RunConfig {
    /// The control plane, e.g. http://127.0.11.5:7000.
    #[arg(long, env = "CORRAL_SERVER")]
    pub server: String,
    /// This node's name (as the control plane knows it).
    #[arg(long, env = "CORRAL_NODE")]
    pub node: String,
    /// The node's address: every service binds it.
    #[arg(long, env = "CORRAL_AGENT_ADDRESS")]
    pub address: String,
    /// Where the agent keeps its state, pid files, logs and service data.
    #[arg(long, env = "CORRAL_AGENT_STATE_DIR")]
    pub state_dir: PathBuf,
    /// The cluster join token (prefer the file or the environment).
    #[arg(long, env = "CORRAL_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// A file holding the cluster join token.
    #[arg(long, env = "CORRAL_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// nginx listens on this port instead of the one in the order.
    #[arg(long, env = "CORRAL_NGINX_PORT")]
    pub nginx_port: Option<u16>,
    /// The todomvc binary [default: `todomvc` next to this executable, else on PATH].
    #[arg(long, env = "CORRAL_TODOMVC_BIN")]
    pub todomvc_bin: Option<PathBuf>,
    /// Directory of the PostgreSQL server binaries.
    #[arg(
        long,
        env = "CORRAL_PG_BIN",
        default_value = "/usr/lib/postgresql/15/bin"
    )]
    pub pg_bin: PathBuf,
    #[arg(long, env = "CORRAL_CONSUL_BIN", default_value = "consul")]
    pub consul_bin: PathBuf,
    #[arg(long, env = "CORRAL_NGINX_BIN", default_value = "nginx")]
    pub nginx_bin: PathBuf,
    /// How often to send a heartbeat and ship logs: `2s`, `500ms`.
    #[arg(long, env = "CORRAL_HEARTBEAT_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
}

impl RunConfig {
    /// The join token from the flag/env, else from the file.
    pub fn join_token(&self) -> Result<String, String> {
        if let Some(t) = &self.join_token {
            return Ok(t.trim().to_string());
        }
        match &self.join_token_file {
            Some(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("reading the join token from {}: {e}", path.display())),
            None => Err("no join token: pass --join-token or --join-token-file".into()),
        }
    }

    /// `--todomvc-bin`, else `todomvc` beside our own executable, else PATH.
    pub fn todomvc_bin(&self) -> PathBuf {
        if let Some(p) = &self.todomvc_bin {
            return p.clone();
        }
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("todomvc")))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("todomvc"))
    }
}

/// Parses `2s`, `500ms`, `1m` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 2s, 500ms or 1m");
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(bad()),
    };
    if d.is_zero() {
        return Err(format!("{s:?} must be more than zero"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("2h").is_err());
    }
}
