//! D.M. 15/12/1990 notification rules (docs/dm1990-contract.md, shared DOMAIN.md §2, SPEC §2.2, §3,
//! §4), black box: an EHR's segnalazione goes in over the FHIR API (a transaction Bundle, or its
//! pieces one request each), case notifications (`Communication`, profile `notifica-caso`) and
//! receipts come out, on SQLite and PostgreSQL.
//!
//! Every test builds its EHR transaction with the `Report` builder below (Patient with codice fiscale
//! and residence comune, the notifying doctor, the notifying ASL, the Condition, the
//! `criterio-diagnostico` Observations and the `segnalazione` Communication) and changes only what its
//! rule is about: disease code, verification status, criteria, dates, community, comune.
//! `tests/fixtures/dm1990/segnalazione-morbillo-transaction.json` is what `Report::new` sends, written
//! out once for people to read (a test checks that the builder still produces that shape).
mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use common::subscriber::{Hook, events_of, subscription};
use common::{Resp, TestApp, fixture};
use sentinella::config::Config;
use sentinella::italy::codice_fiscale::CodiceFiscale;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const CANON: &str = "https://sentinella-fhir.github.io/ig";
const ICD9: &str = "http://hl7.org/fhir/sid/icd-9-cm";
const ISTAT_COMUNI: &str = "https://www.hl7.it/fhir/terminology/CodeSystem/istat-comuni";
const SC_CODING: &str = "http://hl7.org/fhir/StructureDefinition/iso21090-SC-coding";
const CODICE_FISCALE: &str = "http://hl7.it/sid/codiceFiscale";
const VER_STATUS: &str = "http://terminology.hl7.org/CodeSystem/condition-ver-status";
const CLINICAL_STATUS: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
const CONDITION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/condition-category";
const LOINC: &str = "http://loinc.org";
const SNOMED: &str = "http://snomed.info/sct";
/// The EHR's own identifier systems (business identifiers of what it sends).
const EHR_CONDITIONS: &str = "https://cartella.ospedale-sacco.example/problemi";
const EHR_CRITERIA: &str = "https://cartella.ospedale-sacco.example/criteri";
const EHR_SEGNALAZIONI: &str = "https://cartella.ospedale-sacco.example/segnalazioni";
/// Schools are identified by their codice meccanografico.
const SCHOOLS: &str = "https://www.istruzione.it/sid/codice-meccanografico";

fn canon(path: &str) -> String {
    format!("{CANON}/{path}")
}

// =================================================================================================
// Places. The ASL of a comune comes from `terminology/ConceptMap-comune-asl.json`, the region from
// the comune's province through `terminology/ConceptMap-provincia-regione.json`; the values below were
// read from those files.

#[derive(Debug, Clone, Copy)]
struct Place {
    /// ISTAT code of the comune (6 digits).
    comune: &'static str,
    comune_name: &'static str,
    postal_code: &'static str,
    /// NSIS code of the comune's ASL.
    asl: &'static str,
    asl_name: &'static str,
    /// NSIS code of the region (3 digits).
    region: &'static str,
    region_name: &'static str,
}

const MILANO: Place = Place {
    comune: "015146",
    comune_name: "Milano",
    postal_code: "20121",
    asl: "030321",
    asl_name: "ATS della Città Metropolitana di Milano",
    region: "030",
    region_name: "Lombardia",
};

/// Same region as Milano, another ASL.
const BERGAMO: Place = Place {
    comune: "016024",
    comune_name: "Bergamo",
    postal_code: "24121",
    asl: "030325",
    asl_name: "ATS di Bergamo",
    region: "030",
    region_name: "Lombardia",
};

/// A comune of the province of Brescia (default ATS di Brescia 030326) that the map's comune-level
/// exceptions give to ATS della Montagna (Valcamonica).
const DARFO: Place = Place {
    comune: "017065",
    comune_name: "Darfo Boario Terme",
    postal_code: "25047",
    asl: "030323",
    asl_name: "ATS della Montagna",
    region: "030",
    region_name: "Lombardia",
};

/// Another region, mapped completely.
const AOSTA: Place = Place {
    comune: "007003",
    comune_name: "Aosta",
    postal_code: "11100",
    asl: "020101",
    asl_name: "Azienda USL Valle d'Aosta",
    region: "020",
    region_name: "Valle d'Aosta",
};

/// A comune with no ASL in `comune-asl` (Piemonte is not mapped): its province gives the region.
const TORINO_COMUNE: (&str, &str) = ("001272", "Torino");
const PIEMONTE: (&str, &str) = ("010", "Piemonte");

// =================================================================================================
// Dates

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

fn hours_ago(h: i64) -> String {
    rfc3339(now() - time::Duration::hours(h))
}

fn minutes_ago(m: i64) -> String {
    rfc3339(now() - time::Duration::minutes(m))
}

/// Noon UTC `d` days ago (`d` ≥ 1: always in the past, and the same calendar day in Rome).
fn days_ago(d: i64) -> String {
    let day = (now() - time::Duration::days(d)).date();
    format!("{day}T12:00:00Z")
}

/// The calendar date `d` days ago (YYYY-MM-DD).
fn date_days_ago(d: i64) -> String {
    (now() - time::Duration::days(d)).date().to_string()
}

fn instant(s: &str) -> OffsetDateTime {
    OffsetDateTime::parse(s, &Rfc3339).unwrap_or_else(|e| panic!("{s} is not a dateTime: {e}"))
}

// =================================================================================================
// People

/// A valid codice fiscale for patient `n` (Giovanni Esposito, born 1 January 1980).
fn patient_cf(n: u32) -> String {
    CodiceFiscale::complete(&format!("SPSGNN80A01F{n:03}"))
        .expect("well formed")
        .as_str()
        .to_string()
}

/// An omocodia variant of `patient_cf(n)` (the last digit of the place code as a letter).
fn patient_cf_omocodia(n: u32) -> String {
    let letters = "LMNPQRSTUV".as_bytes();
    let last = letters[(n % 10) as usize] as char;
    CodiceFiscale::complete(&format!("SPSGNN80A01F{:02}{last}", n / 10))
        .expect("well formed")
        .as_str()
        .to_string()
}

/// A valid codice fiscale for doctor `n` (Marco Bianchi, born 1 January 1970).
fn doctor_cf(n: u32) -> String {
    CodiceFiscale::complete(&format!("BNCMRC70A01F{n:03}"))
        .expect("well formed")
        .as_str()
        .to_string()
}

fn doctor_name(n: u32) -> (&'static str, &'static str) {
    match n % 3 {
        1 => ("Bianchi", "Marco"),
        2 => ("Colombo", "Chiara"),
        _ => ("Ferrari", "Luca"),
    }
}

// =================================================================================================
// ICD-9-CM displays (Italian), as an EHR would send them

fn icd9_display(code: &str) -> &'static str {
    match code {
        "001.0" => "Colera da Vibrio cholerae",
        "005.0" => "Intossicazione alimentare da stafilococco",
        "005.1" => "Botulismo",
        "046.11" => "Variante della malattia di Creutzfeldt-Jakob",
        "055.9" => "Morbillo senza menzione di complicazioni",
        "034.1" => "Scarlattina",
        "052.9" => "Varicella senza menzione di complicazioni",
        "070.1" => "Epatite virale A senza menzione di coma epatico",
        "070.20" => "Epatite virale B con coma epatico, acuta o non specificata",
        "070.30" => "Epatite virale B senza menzione di coma epatico, acuta o non specificata",
        "003.0" => "Gastroenterite da Salmonella",
        "036.0" => "Meningite meningococcica",
        "011.90" => "Tubercolosi polmonare non specificata",
        "011.93" => "Tubercolosi polmonare, bacilli trovati all'esame microscopico",
        "011.94" => "Tubercolosi polmonare, bacilli trovati all'esame colturale",
        "011.96" => "Tubercolosi polmonare confermata con altri metodi",
        "031.0" => "Malattia polmonare da micobatteri",
        "084.0" => "Malaria da Plasmodium falciparum",
        "132.0" => "Pediculosi del capo",
        "133.0" => "Scabbia",
        "110.0" => "Dermatofitosi del cuoio capelluto e della barba",
        "008.61" => "Enterite da rotavirus",
        "250.00" => "Diabete mellito senza complicazioni",
        "487.1" => "Influenza con altre manifestazioni respiratorie",
        _ => "",
    }
}

fn icd9_coding(code: &str) -> Value {
    let display = icd9_display(code);
    if display.is_empty() {
        json!({"system": ICD9, "code": code})
    } else {
        json!({"system": ICD9, "code": code, "display": display})
    }
}

// =================================================================================================
// The EHR's report (segnalazione), built to vary only what a test is about

/// A community (`CANON/StructureDefinition/comunita`): the outbreak key is `identificativo`.
#[derive(Debug, Clone)]
struct Community {
    tipo: &'static str,
    system: &'static str,
    value: String,
    nome: String,
    at_risk: i64,
}

fn school(value: &str, nome: &str, at_risk: i64) -> Community {
    Community {
        tipo: "scuola",
        system: SCHOOLS,
        value: value.into(),
        nome: nome.into(),
        at_risk,
    }
}

/// The fullUrl slots of a report's entries.
const PATIENT: usize = 1;
const DOCTOR: usize = 2;
const ASL: usize = 3;
const CONDITION: usize = 4;
const SEGNALAZIONE: usize = 5;
/// Criterion Observation `i` is slot `CRITERION + i`; laboratory Observation `i` is `LAB + i`.
const CRITERION: usize = 10;
const LAB: usize = 50;

fn full_url(slot: usize) -> String {
    format!("urn:uuid:0d3e1990-5a1e-4c0b-9f00-{slot:012}")
}

fn slot_of(full_url: &str) -> usize {
    full_url
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not one of our fullUrls: {full_url}"))
}

#[derive(Debug, Clone)]
struct Report {
    /// Makes the business identifiers (Condition, Observations, Communication) and piece ids unique.
    tag: String,
    cf: String,
    /// Residence: (ISTAT comune code, comune name, postal code); None: no address at all.
    home: Option<(String, String, String)>,
    /// The notifying ASL: (NSIS code, name).
    notifier: (String, String),
    doctor: u32,
    code: String,
    /// `Communication.reasonCode`: None = the Condition's code; Some(None) = no reasonCode.
    reason: Option<Option<String>>,
    verification: String,
    onset: Option<String>,
    recorded: Option<String>,
    sent: String,
    community: Option<Community>,
    treatments: Option<String>,
    /// (criterio-diagnostico code, esito-criterio code), named by the segnalazione's payload.
    criteria: Vec<(String, String)>,
    /// Laboratory Observations (LOINC), named by the payload.
    lab: Vec<Value>,
    with_condition: bool,
    conditional: bool,
    profiled: bool,
    deceased: Option<String>,
}

impl Report {
    /// Patient 1 living in Milano, doctor 1, notified to Milano's ASL; a confirmed Condition with
    /// `code`, onset 2 days ago, recorded 1 hour ago, segnalazione sent 30 minutes ago; no criteria.
    fn new(tag: &str, code: &str) -> Self {
        Report {
            tag: tag.into(),
            cf: patient_cf(1),
            home: Some((
                MILANO.comune.into(),
                MILANO.comune_name.into(),
                MILANO.postal_code.into(),
            )),
            notifier: (MILANO.asl.into(), MILANO.asl_name.into()),
            doctor: 1,
            code: code.into(),
            reason: None,
            verification: "confirmed".into(),
            onset: Some(days_ago(2)),
            recorded: Some(hours_ago(1)),
            sent: minutes_ago(30),
            community: None,
            treatments: None,
            criteria: Vec::new(),
            lab: Vec::new(),
            with_condition: true,
            conditional: true,
            profiled: true,
            deceased: None,
        }
    }

    /// The patient died (before the report).
    fn deceased(mut self, when: &str) -> Self {
        self.deceased = Some(when.into());
        self
    }

    fn person(mut self, n: u32) -> Self {
        self.cf = patient_cf(n);
        self
    }

    fn cf(mut self, cf: &str) -> Self {
        self.cf = cf.into();
        self
    }

    fn lives_in(mut self, place: Place) -> Self {
        self.home = Some((
            place.comune.into(),
            place.comune_name.into(),
            place.postal_code.into(),
        ));
        self
    }

    fn lives_in_comune(mut self, comune: &str, name: &str) -> Self {
        self.home = Some((comune.into(), name.into(), "00000".into()));
        self
    }

    fn homeless(mut self) -> Self {
        self.home = None;
        self
    }

    fn notified_by(mut self, place: Place) -> Self {
        self.notifier = (place.asl.into(), place.asl_name.into());
        self
    }

    fn doctor(mut self, n: u32) -> Self {
        self.doctor = n;
        self
    }

    fn reason(mut self, code: Option<&str>) -> Self {
        self.reason = Some(code.map(String::from));
        self
    }

    fn verification(mut self, v: &str) -> Self {
        self.verification = v.into();
        self
    }

    fn provisional(self) -> Self {
        self.verification("provisional")
    }

    fn onset(mut self, when: &str) -> Self {
        self.onset = Some(when.into());
        self
    }

    fn recorded(mut self, when: &str) -> Self {
        self.recorded = Some(when.into());
        self
    }

    fn sent(mut self, when: &str) -> Self {
        self.sent = when.into();
        self
    }

    fn community(mut self, c: Community) -> Self {
        self.community = Some(c);
        self
    }

    fn treatments(mut self, code: &str) -> Self {
        self.treatments = Some(code.into());
        self
    }

    fn criterion(mut self, code: &str, esito: &str) -> Self {
        self.criteria.push((code.into(), esito.into()));
        self
    }

    fn positive(self, code: &str) -> Self {
        self.criterion(code, "positivo")
    }

    fn lab_observation(mut self, obs: Value) -> Self {
        self.lab.push(obs);
        self
    }

    fn without_condition(mut self) -> Self {
        self.with_condition = false;
        self
    }

    /// Plain POSTs: sending it again stores new resources (a resend without conditional create).
    fn unconditional(mut self) -> Self {
        self.conditional = false;
        self
    }

    /// A Communication without the `segnalazione` profile (it counts through its ICD-9-CM reasonCode).
    fn unprofiled(mut self) -> Self {
        self.profiled = false;
        self
    }

    fn patient_resource(&self) -> Value {
        let mut p = json!({
            "resourceType": "Patient",
            "identifier": [{"system": CODICE_FISCALE, "value": self.cf}],
            "name": [{"family": "Esposito", "given": ["Giovanni"]}],
            "gender": "male",
            "birthDate": "1980-01-01",
            "telecom": [{"system": "phone", "value": "+39 02 5555 0101", "use": "mobile"}]
        });
        if let Some(when) = &self.deceased {
            p["deceasedDateTime"] = json!(when);
        }
        if let Some((comune, name, cap)) = &self.home {
            p["address"] = json!([{
                "use": "home",
                "type": "physical",
                "line": ["Via Alessandro Manzoni 12"],
                "city": name,
                "_city": {"extension": [{
                    "url": SC_CODING,
                    "valueCoding": {"system": ISTAT_COMUNI, "code": comune, "display": name}
                }]},
                "postalCode": cap,
                "country": "IT"
            }]);
        }
        p
    }

    fn doctor_resource(&self) -> Value {
        let (family, given) = doctor_name(self.doctor);
        json!({
            "resourceType": "Practitioner",
            "identifier": [{"system": CODICE_FISCALE, "value": doctor_cf(self.doctor)}],
            "active": true,
            "name": [{"family": family, "given": [given], "prefix": ["Dott."]}],
            "telecom": [
                {"system": "phone", "value": format!("+39 02 3904 {:04}", 1000 + self.doctor), "use": "work"},
                {"system": "email", "value": format!("{}.{}@ospedale-sacco.example", given.to_lowercase(), family.to_lowercase()), "use": "work"}
            ]
        })
    }

    fn asl_resource(&self) -> Value {
        json!({
            "resourceType": "Organization",
            "identifier": [{"system": canon("sid/asl"), "value": self.notifier.0}],
            "active": true,
            "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type", "code": "govt", "display": "Government"}]}],
            "name": self.notifier.1
        })
    }

    fn condition_resource(&self, r: &dyn Fn(usize) -> String) -> Value {
        let mut c = json!({
            "resourceType": "Condition",
            "identifier": [{"system": EHR_CONDITIONS, "value": format!("{}-diagnosi", self.tag)}],
            "verificationStatus": {"coding": [{"system": VER_STATUS, "code": self.verification}]},
            "category": [{"coding": [{"system": CONDITION_CATEGORY, "code": "encounter-diagnosis", "display": "Encounter Diagnosis"}]}],
            "code": {"coding": [icd9_coding(&self.code)]},
            "subject": {"reference": r(PATIENT)},
            "recorder": {"reference": r(DOCTOR)}
        });
        if self.verification != "entered-in-error" {
            c["clinicalStatus"] =
                json!({"coding": [{"system": CLINICAL_STATUS, "code": "active"}]});
        }
        if let Some(onset) = &self.onset {
            c["onsetDateTime"] = json!(onset);
        }
        if let Some(recorded) = &self.recorded {
            c["recordedDate"] = json!(recorded);
        }
        let mut extensions = Vec::new();
        if let Some(k) = &self.community {
            extensions.push(json!({
                "url": canon("StructureDefinition/comunita"),
                "extension": [
                    {"url": "tipo", "valueCode": k.tipo},
                    {"url": "identificativo", "valueIdentifier": {"system": k.system, "value": k.value}},
                    {"url": "nome", "valueString": k.nome},
                    {"url": "persone-a-rischio", "valueInteger": k.at_risk}
                ]
            }));
        }
        if let Some(t) = &self.treatments {
            extensions.push(json!({
                "url": canon("StructureDefinition/precedenti-trattamenti"),
                "valueCode": t
            }));
        }
        if !extensions.is_empty() {
            c["extension"] = Value::Array(extensions);
        }
        c
    }

    fn criterion_resource(&self, i: usize, r: &dyn Fn(usize) -> String) -> Value {
        let (code, esito) = &self.criteria[i];
        criterion_observation(
            code,
            esito,
            &r(PATIENT),
            None,
            &format!("{}-criterio-{i}", self.tag),
            self.recorded.as_deref().unwrap_or(&self.sent),
        )
    }

    fn segnalazione_resource(&self, r: &dyn Fn(usize) -> String) -> Value {
        let mut payload = Vec::new();
        if self.with_condition {
            payload.push(
                json!({"contentReference": {"reference": r(CONDITION), "display": "Diagnosi"}}),
            );
        }
        for i in 0..self.criteria.len() {
            payload.push(json!({"contentReference": {"reference": r(CRITERION + i)}}));
        }
        for i in 0..self.lab.len() {
            payload.push(json!({"contentReference": {"reference": r(LAB + i)}}));
        }
        let mut c = json!({
            "resourceType": "Communication",
            "identifier": [{"system": EHR_SEGNALAZIONI, "value": format!("{}-segnalazione", self.tag)}],
            "status": "completed",
            "subject": {"reference": r(PATIENT)},
            "sent": self.sent,
            "sender": {"reference": r(DOCTOR)},
            "recipient": [{"reference": r(ASL)}]
        });
        if !payload.is_empty() {
            c["payload"] = Value::Array(payload);
        }
        if self.profiled {
            c["meta"] = json!({"profile": [canon("StructureDefinition/segnalazione")]});
        }
        let reason = match &self.reason {
            None => Some(self.code.clone()),
            Some(r) => r.clone(),
        };
        if let Some(code) = reason {
            c["reasonCode"] = json!([{"coding": [icd9_coding(&code)]}]);
        }
        c
    }

    /// Every resource with its slot, references made by `r`, in the order an EHR sends them.
    fn resources(&self, r: &dyn Fn(usize) -> String) -> Vec<(usize, Value)> {
        let mut out = vec![
            (PATIENT, self.patient_resource()),
            (DOCTOR, self.doctor_resource()),
            (ASL, self.asl_resource()),
        ];
        if self.with_condition {
            out.push((CONDITION, self.condition_resource(r)));
        }
        for i in 0..self.criteria.len() {
            out.push((CRITERION + i, self.criterion_resource(i, r)));
        }
        for (i, obs) in self.lab.iter().enumerate() {
            let mut obs = obs.clone();
            obs["subject"] = json!({"reference": r(PATIENT)});
            obs["identifier"] =
                json!([{"system": EHR_CRITERIA, "value": format!("{}-lab-{i}", self.tag)}]);
            out.push((LAB + i, obs));
        }
        out.push((SEGNALAZIONE, self.segnalazione_resource(r)));
        out
    }

    /// The EHR's transaction Bundle (urn:uuid fullUrls; Patient, doctor and ASL always conditional,
    /// the rest conditional on its business identifier unless `unconditional`).
    fn bundle(&self) -> Value {
        let entries: Vec<Value> = self
            .resources(&full_url)
            .into_iter()
            .map(|(slot, resource)| {
                let rt = resource["resourceType"].as_str().unwrap().to_string();
                let mut request = json!({"method": "POST", "url": rt});
                let shared = matches!(slot, PATIENT | DOCTOR | ASL);
                if shared || self.conditional {
                    let id = &resource["identifier"][0];
                    request["ifNoneExist"] = json!(format!(
                        "identifier={}|{}",
                        id["system"].as_str().unwrap(),
                        id["value"].as_str().unwrap()
                    ));
                }
                json!({"fullUrl": full_url(slot), "resource": resource, "request": request})
            })
            .collect();
        json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    }

    /// The id a piece gets when it is sent on its own with `PUT /fhir/<Type>/<id>`.
    fn piece_id(&self, slot: usize) -> String {
        match slot {
            PATIENT => format!("paz-{}", self.cf),
            DOCTOR => format!("medico-{}", self.doctor),
            ASL => format!("asl-{}", self.notifier.0),
            CONDITION => format!("{}-diagnosi", self.tag),
            SEGNALAZIONE => format!("{}-segnalazione", self.tag),
            s if s >= LAB => format!("{}-lab-{}", self.tag, s - LAB),
            s => format!("{}-criterio-{}", self.tag, s - CRITERION),
        }
    }

    fn piece_reference(&self, slot: usize) -> String {
        let rt = match slot {
            PATIENT => "Patient",
            DOCTOR => "Practitioner",
            ASL => "Organization",
            CONDITION => "Condition",
            SEGNALAZIONE => "Communication",
            _ => "Observation",
        };
        format!("{rt}/{}", self.piece_id(slot))
    }

    /// Each resource on its own: (slot, `Type/id`, resource with that id and literal references).
    fn pieces(&self) -> Vec<(usize, String, Value)> {
        let refs = |slot: usize| self.piece_reference(slot);
        self.resources(&refs)
            .into_iter()
            .map(|(slot, mut resource)| {
                resource["id"] = json!(self.piece_id(slot));
                (slot, self.piece_reference(slot), resource)
            })
            .collect()
    }
}

/// A `criterio-diagnostico` Observation (`focus` → the Condition when given).
fn criterion_observation(
    code: &str,
    esito: &str,
    patient: &str,
    focus: Option<&str>,
    identifier: &str,
    effective: &str,
) -> Value {
    let mut o = json!({
        "resourceType": "Observation",
        "meta": {"profile": [canon("StructureDefinition/criterio-diagnostico")]},
        "identifier": [{"system": EHR_CRITERIA, "value": identifier}],
        "status": "final",
        "code": {"coding": [{"system": canon("CodeSystem/criterio-diagnostico"), "code": code}]},
        "subject": {"reference": patient},
        "effectiveDateTime": effective,
        "valueCodeableConcept": {"coding": [{"system": canon("CodeSystem/esito-criterio"), "code": esito}]}
    });
    if let Some(f) = focus {
        o["focus"] = json!([{"reference": f}]);
    }
    if matches!(code, "coltura" | "esame-diretto") {
        o["bodySite"] = json!({"coding": [{"system": SNOMED, "code": "39607008", "display": "Lung structure"}]});
    }
    o
}

const SALMONELLA: (&str, &str) = ("27268008", "Salmonella");
const MYCOBACTERIUM_TUBERCULOSIS: (&str, &str) = ("113861009", "Mycobacterium tuberculosis");
const NOT_DETECTED: (&str, &str) = ("260415000", "Not detected");

/// A laboratory culture Observation (LOINC), its organism or answer as SNOMED CT (None: no value yet).
fn lab_culture(loinc: &str, display: &str, status: &str, value: Option<(&str, &str)>) -> Value {
    let mut o = json!({
        "resourceType": "Observation",
        "status": status,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory", "display": "Laboratory"}]}],
        "code": {"coding": [{"system": LOINC, "code": loinc, "display": display}]},
        "effectiveDateTime": hours_ago(6)
    });
    if let Some((code, display)) = value {
        o["valueCodeableConcept"] =
            json!({"coding": [{"system": SNOMED, "code": code, "display": display}]});
    }
    o
}

// =================================================================================================
// Posting and reading

/// A transaction that went through, with what each slot became.
struct Posted {
    body: Value,
    refs: HashMap<usize, String>,
    index: HashMap<usize, usize>,
}

impl Posted {
    fn at(&self, slot: usize) -> String {
        self.refs
            .get(&slot)
            .unwrap_or_else(|| panic!("no entry in slot {slot}"))
            .clone()
    }
    fn patient(&self) -> String {
        self.at(PATIENT)
    }
    fn condition(&self) -> String {
        self.at(CONDITION)
    }
    fn segnalazione(&self) -> String {
        self.at(SEGNALAZIONE)
    }
    fn criterion(&self, i: usize) -> String {
        self.at(CRITERION + i)
    }
    fn response(&self, slot: usize) -> &Value {
        &self.body["entry"][self.index[&slot]]["response"]
    }
    /// The receipt: the segnalazione entry's `response.outcome`.
    fn receipt(&self) -> Receipt {
        receipt_in(&self.response(SEGNALAZIONE)["outcome"])
    }
}

fn stored_reference(entry: &Value) -> String {
    let resource = &entry["resource"];
    if let (Some(rt), Some(id)) = (resource["resourceType"].as_str(), resource["id"].as_str()) {
        return format!("{rt}/{id}");
    }
    let location = entry["response"]["location"]
        .as_str()
        .unwrap_or_else(|| panic!("a location in {entry:#}"));
    let location = location.split("/_history").next().unwrap();
    let parts: Vec<&str> = location.rsplitn(3, '/').collect();
    format!("{}/{}", parts[1], parts[0])
}

async fn post_bundle(app: &TestApp, bundle: &Value) -> Posted {
    let r = app.post("/fhir", bundle).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["type"], "transaction-response", "{}", r.text);
    let answers = r.body["entry"].as_array().expect("response entries");
    let requests = bundle["entry"].as_array().expect("request entries");
    assert_eq!(answers.len(), requests.len(), "{}", r.text);
    let mut refs = HashMap::new();
    let mut index = HashMap::new();
    for (i, (q, a)) in requests.iter().zip(answers).enumerate() {
        let slot = slot_of(q["fullUrl"].as_str().expect("fullUrl"));
        refs.insert(slot, stored_reference(a));
        index.insert(slot, i);
    }
    Posted {
        body: r.body,
        refs,
        index,
    }
}

async fn post_report(app: &TestApp, report: &Report) -> Posted {
    post_bundle(app, &report.bundle()).await
}

/// PUT each piece of a report, in `order` (slots); returns the responses.
async fn put_pieces(app: &TestApp, report: &Report, order: &[usize]) -> HashMap<usize, Resp> {
    let pieces = report.pieces();
    let mut out = HashMap::new();
    for slot in order {
        let (_, reference, resource) = pieces
            .iter()
            .find(|(s, _, _)| s == slot)
            .unwrap_or_else(|| panic!("no piece in slot {slot}"));
        let r = app
            .put(
                &format!("/fhir/{reference}"),
                resource,
                &[("Prefer", "return=OperationOutcome")],
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{reference}: {}", r.text);
        out.insert(*slot, r);
    }
    out
}

/// Read, change and write back a stored resource (the EHR's correction); returns the response.
async fn correct(app: &TestApp, reference: &str, change: impl FnOnce(&mut Value)) -> Resp {
    let current = app.get(&format!("/fhir/{reference}")).await;
    assert_eq!(current.status, StatusCode::OK, "{}", current.text);
    let mut resource = current.body;
    change(&mut resource);
    let r = app
        .put(
            &format!("/fhir/{reference}"),
            &resource,
            &[("Prefer", "return=OperationOutcome")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r
}

/// Set a Condition's verificationStatus (an entered-in-error Condition has no clinicalStatus: con-5).
fn set_verification(condition: &mut Value, code: &str) {
    condition["verificationStatus"] = json!({"coding": [{"system": VER_STATUS, "code": code}]});
    if code == "entered-in-error" {
        condition
            .as_object_mut()
            .unwrap()
            .shift_remove("clinicalStatus");
    }
}

/// A criterion Observation sent on its own, `focus` → the Condition (later evidence).
async fn post_later_evidence(
    app: &TestApp,
    posted: &Posted,
    code: &str,
    esito: &str,
    id: &str,
) -> String {
    let obs = criterion_observation(
        code,
        esito,
        &posted.patient(),
        Some(&posted.condition()),
        id,
        &minutes_ago(5),
    );
    let r = app.post("/fhir/Observation", &obs).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    format!("Observation/{}", r.body["id"].as_str().expect("id"))
}

/// Current resources matching a search (`Type?params`), every page of up to 100.
async fn search(app: &TestApp, query: &str) -> Vec<Value> {
    let sep = if query.contains('?') { '&' } else { '?' };
    let r = app.get(&format!("/fhir/{query}{sep}_count=100")).await;
    assert_eq!(r.status, StatusCode::OK, "{query}: {}", r.text);
    let found: Vec<Value> = r.body["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"].as_str().unwrap_or("match") == "match")
        .map(|e| e["resource"].clone())
        .collect();
    assert_eq!(
        r.body["total"].as_u64(),
        Some(found.len() as u64),
        "{}",
        r.text
    );
    found
}

/// Every `notifica-caso` (any status) matching `extra` (`&param=value…`).
async fn notifications(app: &TestApp, extra: &str) -> Vec<Value> {
    search(
        app,
        &format!(
            "Communication?_profile={}{extra}",
            canon("StructureDefinition/notifica-caso")
        ),
    )
    .await
}

/// Every case notification of a patient, any status.
async fn cases_of(app: &TestApp, patient: &str) -> Vec<Value> {
    notifications(app, &format!("&subject={patient}")).await
}

/// The patient's active (`completed`) case notifications.
async fn active_cases_of(app: &TestApp, patient: &str) -> Vec<Value> {
    notifications(app, &format!("&subject={patient}&status=completed")).await
}

/// The one and only case notification of a patient.
async fn the_case_of(app: &TestApp, patient: &str) -> Value {
    let mut all = cases_of(app, patient).await;
    assert_eq!(
        all.len(),
        1,
        "expected exactly one case of {patient}: {all:#?}"
    );
    all.remove(0)
}

async fn assert_no_case(app: &TestApp, patient: &str) {
    let all = cases_of(app, patient).await;
    assert!(all.is_empty(), "expected no case of {patient}: {all:#?}");
}

/// Every `focolaio` notification, any status.
async fn outbreaks(app: &TestApp) -> Vec<Value> {
    notifications(
        app,
        &format!("&category={}|focolaio", canon("CodeSystem/tipo-notifica")),
    )
    .await
}

async fn the_outbreak(app: &TestApp) -> Value {
    let mut all = outbreaks(app).await;
    assert_eq!(all.len(), 1, "expected exactly one focolaio: {all:#?}");
    all.remove(0)
}

async fn read(app: &TestApp, reference: &str) -> Value {
    let r = app.get(&format!("/fhir/{reference}")).await;
    assert_eq!(r.status, StatusCode::OK, "{reference}: {}", r.text);
    r.body
}

fn reference_of(resource: &Value) -> String {
    format!(
        "{}/{}",
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    )
}

// =================================================================================================
// Receipts

#[derive(Debug)]
struct Receipt {
    code: String,
    severity: String,
    text: String,
    issue: Value,
    outcome: Value,
}

impl Receipt {
    /// Any issue of the outcome with severity warning.
    fn has_warning(&self) -> bool {
        self.outcome["issue"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["severity"] == "warning")
    }

    /// A receipt issue (esito-segnalazione) with severity warning.
    fn has_esito_warning(&self) -> bool {
        let system = canon("CodeSystem/esito-segnalazione");
        self.outcome["issue"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| {
                i["details"]["coding"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["system"] == system.as_str())
            })
            .any(|i| i["severity"] == "warning")
    }
}

/// The receipt in an OperationOutcome: its issue whose `details.coding` is from `esito-segnalazione`.
fn receipt_in(outcome: &Value) -> Receipt {
    assert_eq!(
        outcome["resourceType"], "OperationOutcome",
        "no receipt: {outcome:#}"
    );
    let system = canon("CodeSystem/esito-segnalazione");
    let issues: Vec<&Value> = outcome["issue"]
        .as_array()
        .expect("issue")
        .iter()
        .filter(|i| {
            i["details"]["coding"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["system"] == system.as_str())
        })
        .collect();
    assert!(
        !issues.is_empty(),
        "no esito-segnalazione issue in {outcome:#}"
    );
    let issue = issues[0];
    let coding = issue["details"]["coding"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["system"] == system.as_str())
        .unwrap();
    assert_eq!(issue["code"], "informational", "{outcome:#}");
    let text = issue["details"]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("details.text in {outcome:#}"))
        .to_string();
    assert!(!text.trim().is_empty(), "{outcome:#}");
    Receipt {
        code: coding["code"].as_str().unwrap().to_string(),
        severity: issue["severity"].as_str().unwrap_or_default().to_string(),
        text,
        issue: issue.clone(),
        outcome: outcome.clone(),
    }
}

// =================================================================================================
// Reading a notification

fn extensions<'a>(v: &'a Value, url: &str) -> Vec<&'a Value> {
    v["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["url"] == url)
        .collect()
}

fn extension_opt<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    let url = canon(&format!("StructureDefinition/{name}"));
    let found = extensions(v, &url);
    assert!(found.len() <= 1, "extension {name} repeated in {v:#}");
    found.first().copied()
}

fn extension<'a>(v: &'a Value, name: &str) -> &'a Value {
    extension_opt(v, name).unwrap_or_else(|| panic!("no extension {name} in {v:#}"))
}

fn sub<'a>(ext: &'a Value, url: &str) -> Option<&'a Value> {
    let found = extensions(ext, url);
    assert!(found.len() <= 1, "sub-extension {url} repeated in {ext:#}");
    found.first().copied()
}

fn category(case: &Value) -> String {
    let system = canon("CodeSystem/tipo-notifica");
    let codes: Vec<String> = case["category"]
        .as_array()
        .expect("category")
        .iter()
        .flat_map(|c| c["coding"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["system"] == system.as_str())
        .map(|c| c["code"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(codes.len(), 1, "one tipo-notifica category: {case:#}");
    codes[0].clone()
}

/// The ICD-9-CM code of `reasonCode[i]`.
fn reason_code(case: &Value, i: usize) -> Option<String> {
    let coding = case["reasonCode"][i]["coding"]
        .as_array()?
        .iter()
        .find(|c| c["system"] == ICD9)?
        .clone();
    coding["code"].as_str().map(String::from)
}

fn reason_codes(case: &Value) -> Vec<String> {
    (0..case["reasonCode"].as_array().map_or(0, Vec::len))
        .filter_map(|i| reason_code(case, i))
        .collect()
}

fn assert_reason(case: &Value, listed: &str, reported: &str) {
    assert_eq!(reason_code(case, 0).as_deref(), Some(listed), "{case:#}");
    if listed == reported {
        assert_eq!(reason_codes(case), vec![listed.to_string()], "{case:#}");
    } else {
        assert_eq!(reason_code(case, 1).as_deref(), Some(reported), "{case:#}");
    }
    for rc in case["reasonCode"].as_array().unwrap() {
        for c in rc["coding"].as_array().unwrap() {
            assert_eq!(c["system"], ICD9, "{case:#}");
            assert!(
                !c["display"].as_str().unwrap_or_default().is_empty(),
                "reasonCode with display: {case:#}"
            );
        }
    }
}

/// The recipients as (system without the CANON prefix, value), e.g. ("sid/asl", "030321").
fn recipients(case: &Value) -> BTreeSet<(String, String)> {
    case["recipient"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let system = r["identifier"]["system"].as_str().unwrap_or_default();
            let value = r["identifier"]["value"].as_str().unwrap_or_default();
            assert!(
                !r["display"].as_str().unwrap_or_default().is_empty(),
                "recipient with display: {r}"
            );
            (
                system
                    .strip_prefix(&format!("{CANON}/"))
                    .unwrap_or(system)
                    .to_string(),
                value.to_string(),
            )
        })
        .collect()
}

fn r_asl(code: &str) -> (String, String) {
    ("sid/asl".into(), code.into())
}
fn r_region(code: &str) -> (String, String) {
    ("sid/regione".into(), code.into())
}
fn r_minsal() -> (String, String) {
    ("sid/ente".into(), "MINSAL".into())
}
fn r_iss() -> (String, String) {
    ("sid/ente".into(), "ISS".into())
}
fn set<T: Ord + Clone>(items: &[T]) -> BTreeSet<T> {
    items.iter().cloned().collect()
}
fn strings(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn recipient_display<'a>(case: &'a Value, system: &str, value: &str) -> &'a str {
    case["recipient"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["identifier"]["system"] == canon(system).as_str() && r["identifier"]["value"] == value
        })
        .and_then(|r| r["display"].as_str())
        .unwrap_or_else(|| panic!("no recipient {system}|{value}: {:#}", case["recipient"]))
}

fn references(case: &Value, element: &str) -> BTreeSet<String> {
    case[element]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["reference"].as_str().expect("a reference").to_string())
        .collect()
}

fn about(case: &Value) -> BTreeSet<String> {
    references(case, "about")
}

fn in_response_to(case: &Value) -> BTreeSet<String> {
    references(case, "inResponseTo")
}

/// The `criteri-soddisfatti` of a case: (system without CANON prefix, code) → evidence references.
fn criteria_met(case: &Value) -> Vec<(String, String, Option<String>)> {
    let mut out: Vec<(String, String, Option<String>)> =
        extensions(case, &canon("StructureDefinition/criteri-soddisfatti"))
            .into_iter()
            .map(|ext| {
                let coding = &sub(ext, "criterio").expect("criterio")["valueCoding"];
                let system = coding["system"].as_str().expect("criterio system");
                let evidence = sub(ext, "evidenza")
                    .and_then(|e| e["valueReference"]["reference"].as_str())
                    .map(String::from);
                (
                    system
                        .strip_prefix(&format!("{CANON}/"))
                        .unwrap_or(system)
                        .to_string(),
                    coding["code"].as_str().expect("criterio code").to_string(),
                    evidence,
                )
            })
            .collect();
    out.sort();
    out
}

/// The `criterio-diagnostico` codes that held.
fn criteria_codes(case: &Value) -> BTreeSet<String> {
    criteria_met(case)
        .into_iter()
        .filter(|(s, _, _)| s == "CodeSystem/criterio-diagnostico")
        .map(|(_, c, _)| c)
        .collect()
}

/// The TB criteria (A…D) that held.
fn tb_criteria(case: &Value) -> BTreeSet<String> {
    criteria_met(case)
        .into_iter()
        .filter(|(s, _, _)| s == "CodeSystem/criterio-tubercolosi")
        .map(|(_, c, _)| c)
        .collect()
}

fn version(case: &Value) -> u32 {
    case["meta"]["versionId"]
        .as_str()
        .expect("versionId")
        .parse()
        .expect("a numeric versionId")
}

fn scadenza(case: &Value) -> Option<OffsetDateTime> {
    extension_opt(case, "scadenza")
        .map(|e| instant(e["valueDateTime"].as_str().expect("scadenza valueDateTime")))
}

fn in_ritardo(case: &Value) -> Option<bool> {
    extension_opt(case, "in-ritardo").map(|e| {
        e["valueBoolean"]
            .as_bool()
            .expect("in-ritardo valueBoolean")
    })
}

fn esito_accertamento(case: &Value) -> Option<String> {
    extension_opt(case, "esito-accertamento")
        .map(|e| e["valueCode"].as_str().expect("valueCode").to_string())
}

/// Everything the contract fixes for every active case notification of a patient.
fn assert_case(case: &Value, patient: &str, expected_category: &str) {
    assert_eq!(case["resourceType"], "Communication");
    let id = case["id"].as_str().expect("id");
    assert!(
        case["meta"]["profile"]
            .as_array()
            .expect("meta.profile")
            .iter()
            .any(|p| p == canon("StructureDefinition/notifica-caso").as_str()),
        "{case:#}"
    );
    let ids: Vec<&Value> = case["identifier"]
        .as_array()
        .expect("identifier")
        .iter()
        .filter(|i| i["system"] == canon("sid/caso").as_str())
        .collect();
    assert_eq!(ids.len(), 1, "{case:#}");
    assert_eq!(ids[0]["value"], id, "{case:#}");
    assert_eq!(case["status"], "completed", "{case:#}");
    assert_eq!(category(case), expected_category, "{case:#}");
    let priority = if expected_category == "classe-1" {
        "stat"
    } else {
        "routine"
    };
    assert_eq!(case["priority"], priority, "{case:#}");
    if expected_category == "focolaio" {
        assert!(
            case["subject"].is_null(),
            "a focolaio has no subject: {case:#}"
        );
    } else {
        assert_eq!(case["subject"]["reference"], patient, "{case:#}");
    }
    instant(case["sent"].as_str().expect("sent"));
    assert_eq!(
        extension(case, "definizione-caso")["valueCanonical"],
        canon("definizione-caso/dm-15-12-1990|1.0.0").as_str(),
        "{case:#}"
    );
    assert!(
        !case["payload"][0]["contentString"]
            .as_str()
            .expect("payload[0].contentString")
            .trim()
            .is_empty(),
        "{case:#}"
    );
}

/// A patient's case decided on one report: category, the report in `about` and `inResponseTo`.
fn assert_case_of_report(case: &Value, posted: &Posted, expected_category: &str) {
    assert_case(case, &posted.patient(), expected_category);
    assert!(about(case).contains(&posted.condition()), "{case:#}");
    assert!(about(case).contains(&posted.segnalazione()), "{case:#}");
    assert_eq!(
        in_response_to(case),
        strings(&[&posted.segnalazione()]),
        "{case:#}"
    );
}

fn assert_hours_after(deadline: Option<OffsetDateTime>, from: &str, hours: i64, case: &Value) {
    assert_eq!(
        deadline,
        Some(instant(from) + time::Duration::hours(hours)),
        "scadenza = recordedDate + {hours} h: {case:#}"
    );
}

// =================================================================================================
// Subscriptions

/// Fast delivery settings for the subscription tests.
fn fast(c: &mut Config) {
    c.delivery_backoff_ms = 50;
    c.delivery_backoff_max_ms = 200;
    c.delivery_poll_ms = 50;
    c.delivery_timeout_ms = 2000;
}

/// Both databases, with fast delivery settings.
macro_rules! on_both_databases_fast {
    ($(async fn $name:ident($app:ident) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                async fn run($app: TestApp) $body
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() { run(TestApp::sqlite_with(fast).await).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() { run(TestApp::postgres_with(fast).await).await }
            }
        )*
    };
}

/// Create a Subscription and wait for its handshake to make it active.
async fn subscribe_active(app: &TestApp, s: &Value) -> String {
    let r = app.post("/fhir/Subscription", s).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = app
            .request(Method::GET, &format!("/fhir/Subscription/{id}"), &[], None)
            .await;
        if r.body["status"] == "active" {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "Subscription/{id} never became active: {}",
            r.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Communication id a notification event's focus names (`…/Communication/<id>/_history/<n>`).
fn focus_id(focus: &str) -> String {
    focus
        .split("/Communication/")
        .nth(1)
        .unwrap_or_else(|| panic!("focus is not a Communication: {focus}"))
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

/// The Communication ids a hook received in event notifications, in order.
async fn received_ids(hook: &Hook) -> Vec<String> {
    hook.of_type("event-notification")
        .await
        .iter()
        .flat_map(events_of)
        .map(|(_, focus)| focus_id(&focus))
        .collect()
}

/// Wait (with a deadline) until a hook has received an event about `id`; returns every id received.
/// Deliveries come in event-number order, so everything the hook was due before `id` is there too.
async fn wait_for_event_about(hook: &Hook, id: &str, secs: u64) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let ids = received_ids(hook).await;
        if ids.iter().any(|i| i == id) {
            return ids;
        }
        assert!(
            Instant::now() < deadline,
            "no event about Communication/{id} within {secs} s; received {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// =================================================================================================
// Shorthands for the tests

/// A class II morbillo (055.9) report with the clinical criterion: notified at once.
fn morbillo(tag: &str, person: u32) -> Report {
    Report::new(tag, "055.9").person(person).positive("clinica")
}

/// A confirmed pulmonary TB report (011.94) of patient `person`, new case, no criteria yet.
fn tb(tag: &str, person: u32) -> Report {
    Report::new(tag, "011.94")
        .person(person)
        .treatments("nuovo-caso")
}

/// A class IV pediculosis (132.0) case in a school.
fn pediculosi(tag: &str, person: u32, school_code: &str, onset_days_ago: i64) -> Report {
    Report::new(tag, "132.0")
        .person(person)
        .onset(&days_ago(onset_days_ago))
        .community(school(
            school_code,
            &format!("Scuola primaria statale {school_code}"),
            24,
        ))
}

// =================================================================================================

on_both_databases! {
    // ---- the builder's Bundle is the shape the fixture shows ----------------------------------------

    async fn the_fixture_is_what_the_builder_sends(app) {
        let written = fixture("dm1990/segnalazione-morbillo-transaction.json");
        let built = morbillo("fixture", 1).bundle();
        let shape = |b: &Value| -> Vec<(String, String, Option<String>)> {
            b["entry"].as_array().unwrap().iter().map(|e| (
                e["fullUrl"].as_str().unwrap().to_string(),
                e["resource"]["resourceType"].as_str().unwrap().to_string(),
                e["request"]["ifNoneExist"].as_str().map(|q| q.split('|').next().unwrap().to_string()),
            )).collect()
        };
        assert_eq!(shape(&written), shape(&built));
        // the written fixture is a valid report: it is accepted and notified
        let posted = post_bundle(&app, &written).await;
        assert_eq!(posted.receipt().code, "notificato", "{:#?}", posted.receipt());
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-2");
    }

    // ---- class I: immediate notification, on suspicion -------------------------------------------

    async fn class_i_suspected_case_is_notified_at_once_with_priority_stat(app) {
        let report = Report::new("colera", "001.0").provisional();
        let posted = post_report(&app, &report).await;
        assert!(posted.body["entry"].as_array().unwrap().iter().all(|e| e["response"]["status"] == "201 Created"), "{:#}", posted.body);
        let receipt = posted.receipt();
        assert_eq!(receipt.code, "notificato", "{receipt:#?}");
        assert_eq!(receipt.severity, "information", "{receipt:#?}");
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-1");
        assert_eq!(case["priority"], "stat");
        assert_reason(&case, "001", "001.0");
        assert_eq!(recipients(&case), set(&[r_asl(MILANO.asl), r_region(MILANO.region), r_minsal(), r_iss()]), "{case:#}");
        assert_eq!(recipient_display(&case, "sid/ente", "MINSAL"), "Ministero della Salute");
        assert_eq!(recipient_display(&case, "sid/ente", "ISS"), "Istituto Superiore di Sanità");
        assert_eq!(recipient_display(&case, "sid/regione", "030"), "Lombardia");
        assert_eq!(esito_accertamento(&case), None, "a suspected case has no outcome yet: {case:#}");
        assert_eq!(version(&case), 1);
    }

    async fn class_i_every_listed_disease_is_notified_at_once(app) {
        // (reported code, listed code when the contract fixes it)
        let rows: [(&str, Option<&str>); 14] = [
            ("001.0", Some("001")),   // colera
            ("060.9", Some("060")),   // febbre gialla
            ("020.9", Some("020")),   // peste
            ("080", Some("080")),     // tifo esantematico
            ("032.9", Some("032")),   // difterite
            ("071", Some("071")),     // rabbia
            ("124", Some("124")),     // trichinosi
            ("087.0", Some("087")),   // febbre ricorrente epidemica
            ("078.7", Some("078")),   // febbri emorragiche virali (arenavirus: Lassa)
            ("045.90", Some("045")),  // poliomielite
            ("005.1", Some("005.1")), // botulismo
            ("037", Some("037")),     // tetano
            ("046.11", Some("046.1")), // variante della malattia di Creutzfeldt-Jakob (O.M. 2001)
            ("046.71", Some("046.7")), // sindrome di Gerstmann-Sträussler-Scheinker (O.M. 2001)
        ];
        for (n, (code, listed)) in rows.iter().enumerate() {
            let posted = post_report(&app, &Report::new(&format!("c1-{n}"), code).person(n as u32 + 1).provisional()).await;
            assert_eq!(posted.receipt().code, "notificato", "{code}: {:#?}", posted.receipt());
            let case = the_case_of(&app, &posted.patient()).await;
            assert_case_of_report(&case, &posted, "classe-1");
            if let Some(listed) = listed {
                assert_reason(&case, listed, code);
            } else {
                assert!(reason_codes(&case).contains(&code.to_string()), "{code}: {case:#}");
            }
            assert!(recipients(&case).contains(&r_minsal()) && recipients(&case).contains(&r_iss()), "{code}: {case:#}");
        }
    }

    async fn class_i_influenza_with_viral_isolation_487(app) {
        let report = Report::new("influenza", "487.1").positive("clinica").positive("coltura");
        let posted = post_report(&app, &report).await;
        assert_eq!(posted.receipt().code, "notificato", "{:#?}", posted.receipt());
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-1");
        assert_reason(&case, "487", "487.1");
    }

    async fn a_patient_who_died_before_the_report_is_still_notified(app) {
        let report = Report::new("difterite", "032.9").provisional().deceased(&hours_ago(3));
        let posted = post_report(&app, &report).await;
        assert_eq!(posted.receipt().code, "notificato", "{:#?}", posted.receipt());
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-1");
        let measles = post_report(&app, &morbillo("morbillo", 2).deceased(&hours_ago(2))).await;
        assert_case_of_report(&the_case_of(&app, &measles.patient()).await, &measles, "classe-2");
    }

    async fn class_i_confirmation_is_a_new_version_with_esito_confermato(app) {
        let posted = post_report(&app, &Report::new("difterite", "032.9").provisional()).await;
        let suspected = the_case_of(&app, &posted.patient()).await;
        correct(&app, &posted.condition(), |c| set_verification(c, "confirmed")).await;
        let confirmed = the_case_of(&app, &posted.patient()).await;
        assert_eq!(confirmed["id"], suspected["id"]);
        assert_eq!(confirmed["identifier"], suspected["identifier"]);
        assert!(version(&confirmed) > version(&suspected), "{confirmed:#}");
        assert_case(&confirmed, &posted.patient(), "classe-1");
        assert_eq!(esito_accertamento(&confirmed).as_deref(), Some("confermato"), "{confirmed:#}");
        assert_eq!(confirmed["sent"], suspected["sent"], "sent is when the case was first decided");
        // the first version still says what was notified on suspicion
        let v1 = read(&app, &format!("Communication/{}/_history/1", suspected["id"].as_str().unwrap())).await;
        assert_eq!(esito_accertamento(&v1), None);
    }

    async fn class_i_exclusion_is_a_new_version_with_esito_escluso(app) {
        let posted = post_report(&app, &Report::new("peste", "020.9").provisional()).await;
        let suspected = the_case_of(&app, &posted.patient()).await;
        correct(&app, &posted.condition(), |c| set_verification(c, "refuted")).await;
        let excluded = the_case_of(&app, &posted.patient()).await;
        assert_eq!(excluded["id"], suspected["id"]);
        assert_eq!(excluded["identifier"], suspected["identifier"]);
        assert!(version(&excluded) > version(&suspected));
        // the decree wants the negative result sent: the notification stays completed
        assert_case(&excluded, &posted.patient(), "classe-1");
        assert_eq!(esito_accertamento(&excluded).as_deref(), Some("escluso"), "{excluded:#}");
    }

    async fn class_i_confirmed_at_once_is_notified_with_esito_confermato(app) {
        let posted = post_report(&app, &Report::new("tetano", "037")).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-1");
        assert_reason(&case, "037", "037");
        assert_eq!(esito_accertamento(&case).as_deref(), Some("confermato"), "{case:#}");
    }

    async fn class_i_entered_in_error_withdraws_the_case(app) {
        let posted = post_report(&app, &Report::new("rabbia", "071").provisional()).await;
        let case = the_case_of(&app, &posted.patient()).await;
        correct(&app, &posted.condition(), |c| set_verification(c, "entered-in-error")).await;
        let withdrawn = the_case_of(&app, &posted.patient()).await;
        assert_eq!(withdrawn["id"], case["id"]);
        assert_eq!(withdrawn["identifier"], case["identifier"]);
        assert_eq!(withdrawn["status"], "entered-in-error", "{withdrawn:#}");
        assert!(active_cases_of(&app, &posted.patient()).await.is_empty());
    }

    // ---- class II: notified when every marked criterion holds --------------------------------------

    async fn class_ii_clinical_criterion_alone_is_enough_for_morbillo(app) {
        let posted = post_report(&app, &morbillo("morbillo", 1)).await;
        assert_eq!(posted.receipt().code, "notificato");
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-2");
        assert_reason(&case, "055", "055.9");
        assert_eq!(criteria_codes(&case), strings(&["clinica"]), "{case:#}");
        let clinica = criteria_met(&case).into_iter().find(|(_, c, _)| c == "clinica").unwrap();
        assert_eq!(clinica.2.as_deref(), Some(posted.criterion(0).as_str()), "evidenza → the clinical Observation");
        assert!(about(&case).contains(&posted.criterion(0)), "{case:#}");
        // ASL and region; no Ministry or ISS for class II
        assert_eq!(recipients(&case), set(&[r_asl(MILANO.asl), r_region(MILANO.region)]), "{case:#}");
        assert_eq!(esito_accertamento(&case), None);
    }

    async fn class_ii_clinical_and_serology_for_hepatitis_a(app) {
        let report = Report::new("epatite-a", "070.1").positive("clinica").positive("sierologia");
        let posted = post_report(&app, &report).await;
        assert_eq!(posted.receipt().code, "notificato");
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-2");
        assert_reason(&case, "070.1", "070.1");
        assert_eq!(criteria_codes(&case), strings(&["clinica", "sierologia"]), "{case:#}");
        assert!(about(&case).is_superset(&strings(&[&posted.criterion(0), &posted.criterion(1)])), "{case:#}");
    }

    async fn class_ii_clinical_and_culture_for_salmonellosis(app) {
        let report = Report::new("salmonella", "003.0").positive("clinica").positive("coltura");
        let posted = post_report(&app, &report).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-2");
        assert_reason(&case, "003", "003.0");
        assert!(criteria_codes(&case).contains("coltura"), "{case:#}");
    }

    async fn class_ii_clinical_and_direct_exam_for_meningococcal_meningitis(app) {
        let report = Report::new("meningococco", "036.0").positive("clinica").positive("esame-diretto");
        let posted = post_report(&app, &report).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-2");
        assert_reason(&case, "036", "036.0");
        assert_eq!(criteria_codes(&case), strings(&["clinica", "esame-diretto"]), "{case:#}");
    }

    async fn class_ii_missing_direct_exam_is_not_notified(app) {
        let posted = post_report(&app, &Report::new("meningococco", "036.0").positive("clinica")).await;
        assert_eq!(posted.receipt().code, "in-attesa", "{:#?}", posted.receipt());
        assert_no_case(&app, &posted.patient()).await;
    }

    async fn class_ii_missing_criterion_waits_and_later_evidence_completes_it(app) {
        // hepatitis A with the clinical picture only: serology (IgM anti-HAV) still missing
        let posted = post_report(&app, &Report::new("epatite-a", "070.1").positive("clinica")).await;
        let receipt = posted.receipt();
        assert_eq!(receipt.code, "in-attesa", "{receipt:#?}");
        assert!(receipt.text.to_lowercase().contains("sierolog"), "the receipt names the missing criterion: {receipt:#?}");
        assert_no_case(&app, &posted.patient()).await;
        // the serology result arrives days later, on its own, focus → the Condition
        let serology = post_later_evidence(&app, &posted, "sierologia", "positivo", "epatite-a-igm").await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-2");
        assert_eq!(criteria_codes(&case), strings(&["clinica", "sierologia"]), "{case:#}");
        assert!(about(&case).contains(&serology), "{case:#}");
        assert!(criteria_met(&case).iter().any(|(_, c, e)| c == "sierologia" && e.as_deref() == Some(serology.as_str())), "{case:#}");
    }

    async fn class_ii_positive_culture_alone_is_enough(app) {
        // salmonellosis with only a positive stool culture: no clinical criterion
        let posted = post_report(&app, &Report::new("coltura-sola", "003.0").positive("coltura")).await;
        assert_eq!(posted.receipt().code, "notificato", "{:#?}", posted.receipt());
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-2");
        assert_eq!(criteria_codes(&case), strings(&["coltura"]), "{case:#}");
        // also where the disease's marked criteria do not include culture (hepatitis A: clinical + serology)
        let other = post_report(&app, &Report::new("coltura-hav", "070.1").person(2).positive("coltura")).await;
        let case = the_case_of(&app, &other.patient()).await;
        assert_case_of_report(&case, &other, "classe-2");
    }

    async fn class_ii_negative_criterion_is_not_notified(app) {
        let report = Report::new("hav-neg", "070.1").positive("clinica").criterion("sierologia", "negativo");
        let posted = post_report(&app, &report).await;
        assert_eq!(posted.receipt().code, "in-attesa", "{:#?}", posted.receipt());
        assert_no_case(&app, &posted.patient()).await;
        // a culture in progress or not done is not positive either
        let report = Report::new("salm-in-corso", "003.0").person(2).criterion("coltura", "in-corso");
        let posted = post_report(&app, &report).await;
        assert_no_case(&app, &posted.patient()).await;
        let report = Report::new("salm-non-eff", "003.0").person(3).criterion("coltura", "non-effettuato");
        let posted = post_report(&app, &report).await;
        assert_no_case(&app, &posted.patient()).await;
    }

    async fn class_ii_every_listed_disease_is_notified_when_its_criteria_hold(app) {
        // (reported code, listed code, criteria marked X)
        let rows: [(&str, &str, &[&str]); 25] = [
            ("023.9", "023", &["clinica", "sierologia"]),      // brucellosi
            ("002.0", "002.0", &["clinica", "sierologia"]),    // febbre tifoide
            ("003.0", "003", &["clinica", "coltura"]),         // salmonellosi non tifoidee
            ("008.00", "008.0", &["clinica", "coltura"]),      // diarrea infettiva non da salmonella
            ("034.1", "034.1", &["clinica"]),                  // scarlattina
            ("055.9", "055", &["clinica"]),                    // morbillo
            ("072.9", "072", &["clinica"]),                    // parotite epidemica
            ("033.0", "033", &["clinica"]),                    // pertosse
            ("056.9", "056", &["clinica"]),                    // rosolia
            ("052.9", "052", &["clinica"]),                    // varicella
            ("100.9", "100", &["clinica", "sierologia"]),      // leptospirosi
            ("047.9", "047.9", &["clinica", "esame-liquorale"]), // meningite ed encefalite acuta virale
            ("085.1", "085.1", &["clinica", "esame-diretto"]), // leishmaniosi cutanea
            ("085.0", "085.0", &["clinica", "esame-diretto"]), // leishmaniosi viscerale
            ("070.1", "070.1", &["clinica", "sierologia"]),    // epatite A
            ("070.30", "070.3", &["clinica", "sierologia"]),   // epatite B
            ("070.9", "070.9", &["clinica", "sierologia"]),    // epatite NANB
            ("070.20", "070", &["clinica"]),                   // epatite virale non specificata
            ("482.84", "482.8", &["clinica", "sierologia"]),   // legionellosi
            ("082.0", "082", &["clinica", "sierologia"]),      // rickettsiosi
            ("036.0", "036", &["clinica", "esame-diretto"]),   // meningite meningococcica
            ("090.9", "090", &["clinica", "sierologia"]),      // sifilide
            ("098.0", "098", &["clinica", "esame-diretto"]),   // blenorragia
            ("021.9", "021", &["clinica", "coltura"]),         // tularemia
            ("027.0", "027.0", &["clinica", "coltura"]),       // listeriosi
        ];
        for (n, (code, listed, marked)) in rows.iter().enumerate() {
            let mut report = Report::new(&format!("c2-{n}"), code).person(n as u32 + 1);
            for c in marked.iter() {
                report = report.positive(c);
            }
            let posted = post_report(&app, &report).await;
            assert_eq!(posted.receipt().code, "notificato", "{code}: {:#?}", posted.receipt());
            let case = the_case_of(&app, &posted.patient()).await;
            assert_case_of_report(&case, &posted, "classe-2");
            assert_reason(&case, listed, code);
            assert!(criteria_codes(&case).is_superset(&marked.iter().filter(|c| **c != "esame-liquorale").map(|c| c.to_string()).collect()), "{code}: {case:#}");
        }
    }

    async fn class_ii_clinical_alone_is_not_enough_where_more_is_marked(app) {
        let codes = ["023.9", "002.0", "003.0", "008.00", "100.9", "085.1", "085.0", "070.1", "070.30", "070.9", "482.84", "082.0", "036.0", "090.9", "098.0", "021.9", "027.0"];
        for (n, code) in codes.iter().enumerate() {
            let posted = post_report(&app, &Report::new(&format!("c2-{n}"), code).person(n as u32 + 1).positive("clinica")).await;
            assert_eq!(posted.receipt().code, "in-attesa", "{code}: {:#?}", posted.receipt());
            assert_no_case(&app, &posted.patient()).await;
        }
    }

    async fn class_ii_refuted_condition_withdraws_the_case(app) {
        let posted = post_report(&app, &morbillo("morbillo", 1)).await;
        let case = the_case_of(&app, &posted.patient()).await;
        correct(&app, &posted.condition(), |c| set_verification(c, "refuted")).await;
        let withdrawn = the_case_of(&app, &posted.patient()).await;
        assert_eq!(withdrawn["id"], case["id"]);
        assert_eq!(withdrawn["identifier"], case["identifier"]);
        assert_eq!(withdrawn["status"], "entered-in-error", "{withdrawn:#}");
        assert!(version(&withdrawn) > version(&case));
        // nothing silently deleted: the first version is still there as it was
        let v1 = read(&app, &format!("Communication/{}/_history/1", case["id"].as_str().unwrap())).await;
        assert_eq!(v1["status"], "completed");
    }

    async fn class_ii_refuted_from_the_start_is_not_notified(app) {
        let posted = post_report(&app, &morbillo("morbillo", 1).verification("refuted")).await;
        assert_ne!(posted.receipt().code, "notificato", "{:#?}", posted.receipt());
        assert_no_case(&app, &posted.patient()).await;
    }

    // ---- resolutions -----------------------------------------------------------------------------

    async fn resolution_005_1_is_botulism_class_i_other_005_is_class_iv(app) {
        let botulism = post_report(&app, &Report::new("botulismo", "005.1").provisional()).await;
        let case = the_case_of(&app, &botulism.patient()).await;
        assert_case_of_report(&case, &botulism, "classe-1");
        assert_reason(&case, "005.1", "005.1");
        let staphylococcal = post_report(&app, &Report::new("tossinfezione", "005.0").person(2)).await;
        let case = the_case_of(&app, &staphylococcal.patient()).await;
        assert_case_of_report(&case, &staphylococcal, "classe-4");
        assert_reason(&case, "005", "005.0");
    }

    async fn resolution_child_code_070_30_belongs_to_070_3(app) {
        let report = Report::new("epatite-b", "070.30").positive("clinica").positive("sierologia");
        let posted = post_report(&app, &report).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-2");
        assert_eq!(reason_code(&case, 0).as_deref(), Some("070.3"), "{case:#}");
        assert_eq!(reason_code(&case, 1).as_deref(), Some("070.30"), "{case:#}");
        assert_eq!(reason_codes(&case).len(), 2, "{case:#}");
        // 070.30 follows 070.3's criteria (serology), not 070's (clinical only)
        let waiting = post_report(&app, &Report::new("epatite-b-2", "070.30").person(2).positive("clinica")).await;
        assert_eq!(waiting.receipt().code, "in-attesa");
        assert_no_case(&app, &waiting.patient()).await;
    }

    async fn resolution_most_specific_listed_code_wins_070_1_over_070(app) {
        // 070.1 (epatite A) needs serology although its parent 070 needs the clinical criterion only
        let posted = post_report(&app, &Report::new("hav", "070.1").positive("clinica")).await;
        assert_eq!(posted.receipt().code, "in-attesa");
        assert_no_case(&app, &posted.patient()).await;
        // 070.20 is below no listed code but 070: epatite virale non specificata, clinical only
        let posted = post_report(&app, &Report::new("hbv-coma", "070.20").person(2).positive("clinica")).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-2");
        assert_reason(&case, "070", "070.20");
    }

    async fn resolution_listed_code_reported_as_is_has_one_reason_code(app) {
        let posted = post_report(&app, &Report::new("scarlattina", "034.1").positive("clinica")).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_reason(&case, "034.1", "034.1");
    }

    async fn resolution_classes_iii_and_v_have_no_deadline(app) {
        let posted = post_report(&app, &tb("tb", 1).positive("coltura")).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-3");
        assert_eq!(scadenza(&case), None, "{case:#}");
        assert_eq!(in_ritardo(&case), None, "{case:#}");
        // a class V outbreak notification carries no deadline either
        let school_a = school("MIAA81201X", "Scuola dell'infanzia Arcobaleno", 40);
        post_report(&app, &Report::new("rota-1", "008.61").person(2).community(school_a.clone()).onset(&days_ago(3))).await;
        post_report(&app, &Report::new("rota-2", "008.61").person(3).community(school_a).onset(&days_ago(2))).await;
        let outbreak = the_outbreak(&app).await;
        assert_eq!(in_ritardo(&outbreak), None, "{outbreak:#}");
    }

    // ---- class III: tuberculosis ---------------------------------------------------------------

    async fn tb_criterion_a_culture_isolation(app) {
        let posted = post_report(&app, &tb("tb-a", 1).positive("coltura")).await;
        assert_eq!(posted.receipt().code, "notificato", "{:#?}", posted.receipt());
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-3");
        assert!(reason_codes(&case).contains(&"011.94".to_string()), "{case:#}");
        assert!(tb_criteria(&case).contains("A"), "{case:#}");
        assert!(criteria_codes(&case).contains("coltura"), "{case:#}");
        // class III goes to the ASL and region
        assert_eq!(recipients(&case), set(&[r_asl(MILANO.asl), r_region(MILANO.region)]), "{case:#}");
    }

    async fn tb_criterion_b_microscopy_and_clinical_signs(app) {
        let report = Report::new("tb-b", "011.93").treatments("nuovo-caso")
            .positive("esame-diretto").positive("clinica").criterion("coltura", "negativo");
        let posted = post_report(&app, &report).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-3");
        assert_eq!(tb_criteria(&case), strings(&["B"]), "{case:#}");
        // microscopy and imaging; microscopy and ongoing therapy with two or more drugs
        let imaging = Report::new("tb-b2", "011.93").person(2).positive("esame-diretto").positive("imaging").criterion("coltura", "negativo");
        let posted = post_report(&app, &imaging).await;
        assert!(tb_criteria(&the_case_of(&app, &posted.patient()).await).contains("B"));
        let therapy = Report::new("tb-b3", "011.93").person(3).positive("esame-diretto").positive("terapia-in-corso").criterion("coltura", "negativo");
        let posted = post_report(&app, &therapy).await;
        assert!(tb_criteria(&the_case_of(&app, &posted.patient()).await).contains("B"));
        // microscopy alone is not B
        let alone = Report::new("tb-b4", "011.93").person(4).positive("esame-diretto").criterion("coltura", "negativo");
        let posted = post_report(&app, &alone).await;
        assert_no_case(&app, &posted.patient()).await;
    }

    async fn tb_criterion_c_clinical_signs_and_two_of_three(app) {
        let report = Report::new("tb-c", "011.96").treatments("nuovo-caso")
            .positive("clinica").positive("imaging").positive("mantoux")
            .criterion("risposta-terapia", "non-noto").criterion("coltura", "negativo");
        let posted = post_report(&app, &report).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-3");
        assert_eq!(tb_criteria(&case), strings(&["C"]), "{case:#}");
        let other_pair = Report::new("tb-c2", "011.96").person(2)
            .positive("clinica").positive("risposta-terapia").positive("mantoux").criterion("coltura", "negativo");
        let posted = post_report(&app, &other_pair).await;
        assert!(tb_criteria(&the_case_of(&app, &posted.patient()).await).contains("C"));
    }

    async fn tb_criterion_c_with_only_one_of_three_is_not_notified(app) {
        let report = Report::new("tb-c1", "011.96").treatments("nuovo-caso")
            .positive("clinica").positive("imaging").criterion("mantoux", "negativo")
            .criterion("risposta-terapia", "non-effettuato").criterion("coltura", "negativo");
        let posted = post_report(&app, &report).await;
        assert_eq!(posted.receipt().code, "in-attesa", "{:#?}", posted.receipt());
        assert_no_case(&app, &posted.patient()).await;
        // two of three without the clinical signs is not C either
        let report = Report::new("tb-c0", "011.96").person(2)
            .positive("imaging").positive("mantoux").criterion("coltura", "negativo");
        let posted = post_report(&app, &report).await;
        assert_no_case(&app, &posted.patient()).await;
    }

    async fn tb_criterion_d_autopsy(app) {
        let posted = post_report(&app, &Report::new("tb-d", "011.90").positive("autopsia")).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-3");
        assert_eq!(tb_criteria(&case), strings(&["D"]), "{case:#}");
    }

    async fn tb_culture_in_corso_is_not_notified_until_the_culture_result(app) {
        // microscopy and clinical signs (B holds) but the culture is still in progress
        let report = tb("tb-wait", 1).positive("esame-diretto").positive("clinica").criterion("coltura", "in-corso");
        let posted = post_report(&app, &report).await;
        assert_eq!(posted.receipt().code, "in-attesa", "{:#?}", posted.receipt());
        assert_no_case(&app, &posted.patient()).await;
        // the laboratory's culture result: M. tuberculosis complex isolated
        let culture = posted.criterion(2);
        correct(&app, &culture, |o| {
            o["valueCodeableConcept"] = json!({"coding": [{"system": canon("CodeSystem/esito-criterio"), "code": "positivo"}]});
        }).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-3");
        assert!(tb_criteria(&case).contains("A"), "{case:#}");
    }

    async fn tb_negative_culture_after_in_corso_is_notified_on_b(app) {
        let report = tb("tb-wait", 1).positive("esame-diretto").positive("clinica").criterion("coltura", "in-corso");
        let posted = post_report(&app, &report).await;
        assert_no_case(&app, &posted.patient()).await;
        correct(&app, &posted.criterion(2), |o| {
            o["valueCodeableConcept"] = json!({"coding": [{"system": canon("CodeSystem/esito-criterio"), "code": "negativo"}]});
        }).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-3");
        assert_eq!(tb_criteria(&case), strings(&["B"]), "{case:#}");
    }

    async fn tb_provisional_is_not_notified(app) {
        let posted = post_report(&app, &tb("tb-sosp", 1).provisional().positive("coltura")).await;
        assert_ne!(posted.receipt().code, "notificato", "{:#?}", posted.receipt());
        assert_no_case(&app, &posted.patient()).await;
        // confirmed later: notified
        correct(&app, &posted.condition(), |c| set_verification(c, "confirmed")).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-3");
    }

    async fn tb_relapse_is_notified_again(app) {
        let first = post_report(&app, &tb("tb-1", 1).onset(&days_ago(100)).recorded(&days_ago(95)).positive("coltura")).await;
        let first_case = the_case_of(&app, &first.patient()).await;
        let relapse = tb("tb-2", 1).treatments("recidiva").onset(&days_ago(3)).positive("coltura");
        let second = post_report(&app, &relapse).await;
        assert_eq!(second.receipt().code, "notificato", "{:#?}", second.receipt());
        let active = active_cases_of(&app, &first.patient()).await;
        assert_eq!(active.len(), 2, "{active:#?}");
        let new = active.iter().find(|c| c["id"] != first_case["id"]).expect("the relapse's case");
        assert_case(new, &first.patient(), "classe-3");
        assert!(in_response_to(new).contains(&second.segnalazione()), "{new:#}");
        assert!(!in_response_to(new).contains(&first.segnalazione()), "{new:#}");
    }

    async fn tb_return_after_interruption_already_notified_is_not_notified_again(app) {
        // notified two years ago; now back after interrupting treatment
        let first = post_report(&app, &tb("tb-1", 1).onset(&days_ago(730)).recorded(&days_ago(725)).positive("coltura")).await;
        let first_case = the_case_of(&app, &first.patient()).await;
        let back = tb("tb-2", 1).treatments("ritorno-dopo-interruzione").onset(&days_ago(4)).positive("coltura");
        let second = post_report(&app, &back).await;
        assert_eq!(second.receipt().code, "gia-notificato", "{:#?}", second.receipt());
        let all = cases_of(&app, &first.patient()).await;
        assert_eq!(all.len(), 1, "{all:#?}");
        assert_eq!(all[0]["id"], first_case["id"]);
        assert_eq!(all[0]["status"], "completed");
    }

    async fn tb_chronic_case_already_notified_is_not_notified_again(app) {
        let first = post_report(&app, &tb("tb-1", 1).onset(&days_ago(730)).recorded(&days_ago(725)).positive("coltura")).await;
        the_case_of(&app, &first.patient()).await;
        let chronic = tb("tb-2", 1).treatments("cronico").onset(&days_ago(4)).positive("coltura");
        let second = post_report(&app, &chronic).await;
        assert_eq!(second.receipt().code, "gia-notificato", "{:#?}", second.receipt());
        assert_eq!(cases_of(&app, &first.patient()).await.len(), 1);
    }

    async fn tb_return_after_interruption_never_notified_before_is_notified(app) {
        let posted = post_report(&app, &tb("tb-back", 1).treatments("ritorno-dopo-interruzione").positive("coltura")).await;
        assert_eq!(posted.receipt().code, "notificato", "{:#?}", posted.receipt());
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-3");
    }

    async fn mycobacteriosis_needs_culture_and_clinical_signs(app) {
        // NTM culture alone: not yet
        let posted = post_report(&app, &Report::new("ntm", "031.0").positive("coltura")).await;
        assert_no_case(&app, &posted.patient()).await;
        let clinica = post_later_evidence(&app, &posted, "clinica", "positivo", "ntm-clinica").await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-3");
        assert_reason(&case, "031", "031.0");
        assert_eq!(criteria_codes(&case), strings(&["clinica", "coltura"]), "{case:#}");
        assert!(about(&case).contains(&clinica));
        // both in one report
        let both = post_report(&app, &Report::new("ntm-2", "031.0").person(2).positive("coltura").positive("clinica")).await;
        assert_case_of_report(&the_case_of(&app, &both.patient()).await, &both, "classe-3");
    }

    async fn class_iii_other_diseases_are_notified_when_confirmed(app) {
        // (reported code, listed code)
        let rows = [("042", "042"), ("030.9", "030"), ("084.0", "084"), ("771.0", "771.0"), ("647.53", "647.5")];
        for (n, (code, listed)) in rows.iter().enumerate() {
            let posted = post_report(&app, &Report::new(&format!("c3-{n}"), code).person(n as u32 + 1).provisional()).await;
            assert_ne!(posted.receipt().code, "notificato", "{code}: {:#?}", posted.receipt());
            assert_no_case(&app, &posted.patient()).await;
            correct(&app, &posted.condition(), |c| set_verification(c, "confirmed")).await;
            let case = the_case_of(&app, &posted.patient()).await;
            assert_case_of_report(&case, &posted, "classe-3");
            assert_reason(&case, listed, code);
        }
    }

    // ---- class IV: each case to the ASL; outbreaks to everyone ------------------------------------

    async fn class_iv_each_case_is_notified_to_the_asl_only(app) {
        let rows = [("132.0", "132.0"), ("133.0", "133.0"), ("110.0", "110"), ("005.0", "005")];
        for (n, (code, listed)) in rows.iter().enumerate() {
            let posted = post_report(&app, &Report::new(&format!("c4-{n}"), code).person(n as u32 + 1)).await;
            assert_eq!(posted.receipt().code, "notificato", "{code}: {:#?}", posted.receipt());
            let case = the_case_of(&app, &posted.patient()).await;
            assert_case_of_report(&case, &posted, "classe-4");
            assert_reason(&case, listed, code);
            assert_eq!(recipients(&case), set(&[r_asl(MILANO.asl)]), "{code}: {case:#}");
        }
        assert!(outbreaks(&app).await.is_empty(), "cases with no community are no outbreak");
    }

    async fn class_iv_case_resident_elsewhere_goes_to_both_asls_and_no_region(app) {
        let posted = post_report(&app, &Report::new("scabbia", "133.0").lives_in(AOSTA).notified_by(MILANO)).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-4");
        assert_eq!(recipients(&case), set(&[r_asl(AOSTA.asl), r_asl(MILANO.asl)]), "{case:#}");
    }

    async fn class_iv_outbreak_of_two_in_one_school_is_one_focolaio(app) {
        let first = post_report(&app, &pediculosi("pid-1", 1, "MIEE81601C", 4)).await;
        assert!(outbreaks(&app).await.is_empty(), "one case is no outbreak");
        let second = post_report(&app, &pediculosi("pid-2", 2, "MIEE81601C", 1)).await;
        let case1 = the_case_of(&app, &first.patient()).await;
        let case2 = the_case_of(&app, &second.patient()).await;
        assert_case_of_report(&case1, &first, "classe-4");
        assert_case_of_report(&case2, &second, "classe-4");
        let outbreak = the_outbreak(&app).await;
        assert_case(&outbreak, "", "focolaio");
        assert_eq!(reason_code(&outbreak, 0).as_deref(), Some("132.0"), "{outbreak:#}");
        assert_eq!(recipients(&outbreak), set(&[r_asl(MILANO.asl), r_region(MILANO.region), r_minsal(), r_iss()]), "{outbreak:#}");
        assert_eq!(about(&outbreak), strings(&[&reference_of(&case1), &reference_of(&case2)]), "{outbreak:#}");
        let form = extension(&outbreak, "focolaio");
        assert_eq!(sub(form, "tipo-comunita").expect("tipo-comunita")["valueCode"], "scuola", "{form:#}");
        let community = &sub(form, "comunita").expect("comunita")["valueIdentifier"];
        assert_eq!(community["system"], SCHOOLS, "{form:#}");
        assert_eq!(community["value"], "MIEE81601C", "{form:#}");
        assert_eq!(sub(form, "nome").expect("nome")["valueString"], "Scuola primaria statale MIEE81601C");
        assert_eq!(sub(form, "persone-a-rischio").expect("persone-a-rischio")["valueInteger"], 24);
        assert_eq!(sub(form, "data-inizio").expect("data-inizio")["valueDate"], date_days_ago(4).as_str(), "{form:#}");
        assert_eq!(sub(form, "durata-giorni").expect("durata-giorni")["valueInteger"], 3, "{form:#}");
        assert_eq!(sub(form, "numero-casi").expect("numero-casi")["valueInteger"], 2, "{form:#}");
        // the member cases stay classe-4 notifications to the ASL only
        assert_eq!(recipients(&case2), set(&[r_asl(MILANO.asl)]));
    }

    async fn class_iv_cases_in_two_schools_are_no_outbreak(app) {
        post_report(&app, &pediculosi("pid-1", 1, "MIEE81601C", 3)).await;
        post_report(&app, &pediculosi("pid-2", 2, "MIEE8AB01X", 2)).await;
        assert!(outbreaks(&app).await.is_empty(), "{:#?}", outbreaks(&app).await);
        assert_eq!(notifications(&app, &format!("&category={}|classe-4", canon("CodeSystem/tipo-notifica"))).await.len(), 2);
    }

    async fn class_iv_different_diseases_in_one_school_are_no_outbreak(app) {
        post_report(&app, &pediculosi("pid-1", 1, "MIEE81601C", 3)).await;
        let scabies = Report::new("scabbia", "133.0").person(2).onset(&days_ago(2))
            .community(school("MIEE81601C", "Scuola primaria statale MIEE81601C", 24));
        post_report(&app, &scabies).await;
        assert!(outbreaks(&app).await.is_empty());
    }

    async fn class_iv_third_case_is_a_new_version_of_the_same_focolaio(app) {
        post_report(&app, &pediculosi("pid-1", 1, "MIEE81601C", 5)).await;
        post_report(&app, &pediculosi("pid-2", 2, "MIEE81601C", 3)).await;
        let two = the_outbreak(&app).await;
        let third = post_report(&app, &pediculosi("pid-3", 3, "MIEE81601C", 1)).await;
        let three = the_outbreak(&app).await;
        assert_eq!(three["id"], two["id"]);
        assert_eq!(three["identifier"], two["identifier"]);
        assert!(version(&three) > version(&two), "{three:#}");
        assert_case(&three, "", "focolaio");
        let form = extension(&three, "focolaio");
        assert_eq!(sub(form, "numero-casi").unwrap()["valueInteger"], 3, "{form:#}");
        assert_eq!(sub(form, "durata-giorni").unwrap()["valueInteger"], 4, "{form:#}");
        assert_eq!(sub(form, "data-inizio").unwrap()["valueDate"], date_days_ago(5).as_str());
        let third_case = the_case_of(&app, &third.patient()).await;
        assert!(about(&three).contains(&reference_of(&third_case)), "{three:#}");
        assert_eq!(about(&three).len(), 3, "{three:#}");
        assert_eq!(three["sent"], two["sent"]);
    }

    async fn class_v_cases_form_an_outbreak_but_are_not_notified_alone(app) {
        let nursery = school("MI1A0123ZZ", "Asilo nido comunale Girotondo", 36);
        let first = post_report(&app, &Report::new("rota-1", "008.61").community(nursery.clone()).onset(&days_ago(3))).await;
        assert_eq!(first.receipt().code, "registrato", "{:#?}", first.receipt());
        assert_no_case(&app, &first.patient()).await;
        assert!(outbreaks(&app).await.is_empty());
        let second = post_report(&app, &Report::new("rota-2", "008.61").person(2).community(nursery).onset(&days_ago(1))).await;
        assert_no_case(&app, &second.patient()).await;
        let outbreak = the_outbreak(&app).await;
        assert_case(&outbreak, "", "focolaio");
        assert!(reason_codes(&outbreak).contains(&"008.61".to_string()), "{outbreak:#}");
        assert_eq!(recipients(&outbreak), set(&[r_asl(MILANO.asl), r_region(MILANO.region), r_minsal(), r_iss()]), "{outbreak:#}");
        // class V members have no case notification: the focolaio names their segnalazioni
        assert_eq!(about(&outbreak), strings(&[&first.segnalazione(), &second.segnalazione()]), "{outbreak:#}");
        let form = extension(&outbreak, "focolaio");
        assert_eq!(sub(form, "numero-casi").unwrap()["valueInteger"], 2);
        assert_eq!(sub(form, "persone-a-rischio").unwrap()["valueInteger"], 36);
    }

    async fn class_v_case_is_recorded_not_notified(app) {
        let posted = post_report(&app, &Report::new("rotavirus", "008.61")).await;
        assert_eq!(posted.receipt().code, "registrato", "{:#?}", posted.receipt());
        assert_no_case(&app, &posted.patient()).await;
        assert!(notifications(&app, "").await.is_empty());
    }

    async fn withdrawn_outbreak_member_recomputes_the_outbreak(app) {
        let a = post_report(&app, &pediculosi("pid-1", 1, "MIEE81601C", 5)).await;
        let b = post_report(&app, &pediculosi("pid-2", 2, "MIEE81601C", 3)).await;
        post_report(&app, &pediculosi("pid-3", 3, "MIEE81601C", 1)).await;
        let three = the_outbreak(&app).await;
        assert_eq!(sub(extension(&three, "focolaio"), "numero-casi").unwrap()["valueInteger"], 3);
        // the first child did not have lice after all
        let case_a = the_case_of(&app, &a.patient()).await;
        correct(&app, &a.condition(), |c| set_verification(c, "refuted")).await;
        let withdrawn = the_case_of(&app, &a.patient()).await;
        assert_eq!(withdrawn["id"], case_a["id"]);
        assert_eq!(withdrawn["status"], "entered-in-error");
        let two = the_outbreak(&app).await;
        assert_eq!(two["id"], three["id"]);
        assert!(version(&two) > version(&three));
        assert_eq!(two["status"], "completed");
        let form = extension(&two, "focolaio");
        assert_eq!(sub(form, "numero-casi").unwrap()["valueInteger"], 2, "{form:#}");
        assert_eq!(sub(form, "data-inizio").unwrap()["valueDate"], date_days_ago(3).as_str(), "{form:#}");
        assert!(!about(&two).contains(&reference_of(&case_a)), "{two:#}");
        // a second withdrawal leaves one case: the focolaio is withdrawn, same identifier
        correct(&app, &b.condition(), |c| set_verification(c, "entered-in-error")).await;
        let gone = the_outbreak(&app).await;
        assert_eq!(gone["id"], three["id"]);
        assert_eq!(gone["identifier"], three["identifier"]);
        assert_eq!(gone["status"], "entered-in-error", "{gone:#}");
    }

    // ---- deadlines -------------------------------------------------------------------------------

    async fn deadline_class_i_is_12_hours_from_recorded_date(app) {
        let recorded = hours_ago(2);
        let posted = post_report(&app, &Report::new("colera", "001.0").provisional().recorded(&recorded)).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_hours_after(scadenza(&case), &recorded, 12, &case);
        assert_eq!(in_ritardo(&case), None, "{case:#}");
    }

    async fn deadline_class_ii_is_2_days_from_recorded_date(app) {
        let recorded = hours_ago(3);
        let posted = post_report(&app, &morbillo("morbillo", 1).recorded(&recorded)).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_hours_after(scadenza(&case), &recorded, 48, &case);
    }

    async fn deadline_class_iv_is_24_hours_from_recorded_date(app) {
        let recorded = hours_ago(4);
        let posted = post_report(&app, &Report::new("scabbia", "133.0").recorded(&recorded)).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_hours_after(scadenza(&case), &recorded, 24, &case);
    }

    async fn deadline_from_a_date_alone_runs_from_midnight_in_rome(app) {
        // a recordedDate without a time is an Italian day: 2 days from its midnight in Rome
        // (23:00 or 22:00 UTC the day before), not from midnight UTC
        let day = date_days_ago(1);
        let posted = post_report(&app, &morbillo("morbillo", 1).onset(&day).recorded(&day)).await;
        let case = the_case_of(&app, &posted.patient()).await;
        let midnight = jiff::civil::Date::strptime("%Y-%m-%d", &day)
            .unwrap()
            .to_zoned(jiff::tz::TimeZone::get("Europe/Rome").unwrap())
            .unwrap()
            .timestamp()
            .to_string();
        assert_hours_after(scadenza(&case), &midnight, 48, &case);
    }

    async fn late_report_is_marked_in_ritardo(app) {
        // observed 5 days ago, reported now: past the 2-day deadline
        let recorded = days_ago(5);
        let report = morbillo("morbillo", 1).onset(&days_ago(7)).recorded(&recorded);
        let posted = post_report(&app, &report).await;
        let receipt = posted.receipt();
        assert_eq!(receipt.code, "notificato", "{receipt:#?}");
        assert!(receipt.text.to_lowercase().contains("ritardo"), "the receipt says it is late: {receipt:#?}");
        let case = the_case_of(&app, &posted.patient()).await;
        assert_hours_after(scadenza(&case), &recorded, 48, &case);
        assert_eq!(in_ritardo(&case), Some(true), "{case:#}");
        // a class I report 13 hours after the suspicion is late too
        let posted = post_report(&app, &Report::new("colera", "001.0").person(2).provisional().recorded(&hours_ago(13))).await;
        assert_eq!(in_ritardo(&the_case_of(&app, &posted.patient()).await), Some(true));
    }

    async fn timely_report_is_not_marked_in_ritardo(app) {
        let posted = post_report(&app, &morbillo("morbillo", 1).recorded(&hours_ago(30))).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_eq!(in_ritardo(&case), None, "in-ritardo only on late reports: {case:#}");
        assert_eq!(posted.receipt().code, "notificato");
    }

    // ---- routing -----------------------------------------------------------------------------------

    async fn routing_residence_asl_comes_from_the_comune(app) {
        // lives in Bergamo, notified by a doctor of Milano's ATS: both ASLs, one region
        let posted = post_report(&app, &morbillo("morbillo", 1).lives_in(BERGAMO).notified_by(MILANO)).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_eq!(recipients(&case), set(&[r_asl(BERGAMO.asl), r_asl(MILANO.asl), r_region("030")]), "{case:#}");
        assert_eq!(recipient_display(&case, "sid/asl", BERGAMO.asl), BERGAMO.asl_name);
        // lives in Bergamo, notified to Bergamo's ATS: that ASL alone
        let posted = post_report(&app, &morbillo("morbillo-2", 2).lives_in(BERGAMO).notified_by(BERGAMO)).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_eq!(recipients(&case), set(&[r_asl(BERGAMO.asl), r_region("030")]), "{case:#}");
        let receipt = posted.receipt();
        assert_eq!(receipt.severity, "information", "{receipt:#?}");
        assert!(!receipt.has_esito_warning(), "no routing warning for a mapped comune: {receipt:#?}");
    }

    async fn routing_comune_exception_overrides_its_province(app) {
        // Darfo Boario Terme is in the province of Brescia but belongs to ATS della Montagna
        let posted = post_report(&app, &morbillo("morbillo", 1).lives_in(DARFO).notified_by(DARFO)).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_eq!(recipients(&case), set(&[r_asl(DARFO.asl), r_region(DARFO.region)]), "{case:#}");
    }

    async fn routing_residence_in_another_region_goes_to_both_asls_and_both_regions(app) {
        let posted = post_report(&app, &morbillo("morbillo", 1).lives_in(AOSTA).notified_by(MILANO)).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_eq!(recipients(&case), set(&[
            r_asl(AOSTA.asl), r_asl(MILANO.asl), r_region(AOSTA.region), r_region(MILANO.region),
        ]), "{case:#}");
        assert_eq!(recipient_display(&case, "sid/regione", AOSTA.region), AOSTA.region_name);
        assert_eq!(recipient_display(&case, "sid/asl", AOSTA.asl), AOSTA.asl_name);
        // class I adds the Ministry and ISS
        let posted = post_report(&app, &Report::new("colera", "001.0").person(2).provisional().lives_in(AOSTA).notified_by(MILANO)).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_eq!(recipients(&case), set(&[
            r_asl(AOSTA.asl), r_asl(MILANO.asl), r_region(AOSTA.region), r_region(MILANO.region), r_minsal(), r_iss(),
        ]), "{case:#}");
    }

    async fn routing_comune_without_asl_mapping_goes_to_the_region_with_a_warning(app) {
        // lives in Torino (Piemonte has no ASL mapping), notified by Milano's ATS
        let (comune, name) = TORINO_COMUNE;
        let report = morbillo("morbillo", 1).lives_in_comune(comune, name).notified_by(MILANO);
        let posted = post_report(&app, &report).await;
        let receipt = posted.receipt();
        assert_eq!(receipt.code, "notificato", "{receipt:#?}");
        assert!(receipt.has_warning(), "a warning about the missing ASL mapping: {receipt:#?}");
        let case = the_case_of(&app, &posted.patient()).await;
        // the residence region, and the notifying ASL with its region
        assert_eq!(recipients(&case), set(&[r_region(PIEMONTE.0), r_asl(MILANO.asl), r_region(MILANO.region)]), "{case:#}");
        assert_eq!(recipient_display(&case, "sid/regione", PIEMONTE.0), PIEMONTE.1);
    }

    async fn routing_without_a_comune_goes_to_the_notifying_asl(app) {
        let posted = post_report(&app, &morbillo("morbillo", 1).homeless().notified_by(BERGAMO)).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_eq!(recipients(&case), set(&[r_asl(BERGAMO.asl), r_region(BERGAMO.region)]), "{case:#}");
    }

    async fn routing_notifying_asl_as_a_logical_reference(app) {
        // the EHR names the ASL by identifier only, with no Organization resource
        let mut bundle = morbillo("morbillo", 1).lives_in(AOSTA).bundle();
        let entries = bundle["entry"].as_array_mut().unwrap();
        entries.retain(|e| e["fullUrl"] != full_url(ASL).as_str());
        let segnalazione = entries.iter_mut().find(|e| e["fullUrl"] == full_url(SEGNALAZIONE).as_str()).unwrap();
        segnalazione["resource"]["recipient"] = json!([{
            "identifier": {"system": canon("sid/asl"), "value": MILANO.asl},
            "display": MILANO.asl_name
        }]);
        let posted = post_bundle(&app, &bundle).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_eq!(recipients(&case), set(&[
            r_asl(AOSTA.asl), r_asl(MILANO.asl), r_region(AOSTA.region), r_region(MILANO.region),
        ]), "{case:#}");
    }

    async fn case_notifications_can_be_found_by_region_asl_code_and_category(app) {
        let milano = post_report(&app, &morbillo("morbillo-mi", 1).lives_in(MILANO).notified_by(MILANO)).await;
        let aosta = post_report(&app, &morbillo("morbillo-ao", 2).lives_in(AOSTA).notified_by(AOSTA)).await;
        let mi = the_case_of(&app, &milano.patient()).await;
        let ao = the_case_of(&app, &aosta.patient()).await;
        let ids = |found: Vec<Value>| found.iter().map(|c| c["id"].as_str().unwrap().to_string()).collect::<BTreeSet<_>>();
        let mi_id = mi["id"].as_str().unwrap();
        let ao_id = ao["id"].as_str().unwrap();
        assert_eq!(ids(notifications(&app, "&region=030").await), strings(&[mi_id]));
        assert_eq!(ids(notifications(&app, "&region=020").await), strings(&[ao_id]));
        assert_eq!(ids(notifications(&app, &format!("&asl={}", AOSTA.asl)).await), strings(&[ao_id]));
        assert_eq!(ids(notifications(&app, &format!("&code={ICD9}|055.9")).await), strings(&[mi_id, ao_id]));
        assert_eq!(ids(notifications(&app, &format!("&category={}|classe-2", canon("CodeSystem/tipo-notifica"))).await), strings(&[mi_id, ao_id]));
        assert_eq!(ids(notifications(&app, "&status=completed").await), strings(&[mi_id, ao_id]));
    }

    // ---- duplicates and episodes ---------------------------------------------------------------------

    async fn the_same_segnalazione_twice_is_one_case(app) {
        let report = morbillo("morbillo", 1);
        let first = post_report(&app, &report).await;
        let case = the_case_of(&app, &first.patient()).await;
        let again = post_report(&app, &report).await;
        assert_eq!(again.segnalazione(), first.segnalazione(), "the conditional create matched");
        assert_eq!(again.patient(), first.patient());
        let after = the_case_of(&app, &first.patient()).await;
        assert_eq!(after["id"], case["id"]);
        assert_eq!(version(&after), version(&case), "nothing changed: {after:#}");
        assert_eq!(in_response_to(&after), strings(&[&first.segnalazione()]));
        let segnalazioni = search(&app, &format!("Communication?subject={}&_profile={}", first.patient(), canon("StructureDefinition/segnalazione"))).await;
        assert_eq!(segnalazioni.len(), 1);
    }

    async fn a_resent_segnalazione_changes_only_about_and_in_response_to(app) {
        // an EHR that resends without conditional create: new resources, the same report
        let report = morbillo("morbillo", 1).unconditional();
        let first = post_report(&app, &report).await;
        let case = the_case_of(&app, &first.patient()).await;
        let again = post_report(&app, &report).await;
        assert_ne!(again.segnalazione(), first.segnalazione());
        assert_eq!(again.patient(), first.patient());
        let after = the_case_of(&app, &first.patient()).await;
        assert_eq!(after["id"], case["id"]);
        assert_eq!(after["identifier"], case["identifier"]);
        assert_eq!(in_response_to(&after), strings(&[&first.segnalazione(), &again.segnalazione()]), "{after:#}");
        assert!(about(&after).is_superset(&strings(&[&first.segnalazione(), &again.segnalazione(), &first.condition(), &again.condition()])), "{after:#}");
        for element in ["status", "category", "priority", "subject", "recipient", "sent", "reasonCode"] {
            assert_eq!(after[element], case[element], "{element} unchanged");
        }
        assert_eq!(scadenza(&after), scadenza(&case));
        assert_eq!(notifications(&app, "").await.len(), 1);
    }

    async fn two_doctors_reporting_one_case_are_one_case_with_both_segnalazioni(app) {
        let first = post_report(&app, &morbillo("morbillo-ps", 1).doctor(1)).await;
        let case = the_case_of(&app, &first.patient()).await;
        // the family doctor reports the same measles the next day
        let second = post_report(&app, &morbillo("morbillo-mmg", 1).doctor(2).onset(&days_ago(2)).recorded(&minutes_ago(20)).sent(&minutes_ago(10))).await;
        assert_eq!(second.patient(), first.patient());
        let after = the_case_of(&app, &first.patient()).await;
        assert_eq!(after["id"], case["id"]);
        assert_eq!(in_response_to(&after), strings(&[&first.segnalazione(), &second.segnalazione()]), "{after:#}");
        assert!(about(&after).is_superset(&strings(&[&first.condition(), &second.condition()])), "{after:#}");
        assert_eq!(after["sent"], case["sent"]);
        assert_eq!(after["recipient"], case["recipient"]);
        assert_eq!(scadenza(&after), scadenza(&case), "the deadline of the first report");
    }

    async fn different_diseases_of_one_patient_are_two_cases(app) {
        let measles = post_report(&app, &morbillo("morbillo", 1)).await;
        let varicella = post_report(&app, &Report::new("varicella", "052.9").positive("clinica")).await;
        assert_eq!(measles.patient(), varicella.patient());
        let all = cases_of(&app, &measles.patient()).await;
        assert_eq!(all.len(), 2, "{all:#?}");
    }

    async fn omocodia_variants_are_one_person(app) {
        let first = post_report(&app, &morbillo("morbillo-1", 7)).await;
        let variant = patient_cf_omocodia(7);
        assert_ne!(variant, patient_cf(7));
        let second = post_report(&app, &morbillo("morbillo-2", 7).cf(&variant).doctor(2)).await;
        assert_ne!(second.patient(), first.patient(), "two Patient resources");
        let case = the_case_of(&app, &first.patient()).await;
        assert_eq!(in_response_to(&case), strings(&[&first.segnalazione(), &second.segnalazione()]), "{case:#}");
        assert!(cases_of(&app, &second.patient()).await.is_empty(), "one case, not one per Patient resource");
    }

    async fn concurrent_reports_for_one_patient_and_disease_make_one_case(app) {
        let app = Arc::new(app);
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let app = app.clone();
                let bundle = morbillo(&format!("gara-{i}"), 1).doctor(i + 1).bundle();
                tokio::spawn(async move { app.post("/fhir", &bundle).await })
            })
            .collect();
        let mut segnalazioni = BTreeSet::new();
        for task in futures::future::join_all(tasks).await {
            let r = task.expect("task");
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            let entry = r.body["entry"].as_array().unwrap().last().unwrap().clone();
            segnalazioni.insert(stored_reference(&entry));
        }
        assert_eq!(app.count("Patient").await, 1);
        assert_eq!(segnalazioni.len(), 8);
        let all = notifications(&app, "").await;
        assert_eq!(all.len(), 1, "{all:#?}");
        assert_eq!(all[0]["status"], "completed");
        assert_eq!(in_response_to(&all[0]), segnalazioni, "every report joined the one case");
    }

    async fn two_servers_racing_make_one_case(app) {
        let other = app.another_server().await;
        let app = Arc::new(app);
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let app = app.clone();
                let other = other.clone();
                let bundle = Report::new(&format!("srv-{i}"), "001.0").provisional().doctor(i + 1).bundle();
                tokio::spawn(async move {
                    if i % 2 == 0 {
                        app.post("/fhir", &bundle).await.status
                    } else {
                        let req = axum::http::Request::post("/fhir")
                            .header("content-type", "application/fhir+json")
                            .body(axum::body::Body::from(bundle.to_string()))
                            .unwrap();
                        tower::ServiceExt::oneshot(other, req).await.unwrap().status()
                    }
                })
            })
            .collect();
        for task in futures::future::join_all(tasks).await {
            assert_eq!(task.expect("task"), StatusCode::OK);
        }
        let all = notifications(&app, "").await;
        assert_eq!(all.len(), 1, "{all:#?}");
        assert_eq!(in_response_to(&all[0]).len(), 8, "{:#}", all[0]);
    }

    // ---- corrections and withdrawals ---------------------------------------------------------------

    async fn segnalazione_entered_in_error_withdraws_the_case(app) {
        let posted = post_report(&app, &morbillo("morbillo", 1)).await;
        let case = the_case_of(&app, &posted.patient()).await;
        let r = correct(&app, &posted.segnalazione(), |c| c["status"] = json!("entered-in-error")).await;
        let receipt = receipt_in(&r.body);
        assert_eq!(receipt.code, "ritirato", "{receipt:#?}");
        let withdrawn = the_case_of(&app, &posted.patient()).await;
        assert_eq!(withdrawn["id"], case["id"]);
        assert_eq!(withdrawn["identifier"], case["identifier"]);
        assert_eq!(withdrawn["status"], "entered-in-error", "{withdrawn:#}");
    }

    async fn deleting_the_segnalazione_withdraws_the_case(app) {
        let posted = post_report(&app, &morbillo("morbillo", 1)).await;
        let case = the_case_of(&app, &posted.patient()).await;
        let r = app.delete(&format!("/fhir/{}", posted.segnalazione())).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        let withdrawn = the_case_of(&app, &posted.patient()).await;
        assert_eq!(withdrawn["id"], case["id"]);
        assert_eq!(withdrawn["status"], "entered-in-error", "{withdrawn:#}");
    }

    async fn withdrawing_one_of_two_segnalazioni_keeps_the_case(app) {
        let first = post_report(&app, &morbillo("morbillo-1", 1).doctor(1)).await;
        let second = post_report(&app, &morbillo("morbillo-2", 1).doctor(2)).await;
        let case = the_case_of(&app, &first.patient()).await;
        correct(&app, &first.segnalazione(), |c| c["status"] = json!("entered-in-error")).await;
        let after = the_case_of(&app, &first.patient()).await;
        assert_eq!(after["id"], case["id"]);
        assert_eq!(after["status"], "completed", "{after:#}");
        assert_eq!(in_response_to(&after), strings(&[&second.segnalazione()]), "{after:#}");
        assert!(!about(&after).contains(&first.segnalazione()), "{after:#}");
        // the second report withdrawn too: nothing left, the case is withdrawn
        correct(&app, &second.condition(), |c| set_verification(c, "entered-in-error")).await;
        let gone = the_case_of(&app, &first.patient()).await;
        assert_eq!(gone["id"], case["id"]);
        assert_eq!(gone["status"], "entered-in-error", "{gone:#}");
    }

    async fn case_notifications_are_written_by_the_rules_only(app) {
        let posted = post_report(&app, &morbillo("morbillo", 1)).await;
        let case = the_case_of(&app, &posted.patient()).await;
        let path = format!("/fhir/Communication/{}", case["id"].as_str().unwrap());
        let mut forged = case.clone();
        forged["status"] = json!("entered-in-error");
        let r = app.put(&path, &forged, &[]).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        let r = app.delete(&path).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        let unchanged = the_case_of(&app, &posted.patient()).await;
        assert_eq!(unchanged["status"], "completed");
        assert_eq!(version(&unchanged), version(&case));
    }

    // ---- what counts as a report -------------------------------------------------------------------

    async fn a_communication_without_the_profile_but_with_an_icd9_reason_counts(app) {
        let posted = post_report(&app, &Report::new("colera", "001.0").provisional().unprofiled()).await;
        assert_eq!(posted.receipt().code, "notificato", "{:#?}", posted.receipt());
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-1");
    }

    async fn the_condition_code_wins_over_the_reason_code(app) {
        // the doctor's form says measles, the diagnosis says cholera
        let posted = post_report(&app, &Report::new("colera", "001.0").provisional().reason(Some("055.9"))).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-1");
        assert_reason(&case, "001", "001.0");
    }

    async fn a_segnalazione_with_no_condition_is_classified_by_its_reason_code(app) {
        let posted = post_report(&app, &Report::new("colera", "001.0").without_condition()).await;
        assert_eq!(posted.receipt().code, "notificato", "{:#?}", posted.receipt());
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case(&case, &posted.patient(), "classe-1");
        assert_eq!(in_response_to(&case), strings(&[&posted.segnalazione()]));
    }

    async fn a_positive_laboratory_blood_culture_proves_the_culture_criterion(app) {
        // typhoid fever (clinical + serology marked): the laboratory's positive blood culture is enough
        let report = Report::new("tifo", "002.0").positive("clinica").lab_observation(lab_culture("600-7", "Bacteria identified in Blood by Culture", "final", Some(SALMONELLA)));
        let posted = post_report(&app, &report).await;
        assert_eq!(posted.receipt().code, "notificato", "{:#?}", posted.receipt());
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-2");
        assert!(criteria_met(&case).iter().any(|(_, c, e)| c == "coltura" && e.as_deref() == Some(posted.at(LAB).as_str())), "{case:#}");
        assert!(about(&case).contains(&posted.at(LAB)));
    }

    async fn a_laboratory_culture_not_detected_is_negative(app) {
        let report = Report::new("salmonella", "003.0").positive("clinica")
            .lab_observation(lab_culture("17563-8", "Salmonella sp identified in Specimen by Organism specific culture", "final", Some(NOT_DETECTED)));
        let posted = post_report(&app, &report).await;
        assert_eq!(posted.receipt().code, "in-attesa", "{:#?}", posted.receipt());
        assert_no_case(&app, &posted.patient()).await;
    }

    async fn a_preliminary_laboratory_culture_is_in_corso_until_final(app) {
        // TB: microscopy and clinical signs (B), the mycobacterial culture preliminary: waits
        let report = tb("tb-lab", 1).positive("esame-diretto").positive("clinica")
            .lab_observation(lab_culture("539-7", "Mycobacterium sp identified in Sputum by Organism specific culture", "preliminary", None));
        let posted = post_report(&app, &report).await;
        assert_eq!(posted.receipt().code, "in-attesa", "{:#?}", posted.receipt());
        assert_no_case(&app, &posted.patient()).await;
        // the final result: M. tuberculosis isolated
        correct(&app, &posted.at(LAB), |o| {
            o["status"] = json!("final");
            o["valueCodeableConcept"] = json!({"coding": [{"system": SNOMED, "code": MYCOBACTERIUM_TUBERCULOSIS.0, "display": MYCOBACTERIUM_TUBERCULOSIS.1}]});
        }).await;
        let case = the_case_of(&app, &posted.patient()).await;
        assert_case_of_report(&case, &posted, "classe-3");
        assert!(tb_criteria(&case).contains("A"), "{case:#}");
    }

    async fn pieces_sent_one_by_one_complete_the_case(app) {
        // patient, doctor and ASL first; then the segnalazione (naming a Condition and an Observation
        // not sent yet), the Condition, and last the clinical Observation
        let report = morbillo("pezzi", 1);
        let responses = put_pieces(&app, &report, &[PATIENT, DOCTOR, ASL, SEGNALAZIONE]).await;
        let receipt = receipt_in(&responses[&SEGNALAZIONE].body);
        assert_eq!(receipt.code, "in-attesa", "{receipt:#?}");
        let patient = report.piece_reference(PATIENT);
        assert_no_case(&app, &patient).await;
        put_pieces(&app, &report, &[CONDITION]).await;
        assert_no_case(&app, &patient).await;
        put_pieces(&app, &report, &[CRITERION]).await;
        let case = the_case_of(&app, &patient).await;
        assert_case(&case, &patient, "classe-2");
        assert_eq!(in_response_to(&case), strings(&[&report.piece_reference(SEGNALAZIONE)]));
        assert!(about(&case).is_superset(&strings(&[&report.piece_reference(CONDITION), &report.piece_reference(CRITERION)])), "{case:#}");
        assert_eq!(recipients(&case), set(&[r_asl(MILANO.asl), r_region(MILANO.region)]));
    }

    // ---- invalid and non-notifiable codes ------------------------------------------------------------

    async fn invalid_icd9_code_in_the_condition_is_422_and_stores_nothing(app) {
        let report = Report::new("inventato", "999.99").reason(Some("055.9")).positive("clinica");
        let bundle = report.bundle();
        let r = app.post("/fhir", &bundle).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        assert_eq!(r.body["resourceType"], "OperationOutcome");
        let i = bundle["entry"].as_array().unwrap().iter().position(|e| e["fullUrl"] == full_url(CONDITION).as_str()).unwrap();
        let expected = format!("Bundle.entry[{i}].resource.code.coding[0]");
        assert!(r.expressions().contains(&expected), "{expected} in {}", r.text);
        assert_nothing_stored(&app, &report).await;
    }

    async fn invalid_icd9_code_in_the_reason_code_is_422_and_stores_nothing(app) {
        let report = Report::new("inventato", "055.9").reason(Some("999.99")).positive("clinica");
        let bundle = report.bundle();
        let r = app.post("/fhir", &bundle).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        let i = bundle["entry"].as_array().unwrap().iter().position(|e| e["fullUrl"] == full_url(SEGNALAZIONE).as_str()).unwrap();
        let expected = format!("Bundle.entry[{i}].resource.reasonCode[0].coding[0]");
        assert!(r.expressions().contains(&expected), "{expected} in {}", r.text);
        assert_nothing_stored(&app, &report).await;
    }

    async fn invalid_icd9_code_in_a_single_condition_is_422(app) {
        let report = Report::new("inventato", "999.99");
        put_pieces(&app, &report, &[PATIENT, DOCTOR]).await;
        let condition = report.pieces().into_iter().find(|(s, _, _)| *s == CONDITION).unwrap().2;
        let mut condition = condition;
        condition.as_object_mut().unwrap().shift_remove("id");
        let r = app.post("/fhir/Condition", &condition).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        assert!(r.expressions().contains(&"Condition.code.coding[0]".to_string()), "{}", r.text);
        assert_eq!(app.count("Condition").await, 0);
    }

    async fn valid_non_notifiable_code_is_stored_with_receipt_non_notificabile(app) {
        let posted = post_report(&app, &Report::new("diabete", "250.00")).await;
        assert!(posted.body["entry"].as_array().unwrap().iter().all(|e| e["response"]["status"] == "201 Created"));
        let receipt = posted.receipt();
        assert_eq!(receipt.code, "non-notificabile", "{receipt:#?}");
        assert_eq!(receipt.severity, "information");
        let condition = read(&app, &posted.condition()).await;
        assert_eq!(condition["code"]["coding"][0]["code"], "250.00");
        read(&app, &posted.segnalazione()).await;
        assert!(notifications(&app, "").await.is_empty());
    }

    // ---- receipts ------------------------------------------------------------------------------------

    async fn receipt_in_the_transaction_response_names_the_outcome_in_italian(app) {
        let posted = post_report(&app, &morbillo("morbillo", 1)).await;
        let receipt = posted.receipt();
        assert_eq!(receipt.code, "notificato", "{receipt:#?}");
        assert_eq!(receipt.severity, "information");
        assert_eq!(receipt.issue["code"], "informational");
        let expressions: Vec<&str> = receipt.issue["expression"].as_array().expect("expression").iter().filter_map(Value::as_str).collect();
        assert!(expressions.iter().any(|e| e.ends_with("Communication")), "{receipt:#?}");
        let text = receipt.text.to_lowercase();
        assert!(text.contains("classe"), "names the class: {receipt:#?}");
        assert!(text.contains("morbillo"), "names the disease: {receipt:#?}");
        assert!(text.contains(MILANO.asl) || text.contains(&MILANO.asl_name.to_lowercase()), "names the responsible ASL: {receipt:#?}");
        // the other entries carry no receipt
        for slot in [PATIENT, DOCTOR, ASL, CONDITION, CRITERION] {
            let outcome = &posted.response(slot)["outcome"];
            let has_esito = outcome["issue"].as_array().into_iter().flatten().any(|i| {
                i["details"]["coding"].as_array().into_iter().flatten().any(|c| c["system"] == canon("CodeSystem/esito-segnalazione").as_str())
            });
            assert!(!has_esito, "slot {slot}: {outcome:#}");
        }
    }

    async fn receipt_of_a_single_post_with_prefer_operation_outcome(app) {
        let report = Report::new("colera", "001.0").provisional();
        put_pieces(&app, &report, &[PATIENT, DOCTOR, ASL, CONDITION]).await;
        let mut segnalazione = report.pieces().into_iter().find(|(s, _, _)| *s == SEGNALAZIONE).unwrap().2;
        segnalazione.as_object_mut().unwrap().shift_remove("id");
        let r = app.post_with("/fhir/Communication", &segnalazione, &[("Prefer", "return=OperationOutcome")]).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.body["resourceType"], "OperationOutcome", "{}", r.text);
        let receipt = receipt_in(&r.body);
        assert_eq!(receipt.code, "notificato", "{receipt:#?}");
        assert_eq!(receipt.severity, "information");
        assert_eq!(receipt.issue["expression"], json!(["Communication"]), "{receipt:#?}");
        assert!(receipt.text.to_lowercase().contains("classe"), "{receipt:#?}");
        let case = the_case_of(&app, &report.piece_reference(PATIENT)).await;
        assert_case(&case, &report.piece_reference(PATIENT), "classe-1");
    }

    async fn receipt_of_a_waiting_report_is_in_attesa_and_of_a_class_iv_case_notificato(app) {
        let waiting = post_report(&app, &Report::new("epatite-a", "070.1").positive("clinica")).await;
        assert_eq!(waiting.receipt().code, "in-attesa");
        assert_eq!(waiting.receipt().severity, "information");
        let class_iv = post_report(&app, &Report::new("scabbia", "133.0").person(2)).await;
        assert_eq!(class_iv.receipt().code, "notificato");
    }
}

/// After a refused transaction: nothing of the report is stored, searches find nothing.
async fn assert_nothing_stored(app: &TestApp, report: &Report) {
    for rt in [
        "Patient",
        "Practitioner",
        "Organization",
        "Condition",
        "Observation",
        "Communication",
    ] {
        assert_eq!(app.count(rt).await, 0, "{rt}");
    }
    assert!(
        search(
            app,
            &format!("Patient?identifier={CODICE_FISCALE}|{}", report.cf)
        )
        .await
        .is_empty()
    );
    assert!(
        search(
            app,
            &format!(
                "Condition?identifier={EHR_CONDITIONS}|{}-diagnosi",
                report.tag
            )
        )
        .await
        .is_empty()
    );
    assert!(
        search(
            app,
            &format!(
                "Communication?identifier={EHR_SEGNALAZIONI}|{}-segnalazione",
                report.tag
            )
        )
        .await
        .is_empty()
    );
}

// =================================================================================================
// Subscriptions: `notifiable-case` and `outbreak` with region / asl filters

on_both_databases_fast! {
    async fn subscriptions_filtered_by_region_and_asl_receive_exactly_their_cases(app) {
        let lombardia = Hook::start().await;
        let valle_d_aosta = Hook::start().await;
        let ats_milano = Hook::start().await;
        subscribe_active(&app, &subscription(&lombardia.url, "notifiable-case", "id-only", &["Communication?region=030"], None)).await;
        subscribe_active(&app, &subscription(&valle_d_aosta.url, "notifiable-case", "id-only", &["Communication?region=020"], None)).await;
        subscribe_active(&app, &subscription(&ats_milano.url, "notifiable-case", "id-only", &[&format!("Communication?asl={}", MILANO.asl)], None)).await;

        let milano = post_report(&app, &morbillo("morbillo-mi", 1).lives_in(MILANO).notified_by(MILANO)).await;
        let aosta = post_report(&app, &morbillo("morbillo-ao", 2).lives_in(AOSTA).notified_by(AOSTA)).await;
        let bergamo = post_report(&app, &morbillo("morbillo-bg", 3).lives_in(BERGAMO).notified_by(BERGAMO)).await;
        // last: lives in Aosta, notified in Milano: every subscriber's, so it closes each one's stream
        let both = post_report(&app, &morbillo("morbillo-ao-mi", 4).lives_in(AOSTA).notified_by(MILANO)).await;
        let mut ids = Vec::new();
        for p in [&milano, &aosta, &bergamo, &both] {
            ids.push(the_case_of(&app, &p.patient()).await["id"].as_str().unwrap().to_string());
        }
        let (mi, ao, bg, am) = (ids[0].clone(), ids[1].clone(), ids[2].clone(), ids[3].clone());

        let got = wait_for_event_about(&lombardia, &am, 20).await;
        assert_eq!(got, vec![mi.clone(), bg.clone(), am.clone()], "Lombardia");
        let got = wait_for_event_about(&valle_d_aosta, &am, 20).await;
        assert_eq!(got, vec![ao.clone(), am.clone()], "Valle d'Aosta");
        let got = wait_for_event_about(&ats_milano, &am, 20).await;
        assert_eq!(got, vec![mi.clone(), am.clone()], "ATS Milano");
    }

    async fn subscription_by_category_receives_class_i_only(app) {
        let hook = Hook::start().await;
        let filter = format!("Communication?category={}|classe-1", canon("CodeSystem/tipo-notifica"));
        subscribe_active(&app, &subscription(&hook.url, "notifiable-case", "full-resource", &[&filter], None)).await;
        post_report(&app, &morbillo("morbillo", 1)).await;
        let cholera = post_report(&app, &Report::new("colera", "001.0").person(2).provisional()).await;
        let case = the_case_of(&app, &cholera.patient()).await;
        let id = case["id"].as_str().unwrap().to_string();
        let got = wait_for_event_about(&hook, &id, 20).await;
        assert_eq!(got, vec![id.clone()]);
        let bundle = hook.of_type("event-notification").await.remove(0);
        let comm = bundle["entry"].as_array().unwrap().iter()
            .find(|e| e["resource"]["resourceType"] == "Communication").expect("the case, full resource");
        assert_eq!(comm["resource"]["priority"], "stat");
        assert!(bundle["entry"].as_array().unwrap().iter().any(|e| e["resource"]["resourceType"] == "Patient"), "with its Patient");
    }

    async fn an_outbreak_subscriber_receives_the_focolaio(app) {
        let hook = Hook::start().await;
        subscribe_active(&app, &subscription(&hook.url, "outbreak", "full-resource", &["Communication?region=030"], None)).await;
        post_report(&app, &pediculosi("pid-1", 1, "MIEE81601C", 3)).await;
        post_report(&app, &pediculosi("pid-2", 2, "MIEE81601C", 1)).await;
        let outbreak = the_outbreak(&app).await;
        let id = outbreak["id"].as_str().unwrap().to_string();
        let got = wait_for_event_about(&hook, &id, 20).await;
        assert_eq!(got, vec![id.clone()], "the focolaio, not its class IV members");
        let bundle = hook.of_type("event-notification").await.remove(0);
        let comm = bundle["entry"].as_array().unwrap().iter()
            .find(|e| e["resource"]["resourceType"] == "Communication").expect("the focolaio, full resource");
        assert_eq!(category(&comm["resource"]), "focolaio");
        // a third case: the new version of the same focolaio is an event too
        post_report(&app, &pediculosi("pid-3", 3, "MIEE81601C", 2)).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ids = received_ids(&hook).await;
            if ids.len() >= 2 {
                assert_eq!(ids, vec![id.clone(), id.clone()]);
                break;
            }
            assert!(Instant::now() < deadline, "no event for the focolaio's new version: {ids:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn a_withdrawn_case_is_an_event_for_its_subscribers(app) {
        let hook = Hook::start().await;
        subscribe_active(&app, &subscription(&hook.url, "notifiable-case", "full-resource", &["Communication?region=030"], None)).await;
        let posted = post_report(&app, &morbillo("morbillo", 1)).await;
        let id = the_case_of(&app, &posted.patient()).await["id"].as_str().unwrap().to_string();
        wait_for_event_about(&hook, &id, 20).await;
        correct(&app, &posted.condition(), |c| set_verification(c, "refuted")).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let events = hook.of_type("event-notification").await;
            if events.len() >= 2 {
                let comm = events[1]["entry"].as_array().unwrap().iter()
                    .find(|e| e["resource"]["resourceType"] == "Communication").expect("the case");
                assert_eq!(comm["resource"]["id"], id.as_str());
                assert_eq!(comm["resource"]["status"], "entered-in-error");
                break;
            }
            assert!(Instant::now() < deadline, "no event for the withdrawal");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // ---- found in review: routing without any place, episodes, outbreaks, pieces racing --------------

    async fn routing_without_comune_or_notifying_asl_goes_to_the_ministry_with_a_warning(app) {
        let mut bundle = morbillo("morbillo", 1).homeless().bundle();
        let entries = bundle["entry"].as_array_mut().unwrap();
        entries.retain(|e| e["fullUrl"] != full_url(ASL).as_str());
        let segnalazione = entries.iter_mut().find(|e| e["fullUrl"] == full_url(SEGNALAZIONE).as_str()).unwrap();
        segnalazione["resource"].as_object_mut().unwrap().shift_remove("recipient");
        let posted = post_bundle(&app, &bundle).await;
        assert_eq!(posted.receipt().code, "notificato", "{:#?}", posted.receipt());
        assert!(posted.receipt().has_warning(), "{:#?}", posted.receipt());
        let case = the_case_of(&app, &posted.patient()).await;
        assert_eq!(recipients(&case), set(&[r_minsal()]), "{case:#}");
    }

    async fn episode_a_second_report_beyond_the_window_is_a_new_case(app) {
        // class II episodes last 90 days (rule data): measles twice, 200 days apart, is two cases
        let first = post_report(&app, &morbillo("m-1", 1).onset(&days_ago(200)).recorded(&days_ago(199))).await;
        post_report(&app, &morbillo("m-2", 1).onset(&days_ago(2)).recorded(&days_ago(1))).await;
        assert_eq!(active_cases_of(&app, &first.patient()).await.len(), 2);
    }

    async fn episode_a_second_report_within_the_window_joins_the_case(app) {
        let first = post_report(&app, &morbillo("m-1", 1).onset(&days_ago(20)).recorded(&days_ago(19))).await;
        post_report(&app, &morbillo("m-2", 1).doctor(2).onset(&days_ago(18)).recorded(&days_ago(1))).await;
        assert_eq!(active_cases_of(&app, &first.patient()).await.len(), 1);
    }

    async fn tb_relapse_reported_twice_is_one_relapse_case(app) {
        let first = post_report(&app, &tb("tb-1", 1).onset(&days_ago(400)).recorded(&days_ago(395)).positive("coltura")).await;
        post_report(&app, &tb("tb-2", 1).treatments("recidiva").onset(&days_ago(3)).positive("coltura")).await;
        post_report(&app, &tb("tb-3", 1).doctor(2).treatments("recidiva").onset(&days_ago(3)).positive("coltura")).await;
        assert_eq!(active_cases_of(&app, &first.patient()).await.len(), 2);
    }

    async fn tb_chronic_case_whose_notification_was_withdrawn_is_notified(app) {
        let first = post_report(&app, &tb("tb-1", 1).onset(&days_ago(400)).recorded(&days_ago(395)).positive("coltura")).await;
        correct(&app, &first.condition(), |c| set_verification(c, "entered-in-error")).await;
        let chronic = post_report(&app, &tb("tb-2", 1).treatments("cronico").onset(&days_ago(3)).positive("coltura")).await;
        assert_eq!(chronic.receipt().code, "notificato", "{:#?}", chronic.receipt());
        assert_eq!(active_cases_of(&app, &first.patient()).await.len(), 1);
    }

    async fn outbreak_needs_two_people_not_two_reports_of_one(app) {
        post_report(&app, &pediculosi("p-1", 1, "MIEE81601C", 5)).await;
        post_report(&app, &pediculosi("p-2", 1, "MIEE81601C", 3).doctor(2)).await;
        assert!(outbreaks(&app).await.is_empty());
    }

    async fn outbreak_onsets_beyond_the_window_are_no_outbreak(app) {
        // the rule data's window is 42 days: onsets 60 days apart are two separate cases
        post_report(&app, &pediculosi("p-1", 1, "MIEE81601C", 62)).await;
        post_report(&app, &pediculosi("p-2", 2, "MIEE81601C", 2)).await;
        assert!(outbreaks(&app).await.is_empty());
    }

    async fn pieces_racing_each_other_still_make_the_case(app) {
        // the segnalazione, its Condition and its criterion PUT at the same moment, many times
        for round in 0..6 {
            let report = morbillo(&format!("corsa-{round}"), round + 1);
            let pieces = report.pieces();
            // the doctor and the ASL are shared by the rounds: created once, then updated
            for slot in [PATIENT, DOCTOR, ASL] {
                let (_, reference, resource) = pieces.iter().find(|(s, _, _)| *s == slot).unwrap();
                let r = app.put(&format!("/fhir/{reference}"), resource, &[]).await;
                assert!(r.status.is_success(), "{}", r.text);
            }
            let app = &app;
            let puts = [SEGNALAZIONE, CONDITION, CRITERION].map(|slot| {
                let (_, reference, resource) = pieces.iter().find(|(s, _, _)| *s == slot).unwrap().clone();
                async move { app.put(&format!("/fhir/{reference}"), &resource, &[]).await }
            });
            for r in futures::future::join_all(puts).await {
                assert!(r.status.is_success(), "{}", r.text);
            }
            let patient = report.piece_reference(PATIENT);
            let case = the_case_of(app, &patient).await;
            assert_case(&case, &patient, "classe-2");
        }
    }
}
