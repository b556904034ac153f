//! `_summary` and `_elements`: the shape of the resources an answer returns (R4 search.html,
//! "Summary" and "Elements"), on read, vread, search and history.
//!
//! - `_summary=true`: the elements the base definition marks `isSummary`, at the root and inside the
//!   resource's own backbone elements (data-type values are kept whole: every element of an R4 data
//!   type but `id`/`extension` is a summary element);
//! - `_summary=text`: `text`, `id`, `meta` and the root mandatory elements; `data`: all but `text`;
//!   `count` (searches and history): the total only; `false`: the whole resource;
//! - `_elements=a,b`: the named root elements, with `id`, `meta` and the mandatory ones.
//!
//! Every mode keeps the root mandatory elements (min ≥ 1), so a subset stays a well-formed R4
//! resource, and the contained resources a kept element points to (`#id`). Subsets carry the
//! `SUBSETTED` tag, so nobody mistakes one for the whole resource and writes it back.
//!
//! Two decisions where R4 leaves room:
//! - `_summary` and `_elements` together are a 400 (R4 says clients should not combine them; a
//!   server that picked one would answer something the client did not ask for). So is an
//!   `_elements` name the type does not have: the house rule is that a typo is an error, never a
//!   silently different answer (R4 leaves unknown names to the server).
//! - `subject` and `patient` references are kept by `text` and `_elements` (R4 lets a server return
//!   more than asked): the audit trail reads whose data an answer disclosed from the answer itself,
//!   and a subset must be audited like the whole resource.
use serde_json::{Map, Value, json};

use crate::error::{ApiError, ApiResult, Issue};
use crate::fhir::Definitions;
use crate::fhir::fhirpath::split_reference;
use crate::fhir::structure::StructureDefinition;

/// The code system of the `SUBSETTED` tag.
pub const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// The most names one `_elements` may list (a resource type has fewer root elements than this).
pub const MAX_ELEMENTS: usize = 100;

/// The elements every subset keeps, whatever was asked.
const ALWAYS: &[&str] = &["resourceType", "id", "meta"];

/// References the audit trail reads the patient of an answer from (`audit_trail::Touched`).
const AUDITED_REFERENCES: &[&str] = &["subject", "patient"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// No `_summary` (or `_summary=false`, remembered for the self link): the whole resource.
    Full {
        explicit: bool,
    },
    Summary,
    Text,
    Data,
    Count,
    /// Root element names (base names: `value` for `value[x]`), sorted, without duplicates.
    Elements(Vec<String>),
}

/// How the resources of an answer are shaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    mode: Mode,
}

impl Default for Shape {
    fn default() -> Self {
        Shape::full()
    }
}

fn bad(param: &str, code: &'static str, msg: String) -> ApiError {
    ApiError::invalid(vec![Issue::error(code, msg, Some(param.to_string()))])
}

impl Shape {
    /// The whole resource.
    pub fn full() -> Shape {
        Shape {
            mode: Mode::Full { explicit: false },
        }
    }

    /// `_summary` / `_elements` of a query string, for resources of type `rt`. Other parameters are
    /// left to the caller.
    pub fn from_query(rt: &str, query: Option<&str>) -> ApiResult<Shape> {
        Shape::parse(Some(rt), &pairs_of(query))
    }

    /// As `from_query`, from decoded parameters (a POST `_search` body joined to its query).
    pub fn from_pairs(rt: &str, pairs: &[(String, String)]) -> ApiResult<Shape> {
        Shape::parse(Some(rt), pairs)
    }

    /// For an answer of one resource (read, vread): `_summary=count` is a 400 there.
    pub fn for_instance(rt: &str, query: Option<&str>) -> ApiResult<Shape> {
        let shape = Shape::from_query(rt, query)?;
        if shape.is_count() {
            return Err(bad(
                "_summary",
                "not-supported",
                "_summary=count applies to searches and histories; a read returns one resource"
                    .into(),
            ));
        }
        Ok(shape)
    }

    /// For answers that mix resource types (the system history): `_elements` names are checked
    /// against no type, only for their form.
    pub fn for_any_type(query: Option<&str>) -> ApiResult<Shape> {
        Shape::parse(None, &pairs_of(query))
    }

    fn parse(rt: Option<&str>, pairs: &[(String, String)]) -> ApiResult<Shape> {
        let mut summary: Option<(String, Mode)> = None;
        let mut elements: Option<Vec<String>> = None;
        for (key, value) in pairs {
            let (name, modifier) = match key.split_once(':') {
                Some((n, m)) => (n, Some(m)),
                None => (key.as_str(), None),
            };
            if name != "_summary" && name != "_elements" {
                continue;
            }
            if let Some(m) = modifier {
                return Err(bad(
                    key,
                    "not-supported",
                    format!("{name} takes no modifier (:{m})"),
                ));
            }
            if name == "_summary" {
                let mode = match value.as_str() {
                    "true" => Mode::Summary,
                    "text" => Mode::Text,
                    "data" => Mode::Data,
                    "count" => Mode::Count,
                    "false" => Mode::Full { explicit: true },
                    other => {
                        return Err(bad(
                            key,
                            "value",
                            format!(
                                "_summary={other} is not valid: use true, text, data, count or false"
                            ),
                        ));
                    }
                };
                match &summary {
                    Some((previous, _)) if previous != value => {
                        return Err(bad(
                            key,
                            "invalid",
                            format!("_summary is given twice, as {previous} and {value}"),
                        ));
                    }
                    _ => summary = Some((value.clone(), mode)),
                }
            } else {
                let names = elements.get_or_insert_with(Vec::new);
                for raw in value.split(',').map(str::trim) {
                    names.push(element_name(rt, raw)?);
                    if names.len() > MAX_ELEMENTS {
                        return Err(bad(
                            "_elements",
                            "too-costly",
                            format!("_elements lists more than {MAX_ELEMENTS} names"),
                        ));
                    }
                }
            }
        }
        let mode = match (summary, elements) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "_elements",
                    "invalid",
                    "_summary and _elements cannot be used together: ask for one shape".into(),
                ));
            }
            (Some((_, mode)), None) => mode,
            (None, Some(mut names)) => {
                names.sort();
                names.dedup();
                Mode::Elements(names)
            }
            (None, None) => Mode::Full { explicit: false },
        };
        Ok(Shape { mode })
    }

    /// `_summary=count`: the total only, no resources.
    pub fn is_count(&self) -> bool {
        self.mode == Mode::Count
    }

    /// Resources are returned whole.
    pub fn is_full(&self) -> bool {
        matches!(self.mode, Mode::Full { .. })
    }

    /// The parameters of this shape in a stable form, for the `self` and paging links of a Bundle
    /// (nothing when none was asked for).
    pub fn params(&self) -> Vec<(String, String)> {
        let summary = |v: &str| vec![("_summary".to_string(), v.to_string())];
        match &self.mode {
            Mode::Full { explicit: false } => vec![],
            Mode::Full { explicit: true } => summary("false"),
            Mode::Summary => summary("true"),
            Mode::Text => summary("text"),
            Mode::Data => summary("data"),
            Mode::Count => summary("count"),
            Mode::Elements(names) => vec![("_elements".to_string(), names.join(","))],
        }
    }

    /// The shape for resources a search includes (`_include`, `_revinclude`): `_summary` applies to
    /// them, `_elements` does not (R4: "the list of elements does not apply to included resources").
    pub fn for_included(&self) -> Shape {
        match self.mode {
            Mode::Elements(_) => Shape::full(),
            _ => self.clone(),
        }
    }

    /// One resource in this shape. A subset carries the `SUBSETTED` tag; a resource whose type has
    /// no definition loaded is returned whole.
    pub fn apply(&self, resource: &Value) -> Value {
        let Some(obj) = resource.as_object() else {
            return resource.clone();
        };
        let sd = obj
            .get("resourceType")
            .and_then(Value::as_str)
            .and_then(|rt| Definitions::get().structures.get(rt));
        let shaped = match (&self.mode, sd) {
            (Mode::Full { .. } | Mode::Count, _) => return resource.clone(),
            (Mode::Data, _) => obj
                .iter()
                .filter(|(k, _)| *k != "text" && *k != "_text")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            (_, None) => return resource.clone(),
            (Mode::Summary, Some(sd)) => summary_of(sd, &sd.type_name, obj),
            (Mode::Text, Some(sd)) => root_subset(sd, obj, &["text"]),
            (Mode::Elements(names), Some(sd)) => {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                root_subset(sd, obj, &names)
            }
        };
        let mut shaped = keep_referenced_contained(obj, shaped);
        tag_subsetted(&mut shaped);
        Value::Object(shaped)
    }
}

fn pairs_of(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or("").trim_start_matches('?').as_bytes())
        .into_owned()
        .collect()
}

/// The base name of one `_elements` entry: `birthDate`, `value` (for `value[x]`, `valueQuantity`),
/// `name` for `Patient.name` when the search is of Patients. Only root elements (R4).
fn element_name(rt: Option<&str>, raw: &str) -> ApiResult<String> {
    let err = |msg: String| bad("_elements", "value", msg);
    if raw.is_empty() {
        return Err(err("_elements has an empty name".into()));
    }
    let local = match (rt, raw.split_once('.')) {
        (Some(rt), Some((prefix, rest))) if prefix == rt => rest,
        (_, Some(_)) => {
            return Err(err(format!(
                "_elements={raw}: only root elements of the resource can be named (R4), e.g. identifier,birthDate"
            )));
        }
        (_, None) => raw,
    };
    let local = local.strip_suffix("[x]").unwrap_or(local);
    if local.contains('.') || !local.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(err(format!(
            "_elements={raw}: only root elements of the resource can be named (R4), e.g. identifier,birthDate"
        )));
    }
    let Some(rt) = rt else {
        return Ok(local.to_string());
    };
    let sd = Definitions::get().structures.get(rt);
    let found = sd.and_then(|sd| {
        sd.top_level()
            .iter()
            .find(|e| e.name == local)
            .or_else(|| sd.element_of_key(rt, local))
    });
    match found {
        Some(e) => Ok(e.name.clone()),
        None if sd.is_none() => Ok(local.to_string()),
        None => Err(err(format!(
            "{rt} has no element '{local}' (_elements={raw})"
        ))),
    }
}

/// Is `key` (of an object at `parent`) kept by `_summary=true`? Summary and mandatory elements.
fn summary_keeps(sd: &StructureDefinition, parent: &str, key: &str) -> bool {
    key == "resourceType"
        || sd
            .element_of_key(parent, key)
            .is_some_and(|e| e.summary || e.min >= 1)
}

/// `_summary=true` of an object at `parent`: recursively through the type's own backbone elements.
fn summary_of(
    sd: &StructureDefinition,
    parent: &str,
    obj: &Map<String, Value>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in obj {
        if !summary_keeps(sd, parent, key) {
            continue;
        }
        let inner = sd.element_of_key(parent, key).and_then(|e| {
            let path = e.content_reference.as_deref().unwrap_or(&e.path);
            (!key.starts_with('_') && !sd.children(path).is_empty()).then_some(path)
        });
        let value = match inner {
            Some(path) => shape_items(value, &|o| summary_of(sd, path, o)),
            None => value.clone(),
        };
        out.insert(key.clone(), value);
    }
    out
}

/// What shapes one JSON object.
type ObjectShaper<'a> = dyn Fn(&Map<String, Value>) -> Map<String, Value> + 'a;

/// Apply `f` to an object or to each object of an array.
fn shape_items(value: &Value, f: &ObjectShaper) -> Value {
    match value {
        Value::Object(o) => Value::Object(f(o)),
        Value::Array(items) => Value::Array(items.iter().map(|i| shape_items(i, f)).collect()),
        other => other.clone(),
    }
}

/// The root elements named in `wanted`, with those every subset keeps: `resourceType`, `id`,
/// `meta`, the mandatory ones, and the references the audit trail reads the patient from.
fn root_subset(
    sd: &StructureDefinition,
    obj: &Map<String, Value>,
    wanted: &[&str],
) -> Map<String, Value> {
    let rt = sd.type_name.as_str();
    obj.iter()
        .filter(|(key, value)| {
            let bare = key.trim_start_matches('_');
            if ALWAYS.contains(&bare) {
                return true;
            }
            let Some(e) = sd.element_of_key(rt, key) else {
                return false;
            };
            wanted.contains(&e.name.as_str())
                || e.min >= 1
                || (AUDITED_REFERENCES.contains(&key.as_str()) && names_a_patient(value))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn names_a_patient(reference: &Value) -> bool {
    reference["reference"]
        .as_str()
        .and_then(split_reference)
        .is_some_and(|(t, _)| t == "Patient")
}

/// The contained resources the subset still points to (`"reference": "#id"`): a local reference
/// without its target would not be valid R4 (ref-1).
fn keep_referenced_contained(
    original: &Map<String, Value>,
    mut shaped: Map<String, Value>,
) -> Map<String, Value> {
    let Some(contained) = original.get("contained").and_then(Value::as_array) else {
        return shaped;
    };
    if shaped.contains_key("contained") {
        return shaped;
    }
    let mut local = Vec::new();
    local_references(&Value::Object(shaped.clone()), &mut local);
    let kept: Vec<Value> = contained
        .iter()
        .filter(|c| {
            c["id"]
                .as_str()
                .is_some_and(|id| local.iter().any(|r| r == id))
        })
        .cloned()
        .collect();
    if !kept.is_empty() {
        shaped.insert("contained".into(), Value::Array(kept));
    }
    shaped
}

fn local_references(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(o) => {
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("reference", Value::String(r)) if r.len() > 1 && r.starts_with('#') => {
                        out.push(r[1..].to_string())
                    }
                    _ => local_references(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| local_references(i, out)),
        _ => {}
    }
}

/// Add the `SUBSETTED` tag to `meta.tag` (once).
fn tag_subsetted(resource: &mut Map<String, Value>) {
    let meta = resource
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    let tags = meta.entry("tag").or_insert_with(|| json!([]));
    let Some(tags) = tags.as_array_mut() else {
        return;
    };
    if !tags
        .iter()
        .any(|t| t["system"] == SUBSETTED_SYSTEM && t["code"] == "SUBSETTED")
    {
        tags.push(json!({
            "system": SUBSETTED_SYSTEM,
            "code": "SUBSETTED",
            "display": "Resource encoded in summary mode"
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observation() -> Value {
        json!({
            "resourceType": "Observation", "id": "o1",
            "meta": {"versionId": "2", "lastUpdated": "2026-03-01T10:00:00Z"},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">MIC</div>"},
            "contained": [{"resourceType": "Specimen", "id": "s1", "type": {"text": "sangue"}},
                          {"resourceType": "Organization", "id": "lab", "name": "Niguarda"}],
            "extension": [{"url": "http://example.org/x", "valueString": "y"}],
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "18932-4"}]},
            "subject": {"reference": "Patient/p1"},
            "specimen": {"reference": "#s1"},
            "valueQuantity": {"value": 6.30, "unit": "mg/L"},
            "interpretation": [{"coding": [{"code": "R"}]}],
            "component": [{"code": {"text": "MIC"}, "valueString": "≥16",
                           "interpretation": [{"text": "R"}]}]
        })
    }

    fn keys(v: &Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    fn subsetted(v: &Value) -> bool {
        v["meta"]["tag"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["code"] == "SUBSETTED"))
    }

    #[test]
    fn summary_true_follows_is_summary_into_backbone_elements() {
        let s = Shape::from_query("Observation", Some("_summary=true")).unwrap();
        let mut whole = observation();
        // (as stored: the text of a decimal is kept)
        whole["valueQuantity"] = serde_json::from_str(r#"{"value":6.30,"unit":"mg/L"}"#).unwrap();
        let out = s.apply(&whole);
        assert_eq!(
            keys(&out),
            vec![
                "resourceType",
                "id",
                "meta",
                "status",
                "code",
                "subject",
                "valueQuantity",
                "component"
            ]
        );
        // component.interpretation is not a summary element; code and value are
        assert_eq!(keys(&out["component"][0]), vec!["code", "valueString"]);
        // decimals keep their text
        assert_eq!(
            out["valueQuantity"].to_string(),
            r#"{"value":6.30,"unit":"mg/L"}"#
        );
        assert!(subsetted(&out));
        assert_eq!(out["meta"]["versionId"], "2");
    }

    #[test]
    fn text_keeps_the_narrative_and_what_is_mandatory() {
        let out = Shape::from_query("Observation", Some("_summary=text"))
            .unwrap()
            .apply(&observation());
        assert_eq!(
            keys(&out),
            vec![
                "resourceType",
                "id",
                "meta",
                "text",
                "status",
                "code",
                "subject"
            ]
        );
        assert!(subsetted(&out));
    }

    #[test]
    fn data_drops_the_narrative_only() {
        let out = Shape::from_query("Observation", Some("_summary=data"))
            .unwrap()
            .apply(&observation());
        let whole = observation();
        let mut expected = keys(&whole);
        expected.retain(|k| *k != "text");
        assert_eq!(keys(&out), expected);
        assert!(subsetted(&out));
    }

    #[test]
    fn elements_keep_the_named_mandatory_and_referenced_contained() {
        let s = Shape::from_query("Observation", Some("_elements=specimen,value")).unwrap();
        assert_eq!(
            s.params(),
            vec![("_elements".to_string(), "specimen,value".to_string())]
        );
        let out = s.apply(&observation());
        assert_eq!(
            keys(&out),
            vec![
                "resourceType",
                "id",
                "meta",
                "status",
                "code",
                "subject",
                "specimen",
                "valueQuantity",
                "contained"
            ]
        );
        // only the contained resource still referenced
        assert_eq!(out["contained"].as_array().unwrap().len(), 1);
        assert_eq!(out["contained"][0]["id"], "s1");
        // the JSON key and the type-prefixed name are the same element
        let same = Shape::from_query(
            "Observation",
            Some("_elements=Observation.valueQuantity,specimen"),
        )
        .unwrap();
        assert_eq!(same, s);
    }

    #[test]
    fn whole_resources_are_untouched() {
        for q in [None, Some("_summary=false"), Some("_count=3")] {
            let s = Shape::from_query("Observation", q).unwrap();
            assert!(s.is_full());
            assert_eq!(s.apply(&observation()), observation());
        }
        assert_eq!(
            Shape::from_query("Observation", Some("_summary=false"))
                .unwrap()
                .params(),
            vec![("_summary".to_string(), "false".to_string())]
        );
    }

    #[test]
    fn wrong_requests_are_400_at_the_parameter() {
        for (q, at) in [
            ("_summary=yes", "_summary"),
            ("_summary=true&_elements=code", "_elements"),
            ("_summary=true&_summary=text", "_summary"),
            ("_elements=colour", "_elements"),
            ("_elements=code.coding", "_elements"),
            ("_elements=", "_elements"),
            ("_summary:exact=true", "_summary:exact"),
        ] {
            let e = Shape::from_query("Observation", Some(q)).unwrap_err();
            assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{q}");
            assert_eq!(e.issues()[0].expression.as_deref(), Some(at), "{q}");
        }
        let many = format!("_elements={}", vec!["code"; MAX_ELEMENTS + 1].join(","));
        assert!(Shape::from_query("Observation", Some(&many)).is_err());
        assert!(Shape::for_instance("Observation", Some("_summary=count")).is_err());
        assert!(
            Shape::from_query("Observation", Some("_summary=count"))
                .unwrap()
                .is_count()
        );
    }

    #[test]
    fn included_resources_ignore_elements_but_not_summary() {
        let e = Shape::from_query("Observation", Some("_elements=code")).unwrap();
        assert!(e.for_included().is_full());
        let t = Shape::from_query("Observation", Some("_summary=text")).unwrap();
        assert_eq!(t.for_included(), t);
    }

    #[test]
    fn conformance_resources_have_a_summary_too() {
        let sd = json!({"resourceType": "StructureDefinition", "id": "x", "url": "http://example.org/x",
            "name": "X", "status": "active", "kind": "resource", "abstract": false, "type": "Patient",
            "snapshot": {"element": [{"path": "Patient"}]}});
        let out = Shape::from_query("StructureDefinition", Some("_summary=true"))
            .unwrap()
            .apply(&sd);
        assert!(out.get("snapshot").is_none());
        assert_eq!(out["url"], "http://example.org/x");
        assert!(subsetted(&out));
    }
}
