//! Every code system the server knows, indexed once for the terminology operations
//! (`operations.rs`):
//! - Sentinella's own CodeSystems (`terminology/CodeSystem-*.json`, ICD-9-CM among them: its
//!   hierarchy is the `parent` property of each concept);
//! - the R4 CodeSystems packaged in `fhir/r4/valuesets.json` (codes and nesting only: the package
//!   dropped their displays and definitions);
//! - the code systems we ship a subset of without a CodeSystem resource (LOINC, SNOMED CT, the HL7
//!   v3 interpretations, UCUM units, a laboratory's local codes…): their concepts are those our
//!   ValueSets and ConceptMaps enumerate with a display. Those are fragments (`content` fragment)
//!   without hierarchy: a code outside them may exist, and what lies above or below a code is not
//!   known here.
use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;

const R4_VALUESETS: &str = include_str!("../../fhir/r4/valuesets.json");

/// R4's extension that carries a concept's definition inside a ValueSet's `compose`.
const CONCEPT_DEFINITION: &str =
    "http://hl7.org/fhir/StructureDefinition/valueset-concept-definition";

/// The packaged R4 CodeSystems and ValueSets (`fhir/r4/valuesets.json`), parsed once.
pub fn r4_resources() -> &'static [Value] {
    static R4: OnceLock<Vec<Value>> = OnceLock::new();
    R4.get_or_init(|| {
        let bundle: Value =
            serde_json::from_str(R4_VALUESETS).expect("packaged definitions are valid JSON");
        bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("resource").cloned())
            .collect()
    })
}

/// Where a code system's concepts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A CodeSystem of `terminology/`.
    Sentinella,
    /// A CodeSystem of `fhir/r4/valuesets.json`.
    R4,
    /// No CodeSystem resource: the concepts our ValueSets and ConceptMaps enumerate.
    Enumerated,
}

/// What is known of the order among a system's concepts, which decides `$subsumes` and the
/// `is-a` filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// A complete system without parents: two different codes never subsume each other.
    Flat,
    /// Parents and children are known and mean is-a (ICD-9-CM; R4's nested concepts).
    IsA,
    /// The resource's hierarchy means something else (`grouped-by`, `part-of`, `classified-with`).
    Other(String),
    /// A fragment without hierarchy: what lies above or below a code is not known here.
    Unknown,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Designation {
    pub language: Option<String>,
    /// A Coding (`designation.use`).
    pub use_: Option<Value>,
    pub value: String,
}

/// A concept property as the source gives it: its code and its `value[x]` (`valueCode`,
/// `valueBoolean`, `valueInteger`…).
#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    pub code: String,
    pub key: String,
    pub value: Value,
}

impl Property {
    /// The value as text, for the `=` and `in` filters.
    pub fn text(&self) -> String {
        match &self.value {
            Value::String(s) => s.clone(),
            Value::Object(o) => o
                .get("code")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            other => other.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Concept {
    pub code: String,
    pub display: Option<String>,
    pub definition: Option<String>,
    pub designations: Vec<Designation>,
    /// The source's properties, except `parent` and `child` (the hierarchy holds those).
    pub properties: Vec<Property>,
    pub parents: Vec<u32>,
    pub children: Vec<u32>,
    /// `notSelectable` (ICD-9-CM's chapters and sections): a grouping, not a code to record.
    pub is_abstract: bool,
    /// `inactive` true, or `status` retired / inactive.
    pub inactive: bool,
    /// Lower-case display and designations, for `$expand`'s `filter`.
    text: String,
}

impl Concept {
    fn new(code: &str) -> Concept {
        Concept {
            code: code.to_string(),
            display: None,
            definition: None,
            designations: Vec::new(),
            properties: Vec::new(),
            parents: Vec::new(),
            children: Vec::new(),
            is_abstract: false,
            inactive: false,
            text: String::new(),
        }
    }

    /// The display in `language` (a designation in that language, `it` matching `it-IT`), else
    /// the display, else — a packaged R4 system keeps no displays — the code itself.
    pub fn display_in(&self, language: Option<&str>) -> &str {
        if let Some(lang) = language
            && let Some(d) = self.designations.iter().find(|d| {
                d.language
                    .as_deref()
                    .is_some_and(|l| language_matches(l, lang))
            })
        {
            return &d.value;
        }
        self.display.as_deref().unwrap_or(&self.code)
    }

    /// Is `display` one of this concept's names (its display or a designation), ignoring case
    /// and runs of white space? `None`: the server has no name to compare with.
    pub fn accepts_display(&self, display: &str) -> Option<bool> {
        let names: Vec<&str> = self
            .display
            .iter()
            .map(String::as_str)
            .chain(self.designations.iter().map(|d| d.value.as_str()))
            .collect();
        if names.is_empty() {
            return None;
        }
        let wanted = normalize(display);
        Some(names.iter().any(|n| normalize(n) == wanted))
    }

    /// Does the concept match every word of a text filter? A word matches the start of the code
    /// (`041` finds 041.3) or, piece by piece, the start of words of the display and designations
    /// (`kleb pneum` finds "Klebsiella pneumoniae"); case is ignored.
    pub fn matches_filter(&self, words: &[String]) -> bool {
        words.iter().all(|w| {
            starts_with_ignore_case(&self.code, w)
                || w.split(|c: char| !c.is_alphanumeric())
                    .filter(|p| !p.is_empty())
                    .all(|piece| {
                        self.text
                            .split(|c: char| !c.is_alphanumeric())
                            .any(|t| t.starts_with(piece))
                    })
        })
    }

    fn finish(&mut self) {
        let mut text = self.display.clone().unwrap_or_default();
        for d in &self.designations {
            text.push(' ');
            text.push_str(&d.value);
        }
        self.text = text.to_lowercase();
        self.is_abstract = self
            .properties
            .iter()
            .any(|p| matches!(p.code.as_str(), "notSelectable" | "abstract") && p.value == true);
        self.inactive = self.properties.iter().any(|p| {
            (p.code == "inactive" && p.value == true)
                || (p.code == "status" && matches!(p.value.as_str(), Some("retired" | "inactive")))
        });
    }
}

/// `it` matches `it` and `it-IT`; `it-IT` matches `it-IT` only.
fn language_matches(have: &str, wanted: &str) -> bool {
    have.eq_ignore_ascii_case(wanted)
        || have
            .split('-')
            .next()
            .is_some_and(|primary| primary.eq_ignore_ascii_case(wanted))
}

fn normalize(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.get(..prefix.len())
        .is_some_and(|head| head.to_lowercase() == prefix)
}

/// Split a `$expand` filter into lower-case words.
pub fn filter_words(filter: &str) -> Vec<String> {
    filter.split_whitespace().map(str::to_lowercase).collect()
}

#[derive(Debug)]
pub struct CodeSystem {
    pub url: String,
    /// The resource id (none for an enumerated subset).
    pub id: Option<String>,
    pub version: Option<String>,
    /// A name for people: the title, else the name, else a known name of the system, else the URL.
    pub name: String,
    /// `complete`, `fragment`… as the resource says; `fragment` for an enumerated subset.
    pub content: String,
    pub origin: Origin,
    pub hierarchy: Hierarchy,
    pub case_sensitive: bool,
    /// Where the concepts were read: a file, or the ValueSets and ConceptMaps that enumerate them.
    pub sources: Vec<String>,
    /// In the source's order, a parent before its nested children.
    pub concepts: Vec<Concept>,
    index: HashMap<String, u32>,
}

impl CodeSystem {
    fn empty(url: &str, origin: Origin) -> CodeSystem {
        CodeSystem {
            url: url.to_string(),
            id: None,
            version: None,
            name: known_name(url).unwrap_or(url).to_string(),
            content: "fragment".into(),
            origin,
            hierarchy: Hierarchy::Unknown,
            case_sensitive: true,
            sources: Vec::new(),
            concepts: Vec::new(),
            index: HashMap::new(),
        }
    }

    /// The index of a code (codes compare exactly unless the system says it is case-insensitive).
    pub fn find(&self, code: &str) -> Option<u32> {
        if self.case_sensitive {
            self.index.get(code).copied()
        } else {
            self.index.get(&code.to_lowercase()).copied()
        }
    }

    pub fn concept(&self, i: u32) -> &Concept {
        &self.concepts[i as usize]
    }

    pub fn lookup(&self, code: &str) -> Option<&Concept> {
        self.find(code).map(|i| self.concept(i))
    }

    pub fn len(&self) -> usize {
        self.concepts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.concepts.is_empty()
    }

    pub fn is_complete(&self) -> bool {
        self.content == "complete"
    }

    /// Can subsumption be decided among this system's codes?
    pub fn knows_hierarchy(&self) -> bool {
        matches!(self.hierarchy, Hierarchy::IsA | Hierarchy::Flat)
    }

    /// `url|version`, or the URL.
    pub fn canonical(&self) -> String {
        match &self.version {
            Some(v) => format!("{}|{v}", self.url),
            None => self.url.clone(),
        }
    }

    /// Does `a` subsume `b` (is `a` the same concept as `b` or one of its ancestors)?
    pub fn subsumes(&self, a: u32, b: u32) -> bool {
        if a == b {
            return true;
        }
        // walk up from b: a few steps in ICD-9-CM (5th digit → chapter), a DAG in general
        let mut seen = vec![b];
        let mut next = vec![b];
        while let Some(c) = next.pop() {
            for &p in &self.concept(c).parents {
                if p == a {
                    return true;
                }
                if !seen.contains(&p) {
                    seen.push(p);
                    next.push(p);
                }
            }
        }
        false
    }

    /// `a` and every concept below it, `a` first, then depth first in the source's order.
    pub fn descendants_or_self(&self, a: u32) -> Vec<u32> {
        let mut out = vec![a];
        let mut seen = vec![false; self.concepts.len()];
        seen[a as usize] = true;
        let mut stack: Vec<u32> = self.concept(a).children.iter().rev().copied().collect();
        while let Some(c) = stack.pop() {
            if std::mem::replace(&mut seen[c as usize], true) {
                continue;
            }
            out.push(c);
            stack.extend(self.concept(c).children.iter().rev().copied());
        }
        out
    }

    /// The ancestors of `a` and `a` itself.
    pub fn ancestors_or_self(&self, a: u32) -> Vec<u32> {
        let mut out = vec![a];
        let mut i = 0;
        while i < out.len() {
            for &p in &self.concept(out[i]).parents {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
            i += 1;
        }
        out
    }

    fn add(&mut self, code: &str) -> u32 {
        if let Some(i) = self.index.get(code) {
            return *i;
        }
        let i = self.concepts.len() as u32;
        self.concepts.push(Concept::new(code));
        let key = if self.case_sensitive {
            code.to_string()
        } else {
            code.to_lowercase()
        };
        self.index.insert(key, i);
        i
    }

    fn link(&mut self, parent: u32, child: u32) {
        if parent == child || self.concepts[child as usize].parents.contains(&parent) {
            return;
        }
        self.concepts[child as usize].parents.push(parent);
        self.concepts[parent as usize].children.push(child);
    }

    /// A CodeSystem resource: nested concepts, then the `parent` / `child` properties.
    fn from_resource(r: &Value, origin: Origin, source: String) -> CodeSystem {
        let url = r["url"].as_str().unwrap_or_default();
        let mut cs = CodeSystem::empty(url, origin);
        cs.id = r["id"].as_str().map(String::from);
        cs.version = r["version"].as_str().map(String::from);
        if let Some(name) = r["title"].as_str().or_else(|| r["name"].as_str()) {
            cs.name = name.to_string();
        }
        cs.content = r["content"].as_str().unwrap_or("complete").to_string();
        // absent: unknown; R4 treats codes as case-sensitive unless told otherwise
        cs.case_sensitive = r["caseSensitive"].as_bool().unwrap_or(true);
        cs.sources.push(source);
        let mut links = Vec::new();
        cs.read_concepts(&r["concept"], None, &mut links);
        for (a, b, a_is_parent) in links {
            let Some(other) = cs.find(&b) else {
                continue;
            };
            if a_is_parent {
                cs.link(other, a);
            } else {
                cs.link(a, other);
            }
        }
        for c in &mut cs.concepts {
            c.finish();
        }
        let linked = cs.concepts.iter().any(|c| !c.parents.is_empty());
        cs.hierarchy = match (linked, r["hierarchyMeaning"].as_str()) {
            // nesting without a stated meaning: FHIR's own code systems nest by is-a
            (true, None | Some("is-a")) => Hierarchy::IsA,
            (true, Some(other)) => Hierarchy::Other(other.to_string()),
            (false, _) if cs.is_complete() => Hierarchy::Flat,
            (false, _) => Hierarchy::Unknown,
        };
        cs
    }

    /// Read a `concept` list; `links` collects the `parent` / `child` properties (target code,
    /// resolved once every concept is known): (this concept, other code, other is the parent).
    fn read_concepts(
        &mut self,
        list: &Value,
        parent: Option<u32>,
        links: &mut Vec<(u32, String, bool)>,
    ) {
        for c in list.as_array().into_iter().flatten() {
            let Some(code) = c["code"].as_str() else {
                continue;
            };
            let known = self.find(code).is_some();
            let i = self.add(code);
            if let Some(p) = parent {
                self.link(p, i);
            }
            if !known {
                let concept = &mut self.concepts[i as usize];
                concept.display = c["display"].as_str().map(String::from);
                concept.definition = c["definition"].as_str().map(String::from);
                concept.designations = designations(&c["designation"]);
                for p in c["property"].as_array().into_iter().flatten() {
                    let Some(pcode) = p["code"].as_str() else {
                        continue;
                    };
                    let Some((key, value)) = p
                        .as_object()
                        .and_then(|o| o.iter().find(|(k, _)| k.starts_with("value")))
                    else {
                        continue;
                    };
                    match (pcode, value.as_str()) {
                        ("parent", Some(other)) => links.push((i, other.to_string(), true)),
                        ("child", Some(other)) => links.push((i, other.to_string(), false)),
                        _ => concept.properties.push(Property {
                            code: pcode.to_string(),
                            key: key.clone(),
                            value: value.clone(),
                        }),
                    }
                }
            }
            self.read_concepts(&c["concept"], Some(i), links);
        }
    }
}

fn designations(list: &Value) -> Vec<Designation> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| {
            Some(Designation {
                language: d["language"].as_str().map(String::from),
                use_: d.get("use").cloned(),
                value: d["value"].as_str()?.to_string(),
            })
        })
        .collect()
}

/// Names for the systems we know only as enumerated subsets.
fn known_name(url: &str) -> Option<&'static str> {
    Some(match url {
        super::LOINC => "LOINC",
        super::SNOMED => "SNOMED CT",
        super::UCUM => "UCUM",
        super::V3_INTERPRETATION => "HL7 v3 ObservationInterpretation",
        "http://terminology.hl7.org/CodeSystem/v3-TimingEvent" => "HL7 v3 TimingEvent",
        "https://www.hl7.it/fhir/terminology/CodeSystem/istat-comuni" => "ISTAT comuni",
        _ => return None,
    })
}

/// Every code system the server knows.
pub struct CodeSystems {
    systems: Vec<CodeSystem>,
    by_url: HashMap<String, u32>,
    by_id: HashMap<String, u32>,
}

impl CodeSystems {
    /// The process-wide index, built on first use from `Terminology::get().resources` and the R4
    /// package.
    pub fn get() -> &'static CodeSystems {
        static CS: OnceLock<CodeSystems> = OnceLock::new();
        CS.get_or_init(|| {
            CodeSystems::from_resources(&super::Terminology::get().resources, r4_resources())
        })
    }

    /// Index Sentinella's resources (`ours`: CodeSystems, ValueSets, ConceptMaps) and the R4
    /// package's. Ours come first: a URL defined twice keeps our definition.
    pub fn from_resources(ours: &[Value], r4: &[Value]) -> CodeSystems {
        let mut out = CodeSystems {
            systems: Vec::new(),
            by_url: HashMap::new(),
            by_id: HashMap::new(),
        };
        for (list, origin) in [(ours, Origin::Sentinella), (r4, Origin::R4)] {
            for r in list.iter().filter(|r| r["resourceType"] == "CodeSystem") {
                let Some(url) = r["url"].as_str() else {
                    continue;
                };
                if out.by_url.contains_key(url) {
                    continue;
                }
                let source = match (origin, r["id"].as_str()) {
                    (Origin::Sentinella, Some(id)) => format!("terminology/CodeSystem-{id}.json"),
                    _ => "fhir/r4/valuesets.json".to_string(),
                };
                out.push(CodeSystem::from_resource(r, origin, source));
            }
        }
        // the subsets: codes enumerated with a display where no CodeSystem resource exists
        let mut subsets: Vec<CodeSystem> = Vec::new();
        let mut subset_of: HashMap<String, usize> = HashMap::new();
        for r in ours.iter().chain(r4) {
            let origin = r["url"].as_str().unwrap_or_default().to_string();
            let mut enumerate = |system: &str, c: &Value, version: Option<&str>| {
                let Some(code) = c["code"].as_str() else {
                    return;
                };
                if system.is_empty() || out.by_url.contains_key(system) {
                    return;
                }
                let k = *subset_of.entry(system.to_string()).or_insert_with(|| {
                    subsets.push(CodeSystem::empty(system, Origin::Enumerated));
                    subsets.len() - 1
                });
                let cs = &mut subsets[k];
                if !cs.sources.contains(&origin) {
                    cs.sources.push(origin.clone());
                }
                if cs.version.is_none() {
                    cs.version = version.map(String::from);
                }
                let i = cs.add(code);
                let concept = &mut cs.concepts[i as usize];
                if concept.display.is_none() {
                    concept.display = c["display"].as_str().map(String::from);
                }
                if concept.definition.is_none() {
                    concept.definition = c["extension"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|e| e["url"] == CONCEPT_DEFINITION)
                        .and_then(|e| e["valueString"].as_str())
                        .map(String::from);
                }
                for d in designations(&c["designation"]) {
                    if !concept.designations.contains(&d) {
                        concept.designations.push(d);
                    }
                }
            };
            match r["resourceType"].as_str() {
                Some("ValueSet") => {
                    let compose = &r["compose"];
                    for inc in compose["include"]
                        .as_array()
                        .into_iter()
                        .chain(compose["exclude"].as_array())
                        .flatten()
                    {
                        let system = inc["system"].as_str().unwrap_or_default();
                        for c in inc["concept"].as_array().into_iter().flatten() {
                            enumerate(system, c, inc["version"].as_str());
                        }
                    }
                }
                Some("ConceptMap") => {
                    for g in r["group"].as_array().into_iter().flatten() {
                        let source = g["source"].as_str().unwrap_or_default();
                        let target = g["target"].as_str().unwrap_or_default();
                        for e in g["element"].as_array().into_iter().flatten() {
                            enumerate(source, e, g["sourceVersion"].as_str());
                            for t in e["target"].as_array().into_iter().flatten() {
                                enumerate(target, t, g["targetVersion"].as_str());
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        for mut cs in subsets {
            for c in &mut cs.concepts {
                c.finish();
            }
            out.push(cs);
        }
        out
    }

    fn push(&mut self, cs: CodeSystem) {
        let i = self.systems.len() as u32;
        self.by_url.insert(cs.url.clone(), i);
        if let Some(id) = &cs.id {
            self.by_id.entry(id.clone()).or_insert(i);
        }
        self.systems.push(cs);
    }

    /// The index of the system with this URL (a `|version` suffix is ignored here).
    pub fn find(&self, url: &str) -> Option<u32> {
        let url = url.split('|').next().unwrap_or(url);
        self.by_url.get(url).copied()
    }

    pub fn system(&self, i: u32) -> &CodeSystem {
        &self.systems[i as usize]
    }

    pub fn by_url(&self, url: &str) -> Option<&CodeSystem> {
        self.find(url).map(|i| self.system(i))
    }

    /// The CodeSystem resource with this id (ours or R4's).
    pub fn find_id(&self, id: &str) -> Option<u32> {
        self.by_id.get(id).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = &CodeSystem> {
        self.systems.iter()
    }

    pub fn len(&self) -> usize {
        self.systems.len()
    }

    pub fn is_empty(&self) -> bool {
        self.systems.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ICD9CM, LOINC, SNOMED};
    use super::*;
    use serde_json::json;

    #[test]
    fn icd9_is_complete_with_its_hierarchy() {
        let all = CodeSystems::get();
        let icd9 = all.by_url(ICD9CM).expect("ICD-9-CM is loaded");
        assert_eq!(icd9.len(), 17_732);
        assert!(icd9.is_complete());
        assert_eq!(icd9.hierarchy, Hierarchy::IsA);
        assert_eq!(icd9.version.as_deref(), Some("32"));
        assert_eq!(icd9.origin, Origin::Sentinella);
        let tb = icd9.find("010-018").unwrap();
        let c = icd9.find("011.93").unwrap();
        assert!(icd9.subsumes(tb, c));
        assert!(!icd9.subsumes(c, tb));
        let lineage: Vec<&str> = icd9
            .ancestors_or_self(c)
            .into_iter()
            .map(|i| icd9.concept(i).code.as_str())
            .collect();
        assert_eq!(lineage, ["011.93", "011.9", "011", "010-018", "001-139"]);
        assert!(icd9.concept(tb).is_abstract);
        assert!(!icd9.concept(c).is_abstract);
        // no parent property left among the properties: the hierarchy holds it
        assert!(
            icd9.concept(c)
                .properties
                .iter()
                .all(|p| p.code != "parent")
        );
        let under: Vec<u32> = icd9.descendants_or_self(tb);
        assert_eq!(under[0], tb);
        assert!(under.contains(&c));
        assert!(!under.contains(&icd9.find("041.3").unwrap()));
        // the same chain the D.M. 1990 classification reads
        let t = super::super::Terminology::get();
        assert_eq!(t.icd9.lineage("011.93"), lineage);
    }

    #[test]
    fn loinc_and_snomed_are_fragments_enumerated_by_our_resources() {
        let all = CodeSystems::get();
        let loinc = all.by_url(LOINC).expect("LOINC subset");
        assert_eq!(loinc.origin, Origin::Enumerated);
        assert_eq!(loinc.content, "fragment");
        assert_eq!(loinc.hierarchy, Hierarchy::Unknown);
        assert!(!loinc.knows_hierarchy());
        assert_eq!(
            loinc.lookup("600-7").unwrap().display.as_deref(),
            Some("Bacteria identified in Blood by Culture")
        );
        // a ConceptMap target counts too (18943-1 is in the Niguarda map)
        assert!(loinc.lookup("18943-1").is_some());
        assert!(
            loinc
                .sources
                .iter()
                .any(|s| s.ends_with("ValueSet/esame-colturale"))
        );
        let snomed = all.by_url(SNOMED).unwrap();
        assert_eq!(
            snomed.lookup("56415008").unwrap().display.as_deref(),
            Some("Klebsiella pneumoniae")
        );
        assert_eq!(snomed.name, "SNOMED CT");
        // the laboratory's local codes, as its map lists them
        let lab = all.by_url("https://lis.niguarda.example/codici").unwrap();
        assert_eq!(
            lab.lookup("MEM-I").unwrap().display.as_deref(),
            Some("Meropenem (interpretazione)")
        );
    }

    #[test]
    fn r4_systems_keep_their_nesting() {
        let all = CodeSystems::get();
        let issue = all.by_url("http://hl7.org/fhir/issue-type").unwrap();
        assert_eq!(issue.origin, Origin::R4);
        assert_eq!(issue.hierarchy, Hierarchy::IsA);
        let invalid = issue.find("invalid").unwrap();
        let structure = issue.find("structure").unwrap();
        assert!(issue.subsumes(invalid, structure));
        assert!(!issue.subsumes(structure, invalid));
        let gender = all
            .by_url("http://hl7.org/fhir/administrative-gender")
            .unwrap();
        assert_eq!(gender.hierarchy, Hierarchy::Flat);
        assert_eq!(gender.id.as_deref(), Some("administrative-gender"));
        assert_eq!(all.find_id("icd9cm"), all.find(ICD9CM));
    }

    #[test]
    fn designations_properties_and_filters_are_read_from_the_source() {
        let cs = json!({"resourceType": "CodeSystem", "id": "x", "url": "http://example.org/x",
            "content": "complete", "caseSensitive": false, "hierarchyMeaning": "part-of",
            "concept": [{"code": "A", "display": "Alpha wing", "concept": [
                {"code": "b", "display": "Beta", "designation": [
                    {"language": "it-IT", "value": "Beta italiana"}],
                 "property": [{"code": "status", "valueCode": "retired"},
                              {"code": "weight", "valueInteger": 3}]}]}]});
        let all = CodeSystems::from_resources(&[cs], &[]);
        let x = all.by_url("http://example.org/x|1").unwrap();
        assert_eq!(x.hierarchy, Hierarchy::Other("part-of".into()));
        let b = x.lookup("B").expect("case-insensitive system");
        assert!(b.inactive);
        assert_eq!(b.display_in(Some("it")), "Beta italiana");
        assert_eq!(b.display_in(Some("de")), "Beta");
        assert_eq!(b.accepts_display("beta   ITALIANA"), Some(true));
        assert_eq!(b.accepts_display("Gamma"), Some(false));
        assert_eq!(b.properties.len(), 2);
        assert_eq!(b.properties[1].text(), "3");
        let a = x.lookup("A").unwrap();
        assert!(a.matches_filter(&filter_words("alp WIN")));
        assert!(!a.matches_filter(&filter_words("alpha beta")));
        assert!(b.matches_filter(&filter_words("b")));
        assert!(b.matches_filter(&filter_words("italiana")));
    }
}
