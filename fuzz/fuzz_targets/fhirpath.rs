//! The FHIRPath subset (`sentinella::fhir::fhirpath`) and the search-index extraction built on it,
//! which runs on every resource written.
//!
//! Input: a FHIRPath expression on the first line, a JSON resource after it (a fixture
//! Observation when the rest is not JSON). The expression is parsed for the type it names, evaluated
//! on the resource, and also loaded as the expression of a SearchParameter of each kind through the
//! real registry (`SearchParamRegistry::from_resources`); the resource is indexed by the packaged
//! R4 parameters (`extract`, `extract_all`).
//! Asserts: no panic and no stack overflow on the server's 2 MiB stack; a parsed path belongs to
//! the type it was parsed for; a `where(resolve() is T)` step keeps a subset of what the path
//! without it finds, all of them references to a T; `split_reference` yields a capitalised type and
//! a non-empty id taken from the input; index entries name a parameter of the resource's type and
//! stored text stays within `MAX_INDEXED_BYTES`.
#![no_main]

mod common;

use std::collections::HashSet;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sentinella::fhir::Definitions;
use sentinella::fhir::fhirpath::{parse_for_type, reference_type, split_reference};
use sentinella::fhir::search_params::{
    IndexValue, MAX_INDEXED_BYTES, SearchParamRegistry, is_type_suffix,
};
use serde_json::{Value, json};

const DEFAULT_RESOURCE: &str = r##"{"resourceType":"Observation","status":"final",
 "category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory"}]}],
 "code":{"coding":[{"system":"http://loinc.org","code":"600-7"}]},
 "subject":{"reference":"Patient/p1"},"effectiveDateTime":"2026-03-02T08:15:00+01:00",
 "specimen":{"reference":"http://elsewhere.example/fhir/Specimen/s1/_history/2"},
 "hasMember":[{"reference":"Observation/o2"},{"reference":"#c1"},{"type":"Observation","reference":"urn:uuid:1"}],
 "valueCodeableConcept":{"coding":[{"system":"http://snomed.info/sct","code":"56415008"}],"text":"Klebsiella"}}"##;

/// Every R4 data type name `is_type_suffix` knows (the registry's own set).
fn type_suffixes() -> &'static HashSet<String> {
    static SET: OnceLock<HashSet<String>> = OnceLock::new();
    SET.get_or_init(|| {
        [
            "Base64Binary",
            "Boolean",
            "Canonical",
            "Code",
            "Date",
            "DateTime",
            "Decimal",
            "Id",
            "Instant",
            "Integer",
            "Markdown",
            "Oid",
            "PositiveInt",
            "String",
            "Time",
            "UnsignedInt",
            "Uri",
            "Url",
            "Uuid",
            "Address",
            "Age",
            "Annotation",
            "Attachment",
            "CodeableConcept",
            "Coding",
            "ContactPoint",
            "Count",
            "Distance",
            "Duration",
            "HumanName",
            "Identifier",
            "Money",
            "Period",
            "Quantity",
            "Range",
            "Ratio",
            "Reference",
            "SampledData",
            "Signature",
            "Timing",
            "ContactDetail",
            "Contributor",
            "DataRequirement",
            "Expression",
            "ParameterDefinition",
            "RelatedArtifact",
            "TriggerDefinition",
            "UsageContext",
            "Dosage",
            "Meta",
        ]
        .into_iter()
        .filter(|t| is_type_suffix(t))
        .map(String::from)
        .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let (expr, rest) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(expr) = std::str::from_utf8(expr) else {
        return; // expressions are JSON strings in SearchParameter resources
    };
    // the server never indexes what serde_json refused (nesting is bounded at 128 there too)
    let resource: Value = serde_json::from_slice(rest)
        .unwrap_or_else(|_| serde_json::from_str(DEFAULT_RESOURCE).expect("the default resource"));
    common::on_server_stack(|| check(expr, &resource));
});

fn check(expr: &str, resource: &Value) {
    let head = expr.trim().trim_start_matches('(');
    let head = head.split(['.', ' ', '|', ')']).next().unwrap_or_default();
    let rt = if sentinella::fhir::is_served(head) {
        head
    } else {
        resource["resourceType"].as_str().unwrap_or("Observation")
    };
    if let Ok(paths) = parse_for_type(expr, rt) {
        for path in &paths {
            assert_eq!(path.resource_type, rt, "a path of another type: {path:?}");
            let found = path.evaluate(resource, type_suffixes());
            if let Some((without, target)) = path.without_resolve_is() {
                let wider = without.evaluate(resource, type_suffixes());
                for node in &found {
                    assert!(
                        wider.iter().any(|w| std::ptr::eq(*w, *node)),
                        "where(resolve() is {target}) found a node the path without it does not"
                    );
                    assert_eq!(reference_type(node).as_deref(), Some(target));
                }
            }
        }
    }
    if let Some((t, id)) = split_reference(expr) {
        assert!(
            t.starts_with(|c: char| c.is_ascii_uppercase()),
            "type {t:?}"
        );
        assert!(
            !id.is_empty() && !id.contains('/') && !t.contains('/'),
            "{t:?}/{id:?}"
        );
        assert!(expr.contains(t) && expr.contains(id));
    }
    let _ = reference_type(resource);

    // the expression as a SearchParameter of each kind, through the real registry
    let params: Vec<Value> = ["token", "reference", "date", "string", "uri"]
        .iter()
        .map(|kind| {
            json!({"resourceType": "SearchParameter", "code": format!("fuzz-{kind}"),
                "url": format!("urn:fuzz:{kind}"), "type": kind, "base": [rt],
                "expression": expr, "target": ["Patient"]})
        })
        .collect();
    let registry = SearchParamRegistry::from_resources(&params);
    check_entries(&registry, resource);

    check_entries(&Definitions::get().search, resource);
}

fn check_entries(registry: &SearchParamRegistry, resource: &Value) {
    let Some(rt) = resource["resourceType"].as_str() else {
        assert!(registry.extract(resource).is_empty());
        return;
    };
    for entry in registry.extract(resource) {
        assert!(
            registry.get(rt, &entry.param).is_some(),
            "an index entry for {}, no parameter of {rt}",
            entry.param
        );
        if let IndexValue::Text { system, value } = &entry.value {
            assert!(
                value.len() <= MAX_INDEXED_BYTES,
                "an indexed value of {} bytes",
                value.len()
            );
            assert!(system.as_ref().is_none_or(|s| s.len() <= MAX_INDEXED_BYTES));
        }
    }
    for entry in registry.extract_all(resource) {
        assert!(registry.get(rt, &entry.param).is_some());
    }
}
