//! `todomvc`: parse flags, set up logging, serve until SIGTERM.

use clap::Parser;
use todomvc::Application;
use todomvc::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _flush_at_exit = todomvc::logging::init(config.log_format);
    let app = Application::build(config).await?;
    app.run().await?;
    Ok(())
}
