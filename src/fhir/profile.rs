//! Checking a resource against one of Sentinella's own profiles (`profiles/StructureDefinition-*.json`)
//! by its differential: cardinalities, extension slices by URL, patterns and required bindings to our
//! value sets. Hand-written because no maintained Rust crate validates FHIR profiles; it reads only the
//! constraint kinds our differentials use, and the base validation runs first.
use std::collections::HashMap;
use std::sync::OnceLock;

use include_dir::{Dir, include_dir};
use serde_json::Value;

use crate::error::{Issue, Severity};
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

/// One step of an element id: `extension:tipo` is the step `extension` restricted to the slice `tipo`.
#[derive(Debug, Clone, Copy)]
struct Step<'a> {
    name: &'a str,
    slice: Option<&'a str>,
}

/// The steps of an element id below its root (`Extension.extension:tipo.value[x]`).
fn steps_of(id: &str) -> Vec<Step<'_>> {
    id.split('.')
        .skip(1)
        .map(|s| match s.split_once(':') {
            Some((name, slice)) => Step {
                name,
                slice: Some(slice),
            },
            None => Step {
                name: s,
                slice: None,
            },
        })
        .collect()
}

/// How the members of a slice are told apart from the other values of the element.
enum Discriminator<'a> {
    /// Extensions: by `url` (an extension slice names its profile; a complex extension's part
    /// fixes its `url`).
    Url(&'a str),
    /// A pattern the members contain.
    Pattern(&'a Value),
}

/// The discriminators of every slice of a profile, by the slice's element id.
fn discriminators(elements: &[Value]) -> HashMap<&str, Discriminator<'_>> {
    let mut out = HashMap::new();
    for e in elements {
        let Some(id) = e["id"].as_str() else { continue };
        if e.get("sliceName").is_some() {
            if let Some(url) = e["type"][0]["profile"][0].as_str() {
                out.insert(id, Discriminator::Url(url));
            } else if let Some((_, p)) = e
                .as_object()
                .into_iter()
                .flatten()
                .find(|(k, _)| k.starts_with("pattern"))
            {
                out.insert(id, Discriminator::Pattern(p));
            }
        }
        if let (Some(slice), Some(url)) = (id.strip_suffix(".url"), e["fixedUri"].as_str()) {
            out.entry(slice).or_insert(Discriminator::Url(url));
        }
    }
    out
}

/// The values at `steps` below `root`, keeping only the members of each slice named on the way
/// (arrays are flattened; `x[x]` matches `x*`). `None` when a slice's members cannot be told.
fn values_at<'a>(
    root: &'a Value,
    steps: &[Step],
    root_id: &str,
    slices: &HashMap<&str, Discriminator>,
) -> Option<Vec<&'a Value>> {
    let mut current = vec![root];
    let mut id = root_id.to_string();
    for step in steps {
        id.push('.');
        id.push_str(step.name);
        let mut next = Vec::new();
        for v in current {
            let Some(obj) = v.as_object() else { continue };
            let found: Vec<&Value> = match step.name.strip_suffix("[x]") {
                Some(prefix) => obj
                    .iter()
                    .filter(|(k, _)| {
                        k.starts_with(prefix)
                            && k[prefix.len()..].starts_with(|c: char| c.is_ascii_uppercase())
                    })
                    .map(|(_, v)| v)
                    .collect(),
                None => obj.get(step.name).into_iter().collect(),
            };
            for f in found {
                match f {
                    Value::Array(items) => next.extend(items.iter()),
                    other => next.push(other),
                }
            }
        }
        if let Some(slice) = step.slice {
            id.push(':');
            id.push_str(slice);
            match slices.get(id.as_str())? {
                Discriminator::Url(url) => next.retain(|v| v["url"] == *url),
                Discriminator::Pattern(p) => next.retain(|v| matches_pattern(v, p)),
            }
        }
        current = next;
    }
    Some(current)
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

/// One way a resource falls short of a profile: where (the element's path in the profile) and
/// what. A warning does not stop the resource (an extensible binding not met).
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub path: String,
    pub message: String,
    pub warning: bool,
}

impl Problem {
    fn error(path: &str, message: String) -> Self {
        Problem {
            path: path.to_string(),
            message,
            warning: false,
        }
    }

    pub fn to_issue(&self, profile: &str) -> Issue {
        let mut i = Issue::error(
            if self.warning {
                "code-invalid"
            } else {
                "invariant"
            },
            format!("{}: {} (profile {profile})", self.path, self.message),
            Some(self.path.clone()),
        );
        if self.warning {
            i.severity = Severity::Warning;
        }
        i
    }
}

/// Check `resource` against the profile `url`; every problem, with its path.
pub fn check(resource: &Value, url: &str) -> Result<(), Vec<String>> {
    let Some(problems) = problems(resource, url) else {
        return Err(vec![format!("unknown profile {url}")]);
    };
    let errors: Vec<String> = problems
        .into_iter()
        .filter(|p| !p.warning)
        .map(|p| format!("{}: {}", p.path, p.message))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Every problem of `resource` against the profile `url`, or `None` for a profile we do not have.
pub fn problems(resource: &Value, url: &str) -> Option<Vec<Problem>> {
    let sd = profiles().get(url.split('|').next().unwrap_or(url))?;
    let t = Terminology::get();
    let root = sd["type"].as_str().unwrap_or_default();
    let empty = Vec::new();
    let elements = sd["differential"]["element"].as_array().unwrap_or(&empty);
    let slices = discriminators(elements);
    let mut problems = Vec::new();
    for e in elements {
        let (Some(path), Some(id)) = (e["path"].as_str(), e["id"].as_str()) else {
            continue;
        };
        let steps = steps_of(id);
        let Some((last, parent)) = steps.split_last() else {
            continue;
        };
        // the values of each parent the element lives in, counted per parent
        let Some(parents) = values_at(resource, parent, root, &slices) else {
            continue;
        };
        let mut values = Vec::new();
        for p in parents {
            let Some(here) = values_at(p, std::slice::from_ref(last), &parent_id(id), &slices)
            else {
                break;
            };
            check_count(e, path, here.len(), &mut problems);
            if let Some(choice) = last.name.strip_suffix("[x]") {
                check_choice_types(e, path, p, choice, &mut problems);
            }
            values.extend(here);
        }
        check_values(e, path, &values, t, &mut problems);
    }
    Some(problems)
}

/// The id of an element's parent (`Extension.extension:tipo.value[x]` → `Extension.extension:tipo`).
fn parent_id(id: &str) -> String {
    id.rsplit_once('.').map_or(id, |(p, _)| p).to_string()
}

/// The element's cardinality (`min`, `max`) against `n` values.
fn check_count(e: &Value, path: &str, n: usize, problems: &mut Vec<Problem>) {
    let min = e["min"].as_u64().unwrap_or(0) as usize;
    if n < min {
        problems.push(Problem::error(
            path,
            format!("{n} values, the profile requires at least {min}"),
        ));
    }
    if let Some(max) = max_of(e)
        && n > max
    {
        problems.push(Problem::error(
            path,
            format!("{n} values, the profile allows at most {max}"),
        ));
    }
}

/// A choice element restricted to some types: `content[x]` with type string allows `contentString` only.
fn check_choice_types(
    e: &Value,
    path: &str,
    parent: &Value,
    choice: &str,
    problems: &mut Vec<Problem>,
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
    for key in parent.as_object().into_iter().flat_map(|o| o.keys()) {
        if let Some(suffix) = key.strip_prefix(choice)
            && suffix.starts_with(|c: char| c.is_ascii_uppercase())
            && !allowed.iter().any(|a| a == suffix)
        {
            problems.push(Problem::error(
                path,
                format!(
                    "{key} is not allowed, the profile allows {}",
                    allowed.join(", ")
                ),
            ));
        }
    }
}

fn check_values(
    e: &Value,
    path: &str,
    values: &[&Value],
    t: &Terminology,
    problems: &mut Vec<Problem>,
) {
    // a slice's own pattern is what made its members: nothing more to check there
    let is_slice = e.get("sliceName").is_some();
    if let Some(obj) = e.as_object() {
        for (k, pattern) in obj
            .iter()
            .filter(|(k, _)| (k.starts_with("pattern") && !is_slice) || k.starts_with("fixed"))
        {
            for v in values {
                if !matches_pattern(v, pattern) {
                    problems.push(Problem::error(
                        path,
                        format!("does not match the profile's {k}"),
                    ));
                }
            }
        }
    }
    let strength = e["binding"]["strength"].as_str();
    let Some(vs) = e["binding"]["valueSet"].as_str() else {
        return;
    };
    if !matches!(strength, Some("required" | "extensible")) || !t.has_value_set(vs) {
        return;
    }
    for v in values {
        if in_value_set(v, vs, t) {
            continue;
        }
        problems.push(match strength {
            Some("required") => {
                Problem::error(path, format!("no code from the required value set {vs}"))
            }
            _ => Problem {
                path: path.to_string(),
                message: format!(
                    "no code from the extensible value set {vs}: use one of its codes when one fits"
                ),
                warning: true,
            },
        });
    }
}

/// Is a coded value (a CodeableConcept, a Coding or a bare code) in the value set?
fn in_value_set(v: &Value, vs: &str, t: &Terminology) -> bool {
    if let Some(code) = v.as_str() {
        return t.value_set_codes(vs).iter().any(|(_, c)| c == code);
    }
    let codes = t.standard_codes(v);
    let codes = if codes.is_empty() && v.get("code").is_some() {
        // a Coding rather than a CodeableConcept
        t.standard_codes(&serde_json::json!({"coding": [v]}))
    } else {
        codes
    };
    codes.iter().any(|c| t.in_value_set(vs, c))
}

/// Is `url` one of our profiles (resource or extension)?
pub fn is_ours(url: &str) -> bool {
    profiles().contains_key(url.split('|').next().unwrap_or(url))
}

/// What a resource owes our profiles: every profile of ours its `meta.profile` claims (and
/// `also`, a profile a sender asked to validate against), and every extension of ours it carries,
/// checked against that extension's definition. Issues carry the path of the element.
pub fn conformance_issues(resource: &Value, also: Option<&str>) -> Vec<Issue> {
    let mut issues = Vec::new();
    let mut claimed: Vec<&str> = resource["meta"]["profile"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|u| is_ours(u))
        .collect();
    if let Some(a) = also
        && !claimed.contains(&a)
    {
        claimed.push(a);
    }
    for url in claimed {
        for p in problems(resource, url).unwrap_or_default() {
            issues.push(p.to_issue(url));
        }
    }
    let rt = resource["resourceType"].as_str().unwrap_or_default();
    extension_issues(resource, rt, &mut issues, 0);
    issues
}

/// Extensions are checked wherever they are, to the depth a parsed body can have.
fn extension_issues(v: &Value, path: &str, issues: &mut Vec<Issue>, depth: usize) {
    if depth > 64 {
        return;
    }
    match v {
        Value::Object(obj) => {
            for (k, child) in obj {
                let here = format!("{path}.{k}");
                if matches!(k.as_str(), "extension" | "modifierExtension")
                    && let Some(items) = child.as_array()
                {
                    for (i, ext) in items.iter().enumerate() {
                        let at = format!("{here}[{i}]");
                        if let Some(url) = ext["url"].as_str()
                            && profiles()
                                .get(url)
                                .is_some_and(|sd| sd["type"] == "Extension")
                        {
                            for p in problems(ext, url).unwrap_or_default() {
                                let mut issue = p.to_issue(url);
                                let inner = p.path.strip_prefix("Extension").unwrap_or("");
                                issue.expression = Some(format!("{at}{inner}"));
                                issues.push(issue);
                            }
                        }
                        extension_issues(ext, &at, issues, depth + 1);
                    }
                    continue;
                }
                extension_issues(child, &here, issues, depth + 1);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                extension_issues(item, &format!("{path}[{i}]"), issues, depth + 1);
            }
        }
        _ => {}
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
