//! `PATCH /{type}/{id}` with a JSON Patch (RFC 6902, `application/json-patch+json`).
//!
//! R4 (http.html, "patch"): the server applies the patch to its own copy of the resource and then
//! processes the result as an update. So it is one: the patch is applied inside the write task, on
//! the current version read in the writing transaction, and the result goes through the update's
//! path — validation, write rights, the Subscription and case-notification rules, the surveillance
//! rules before commit, the audit trail — answered like a PUT (ETag, Location, `Prefer`). The write
//! runs detached from the request: a client that goes away leaves nothing half-done.
//!
//! Answers: a patch document that is not one is 400; a `test` that fails, or a path that is not
//! in the resource, is 422 (the document is understood but cannot be applied to this resource, RFC
//! 5789 §2.2) and so is a patch that would change `id`, `resourceType`, `meta.versionId` or
//! `meta.lastUpdated` (the server's, not the client's); a result that is not valid R4 is refused as
//! an update body is; `If-Match` on another version is 412; a resource that does not exist is 404
//! (410 once deleted). FHIRPath Patch (a `Parameters` body) and XML Patch are not supported: 415.
use axum::extract::{FromRequest, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use json_patch::PatchOperation;
use serde_json::Value;

use super::crud::{if_match, with_notes, write_response};
use super::format::{BaseUrl, Prefer, mime, negotiate, read_body};
use super::interactions;
use super::{AppState, Caller};
use crate::error::{ApiError, ApiResult, Issue};
use crate::fhir::resource::validate;
use crate::surveillance::local_codes;

pub const JSON_PATCH: &str = "application/json-patch+json";

/// The most operations one patch may hold: each is applied and checked in the writing transaction.
pub const MAX_OPERATIONS: usize = 1000;

/// A JSON Patch body, read within the configured size limit and parsed.
pub struct JsonPatch(pub Vec<PatchOperation>);

impl FromRequest<AppState> for JsonPatch {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if mime(&ct) != JSON_PATCH {
            let sent = if ct.is_empty() {
                "no Content-Type".to_string()
            } else {
                format!("Content-Type {ct}")
            };
            return Err(ApiError::UnsupportedMediaType(format!(
                "PATCH takes a JSON Patch ({JSON_PATCH}) only, not {sent}; FHIRPath Patch \
                 (a Parameters resource) and XML Patch are not supported: send the whole resource with PUT instead"
            )));
        }
        let bytes = read_body(req, state.config.max_body_bytes).await?;
        parse_patch(&bytes).map(JsonPatch)
    }
}

fn invalid(msg: String, expression: Option<String>) -> ApiError {
    ApiError::invalid(vec![Issue::error("invalid", msg, expression)])
}

fn unprocessable(code: &'static str, msg: String, expression: Option<String>) -> ApiError {
    ApiError::unprocessable(vec![Issue::error(code, msg, expression)])
}

/// Parse a JSON Patch document: an array of at most `MAX_OPERATIONS` operations, each with its
/// members (a missing `value`, an unknown `op`, a `path` that is not a JSON Pointer: 400, naming
/// the operation).
pub fn parse_patch(body: &[u8]) -> ApiResult<Vec<PatchOperation>> {
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("the body is not JSON: {e}"), None))?;
    let Value::Array(items) = doc else {
        return Err(invalid(
            "a JSON Patch is an array of operations ([{\"op\": \"replace\", \"path\": …, \"value\": …}])"
                .into(),
            None,
        ));
    };
    if items.is_empty() {
        return Err(invalid("the JSON Patch has no operations".into(), None));
    }
    if items.len() > MAX_OPERATIONS {
        return Err(ApiError::invalid(vec![Issue::error(
            "too-costly",
            format!(
                "the JSON Patch has {} operations; at most {MAX_OPERATIONS} in one PATCH",
                items.len()
            ),
            None,
        )]));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let shown = item["op"].as_str().unwrap_or("?").to_string();
            serde_json::from_value::<PatchOperation>(item)
                .map_err(|e| invalid(format!("operation {i} ({shown}) is not valid: {e}"), None))
        })
        .collect()
}

/// The JSON Pointer of an operation as a FHIRPath location: `/name/0/family` of a Patient is
/// `Patient.name[0].family` (`-`, the end of an array, names the array).
pub fn fhirpath_of(rt: &str, pointer: &str) -> String {
    let mut out = rt.to_string();
    for token in pointer.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        if token == "-" {
            continue;
        }
        if !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{token}]"));
        } else {
            out.push('.');
            out.push_str(&token);
        }
    }
    out
}

/// What the server owns: a patch may test these but not change them.
fn protected(pointer: &str) -> Option<&'static str> {
    let tokens: Vec<&str> = pointer.split('/').skip(1).collect();
    match tokens.as_slice() {
        [] => Some("the whole resource (replace it with PUT)"),
        ["id", ..] => Some("id"),
        ["resourceType", ..] => Some("resourceType"),
        ["meta", "versionId", ..] => Some("meta.versionId"),
        ["meta", "lastUpdated", ..] => Some("meta.lastUpdated"),
        _ => None,
    }
}

/// Refuse operations that would change what the server owns (checked before anything is read).
pub fn check_targets(rt: &str, ops: &[PatchOperation]) -> ApiResult<()> {
    for (i, op) in ops.iter().enumerate() {
        let changed: Vec<&str> = match op {
            PatchOperation::Test(_) => vec![],
            PatchOperation::Move(m) => vec![m.from.as_str(), m.path.as_str()],
            other => vec![other.path().as_str()],
        };
        if let Some((pointer, what)) = changed
            .into_iter()
            .find_map(|p| protected(p).map(|w| (p, w)))
        {
            return Err(unprocessable(
                "business-rule",
                format!(
                    "operation {i} would change {what}, which the server maintains; a patch may test it but not change it"
                ),
                Some(fhirpath_of(rt, pointer)),
            ));
        }
    }
    Ok(())
}

fn json_len(v: &Value) -> usize {
    serde_json::to_vec(v).map_or(0, |b| b.len())
}

/// Apply the operations in order to a copy of `current`. A failed `test` or a path that is not in
/// the resource is 422 at that operation's location. `copy` can double a resource with each
/// operation: the result may not grow beyond `limit` bytes (the largest body a PUT may send; nor
/// beyond the size of `current`, if larger), checked as it grows.
pub fn apply(rt: &str, current: &Value, ops: &[PatchOperation], limit: usize) -> ApiResult<Value> {
    let mut doc = current.clone();
    let bound = limit.max(json_len(current));
    let mut size = json_len(current);
    for (i, op) in ops.iter().enumerate() {
        // an estimate that is never below the real size (an `add` over an existing member counts
        // the new value without taking the old one off), so that no serialisation is needed
        let at = |p: &str| doc.pointer(p).map_or(0, json_len);
        match op {
            PatchOperation::Copy(c) => size += at(c.from.as_str()),
            PatchOperation::Add(a) => size += json_len(&a.value),
            PatchOperation::Replace(r) => {
                size = (size + json_len(&r.value)).saturating_sub(at(r.path.as_str()))
            }
            PatchOperation::Remove(r) => size = size.saturating_sub(at(r.path.as_str())),
            PatchOperation::Move(_) | PatchOperation::Test(_) => {}
        }
        if size > bound {
            return Err(ApiError::invalid(vec![Issue::error(
                "too-costly",
                format!(
                    "operation {i} makes the resource larger than {bound} bytes, the largest this server takes"
                ),
                Some(fhirpath_of(rt, op.path().as_str())),
            )]));
        }
        if let Err(e) = json_patch::patch_unsafe(&mut doc, std::slice::from_ref(op)) {
            let at = Some(fhirpath_of(rt, e.path.as_str()));
            return Err(match e.kind {
                json_patch::PatchErrorKind::TestFailed => unprocessable(
                    "conflict",
                    format!(
                        "operation {i}: test failed, {} does not hold the value given; nothing was changed",
                        e.path.as_str()
                    ),
                    at,
                ),
                json_patch::PatchErrorKind::InvalidFromPointer => unprocessable(
                    "processing",
                    format!(
                        "operation {i}: \"from\" does not name an element of the resource; nothing was changed"
                    ),
                    at,
                ),
                json_patch::PatchErrorKind::CannotMoveInsideItself => unprocessable(
                    "processing",
                    format!("operation {i}: an element cannot be moved inside itself"),
                    at,
                ),
                _ => unprocessable(
                    "processing",
                    format!(
                        "operation {i}: {} is not in the resource ({}); nothing was changed",
                        e.path.as_str(),
                        e.kind
                    ),
                    at,
                ),
            });
        }
    }
    Ok(doc)
}

#[allow(clippy::too_many_arguments)] // an axum handler: one argument per extractor
pub async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    Path((rt, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    prefer: Prefer,
    base: BaseUrl,
    JsonPatch(ops): JsonPatch,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    super::require_type(&rt)?;
    check_targets(&rt, &ops)?;
    let expected = if_match(&headers)?;
    let limit = state.config.max_body_bytes;
    let st = state.clone();
    let (written, warnings, notes) = state
        .writes
        .run(|live| async move {
            let mut tx = st.begin(&caller, &live).await?;
            let current = tx
                .current(&rt, &id)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("{rt}/{id} is not known")))?;
            // another region's case does not exist for the caller, whatever the patch says
            tx.admit_read(&current)?;
            if current.deleted {
                return Err(ApiError::Gone(format!(
                    "{rt}/{id} was deleted (version {}): nothing to patch",
                    current.version_id
                )));
            }
            if let Some(v) = expected
                && v != current.version_id
            {
                return Err(ApiError::PreconditionFailed(format!(
                    "If-Match W/\"{v}\" does not match the current version {} of {rt}/{id}",
                    current.version_id
                )));
            }
            let body = super::responses::parse_body(&current)?;
            let (prt, base_version) = (rt.clone(), current.version_id);
            // applying and validating are CPU work: off the async workers. (`check_targets` kept
            // resourceType and id: the result is still `rt/id`.)
            let patched = tokio::task::spawn_blocking(move || -> ApiResult<Value> {
                let patched = apply(&prt, &body, &ops, limit)?;
                validate(&patched)?;
                Ok(patched)
            })
            .await
            .map_err(|_| ApiError::Internal("the patch could not be applied".into()))??;
            let warnings = local_codes::warnings(&patched);
            // the version the patch was applied to: if another write got in since, the update
            // refuses (412 when the client asked for a version, 409 otherwise: retry)
            let written = interactions::update(&mut tx, patched, &id, Some(base_version))
                .await
                .map_err(|e| match (e, expected) {
                    (ApiError::PreconditionFailed(_), None) => ApiError::Conflict(format!(
                        "{rt}/{id} was changed by another request while it was patched: retry"
                    )),
                    (e, _) => e,
                })?;
            let notes = tx.commit().await?;
            Ok((written, warnings, notes))
        })
        .await?;
    super::crud::count_written(&written, "patch");
    let warnings = with_notes(warnings, &notes, &written);
    Ok(write_response(&written, prefer, &base, true, &warnings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patient() -> Value {
        json!({"resourceType": "Patient", "id": "p1", "meta": {"versionId": "3"},
               "name": [{"family": "Rossi", "given": ["Mario"]}], "gender": "male"})
    }

    fn ops(v: Value) -> Vec<PatchOperation> {
        parse_patch(&serde_json::to_vec(&v).unwrap()).unwrap()
    }

    #[test]
    fn operations_apply_in_order() {
        let p = ops(json!([
            {"op": "test", "path": "/gender", "value": "male"},
            {"op": "replace", "path": "/gender", "value": "other"},
            {"op": "add", "path": "/name/0/given/-", "value": "Luigi"},
            {"op": "remove", "path": "/name/0/family"}
        ]));
        check_targets("Patient", &p).unwrap();
        let out = apply("Patient", &patient(), &p, 10_000).unwrap();
        assert_eq!(out["gender"], "other");
        assert_eq!(out["name"][0], json!({"given": ["Mario", "Luigi"]}));
    }

    #[test]
    fn a_failed_test_is_422_at_its_location_and_changes_nothing() {
        let p = ops(json!([
            {"op": "replace", "path": "/gender", "value": "other"},
            {"op": "test", "path": "/name/0/family", "value": "Bianchi"}
        ]));
        let e = apply("Patient", &patient(), &p, 10_000).unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            e.issues()[0].expression.as_deref(),
            Some("Patient.name[0].family")
        );
        let e = apply(
            "Patient",
            &patient(),
            &ops(json!([{"op": "remove", "path": "/birthDate"}])),
            10_000,
        )
        .unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[test]
    fn what_the_server_maintains_cannot_be_patched_but_can_be_tested() {
        for path in [
            "/id",
            "/resourceType",
            "/meta/versionId",
            "/meta/lastUpdated",
            "",
        ] {
            let p = ops(json!([{"op": "replace", "path": path, "value": "x"}]));
            let e = check_targets("Patient", &p).unwrap_err();
            assert_eq!(
                e.status(),
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "{path}"
            );
        }
        let p = ops(json!([{"op": "move", "from": "/id", "path": "/x"}]));
        assert!(check_targets("Patient", &p).is_err());
        let p = ops(
            json!([{"op": "test", "path": "/meta/versionId", "value": "3"},
                           {"op": "add", "path": "/meta/tag", "value": [{"code": "x"}]}]),
        );
        check_targets("Patient", &p).unwrap();
    }

    #[test]
    fn malformed_patches_are_400() {
        for body in [
            json!({"op": "replace", "path": "/gender", "value": "other"}),
            json!([]),
            json!([{"op": "replace", "path": "/gender"}]),
            json!([{"op": "frobnicate", "path": "/gender"}]),
            json!([{"op": "remove", "path": "gender"}]),
        ] {
            let e = parse_patch(&serde_json::to_vec(&body).unwrap()).unwrap_err();
            assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{body}");
        }
        let many: Vec<Value> = (0..=MAX_OPERATIONS)
            .map(|_| json!({"op": "test", "path": "/gender", "value": "male"}))
            .collect();
        assert!(parse_patch(&serde_json::to_vec(&many).unwrap()).is_err());
    }

    #[test]
    fn copies_cannot_grow_a_resource_without_bound() {
        let mut list = vec![json!({"op": "add", "path": "/x", "value": ["a".repeat(100)]})];
        for _ in 0..40 {
            list.push(json!({"op": "copy", "from": "/x", "path": "/x/-"}));
        }
        let p = ops(Value::Array(list));
        let e = apply("Patient", &patient(), &p, 64 * 1024).unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST);
        assert_eq!(e.issues()[0].code, "too-costly");
        // what a replace or a remove takes away is counted off
        let mut big = patient();
        big["name"][0]["family"] = json!("r".repeat(6000));
        let p = ops(json!([
            {"op": "replace", "path": "/name/0/family", "value": "s".repeat(5000)},
            {"op": "remove", "path": "/name/0/family"},
            {"op": "add", "path": "/name/0/family", "value": "t".repeat(5000)}
        ]));
        let out = apply("Patient", &big, &p, 10_000).unwrap();
        assert_eq!(out["name"][0]["family"].as_str().unwrap().len(), 5000);
    }

    #[test]
    fn pointers_become_fhirpath() {
        assert_eq!(
            fhirpath_of("Patient", "/name/0/given/-"),
            "Patient.name[0].given"
        );
        assert_eq!(fhirpath_of("Patient", "/a~1b/c~0d"), "Patient.a/b.c~d");
        assert_eq!(fhirpath_of("Patient", ""), "Patient");
    }
}
