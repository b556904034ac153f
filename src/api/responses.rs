//! Building responses from stored versions: single resources with ETag / Location / Last-Modified
//! according to `Prefer`, and Bundle entries.
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::format::{BaseUrl, Prefer, ReturnPref, fhir_json, raw_json};
use crate::error::{ApiError, ApiResult, Issue, Severity, operation_outcome};
use crate::fhir::datetime::{format_http_date, format_instant, now_micros};
use crate::store::StoredResource;

pub fn etag(version: i64) -> String {
    format!("W/\"{version}\"")
}

pub fn parse_body(stored: &StoredResource) -> ApiResult<Value> {
    let text = stored.body.as_deref().ok_or_else(|| {
        ApiError::Gone(format!("{}/{} is deleted", stored.resource_type, stored.id))
    })?;
    serde_json::from_str(text)
        .map_err(|e| ApiError::BadRequest(format!("stored resource is unreadable: {e}")))
}

pub fn version_url(base: &BaseUrl, s: &StoredResource) -> String {
    format!(
        "{}/{}/{}/_history/{}",
        base.0, s.resource_type, s.id, s.version_id
    )
}

/// A single-resource response: the body `Prefer` asks for, ETag, Last-Modified, and Location
/// when a version was written.
pub fn resource_response(
    status: StatusCode,
    stored: &StoredResource,
    prefer: Prefer,
    base: &BaseUrl,
    location: bool,
    warnings: &[Issue],
) -> Response {
    let mut resp = match prefer.ret {
        ReturnPref::Representation => match &stored.body {
            Some(text) => raw_json(status, text.clone()),
            None => empty(status),
        },
        ReturnPref::Minimal => empty(status),
        ReturnPref::OperationOutcome => {
            let mut issues = vec![Issue {
                severity: Severity::Information,
                code: "informational",
                diagnostics: format!(
                    "{}/{} version {} stored",
                    stored.resource_type, stored.id, stored.version_id
                ),
                expression: None,
                details: None,
            }];
            issues.extend_from_slice(warnings);
            fhir_json(status, &operation_outcome(&issues))
        }
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag(stored.version_id)) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format_http_date(stored.last_updated)) {
        h.insert(header::LAST_MODIFIED, v);
    }
    if location && let Ok(v) = HeaderValue::from_str(&version_url(base, stored)) {
        h.insert(header::LOCATION, v);
    }
    resp
}

fn empty(status: StatusCode) -> Response {
    let mut r = Response::new(axum::body::Body::empty());
    *r.status_mut() = status;
    r
}

/// A searchset / history entry for a stored version.
pub fn bundle_entry_json(
    base: &BaseUrl,
    s: &StoredResource,
    mode: Option<&str>,
) -> ApiResult<Value> {
    let mut e = json!({"fullUrl": format!("{}/{}/{}", base.0, s.resource_type, s.id)});
    if s.body.is_some() {
        e["resource"] = parse_body(s)?;
    }
    if let Some(m) = mode {
        e["search"] = json!({"mode": m});
    }
    Ok(e)
}

/// The response part of a transaction, batch or history entry.
pub fn entry_response(status: &str, s: &StoredResource, base: &BaseUrl, location: bool) -> Value {
    let mut r = json!({"status": status, "etag": etag(s.version_id), "lastModified": format_instant(s.last_updated)});
    if location {
        r["location"] = json!(version_url(base, s));
    }
    r
}

/// A Bundle; empty `link` / `entry` arrays are left out (FHIR JSON has no empty arrays).
pub fn bundle(kind: &str, total: Option<i64>, links: Vec<Value>, entries: Vec<Value>) -> Value {
    let mut b = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"lastUpdated": format_instant(now_micros())},
        "type": kind,
    });
    if let Some(t) = total {
        b["total"] = json!(t);
    }
    if !links.is_empty() {
        b["link"] = Value::Array(links);
    }
    if !entries.is_empty() {
        b["entry"] = Value::Array(entries);
    }
    b
}
