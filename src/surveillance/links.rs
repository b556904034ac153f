//! Reading linked resources inside the write transaction: the engine sees the request's own
//! uncommitted writes and everything committed before it.
use serde_json::Value;

use crate::fhir::fhirpath::split_reference;
use crate::store::{Condition, Match, SearchQuery, StoreResult, StoreTx, SystemMatch};

/// The current, not deleted, version of `Type/id`, parsed.
pub async fn read(tx: &mut dyn StoreTx, rt: &str, id: &str) -> StoreResult<Option<Value>> {
    Ok(tx
        .current(rt, id)
        .await?
        .filter(|s| !s.deleted)
        .and_then(|s| s.body)
        .and_then(|b| serde_json::from_str(&b).ok()))
}

/// Follow a Reference element to a resource of type `rt`.
pub async fn follow(
    tx: &mut dyn StoreTx,
    reference: &Value,
    rt: &str,
) -> StoreResult<Option<(String, Value)>> {
    match target(reference, rt) {
        Some(id) => Ok(read(tx, rt, &id).await?.map(|v| (id, v))),
        None => Ok(None),
    }
}

/// The id a Reference element points to, when it points to a resource of type `rt`.
pub fn target(reference: &Value, rt: &str) -> Option<String> {
    let r = reference.get("reference")?.as_str()?;
    let (t, id) = split_reference(r)?;
    (t == rt).then(|| id.to_string())
}

/// The ids a list of References (`hasMember`, `result`, …) points to, of type `rt`.
pub fn targets(list: &Value, rt: &str) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| target(r, rt))
        .collect()
}

/// Ids of `source_type` resources whose reference parameter `param` points at `target` (`Type/id`),
/// through the search index.
pub async fn referencing(
    tx: &mut dyn StoreTx,
    source_type: &str,
    param: &str,
    target: &str,
) -> StoreResult<Vec<String>> {
    let q = SearchQuery {
        resource_type: source_type.to_string(),
        conditions: vec![Condition::Index {
            param: param.to_string(),
            any_of: vec![Match::Exact {
                value: target.to_string(),
                system: SystemMatch::Any,
            }],
            negate: false,
        }],
        count: 1000,
        ..Default::default()
    };
    tx.search_ids(&q).await
}
