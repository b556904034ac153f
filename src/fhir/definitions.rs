//! The packaged R4 definitions (see fhir/r4/SOURCES.md), embedded in the binary and parsed once.
use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;

use super::search_params::SearchParamRegistry;
use super::structure::StructureDefinitions;
use super::valuesets::ValueSets;

const PROFILES: &str = include_str!("../../fhir/r4/profiles.json");
const VALUESETS: &str = include_str!("../../fhir/r4/valuesets.json");
const SEARCH_PARAMETERS: &str = include_str!("../../fhir/r4/search-parameters.json");

pub struct Definitions {
    pub structures: StructureDefinitions,
    pub valuesets: ValueSets,
    pub search: SearchParamRegistry,
}

impl Definitions {
    /// The process-wide definitions; parsed on first use (the server warms them at start).
    pub fn get() -> &'static Definitions {
        static DEFS: OnceLock<Definitions> = OnceLock::new();
        DEFS.get_or_init(|| {
            let profiles = bundle_resources(PROFILES);
            let valuesets = bundle_resources(VALUESETS);
            let mut params = bundle_resources(SEARCH_PARAMETERS);
            // Sentinella's own parameters (region, asl…): topic filters and region scoping use them
            params.extend(super::profile::resources_of_kind("SearchParameter"));
            Definitions {
                structures: StructureDefinitions::from_resources(&profiles),
                valuesets: ValueSets::from_resources(&valuesets),
                search: SearchParamRegistry::from_resources(&params),
            }
        })
    }
}

/// Every packaged R4 definition (StructureDefinitions, ValueSets, CodeSystems, SearchParameters),
/// parsed anew: the conformance registry serves them.
pub fn packaged() -> Vec<Value> {
    [PROFILES, VALUESETS, SEARCH_PARAMETERS]
        .into_iter()
        .flat_map(bundle_resources)
        .collect()
}

fn bundle_resources(text: &str) -> Vec<Value> {
    let bundle: Value = serde_json::from_str(text).expect("packaged definitions are valid JSON");
    match bundle.get("entry").and_then(Value::as_array) {
        Some(entries) => entries
            .iter()
            .filter_map(|e| e.get("resource").cloned())
            .collect(),
        None => Vec::new(),
    }
}

/// Index resources of one kind by canonical URL.
pub fn by_url<'a>(resources: &'a [Value], kind: &str) -> HashMap<String, &'a Value> {
    resources
        .iter()
        .filter(|r| r["resourceType"] == kind)
        .filter_map(|r| Some((r["url"].as_str()?.to_string(), r)))
        .collect()
}
