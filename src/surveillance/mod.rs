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

use crate::fhir::datetime::{format_instant, now_micros};
use crate::store::{
    CaseKey, CaseRow, IsolateState, NewVersion, SearchQuery, StoreError, StoreResult, StoreTx,
    StoredResource,
};
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
    pub fn new(eucast_version: Option<&str>) -> Result<Engine, String> {
        let t = Terminology::get();
        let definition = CaseDefinition::cre()?;
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
        // Writers that touch one patient's evidence run one after the other (PostgreSQL; SQLite has
        // one writer anyway), so two halves of a case arriving at once cannot both miss the other.
        let mut locks = BTreeSet::new();
        for w in touched {
            match w
                .body
                .as_ref()
                .and_then(|b| target(&b["subject"], "Patient"))
            {
                Some(p) => locks.insert(format!("cre:Patient/{p}")),
                None if w.resource_type == "Patient" => {
                    locks.insert(format!("cre:Patient/{}", w.id))
                }
                None => locks.insert(format!("cre:{}/{}", w.resource_type, w.id)),
            };
        }
        for l in &locks {
            tx.lock(l).await?;
        }

        let mut reader = Reader::new(tx);
        for w in touched {
            reader.seed(&w.resource_type, &w.id, w.body.clone(), w.created);
        }
        // What this transaction itself links: evidence listed by (or derived from) an isolate it
        // wrote, specimens and results it names. Those need no reverse lookups.
        let mut linked: BTreeSet<String> = BTreeSet::new();
        let mut isolates_here: BTreeSet<&str> = BTreeSet::new();
        for w in touched {
            if let (true, Some(b)) = (w.resource_type == "Observation", &w.body)
                && is_isolate_code(def, t, b)
            {
                isolates_here.insert(&w.id);
                linked.extend(
                    targets(&b["hasMember"], "Observation")
                        .into_iter()
                        .map(|id| format!("Observation/{id}")),
                );
                if let Some(s) = target(&b["specimen"], "Specimen") {
                    linked.insert(format!("Specimen/{s}"));
                }
            }
        }
        for w in touched {
            if let (true, Some(b)) = (w.resource_type == "DiagnosticReport", &w.body) {
                linked.extend(
                    targets(&b["result"], "Observation")
                        .into_iter()
                        .map(|id| format!("Observation/{id}")),
                );
            }
        }

        let mut candidates = BTreeSet::new();
        for w in touched {
            let reference = format!("{}/{}", w.resource_type, w.id);
            match (w.resource_type.as_str(), &w.body) {
                ("Observation", Some(b)) => {
                    if !is_relevant_observation(def, t, b) {
                        continue;
                    }
                    if isolates_here.contains(w.id.as_str()) {
                        candidates.insert(w.id.clone());
                        continue;
                    }
                    let derived = targets(&b["derivedFrom"], "Observation");
                    let known = linked.contains(&reference)
                        || derived.iter().any(|d| isolates_here.contains(d.as_str()));
                    candidates.extend(derived);
                    if known {
                        continue;
                    }
                    // a piece arriving on its own: find the isolates it belongs to
                    candidates.extend(
                        reader
                            .referencing("Observation", "has-member", &reference)
                            .await?,
                    );
                    if let Some(s) = target(&b["specimen"], "Specimen") {
                        candidates.extend(
                            reader
                                .referencing("Observation", "specimen", &format!("Specimen/{s}"))
                                .await?,
                        );
                    }
                    for r in reader
                        .referencing("DiagnosticReport", "result", &reference)
                        .await?
                    {
                        if let Some(report) = reader.read("DiagnosticReport", &r).await? {
                            candidates.extend(targets(&report["result"], "Observation"));
                        }
                    }
                }
                ("Observation", None) => {
                    // deleted: the isolate itself, or the isolates that listed it
                    candidates.insert(w.id.clone());
                    candidates.extend(
                        reader
                            .referencing("Observation", "has-member", &reference)
                            .await?,
                    );
                }
                ("Specimen", _) => {
                    if linked.contains(&reference) {
                        continue;
                    }
                    candidates.extend(
                        reader
                            .referencing("Observation", "specimen", &reference)
                            .await?,
                    );
                    for r in reader
                        .referencing("DiagnosticReport", "specimen", &reference)
                        .await?
                    {
                        if let Some(report) = reader.read("DiagnosticReport", &r).await? {
                            candidates.extend(targets(&report["result"], "Observation"));
                        }
                    }
                }
                ("DiagnosticReport", Some(b)) => {
                    candidates.extend(targets(&b["result"], "Observation"));
                }
                ("Patient", _) => {
                    candidates.extend(
                        reader
                            .referencing("Observation", "subject", &reference)
                            .await?,
                    );
                }
                // the treating facility and its ASL decide the recipients: a case follows them
                ("Encounter", _) => {
                    self.isolates_of_encounter(&mut reader, &reference, &mut candidates)
                        .await?;
                }
                ("Organization", _) => {
                    let mut orgs = vec![reference.clone()];
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
                            self.isolates_of_encounter(
                                &mut reader,
                                &format!("Encounter/{e}"),
                                &mut candidates,
                            )
                            .await?;
                        }
                        for r in reader
                            .referencing("DiagnosticReport", "performer", org)
                            .await?
                        {
                            if let Some(report) = reader.read("DiagnosticReport", &r).await? {
                                candidates.extend(targets(&report["result"], "Observation"));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if candidates.is_empty() {
            return Ok(());
        }

        let evaluator = self.evaluator();
        let mut findings: HashMap<String, Finding> = HashMap::new();
        let mut keys = BTreeSet::new();
        for id in candidates {
            // cheap filter first: most candidates are the isolate's own results
            let previous = reader.tx.cre_isolate(&id).await?;
            if previous.is_none()
                && let Some(obs) = reader.read("Observation", &id).await?
                && !is_isolate_code(def, t, &obs)
            {
                continue;
            }
            match evaluator.evaluate(&mut reader, &id).await? {
                Evaluation::Decided(f) => {
                    if f.qualifies || previous.is_some() {
                        reader
                            .tx
                            .cre_put_isolate(&IsolateState {
                                isolate_id: id.clone(),
                                key: f.key.clone(),
                                ref_time: f.date.micros,
                                qualifies: f.qualifies,
                            })
                            .await?;
                        keys.insert(f.key.clone());
                    }
                    if let Some(p) = previous
                        && p.key != f.key
                    {
                        keys.insert(p.key);
                    }
                    findings.insert(id, *f);
                }
                Evaluation::NotApplicable | Evaluation::Pending => {
                    if let Some(mut p) = previous {
                        if p.qualifies {
                            p.qualifies = false;
                            reader.tx.cre_put_isolate(&p).await?;
                        }
                        keys.insert(p.key);
                    }
                }
            }
        }
        for key in keys {
            reader
                .tx
                .lock(&format!(
                    "cre-key:{}|{}|{}",
                    key.identity, key.species, key.year
                ))
                .await?;
            self.resolve(&mut reader, &key, &mut findings).await?;
        }
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
                .referencing("Observation", "encounter", encounter)
                .await?,
        );
        for r in reader
            .referencing("DiagnosticReport", "encounter", encounter)
            .await?
        {
            if let Some(report) = reader.read("DiagnosticReport", &r).await? {
                candidates.extend(targets(&report["result"], "Observation"));
            }
        }
        Ok(())
    }

    /// Make the case of one key agree with its evidence: create it, move it to another isolate,
    /// refresh its evidence, or withdraw it.
    async fn resolve(
        &self,
        reader: &mut Reader<'_>,
        key: &CaseKey,
        findings: &mut HashMap<String, Finding>,
    ) -> StoreResult<()> {
        let active = reader.tx.cre_active_case(key).await?;
        let qualifying = reader.tx.cre_qualifying(key).await?;
        match active {
            Some(case) if qualifying.contains(&case.isolate_id) => {
                let f = self.finding(reader, &case.isolate_id, findings).await?;
                self.write_case(reader.tx, &case.case_id, &f, "completed")
                    .await
            }
            Some(case) => match qualifying.first() {
                Some(next) => {
                    reader.tx.cre_set_case(&case.case_id, next, true).await?;
                    let f = self.finding(reader, next, findings).await?;
                    self.write_case(reader.tx, &case.case_id, &f, "completed")
                        .await
                }
                None => {
                    reader
                        .tx
                        .cre_set_case(&case.case_id, &case.isolate_id, false)
                        .await?;
                    self.withdraw(reader.tx, &case.case_id).await
                }
            },
            None => {
                let Some(first) = qualifying.first() else {
                    return Ok(());
                };
                let case = CaseRow {
                    case_id: uuid::Uuid::new_v4().to_string(),
                    key: key.clone(),
                    isolate_id: first.clone(),
                    active: true,
                };
                // the unique index decides between racing transactions: the loser adds nothing
                if reader.tx.cre_claim_case(&case, now_micros()).await? {
                    let f = self.finding(reader, first, findings).await?;
                    self.write_case(reader.tx, &case.case_id, &f, "completed")
                        .await?;
                }
                Ok(())
            }
        }
    }

    async fn finding(
        &self,
        reader: &mut Reader<'_>,
        isolate_id: &str,
        findings: &mut HashMap<String, Finding>,
    ) -> StoreResult<Finding> {
        if let Some(f) = findings.get(isolate_id) {
            return Ok(f.clone());
        }
        match self.evaluator().evaluate(reader, isolate_id).await? {
            Evaluation::Decided(f) => {
                findings.insert(isolate_id.to_string(), (*f).clone());
                Ok(*f)
            }
            _ => Err(StoreError::Rule(format!(
                "isolate Observation/{isolate_id} is recorded as meeting the CRE definition but cannot be evaluated"
            ))),
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
        tx.write(&v).await
    }
}

/// A resource a transaction wrote (body `None`: deleted).
#[derive(Debug, Clone)]
pub struct Touched {
    pub resource_type: String,
    pub id: String,
    pub body: Option<Arc<Value>>,
    /// Created with a server-assigned id: nothing written before this transaction can refer to it.
    pub created: bool,
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
}

impl SurveillanceTx {
    pub fn wrap(inner: Box<dyn StoreTx>, engine: Arc<Engine>) -> Box<dyn StoreTx> {
        Box::new(SurveillanceTx {
            inner,
            engine,
            touched: Vec::new(),
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
    async fn search_ids(&mut self, q: &SearchQuery) -> StoreResult<Vec<String>> {
        self.inner.search_ids(q).await
    }
    async fn write(&mut self, v: &NewVersion) -> StoreResult<()> {
        self.inner.write(v).await?;
        if watched(&v.resource_type) {
            self.touched.push(Touched {
                resource_type: v.resource_type.clone(),
                id: v.id.clone(),
                body: v.resource.clone(),
                created: v.method == "POST",
            });
        }
        Ok(())
    }
    async fn commit(mut self: Box<Self>) -> StoreResult<()> {
        let touched = std::mem::take(&mut self.touched);
        if !touched.is_empty() {
            // the request's own writes go out first, so the rules' timer measures the rules alone
            self.inner.flush().await?;
            self.engine.apply(&mut *self.inner, &touched).await?;
        }
        self.inner.commit().await
    }
    async fn cre_isolate(&mut self, isolate_id: &str) -> StoreResult<Option<IsolateState>> {
        self.inner.cre_isolate(isolate_id).await
    }
    async fn cre_put_isolate(&mut self, s: &IsolateState) -> StoreResult<()> {
        self.inner.cre_put_isolate(s).await
    }
    async fn cre_qualifying(&mut self, key: &CaseKey) -> StoreResult<Vec<String>> {
        self.inner.cre_qualifying(key).await
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
}
