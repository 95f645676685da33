//! `corral-agent run` flags, their `CORRAL_*` environment equivalents, and a
//! config file of `key = value` lines (`--config`, `CORRAL_AGENT_CONFIG`).
//! Flags win over the environment, which wins over the file.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct RunConfig {
    /// A file of `key = value` lines naming flags without `--`, e.g.
    /// `server = http://127.0.11.5:7000`; flags and the environment win.
    #[arg(long, env = "CORRAL_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The control plane, e.g. http://127.0.11.5:7000. Repeat it (or
    /// separate by commas) for servers sharing one database: the agent
    /// moves to the next when one cannot be reached or answers 5xx.
    #[arg(long, env = "CORRAL_SERVER", value_delimiter = ',', required = true)]
    pub server: Vec<String>,
    /// This node's name (as the control plane knows it).
    #[arg(long, env = "CORRAL_NODE")]
    pub node: String,
    /// The node's IP address: every service binds it.
    #[arg(long, env = "CORRAL_AGENT_ADDRESS")]
    pub address: std::net::IpAddr,
    /// Where the agent keeps its state, pid files, logs and service data.
    #[arg(long, env = "CORRAL_AGENT_STATE_DIR")]
    pub state_dir: PathBuf,
    /// The node's single-use enrollment secret (prefer the file or the
    /// environment). Needed only while the agent holds no token of its own.
    #[arg(long, env = "CORRAL_ENROLL_SECRET", hide_env_values = true)]
    pub enroll_secret: Option<String>,
    /// A file holding the node's enrollment secret, read each time the
    /// agent enrolls (so a secret minted later can be dropped in).
    #[arg(long, env = "CORRAL_ENROLL_SECRET_FILE")]
    pub enroll_secret_file: Option<PathBuf>,
    /// The cluster CA (PEM) to trust for an `https://` server, and nothing
    /// else: it comes with the enrollment secret.
    #[arg(long, env = "CORRAL_CA_FILE")]
    pub ca_file: Option<PathBuf>,
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
    /// How often to sample the node's metrics (and send them): `10s`.
    #[arg(long, env = "CORRAL_METRICS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub metrics_interval: Duration,
    /// A service log is rotated past this size: `10M`, `512K`, bytes.
    #[arg(long, env = "CORRAL_LOG_MAX_SIZE", default_value = "10M", value_parser = parse_size)]
    pub log_max_size: u64,
    /// Rotated logs kept per service (`<service>.log.1` newest).
    #[arg(long, env = "CORRAL_LOG_KEEP", default_value_t = 3)]
    pub log_keep: u32,
    /// Load firewall orders into this machine's nftables: `on` where the
    /// node is a machine of its own (the LXC and VirtualBox providers set
    /// it). `off` writes the ruleset to the state dir only: local nodes
    /// share their host's network, which is not theirs to filter.
    #[arg(long, env = "CORRAL_FIREWALL", default_value = "off", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub firewall: bool,
    /// The machine's syslog, shipped to the control plane as the service
    /// `syslog`: `auto` (`/var/log/syslog` where rsyslog writes one, else
    /// the journal; what the LXC provider sets), `journal`, or a file. Unset
    /// where the node shares its host (local nodes): the host's syslog is
    /// not theirs.
    #[arg(long, env = "CORRAL_SYSLOG")]
    pub syslog: Option<PathBuf>,
}

impl RunConfig {
    /// Where the enrollment secret comes from.
    pub fn enroll_secret(&self) -> EnrollSecretSource {
        EnrollSecretSource {
            value: self.enroll_secret.as_ref().map(|t| t.trim().to_string()),
            file: self.enroll_secret_file.clone(),
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

/// The node's enrollment secret: given directly, or in a file read afresh at
/// every enrollment.
#[derive(Debug, Clone, Default)]
pub struct EnrollSecretSource {
    pub value: Option<String>,
    pub file: Option<PathBuf>,
}

impl EnrollSecretSource {
    pub fn read(&self) -> Result<String, String> {
        if let Some(t) = &self.value {
            return Ok(t.clone());
        }
        match &self.file {
            Some(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("reading the enrollment secret from {}: {e}", path.display())),
            None => Err(
                "no enrollment secret: pass --enroll-secret or --enroll-secret-file \
                 (an admin mints one with `corral nodes reenroll NODE`)"
                    .into(),
            ),
        }
    }
}

/// The flags a config file may set, with their environment variables.
const FILE_KEYS: &[(&str, &str)] = &[
    ("server", "CORRAL_SERVER"),
    ("node", "CORRAL_NODE"),
    ("address", "CORRAL_AGENT_ADDRESS"),
    ("state-dir", "CORRAL_AGENT_STATE_DIR"),
    ("enroll-secret", "CORRAL_ENROLL_SECRET"),
    ("enroll-secret-file", "CORRAL_ENROLL_SECRET_FILE"),
    ("ca-file", "CORRAL_CA_FILE"),
    ("nginx-port", "CORRAL_NGINX_PORT"),
    ("todomvc-bin", "CORRAL_TODOMVC_BIN"),
    ("pg-bin", "CORRAL_PG_BIN"),
    ("consul-bin", "CORRAL_CONSUL_BIN"),
    ("nginx-bin", "CORRAL_NGINX_BIN"),
    ("heartbeat-interval", "CORRAL_HEARTBEAT_INTERVAL"),
    ("metrics-interval", "CORRAL_METRICS_INTERVAL"),
    ("log-max-size", "CORRAL_LOG_MAX_SIZE"),
    ("log-keep", "CORRAL_LOG_KEEP"),
    ("firewall", "CORRAL_FIREWALL"),
    ("syslog", "CORRAL_SYSLOG"),
];

/// Adds the settings of the config file to `args` as flags, where neither
/// a flag nor the environment (`env_set`) gives them already: all of them
/// for `run`, the state directory for `stop-all` (so one file serves both).
pub fn merge_config_file(
    args: Vec<OsString>,
    env_set: impl Fn(&str) -> bool,
    read: impl Fn(&std::path::Path) -> std::io::Result<String>,
) -> Result<Vec<OsString>, String> {
    let only_state_dir = match args.get(1).and_then(|a| a.to_str()) {
        Some("run") => false,
        Some("stop-all") => true,
        _ => return Ok(args),
    };
    let text_args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let from_flag = text_args.iter().enumerate().find_map(|(i, a)| {
        if a == "--config" {
            text_args.get(i + 1).cloned()
        } else {
            a.strip_prefix("--config=").map(String::from)
        }
    });
    let path = match from_flag.or_else(|| std::env::var("CORRAL_AGENT_CONFIG").ok()) {
        Some(p) => PathBuf::from(p),
        None => return Ok(args),
    };
    let text = read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut args = args;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "{}:{}: expected key = value",
                path.display(),
                n + 1
            ));
        };
        let key = key.trim().replace('_', "-");
        let value = value.trim().trim_matches('"');
        let Some((flag, env)) = FILE_KEYS.iter().find(|(k, _)| *k == key) else {
            return Err(format!(
                "{}:{}: unknown key {key:?} (known: {})",
                path.display(),
                n + 1,
                FILE_KEYS
                    .iter()
                    .map(|(k, _)| *k)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        if only_state_dir && *flag != "state-dir" {
            continue;
        }
        let long = format!("--{flag}");
        let given = text_args
            .iter()
            .any(|a| *a == long || a.starts_with(&format!("{long}=")));
        if !given && !env_set(env) {
            args.push(long.into());
            args.push(value.into());
        }
    }
    Ok(args)
}

/// Parses a size: bytes, or with `K`, `M` or `G` (powers of 1024); at
/// least 4 KiB, so a log always holds a few lines.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size like 10M, 512K or 1048576");
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match unit {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(1 << shift).ok_or_else(bad)?;
    if bytes < 4096 {
        return Err(format!("{s:?} is too small: at least 4K"));
    }
    Ok(bytes)
}

/// Parses `2s`, `500ms`, `1m` or plain seconds.
/// `on` or `off` (also `true`/`false`, `yes`/`no`, `1`/`0`).
pub fn parse_switch(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{s:?} is neither on nor off")),
    }
}

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
    fn sizes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("65536"), Ok(65536));
        for bad in ["", "M", "10X", "-1", "100", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[derive(clap::Parser)]
    struct Run {
        #[command(flatten)]
        config: RunConfig,
    }

    #[test]
    fn the_firewall_switch_is_off_unless_given_on_by_flag_or_config_file() {
        use clap::Parser;
        let base = [
            "run",
            "--server",
            "http://a:7000",
            "--node",
            "nginx1",
            "--address",
            "127.0.11.21",
            "--state-dir",
            "/tmp/x",
        ];
        let parse = |more: &[&str]| {
            let mut argv: Vec<&str> = base.to_vec();
            argv.extend(more);
            Run::try_parse_from(argv).map(|r| r.config.firewall)
        };
        assert_eq!(parse(&[]).ok(), Some(false));
        assert_eq!(parse(&["--firewall", "on"]).ok(), Some(true));
        assert_eq!(parse(&["--firewall", "off"]).ok(), Some(false));
        assert!(parse(&["--firewall", "maybe"]).is_err());
        // As the LXC provider writes it into agent.conf.
        let merged = merge_config_file(
            args(&["corral-agent", "run", "--config", "/etc/corral/agent.conf"]),
            |_| false,
            |_| Ok("server = http://a:7000\nnode = nginx1\naddress = 127.0.11.21\nstate-dir = /tmp/x\nfirewall = on\n".into()),
        )
        .expect("merge");
        let run = Run::try_parse_from(&merged[1..]).expect("parse the merged arguments");
        assert!(run.config.firewall);
    }

    #[test]
    fn several_servers_come_repeated_or_comma_separated() {
        use clap::Parser;
        let base = ["run", "--node", "nginx1", "--address", "127.0.11.21"];
        let parse = |servers: &[&str]| {
            let mut argv: Vec<&str> = base.to_vec();
            argv.extend(["--state-dir", "/tmp/x"]);
            argv.extend(servers);
            Run::try_parse_from(argv).map(|r| r.config.server)
        };
        let want = vec!["http://a:7000".to_string(), "http://b:7000".to_string()];
        assert_eq!(
            parse(&["--server", "http://a:7000", "--server", "http://b:7000"]).ok(),
            Some(want.clone())
        );
        assert_eq!(
            parse(&["--server", "http://a:7000,http://b:7000"]).ok(),
            Some(want)
        );
        assert!(parse(&[]).is_err(), "a server is required");
    }

    #[test]
    fn config_file_fills_in_what_flags_and_environment_leave_open() {
        let file = "# agent\nserver = \"http://127.0.11.5:7000\"\nnode = pg1\nstate_dir = /var/lib/corral\n";
        let merged = merge_config_file(
            args(&[
                "corral-agent",
                "run",
                "--config",
                "/etc/corral/agent.conf",
                "--node",
                "pg2",
            ]),
            |env| env == "CORRAL_AGENT_STATE_DIR",
            |_| Ok(file.to_string()),
        )
        .expect("merge");
        assert_eq!(
            merged,
            args(&[
                "corral-agent",
                "run",
                "--config",
                "/etc/corral/agent.conf",
                "--node",
                "pg2",
                "--server",
                "http://127.0.11.5:7000",
            ])
        );
    }

    #[test]
    fn stop_all_takes_only_the_state_dir_from_the_config_file() {
        let file = "server = http://127.0.11.5:7000\nstate-dir = /var/lib/corral-agent\n";
        let merged = merge_config_file(
            args(&[
                "corral-agent",
                "stop-all",
                "--config",
                "/etc/corral/agent.conf",
            ]),
            |_| false,
            |_| Ok(file.to_string()),
        )
        .expect("merge");
        assert_eq!(
            merged,
            args(&[
                "corral-agent",
                "stop-all",
                "--config",
                "/etc/corral/agent.conf",
                "--state-dir",
                "/var/lib/corral-agent",
            ])
        );
    }

    #[test]
    fn config_file_with_an_unknown_key_is_refused() {
        let err = merge_config_file(
            args(&["corral-agent", "run", "--config=/x"]),
            |_| false,
            |_| Ok("sever = http://x\n".to_string()),
        )
        .expect_err("unknown key");
        assert!(err.contains("unknown key \"sever\""), "{err}");
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("2h").is_err());
    }
}
