//! One doctor's notification (segnalazione) read with its Condition, evidence and patient into a
//! `Report`: what the rules remember of it and what they decide on.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::rules::{CriteriaOutcome, Notify, RuleSet, decide_criteria};
use crate::italy::places::residence_comune;
use crate::store::StoreResult;
use crate::surveillance::evaluate::identity;
use crate::surveillance::links::{Reader, target, targets};
use crate::terminology::{CANON, Code, ICD9CM, LOINC, SNOMED, Terminology};

/// What the receipt says of a report (`CodeSystem-esito-segnalazione`).
pub mod outcome {
    pub const NOTIFIED: &str = "notificato";
    pub const WAITING: &str = "in-attesa";
    pub const RECORDED: &str = "registrato";
    pub const NOT_NOTIFIABLE: &str = "non-notificabile";
    pub const ALREADY_NOTIFIED: &str = "gia-notificato";
    pub const WITHDRAWN: &str = "ritirato";
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Community {
    /// `system|value` of the community's identifier: the outbreak key.
    pub key: String,
    pub tipo: Option<String>,
    pub nome: Option<String>,
    pub identifier: Value,
    pub persone: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Evidence {
    pub criterion: String,
    pub result: String,
    /// `Observation/<id>`
    pub reference: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// The segnalazione Communication's id.
    pub id: String,
    pub rule_set: Option<String>,
    pub patient_id: Option<String>,
    pub identity: String,
    pub codice_fiscale: Option<String>,
    /// The ICD-9-CM code reported, and the listed disease it belongs to.
    pub code: Option<String>,
    pub disease: Option<String>,
    pub class: Option<u8>,
    /// sospetto | confermato | escluso | errore
    pub verification: String,
    pub condition: Option<String>,
    pub onset: Option<String>,
    pub recorded: Option<String>,
    /// µs: the onset, else recordedDate, else `sent` (episodes and outbreaks are timed by it)
    pub onset_us: Option<i64>,
    pub recorded_us: Option<i64>,
    /// µs: when the server first received the report (kept across re-evaluations)
    pub received_us: i64,
    pub community: Option<Community>,
    pub previous_treatment: Option<String>,
    pub comune: Option<String>,
    /// The patient's birth date and administrative gender (the summaries' age band and sex).
    #[serde(default)]
    pub birth_date: Option<String>,
    #[serde(default)]
    pub sex: Option<String>,
    /// The notifying ASL's NSIS code and name (the segnalazione's `recipient`).
    pub notifying_asl: Option<(String, String)>,
    pub evidence: Vec<Evidence>,
    /// `esito-segnalazione` code
    pub outcome: String,
    /// The options of criteria that held (class II: "criteri", "coltura positiva"; TB: A–D).
    pub met: Vec<String>,
    pub missing: Vec<String>,
    /// The rule-state key of the case it belongs to.
    pub case_key: Option<String>,
    /// Every resource the segnalazione names (`Type/id`), sent yet or not: their arrival re-decides it.
    #[serde(default)]
    pub links: Vec<String>,
}

impl Report {
    /// Does the report stand for a case (notified, or recorded for the summary)?
    pub fn counts(&self) -> bool {
        matches!(self.outcome.as_str(), outcome::NOTIFIED | outcome::RECORDED)
    }

    /// The dedup key of its case: identity and disease.
    pub fn case_group(&self) -> Option<String> {
        Some(format!("{}|{}", self.identity, self.disease.as_ref()?))
    }

    /// The outbreak group: disease and community.
    pub fn outbreak_group(&self) -> Option<String> {
        Some(format!(
            "{}|{}",
            self.disease.as_ref()?,
            self.community.as_ref()?.key
        ))
    }

    /// Resources whose change must re-decide this report (state tags).
    pub fn tags(&self, outbreaks: bool) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(c) = &self.condition {
            out.push(format!("ref:Condition/{c}"));
        }
        for e in &self.evidence {
            out.push(format!("ref:{}", e.reference));
        }
        for l in &self.links {
            out.push(format!("ref:{l}"));
        }
        if let Some(p) = &self.patient_id {
            out.push(format!("patient:Patient/{p}"));
        }
        if outbreaks && let Some(g) = self.outbreak_group() {
            out.push(format!("comm:{g}"));
        }
        out.sort();
        out.dedup();
        out
    }
}

/// Is this Communication a doctor's notification? (Profile `segnalazione`, or an ICD-9-CM reason
/// on a Communication that is not one of our case notifications.)
pub fn is_segnalazione(c: &Value) -> bool {
    if c["resourceType"] != "Communication" || crate::surveillance::is_case_notification(c) {
        return false;
    }
    let profile = format!("{CANON}/StructureDefinition/segnalazione");
    let profiled = c["meta"]["profile"].as_array().is_some_and(|p| {
        p.iter().any(|u| {
            u.as_str()
                .is_some_and(|u| u.split('|').next() == Some(profile.as_str()))
        })
    });
    profiled || icd9_code(&c["reasonCode"][0]).is_some()
}

/// The most resources one segnalazione may name (validation refuses more).
pub const MAX_NAMED: usize = crate::fhir::resource::MAX_COMMUNICATION_PARTS;

/// `Type/id` of the resources a segnalazione names: its subject, payload and reason references.
pub fn named_links(c: &Value) -> Vec<String> {
    let mut out: Vec<String> = c["payload"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| &p["contentReference"])
        .chain(c["reasonReference"].as_array().into_iter().flatten())
        .chain(std::iter::once(&c["subject"]))
        .filter_map(|r| r["reference"].as_str())
        .filter(|r| r.split('/').count() == 2)
        .map(String::from)
        .take(MAX_NAMED + 1)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The ICD-9-CM code of a CodeableConcept.
pub fn icd9_code(concept: &Value) -> Option<String> {
    concept["coding"]
        .as_array()?
        .iter()
        .find(|c| c["system"] == ICD9CM)
        .and_then(|c| c["code"].as_str())
        .map(String::from)
}

/// A date alone is an Italian day: its deadline runs from midnight in Rome, not in UTC.
fn micros_of(v: &Value) -> Option<i64> {
    v.as_str()
        .and_then(crate::surveillance::calendar::italian_instant)
}

/// Result precedence when several observations state one criterion.
fn rank(result: &str) -> u8 {
    match result {
        "positivo" => 4,
        "in-corso" => 3,
        "negativo" => 2,
        _ => 1,
    }
}

/// What a laboratory Observation proves, through `ConceptMap-laboratorio-criterio`.
fn laboratory_result(t: &Terminology, obs: &Value) -> Option<(String, String)> {
    let criterion = obs["code"]["coding"]
        .as_array()?
        .iter()
        .filter(|c| c["system"] == LOINC)
        .filter_map(|c| c["code"].as_str())
        .find_map(|code| {
            t.translate(
                "laboratorio-criterio",
                &(LOINC.to_string(), code.to_string()),
            )
            .first()
            .map(|c| c.1.clone())
        })?;
    let status = obs["status"].as_str().unwrap_or_default();
    let result = match status {
        "registered" | "preliminary" => "in-corso",
        "final" | "amended" | "corrected" => {
            let mut codes: Vec<Code> = t.standard_codes(&obs["valueCodeableConcept"]);
            codes.extend(t.standard_codes(&obs["interpretation"][0]));
            if codes
                .iter()
                .any(|c| t.in_value_set("risultato-non-rilevato", c))
            {
                "negativo"
            } else if codes
                .iter()
                .any(|c| t.in_value_set("risultato-rilevato", c) || c.0 == SNOMED)
            {
                "positivo"
            } else {
                return None;
            }
        }
        _ => return None,
    };
    Some((criterion, result.to_string()))
}

/// The criterion and result a criterio-diagnostico Observation states.
fn stated_result(obs: &Value) -> Option<(String, String)> {
    let criteria = format!("{CANON}/CodeSystem/criterio-diagnostico");
    let results = format!("{CANON}/CodeSystem/esito-criterio");
    let criterion = obs["code"]["coding"]
        .as_array()?
        .iter()
        .find(|c| c["system"] == criteria.as_str())?["code"]
        .as_str()?;
    let result = obs["valueCodeableConcept"]["coding"]
        .as_array()?
        .iter()
        .find(|c| c["system"] == results.as_str())?["code"]
        .as_str()?;
    Some((criterion.to_string(), result.to_string()))
}

/// Read the segnalazione `id` and decide its outcome (the case is assigned later, under the
/// lock of its identity and disease). `previous`: what was remembered of it.
pub async fn read_report(
    reader: &mut Reader<'_>,
    sets: &[RuleSet],
    id: &str,
    previous: Option<&Report>,
    now: i64,
) -> StoreResult<Report> {
    let t = Terminology::get();
    let mut r = Report {
        id: id.to_string(),
        received_us: previous.map_or(now, |p| p.received_us),
        verification: "sospetto".into(),
        outcome: outcome::NOT_NOTIFIABLE.into(),
        case_key: previous.and_then(|p| p.case_key.clone()),
        ..Default::default()
    };
    let Some(comm) = reader.read("Communication", id).await? else {
        r.outcome = outcome::WITHDRAWN.into();
        return Ok(keep_identity(r, previous));
    };
    // only a notification the doctor completed counts (a draft, a stopped or an erroneous one not)
    if !is_segnalazione(&comm) || comm["status"] != "completed" {
        r.outcome = outcome::WITHDRAWN.into();
        return Ok(keep_identity(r, previous));
    }
    // the patient
    if let Some(pid) = target(&comm["subject"], "Patient") {
        r.identity = format!("Patient/{pid}");
        if let Some(p) = reader.read("Patient", &pid).await? {
            let (identity, cf) = identity(&pid, &p);
            r.identity = identity;
            r.codice_fiscale = cf;
            r.comune = residence_comune(&p);
            r.birth_date = p["birthDate"].as_str().map(String::from);
            r.sex = p["gender"].as_str().map(String::from);
        }
        r.patient_id = Some(pid);
    }
    // the notifying ASL
    for rec in comm["recipient"].as_array().into_iter().flatten() {
        if let Some(asl) = asl_of(&rec["identifier"]) {
            r.notifying_asl = Some(asl);
            break;
        }
        if let Some((_, org)) = reader.follow(rec, "Organization").await?
            && let Some(asl) = org["identifier"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(asl_of)
        {
            let name = org["name"].as_str().unwrap_or(&asl.1).to_string();
            r.notifying_asl = Some((asl.0, name));
            break;
        }
    }
    // the Condition and the evidence named in the payload (or as the reason)
    let mut named: Vec<Value> = comm["payload"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["contentReference"].clone())
        .collect();
    named.extend(
        comm["reasonReference"]
            .as_array()
            .into_iter()
            .flatten()
            .cloned(),
    );
    named.truncate(MAX_NAMED);
    let mut observations: Vec<String> = Vec::new();
    for n in &named {
        if let Some(reference) = n["reference"].as_str()
            && reference.split('/').count() == 2
        {
            r.links.push(reference.to_string());
        }
        if r.condition.is_none()
            && let Some(c) = target(n, "Condition")
        {
            r.condition = Some(c);
        }
        if let Some(o) = target(n, "Observation") {
            observations.push(o);
        }
    }
    let mut code = icd9_code(&comm["reasonCode"][0]);
    if let Some(cid) = r.condition.clone()
        && let Some(cond) = reader.read("Condition", &cid).await?
    {
        if let Some(c) = icd9_code(&cond["code"]) {
            code = Some(c);
        }
        read_condition(&mut r, &cond);
        observations.extend(
            reader
                .referencing("Observation", "focus", &format!("Condition/{cid}"))
                .await?,
        );
    }
    observations.sort();
    observations.dedup();
    let mut results: BTreeMap<String, (String, String)> = BTreeMap::new();
    for oid in observations {
        let Some(obs) = reader.read("Observation", &oid).await? else {
            continue;
        };
        if matches!(
            obs["status"].as_str(),
            Some("entered-in-error" | "cancelled")
        ) {
            continue;
        }
        let Some((criterion, result)) = stated_result(&obs).or_else(|| laboratory_result(t, &obs))
        else {
            continue;
        };
        let reference = format!("Observation/{oid}");
        r.evidence.push(Evidence {
            criterion: criterion.clone(),
            result: result.clone(),
            reference: reference.clone(),
        });
        let better = results
            .get(&criterion)
            .is_none_or(|(have, _)| rank(&result) > rank(have));
        if better {
            results.insert(criterion, (result, reference));
        }
    }
    r.onset_us = r
        .onset
        .as_ref()
        .and_then(|o| micros_of(&Value::String(o.clone())))
        .or(r.recorded_us)
        .or_else(|| micros_of(&comm["sent"]));
    r.code = code.clone();
    let Some(code) = code else {
        return Ok(r);
    };
    // the rule set in force on the day of the case
    let day = r
        .onset
        .clone()
        .or_else(|| r.recorded.clone())
        .or_else(|| comm["sent"].as_str().map(String::from))
        .unwrap_or_else(|| crate::fhir::datetime::format_instant(now));
    let day = crate::surveillance::calendar::italian_day(&day)
        .unwrap_or_else(|| day.get(..10).unwrap_or(&day).to_string());
    let Some(set) = super::rules::in_force(sets, &day) else {
        r.missing = vec![format!("nessun insieme di regole in vigore il {day}")];
        return Ok(r);
    };
    r.rule_set = Some(set.canonical());
    let Some(c) = set.classify(&code) else {
        return Ok(r);
    };
    r.class = Some(c.class.class);
    r.disease = Some(c.disease.key(&code));
    let plain: super::rules::Results = results
        .iter()
        .map(|(k, (v, _))| (k.clone(), v.clone()))
        .collect();
    if r.verification == "errore" {
        r.outcome = outcome::WITHDRAWN.into();
        return Ok(r);
    }
    let refuted = r.verification == "escluso";
    r.outcome = match c.class.notify {
        // class I: a refuted suspicion stays notified, with its negative result
        Notify::OnSuspicion => outcome::NOTIFIED.into(),
        _ if refuted => outcome::WITHDRAWN.into(),
        Notify::Always => outcome::NOTIFIED.into(),
        Notify::Never => outcome::RECORDED.into(),
        Notify::OnCriteria => {
            let decided = decide_criteria(set, c, &plain);
            if c.disease.requires_confirmed(c.class) && r.verification != "confermato" {
                r.missing = vec!["conferma della diagnosi".into()];
                if let CriteriaOutcome::Waiting(m) = decided {
                    r.missing.extend(m);
                }
                outcome::WAITING.into()
            } else {
                match decided {
                    CriteriaOutcome::Held(met) => {
                        r.met = met;
                        outcome::NOTIFIED.into()
                    }
                    CriteriaOutcome::Waiting(m) => {
                        r.missing = m;
                        outcome::WAITING.into()
                    }
                }
            }
        }
    };
    // only the results that decided are the case's evidence
    let used: Vec<&String> = results.values().map(|(_, reference)| reference).collect();
    r.evidence
        .retain(|e| used.contains(&&e.reference) || e.result == "positivo");
    Ok(r)
}

/// A withdrawn report keeps what identified it, so its case and outbreak can be found again.
fn keep_identity(mut r: Report, previous: Option<&Report>) -> Report {
    if let Some(p) = previous {
        r.patient_id = p.patient_id.clone();
        r.identity = p.identity.clone();
        r.codice_fiscale = p.codice_fiscale.clone();
        r.code = p.code.clone();
        r.disease = p.disease.clone();
        r.class = p.class;
        r.rule_set = p.rule_set.clone();
        r.community = p.community.clone();
        r.onset_us = p.onset_us;
        r.condition = p.condition.clone();
    }
    r
}

fn read_condition(r: &mut Report, cond: &Value) {
    let status = cond["verificationStatus"]["coding"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|c| c["code"].as_str())
        .unwrap_or("provisional");
    r.verification = match status {
        "confirmed" => "confermato",
        "refuted" => "escluso",
        "entered-in-error" => "errore",
        _ => "sospetto",
    }
    .into();
    r.onset = cond["onsetDateTime"].as_str().map(String::from);
    r.recorded = cond["recordedDate"].as_str().map(String::from);
    r.recorded_us = micros_of(&cond["recordedDate"]);
    for e in cond["extension"].as_array().into_iter().flatten() {
        let url = e["url"].as_str().unwrap_or_default();
        if url == format!("{CANON}/StructureDefinition/comunita") {
            let part = |name: &str| {
                e["extension"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["url"] == name)
                    .cloned()
                    .unwrap_or(Value::Null)
            };
            let ident = part("identificativo")["valueIdentifier"].clone();
            let (Some(system), Some(value)) = (ident["system"].as_str(), ident["value"].as_str())
            else {
                continue;
            };
            r.community = Some(Community {
                key: format!("{system}|{value}"),
                tipo: part("tipo")["valueCode"].as_str().map(String::from),
                nome: part("nome")["valueString"].as_str().map(String::from),
                identifier: ident.clone(),
                persone: part("persone-a-rischio")["valueInteger"].as_i64(),
            });
        } else if url == format!("{CANON}/StructureDefinition/precedenti-trattamenti") {
            r.previous_treatment = e["valueCode"].as_str().map(String::from);
        }
    }
}

/// An ASL identifier (`CANON/sid/asl`): its code, and its display as name for now.
fn asl_of(identifier: &Value) -> Option<(String, String)> {
    (identifier["system"] == format!("{CANON}/sid/asl").as_str())
        .then(|| identifier["value"].as_str())
        .flatten()
        .map(|v| (v.to_string(), v.to_string()))
}

/// The targets of `list` of type `rt` (re-exported for the notification builder).
pub fn observations_of(list: &Value) -> Vec<String> {
    targets(list, "Observation")
}
