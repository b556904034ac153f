//! Italian identifiers and places (shared/DOMAIN.md §3).
pub mod codice_fiscale;
pub mod places;

use serde_json::Value;

use crate::error::Issue;

/// The identifier system of the codice fiscale (SPEC.md §2.1).
pub const CODICE_FISCALE: &str = "http://hl7.it/sid/codiceFiscale";

/// Italian rules on incoming resources: a Patient's codice fiscale must be valid (structure, month,
/// day, check character).
pub fn check(resource: &Value) -> Vec<Issue> {
    let rt = resource["resourceType"].as_str().unwrap_or_default();
    let mut issues = Vec::new();
    // the patient's identity is what the rules depend on; other resources are not held to it
    if rt != "Patient" {
        return issues;
    }
    for (i, ident) in resource["identifier"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if ident["system"] != CODICE_FISCALE {
            continue;
        }
        let value = ident["value"].as_str().unwrap_or_default();
        if let Err(e) = codice_fiscale::CodiceFiscale::parse(value) {
            issues.push(Issue::error(
                "value",
                format!("the codice fiscale '{value}' is not valid: {e}"),
                Some(format!("{rt}.identifier[{i}].value")),
            ));
        }
    }
    issues
}
