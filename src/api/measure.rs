//! Measures over HTTP: the Measures themselves (read-only: they are data in `profiles/`),
//! `$evaluate-measure` (R4) and `$generate-reports` (stores the reports of a period now, as the
//! server does on its own once a period is over).
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};

use super::format::{fhir_json, negotiate};
use super::parameters::{OperationBody, OperationParams, ParamValue};
use super::{AppState, Caller};
use crate::error::{ApiError, ApiResult, Issue};
use crate::measures::MeasureError;
use crate::measures::definition::{MeasureDef, measure, measure_by_url, measures};
use crate::measures::evaluate::{Detail, Period, Subject, evaluate};
use crate::measures::generate::{Due, generate};

/// Evaluations running at once, process-wide: a national year is seconds of database reads, and
/// many of them at once would starve the writes; beyond, a short wait, then 503.
const MAX_EVALUATIONS_AT_ONCE: usize = 4;
const EVALUATION_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn evaluation_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| tokio::sync::Semaphore::new(MAX_EVALUATIONS_AT_ONCE))
}

impl From<MeasureError> for ApiError {
    fn from(e: MeasureError) -> ApiError {
        match e {
            MeasureError::Store(e) => ApiError::Storage(e),
            MeasureError::Invalid(param, why) => {
                ApiError::invalid(vec![Issue::error("invalid", why, Some(param))])
            }
            MeasureError::TooCostly(why) => {
                ApiError::invalid(vec![Issue::error("too-costly", why, None)])
            }
        }
    }
}

/// An operation's input as (name, value) pairs: Measure operations take primitive values only.
fn operation_parameters(query: Option<&str>, body: &[u8]) -> ApiResult<Vec<(String, String)>> {
    let params = OperationParams::read(query, body)?;
    params
        .items
        .into_iter()
        .map(|(name, v)| match v {
            ParamValue::Text(t) => Ok((name, t)),
            _ => Err(ApiError::invalid(vec![Issue::error(
                "invalid",
                format!("parameter {name} must be a primitive value"),
                Some(name.clone()),
            )])),
        })
        .collect()
}

fn single<'a>(params: &'a [(String, String)], name: &str) -> ApiResult<Option<&'a str>> {
    let mut found = params.iter().filter(|(k, _)| k == name);
    let first = found.next().map(|(_, v)| v.as_str());
    if found.next().is_some() {
        return Err(ApiError::invalid(vec![Issue::error(
            "invalid",
            format!("{name} is given more than once"),
            Some(name.to_string()),
        )]));
    }
    Ok(first)
}

fn required<'a>(params: &'a [(String, String)], name: &str) -> ApiResult<&'a str> {
    single(params, name)?.ok_or_else(|| {
        ApiError::invalid(vec![Issue::error(
            "required",
            format!("{name} is required"),
            Some(name.to_string()),
        )])
    })
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("Measure/{id} is not known (see GET /fhir/Measure)"))
}

/// `GET /Measure`: every Measure, or those of `url`, `_id`, `name` or `status`.
pub async fn search(
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    base: super::format::BaseUrl,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let mut chosen: Vec<&MeasureDef> = measures().iter().collect();
    for (k, v) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        let wanted: Vec<&str> = v.split(',').collect();
        let field = match k.as_ref() {
            "url" => "url",
            "_id" => "id",
            "name" => "name",
            "status" => "status",
            "_format" | "_count" => continue,
            other => {
                return Err(ApiError::invalid(vec![Issue::error(
                    "processing",
                    format!(
                        "unknown search parameter '{other}' for Measure (url, _id, name, status)"
                    ),
                    Some(other.to_string()),
                )]));
            }
        };
        chosen.retain(|m| {
            let value = m.resource[field].as_str().unwrap_or_default();
            wanted
                .iter()
                .any(|w| *w == value || (field == "url" && w.split('|').next() == Some(value)))
        });
    }
    let entries: Vec<Value> = chosen
        .iter()
        .map(|m| {
            json!({
                "fullUrl": format!("{}/Measure/{}", base.0, m.id),
                "resource": m.resource,
                "search": {"mode": "match"}
            })
        })
        .collect();
    let bundle = super::responses::bundle(
        "searchset",
        Some(entries.len() as i64),
        vec![
            json!({"relation": "self", "url": format!("{}/Measure{}", base.0, query.map(|q| format!("?{q}")).unwrap_or_default())}),
        ],
        entries,
    );
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// `GET /Measure/{id}`.
pub async fn read(
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let m = measure(&id).ok_or_else(|| not_found(&id))?;
    Ok(fhir_json(StatusCode::OK, &m.resource))
}

/// May the caller see the reports of this area (or, without one, of the whole country)? Whether
/// it reads MeasureReports at all the policy decided (`$evaluate-measure` is a MeasureReport read);
/// this is the finer rule of its regions, as `Principal::scope` is for searches.
fn check_area(caller: &Caller, subject: Option<&Subject>) -> ApiResult<()> {
    let p = &caller.0;
    if p.scope("MeasureReport").is_none() {
        return Ok(());
    }
    match subject.and_then(|s| s.region.as_ref()) {
        Some(r) if p.regions.contains(r) => Ok(()),
        Some(_) => Err(ApiError::Forbidden(format!(
            "client '{}' sees the summaries of its regions ({}) only",
            p.id,
            p.regions.join(", ")
        ))),
        None => Err(ApiError::Forbidden(format!(
            "client '{}' sees the summaries of its regions only: name one of its areas as subject",
            p.id
        ))),
    }
}

async fn evaluate_with(
    state: &AppState,
    caller: &Caller,
    m: &MeasureDef,
    params: &[(String, String)],
) -> ApiResult<Response> {
    let period = Period::parse(
        required(params, "periodStart")?,
        required(params, "periodEnd")?,
    )?;
    let subject = single(params, "subject")?.map(Subject::parse).transpose()?;
    let detail = match single(params, "reportType")? {
        None | Some("summary" | "population") => Detail::Summary,
        Some("subject-list") => Detail::SubjectList,
        Some(other) => {
            return Err(ApiError::invalid(vec![Issue::error(
                "not-supported",
                format!(
                    "reportType={other}: this server answers summary (population) and subject-list reports"
                ),
                Some("reportType".into()),
            )]));
        }
    };
    check_area(caller, subject.as_ref())?;
    // the cases behind a count are case notifications: only for a client who may read them
    if detail == Detail::SubjectList && !caller.0.may_read("Communication") {
        return Err(ApiError::Forbidden(format!(
            "client '{}' may not read the cases: ask for reportType=summary",
            caller.0.id
        )));
    }
    let _slot = tokio::time::timeout(EVALUATION_WAIT, evaluation_slots().acquire())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            ApiError::Unavailable("too many summaries are being computed: retry shortly".into())
        })?;
    let report = evaluate(state.store.as_ref(), m, &period, subject.as_ref(), detail).await?;
    Ok(fhir_json(StatusCode::OK, &report))
}

/// `GET|POST /Measure/{id}/$evaluate-measure` (parameters in the query or a Parameters body).
pub async fn evaluate_instance(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    OperationBody(body): OperationBody,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let m = measure(&id).ok_or_else(|| not_found(&id))?;
    let params = operation_parameters(query.as_deref(), &body)?;
    evaluate_with(&state, &caller, m, &params).await
}

/// `GET|POST /Measure/$evaluate-measure`, the Measure named by its `measure` url.
pub async fn evaluate_type(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    OperationBody(body): OperationBody,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let params = operation_parameters(query.as_deref(), &body)?;
    let url = required(&params, "measure")?;
    let m = measure_by_url(url)
        .ok_or_else(|| ApiError::NotFound(format!("no Measure has the url {url}")))?;
    evaluate_with(&state, &caller, m, &params).await
}

/// `POST /MeasureReport/$generate-reports?period=2026-01`: store the reports of a month (or, `2026`, a
/// year) now. What the server does once a period is over; for an operator after a correction.
pub async fn generate_reports(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    OperationBody(body): OperationBody,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let params = operation_parameters(query.as_deref(), &body)?;
    let text = required(&params, "period")?;
    let due = Due::parse(text).ok_or_else(|| {
        ApiError::invalid(vec![Issue::error(
            "invalid",
            format!("period={text}: a month (YYYY-MM) or a year (YYYY)"),
            Some("period".into()),
        )])
    })?;
    let st = state.clone();
    // detached from the request: a client that goes away does not cut the transaction short
    let done = state
        .writes
        .run(|_| async move {
            generate(&st.store, &st.engine.dispatcher, due)
                .await
                .map_err(ApiError::from)
        })
        .await?;
    let out = json!({
        "resourceType": "Parameters",
        "parameter": [
            {"name": "period", "valueString": due.label()},
            {"name": "created", "valueInteger": done.created},
            {"name": "updated", "valueInteger": done.updated},
            {"name": "unchanged", "valueInteger": done.unchanged},
        ]
    });
    Ok(fhir_json(StatusCode::OK, &out))
}
