//! SQLite: a batch of rows goes in as one JSON array bound to one statement (`json_each`), so a
//! Bundle's creates and index rows cost one statement per table: every statement is a round trip
//! to sqlx's SQLite worker thread, and the writer's turn is what limits ingest. No advisory locks:
//! SQLite has one writer.
use serde_json::{Value, json};
use sqlx::SqliteConnection;

use super::{IndexRow, columns};
use crate::store::{NewVersion, StoreResult};

pub async fn lock_all(_: &mut SqliteConnection, _: Vec<i64>) -> StoreResult<()> {
    Ok(())
}

/// New resources (version 1) and their first versions.
pub async fn insert_new(conn: &mut SqliteConnection, versions: &[NewVersion]) -> StoreResult<()> {
    if versions.is_empty() {
        return Ok(());
    }
    let rows: Vec<Value> = versions
        .iter()
        .map(|v| {
            json!([
                v.resource_type,
                v.id,
                v.version_id,
                v.last_updated,
                v.body.is_none(),
                v.method,
                v.body
            ])
        })
        .collect();
    let rows = Value::Array(rows).to_string();
    sqlx::query(
        "INSERT INTO resources (resource_type, id, version_id, last_updated, deleted, body) \
         SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>6 FROM json_each($1)",
    )
    .bind(&rows)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO resource_versions (resource_type, id, version_id, last_updated, deleted, method, body) \
         SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6 FROM json_each($1)",
    )
    .bind(&rows)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub async fn insert_index(conn: &mut SqliteConnection, rows: &[IndexRow<'_>]) -> StoreResult<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let rows: Vec<Value> = rows
        .iter()
        .map(|(rt, id, e)| {
            let (system, value, lo, hi) = columns(e);
            json!([rt, id, e.param, system, value, lo, hi])
        })
        .collect();
    sqlx::query(
        "INSERT INTO search_index (resource_type, id, param, system, value, lo, hi) \
         SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6 FROM json_each($1)",
    )
    .bind(Value::Array(rows).to_string())
    .execute(conn)
    .await?;
    Ok(())
}

/// How often the background checkpointer copies the log into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Checkpoint the write-ahead log from a connection of its own, so that copying pages into the
/// database file and syncing it happen beside the writer rather than inside one of its commits
/// (SQLite's automatic checkpoint runs in the COMMIT that crosses the threshold, and made the
/// average COMMIT 6 ms under load). PASSIVE never blocks the writer or readers. The writer keeps
/// a high automatic threshold as a safety net should this task stop.
pub fn spawn_checkpointer(mut conn: SqliteConnection) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&mut conn)
                .await
            {
                tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
            }
        }
    });
}
