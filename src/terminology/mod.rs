//! Sentinella's own terminology: the CodeSystems, ValueSets and ConceptMaps of `terminology/`
//! (embedded in the binary; the folder is the source) and the EUCAST breakpoint tables.
pub mod breakpoints;
pub mod codesystems;
pub mod icd9;
pub mod operations;

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use include_dir::{Dir, include_dir};
use serde_json::Value;

use crate::fhir::valuesets::ValueSets;
pub use breakpoints::{Breakpoint, BreakpointTable, Breakpoints, Sir};

static FOLDER: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/terminology");

/// The canonical base of Sentinella's conformance resources (SPEC.md).
pub const CANON: &str = "https://sentinella-fhir.github.io/ig";

pub const LOINC: &str = "http://loinc.org";
pub const SNOMED: &str = "http://snomed.info/sct";
pub const ICD9CM: &str = "http://hl7.org/fhir/sid/icd-9-cm";
pub const UCUM: &str = "http://unitsofmeasure.org";
pub const V3_INTERPRETATION: &str =
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation";

/// A code: `(system, code)`.
pub type Code = (String, String);

pub struct Terminology {
    valuesets: ValueSets,
    /// Per-sender maps: (local system, local code) → standard codes.
    local: HashMap<Code, Vec<Code>>,
    local_systems: HashSet<String>,
    /// Other ConceptMaps by canonical URL: source code → target codes.
    maps: HashMap<String, HashMap<Code, Vec<Code>>>,
    displays: HashMap<Code, String>,
    pub breakpoints: Breakpoints,
    /// The ICD-9-CM hierarchy.
    pub icd9: icd9::Icd9,
    /// File name → resource, for the CapabilityStatement and checks at start.
    pub resources: Vec<Value>,
}

/// Systems a laboratory's code can be "standard" in; anything else is a sender's local system.
pub fn is_standard_system(system: &str) -> bool {
    matches!(system, LOINC | SNOMED | ICD9CM | UCUM)
        || system.starts_with("http://terminology.hl7.org/")
        || system.starts_with("http://hl7.org/fhir/")
        || system.starts_with(CANON)
        || system.starts_with("https://www.hl7.it/fhir/terminology/")
}

impl Terminology {
    /// The process-wide terminology, parsed on first use (the server warms it at start).
    pub fn get() -> &'static Terminology {
        static T: OnceLock<Terminology> = OnceLock::new();
        T.get_or_init(|| Terminology::load().expect("terminology/ is valid (checked by tests)"))
    }

    fn load() -> Result<Terminology, String> {
        let mut resources = Vec::new();
        let mut breakpoints = None;
        let mut files: Vec<_> = FOLDER.files().collect();
        files.sort_by_key(|f| f.path());
        for f in files {
            let name = f.path().display().to_string();
            if !name.ends_with(".json") {
                continue;
            }
            let v: Value = serde_json::from_slice(f.contents())
                .map_err(|e| format!("terminology/{name}: {e}"))?;
            if v.get("resourceType").is_some() {
                resources.push(v);
            } else if name == "eucast-breakpoints.json" {
                breakpoints = Some(Breakpoints::from_json(&v)?);
            }
        }
        let mut local = HashMap::new();
        let mut local_systems = HashSet::new();
        let mut maps: HashMap<String, HashMap<Code, Vec<Code>>> = HashMap::new();
        let mut displays = HashMap::new();
        for r in &resources {
            match r["resourceType"].as_str() {
                Some("ConceptMap") => {
                    let url = r["url"].as_str().unwrap_or_default().to_string();
                    for g in r["group"].as_array().into_iter().flatten() {
                        let (Some(src), Some(tgt)) = (g["source"].as_str(), g["target"].as_str())
                        else {
                            continue;
                        };
                        for e in g["element"].as_array().into_iter().flatten() {
                            let Some(code) = e["code"].as_str() else {
                                continue;
                            };
                            let targets: Vec<Code> = e["target"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter(|t| t["equivalence"] != "unmatched")
                                .filter_map(|t| Some((tgt.to_string(), t["code"].as_str()?.into())))
                                .collect();
                            let key = (src.to_string(), code.to_string());
                            if is_standard_system(src) {
                                maps.entry(url.clone())
                                    .or_default()
                                    .entry(key)
                                    .or_default()
                                    .extend(targets);
                            } else {
                                local_systems.insert(src.to_string());
                                local.entry(key).or_insert_with(Vec::new).extend(targets);
                            }
                        }
                    }
                }
                Some("ValueSet") => {
                    for inc in r["compose"]["include"].as_array().into_iter().flatten() {
                        let system = inc["system"].as_str().unwrap_or_default();
                        for c in inc["concept"].as_array().into_iter().flatten() {
                            if let (Some(code), Some(d)) =
                                (c["code"].as_str(), c["display"].as_str())
                            {
                                displays
                                    .insert((system.to_string(), code.to_string()), d.to_string());
                            }
                        }
                    }
                }
                Some("CodeSystem") => {
                    let system = r["url"].as_str().unwrap_or_default();
                    for c in r["concept"].as_array().into_iter().flatten() {
                        if let (Some(code), Some(d)) = (c["code"].as_str(), c["display"].as_str()) {
                            displays.insert((system.to_string(), code.to_string()), d.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Terminology {
            valuesets: ValueSets::from_resources(&resources),
            local,
            local_systems,
            maps,
            displays,
            breakpoints: breakpoints.ok_or("terminology/eucast-breakpoints.json is missing")?,
            icd9: icd9::Icd9::from_resources(&resources),
            resources,
        })
    }

    /// Is `(system, code)` in the value set `CANON/ValueSet/<id>` (or a full URL)?
    pub fn in_value_set(&self, value_set: &str, code: &Code) -> bool {
        self.valuesets
            .contains(&canonical("ValueSet", value_set), Some(&code.0), &code.1)
            .unwrap_or(false)
    }

    /// Does the value set exist and enumerate its codes? (Checked for every set a definition names.)
    pub fn has_value_set(&self, value_set: &str) -> bool {
        self.valuesets
            .systems(&canonical("ValueSet", value_set))
            .is_some()
    }

    /// Every code of a value set, plus the senders' local codes that map into it (what a stored
    /// resource's index may hold for a member of the set).
    pub fn value_set_codes(&self, value_set: &str) -> Vec<Code> {
        let Some(codes) = self.valuesets.codes(&canonical("ValueSet", value_set)) else {
            return Vec::new();
        };
        let mut out: Vec<Code> = codes.iter().cloned().collect();
        for (local, targets) in &self.local {
            if targets.iter().any(|t| codes.contains(t)) {
                out.push(local.clone());
            }
        }
        out.sort();
        out
    }

    /// The targets of `code` in the ConceptMap `CANON/ConceptMap/<id>`.
    pub fn translate(&self, concept_map: &str, code: &Code) -> &[Code] {
        self.maps
            .get(&canonical("ConceptMap", concept_map))
            .and_then(|m| m.get(code))
            .map_or(&[], Vec::as_slice)
    }

    pub fn has_concept_map(&self, concept_map: &str) -> bool {
        self.maps
            .contains_key(&canonical("ConceptMap", concept_map))
    }

    pub fn display(&self, system: &str, code: &str) -> Option<&str> {
        self.displays
            .get(&(system.to_string(), code.to_string()))
            .map(String::as_str)
    }

    /// The standard codes of a CodeableConcept: its standard codings, plus what the senders'
    /// ConceptMaps map its local codings to.
    pub fn standard_codes(&self, concept: &Value) -> Vec<Code> {
        let mut out = Vec::new();
        for c in concept["coding"].as_array().into_iter().flatten() {
            let (Some(system), Some(code)) = (c["system"].as_str(), c["code"].as_str()) else {
                continue;
            };
            let key = (system.to_string(), code.to_string());
            if is_standard_system(system) {
                out.push(key);
            } else if let Some(targets) = self.local.get(&key) {
                out.extend(targets.iter().cloned());
            }
        }
        out
    }

    /// Local codings of a CodeableConcept that nothing maps, when the concept has no standard code
    /// at all: the rules cannot read it, and the sender must hear so.
    pub fn unmapped_local_codes(&self, concept: &Value) -> Vec<Code> {
        if !self.standard_codes(concept).is_empty() {
            return Vec::new();
        }
        concept["coding"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some((
                    c["system"].as_str()?.to_string(),
                    c["code"].as_str()?.to_string(),
                ))
            })
            .filter(|(s, _)| !is_standard_system(s))
            .collect()
    }

    /// Local systems some ConceptMap covers (for the log at start).
    pub fn local_systems(&self) -> impl Iterator<Item = &str> {
        self.local_systems.iter().map(String::as_str)
    }
}

/// `id` → `CANON/<kind>/id`; full URLs pass through.
fn canonical(kind: &str, id_or_url: &str) -> String {
    if id_or_url.contains("://") {
        id_or_url.split('|').next().unwrap_or(id_or_url).to_string()
    } else {
        format!("{CANON}/{kind}/{id_or_url}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMENT: &str = "http://hl7.org/fhir/StructureDefinition/valueset-concept-comments";

    #[test]
    fn every_terminology_code_names_its_source() {
        let t = Terminology::get();
        assert!(t.resources.len() >= 15);
        for r in &t.resources {
            let name = r["url"].as_str().unwrap_or_default();
            assert!(
                r["description"].as_str().is_some_and(|d| d.len() > 20),
                "{name} has no description naming its sources"
            );
            for inc in r["compose"]["include"].as_array().into_iter().flatten() {
                for c in inc["concept"].as_array().into_iter().flatten() {
                    let sourced = c["extension"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|e| e["url"] == COMMENT && e["valueString"].as_str().is_some());
                    assert!(sourced, "{name}: concept {} names no source", c["code"]);
                }
            }
            // ICD-9-CM is one published code system whose source the description names; its
            // concepts carry CMS's own descriptions, not a source each
            let whole_system = r["url"] == ICD9CM;
            for c in r["concept"].as_array().into_iter().flatten() {
                if whole_system {
                    continue;
                }
                assert!(
                    c["definition"].as_str().is_some(),
                    "{name}: concept {} has no definition",
                    c["code"]
                );
            }
        }
    }

    #[test]
    fn local_codes_map_through_the_senders_concept_map() {
        let t = Terminology::get();
        let concept = serde_json::json!({"coding": [
            {"system": "https://lis.niguarda.example/codici", "code": "MEM-I"}]});
        assert_eq!(
            t.standard_codes(&concept),
            vec![(LOINC.to_string(), "18943-1".to_string())]
        );
        let unmapped = serde_json::json!({"coding": [
            {"system": "https://lis.niguarda.example/codici", "code": "NOPE"}]});
        assert_eq!(t.unmapped_local_codes(&unmapped).len(), 1);
        assert!(t.in_value_set("campione-sangue", &(SNOMED.into(), "119297000".into())));
        assert!(!t.in_value_set("campione-sangue", &(SNOMED.into(), "122575003".into())));
    }

    #[test]
    fn value_set_codes_include_the_local_codes_that_map_into_it() {
        let codes = Terminology::get().value_set_codes("esame-colturale");
        assert!(codes.contains(&(LOINC.to_string(), "600-7".to_string())));
        assert!(codes.contains(&(
            "https://lis.niguarda.example/codici".to_string(),
            "EMOC".to_string()
        )));
        assert!(!codes.contains(&(LOINC.to_string(), "630-4".to_string())));
    }

    #[test]
    fn both_eucast_tables_are_loaded_and_the_newest_is_the_default() {
        let t = Terminology::get();
        assert_eq!(t.breakpoints.versions(), vec!["15.0", "16.1"]);
        let newest = t.breakpoints.table(None).unwrap();
        assert_eq!(newest.version, "16.1");
        let mem = newest.for_agent("MEM").unwrap();
        assert_eq!((mem.mic_susceptible_le, mem.mic_resistant_gt), (2.0, 8.0));
    }
}
