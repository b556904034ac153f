//! The official R4 JSON schema (fhir/r4/fhir.schema.json), one compiled validator per resource type so
//! that errors carry exact paths (against the whole schema every error collapses into one `oneOf`).
//!
//! Every place where the schema embeds a resource (`contained`, `Bundle.entry.resource`,
//! `Bundle.entry.response.outcome`, `Parameters.parameter.resource`) is a `$ref` to `ResourceList`, a
//! `oneOf` over all 146 resource types: through it each per-type validator reached 678 of the 680
//! definitions (about 18 MB compiled, each). Those links are cut before compiling (an embedded resource
//! only has to be an object there), each validator embeds only the definitions its type reaches
//! (56–63), and the embedded resources are validated one by one against their own type, with their
//! own path (`Observation.contained[0].status`). The schema is never parsed whole: each definition is
//! kept as its text in the embedded file and parsed only while a validator that needs it is compiled.
use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use jsonschema::error::ValidationErrorKind;
use jsonschema::paths::LocationSegment;
use jsonschema::{Draft, Validator};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::error::Issue;

const SCHEMA: &str = include_str!("../../fhir/r4/fhir.schema.json");

/// Types that can be validated at the top level: those served plus the envelopes the API accepts.
const VALIDATED: &[&str] = &["Bundle", "Parameters"];

const DEFINITIONS: &str = "#/definitions/";
const RESOURCE_LIST: &str = "ResourceList";

pub struct SchemaValidators {
    /// Each definition of the schema as its JSON text, borrowed from the embedded file.
    definitions: HashMap<&'static str, &'static RawValue>,
    /// The names of all R4 resource types (`ResourceList`).
    resource_types: HashSet<String>,
    /// Served types and envelopes, compiled at start (`warm_up`).
    validators: HashMap<&'static str, OnceLock<Validator>>,
    /// Every other R4 resource type, met only inside another resource (a contained Device): one
    /// validator that dispatches on `resourceType`, compiled the first time such a resource comes.
    /// One for all keeps its memory bounded (about 12 MB, 20 MB of RSS with the transient parse)
    /// whatever types clients send; a validator per type would be ~0.6 MB each, up to 80 MB.
    others: OnceLock<Validator>,
}

impl SchemaValidators {
    /// The process-wide validators: the definitions are indexed here, the validators compiled by
    /// `warm_up` (at server start) or on first use.
    pub fn get() -> &'static SchemaValidators {
        static V: OnceLock<SchemaValidators> = OnceLock::new();
        V.get_or_init(|| {
            let top: HashMap<&'static str, &'static RawValue> =
                serde_json::from_str(SCHEMA).unwrap_or_else(invalid);
            let definitions: HashMap<&'static str, &'static RawValue> = top
                .get("definitions")
                .map(|d| serde_json::from_str(d.get()).unwrap_or_else(invalid))
                .expect("packaged R4 schema has definitions");
            let resource_types = definitions
                .get(RESOURCE_LIST)
                .map(|l| serde_json::from_str::<Value>(l.get()).unwrap_or_else(invalid))
                .and_then(|l| {
                    let refs = l["oneOf"].as_array()?.iter();
                    Some(
                        refs.filter_map(|r| r["$ref"].as_str()?.strip_prefix(DEFINITIONS))
                            .map(String::from)
                            .collect(),
                    )
                })
                .unwrap_or_default();
            let types = super::SERVED_TYPES.iter().chain(VALIDATED).copied();
            SchemaValidators {
                definitions,
                resource_types,
                validators: types.map(|t| (t, OnceLock::new())).collect(),
                others: OnceLock::new(),
            }
        })
    }

    /// Compile every validator of a served type now (at server start) instead of on first use.
    pub fn warm_up(&self) {
        for t in self.validators.keys() {
            self.validator(t);
        }
    }

    fn validator(&self, resource_type: &str) -> Option<&Validator> {
        let cell = self.validators.get(resource_type)?;
        Some(cell.get_or_init(|| {
            let root = json!({
                "$schema": "http://json-schema.org/draft-06/schema#",
                "$ref": format!("{DEFINITIONS}{resource_type}"),
                "definitions": self.reachable([resource_type]),
            });
            compile(&root, Draft::Draft6)
        }))
    }

    /// The validator of a resource found inside another one: any R4 resource type.
    fn embedded(&self, resource_type: &str) -> Option<&Validator> {
        if self.validators.contains_key(resource_type) {
            return self.validator(resource_type);
        }
        if !self.resource_types.contains(resource_type) {
            return None;
        }
        Some(self.others.get_or_init(|| {
            let others: Vec<&str> = self
                .resource_types
                .iter()
                .map(String::as_str)
                .filter(|t| !self.validators.contains_key(t))
                .collect();
            // draft-07 only for `if`/`then`; the keywords the R4 schema uses mean the same in both
            let branches: Vec<Value> = others
                .iter()
                .map(|t| {
                    json!({
                        "if": {"properties": {"resourceType": {"const": t}}, "required": ["resourceType"]},
                        "then": {"$ref": format!("{DEFINITIONS}{t}")},
                    })
                })
                .collect();
            let root = json!({
                "$schema": "http://json-schema.org/draft-07/schema#",
                "allOf": branches,
                "definitions": self.reachable(others.iter().copied()),
            });
            compile(&root, Draft::Draft7)
        }))
    }

    /// The definitions reachable from `roots` through `$ref`, parsed, with every link to
    /// `ResourceList` replaced by a plain object schema and the descriptions dropped.
    fn reachable<'a>(&self, roots: impl IntoIterator<Item = &'a str>) -> Map<String, Value> {
        let mut out = Map::new();
        let mut todo: Vec<String> = roots.into_iter().map(String::from).collect();
        while let Some(name) = todo.pop() {
            if out.contains_key(&name) || name == RESOURCE_LIST {
                continue;
            }
            let Some(text) = self.definitions.get(name.as_str()) else {
                continue;
            };
            let mut def: Value = serde_json::from_str(text.get()).unwrap_or_else(invalid);
            unlink(&mut def);
            fhir_string_rule(&mut def);
            fhir_version_enum(&mut def);
            refs(&def, &mut todo);
            out.insert(name, def);
        }
        out
    }

    /// Schema errors of a resource, each with the FHIRPath of the offending element; the resources
    /// inside it (contained, Bundle entries, Parameters) are checked against their own type.
    pub fn validate(&self, resource: &Value) -> Vec<Issue> {
        let Some(rt) = resource.get("resourceType").and_then(Value::as_str) else {
            return vec![Issue::error("required", "resourceType is missing", None)];
        };
        let Some(validator) = self.validator(rt) else {
            return vec![Issue::error(
                "not-supported",
                format!("resource type {rt} is not supported"),
                None,
            )];
        };
        let mut issues = Vec::new();
        self.check(validator, resource, rt, &mut issues);
        issues
    }

    fn check(&self, validator: &Validator, resource: &Value, path: &str, issues: &mut Vec<Issue>) {
        issues.extend(validator.iter_errors(resource).map(|e| {
            let mut at = path.to_string();
            for seg in e.instance_path().iter() {
                match seg {
                    LocationSegment::Property(p) => {
                        at.push('.');
                        at.push_str(&p);
                    }
                    LocationSegment::Index(i) => at.push_str(&format!("[{i}]")),
                }
            }
            Issue::error("structure", message(&e), Some(at))
        }));
        let mut inner = Vec::new();
        embedded_resources(resource, path, &mut inner);
        for (r, at) in inner {
            self.check_embedded(r, &at, issues);
        }
    }

    fn check_embedded(&self, resource: &Value, path: &str, issues: &mut Vec<Issue>) {
        // not an object: the schema of the resource around it already said so
        let Some(obj) = resource.as_object() else {
            return;
        };
        let at_type = || Some(format!("{path}.resourceType"));
        match obj.get("resourceType") {
            None => issues.push(Issue::error(
                "required",
                "resourceType is missing",
                Some(path.to_string()),
            )),
            Some(Value::String(rt)) => match self.embedded(rt) {
                Some(validator) => self.check(validator, resource, path, issues),
                None => issues.push(Issue::error(
                    "structure",
                    format!("'{rt}' is not an R4 resource type"),
                    at_type(),
                )),
            },
            Some(_) => issues.push(Issue::error(
                "structure",
                "resourceType must be a string",
                at_type(),
            )),
        }
    }
}

/// The resources directly inside `resource` (at `path`), with their paths: `contained[i]`, and for
/// the envelopes `Bundle.entry[i].resource`, `Bundle.entry[i].response.outcome` and
/// `Parameters.parameter[i].resource` (also within `part`).
fn embedded_resources<'a>(resource: &'a Value, path: &str, out: &mut Vec<(&'a Value, String)>) {
    let items = |key: &str| {
        resource
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    };
    for (i, r) in items("contained").enumerate() {
        out.push((r, format!("{path}.contained[{i}]")));
    }
    match resource.get("resourceType").and_then(Value::as_str) {
        Some("Bundle") => {
            for (i, e) in items("entry").enumerate() {
                if let Some(r) = e.get("resource") {
                    out.push((r, format!("{path}.entry[{i}].resource")));
                }
                if let Some(r) = e.get("response").and_then(|r| r.get("outcome")) {
                    out.push((r, format!("{path}.entry[{i}].response.outcome")));
                }
            }
        }
        Some("Parameters") => parameters(resource, "parameter", path, out),
        _ => {}
    }
}

fn parameters<'a>(owner: &'a Value, key: &str, path: &str, out: &mut Vec<(&'a Value, String)>) {
    let params = owner
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    for (i, p) in params.enumerate() {
        let at = format!("{path}.{key}[{i}]");
        if let Some(r) = p.get("resource") {
            out.push((r, format!("{at}.resource")));
        }
        parameters(p, "part", &at, out);
    }
}

fn invalid<T>(e: serde_json::Error) -> T {
    panic!("packaged R4 schema is not valid JSON: {e}")
}

fn compile(root: &Value, draft: Draft) -> Validator {
    jsonschema::options()
        .with_draft(draft)
        .build(root)
        .expect("packaged R4 schema compiles")
}

/// Replace `{"$ref": "#/definitions/ResourceList"}` by `{"type": "object"}`, drop descriptions.
fn unlink(schema: &mut Value) {
    match schema {
        Value::Object(o) => {
            if o.get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix(DEFINITIONS))
                == Some(RESOURCE_LIST)
            {
                *schema = json!({"type": "object"});
                return;
            }
            // an annotation (a string); a property named `description` is an object schema
            if o.get("description").is_some_and(Value::is_string) {
                o.shift_remove("description");
            }
            o.values_mut().for_each(unlink);
        }
        Value::Array(a) => a.iter_mut().for_each(unlink),
        _ => {}
    }
}

/// The pattern the R4 JSON schema gives `string` and `markdown` (and the choice elements of those
/// types, which it inlines): FHIR's regex `[ \r\n\t\S]+`, written for XML Schema, where `\s` is
/// only space, tab, CR and LF, so that it means "not empty". Read as ECMAScript, as JSON Schema
/// does, `\S` also excludes every Unicode space: a no-break space in a name (`Dr.\u{a0}Rossi`),
/// allowed by FHIR, was refused, while most control characters passed.
const SCHEMA_STRING_PATTERN: &str = r"^[ \r\n\t\S]+$";

/// FHIR's own rule for `string` (R4 datatypes page): no character below U+0020 but tab, CR
/// and LF, and some content that is not whitespace. As ECMAScript, like the rest of the schema:
/// control-free characters around at least one that is neither whitespace nor a control character.
/// No lookaround and no backreference: fancy-regex hands it whole to the linear-time `regex` crate.
const FHIR_STRING_PATTERN: &str =
    r"^[^\x00-\x08\x0B\x0C\x0E-\x1F]*[^\s\x00-\x1F][^\x00-\x08\x0B\x0C\x0E-\x1F]*$";

/// Put FHIR's string rule where the schema has its ECMAScript reading of it. Only that exact
/// pattern is replaced: `code`, `id`, `uri` and the others keep theirs (a no-break space has no
/// place in a code or a URI).
fn fhir_string_rule(schema: &mut Value) {
    match schema {
        Value::Object(o) => {
            if let Some(p) = o.get_mut("pattern")
                && p.as_str() == Some(SCHEMA_STRING_PATTERN)
            {
                *p = Value::from(FHIR_STRING_PATTERN);
            }
            o.values_mut().for_each(fhir_string_rule);
        }
        Value::Array(a) => a.iter_mut().for_each(fhir_string_rule),
        _ => {}
    }
}

/// The R4 schema's list of FHIR versions (`fhirVersion` of StructureDefinition, CapabilityStatement
/// and ImplementationGuide) stops at 4.0.0: it was generated before the 4.0.1 technical correction,
/// the version this server and every R4 resource it serves declare. 4.0.1 is added to that list
/// only (recognised by its first and last entries).
fn fhir_version_enum(schema: &mut Value) {
    match schema {
        Value::Object(o) => {
            if let Some(Value::Array(versions)) = o.get_mut("enum")
                && versions.first().and_then(Value::as_str) == Some("0.01")
                && versions.last().and_then(Value::as_str) == Some("4.0.0")
            {
                versions.push(Value::from("4.0.1"));
            }
            o.values_mut().for_each(fhir_version_enum);
        }
        Value::Array(a) => a.iter_mut().for_each(fhir_version_enum),
        _ => {}
    }
}

/// The message of a schema error: the library's, but for the string rule, whose regex says
/// nothing to a sender.
fn message(error: &jsonschema::ValidationError) -> String {
    match error.kind() {
        // the value is not repeated: it may be long, and the issue's expression points at it
        ValidationErrorKind::Pattern { pattern } if pattern == FHIR_STRING_PATTERN => {
            "not a valid FHIR string: it must contain a character other than whitespace, and no \
             control character but tab, carriage return and line feed"
                .to_string()
        }
        _ => error.to_string(),
    }
}

fn refs(schema: &Value, out: &mut Vec<String>) {
    match schema {
        Value::Object(o) => {
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => {
                        out.extend(r.strip_prefix(DEFINITIONS).map(String::from))
                    }
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ApiError;
    use crate::fhir::resource;

    fn paths(issues: &[Issue]) -> Vec<&str> {
        issues
            .iter()
            .filter_map(|i| i.expression.as_deref())
            .collect()
    }

    #[test]
    fn each_validator_embeds_only_the_definitions_its_type_reaches() {
        let v = SchemaValidators::get();
        assert_eq!(v.resource_types.len(), 146);
        for t in super::super::SERVED_TYPES.iter().chain(VALIDATED) {
            let definitions = v.reachable([*t]);
            let n = definitions.len();
            assert!((30..100).contains(&n), "{t} reaches {n} definitions");
            assert!(!definitions.contains_key(RESOURCE_LIST));
        }
        let location = &v.reachable(["Location"])["Location"];
        // a property named `description` is kept, only the annotations go
        assert!(location["properties"]["description"].is_object());
        assert!(location.get("description").is_none());
        // where a resource was embedded, any object is accepted (it is checked on its own)
        let entry = &v.reachable(["Bundle"])["Bundle_Entry"];
        assert_eq!(entry["properties"]["resource"], json!({"type": "object"}));
    }

    #[test]
    fn errors_inside_a_contained_resource_have_its_path_and_are_reported_once() {
        let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "#p"},
            "contained": [{"resourceType": "Patient", "id": "p", "gender": "banana"}]});
        let issues = SchemaValidators::get().validate(&obs);
        assert_eq!(
            paths(&issues),
            ["Observation.contained[0].gender"],
            "{issues:?}"
        );
        // through the resource validation the API runs: once, with the same path
        let Err(ApiError::Invalid { issues, .. }) = resource::validate(&obs) else {
            panic!("must be invalid")
        };
        assert_eq!(
            paths(&issues),
            ["Observation.contained[0].gender"],
            "{issues:?}"
        );
        // a valid contained resource passes
        let mut ok = obs.clone();
        ok["contained"][0]["gender"] = json!("female");
        let result = resource::validate(&ok);
        assert!(result.is_ok(), "{result:?}");
    }

    #[test]
    fn contained_resources_of_any_type_and_malformed_ones_are_caught() {
        let v = SchemaValidators::get();
        // a type the server does not serve is checked against its own schema too
        let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "device": {"reference": "#d"},
            "contained": [{"resourceType": "Device", "id": "d", "status": "banana", "colour": 1}]});
        let issues = v.validate(&obs);
        let mut found = paths(&issues);
        found.sort_unstable();
        assert_eq!(
            found,
            [
                "Observation.contained[0]",
                "Observation.contained[0].status"
            ],
            "{issues:?}"
        );
        let mut ok = obs.clone();
        ok["contained"][0] = json!({"resourceType": "Device", "id": "d", "status": "active"});
        assert!(v.validate(&ok).is_empty());
        // not a resource at all
        let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "contained": [1, {"id": "x"}, {"resourceType": "Banana"}]});
        let issues = v.validate(&obs);
        assert_eq!(
            paths(&issues),
            [
                "Observation.contained[0]",
                "Observation.contained[1]",
                "Observation.contained[2].resourceType"
            ],
            "{issues:?}"
        );
    }

    #[test]
    fn the_schema_reading_of_the_string_rule_is_replaced_everywhere() {
        let v = SchemaValidators::get();
        let types = super::super::SERVED_TYPES.iter().chain(VALIDATED).copied();
        let all = v.reachable(types.chain(v.resource_types.iter().map(String::as_str)));
        let text = serde_json::to_string(&all).unwrap();
        assert!(!text.contains(&serde_json::to_string(SCHEMA_STRING_PATTERN).unwrap()));
        for (def, at) in [
            ("string", &all["string"]),
            ("markdown", &all["markdown"]),
            (
                "Observation.valueString",
                &all["Observation"]["properties"]["valueString"],
            ),
        ] {
            assert_eq!(at["pattern"], FHIR_STRING_PATTERN, "{def}");
        }
    }

    #[test]
    fn a_no_break_space_is_string_content_and_whitespace_alone_is_not() {
        let v = SchemaValidators::get();
        let patient = |name: &str| json!({"resourceType": "Patient", "name": [{"text": name, "family": "Rossi"}]});
        // Unicode spaces inside a string (and markdown, and a choice of type string)
        for ok in [
            "Dr.\u{a0}Rossi",
            "Rossi\u{2009}Mario",
            "\u{a0}Rossi ",
            "tab\there\r\n",
            "x",
        ] {
            assert!(v.validate(&patient(ok)).is_empty(), "{ok:?}");
        }
        let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "valueString": "10\u{a0}mg", "note": [{"text": "**10\u{a0}mg**"}]});
        assert!(v.validate(&obs).is_empty());
        // no content but whitespace (of any kind), empty, or a control character: refused, with
        // a message that says what a FHIR string is and the path of the element
        for bad in [
            " ",
            "\u{a0}",
            " \t\r\n\u{3000}",
            "",
            "a\u{1}b",
            "a\u{b}b",
            "a\u{c}b",
            "\u{1f}",
        ] {
            let issues = v.validate(&patient(bad));
            assert_eq!(
                paths(&issues),
                ["Patient.name[0].text"],
                "{bad:?}: {issues:?}"
            );
            if !bad.is_empty() {
                assert!(
                    issues[0].diagnostics.contains("not a valid FHIR string"),
                    "{issues:?}"
                );
            }
        }
        let mut bad = obs.clone();
        bad["valueString"] = json!("\u{a0} ");
        bad["note"][0]["text"] = json!("\u{0}");
        let issues = v.validate(&bad);
        let mut found = paths(&issues);
        found.sort_unstable();
        assert_eq!(
            found,
            ["Observation.note[0].text", "Observation.valueString"],
            "{issues:?}"
        );
    }

    #[test]
    fn the_other_types_keep_their_whitespace_rules() {
        let v = SchemaValidators::get();
        // a code has no leading, trailing or double whitespace (a no-break space is whitespace
        // there, as before); a URI has none at all
        for (element, value) in [
            ("language", "\u{a0}it"),
            ("language", "it\u{a0}\u{a0}IT"),
            ("language", "it "),
            ("implicitRules", "http://example.org/a\u{a0}b"),
            ("implicitRules", "http://example.org/a b"),
        ] {
            let p = json!({"resourceType": "Patient", element: value});
            let issues = v.validate(&p);
            assert!(
                paths(&issues).contains(&format!("Patient.{element}").as_str()),
                "{value:?}: {issues:?}"
            );
            assert!(
                issues
                    .iter()
                    .all(|i| !i.diagnostics.contains("not a valid FHIR string")),
                "{issues:?}"
            );
        }
    }

    #[test]
    fn an_invalid_bundle_entry_resource_is_still_caught() {
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:9a0c0a1e-7b1a-4a55-8d3e-3f9f1f0c2b11",
             "resource": {"resourceType": "Observation", "status": "banana", "code": {"text": "x"}},
             "request": {"method": "POST", "url": "Observation"}}]});
        // the Bundle processor's path: the envelope without its resources, then each resource
        let mut envelope = bundle.clone();
        envelope["entry"][0]
            .as_object_mut()
            .unwrap()
            .shift_remove("resource");
        assert!(SchemaValidators::get().validate(&envelope).is_empty());
        let err = resource::validate(&bundle["entry"][0]["resource"])
            .expect_err("the entry's resource is invalid")
            .within_entry(0);
        assert_eq!(
            paths(&err.issues()),
            ["Bundle.entry[0].resource.status"],
            "{err:?}"
        );
        // the whole Bundle at once reports it at the same place
        let issues = SchemaValidators::get().validate(&bundle);
        assert_eq!(
            paths(&issues),
            ["Bundle.entry[0].resource.status"],
            "{issues:?}"
        );
    }
}
