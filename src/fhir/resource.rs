//! Reading a resource off the wire, validating it, and stamping the server-owned metadata.
use serde_json::{Map, Value};

use super::Definitions;
use super::schema::SchemaValidators;
use crate::error::{ApiError, Issue};

/// Parse a JSON body: malformed JSON, invalid UTF-8 and nesting beyond serde_json's recursion limit
/// (128) are all a 400 with the position.
pub fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest("the request body is empty".into()));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(vec![Issue::error(
            "structure",
            format!(
                "the body is not valid JSON: {e} (line {}, column {})",
                e.line(),
                e.column()
            ),
            None,
        )])
    })?;
    if let Some(mut path) = super::json_keys::first_duplicate(body) {
        if let Some(rt) = value.get("resourceType").and_then(Value::as_str)
            && path != "resourceType"
        {
            path = format!("{rt}.{path}");
        }
        return Err(ApiError::invalid(vec![Issue::error(
            "structure",
            format!("'{path}' appears twice in the same object: names must be unique"),
            Some(path),
        )]));
    }
    Ok(value)
}

/// The resource type of a parsed body, or a 400 naming what is missing.
pub fn resource_type(resource: &Value) -> Result<&str, ApiError> {
    match resource.get("resourceType") {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ApiError::invalid(vec![Issue::error(
            "structure",
            "resourceType must be a string",
            Some("resourceType".into()),
        )])),
        None if resource.is_object() => Err(ApiError::invalid(vec![Issue::error(
            "required",
            "resourceType is missing: the body is not a FHIR resource",
            Some("resourceType".into()),
        )])),
        None => Err(ApiError::invalid(vec![Issue::error(
            "structure",
            "the body must be a JSON object",
            None,
        )])),
    }
}

/// The most payload items and reasons one Communication may carry: the rules read each one inside
/// the writing transaction, so a client must not make that work unbounded.
pub const MAX_COMMUNICATION_PARTS: usize = 200;

/// Structural validation of one resource: the R4 JSON schema, then the StructureDefinition checks.
/// Schema errors are a 400; the stricter StructureDefinition rules (cardinality, bindings) too, since
/// they are base-specification rules, not profile rules.
pub fn validate(resource: &Value) -> Result<(), ApiError> {
    let checked = check(resource);
    // counted here, where every write and `$validate` passes: by the issue types of the errors
    if let Err(ApiError::Invalid { issues, .. }) = &checked {
        crate::observability::metrics::validation_failed(
            issues
                .iter()
                .filter(|i| {
                    matches!(
                        i.severity,
                        crate::error::Severity::Error | crate::error::Severity::Fatal
                    )
                })
                .map(|i| i.code),
        );
    }
    checked
}

fn check(resource: &Value) -> Result<(), ApiError> {
    let rt = resource_type(resource)?;
    if !super::is_served(rt) {
        return Err(ApiError::NotFound(format!(
            "resource type {rt} is not supported by this server"
        )));
    }
    // control characters (NUL above all) are not FHIR string content, and PostgreSQL cannot store
    // NUL: refused here, the same on both stores
    let mut issues = Vec::new();
    control_characters(resource, rt, &mut issues);
    if !issues.is_empty() {
        return Err(ApiError::invalid(issues));
    }
    let mut issues = SchemaValidators::get().validate(resource);
    if issues.is_empty() {
        let defs = Definitions::get();
        issues = defs.structures.validate(resource, &defs.valuesets);
    }
    if !issues.is_empty() {
        return Err(ApiError::invalid(issues));
    }
    // national rules (a valid codice fiscale) and the code systems the rules read (ICD-9-CM): well-formed FHIR that breaks them is a 422
    let mut issues = crate::italy::check(resource);
    issues.extend(crate::terminology::icd9::check(resource));
    // the profiles of ours it claims and the extensions of ours it carries (warnings, such as an
    // extensible binding not met, do not stop a write; `$validate` reports them)
    issues.extend(
        super::profile::conformance_issues(resource, None)
            .into_iter()
            .filter(|i| i.severity == crate::error::Severity::Error),
    );
    if rt == "Communication" {
        for element in ["payload", "reasonReference"] {
            if resource[element]
                .as_array()
                .is_some_and(|a| a.len() > MAX_COMMUNICATION_PARTS)
            {
                issues.push(crate::error::Issue::error(
                    "too-costly",
                    format!(
                        "a Communication may carry at most {MAX_COMMUNICATION_PARTS} {element} items"
                    ),
                    Some(format!("Communication.{element}")),
                ));
            }
        }
    }
    if issues.is_empty() {
        Ok(())
    } else {
        Err(ApiError::unprocessable(issues))
    }
}

/// Strings holding a C0 control character other than tab, CR and LF (FHIR: strings "SHOULD not
/// contain Unicode character points below 32, except for u0009, u000D and u000A"), with the
/// FHIRPath of each. The walk is bounded by the parser's nesting limit.
fn control_characters(v: &Value, path: &str, issues: &mut Vec<Issue>) {
    match v {
        Value::String(s)
            if s.chars()
                .any(|c| (c as u32) < 32 && !matches!(c, '\t' | '\r' | '\n')) =>
        {
            issues.push(Issue::error(
                "invalid",
                "the string holds a control character (such as NUL), which FHIR strings may not contain",
                Some(path.to_string()),
            ));
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                control_characters(item, &format!("{path}[{i}]"), issues);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                if k.chars().any(|c| (c as u32) < 32) {
                    issues.push(Issue::error(
                        "invalid",
                        "a property name holds a control character",
                        Some(path.to_string()),
                    ));
                    continue;
                }
                control_characters(item, &format!("{path}.{k}"), issues);
            }
        }
        _ => {}
    }
}

/// Set `id`, `meta.versionId` and `meta.lastUpdated`, keeping the sender's key order otherwise
/// (resourceType, id and meta first, as FHIR examples show them).
pub fn stamp(resource: &mut Value, id: &str, version_id: i64, last_updated: &str) {
    let Some(obj) = resource.as_object_mut() else {
        return;
    };
    let mut meta = match obj.shift_remove("meta") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    meta.shift_remove("versionId");
    meta.shift_remove("lastUpdated");
    let mut new_meta = Map::new();
    new_meta.insert("versionId".into(), Value::String(version_id.to_string()));
    new_meta.insert(
        "lastUpdated".into(),
        Value::String(last_updated.to_string()),
    );
    new_meta.extend(meta);
    let rt = obj.shift_remove("resourceType");
    obj.shift_remove("id");
    let rest = std::mem::take(obj);
    if let Some(rt) = rt {
        obj.insert("resourceType".into(), rt);
    }
    obj.insert("id".into(), Value::String(id.to_string()));
    obj.insert("meta".into(), Value::Object(new_meta));
    obj.extend(rest);
}

/// Whether a logical id is a valid FHIR id (`[A-Za-z0-9\-\.]{1,64}`).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Visit every `Reference.reference` string in a resource, with its FHIRPath.
pub fn for_each_reference(value: &mut Value, path: &str, f: &mut dyn FnMut(&mut String, &str)) {
    match value {
        Value::Object(obj) => {
            for (k, v) in obj.iter_mut() {
                let child = format!("{path}.{k}");
                if k == "reference"
                    && let Value::String(s) = v
                {
                    f(s, &child);
                } else {
                    for_each_reference(v, &child, f);
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                for_each_reference(v, &format!("{path}[{i}]"), f);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stamp_keeps_decimal_precision_and_key_order() {
        let mut r: Value = serde_json::from_str(
            r#"{"resourceType":"Observation","status":"final","valueQuantity":{"value":6.30,"unit":"mg/L"},"meta":{"profile":["x"]}}"#,
        )
        .unwrap();
        stamp(&mut r, "abc", 2, "2026-01-01T00:00:00Z");
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"resourceType":"Observation","id":"abc","meta":{"versionId":"2","lastUpdated":"2026-01-01T00:00:00Z","profile":["x"]},"status":"final","valueQuantity":{"value":6.30,"unit":"mg/L"}}"#
        );
    }

    #[test]
    fn missing_status_and_two_values_are_reported_with_paths() {
        let obs = json!({"resourceType": "Observation", "code": {"text": "x"}, "valueString": "a", "valueBoolean": true});
        let Err(ApiError::Invalid { issues, .. }) = validate(&obs) else {
            panic!("must be invalid")
        };
        let exprs: Vec<_> = issues.iter().filter_map(|i| i.expression.clone()).collect();
        assert!(
            exprs.contains(&"Observation.status".to_string()),
            "{issues:?}"
        );
        assert!(
            exprs.contains(&"Observation.value".to_string()),
            "{issues:?}"
        );
    }

    #[test]
    fn bad_code_for_required_binding_and_unknown_element() {
        let obs = json!({"resourceType": "Observation", "status": "banana", "code": {"text": "x"}});
        let Err(ApiError::Invalid { issues, .. }) = validate(&obs) else {
            panic!("must be invalid")
        };
        assert!(
            issues
                .iter()
                .any(|i| i.expression.as_deref() == Some("Observation.status")),
            "{issues:?}"
        );
        let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "colour": "red"});
        assert!(validate(&obs).is_err());
    }

    #[test]
    fn empty_objects_are_rejected() {
        let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {}});
        let Err(ApiError::Invalid { issues, .. }) = validate(&obs) else {
            panic!("must be invalid")
        };
        assert!(
            issues
                .iter()
                .any(|i| i.expression.as_deref() == Some("Observation.subject")),
            "{issues:?}"
        );
    }

    #[test]
    fn r4_invariants_are_checked() {
        // obs-6: dataAbsentReason only when there is no value
        let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "valueString": "a", "dataAbsentReason": {"text": "not done"}});
        let Err(ApiError::Invalid { issues, .. }) = validate(&obs) else {
            panic!("must be invalid")
        };
        assert!(
            issues.iter().any(|i| i.diagnostics.starts_with("obs-6")),
            "{issues:?}"
        );
        // per-1 inside a datatype: a Period whose end is before its start
        let enc = json!({"resourceType": "Encounter", "status": "finished", "class": {"code": "IMP"},
            "period": {"start": "2026-03-05", "end": "2026-03-01"}});
        let Err(ApiError::Invalid { issues, .. }) = validate(&enc) else {
            panic!("must be invalid")
        };
        assert_eq!(
            issues[0].expression.as_deref(),
            Some("Encounter.period"),
            "{issues:?}"
        );
        let (checked, skipped) = Definitions::get().structures.invariant_counts();
        assert!(
            checked > 50 && skipped < checked,
            "checked {checked}, skipped {skipped}"
        );
    }
}
