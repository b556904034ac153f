//! The conformance resources over HTTP: read and search, nothing else (writes answer 405: they are
//! data of the repository, versioned there).
use axum::extract::{MatchedPath, Path, RawQuery};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};

use super::format::{BaseUrl, Prefer, fhir_json, negotiate};
use crate::conformance::Conformance;
use crate::conformance::search::{ConformanceQuery, SearchError};
use crate::error::{ApiError, ApiResult, Issue};

impl From<SearchError> for ApiError {
    fn from(e: SearchError) -> ApiError {
        let at = match &e {
            SearchError::Unknown(name, ..) => name.clone(),
            SearchError::Invalid { param, .. } => param.clone(),
        };
        let code = match e {
            SearchError::Unknown(..) => "not-supported",
            SearchError::Invalid { .. } => "invalid",
        };
        ApiError::invalid(vec![Issue::error(
            code,
            e.to_string(),
            (!at.is_empty()).then_some(at),
        )])
    }
}

/// The conformance type a route serves: its first segment below `/fhir`.
fn routed_type(matched: &MatchedPath) -> String {
    matched
        .as_str()
        .trim_start_matches("/fhir/")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string()
}

pub async fn read(
    matched: MatchedPath,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let rt = routed_type(&matched);
    let shape = super::summary::Shape::for_instance(&rt, query.as_deref())?;
    match Conformance::get().read(&rt, &id) {
        Some(r) => Ok(fhir_json(StatusCode::OK, &shape.apply(r))),
        None => Err(ApiError::NotFound(format!(
            "{rt}/{id} is not known: GET /fhir/{rt} lists those served"
        ))),
    }
}

pub async fn search(
    matched: MatchedPath,
    base: BaseUrl,
    prefer: Prefer,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let rt = routed_type(&matched);
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    let q = ConformanceQuery::parse(&rt, &pairs, prefer.lenient)?;
    let shape = super::summary::Shape::from_pairs(&rt, &pairs)?;
    let (total, page) = q.run(Conformance::get(), &rt);
    let mut entries: Vec<Value> = if shape.is_count() {
        Vec::new()
    } else {
        page.iter()
            .map(|r| {
                json!({
                    "fullUrl": format!("{}/{rt}/{}", base.0, r["id"].as_str().unwrap_or_default()),
                    "resource": shape.apply(r),
                    "search": {"mode": "match"},
                })
            })
            .collect()
    };
    let link = |offset: usize| {
        let mut pairs = q.applied.clone();
        pairs.extend(shape.params());
        pairs.push(("_count".into(), q.count.to_string()));
        pairs.push(("_offset".into(), offset.to_string()));
        let encoded: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&pairs)
            .finish();
        format!("{}/{rt}?{encoded}", base.0)
    };
    let mut links = vec![json!({"relation": "self", "url": link(q.offset)})];
    if q.count > 0 {
        links.push(json!({"relation": "first", "url": link(0)}));
        if q.offset + q.count < total {
            links.push(json!({"relation": "next", "url": link(q.offset + q.count)}));
        }
        if q.offset > 0 {
            links.push(
                json!({"relation": "previous", "url": link(q.offset.saturating_sub(q.count))}),
            );
        }
        let last = total.saturating_sub(1) / q.count * q.count;
        links.push(json!({"relation": "last", "url": link(last)}));
    }
    if !q.ignored.is_empty() {
        let issues: Vec<Issue> = q
            .ignored
            .iter()
            .map(|p| {
                let mut i = Issue::error(
                    "not-supported",
                    format!("ignored (Prefer: handling=lenient): '{p}' is not a search parameter of {rt} here"),
                    Some(p.clone()),
                );
                i.severity = crate::error::Severity::Warning;
                i
            })
            .collect();
        entries.push(json!({
            "resource": crate::error::operation_outcome(&issues),
            "search": {"mode": "outcome"}
        }));
    }
    let bundle = super::responses::bundle("searchset", Some(total as i64), links, entries);
    Ok(fhir_json(StatusCode::OK, &bundle))
}
