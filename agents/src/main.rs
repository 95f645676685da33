//! `corral-agent`: `run` the node agent, `stop-all` of a node,
//! `check-postgres` (the SQL-level Consul check), or `host`, the host agent
//! that makes VirtualBox VMs.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use corral_agent::check::{CheckArgs, check_postgres};
use corral_agent::config::RunConfig;

#[derive(Debug, Parser)]
#[command(name = "corral-agent", version, about = "corral's node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll, pull and apply work orders, supervise the node's services.
    Run(Box<RunConfig>),
    /// Stop the agent and every service it supervises, gracefully; idempotent.
    StopAll {
        #[arg(long, env = "CORRAL_AGENT_STATE_DIR")]
        state_dir: PathBuf,
        /// `run`'s config file; only its `state-dir` is used.
        #[arg(long, env = "CORRAL_AGENT_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Consul script check: PostgreSQL answers SQL in the expected role.
    CheckPostgres(CheckArgs),
    /// PostgreSQL's archive_command: spool a finished WAL file durably.
    ArchiveWal(corral_agent::archive::ArchiveArgs),
    /// The host agent: make the machines of a provider the control plane
    /// cannot drive itself (VirtualBox VMs, with VBoxManage on this host).
    Host(Box<corral_agent::host_agent::HostConfig>),
}

fn main() -> anyhow::Result<()> {
    let args = corral_agent::config::merge_config_file(
        std::env::args_os().collect(),
        |env| std::env::var_os(env).is_some(),
        |path| std::fs::read_to_string(path),
    )
    .map_err(|e| anyhow::anyhow!("config file: {e}"))?;
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::CheckPostgres(args) => std::process::exit(check_postgres(&args)),
        Command::ArchiveWal(args) => match corral_agent::archive::archive_wal(&args) {
            Ok(()) => Ok(()),
            Err(e) => {
                eprintln!("corral-agent archive-wal: {e}");
                std::process::exit(1)
            }
        },
        Command::StopAll { state_dir, .. } => {
            init_tracing();
            corral_agent::stop_all::stop_all(&state_dir)?;
            Ok(())
        }
        Command::Host(config) => {
            init_tracing();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(corral_agent::host_agent::run(*config))
        }
        Command::Run(config) => {
            init_tracing();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(corral_agent::run(*config))
        }
    }
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}
