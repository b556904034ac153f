//! Configuration in one place: command line, with an environment variable for each option.
use std::net::SocketAddr;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "sentinella",
    version,
    about = "FHIR R4 server for infectious-disease notification and CRE surveillance"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the FHIR server.
    Serve(Config),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "SENTINELLA_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Database: sqlite://PATH (created on first start) or postgres://USER@HOST/DB.
    #[arg(
        long,
        env = "SENTINELLA_DATABASE",
        default_value = "sqlite://sentinella.db"
    )]
    pub database: String,
    #[arg(
        long,
        env = "SENTINELLA_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Largest accepted request body, in bytes (larger: 413).
    #[arg(long, env = "SENTINELLA_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Public base URL of the FHIR endpoint (default: http://<Host header>/fhir).
    #[arg(long, env = "SENTINELLA_BASE_URL")]
    pub base_url: Option<String>,
    /// EUCAST clinical breakpoint table used to interpret an MIC or zone sent without S/I/R
    /// (a version in terminology/eucast-breakpoints.json; default: the newest).
    #[arg(long, env = "SENTINELLA_EUCAST_VERSION")]
    pub eucast_version: Option<String>,
}

impl Config {
    /// Defaults for embedding the server (tests, benchmarks) with a given database.
    pub fn with_database(database: impl Into<String>) -> Self {
        Config {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            database: database.into(),
            log_format: LogFormat::Text,
            max_body_bytes: 10 * 1024 * 1024,
            base_url: None,
            eucast_version: None,
        }
    }
}
