//! Surveillance rules: after every write and before its commit, the CRE case definition is applied
//! to what the write touched, and case notifications are created, updated or withdrawn in the same
//! database transaction, so a 2xx means the case exists (or does not) durably.
pub mod calendar;
pub mod definition;
pub mod evaluate;
mod links;
pub mod local_codes;
pub mod notification;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde_json::Value;

use crate::auth::Principal;
use crate::fhir::datetime::{format_instant, now_micros};
use crate::store::{
    CaseKey, CaseRow, DeliveryState, EventRow, IsolateState, NewVersion, SearchQuery, StoreError,
    StoreResult, StoreTx, StoredResource, SubscriptionRow,
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
            "Patient" => evaluate::identity(&w.id, new).0 != evaluate::identity(&w.id, old).0,
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
                self.write_case(reader.tx, &case.case_id, &f, "completed")
                    .await
            }
            (Some(case), None) => {
                reader
                    .tx
                    .cre_set_case(&case.case_id, &case.isolate_id, false)
                    .await?;
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
                    self.write_case(reader.tx, &case.case_id, &f, "completed")
                        .await?;
                }
                Ok(())
            }
            (None, None) => Ok(()),
        }
    }

    /// Write the case Communication unless the current version already says the same.
    async fn write_case(
        &self,
        tx: &mut dyn StoreTx,
        case_id: &str,
        f: &Finding,
        status: &str,
    ) -> StoreResult<()> {
        let current = tx.current("Communication", case_id).await?;
        let live = current.as_ref().filter(|c| !c.deleted);
        let old: Option<Value> = live
            .and_then(|c| c.body.as_deref())
            .and_then(|b| serde_json::from_str(b).ok());
        // `sent` is when the case was decided: a refresh keeps it
        let sent = old
            .as_ref()
            .and_then(|o| o["sent"].as_str().map(String::from))
            .unwrap_or_else(|| format_instant(now_micros()));
        let body = notification::build(
            &self.definition,
            Terminology::get(),
            f,
            case_id,
            status,
            &sent,
        );
        if let Some(mut o) = old {
            if let Some(obj) = o.as_object_mut() {
                obj.shift_remove("meta");
            }
            let mut b = body.clone();
            if let Some(obj) = b.as_object_mut() {
                obj.shift_remove("meta");
            }
            if o == b {
                return Ok(());
            }
        }
        self.store_case(tx, body, current.as_ref()).await
    }

    async fn withdraw(&self, tx: &mut dyn StoreTx, case_id: &str) -> StoreResult<()> {
        let Some(current) = tx.current("Communication", case_id).await? else {
            return Ok(());
        };
        let Some(mut body) = current
            .body
            .as_deref()
            .and_then(|b| serde_json::from_str::<Value>(b).ok())
        else {
            return Ok(());
        };
        body["status"] = Value::String("entered-in-error".into());
        self.store_case(tx, body, Some(&current)).await
    }

    async fn store_case(
        &self,
        tx: &mut dyn StoreTx,
        body: Value,
        current: Option<&StoredResource>,
    ) -> StoreResult<()> {
        crate::fhir::profile::check_notifica_caso(&body).map_err(StoreError::Rule)?;
        let id = body["id"].as_str().unwrap_or_default().to_string();
        let (version, method) = match current {
            Some(c) => (c.version_id + 1, "PUT"),
            None => (1, "POST"),
        };
        let v = NewVersion::stamped(body, "Communication", &id, version, method);
        tx.write(&v).await?;
        let previous = current
            .filter(|c| !c.deleted)
            .and_then(|c| crate::subscriptions::parse_body(c.body.as_deref()));
        self.dispatcher
            .on_write(
                tx,
                "Communication",
                &id,
                version,
                previous.as_ref(),
                v.resource.as_deref(),
            )
            .await
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

/// A resource a transaction wrote (body `None`: deleted).
#[derive(Debug, Clone)]
pub struct Touched {
    pub resource_type: String,
    pub id: String,
    pub body: Option<Arc<Value>>,
    /// The version this write replaced, if any: its links count too (a correction can drop them).
    pub previous: Option<Arc<Value>>,
    /// Created with a server-assigned id: nothing written before this transaction can refer to it.
    pub created: bool,
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

/// A write transaction that applies the surveillance rules to what it wrote just before it commits.
/// Every write path of the API goes through one of these, so no path can skip the rules.
pub struct SurveillanceTx {
    inner: Box<dyn StoreTx>,
    engine: Arc<Engine>,
    touched: Vec<Touched>,
    /// Who is writing: what they may write, and the owner of the Subscriptions they create.
    caller: Arc<Principal>,
    /// A Subscription was written: its handshake (or end) is due once this commits.
    subscription_written: bool,
}

impl SurveillanceTx {
    pub fn wrap(
        inner: Box<dyn StoreTx>,
        engine: Arc<Engine>,
        caller: Arc<Principal>,
    ) -> Box<dyn StoreTx> {
        Box::new(SurveillanceTx {
            inner,
            engine,
            touched: Vec::new(),
            caller,
            subscription_written: false,
        })
    }
}

#[async_trait]
impl StoreTx for SurveillanceTx {
    async fn current(
        &mut self,
        resource_type: &str,
        id: &str,
    ) -> StoreResult<Option<StoredResource>> {
        self.inner.current(resource_type, id).await
    }
    async fn lock(&mut self, key: &str) -> StoreResult<()> {
        self.inner.lock(key).await
    }
    async fn flush(&mut self) -> StoreResult<()> {
        self.inner.flush().await
    }
    async fn lock_all(&mut self, keys: &[String]) -> StoreResult<()> {
        self.inner.lock_all(keys).await
    }
    async fn search_ids(&mut self, q: &SearchQuery) -> StoreResult<Vec<String>> {
        self.inner.search_ids(q).await
    }
    async fn write(&mut self, v: &NewVersion) -> StoreResult<()> {
        let previous = if watched(&v.resource_type) && v.version_id > 1 {
            self.inner
                .current(&v.resource_type, &v.id)
                .await?
                .and_then(|c| c.body)
                .and_then(|b| serde_json::from_str(&b).ok())
                .map(Arc::new)
        } else {
            None
        };
        self.inner.write(v).await?;
        if v.resource_type == "Subscription" {
            crate::subscriptions::on_subscription_written(&mut *self.inner, v).await?;
            self.subscription_written = true;
        }
        if watched(&v.resource_type) {
            self.touched.push(Touched {
                resource_type: v.resource_type.clone(),
                id: v.id.clone(),
                body: v.resource.clone(),
                previous,
                created: v.method == "POST",
            });
        }
        Ok(())
    }
    async fn commit(mut self: Box<Self>) -> StoreResult<()> {
        let touched = std::mem::take(&mut self.touched);
        let events_before = self.engine.dispatcher.enqueued();
        if !touched.is_empty() {
            // the request's own writes go out first, so the rules' timer measures the rules alone
            self.inner.flush().await?;
            self.engine.apply(&mut *self.inner, &touched).await?;
        }
        self.inner.commit().await?;
        if self.subscription_written || self.engine.dispatcher.enqueued() != events_before {
            self.engine.dispatcher.wake();
        }
        Ok(())
    }
    async fn admit_read(&mut self, stored: &StoredResource) -> Result<(), crate::error::ApiError> {
        let body = crate::subscriptions::parse_body(stored.body.as_deref());
        match body {
            Some(b) if !self.caller.sees(&b) => Err(crate::error::ApiError::NotFound(format!(
                "{}/{} is not known",
                stored.resource_type, stored.id
            ))),
            _ => Ok(()),
        }
    }
    async fn admit(
        &mut self,
        resource_type: &str,
        resource: Option<&mut Value>,
        current: Option<&StoredResource>,
    ) -> Result<(), crate::error::ApiError> {
        if !self.caller.may_write(resource_type) {
            return Err(crate::error::ApiError::Forbidden(format!(
                "client '{}' ({:?}) may not write {resource_type}",
                self.caller.id, self.caller.role
            )));
        }
        if resource_type == "Subscription" {
            match resource {
                Some(r) => crate::subscriptions::spec::admit(
                    &self.caller,
                    r,
                    current,
                    self.engine.dispatcher.has_broker,
                )?,
                None => {
                    let owner = current
                        .and_then(|c| crate::subscriptions::parse_body(c.body.as_deref()))
                        .map(|b| crate::subscriptions::spec::owner_of(&b))
                        .unwrap_or_default();
                    if !self.caller.development
                        && self.caller.role != crate::auth::Role::Admin
                        && owner != self.caller.id
                    {
                        return Err(crate::error::ApiError::NotFound(
                            "this Subscription is not one of yours".into(),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
    async fn cre_isolate(&mut self, isolate_id: &str) -> StoreResult<Option<IsolateState>> {
        self.inner.cre_isolate(isolate_id).await
    }
    async fn cre_put_isolate(&mut self, s: &IsolateState) -> StoreResult<()> {
        self.inner.cre_put_isolate(s).await
    }
    async fn cre_isolates_of_key(&mut self, key: &CaseKey) -> StoreResult<Vec<String>> {
        self.inner.cre_isolates_of_key(key).await
    }
    async fn cre_active_case(&mut self, key: &CaseKey) -> StoreResult<Option<CaseRow>> {
        self.inner.cre_active_case(key).await
    }
    async fn cre_claim_case(&mut self, c: &CaseRow, created_at: i64) -> StoreResult<bool> {
        self.inner.cre_claim_case(c, created_at).await
    }
    async fn cre_set_case(
        &mut self,
        case_id: &str,
        isolate_id: &str,
        active: bool,
    ) -> StoreResult<()> {
        self.inner.cre_set_case(case_id, isolate_id, active).await
    }
    async fn sub_define(&mut self, row: &SubscriptionRow) -> StoreResult<()> {
        self.inner.sub_define(row).await
    }
    async fn sub_of_topic(&mut self, topic: &str) -> StoreResult<Vec<(SubscriptionRow, String)>> {
        self.inner.sub_of_topic(topic).await
    }
    async fn sub_append_event(
        &mut self,
        subscription_id: &str,
        focus: &str,
        at: i64,
    ) -> StoreResult<()> {
        self.inner
            .sub_append_event(subscription_id, focus, at)
            .await
    }
    async fn sub_row(&mut self, id: &str) -> StoreResult<Option<SubscriptionRow>> {
        self.inner.sub_row(id).await
    }
    async fn sub_claim(
        &mut self,
        owner: &str,
        now: i64,
        until: i64,
        limit: i64,
    ) -> StoreResult<Vec<String>> {
        self.inner.sub_claim(owner, now, until, limit).await
    }
    async fn sub_delivered(&mut self, id: &str, d: &DeliveryState) -> StoreResult<()> {
        self.inner.sub_delivered(id, d).await
    }
    async fn sub_progress(
        &mut self,
        id: &str,
        delivered: i64,
        last_sent_at: i64,
        lease_until: i64,
    ) -> StoreResult<()> {
        self.inner
            .sub_progress(id, delivered, last_sent_at, lease_until)
            .await
    }
    async fn sub_events(
        &mut self,
        id: &str,
        from: i64,
        to: i64,
        limit: i64,
    ) -> StoreResult<Vec<EventRow>> {
        self.inner.sub_events(id, from, to, limit).await
    }
    async fn sub_number_events(&mut self, id: &str) -> StoreResult<i64> {
        self.inner.sub_number_events(id).await
    }
    async fn sub_prune_events(&mut self, id: &str, before: i64) -> StoreResult<i64> {
        self.inner.sub_prune_events(id, before).await
    }
}
