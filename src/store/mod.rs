//! Versioned resource storage: one trait, a SQLite and a PostgreSQL implementation sharing their SQL
//! (`sql.rs`), search queries compiled to SQL in `query.rs`.
mod group_commit;
pub mod query;
mod sql;

use std::sync::Arc;

use async_trait::async_trait;

pub use query::{Condition, Match, SearchQuery, Sort, SystemMatch};
pub use sql::connect;

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
    #[error("unsupported database URL '{0}': use sqlite://PATH or postgres://…")]
    BadUrl(String),
}

impl StoreError {
    pub fn is_conflict(&self) -> bool {
        match self {
            StoreError::VersionConflict { .. } => true,
            StoreError::Database(sqlx::Error::Database(e)) => e.is_unique_violation(),
            _ => false,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

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

#[async_trait]
pub trait Store: Send + Sync {
    fn backend(&self) -> &'static str;
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
}

/// A database transaction: everything written through it commits together or not at all.
#[async_trait]
pub trait StoreTx: Send {
    async fn current(
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
    async fn commit(self: Box<Self>) -> StoreResult<()>;
    /// Send buffered writes to the database now (they are sent before any read and at commit anyway).
    async fn flush(&mut self) -> StoreResult<()>;

    // CRE surveillance state (migrations/*/0002_cre_cases.sql)
    async fn cre_isolate(&mut self, isolate_id: &str) -> StoreResult<Option<IsolateState>>;
    async fn cre_put_isolate(&mut self, s: &IsolateState) -> StoreResult<()>;
    /// Ids of every isolate recorded for `key`, meeting the definition now or not.
    async fn cre_isolates_of_key(&mut self, key: &CaseKey) -> StoreResult<Vec<String>>;
    async fn cre_active_case(&mut self, key: &CaseKey) -> StoreResult<Option<CaseRow>>;
    /// Insert a new active case unless one is already active for its key (then `false`). The unique
    /// index decides, so concurrent transactions and processes cannot both win.
    async fn cre_claim_case(&mut self, c: &CaseRow, created_at: i64) -> StoreResult<bool>;
    async fn cre_set_case(
        &mut self,
        case_id: &str,
        isolate_id: &str,
        active: bool,
    ) -> StoreResult<()>;
}

pub type SharedStore = Arc<dyn Store>;
