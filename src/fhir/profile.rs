//! Checking a resource against one of Sentinella's own profiles (`profiles/StructureDefinition-*.json`)
//! by its differential: cardinalities, extension slices by URL, patterns and required bindings to our
//! value sets. Hand-written because no maintained Rust crate validates FHIR profiles; it reads only the
//! constraint kinds our differentials use, and the base validation runs first.
use std::collections::HashMap;
use std::sync::OnceLock;

use include_dir::{Dir, include_dir};
use serde_json::Value;

use crate::terminology::Terminology;

static FOLDER: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/profiles");

/// Every resource of `kind` in `profiles/` (files named `<kind>-*.json`).
pub fn resources_of_kind(kind: &str) -> Vec<Value> {
    let prefix = format!("{kind}-");
    FOLDER
        .files()
        .filter(|f| {
            f.path()
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".json"))
        })
        .map(|f| {
            serde_json::from_slice::<Value>(f.contents())
                .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", f.path().display()))
        })
        .collect()
}

/// The JSON data files of `profiles/` whose names start with `prefix` (rule sets), with their names.
pub fn data_files(prefix: &str) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = FOLDER
        .files()
        .filter_map(|f| {
            let name = f.path().file_name()?.to_str()?.to_string();
            (name.starts_with(prefix) && name.ends_with(".json")).then_some(())?;
            let v = serde_json::from_slice(f.contents())
                .unwrap_or_else(|e| panic!("profiles/{name} is not valid JSON: {e}"));
            Some((name, v))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Our StructureDefinitions by canonical URL.
pub fn profiles() -> &'static HashMap<String, Value> {
    static P: OnceLock<HashMap<String, Value>> = OnceLock::new();
    P.get_or_init(|| {
        FOLDER
            .files()
            .filter(|f| {
                f.path()
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("StructureDefinition-") && n.ends_with(".json"))
            })
            .filter_map(|f| serde_json::from_slice::<Value>(f.contents()).ok())
            .filter_map(|sd| Some((sd["url"].as_str()?.to_string(), sd)))
            .collect()
    })
}

/// The values at a dotted path below the resource (arrays are flattened; `x[x]` matches `x*`).
fn values_at<'a>(root: &'a Value, path: &[&str]) -> Vec<&'a Value> {
    let mut current = vec![root];
    for step in path {
        let mut next = Vec::new();
        for v in current {
            let Some(obj) = v.as_object() else { continue };
            let found: Vec<&Value> = match step.strip_suffix("[x]") {
                Some(prefix) => obj
                    .iter()
                    .filter(|(k, _)| {
                        k.starts_with(prefix)
                            && k[prefix.len()..].starts_with(|c: char| c.is_ascii_uppercase())
                    })
                    .map(|(_, v)| v)
                    .collect(),
                None => obj.get(*step).into_iter().collect(),
            };
            for f in found {
                match f {
                    Value::Array(items) => next.extend(items.iter()),
                    other => next.push(other),
                }
            }
        }
        current = next;
    }
    current
}

/// Does `value` contain everything `pattern` has (FHIR pattern[x] semantics)?
fn matches_pattern(value: &Value, pattern: &Value) -> bool {
    match (value, pattern) {
        (Value::Object(v), Value::Object(p)) => p
            .iter()
            .all(|(k, pv)| v.get(k).is_some_and(|vv| matches_pattern(vv, pv))),
        (Value::Array(v), Value::Array(p)) => p
            .iter()
            .all(|pv| v.iter().any(|vv| matches_pattern(vv, pv))),
        (v, Value::Array(p)) => p.iter().all(|pv| matches_pattern(v, pv)),
        (v, p) => v == p,
    }
}

fn max_of(e: &Value) -> Option<usize> {
    match e["max"].as_str() {
        Some("*") | None => None,
        Some(n) => n.parse().ok(),
    }
}

/// Check `resource` against the profile `url`; every problem, with its path.
pub fn check(resource: &Value, url: &str) -> Result<(), Vec<String>> {
    let Some(sd) = profiles().get(url) else {
        return Err(vec![format!("unknown profile {url}")]);
    };
    let t = Terminology::get();
    let mut problems = Vec::new();
    for e in sd["differential"]["element"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(path) = e["path"].as_str() else {
            continue;
        };
        let steps: Vec<&str> = path.split('.').skip(1).collect();
        if steps.is_empty() {
            continue;
        }
        if let Some(choice) = steps.last().and_then(|l| l.strip_suffix("[x]")) {
            check_choice_types(e, path, resource, &steps, choice, &mut problems);
        }
        let mut values = values_at(resource, &steps);
        if e.get("sliceName").is_some() {
            // extension slices: the values carrying the slice's extension URL
            let Some(ext_url) = e["type"][0]["profile"][0].as_str() else {
                continue;
            };
            values.retain(|v| v["url"] == ext_url);
        } else if path.contains(".extension") || steps.len() > 1 {
            // elements below a repeating parent: check per parent, not across all of them
            let (parent, last) = steps.split_at(steps.len() - 1);
            for p in values_at(resource, parent) {
                check_count(e, path, values_at(p, last).len(), &mut problems);
            }
            check_values(e, path, &values, t, &mut problems);
            continue;
        }
        check_count(e, path, values.len(), &mut problems);
        check_values(e, path, &values, t, &mut problems);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// The element's cardinality (`min`, `max`) against `n` values.
fn check_count(e: &Value, path: &str, n: usize, problems: &mut Vec<String>) {
    let min = e["min"].as_u64().unwrap_or(0) as usize;
    if n < min {
        problems.push(format!(
            "{path}: {n} values, the profile requires at least {min}"
        ));
    }
    if let Some(max) = max_of(e)
        && n > max
    {
        problems.push(format!(
            "{path}: {n} values, the profile allows at most {max}"
        ));
    }
}

/// A choice element restricted to some types: `content[x]` with type string allows `contentString` only.
fn check_choice_types(
    e: &Value,
    path: &str,
    resource: &Value,
    steps: &[&str],
    choice: &str,
    problems: &mut Vec<String>,
) {
    let Some(types) = e["type"].as_array() else {
        return;
    };
    let allowed: Vec<String> = types
        .iter()
        .filter_map(|t| t["code"].as_str())
        .map(|c| {
            let mut chars = c.chars();
            chars
                .next()
                .map(|f| f.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect();
    for parent in values_at(resource, &steps[..steps.len() - 1]) {
        for key in parent.as_object().into_iter().flat_map(|o| o.keys()) {
            if let Some(suffix) = key.strip_prefix(choice)
                && suffix.starts_with(|c: char| c.is_ascii_uppercase())
                && !allowed.iter().any(|a| a == suffix)
            {
                problems.push(format!(
                    "{path}: {key} is not allowed, the profile allows {}",
                    allowed.join(", ")
                ));
            }
        }
    }
}

fn check_values(
    e: &Value,
    path: &str,
    values: &[&Value],
    t: &Terminology,
    problems: &mut Vec<String>,
) {
    if let Some(obj) = e.as_object() {
        for (k, pattern) in obj
            .iter()
            .filter(|(k, _)| k.starts_with("pattern") || k.starts_with("fixed"))
        {
            for v in values {
                if !matches_pattern(v, pattern) {
                    problems.push(format!("{path}: does not match the profile's {k}"));
                }
            }
        }
    }
    if e["binding"]["strength"] == "required"
        && let Some(vs) = e["binding"]["valueSet"].as_str()
        && t.has_value_set(vs)
    {
        for v in values {
            let codes = t.standard_codes(v);
            let codes = if codes.is_empty() && v.get("code").is_some() {
                // a Coding rather than a CodeableConcept
                t.standard_codes(&serde_json::json!({"coding": [v]}))
            } else {
                codes
            };
            if !codes.iter().any(|c| t.in_value_set(vs, c)) {
                problems.push(format!("{path}: no code from the required value set {vs}"));
            }
        }
    }
}

/// What the server emits as a case notification must meet the base specification and our profile.
pub fn check_notifica_caso(resource: &Value) -> Result<(), String> {
    if let Err(e) = super::resource::validate(resource) {
        let issues: Vec<String> = e.issues().iter().map(|i| i.diagnostics.clone()).collect();
        return Err(format!(
            "the case notification is not valid FHIR: {}",
            issues.join("; ")
        ));
    }
    check(
        resource,
        &format!(
            "{}/StructureDefinition/notifica-caso",
            crate::terminology::CANON
        ),
    )
    .map_err(|p| {
        format!(
            "the case notification does not meet notifica-caso: {}",
            p.join("; ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn case() -> Value {
        let canon = crate::terminology::CANON;
        json!({
            "resourceType": "Communication",
            "id": "c1",
            "meta": {"profile": [format!("{canon}/StructureDefinition/notifica-caso")]},
            "extension": [{"url": format!("{canon}/StructureDefinition/definizione-caso"),
                           "valueCanonical": format!("{canon}/definizione-caso/cre|1.0.0")}],
            "identifier": [{"system": format!("{canon}/sid/caso"), "value": "c1"}],
            "status": "completed",
            "category": [{"coding": [{"system": format!("{canon}/CodeSystem/tipo-notifica"), "code": "cre"}]}],
            "priority": "routine",
            "subject": {"reference": "Patient/p1"},
            "about": [{"reference": "Observation/o1"}],
            "sent": "2026-03-04T12:00:00+01:00",
            "recipient": [{"identifier": {"system": format!("{canon}/sid/ente"), "value": "ISS"}}],
            "reasonCode": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-9-cm", "code": "041.3"}]}],
            "payload": [{"contentString": "Batteriemia da Klebsiella pneumoniae"}]
        })
    }

    #[test]
    fn a_complete_case_meets_notifica_caso() {
        assert_eq!(check_notifica_caso(&case()), Ok(()));
    }

    #[test]
    fn notifica_caso_requires_its_elements_patterns_and_bindings() {
        let mut c = case();
        c.as_object_mut().unwrap().shift_remove("sent");
        assert!(
            check_notifica_caso(&c)
                .unwrap_err()
                .contains("Communication.sent")
        );

        let mut c = case();
        c["identifier"][0]["system"] = json!("urn:other");
        assert!(
            check_notifica_caso(&c)
                .unwrap_err()
                .contains("Communication.identifier")
        );

        let mut c = case();
        c["category"][0]["coding"][0]["code"] = json!("not-a-category");
        assert!(
            check_notifica_caso(&c)
                .unwrap_err()
                .contains("Communication.category")
        );

        let mut c = case();
        c["extension"] = json!([{"url": "urn:x", "valueString": "y"}]);
        assert!(
            check_notifica_caso(&c)
                .unwrap_err()
                .contains("Communication.extension")
        );

        let mut c = case();
        c["payload"] =
            json!([{"contentAttachment": {"contentType": "text/plain", "data": "eA=="}}]);
        assert!(check_notifica_caso(&c).is_err());
    }
}
