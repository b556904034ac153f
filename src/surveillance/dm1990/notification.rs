//! The `notifica-caso` Communication of a D.M. 1990 case (SPEC.md §3), its recipients, and the
//! receipt a doctor gets for a segnalazione.
use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::report::{Report, outcome};
use super::rules::{Class, Disease, RuleSet};
use super::{Dm1990, read_case, read_report};
use crate::fhir::datetime::format_instant;
use crate::italy::places::place_of_comune;
use crate::store::{Note, StoreResult, StoreTx};
use crate::surveillance::links::Reader;
use crate::surveillance::register::{CaseArea, CaseFacts, rome_day_of_micros};
use crate::terminology::{CANON, ICD9CM, Terminology};

const HOUR_US: i64 = 3_600_000_000;

/// Recipients as identifier references, without duplicates, and the warnings of missing maps.
#[derive(Default)]
pub struct Recipients {
    pub list: Vec<Value>,
    seen: BTreeSet<(String, String)>,
    pub warnings: Vec<(String, String)>,
}

impl Recipients {
    fn push(&mut self, kind: &str, value: &str, display: Option<&str>) {
        let system = format!("{CANON}/sid/{kind}");
        if !self.seen.insert((system.clone(), value.to_string())) {
            return;
        }
        let mut r = json!({"identifier": {"system": system, "value": value}});
        if let Some(d) = display {
            r["display"] = json!(d);
        }
        self.list.push(r);
    }

    fn asl(&mut self, code: &str) {
        let t = Terminology::get();
        let name = t.display(&format!("{CANON}/CodeSystem/asl"), code);
        self.push("asl", code, name);
    }

    fn region(&mut self, code: &str) {
        let t = Terminology::get();
        let name = t.display(&format!("{CANON}/CodeSystem/regione"), code);
        self.push("regione", code, name);
    }

    /// The ASL of residence and of notification of each report, and their regions (`regions`);
    /// the named bodies (`ministero`, `iss`) of the rule set.
    pub fn of(set: &RuleSet, kinds: &[String], reports: &[&Report]) -> Recipients {
        let mut out = Recipients::default();
        let want = |k: &str| kinds.iter().any(|x| x == k);
        let mut asls = Vec::new();
        let mut regions = Vec::new();
        for r in reports {
            match r.comune.as_deref().and_then(place_of_comune) {
                Some(place) => {
                    match &place.asl {
                        Some(a) => asls.push(a.clone()),
                        None => out.warnings.push((
                            r.id.clone(),
                            format!(
                                "Nessuna ASL nota per il comune di residenza {} (mappa comune-asl): la notifica è indirizzata alla regione{}.",
                                place.comune,
                                place.region.as_deref().map(|g| format!(" {g}")).unwrap_or_default()
                            ),
                        )),
                    }
                    regions.extend(place.region.clone());
                    // without an ASL the region is told, whatever the class says
                    if place.asl.is_none() && !want("regione") {
                        regions.extend(place.region.clone());
                        if let Some(g) = &place.region {
                            out.region(g);
                        }
                    }
                }
                None => out.warnings.push((
                    r.id.clone(),
                    match &r.comune {
                        Some(c) => format!("Il comune di residenza {c} non è un codice ISTAT noto: la notifica va all'ASL segnalante."),
                        None => "Comune di residenza non indicato (Patient.address.city con codice ISTAT): la notifica va all'ASL segnalante.".to_string(),
                    },
                )),
            }
            if let Some((code, _)) = &r.notifying_asl {
                asls.push(code.clone());
                // NSIS ASL codes start with their region's code
                regions.extend(code.get(..3).map(String::from));
            }
        }
        if want("asl") {
            for a in &asls {
                out.asl(a);
            }
        }
        if want("regione") || (out.list.is_empty() && !regions.is_empty()) {
            for g in &regions {
                out.region(g);
            }
        }
        if out.list.is_empty() {
            // nobody known to send it to: it goes to the rule set's fallback rather than nowhere
            for k in &set.unrouted {
                if let Some(body) = set.recipients.get(k) {
                    out.push(
                        body.system.rsplit('/').next().unwrap_or("ente"),
                        &body.value,
                        Some(&body.display),
                    );
                }
            }
            for r in reports {
                out.warnings.push((
                    r.id.clone(),
                    "Né il comune di residenza né l'ASL segnalante permettono di individuare l'ASL competente: la notifica è indirizzata al Ministero della Salute.".into(),
                ));
            }
        }
        for k in kinds {
            if let Some(body) = set.recipients.get(k) {
                out.push(
                    body.system.rsplit('/').next().unwrap_or("ente"),
                    &body.value,
                    Some(&body.display),
                );
            }
        }
        out
    }
}

/// `dd/mm/yyyy` of a FHIR date or dateTime, for Italian readers.
pub fn italian_date(text: &str) -> String {
    match (text.get(..4), text.get(5..7), text.get(8..10)) {
        (Some(y), Some(m), Some(d)) => format!("{d}/{m}/{y}"),
        _ => text.to_string(),
    }
}

fn class_of<'a>(set: &'a RuleSet, r: &Report) -> Option<(&'a Class, &'a Disease)> {
    let c = set.classify(r.code.as_deref()?)?;
    Some((c.class, c.disease))
}

fn coding(system: &str, code: &str) -> Value {
    let mut c = json!({"system": system, "code": code});
    if let Some(d) = Terminology::get().display(system, code) {
        c["display"] = json!(d);
    }
    c
}

/// Write a notification if it changed (see `surveillance::publish`).
pub async fn write_notification(
    engine: &Dm1990,
    tx: &mut dyn StoreTx,
    id: &str,
    body: Value,
) -> StoreResult<()> {
    crate::surveillance::publish::publish(&engine.dispatcher, tx, "dm1990", id, body).await
}

/// Withdraw a notification (status entered-in-error, same identifier), if it was notified.
pub async fn withdraw(engine: &Dm1990, tx: &mut dyn StoreTx, id: &str) -> StoreResult<()> {
    crate::surveillance::publish::withdraw(&engine.dispatcher, tx, "dm1990", id).await
}

/// Make a case's notification agree with its reports; the recipients' warnings per report.
pub async fn refresh_case(
    engine: &Dm1990,
    reader: &mut Reader<'_>,
    key: &str,
    now: i64,
) -> StoreResult<Vec<(String, String)>> {
    let Some(mut case) = read_case(reader.tx, key).await? else {
        return Ok(vec![]);
    };
    let mut reports = Vec::new();
    for m in &case.members {
        if let Some(r) = read_report(reader.tx, m).await? {
            reports.push(r);
        }
    }
    let active: Vec<&Report> = reports.iter().filter(|r| r.counts()).collect();
    // the episode is timed by the reports that stand now (a correction can move its start)
    let first_onset = active.iter().filter_map(|r| r.onset_us).min();
    let standing = !active.is_empty();
    if case.active != standing || (first_onset.is_some() && case.first_onset_us != first_onset) {
        case.active = standing;
        case.first_onset_us = first_onset.or(case.first_onset_us);
        super::put_case(reader.tx, key, &case).await?;
    }
    let Some(first) = active.first() else {
        reader.tx.register_set_active(&case.case_id, false).await?;
        withdraw(engine, reader.tx, &case.case_id).await?;
        return Ok(vec![]);
    };
    let set = engine.set_of(first.rule_set.as_deref());
    let Some((class, disease)) = class_of(set, first) else {
        // no longer a class of its rule set: nothing to count it in
        reader.tx.register_set_active(&case.case_id, false).await?;
        return Ok(vec![]);
    };
    register(reader.tx, &case, class, disease, &active).await?;
    if class.notify == super::rules::Notify::Never {
        // class V: recorded for the annual summary, notified only within an outbreak
        return Ok(vec![]);
    }
    let recipients = Recipients::of(set, &class.recipients, &active);
    let body = case_body(
        set,
        class,
        disease,
        &case.case_id,
        &active,
        &recipients,
        now,
    );
    write_notification(engine, reader.tx, &case.case_id, body).await?;
    Ok(recipients.warnings)
}

/// Record the case as the periodic summaries count it: counted on the Italian day of its first
/// onset, where its first standing report's patient lives; opened through its notification, or
/// (class V, never notified) through its reports.
pub async fn register(
    tx: &mut dyn StoreTx,
    case: &super::CaseRecord,
    class: &Class,
    disease: &Disease,
    reports: &[&Report],
) -> StoreResult<()> {
    let first = reports[0];
    let Some(day) = case
        .first_onset_us
        .or(first.onset_us)
        .or(Some(first.received_us))
        .and_then(rome_day_of_micros)
    else {
        return Ok(());
    };
    let refs = if class.notify == super::rules::Notify::Never {
        reports
            .iter()
            .map(|r| format!("Communication/{}", r.id))
            .collect()
    } else {
        vec![format!("Communication/{}", case.case_id)]
    };
    // the patient as the first report that says it; reports remembered before the summaries
    // existed carry no birth date or sex: then the Patient itself
    let mut birth_date = reports.iter().find_map(|r| r.birth_date.clone());
    let mut sex = reports.iter().find_map(|r| r.sex.clone());
    if (birth_date.is_none() || sex.is_none())
        && let Some(pid) = &first.patient_id
        && let Some(p) = tx
            .current("Patient", pid)
            .await?
            .and_then(|p| p.body)
            .and_then(|b| serde_json::from_str::<Value>(&b).ok())
    {
        birth_date = birth_date.or_else(|| p["birthDate"].as_str().map(String::from));
        sex = sex.or_else(|| p["gender"].as_str().map(String::from));
    }
    let facts = CaseFacts {
        case_id: &case.case_id,
        family: super::STATE,
        category: &class.category,
        disease: first.disease.as_deref().unwrap_or(&disease.code),
        code: first.code.as_deref().unwrap_or(&disease.code),
        day,
        birth_date: birth_date.as_deref(),
        sex: sex.unwrap_or_else(|| "unknown".into()),
        area: CaseArea::of(
            first.comune.as_deref(),
            first.notifying_asl.as_ref().map(|a| a.0.as_str()),
        ),
        refs,
    };
    tx.register_case(&facts.row()).await
}

/// The deadline of a class from the earliest recordedDate of the reports (µs).
pub fn deadline(class: &Class, reports: &[&Report]) -> Option<i64> {
    let hours = class.deadline_hours?;
    let recorded = reports.iter().filter_map(|r| r.recorded_us).min()?;
    Some(recorded + hours * HOUR_US)
}

fn case_body(
    set: &RuleSet,
    class: &Class,
    disease: &Disease,
    case_id: &str,
    reports: &[&Report],
    recipients: &Recipients,
    now: i64,
) -> Value {
    let first = reports[0];
    let mut extension = vec![json!({
        "url": format!("{CANON}/StructureDefinition/definizione-caso"),
        "valueCanonical": set.canonical()
    })];
    let due = deadline(class, reports);
    if let Some(d) = due {
        extension.push(json!({"url": format!("{CANON}/StructureDefinition/scadenza"), "valueDateTime": format_instant(d)}));
        let received = reports.iter().map(|r| r.received_us).min().unwrap_or(now);
        if received > d {
            extension.push(json!({"url": format!("{CANON}/StructureDefinition/in-ritardo"), "valueBoolean": true}));
        }
    }
    // criteria that held, with the observations that proved them
    let criteria_system = format!("{CANON}/CodeSystem/criterio-diagnostico");
    let mut seen = BTreeSet::new();
    for r in reports {
        for e in r.evidence.iter().filter(|e| e.result == "positivo") {
            if seen.insert((e.criterion.clone(), e.reference.clone())) {
                extension.push(json!({"url": format!("{CANON}/StructureDefinition/criteri-soddisfatti"), "extension": [
                    {"url": "criterio", "valueCoding": coding(&criteria_system, &e.criterion)},
                    {"url": "evidenza", "valueReference": {"reference": e.reference}},
                ]}));
            }
        }
    }
    if let Some(system) = &disease.option_system {
        let system = format!("{CANON}/CodeSystem/{system}");
        let mut labels: Vec<&String> = reports.iter().flat_map(|r| &r.met).collect();
        labels.sort();
        labels.dedup();
        for label in labels {
            let evidence: Vec<Value> = reports
                .iter()
                .filter_map(|r| r.condition.as_ref())
                .map(|c| json!({"url": "evidenza", "valueReference": {"reference": format!("Condition/{c}")}}))
                .collect();
            let mut parts = vec![json!({"url": "criterio", "valueCoding": coding(&system, label)})];
            parts.extend(evidence);
            extension.push(json!({"url": format!("{CANON}/StructureDefinition/criteri-soddisfatti"), "extension": parts}));
        }
    }
    if class.notify == super::rules::Notify::OnSuspicion {
        let confirmed = reports.iter().any(|r| r.verification == "confermato");
        let excluded = reports.iter().all(|r| r.verification == "escluso");
        if confirmed || excluded {
            extension.push(json!({
                "url": format!("{CANON}/StructureDefinition/esito-accertamento"),
                "valueCode": if confirmed { "confermato" } else { "escluso" }
            }));
        }
    }
    let mut about = Vec::new();
    let mut in_response = Vec::new();
    let mut refs = BTreeSet::new();
    for r in reports {
        if let Some(c) = &r.condition
            && refs.insert(format!("Condition/{c}"))
        {
            about.push(json!({"reference": format!("Condition/{c}")}));
        }
    }
    for r in reports {
        let s = format!("Communication/{}", r.id);
        if refs.insert(s.clone()) {
            about.push(json!({"reference": s}));
            in_response.push(json!({"reference": s}));
        }
    }
    for r in reports {
        for e in &r.evidence {
            if refs.insert(e.reference.clone()) {
                about.push(json!({"reference": e.reference}));
            }
        }
    }
    let key = first
        .disease
        .clone()
        .unwrap_or_else(|| disease.code.clone());
    let mut reason = vec![json!({"coding": [coding_or(ICD9CM, &key, &disease.name)]})];
    if let Some(code) = &first.code
        && code != &key
    {
        reason.push(json!({"coding": [coding(ICD9CM, code)]}));
    }
    let category_system = format!("{CANON}/CodeSystem/tipo-notifica");
    let mut body = json!({
        "resourceType": "Communication",
        "id": case_id,
        "meta": {"profile": [format!("{CANON}/StructureDefinition/notifica-caso")]},
        "extension": extension,
        "identifier": [{"system": format!("{CANON}/sid/caso"), "value": case_id}],
        "status": "completed",
        "category": [{"coding": [coding(&category_system, &class.category)]}],
        "priority": class.priority,
        "about": about,
        "inResponseTo": in_response,
        "sent": format_instant(now),
        "recipient": recipients.list,
        "reasonCode": reason,
        "payload": [{"contentString": case_summary(class, disease, reports, due)}],
    });
    if let Some(p) = &first.patient_id {
        body["subject"] = json!({"reference": format!("Patient/{p}")});
    }
    body
}

fn coding_or(system: &str, code: &str, display: &str) -> Value {
    let mut c = coding(system, code);
    if c.get("display").is_none() {
        c["display"] = json!(display);
    }
    c
}

fn roman(class: u8) -> &'static str {
    ["", "I", "II", "III", "IV", "V"]
        .get(class as usize)
        .copied()
        .unwrap_or("")
}

fn case_summary(class: &Class, disease: &Disease, reports: &[&Report], due: Option<i64>) -> String {
    let first = reports[0];
    let patient = match &first.codice_fiscale {
        Some(cf) => format!("paziente con codice fiscale {cf}"),
        None => format!("paziente {}", first.identity),
    };
    let onset = first
        .onset
        .as_deref()
        .map(|o| format!(", inizio dei sintomi il {}", italian_date(o)))
        .unwrap_or_default();
    let status = match first.verification.as_str() {
        "confermato" => "caso confermato",
        "escluso" => "sospetto non confermato (escluso)",
        _ => "caso sospetto",
    };
    let mut text = format!(
        "Classe {} D.M. 15/12/1990 – {} (ICD-9-CM {}): {status} in {patient}{onset}.",
        roman(class.class),
        disease.name,
        first.code.as_deref().unwrap_or(&disease.code)
    );
    let criteria: BTreeSet<&str> = reports
        .iter()
        .flat_map(|r| r.evidence.iter().filter(|e| e.result == "positivo"))
        .map(|e| e.criterion.as_str())
        .collect();
    if !criteria.is_empty() {
        text.push_str(&format!(
            " Criteri soddisfatti: {}.",
            criteria.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    if reports.len() > 1 {
        text.push_str(&format!(" Segnalazioni ricevute: {}.", reports.len()));
    }
    if let Some(d) = due {
        text.push_str(&format!(
            " Termine per la segnalazione: {}.",
            italian_date(&format_instant(d))
        ));
    }
    text
}

/// The receipt of a segnalazione: what happened to it, in Italian.
pub fn receipt(engine: &Dm1990, r: &Report) -> Note {
    let set = engine.set_of(r.rule_set.as_deref());
    let classified = r.code.as_deref().and_then(|c| set.classify(c));
    let mut text = match (classified, r.code.as_deref()) {
        (Some(c), Some(code)) => format!(
            "Classe {} D.M. 15/12/1990: {} (ICD-9-CM {code}, voce {}).",
            roman(c.class.class),
            c.disease.name,
            c.disease.code
        ),
        (None, Some(code)) => format!(
            "Il codice ICD-9-CM {code} non è tra le malattie soggette a notifica del D.M. 15/12/1990: la segnalazione è registrata senza notifica."
        ),
        (_, None) => "La segnalazione non indica una malattia in ICD-9-CM.".to_string(),
    };
    match r.outcome.as_str() {
        outcome::NOTIFIED => text.push_str(" Notifica del caso emessa."),
        outcome::WAITING => text.push_str(&format!(
            " Non ancora notificabile: in attesa di {}.",
            r.missing.join("; ")
        )),
        outcome::RECORDED => text.push_str(
            " Registrata per il riepilogo annuale (classe V): notificata solo se parte di un focolaio.",
        ),
        outcome::ALREADY_NOTIFIED => text.push_str(
            " Caso già notificato (ritorno dopo interruzione del trattamento o caso cronico): non viene notificato di nuovo.",
        ),
        outcome::WITHDRAWN => text.push_str(" La segnalazione non conta più: il caso che ne dipendeva è ritirato."),
        _ => {}
    }
    if let Some(c) = classified {
        let reports = [r];
        if let Some(d) = deadline(c.class, &reports) {
            text.push_str(&format!(
                " Scadenza della segnalazione: {}.",
                format_instant(d)
            ));
            if r.received_us > d {
                text.push_str(" Segnalazione in ritardo.");
            }
        }
        let asl = r
            .comune
            .as_deref()
            .and_then(place_of_comune)
            .and_then(|p| p.asl)
            .or_else(|| r.notifying_asl.as_ref().map(|a| a.0.clone()));
        if let Some(a) = asl {
            let name = Terminology::get()
                .display(&format!("{CANON}/CodeSystem/asl"), &a)
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            text.push_str(&format!(" ASL competente: {a}{name}."));
        }
    }
    Note {
        resource_type: "Communication".into(),
        id: r.id.clone(),
        severity: "information",
        system: format!("{CANON}/CodeSystem/esito-segnalazione"),
        code: r.outcome.clone(),
        text,
    }
}
