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
    /// Check FHIR resources, Bundles and NDJSON files offline with the server's own checks.
    Validate(crate::cli::validate::Args),
    /// Load FHIR NDJSON or Bundles into the database through the server's write path (resumable).
    Import(crate::cli::import::Args),
    /// Rebuild the search indexes of stored resources (online, resumable).
    Reindex(crate::cli::reindex::Args),
    /// Apply the database migrations and exit.
    Migrate(crate::cli::migrate::Args),
    /// Access files: check one and explain what it grants.
    #[command(subcommand)]
    Config(crate::cli::config_check::ConfigCommand),
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
    /// Export traces over OTLP/HTTP (protobuf) to this collector URL, e.g.
    /// http://127.0.0.1:4318/v1/traces (spans carry route patterns, methods and statuses, never
    /// URLs or ids). Without it no traces are kept. OTEL_EXPORTER_OTLP_HEADERS adds headers.
    #[arg(long, env = "SENTINELLA_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Share of requests traced when --otlp-endpoint is set (0.0 to 1.0); a request whose
    /// `traceparent` says its caller sampled it is always traced.
    #[arg(long, env = "SENTINELLA_OTLP_SAMPLE_RATIO", default_value_t = 1.0, value_parser = sample_ratio)]
    pub otlp_sample_ratio: f64,
    /// Largest accepted request body, in bytes (larger: 413).
    #[arg(long, env = "SENTINELLA_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Writes accepted at once (running or queued for the database); beyond it a write is
    /// answered 503 with Retry-After.
    #[arg(long, env = "SENTINELLA_MAX_WRITES_IN_FLIGHT", default_value_t = 512)]
    pub max_writes_in_flight: usize,
    /// Open client connections at once; beyond it new connections wait to be accepted.
    #[arg(long, env = "SENTINELLA_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's headers, and may stay idle between
    /// requests; then it is closed.
    #[arg(long, env = "SENTINELLA_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// Seconds a request body may go without sending data; then the request fails (408).
    #[arg(long, env = "SENTINELLA_BODY_TIMEOUT_SECS", default_value_t = 30)]
    pub body_timeout_secs: u64,
    /// Public base URL of the FHIR endpoint (default: http://<Host header>/fhir).
    #[arg(long, env = "SENTINELLA_BASE_URL")]
    pub base_url: Option<String>,
    /// Secret (at least 32 characters) the server signs its access tokens with (`POST
    /// /auth/token`, HS256). Without it a random secret is drawn when the process starts: tokens
    /// then do not survive a restart and are not accepted by another server process.
    #[arg(long, env = "SENTINELLA_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<TokenSecret>,
    /// EUCAST clinical breakpoint table used to interpret an MIC or zone sent without S/I/R
    /// (a version in terminology/eucast-breakpoints.json; default: the newest).
    #[arg(long, env = "SENTINELLA_EUCAST_VERSION")]
    pub eucast_version: Option<String>,
    /// Access configuration (TOML): clients, roles, regions, allowed endpoints, token hashes.
    /// Without it the server runs in single-user development mode.
    #[arg(long = "config", env = "SENTINELLA_CONFIG")]
    pub access_file: Option<String>,
    /// NATS server for the JetStream subscription channel (e.g. nats://127.0.0.1:4222); without
    /// it, subscriptions on that channel are refused.
    #[arg(long, env = "SENTINELLA_NATS_URL")]
    pub nats_url: Option<String>,
    /// Failed deliveries in a row after which a subscription goes to `error`.
    #[arg(long, env = "SENTINELLA_DELIVERY_MAX_ATTEMPTS", default_value_t = 10)]
    pub delivery_max_attempts: i64,
    /// First retry delay in milliseconds (doubles per failure, with jitter).
    #[arg(long, env = "SENTINELLA_DELIVERY_BACKOFF_MS", default_value_t = 1000)]
    pub delivery_backoff_ms: u64,
    /// Longest retry delay in milliseconds.
    #[arg(
        long,
        env = "SENTINELLA_DELIVERY_BACKOFF_MAX_MS",
        default_value_t = 600_000
    )]
    pub delivery_backoff_max_ms: u64,
    /// How often the delivery worker looks for due work written by other processes (ms).
    #[arg(long, env = "SENTINELLA_DELIVERY_POLL_MS", default_value_t = 500)]
    pub delivery_poll_ms: u64,
    /// Days a delivered event stays available to $events before it is pruned.
    #[arg(long, env = "SENTINELLA_EVENT_RETENTION_DAYS", default_value_t = 30)]
    pub event_retention_days: u64,
    /// Requests per second each authenticated client may send (bursts of twice that); beyond it
    /// 429 with Retry-After. 0: no limit. Development mode is never limited.
    #[arg(long, env = "SENTINELLA_RATE_LIMIT_PER_SECOND", default_value_t = 500)]
    pub rate_limit_per_second: u32,
    /// Minutes between two runs that store the periodic summaries (MeasureReports) of the month and
    /// the year that ended last; 0: never (they can still be stored with Measure/$generate-reports).
    #[arg(long, env = "SENTINELLA_SUMMARY_EVERY_MINUTES", default_value_t = 60)]
    pub summary_every_minutes: u64,
    /// Days an AuditEvent is kept before it is removed (0: kept for ever).
    #[arg(long, env = "SENTINELLA_AUDIT_RETENTION_DAYS", default_value_t = 365)]
    pub audit_retention_days: u64,
    /// How long to wait for an endpoint, unless the subscription sets backport-timeout (ms).
    #[arg(long, env = "SENTINELLA_DELIVERY_TIMEOUT_MS", default_value_t = 10_000)]
    pub delivery_timeout_ms: u64,
}

impl Config {
    /// Defaults for embedding the server (tests, benchmarks) with a given database.
    pub fn with_database(database: impl Into<String>) -> Self {
        Config {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            database: database.into(),
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            otlp_sample_ratio: 1.0,
            max_body_bytes: 10 * 1024 * 1024,
            max_writes_in_flight: 512,
            max_connections: 1024,
            header_timeout_secs: 10,
            body_timeout_secs: 30,
            base_url: None,
            token_secret: None,
            eucast_version: None,
            access_file: None,
            nats_url: None,
            delivery_max_attempts: 10,
            delivery_backoff_ms: 1000,
            delivery_backoff_max_ms: 600_000,
            delivery_poll_ms: 500,
            delivery_timeout_ms: 10_000,
            event_retention_days: 30,
            audit_retention_days: 365,
            // embedded: summaries are stored when asked ($generate-reports), not on a clock
            summary_every_minutes: 0,
            // embedded (tests, benchmarks): drivers that send as fast as they can
            rate_limit_per_second: 0,
        }
    }

    pub fn delivery(&self) -> crate::subscriptions::worker::DeliverySettings {
        use std::time::Duration;
        crate::subscriptions::worker::DeliverySettings {
            max_attempts: self.delivery_max_attempts.max(1),
            backoff_base: Duration::from_millis(self.delivery_backoff_ms),
            backoff_max: Duration::from_millis(self.delivery_backoff_max_ms),
            poll: Duration::from_millis(self.delivery_poll_ms.max(10)),
            timeout: Duration::from_millis(self.delivery_timeout_ms),
            retention: Duration::from_secs(self.event_retention_days.saturating_mul(24 * 3600)),
        }
    }

    /// How long audit events are kept (`None`: for ever).
    pub fn audit_retention(&self) -> Option<std::time::Duration> {
        (self.audit_retention_days > 0).then(|| {
            std::time::Duration::from_secs(self.audit_retention_days.saturating_mul(24 * 3600))
        })
    }
}

/// The access-token signing secret; never printed (`Debug` shows `***`).
#[derive(Clone, PartialEq, Eq)]
pub struct TokenSecret(String);

impl TokenSecret {
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSecret(***)")
    }
}

impl std::str::FromStr for TokenSecret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.chars().count() < 32 {
            return Err("the token secret must be at least 32 characters long".into());
        }
        Ok(TokenSecret(s.to_string()))
    }
}

/// A sampling ratio: a number from 0 to 1.
fn sample_ratio(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("'{value}' is not a ratio between 0.0 and 1.0")),
    }
}
