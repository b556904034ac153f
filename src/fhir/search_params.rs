//! The search parameters Sentinella offers, read from the packaged R4 SearchParameters, and the
//! extraction of index entries from a resource on every write.
use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;

use super::datetime::{self, Range};
use super::fhirpath::{self, PathExpr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    Token,
    Reference,
    Date,
    String,
    Uri,
}

impl ParamType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "token" => ParamType::Token,
            "reference" => ParamType::Reference,
            "date" => ParamType::Date,
            "string" => ParamType::String,
            "uri" => ParamType::Uri,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::Token => "token",
            ParamType::Reference => "reference",
            ParamType::Date => "date",
            ParamType::String => "string",
            ParamType::Uri => "uri",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SearchParam {
    pub code: String,
    pub url: String,
    pub kind: ParamType,
    pub expression: String,
    /// Resource types a reference parameter may point to.
    pub targets: Vec<String>,
    paths: Vec<PathExpr>,
}

/// One index entry: what a search can match on.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    /// Token (system, code), string (normalised), uri, or reference (`Type/id`) in `value`.
    Text {
        system: Option<String>,
        value: String,
    },
    Date(Range),
}

#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub param: String,
    pub value: IndexValue,
}

/// The longest indexed text kept, in bytes: PostgreSQL refuses a B-tree row over ~2.7 KB, so both
/// stores keep the first 1,000 bytes of a longer value (prefix searches on them still work; the
/// resource itself is stored whole).
pub const MAX_INDEXED_BYTES: usize = 1000;

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

fn bound_for_storage(value: &mut IndexValue) {
    if let IndexValue::Text { system, value } = value {
        truncate_utf8(value, MAX_INDEXED_BYTES);
        if let Some(s) = system {
            truncate_utf8(s, MAX_INDEXED_BYTES);
        }
    }
}

pub struct SearchParamRegistry {
    /// resource type → code → parameter (BTreeMap: CapabilityStatement lists them in a stable order)
    by_type: HashMap<String, BTreeMap<String, SearchParam>>,
    type_suffixes: HashSet<String>,
    /// (resource type, code) → how the parameter shares another's index rows.
    shared: HashMap<(String, String), Sharing>,
}

/// A parameter whose values are, in part or whole, those of another parameter of the same type:
/// those values are stored once, under the other, and a search looks under both. `patient` is
/// `subject` restricted to Patient references; `combo-code` is `code` plus the components' codes.
#[derive(Debug, Clone, PartialEq)]
pub struct Sharing {
    /// The parameter that stores the shared values.
    pub base: String,
    /// Indexes of this parameter's paths that the base stores (all of them for a restriction).
    skip: Vec<usize>,
    /// A restriction to references of this type: a search filters the base's rows by it.
    pub reference_type: Option<String>,
}

/// How a search finds a parameter's rows: under these parameter codes, and for a restriction
/// only references of this type.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAs {
    pub params: Vec<String>,
    pub reference_type: Option<String>,
}

/// Find, for each parameter of one type, another of the same kind it shares paths with.
fn sharing_of(params: &BTreeMap<String, SearchParam>) -> Vec<(String, Sharing)> {
    let mut out = Vec::new();
    for (code, p) in params {
        for (base_code, b) in params {
            if base_code == code || b.kind != p.kind || b.paths.is_empty() {
                continue;
            }
            // a restriction: every path is one of the base's with `where(resolve() is T)`
            let stripped: Option<Vec<(PathExpr, &str)>> =
                p.paths.iter().map(|x| x.without_resolve_is()).collect();
            if let Some(stripped) = stripped
                && stripped.len() == b.paths.len()
                && stripped.iter().all(|(x, _)| b.paths.contains(x))
                && stripped.windows(2).all(|w| w[0].1 == w[1].1)
                && b.paths.iter().all(|x| x.without_resolve_is().is_none())
            {
                out.push((
                    code.clone(),
                    Sharing {
                        base: base_code.clone(),
                        skip: (0..p.paths.len()).collect(),
                        reference_type: stripped.first().map(|(_, t)| t.to_string()),
                    },
                ));
                break;
            }
            // a superset: every path of the base is one of this parameter's, and it has more
            if p.paths.len() > b.paths.len() && b.paths.iter().all(|x| p.paths.contains(x)) {
                let skip = p
                    .paths
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| b.paths.contains(x))
                    .map(|(i, _)| i)
                    .collect();
                out.push((
                    code.clone(),
                    Sharing {
                        base: base_code.clone(),
                        skip,
                        reference_type: None,
                    },
                ));
                break;
            }
        }
    }
    // a base must store its own rows: drop sharing whose base shares in turn
    let sharing: HashSet<String> = out.iter().map(|(c, _)| c.clone()).collect();
    out.retain(|(_, s)| !sharing.contains(&s.base));
    out
}

/// `_profile` is a Resource-level parameter; it is indexed for every type.
pub const PROFILE_PARAM: &str = "_profile";

impl SearchParamRegistry {
    pub fn from_resources(resources: &[Value]) -> Self {
        let mut by_type: HashMap<String, BTreeMap<String, SearchParam>> = HashMap::new();
        for sp in resources
            .iter()
            .filter(|r| r["resourceType"] == "SearchParameter")
        {
            let (Some(code), Some(kind), Some(expr)) = (
                sp["code"].as_str(),
                ParamType::parse(sp["type"].as_str().unwrap_or("")),
                sp["expression"].as_str(),
            ) else {
                continue;
            };
            for base in sp["base"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !super::is_served(base) {
                    continue;
                }
                match fhirpath::parse_for_type(expr, base) {
                    Ok(paths) if !paths.is_empty() => {
                        let targets = sp["target"]
                            .as_array()
                            .map(|t| {
                                t.iter()
                                    .filter_map(|x| x.as_str().map(String::from))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let param = SearchParam {
                            code: code.to_string(),
                            url: sp["url"].as_str().unwrap_or_default().to_string(),
                            kind,
                            expression: expr.to_string(),
                            targets,
                            paths,
                        };
                        by_type
                            .entry(base.to_string())
                            .or_default()
                            .insert(code.to_string(), param);
                    }
                    Ok(_) => {}
                    Err(part) => tracing::debug!(
                        code,
                        base,
                        part,
                        "search parameter outside the supported FHIRPath subset"
                    ),
                }
            }
        }
        for rt in super::SERVED_TYPES {
            let paths =
                fhirpath::parse_for_type(&format!("{rt}.meta.profile"), rt).unwrap_or_default();
            let profile = SearchParam {
                code: PROFILE_PARAM.into(),
                url: "http://hl7.org/fhir/SearchParameter/Resource-profile".into(),
                kind: ParamType::Uri,
                expression: "Resource.meta.profile".into(),
                targets: vec![],
                paths,
            };
            by_type
                .entry(rt.to_string())
                .or_default()
                .insert(PROFILE_PARAM.into(), profile);
        }
        let type_suffixes = TYPE_NAMES.iter().map(|s| s.to_string()).collect();
        let mut shared = HashMap::new();
        for (rt, params) in &by_type {
            for (code, sharing) in sharing_of(params) {
                shared.insert((rt.clone(), code), sharing);
            }
        }
        SearchParamRegistry {
            by_type,
            type_suffixes,
            shared,
        }
    }

    /// Where a search finds the rows of `code` (see `Sharing`). Rows written before sharing
    /// existed are under the parameter's own code, which is always searched too.
    pub fn stored_as(&self, resource_type: &str, code: &str) -> StoredAs {
        match self
            .shared
            .get(&(resource_type.to_string(), code.to_string()))
        {
            Some(s) => StoredAs {
                params: vec![code.to_string(), s.base.clone()],
                reference_type: s.reference_type.clone(),
            },
            None => StoredAs {
                params: vec![code.to_string()],
                reference_type: None,
            },
        }
    }

    pub fn get(&self, resource_type: &str, code: &str) -> Option<&SearchParam> {
        self.by_type.get(resource_type)?.get(code)
    }

    pub fn for_type(&self, resource_type: &str) -> impl Iterator<Item = &SearchParam> {
        self.by_type
            .get(resource_type)
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// The index rows to store for a resource: every parameter's entries, except the values a
    /// parameter shares with another, stored once under that other (see `Sharing`).
    pub fn extract(&self, resource: &Value) -> Vec<IndexEntry> {
        self.entries(resource, true)
    }

    /// Every parameter's entries, shared values included: for judging a resource in memory
    /// (access scopes, subscription topics and filters), where each parameter is looked up by name.
    pub fn extract_all(&self, resource: &Value) -> Vec<IndexEntry> {
        self.entries(resource, false)
    }

    fn entries(&self, resource: &Value, share: bool) -> Vec<IndexEntry> {
        let Some(rt) = resource["resourceType"].as_str() else {
            return vec![];
        };
        let mut out = Vec::new();
        for param in self.for_type(rt) {
            let sharing = share
                .then(|| self.shared.get(&(rt.to_string(), param.code.clone())))
                .flatten();
            for (i, path) in param.paths.iter().enumerate() {
                if sharing.is_some_and(|s| s.skip.contains(&i)) {
                    continue; // stored under the base parameter
                }
                for node in path.evaluate(resource, &self.type_suffixes) {
                    for mut value in index_values(param.kind, node) {
                        if share {
                            bound_for_storage(&mut value);
                        }
                        let entry = IndexEntry {
                            param: param.code.clone(),
                            value,
                        };
                        if !out.contains(&entry) {
                            out.push(entry);
                        }
                    }
                }
            }
        }
        out
    }
}

/// Whether `s` is the capitalised name of an R4 data type, as ends a choice key (`valueQuantity`).
pub fn is_type_suffix(s: &str) -> bool {
    TYPE_NAMES.contains(&s)
}

/// The capitalised names of R4 data types that can end a choice key (`valueQuantity`).
const TYPE_NAMES: &[&str] = &[
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
];

fn text(system: Option<&str>, value: &str) -> IndexValue {
    IndexValue::Text {
        system: system.map(String::from),
        value: value.to_string(),
    }
}

fn index_values(kind: ParamType, node: &Value) -> Vec<IndexValue> {
    match kind {
        ParamType::Token => token_values(node),
        ParamType::Reference => reference_values(node),
        ParamType::Date => datetime::value_range(node)
            .map(IndexValue::Date)
            .into_iter()
            .collect(),
        ParamType::String => string_values(node)
            .into_iter()
            .map(|s| text(None, &normalize(&s)))
            .collect(),
        ParamType::Uri => node
            .as_str()
            .map(|s| vec![text(None, s)])
            .unwrap_or_default(),
    }
}

/// A Reference is found by its `Type/id` (or, another server's, its full URL) and by its logical
/// identifier (`:identifier`, as a token with its system); a canonical (`MeasureReport.measure`) by
/// its URL, with and without its `|version`.
fn reference_values(node: &Value) -> Vec<IndexValue> {
    if let Value::String(canonical) = node {
        let mut out = vec![text(None, canonical)];
        if let Some((url, _)) = canonical.split_once('|') {
            out.push(text(None, url));
        }
        return out;
    }
    let mut out = match node.get("reference").and_then(Value::as_str) {
        Some(r) => match fhirpath::split_reference(r) {
            Some((t, id)) => vec![text(None, &format!("{t}/{id}"))],
            // another server's resource: found only by its full URL
            None if r.contains("://") => vec![text(None, r)],
            None => vec![],
        },
        None => vec![],
    };
    let identifier = &node["identifier"];
    if let (Some(system), Some(value)) =
        (identifier["system"].as_str(), identifier["value"].as_str())
    {
        out.push(text(Some(system), value));
    }
    out
}

fn token_values(node: &Value) -> Vec<IndexValue> {
    match node {
        Value::String(s) => vec![text(None, s)],
        Value::Bool(b) => vec![text(None, if *b { "true" } else { "false" })],
        Value::Object(o) => {
            if let Some(codings) = o.get("coding").and_then(Value::as_array) {
                return codings.iter().flat_map(token_values).collect();
            }
            let code = o
                .get("code")
                .or_else(|| o.get("value"))
                .and_then(Value::as_str);
            code.map(|c| vec![text(o.get("system").and_then(Value::as_str), c)])
                .unwrap_or_default()
        }
        _ => vec![],
    }
}

fn string_values(node: &Value) -> Vec<String> {
    match node {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().flat_map(string_values).collect(),
        Value::Object(o) => {
            const PARTS: &[&str] = &[
                "text",
                "family",
                "given",
                "prefix",
                "suffix",
                "line",
                "city",
                "district",
                "state",
                "postalCode",
                "country",
            ];
            PARTS
                .iter()
                .filter_map(|k| o.get(*k))
                .flat_map(string_values)
                .collect()
        }
        _ => vec![],
    }
}

/// String search is case- and accent-insensitive (R4): lower case, common Latin accents removed.
pub fn normalize(s: &str) -> String {
    s.chars()
        .flat_map(char::to_lowercase)
        .map(|c| match c {
            'à' | 'á' | 'â' | 'ä' | 'ã' | 'å' => 'a',
            'è' | 'é' | 'ê' | 'ë' => 'e',
            'ì' | 'í' | 'î' | 'ï' => 'i',
            'ò' | 'ó' | 'ô' | 'ö' | 'õ' => 'o',
            'ù' | 'ú' | 'û' | 'ü' => 'u',
            'ç' => 'c',
            'ñ' => 'n',
            other => other,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::Definitions;
    use serde_json::json;

    #[test]
    fn observation_index_covers_the_rules_lookups() {
        let obs = json!({
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "600-7"}]},
            "subject": {"reference": "Patient/p1"}, "specimen": {"reference": "Specimen/s1"},
            "effectiveDateTime": "2024-03-01T10:00:00+01:00",
            "hasMember": [{"reference": "Observation/o2"}]
        });
        let entries = Definitions::get().search.extract(&obs);
        let has = |p: &str, v: &str| {
            entries.iter().any(|e| {
                e.param == p && matches!(&e.value, IndexValue::Text { value, .. } if value == v)
            })
        };
        assert!(has("code", "600-7"));
        // shared: `patient` is found through `subject`, `combo-code` through `code`
        assert!(!has("patient", "Patient/p1"));
        assert!(!has("combo-code", "600-7"));
        assert!(has("subject", "Patient/p1"));
        assert!(has("specimen", "Specimen/s1"));
        assert!(has("has-member", "Observation/o2"));
        assert!(has("status", "final"));
        assert!(
            entries
                .iter()
                .any(|e| e.param == "date" && matches!(e.value, IndexValue::Date(_)))
        );
    }

    #[test]
    fn parameters_with_a_shared_path_store_it_once() {
        let search = &Definitions::get().search;
        let patient = search.stored_as("Observation", "patient");
        assert_eq!(patient.params, ["patient", "subject"]);
        assert_eq!(patient.reference_type.as_deref(), Some("Patient"));
        let combo = search.stored_as("Observation", "combo-code");
        assert_eq!(combo.params, ["combo-code", "code"]);
        assert_eq!(combo.reference_type, None);
        // the component codes are combo-code's own rows
        let obs = json!({
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
            "component": [{"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}}]
        });
        let entries = search.extract(&obs);
        let rows = |p: &str| {
            entries
                .iter()
                .filter(|e| e.param == p)
                .filter_map(|e| match &e.value {
                    IndexValue::Text { value, .. } => Some(value.as_str()),
                    IndexValue::Date(_) => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(rows("code"), ["85354-9"]);
        assert_eq!(rows("combo-code"), ["8480-6"]);
        // a parameter of its own is its own
        let status = search.stored_as("Observation", "status");
        assert_eq!(status.params, ["status"]);
        let mut shared: Vec<String> = search
            .shared
            .iter()
            .map(|((rt, code), s)| format!("{rt}.{code}->{}", s.base))
            .collect();
        shared.sort();
        println!("{}", shared.join("\n"));
    }

    #[test]
    fn strings_are_case_and_accent_insensitive() {
        assert_eq!(normalize("Niccolò ÉLIA"), "niccolo elia");
    }
}
