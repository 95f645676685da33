//! `corral-agent check-postgres`: the SQL-level health check Consul runs for
//! the PostgreSQL service. It asks the server (over its private socket)
//! whether it is in recovery and fails when that contradicts the tag the
//! service is registered with. It does not need the agent to be running.

use std::path::PathBuf;
use std::process::Command;

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Expect {
    Primary,
    Replica,
    /// Either: only that the server answers SQL (the leader session's check).
    Any,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pub pg_bin: PathBuf,
    /// The server's unix socket directory.
    #[arg(long)]
    pub socket_dir: PathBuf,
    #[arg(long, default_value_t = corral_proto::ports::POSTGRES)]
    pub port: u16,
    /// The role the service is tagged with.
    #[arg(long, value_enum)]
    pub expect: Expect,
}

/// Runs the check; returns the exit code Consul reads (0 passing, 2
/// critical) and prints the reason.
pub fn check_postgres(args: &CheckArgs) -> i32 {
    let output = Command::new(args.pg_bin.join("psql"))
        .args([
            "-X", "-A", "-t", "-q", "-U", "postgres", "-d", "postgres", "-h",
        ])
        .arg(&args.socket_dir)
        .arg("-p")
        .arg(args.port.to_string())
        .args(["-c", "SELECT pg_is_in_recovery()"])
        .env("PGCONNECT_TIMEOUT", "3")
        .env("PGOPTIONS", "-c statement_timeout=3000")
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            println!("cannot run psql: {e}");
            return 2;
        }
    };
    if !output.status.success() {
        println!(
            "postgres does not answer: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        return 2;
    }
    let in_recovery = String::from_utf8_lossy(&output.stdout).trim() == "t";
    let actual = if in_recovery { "replica" } else { "primary" };
    let expected = match args.expect {
        Expect::Primary => "primary",
        Expect::Replica => "replica",
        Expect::Any => actual,
    };
    if actual == expected {
        println!("postgres answers as {actual}");
        0
    } else {
        println!("postgres is {actual} but registered as {expected}");
        2
    }
}
