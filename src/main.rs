use clap::Parser;
use sentinella::config::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

/// Worker threads get 8 MiB of stack: the XML reader (fhirbolt) recurses once per element, and a
/// document at the depth limit (128) needs more than tokio's default 2 MiB in an unoptimised build.
fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(8 * 1024 * 1024)
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            let filter =
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
            match config.log_format {
                LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
                LogFormat::Json => tracing_subscriber::fmt()
                    .json()
                    .with_env_filter(filter)
                    .init(),
            }
            sentinella::server::serve(config).await
        }
    }
}
