//! Laboratories' local codes: a code in an element the rules read, from a system no ConceptMap in
//! `terminology/` maps, is stored but reported back as a warning (SPEC.md §2.1), never ignored.
use serde_json::Value;

use crate::error::{Issue, Severity};
use crate::terminology::Terminology;

/// The elements the rules read, per resource type.
fn rule_elements(resource_type: &str) -> &'static [&'static str] {
    match resource_type {
        "Observation" => &["code", "valueCodeableConcept", "interpretation", "method"],
        "Specimen" => &["type"],
        "DiagnosticReport" => &["code"],
        _ => &[],
    }
}

/// Warnings for the unmapped local codes of one resource, with the FHIRPath of each element.
pub fn warnings(resource: &Value) -> Vec<Issue> {
    let Some(rt) = resource["resourceType"].as_str() else {
        return Vec::new();
    };
    let t = Terminology::get();
    let mut out = Vec::new();
    for element in rule_elements(rt) {
        let concepts: Vec<(String, &Value)> = match &resource[*element] {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{rt}.{element}[{i}]"), v))
                .collect(),
            Value::Object(_) => vec![(format!("{rt}.{element}"), &resource[*element])],
            _ => Vec::new(),
        };
        for (path, concept) in concepts {
            for (system, code) in t.unmapped_local_codes(concept) {
                out.push(Issue {
                    severity: Severity::Warning,
                    code: "code-invalid",
                    diagnostics: format!(
                        "the local code '{code}' of system '{system}' is not mapped by any ConceptMap in terminology/: \
                         the resource is stored, but the surveillance rules cannot read this element until the code is mapped"
                    ),
                    expression: Some(path.clone()),
                    details: None,
                });
            }
        }
    }
    out
}
