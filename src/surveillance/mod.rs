//! Surveillance rules: after every write and before its commit, the CRE case definition is applied
//! to what the write touched, and case notifications are created, updated or withdrawn in the same
//! database transaction, so a 2xx means the case exists (or does not) durably.
pub mod backfill;
pub mod calendar;
pub mod definition;
pub mod dm1990;
pub mod evaluate;
mod links;
pub mod local_codes;
pub mod notification;
pub mod publish;
pub mod register;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde_json::Value;

use crate::fhir::datetime::{format_instant, now_micros};
use crate::store::{
    CaseKey, CaseRow, IsolateState, Note, PreCommit, StoreResult, StoreTx, Touched,
};
use crate::subscriptions::dispatch::Dispatcher;
use crate::terminology::{BreakpointTable, Terminology};
use definition::CaseDefinition;
use evaluate::{Evaluation, Evaluator, Finding, is_isolate_code, is_relevant_observation};
use links::{Reader, target, targets};

/// The rule engine: the case definition, the terminology and the configured breakpoint table.
pub struct Engine {
    pub definition: CaseDefinition,
    pub breakpoints: BreakpointTable,
    tz: jiff::tz::TimeZone,
    /// Transactions the rules ran in, and the time they took (µs): the cost they add to ingest,
    /// logged when the server stops.
    runs: AtomicU64,
    micros: AtomicU64,
    /// The isolate codes (standard and mapped local ones), to find a patient's isolates directly.
    isolate_codes: Vec<crate::terminology::Code>,
    /// Case notifications written here become subscription events in the same transaction.
    pub dispatcher: Arc<Dispatcher>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        let runs = self.runs.load(Ordering::Relaxed);
        if runs > 0 {
            let micros = self.micros.load(Ordering::Relaxed);
            tracing::info!(
                transactions = runs,
                total_ms = micros / 1000,
                mean_us = micros / runs,
                "surveillance rules: time spent inside write transactions"
            );
        }
    }
}

impl Engine {
    /// Load the CRE definition and pick the EUCAST table (`None`: the newest).
    pub fn new(
        eucast_version: Option<&str>,
        dispatcher: Arc<Dispatcher>,
    ) -> Result<Engine, String> {
        let t = Terminology::get();
        let definition = CaseDefinition::cre()?;
        let isolate_codes = t.value_set_codes(&definition.isolate.codes);
        let breakpoints = t.breakpoints.table(eucast_version).cloned().ok_or_else(|| {
            format!(
                "EUCAST breakpoint table '{}' is not in terminology/eucast-breakpoints.json (there: {})",
                eucast_version.unwrap_or_default(),
                t.breakpoints.versions().join(", ")
            )
        })?;
        let tz = jiff::tz::TimeZone::get(&definition.deduplication.time_zone)
            .map_err(|e| e.to_string())?;
        Ok(Engine {
            definition,
            breakpoints,
            tz,
            runs: AtomicU64::new(0),
            micros: AtomicU64::new(0),
            isolate_codes,
            dispatcher,
        })
    }

    fn evaluator(&self) -> Evaluator<'_> {
        Evaluator {
            def: &self.definition,
            terms: Terminology::get(),
            breakpoints: &self.breakpoints,
            tz: &self.tz,
        }
    }

    /// Apply the rules to the resources a transaction wrote. Runs inside that transaction.
    pub async fn apply(&self, tx: &mut dyn StoreTx, touched: &[Touched]) -> StoreResult<()> {
        let started = std::time::Instant::now();
        let result = self.apply_rules(tx, touched).await;
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        result
    }

    async fn apply_rules(&self, tx: &mut dyn StoreTx, touched: &[Touched]) -> StoreResult<()> {
        let t = Terminology::get();
        let def = &self.definition;
        // Writers whose resources are linked (the same patient, specimen, isolate, report…) run one
        // after the other on PostgreSQL (SQLite has one writer anyway): each locks every id its
        // resources name, old and new versions alike, so two halves of a case arriving at once
        // share a lock and the second sees the first.
        let mut locks = BTreeSet::new();
        for w in touched {
            locks.insert(format!("cre:{}/{}", w.resource_type, w.id));
            for body in [&w.body, &w.previous].into_iter().flatten() {
                for (element, rt) in LINKS {
                    for id in linked_ids(&body[*element], rt) {
                        locks.insert(format!("cre:{rt}/{id}"));
                    }
                }
            }
        }
        tx.lock_all(&locks.into_iter().collect::<Vec<_>>()).await?;

        let mut reader = Reader::new(tx);
        for w in touched {
            reader.seed(&w.resource_type, &w.id, w.body.clone(), w.created);
        }
        // Evidence this transaction itself links to an isolate it wrote (hasMember, derivedFrom)
        // needs no reverse lookup.
        let mut isolates_here: BTreeSet<&str> = BTreeSet::new();
        let mut members_here: BTreeSet<String> = BTreeSet::new();
        for w in touched {
            if let (true, Some(b)) = (w.resource_type == "Observation", &w.body)
                && is_isolate_code(def, t, b)
            {
                isolates_here.insert(&w.id);
                members_here.extend(targets(&b["hasMember"], "Observation"));
            }
        }

        let mut candidates = BTreeSet::new();
        for w in touched {
            let reference = format!("{}/{}", w.resource_type, w.id);
            if w.resource_type == "Observation" {
                // a deleted or recoded isolate is re-decided through its own row
                candidates.insert(w.id.clone());
            }
            if !self.changes_decisions(w) {
                continue;
            }
            // the new version's links and the old one's: a correction can move or drop them
            for body in [&w.body, &w.previous].into_iter().flatten() {
                match w.resource_type.as_str() {
                    "Observation" => {
                        if !is_relevant_observation(def, t, body) {
                            continue;
                        }
                        if is_isolate_code(def, t, body)
                            && let Some(s) = target(&body["specimen"], "Specimen")
                        {
                            // another isolate on the same specimen: the others' unlinked evidence
                            // may no longer be theirs alone, so they are decided again
                            self.observations_of_specimen(
                                &mut reader,
                                &format!("Specimen/{s}"),
                                &mut candidates,
                            )
                            .await?;
                        }
                        let derived = targets(&body["derivedFrom"], "Observation");
                        let known = isolates_here.contains(w.id.as_str())
                            || members_here.contains(&w.id)
                            || derived.iter().any(|d| isolates_here.contains(d.as_str()));
                        candidates.extend(derived);
                        if known {
                            continue;
                        }
                        // a piece on its own: find the isolates it belongs to
                        candidates.extend(
                            reader
                                .referencing("Observation", "has-member", &reference)
                                .await?,
                        );
                        candidates.extend(reader.report_results("result", &reference).await?);
                        if let Some(s) = target(&body["specimen"], "Specimen") {
                            self.observations_of_specimen(
                                &mut reader,
                                &format!("Specimen/{s}"),
                                &mut candidates,
                            )
                            .await?;
                        }
                    }
                    "Specimen" => {
                        self.observations_of_specimen(&mut reader, &reference, &mut candidates)
                            .await?;
                    }
                    "DiagnosticReport" => {
                        candidates.extend(targets(&body["result"], "Observation"));
                        for s in targets(&body["specimen"], "Specimen") {
                            self.observations_of_specimen(
                                &mut reader,
                                &format!("Specimen/{s}"),
                                &mut candidates,
                            )
                            .await?;
                        }
                    }
                    "Patient" => {
                        candidates.extend(
                            reader
                                .referencing_coded(
                                    "Observation",
                                    "subject",
                                    &reference,
                                    &self.isolate_codes,
                                )
                                .await?,
                        );
                    }
                    // the treating facility and its ASL decide the recipients: a case follows them
                    "Encounter" => {
                        self.isolates_of_encounter(&mut reader, &reference, &mut candidates)
                            .await?;
                    }
                    "Organization" => {
                        self.isolates_of_organization(&mut reader, &reference, &mut candidates)
                            .await?;
                    }
                    _ => {}
                }
            }
        }

        // each candidate isolate is decided under its own lock (a second lock namespace, taken
        // after the first in every transaction: no lock cycles), so a concurrent writer that
        // reached it through another path cannot overwrite a fresher decision
        let isolate_locks: Vec<String> = candidates
            .iter()
            .map(|id| format!("cre-isolate:{id}"))
            .collect();
        reader.tx.lock_all(&isolate_locks).await?;
        let evaluator = self.evaluator();
        let mut keys = BTreeSet::new();
        let mut decided: HashMap<String, Option<Finding>> = HashMap::new();
        for id in candidates {
            // an isolate created by this transaction has no recorded state yet: no query
            let previous = if reader.is_fresh("Observation", &id) {
                None
            } else {
                reader.tx.cre_isolate(&id).await?
            };
            if previous.is_none()
                && reader
                    .read("Observation", &id)
                    .await?
                    .is_none_or(|obs| !is_isolate_code(def, t, &obs))
            {
                continue;
            }
            let finding = match evaluator.evaluate(&mut reader, &id).await? {
                Evaluation::Decided(f) => Some(*f),
                Evaluation::NotApplicable | Evaluation::Pending => None,
            };
            // the row follows the isolate to its current key, so that key's resolution sees it
            match (&finding, previous) {
                (Some(f), previous) if f.qualifies || previous.is_some() => {
                    reader.tx.cre_put_isolate(&state_of(f)).await?;
                    keys.insert(f.key.clone());
                    if let Some(p) = previous {
                        keys.insert(p.key);
                    }
                }
                (_, Some(mut p)) => {
                    p.qualifies = false;
                    reader.tx.cre_put_isolate(&p).await?;
                    keys.insert(p.key);
                }
                _ => {}
            }
            decided.insert(id, finding);
        }
        let key_locks: Vec<String> = keys
            .iter()
            .map(|k| format!("cre-key:{}|{}|{}", k.identity, k.species, k.year))
            .collect();
        reader.tx.lock_all(&key_locks).await?;
        for key in keys {
            self.resolve(&mut reader, &key, &mut decided).await?;
        }
        Ok(())
    }

    /// Whether a write can change a decision (cheap, from the two versions alone): an unchanged
    /// identity, facility or hierarchy on a Patient, Encounter or Organization changes nothing.
    fn changes_decisions(&self, w: &Touched) -> bool {
        let (Some(new), Some(old)) = (&w.body, &w.previous) else {
            return true;
        };
        match w.resource_type.as_str() {
            // the identity decides the case; birth date, sex and residence what the summaries count
            "Patient" => {
                evaluate::identity(&w.id, new).0 != evaluate::identity(&w.id, old).0
                    || new["birthDate"] != old["birthDate"]
                    || new["gender"] != old["gender"]
                    || crate::italy::places::residence_comune(new)
                        != crate::italy::places::residence_comune(old)
            }
            "Encounter" => new["serviceProvider"] != old["serviceProvider"],
            "Organization" => {
                new["partOf"] != old["partOf"]
                    || new["identifier"] != old["identifier"]
                    || new["name"] != old["name"]
            }
            _ => true,
        }
    }

    /// Observations on a specimen, directly or through a report on it.
    async fn observations_of_specimen(
        &self,
        reader: &mut Reader<'_>,
        specimen: &str,
        candidates: &mut BTreeSet<String>,
    ) -> StoreResult<()> {
        candidates.extend(
            reader
                .referencing("Observation", "specimen", specimen)
                .await?,
        );
        candidates.extend(reader.report_results("specimen", specimen).await?);
        Ok(())
    }

    /// The observations (and report results) of an encounter: candidates when it changes.
    async fn isolates_of_encounter(
        &self,
        reader: &mut Reader<'_>,
        encounter: &str,
        candidates: &mut BTreeSet<String>,
    ) -> StoreResult<()> {
        candidates.extend(
            reader
                .referencing_coded("Observation", "encounter", encounter, &self.isolate_codes)
                .await?,
        );
        candidates.extend(reader.report_results("encounter", encounter).await?);
        Ok(())
    }

    /// The isolates served by an Organization or the facilities below it.
    async fn isolates_of_organization(
        &self,
        reader: &mut Reader<'_>,
        organization: &str,
        candidates: &mut BTreeSet<String>,
    ) -> StoreResult<()> {
        let mut orgs = vec![organization.to_string()];
        let mut i = 0;
        // the facility may sit a few levels below the ASL
        while i < orgs.len() && orgs.len() < 64 {
            for child in reader
                .referencing("Organization", "partof", &orgs[i])
                .await?
            {
                let child = format!("Organization/{child}");
                if !orgs.contains(&child) {
                    orgs.push(child);
                }
            }
            i += 1;
        }
        for org in &orgs {
            for e in reader
                .referencing("Encounter", "service-provider", org)
                .await?
            {
                self.isolates_of_encounter(reader, &format!("Encounter/{e}"), candidates)
                    .await?;
            }
            candidates.extend(reader.report_results("performer", org).await?);
        }
        Ok(())
    }

    /// Make the case of one key agree with its evidence: every isolate recorded for the key is
    /// evaluated again, the earliest that meets the definition carries the case (created, moved
    /// or refreshed, keeping its identifier), and without one the case is withdrawn.
    async fn resolve(
        &self,
        reader: &mut Reader<'_>,
        key: &CaseKey,
        decided: &mut HashMap<String, Option<Finding>>,
    ) -> StoreResult<()> {
        let evaluator = self.evaluator();
        let mut carrier: Option<Finding> = None;
        for id in reader.tx.cre_isolates_of_key(key).await? {
            let finding = match decided.get(&id) {
                Some(f) => f.clone(),
                None => {
                    // recorded earlier, not touched now: its row may be stale (a value set or
                    // breakpoint table changed since), so it is decided again
                    let f = match evaluator.evaluate(reader, &id).await? {
                        Evaluation::Decided(f) => Some(*f),
                        _ => None,
                    };
                    let state = match &f {
                        Some(f) => state_of(f),
                        None => IsolateState {
                            isolate_id: id.clone(),
                            key: key.clone(),
                            ref_time: 0,
                            qualifies: false,
                        },
                    };
                    reader.tx.cre_put_isolate(&state).await?;
                    decided.insert(id.clone(), f.clone());
                    f
                }
            };
            if let Some(f) = finding
                && f.qualifies
                && f.key == *key
                && carrier
                    .as_ref()
                    .is_none_or(|c| (f.date.micros, &f.isolate_id) < (c.date.micros, &c.isolate_id))
            {
                carrier = Some(f);
            }
        }
        let active = reader.tx.cre_active_case(key).await?;
        match (active, carrier) {
            (Some(case), Some(f)) => {
                if case.isolate_id != f.isolate_id {
                    reader
                        .tx
                        .cre_set_case(&case.case_id, &f.isolate_id, true)
                        .await?;
                }
                self.register(reader, &case.case_id, &f).await?;
                self.write_case(reader.tx, &case.case_id, &f, "completed")
                    .await
            }
            (Some(case), None) => {
                reader
                    .tx
                    .cre_set_case(&case.case_id, &case.isolate_id, false)
                    .await?;
                reader.tx.register_set_active(&case.case_id, false).await?;
                self.withdraw(reader.tx, &case.case_id).await
            }
            (None, Some(f)) => {
                let case = CaseRow {
                    case_id: uuid::Uuid::new_v4().to_string(),
                    key: key.clone(),
                    isolate_id: f.isolate_id.clone(),
                    active: true,
                };
                // the unique index decides between racing transactions: the loser adds nothing
                if reader.tx.cre_claim_case(&case, now_micros()).await? {
                    self.register(reader, &case.case_id, &f).await?;
                    self.write_case(reader.tx, &case.case_id, &f, "completed")
                        .await?;
                }
                Ok(())
            }
            (None, None) => Ok(()),
        }
    }

    /// Record the case as the periodic summaries count it: on the Italian day of its reference
    /// date, in the treating facility's ASL and region (who reports it), the province and age band
    /// from the patient.
    async fn register(
        &self,
        reader: &mut Reader<'_>,
        case_id: &str,
        f: &Finding,
    ) -> StoreResult<()> {
        let Some(day) = register::rome_day_of_micros(f.date.micros) else {
            return Ok(());
        };
        let patient = reader.read("Patient", &f.patient_id).await?;
        let patient = patient.as_deref().unwrap_or(&Value::Null);
        let comune = crate::italy::places::residence_comune(patient);
        let mut area = register::CaseArea::of(comune.as_deref(), None);
        // counted where it was treated: the facility's ASL and region replace the residence's
        if let Some((_, code, _)) = &f.facility.asl {
            area.asl = Some(code.clone());
            area.region = code.get(..3).map(String::from);
        }
        let code = &f.species.reason_code.code;
        let facts = register::CaseFacts {
            case_id,
            family: "cre",
            category: "cre",
            disease: code,
            code,
            day,
            birth_date: patient["birthDate"].as_str(),
            sex: register::sex_of(patient),
            area,
            refs: vec![format!("Communication/{case_id}")],
        };
        reader.tx.register_case(&facts.row()).await
    }

    /// Write the case Communication unless the current version already says the same.
    async fn write_case(
        &self,
        tx: &mut dyn StoreTx,
        case_id: &str,
        f: &Finding,
        status: &str,
    ) -> StoreResult<()> {
        // `sent` is when the case was first decided: `publish` keeps the stored one
        let body = notification::build(
            &self.definition,
            Terminology::get(),
            f,
            case_id,
            status,
            &format_instant(now_micros()),
        );
        publish::publish(&self.dispatcher, tx, "cre", case_id, body).await
    }

    async fn withdraw(&self, tx: &mut dyn StoreTx, case_id: &str) -> StoreResult<()> {
        publish::withdraw(&self.dispatcher, tx, "cre", case_id).await
    }
}

fn state_of(f: &Finding) -> IsolateState {
    IsolateState {
        isolate_id: f.isolate_id.clone(),
        key: f.key.clone(),
        ref_time: f.date.micros,
        qualifies: f.qualifies,
    }
}

/// The links between pieces of evidence, by element: lock keys are taken on every id they name.
/// Facilities are left out on purpose: every Bundle of a hospital names the same Organization, and
/// locking it would serialise them all; a facility change reaches isolates under their own locks.
const LINKS: &[(&str, &str)] = &[
    ("subject", "Patient"),
    ("specimen", "Specimen"),
    ("derivedFrom", "Observation"),
    ("hasMember", "Observation"),
    ("result", "Observation"),
    ("encounter", "Encounter"),
];

/// Ids of type `rt` named by a Reference or a list of them.
fn linked_ids(element: &Value, rt: &str) -> Vec<String> {
    match element {
        Value::Array(_) => targets(element, rt),
        other => target(other, rt).into_iter().collect(),
    }
}

/// Is this a case notification (profile `notifica-caso`)? Those are written by the rules only.
pub fn is_case_notification(resource: &Value) -> bool {
    let profile = format!(
        "{}/StructureDefinition/notifica-caso",
        crate::terminology::CANON
    );
    resource["resourceType"] == "Communication"
        && resource["meta"]["profile"].as_array().is_some_and(|p| {
            p.iter().any(|u| {
                u.as_str()
                    .is_some_and(|u| u.split('|').next() == Some(profile.as_str()))
            })
        })
}

/// The types whose writes can change a CRE decision.
fn watched(resource_type: &str) -> bool {
    matches!(
        resource_type,
        "Observation" | "Specimen" | "DiagnosticReport" | "Patient" | "Encounter" | "Organization"
    )
}

/// The CRE rules as a pre-commit hook: the store runs them on every write transaction.
#[async_trait]
impl PreCommit for Engine {
    fn watches(&self, resource_type: &str) -> bool {
        watched(resource_type)
    }

    async fn before_commit(
        &self,
        tx: &mut dyn StoreTx,
        touched: &[Touched],
        _notes: &mut Vec<Note>,
    ) -> StoreResult<bool> {
        let events_before = self.dispatcher.enqueued();
        self.apply(tx, touched).await?;
        Ok(self.dispatcher.enqueued() != events_before)
    }

    fn after_commit(&self) {
        self.dispatcher.wake();
    }
}
