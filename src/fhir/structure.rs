//! Checks driven by StructureDefinitions: what the R4 JSON schema cannot say. Required elements
//! (min ≥ 1), at most one `value[x]`, no empty objects or arrays (ele-1), codes of required bindings.
//! The same walker runs on the base R4 definitions and on our own profiles, so a profile is data.
//!
//! Hand-written because no maintained Rust crate validates against StructureDefinitions for R4
//! (see shared/DEPENDENCIES.md).
use std::collections::HashMap;

use serde_json::{Map, Value};

use super::invariants::{Ctx, Expr, compile, holds};
use super::search_params::is_type_suffix;
use super::valuesets::ValueSets;
use crate::error::Issue;

#[derive(Debug, Clone)]
pub struct ElementDef {
    /// Full element path as in the snapshot (`Observation.value[x]`).
    pub path: String,
    /// Last path segment without `[x]` (`value`).
    pub name: String,
    pub choice: bool,
    pub min: u32,
    /// `isSummary` in the base definition: part of what `_summary=true` returns.
    pub summary: bool,
    pub types: Vec<String>,
    pub binding: Option<String>,
    /// Path of the element whose children this one reuses (`#Observation.referenceRange`).
    pub content_reference: Option<String>,
    /// The JSON keys the element may appear under (`valueQuantity`, …), with the type each implies
    /// and the `_key` of its primitive extension; computed once at load.
    pub keys: Vec<JsonKey>,
    pub constraints: Vec<Constraint>,
}

#[derive(Debug, Clone)]
pub struct JsonKey {
    pub key: String,
    pub extension_key: String,
    pub type_code: String,
}

#[derive(Debug)]
pub struct StructureDefinition {
    pub url: String,
    pub type_name: String,
    pub kind: String,
    /// Children by parent path.
    children: HashMap<String, Vec<ElementDef>>,
    /// Invariants of the type itself (on its root element).
    pub root_constraints: Vec<Constraint>,
    /// Error-level invariants outside the FHIRPath subset, not checked.
    pub skipped_invariants: usize,
}

/// An error-level invariant compiled from the StructureDefinition.
#[derive(Debug, Clone)]
pub struct Constraint {
    pub key: String,
    pub human: String,
    pub expr: Expr,
}

/// Compile the error-level invariants of an element; returns how many could not be compiled.
fn constraints(el: &Value, out: &mut Vec<Constraint>) -> usize {
    let mut skipped = 0;
    for c in el["constraint"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["severity"] == "error")
    {
        match c["expression"].as_str().and_then(compile) {
            Some(expr) => out.push(Constraint {
                key: c["key"].as_str().unwrap_or_default().to_string(),
                human: c["human"].as_str().unwrap_or_default().to_string(),
                expr,
            }),
            None => skipped += 1,
        }
    }
    skipped
}

impl StructureDefinition {
    pub fn from_resource(sd: &Value) -> Option<Self> {
        let mut children: HashMap<String, Vec<ElementDef>> = HashMap::new();
        let (mut root_constraints, mut skipped_invariants) = (Vec::new(), 0);
        for el in sd["snapshot"]["element"].as_array()? {
            let path = el["path"].as_str()?;
            let Some((parent, last)) = path.rsplit_once('.') else {
                skipped_invariants += constraints(el, &mut root_constraints);
                continue;
            };
            let mut element_constraints = Vec::new();
            skipped_invariants += constraints(el, &mut element_constraints);
            let choice = last.ends_with("[x]");
            let name = last.trim_end_matches("[x]").to_string();
            let types: Vec<String> = el["type"]
                .as_array()
                .map(|ts| {
                    ts.iter()
                        .filter_map(|t| t["code"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let binding = (el["binding"]["strength"] == "required")
                .then(|| el["binding"]["valueSet"].as_str().map(String::from))
                .flatten();
            let content_reference = el["contentReference"]
                .as_str()
                .map(|r| r.trim_start_matches('#').to_string());
            let key = |k: String, t: &str| JsonKey {
                extension_key: format!("_{k}"),
                key: k,
                type_code: t.to_string(),
            };
            let keys = if choice {
                types
                    .iter()
                    .map(|t: &String| key(format!("{name}{}", upper_first(t)), t))
                    .collect()
            } else {
                vec![key(
                    name.clone(),
                    types
                        .first()
                        .map(String::as_str)
                        .unwrap_or("BackboneElement"),
                )]
            };
            children
                .entry(parent.to_string())
                .or_default()
                .push(ElementDef {
                    keys,
                    path: path.to_string(),
                    name,
                    choice,
                    min: el["min"].as_u64().unwrap_or(0) as u32,
                    summary: el["isSummary"].as_bool().unwrap_or(false),
                    types,
                    binding,
                    content_reference,
                    constraints: element_constraints,
                });
        }
        Some(StructureDefinition {
            url: sd["url"].as_str()?.to_string(),
            type_name: sd["type"].as_str()?.to_string(),
            kind: sd["kind"].as_str().unwrap_or_default().to_string(),
            children,
            root_constraints,
            skipped_invariants,
        })
    }

    pub fn children(&self, path: &str) -> &[ElementDef] {
        self.children.get(path).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The elements at the root of the type (`Patient.name`, `Patient.birthDate`, …).
    pub fn top_level(&self) -> &[ElementDef] {
        self.children(&self.type_name)
    }

    /// The root elements `_summary=true` returns: those the base definition marks `isSummary`.
    pub fn summary_elements(&self) -> impl Iterator<Item = &ElementDef> {
        self.top_level().iter().filter(|e| e.summary)
    }

    /// The element a JSON key of an object at `parent` stands for: `valueQuantity` is
    /// `Observation.value[x]`, and `_birthDate` (a primitive's id and extensions) is `birthDate`.
    pub fn element_of_key(&self, parent: &str, key: &str) -> Option<&ElementDef> {
        self.children(parent).iter().find(|e| {
            e.keys
                .iter()
                .any(|k| k.key == key || k.extension_key == key)
        })
    }
}

pub struct StructureDefinitions {
    by_type: HashMap<String, StructureDefinition>,
}

impl StructureDefinitions {
    pub fn from_resources(resources: &[Value]) -> Self {
        let by_type = resources
            .iter()
            .filter(|r| {
                r["resourceType"] == "StructureDefinition" && r["derivation"] != "constraint"
            })
            .filter_map(StructureDefinition::from_resource)
            .map(|sd| (sd.type_name.clone(), sd))
            .collect();
        StructureDefinitions { by_type }
    }

    pub fn get(&self, type_name: &str) -> Option<&StructureDefinition> {
        self.by_type.get(type_name)
    }

    /// (checked, skipped) error-level invariants over all loaded definitions.
    pub fn invariant_counts(&self) -> (usize, usize) {
        self.by_type.values().fold((0, 0), |(c, s), sd| {
            let here = sd.root_constraints.len()
                + sd.children
                    .values()
                    .flatten()
                    .map(|e| e.constraints.len())
                    .sum::<usize>();
            (c + here, s + sd.skipped_invariants)
        })
    }

    /// Validate a resource against the base definition of its type.
    pub fn validate(&self, resource: &Value, valuesets: &ValueSets) -> Vec<Issue> {
        let mut issues = Vec::new();
        let Some(rt) = resource["resourceType"].as_str() else {
            return issues;
        };
        let (Some(sd), Some(obj)) = (self.get(rt), resource.as_object()) else {
            return issues;
        };
        let mut walker = Walker {
            defs: self,
            valuesets,
            resource,
            issues: &mut issues,
        };
        walker.invariants(&sd.root_constraints, resource, rt);
        walker.walk(sd, rt, obj, rt);
        issues
    }
}

struct Walker<'a> {
    defs: &'a StructureDefinitions,
    valuesets: &'a ValueSets,
    resource: &'a Value,
    issues: &'a mut Vec<Issue>,
}

/// What the JSON schema's patterns cannot say of a primitive value: that a date exists in the
/// calendar (`2024-02-30` matches the pattern), that an integer fits R4's 32 bits, that a decimal is
/// a finite number (`1e999999` is valid JSON).
fn primitive_value_problem(type_code: &str, item: &Value) -> Option<String> {
    match type_code {
        "date" | "dateTime" | "instant" => {
            let s = item.as_str()?;
            super::datetime::parse_range(s)
                .is_none()
                .then(|| format!("'{s}' is not a valid {type_code}: no such date or time"))
        }
        "integer" | "positiveInt" | "unsignedInt" => {
            let n = item.as_i64()?;
            (n < i32::MIN as i64 || n > i32::MAX as i64)
                .then(|| format!("{n} is outside the range of a FHIR {type_code} (32-bit)"))
        }
        // (serde_json gives no f64 for a number beyond f64's range)
        "decimal" if item.is_number() => match item.as_f64() {
            Some(n) if n.is_finite() => None,
            _ => Some("the decimal is beyond the range of a number".to_string()),
        },
        _ => None,
    }
}

fn is_primitive(type_code: &str) -> bool {
    type_code.starts_with(|c: char| c.is_ascii_lowercase())
        || type_code.starts_with("http://hl7.org/fhirpath/")
}

fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

impl Walker<'_> {
    fn walk(
        &mut self,
        sd: &StructureDefinition,
        sd_path: &str,
        obj: &Map<String, Value>,
        expr: &str,
    ) {
        for el in sd.children(sd_path) {
            let mut present = el
                .keys
                .iter()
                .filter(|k| obj.contains_key(&k.key) || obj.contains_key(&k.extension_key));
            let first = present.next();
            let more = present.next();
            if first.is_none() && el.min >= 1 {
                let el_expr = format!("{expr}.{}", el.name);
                self.issues.push(Issue::error(
                    "required",
                    format!("{} is required (minimum cardinality {})", el.path, el.min),
                    Some(el_expr),
                ));
            }
            if el.choice && more.is_some() {
                let el_expr = format!("{expr}.{}", el.name);
                let names: Vec<&str> = el
                    .keys
                    .iter()
                    .filter(|k| obj.contains_key(&k.key))
                    .map(|k| k.key.as_str())
                    .collect();
                self.issues.push(Issue::error(
                    "structure",
                    format!(
                        "only one of {} may be present, found {}",
                        el.path,
                        names.join(", ")
                    ),
                    Some(el_expr),
                ));
            }
            for k in first.into_iter().chain(more).chain(present) {
                let (key, type_code) = (&k.key, k.type_code.as_str());
                let Some(value) = obj.get(key) else { continue };
                let key_expr = format!("{expr}.{key}");
                match value {
                    Value::Array(items) if items.is_empty() => self.empty(&key_expr),
                    Value::Array(items) => {
                        for (i, item) in items.iter().enumerate() {
                            self.item(sd, el, type_code, item, &format!("{key_expr}[{i}]"));
                        }
                    }
                    item => self.item(sd, el, type_code, item, &key_expr),
                }
            }
        }
    }

    fn invariants(&mut self, constraints: &[Constraint], element: &Value, expr: &str) {
        let ctx = Ctx {
            resource: self.resource,
            suffixes: &is_type_suffix,
        };
        for c in constraints {
            if !holds(&c.expr, element, &ctx) {
                self.issues.push(Issue::error(
                    "invariant",
                    format!("{}: {}", c.key, c.human),
                    Some(expr.to_string()),
                ));
            }
        }
    }

    fn empty(&mut self, expr: &str) {
        self.issues.push(Issue::error(
            "invariant",
            "ele-1: an element must have a value or children; empty objects and arrays are not allowed",
            Some(expr.to_string()),
        ));
    }

    fn item(
        &mut self,
        sd: &StructureDefinition,
        el: &ElementDef,
        type_code: &str,
        item: &Value,
        expr: &str,
    ) {
        if is_primitive(type_code) {
            if let Some(problem) = primitive_value_problem(type_code, item) {
                self.issues
                    .push(Issue::error("value", problem, Some(expr.to_string())));
            }
            if let (Some(vs), Some(code), "code") = (&el.binding, item.as_str(), type_code)
                && self.valuesets.contains(vs, None, code) == Some(false)
            {
                self.issues.push(Issue::error(
                    "code-invalid",
                    format!(
                        "'{code}' is not a valid code for {} (required binding to {vs})",
                        el.path
                    ),
                    Some(expr.to_string()),
                ));
            }
            return;
        }
        // the R4 JSON schema's complex types say `properties`, never `type: object`, so a number or
        // an array where a Reference or an Address belongs passes it: refused here
        let Some(obj) = item.as_object() else {
            self.issues.push(Issue::error(
                "structure",
                format!("{} must be a JSON object (a {type_code})", el.path),
                Some(expr.to_string()),
            ));
            return;
        };
        if obj.is_empty() {
            return self.empty(expr);
        }
        self.invariants(&el.constraints, item, expr);
        if let Some(vs) = &el.binding {
            self.check_coded(vs, type_code, obj, el, expr);
        }
        if let Some(target) = &el.content_reference {
            return self.walk(sd, target, obj, expr);
        }
        match type_code {
            "BackboneElement" | "Element" => self.walk(sd, &el.path, obj, expr),
            "Resource" => {
                // contained resources are checked against their own type; Bundle entries are
                // validated one by one by the Bundle processor
                if el.path.ends_with(".contained")
                    && let Some(rt) = obj.get("resourceType").and_then(Value::as_str)
                    && let Some(inner) = self.defs.get(rt)
                {
                    self.walk(inner, rt, obj, expr);
                }
            }
            other => {
                if let Some(type_sd) = self.defs.get(other) {
                    self.invariants(&type_sd.root_constraints, item, expr);
                    self.walk(type_sd, other, obj, expr);
                }
            }
        }
    }

    fn check_coded(
        &mut self,
        vs: &str,
        type_code: &str,
        obj: &Map<String, Value>,
        el: &ElementDef,
        expr: &str,
    ) {
        let coded: Vec<(Option<&str>, &str)> = match type_code {
            "Coding" => obj
                .get("code")
                .and_then(Value::as_str)
                .map(|c| vec![(obj.get("system").and_then(Value::as_str), c)])
                .unwrap_or_default(),
            "CodeableConcept" => obj
                .get("coding")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|c| Some((c["system"].as_str(), c["code"].as_str()?)))
                        .collect()
                })
                .unwrap_or_default(),
            _ => return,
        };
        if coded.is_empty() {
            return;
        }
        let known: Vec<Option<bool>> = coded
            .iter()
            .map(|(s, c)| self.valuesets.contains(vs, *s, c))
            .collect();
        if known.iter().any(|k| k.is_none() || *k == Some(true)) {
            return;
        }
        let shown: Vec<String> = coded
            .iter()
            .map(|(s, c)| format!("{}|{c}", s.unwrap_or("")))
            .collect();
        self.issues.push(Issue::error(
            "code-invalid",
            format!(
                "{} is not in the value set {vs} required for {}",
                shown.join(", "),
                el.path
            ),
            Some(expr.to_string()),
        ));
    }
}

#[cfg(test)]
mod tests {
    use crate::fhir::Definitions;

    #[test]
    fn summary_flags_come_from_the_base_definitions() {
        let defs = &Definitions::get().structures;
        let patient = defs.get("Patient").expect("Patient is loaded");
        let summary: Vec<&str> = patient
            .summary_elements()
            .map(|e| e.name.as_str())
            .collect();
        for name in [
            "id",
            "meta",
            "identifier",
            "name",
            "gender",
            "birthDate",
            "address",
        ] {
            assert!(summary.contains(&name), "{name} is summary: {summary:?}");
        }
        for name in ["text", "contained", "extension", "contact", "photo"] {
            assert!(!summary.contains(&name), "{name} is not summary");
        }
        // inside a backbone element too: Observation.component.code is, .interpretation is not
        let obs = defs.get("Observation").unwrap();
        let component: Vec<(&str, bool)> = obs
            .children("Observation.component")
            .iter()
            .map(|e| (e.name.as_str(), e.summary))
            .collect();
        assert!(component.contains(&("code", true)), "{component:?}");
        assert!(
            component.contains(&("interpretation", false)),
            "{component:?}"
        );
        assert_eq!(
            obs.element_of_key("Observation", "valueQuantity")
                .map(|e| e.path.as_str()),
            Some("Observation.value[x]")
        );
        assert_eq!(
            patient
                .element_of_key("Patient", "_birthDate")
                .map(|e| e.name.as_str()),
            Some("birthDate")
        );
        // the read-only conformance types are there for `_summary` too
        let sd = defs
            .get("StructureDefinition")
            .expect("StructureDefinition");
        assert!(sd.summary_elements().any(|e| e.name == "url"));
        assert!(!sd.summary_elements().any(|e| e.name == "snapshot"));
    }
}
