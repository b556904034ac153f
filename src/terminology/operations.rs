//! The FHIR R4 terminology operations over what the server knows: the code systems of
//! `codesystems.rs`, the ValueSets (ours in `terminology/`, R4's in `fhir/r4/valuesets.json`) and
//! our ConceptMaps (the per-laboratory maps of local codes among them):
//! `CodeSystem/$lookup`, `CodeSystem/$subsumes`, `ValueSet/$expand`, `ValueSet/$validate-code`,
//! `ConceptMap/$translate`. Typed inputs in, R4 `Parameters` / `ValueSet` JSON out, [`TermError`]
//! for what cannot be answered; no HTTP here (`crate::api::terminology` is the edge).
//!
//! Every ValueSet is expanded once, when the registry is built (D.M. 1990 classes through the
//! ICD-9-CM hierarchy included): one bit per concept of each code system it draws on. So
//! `$validate-code` costs two hash look-ups (system, code) and a bit test whatever the size of the
//! set, and `$expand` pages through a list that is already in order.
//!
//! Besides the ValueSet resources, every *complete* code system has the implicit value sets of
//! R4's SNOMED CT convention: `<system>?fhir_vs` (all its codes) and `<system>?fhir_vs=isa/<code>`
//! (a code and everything below it). A fragment has none: a code outside it might still exist.
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::{Value, json};

use super::codesystems::{CodeSystem, CodeSystems, Concept, Hierarchy, filter_words};

/// A ValueSet expansion larger than this needs `count` (R4: a server may refuse an expansion as
/// too costly; the client pages with `count` and `offset`).
pub const MAX_EXPANSION: usize = 1000;
/// The largest page `count` may ask for.
pub const MAX_COUNT: usize = 1000;
/// The longest `filter` text (in characters) and the most words it may have.
pub const MAX_FILTER_CHARS: usize = 200;
const MAX_FILTER_WORDS: usize = 10;
/// The most codings a CodeableConcept may carry into `$validate-code` or `$translate`.
pub const MAX_CODINGS: usize = 20;
/// The most `property` names a `$lookup` may ask for.
pub const MAX_PROPERTIES: usize = 50;
/// Nested ValueSet references go at most this deep (and never in a circle).
const MAX_NESTING: usize = 8;

const CONCEPT_DEFINITION: &str =
    "http://hl7.org/fhir/StructureDefinition/valueset-concept-definition";

/// Why an operation has no answer. The HTTP edge turns it into an OperationOutcome.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TermError {
    /// The code system, code, ValueSet or ConceptMap named is not known here (404).
    #[error("{why}")]
    NotFound { param: Option<String>, why: String },
    /// A parameter is missing, malformed or contradicts another (400).
    #[error("{why}")]
    Invalid { param: String, why: String },
    /// The answer would be too large to give at once: page it (400, too-costly).
    #[error("{0}")]
    TooCostly(String),
    /// Defined by R4 but not done here, or not decidable on the data this server has (400,
    /// not-supported).
    #[error("{why}")]
    NotSupported { param: Option<String>, why: String },
}

impl TermError {
    /// The parameter the error is about, if any.
    pub fn param(&self) -> Option<&str> {
        match self {
            TermError::NotFound { param, .. } | TermError::NotSupported { param, .. } => {
                param.as_deref()
            }
            TermError::Invalid { param, .. } => Some(param),
            TermError::TooCostly(_) => Some("count"),
        }
    }
}

fn invalid(param: &str, why: impl Into<String>) -> TermError {
    TermError::Invalid {
        param: param.to_string(),
        why: why.into(),
    }
}

fn not_found(param: &str, why: impl Into<String>) -> TermError {
    TermError::NotFound {
        param: Some(param.to_string()),
        why: why.into(),
    }
}

fn unsupported(param: Option<&str>, why: impl Into<String>) -> TermError {
    TermError::NotSupported {
        param: param.map(String::from),
        why: why.into(),
    }
}

// =================================================================================================
// Inputs

/// A Coding as given: a `coding` parameter, or `system` + `code` (+ `version`, `display`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CodingIn {
    pub system: Option<String>,
    pub version: Option<String>,
    pub code: Option<String>,
    pub display: Option<String>,
}

impl CodingIn {
    /// A Coding JSON object.
    pub fn from_json(v: &Value) -> CodingIn {
        let text = |k: &str| v[k].as_str().map(String::from);
        CodingIn {
            system: text("system"),
            version: text("version"),
            code: text("code"),
            display: text("display"),
        }
    }

    /// A Coding written in a query as `system|code` (a bare code has no system).
    pub fn from_token(s: &str) -> CodingIn {
        match s.split_once('|') {
            Some((system, code)) => CodingIn {
                system: (!system.is_empty()).then(|| system.to_string()),
                code: (!code.is_empty()).then(|| code.to_string()),
                ..CodingIn::default()
            },
            None => CodingIn {
                code: Some(s.to_string()),
                ..CodingIn::default()
            },
        }
    }

    fn from_parts(
        system: Option<&str>,
        code: Option<&str>,
        version: Option<&str>,
        display: Option<&str>,
    ) -> CodingIn {
        CodingIn {
            system: system.map(String::from),
            version: version.map(String::from),
            code: code.map(String::from),
            display: display.map(String::from),
        }
    }
}

/// The codings of a CodeableConcept JSON object.
pub fn codings_of(concept: &Value) -> Vec<CodingIn> {
    concept["coding"]
        .as_array()
        .into_iter()
        .flatten()
        .map(CodingIn::from_json)
        .collect()
}

/// The resource an instance-level call names (`id`) and/or the canonical `url` a type-level call
/// gives (`url|version` allowed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Target {
    pub id: Option<String>,
    pub url: Option<String>,
}

impl Target {
    pub fn id(id: &str) -> Target {
        Target {
            id: Some(id.to_string()),
            url: None,
        }
    }

    pub fn url(url: &str) -> Target {
        Target {
            id: None,
            url: Some(url.to_string()),
        }
    }
}

/// `url|version` → (url, version).
fn split_canonical(s: &str) -> (&str, Option<&str>) {
    match s.split_once('|') {
        Some((u, v)) if !v.is_empty() => (u, Some(v)),
        Some((u, _)) => (u, None),
        None => (s, None),
    }
}

/// The one version asked for, from `url|version` and a separate version parameter.
fn wanted_version<'a>(
    in_url: Option<&'a str>,
    param: Option<&'a str>,
    param_name: &str,
) -> Result<Option<&'a str>, TermError> {
    match (in_url, param) {
        (Some(a), Some(b)) if a != b => Err(invalid(
            param_name,
            format!("{param_name} '{b}' contradicts the version '{a}' in url"),
        )),
        (a, b) => Ok(a.or(b)),
    }
}

#[derive(Debug, Clone, Default)]
pub struct LookupIn {
    pub system: Option<String>,
    pub code: Option<String>,
    pub version: Option<String>,
    pub coding: Option<CodingIn>,
    pub display_language: Option<String>,
    /// `property` names (R4: none given, the server chooses: here, everything it has).
    pub properties: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct SubsumesIn {
    /// The CodeSystem id of an instance-level call.
    pub instance: Option<String>,
    pub system: Option<String>,
    pub version: Option<String>,
    pub code_a: Option<String>,
    pub code_b: Option<String>,
    pub coding_a: Option<CodingIn>,
    pub coding_b: Option<CodingIn>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subsumption {
    Equivalent,
    Subsumes,
    SubsumedBy,
    NotSubsumed,
}

impl Subsumption {
    pub fn code(self) -> &'static str {
        match self {
            Subsumption::Equivalent => "equivalent",
            Subsumption::Subsumes => "subsumes",
            Subsumption::SubsumedBy => "subsumed-by",
            Subsumption::NotSubsumed => "not-subsumed",
        }
    }

    pub fn to_parameters(self) -> Value {
        json!({"resourceType": "Parameters", "parameter": [
            {"name": "outcome", "valueCode": self.code()}
        ]})
    }
}

#[derive(Debug, Clone, Default)]
pub struct ExpandIn {
    pub target: Target,
    pub value_set_version: Option<String>,
    pub filter: Option<String>,
    pub count: Option<usize>,
    pub offset: Option<usize>,
    pub display_language: Option<String>,
    pub include_designations: bool,
    pub include_definition: bool,
    pub active_only: bool,
    /// Leave out grouping (abstract) codes.
    pub exclude_not_for_ui: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ValidateIn {
    pub target: Target,
    pub value_set_version: Option<String>,
    pub code: Option<String>,
    pub system: Option<String>,
    pub system_version: Option<String>,
    pub display: Option<String>,
    pub coding: Option<CodingIn>,
    pub codeable_concept: Option<Vec<CodingIn>>,
    pub display_language: Option<String>,
    /// R4 `abstract`: grouping codes (ICD-9-CM chapters, sections) count as valid.
    pub abstract_ok: bool,
}

/// `$validate-code`'s answer: R4's `result`, `message` (why not, or warnings when true) and
/// `display` (the concept's display, when the code exists).
#[derive(Debug, Clone, PartialEq)]
pub struct Validation {
    pub result: bool,
    pub message: Option<String>,
    pub display: Option<String>,
}

impl Validation {
    pub fn to_parameters(&self) -> Value {
        let mut p = vec![json!({"name": "result", "valueBoolean": self.result})];
        if let Some(m) = &self.message {
            p.push(json!({"name": "message", "valueString": m}));
        }
        if let Some(d) = &self.display {
            p.push(json!({"name": "display", "valueString": d}));
        }
        json!({"resourceType": "Parameters", "parameter": p})
    }
}

#[derive(Debug, Clone, Default)]
pub struct TranslateIn {
    /// A ConceptMap (instance id and/or `url`); neither: every map the server has.
    pub map: Target,
    pub concept_map_version: Option<String>,
    pub code: Option<String>,
    pub system: Option<String>,
    pub version: Option<String>,
    pub coding: Option<CodingIn>,
    pub codeable_concept: Option<Vec<CodingIn>>,
    /// The ValueSet the code was chosen from (a map's declared source scope).
    pub source: Option<String>,
    /// The ValueSet wanted (a map's declared target scope).
    pub target: Option<String>,
    pub target_system: Option<String>,
    pub reverse: bool,
}

/// One `match` of `$translate`.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    pub equivalence: String,
    /// The Coding mapped to (absent for an `unmatched` entry without a code).
    pub concept: Option<Value>,
    /// The ConceptMap the match comes from.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Translation {
    pub result: bool,
    pub message: Option<String>,
    pub matches: Vec<Match>,
}

impl Translation {
    pub fn to_parameters(&self) -> Value {
        let mut p = vec![json!({"name": "result", "valueBoolean": self.result})];
        if let Some(m) = &self.message {
            p.push(json!({"name": "message", "valueString": m}));
        }
        for m in &self.matches {
            let mut parts = vec![json!({"name": "equivalence", "valueCode": m.equivalence})];
            if let Some(c) = &m.concept {
                parts.push(json!({"name": "concept", "valueCoding": c}));
            }
            parts.push(json!({"name": "source", "valueUri": m.source}));
            p.push(json!({"name": "match", "part": parts}));
        }
        json!({"resourceType": "Parameters", "parameter": p})
    }
}

// =================================================================================================
// Value sets, expanded once

/// A set of codes: (system index, concept index) in order, and a bit per concept of each system.
#[derive(Debug, Default, Clone)]
struct CodeSet {
    list: Vec<(u32, u32)>,
    bits: Vec<(u32, Vec<u64>)>,
}

impl CodeSet {
    fn contains(&self, s: u32, c: u32) -> bool {
        self.bits
            .iter()
            .find(|(x, _)| *x == s)
            .and_then(|(_, b)| b.get(c as usize / 64))
            .is_some_and(|w| (w >> (c % 64)) & 1 == 1)
    }

    fn insert(&mut self, s: u32, c: u32, system_len: usize) {
        let k = match self.bits.iter().position(|(x, _)| *x == s) {
            Some(k) => k,
            None => {
                self.bits.push((s, vec![0; system_len.div_ceil(64)]));
                self.bits.len() - 1
            }
        };
        let word = &mut self.bits[k].1[c as usize / 64];
        let bit = 1u64 << (c % 64);
        if *word & bit == 0 {
            *word |= bit;
            self.list.push((s, c));
        }
    }

    fn retain(&mut self, keep: impl Fn(u32, u32) -> bool) {
        let gone: Vec<(u32, u32)> = self
            .list
            .iter()
            .copied()
            .filter(|&(s, c)| !keep(s, c))
            .collect();
        for (s, c) in gone {
            if let Some((_, b)) = self.bits.iter_mut().find(|(x, _)| *x == s) {
                b[c as usize / 64] &= !(1u64 << (c % 64));
            }
        }
        self.list.retain(|&(s, c)| keep(s, c));
    }
}

/// What a ValueSet resource expands to.
#[derive(Debug, Default)]
struct Members {
    set: CodeSet,
    /// Fragment systems the set takes whole or by filter: a code unknown there may still belong.
    partial: Vec<u32>,
    /// The display a concept has in this set (`compose.include.concept.display`), where it
    /// differs from the code system's.
    displays: HashMap<(u32, u32), String>,
}

#[derive(Debug)]
struct ValueSetDef {
    url: String,
    version: Option<String>,
    resource: Value,
    /// `Err`: why it cannot be enumerated here.
    members: Result<Members, String>,
}

/// A ValueSet an operation is about: a resource, or an implicit value set of a complete system.
enum Resolved<'r> {
    Explicit(&'r ValueSetDef, &'r Members),
    /// `<system>?fhir_vs`
    All {
        url: String,
        system: u32,
    },
    /// `<system>?fhir_vs=isa/<code>`
    IsA {
        url: String,
        system: u32,
        concept: u32,
    },
}

// =================================================================================================
// Concept maps

#[derive(Debug)]
struct TargetDef {
    code: Option<String>,
    display: Option<String>,
    equivalence: String,
}

#[derive(Debug)]
struct ElementDef {
    code: String,
    display: Option<String>,
    targets: Vec<TargetDef>,
}

#[derive(Debug)]
enum Unmapped {
    /// The code maps to itself.
    Provided,
    Fixed {
        code: String,
        display: Option<String>,
    },
}

#[derive(Debug)]
struct GroupDef {
    source: String,
    target: Option<String>,
    target_version: Option<String>,
    elements: Vec<ElementDef>,
    /// source code → elements
    by_code: HashMap<String, Vec<usize>>,
    /// target code → (element, target)
    by_target: HashMap<String, Vec<(usize, usize)>>,
    unmapped: Option<(Unmapped, String)>,
}

#[derive(Debug)]
struct MapDef {
    url: String,
    version: Option<String>,
    id: Option<String>,
    source_scope: Option<String>,
    target_scope: Option<String>,
    groups: Vec<GroupDef>,
}

impl MapDef {
    fn from_resource(r: &Value) -> Option<MapDef> {
        let scope = |keys: [&str; 2]| {
            keys.iter()
                .find_map(|k| r[*k].as_str())
                .map(|s| split_canonical(s).0.to_string())
        };
        let mut groups = Vec::new();
        for g in r["group"].as_array().into_iter().flatten() {
            let Some(source) = g["source"].as_str() else {
                continue;
            };
            let mut group = GroupDef {
                source: source.to_string(),
                target: g["target"].as_str().map(String::from),
                target_version: g["targetVersion"].as_str().map(String::from),
                elements: Vec::new(),
                by_code: HashMap::new(),
                by_target: HashMap::new(),
                unmapped: None,
            };
            for e in g["element"].as_array().into_iter().flatten() {
                let Some(code) = e["code"].as_str() else {
                    continue;
                };
                let k = group.elements.len();
                let targets: Vec<TargetDef> = e["target"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| TargetDef {
                        code: t["code"].as_str().map(String::from),
                        display: t["display"].as_str().map(String::from),
                        equivalence: t["equivalence"]
                            .as_str()
                            .unwrap_or("equivalent")
                            .to_string(),
                    })
                    .collect();
                for (j, t) in targets.iter().enumerate() {
                    if let Some(tc) = &t.code {
                        group.by_target.entry(tc.clone()).or_default().push((k, j));
                    }
                }
                group.by_code.entry(code.to_string()).or_default().push(k);
                group.elements.push(ElementDef {
                    code: code.to_string(),
                    display: e["display"].as_str().map(String::from),
                    targets,
                });
            }
            let u = &g["unmapped"];
            group.unmapped = match u["mode"].as_str() {
                Some("provided") => Some((Unmapped::Provided, "equal".to_string())),
                Some("fixed") => u["code"].as_str().map(|code| {
                    (
                        Unmapped::Fixed {
                            code: code.to_string(),
                            display: u["display"].as_str().map(String::from),
                        },
                        "inexact".to_string(),
                    )
                }),
                // other-map would chain maps: not done here (none of ours uses it)
                _ => None,
            };
            groups.push(group);
        }
        Some(MapDef {
            url: r["url"].as_str()?.to_string(),
            version: r["version"].as_str().map(String::from),
            id: r["id"].as_str().map(String::from),
            source_scope: scope(["sourceUri", "sourceCanonical"]),
            target_scope: scope(["targetUri", "targetCanonical"]),
            groups,
        })
    }
}

/// R4 equivalence seen from the other side of the map.
fn reversed(equivalence: &str) -> &str {
    match equivalence {
        "wider" => "narrower",
        "narrower" => "wider",
        "subsumes" => "specializes",
        "specializes" => "subsumes",
        other => other,
    }
}

// =================================================================================================
// The registry

/// The ValueSets and ConceptMaps over the code systems, expanded and indexed once.
pub struct Registry<'a> {
    cs: &'a CodeSystems,
    value_sets: Vec<ValueSetDef>,
    vs_by_url: HashMap<String, u32>,
    vs_by_id: HashMap<String, u32>,
    maps: Vec<MapDef>,
    map_by_url: HashMap<String, u32>,
    map_by_id: HashMap<String, u32>,
}

impl Registry<'static> {
    /// The process-wide registry over `CodeSystems::get()`, our resources and R4's, built on first
    /// use (call [`warm_up`] at start to pay for it there).
    pub fn get() -> &'static Registry<'static> {
        static R: OnceLock<Registry<'static>> = OnceLock::new();
        R.get_or_init(|| {
            let ours = &super::Terminology::get().resources;
            let r4 = super::codesystems::r4_resources();
            let all: Vec<&Value> = ours.iter().chain(r4).collect();
            Registry::build(CodeSystems::get(), &all)
        })
    }
}

/// Build the code system index and expand every ValueSet now (the first request would otherwise
/// pay for it); logs what cannot be expanded here.
pub fn warm_up() {
    let r = Registry::get();
    let unexpandable: Vec<String> = r
        .unexpandable()
        .map(|(url, why)| format!("{url}: {why}"))
        .collect();
    tracing::info!(
        code_systems = r.cs.len(),
        value_sets = r.value_sets.len(),
        concept_maps = r.maps.len(),
        not_expandable = ?unexpandable,
        "terminology services ready"
    );
}

impl<'a> Registry<'a> {
    /// Index `resources` (ValueSets and ConceptMaps; others are skipped; the first of a URL or id
    /// wins) over the code systems `cs`.
    pub fn build(cs: &'a CodeSystems, resources: &[&Value]) -> Registry<'a> {
        let mut reg = Registry {
            cs,
            value_sets: Vec::new(),
            vs_by_url: HashMap::new(),
            vs_by_id: HashMap::new(),
            maps: Vec::new(),
            map_by_url: HashMap::new(),
            map_by_id: HashMap::new(),
        };
        let mut sources: HashMap<&str, &Value> = HashMap::new();
        for r in resources.iter().filter(|r| r["resourceType"] == "ValueSet") {
            if let Some(url) = r["url"].as_str() {
                sources.entry(url).or_insert(r);
            }
        }
        for r in resources {
            match r["resourceType"].as_str() {
                Some("ValueSet") => {
                    let Some(url) = r["url"].as_str() else {
                        continue;
                    };
                    if reg.vs_by_url.contains_key(url) {
                        continue;
                    }
                    let members = reg.compile(r, &sources, &mut vec![url.to_string()]);
                    let i = reg.value_sets.len() as u32;
                    reg.vs_by_url.insert(url.to_string(), i);
                    if let Some(id) = r["id"].as_str() {
                        reg.vs_by_id.entry(id.to_string()).or_insert(i);
                    }
                    reg.value_sets.push(ValueSetDef {
                        url: url.to_string(),
                        version: r["version"].as_str().map(String::from),
                        resource: (*r).clone(),
                        members,
                    });
                }
                Some("ConceptMap") => {
                    let Some(m) = MapDef::from_resource(r) else {
                        continue;
                    };
                    if reg.map_by_url.contains_key(&m.url) {
                        continue;
                    }
                    let i = reg.maps.len() as u32;
                    reg.map_by_url.insert(m.url.clone(), i);
                    if let Some(id) = &m.id {
                        reg.map_by_id.entry(id.clone()).or_insert(i);
                    }
                    reg.maps.push(m);
                }
                _ => {}
            }
        }
        reg
    }

    pub fn code_systems(&self) -> &'a CodeSystems {
        self.cs
    }

    /// The ValueSets that cannot be expanded here, and why (a code system the server lacks…).
    pub fn unexpandable(&self) -> impl Iterator<Item = (&str, &str)> {
        self.value_sets.iter().filter_map(|v| match &v.members {
            Ok(_) => None,
            Err(why) => Some((v.url.as_str(), why.as_str())),
        })
    }

    /// The number of codes of a ValueSet resource (`None`: unknown URL, or not expandable).
    pub fn value_set_size(&self, url: &str) -> Option<usize> {
        let v = &self.value_sets[*self.vs_by_url.get(url)? as usize];
        v.members.as_ref().ok().map(|m| m.set.list.len())
    }

    // --- expanding a ValueSet resource ----------------------------------------------------------

    fn compile(
        &self,
        vs: &Value,
        sources: &HashMap<&str, &Value>,
        stack: &mut Vec<String>,
    ) -> Result<Members, String> {
        let compose = &vs["compose"];
        let Some(includes) = compose["include"].as_array() else {
            return Err("it has no compose.include".into());
        };
        let mut out = Members::default();
        for inc in includes {
            let set = self.include_set(inc, sources, stack, &mut out)?;
            for (s, c) in set.list {
                out.set.insert(s, c, self.cs.system(s).len());
            }
        }
        let mut excluded = CodeSet::default();
        let mut ignored = Members::default();
        for exc in compose["exclude"].as_array().into_iter().flatten() {
            let set = self.include_set(exc, sources, stack, &mut ignored)?;
            for (s, c) in set.list {
                excluded.insert(s, c, self.cs.system(s).len());
            }
        }
        if !excluded.list.is_empty() {
            out.set.retain(|s, c| !excluded.contains(s, c));
        }
        Ok(out)
    }

    /// One `include` (or `exclude`): its system part, intersected with every ValueSet it names.
    fn include_set(
        &self,
        inc: &Value,
        sources: &HashMap<&str, &Value>,
        stack: &mut Vec<String>,
        out: &mut Members,
    ) -> Result<CodeSet, String> {
        let mut parts: Vec<CodeSet> = Vec::new();
        if let Some(system) = inc["system"].as_str() {
            let si = self.cs.find(system).ok_or_else(|| {
                format!("it draws on {system}, a code system this server does not have")
            })?;
            let sys = self.cs.system(si);
            if let (Some(wanted), Some(have)) = (inc["version"].as_str(), &sys.version)
                && wanted != have
            {
                return Err(format!(
                    "it asks for version {wanted} of {system}; this server has version {have}"
                ));
            }
            let mut set = CodeSet::default();
            if let Some(concepts) = inc["concept"].as_array() {
                for c in concepts {
                    let code = c["code"].as_str().unwrap_or_default();
                    let i = sys
                        .find(code)
                        .ok_or_else(|| format!("{system}#{code} is not a code of {}", sys.name))?;
                    set.insert(si, i, sys.len());
                    if let Some(d) = c["display"].as_str()
                        && sys.concept(i).display.as_deref() != Some(d)
                    {
                        out.displays.insert((si, i), d.to_string());
                    }
                }
            } else {
                let mut chosen: Vec<u32> = (0..sys.len() as u32).collect();
                for f in inc["filter"].as_array().into_iter().flatten() {
                    chosen = apply_filter(sys, f, chosen)?;
                }
                if !sys.is_complete() && !out.partial.contains(&si) {
                    out.partial.push(si);
                }
                for c in chosen {
                    set.insert(si, c, sys.len());
                }
            }
            parts.push(set);
        }
        for url in inc["valueSet"].as_array().into_iter().flatten() {
            let url = split_canonical(url.as_str().unwrap_or_default()).0;
            if stack.iter().any(|s| s == url) {
                return Err(format!("it includes {url}, which includes it back"));
            }
            if stack.len() > MAX_NESTING {
                return Err("its ValueSets are nested too deeply".into());
            }
            let nested = sources.get(url).ok_or_else(|| {
                format!("it includes {url}, a ValueSet this server does not have")
            })?;
            stack.push(url.to_string());
            let m = self.compile(nested, sources, stack);
            stack.pop();
            let m = m.map_err(|why| format!("it includes {url}, and {why}"))?;
            for p in m.partial {
                if !out.partial.contains(&p) {
                    out.partial.push(p);
                }
            }
            out.displays.extend(m.displays);
            parts.push(m.set);
        }
        let mut parts = parts.into_iter();
        let mut set = parts
            .next()
            .ok_or("an include has neither a system nor a valueSet")?;
        for other in parts {
            set.retain(|s, c| other.contains(s, c));
        }
        Ok(set)
    }

    // --- resolving -------------------------------------------------------------------------------

    fn value_set(
        &self,
        target: &Target,
        version_param: Option<&str>,
    ) -> Result<Resolved<'_>, TermError> {
        let (url, url_version) = match &target.url {
            Some(u) => {
                let (u, v) = split_canonical(u);
                (Some(u), v)
            }
            None => (None, None),
        };
        let version = wanted_version(url_version, version_param, "valueSetVersion")?;
        let def = match (&target.id, url) {
            (Some(id), _) => {
                let i = self
                    .vs_by_id
                    .get(id.as_str())
                    .ok_or_else(|| TermError::NotFound {
                        param: None,
                        why: format!("ValueSet/{id} is not known (see GET /fhir/ValueSet)"),
                    })?;
                let def = &self.value_sets[*i as usize];
                if let Some(u) = url
                    && u != def.url
                {
                    return Err(invalid(
                        "url",
                        format!("url {u} is not the url of ValueSet/{id} ({})", def.url),
                    ));
                }
                def
            }
            (None, Some(u)) => match self.vs_by_url.get(u) {
                Some(i) => &self.value_sets[*i as usize],
                None => return self.implicit(u, version),
            },
            (None, None) => {
                return Err(invalid(
                    "url",
                    "url is required: the canonical URL of the ValueSet (or call ValueSet/{id}/$…)",
                ));
            }
        };
        if let Some(v) = version
            && def.version.as_deref() != Some(v)
        {
            return Err(not_found(
                "valueSetVersion",
                format!(
                    "version {v} of ValueSet {} is not known (this server has {})",
                    def.url,
                    def.version.as_deref().unwrap_or("an unversioned one")
                ),
            ));
        }
        match &def.members {
            Ok(m) => Ok(Resolved::Explicit(def, m)),
            Err(why) => Err(unsupported(
                None,
                format!("ValueSet {} cannot be expanded here: {why}", def.url),
            )),
        }
    }

    /// `<system>?fhir_vs` and `<system>?fhir_vs=isa/<code>` of a complete code system.
    fn implicit(&self, url: &str, version: Option<&str>) -> Result<Resolved<'_>, TermError> {
        let unknown = || {
            not_found(
                "url",
                format!(
                    "ValueSet {url} is not known (see GET /fhir/ValueSet; a complete code system's implicit value sets are <system>?fhir_vs and <system>?fhir_vs=isa/<code>)"
                ),
            )
        };
        let Some((system, query)) = url.split_once('?') else {
            return Err(unknown());
        };
        let rest = query.strip_prefix("fhir_vs").ok_or_else(unknown)?;
        let si = self.cs.find(system).ok_or_else(|| {
            not_found(
                "url",
                format!("code system {system} is not known to this server"),
            )
        })?;
        let sys = self.cs.system(si);
        if !sys.is_complete() {
            return Err(unsupported(
                Some("url"),
                format!(
                    "{} is known here only as a fragment ({} codes enumerated by our ValueSets and ConceptMaps): its implicit value set cannot be expanded or checked",
                    sys.name,
                    sys.len()
                ),
            ));
        }
        if let (Some(v), Some(have)) = (version, &sys.version)
            && v != have
        {
            return Err(not_found(
                "valueSetVersion",
                format!("version {v} of {system} is not known (this server has {have})"),
            ));
        }
        if rest.is_empty() {
            return Ok(Resolved::All {
                url: url.to_string(),
                system: si,
            });
        }
        let code = rest.strip_prefix("=isa/").ok_or_else(unknown)?;
        if !sys.knows_hierarchy() {
            return Err(unsupported(
                Some("url"),
                format!("{} has no is-a hierarchy here", sys.name),
            ));
        }
        let concept = sys.find(code).ok_or_else(|| {
            not_found(
                "url",
                format!("'{code}' is not a code of {} ({system})", sys.name),
            )
        })?;
        Ok(Resolved::IsA {
            url: url.to_string(),
            system: si,
            concept,
        })
    }

    fn resolved_contains(&self, r: &Resolved<'_>, s: u32, c: u32) -> bool {
        match r {
            Resolved::Explicit(_, m) => m.set.contains(s, c),
            Resolved::All { system, .. } => *system == s,
            Resolved::IsA {
                system, concept, ..
            } => *system == s && self.cs.system(s).subsumes(*concept, c),
        }
    }

    fn resolved_list<'r>(&self, r: &'r Resolved<'_>) -> Cow<'r, [(u32, u32)]> {
        match r {
            Resolved::Explicit(_, m) => Cow::Borrowed(&m.set.list),
            Resolved::All { system, .. } => {
                let n = self.cs.system(*system).len() as u32;
                Cow::Owned((0..n).map(|c| (*system, c)).collect())
            }
            Resolved::IsA {
                system, concept, ..
            } => Cow::Owned(
                self.cs
                    .system(*system)
                    .descendants_or_self(*concept)
                    .into_iter()
                    .map(|c| (*system, c))
                    .collect(),
            ),
        }
    }

    fn resolved_canonical(&self, r: &Resolved<'_>) -> String {
        match r {
            Resolved::Explicit(def, _) => match &def.version {
                Some(v) => format!("{}|{v}", def.url),
                None => def.url.clone(),
            },
            Resolved::All { url, .. } | Resolved::IsA { url, .. } => url.clone(),
        }
    }

    /// The ValueSet resource an expansion is written into (an implicit one is made up).
    fn resolved_resource(&self, r: &Resolved<'_>) -> Value {
        match r {
            Resolved::Explicit(def, _) => {
                let mut v = def.resource.clone();
                if let Some(o) = v.as_object_mut() {
                    // the narrative describes the definition, not this expansion
                    o.remove("text");
                }
                v
            }
            Resolved::All { url, system } | Resolved::IsA { url, system, .. } => {
                let sys = self.cs.system(*system);
                let mut include = json!({"system": sys.url});
                if let Some(v) = &sys.version {
                    include["version"] = json!(v);
                }
                let title = match r {
                    Resolved::IsA { concept, .. } => {
                        let c = sys.concept(*concept);
                        include["filter"] =
                            json!([{"property": "concept", "op": "is-a", "value": c.code}]);
                        format!("{} {} and below", sys.name, c.code)
                    }
                    _ => format!("All codes of {}", sys.name),
                };
                let mut v = json!({
                    "resourceType": "ValueSet",
                    "url": url,
                    "title": title,
                    "status": "active",
                    "compose": {"include": [include]}
                });
                if let Some(ver) = &sys.version {
                    v["version"] = json!(ver);
                }
                v
            }
        }
    }

    /// The display of a member: in the language asked for when a designation has it, else the
    /// one the value set gives, else the code system's (`None`: the source has none — the packaged
    /// R4 code systems keep codes only).
    fn resolved_display<'r>(
        &'r self,
        r: &'r Resolved<'_>,
        s: u32,
        c: u32,
        language: Option<&str>,
    ) -> Option<&'r str> {
        let concept = self.cs.system(s).concept(c);
        if language.is_some() {
            let d = concept.display_in(language);
            if concept.display.as_deref() != Some(d) && d != concept.code {
                return Some(d);
            }
        }
        if let Resolved::Explicit(_, m) = r
            && let Some(d) = m.displays.get(&(s, c))
        {
            return Some(d);
        }
        concept.display.as_deref()
    }

    // --- $lookup ---------------------------------------------------------------------------------

    /// `CodeSystem/$lookup`: name, version, display, designations and properties of a code.
    pub fn lookup(&self, input: &LookupIn) -> Result<Value, TermError> {
        let coding = match (&input.coding, &input.code) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "coding",
                    "give either code (with system) or coding, not both",
                ));
            }
            (Some(c), None) => {
                let mut c = c.clone();
                if c.version.is_none() {
                    c.version = input.version.clone();
                }
                c
            }
            (None, Some(code)) => CodingIn::from_parts(
                input.system.as_deref(),
                Some(code),
                input.version.as_deref(),
                None,
            ),
            (None, None) => {
                return Err(invalid("code", "code (with system) or coding is required"));
            }
        };
        let at = if input.coding.is_some() {
            "coding."
        } else {
            ""
        };
        let system = coding
            .system
            .as_deref()
            .ok_or_else(|| invalid(&format!("{at}system"), "the code's system is required"))?;
        let code = coding
            .code
            .as_deref()
            .ok_or_else(|| invalid(&format!("{at}code"), "the coding has no code"))?;
        if input.properties.len() > MAX_PROPERTIES {
            return Err(invalid(
                "property",
                format!("at most {MAX_PROPERTIES} property names"),
            ));
        }
        let sys = self.system_for(system, &format!("{at}system"))?;
        check_version(sys, coding.version.as_deref(), &format!("{at}version"))?;
        let concept = sys.lookup(code).ok_or_else(|| {
            not_found(
                &format!("{at}code"),
                format!("{}{}", unknown_code_text(sys, code), fragment_note(sys)),
            )
        })?;
        let lang = input.display_language.as_deref();
        let mut p = vec![json!({"name": "name", "valueString": sys.name})];
        if let Some(v) = &sys.version {
            p.push(json!({"name": "version", "valueString": v}));
        }
        p.push(json!({"name": "display", "valueString": concept.display_in(lang)}));
        let wanted =
            |name: &str| input.properties.is_empty() || input.properties.iter().any(|p| p == name);
        for d in &concept.designations {
            let by_language = d.language.as_deref().is_some_and(|l| {
                input
                    .properties
                    .iter()
                    .any(|p| p.strip_prefix("lang.") == Some(l))
            });
            if !(wanted("designation") || by_language) {
                continue;
            }
            let mut parts = Vec::new();
            if let Some(l) = &d.language {
                parts.push(json!({"name": "language", "valueCode": l}));
            }
            if let Some(u) = &d.use_ {
                parts.push(json!({"name": "use", "valueCoding": u}));
            }
            parts.push(json!({"name": "value", "valueString": d.value}));
            p.push(json!({"name": "designation", "part": parts}));
        }
        let property = |code: &str, value: Value, description: Option<&str>| {
            let mut parts = vec![json!({"name": "code", "valueCode": code}), value];
            if let Some(d) = description {
                parts.push(json!({"name": "description", "valueString": d}));
            }
            json!({"name": "property", "part": parts})
        };
        if wanted("definition")
            && let Some(d) = &concept.definition
        {
            p.push(property(
                "definition",
                json!({"name": "value", "valueString": d}),
                None,
            ));
        }
        for (name, related) in [("parent", &concept.parents), ("child", &concept.children)] {
            if !wanted(name) {
                continue;
            }
            for &r in related {
                let other = sys.concept(r);
                p.push(property(
                    name,
                    json!({"name": "value", "valueCode": other.code}),
                    other.display.as_deref(),
                ));
            }
        }
        for prop in &concept.properties {
            if wanted(&prop.code) {
                let mut value = json!({"name": "value"});
                value[prop.key.as_str()] = prop.value.clone();
                p.push(property(&prop.code, value, None));
            }
        }
        Ok(json!({"resourceType": "Parameters", "parameter": p}))
    }

    fn system_for(&self, system: &str, param: &str) -> Result<&'a CodeSystem, TermError> {
        let (url, _) = split_canonical(system);
        self.cs.by_url(url).ok_or_else(|| {
            not_found(
                param,
                format!("code system {url} is not known to this server (its code systems: see GET /fhir/CodeSystem)"),
            )
        })
    }

    // --- $subsumes -------------------------------------------------------------------------------

    /// `CodeSystem/$subsumes`: how code A relates to code B in the system's is-a hierarchy.
    pub fn subsumes(&self, input: &SubsumesIn) -> Result<Subsumption, TermError> {
        let mut system: Option<(String, &'static str)> = None;
        let mut note = |s: Option<&str>, param: &'static str| -> Result<(), TermError> {
            let Some(s) = s else {
                return Ok(());
            };
            let s = split_canonical(s).0;
            match &system {
                Some((have, from)) if have != s => Err(invalid(
                    param,
                    format!("{param} {s} is not the system given by {from} ({have})"),
                )),
                Some(_) => Ok(()),
                None => {
                    system = Some((s.to_string(), param));
                    Ok(())
                }
            }
        };
        if let Some(id) = &input.instance {
            let i = self.cs.find_id(id).ok_or_else(|| TermError::NotFound {
                param: None,
                why: format!("CodeSystem/{id} is not known (see GET /fhir/CodeSystem)"),
            })?;
            note(Some(&self.cs.system(i).url), "the instance")?;
        }
        note(input.system.as_deref(), "system")?;
        note(
            input.coding_a.as_ref().and_then(|c| c.system.as_deref()),
            "codingA.system",
        )?;
        note(
            input.coding_b.as_ref().and_then(|c| c.system.as_deref()),
            "codingB.system",
        )?;
        let Some((system, _)) = system else {
            return Err(invalid(
                "system",
                "system is required (or codings with their system, or CodeSystem/{id}/$subsumes)",
            ));
        };
        let sys = self.system_for(&system, "system")?;
        check_version(sys, input.version.as_deref(), "version")?;
        for c in [&input.coding_a, &input.coding_b].into_iter().flatten() {
            check_version(sys, c.version.as_deref(), "version")?;
        }
        let a = pick_code(input.code_a.as_deref(), input.coding_a.as_ref(), "A")?;
        let b = pick_code(input.code_b.as_deref(), input.coding_b.as_ref(), "B")?;
        let find = |(code, param): (&str, String)| {
            sys.find(code).ok_or_else(|| {
                not_found(
                    &param,
                    format!("{}{}", unknown_code_text(sys, code), fragment_note(sys)),
                )
            })
        };
        let (ia, ib) = (find(a)?, find(b)?);
        match &sys.hierarchy {
            Hierarchy::IsA | Hierarchy::Flat => {}
            Hierarchy::Unknown => {
                return Err(unsupported(
                    None,
                    format!(
                        "subsumption cannot be decided in {}: this server has only a fragment of it ({} codes enumerated by our ValueSets and ConceptMaps), without its hierarchy",
                        sys.name,
                        sys.len()
                    ),
                ));
            }
            Hierarchy::Other(meaning) => {
                return Err(unsupported(
                    None,
                    format!(
                        "subsumption cannot be decided in {}: its hierarchy means {meaning}, not is-a",
                        sys.name
                    ),
                ));
            }
        }
        Ok(if ia == ib {
            Subsumption::Equivalent
        } else if sys.subsumes(ia, ib) {
            Subsumption::Subsumes
        } else if sys.subsumes(ib, ia) {
            Subsumption::SubsumedBy
        } else {
            Subsumption::NotSubsumed
        })
    }

    // --- $expand ---------------------------------------------------------------------------------

    /// `ValueSet/$expand`: the ValueSet with its `expansion` (a page of it with `count`/`offset`).
    pub fn expand(&self, input: &ExpandIn) -> Result<Value, TermError> {
        let vs = self.value_set(&input.target, input.value_set_version.as_deref())?;
        if let Some(c) = input.count
            && c > MAX_COUNT
        {
            return Err(invalid(
                "count",
                format!("count {c} is above the largest page, {MAX_COUNT}"),
            ));
        }
        let words = match &input.filter {
            Some(f) if f.chars().count() > MAX_FILTER_CHARS => {
                return Err(invalid(
                    "filter",
                    format!("filter is longer than {MAX_FILTER_CHARS} characters"),
                ));
            }
            Some(f) => filter_words(f),
            None => Vec::new(),
        };
        if words.len() > MAX_FILTER_WORDS {
            return Err(invalid(
                "filter",
                format!("filter has more than {MAX_FILTER_WORDS} words"),
            ));
        }
        let list = self.resolved_list(&vs);
        let lang = input.display_language.as_deref();
        let selective = !words.is_empty() || input.active_only || input.exclude_not_for_ui;
        let chosen: Cow<[(u32, u32)]> = if selective {
            Cow::Owned(
                list.iter()
                    .copied()
                    .filter(|&(s, c)| {
                        let concept = self.cs.system(s).concept(c);
                        (!input.active_only || !concept.inactive)
                            && (!input.exclude_not_for_ui || !concept.is_abstract)
                            && (words.is_empty() || concept.matches_filter(&words))
                    })
                    .collect(),
            )
        } else {
            Cow::Borrowed(&list[..])
        };
        let total = chosen.len();
        let offset = input.offset.unwrap_or(0);
        let count = match input.count {
            Some(c) => c,
            None if total.saturating_sub(offset) > MAX_EXPANSION => {
                return Err(TermError::TooCostly(format!(
                    "ValueSet {} has {total} codes{}: more than {MAX_EXPANSION} cannot be expanded at once; ask for a page with count (at most {MAX_COUNT}) and offset",
                    self.resolved_canonical(&vs),
                    if input.filter.is_some() {
                        " matching the filter"
                    } else {
                        ""
                    },
                )));
            }
            None => total,
        };
        let page = &chosen[offset.min(total)..offset.saturating_add(count).min(total)];
        let contains: Vec<Value> = page
            .iter()
            .map(|&(s, c)| self.contains_entry(&vs, s, c, input, lang))
            .collect();
        let mut parameter = Vec::new();
        if let Some(f) = &input.filter {
            parameter.push(json!({"name": "filter", "valueString": f}));
        }
        if input.count.is_some() || input.offset.is_some() {
            parameter.push(json!({"name": "offset", "valueInteger": offset}));
        }
        if let Some(c) = input.count {
            parameter.push(json!({"name": "count", "valueInteger": c}));
        }
        if let Some(l) = lang {
            parameter.push(json!({"name": "displayLanguage", "valueCode": l}));
        }
        for (name, on) in [
            ("includeDesignations", input.include_designations),
            ("includeDefinition", input.include_definition),
            ("activeOnly", input.active_only),
            ("excludeNotForUI", input.exclude_not_for_ui),
        ] {
            if on {
                parameter.push(json!({"name": name, "valueBoolean": true}));
            }
        }
        // the version of each code system the expansion draws on
        let mut systems: Vec<u32> = Vec::new();
        for &(s, _) in list.iter() {
            if !systems.contains(&s) {
                systems.push(s);
            }
        }
        for s in systems {
            let sys = self.cs.system(s);
            if sys.version.is_some() {
                parameter.push(json!({"name": "version", "valueUri": sys.canonical()}));
            }
        }
        let mut expansion = json!({
            "identifier": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
            "timestamp": crate::fhir::datetime::format_instant(crate::fhir::datetime::now_micros()),
            "total": total,
        });
        if input.count.is_some() || input.offset.is_some() {
            expansion["offset"] = json!(offset);
        }
        if !parameter.is_empty() {
            expansion["parameter"] = Value::Array(parameter);
        }
        if !contains.is_empty() {
            expansion["contains"] = Value::Array(contains);
        }
        let mut out = self.resolved_resource(&vs);
        out["expansion"] = expansion;
        Ok(out)
    }

    fn contains_entry(
        &self,
        vs: &Resolved<'_>,
        s: u32,
        c: u32,
        input: &ExpandIn,
        lang: Option<&str>,
    ) -> Value {
        let sys = self.cs.system(s);
        let concept = sys.concept(c);
        let mut e = serde_json::Map::new();
        if input.include_definition
            && let Some(d) = &concept.definition
        {
            e.insert(
                "extension".into(),
                json!([{"url": CONCEPT_DEFINITION, "valueString": d}]),
            );
        }
        e.insert("system".into(), json!(sys.url));
        if concept.is_abstract {
            e.insert("abstract".into(), json!(true));
        }
        if concept.inactive {
            e.insert("inactive".into(), json!(true));
        }
        if let Some(v) = &sys.version {
            e.insert("version".into(), json!(v));
        }
        e.insert("code".into(), json!(concept.code));
        if let Some(d) = self.resolved_display(vs, s, c, lang) {
            e.insert("display".into(), json!(d));
        }
        if input.include_designations && !concept.designations.is_empty() {
            let ds: Vec<Value> = concept
                .designations
                .iter()
                .map(|d| {
                    let mut v = json!({"value": d.value});
                    if let Some(l) = &d.language {
                        v["language"] = json!(l);
                    }
                    if let Some(u) = &d.use_ {
                        v["use"] = u.clone();
                    }
                    v
                })
                .collect();
            e.insert("designation".into(), Value::Array(ds));
        }
        Value::Object(e)
    }

    // --- $validate-code --------------------------------------------------------------------------

    /// `ValueSet/$validate-code`: is the code (Coding, CodeableConcept) in the value set? A code
    /// that is not, or a wrong display, is `result` false with a message — not an error.
    pub fn validate_code(&self, input: &ValidateIn) -> Result<Validation, TermError> {
        let given = [
            input.code.is_some(),
            input.coding.is_some(),
            input.codeable_concept.is_some(),
        ];
        match given.iter().filter(|g| **g).count() {
            1 => {}
            0 => {
                return Err(invalid(
                    "code",
                    "one of code (with system), coding or codeableConcept is required",
                ));
            }
            _ => {
                return Err(invalid(
                    "coding",
                    "give only one of code (with system), coding or codeableConcept",
                ));
            }
        }
        if input.code.is_none() && (input.system.is_some() || input.display.is_some()) {
            let which = if input.system.is_some() {
                "system"
            } else {
                "display"
            };
            return Err(invalid(
                which,
                format!("{which} goes with code; a coding or codeableConcept carries its own"),
            ));
        }
        let vs = self.value_set(&input.target, input.value_set_version.as_deref())?;
        let lang = input.display_language.as_deref();
        if let Some(codings) = &input.codeable_concept {
            if codings.is_empty() {
                return Err(invalid(
                    "codeableConcept.coding",
                    "the codeableConcept has no coding",
                ));
            }
            if codings.len() > MAX_CODINGS {
                return Err(invalid(
                    "codeableConcept.coding",
                    format!("at most {MAX_CODINGS} codings"),
                ));
            }
            let mut checks = Vec::with_capacity(codings.len());
            for (i, c) in codings.iter().enumerate() {
                checks.push(self.check_coding(
                    &vs,
                    c,
                    &format!("codeableConcept.coding[{i}]"),
                    input.abstract_ok,
                    lang,
                )?);
            }
            let result = checks.iter().any(|c| c.result);
            let display = checks
                .iter()
                .find(|c| c.result)
                .or_else(|| checks.iter().find(|c| c.display.is_some()))
                .and_then(|c| c.display.clone());
            let messages: Vec<String> = checks.into_iter().filter_map(|c| c.message).collect();
            return Ok(Validation {
                result,
                message: (!messages.is_empty()).then(|| messages.join("; ")),
                display,
            });
        }
        let (coding, at) = match &input.coding {
            Some(c) => (Cow::Borrowed(c), "coding"),
            None => {
                if input.system.is_none() {
                    return Err(invalid(
                        "system",
                        "system is required with code (R4: a code without its system is ambiguous)",
                    ));
                }
                (
                    Cow::Owned(CodingIn::from_parts(
                        input.system.as_deref(),
                        input.code.as_deref(),
                        input.system_version.as_deref(),
                        input.display.as_deref(),
                    )),
                    "",
                )
            }
        };
        let mut coding = coding;
        if input.coding.is_some() && input.system_version.is_some() {
            // systemVersion applies to the coding when the coding does not say
            let c = coding.to_mut();
            if c.version.is_none() {
                c.version = input.system_version.clone();
            }
        }
        self.check_coding(&vs, &coding, at, input.abstract_ok, lang)
    }

    fn check_coding(
        &self,
        vs: &Resolved<'_>,
        coding: &CodingIn,
        at: &str,
        abstract_ok: bool,
        lang: Option<&str>,
    ) -> Result<Validation, TermError> {
        let field = |f: &str| {
            if at.is_empty() {
                f.to_string()
            } else {
                format!("{at}.{f}")
            }
        };
        let code = coding
            .code
            .as_deref()
            .ok_or_else(|| invalid(&field("code"), "the coding has no code"))?;
        let Some(system) = coding.system.as_deref() else {
            return Ok(no(format!("The coding '{code}' has no system")));
        };
        let Some(si) = self.cs.find(system) else {
            return Ok(no(format!(
                "The code system '{system}' is not known to this server: '{code}' cannot be in value set {}",
                self.resolved_canonical(vs)
            )));
        };
        let sys = self.cs.system(si);
        if let (Some(v), Some(have)) = (coding.version.as_deref(), &sys.version)
            && v != have
        {
            return Ok(no(format!(
                "Version '{v}' of code system '{system}' is not known here (this server has version '{have}')"
            )));
        }
        let Some(ci) = sys.find(code) else {
            return Ok(no(format!(
                "{}{}",
                unknown_code_text(sys, code),
                fragment_note(sys)
            )));
        };
        let concept = sys.concept(ci);
        let display = self.resolved_display(vs, si, ci, lang).map(String::from);
        let named = match &display {
            Some(d) => format!("'{code}' ({d})"),
            None => format!("'{code}'"),
        };
        if !self.resolved_contains(vs, si, ci) {
            return Ok(Validation {
                result: false,
                message: Some(format!(
                    "The code {named} of '{system}' is not in the value set {}",
                    self.resolved_canonical(vs)
                )),
                display,
            });
        }
        if concept.is_abstract && !abstract_ok {
            return Ok(Validation {
                result: false,
                message: Some(format!(
                    "{named} is a grouping concept of {} (notSelectable), not a code to record; abstract=true accepts it where grouping codes are allowed",
                    sys.name
                )),
                display,
            });
        }
        let message = match coding.display.as_deref() {
            None => None,
            Some(given) => match display_ok(vs, concept, given, display.as_deref()) {
                Some(true) => None,
                Some(false) => {
                    return Ok(Validation {
                        result: false,
                        message: Some(format!(
                            "The display \"{given}\" is incorrect for '{code}' of '{system}': expected \"{}\"",
                            display.as_deref().unwrap_or_default()
                        )),
                        display,
                    });
                }
                None => Some(format!(
                    "{} gives no display for '{code}' here: the display \"{given}\" was not checked",
                    sys.name
                )),
            },
        };
        Ok(Validation {
            result: true,
            message,
            display,
        })
    }

    // --- $translate ------------------------------------------------------------------------------

    /// `ConceptMap/$translate`: what a code maps to in one ConceptMap, or in every map the server
    /// has (then narrowed by `source`, `target`, `targetsystem`). No mapping is `result` false.
    pub fn translate(&self, input: &TranslateIn) -> Result<Translation, TermError> {
        let given = [
            input.code.is_some(),
            input.coding.is_some(),
            input.codeable_concept.is_some(),
        ];
        match given.iter().filter(|g| **g).count() {
            1 => {}
            0 => {
                return Err(invalid(
                    "code",
                    "one of code (with system), coding or codeableConcept is required",
                ));
            }
            _ => {
                return Err(invalid(
                    "coding",
                    "give only one of code (with system), coding or codeableConcept",
                ));
            }
        }
        let maps = self.maps_for(&input.map, input.concept_map_version.as_deref())?;
        let codings: Vec<(CodingIn, String)> =
            match (&input.code, &input.coding, &input.codeable_concept) {
                (Some(code), _, _) => {
                    if input.system.is_none() {
                        return Err(invalid("system", "system is required with code"));
                    }
                    vec![(
                        CodingIn::from_parts(
                            input.system.as_deref(),
                            Some(code),
                            input.version.as_deref(),
                            None,
                        ),
                        String::new(),
                    )]
                }
                (_, Some(c), _) => vec![(c.clone(), "coding".to_string())],
                (_, _, Some(cc)) => {
                    if cc.is_empty() || cc.len() > MAX_CODINGS {
                        return Err(invalid(
                            "codeableConcept.coding",
                            format!("the codeableConcept must have 1 to {MAX_CODINGS} codings"),
                        ));
                    }
                    cc.iter()
                        .enumerate()
                        .map(|(i, c)| (c.clone(), format!("codeableConcept.coding[{i}]")))
                        .collect()
                }
                _ => unreachable!("one input was checked above"),
            };
        let (source_scope, target_scope) = if input.reverse {
            (input.target.as_deref(), input.source.as_deref())
        } else {
            (input.source.as_deref(), input.target.as_deref())
        };
        let scoped: Vec<&MapDef> = maps
            .into_iter()
            .filter(|m| {
                source_scope.is_none_or(|s| m.source_scope.as_deref() == Some(split_canonical(s).0))
                    && target_scope
                        .is_none_or(|t| m.target_scope.as_deref() == Some(split_canonical(t).0))
            })
            .collect();
        let mut matches: Vec<Match> = Vec::new();
        let mut asked = Vec::new();
        for (coding, at) in &codings {
            let field = |f: &str| {
                if at.is_empty() {
                    f.to_string()
                } else {
                    format!("{at}.{f}")
                }
            };
            let system = coding
                .system
                .as_deref()
                .ok_or_else(|| invalid(&field("system"), "the coding has no system"))?;
            let code = coding
                .code
                .as_deref()
                .ok_or_else(|| invalid(&field("code"), "the coding has no code"))?;
            asked.push(format!("'{code}' of {system}"));
            for m in &scoped {
                for found in self.map_code(m, system, code, input) {
                    if !matches.contains(&found) {
                        matches.push(found);
                    }
                }
            }
        }
        let result = matches
            .iter()
            .any(|m| !matches!(m.equivalence.as_str(), "unmatched" | "disjoint"));
        let message = (!result).then(|| {
            let searched = match (&input.map.id, &input.map.url, scoped.len()) {
                (None, None, n) => format!("the {n} ConceptMaps that apply"),
                (_, _, 0) => {
                    "the ConceptMap named (its scope does not match source / target)".to_string()
                }
                _ => format!("ConceptMap {}", scoped[0].url),
            };
            format!(
                "No {}mapping of {} in {searched}{}",
                if input.reverse { "reverse " } else { "" },
                asked.join(", "),
                input
                    .target_system
                    .as_deref()
                    .map(|t| format!(" to {t}"))
                    .unwrap_or_default()
            )
        });
        Ok(Translation {
            result,
            message,
            matches,
        })
    }

    fn maps_for(&self, target: &Target, version: Option<&str>) -> Result<Vec<&MapDef>, TermError> {
        let (url, url_version) = match &target.url {
            Some(u) => {
                let (u, v) = split_canonical(u);
                (Some(u), v)
            }
            None => (None, None),
        };
        let version = wanted_version(url_version, version, "conceptMapVersion")?;
        let chosen = match (&target.id, url) {
            (Some(id), _) => {
                let m = &self.maps[*self.map_by_id.get(id.as_str()).ok_or_else(|| {
                    TermError::NotFound {
                        param: None,
                        why: format!("ConceptMap/{id} is not known (see GET /fhir/ConceptMap)"),
                    }
                })? as usize];
                if let Some(u) = url
                    && u != m.url
                {
                    return Err(invalid(
                        "url",
                        format!("url {u} is not the url of ConceptMap/{id} ({})", m.url),
                    ));
                }
                m
            }
            (None, Some(u)) => {
                &self.maps[*self.map_by_url.get(u).ok_or_else(|| {
                    not_found(
                        "url",
                        format!("ConceptMap {u} is not known (see GET /fhir/ConceptMap)"),
                    )
                })? as usize]
            }
            (None, None) => {
                if version.is_some() {
                    return Err(invalid(
                        "conceptMapVersion",
                        "conceptMapVersion needs the url of the ConceptMap",
                    ));
                }
                return Ok(self.maps.iter().collect());
            }
        };
        if let Some(v) = version
            && chosen.version.as_deref() != Some(v)
        {
            return Err(not_found(
                "conceptMapVersion",
                format!(
                    "version {v} of ConceptMap {} is not known (this server has {})",
                    chosen.url,
                    chosen.version.as_deref().unwrap_or("an unversioned one")
                ),
            ));
        }
        Ok(vec![chosen])
    }

    fn map_code(&self, m: &MapDef, system: &str, code: &str, input: &TranslateIn) -> Vec<Match> {
        let system = split_canonical(system).0;
        let mut out = Vec::new();
        let coding = |sys: &str, version: Option<&str>, code: &str, display: Option<&str>| {
            let mut c = json!({"system": sys});
            if let Some(v) = version {
                c["version"] = json!(v);
            }
            c["code"] = json!(code);
            let display = display.map(String::from).or_else(|| {
                self.cs
                    .by_url(sys)
                    .and_then(|s| s.lookup(code))
                    .and_then(|c| c.display.clone())
            });
            if let Some(d) = display {
                c["display"] = json!(d);
            }
            c
        };
        for g in &m.groups {
            if input.reverse {
                let Some(target) = &g.target else {
                    continue;
                };
                if target != system
                    || input
                        .target_system
                        .as_deref()
                        .is_some_and(|t| split_canonical(t).0 != g.source)
                {
                    continue;
                }
                for &(k, j) in g.by_target.get(code).into_iter().flatten() {
                    let e = &g.elements[k];
                    out.push(Match {
                        equivalence: reversed(&e.targets[j].equivalence).to_string(),
                        concept: Some(coding(&g.source, None, &e.code, e.display.as_deref())),
                        source: m.url.clone(),
                    });
                }
                continue;
            }
            if g.source != system
                || input
                    .target_system
                    .as_deref()
                    .is_some_and(|t| g.target.as_deref() != Some(split_canonical(t).0))
            {
                continue;
            }
            let elements = g.by_code.get(code);
            for &k in elements.into_iter().flatten() {
                for t in &g.elements[k].targets {
                    let concept = match (&g.target, &t.code) {
                        (Some(ts), Some(tc)) => Some(coding(
                            ts,
                            g.target_version.as_deref(),
                            tc,
                            t.display.as_deref(),
                        )),
                        _ => None,
                    };
                    out.push(Match {
                        equivalence: t.equivalence.clone(),
                        concept,
                        source: m.url.clone(),
                    });
                }
            }
            if elements.is_none()
                && let Some((how, equivalence)) = &g.unmapped
            {
                let target = g.target.as_deref().unwrap_or(system);
                let concept = match how {
                    Unmapped::Provided => coding(target, None, code, None),
                    Unmapped::Fixed { code, display } => {
                        coding(target, None, code, display.as_deref())
                    }
                };
                out.push(Match {
                    equivalence: equivalence.clone(),
                    concept: Some(concept),
                    source: m.url.clone(),
                });
            }
        }
        out
    }
}

// =================================================================================================
// Helpers

fn no(message: String) -> Validation {
    Validation {
        result: false,
        message: Some(message),
        display: None,
    }
}

/// Does a given display name the concept? Its display in the code system, a designation, or the
/// display the value set gives it all count.
fn display_ok(
    vs: &Resolved<'_>,
    concept: &Concept,
    given: &str,
    in_set: Option<&str>,
) -> Option<bool> {
    let norm = |s: &str| {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    if matches!(vs, Resolved::Explicit(..)) && in_set.is_some_and(|d| norm(d) == norm(given)) {
        return Some(true);
    }
    concept.accepts_display(given)
}

fn check_version(sys: &CodeSystem, wanted: Option<&str>, param: &str) -> Result<(), TermError> {
    match (wanted, &sys.version) {
        (Some(v), Some(have)) if v != have => Err(not_found(
            param,
            format!(
                "version {v} of {} is not known (this server has version {have})",
                sys.url
            ),
        )),
        _ => Ok(()),
    }
}

fn unknown_code_text(sys: &CodeSystem, code: &str) -> String {
    format!(
        "Unknown code '{code}' in code system {} ({})",
        sys.url, sys.name
    )
}

/// Why an unknown code may still exist: the server knows only part of the system.
fn fragment_note(sys: &CodeSystem) -> String {
    if sys.is_complete() {
        String::new()
    } else {
        format!(
            " — this server knows only a fragment of {}: the {} codes {}",
            sys.name,
            sys.len(),
            match sys.origin {
                super::codesystems::Origin::Enumerated =>
                    "its ValueSets and ConceptMaps enumerate".to_string(),
                _ => "its CodeSystem lists".to_string(),
            }
        )
    }
}

/// Code A or B of `$subsumes`: `codeX` or `codingX`, exactly one.
fn pick_code<'i>(
    code: Option<&'i str>,
    coding: Option<&'i CodingIn>,
    which: &str,
) -> Result<(&'i str, String), TermError> {
    match (code, coding) {
        (Some(c), None) => Ok((c, format!("code{which}"))),
        (None, Some(c)) => c
            .code
            .as_deref()
            .map(|code| (code, format!("coding{which}.code")))
            .ok_or_else(|| invalid(&format!("coding{which}.code"), "the coding has no code")),
        (Some(_), Some(_)) => Err(invalid(
            &format!("coding{which}"),
            format!("give code{which} or coding{which}, not both"),
        )),
        (None, None) => Err(invalid(
            &format!("code{which}"),
            format!("code{which} or coding{which} is required"),
        )),
    }
}

/// One `compose.include.filter` on a code system: narrows `chosen` (indices into the system).
fn apply_filter(sys: &CodeSystem, f: &Value, chosen: Vec<u32>) -> Result<Vec<u32>, String> {
    let property = f["property"].as_str().unwrap_or_default();
    let op = f["op"].as_str().unwrap_or_default();
    let value = f["value"].as_str().unwrap_or_default();
    let hierarchical = matches!(op, "is-a" | "descendent-of" | "is-not-a" | "generalizes");
    let on_concept = matches!(property, "concept" | "code");
    let target = |code: &str| {
        sys.find(code).ok_or_else(|| {
            format!(
                "its filter names {code}, which is not a code of {}",
                sys.name
            )
        })
    };
    if hierarchical {
        if !on_concept {
            return Err(format!(
                "filter {property} {op}: {op} applies to concept only"
            ));
        }
        if !sys.knows_hierarchy() {
            return Err(format!(
                "its {op} filter cannot be evaluated: {} has no is-a hierarchy here",
                sys.name
            ));
        }
        let t = target(value)?;
        let mut below = vec![false; sys.len()];
        match op {
            "generalizes" => {
                for a in sys.ancestors_or_self(t) {
                    below[a as usize] = true;
                }
            }
            _ => {
                for d in sys.descendants_or_self(t) {
                    below[d as usize] = true;
                }
            }
        }
        return Ok(chosen
            .into_iter()
            .filter(|&c| match op {
                "is-a" | "generalizes" => below[c as usize],
                "descendent-of" => below[c as usize] && c != t,
                _ => !below[c as usize],
            })
            .collect());
    }
    let list: Vec<&str> = value.split(',').map(str::trim).collect();
    let keep = |c: &Concept| -> Result<bool, String> {
        let values: Vec<String> = if on_concept {
            vec![c.code.clone()]
        } else if property == "parent" || property == "child" {
            let related = if property == "parent" {
                &c.parents
            } else {
                &c.children
            };
            related
                .iter()
                .map(|&r| sys.concept(r).code.clone())
                .collect()
        } else {
            c.properties
                .iter()
                .filter(|p| p.code == property)
                .map(|p| p.text())
                .collect()
        };
        Ok(match op {
            "=" => values.iter().any(|v| v == value),
            "in" => values.iter().any(|v| list.contains(&v.as_str())),
            "not-in" => !values.iter().any(|v| list.contains(&v.as_str())),
            "exists" => match value {
                "true" => !values.is_empty(),
                "false" => values.is_empty(),
                other => return Err(format!("filter {property} exists {other}: true or false")),
            },
            other => {
                return Err(format!(
                    "its filter operator {other} is not supported here (is-a, descendent-of, is-not-a, generalizes, =, in, not-in, exists)"
                ));
            }
        })
    };
    let mut out = Vec::with_capacity(chosen.len());
    for c in chosen {
        if keep(sys.concept(c))? {
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::{CANON, ICD9CM, LOINC, SNOMED, Terminology};
    use super::*;
    use std::collections::HashSet;

    const NIGUARDA: &str = "https://lis.niguarda.example/codici";

    fn reg() -> &'static Registry<'static> {
        Registry::get()
    }

    fn vs(id: &str) -> String {
        format!("{CANON}/ValueSet/{id}")
    }

    fn validate(url: &str, system: &str, code: &str, display: Option<&str>) -> Validation {
        reg()
            .validate_code(&ValidateIn {
                target: Target::url(url),
                code: Some(code.into()),
                system: Some(system.into()),
                display: display.map(String::from),
                ..ValidateIn::default()
            })
            .unwrap()
    }

    #[test]
    fn every_value_set_expands_but_those_on_systems_the_server_lacks() {
        let r = reg();
        let unexpandable: Vec<&str> = r.unexpandable().map(|(u, _)| u).collect();
        assert_eq!(
            unexpandable,
            [
                "http://hl7.org/fhir/ValueSet/currencies",
                "http://hl7.org/fhir/ValueSet/mimetypes"
            ],
            "{:?}",
            r.unexpandable().collect::<Vec<_>>()
        );
        for res in &Terminology::get().resources {
            if res["resourceType"] == "ValueSet" {
                let url = res["url"].as_str().unwrap();
                assert!(r.value_set_size(url).unwrap() > 0, "{url} is empty");
            }
        }
        assert_eq!(r.value_set_size(&vs("esame-colturale")), Some(14));
    }

    /// The D.M. 1990 classes, expanded through the hierarchy, against an independent reading: each
    /// ICD-9-CM code's lineage (icd9.rs) meets an included code and no excluded one.
    #[test]
    fn dm1990_classes_expand_through_the_icd9_hierarchy() {
        let t = Terminology::get();
        let icd9 = CodeSystems::get().by_url(ICD9CM).unwrap();
        for class in 1..=5 {
            let url = vs(&format!("dm1990-classe-{class}"));
            let res = t
                .resources
                .iter()
                .find(|r| r["url"] == url.as_str())
                .unwrap();
            let roots = |key: &str| -> HashSet<String> {
                res["compose"][key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|i| i["filter"].as_array().unwrap().iter())
                    .map(|f| f["value"].as_str().unwrap().to_string())
                    .collect()
            };
            let (inc, exc) = (roots("include"), roots("exclude"));
            let expected: HashSet<&str> = icd9
                .concepts
                .iter()
                .map(|c| c.code.as_str())
                .filter(|code| {
                    let lineage = t.icd9.lineage(code);
                    lineage.iter().any(|a| inc.contains(*a))
                        && !lineage.iter().any(|a| exc.contains(*a))
                })
                .collect();
            let expansion = reg()
                .expand(&ExpandIn {
                    target: Target::url(&url),
                    count: Some(MAX_COUNT),
                    ..ExpandIn::default()
                })
                .unwrap();
            let total = expansion["expansion"]["total"].as_u64().unwrap() as usize;
            assert_eq!(total, expected.len(), "class {class}");
            assert_eq!(reg().value_set_size(&url), Some(expected.len()));
            let got: HashSet<&str> = expansion["expansion"]["contains"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["code"].as_str().unwrap())
                .collect();
            assert_eq!(got, expected, "class {class}");
        }
        assert!(validate(&vs("dm1990-classe-3"), ICD9CM, "011.93", None).result);
        assert!(validate(&vs("dm1990-classe-2"), ICD9CM, "003.0", None).result);
        assert!(!validate(&vs("dm1990-classe-5"), ICD9CM, "003.0", None).result);
    }

    #[test]
    fn validate_code_answers_result_message_and_display() {
        let class3 = vs("dm1990-classe-3");
        let ok = validate(&class3, ICD9CM, "011.93", None);
        assert_eq!(ok.message, None);
        assert_eq!(
            ok.display.as_deref(),
            Some(
                "Pulmonary tuberculosis, unspecified, tubercle bacilli found (in sputum) by microscopy"
            )
        );
        let other = validate(&class3, ICD9CM, "041.3", None);
        assert!(!other.result);
        assert!(other.message.unwrap().contains("is not in the value set"));
        assert!(other.display.unwrap().starts_with("Friedländer"));
        let unknown = validate(&class3, ICD9CM, "999.999", None);
        assert!(!unknown.result);
        assert!(unknown.message.unwrap().contains("Unknown code '999.999'"));
        let wrong = validate(&class3, ICD9CM, "011.93", Some("Tuberculosis"));
        assert!(!wrong.result);
        assert!(
            wrong
                .message
                .unwrap()
                .starts_with("The display \"Tuberculosis\" is incorrect")
        );
        assert!(wrong.display.is_some());
        let spaced = validate(
            &class3,
            ICD9CM,
            "011.93",
            Some(
                "pulmonary tuberculosis,  unspecified, tubercle bacilli found (in sputum) by microscopy",
            ),
        );
        assert!(spaced.result);
        // a chapter or section is a grouping: valid only where abstract codes are
        let section = validate(&class3, ICD9CM, "010-018", None);
        assert!(!section.result);
        assert!(section.message.unwrap().contains("notSelectable"));
        let abstract_ok = reg()
            .validate_code(&ValidateIn {
                target: Target::url(&class3),
                code: Some("010-018".into()),
                system: Some(ICD9CM.into()),
                abstract_ok: true,
                ..ValidateIn::default()
            })
            .unwrap();
        assert!(abstract_ok.result);
        let nowhere = validate(&class3, "http://example.org/nowhere", "x", None);
        assert!(!nowhere.result && nowhere.display.is_none());
        // LOINC, a fragment: a code outside it may exist, and the message says so
        let loinc = validate(&vs("esame-colturale"), LOINC, "630-4", None);
        assert!(!loinc.result);
        assert!(loinc.message.unwrap().contains("fragment"));
        assert!(validate(&vs("esame-colturale"), LOINC, "600-7", None).result);
        // errors are for questions that cannot be asked
        let no_system = reg().validate_code(&ValidateIn {
            target: Target::url(&class3),
            code: Some("011.93".into()),
            ..ValidateIn::default()
        });
        assert_eq!(no_system.unwrap_err().param(), Some("system"));
        let unknown_vs = reg().validate_code(&ValidateIn {
            target: Target::id("nope"),
            code: Some("011.93".into()),
            system: Some(ICD9CM.into()),
            ..ValidateIn::default()
        });
        assert!(matches!(unknown_vs, Err(TermError::NotFound { .. })));
    }

    #[test]
    fn a_codeable_concept_is_valid_when_one_coding_is() {
        let out = reg()
            .validate_code(&ValidateIn {
                target: Target::id("klebsiella-pneumoniae"),
                codeable_concept: Some(vec![
                    CodingIn::from_token(&format!("{NIGUARDA}|KPN")),
                    CodingIn::from_token(&format!("{SNOMED}|56415008")),
                ]),
                ..ValidateIn::default()
            })
            .unwrap();
        assert!(out.result);
        assert_eq!(out.display.as_deref(), Some("Klebsiella pneumoniae"));
        assert!(out.message.unwrap().contains("KPN"));
        let none = reg()
            .validate_code(&ValidateIn {
                target: Target::id("klebsiella-pneumoniae"),
                codeable_concept: Some(vec![CodingIn::from_token(&format!("{SNOMED}|112283007"))]),
                ..ValidateIn::default()
            })
            .unwrap();
        assert!(!none.result);
    }

    #[test]
    fn implicit_value_sets_exist_for_complete_systems_only() {
        let all = format!("{ICD9CM}?fhir_vs");
        assert!(validate(&all, ICD9CM, "041.3", None).result);
        assert!(!validate(&all, ICD9CM, "041.99", None).result);
        let tb = format!("{ICD9CM}?fhir_vs=isa/010-018");
        assert!(validate(&tb, ICD9CM, "011.93", None).result);
        assert!(!validate(&tb, ICD9CM, "041.3", None).result);
        let e = reg()
            .expand(&ExpandIn {
                target: Target::url(&format!("{SNOMED}?fhir_vs")),
                ..ExpandIn::default()
            })
            .unwrap_err();
        assert!(matches!(e, TermError::NotSupported { .. }), "{e:?}");
    }

    #[test]
    fn expand_pages_filters_and_refuses_what_is_too_large() {
        let all = Target::url(&format!("{ICD9CM}?fhir_vs"));
        let e = reg()
            .expand(&ExpandIn {
                target: all.clone(),
                ..ExpandIn::default()
            })
            .unwrap_err();
        assert!(matches!(e, TermError::TooCostly(_)));
        assert!(e.to_string().contains("17732 codes"));
        let page = |offset, count| {
            reg()
                .expand(&ExpandIn {
                    target: all.clone(),
                    offset: Some(offset),
                    count: Some(count),
                    ..ExpandIn::default()
                })
                .unwrap()
        };
        let (a, b) = (page(0, 10), page(5, 10));
        assert_eq!(a["expansion"]["total"], 17_732);
        assert_eq!(b["expansion"]["offset"], 5);
        assert_eq!(a["expansion"]["contains"][5], b["expansion"]["contains"][0]);
        let last = page(17_730, 10);
        assert_eq!(last["expansion"]["contains"].as_array().unwrap().len(), 2);
        assert!(page(20_000, 10)["expansion"].get("contains").is_none());
        let over = reg().expand(&ExpandIn {
            target: all.clone(),
            count: Some(MAX_COUNT + 1),
            ..ExpandIn::default()
        });
        assert_eq!(over.unwrap_err().param(), Some("count"));
        // a filter narrows the set enough to expand it whole
        let tb = reg()
            .expand(&ExpandIn {
                target: all,
                filter: Some("pulmonary TUBERC".into()),
                ..ExpandIn::default()
            })
            .unwrap();
        let contains = tb["expansion"]["contains"].as_array().unwrap();
        assert_eq!(tb["expansion"]["total"], contains.len());
        assert!(contains.iter().any(|c| c["code"] == "011.93"));
        assert!(contains.iter().all(|c| {
            let d = c["display"].as_str().unwrap().to_lowercase();
            d.contains("pulmonary") && d.contains("tuberc")
        }));
        let by_code = reg()
            .expand(&ExpandIn {
                target: Target::id("icd9cm-cre"),
                filter: Some("041.4".into()),
                ..ExpandIn::default()
            })
            .unwrap();
        let codes: Vec<&str> = by_code["expansion"]["contains"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["code"].as_str().unwrap())
            .collect();
        assert!(
            codes.contains(&"041.4") && codes.contains(&"041.41"),
            "{codes:?}"
        );
        assert!(!codes.contains(&"041.3"));
    }

    #[test]
    fn subsumes_follows_is_a_and_refuses_fragments() {
        let ask = |system: &str, a: &str, b: &str| {
            reg().subsumes(&SubsumesIn {
                system: Some(system.into()),
                code_a: Some(a.into()),
                code_b: Some(b.into()),
                ..SubsumesIn::default()
            })
        };
        assert_eq!(ask(ICD9CM, "010-018", "011.93"), Ok(Subsumption::Subsumes));
        assert_eq!(
            ask(ICD9CM, "011.93", "010-018"),
            Ok(Subsumption::SubsumedBy)
        );
        assert_eq!(ask(ICD9CM, "041.3", "041.3"), Ok(Subsumption::Equivalent));
        assert_eq!(ask(ICD9CM, "041.3", "003.0"), Ok(Subsumption::NotSubsumed));
        let frag = ask(SNOMED, "56415008", "18400002").unwrap_err();
        assert!(frag.to_string().contains("subsumption cannot be decided"));
        assert!(matches!(
            ask(ICD9CM, "041.3", "zzz"),
            Err(TermError::NotFound { .. })
        ));
        let by_instance = reg().subsumes(&SubsumesIn {
            instance: Some("icd9cm".into()),
            coding_a: Some(CodingIn::from_token(&format!("{ICD9CM}|003"))),
            code_b: Some("003.0".into()),
            ..SubsumesIn::default()
        });
        assert_eq!(by_instance, Ok(Subsumption::Subsumes));
        let mixed = reg().subsumes(&SubsumesIn {
            system: Some(ICD9CM.into()),
            coding_a: Some(CodingIn::from_token(&format!("{LOINC}|600-7"))),
            code_b: Some("003.0".into()),
            ..SubsumesIn::default()
        });
        assert_eq!(mixed.unwrap_err().param(), Some("codingA.system"));
    }

    #[test]
    fn lookup_gives_display_definition_and_the_hierarchy() {
        let out = reg()
            .lookup(&LookupIn {
                system: Some(ICD9CM.into()),
                code: Some("011".into()),
                ..LookupIn::default()
            })
            .unwrap();
        let params = out["parameter"].as_array().unwrap();
        let named = |n: &'static str| params.iter().filter(move |p| p["name"] == n);
        assert_eq!(named("version").next().unwrap()["valueString"], "32");
        assert_eq!(
            named("display").next().unwrap()["valueString"],
            "Pulmonary tuberculosis"
        );
        let props: Vec<(String, String)> = named("property")
            .map(|p| {
                (
                    p["part"][0]["valueCode"].as_str().unwrap().to_string(),
                    p["part"][1]["valueCode"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert!(props.contains(&("parent".into(), "010-018".into())));
        assert!(props.contains(&("child".into(), "011.9".into())));
        let only_parent = reg()
            .lookup(&LookupIn {
                coding: Some(CodingIn::from_token(&format!("{ICD9CM}|011"))),
                properties: vec!["parent".into()],
                ..LookupIn::default()
            })
            .unwrap();
        assert_eq!(
            only_parent["parameter"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["name"] == "property")
                .count(),
            1
        );
        let ours = reg()
            .lookup(&LookupIn {
                system: Some(format!("{CANON}/CodeSystem/tipo-notifica")),
                code: Some("classe-3".into()),
                ..LookupIn::default()
            })
            .unwrap();
        assert!(ours.to_string().contains("\"definition\""));
        let missing = reg().lookup(&LookupIn {
            system: Some(LOINC.into()),
            code: Some("1963-8".into()),
            ..LookupIn::default()
        });
        let e = missing.unwrap_err();
        assert!(matches!(e, TermError::NotFound { .. }));
        assert!(e.to_string().contains("fragment of LOINC"));
        let bad_version = reg().lookup(&LookupIn {
            system: Some(ICD9CM.into()),
            code: Some("011".into()),
            version: Some("31".into()),
            ..LookupIn::default()
        });
        assert_eq!(bad_version.unwrap_err().param(), Some("version"));
    }

    #[test]
    fn translate_maps_local_codes_both_ways() {
        let forward = reg()
            .translate(&TranslateIn {
                code: Some("MEM-I".into()),
                system: Some(NIGUARDA.into()),
                ..TranslateIn::default()
            })
            .unwrap();
        assert!(forward.result);
        assert_eq!(forward.matches.len(), 1);
        let m = &forward.matches[0];
        assert_eq!(m.equivalence, "equivalent");
        assert_eq!(m.concept.as_ref().unwrap()["code"], "18943-1");
        assert_eq!(m.concept.as_ref().unwrap()["system"], LOINC);
        assert_eq!(m.source, format!("{CANON}/ConceptMap/laboratorio-niguarda"));
        let back = reg()
            .translate(&TranslateIn {
                code: Some("18943-1".into()),
                system: Some(LOINC.into()),
                target_system: Some(NIGUARDA.into()),
                reverse: true,
                ..TranslateIn::default()
            })
            .unwrap();
        assert_eq!(back.matches.len(), 1);
        assert_eq!(back.matches[0].concept.as_ref().unwrap()["code"], "MEM-I");
        // province → region is "wider"; back, region → province is "narrower"
        let region = reg()
            .translate(&TranslateIn {
                map: Target::id("provincia-regione"),
                code: Some("030".into()),
                system: Some(format!("{CANON}/CodeSystem/regione")),
                reverse: true,
                ..TranslateIn::default()
            })
            .unwrap();
        assert!(region.matches.iter().all(|m| m.equivalence == "narrower"));
        assert_eq!(region.matches.len(), 12);
        let none = reg()
            .translate(&TranslateIn {
                code: Some("NOPE".into()),
                system: Some(NIGUARDA.into()),
                ..TranslateIn::default()
            })
            .unwrap();
        assert!(!none.result && none.matches.is_empty());
        assert!(none.message.unwrap().contains("No mapping"));
        let unknown = reg().translate(&TranslateIn {
            map: Target::url("http://example.org/ConceptMap/none"),
            code: Some("MEM-I".into()),
            system: Some(NIGUARDA.into()),
            ..TranslateIn::default()
        });
        assert_eq!(unknown.unwrap_err().param(), Some("url"));
    }

    #[test]
    fn compose_rules_nesting_filters_and_cycles() {
        let cs = serde_json::json!({"resourceType": "CodeSystem", "url": "http://x/cs",
            "content": "complete", "concept": [
                {"code": "a", "display": "A", "property": [{"code": "colour", "valueCode": "red"}],
                 "concept": [{"code": "a1", "display": "A one"}]},
                {"code": "b", "display": "B", "property": [{"code": "colour", "valueCode": "blue"}]},
                {"code": "c", "display": "C"}]});
        let vs = |id: &str, compose: Value| {
            serde_json::json!({"resourceType": "ValueSet", "id": id,
                "url": format!("http://x/vs/{id}"), "compose": compose})
        };
        let resources = [
            vs(
                "red",
                serde_json::json!({"include": [{"system": "http://x/cs",
                "filter": [{"property": "colour", "op": "=", "value": "red"}]}]}),
            ),
            vs(
                "coloured",
                serde_json::json!({"include": [{"system": "http://x/cs",
                "filter": [{"property": "colour", "op": "exists", "value": "true"}]}]}),
            ),
            vs(
                "both",
                serde_json::json!({"include": [{"system": "http://x/cs",
                "filter": [{"property": "concept", "op": "in", "value": "a,c"}],
                "valueSet": ["http://x/vs/coloured"]}]}),
            ),
            vs(
                "under-a",
                serde_json::json!({"include": [{"system": "http://x/cs",
                "filter": [{"property": "concept", "op": "descendent-of", "value": "a"}]}]}),
            ),
            vs(
                "loop1",
                serde_json::json!({"include": [{"valueSet": ["http://x/vs/loop2"]}]}),
            ),
            vs(
                "loop2",
                serde_json::json!({"include": [{"valueSet": ["http://x/vs/loop1"]}]}),
            ),
            vs(
                "regex",
                serde_json::json!({"include": [{"system": "http://x/cs",
                "filter": [{"property": "concept", "op": "regex", "value": "a.*"}]}]}),
            ),
        ];
        let all = CodeSystems::from_resources(&[cs], &[]);
        let refs: Vec<&Value> = resources.iter().collect();
        let r = Registry::build(&all, &refs);
        assert_eq!(r.value_set_size("http://x/vs/red"), Some(1));
        assert_eq!(r.value_set_size("http://x/vs/coloured"), Some(2));
        assert_eq!(r.value_set_size("http://x/vs/both"), Some(1));
        assert_eq!(r.value_set_size("http://x/vs/under-a"), Some(1));
        let bad: Vec<(&str, &str)> = r.unexpandable().collect();
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(
            bad.iter()
                .any(|(u, why)| u.ends_with("loop1") && why.contains("back"))
        );
        assert!(
            bad.iter()
                .any(|(u, why)| u.ends_with("regex") && why.contains("regex"))
        );
    }
}
