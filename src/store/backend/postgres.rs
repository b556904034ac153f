//! PostgreSQL: a batch of rows goes in as arrays bound to one `INSERT … SELECT FROM UNNEST`
//! statement per table (one statement text whatever the batch size, so the statement cache
//! serves every call), and advisory locks are taken on bound keys.
use sqlx::PgConnection;

use super::{IndexRow, columns};
use crate::store::{NewVersion, StoreResult};

/// Advisory locks on sorted keys, in one round trip.
pub async fn lock_all(conn: &mut PgConnection, keys: Vec<i64>) -> StoreResult<()> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock(k) FROM unnest($1::int8[]) WITH ORDINALITY AS t(k, n) ORDER BY n",
    )
    .bind(keys)
    .execute(conn)
    .await?;
    Ok(())
}

/// New resources (version 1) and their first versions.
pub async fn insert_new(conn: &mut PgConnection, versions: &[NewVersion]) -> StoreResult<()> {
    if versions.is_empty() {
        return Ok(());
    }
    let types: Vec<&str> = versions.iter().map(|v| v.resource_type.as_str()).collect();
    let ids: Vec<&str> = versions.iter().map(|v| v.id.as_str()).collect();
    let numbers: Vec<i64> = versions.iter().map(|v| v.version_id).collect();
    let times: Vec<i64> = versions.iter().map(|v| v.last_updated).collect();
    let deleted: Vec<bool> = versions.iter().map(|v| v.body.is_none()).collect();
    let methods: Vec<&str> = versions.iter().map(|v| v.method).collect();
    let bodies: Vec<Option<&str>> = versions.iter().map(|v| v.body.as_deref()).collect();
    sqlx::query(
        "INSERT INTO resources (resource_type, id, version_id, last_updated, deleted, body) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::bool[], $6::text[])",
    )
    .bind(&types)
    .bind(&ids)
    .bind(&numbers)
    .bind(&times)
    .bind(&deleted)
    .bind(&bodies)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO resource_versions (resource_type, id, version_id, last_updated, deleted, method, body) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::bool[], $6::text[], $7::text[])",
    )
    .bind(&types)
    .bind(&ids)
    .bind(&numbers)
    .bind(&times)
    .bind(&deleted)
    .bind(&methods)
    .bind(&bodies)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub async fn insert_index(conn: &mut PgConnection, rows: &[IndexRow<'_>]) -> StoreResult<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut types = Vec::with_capacity(rows.len());
    let mut ids = Vec::with_capacity(rows.len());
    let mut params = Vec::with_capacity(rows.len());
    let mut systems = Vec::with_capacity(rows.len());
    let mut values = Vec::with_capacity(rows.len());
    let mut los = Vec::with_capacity(rows.len());
    let mut his = Vec::with_capacity(rows.len());
    for (rt, id, e) in rows {
        let (system, value, lo, hi) = columns(e);
        types.push(*rt);
        ids.push(*id);
        params.push(e.param.as_str());
        systems.push(system);
        values.push(value);
        los.push(lo);
        his.push(hi);
    }
    sqlx::query(
        "INSERT INTO search_index (resource_type, id, param, system, value, lo, hi) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[])",
    )
    .bind(&types)
    .bind(&ids)
    .bind(&params)
    .bind(&systems)
    .bind(&values)
    .bind(&los)
    .bind(&his)
    .execute(conn)
    .await?;
    Ok(())
}
