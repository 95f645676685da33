//! `corral`: runs the control plane (`corral serve`) or talks to it.

use clap::Parser;
use tracing_subscriber::EnvFilter;

// In a fan-out of one order to each of 10,000 long polls glibc's malloc took
// about 30 % of the server's CPU (memory freed on other threads than it was
// allocated on); mimalloc without transparent huge pages cut order delivery
// p99 from 230-350 ms to 160-200 ms and RSS by ~40 MB (scripts/bench/orders.sh).
// With huge pages it held 100 MB more RSS, hence `no_thp`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc keeps freed pages for a while before returning them to the OS;
/// with 10,000 TLS long polls that held ~130 MB of RSS no live object used
/// (scripts/bench/orders.sh: 544 MiB holding the polls with the default,
/// 409 MiB with a purge delay of 0). mimalloc reads its options from the
/// environment once, before `main`, so a server that starts without the
/// setting runs itself again with it (an `exec`: same pid, no child).
fn purge_freed_memory_promptly() {
    const VAR: &str = "MIMALLOC_PURGE_DELAY";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(VAR, "0")
        .exec();
    // Only returns on failure: run on with the default.
    tracing::debug!(error = %err, "cannot re-exec with {VAR}=0");
}

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    let cli = corral_server::cli::Cli::parse();
    if cli.is_long_running() {
        purge_freed_memory_promptly();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(cli.default_log_filter())),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match corral_server::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
