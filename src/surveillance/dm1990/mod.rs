//! D.M. 15/12/1990: doctors' notifications (segnalazioni) become class I–V case notifications and
//! outbreak notifications, decided inside the writing transaction (a pre-commit hook) from the rule
//! data in `profiles/case-definition-dm-*.json`. What the rules remember between writes (reports,
//! cases with their episodes, outbreaks) is rule state: records under keys unique per rule set, so
//! racing transactions cannot make two cases of one patient, disease and episode.
pub mod notification;
pub mod outbreak;
pub mod report;
pub mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fhir::datetime::now_micros;
use crate::store::{Note, PreCommit, StoreError, StoreResult, StoreTx, Touched};
use crate::subscriptions::dispatch::Dispatcher;
use crate::surveillance::links::{Reader, targets};
use crate::terminology::CANON;
use report::{Report, is_segnalazione, outcome};
use rules::RuleSet;

/// The rule-state namespace of this rule set's family.
pub const STATE: &str = "dm-1990";

/// One case: a patient, a disease, an episode; the reports that make it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaseRecord {
    /// The notification's id and identifier value.
    pub case_id: String,
    pub group: String,
    pub episode: i64,
    pub first_onset_us: Option<i64>,
    /// Report ids, in the order they joined.
    pub members: Vec<String>,
    /// Some member stands (the case is notified or recorded, not withdrawn).
    #[serde(default)]
    pub active: bool,
    /// Opened by a relapse (TB): a second report of the same relapse joins it.
    #[serde(default)]
    pub relapse: bool,
}

pub struct Dm1990 {
    pub sets: Vec<RuleSet>,
    pub dispatcher: Arc<Dispatcher>,
}

/// Transactions the rules ran in and the time they took there (µs), process-wide: the cost they
/// add to ingest (benchmarks read it; logged when the server stops).
static RUNS: AtomicU64 = AtomicU64::new(0);
static MICROS: AtomicU64 = AtomicU64::new(0);

/// `(transactions, µs)` the D.M. 1990 rules have spent inside write transactions so far.
pub fn rule_time() -> (u64, u64) {
    (RUNS.load(Ordering::Relaxed), MICROS.load(Ordering::Relaxed))
}

impl Drop for Dm1990 {
    fn drop(&mut self) {
        let (runs, micros) = rule_time();
        if runs > 0 {
            tracing::info!(
                transactions = runs,
                total_ms = micros / 1000,
                mean_us = micros / runs,
                "D.M. 1990 rules: time spent inside write transactions"
            );
        }
    }
}

impl Dm1990 {
    pub fn new(dispatcher: Arc<Dispatcher>) -> Result<Dm1990, String> {
        let sets = RuleSet::load_all()?;
        if sets.is_empty() {
            return Err("no D.M. 1990 rule set in profiles/".into());
        }
        Ok(Dm1990 { sets, dispatcher })
    }

    /// The set that decided a report (by canonical), else the first.
    pub fn set_of(&self, canonical: Option<&str>) -> &RuleSet {
        canonical
            .and_then(|c| self.sets.iter().find(|s| s.canonical() == c))
            .unwrap_or(&self.sets[0])
    }

    fn outbreaks_for(&self, r: &Report) -> bool {
        let set = self.set_of(r.rule_set.as_deref());
        r.class
            .and_then(|k| set.classes.iter().find(|c| c.class == k))
            .is_some_and(|c| c.outbreaks)
    }

    async fn apply(
        &self,
        tx: &mut dyn StoreTx,
        touched: &[Touched],
        notes: &mut Vec<Note>,
    ) -> StoreResult<bool> {
        // 0. a segnalazione and the pieces it names may arrive in concurrent requests: both sides
        // lock every resource that links them, so the later one sees the earlier one committed
        // (PostgreSQL; SQLite has one writer). First in this rule set's lock order.
        let refs = ref_locks(touched);
        if refs.is_empty() {
            return Ok(false);
        }
        tx.lock_all(&refs).await?;

        // 1. the segnalazioni this write concerns: written now, or linked to what was written
        let mut ids = BTreeSet::new();
        let mut written_here = BTreeSet::new();
        for t in touched {
            let tag = |prefix: &str| format!("{prefix}{}/{}", t.resource_type, t.id);
            match t.resource_type.as_str() {
                "Communication" => {
                    let is = |b: &Option<Arc<Value>>| b.as_deref().is_some_and(is_segnalazione);
                    if is(&t.body) || is(&t.previous) {
                        ids.insert(t.id.clone());
                        written_here.insert(t.id.clone());
                    }
                }
                "Condition" | "Observation" => {
                    // created now with a fresh id: only this request's segnalazioni can name it
                    if !t.created {
                        for (key, _) in tx.state_tagged(STATE, &tag("ref:")).await? {
                            ids.extend(key.strip_prefix("report:").map(String::from));
                        }
                    }
                    for body in [&t.body, &t.previous].into_iter().flatten() {
                        for c in targets(&body["focus"], "Condition") {
                            for (key, _) in tx
                                .state_tagged(STATE, &format!("ref:Condition/{c}"))
                                .await?
                            {
                                ids.extend(key.strip_prefix("report:").map(String::from));
                            }
                        }
                    }
                }
                "Patient" if !t.created => {
                    for (key, _) in tx.state_tagged(STATE, &tag("patient:")).await? {
                        ids.extend(key.strip_prefix("report:").map(String::from));
                    }
                }
                _ => {}
            }
        }
        if ids.is_empty() {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        let locks: Vec<String> = ids.iter().map(|i| format!("dm:report:{i}")).collect();
        tx.lock_all(&locks).await?;

        // 2. read and decide each report
        let now = now_micros();
        let mut reader = Reader::new(tx);
        for t in touched {
            reader.seed(&t.resource_type, &t.id, t.body.clone(), t.created);
        }
        let mut pairs: Vec<(Option<Report>, Report)> = Vec::new();
        for id in &ids {
            let old: Option<Report> =
                match reader.tx.state_get(STATE, &format!("report:{id}")).await? {
                    Some(v) => serde_json::from_value(v).ok(),
                    None => None,
                };
            let new = report::read_report(&mut reader, &self.sets, id, old.as_ref(), now).await?;
            pairs.push((old, new));
        }

        // 3. cases: every identity × disease touched, locked together, then assigned
        let mut groups = BTreeSet::new();
        for (old, new) in &pairs {
            groups.extend(new.case_group().filter(|_| new.counts()));
            if let Some(k) = old.as_ref().and_then(|o| o.case_key.as_ref()) {
                groups.insert(group_of_key(k));
            }
        }
        let locks: Vec<String> = groups.iter().map(|g| format!("dm:case:{g}")).collect();
        reader.tx.lock_all(&locks).await?;
        let mut refresh: BTreeSet<String> = BTreeSet::new();
        let mut outbreak_groups = BTreeSet::new();
        for (old, new) in pairs.iter_mut() {
            self.assign_case(reader.tx, old.as_ref(), new, &mut refresh)
                .await?;
            for r in old.iter().chain(std::iter::once(&*new)) {
                if self.outbreaks_for(r) {
                    outbreak_groups.extend(r.outbreak_group());
                }
            }
            let tags = new.tags(self.outbreaks_for(new));
            let value = serde_json::to_value(&*new).map_err(|e| StoreError::Rule(e.to_string()))?;
            reader
                .tx
                .state_put(STATE, &format!("report:{}", new.id), &value, &tags)
                .await?;
        }
        let events_before = self.dispatcher.enqueued();
        let mut warnings: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for key in &refresh {
            let w = notification::refresh_case(self, &mut reader, key, now).await?;
            for (report, text) in w {
                warnings.entry(report).or_default().push(text);
            }
        }

        // 4. outbreaks of the communities touched
        let locks: Vec<String> = outbreak_groups
            .iter()
            .map(|g| format!("dm:outbreak:{g}"))
            .collect();
        reader.tx.lock_all(&locks).await?;
        for g in &outbreak_groups {
            outbreak::refresh(self, &mut reader, g, now).await?;
        }

        // 5. the receipt of each segnalazione written by this request
        for (_, r) in &pairs {
            if !written_here.contains(&r.id) {
                continue;
            }
            notes.push(notification::receipt(self, r));
            for w in warnings.get(&r.id).into_iter().flatten() {
                notes.push(Note {
                    resource_type: "Communication".into(),
                    id: r.id.clone(),
                    severity: "warning",
                    system: format!("{CANON}/CodeSystem/esito-segnalazione"),
                    code: r.outcome.clone(),
                    text: w.clone(),
                });
            }
        }
        RUNS.fetch_add(1, Ordering::Relaxed);
        MICROS.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(self.dispatcher.enqueued() != events_before)
    }

    /// Put a report in its case (joining an episode or opening one) or take it out.
    async fn assign_case(
        &self,
        tx: &mut dyn StoreTx,
        old: Option<&Report>,
        new: &mut Report,
        refresh: &mut BTreeSet<String>,
    ) -> StoreResult<()> {
        let wanted = new.case_group().filter(|_| new.counts());
        if let Some(k) = &new.case_key {
            refresh.insert(k.clone());
            if wanted.as_deref() == Some(group_of_key(k).as_str()) {
                return Ok(());
            }
            // it moved (another disease or patient): out of its old case
            if let Some(mut case) = read_case(tx, k).await? {
                case.members.retain(|m| m != &new.id);
                put_case(tx, k, &case).await?;
            }
            new.case_key = None;
        }
        let _ = old;
        let Some(group) = wanted else {
            return Ok(());
        };
        let set = self.set_of(new.rule_set.as_deref());
        let classified = new.code.as_deref().and_then(|c| set.classify(c));
        let days = classified.and_then(|c| c.disease.episode_days(c.class));
        let treatment = classified.and_then(|c| c.disease.previous_treatment.as_ref());
        let mut cases: Vec<(String, CaseRecord)> = Vec::new();
        for (key, v) in tx.state_tagged(STATE, &format!("group:{group}")).await? {
            if let Ok(c) = serde_json::from_value::<CaseRecord>(v) {
                cases.push((key, c));
            }
        }
        cases.sort_by_key(|(_, c)| c.episode);
        let declared = new.previous_treatment.as_deref().unwrap_or_default();
        let newest_episode = cases.last().map_or(0, |(_, c)| c.episode);
        // withdrawn cases are history: they neither hold a report back nor take it in
        cases.retain(|(_, c)| c.active);
        if let Some(t) = treatment
            && t.not_notified_again.iter().any(|d| d == declared)
            && !cases.is_empty()
        {
            new.outcome = outcome::ALREADY_NOTIFIED.into();
            return Ok(());
        }
        let relapse = treatment.is_some_and(|t| t.new_episode.iter().any(|d| d == declared));
        let within = |c: &CaseRecord| -> bool {
            match (days, c.first_onset_us, new.onset_us) {
                (None, _, _) => true,
                (Some(d), Some(first), Some(onset)) => (onset - first).abs() <= d * 86_400_000_000,
                _ => true,
            }
        };
        // the newest standing episode the report falls in (a relapse: the newest relapse episode)
        let joined = cases
            .iter()
            .rev()
            .find(|(_, c)| if relapse { c.relapse } else { within(c) })
            .cloned();
        let (key, mut case) = match joined {
            Some(found) => found,
            None => {
                let episode = newest_episode + 1;
                let key = format!("case:{group}|{episode}");
                let case = CaseRecord {
                    case_id: uuid::Uuid::new_v4().to_string(),
                    group: group.clone(),
                    episode,
                    first_onset_us: new.onset_us,
                    members: vec![],
                    active: true,
                    relapse,
                };
                let value =
                    serde_json::to_value(&case).map_err(|e| StoreError::Rule(e.to_string()))?;
                // the primary key decides a race the lock did not prevent (another process)
                if !tx
                    .state_claim(STATE, &key, &value, &[format!("group:{group}")])
                    .await?
                {
                    return Err(StoreError::VersionConflict {
                        resource_type: "Communication".into(),
                        id: key,
                    });
                }
                (key, case)
            }
        };
        if !case.members.contains(&new.id) {
            case.members.push(new.id.clone());
        }
        if let (Some(o), Some(f)) = (new.onset_us, case.first_onset_us) {
            case.first_onset_us = Some(o.min(f));
        }
        put_case(tx, &key, &case).await?;
        new.case_key = Some(key.clone());
        refresh.insert(key);
        Ok(())
    }
}

/// The link locks of a write: each resource that can join a segnalazione to its pieces (the
/// Conditions, Observations and Patients written, the Conditions they focus on, and everything a
/// written segnalazione names). Resources created with fresh ids cannot be named yet: no lock.
fn ref_locks(touched: &[Touched]) -> Vec<String> {
    let mut out = BTreeSet::new();
    for t in touched {
        match t.resource_type.as_str() {
            "Communication" => {
                for body in [&t.body, &t.previous].into_iter().flatten() {
                    if !is_segnalazione(body) {
                        continue;
                    }
                    out.insert(format!("dm:ref:Communication/{}", t.id));
                    for l in report::named_links(body) {
                        out.insert(format!("dm:ref:{l}"));
                    }
                }
            }
            "Condition" | "Observation" | "Patient" => {
                if !t.created {
                    out.insert(format!("dm:ref:{}/{}", t.resource_type, t.id));
                }
                for body in [&t.body, &t.previous].into_iter().flatten() {
                    for c in targets(&body["focus"], "Condition") {
                        out.insert(format!("dm:ref:Condition/{c}"));
                    }
                }
            }
            _ => {}
        }
    }
    out.into_iter().collect()
}

/// `case:<identity>|<disease>|<episode>` → `<identity>|<disease>`
pub fn group_of_key(key: &str) -> String {
    let k = key.strip_prefix("case:").unwrap_or(key);
    k.rsplit_once('|').map_or(k, |(g, _)| g).to_string()
}

/// A rule-state record; one that no longer reads is an error, not an absence (treating it as
/// absent would open a second case).
fn parse<T: serde::de::DeserializeOwned>(key: &str, v: Value) -> StoreResult<T> {
    serde_json::from_value(v)
        .map_err(|e| StoreError::Rule(format!("rule state {STATE}/{key} does not read: {e}")))
}

pub async fn read_case(tx: &mut dyn StoreTx, key: &str) -> StoreResult<Option<CaseRecord>> {
    tx.state_get(STATE, key)
        .await?
        .map(|v| parse(key, v))
        .transpose()
}

pub async fn put_case(tx: &mut dyn StoreTx, key: &str, case: &CaseRecord) -> StoreResult<()> {
    let value = serde_json::to_value(case).map_err(|e| StoreError::Rule(e.to_string()))?;
    tx.state_put(STATE, key, &value, &[format!("group:{}", case.group)])
        .await
}

pub async fn read_report(tx: &mut dyn StoreTx, id: &str) -> StoreResult<Option<Report>> {
    let key = format!("report:{id}");
    tx.state_get(STATE, &key)
        .await?
        .map(|v| parse(&key, v))
        .transpose()
}

#[async_trait]
impl PreCommit for Dm1990 {
    fn watches(&self, resource_type: &str) -> bool {
        matches!(
            resource_type,
            "Communication" | "Condition" | "Observation" | "Patient"
        )
    }

    async fn before_commit(
        &self,
        tx: &mut dyn StoreTx,
        touched: &[Touched],
        notes: &mut Vec<Note>,
    ) -> StoreResult<bool> {
        self.apply(tx, touched, notes).await
    }

    fn after_commit(&self) {
        self.dispatcher.wake();
    }
}
