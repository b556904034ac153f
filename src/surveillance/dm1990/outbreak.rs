//! Outbreaks (focolai): two or more cases of one disease in one community (or exposed to one
//! common source) whose onsets lie within the rule set's window of one another. Found through
//! the community's tag in the rule state (an index lookup, never a scan), recomputed whenever a
//! case of the community changes, and notified as one `focolaio` updated in new versions.
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::notification::{Recipients, italian_date, withdraw, write_notification};
use super::report::Report;
use super::{Dm1990, STATE, read_case};
use crate::fhir::datetime::format_instant;
use crate::store::{StoreError, StoreResult};
use crate::surveillance::links::Reader;
use crate::terminology::{CANON, ICD9CM, Terminology};

const DAY_US: i64 = 86_400_000_000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutbreakRecord {
    /// The focolaio notification's id.
    pub id: String,
    pub group: String,
    /// Report ids of its cases.
    pub members: Vec<String>,
    pub active: bool,
}

/// Clusters of reports whose onsets chain within `window` µs, in onset order.
fn clusters(mut reports: Vec<Report>, window: i64) -> Vec<Vec<Report>> {
    reports.sort_by_key(|r| (r.onset_us.unwrap_or(i64::MAX), r.id.clone()));
    let mut out: Vec<Vec<Report>> = Vec::new();
    for r in reports {
        let joins = out.last().and_then(|c| c.last()).is_some_and(
            |last| matches!((last.onset_us, r.onset_us), (Some(a), Some(b)) if b - a <= window),
        );
        if joins {
            out.last_mut().expect("checked").push(r);
        } else {
            out.push(vec![r]);
        }
    }
    out
}

/// Recompute the outbreaks of one disease × community.
pub async fn refresh(
    engine: &Dm1990,
    reader: &mut Reader<'_>,
    group: &str,
    now: i64,
) -> StoreResult<()> {
    let mut reports = Vec::new();
    for (_, v) in reader
        .tx
        .state_tagged(STATE, &format!("comm:{group}"))
        .await?
    {
        if let Ok(r) = serde_json::from_value::<Report>(v)
            && r.counts()
        {
            reports.push(r);
        }
    }
    let set = engine.set_of(reports.first().and_then(|r| r.rule_set.as_deref()));
    let rule = &set.outbreak;
    let found: Vec<Vec<Report>> = clusters(reports, rule.window_days * DAY_US)
        .into_iter()
        .filter(|c| {
            let people: BTreeSet<&str> = c.iter().map(|r| r.identity.as_str()).collect();
            people.len() >= rule.minimum_cases
        })
        .collect();
    let mut records: Vec<(String, OutbreakRecord)> = Vec::new();
    for (key, v) in reader
        .tx
        .state_tagged(STATE, &format!("outbreak-of:{group}"))
        .await?
    {
        if let Ok(o) = serde_json::from_value::<OutbreakRecord>(v) {
            records.push((key, o));
        }
    }
    let mut used = BTreeSet::new();
    for cluster in &found {
        let ids: Vec<String> = cluster.iter().map(|r| r.id.clone()).collect();
        // the record sharing most cases keeps its identifier
        let best = records
            .iter()
            .enumerate()
            .filter(|(i, _)| !used.contains(i))
            .map(|(i, (_, o))| (i, o.members.iter().filter(|m| ids.contains(m)).count()))
            .filter(|(_, n)| *n > 0)
            .max_by_key(|(_, n)| *n)
            .map(|(i, _)| i);
        let (key, mut record) = match best {
            Some(i) => {
                used.insert(i);
                records[i].clone()
            }
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                let record = OutbreakRecord {
                    id: id.clone(),
                    group: group.to_string(),
                    members: vec![],
                    active: true,
                };
                (format!("outbreak:{id}"), record)
            }
        };
        record.members = ids;
        record.active = true;
        put(reader, &key, &record).await?;
        let body = body(engine, reader, &record.id, cluster, now).await?;
        write_notification(engine, reader.tx, &record.id, body).await?;
    }
    for (i, (key, mut record)) in records.into_iter().enumerate() {
        if used.contains(&i) || !record.active {
            continue;
        }
        record.active = false;
        put(reader, &key, &record).await?;
        withdraw(engine, reader.tx, &record.id).await?;
    }
    Ok(())
}

async fn put(reader: &mut Reader<'_>, key: &str, record: &OutbreakRecord) -> StoreResult<()> {
    let value = serde_json::to_value(record).map_err(|e| StoreError::Rule(e.to_string()))?;
    reader
        .tx
        .state_put(
            STATE,
            key,
            &value,
            &[format!("outbreak-of:{}", record.group)],
        )
        .await
}

async fn body(
    engine: &Dm1990,
    reader: &mut Reader<'_>,
    id: &str,
    cluster: &[Report],
    now: i64,
) -> StoreResult<Value> {
    let first = &cluster[0];
    let last = &cluster[cluster.len() - 1];
    let set = engine.set_of(first.rule_set.as_deref());
    let rule = &set.outbreak;
    let t = Terminology::get();
    let disease_code = first.disease.clone().unwrap_or_default();
    let disease = set
        .classify(&disease_code)
        .filter(|c| !c.disease.by_reported_code)
        .map(|c| c.disease.name.clone())
        .or_else(|| t.display(ICD9CM, &disease_code).map(String::from))
        .unwrap_or_default();
    // the members' case notifications where they have one (class IV), else their segnalazione
    let mut about = Vec::new();
    let mut seen = BTreeSet::new();
    for r in cluster {
        let mut target = format!("Communication/{}", r.id);
        if let Some(k) = &r.case_key
            && let Some(case) = read_case(reader.tx, k).await?
            && reader
                .tx
                .current("Communication", &case.case_id)
                .await?
                .is_some_and(|c| !c.deleted)
        {
            target = format!("Communication/{}", case.case_id);
        }
        if seen.insert(target.clone()) {
            about.push(json!({"reference": target}));
        }
    }
    let people: BTreeSet<&str> = cluster.iter().map(|r| r.identity.as_str()).collect();
    let members: Vec<&Report> = cluster.iter().collect();
    let recipients = Recipients::of(set, &rule.recipients, &members);
    let community = first.community.clone().unwrap_or_default();
    let start = first
        .onset
        .clone()
        .or_else(|| first.onset_us.map(format_instant))
        .unwrap_or_default();
    let days = match (first.onset_us, last.onset_us) {
        (Some(a), Some(b)) => (b - a) / DAY_US,
        _ => 0,
    };
    let mut form = vec![
        json!({"url": "comunita", "valueIdentifier": community.identifier}),
        json!({"url": "data-inizio", "valueDate": start.get(..10).unwrap_or(&start)}),
        json!({"url": "durata-giorni", "valueInteger": days}),
        json!({"url": "numero-casi", "valueInteger": people.len()}),
    ];
    if let Some(tipo) = &community.tipo {
        form.insert(0, json!({"url": "tipo-comunita", "valueCode": tipo}));
    }
    if let Some(nome) = &community.nome {
        form.push(json!({"url": "nome", "valueString": nome}));
    }
    if let Some(n) = community.persone {
        form.push(json!({"url": "persone-a-rischio", "valueInteger": n}));
    }
    let mut coding = json!({"system": ICD9CM, "code": disease_code});
    coding["display"] = json!(t.display(ICD9CM, &disease_code).unwrap_or(&disease));
    let category_system = format!("{CANON}/CodeSystem/tipo-notifica");
    let mut category = json!({"system": category_system, "code": rule.category});
    if let Some(d) = t.display(&category_system, &rule.category) {
        category["display"] = json!(d);
    }
    let place = community
        .nome
        .clone()
        .unwrap_or_else(|| community.key.clone());
    let summary = format!(
        "Focolaio epidemico di {disease} (ICD-9-CM {disease_code}) nella comunità {place}: {} casi, primo caso con inizio dei sintomi il {}{}.",
        people.len(),
        italian_date(&start),
        if days > 0 {
            format!(", ultimo {days} giorni dopo")
        } else {
            String::new()
        }
    );
    Ok(json!({
        "resourceType": "Communication",
        "id": id,
        "meta": {"profile": [format!("{CANON}/StructureDefinition/notifica-caso")]},
        "extension": [
            {"url": format!("{CANON}/StructureDefinition/definizione-caso"), "valueCanonical": set.canonical()},
            {"url": format!("{CANON}/StructureDefinition/focolaio"), "extension": form},
        ],
        "identifier": [{"system": format!("{CANON}/sid/caso"), "value": id}],
        "status": "completed",
        "category": [{"coding": [category]}],
        "priority": rule.priority,
        "about": about,
        "sent": format_instant(now),
        "recipient": recipients.list,
        "reasonCode": [{"coding": [coding]}],
        "payload": [{"contentString": summary}],
    }))
}
