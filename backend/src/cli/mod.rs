//! The `corral` command: `serve` runs the control plane; every other
//! subcommand is a thin client of its REST API.

mod client;
mod output;
pub mod up;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use corral_proto::{
    BackupStatus, CreateNode, Event, LbPolicy, Order, OrderStatus, Provider, ReplicationMode,
    RestoreRequest, ScalableRole, TopologyUpdate,
};
use futures_util::StreamExt;

use crate::api::parse_wait;
use crate::reconcile::AddressPlan;
use crate::startup::{Application, Config};
use client::{Client, LogQuery, Removed};
use output::Output;

#[derive(Debug, Parser)]
#[command(
    name = "corral",
    version,
    about = "Control plane for a web cluster: nginx, TodoMVC, PostgreSQL, Consul"
)]
pub struct Cli {
    /// URL of the corral server; repeat it (or separate by commas) for
    /// servers sharing one database: a request that cannot connect or gets
    /// a 5xx moves to the next.
    #[arg(
        long,
        alias = "server",
        global = true,
        env = "CORRAL_URL",
        value_delimiter = ',',
        default_value = "http://127.0.11.5:7000"
    )]
    url: Vec<String>,
    /// The cluster CA to trust for an https:// server (default:
    /// tls/ca.pem in --state-dir, if there).
    #[arg(long, global = true, env = "CORRAL_CA")]
    ca: Option<PathBuf>,
    /// Admin token (default: the admin-token file in --state-dir, if readable).
    #[arg(long, global = true, env = "CORRAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Output format.
    #[arg(long, global = true, env = "CORRAL_OUTPUT", value_enum, default_value_t = Format::Table)]
    output: Format,
    /// State directory of the server (holds the database and tokens).
    #[arg(
        long,
        global = true,
        env = "CORRAL_STATE_DIR",
        default_value = "./.corral"
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane server.
    Serve(ServeArgs),
    /// List, add, show or remove nodes.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// The work orders of a node.
    Orders {
        node: String,
        /// Only orders after this seq.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// The PostgreSQL cluster: replication status, planned switchover.
    #[command(subcommand)]
    Db(DbCommand),
    /// The audit log.
    Events {
        /// Keep printing new events as they happen.
        #[arg(long, short)]
        follow: bool,
        /// Only events after this id.
        #[arg(long)]
        after: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: u64,
    },
    /// The service logs a node's agent shipped, oldest first.
    Logs {
        node: String,
        /// Only this service's lines (nginx, postgres, consul, todomvc, ...).
        #[arg(long, short)]
        service: Option<String>,
        /// Keep printing new lines as they arrive.
        #[arg(long, short)]
        follow: bool,
        /// Only lines containing this text (plain, case-sensitive).
        #[arg(long)]
        grep: Option<String>,
        /// How many of the newest lines to print first (at most 500).
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Show or change the desired topology.
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Print the OpenAPI document (YAML) the server serves.
    Openapi,
    /// Run the whole cluster on this machine: the control plane on adm1's
    /// address and a machine per node (local processes, or LXC containers
    /// with --provider lxc); Ctrl-C stops it.
    Up(UpArgs),
    /// Stop the cluster a `corral up` runs (or the machines a killed one
    /// left); `--purge` deletes them with their data.
    Down(DownArgs),
}

#[derive(Debug, Args)]
struct DownArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Also delete every machine with its data, and the control plane's
    /// database (the secrets stay): the next `corral up` starts anew.
    #[arg(long)]
    purge: bool,
}

#[derive(Debug, Args)]
struct UpArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Web nodes wanted [default: 2 on a new cluster, else as it is].
    #[arg(long)]
    web: Option<u32>,
    /// Database nodes wanted [default: 2 on a new cluster, else as it is].
    #[arg(long)]
    db: Option<u32>,
    /// How long to wait for every node to serve before saying which do not.
    #[arg(long, default_value = "300s", value_parser = duration)]
    ready_timeout: Duration,
    /// Control-plane servers, one per admin address (adm1 base+5, adm2
    /// base+6, ...). More than one share a PostgreSQL state database:
    /// --database-url, else a primary on adm1 and a standby on each other
    /// admin address, run and failed over by this `up`. 1 keeps SQLite.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=crate::reconcile::MAX_ADMIN_HOSTS as i64))]
    servers: u32,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on [default: adm1's address in --network, port 7000].
    #[arg(long, env = "CORRAL_LISTEN")]
    listen: Option<String>,
    /// PostgreSQL URL for the state; SQLite in --state-dir when unset.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Address base and block of local nodes: seed addresses are base+5
    /// (adm1), base+11.. (pg), base+21.. (nginx); more come from base+30 on.
    #[arg(long, env = "CORRAL_NETWORK", default_value = "127.0.11.0/24")]
    network: AddressPlan,
    /// Provider of nodes added without one (local, lxc or manual).
    #[arg(long, env = "CORRAL_PROVIDER", default_value = "local")]
    provider: Provider,
    /// More providers to accept nodes of, besides --provider and manual,
    /// e.g. `--providers local,lxc`.
    #[arg(long, env = "CORRAL_PROVIDERS", value_delimiter = ',')]
    providers: Vec<Provider>,
    /// Make no machines: only accept nodes whose agents are installed by
    /// hand (or simulated).
    #[arg(long)]
    no_machines: bool,
    /// Address block of LXC containers, on a host bridge that carries adm1's
    /// address (base+5): the seed's own network by default.
    #[arg(long, env = "CORRAL_LXC_NETWORK", default_value = "192.168.11.0/24")]
    lxc_network: AddressPlan,
    /// The host bridge LXC containers sit on (made if missing).
    #[arg(long, env = "CORRAL_LXC_BRIDGE", default_value = "corralbr0")]
    lxc_bridge: String,
    /// Directory of the corral-agent and todomvc .deb packages LXC
    /// containers install [default: target/debian beside the corral
    /// executable (scripts/package.sh), else /var/lib/corral/debs].
    #[arg(long, env = "CORRAL_LXC_PACKAGES")]
    lxc_packages: Option<PathBuf>,
    /// The corral-agent executable local nodes run [default: next to
    /// corral, else PATH].
    #[arg(long, env = "CORRAL_AGENT_BIN")]
    agent_bin: Option<PathBuf>,
    /// Port nginx listens on at every local web node's address.
    #[arg(long, default_value_t = corral_proto::ports::NGINX)]
    nginx_port: u16,
    /// Consul datacenter name.
    #[arg(long, default_value = "corral")]
    datacenter: String,
    /// The port SSH listens on at adm1: the only port besides the UI/API
    /// that adm1's firewall opens to the world.
    #[arg(long, env = "CORRAL_SSH_PORT", default_value_t = corral_proto::ports::SSH)]
    ssh_port: u16,
    /// Longest a long poll may hold, e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = duration)]
    max_poll_wait: Duration,
    /// A node is stale after this long without a heartbeat.
    #[arg(long, default_value = "15s", value_parser = duration)]
    heartbeat_stale_after: Duration,
    /// Finished orders kept per node (besides the newest of each kind).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    keep_orders: u64,
    /// Events kept at most (the oldest go first).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    keep_events: u64,
    /// Events older than this go, e.g. 30d, 12h.
    #[arg(long, default_value = "30d", value_parser = age)]
    keep_events_for: Duration,
    /// HTTP worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// The built web UI to serve at / (default: frontend/dist under the
    /// current directory or the executable's, if built).
    #[arg(long, env = "CORRAL_UI_DIR")]
    ui_dir: Option<PathBuf>,
    /// corral's apt repository to serve at /apt/ (default: <state-dir>/apt,
    /// else target/debian/repo under the current directory, if there).
    #[arg(long, env = "CORRAL_APT_DIR")]
    apt_dir: Option<PathBuf>,
    /// TLS for the API and agents: auto (on unless --listen is a loopback
    /// address), on, or off (refused off loopback). The cluster CA is made
    /// at first start in <state-dir>/tls/.
    #[arg(long, env = "CORRAL_TLS", value_enum, default_value_t = crate::tls::TlsMode::Auto)]
    tls: crate::tls::TlsMode,
    /// More names or addresses for the server certificate (besides the
    /// listen address and adm1).
    #[arg(long = "tls-name", env = "CORRAL_TLS_NAMES", value_delimiter = ',')]
    tls_names: Vec<String>,
    /// The URL of another server sharing this PostgreSQL database
    /// (repeatable): agents of the machines this server makes are given it
    /// after this server's own, and move to it when this one fails.
    #[arg(long = "peer", env = "CORRAL_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// Also copy every backup and archived WAL segment to this
    /// S3-compatible endpoint, e.g. https://s3.eu-west-1.amazonaws.com.
    /// Credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the
    /// environment, or --s3-credentials-file; never on the command line.
    #[arg(long, env = "CORRAL_S3_ENDPOINT", requires = "s3_bucket")]
    s3_endpoint: Option<String>,
    /// The bucket of the offsite copy (it must exist).
    #[arg(long, env = "CORRAL_S3_BUCKET", requires = "s3_endpoint")]
    s3_bucket: Option<String>,
    /// The bucket's region.
    #[arg(long, env = "CORRAL_S3_REGION", default_value = "us-east-1")]
    s3_region: String,
    /// Prefix of every object key; give each cluster its own.
    #[arg(long, env = "CORRAL_S3_PREFIX", default_value = "corral/")]
    s3_prefix: String,
    /// A file (mode 0600) with `access_key_id = ...` and
    /// `secret_access_key = ...` lines; an AWS credentials file works.
    #[arg(long, env = "CORRAL_S3_CREDENTIALS_FILE")]
    s3_credentials_file: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for an https endpoint, besides the
    /// system's.
    #[arg(long, env = "CORRAL_S3_CA")]
    s3_ca: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// List every node.
    List,
    /// Add a node: it gets the next name and address of its role.
    Add {
        /// web or db.
        #[arg(long)]
        role: ScalableRole,
        /// Where the node comes from (default: the server's --provider).
        #[arg(long)]
        provider: Option<Provider>,
    },
    /// Show one node with what its agent observed.
    Show { name: String },
    /// Remove a node: drain, then remove.
    Remove {
        name: String,
        /// Remove at once without draining.
        #[arg(long)]
        force: bool,
    },
    /// Mint a node's enrollment secret (single-use, expires in an hour), to
    /// enroll its agent by hand: a `manual` node, or a machine that lost its
    /// agent's state. Prints the secret alone on stdout.
    #[command(alias = "enroll-secret")]
    Reenroll { name: String },
}

#[derive(Debug, Subcommand)]
enum DbCommand {
    /// Every db node with its replication role, lag, timeline and sync standby.
    Status,
    /// Make a standby the primary without losing a write: the current
    /// primary demotes itself once the standby has caught up.
    Switchover {
        /// The standby to promote, e.g. pg2.
        #[arg(long)]
        to: String,
        /// Wait until the primary's agent reports the order applied or
        /// failed (the default).
        #[arg(long, overrides_with = "no_wait")]
        wait: bool,
        /// Return as soon as the order is filed.
        #[arg(long, overrides_with = "wait")]
        no_wait: bool,
        /// How long --wait waits for the outcome.
        #[arg(long, default_value = "120s", value_parser = duration)]
        timeout: Duration,
    },
    /// The base backups in adm1's store, newest first.
    Backups {
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Take a base backup.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Restore the newest backup finished before --time (plus the archived
    /// WAL up to it) into a new instance on adm1, or with --new-node on a
    /// new node of its own, outside the replicated cluster, and print what
    /// it holds.
    Restore {
        /// Name of the new instance, e.g. restore1.
        #[arg(long)]
        to: String,
        /// Restore to this moment (RFC 3339, e.g. 2026-12-03T12:00:00Z);
        /// default: to the end of the archived WAL.
        #[arg(long, value_parser = rfc3339)]
        time: Option<chrono::DateTime<chrono::Utc>>,
        /// Port of the restored instance (default 5433 on adm1, 5432 on a
        /// new node).
        #[arg(long)]
        port: Option<u16>,
        /// Make a new node (restoreN, with its own address and agent) and
        /// restore there instead of on adm1; `corral nodes remove` it when
        /// done.
        #[arg(long)]
        new_node: bool,
        /// Where the new node comes from (default: the server's
        /// --provider); only with --new-node.
        #[arg(long, requires = "new_node")]
        provider: Option<Provider>,
        /// Return as soon as the order is filed.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the restore to finish.
        #[arg(long, default_value = "1h", value_parser = age)]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Take one now (from a streaming standby when there is one) and wait
    /// until it is in adm1's store.
    Now {
        /// Return as soon as it is ordered.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for it.
        #[arg(long, default_value = "1h", value_parser = age)]
        timeout: Duration,
    },
}

fn rfc3339(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time such as 2026-12-03T12:00:00Z: {e}"))
}

#[derive(Debug, Subcommand)]
enum TopologyCommand {
    /// Show the desired topology.
    Get,
    /// Change the desired topology; unspecified fields keep their value.
    Set {
        #[arg(long)]
        web: Option<u32>,
        #[arg(long)]
        db: Option<u32>,
        #[arg(long)]
        lb_policy: Option<LbPolicy>,
        #[arg(long)]
        replication: Option<ReplicationMode>,
        /// Take a base backup every day at this time (HH:MM, UTC).
        #[arg(long, requires = "backup_keep")]
        backup_schedule: Option<String>,
        /// How many finished backups the schedule keeps.
        #[arg(long, requires = "backup_schedule")]
        backup_keep: Option<u32>,
        /// Take no scheduled backups any more.
        #[arg(long, conflicts_with_all = ["backup_schedule", "backup_keep"])]
        no_backup_schedule: bool,
        /// Start from the seed topology (2 web, 2 db) instead of the current one.
        #[arg(long)]
        seed: bool,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_wait(s).map_err(|e| e.to_string())
}

/// A retention age: `30d`, `12h`, or a duration like `90m`.
fn age(s: &str) -> Result<Duration, String> {
    let count = |n: &str, unit: u64| {
        n.parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .map(|n| Duration::from_secs(u64::from(n) * unit))
            .ok_or_else(|| format!("{s:?} is not an age like 30d, 12h or 90m"))
    };
    if let Some(days) = s.strip_suffix('d') {
        count(days, 24 * 3600)
    } else if let Some(hours) = s.strip_suffix('h') {
        count(hours, 3600)
    } else {
        duration(s).and_then(|d| {
            if d.is_zero() {
                Err(format!("{s:?} is not an age like 30d, 12h or 90m"))
            } else {
                Ok(d)
            }
        })
    }
}

impl Cli {
    /// The log filter when `RUST_LOG` is unset: `up` and `down` show their
    /// own progress, so only warnings from the server mix into it.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Up(_) | Command::Down { .. } => "warn",
            _ => "info,sqlx=warn",
        }
    }

    /// `serve` and `up`: the commands that run the server for long.
    pub fn is_long_running(&self) -> bool {
        matches!(self.command, Command::Serve(_) | Command::Up(_))
    }

    fn client(&self) -> Client {
        let token = self.token.clone().or_else(|| {
            std::fs::read_to_string(self.state_dir.join("admin-token"))
                .ok()
                .map(|s| s.trim().to_string())
        });
        let ca = match &self.ca {
            Some(path) => Some(path.clone()),
            None => Some(self.state_dir.join("tls/ca.pem")).filter(|p| p.is_file()),
        };
        let ca_pem = ca.and_then(|path| match std::fs::read(&path) {
            Ok(pem) => Some(pem),
            Err(e) => {
                eprintln!(
                    "warning: cannot read the cluster CA {}: {e}",
                    path.display()
                );
                None
            }
        });
        Client::new(&self.url, token, ca_pem.as_deref())
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = Output::new(cli.output);
    match &cli.command {
        Command::Serve(args) => serve(&cli, args).await,
        Command::Up(args) if args.servers > 1 => {
            up::up_servers(
                server_config(&cli, &args.serve)?,
                up::UpOptions {
                    web: args.web,
                    db: args.db,
                    nginx_port: args.serve.nginx_port,
                    ready_timeout: args.ready_timeout,
                },
                up::ServersOptions {
                    count: args.servers,
                    serve_args: child_serve_args(&args.serve),
                },
            )
            .await
        }
        Command::Up(args) => {
            up::up(
                server_config(&cli, &args.serve)?,
                up::UpOptions {
                    web: args.web,
                    db: args.db,
                    nginx_port: args.serve.nginx_port,
                    ready_timeout: args.ready_timeout,
                },
            )
            .await
        }
        Command::Down(args) => up::down(server_config(&cli, &args.serve)?, args.purge).await,
        Command::Openapi => {
            print!("{}", crate::api::openapi_yaml());
            Ok(())
        }
        Command::Nodes(cmd) => {
            let client = cli.client();
            match cmd {
                NodesCommand::List => out.nodes(&client.nodes().await?),
                NodesCommand::Show { name } => out.node(&client.node(name).await?),
                NodesCommand::Add { role, provider } => {
                    let node = client
                        .add_node(&CreateNode {
                            role: *role,
                            provider: *provider,
                        })
                        .await?;
                    out.node(&node)
                }
                NodesCommand::Reenroll { name } => {
                    out.enroll_secret(&client.mint_enroll_secret(name).await?)
                }
                NodesCommand::Remove { name, force } => {
                    match client.remove_node(name, *force).await? {
                        Removed::Gone => out.message(&format!("{name} removed")),
                        Removed::Draining(node) => {
                            out.message(&format!(
                                "{name} is draining; it is removed once its agent has drained"
                            ))?;
                            out.node(&node)
                        }
                    }
                }
            }
        }
        Command::Db(DbCommand::Status) => out.db_status(&cli.client().nodes().await?),
        Command::Db(DbCommand::Switchover {
            to,
            wait: _,
            no_wait,
            timeout,
        }) => {
            let client = cli.client();
            let accepted = client.switchover(to).await?;
            out.switchover(&accepted)?;
            if *no_wait {
                return Ok(());
            }
            let order = wait_for_order(&client, &accepted.from, accepted.seq, *timeout).await?;
            out.switchover_done(&accepted, &order)?;
            if order.status == OrderStatus::Failed {
                bail!(
                    "switchover {} -> {} failed: {}",
                    accepted.from,
                    accepted.to,
                    order.result.as_deref().unwrap_or("no details")
                );
            }
            Ok(())
        }
        Command::Db(DbCommand::Backups { limit }) => {
            let client = cli.client();
            out.backups(&client.backups(*limit).await?)?;
            out.offsite(client.backups_status().await?.s3.as_ref())
        }
        Command::Db(DbCommand::Backup(BackupCommand::Now { no_wait, timeout })) => {
            let client = cli.client();
            let backup = client.backup_now().await?;
            out.message(&format!("backup {} ordered on {}", backup.id, backup.node))?;
            if *no_wait {
                return Ok(());
            }
            let deadline = tokio::time::Instant::now() + *timeout;
            loop {
                let now = client.backups(1000).await?;
                match now.into_iter().find(|b| b.id == backup.id) {
                    Some(b) if b.status == BackupStatus::Done => return out.backups(&[b]),
                    Some(b) if b.status == BackupStatus::Failed => {
                        out.backups(std::slice::from_ref(&b))?;
                        bail!(
                            "backup {} failed: {}",
                            b.id,
                            b.error.as_deref().unwrap_or("no details")
                        );
                    }
                    Some(_) => {}
                    None => bail!("backup {} is gone", backup.id),
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "backup {} is not finished after {}s; see `corral db backups`",
                        backup.id,
                        timeout.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Command::Db(DbCommand::Restore {
            to,
            time,
            port,
            new_node,
            provider,
            no_wait,
            timeout,
        }) => {
            let client = cli.client();
            let accepted = client
                .restore(&RestoreRequest {
                    to: to.clone(),
                    time: *time,
                    port: *port,
                    new_node: *new_node,
                    provider: *provider,
                })
                .await?;
            out.message(&format!(
                "restoring backup {} into {} on {} (order {})",
                accepted.backup_id, accepted.name, accepted.node, accepted.seq
            ))?;
            if *no_wait {
                return Ok(());
            }
            let order = wait_for_order(&client, &accepted.node, accepted.seq, *timeout).await?;
            let result = order.result.as_deref().unwrap_or("");
            if order.status == OrderStatus::Failed {
                bail!("restore into {} failed: {result}", accepted.name);
            }
            out.restore_report(result)
        }
        Command::Orders { node, after, limit } => {
            out.orders(&cli.client().orders(node, *after, *limit).await?)
        }
        Command::Events {
            follow,
            after,
            limit,
        } => {
            let client = cli.client();
            let events = client.events(*after, *limit).await?;
            out.events(&events)?;
            if *follow {
                let last = events.last().map(|e| e.id).or(*after);
                follow_events(&client, &out, last).await?;
            }
            Ok(())
        }
        Command::Logs {
            node,
            service,
            follow,
            grep,
            limit,
        } => {
            let client = cli.client();
            let query = LogQuery {
                service: service.as_deref(),
                grep: grep.as_deref(),
                limit: *limit,
            };
            let lines = client.logs(node, query, None).await?;
            out.log_lines(&lines)?;
            if *follow {
                let last = lines.last().map_or(0, |l| l.seq);
                follow_logs(&client, &out, node, query, last).await?;
            }
            Ok(())
        }
        Command::Topology(cmd) => {
            let client = cli.client();
            match cmd {
                TopologyCommand::Get => out.topology(&client.topology().await?),
                TopologyCommand::Set {
                    web,
                    db,
                    lb_policy,
                    replication,
                    backup_schedule,
                    backup_keep,
                    no_backup_schedule,
                    seed,
                } => {
                    let mut spec = if *seed {
                        TopologyUpdate::seed()
                    } else {
                        TopologyUpdate::from(&client.topology().await?)
                    };
                    if let Some(v) = web {
                        spec.web = *v;
                    }
                    if let Some(v) = db {
                        spec.db = *v;
                    }
                    if let Some(v) = lb_policy {
                        spec.lb_policy = *v;
                    }
                    if let Some(v) = replication {
                        spec.replication = *v;
                    }
                    if let (Some(schedule), Some(keep)) = (backup_schedule, backup_keep) {
                        spec.backup = Some(corral_proto::BackupSchedule {
                            schedule: schedule.clone(),
                            keep: *keep,
                        });
                    }
                    if *no_backup_schedule {
                        spec.backup = None;
                    }
                    out.change(&client.set_topology(&spec).await?)
                }
            }
        }
    }
}

/// Polls order `seq` of `node` until its agent reports it applied or
/// failed, or `timeout` passes.
async fn wait_for_order(
    client: &Client,
    node: &str,
    seq: i64,
    timeout: Duration,
) -> anyhow::Result<Order> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match client.order(node, seq).await? {
            Some(order) if order.status.is_finished() => return Ok(order),
            Some(_) => {}
            None => bail!("order {seq} of {node} is gone (was the node removed?)"),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "order {seq} of {node} is not finished after {}s; follow it with `corral orders {node} --after {}`",
                timeout.as_secs(),
                seq - 1
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Prints events from the live stream, reconnecting (with `Last-Event-ID`)
/// when the connection drops, until interrupted.
/// Long-polls the node's logs after `last`, printing what arrives; a server
/// that cannot be reached is tried again, the first refusal (4xx) ends it.
async fn follow_logs(
    client: &Client,
    out: &Output,
    node: &str,
    query: LogQuery<'_>,
    mut last: u64,
) -> anyhow::Result<()> {
    loop {
        match client.logs(node, query, Some(last)).await {
            Ok(lines) => {
                out.log_lines(&lines)?;
                last = lines.last().map_or(last, |l| l.seq);
            }
            Err(e) if e.is_refusal() => return Err(e.into()),
            Err(e) => {
                eprintln!("logs of {node}: {e}; retrying in 2s");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn follow_events(client: &Client, out: &Output, mut last: Option<i64>) -> anyhow::Result<()> {
    loop {
        let res = match client.event_stream(last).await {
            Ok(res) => res,
            Err(e) => {
                eprintln!("event stream: {e}; retrying in 2s");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        let mut body = res.bytes_stream();
        let mut buf = String::new();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                for line in frame.lines() {
                    if let Some(data) = line.strip_prefix("data: ")
                        && let Ok(event) = serde_json::from_str::<Event>(data)
                    {
                        last = Some(event.id);
                        out.events(std::slice::from_ref(&event))?;
                    }
                }
            }
        }
    }
}

fn server_config(cli: &Cli, args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = Config::new(&cli.state_dir);
    config.network = args.network;
    config.lxc_network = args.lxc_network;
    config.lxc_bridge = args.lxc_bridge.clone();
    if let Some(dir) = &args.lxc_packages {
        config.lxc_packages = dir.clone();
    }
    config.default_provider = args.provider;
    config.providers = args.providers.clone();
    config.providers.push(args.provider);
    config.run_machines = !args.no_machines;
    if let Some(bin) = &args.agent_bin {
        config.agent_bin = bin.clone();
    }
    config.agent_args = vec!["--nginx-port".into(), args.nginx_port.to_string()];
    // adm1 is this host, at the seed address of the default provider's plan.
    config.listen = match &args.listen {
        Some(listen) => listen.clone(),
        None => {
            let adm = config
                .plan_for(args.provider)
                .seed_address(corral_proto::Role::Adm, 1)
                .context("the network has no address for adm1")?;
            format!("{adm}:{}", corral_proto::ports::CONTROL_PLANE)
        }
    };
    config.database_url = args.database_url.clone();
    config.datacenter = args.datacenter.clone();
    config.ssh_port = args.ssh_port;
    config.max_poll_wait = args.max_poll_wait;
    config.heartbeat_stale_after = args.heartbeat_stale_after;
    config.retention = crate::cluster::Retention {
        orders_per_node: args.keep_orders,
        events: args.keep_events,
        event_age: args.keep_events_for,
        ..Default::default()
    };
    config.workers = args.workers;
    if let Some(dir) = &args.ui_dir {
        config.ui_dir = Some(dir.clone());
    }
    if let Some(dir) = &args.apt_dir {
        config.apt_dir = Some(dir.clone());
    }
    config.tls = args.tls;
    config.tls_names.extend(args.tls_names.iter().cloned());
    if !args.peers.is_empty() && args.database_url.is_none() {
        bail!("--peer needs a PostgreSQL --database-url: servers share state only there");
    }
    for peer in &args.peers {
        if !(peer.starts_with("http://") || peer.starts_with("https://")) {
            bail!("--peer {peer}: give a URL, e.g. https://192.168.11.6:7000");
        }
    }
    config.peers = args.peers.clone();
    config.s3 = s3_config(args)?;
    if args.max_poll_wait.is_zero() {
        bail!("--max-poll-wait must be more than 0");
    }
    Ok(config)
}

/// The offsite copy's settings; the credentials come from a file or the
/// environment so that they never show in `ps`.
fn s3_config(args: &ServeArgs) -> anyhow::Result<Option<crate::s3::S3Config>> {
    let (Some(endpoint), Some(bucket)) = (&args.s3_endpoint, &args.s3_bucket) else {
        return Ok(None);
    };
    let (access_key, secret_key) = match &args.s3_credentials_file {
        Some(path) => crate::s3::credentials_from_file(path)?,
        None => match (
            std::env::var("AWS_ACCESS_KEY_ID"),
            std::env::var("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Ok(key), Ok(secret)) if !key.is_empty() && !secret.is_empty() => (key, secret),
            _ => bail!(
                "--s3-endpoint needs credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment, or --s3-credentials-file FILE (mode 0600)"
            ),
        },
    };
    Ok(Some(crate::s3::S3Config {
        endpoint: endpoint.clone(),
        bucket: bucket.clone(),
        region: args.s3_region.clone(),
        prefix: args.s3_prefix.clone(),
        access_key,
        secret_key,
        ca_file: args.s3_ca.clone(),
    }))
}

/// The `corral serve` arguments `up --servers N` gives each server besides
/// its state dir, listen address, database and peers: the settings given
/// to `up`.
fn child_serve_args(args: &ServeArgs) -> Vec<String> {
    let time = |d: Duration| {
        if d.subsec_millis() == 0 {
            format!("{}s", d.as_secs())
        } else {
            format!("{}ms", d.as_millis())
        }
    };
    let mut out = vec![
        "--network".to_string(),
        args.network.to_string(),
        "--provider".into(),
        args.provider.to_string(),
        "--nginx-port".into(),
        args.nginx_port.to_string(),
        "--datacenter".into(),
        args.datacenter.clone(),
        "--ssh-port".into(),
        args.ssh_port.to_string(),
        "--max-poll-wait".into(),
        time(args.max_poll_wait),
        "--heartbeat-stale-after".into(),
        time(args.heartbeat_stale_after),
        "--keep-orders".into(),
        args.keep_orders.to_string(),
        "--keep-events".into(),
        args.keep_events.to_string(),
        "--keep-events-for".into(),
        time(args.keep_events_for),
        // The leader among the servers makes the machines: LXC's too.
        "--lxc-network".into(),
        args.lxc_network.to_string(),
        "--lxc-bridge".into(),
        args.lxc_bridge.clone(),
    ];
    if let Some(tls) = clap::ValueEnum::to_possible_value(&args.tls) {
        out.extend(["--tls".into(), tls.get_name().to_string()]);
    }
    for provider in &args.providers {
        out.extend(["--providers".into(), provider.to_string()]);
    }
    if args.no_machines {
        out.push("--no-machines".into());
    }
    let mut path = |flag: &str, value: &Option<PathBuf>| {
        if let Some(value) = value {
            out.extend([flag.to_string(), value.display().to_string()]);
        }
    };
    path("--agent-bin", &args.agent_bin);
    path("--lxc-packages", &args.lxc_packages);
    path("--ui-dir", &args.ui_dir);
    path("--apt-dir", &args.apt_dir);
    // The offsite copy: the same bucket for every server (its credentials
    // reach them through the inherited environment or this file).
    path("--s3-credentials-file", &args.s3_credentials_file);
    path("--s3-ca", &args.s3_ca);
    for (flag, value) in [
        ("--s3-endpoint", &args.s3_endpoint),
        ("--s3-bucket", &args.s3_bucket),
    ] {
        if let Some(value) = value {
            out.extend([flag.to_string(), value.to_string()]);
        }
    }
    out.extend([
        "--s3-region".into(),
        args.s3_region.clone(),
        "--s3-prefix".into(),
        args.s3_prefix.clone(),
    ]);
    for name in &args.tls_names {
        out.extend(["--tls-name".into(), name.clone()]);
    }
    if let Some(workers) = args.workers {
        out.extend(["--workers".into(), workers.to_string()]);
    }
    out
}

async fn serve(cli: &Cli, args: &ServeArgs) -> anyhow::Result<()> {
    let config = server_config(cli, args)?;
    let config_apt_dir = config.apt_dir.clone();
    let app = Application::build(config)
        .await
        .context("starting the corral server")?;
    let url = app.url();
    eprintln!("corral {}", corral_proto::VERSION);
    eprintln!(
        "  state:     {} ({})",
        cli.state_dir.display(),
        app.database()
    );
    eprintln!("  network:   {}", args.network);
    eprintln!("  API docs:  {url}/docs/");
    if app.ca_pem().is_some() {
        eprintln!(
            "  TLS:       cluster CA in {} (agents and the CLI pin it; import it in a browser)",
            cli.state_dir.join("tls/ca.pem").display()
        );
    }
    eprintln!("  agents enroll with per-node secrets: `corral nodes reenroll NODE` mints one");
    if let Some(s3) = app.cluster().offsite() {
        eprintln!(
            "  offsite:   backups copied to bucket {} at {} (prefix {:?})",
            s3.bucket().name(),
            s3.bucket().endpoint(),
            s3.bucket().prefix()
        );
    }
    if let Some(apt) = &config_apt_dir {
        eprintln!("  apt repo:  {url}/apt/ (from {})", apt.display());
    }
    match app.new_admin_token() {
        Some(token) => {
            eprintln!(
                "  admin token (shown once; also in {}):",
                app.secrets().admin_token_path.display()
            );
            println!("{token}");
        }
        None => eprintln!(
            "  admin token: in {}",
            app.secrets().admin_token_path.display()
        ),
    }
    // Last, so whoever waits for this line has everything above.
    eprintln!("serving on {url}");
    app.run_until_stopped().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Command, FromArgMatches};

    /// What `up --servers N` gives each server of its own (cli/up.rs):
    /// everything else a server runs with comes from `child_serve_args`.
    const PER_SERVER: &[&str] = &["listen", "database-url", "peer"];

    /// A value for every `serve` flag, each unlike its default.
    const EVERY_FLAG: &[(&str, Option<&str>)] = &[
        ("network", Some("10.9.0.0/24")),
        ("provider", Some("lxc")),
        ("providers", Some("local")),
        ("providers", Some("lxc")),
        ("no-machines", None),
        ("lxc-network", Some("10.10.0.0/24")),
        ("lxc-bridge", Some("br-test")),
        ("lxc-packages", Some("/tmp/corral-test/debs")),
        ("agent-bin", Some("/tmp/corral-test/corral-agent")),
        ("nginx-port", Some("8081")),
        ("datacenter", Some("dc-test")),
        ("ssh-port", Some("2222")),
        ("max-poll-wait", Some("30s")),
        ("heartbeat-stale-after", Some("1500ms")),
        ("keep-orders", Some("7")),
        ("keep-events", Some("9")),
        ("keep-events-for", Some("3d")),
        ("workers", Some("3")),
        ("ui-dir", Some("/tmp/corral-test/ui")),
        ("apt-dir", Some("/tmp/corral-test/apt")),
        ("tls", Some("on")),
        ("tls-name", Some("a.example")),
        ("tls-name", Some("b.example")),
        ("s3-endpoint", Some("https://s3.example")),
        ("s3-bucket", Some("bucket-test")),
        ("s3-region", Some("eu-west-1")),
        ("s3-prefix", Some("cluster-test/")),
        ("s3-credentials-file", Some("/tmp/corral-test/credentials")),
        ("s3-ca", Some("/tmp/corral-test/ca.pem")),
    ];

    fn parse(argv: &[String]) -> ServeArgs {
        let command = ServeArgs::augment_args(Command::new("serve").no_binary_name(true));
        let matches = command
            .try_get_matches_from(argv)
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        ServeArgs::from_arg_matches(&matches).expect("ServeArgs from its own matches")
    }

    /// A flag added to `serve` and not passed on would leave the second
    /// server of `up --servers 2` running with its default: this fails
    /// until the flag is listed above and `child_serve_args` forwards it.
    #[test]
    fn up_servers_children_get_every_serve_setting_but_their_own_address() {
        let command = ServeArgs::augment_args(Command::new("serve"));
        for arg in command.get_arguments() {
            let long = arg.get_long().unwrap_or(arg.get_id().as_str());
            assert!(
                PER_SERVER.contains(&long) || EVERY_FLAG.iter().any(|(flag, _)| *flag == long),
                "`corral serve --{long}` is new: give it a value in EVERY_FLAG, and forward it in child_serve_args (or list it in PER_SERVER)"
            );
        }

        let argv: Vec<String> = EVERY_FLAG
            .iter()
            .flat_map(|(flag, value)| {
                std::iter::once(format!("--{flag}")).chain(value.map(String::from))
            })
            .collect();
        let given = parse(&argv);
        let forwarded = parse(&child_serve_args(&given));
        assert_eq!(
            format!("{forwarded:#?}"),
            format!("{given:#?}"),
            "a server started by `up --servers` runs with other settings than `up` was given"
        );
    }
}
