//! Single-resource interactions: create, read, vread, update, delete. (PATCH is `patch.rs`, on the
//! same write path as update.)
use std::borrow::Cow;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::format::{BaseUrl, FhirBody, Prefer, negotiate};
use super::interactions::{self, Written, parse_etag};
use super::responses::{parse_body, resource_response};
use super::summary::Shape;
use super::{AppState, Caller};
use crate::error::{ApiError, ApiResult, Issue};
use crate::fhir::resource::{is_valid_id, parse_json, resource_type, validate};
use crate::store::{Note, StoredResource};
use crate::surveillance::local_codes;

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(super) fn if_match(headers: &HeaderMap) -> ApiResult<Option<i64>> {
    header(headers, "if-match").map(parse_etag).transpose()
}

/// Parse and validate a body for `rt` on a blocking thread (CPU work: the async workers keep
/// serving); the type in the body must be the one in the URL.
async fn read_resource(rt: &str, body: bytes::Bytes) -> ApiResult<serde_json::Value> {
    let rt = rt.to_string();
    tokio::task::spawn_blocking(move || parse_and_validate(&rt, &body))
        .await
        .map_err(|_| ApiError::Internal("validation failed".into()))?
}

fn parse_and_validate(rt: &str, body: &[u8]) -> ApiResult<serde_json::Value> {
    let resource = parse_json(body)?;
    let body_type = resource_type(&resource)?;
    if body_type != rt {
        return Err(ApiError::invalid(vec![Issue::error(
            "invalid",
            format!("the body is a {body_type} but the URL names {rt}"),
            Some("resourceType".into()),
        )]));
    }
    validate(&resource)?;
    Ok(resource)
}

/// The response to a write: 201 for a creation, 200 otherwise, with the body `Prefer` asks for;
/// unmapped local codes are logged and, with `Prefer: return=OperationOutcome`, returned.
/// The rules' receipts about the written resource join the warnings.
pub(super) fn with_notes(
    mut warnings: Vec<Issue>,
    notes: &[Note],
    written: &Written,
) -> Vec<Issue> {
    warnings.extend(
        notes
            .iter()
            .filter(|n| {
                n.resource_type == written.stored.resource_type && n.id == written.stored.id
            })
            .map(Issue::from_note),
    );
    warnings
}

/// Count a committed write (`interaction`, or `create` when it created the resource).
pub(super) fn count_written(written: &Written, interaction: &'static str) {
    let interaction = if written.created {
        "create"
    } else {
        interaction
    };
    crate::observability::metrics::resources_written(&written.stored.resource_type, interaction, 1);
}

pub(super) fn write_response(
    written: &Written,
    prefer: Prefer,
    base: &BaseUrl,
    location: bool,
    warnings: &[Issue],
) -> Response {
    for w in warnings {
        tracing::info!(resource = %format!("{}/{}", written.stored.resource_type, written.stored.id),
            expression = w.expression.as_deref().unwrap_or_default(), "{}", w.diagnostics);
    }
    let status = if written.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    resource_response(status, &written.stored, prefer, base, location, warnings)
}

#[allow(clippy::too_many_arguments)] // an axum handler: one argument per extractor
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(rt): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    prefer: Prefer,
    base: BaseUrl,
    FhirBody(body): FhirBody,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    super::require_type(&rt)?;
    let resource = read_resource(&rt, body).await?;
    let warnings = local_codes::warnings(&resource);
    let id = uuid::Uuid::new_v4().to_string();
    let if_none_exist = header(&headers, "if-none-exist").map(String::from);
    let st = state.clone();
    let (written, notes) = state
        .writes
        .run(|live| async move {
            let mut tx = st.begin(&caller, &live).await?;
            let written = match if_none_exist {
                Some(q) => interactions::create_if_none_exist(&mut tx, resource, &id, &q).await?,
                None => interactions::create(&mut tx, resource, &id).await?,
            };
            let notes = tx.commit().await?;
            Ok((written, notes))
        })
        .await?;
    // a conditional create that matched wrote nothing
    if written.created {
        count_written(&written, "create");
    }
    let warnings = with_notes(warnings, &notes, &written);
    let location = written.created;
    Ok(write_response(&written, prefer, &base, location, &warnings))
}

pub async fn read(
    State(state): State<AppState>,
    caller: Caller,
    Path((rt, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    base: BaseUrl,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    super::require_type(&rt)?;
    let shape = Shape::for_instance(&rt, query.as_deref())?;
    let stored = state
        .store
        .read(&rt, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("{rt}/{id} is not known")))?;
    caller.check_sees(&stored)?;
    if stored.deleted {
        return Err(ApiError::Gone(format!(
            "{rt}/{id} was deleted (version {})",
            stored.version_id
        )));
    }
    if header(&headers, "if-none-match")
        .is_some_and(|v| v.trim_start_matches("W/") == format!("\"{}\"", stored.version_id))
    {
        let mut r = Response::new(axum::body::Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        return Ok(r);
    }
    Ok(resource_response(
        StatusCode::OK,
        &*shaped(&stored, &shape)?,
        Prefer::default(),
        &base,
        false,
        &[],
    ))
}

/// A stored version in the shape `_summary` / `_elements` asked for (the stored text itself when
/// whole: its decimals and key order are the sender's).
fn shaped<'a>(stored: &'a StoredResource, shape: &Shape) -> ApiResult<Cow<'a, StoredResource>> {
    if shape.is_full() || stored.body.is_none() {
        return Ok(Cow::Borrowed(stored));
    }
    let body = shape.apply(&parse_body(stored)?);
    let text = serde_json::to_string(&body)
        .map_err(|e| ApiError::Internal(format!("a subset could not be written: {e}")))?;
    Ok(Cow::Owned(StoredResource {
        body: Some(text),
        ..stored.clone()
    }))
}

pub async fn vread(
    State(state): State<AppState>,
    caller: Caller,
    Path((rt, id, vid)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    base: BaseUrl,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    super::require_type(&rt)?;
    let shape = Shape::for_instance(&rt, query.as_deref())?;
    let v: i64 = vid
        .parse()
        .map_err(|_| ApiError::NotFound(format!("{rt}/{id}/_history/{vid}: no such version")))?;
    let stored = state
        .store
        .read_version(&rt, &id, v)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("{rt}/{id}/_history/{vid} is not known")))?;
    caller.check_sees(&stored)?;
    if stored.deleted {
        return Err(ApiError::Gone(format!(
            "{rt}/{id} version {v} is a deletion"
        )));
    }
    Ok(resource_response(
        StatusCode::OK,
        &*shaped(&stored, &shape)?,
        Prefer::default(),
        &base,
        false,
        &[],
    ))
}

#[allow(clippy::too_many_arguments)] // an axum handler: one argument per extractor
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path((rt, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    prefer: Prefer,
    base: BaseUrl,
    FhirBody(body): FhirBody,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    super::require_type(&rt)?;
    if !is_valid_id(&id) {
        return Err(ApiError::BadRequest(format!(
            "'{id}' is not a valid FHIR id"
        )));
    }
    let resource = read_resource(&rt, body).await?;
    let warnings = local_codes::warnings(&resource);
    match resource.get("id").and_then(|v| v.as_str()) {
        Some(body_id) if body_id == id => {}
        Some(body_id) => {
            return Err(ApiError::invalid(vec![Issue::error(
                "invalid",
                format!("the id in the body ({body_id}) differs from the id in the URL ({id})"),
                Some(format!("{rt}.id")),
            )]));
        }
        None => {
            return Err(ApiError::invalid(vec![Issue::error(
                "required",
                format!("an update must carry the id in the body (expected {id})"),
                Some(format!("{rt}.id")),
            )]));
        }
    }
    let expected = if_match(&headers)?;
    let st = state.clone();
    let (written, notes) = state
        .writes
        .run(|live| async move {
            let mut tx = st.begin(&caller, &live).await?;
            let written = interactions::update(&mut tx, resource, &id, expected).await?;
            let notes = tx.commit().await?;
            Ok((written, notes))
        })
        .await?;
    count_written(&written, "update");
    let warnings = with_notes(warnings, &notes, &written);
    Ok(write_response(&written, prefer, &base, true, &warnings))
}

pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((rt, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    // an answer the client cannot take is refused before anything is changed
    negotiate(&headers, query.as_deref())?;
    super::require_type(&rt)?;
    let expected = if_match(&headers)?;
    let st = state.clone();
    let counted = rt.clone();
    let deleted = state
        .writes
        .run(|live| async move {
            let mut tx = st.begin(&caller, &live).await?;
            let deleted = interactions::delete(&mut tx, &rt, &id, expected).await?;
            tx.commit().await?;
            Ok(deleted)
        })
        .await?;
    // deleting what is not there (or is deleted already) writes nothing
    crate::observability::metrics::resources_written(
        &counted,
        "delete",
        u64::from(deleted.is_some()),
    );
    let mut r = Response::new(axum::body::Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    if let Some(d) = deleted
        && let Ok(v) = axum::http::HeaderValue::from_str(&super::responses::etag(d.version_id))
    {
        r.headers_mut().insert(axum::http::header::ETAG, v);
    }
    Ok(r)
}

/// `PUT /{type}?query`: update the one match, create when there is none, 412 for several.
#[allow(clippy::too_many_arguments)] // an axum handler: one argument per extractor
pub async fn conditional_update(
    State(state): State<AppState>,
    caller: Caller,
    Path(rt): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    prefer: Prefer,
    base: BaseUrl,
    FhirBody(body): FhirBody,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    super::require_type(&rt)?;
    let q = query.unwrap_or_default();
    let mut resource = read_resource(&rt, body).await?;
    let warnings = local_codes::warnings(&resource);
    let expected = if_match(&headers)?;
    let st = state.clone();
    let (written, notes) = state
        .writes
        .run(|live| async move {
            let mut tx = st.begin(&caller, &live).await?;
            let body_id = resource
                .get("id")
                .and_then(|v| v.as_str())
                .map(String::from);
            let id = match interactions::conditional_match(&mut tx, &rt, &q).await? {
                Some(id) => id,
                // no match: a client-chosen id in the body is honoured, as for update-as-create
                None => body_id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            };
            if let Some(body_id) = body_id
                && body_id != id
            {
                return Err(ApiError::invalid(vec![Issue::error(
                    "invalid",
                    format!(
                        "the id in the body ({body_id}) is not the id of the matching resource ({id})"
                    ),
                    Some(format!("{rt}.id")),
                )]));
            }
            resource["id"] = serde_json::json!(id);
            let written = interactions::update(&mut tx, resource, &id, expected).await?;
            let notes = tx.commit().await?;
            Ok((written, notes))
        })
        .await?;
    count_written(&written, "update");
    let warnings = with_notes(warnings, &notes, &written);
    Ok(write_response(&written, prefer, &base, true, &warnings))
}

/// `DELETE /{type}?query`: delete the one match (none: nothing to do; several: 412).
pub async fn conditional_delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(rt): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    super::require_type(&rt)?;
    let q = query.unwrap_or_default();
    let st = state.clone();
    let counted = rt.clone();
    let deleted = state
        .writes
        .run(|live| async move {
            let mut tx = st.begin(&caller, &live).await?;
            let mut deleted = None;
            if let Some(id) = interactions::conditional_match(&mut tx, &rt, &q).await? {
                deleted = interactions::delete(&mut tx, &rt, &id, None).await?;
            }
            tx.commit().await?;
            Ok(deleted)
        })
        .await?;
    crate::observability::metrics::resources_written(
        &counted,
        "delete",
        u64::from(deleted.is_some()),
    );
    let mut r = Response::new(axum::body::Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}
