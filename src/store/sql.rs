//! The two SQL backends. The SQL is identical on SQLite and PostgreSQL (see the migrations), so one
//! body, instantiated by `sql_backend!` for each driver, implements `Store` and `StoreTx` for both:
//! sqlx's `Any` driver cannot carry our types (shared/DEPENDENCIES.md) and generic code over
//! `sqlx::Database` needs a bound per type per lifetime.
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, Row};

use super::backend::index_rows;
use super::query::{Bind, COLUMNS, SearchQuery, Sql, param_filter};
use super::{
    Area, CaseKey, CaseRow, DeliveryState, EventRow, HistoryQuery, Hooks, IsolateState, NewVersion,
    Note, OutboxBacklog, RegisterGroup, RegisterQuery, RegisteredCase, SearchPage, SharedStore,
    Store, StoreError, StoreResult, StoreTx, StoredResource, SubscriptionRow, Touched,
    hooks::run_before_commit,
};

/// Open the database named by a URL (`sqlite://PATH`, `postgres://…`) and run its migrations.
pub async fn connect(url: &str) -> StoreResult<SharedStore> {
    if url.starts_with("sqlite:") {
        sqlite::open(url).await
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        postgres::open(url).await
    } else {
        Err(StoreError::BadUrl(url.to_string()))
    }
}

/// The store the delivery worker uses. On PostgreSQL it has its own few connections: when ingest
/// is saturated, requests hold every connection of the main pool and the worker's reads queued
/// behind them for seconds (benches/delivery). SQLite shares the one store (one writer anyway).
pub async fn connect_for_delivery(url: &str, shared: &SharedStore) -> StoreResult<SharedStore> {
    if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        postgres::open_pool(url, 4, false).await
    } else {
        Ok(shared.clone())
    }
}

/// How a backend's writer makes sure what readers saw is on disk.
trait Durable {
    fn durable(&self) -> impl std::future::Future<Output = ()> + Send;
}

impl Durable for crate::store::group_commit::GroupWriter {
    async fn durable(&self) {
        crate::store::group_commit::GroupWriter::durable(self).await
    }
}

/// PostgreSQL makes a commit visible only once it is flushed.
impl Durable for sqlx::PgPool {
    async fn durable(&self) {}
}

/// Stable 64-bit key for advisory locks (FNV-1a).
fn lock_key(key: &str) -> i64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h as i64
}

fn state_value(text: &str) -> StoreResult<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| StoreError::Rule(format!("rule state is not JSON: {e}")))
}

/// The WHERE clause of a register query (binds: the area's code unless the country, the
/// categories, the days, the family), and its binds.
fn register_filter(q: &RegisterQuery) -> (String, Vec<Bind>) {
    let (column, code) = match &q.area {
        Area::Asl(c) => ("asl", Some(c)),
        Area::Province(c) => ("province", Some(c)),
        Area::Region(c) => ("region", Some(c)),
        Area::Country => ("", None),
    };
    let mut binds = Vec::new();
    let mut text = String::new();
    if let Some(code) = code {
        binds.push(Bind::Text(code.clone()));
        text.push_str(&format!("{column} = $1 AND "));
    }
    if let Some(region) = &q.within_region {
        binds.push(Bind::Text(region.clone()));
        text.push_str(&format!("region = ${} AND ", binds.len()));
    }
    let mut marks = Vec::new();
    for c in &q.categories {
        binds.push(Bind::Text(c.clone()));
        marks.push(format!("${}", binds.len()));
    }
    if marks.is_empty() {
        // no category asked: nothing matches (an empty IN list is not valid SQL)
        marks.push("NULL".into());
    }
    let n = binds.len();
    binds.push(Bind::Int(q.from_day as i64));
    binds.push(Bind::Int(q.to_day as i64));
    binds.push(Bind::Text(q.family.clone()));
    text.push_str(&format!(
        "category IN ({}) AND day BETWEEN ${} AND ${} AND family = ${} AND active",
        marks.join(", "),
        n + 1,
        n + 2,
        n + 3
    ));
    (text, binds)
}

const REGISTER_COLUMNS: &str = "case_id, family, category, disease, code, day, age, sex, comune, province, asl, region, active, refs";

/// `$writer` hands out write transactions (`$begin`) held as `$conn` (which derefs to the driver's
/// connection) and finished by `$commit`.
macro_rules! sql_backend {
    ($module:ident, $db:ty, $name:literal, $lock:expr, $backend:ident, $skip_locked:literal, $for_update:literal, $number_at_commit:literal, $writer:ty, $conn:ty, $begin:path, $commit:path) => {
        pub mod $module {
            use super::*;

            type Db = $db;
            type Q<'q> = sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments>;
            type DbRow = <Db as sqlx::Database>::Row;

            pub struct SqlStore {
                pub writer: $writer,
                pub read: sqlx::Pool<Db>,
                pub hooks: std::sync::OnceLock<Hooks>,
            }

            pub struct SqlTx {
                tx: $conn,
                /// New resources (version 1) not yet sent to the database: a Bundle's creates go
                /// out as a few multi-row INSERTs, flushed before anything reads.
                pending: Vec<NewVersion>,
                /// Outbox events (subscription id, focus, time), written at commit in the order
                /// they were caused: numbered there on SQLite (one writer: no row to contend for),
                /// appended to the outbox for the delivery worker to number on PostgreSQL.
                events: Vec<(String, String, i64)>,
                /// The pre-commit hooks and what they are to see.
                hooks: Option<Hooks>,
                touched: Vec<Touched>,
                /// The hooks are running: their own writes are outputs, not inputs to hooks.
                in_hooks: bool,
            }

            impl SqlTx {
                async fn flush(&mut self) -> StoreResult<()> {
                    if self.pending.is_empty() {
                        return Ok(());
                    }
                    let pending = std::mem::take(&mut self.pending);
                    crate::store::backend::$backend::insert_new(&mut *self.tx, &pending).await?;
                    crate::store::backend::$backend::insert_index(&mut *self.tx, &index_rows(&pending)).await
                }
            }

            impl SqlTx {
                /// Number a transaction's events now, in the order they were caused.
                async fn number_at_commit(&mut self, mut events: Vec<(String, String, i64)>) -> StoreResult<()> {
                    events.sort_by(|a, b| a.0.cmp(&b.0)); // stable: per subscription, causal order
                    for group in events.chunk_by(|a, b| a.0 == b.0) {
                        let id = &group[0].0;
                        let row = sqlx::query(
                            "UPDATE subscriptions SET events_count = events_count + $2 WHERE id = $1 RETURNING events_count",
                        )
                        .bind(id)
                        .bind(group.len() as i64)
                        .fetch_one(&mut *self.tx)
                        .await?;
                        let last: i64 = row.try_get(0)?;
                        let first = last - group.len() as i64 + 1;
                        for (n, (_, focus, at)) in group.iter().enumerate() {
                            sqlx::query(
                                "INSERT INTO subscription_events (subscription_id, event_number, focus, occurred_at) VALUES ($1, $2, $3, $4)",
                            )
                            .bind(id)
                            .bind(first + n as i64)
                            .bind(focus)
                            .bind(at)
                            .execute(&mut *self.tx)
                            .await?;
                        }
                    }
                    Ok(())
                }
            }

            impl SqlTx {
                /// Write one version (the hooks' bookkeeping is in `write`).
                async fn write_version(&mut self, v: &NewVersion) -> StoreResult<()> {
                    let deleted = v.body.is_none();
                    if v.version_id == 1 {
                        self.pending.push(v.clone());
                        return Ok(());
                    }
                    self.flush().await?;
                    {
                        let done = sqlx::query(
                            "UPDATE resources SET version_id = $3, last_updated = $4, deleted = $5, body = $6 \
                             WHERE resource_type = $1 AND id = $2 AND version_id = $7",
                        )
                        .bind(&v.resource_type)
                        .bind(&v.id)
                        .bind(v.version_id)
                        .bind(v.last_updated)
                        .bind(deleted)
                        .bind(&v.body)
                        .bind(v.version_id - 1)
                        .execute(&mut *self.tx)
                        .await?;
                        if done.rows_affected() == 0 {
                            return Err(StoreError::VersionConflict {
                                resource_type: v.resource_type.clone(),
                                id: v.id.clone(),
                            });
                        }
                        sqlx::query("DELETE FROM search_index WHERE resource_type = $1 AND id = $2")
                            .bind(&v.resource_type)
                            .bind(&v.id)
                            .execute(&mut *self.tx)
                            .await?;
                    }
                    sqlx::query(
                        "INSERT INTO resource_versions (resource_type, id, version_id, last_updated, deleted, method, body) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(&v.resource_type)
                    .bind(&v.id)
                    .bind(v.version_id)
                    .bind(v.last_updated)
                    .bind(deleted)
                    .bind(v.method)
                    .bind(&v.body)
                    .execute(&mut *self.tx)
                    .await?;
                    crate::store::backend::$backend::insert_index(&mut *self.tx, &index_rows(std::slice::from_ref(v))).await
                }

                /// Number or append the outbox events, then commit.
                async fn commit_inner(mut self: Box<Self>) -> StoreResult<()> {
                    self.flush().await?;
                    let events = std::mem::take(&mut self.events);
                    if $number_at_commit {
                        // SQLite has one writer: numbering here serialises nothing more, and the
                        // delivery worker finds the events ready to send
                        self.number_at_commit(events).await?;
                    } else {
                        // appended in a global sequence, numbered later by the delivery lease
                        // holder: no subscription row is locked by this transaction
                        for (id, focus, at) in events {
                            sqlx::query(
                                "INSERT INTO subscription_outbox (subscription_id, focus, occurred_at) VALUES ($1, $2, $3)",
                            )
                            .bind(id)
                            .bind(focus)
                            .bind(at)
                            .execute(&mut *self.tx)
                            .await?;
                        }
                    }
                    $commit(self.tx).await
                }
            }

            impl SqlTx {
                /// Replace the tags of a rule-state record (`replace`: drop the old ones first).
                async fn state_tag(&mut self, rule_set: &str, key: &str, tags: &[String], replace: bool) -> StoreResult<()> {
                    if replace {
                        sqlx::query("DELETE FROM rule_state_tags WHERE rule_set = $1 AND key = $2")
                            .bind(rule_set)
                            .bind(key)
                            .execute(&mut *self.tx)
                            .await?;
                    }
                    for tag in tags {
                        sqlx::query(
                            "INSERT INTO rule_state_tags (rule_set, tag, key) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                        )
                        .bind(rule_set)
                        .bind(tag)
                        .bind(key)
                        .execute(&mut *self.tx)
                        .await?;
                    }
                    Ok(())
                }
            }

            fn bind_all<'q>(mut q: Q<'q>, binds: &[Bind]) -> Q<'q> {
                for b in binds {
                    q = match b {
                        Bind::Text(s) => q.bind(s.clone()),
                        Bind::Int(i) => q.bind(*i),
                    };
                }
                q
            }

            fn stored(row: &DbRow) -> StoreResult<StoredResource> {
                Ok(StoredResource {
                    resource_type: row.try_get("resource_type")?,
                    id: row.try_get("id")?,
                    version_id: row.try_get("version_id")?,
                    last_updated: row.try_get("last_updated")?,
                    deleted: row.try_get("deleted")?,
                    body: row.try_get("body")?,
                    method: row.try_get::<String, _>("method").unwrap_or_else(|_| "PUT".into()),
                })
            }

            const SUB_COLUMNS: &str = "id, topic, owner, status, events_count, delivered_count, attempts, \
                next_attempt_at, last_sent_at, heartbeat_secs, end_at, last_error, pruned_count";

            fn subscription_row(r: &DbRow) -> StoreResult<SubscriptionRow> {
                Ok(SubscriptionRow {
                    id: r.try_get("id")?,
                    topic: r.try_get("topic")?,
                    owner: r.try_get("owner")?,
                    status: r.try_get("status")?,
                    events_count: r.try_get("events_count")?,
                    delivered_count: r.try_get("delivered_count")?,
                    attempts: r.try_get("attempts")?,
                    next_attempt_at: r.try_get("next_attempt_at")?,
                    last_sent_at: r.try_get("last_sent_at")?,
                    heartbeat_secs: r.try_get("heartbeat_secs")?,
                    end_at: r.try_get("end_at")?,
                    last_error: r.try_get("last_error")?,
                    pruned_count: r.try_get("pruned_count")?,
                    // only the delivery worker's read asks
                    unnumbered: r.try_get::<bool, _>("unnumbered").unwrap_or(false),
                })
            }

            fn event_row(r: &DbRow) -> StoreResult<EventRow> {
                Ok(EventRow {
                    subscription_id: r.try_get("subscription_id")?,
                    event_number: r.try_get("event_number")?,
                    focus: r.try_get("focus")?,
                    occurred_at: r.try_get("occurred_at")?,
                })
            }

            const EVENTS_SQL: &str = "SELECT subscription_id, event_number, focus, occurred_at FROM subscription_events \
                WHERE subscription_id = $1 AND event_number >= $2 AND event_number <= $3 ORDER BY event_number LIMIT $4";

            /// Due: to be handshaken, with undelivered events, a heartbeat or its end reached.
            const DUE_SQL: &str = "status IN ('requested', 'active') AND next_attempt_at <= $1 AND lease_until < $1 \
                AND (status = 'requested' OR delivered_count < events_count \
                     OR EXISTS (SELECT 1 FROM subscription_outbox o WHERE o.subscription_id = subscriptions.id) \
                     OR (heartbeat_secs IS NOT NULL AND last_sent_at + heartbeat_secs * 1000000 <= $1) \
                     OR (end_at IS NOT NULL AND end_at <= $1))";

            /// Per live subscription: its undelivered events (numbered past `delivered_count`,
            /// plus those still in the outbox) and when the first of them occurred. Only waiting
            /// rows are counted, by primary key or the outbox index: delivered history is never read.
            const OUTBOX_BACKLOG_SQL: &str = "SELECT s.id, s.topic, s.status, \
                s.events_count - s.delivered_count \
                  + (SELECT COUNT(*) FROM subscription_outbox o WHERE o.subscription_id = s.id) AS depth, \
                COALESCE( \
                  (SELECT e.occurred_at FROM subscription_events e \
                   WHERE e.subscription_id = s.id AND e.event_number = s.delivered_count + 1), \
                  (SELECT o.occurred_at FROM subscription_outbox o WHERE o.subscription_id = s.id ORDER BY o.seq LIMIT 1) \
                ) AS oldest, \
                COUNT(*) OVER () AS live \
                FROM subscriptions s WHERE s.status IN ('requested', 'active', 'error') \
                ORDER BY depth DESC, s.id LIMIT $1";

            async fn fetch(pool_or_conn: &sqlx::Pool<Db>, sql: Sql) -> StoreResult<Vec<StoredResource>> {
                let rows = bind_all(sqlx::query(AssertSqlSafe(sql.text)), &sql.binds).fetch_all(pool_or_conn).await?;
                rows.iter().map(stored).collect()
            }

            #[async_trait]
            impl Store for SqlStore {
                fn backend(&self) -> &'static str {
                    $name
                }

                fn install_hooks(&self, hooks: Hooks) {
                    let _ = self.hooks.set(hooks);
                }

                async fn begin(&self) -> StoreResult<Box<dyn StoreTx>> {
                    Ok(Box::new(SqlTx {
                        tx: $begin(&self.writer).await?,
                        pending: Vec::new(),
                        events: Vec::new(),
                        hooks: self.hooks.get().cloned(),
                        touched: Vec::new(),
                        in_hooks: false,
                    }))
                }

                async fn read(&self, resource_type: &str, id: &str) -> StoreResult<Option<StoredResource>> {
                    let row = sqlx::query(
                        "SELECT resource_type, id, version_id, last_updated, deleted, body FROM resources \
                         WHERE resource_type = $1 AND id = $2",
                    )
                    .bind(resource_type)
                    .bind(id)
                    .fetch_optional(&self.read)
                    .await?;
                    row.as_ref().map(stored).transpose()
                }

                async fn read_version(
                    &self,
                    resource_type: &str,
                    id: &str,
                    version: i64,
                ) -> StoreResult<Option<StoredResource>> {
                    let row = sqlx::query(
                        "SELECT resource_type, id, version_id, last_updated, deleted, body, method \
                         FROM resource_versions WHERE resource_type = $1 AND id = $2 AND version_id = $3",
                    )
                    .bind(resource_type)
                    .bind(id)
                    .bind(version)
                    .fetch_optional(&self.read)
                    .await?;
                    row.as_ref().map(stored).transpose()
                }

                async fn history(&self, q: &HistoryQuery) -> StoreResult<(Vec<StoredResource>, i64)> {
                    let mut sql = Sql::default();
                    let mut conds = Vec::new();
                    if let Some(t) = &q.resource_type {
                        sql.binds.push(Bind::Text(t.clone()));
                        conds.push(format!("resource_type = ${}", sql.binds.len()));
                    }
                    if let Some(t) = &q.except_type {
                        sql.binds.push(Bind::Text(t.clone()));
                        conds.push(format!("resource_type <> ${}", sql.binds.len()));
                    }
                    if let Some(id) = &q.id {
                        sql.binds.push(Bind::Text(id.clone()));
                        conds.push(format!("id = ${}", sql.binds.len()));
                    }
                    if let Some(since) = q.since {
                        sql.binds.push(Bind::Int(since));
                        conds.push(format!("last_updated >= ${}", sql.binds.len()));
                    }
                    let w = if conds.is_empty() { "1 = 1".to_string() } else { conds.join(" AND ") };
                    let count_sql = format!("SELECT COUNT(*) FROM resource_versions WHERE {w}");
                    let total: i64 = bind_all(sqlx::query(AssertSqlSafe(count_sql)), &sql.binds)
                        .fetch_one(&self.read)
                        .await?
                        .try_get(0)?;
                    let n = sql.binds.len();
                    sql.binds.push(Bind::Int(q.count));
                    sql.binds.push(Bind::Int(q.offset));
                    sql.text = format!(
                        "SELECT resource_type, id, version_id, last_updated, deleted, body, method FROM resource_versions \
                         WHERE {w} ORDER BY last_updated DESC, version_id DESC LIMIT ${} OFFSET ${}",
                        n + 1,
                        n + 2
                    );
                    Ok((fetch(&self.read, sql).await?, total))
                }

                async fn search(&self, q: &SearchQuery) -> StoreResult<SearchPage> {
                    let matches = if q.count > 0 { fetch(&self.read, q.page_sql()).await? } else { Vec::new() };
                    let total = if q.total {
                        let sql = q.count_sql();
                        let row = bind_all(sqlx::query(AssertSqlSafe(sql.text)), &sql.binds).fetch_one(&self.read).await?;
                        Some(row.try_get::<i64, _>(0)?)
                    } else {
                        None
                    };
                    Ok(SearchPage { matches, total })
                }

                async fn read_many(&self, refs: &[(String, String)]) -> StoreResult<Vec<StoredResource>> {
                    let mut out = Vec::new();
                    for chunk in refs.chunks(200) {
                        let mut sql = Sql::default();
                        let mut ors = Vec::new();
                        for (t, id) in chunk {
                            sql.binds.push(Bind::Text(t.clone()));
                            sql.binds.push(Bind::Text(id.clone()));
                            let n = sql.binds.len();
                            ors.push(format!("(r.resource_type = ${} AND r.id = ${})", n - 1, n));
                        }
                        sql.text = format!(
                            "SELECT {COLUMNS} FROM resources r WHERE r.deleted = FALSE AND ({})",
                            ors.join(" OR ")
                        );
                        out.extend(fetch(&self.read, sql).await?);
                    }
                    Ok(out)
                }

                async fn subscription(&self, id: &str) -> StoreResult<Option<SubscriptionRow>> {
                    let sql = format!(
                        "SELECT {SUB_COLUMNS}, EXISTS (SELECT 1 FROM subscription_outbox o WHERE o.subscription_id = $1) \
                         AS unnumbered FROM subscriptions WHERE id = $1"
                    );
                    let row = sqlx::query(AssertSqlSafe(sql)).bind(id).fetch_optional(&self.read).await?;
                    row.as_ref().map(subscription_row).transpose()
                }

                async fn subscription_events(&self, id: &str, from: i64, to: i64, limit: i64) -> StoreResult<Vec<EventRow>> {
                    let rows = sqlx::query(EVENTS_SQL)
                        .bind(id)
                        .bind(from)
                        .bind(to)
                        .bind(limit)
                        .fetch_all(&self.read)
                        .await?;
                    rows.iter().map(event_row).collect()
                }

                async fn durable(&self) {
                    Durable::durable(&self.writer).await
                }

                async fn current_after(&self, after: (&str, &str), limit: i64) -> StoreResult<Vec<StoredResource>> {
                    // a row-value comparison on the primary key: each page is an index range scan
                    let rows = sqlx::query(
                        "SELECT resource_type, id, version_id, last_updated, deleted, body FROM resources \
                         WHERE (resource_type, id) > ($1, $2) AND NOT deleted ORDER BY resource_type, id LIMIT $3",
                    )
                    .bind(after.0)
                    .bind(after.1)
                    .bind(limit)
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map(stored).collect()
                }

                async fn count_current(&self) -> StoreResult<i64> {
                    let row = sqlx::query("SELECT COUNT(*) FROM resources WHERE NOT deleted")
                        .fetch_one(&self.read)
                        .await?;
                    Ok(row.try_get(0)?)
                }

                async fn register_counts(&self, q: &RegisterQuery) -> StoreResult<Vec<(RegisterGroup, i64)>> {
                    let (filter, binds) = register_filter(q);
                    let text = format!(
                        "SELECT category, disease, code, age, sex, province, asl, region, COUNT(*) FROM case_register \
                         WHERE {filter} GROUP BY category, disease, code, age, sex, province, asl, region"
                    );
                    let rows = bind_all(sqlx::query(AssertSqlSafe(text)), &binds).fetch_all(&self.read).await?;
                    rows.iter()
                        .map(|r| {
                            Ok((
                                RegisterGroup {
                                    category: r.try_get(0)?,
                                    disease: r.try_get(1)?,
                                    code: r.try_get(2)?,
                                    age: r.try_get(3)?,
                                    sex: r.try_get(4)?,
                                    province: r.try_get(5)?,
                                    asl: r.try_get(6)?,
                                    region: r.try_get(7)?,
                                },
                                r.try_get::<i64, _>(8)?,
                            ))
                        })
                        .collect()
                }

                async fn register_months_changed(&self, since: i64) -> StoreResult<Vec<i32>> {
                    let rows = sqlx::query(
                        "SELECT day / 100 FROM case_register WHERE updated_at > $1 \
                         UNION SELECT previous_day / 100 FROM case_register WHERE updated_at > $1 AND previous_day IS NOT NULL",
                    )
                    .bind(since)
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map(|r| Ok(r.try_get::<i32, _>(0)?)).collect()
                }

                async fn register_cases(&self, q: &RegisterQuery, limit: i64) -> StoreResult<Vec<RegisteredCase>> {
                    let (filter, mut binds) = register_filter(q);
                    binds.push(Bind::Int(limit));
                    let text = format!(
                        "SELECT {REGISTER_COLUMNS} FROM case_register WHERE {filter} ORDER BY day, case_id LIMIT ${}",
                        binds.len()
                    );
                    let rows = bind_all(sqlx::query(AssertSqlSafe(text)), &binds).fetch_all(&self.read).await?;
                    rows.iter()
                        .map(|r| {
                            Ok(RegisteredCase {
                                case_id: r.try_get(0)?,
                                family: r.try_get(1)?,
                                category: r.try_get(2)?,
                                disease: r.try_get(3)?,
                                code: r.try_get(4)?,
                                day: r.try_get(5)?,
                                age: r.try_get(6)?,
                                sex: r.try_get(7)?,
                                comune: r.try_get(8)?,
                                province: r.try_get(9)?,
                                asl: r.try_get(10)?,
                                region: r.try_get(11)?,
                                active: r.try_get(12)?,
                                refs: r.try_get::<String, _>(13)?.split_whitespace().map(String::from).collect(),
                            })
                        })
                        .collect()
                }

                async fn subscriptions_due(&self, now: i64) -> StoreResult<bool> {
                    let sql = format!("SELECT id FROM subscriptions WHERE {DUE_SQL} LIMIT 1");
                    let row = sqlx::query(AssertSqlSafe(sql)).bind(now).fetch_optional(&self.read).await?;
                    Ok(row.is_some())
                }

                async fn outbox_backlog(&self, limit: i64) -> StoreResult<(Vec<OutboxBacklog>, i64)> {
                    let rows = sqlx::query(OUTBOX_BACKLOG_SQL).bind(limit).fetch_all(&self.read).await?;
                    let live = match rows.first() {
                        Some(r) => r.try_get::<i64, _>("live")?,
                        None => 0,
                    };
                    let backlog = rows
                        .iter()
                        .map(|r| {
                            Ok(OutboxBacklog {
                                subscription_id: r.try_get("id")?,
                                topic: r.try_get("topic")?,
                                status: r.try_get("status")?,
                                depth: r.try_get("depth")?,
                                oldest_occurred_at: r.try_get("oldest")?,
                            })
                        })
                        .collect::<StoreResult<Vec<_>>>()?;
                    Ok((backlog, live))
                }

                async fn references_of(&self, resource_type: &str, param: &str, ids: &[String]) -> StoreResult<Vec<String>> {
                    let mut out = Vec::new();
                    for chunk in ids.chunks(200) {
                        let mut sql = Sql { text: String::new(), binds: vec![Bind::Text(resource_type.into())] };
                        let p = param_filter(resource_type, param, &mut sql);
                        let mut marks = Vec::new();
                        for id in chunk {
                            sql.binds.push(Bind::Text(id.clone()));
                            marks.push(format!("${}", sql.binds.len()));
                        }
                        let text = format!(
                            "SELECT DISTINCT s.value FROM search_index s WHERE s.resource_type = $1 AND {p} AND s.system IS NULL AND s.id IN ({})",
                            marks.join(",")
                        );
                        let rows = bind_all(sqlx::query(AssertSqlSafe(text)), &sql.binds).fetch_all(&self.read).await?;
                        for row in rows {
                            out.push(row.try_get::<String, _>(0)?);
                        }
                    }
                    Ok(out)
                }

                async fn referencing(
                    &self,
                    source_type: &str,
                    param: &str,
                    targets: &[String],
                ) -> StoreResult<Vec<StoredResource>> {
                    let mut out = Vec::new();
                    for chunk in targets.chunks(200) {
                        let mut sql = Sql { text: String::new(), binds: vec![Bind::Text(source_type.into())] };
                        let p = param_filter(source_type, param, &mut sql);
                        let mut marks = Vec::new();
                        for t in chunk {
                            sql.binds.push(Bind::Text(t.clone()));
                            marks.push(format!("${}", sql.binds.len()));
                        }
                        sql.text = format!(
                            "SELECT {COLUMNS} FROM resources r WHERE r.resource_type = $1 AND r.deleted = FALSE AND EXISTS \
                             (SELECT 1 FROM search_index s WHERE s.resource_type = r.resource_type AND s.id = r.id \
                             AND {p} AND s.value IN ({}))",
                            marks.join(",")
                        );
                        out.extend(fetch(&self.read, sql).await?);
                    }
                    Ok(out)
                }
            }

            #[async_trait]
            impl StoreTx for SqlTx {
                async fn sub_define(&mut self, row: &SubscriptionRow) -> StoreResult<()> {
                    self.flush().await?;
                    sqlx::query(
                        "INSERT INTO subscriptions (id, topic, owner, status, heartbeat_secs, end_at, attempts, next_attempt_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, 0, 0) ON CONFLICT (id) DO UPDATE SET \
                         topic = excluded.topic, owner = excluded.owner, status = excluded.status, \
                         heartbeat_secs = excluded.heartbeat_secs, end_at = excluded.end_at, \
                         attempts = CASE WHEN excluded.status IN ('requested', 'active') THEN 0 ELSE subscriptions.attempts END, \
                         next_attempt_at = CASE WHEN excluded.status IN ('requested', 'active') THEN 0 ELSE subscriptions.next_attempt_at END, \
                         last_error = CASE WHEN excluded.status IN ('requested', 'active') THEN NULL ELSE subscriptions.last_error END",
                    )
                    .bind(&row.id)
                    .bind(&row.topic)
                    .bind(&row.owner)
                    .bind(&row.status)
                    .bind(row.heartbeat_secs)
                    .bind(row.end_at)
                    .execute(&mut *self.tx)
                    .await?;
                    Ok(())
                }

                async fn sub_of_topic(&mut self, topic: &str) -> StoreResult<Vec<(SubscriptionRow, String)>> {
                    self.flush().await?;
                    let sql = format!(
                        "SELECT {}, r.body AS body FROM subscriptions s JOIN resources r \
                         ON r.resource_type = 'Subscription' AND r.id = s.id \
                         WHERE s.topic = $1 AND s.status IN ('requested', 'active', 'error') AND r.body IS NOT NULL",
                        SUB_COLUMNS.split(", ").map(|c| format!("s.{c}")).collect::<Vec<_>>().join(", ")
                    );
                    let rows = sqlx::query(AssertSqlSafe(sql)).bind(topic).fetch_all(&mut *self.tx).await?;
                    rows.iter()
                        .map(|r| Ok((subscription_row(r)?, r.try_get::<String, _>("body")?)))
                        .collect()
                }

                async fn sub_append_event(&mut self, subscription_id: &str, focus: &str, at: i64) -> StoreResult<()> {
                    self.events.push((subscription_id.to_string(), focus.to_string(), at));
                    Ok(())
                }

                async fn sub_row(&mut self, id: &str) -> StoreResult<Option<SubscriptionRow>> {
                    self.flush().await?;
                    let sql = format!("SELECT {SUB_COLUMNS} FROM subscriptions WHERE id = $1");
                    let row = sqlx::query(AssertSqlSafe(sql)).bind(id).fetch_optional(&mut *self.tx).await?;
                    row.as_ref().map(subscription_row).transpose()
                }

                async fn sub_claim(&mut self, owner: &str, now: i64, until: i64, limit: i64) -> StoreResult<Vec<String>> {
                    self.flush().await?;
                    let sql = format!(
                        "UPDATE subscriptions SET lease_owner = $2, lease_until = $3 WHERE id IN \
                         (SELECT id FROM subscriptions WHERE {DUE_SQL} ORDER BY next_attempt_at LIMIT $4{}) RETURNING id",
                        $skip_locked
                    );
                    let rows = sqlx::query(AssertSqlSafe(sql))
                        .bind(now)
                        .bind(owner)
                        .bind(until)
                        .bind(limit)
                        .fetch_all(&mut *self.tx)
                        .await?;
                    rows.iter().map(|r| Ok(r.try_get::<String, _>(0)?)).collect()
                }

                async fn sub_delivered(&mut self, id: &str, d: &DeliveryState) -> StoreResult<()> {
                    self.flush().await?;
                    sqlx::query(
                        "UPDATE subscriptions SET status = $2, delivered_count = $3, attempts = $4, next_attempt_at = $5, \
                         last_sent_at = $6, last_error = $7, lease_until = $8 WHERE id = $1",
                    )
                    .bind(id)
                    .bind(&d.status)
                    .bind(d.delivered_count)
                    .bind(d.attempts)
                    .bind(d.next_attempt_at)
                    .bind(d.last_sent_at)
                    .bind(&d.last_error)
                    .bind(d.lease_until)
                    .execute(&mut *self.tx)
                    .await?;
                    Ok(())
                }

                async fn sub_progress(&mut self, id: &str, delivered: i64, last_sent_at: i64, lease_until: i64) -> StoreResult<()> {
                    self.flush().await?;
                    sqlx::query(
                        // every right-hand side sees the old row: failures are forgotten only when
                        // something new was acknowledged; a late background renewal never takes back
                        // a lease that was already given back
                        "UPDATE subscriptions SET \
                         attempts = CASE WHEN delivered_count < $2 OR last_sent_at < $3 THEN 0 ELSE attempts END, \
                         next_attempt_at = CASE WHEN delivered_count < $2 OR last_sent_at < $3 THEN 0 ELSE next_attempt_at END, \
                         last_error = CASE WHEN delivered_count < $2 OR last_sent_at < $3 THEN NULL ELSE last_error END, \
                         delivered_count = CASE WHEN delivered_count < $2 THEN $2 ELSE delivered_count END, \
                         last_sent_at = CASE WHEN last_sent_at < $3 THEN $3 ELSE last_sent_at END, \
                         lease_until = CASE WHEN $4 = 0 OR lease_until > 0 THEN $4 ELSE 0 END WHERE id = $1",
                    )
                    .bind(id)
                    .bind(delivered)
                    .bind(last_sent_at)
                    .bind(lease_until)
                    .execute(&mut *self.tx)
                    .await?;
                    Ok(())
                }

                async fn sub_events(&mut self, id: &str, from: i64, to: i64, limit: i64) -> StoreResult<Vec<EventRow>> {
                    self.flush().await?;
                    let rows = sqlx::query(EVENTS_SQL)
                        .bind(id)
                        .bind(from)
                        .bind(to)
                        .bind(limit)
                        .fetch_all(&mut *self.tx)
                        .await?;
                    rows.iter().map(event_row).collect()
                }

                async fn current(&mut self, resource_type: &str, id: &str) -> StoreResult<Option<StoredResource>> {
                    self.flush().await?;
                    let row = sqlx::query(
                        "SELECT resource_type, id, version_id, last_updated, deleted, body FROM resources \
                         WHERE resource_type = $1 AND id = $2",
                    )
                    .bind(resource_type)
                    .bind(id)
                    .fetch_optional(&mut *self.tx)
                    .await?;
                    row.as_ref().map(stored).transpose()
                }

                async fn last_live(&mut self, resource_type: &str, id: &str) -> StoreResult<Option<StoredResource>> {
                    self.flush().await?;
                    let row = sqlx::query(
                        "SELECT resource_type, id, version_id, last_updated, deleted, body, method FROM resource_versions \
                         WHERE resource_type = $1 AND id = $2 AND deleted = $3 ORDER BY version_id DESC LIMIT 1",
                    )
                    .bind(resource_type)
                    .bind(id)
                    .bind(false)
                    .fetch_optional(&mut *self.tx)
                    .await?;
                    row.as_ref().map(stored).transpose()
                }

                async fn lock(&mut self, key: &str) -> StoreResult<()> {
                    let lock: Option<&'static str> = $lock;
                    if let Some(sql) = lock {
                        sqlx::query(sql).bind(lock_key(key)).execute(&mut *self.tx).await?;
                    }
                    Ok(())
                }

                async fn lock_all(&mut self, keys: &[String]) -> StoreResult<()> {
                    let lock: Option<&'static str> = $lock;
                    if lock.is_none() || keys.is_empty() {
                        return Ok(());
                    }
                    let mut hashed: Vec<i64> = keys.iter().map(|k| lock_key(k)).collect();
                    hashed.sort_unstable();
                    hashed.dedup();
                    crate::store::backend::$backend::lock_all(&mut *self.tx, hashed).await
                }

                async fn search_ids(&mut self, q: &SearchQuery) -> StoreResult<Vec<String>> {
                    self.flush().await?;
                    let sql = q.ids_sql();
                    let rows = bind_all(sqlx::query(AssertSqlSafe(sql.text)), &sql.binds).fetch_all(&mut *self.tx).await?;
                    rows.iter().map(|r| Ok(r.try_get::<String, _>(0)?)).collect()
                }

                async fn write(&mut self, v: &NewVersion) -> StoreResult<()> {
                    let watched = !self.in_hooks
                        && self.hooks.as_ref().is_some_and(|h| h.iter().any(|h| h.watches(&v.resource_type)));
                    let previous = if watched && v.version_id > 1 {
                        self.current(&v.resource_type, &v.id)
                            .await?
                            .and_then(|c| c.body)
                            .and_then(|b| serde_json::from_str(&b).ok())
                            .map(Arc::new)
                    } else {
                        None
                    };
                    self.write_version(v).await?;
                    if watched {
                        self.touched.push(Touched {
                            resource_type: v.resource_type.clone(),
                            id: v.id.clone(),
                            body: v.resource.clone(),
                            previous,
                            created: v.method == "POST",
                        });
                    }
                    Ok(())
                }

                async fn flush(&mut self) -> StoreResult<()> {
                    SqlTx::flush(self).await
                }

                async fn replace_index(&mut self, v: &NewVersion) -> StoreResult<bool> {
                    self.flush().await?;
                    let current = sqlx::query(
                        "SELECT version_id FROM resources WHERE resource_type = $1 AND id = $2 AND NOT deleted",
                    )
                    .bind(&v.resource_type)
                    .bind(&v.id)
                    .fetch_optional(&mut *self.tx)
                    .await?;
                    if current.map(|r| r.try_get::<i64, _>(0)).transpose()? != Some(v.version_id) {
                        return Ok(false);
                    }
                    sqlx::query("DELETE FROM search_index WHERE resource_type = $1 AND id = $2")
                        .bind(&v.resource_type)
                        .bind(&v.id)
                        .execute(&mut *self.tx)
                        .await?;
                    crate::store::backend::$backend::insert_index(&mut *self.tx, &index_rows(std::slice::from_ref(v))).await?;
                    Ok(true)
                }

                async fn commit_noting(mut self: Box<Self>) -> StoreResult<Vec<Note>> {
                    let mut notes = Vec::new();
                    let touched = std::mem::take(&mut self.touched);
                    let hooks = self.hooks.clone();
                    let mut announce = Vec::new();
                    if let Some(hooks) = &hooks
                        && !touched.is_empty()
                    {
                        // the request's own writes go out first, so the rules see them in the database
                        self.flush().await?;
                        self.in_hooks = true;
                        announce = run_before_commit(hooks, &mut *self, &touched, &mut notes).await?;
                    }
                    self.commit_inner().await?;
                    if let Some(hooks) = &hooks {
                        for i in announce {
                            hooks[i].after_commit();
                        }
                    }
                    Ok(notes)
                }

                async fn sub_number_events(&mut self, id: &str) -> StoreResult<i64> {
                    self.flush().await?;
                    let sql = format!("SELECT events_count FROM subscriptions WHERE id = $1{}", $for_update);
                    let Some(row) = sqlx::query(AssertSqlSafe(sql)).bind(id).fetch_optional(&mut *self.tx).await? else {
                        return Ok(0);
                    };
                    let count: i64 = row.try_get(0)?;
                    let mut number = count;
                    loop {
                    let waiting = sqlx::query(
                        "SELECT seq, focus, occurred_at FROM subscription_outbox WHERE subscription_id = $1 ORDER BY seq LIMIT 500",
                    )
                    .bind(id)
                    .fetch_all(&mut *self.tx)
                    .await?;
                    if waiting.is_empty() {
                        break;
                    }
                    let mut numbered = Vec::with_capacity(waiting.len());
                    for w in &waiting {
                        number += 1;
                        let seq: i64 = w.try_get("seq")?;
                        sqlx::query(
                            "INSERT INTO subscription_events (subscription_id, event_number, focus, occurred_at) VALUES ($1, $2, $3, $4)",
                        )
                        .bind(id)
                        .bind(number)
                        .bind(w.try_get::<String, _>("focus")?)
                        .bind(w.try_get::<i64, _>("occurred_at")?)
                        .execute(&mut *self.tx)
                        .await?;
                        numbered.push(seq);
                    }
                    // by sequence number, not by range: on PostgreSQL a lower number may commit later
                    for chunk in numbered.chunks(100) {
                        let mut binds = vec![Bind::Text(id.to_string())];
                        let marks: Vec<String> = chunk
                            .iter()
                            .map(|seq| {
                                binds.push(Bind::Int(*seq));
                                format!("${}", binds.len())
                            })
                            .collect();
                        let sql = format!(
                            "DELETE FROM subscription_outbox WHERE subscription_id = $1 AND seq IN ({})",
                            marks.join(",")
                        );
                        bind_all(sqlx::query(AssertSqlSafe(sql)), &binds).execute(&mut *self.tx).await?;
                    }
                    }
                    if number == count {
                        return Ok(count);
                    }
                    sqlx::query("UPDATE subscriptions SET events_count = $2 WHERE id = $1")
                        .bind(id)
                        .bind(number)
                        .execute(&mut *self.tx)
                        .await?;
                    Ok(number)
                }

                async fn purge_before(&mut self, resource_type: &str, before: i64, limit: i64) -> StoreResult<u64> {
                    self.flush().await?;
                    // the oldest first, by the (resource_type, last_updated) index
                    let ids: Vec<String> = sqlx::query_scalar(
                        "SELECT id FROM resources WHERE resource_type = $1 AND last_updated < $2 \
                         ORDER BY last_updated LIMIT $3",
                    )
                    .bind(resource_type)
                    .bind(before)
                    .bind(limit)
                    .fetch_all(&mut *self.tx)
                    .await?;
                    for table in ["search_index", "resource_versions", "resources"] {
                        for chunk in ids.chunks(200) {
                            let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
                            let sql = format!(
                                "DELETE FROM {table} WHERE resource_type = $1 AND id IN ({})",
                                marks.join(", ")
                            );
                            let mut q = sqlx::query(AssertSqlSafe(sql)).bind(resource_type);
                            for id in chunk {
                                q = q.bind(id);
                            }
                            q.execute(&mut *self.tx).await?;
                        }
                    }
                    Ok(ids.len() as u64)
                }

                async fn sub_prune_events(&mut self, id: &str, before: i64) -> StoreResult<i64> {
                    self.flush().await?;
                    let row = sqlx::query(
                        "SELECT MAX(event_number) FROM subscription_events e JOIN subscriptions s ON s.id = e.subscription_id \
                         WHERE e.subscription_id = $1 AND e.event_number <= s.delivered_count AND e.occurred_at < $2",
                    )
                    .bind(id)
                    .bind(before)
                    .fetch_one(&mut *self.tx)
                    .await?;
                    let Some(upto) = row.try_get::<Option<i64>, _>(0)? else {
                        let row = sqlx::query("SELECT pruned_count FROM subscriptions WHERE id = $1")
                            .bind(id)
                            .fetch_optional(&mut *self.tx)
                            .await?;
                        return Ok(match row {
                            Some(r) => r.try_get(0)?,
                            None => 0,
                        });
                    };
                    // events are delivered in order: everything up to `upto` went out
                    sqlx::query("DELETE FROM subscription_events WHERE subscription_id = $1 AND event_number <= $2")
                        .bind(id)
                        .bind(upto)
                        .execute(&mut *self.tx)
                        .await?;
                    sqlx::query("UPDATE subscriptions SET pruned_count = $2 WHERE id = $1 AND pruned_count < $2")
                        .bind(id)
                        .bind(upto)
                        .execute(&mut *self.tx)
                        .await?;
                    Ok(upto)
                }

                async fn cre_isolate(&mut self, isolate_id: &str) -> StoreResult<Option<IsolateState>> {
                    self.flush().await?;
                    let row = sqlx::query(
                        "SELECT identity, species, year, ref_time, qualifies FROM cre_isolates WHERE isolate_id = $1",
                    )
                    .bind(isolate_id)
                    .fetch_optional(&mut *self.tx)
                    .await?;
                    row.map(|r| -> StoreResult<IsolateState> {
                        Ok(IsolateState {
                            isolate_id: isolate_id.to_string(),
                            key: CaseKey {
                                identity: r.try_get("identity")?,
                                species: r.try_get("species")?,
                                year: r.try_get("year")?,
                            },
                            ref_time: r.try_get("ref_time")?,
                            qualifies: r.try_get("qualifies")?,
                        })
                    })
                    .transpose()
                }

                async fn cre_put_isolate(&mut self, s: &IsolateState) -> StoreResult<()> {
                    self.flush().await?;
                    sqlx::query(
                        "INSERT INTO cre_isolates (isolate_id, identity, species, year, ref_time, qualifies) \
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (isolate_id) DO UPDATE SET \
                         identity = excluded.identity, species = excluded.species, year = excluded.year, \
                         ref_time = excluded.ref_time, qualifies = excluded.qualifies",
                    )
                    .bind(&s.isolate_id)
                    .bind(&s.key.identity)
                    .bind(&s.key.species)
                    .bind(s.key.year)
                    .bind(s.ref_time)
                    .bind(s.qualifies)
                    .execute(&mut *self.tx)
                    .await?;
                    Ok(())
                }

                async fn cre_isolates_of_key(&mut self, key: &CaseKey) -> StoreResult<Vec<String>> {
                    self.flush().await?;
                    let rows = sqlx::query(
                        "SELECT isolate_id FROM cre_isolates WHERE identity = $1 AND species = $2 AND year = $3 \
                         ORDER BY ref_time, isolate_id",
                    )
                    .bind(&key.identity)
                    .bind(&key.species)
                    .bind(key.year)
                    .fetch_all(&mut *self.tx)
                    .await?;
                    rows.iter().map(|r| Ok(r.try_get::<String, _>(0)?)).collect()
                }

                async fn cre_active_case(&mut self, key: &CaseKey) -> StoreResult<Option<CaseRow>> {
                    self.flush().await?;
                    let row = sqlx::query(
                        "SELECT case_id, isolate_id FROM cre_cases WHERE identity = $1 AND species = $2 AND year = $3 AND active",
                    )
                    .bind(&key.identity)
                    .bind(&key.species)
                    .bind(key.year)
                    .fetch_optional(&mut *self.tx)
                    .await?;
                    row.map(|r| -> StoreResult<CaseRow> {
                        Ok(CaseRow {
                            case_id: r.try_get("case_id")?,
                            key: key.clone(),
                            isolate_id: r.try_get("isolate_id")?,
                            active: true,
                        })
                    })
                    .transpose()
                }

                async fn cre_claim_case(&mut self, c: &CaseRow, created_at: i64) -> StoreResult<bool> {
                    self.flush().await?;
                    let done = sqlx::query(
                        "INSERT INTO cre_cases (case_id, identity, species, year, isolate_id, active, created_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7) \
                         ON CONFLICT (identity, species, year) WHERE active DO NOTHING",
                    )
                    .bind(&c.case_id)
                    .bind(&c.key.identity)
                    .bind(&c.key.species)
                    .bind(c.key.year)
                    .bind(&c.isolate_id)
                    .bind(true)
                    .bind(created_at)
                    .execute(&mut *self.tx)
                    .await?;
                    Ok(done.rows_affected() == 1)
                }

                async fn cre_active_cases_after(&mut self, after: &str, limit: i64) -> StoreResult<Vec<CaseRow>> {
                    self.flush().await?;
                    let rows = sqlx::query(
                        "SELECT case_id, identity, species, year, isolate_id FROM cre_cases \
                         WHERE active AND case_id > $1 ORDER BY case_id LIMIT $2",
                    )
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&mut *self.tx)
                    .await?;
                    rows.iter()
                        .map(|r| {
                            Ok(CaseRow {
                                case_id: r.try_get(0)?,
                                key: CaseKey { identity: r.try_get(1)?, species: r.try_get(2)?, year: r.try_get(3)? },
                                isolate_id: r.try_get(4)?,
                                active: true,
                            })
                        })
                        .collect()
                }

                async fn cre_set_case(&mut self, case_id: &str, isolate_id: &str, active: bool) -> StoreResult<()> {
                    self.flush().await?;
                    sqlx::query("UPDATE cre_cases SET isolate_id = $2, active = $3 WHERE case_id = $1")
                        .bind(case_id)
                        .bind(isolate_id)
                        .bind(active)
                        .execute(&mut *self.tx)
                        .await?;
                    Ok(())
                }

                async fn register_case(&mut self, c: &RegisteredCase) -> StoreResult<()> {
                    self.flush().await?;
                    sqlx::query(
                        "INSERT INTO case_register (case_id, family, category, disease, code, day, age, sex, comune, province, asl, region, active, refs, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
                         ON CONFLICT (case_id) DO UPDATE SET family = excluded.family, category = excluded.category, \
                         disease = excluded.disease, code = excluded.code, day = excluded.day, age = excluded.age, sex = excluded.sex, \
                         comune = excluded.comune, province = excluded.province, asl = excluded.asl, region = excluded.region, \
                         active = excluded.active, refs = excluded.refs, updated_at = excluded.updated_at, \
                         previous_day = CASE WHEN case_register.day <> excluded.day THEN case_register.day ELSE case_register.previous_day END",
                    )
                    .bind(&c.case_id)
                    .bind(&c.family)
                    .bind(&c.category)
                    .bind(&c.disease)
                    .bind(&c.code)
                    .bind(c.day)
                    .bind(c.age)
                    .bind(&c.sex)
                    .bind(&c.comune)
                    .bind(&c.province)
                    .bind(&c.asl)
                    .bind(&c.region)
                    .bind(c.active)
                    .bind(c.refs.join(" "))
                    .bind(crate::fhir::datetime::now_micros())
                    .execute(&mut *self.tx)
                    .await?;
                    Ok(())
                }

                async fn register_set_active(&mut self, case_id: &str, active: bool) -> StoreResult<()> {
                    self.flush().await?;
                    sqlx::query("UPDATE case_register SET active = $2, updated_at = $3 WHERE case_id = $1")
                        .bind(case_id)
                        .bind(active)
                        .bind(crate::fhir::datetime::now_micros())
                        .execute(&mut *self.tx)
                        .await?;
                    Ok(())
                }

                async fn state_get(&mut self, rule_set: &str, key: &str) -> StoreResult<Option<serde_json::Value>> {
                    self.flush().await?;
                    let row = sqlx::query("SELECT value FROM rule_state WHERE rule_set = $1 AND key = $2")
                        .bind(rule_set)
                        .bind(key)
                        .fetch_optional(&mut *self.tx)
                        .await?;
                    row.map(|r| state_value(&r.try_get::<String, _>(0)?)).transpose()
                }

                async fn state_put(&mut self, rule_set: &str, key: &str, value: &serde_json::Value, tags: &[String]) -> StoreResult<()> {
                    self.flush().await?;
                    sqlx::query(
                        "INSERT INTO rule_state (rule_set, key, value, updated_at) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (rule_set, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                    )
                    .bind(rule_set)
                    .bind(key)
                    .bind(value.to_string())
                    .bind(crate::fhir::datetime::now_micros())
                    .execute(&mut *self.tx)
                    .await?;
                    self.state_tag(rule_set, key, tags, true).await
                }

                async fn state_claim(&mut self, rule_set: &str, key: &str, value: &serde_json::Value, tags: &[String]) -> StoreResult<bool> {
                    self.flush().await?;
                    let done = sqlx::query(
                        "INSERT INTO rule_state (rule_set, key, value, updated_at) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (rule_set, key) DO NOTHING",
                    )
                    .bind(rule_set)
                    .bind(key)
                    .bind(value.to_string())
                    .bind(crate::fhir::datetime::now_micros())
                    .execute(&mut *self.tx)
                    .await?;
                    if done.rows_affected() != 1 {
                        return Ok(false);
                    }
                    self.state_tag(rule_set, key, tags, false).await?;
                    Ok(true)
                }

                async fn state_keys_after(&mut self, rule_set: &str, prefix: &str, after: &str, limit: i64) -> StoreResult<Vec<String>> {
                    self.flush().await?;
                    // in key order from `after` (the primary key), the prefix as a filter: the
                    // databases' collations need not sort a prefix's keys together
                    let rows = sqlx::query(
                        "SELECT key FROM rule_state WHERE rule_set = $1 AND key > $2 AND key LIKE $3 ESCAPE '\\' ORDER BY key LIMIT $4",
                    )
                    .bind(rule_set)
                    .bind(after)
                    .bind(format!("{}%", crate::store::query::like_escape(prefix)))
                    .bind(limit)
                    .fetch_all(&mut *self.tx)
                    .await?;
                    let keys: Vec<String> = rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>()?;
                    Ok(keys.into_iter().filter(|k| k.starts_with(prefix)).collect())
                }

                async fn state_tagged(&mut self, rule_set: &str, tag: &str) -> StoreResult<Vec<(String, serde_json::Value)>> {
                    self.flush().await?;
                    // ordered by the tag index's own column: SQLite (no statistics) then starts from
                    // the tag, not from every record of the rule set
                    let rows = sqlx::query(
                        "SELECT s.key, s.value FROM rule_state_tags t JOIN rule_state s ON s.rule_set = t.rule_set AND s.key = t.key \
                         WHERE t.rule_set = $1 AND t.tag = $2 ORDER BY t.key",
                    )
                    .bind(rule_set)
                    .bind(tag)
                    .fetch_all(&mut *self.tx)
                    .await?;
                    rows.iter()
                        .map(|r| Ok((r.try_get::<String, _>(0)?, state_value(&r.try_get::<String, _>(1)?)?)))
                        .collect()
                }
            }
        }
    };
}

sql_backend!(
    sqlite_impl,
    sqlx::Sqlite,
    "sqlite",
    None,
    sqlite,
    "",
    "",
    true,
    crate::store::group_commit::GroupWriter,
    crate::store::group_commit::GroupTx,
    crate::store::group_commit::GroupWriter::begin,
    crate::store::group_commit::GroupTx::commit
);
sql_backend!(
    postgres_impl,
    sqlx::Postgres,
    "postgresql",
    Some("SELECT pg_advisory_xact_lock($1)"),
    postgres,
    " FOR UPDATE SKIP LOCKED",
    " FOR UPDATE",
    false,
    sqlx::PgPool,
    sqlx::Transaction<'static, sqlx::Postgres>,
    postgres::begin,
    postgres::commit
);

mod sqlite {
    use super::*;
    use sqlx::ConnectOptions;
    use sqlx::sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
    };

    pub async fn open(url: &str) -> StoreResult<SharedStore> {
        let base = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before the 2xx (WAL with NORMAL may lose the last commits)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // savepoints (group commit) keep their sub-journal in memory, not in a temp file
            .pragma("temp_store", "memory");
        {
            let migrator = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(base.clone())
                .await?;
            sqlx::migrate!("./migrations/sqlite").run(&migrator).await?;
            migrator.close().await;
        }
        // SQLite has one writer at a time: one write connection, shared with group commit
        // Page caches are per connection and count in the process's memory: the writer keeps
        // the hot index pages (16 MiB), each reader 4 MiB; the OS page cache holds the rest.
        // NORMAL on the writer: its COMMIT only appends to the log, which the group writer syncs
        // itself outside the writer's turn before any member hears of the commit
        let writer = crate::store::group_commit::GroupWriter::new(
            base.clone()
                .synchronous(SqliteSynchronous::Normal)
                .pragma("cache_size", "-16384")
                // checkpoints run beside the writer (backend::sqlite::spawn_checkpointer); this
                // is only the safety net (16 k pages = 64 MiB of log)
                .pragma("wal_autocheckpoint", "16384")
                .connect()
                .await?,
            base.get_filename(),
        );
        crate::store::backend::sqlite::spawn_checkpointer(
            base.clone().pragma("cache_size", "-1024").connect().await?,
        );
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(base.read_only(true).pragma("cache_size", "-4096"))
            .await?;
        Ok(Arc::new(sqlite_impl::SqlStore {
            writer,
            read,
            hooks: Default::default(),
        }))
    }
}

mod postgres {
    use super::*;
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

    pub async fn open(url: &str) -> StoreResult<SharedStore> {
        open_pool(url, 16, true).await
    }

    pub async fn open_pool(url: &str, connections: u32, migrate: bool) -> StoreResult<SharedStore> {
        let opts = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            // a write that cannot get a connection soon is answered 503, not queued for 30 s
            .acquire_timeout(crate::store::ACQUIRE_TIMEOUT)
            .connect_with(opts)
            .await?;
        if migrate {
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        }
        Ok(Arc::new(postgres_impl::SqlStore {
            writer: pool.clone(),
            read: pool,
            hooks: Default::default(),
        }))
    }

    pub async fn begin(
        pool: &sqlx::PgPool,
    ) -> StoreResult<sqlx::Transaction<'static, sqlx::Postgres>> {
        Ok(pool.begin().await?)
    }

    pub async fn commit(tx: sqlx::Transaction<'static, sqlx::Postgres>) -> StoreResult<()> {
        Ok(tx.commit().await?)
    }
}
