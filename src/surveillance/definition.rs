//! The CRE case definition, read from `profiles/case-definition-cre.json`: the data an
//! epidemiologist edits; this file only gives it types and checks that every set it names exists.
use serde::Deserialize;

use crate::terminology::Terminology;

const CRE: &str = include_str!("../../profiles/case-definition-cre.json");

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseDefinition {
    pub url: String,
    pub version: String,
    pub name: String,
    pub specimen: SpecimenRule,
    pub isolate: IsolateRule,
    pub species: Vec<Species>,
    pub criteria: Criteria,
    pub deduplication: Deduplication,
    pub notification: NotificationRule,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecimenRule {
    pub value_set: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IsolateRule {
    pub codes: String,
    pub statuses: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Species {
    pub code: String,
    pub name: String,
    pub value_sets: Vec<String>,
    pub reason_code: Coded,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Coded {
    pub code: String,
    pub display: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Criteria {
    pub combine: String,
    pub items: Vec<Criterion>,
}

/// One criterion; `kind` picks how the engine reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Criterion {
    /// Resistance (R) to one of `agents`, by the laboratory's interpretation or the breakpoints.
    #[serde(rename_all = "camelCase")]
    Resistance {
        code: String,
        label: String,
        tests: String,
        agent_map: String,
        agents: Vec<String>,
        resistant: String,
        statuses: Vec<String>,
    },
    /// A test that detects something (a carbapenemase or its gene).
    #[serde(rename_all = "camelCase")]
    Detection {
        code: String,
        label: String,
        tests: String,
        type_tests: String,
        detected: String,
        not_detected: String,
        statuses: Vec<String>,
    },
}

impl Criterion {
    pub fn code(&self) -> &str {
        match self {
            Criterion::Resistance { code, .. } | Criterion::Detection { code, .. } => code,
        }
    }
    pub fn label(&self) -> &str {
        match self {
            Criterion::Resistance { label, .. } | Criterion::Detection { label, .. } => label,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deduplication {
    pub time_zone: String,
    pub dates: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationRule {
    pub category: String,
    pub priority: String,
    pub reason_codes: Vec<Coded>,
}

impl CaseDefinition {
    /// The packaged CRE definition, checked against the terminology.
    pub fn cre() -> Result<CaseDefinition, String> {
        let def: CaseDefinition = serde_json::from_str(CRE)
            .map_err(|e| format!("profiles/case-definition-cre.json: {e}"))?;
        def.check(Terminology::get())?;
        Ok(def)
    }

    /// `url|version`, as cases record it.
    pub fn canonical(&self) -> String {
        format!("{}|{}", self.url, self.version)
    }

    /// Every value set and map the definition names must exist, so that a typo in the data fails
    /// the start, not a case.
    fn check(&self, t: &Terminology) -> Result<(), String> {
        let mut sets = vec![&self.specimen.value_set, &self.isolate.codes];
        for s in &self.species {
            sets.extend(s.value_sets.iter());
        }
        for c in &self.criteria.items {
            match c {
                Criterion::Resistance {
                    tests,
                    resistant,
                    agent_map,
                    ..
                } => {
                    sets.push(tests);
                    sets.push(resistant);
                    if !t.has_concept_map(agent_map) {
                        return Err(format!(
                            "the case definition names the ConceptMap '{agent_map}', which terminology/ lacks"
                        ));
                    }
                }
                Criterion::Detection {
                    tests,
                    type_tests,
                    detected,
                    not_detected,
                    ..
                } => sets.extend([tests, type_tests, detected, not_detected]),
            }
        }
        for s in sets {
            if !t.has_value_set(s) {
                return Err(format!(
                    "the case definition names the ValueSet '{s}', which terminology/ lacks"
                ));
            }
        }
        if self.criteria.combine != "any" {
            return Err("criteria.combine must be 'any' (a and/or b)".into());
        }
        if self.deduplication.time_zone.is_empty()
            || jiff::tz::TimeZone::get(&self.deduplication.time_zone).is_err()
        {
            return Err(format!(
                "unknown time zone '{}'",
                self.deduplication.time_zone
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_cre_definition_loads_and_names_existing_value_sets() {
        let def = CaseDefinition::cre().expect("profiles/case-definition-cre.json is valid");
        assert_eq!(
            def.canonical(),
            "https://sentinella-fhir.github.io/ig/definizione-caso/cre|1.0.0"
        );
        assert_eq!(def.species.len(), 2);
        let labels: Vec<&str> = def.criteria.items.iter().map(Criterion::label).collect();
        assert_eq!(labels, vec!["a", "b"]);
    }
}
