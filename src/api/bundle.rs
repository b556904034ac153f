//! `POST /` with a Bundle: `transaction` (all or nothing, one database transaction, `urn:uuid:`
//! references resolved, conditional entries honoured) or `batch` (each entry on its own).
use std::collections::HashMap;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};

use super::format::{BaseUrl, FhirBody, Prefer, ReturnPref, fhir_json, negotiate};
use super::interactions::{self, Written, conditional_match, parse_etag};
use super::responses::{bundle, entry_response, parse_body};
use super::write_task::Liveness;
use super::write_tx::WriteTx;
use super::{AppState, Caller};
use crate::error::{ApiError, ApiResult, Issue, operation_outcome};
use crate::fhir::resource::{for_each_reference, is_valid_id, parse_json, resource_type, validate};
use crate::fhir::schema::SchemaValidators;
use crate::store::Note;
use crate::surveillance::local_codes;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Method {
    // FHIR's processing order within a transaction
    Delete,
    Post,
    Put,
    Get,
}

#[derive(Debug)]
struct Entry {
    index: usize,
    method: Method,
    rt: String,
    /// Logical id from the URL (PUT/DELETE/GET `Type/id`), else assigned.
    id: Option<String>,
    /// `Type?query` of a conditional PUT / DELETE.
    conditional: Option<String>,
    if_none_exist: Option<String>,
    if_match: Option<i64>,
    full_url: Option<String>,
    resource: Option<Value>,
    /// A transaction's conditional POST already matched this existing resource.
    existing: bool,
    /// Unmapped local codes: the entry succeeds and its response carries them.
    warnings: Vec<Issue>,
}

/// An error located at an entry: its path is prefixed `Bundle.entry[i]`.
fn at_entry(index: usize, e: ApiError) -> ApiError {
    match e {
        ApiError::Invalid { .. } => e.within_entry(index),
        other => ApiError::Invalid {
            status: other.status(),
            issues: other
                .issues()
                .into_iter()
                .map(|mut i| {
                    i.expression = Some(format!("Bundle.entry[{index}]"));
                    i
                })
                .collect(),
        },
    }
}

fn entry_error(index: usize, msg: String, field: &str) -> ApiError {
    ApiError::invalid(vec![Issue::error(
        "invalid",
        msg,
        Some(format!("Bundle.entry[{index}].{field}")),
    )])
}

fn parse_entry(index: usize, e: &Value) -> ApiResult<Entry> {
    let req = &e["request"];
    let method = match req["method"].as_str() {
        Some("POST") => Method::Post,
        Some("PUT") => Method::Put,
        Some("DELETE") => Method::Delete,
        Some("GET") => Method::Get,
        Some(m) => {
            return Err(entry_error(
                index,
                format!("request.method {m} is not supported"),
                "request.method",
            ));
        }
        None => {
            return Err(entry_error(
                index,
                "request.method is required".into(),
                "request.method",
            ));
        }
    };
    let url = req["url"]
        .as_str()
        .ok_or_else(|| entry_error(index, "request.url is required".into(), "request.url"))?;
    let url = url.trim_start_matches('/');
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (url, None),
    };
    let mut segs = path.split('/');
    let rt = segs.next().unwrap_or_default().to_string();
    let id = segs.next().map(String::from);
    if segs.next().is_some() {
        return Err(entry_error(
            index,
            format!("request.url '{url}' is not Type, Type/id or Type?query"),
            "request.url",
        ));
    }
    super::require_type(&rt).map_err(|e| at_entry(index, e))?;
    if let Some(id) = &id
        && !is_valid_id(id)
    {
        return Err(entry_error(
            index,
            format!("'{id}' is not a valid id"),
            "request.url",
        ));
    }
    let resource = e.get("resource").cloned();
    match (method, &resource) {
        (Method::Post | Method::Put, None) => {
            return Err(entry_error(
                index,
                "a POST or PUT entry needs a resource".into(),
                "resource",
            ));
        }
        (Method::Post, Some(_)) if id.is_some() || query.is_some() => {
            return Err(entry_error(
                index,
                "a POST entry's request.url is the resource type".into(),
                "request.url",
            ));
        }
        (Method::Put | Method::Delete, _) if id.is_none() && query.is_none() => {
            return Err(entry_error(
                index,
                "PUT and DELETE need Type/id or Type?query".into(),
                "request.url",
            ));
        }
        _ => {}
    }
    if let Some(r) = &resource {
        let body_type = resource_type(r).map_err(|e| at_entry(index, e))?;
        if body_type != rt {
            return Err(entry_error(
                index,
                format!("the resource is a {body_type} but request.url names {rt}"),
                "resource",
            ));
        }
        if let (Method::Put, Some(id), Some(body_id)) =
            (method, &id, r.get("id").and_then(Value::as_str))
            && body_id != id
        {
            return Err(entry_error(
                index,
                format!("resource.id {body_id} differs from request.url id {id}"),
                "resource.id",
            ));
        }
    }
    let if_match = req["ifMatch"]
        .as_str()
        .map(parse_etag)
        .transpose()
        .map_err(|e| at_entry(index, e))?;
    let conditional = if method == Method::Post { None } else { query };
    Ok(Entry {
        index,
        method,
        rt,
        id,
        conditional,
        if_none_exist: req["ifNoneExist"].as_str().map(String::from),
        if_match,
        full_url: e["fullUrl"].as_str().map(String::from),
        resource,
        existing: false,
        warnings: Vec::new(),
    })
}

/// Validate the Bundle envelope (without its resources) and every entry's resource.
fn validate_bundle(b: &Value) -> ApiResult<Vec<Entry>> {
    let mut envelope = b.clone();
    if let Some(entries) = envelope.get_mut("entry").and_then(Value::as_array_mut) {
        for e in entries {
            if let Some(o) = e.as_object_mut() {
                o.shift_remove("resource");
            }
        }
    }
    let issues = SchemaValidators::get().validate(&envelope);
    if !issues.is_empty() {
        return Err(ApiError::invalid(issues));
    }
    let empty = vec![];
    let raw = b["entry"].as_array().unwrap_or(&empty);
    let mut entries = Vec::with_capacity(raw.len());
    let mut issues = Vec::new();
    let mut status = None;
    for (i, e) in raw.iter().enumerate() {
        let mut entry = parse_entry(i, e)?;
        if let Some(r) = &entry.resource {
            match validate(r) {
                Err(err) => {
                    status.get_or_insert(err.status());
                    issues.extend(at_entry(i, err).issues());
                }
                Ok(()) => entry.warnings = local_codes::warnings(r),
            }
        }
        entries.push(entry);
    }
    // bdl-7: a fullUrl names one entry (two versions of one resource aside), else the references
    // that use it could mean either
    let mut seen: HashMap<(&str, Option<&str>), usize> = HashMap::new();
    for (i, e) in raw.iter().enumerate() {
        let Some(url) = e["fullUrl"].as_str() else {
            continue;
        };
        let version = e["resource"]["meta"]["versionId"].as_str();
        if let Some(first) = seen.insert((url, version), i) {
            status.get_or_insert(StatusCode::BAD_REQUEST);
            issues.push(Issue::error(
                "invariant",
                format!("fullUrl {url} is also the fullUrl of entry {first} (bdl-7: a fullUrl is unique in a Bundle)"),
                Some(format!("Bundle.entry[{i}].fullUrl")),
            ));
        }
    }
    match status {
        None => Ok(entries),
        Some(status) => Err(ApiError::Invalid { status, issues }),
    }
}

/// What `$validate` reports for a Bundle: for a transaction or a batch, every check it would pass
/// before writing (envelope, each entry's resource, bdl-7, the entry limit) and the warnings its
/// entries would carry; for any other Bundle, the Bundle and its resources as resources.
pub fn validation_issues(b: &Value) -> Vec<Issue> {
    let entries = b["entry"].as_array().map_or(0, Vec::len);
    if entries > MAX_BUNDLE_ENTRIES {
        return vec![Issue::error(
            "too-costly",
            format!(
                "the Bundle has {entries} entries; at most {MAX_BUNDLE_ENTRIES} are processed in one request: split it"
            ),
            Some("Bundle.entry".into()),
        )];
    }
    match b["type"].as_str() {
        Some("transaction" | "batch") => match validate_bundle(b) {
            Ok(entries) => {
                let mut out = Vec::new();
                for (i, e) in entries.into_iter().enumerate() {
                    if e.resource
                        .as_ref()
                        .is_some_and(crate::surveillance::is_case_notification)
                    {
                        out.push(Issue::error(
                            "business-rule",
                            "case notifications (profile notifica-caso) are written by the surveillance rules only",
                            Some(format!("Bundle.entry[{i}].resource.meta.profile")),
                        ));
                    }
                    out.extend(e.warnings.into_iter().map(|w| w.within_entry(i)));
                }
                out
            }
            Err(e) => e.issues(),
        },
        _ => {
            let mut out = SchemaValidators::get().validate(b);
            for (i, e) in b["entry"].as_array().into_iter().flatten().enumerate() {
                let r = &e["resource"];
                if r["resourceType"]
                    .as_str()
                    .is_some_and(crate::fhir::is_served)
                    && let Err(err) = validate(r)
                {
                    out.extend(err.within_entry(i).issues());
                }
            }
            out
        }
    }
}

struct Done {
    status: &'static str,
    written: Option<Written>,
    location: bool,
    warnings: Vec<Issue>,
    /// A DELETE that removed a resource (deleting what is absent writes nothing).
    deleted: bool,
}

/// Run one entry (after ids are assigned and references resolved).
async fn execute(tx: &mut WriteTx, e: &mut Entry) -> ApiResult<Done> {
    let warnings = std::mem::take(&mut e.warnings);
    let done = |status, written, location| {
        Ok(Done {
            status,
            written,
            location,
            warnings,
            deleted: false,
        })
    };
    match e.method {
        Method::Post => {
            let id =
                e.id.clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            if e.existing {
                let stored = tx
                    .current(&e.rt, &id)
                    .await?
                    .ok_or_else(|| ApiError::NotFound(id.clone()))?;
                let stored = interactions::readable(tx, stored);
                return done(
                    "200 OK",
                    Some(Written {
                        stored,
                        created: false,
                    }),
                    false,
                );
            }
            let resource = e.resource.take().unwrap_or_default();
            let w = match &e.if_none_exist {
                Some(q) => interactions::create_if_none_exist(tx, resource, &id, q).await?,
                None => interactions::create(tx, resource, &id).await?,
            };
            let status = if w.created { "201 Created" } else { "200 OK" };
            let created = w.created;
            done(status, Some(w), created)
        }
        Method::Put => {
            let id = match (&e.id, &e.conditional) {
                (Some(id), _) => id.clone(),
                (None, Some(q)) => conditional_match(tx, &e.rt, q)
                    .await?
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                (None, None) => unreachable!("checked in parse_entry"),
            };
            let mut resource = e.resource.take().unwrap_or_default();
            resource["id"] = json!(id);
            let w = interactions::update(tx, resource, &id, e.if_match).await?;
            let status = if w.created { "201 Created" } else { "200 OK" };
            done(status, Some(w), true)
        }
        Method::Delete => {
            let id = match (&e.id, &e.conditional) {
                (Some(id), _) => Some(id.clone()),
                (None, Some(q)) => conditional_match(tx, &e.rt, q).await?,
                (None, None) => None,
            };
            let mut deleted = false;
            if let Some(id) = id {
                deleted = interactions::delete(tx, &e.rt, &id, e.if_match)
                    .await?
                    .is_some();
            }
            let mut d = done("204 No Content", None, false)?;
            d.deleted = deleted;
            Ok(d)
        }
        Method::Get => {
            let id = e.id.as_deref().ok_or_else(|| {
                ApiError::BadRequest(
                    "only reads (GET Type/id) are supported inside a Bundle; search with GET /Type"
                        .into(),
                )
            })?;
            let stored = tx.current(&e.rt, id).await?.filter(|s| !s.deleted);
            let stored =
                stored.ok_or_else(|| ApiError::NotFound(format!("{}/{id} is not known", e.rt)))?;
            tx.admit_read(&stored)?;
            done(
                "200 OK",
                Some(Written {
                    stored,
                    created: false,
                }),
                false,
            )
        }
    }
}

/// The rules' receipts about an entry's resource join its warnings (its `response.outcome`).
fn with_notes(mut d: Done, notes: &[Note]) -> Done {
    if let Some(w) = &d.written {
        d.warnings.extend(
            notes
                .iter()
                .filter(|n| n.resource_type == w.stored.resource_type && n.id == w.stored.id)
                .map(Issue::from_note),
        );
    }
    d
}

fn response_entry(d: &Done, prefer: Prefer, base: &BaseUrl) -> ApiResult<Value> {
    let entry = written_entry(d, prefer, base)?;
    Ok(with_warnings(entry, &d.warnings))
}

/// Warnings go in the entry's `response.outcome` (FHIR: an OperationOutcome about that entry).
fn with_warnings(mut entry: Value, warnings: &[Issue]) -> Value {
    if !warnings.is_empty() {
        entry["response"]["outcome"] = operation_outcome(warnings);
    }
    entry
}

fn written_entry(d: &Done, prefer: Prefer, base: &BaseUrl) -> ApiResult<Value> {
    let Some(w) = &d.written else {
        return Ok(json!({"response": {"status": d.status}}));
    };
    let s = &w.stored;
    let mut entry = json!({"fullUrl": format!("{}/{}/{}", base.0, s.resource_type, s.id)});
    if prefer.ret == ReturnPref::Representation && s.body.is_some() {
        entry["resource"] = parse_body(s)?;
    }
    entry["response"] = entry_response(d.status, s, base, d.location);
    Ok(entry)
}

pub async fn process(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    prefer: Prefer,
    base: BaseUrl,
    FhirBody(body): FhirBody,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    // parsing and validating a Bundle is CPU work: off the async workers
    let parsed = tokio::task::spawn_blocking(move || prepare(&body))
        .await
        .map_err(|_| ApiError::Internal("validation failed".into()))??;
    let st = state.clone();
    let out = match parsed {
        Prepared::Transaction(entries) => {
            state
                .writes
                .run(|live| async move { transaction(&st, &caller, &live, entries).await })
                .await?
        }
        Prepared::Batch(raw) => {
            state
                .writes
                .run(|live| async move { Ok(batch(&st, &caller, &live, raw).await) })
                .await?
        }
    };
    let (kind, out) = match out {
        Outcome::Transaction(results) => (
            "transaction-response",
            results
                .iter()
                .map(|d| response_entry(d, prefer, &base))
                .collect::<ApiResult<Vec<_>>>()?,
        ),
        Outcome::Batch(results) => (
            "batch-response",
            results
                .into_iter()
                .map(
                    |r| match r.and_then(|d| response_entry(&d, prefer, &base)) {
                        Ok(v) => v,
                        Err(err) => batch_error(&err),
                    },
                )
                .collect(),
        ),
    };
    Ok(fhir_json(StatusCode::OK, &bundle(kind, None, vec![], out)))
}

/// A Bundle ready for the database: a transaction's validated entries, or a batch's raw ones
/// (each is checked on its own: one bad entry does not stop the others).
enum Prepared {
    Transaction(Vec<Entry>),
    Batch(Vec<Value>),
}

enum Outcome {
    Transaction(Vec<Done>),
    Batch(Vec<ApiResult<Done>>),
}

/// The most entries one transaction or batch may hold: a transaction holds its locks (on SQLite, the
/// single writer) for all of them at once. A laboratory's antibiogram Bundle has a few dozen.
pub const MAX_BUNDLE_ENTRIES: usize = 1000;

fn prepare(body: &[u8]) -> ApiResult<Prepared> {
    let mut b = parse_json(body)?;
    let rt = resource_type(&b)?;
    if rt != "Bundle" {
        return Err(ApiError::invalid(vec![Issue::error(
            "invalid",
            format!("POST to the base takes a Bundle, not a {rt}"),
            Some("resourceType".into()),
        )]));
    }
    let entries = b["entry"].as_array().map_or(0, Vec::len);
    if entries > MAX_BUNDLE_ENTRIES {
        return Err(ApiError::invalid(vec![Issue::error(
            "too-costly",
            format!(
                "the Bundle has {entries} entries; at most {MAX_BUNDLE_ENTRIES} are processed in one request: split it"
            ),
            Some("Bundle.entry".into()),
        )]));
    }
    match b["type"].as_str() {
        Some("transaction") => Ok(Prepared::Transaction(validate_bundle(&b)?)),
        Some("batch") => Ok(Prepared::Batch(match b["entry"].take() {
            Value::Array(entries) => entries,
            _ => Vec::new(),
        })),
        other => Err(ApiError::unprocessable(vec![Issue::error(
            "not-supported",
            format!(
                "Bundle.type {} cannot be processed here: send a transaction or a batch",
                other.unwrap_or("(missing)")
            ),
            Some("Bundle.type".into()),
        )])),
    }
}

fn batch_error(err: &ApiError) -> Value {
    json!({"response": {
        "status": format!("{} {}", err.status().as_u16(), err.status().canonical_reason().unwrap_or("")),
        "outcome": err.outcome(),
    }})
}

async fn transaction(
    state: &AppState,
    caller: &Caller,
    live: &Liveness,
    mut entries: Vec<Entry>,
) -> ApiResult<Outcome> {
    let mut tx = state.begin(caller, live).await?;
    // 1. ids: POST entries get new ids (or the match of their ifNoneExist), conditional PUTs their match
    let mut ids: HashMap<String, String> = HashMap::new();
    for e in entries.iter_mut() {
        if e.method == Method::Post {
            let matched = match &e.if_none_exist {
                Some(q) => conditional_match(&mut tx, &e.rt, q)
                    .await
                    .map_err(|err| at_entry(e.index, err))?,
                None => None,
            };
            e.existing = matched.is_some();
            e.id = Some(matched.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()));
            // decided here, under this transaction's lock: execute must not search again
            e.if_none_exist = None;
        } else if e.method == Method::Put && e.id.is_none() {
            let q = e.conditional.clone().unwrap_or_default();
            let matched = conditional_match(&mut tx, &e.rt, &q)
                .await
                .map_err(|err| at_entry(e.index, err))?;
            e.id = Some(matched.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()));
        }
        if let (Some(full), Some(id)) = (&e.full_url, &e.id) {
            ids.insert(full.clone(), format!("{}/{id}", e.rt));
        }
    }
    // 2. references to other entries (urn:uuid:, or their fullUrl) become Type/id
    for e in entries.iter_mut() {
        let index = e.index;
        let rt = e.rt.clone();
        let Some(r) = e.resource.as_mut() else {
            continue;
        };
        let mut unresolved = Vec::new();
        for_each_reference(r, &rt, &mut |reference, path| {
            if let Some(target) = ids.get(reference.as_str()) {
                *reference = target.clone();
            } else if reference.starts_with("urn:uuid:") || reference.starts_with("urn:oid:") {
                unresolved.push(Issue::error(
                    "not-found",
                    format!("reference {reference} points to no entry of this Bundle"),
                    Some(path.to_string()),
                ));
            }
        });
        if !unresolved.is_empty() {
            return Err(ApiError::invalid(
                unresolved
                    .into_iter()
                    .map(|i| i.within_entry(index))
                    .collect(),
            ));
        }
    }
    // 3. execute in FHIR order: DELETE, POST, PUT, GET; a conditional POST that matched just reads
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| entries[i].method);
    let mut results: Vec<Option<Done>> = (0..entries.len()).map(|_| None).collect();
    for i in order {
        let e = &mut entries[i];
        let d = execute(&mut tx, e).await.map_err(|err| at_entry(i, err))?;
        results[i] = Some(d);
    }
    let notes = tx.commit().await?;
    for (e, d) in entries.iter().zip(&results) {
        if let Some(d) = d {
            count_written(e, d);
        }
    }
    crate::observability::metrics::bundle_written("transaction");
    Ok(Outcome::Transaction(
        results
            .into_iter()
            .map(|d| with_notes(d.expect("every entry ran"), &notes))
            .collect(),
    ))
}

/// Each entry in a transaction of its own; an entry's failure is its response, not the Bundle's.
async fn batch(state: &AppState, caller: &Caller, live: &Liveness, raw: Vec<Value>) -> Outcome {
    let mut out = Vec::with_capacity(raw.len());
    for (i, raw_entry) in raw.iter().enumerate() {
        out.push(
            async {
                let mut e = parse_entry(i, raw_entry)?;
                if let Some(r) = e.resource.as_mut() {
                    validate(r).map_err(|err| at_entry(i, err))?;
                    e.warnings = local_codes::warnings(r);
                    let mut dangling = None;
                    for_each_reference(r, "", &mut |reference, path| {
                        if reference.starts_with("urn:uuid:") && dangling.is_none() {
                            dangling = Some(path.to_string());
                        }
                    });
                    if let Some(path) = dangling {
                        return Err(entry_error(
                            i,
                            "a batch entry cannot reference another entry by urn:uuid".into(),
                            &format!("resource{path}"),
                        ));
                    }
                }
                let mut tx = state.begin(caller, live).await?;
                let d = execute(&mut tx, &mut e)
                    .await
                    .map_err(|err| at_entry(i, err))?;
                let notes = tx.commit().await?;
                count_written(&e, &d);
                Ok(with_notes(d, &notes))
            }
            .await,
        );
    }
    crate::observability::metrics::bundle_written("batch");
    Outcome::Batch(out)
}

/// Count a committed entry's write: a POST that matched an existing resource and a GET wrote
/// nothing; a PUT that created counts as a create.
fn count_written(e: &Entry, d: &Done) {
    let created = d.written.as_ref().is_some_and(|w| w.created);
    let interaction = match e.method {
        Method::Post if created => "create",
        Method::Put if created => "create",
        Method::Put => "update",
        Method::Delete if d.deleted => "delete",
        Method::Post | Method::Delete | Method::Get => return,
    };
    crate::observability::metrics::resources_written(&e.rt, interaction, 1);
}
