//! `$validate` (type and instance level): the checks a write runs — JSON schema,
//! StructureDefinitions and invariants, our profiles and extensions (slices, fixed values,
//! patterns, bindings by strength), Italian identifiers, ICD-9-CM — answered as an
//! OperationOutcome; nothing is stored. A transaction Bundle is validated whole, as `POST /fhir`
//! would check it before writing.
//!
//! R4: the answer is 200 with the issues whether or not the resource is valid; a 4xx means the
//! validation could not be done (no resource, an unknown profile, a bad mode).
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::Value;

use super::parameters::{OperationBody, OperationParams};
use super::{AppState, Caller};
use crate::error::{ApiError, ApiResult, Issue, Severity};
use crate::fhir::resource::{parse_json, resource_type, validate};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Create,
    Update,
    Delete,
}

/// What was asked: the resource (none for a delete), how it would be written, against what.
struct Request {
    resource: Option<Value>,
    mode: Mode,
    profile: Option<String>,
}

fn invalid(code: &'static str, why: impl Into<String>, at: Option<&str>) -> ApiError {
    ApiError::invalid(vec![Issue::error(code, why, at.map(String::from))])
}

/// The body is the resource itself, or a Parameters with `resource`, `mode` and `profile`; `mode`
/// and `profile` may also be query parameters.
fn read_request(rt: &str, query: Option<&str>, body: &[u8]) -> ApiResult<Request> {
    let mut params = OperationParams::from_query(query);
    let mut resource = None;
    if !body.iter().all(u8::is_ascii_whitespace) {
        let v = parse_json(body)?;
        if v["resourceType"] == "Parameters" && rt != "Parameters" {
            let body_params = OperationParams::from_resource(&v)?;
            body_params.only(&["resource", "mode", "profile"])?;
            resource = body_params.resource("resource")?.cloned();
            params.items.extend(
                body_params
                    .items
                    .into_iter()
                    .filter(|(k, _)| k != "resource"),
            );
        } else {
            resource = Some(v);
        }
    }
    params.only(&["mode", "profile", "resource"])?;
    let mode = match params.text("mode")? {
        None | Some("create") => Mode::Create,
        Some("update") => Mode::Update,
        Some("delete") => Mode::Delete,
        Some(other) => {
            return Err(invalid(
                "invalid",
                format!("mode '{other}' is not one of create, update, delete"),
                Some("mode"),
            ));
        }
    };
    let profile = params.text("profile")?.map(String::from);
    if let Some(p) = &profile
        && !crate::fhir::profile::is_ours(p)
        && !is_base_profile(p, rt)
    {
        return Err(ApiError::invalid(vec![Issue::error(
            "not-found",
            format!(
                "the profile {p} is not known to this server (GET /fhir/StructureDefinition lists those it has)"
            ),
            Some("profile".into()),
        )]));
    }
    if let Some(r) = &resource {
        let found = resource_type(r)?;
        if found != rt {
            return Err(invalid(
                "invalid",
                format!("the resource is a {found}, not a {rt}"),
                Some("resourceType"),
            ));
        }
    } else if mode != Mode::Delete {
        return Err(invalid(
            "required",
            "there is no resource to validate: send it as the body or as the parameter 'resource'",
            Some("resource"),
        ));
    }
    Ok(Request {
        resource,
        mode,
        profile,
    })
}

/// The R4 definition of the type itself (`http://hl7.org/fhir/StructureDefinition/Patient`): what
/// the base validation checks anyway.
fn is_base_profile(url: &str, rt: &str) -> bool {
    url.split('|').next() == Some(&format!("http://hl7.org/fhir/StructureDefinition/{rt}"))
}

/// Every issue of one resource, as a write would find them, plus the warnings a write would carry.
pub fn resource_issues(rt: &str, resource: &Value, profile: Option<&str>) -> Vec<Issue> {
    if rt == "Bundle" {
        return super::bundle::validation_issues(resource);
    }
    let mut issues = match validate(resource) {
        Ok(()) => Vec::new(),
        Err(e) => e.issues(),
    };
    // what validate() leaves out of a write's refusal: warnings, and the profile asked for
    let explicit = profile.filter(|p| crate::fhir::profile::is_ours(p));
    issues.extend(
        crate::fhir::profile::conformance_issues(resource, explicit)
            .into_iter()
            .filter(|i| {
                i.severity != Severity::Error
                    || explicit.is_some_and(|p| i.diagnostics.contains(&format!("(profile {p})")))
            }),
    );
    issues.extend(crate::surveillance::local_codes::warnings(resource));
    if crate::surveillance::is_case_notification(resource) {
        issues.push(Issue::error(
            "business-rule",
            "case notifications (profile notifica-caso) are written by the surveillance rules only",
            Some(format!("{rt}.meta.profile")),
        ));
    }
    for (i, p) in resource["meta"]["profile"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(url) = p.as_str()
            && !crate::fhir::profile::is_ours(url)
            && !is_base_profile(url, rt)
        {
            let mut w = Issue::error(
                "not-supported",
                format!(
                    "the profile {url} is not known to this server: the resource was not checked against it"
                ),
                Some(format!("{rt}.meta.profile[{i}]")),
            );
            w.severity = Severity::Warning;
            issues.push(w);
        }
    }
    dedup(issues)
}

/// The same issue found twice (a claimed profile asked for again) is reported once.
fn dedup(issues: Vec<Issue>) -> Vec<Issue> {
    let mut out: Vec<Issue> = Vec::with_capacity(issues.len());
    for i in issues {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// The OperationOutcome of a validation: its issues, or one saying there are none.
pub fn outcome(issues: &[Issue]) -> Value {
    if issues.is_empty() {
        let ok = Issue {
            severity: Severity::Information,
            code: "informational",
            diagnostics: "the resource is valid: no issues found".into(),
            expression: None,
            details: None,
        };
        return crate::error::operation_outcome(&[ok]);
    }
    crate::error::operation_outcome(issues)
}

fn answer(issues: &[Issue]) -> Response {
    super::format::fhir_json(StatusCode::OK, &outcome(issues))
}

/// Validation is CPU work: off the async workers, like a write's parsing.
async fn run_blocking(
    rt: String,
    query: Option<String>,
    body: bytes::Bytes,
) -> ApiResult<(Request, Vec<Issue>)> {
    tokio::task::spawn_blocking(move || {
        let req = read_request(&rt, query.as_deref(), &body)?;
        let issues = match &req.resource {
            Some(r) => resource_issues(&rt, r, req.profile.as_deref()),
            None => Vec::new(),
        };
        Ok((req, issues))
    })
    .await
    .map_err(|_| ApiError::Internal("validation failed".into()))?
}

pub fn validatable(rt: &str) -> ApiResult<()> {
    if rt == "Bundle" || crate::fhir::is_served(rt) {
        Ok(())
    } else {
        super::require_type(rt)
    }
}

pub async fn validate_type(
    State(_state): State<AppState>,
    Path(rt): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    OperationBody(body): OperationBody,
) -> ApiResult<Response> {
    super::format::negotiate(&headers, query.as_deref())?;
    validatable(&rt)?;
    let (req, mut issues) = run_blocking(rt.clone(), query, body).await?;
    match req.mode {
        Mode::Delete => {
            return Err(invalid(
                "invalid",
                "mode delete needs the resource's id: POST /fhir/{type}/{id}/$validate?mode=delete",
                Some("mode"),
            ));
        }
        Mode::Update
            if req
                .resource
                .as_ref()
                .is_some_and(|r| r["id"].as_str().is_none()) =>
        {
            issues.push(Issue::error(
                "required",
                "an update names the resource it replaces: the resource has no id",
                Some(format!("{rt}.id")),
            ));
        }
        _ => {}
    }
    Ok(answer(&issues))
}

pub async fn validate_instance(
    State(state): State<AppState>,
    caller: Caller,
    Path((rt, id)): Path<(String, String)>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    OperationBody(body): OperationBody,
) -> ApiResult<Response> {
    super::format::negotiate(&headers, query.as_deref())?;
    validatable(&rt)?;
    if rt == "Bundle" {
        return Err(ApiError::NotFound(
            "Bundles are not stored here: validate one with POST /fhir/Bundle/$validate".into(),
        ));
    }
    let (req, mut issues) = run_blocking(rt.clone(), query, body).await?;
    // the stored resource, as this client may see it
    let stored = state
        .store
        .read(&rt, &id)
        .await?
        .filter(|s| !s.deleted && caller.check_sees(s).is_ok());
    match req.mode {
        Mode::Create => {}
        Mode::Update => {
            if let Some(r) = &req.resource
                && r["id"].as_str() != Some(id.as_str())
            {
                issues.push(Issue::error(
                    "invariant",
                    format!(
                        "the resource's id ({}) must be the id in the URL ({id})",
                        r["id"].as_str().unwrap_or("missing")
                    ),
                    Some(format!("{rt}.id")),
                ));
            }
        }
        Mode::Delete => {
            let Some(stored) = stored else {
                return Err(ApiError::NotFound(format!("{rt}/{id} is not known")));
            };
            if !caller.0.may_write(&rt) {
                issues.push(Issue::error(
                    "forbidden",
                    format!("client '{}' may not delete {rt} resources", caller.0.id),
                    None,
                ));
            }
            let body = crate::subscriptions::parse_body(stored.body.as_deref());
            if body
                .as_ref()
                .is_some_and(crate::surveillance::is_case_notification)
            {
                issues.push(Issue::error(
                    "business-rule",
                    "case notifications are withdrawn by the surveillance rules, not deleted: correct the evidence they rest on",
                    Some(format!("{rt}.meta.profile")),
                ));
            }
        }
    }
    Ok(answer(&issues))
}
