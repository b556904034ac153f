use clap::Parser;
use sentinella::cli;
use sentinella::config::{Cli, Command, LogFormat};
use sentinella::observability::traces::{self, OtlpConfig};
use tracing_subscriber::EnvFilter;

/// Worker threads get 8 MiB of stack: the XML reader (fhirbolt) recurses once per element, and a
/// document at the depth limit (128) needs more than tokio's default 2 MiB in an unoptimised build.
fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // before the runtime: the trace exporter's blocking HTTP client may not be built (or dropped)
    // on a runtime thread; the guard, dropped after the runtime, exports the last spans
    let guard = match &cli.command {
        Command::Serve(config) => Some(traces::init(
            config.log_format == LogFormat::Json,
            config
                .otlp_endpoint
                .as_ref()
                .map(|endpoint| OtlpConfig {
                    endpoint: endpoint.clone(),
                    sample_ratio: config.otlp_sample_ratio,
                })
                .as_ref(),
        )?),
        _ => {
            // the commands report to the operator themselves; logs only when asked (RUST_LOG)
            if let Ok(filter) = EnvFilter::try_from_default_env() {
                tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_writer(std::io::stderr)
                    .init();
            }
            None
        }
    };
    let code = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(8 * 1024 * 1024)
        .build()?
        .block_on(run(cli))?;
    drop(guard);
    // the commands' documented exit codes (the runtime and its tasks are gone by now)
    std::process::exit(code.code())
}

async fn run(cli: Cli) -> anyhow::Result<cli::Exit> {
    Ok(match cli.command {
        Command::Serve(config) => {
            sentinella::server::serve(config).await?;
            cli::Exit::Ok
        }
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
