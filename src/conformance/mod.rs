//! The conformance resources the server loads, served read-only: ours (`profiles/`, `terminology/`)
//! and the packaged R4 ones it validates with (`fhir/r4/`). They are data of the repository,
//! versioned there; the server never writes them.
pub mod search;

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::{Value, json};

/// The conformance types served under their own routes. Subscription topics are `Basic` resources
/// in R4 (the Subscriptions Backport IG).
pub const SERVED_CONFORMANCE_TYPES: &[&str] = &[
    "StructureDefinition",
    "ValueSet",
    "CodeSystem",
    "ConceptMap",
    "SearchParameter",
    "OperationDefinition",
    "Basic",
];

/// The extension a Basic subscription topic carries its canonical URL, version and name in.
const TOPIC_EXTENSION: &str =
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.";

/// `meta.tag` on packaged R4 definitions: the package keeps only what validation needs (see
/// fhir/r4/SOURCES.md), so they are marked as subsets of the published resources.
fn subsetted_tag() -> Value {
    json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
           "code": "SUBSETTED", "display": "subsetted"})
}

pub struct Conformance {
    /// Type → resources in a stable order (ours first, then the R4 ones, each by id).
    by_type: HashMap<&'static str, Vec<Value>>,
    /// (type, id) → index in `by_type[type]`.
    by_id: HashMap<(String, String), usize>,
}

impl Conformance {
    /// The process-wide registry, built on first use (the server warms it at start).
    pub fn get() -> &'static Conformance {
        static C: OnceLock<Conformance> = OnceLock::new();
        C.get_or_init(|| Conformance::build(ours(), crate::fhir::definitions::packaged()))
    }

    fn build(ours: Vec<Value>, packaged: Vec<Value>) -> Conformance {
        let mut by_type: HashMap<&'static str, Vec<Value>> = HashMap::new();
        let mut by_id = HashMap::new();
        let packaged = packaged.into_iter().map(|r| (r, true));
        for (mut r, is_packaged) in ours.into_iter().map(|r| (r, false)).chain(packaged) {
            let Some(t) = SERVED_CONFORMANCE_TYPES
                .iter()
                .find(|t| r["resourceType"] == **t)
            else {
                continue;
            };
            let Some(id) = r["id"].as_str().map(String::from) else {
                continue;
            };
            if is_packaged {
                complete_packaged(&mut r);
            }
            let list = by_type.entry(t).or_default();
            // an id both in ours and in the package: ours is the one the server uses
            if by_id.contains_key(&(t.to_string(), id.clone())) {
                continue;
            }
            by_id.insert((t.to_string(), id), list.len());
            list.push(r);
        }
        Conformance { by_type, by_id }
    }

    pub fn read(&self, rt: &str, id: &str) -> Option<&Value> {
        let i = *self.by_id.get(&(rt.to_string(), id.to_string()))?;
        self.by_type.get(rt)?.get(i)
    }

    /// Every served resource of `rt`.
    pub fn all(&self, rt: &str) -> &[Value] {
        self.by_type.get(rt).map_or(&[], Vec::as_slice)
    }

    /// The resource of `rt` with canonical `url` (an optional `|version` must match).
    pub fn by_url(&self, rt: &str, url: &str) -> Option<&Value> {
        let (url, version) = match url.split_once('|') {
            Some((u, v)) => (u, Some(v)),
            None => (url, None),
        };
        self.all(rt).iter().find(|r| {
            field(r, "url") == Some(url) && version.is_none_or(|v| field(r, "version") == Some(v))
        })
    }

    /// How many resources of each type are served (for the log at start).
    pub fn counts(&self) -> Vec<(&'static str, usize)> {
        let mut out: Vec<_> = self.by_type.iter().map(|(t, l)| (*t, l.len())).collect();
        out.sort();
        out
    }
}

/// A conformance field by name: the element itself, or for a topic (a `Basic`) its extension.
pub fn field<'a>(r: &'a Value, name: &str) -> Option<&'a str> {
    if r["resourceType"] == "Basic" {
        let url = format!("{TOPIC_EXTENSION}{name}");
        return r["extension"]
            .as_array()?
            .iter()
            .find(|e| e["url"] == url.as_str())
            .and_then(|e| {
                e.as_object()?
                    .iter()
                    .find(|(k, _)| k.starts_with("value"))
                    .and_then(|(_, v)| v.as_str())
            });
    }
    r[name].as_str()
}

/// Our conformance resources: `profiles/` (StructureDefinitions, SearchParameters,
/// OperationDefinitions, subscription topics) and `terminology/` (code systems, value sets, maps).
fn ours() -> Vec<Value> {
    let mut out = Vec::new();
    for kind in [
        "StructureDefinition",
        "SearchParameter",
        "OperationDefinition",
        "SubscriptionTopic",
    ] {
        let mut found = crate::fhir::profile::resources_of_kind(kind);
        found.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        out.extend(found);
    }
    out.extend(
        crate::terminology::Terminology::get()
            .resources
            .iter()
            .cloned(),
    );
    out
}

/// The packaged R4 definitions keep only what validation reads; what R4 requires of the resource
/// and the package left out is restored from what is there, and the copy is tagged as a subset.
fn complete_packaged(r: &mut Value) {
    drop_nulls(r);
    let Some(obj) = r.as_object_mut() else { return };
    let rt = obj
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let name = obj
        .get("name")
        .or_else(|| obj.get("id"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if rt == "SearchParameter" && !obj.contains_key("description") {
        // SearchParameter.description is 1..1: say what this copy is rather than invent a text
        let url = obj.get("url").and_then(Value::as_str).unwrap_or_default();
        obj.insert(
            "description".into(),
            json!(format!(
                "The R4 search parameter {name}, as packaged for this server (the published text is at {url})"
            )),
        );
    }
    if !obj.contains_key("status") {
        obj.insert("status".into(), json!("active"));
    }
    let meta = obj
        .entry("meta")
        .or_insert_with(|| json!({}))
        .as_object_mut();
    if let Some(meta) = meta {
        let tags = meta.entry("tag").or_insert_with(|| json!([]));
        if let Some(tags) = tags.as_array_mut() {
            tags.push(subsetted_tag());
        }
    }
}

/// The package writes absent elements as `null`, which FHIR JSON does not allow.
fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(o) => {
            o.retain(|_, x| !x.is_null());
            o.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ours_and_the_r4_definitions_are_served_by_id_and_url() {
        let c = Conformance::get();
        let sd = c.read("StructureDefinition", "notifica-caso").unwrap();
        assert_eq!(sd["type"], "Communication");
        assert!(c.read("StructureDefinition", "Patient").is_some());
        assert!(c.read("CodeSystem", "icd9cm").is_some());
        let topic = c
            .by_url(
                "Basic",
                &format!("{}/SubscriptionTopic/cre-case", crate::terminology::CANON),
            )
            .unwrap();
        assert_eq!(topic["id"], "cre-case");
        assert!(
            c.by_url(
                "ValueSet",
                "http://hl7.org/fhir/ValueSet/observation-status"
            )
            .is_some()
        );
        assert!(c.read("ValueSet", "no-such-set").is_none());
        // ours carry no SUBSETTED tag; the packaged ones do
        assert!(sd["meta"]["tag"].is_null());
        let patient = c.read("StructureDefinition", "Patient").unwrap();
        assert_eq!(patient["meta"]["tag"][0]["code"], "SUBSETTED");
    }

    #[test]
    fn every_served_conformance_resource_meets_the_r4_schema() {
        let c = Conformance::get();
        let schema = crate::fhir::schema::SchemaValidators::get();
        let mut n = 0;
        for t in SERVED_CONFORMANCE_TYPES {
            // the schema checks resources of unserved types inside a Bundle
            let entries: Vec<Value> = c.all(t).iter().map(|r| json!({"resource": r})).collect();
            n += entries.len();
            let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": entries});
            let issues = schema.validate(&bundle);
            assert!(
                issues.is_empty(),
                "{t}: {:?}",
                issues
                    .iter()
                    .take(5)
                    .map(|i| (&i.expression, &i.diagnostics))
                    .collect::<Vec<_>>()
            );
        }
        assert!(n > 450, "only {n} conformance resources");
    }
}
