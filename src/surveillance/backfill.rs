//! Filling the case register with the cases decided before it existed (a database upgraded to the
//! periodic summaries): once per database, in batches, from what the rules remember (D.M. 1990
//! cases and their reports) and from the CRE case notifications, under the locks the rules take
//! for those cases, so that a rule deciding a case meanwhile is never overwritten with older facts.
//! Progress is a rule-state record: a restart or a second process goes on where it stopped.
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::dm1990::{self, Dm1990, read_case, read_report};
use super::register::{CaseArea, CaseFacts, rome_day_of_micros, sex_of};
use crate::fhir::datetime::now_micros;
use crate::italy::places::residence_comune;
use crate::store::{CaseRow, SharedStore, StoreError, StoreResult, StoreTx};
use crate::terminology::{CANON, ICD9CM};

const STATE: &str = "case-register";
const MARK: &str = "backfill";
const BATCH: i64 = 200;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Mark {
    dm_after: String,
    cre_after: String,
    done: bool,
}

/// Register every case the rules decided before the register existed; how many were written.
pub async fn backfill(store: &SharedStore, dm: &Dm1990) -> StoreResult<u64> {
    let mut written = 0;
    loop {
        let mut tx = store.begin().await?;
        tx.lock(&format!("{STATE}:{MARK}")).await?;
        let mut mark: Mark = match tx.state_get(STATE, MARK).await? {
            Some(v) => serde_json::from_value(v).unwrap_or_default(),
            None => Mark::default(),
        };
        if mark.done {
            return Ok(written);
        }
        let keys = tx
            .state_keys_after(dm1990::STATE, "case:", &mark.dm_after, BATCH)
            .await?;
        if let Some(last) = keys.last() {
            mark.dm_after = last.clone();
            written += dm_batch(tx.as_mut(), dm, &keys).await?;
        } else {
            let cases = tx.cre_active_cases_after(&mark.cre_after, BATCH).await?;
            match cases.last() {
                Some(last) => {
                    mark.cre_after = last.case_id.clone();
                    written += cre_batch(tx.as_mut(), &cases).await?;
                }
                None => mark.done = true,
            }
        }
        let value = serde_json::to_value(&mark).map_err(|e| StoreError::Rule(e.to_string()))?;
        tx.state_put(STATE, MARK, &value, &[]).await?;
        tx.commit().await?;
    }
}

async fn dm_batch(tx: &mut dyn StoreTx, dm: &Dm1990, keys: &[String]) -> StoreResult<u64> {
    // the lock the rules take on a case's identity and disease
    let locks: Vec<String> = keys
        .iter()
        .map(|k| format!("dm:case:{}", dm1990::group_of_key(k)))
        .collect();
    tx.lock_all(&locks).await?;
    let mut written = 0;
    for key in keys {
        let Some(case) = read_case(tx, key).await? else {
            continue;
        };
        let mut reports = Vec::new();
        for m in &case.members {
            if let Some(r) = read_report(tx, m).await? {
                reports.push(r);
            }
        }
        let active: Vec<_> = reports.iter().filter(|r| r.counts()).collect();
        let Some(first) = active.first() else {
            continue;
        };
        let set = dm.set_of(first.rule_set.as_deref());
        let Some(c) = first.code.as_deref().and_then(|code| set.classify(code)) else {
            continue;
        };
        dm1990::notification::register(tx, &case, c.class, c.disease, &active).await?;
        written += 1;
    }
    Ok(written)
}

/// A CRE case's facts, read from its notification (what the rules wrote when they decided it).
async fn cre_batch(tx: &mut dyn StoreTx, cases: &[CaseRow]) -> StoreResult<u64> {
    let locks: Vec<String> = cases
        .iter()
        .map(|c| {
            format!(
                "cre-key:{}|{}|{}",
                c.key.identity, c.key.species, c.key.year
            )
        })
        .collect();
    tx.lock_all(&locks).await?;
    let mut written = 0;
    for case in cases {
        let Some(n) = read(tx, "Communication", &case.case_id).await? else {
            continue;
        };
        if n["status"] != "completed" {
            continue;
        }
        let date = n["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["url"] == format!("{CANON}/StructureDefinition/data-riferimento"))
            .and_then(|e| e["extension"].as_array())
            .into_iter()
            .flatten()
            .find(|e| e["url"] == "data")
            .and_then(|e| e["valueDateTime"].as_str().or(e["valueDate"].as_str()))
            .and_then(super::calendar::italian_instant)
            .and_then(rome_day_of_micros);
        let species = n["reasonCode"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["coding"].as_array().into_iter().flatten())
            .find(|c| {
                c["system"] == ICD9CM && matches!(c["code"].as_str(), Some("041.3" | "041.4"))
            })
            .and_then(|c| c["code"].as_str());
        let (Some(day), Some(species)) = (date, species) else {
            continue;
        };
        let asl = n["recipient"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["identifier"]["system"] == format!("{CANON}/sid/asl"))
            .and_then(|r| r["identifier"]["value"].as_str());
        let patient = match n["subject"]["reference"]
            .as_str()
            .and_then(|r| r.strip_prefix("Patient/"))
        {
            Some(pid) => read(tx, "Patient", pid).await?.unwrap_or(Value::Null),
            None => Value::Null,
        };
        let mut area = CaseArea::of(residence_comune(&patient).as_deref(), None);
        if let Some(a) = asl {
            area.asl = Some(a.to_string());
            area.region = a.get(..3).map(String::from);
        }
        let facts = CaseFacts {
            case_id: &case.case_id,
            family: "cre",
            category: "cre",
            disease: species,
            code: species,
            day,
            birth_date: patient["birthDate"].as_str(),
            sex: sex_of(&patient),
            area,
            refs: vec![format!("Communication/{}", case.case_id)],
        };
        tx.register_case(&facts.row()).await?;
        written += 1;
    }
    Ok(written)
}

async fn read(tx: &mut dyn StoreTx, rt: &str, id: &str) -> StoreResult<Option<Value>> {
    Ok(tx
        .current(rt, id)
        .await?
        .filter(|c| !c.deleted)
        .and_then(|c| c.body)
        .and_then(|b| serde_json::from_str(&b).ok()))
}

/// Run the backfill in the background, logging what it did (a failure is retried at the next
/// start: the progress mark is committed with each batch).
pub fn spawn(store: SharedStore, dm: std::sync::Arc<Dm1990>) {
    tokio::spawn(async move {
        let started = now_micros();
        match backfill(&store, &dm).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                cases = n,
                ms = (now_micros() - started) / 1000,
                "case register filled with the cases decided before it existed"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "case register backfill stopped; it goes on at the next start")
            }
        }
    });
}
