//! The `notifica-caso` Communication of a CRE case (SPEC.md §3).
use serde_json::{Value, json};

use super::definition::CaseDefinition;
use super::evaluate::Finding;
use crate::terminology::{CANON, ICD9CM, Terminology};

/// The recipients of a CRE case: the treating facility's ASL and region, and ISS.
fn recipients(f: &Finding, t: &Terminology) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some((asl_id, code, name)) = &f.facility.asl {
        let mut r = json!({
            "reference": format!("Organization/{asl_id}"),
            "identifier": {"system": format!("{CANON}/sid/asl"), "value": code},
        });
        if !name.is_empty() {
            r["display"] = json!(name);
        }
        out.push(r);
        // NSIS ASL codes start with the 3-digit region code
        if let Some(region) = code.get(..3) {
            let system = format!("{CANON}/CodeSystem/regione");
            let mut r =
                json!({"identifier": {"system": format!("{CANON}/sid/regione"), "value": region}});
            if let Some(d) = t.display(&system, region) {
                r["display"] = json!(d);
            }
            out.push(r);
        }
    }
    out.push(json!({
        "identifier": {"system": format!("{CANON}/sid/ente"), "value": "ISS"},
        "display": "Istituto Superiore di Sanità"
    }));
    out
}

fn agent_name(code: &str) -> &str {
    match code {
        "ETP" => "ertapenem",
        "IPM" => "imipenem",
        "MEM" => "meropenem",
        other => other,
    }
}

/// A paragraph in Italian for the people who read the notification.
fn summary(f: &Finding) -> String {
    let mut criteria = Vec::new();
    let resistant: Vec<String> = f
        .met
        .iter()
        .filter_map(|m| m.agent.as_deref())
        .map(|a| agent_name(a).to_string())
        .collect();
    if !resistant.is_empty() {
        let mut r = resistant;
        r.dedup();
        criteria.push(format!("resistenza a {}", r.join(", ")));
    }
    if f.met.iter().any(|m| m.agent.is_none()) {
        criteria.push("carbapenemasi rilevata".to_string());
    }
    let patient = match &f.patient_cf {
        Some(cf) => format!("paziente con codice fiscale {cf}"),
        None => format!("paziente Patient/{}", f.patient_id),
    };
    // Italian readers write dates day first
    let date = match (
        f.date.text.get(..4),
        f.date.text.get(5..7),
        f.date.text.get(8..10),
    ) {
        (Some(y), Some(m), Some(d)) => format!("{d}/{m}/{y}"),
        _ => f.date.text.clone(),
    };
    let facility = match (&f.facility.facility, &f.facility.asl) {
        (Some((_, name)), Some((_, asl, _))) if !name.is_empty() => {
            format!(" Struttura segnalante: {name} (ASL {asl}).")
        }
        (_, Some((_, asl, _))) => format!(" ASL della struttura: {asl}."),
        _ => " Struttura segnalante non indicata nei dati ricevuti.".to_string(),
    };
    format!(
        "Batteriemia da {} resistente ai carbapenemi (CRE) in {patient}: emocoltura del {date}, {}.{facility} Primo caso dell'anno {} per questa specie.",
        f.species.name,
        criteria.join(" e "),
        f.key.year
    )
}

/// The case Communication, without `meta` (the store stamps it).
pub fn build(
    def: &CaseDefinition,
    t: &Terminology,
    f: &Finding,
    case_id: &str,
    status: &str,
    sent: &str,
) -> Value {
    let mut extension = vec![
        json!({"url": format!("{CANON}/StructureDefinition/definizione-caso"), "valueCanonical": def.canonical()}),
        json!({"url": format!("{CANON}/StructureDefinition/data-riferimento"), "extension": [
            {"url": "data", "valueDateTime": f.date.text},
            {"url": "fonte", "valueCode": f.date.source},
            {"url": "anno", "valueInteger": f.key.year},
        ]}),
    ];
    for m in &f.met {
        let mut parts = vec![
            json!({"url": "criterio", "valueCoding": {
                "system": format!("{CANON}/CodeSystem/criterio-cre"), "code": m.criterion}}),
            json!({"url": "evidenza", "valueReference": {"reference": m.evidence}}),
        ];
        if let Some(a) = &m.agent {
            parts.push(json!({"url": "agente", "valueCoding": {
                "system": format!("{CANON}/CodeSystem/agente-antimicrobico"), "code": a,
                "display": agent_name(a)}}));
        }
        if let Some(o) = m.origin {
            parts.push(json!({"url": "origine", "valueCode": o}));
        }
        if let Some(b) = &m.breakpoint {
            parts.push(json!({"url": "breakpoint", "valueString": b}));
        }
        extension.push(json!({"url": format!("{CANON}/StructureDefinition/criteri-soddisfatti"), "extension": parts}));
    }
    let mut about = vec![json!({"reference": format!("Observation/{}", f.isolate_id)})];
    let mut seen = vec![format!("Observation/{}", f.isolate_id)];
    for m in &f.met {
        if !seen.contains(&m.evidence) {
            seen.push(m.evidence.clone());
            about.push(json!({"reference": m.evidence}));
        }
    }
    for r in &f.reports {
        about.push(json!({"reference": format!("DiagnosticReport/{r}")}));
    }
    let mut reason = vec![json!({"coding": [{"system": ICD9CM,
        "code": f.species.reason_code.code, "display": f.species.reason_code.display}]})];
    for c in &def.notification.reason_codes {
        reason.push(json!({"coding": [{"system": ICD9CM, "code": c.code, "display": c.display}]}));
    }
    let category_system = format!("{CANON}/CodeSystem/tipo-notifica");
    let mut category = json!({"system": category_system, "code": def.notification.category});
    if let Some(d) = t.display(&category_system, &def.notification.category) {
        category["display"] = json!(d);
    }
    json!({
        "resourceType": "Communication",
        "id": case_id,
        "meta": {"profile": [format!("{CANON}/StructureDefinition/notifica-caso")]},
        "extension": extension,
        "identifier": [{"system": format!("{CANON}/sid/caso"), "value": case_id}],
        "status": status,
        "category": [{"coding": [category]}],
        "priority": def.notification.priority,
        "subject": {"reference": format!("Patient/{}", f.patient_id)},
        "about": about,
        "sent": sent,
        "recipient": recipients(f, t),
        "reasonCode": reason,
        "payload": [{"contentString": summary(f)}],
    })
}
