//! Evaluating one isolate against the CRE case definition: gather its evidence through the links
//! the laboratory sent (hasMember, derivedFrom, specimen, the DiagnosticReport, the patient) and
//! decide which criteria hold.
use std::collections::BTreeSet;

use serde_json::Value;

use super::calendar::{self, ReferenceDate};
use super::definition::{CaseDefinition, Criterion, Species};
use super::links::{Reader, target, targets};
use crate::italy::codice_fiscale::CodiceFiscale;
use crate::store::{CaseKey, StoreResult};
use crate::terminology::breakpoints::{Comparator, Measured};
use crate::terminology::{BreakpointTable, CANON, Code, Sir, Terminology, UCUM};
use std::sync::Arc;

pub const CF_SYSTEM: &str = "http://hl7.it/sid/codiceFiscale";

/// One criterion that holds, and the Observation that shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Met {
    pub criterion: String,
    pub evidence: String,
    pub agent: Option<String>,
    /// `interpretazione-laboratorio` or `breakpoint-eucast` (resistance only).
    pub origin: Option<&'static str>,
    /// The EUCAST table version, when the engine interpreted a value.
    pub breakpoint: Option<String>,
}

/// Who receives a CRE case: the treating facility's ASL (and through its code, the region).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Facility {
    pub facility: Option<(String, String)>,
    pub asl: Option<(String, String, String)>,
}

/// Everything the engine knows about one isolate that has a patient, a date and a target species.
#[derive(Debug, Clone)]
pub struct Finding {
    pub isolate_id: String,
    pub patient_id: String,
    pub patient_cf: Option<String>,
    pub key: CaseKey,
    pub species: Species,
    pub date: ReferenceDate,
    pub specimen_id: Option<String>,
    pub reports: Vec<String>,
    pub met: Vec<Met>,
    pub facility: Facility,
    /// Blood specimen, statuses good, at least one criterion.
    pub qualifies: bool,
}

/// The outcome for one isolate.
#[derive(Debug)]
pub enum Evaluation {
    /// Not an isolate of a species the definition names (or gone).
    NotApplicable,
    /// An isolate, but the patient or the date is still missing: nothing can be decided yet.
    Pending,
    Decided(Box<Finding>),
}

fn codes(t: &Terminology, concept: &Value) -> Vec<Code> {
    t.standard_codes(concept)
}

fn any_in(t: &Terminology, value_set: &str, codes: &[Code]) -> bool {
    codes.iter().any(|c| t.in_value_set(value_set, c))
}

fn status_in(resource: &Value, statuses: &[String]) -> bool {
    resource["status"]
        .as_str()
        .is_some_and(|s| statuses.iter().any(|x| x == s))
}

/// Is this Observation an organism identification (whatever the organism)?
pub fn is_isolate_code(def: &CaseDefinition, t: &Terminology, obs: &Value) -> bool {
    any_in(t, &def.isolate.codes, &codes(t, &obs["code"]))
}

/// Can this resource change a CRE decision? (Cheap: read from the resource alone.)
pub fn is_relevant_observation(def: &CaseDefinition, t: &Terminology, obs: &Value) -> bool {
    let c = codes(t, &obs["code"]);
    any_in(t, &def.isolate.codes, &c)
        || def.criteria.items.iter().any(|cr| match cr {
            Criterion::Resistance { tests, .. } => any_in(t, tests, &c),
            Criterion::Detection {
                tests, type_tests, ..
            } => any_in(t, tests, &c) || any_in(t, type_tests, &c),
        })
}

fn species_of<'d>(def: &'d CaseDefinition, t: &Terminology, obs: &Value) -> Option<&'d Species> {
    let c = codes(t, &obs["valueCodeableConcept"]);
    def.species
        .iter()
        .find(|s| s.value_sets.iter().any(|vs| any_in(t, vs, &c)))
}

/// The patient identity of the deduplication: the codice fiscale with omocodia folded, else the
/// logical id (a patient without a codice fiscale is still one person to the server).
pub fn identity(patient_id: &str, patient: &Value) -> (String, Option<String>) {
    for i in patient["identifier"].as_array().into_iter().flatten() {
        if i["system"] == CF_SYSTEM
            && let Some(cf) = i["value"]
                .as_str()
                .and_then(|v| CodiceFiscale::parse(v).ok())
        {
            return (
                format!("CF:{}", cf.identity()),
                Some(cf.as_str().to_string()),
            );
        }
    }
    (format!("Patient/{patient_id}"), None)
}

pub struct Evaluator<'a> {
    pub def: &'a CaseDefinition,
    pub terms: &'a Terminology,
    pub breakpoints: &'a BreakpointTable,
    pub tz: &'a jiff::tz::TimeZone,
}

impl Evaluator<'_> {
    pub async fn evaluate(&self, tx: &mut Reader<'_>, isolate_id: &str) -> StoreResult<Evaluation> {
        let (def, t) = (self.def, self.terms);
        let Some(isolate) = tx.read("Observation", isolate_id).await? else {
            return Ok(Evaluation::NotApplicable);
        };
        if !is_isolate_code(def, t, &isolate) {
            return Ok(Evaluation::NotApplicable);
        }
        let Some(species) = species_of(def, t, &isolate) else {
            return Ok(Evaluation::NotApplicable);
        };
        let Some((patient_id, patient)) = tx.follow(&isolate["subject"], "Patient").await? else {
            return Ok(Evaluation::Pending);
        };
        let (identity, patient_cf) = identity(&patient_id, &patient);

        // the reports that carry the isolate
        let isolate_ref = format!("Observation/{isolate_id}");
        let mut reports = Vec::new();
        for id in tx
            .referencing("DiagnosticReport", "result", &isolate_ref)
            .await?
        {
            if let Some(r) = tx.read("DiagnosticReport", &id).await? {
                reports.push((id, r));
            }
        }
        // a report withdrawn (entered-in-error, cancelled) no longer speaks for the isolate; the
        // isolate is withdrawn only when every report that carried it is
        let withdrawn =
            |r: &Value| matches!(r["status"].as_str(), Some("entered-in-error" | "cancelled"));
        let reports_ok = reports.is_empty() || reports.iter().any(|(_, r)| !withdrawn(r));
        reports.retain(|(_, r)| !withdrawn(r));
        reports.sort_by(|a, b| a.0.cmp(&b.0));
        // the specimen: the isolate's own, else the report's
        let mut specimen = tx.follow(&isolate["specimen"], "Specimen").await?;
        if specimen.is_none() {
            for (_, r) in &reports {
                if let Some(first) = r["specimen"].as_array().and_then(|a| a.first()) {
                    specimen = tx.follow(first, "Specimen").await?;
                    if specimen.is_some() {
                        break;
                    }
                }
            }
        }
        let date = [
            specimen.as_ref().and_then(|(_, s)| {
                s["collection"]["collectedDateTime"]
                    .as_str()
                    .or(s["collection"]["collectedPeriod"]["start"].as_str())
                    .map(|d| (d, "raccolta-campione"))
            }),
            isolate["effectiveDateTime"]
                .as_str()
                .or(isolate["effectivePeriod"]["start"].as_str())
                .or(isolate["effectiveInstant"].as_str())
                .map(|d| (d, "osservazione")),
            reports
                .iter()
                .find_map(|(_, r)| r["issued"].as_str().map(|d| (d, "referto"))),
        ]
        .into_iter()
        .flatten()
        .find_map(|(d, source)| calendar::reference_date(d, source, self.tz));
        let Some(date) = date else {
            return Ok(Evaluation::Pending);
        };

        let blood = specimen.as_ref().is_some_and(|(_, s)| {
            s["status"] != "entered-in-error"
                && any_in(t, &def.specimen.value_set, &codes(t, &s["type"]))
        });
        let isolate_ok = status_in(&isolate, &def.isolate.statuses);

        let evidence = self
            .evidence(
                tx,
                isolate_id,
                &isolate,
                specimen.as_ref().map(|(id, _)| id.as_str()),
                &reports,
            )
            .await?;
        let mut met = Vec::new();
        for (id, obs) in &evidence {
            for c in &def.criteria.items {
                if let Some(m) = self.criterion_met(c, id, obs) {
                    met.push(m);
                }
            }
        }
        let facility = self.facility(tx, &isolate, &reports).await?;
        let qualifies = blood && reports_ok && isolate_ok && !met.is_empty();
        Ok(Evaluation::Decided(Box::new(Finding {
            isolate_id: isolate_id.to_string(),
            patient_id,
            patient_cf,
            key: CaseKey {
                identity,
                species: species.code.clone(),
                year: date.year,
            },
            species: species.clone(),
            date,
            specimen_id: specimen.map(|(id, _)| id),
            reports: reports.into_iter().map(|(id, _)| id).collect(),
            met,
            facility,
            qualifies,
        })))
    }

    /// The Observations that report on this isolate: its `hasMember`, those `derivedFrom` it, and,
    /// when the specimen or the report has no other isolate, the rest of the specimen's or report's.
    async fn evidence(
        &self,
        tx: &mut Reader<'_>,
        isolate_id: &str,
        isolate: &Value,
        specimen_id: Option<&str>,
        reports: &[(String, Arc<Value>)],
    ) -> StoreResult<Vec<(String, Arc<Value>)>> {
        let isolate_ref = format!("Observation/{isolate_id}");
        let mut ids: BTreeSet<String> = targets(&isolate["hasMember"], "Observation")
            .into_iter()
            .collect();
        ids.extend(
            tx.referencing("Observation", "derived-from", &isolate_ref)
                .await?,
        );
        // groups that hold observations of one culture: the specimen and each report
        let mut groups: Vec<Vec<String>> = Vec::new();
        if let Some(s) = specimen_id {
            groups.push(
                tx.referencing("Observation", "specimen", &format!("Specimen/{s}"))
                    .await?,
            );
        }
        for (_, r) in reports {
            groups.push(targets(&r["result"], "Observation"));
        }
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for g in groups {
            let mut members = Vec::new();
            let mut isolates = 0;
            for id in g {
                if id == isolate_id {
                    continue;
                }
                if let Some(obs) = tx.read("Observation", &id).await? {
                    if is_isolate_code(self.def, self.terms, &obs) {
                        isolates += 1;
                    } else {
                        members.push((id, obs));
                    }
                }
            }
            if isolates == 0 {
                for (id, obs) in members {
                    if !ids.contains(&id) && seen.insert(id.clone()) {
                        out.push((id, obs));
                    }
                }
            }
        }
        for id in ids {
            if id == isolate_id || !seen.insert(id.clone()) {
                continue;
            }
            if let Some(obs) = tx.read("Observation", &id).await? {
                out.push((id, obs));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn criterion_met(&self, c: &Criterion, id: &str, obs: &Value) -> Option<Met> {
        let t = self.terms;
        let code = codes(t, &obs["code"]);
        let met =
            |agent: Option<String>, origin: Option<&'static str>, breakpoint: Option<String>| Met {
                criterion: c.code().to_string(),
                evidence: format!("Observation/{id}"),
                agent,
                origin,
                breakpoint,
            };
        match c {
            Criterion::Resistance {
                tests,
                agent_map,
                agents,
                resistant,
                statuses,
                ..
            } => {
                if !status_in(obs, statuses) {
                    return None;
                }
                let test = code.iter().find(|c| t.in_value_set(tests, c))?;
                let agent = t
                    .translate(agent_map, test)
                    .iter()
                    .map(|(_, a)| a.clone())
                    .find(|a| agents.contains(a))?;
                let interpretations: Vec<Code> = obs["interpretation"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|i| codes(t, i))
                    .collect();
                if !interpretations.is_empty() {
                    // the laboratory's interpretation wins over any value it also sent
                    return any_in(t, resistant, &interpretations)
                        .then(|| met(Some(agent), Some("interpretazione-laboratorio"), None));
                }
                let bp = self.breakpoints.for_agent(&agent)?;
                let q = &obs["valueQuantity"];
                let measured = Measured {
                    value: q["value"].as_f64()?,
                    comparator: match q["comparator"].as_str() {
                        Some(c) => Some(Comparator::parse(c)?),
                        None => None,
                    },
                };
                // UCUM is case-sensitive but 'l' and 'L' are both the litre; the code decides, else
                // the human-readable unit
                let units = [q["code"].as_str(), q["unit"].as_str()];
                let kind = |u: &str| match u.to_ascii_lowercase().as_str() {
                    "mg/l" | "ug/ml" | "µg/ml" => Some(true),
                    "mm" => Some(false),
                    _ => None,
                };
                if !(q["system"] == UCUM || q["system"].is_null()) {
                    return None;
                }
                let mic = units.into_iter().flatten().find_map(kind)?;
                let sir = if mic {
                    bp.interpret_mic(measured)
                } else {
                    bp.interpret_zone(measured)
                }?;
                (sir == Sir::R).then(|| {
                    met(
                        Some(agent),
                        Some("breakpoint-eucast"),
                        Some(format!("EUCAST {}", self.breakpoints.version)),
                    )
                })
            }
            Criterion::Detection {
                tests,
                type_tests,
                detected,
                not_detected,
                statuses,
                ..
            } => {
                if !status_in(obs, statuses) {
                    return None;
                }
                let mut values = codes(t, &obs["valueCodeableConcept"]);
                values.extend(
                    obs["interpretation"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|i| codes(t, i)),
                );
                let presence = code.iter().any(|c| t.in_value_set(tests, c));
                let typing = code.iter().any(|c| t.in_value_set(type_tests, c));
                let yes = if presence {
                    any_in(t, detected, &values) || obs["valueBoolean"] == true
                } else if typing {
                    // a typing test names what it found; anything but "not detected" is a finding
                    !values.is_empty() && !any_in(t, not_detected, &values)
                } else {
                    false
                };
                yes.then(|| met(None, None, None))
            }
        }
    }

    /// The treating facility: the isolate's Encounter's serviceProvider, else the report's performer;
    /// its ASL is the first Organization up the `partOf` chain with an ASL code.
    async fn facility(
        &self,
        tx: &mut Reader<'_>,
        isolate: &Value,
        reports: &[(String, Arc<Value>)],
    ) -> StoreResult<Facility> {
        let mut org = None;
        let mut encounters = vec![isolate["encounter"].clone()];
        encounters.extend(reports.iter().map(|(_, r)| r["encounter"].clone()));
        for e in encounters {
            if let Some((_, enc)) = tx.follow(&e, "Encounter").await?
                && let Some(o) = tx.follow(&enc["serviceProvider"], "Organization").await?
            {
                org = Some(o);
                break;
            }
        }
        if org.is_none() {
            'reports: for (_, r) in reports {
                for p in r["performer"].as_array().into_iter().flatten() {
                    if let Some(o) = tx.follow(p, "Organization").await? {
                        org = Some(o);
                        break 'reports;
                    }
                }
            }
        }
        let Some((facility_id, facility)) = org else {
            return Ok(Facility::default());
        };
        let name = facility["name"].as_str().unwrap_or_default().to_string();
        let mut current = Some((facility_id.clone(), facility));
        let asl_system = format!("{CANON}/sid/asl");
        let mut asl = None;
        for _ in 0..6 {
            let Some((id, o)) = current.take() else { break };
            if let Some(code) = o["identifier"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|i| i["system"] == asl_system.as_str())
                .and_then(|i| i["value"].as_str())
            {
                asl = Some((
                    id,
                    code.to_string(),
                    o["name"].as_str().unwrap_or_default().to_string(),
                ));
                break;
            }
            current = match target(&o["partOf"], "Organization") {
                Some(parent) => tx.read("Organization", &parent).await?.map(|p| (parent, p)),
                None => None,
            };
        }
        Ok(Facility {
            facility: Some((facility_id, name)),
            asl,
        })
    }
}
