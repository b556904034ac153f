//! What differs between the two databases, one small module each: how a batch of rows is written
//! in one statement, and how advisory locks are taken. Everything else is shared SQL (`sql.rs`).
pub mod postgres;
pub mod sqlite;

use crate::fhir::search_params::{IndexEntry, IndexValue};

use super::NewVersion;

/// One search-index row: (resource type, id, entry).
pub type IndexRow<'a> = (&'a str, &'a str, &'a IndexEntry);

/// The index rows of some versions.
pub fn index_rows(versions: &[NewVersion]) -> Vec<IndexRow<'_>> {
    versions
        .iter()
        .flat_map(|v| {
            v.index
                .iter()
                .map(move |e| (v.resource_type.as_str(), v.id.as_str(), e))
        })
        .collect()
}

/// The (system, value, lo, hi) columns of an index entry.
pub fn columns(e: &IndexEntry) -> (Option<&str>, Option<&str>, Option<i64>, Option<i64>) {
    match &e.value {
        IndexValue::Text { system, value } => (system.as_deref(), Some(value), None, None),
        IndexValue::Date(r) => (None, None, Some(r.start), Some(r.end)),
    }
}
