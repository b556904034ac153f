//! The write interactions (create, conditional create, update, delete) inside one database
//! transaction. Single requests and every Bundle entry go through these functions.
use serde_json::Value;

use super::search::{SearchRequest, parse_search};
use super::write_tx::WriteTx;
use crate::error::{ApiError, ApiResult, Issue};
use crate::fhir::datetime::now_micros;
use crate::fhir::resource::resource_type;
use crate::store::{Condition, Match, NewVersion, StoreError, StoredResource};
use crate::surveillance::is_case_notification;

/// A version the transaction wrote (or, for a conditional create that matched, found).
#[derive(Debug, Clone)]
pub struct Written {
    pub stored: StoredResource,
    /// 201 (created) rather than 200.
    pub created: bool,
}

fn new_version(
    resource: Value,
    rt: &str,
    id: &str,
    version_id: i64,
    method: &'static str,
) -> NewVersion {
    NewVersion::stamped(resource, rt, id, version_id, method)
}

fn stored_of(v: NewVersion) -> StoredResource {
    StoredResource {
        resource_type: v.resource_type,
        id: v.id,
        version_id: v.version_id,
        last_updated: v.last_updated,
        deleted: v.body.is_none(),
        body: v.body,
        method: v.method.to_string(),
    }
}

fn conflict(e: StoreError, if_match: bool) -> ApiError {
    match e {
        StoreError::VersionConflict { resource_type, id } if if_match => {
            ApiError::PreconditionFailed(format!(
                "{resource_type}/{id} was changed by another request"
            ))
        }
        StoreError::VersionConflict { resource_type, id } => ApiError::Conflict(format!(
            "{resource_type}/{id} was changed by another request at the same time: retry"
        )),
        other if other.is_conflict() => {
            ApiError::Conflict(format!("conflicting concurrent write: {other}"))
        }
        other => other.into(),
    }
}

/// Create a resource with the given (server-assigned) id.
/// Case notifications are the rules' output: a client cannot create, change or delete one.
fn refuse_case_notification(resource: &Value) -> ApiResult<()> {
    if is_case_notification(resource) {
        return Err(ApiError::unprocessable(vec![Issue::error(
            "business-rule",
            "case notifications (profile notifica-caso) are written by the surveillance rules only; \
             correct the evidence they rest on instead",
            Some("Communication.meta.profile".into()),
        )]));
    }
    Ok(())
}

fn refuse_stored_case_notification(current: Option<&StoredResource>) -> ApiResult<()> {
    match current.and_then(|c| c.body.as_deref()) {
        Some(body) => match serde_json::from_str::<Value>(body) {
            Ok(v) => refuse_case_notification(&v),
            Err(_) => Ok(()),
        },
        None => Ok(()),
    }
}

pub async fn create(tx: &mut WriteTx, mut resource: Value, id: &str) -> ApiResult<Written> {
    let rt = resource_type(&resource)?.to_string();
    refuse_case_notification(&resource)?;
    tx.admit(&rt, Some(&mut resource), None)?;
    let v = new_version(resource, &rt, id, 1, "POST");
    tx.write(&v).await.map_err(|e| conflict(e, false))?;
    Ok(Written {
        stored: stored_of(v),
        created: true,
    })
}

/// The locks of a conditional search, by what it means rather than how it is written: every exact
/// value it names, per parameter, without the system (`identifier=sys|v` and `identifier=v` can match
/// the same resource, so they must queue behind each other), or the type when it names none.
fn match_locks(rt: &str, conditions: &[Condition]) -> Vec<String> {
    let mut keys = Vec::new();
    for c in conditions {
        match c {
            Condition::Id(ids) => keys.extend(ids.iter().map(|id| format!("{rt}?_id={id}"))),
            Condition::Index {
                param,
                any_of,
                negate: false,
            } => {
                for m in any_of {
                    let value = match m {
                        Match::Exact { value, .. } | Match::AnyTypeId(value) => value,
                        _ => continue,
                    };
                    // a reference may be written Type/id or id
                    let value = value.rsplit('/').next().unwrap_or(value).to_lowercase();
                    keys.push(format!("{rt}?{param}={value}"));
                }
            }
            _ => {}
        }
    }
    if keys.is_empty() {
        keys.push(format!("{rt}?"));
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Resolve the search of a conditional interaction: none, exactly one, or a 412 for several.
/// The lock makes two identical conditional creates run one after the other, on every backend.
pub async fn conditional_match(
    tx: &mut WriteTx,
    rt: &str,
    query: &str,
) -> ApiResult<Option<String>> {
    let request = SearchRequest::from_query(query);
    let mut parsed = parse_search(rt, &request, false)?;
    // two matches are enough to know there is more than one
    parsed.query.count = 2;
    if parsed.query.conditions.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "the conditional search '{query}' has no search criteria"
        )));
    }
    let keys = match_locks(rt, &parsed.query.conditions);
    parsed.query.conditions.extend(tx.scope(rt));
    tx.lock_all(&keys).await?;
    let ids = tx.search_ids(&parsed.query).await?;
    match ids.len() {
        0 => Ok(None),
        1 => Ok(ids.into_iter().next()),
        _ => Err(ApiError::PreconditionFailed(format!(
            "the conditional search '{rt}?{query}' matches more than one resource"
        ))),
    }
}

/// A matched resource the caller may not read is answered without its body (the match stands:
/// nothing is created twice, but nothing is disclosed either).
pub fn readable(tx: &WriteTx, mut stored: StoredResource) -> StoredResource {
    if tx.admit_read(&stored).is_err() {
        stored.body = None;
    }
    stored
}

/// Conditional create: the existing match, or a new resource.
pub async fn create_if_none_exist(
    tx: &mut WriteTx,
    resource: Value,
    id: &str,
    query: &str,
) -> ApiResult<Written> {
    let rt = resource_type(&resource)?.to_string();
    match conditional_match(tx, &rt, query).await? {
        Some(existing) => {
            let stored = tx
                .current(&rt, &existing)
                .await?
                .ok_or_else(|| ApiError::NotFound(existing.clone()))?;
            Ok(Written {
                stored: readable(tx, stored),
                created: false,
            })
        }
        None => create(tx, resource, id).await,
    }
}

/// Update (or create with a client-assigned id). `if_match` is the version the client saw.
pub async fn update(
    tx: &mut WriteTx,
    mut resource: Value,
    id: &str,
    if_match: Option<i64>,
) -> ApiResult<Written> {
    let rt = resource_type(&resource)?.to_string();
    refuse_case_notification(&resource)?;
    let current = tx.current(&rt, id).await?;
    if rt == "Communication" {
        refuse_stored_case_notification(current.as_ref())?;
    }
    tx.admit_revival(&rt, id, current.as_ref()).await?;
    tx.admit(&rt, Some(&mut resource), current.as_ref())?;
    if let Some(expected) = if_match {
        match &current {
            Some(c) if c.version_id == expected && !c.deleted => {}
            Some(c) => {
                return Err(ApiError::PreconditionFailed(format!(
                    "If-Match W/\"{expected}\" does not match the current version {} of {rt}/{id}",
                    c.version_id
                )));
            }
            None => {
                return Err(ApiError::PreconditionFailed(format!(
                    "{rt}/{id} does not exist (If-Match given)"
                )));
            }
        }
    }
    let created = current.as_ref().is_none_or(|c| c.deleted);
    let version = current.map_or(1, |c| c.version_id + 1);
    let v = new_version(resource, &rt, id, version, "PUT");
    tx.write(&v)
        .await
        .map_err(|e| conflict(e, if_match.is_some()))?;
    Ok(Written {
        stored: stored_of(v),
        created,
    })
}

/// Delete: a tombstone version. Deleting what is absent or already deleted changes nothing.
pub async fn delete(
    tx: &mut WriteTx,
    rt: &str,
    id: &str,
    if_match: Option<i64>,
) -> ApiResult<Option<StoredResource>> {
    let Some(current) = tx.current(rt, id).await? else {
        return match if_match {
            Some(_) => Err(ApiError::PreconditionFailed(format!(
                "{rt}/{id} does not exist (If-Match given)"
            ))),
            None => Ok(None),
        };
    };
    if current.deleted {
        return Ok(None);
    }
    if rt == "Communication" {
        refuse_stored_case_notification(Some(&current))?;
    }
    tx.admit(rt, None, Some(&current))?;
    if let Some(expected) = if_match
        && expected != current.version_id
    {
        return Err(ApiError::PreconditionFailed(format!(
            "If-Match W/\"{expected}\" does not match the current version {} of {rt}/{id}",
            current.version_id
        )));
    }
    let v = NewVersion {
        resource_type: rt.to_string(),
        id: id.to_string(),
        version_id: current.version_id + 1,
        last_updated: now_micros(),
        body: None,
        method: "DELETE",
        index: vec![],
        resource: None,
    };
    tx.write(&v)
        .await
        .map_err(|e| conflict(e, if_match.is_some()))?;
    Ok(Some(stored_of(v)))
}

/// Parse an `If-Match` value (`W/"3"`, `"3"` or `3`).
pub fn parse_etag(v: &str) -> ApiResult<i64> {
    let t = v.trim().trim_start_matches("W/").trim_matches('"');
    t.parse().map_err(|_| {
        ApiError::BadRequest(format!("If-Match '{v}' is not a version ETag like W/\"3\""))
    })
}
