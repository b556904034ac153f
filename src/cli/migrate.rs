//! `sentinella migrate`: bring the database schema up to date (the migrations the server would
//! run when it starts) and exit, saying which migrations ran.
use std::str::FromStr;

use sqlx::Connection;

use super::{Exit, fail, redact};

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = concat!(
    "Examples:
  sentinella migrate --database sqlite:///var/lib/sentinella/sentinella.db
  SENTINELLA_DATABASE=postgres://sentinella@db/sentinella sentinella migrate

Applies the migrations this version carries that the database lacks, each in its own
transaction, then exits: run it before starting upgraded servers. Safe to run again (nothing to
do). A SQLite file is created if missing.

",
    exit_codes!()
))]
pub struct Args {
    /// Database: sqlite://PATH or postgres://USER@HOST/DB.
    #[arg(
        long,
        env = "SENTINELLA_DATABASE",
        default_value = "sqlite://sentinella.db"
    )]
    pub database: String,
}

/// The versions recorded as applied (none when the database is new).
async fn applied(url: &str) -> Result<Vec<i64>, sqlx::Error> {
    const SQL: &str = "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version";
    let versions = if url.starts_with("sqlite:") {
        let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)?.create_if_missing(true);
        let mut c = sqlx::SqliteConnection::connect_with(&opts).await?;
        let r = sqlx::query_scalar::<_, i64>(SQL).fetch_all(&mut c).await;
        let _ = c.close().await;
        r
    } else {
        let mut c = sqlx::PgConnection::connect(url).await?;
        let r = sqlx::query_scalar::<_, i64>(SQL).fetch_all(&mut c).await;
        let _ = c.close().await;
        r
    };
    // no table yet: nothing applied
    Ok(versions.unwrap_or_default())
}

pub async fn run(args: &Args) -> Exit {
    let url = &args.database;
    let migrator = if url.starts_with("sqlite:") {
        sqlx::migrate!("./migrations/sqlite")
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        sqlx::migrate!("./migrations/postgres")
    } else {
        return fail(
            Exit::Usage,
            format!("unsupported database URL '{url}': use sqlite://PATH or postgres://…"),
        );
    };
    let before = match applied(url).await {
        Ok(v) => v,
        Err(e) => return fail(Exit::Database, format!("cannot open {}: {e}", redact(url))),
    };
    if let Err(e) = crate::store::connect(url).await {
        return fail(
            Exit::Database,
            format!("migrating {} failed: {e}", redact(url)),
        );
    }
    let mut ran = 0;
    for m in migrator.iter() {
        if !before.contains(&m.version) {
            println!("applied {:04} {}", m.version, m.description);
            ran += 1;
        }
    }
    println!(
        "{}: schema up to date ({} migrations, {ran} applied now)",
        redact(url),
        migrator.iter().count()
    );
    Exit::Ok
}
