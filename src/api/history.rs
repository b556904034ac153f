//! `_history` at instance, type and system level, with `_count`, `_since`, `_summary` and
//! `_elements`; the `self` link states them all, so following it gives the same page.
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};

use super::format::{BaseUrl, Format, fhir_json, format_in_query, format_param, negotiate};
use super::responses::{bundle, bundle_entry_json, entry_response};
use super::search::SearchRequest;
use super::summary::Shape;
use super::{AppState, Caller};
use crate::error::{ApiError, ApiResult, Issue};
use crate::fhir::datetime::parse_range;
use crate::store::HistoryQuery;

struct Params {
    count: i64,
    offset: i64,
    /// The instant, and the value as given (for the links).
    since: Option<(i64, String)>,
    shape: Shape,
    format: Option<Format>,
}

impl Params {
    /// The parameters of this history at `offset`, in a stable form.
    fn link_params(&self, offset: i64) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        if let Some((_, since)) = &self.since {
            pairs.push(("_since".to_string(), since.clone()));
        }
        pairs.extend(self.shape.params());
        if !self.shape.is_count() {
            pairs.push(("_count".into(), self.count.to_string()));
            pairs.push(("_offset".into(), offset.to_string()));
        }
        if let Some(f) = self.format {
            pairs.push(("_format".into(), f.param().into()));
        }
        pairs
    }
}

fn parse_params(rt: Option<&str>, query: Option<&str>) -> ApiResult<Params> {
    let shape = match rt {
        Some(rt) => Shape::from_query(rt, query)?,
        None => Shape::for_any_type(query)?,
    };
    // (the first `_format`, as the answer is written in: `format::wanted_format`)
    let format = format_in_query(query).and_then(|f| format_param(&f).ok());
    let (mut count, mut offset, mut since) = (50i64, 0i64, None);
    for (k, v) in SearchRequest::from_query(query.unwrap_or("")).pairs {
        let bad =
            |m: String| ApiError::invalid(vec![Issue::error("processing", m, Some(k.clone()))]);
        match k.as_str() {
            "_count" => {
                count = v
                    .parse::<i64>()
                    .map_err(|_| bad(format!("_count '{v}' is not a number")))?
                    .clamp(1, 1000)
            }
            "_offset" => {
                offset = v
                    .parse::<i64>()
                    .map_err(|_| bad(format!("_offset '{v}' is not a number")))?
                    .max(0);
                if offset > super::search::MAX_OFFSET {
                    return Err(bad(super::search::too_deep(offset)));
                }
            }
            "_since" => {
                let at = parse_range(&v)
                    .ok_or_else(|| bad(format!("_since '{v}' is not a valid instant")))?
                    .start;
                since = Some((at, v.clone()));
            }
            // checked by `Shape` above
            _ if matches!(k.split(':').next(), Some("_summary" | "_elements")) => {}
            "_format" | "_pretty" => {}
            other => {
                return Err(bad(format!(
                    "unknown _history parameter '{other}' (supported: _count, _since, _summary, _elements)"
                )));
            }
        }
    }
    Ok(Params {
        count,
        offset,
        since,
        shape,
        format,
    })
}

async fn history(
    state: &AppState,
    base: &BaseUrl,
    rt: Option<String>,
    id: Option<String>,
    query: Option<&str>,
) -> ApiResult<Response> {
    let params = parse_params(rt.as_deref(), query)?;
    let (count, offset) = (params.count, params.offset);
    let q = HistoryQuery {
        // the whole system's history is of the data, not of who looked at it
        except_type: rt.is_none().then(|| crate::auth::AUDIT_TYPE.to_string()),
        resource_type: rt.clone(),
        id: id.clone(),
        since: params.since.as_ref().map(|(at, _)| *at),
        // `_summary=count`: the total only
        count: if params.shape.is_count() { 0 } else { count },
        offset,
    };
    let (versions, total) = state.store.history(&q).await?;
    if let (Some(rt), Some(id), 0) = (&rt, &id, total) {
        return Err(ApiError::NotFound(format!("{rt}/{id} is not known")));
    }
    let mut entries = Vec::with_capacity(versions.len());
    for v in &versions {
        let mut e = bundle_entry_json(base, v, None)?;
        if !params.shape.is_full()
            && let Some(r) = e.get_mut("resource")
        {
            *r = params.shape.apply(r);
        }
        let url = match v.method.as_str() {
            "POST" => v.resource_type.clone(),
            _ => format!("{}/{}", v.resource_type, v.id),
        };
        e["request"] = json!({"method": v.method, "url": url});
        let status = match v.method.as_str() {
            "POST" => "201 Created",
            "DELETE" => "204 No Content",
            _ if v.version_id == 1 => "201 Created",
            _ => "200 OK",
        };
        e["response"] = entry_response(status, v, base, false);
        entries.push(e);
    }
    let path = match (&rt, &id) {
        (Some(rt), Some(id)) => format!("{rt}/{id}/_history"),
        (Some(rt), None) => format!("{rt}/_history"),
        _ => "_history".into(),
    };
    let link = |o: i64| -> Value {
        json!(format!(
            "{}/{path}?{}",
            base.0,
            SearchRequest::encode(&params.link_params(o))
        ))
    };
    let mut links = vec![json!({"relation": "self", "url": link(offset)})];
    // `_summary=count` has no pages to link to
    if !params.shape.is_count() {
        if offset + count < total {
            links.push(json!({"relation": "next", "url": link(offset + count)}));
        }
        if offset > 0 {
            links.push(json!({"relation": "previous", "url": link((offset - count).max(0))}));
        }
    }
    Ok(fhir_json(
        StatusCode::OK,
        &bundle("history", Some(total), links, entries),
    ))
}

pub async fn instance(
    State(state): State<AppState>,
    caller: Caller,
    Path((rt, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    base: BaseUrl,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    super::require_type(&rt)?;
    // the history of a resource the caller may not see does not exist for it
    if let Some(current) = state.store.read(&rt, &id).await? {
        let mut latest = current;
        if latest.deleted
            && let Some(v) = state
                .store
                .read_version(&rt, &id, latest.version_id - 1)
                .await?
        {
            latest = v;
        }
        caller.check_sees(&latest)?;
    }
    history(&state, &base, Some(rt), Some(id), query.as_deref()).await
}

pub async fn type_level(
    State(state): State<AppState>,
    caller: Caller,
    Path(rt): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    base: BaseUrl,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    super::require_type(&rt)?;
    if caller.0.scope(&rt).is_some() {
        return Err(ApiError::Forbidden(format!(
            "the history of every {rt} is not available to client '{}': search within your scope",
            caller.0.id
        )));
    }
    history(&state, &base, Some(rt), None, query.as_deref()).await
}

pub async fn system(
    State(state): State<AppState>,
    // the middleware allows system history only to clients that may read everything
    _caller: Caller,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    base: BaseUrl,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    history(&state, &base, None, None, query.as_deref()).await
}
