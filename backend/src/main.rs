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

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    let cli = corral_server::cli::Cli::parse();
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
