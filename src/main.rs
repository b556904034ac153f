use clap::Parser;
use sentinella::config::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
