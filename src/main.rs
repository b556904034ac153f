use clap::Parser;
use sentinella::cli;
use sentinella::config::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

/// Worker threads get 8 MiB of stack: the XML reader (fhirbolt) recurses once per element, and a
/// document at the depth limit (128) needs more than tokio's default 2 MiB in an unoptimised build.
fn main() -> anyhow::Result<()> {
    let code = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(8 * 1024 * 1024)
        .build()?
        .block_on(run())?;
    // the commands' documented exit codes (the runtime and its tasks are gone by now)
    std::process::exit(code.code())
}

async fn run() -> anyhow::Result<cli::Exit> {
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
            sentinella::server::serve(config).await?;
            Ok(cli::Exit::Ok)
        }
        command => {
            // the commands report to the operator themselves; logs only when asked (RUST_LOG)
            if let Ok(filter) = EnvFilter::try_from_default_env() {
                tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_writer(std::io::stderr)
                    .init();
            }
            Ok(match command {
                Command::Serve(_) => unreachable!("matched above"),
                Command::Validate(args) => {
                    // CPU work, and the checks' own thread pools are not async
                    tokio::task::spawn_blocking(move || cli::validate::run(&args)).await?
                }
                Command::Import(args) => cli::import::run(&args).await,
                Command::Reindex(args) => cli::reindex::run(&args).await,
                Command::Migrate(args) => cli::migrate::run(&args).await,
                Command::Config(cmd) => cli::config_check::run(&cmd),
            })
        }
    }
}
