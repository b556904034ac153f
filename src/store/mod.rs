//! Versioned resource storage: one trait, a SQLite and a PostgreSQL implementation sharing their SQL
//! (`sql.rs`), search queries compiled to SQL in `query.rs`.
mod backend;
mod group_commit;
pub mod hooks;
pub mod query;
mod sql;

use std::sync::Arc;

use async_trait::async_trait;

pub use hooks::{Hooks, Note, PreCommit, Touched};
pub use query::{Condition, Match, SearchQuery, Sort, SystemMatch};
pub use sql::{connect, connect_for_delivery};

use crate::fhir::search_params::IndexEntry;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The resource changed (or was created) concurrently: the caller's view is stale.
    #[error("{resource_type}/{id} was changed concurrently")]
    VersionConflict { resource_type: String, id: String },
    #[error("the group commit failed: {0}")]
    GroupCommit(String),
    /// The surveillance rules could not complete (a defect: the write is rolled back).
    #[error("surveillance rules failed: {0}")]
    Rule(String),
    /// The writer could not be had in time.
    #[error("the database is busy")]
    Busy,
    #[error("unsupported database URL '{0}': use sqlite://PATH or postgres://…")]
    BadUrl(String),
}

impl StoreError {
    /// The database could not take the work in time (no connection, writer queue full).
    pub fn is_overload(&self) -> bool {
        matches!(
            self,
            StoreError::Busy | StoreError::Database(sqlx::Error::PoolTimedOut)
        )
    }

    pub fn is_conflict(&self) -> bool {
        match self {
            StoreError::VersionConflict { .. } => true,
            StoreError::Database(sqlx::Error::Database(e)) => e.is_unique_violation(),
            _ => false,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// How long to wait for a PostgreSQL connection before the request is answered 503.
pub const ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One stored version of a resource.
#[derive(Debug, Clone)]
pub struct StoredResource {
    pub resource_type: String,
    pub id: String,
    pub version_id: i64,
    /// µs since the epoch
    pub last_updated: i64,
    pub deleted: bool,
    /// The JSON text; `None` for a deletion.
    pub body: Option<String>,
    /// POST, PUT or DELETE (history entries).
    pub method: String,
}

/// A new version to write.
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub resource_type: String,
    pub id: String,
    pub version_id: i64,
    pub last_updated: i64,
    pub body: Option<String>,
    pub method: &'static str,
    pub index: Vec<IndexEntry>,
    /// The stamped resource as parsed JSON, for the rules that run before commit (no re-parse).
    pub resource: Option<Arc<serde_json::Value>>,
}

impl NewVersion {
    /// Stamp `resource` (id, versionId, lastUpdated = now) and extract its search index entries.
    pub fn stamped(
        mut resource: serde_json::Value,
        resource_type: &str,
        id: &str,
        version_id: i64,
        method: &'static str,
    ) -> NewVersion {
        use crate::fhir::datetime::{format_instant, now_micros};
        let now = now_micros();
        crate::fhir::resource::stamp(&mut resource, id, version_id, &format_instant(now));
        let index = crate::fhir::Definitions::get().search.extract(&resource);
        NewVersion {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            version_id,
            last_updated: now,
            body: Some(serde_json::to_string(&resource).unwrap_or_default()),
            method,
            index,
            resource: Some(Arc::new(resource)),
        }
    }
}

/// A page of search results.
#[derive(Debug, Default)]
pub struct SearchPage {
    pub matches: Vec<StoredResource>,
    pub total: Option<i64>,
}

/// What a history request asks for.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    pub resource_type: Option<String>,
    /// A type left out of a system-wide history (the audit trail, which has readers of its own).
    pub except_type: Option<String>,
    pub id: Option<String>,
    pub since: Option<i64>,
    pub count: i64,
    pub offset: i64,
}

/// The deduplication key of a CRE case: one case per patient identity, species and calendar year.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CaseKey {
    /// The codice fiscale identity (omocodia folded), or `Patient/<id>` without one.
    pub identity: String,
    pub species: String,
    pub year: i32,
}

/// An isolate that met the CRE case definition at some point, and whether it still does.
#[derive(Debug, Clone, PartialEq)]
pub struct IsolateState {
    pub isolate_id: String,
    pub key: CaseKey,
    /// µs since the epoch of the date that decided the year (earliest isolate wins the case).
    pub ref_time: i64,
    pub qualifies: bool,
}

/// A CRE case: the isolate it currently rests on, and whether it stands (not withdrawn).
#[derive(Debug, Clone, PartialEq)]
pub struct CaseRow {
    pub case_id: String,
    pub key: CaseKey,
    pub isolate_id: String,
    pub active: bool,
}

/// One case as the periodic summaries count it (migrations/*/0006_case_register.sql).
#[derive(Debug, Clone, PartialEq)]
pub struct RegisteredCase {
    pub case_id: String,
    /// The rule family (`dm-1990`, `cre`) and the notification category (`classe-2`, `cre`…).
    pub family: String,
    pub category: String,
    /// The listed disease (ICD-9-CM entry of the rule table; CRE: the organism's code).
    pub disease: String,
    /// The ICD-9-CM code reported.
    pub code: String,
    /// The Europe/Rome day (yyyymmdd) that puts the case in a period.
    pub day: i32,
    /// Completed years at `day`, capped as Modello 15 records them (0 under one year, 99 above).
    pub age: Option<i32>,
    /// Administrative gender (`unknown` when not given).
    pub sex: String,
    pub comune: Option<String>,
    pub province: Option<String>,
    pub asl: Option<String>,
    pub region: Option<String>,
    pub active: bool,
    /// What a reader opens to see the case (`Communication/<id>`…).
    pub refs: Vec<String>,
}

/// Where the cases a summary counts live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Area {
    Asl(String),
    Province(String),
    Region(String),
    Country,
}

/// The standing cases of a family and some of its categories in an area whose day is in
/// `[from_day, to_day]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisterQuery {
    pub family: String,
    pub categories: Vec<String>,
    pub area: Area,
    /// Only cases counted in this region too (an ASL's or a province's cases are its region's).
    pub within_region: Option<String>,
    pub from_day: i32,
    pub to_day: i32,
}

/// The number of standing cases sharing everything a summary stratifies by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegisterGroup {
    pub category: String,
    pub disease: String,
    pub code: String,
    pub age: Option<i32>,
    pub sex: String,
    pub province: Option<String>,
    pub asl: Option<String>,
    pub region: Option<String>,
}

/// The delivery state of one Subscription (migrations/*/0003_subscriptions.sql).
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionRow {
    pub id: String,
    /// The topic canonical (`Subscription.criteria`).
    pub topic: String,
    /// The client that created it (`""` in development mode).
    pub owner: String,
    /// requested | active | error | off
    pub status: String,
    /// The last event number handed out.
    pub events_count: i64,
    /// Every event up to this number reached the endpoint.
    pub delivered_count: i64,
    /// Failed attempts in a row.
    pub attempts: i64,
    /// µs since the epoch: no delivery attempt before this.
    pub next_attempt_at: i64,
    /// µs since the epoch of the last successful send (handshake, heartbeat or event).
    pub last_sent_at: i64,
    pub heartbeat_secs: Option<i64>,
    pub end_at: Option<i64>,
    pub last_error: Option<String>,
    /// Every event up to this number was pruned (delivered and older than the retention).
    pub pruned_count: i64,
    /// Events are waiting in the outbox to be numbered (only `Store::subscription` fills it).
    pub unnumbered: bool,
}

/// What a delivery attempt leaves behind (releases the lease).
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryState {
    pub status: String,
    pub delivered_count: i64,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_sent_at: i64,
    pub last_error: Option<String>,
    /// µs since the epoch; 0 releases the lease, later keeps it while a batch goes out.
    pub lease_until: i64,
}

/// What one live subscription has not delivered yet (`Store::outbox_backlog`).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxBacklog {
    pub subscription_id: String,
    pub topic: String,
    pub status: String,
    /// Events numbered and not acknowledged, plus events waiting to be numbered.
    pub depth: i64,
    /// µs since the epoch: when the oldest undelivered event occurred (`None`: nothing waits).
    pub oldest_occurred_at: Option<i64>,
}

/// One outbox event: the `event_number`-th event of a subscription, about `focus`
/// (`Communication/<id>/_history/<version>`).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub subscription_id: String,
    pub event_number: i64,
    pub focus: String,
    /// µs since the epoch
    pub occurred_at: i64,
}

#[async_trait]
pub trait Store: Send + Sync {
    fn backend(&self) -> &'static str;
    /// Write transactions run these hooks before they commit (installed once, at start).
    fn install_hooks(&self, hooks: Hooks);
    async fn begin(&self) -> StoreResult<Box<dyn StoreTx>>;
    async fn read(&self, resource_type: &str, id: &str) -> StoreResult<Option<StoredResource>>;
    async fn read_version(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> StoreResult<Option<StoredResource>>;
    async fn history(&self, q: &HistoryQuery) -> StoreResult<(Vec<StoredResource>, i64)>;
    async fn search(&self, q: &SearchQuery) -> StoreResult<SearchPage>;
    /// Current versions of the given `(type, id)` references (for `_include`).
    async fn read_many(&self, refs: &[(String, String)]) -> StoreResult<Vec<StoredResource>>;
    /// Values of one reference parameter of the given resources (for `_include`).
    async fn references_of(
        &self,
        resource_type: &str,
        param: &str,
        ids: &[String],
    ) -> StoreResult<Vec<String>>;
    /// Resources of `source_type` whose `param` points at one of `targets` (`Type/id`) (for `_revinclude`).
    async fn referencing(
        &self,
        source_type: &str,
        param: &str,
        targets: &[String],
    ) -> StoreResult<Vec<StoredResource>>;

    // Subscriptions (read side: $status, $events, and the delivery worker's cheap "anything due?")
    async fn subscription(&self, id: &str) -> StoreResult<Option<SubscriptionRow>>;
    async fn subscription_events(
        &self,
        id: &str,
        from: i64,
        to: i64,
        limit: i64,
    ) -> StoreResult<Vec<EventRow>>;
    /// Is any subscription due for a handshake, an event, a heartbeat or its end at `now`?
    async fn subscriptions_due(&self, now: i64) -> StoreResult<bool>;
    /// The undelivered events of the live subscriptions (requested, active, error), most waiting
    /// first, at most `limit` of them; and how many live subscriptions there are (for metrics).
    async fn outbox_backlog(&self, limit: i64) -> StoreResult<(Vec<OutboxBacklog>, i64)>;
    /// The standing cases of a query, counted by everything a summary stratifies by.
    async fn register_counts(&self, q: &RegisterQuery) -> StoreResult<Vec<(RegisterGroup, i64)>>;
    /// The months (`yyyymm`) a case was counted in, or moved out of, by a change after `since` (µs).
    async fn register_months_changed(&self, since: i64) -> StoreResult<Vec<i32>>;
    /// The standing cases of a query, one by one (at most `limit`).
    async fn register_cases(
        &self,
        q: &RegisterQuery,
        limit: i64,
    ) -> StoreResult<Vec<RegisteredCase>>;

    /// Wait until everything committed so far is durable (SQLite makes a commit visible a moment
    /// before its log sync; PostgreSQL only after). Whatever is sent out waits for this.
    async fn durable(&self);

    /// Up to `limit` current (not deleted) resources whose `(type, id)` sorts after `after`, in
    /// that order (the primary key): a job walking every resource in batches (`reindex`).
    async fn current_after(
        &self,
        after: (&str, &str),
        limit: i64,
    ) -> StoreResult<Vec<StoredResource>>;
    /// How many current (not deleted) resources there are (a full count: for progress reports).
    async fn count_current(&self) -> StoreResult<i64>;
}

/// A database transaction: everything written through it commits together or not at all.
#[async_trait]
pub trait StoreTx: Send {
    async fn current(
        &mut self,
        resource_type: &str,
        id: &str,
    ) -> StoreResult<Option<StoredResource>>;
    /// The newest version of a resource that is not a deletion (who owned a deleted Subscription).
    async fn last_live(
        &mut self,
        resource_type: &str,
        id: &str,
    ) -> StoreResult<Option<StoredResource>>;
    /// Serialise writers that use the same key until this transaction ends (conditional create).
    async fn lock(&mut self, key: &str) -> StoreResult<()>;
    /// `lock` on several keys in one round trip, in a fixed global order (no lock cycles).
    async fn lock_all(&mut self, keys: &[String]) -> StoreResult<()>;
    async fn search_ids(&mut self, q: &SearchQuery) -> StoreResult<Vec<String>>;
    /// Write a new version; `version_id - 1` must still be the current one (1 = must not exist).
    async fn write(&mut self, v: &NewVersion) -> StoreResult<()>;
    /// Run the pre-commit hooks on what was written, then commit; what the hooks noted.
    async fn commit_noting(self: Box<Self>) -> StoreResult<Vec<Note>>;
    async fn commit(self: Box<Self>) -> StoreResult<()> {
        self.commit_noting().await.map(|_| ())
    }
    /// Send buffered writes to the database now (they are sent before any read and at commit anyway).
    async fn flush(&mut self) -> StoreResult<()>;
    /// Replace the search index rows of `v`'s resource with `v.index`, only while `v.version_id`
    /// is still its current version (else `false`: a newer write indexed it already).
    async fn replace_index(&mut self, v: &NewVersion) -> StoreResult<bool>;
    /// Remove for good (versions, history and index rows) up to `limit` resources of a type whose
    /// current version was written before `before` (µs); returns how many went. Only for records
    /// the server keeps for a set time (the audit trail), never for clinical data.
    async fn purge_before(
        &mut self,
        resource_type: &str,
        before: i64,
        limit: i64,
    ) -> StoreResult<u64>;

    // CRE surveillance state (migrations/*/0002_cre_cases.sql)
    async fn cre_isolate(&mut self, isolate_id: &str) -> StoreResult<Option<IsolateState>>;
    async fn cre_put_isolate(&mut self, s: &IsolateState) -> StoreResult<()>;
    /// Ids of every isolate recorded for `key`, meeting the definition now or not.
    async fn cre_isolates_of_key(&mut self, key: &CaseKey) -> StoreResult<Vec<String>>;
    async fn cre_active_case(&mut self, key: &CaseKey) -> StoreResult<Option<CaseRow>>;
    /// Insert a new active case unless one is already active for its key (then `false`). The unique
    /// index decides, so concurrent transactions and processes cannot both win.
    async fn cre_claim_case(&mut self, c: &CaseRow, created_at: i64) -> StoreResult<bool>;
    /// Up to `limit` active CRE cases whose id sorts after `after`, in order.
    async fn cre_active_cases_after(
        &mut self,
        after: &str,
        limit: i64,
    ) -> StoreResult<Vec<CaseRow>>;
    async fn cre_set_case(
        &mut self,
        case_id: &str,
        isolate_id: &str,
        active: bool,
    ) -> StoreResult<()>;

    // Subscriptions and their outbox (migrations/*/0003_subscriptions.sql)
    /// Create or redefine the delivery state of a Subscription from its resource. A subscription
    /// (re)set to requested or active is due at once, its failure count cleared.
    async fn sub_define(&mut self, row: &SubscriptionRow) -> StoreResult<()>;
    /// Subscriptions to `topic` that collect events (requested, active, error), with their resource.
    async fn sub_of_topic(&mut self, topic: &str) -> StoreResult<Vec<(SubscriptionRow, String)>>;
    /// Append an event to a subscription's outbox when the transaction commits: its number is the
    /// next one of that subscription.
    async fn sub_append_event(
        &mut self,
        subscription_id: &str,
        focus: &str,
        at: i64,
    ) -> StoreResult<()>;
    async fn sub_row(&mut self, id: &str) -> StoreResult<Option<SubscriptionRow>>;
    /// Lease up to `limit` due subscriptions to `owner` until `until` (skipping rows another
    /// process has locked on PostgreSQL): only the lease holder delivers, so events go out once,
    /// in order.
    async fn sub_claim(
        &mut self,
        owner: &str,
        now: i64,
        until: i64,
        limit: i64,
    ) -> StoreResult<Vec<String>>;
    /// Record a delivery attempt's outcome and release the lease.
    async fn sub_delivered(&mut self, id: &str, d: &DeliveryState) -> StoreResult<()>;
    /// Record acknowledged sends of a subscription this worker leases, leaving its status alone
    /// (a client may have changed it meanwhile): the delivered count and the last send only grow,
    /// the failures are forgotten when either grew, and the lease runs until `lease_until` (0
    /// gives it back; a lease already given back is not taken again).
    async fn sub_progress(
        &mut self,
        id: &str,
        delivered: i64,
        last_sent_at: i64,
        lease_until: i64,
    ) -> StoreResult<()>;
    async fn sub_events(
        &mut self,
        id: &str,
        from: i64,
        to: i64,
        limit: i64,
    ) -> StoreResult<Vec<EventRow>>;
    /// Give the events waiting in the outbox of a subscription their numbers, in the order they
    /// were appended; the new `events_count`. Only one transaction at a time numbers a subscription
    /// (its row is locked).
    async fn sub_number_events(&mut self, id: &str) -> StoreResult<i64>;
    /// Delete the delivered events of a subscription that occurred before `before` (µs); the new
    /// `pruned_count`.
    async fn sub_prune_events(&mut self, id: &str, before: i64) -> StoreResult<i64>;

    /// Record a case as the summaries count it (insert or replace by `case_id`).
    async fn register_case(&mut self, c: &RegisteredCase) -> StoreResult<()>;
    /// A case stands again or no more (no row: nothing to do).
    async fn register_set_active(&mut self, case_id: &str, active: bool) -> StoreResult<()>;

    // What rule sets remember between writes (migrations/*/0005_rule_state.sql): JSON records
    // under a key unique per rule set, found again by key or by tag (an indexed lookup key).
    async fn state_get(
        &mut self,
        rule_set: &str,
        key: &str,
    ) -> StoreResult<Option<serde_json::Value>>;
    /// Insert or replace a record; its tags replace the previous ones.
    async fn state_put(
        &mut self,
        rule_set: &str,
        key: &str,
        value: &serde_json::Value,
        tags: &[String],
    ) -> StoreResult<()>;
    /// Insert a record unless its key exists (then `false`): the primary key decides between
    /// racing transactions and processes.
    async fn state_claim(
        &mut self,
        rule_set: &str,
        key: &str,
        value: &serde_json::Value,
        tags: &[String],
    ) -> StoreResult<bool>;
    /// Up to `limit` keys of a rule set that start with `prefix` and sort after `after`, in order
    /// (a job walking every record in batches).
    async fn state_keys_after(
        &mut self,
        rule_set: &str,
        prefix: &str,
        after: &str,
        limit: i64,
    ) -> StoreResult<Vec<String>>;
    /// Every record carrying `tag`, with its key.
    async fn state_tagged(
        &mut self,
        rule_set: &str,
        tag: &str,
    ) -> StoreResult<Vec<(String, serde_json::Value)>>;
}

pub type SharedStore = Arc<dyn Store>;
