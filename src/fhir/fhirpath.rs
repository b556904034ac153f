//! The small subset of FHIRPath used by the R4 SearchParameter expressions of the served types:
//! `A.b.c`, `A.b.where(resolve() is T)`, `A.b.where(system='U')`, `A.b.ofType(T)`, `(A.b as T)`,
//! joined by `|` (`where(system=…)` serves Sentinella's own SearchParameters in `profiles/`).
//! Hand-written because no maintained FHIRPath crate builds with our toolchain (shared/DEPENDENCIES.md);
//! an expression outside this subset is reported at load time and its parameter is not offered.
use std::collections::HashSet;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// An element; `choice` also matches `nameType` keys of a `name[x]` element.
    Field(String),
    /// An exact choice key (`effectiveDateTime`) from `ofType` / `as`.
    Exact(String),
    /// Keep References that point to a resource of this type.
    ResolveIs(String),
    /// Keep the elements whose primitive child has this value: `where(system='…')` keeps
    /// Identifiers or Codings of a system, `where(url='…')` extensions of a URL.
    ChildIs(String, String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PathExpr {
    pub resource_type: String,
    steps: Vec<Step>,
}

/// Parse the union parts of an expression that apply to `resource_type`.
/// Err(part) names the first part outside the supported subset.
pub fn parse_for_type(expression: &str, resource_type: &str) -> Result<Vec<PathExpr>, String> {
    let mut out = Vec::new();
    for part in split_union(expression) {
        let part = part.trim();
        let part = match part.strip_prefix('(').and_then(|p| p.strip_suffix(')')) {
            Some(inner) => inner.trim(),
            None => part,
        };
        let head = part.split(['.', ' ']).next().unwrap_or_default();
        if head != resource_type {
            continue;
        }
        out.push(parse_part(part).ok_or_else(|| part.to_string())?);
    }
    Ok(out)
}

fn split_union(expression: &str) -> Vec<&str> {
    let (mut depth, mut start, mut parts) = (0i32, 0usize, Vec::new());
    for (i, ch) in expression.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            '|' if depth == 0 => {
                parts.push(&expression[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&expression[start..]);
    parts
}

fn parse_part(part: &str) -> Option<PathExpr> {
    let (path, as_type) = match part.split_once(" as ") {
        Some((p, t)) => (p.trim(), Some(t.trim())),
        None => (part, None),
    };
    let mut segments = split_dots(path).into_iter();
    // a type name, not `Observation Condition` (two words the head check saw as `Observation`)
    let resource_type = segments
        .next()
        .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric()))?
        .to_string();
    let mut steps = Vec::new();
    for seg in segments {
        if let Some(inner) = seg
            .strip_prefix("where(resolve() is ")
            .and_then(|s| s.strip_suffix(')'))
        {
            steps.push(Step::ResolveIs(inner.trim().to_string()));
        } else if let Some((field, value)) = child_is(seg) {
            steps.push(Step::ChildIs(field.to_string(), value.to_string()));
        } else if let Some(t) = seg
            .strip_prefix("ofType(")
            .and_then(|s| s.strip_suffix(')'))
        {
            make_exact(&mut steps, t)?;
        } else if seg.chars().all(|c| c.is_ascii_alphanumeric()) && !seg.is_empty() {
            steps.push(Step::Field(seg.to_string()));
        } else {
            return None;
        }
    }
    if let Some(t) = as_type {
        make_exact(&mut steps, t)?;
    }
    (!steps.is_empty()).then_some(PathExpr {
        resource_type,
        steps,
    })
}

/// `where(system='…')` or `where(url='…')`: the child and the value it must have.
fn child_is(seg: &str) -> Option<(&str, &str)> {
    let inner = seg.strip_prefix("where(")?.strip_suffix(')')?;
    let (field, value) = inner.split_once('=')?;
    let field = field.trim();
    let value = value.trim().strip_prefix('\'')?.strip_suffix('\'')?;
    (matches!(field, "system" | "url") && !value.contains('\'')).then_some((field, value))
}

fn make_exact(steps: &mut [Step], type_name: &str) -> Option<()> {
    let Some(Step::Field(name)) = steps.last() else {
        return None;
    };
    let mut t = type_name.chars();
    let upper = t.next()?.to_ascii_uppercase().to_string() + t.as_str();
    *steps.last_mut()? = Step::Exact(format!("{name}{upper}"));
    Some(())
}

fn split_dots(path: &str) -> Vec<&str> {
    let (mut depth, mut start, mut parts) = (0i32, 0usize, Vec::new());
    for (i, ch) in path.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            '.' if depth == 0 => {
                parts.push(&path[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&path[start..]);
    parts
}

impl PathExpr {
    /// The same path without a final `where(resolve() is T)`, and `T`.
    pub fn without_resolve_is(&self) -> Option<(PathExpr, &str)> {
        match self.steps.last()? {
            Step::ResolveIs(t) => Some((
                PathExpr {
                    resource_type: self.resource_type.clone(),
                    steps: self.steps[..self.steps.len() - 1].to_vec(),
                },
                t.as_str(),
            )),
            _ => None,
        }
    }

    /// Evaluate on a resource; `type_suffixes` are the capitalised R4 type names that may end a
    /// choice key (`valueQuantity`), so `status` never matches `statusReason`.
    pub fn evaluate<'a>(
        &self,
        resource: &'a Value,
        type_suffixes: &HashSet<String>,
    ) -> Vec<&'a Value> {
        let mut nodes = vec![resource];
        for step in &self.steps {
            let mut next = Vec::new();
            for node in nodes {
                match step {
                    Step::Field(name) => {
                        let Some(obj) = node.as_object() else {
                            continue;
                        };
                        for (k, v) in obj {
                            let matches = k == name
                                || k.strip_prefix(name.as_str())
                                    .is_some_and(|rest| type_suffixes.contains(rest));
                            if matches {
                                push_flat(&mut next, v);
                            }
                        }
                    }
                    Step::Exact(key) => {
                        if let Some(v) = node.get(key) {
                            push_flat(&mut next, v);
                        }
                    }
                    Step::ResolveIs(t) => {
                        if reference_type(node).as_deref() == Some(t.as_str()) {
                            next.push(node);
                        }
                    }
                    Step::ChildIs(field, value) => {
                        if node[field.as_str()].as_str() == Some(value.as_str()) {
                            next.push(node);
                        }
                    }
                }
            }
            nodes = next;
        }
        nodes
    }
}

fn push_flat<'a>(out: &mut Vec<&'a Value>, v: &'a Value) {
    match v {
        Value::Array(items) => out.extend(items.iter()),
        other => out.push(other),
    }
}

/// The resource type a Reference points to: from `type`, else from `reference` (`Patient/1`,
/// `http://host/fhir/Patient/1`, `Patient/1/_history/2`).
pub fn reference_type(reference: &Value) -> Option<String> {
    if let Some(t) = reference.get("type").and_then(Value::as_str) {
        return Some(t.to_string());
    }
    let r = reference.get("reference")?.as_str()?;
    let path = r.split_once("://").map_or(r, |(_, rest)| rest);
    split_reference(path).map(|(t, _)| t.to_string())
}

/// `(type, id)` of a literal reference, relative or absolute, ignoring `/_history/n`.
pub fn split_reference(r: &str) -> Option<(&str, &str)> {
    if r.starts_with('#') || r.starts_with("urn:") {
        return None;
    }
    // a reference to another server is not one of ours: `http://elsewhere/fhir/Patient/123` is
    // not the local Patient/123 (indexed as the URL itself, never followed)
    if r.contains("://") {
        return None;
    }
    let r = match r.find("/_history/") {
        Some(i) => &r[..i],
        None => r,
    };
    let mut it = r.rsplit('/');
    let id = it.next()?;
    let t = it.next()?;
    (t.starts_with(|c: char| c.is_ascii_uppercase()) && !id.is_empty()).then_some((t, id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn suffixes() -> HashSet<String> {
        ["DateTime", "Period", "Quantity", "String"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn union_parts_for_one_type_only() {
        let e = "AllergyIntolerance.code | Condition.code | (Observation.effective as dateTime) | Observation.code";
        let parts = parse_for_type(e, "Observation").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            parts[0].steps,
            vec![Step::Exact("effectiveDateTime".into())]
        );
    }

    #[test]
    fn choice_field_does_not_match_other_elements() {
        let p = &parse_for_type("Communication.status", "Communication").unwrap()[0];
        let r = json!({"status": "completed", "statusReason": {"text": "x"}});
        assert_eq!(p.evaluate(&r, &suffixes()), vec![&json!("completed")]);
        let p = &parse_for_type("Observation.effective", "Observation").unwrap()[0];
        let r = json!({"effectivePeriod": {"start": "2024"}});
        assert_eq!(p.evaluate(&r, &suffixes()).len(), 1);
    }

    #[test]
    fn resolve_is_filters_reference_targets() {
        let p = &parse_for_type(
            "Observation.subject.where(resolve() is Patient)",
            "Observation",
        )
        .unwrap()[0];
        let r = json!({"subject": {"reference": "Patient/1"}});
        assert_eq!(p.evaluate(&r, &suffixes()).len(), 1);
        let r = json!({"subject": {"reference": "http://x/fhir/Group/1/_history/3"}});
        assert!(p.evaluate(&r, &suffixes()).is_empty());
    }

    #[test]
    fn where_system_keeps_that_system_only() {
        let p = parse_for_type(
            "Communication.recipient.identifier.where(system='urn:r')",
            "Communication",
        )
        .unwrap();
        let c = serde_json::json!({"resourceType": "Communication", "recipient": [
            {"identifier": {"system": "urn:a", "value": "1"}},
            {"identifier": {"system": "urn:r", "value": "030"}}]});
        let found = p[0].evaluate(&c, &suffixes());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0]["value"], "030");
    }

    #[test]
    fn where_url_keeps_that_extension_only() {
        let p = parse_for_type(
            "MeasureReport.extension.where(url='https://x.org/a.b').value",
            "MeasureReport",
        )
        .unwrap();
        let r = serde_json::json!({"resourceType": "MeasureReport", "extension": [
            {"url": "https://x.org/other", "valueString": "1"},
            {"url": "https://x.org/a.b", "valueString": "030"}]});
        let found = p[0].evaluate(&r, &suffixes());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0], "030");
    }

    #[test]
    fn a_head_of_two_words_is_outside_the_subset() {
        // found by the fhirpath fuzz target (fuzz/artifacts-found/fhirpath/crash-ca0bbadc…)
        assert_eq!(
            parse_for_type(
                "Observation Condition.ode | Observation.code",
                "Observation"
            ),
            Err("Observation Condition.ode".to_string())
        );
    }

    #[test]
    fn unsupported_functions_are_reported() {
        assert!(
            parse_for_type(
                "Patient.deceased.exists() and Patient.deceased != false",
                "Patient"
            )
            .is_err()
        );
    }
}
