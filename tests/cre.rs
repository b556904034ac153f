//! CRE bacteraemia surveillance (docs/cre-contract.md), black box: laboratory evidence goes in over
//! the FHIR API, case `Communication`s come out, on SQLite and PostgreSQL.
//!
//! Every test starts from `tests/fixtures/cre/kpn-blood-transaction.json` (a Niguarda blood culture
//! with K. pneumoniae, meropenem / imipenem / ertapenem all R and blaKPC detected) and changes what
//! its rule is about with the `Lab` builder below; two more fixtures hold one culture with two species
//! and a sender's local codes.
mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use axum::http::StatusCode;
use common::{TestApp, fixture};
use sentinella::italy::codice_fiscale::CodiceFiscale;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const CANON: &str = "https://sentinella-fhir.github.io/ig";
const ICD9: &str = "http://hl7.org/fhir/sid/icd-9-cm";
const SNOMED: &str = "http://snomed.info/sct";
const UCUM: &str = "http://unitsofmeasure.org";
const V3_INTERPRETATION: &str =
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation";

const ESCHERICHIA_COLI: (&str, &str) = ("112283007", "Escherichia coli");
const KLEBSIELLA_OXYTOCA: (&str, &str) = ("40886007", "Klebsiella oxytoca");
const ENTEROBACTER_CLOACAE: (&str, &str) = ("14385004", "Enterobacter cloacae");

/// The base fixture's collection date, isolate date and report date.
const COLLECTED: &str = "2026-03-02T08:15:00+01:00";
const ISOLATE_EFFECTIVE: &str = "2026-03-03T10:20:00+01:00";
const REPORT_ISSUED: &str = "2026-03-04T11:40:00+01:00";

/// The entries of `kpn-blood-transaction.json`, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Role {
    Patient,
    Asl,
    Hospital,
    Encounter,
    Specimen,
    Isolate,
    Mem,
    Ipm,
    Etp,
    Kpc,
    Report,
}

impl Role {
    const ALL: [Role; 11] = [
        Role::Patient,
        Role::Asl,
        Role::Hospital,
        Role::Encounter,
        Role::Specimen,
        Role::Isolate,
        Role::Mem,
        Role::Ipm,
        Role::Etp,
        Role::Kpc,
        Role::Report,
    ];

    fn full_url(self) -> String {
        format!("urn:uuid:5e7a0c3e-2d4b-4f6a-8c1d-{:012}", self as usize + 1)
    }

    fn of_full_url(url: &str) -> Role {
        *Role::ALL
            .iter()
            .find(|r| r.full_url() == url)
            .unwrap_or_else(|| panic!("no role has fullUrl {url}"))
    }

    fn resource_type(self) -> &'static str {
        match self {
            Role::Patient => "Patient",
            Role::Asl | Role::Hospital => "Organization",
            Role::Encounter => "Encounter",
            Role::Specimen => "Specimen",
            Role::Isolate | Role::Mem | Role::Ipm | Role::Etp | Role::Kpc => "Observation",
            Role::Report => "DiagnosticReport",
        }
    }

    /// The id a piece gets when it is sent on its own with `PUT /fhir/<Type>/<id>`.
    fn fixed_id(self) -> &'static str {
        match self {
            Role::Patient => "cre-paziente",
            Role::Asl => "cre-asl",
            Role::Hospital => "cre-ospedale",
            Role::Encounter => "cre-ricovero",
            Role::Specimen => "cre-campione",
            Role::Isolate => "cre-isolato",
            Role::Mem => "cre-meropenem",
            Role::Ipm => "cre-imipenem",
            Role::Etp => "cre-ertapenem",
            Role::Kpc => "cre-kpc",
            Role::Report => "cre-referto",
        }
    }

    fn fixed_reference(self) -> String {
        format!("{}/{}", self.resource_type(), self.fixed_id())
    }

    /// The agente-antimicrobico code of a susceptibility entry.
    fn agent(self) -> &'static str {
        match self {
            Role::Mem => "MEM",
            Role::Ipm => "IPM",
            Role::Etp => "ETP",
            other => panic!("{other:?} is not a susceptibility"),
        }
    }

    /// An MIC well inside the susceptible range (EUCAST Enterobacterales).
    fn susceptible_mic(self) -> &'static str {
        match self {
            Role::Mem => "0.125",
            Role::Ipm => "0.25",
            Role::Etp => "0.06",
            other => panic!("{other:?} is not a susceptibility"),
        }
    }
}

/// A valid codice fiscale for test person `n` (Luca Verdi, born 1 January 1980).
fn person_cf(n: u32) -> String {
    CodiceFiscale::complete(&format!("VRDLCU80A01F{n:03}"))
        .expect("well formed")
        .as_str()
        .to_string()
}

/// Remove every reference to `target` (single references and array items); drop emptied arrays.
fn drop_references(v: &mut Value, target: &str) {
    let points_at = |v: &Value| v.get("reference").and_then(Value::as_str) == Some(target);
    match v {
        Value::Object(map) => {
            map.retain(|_, child| !points_at(child));
            for child in map.values_mut() {
                drop_references(child, target);
            }
            map.retain(|_, child| !matches!(child, Value::Array(a) if a.is_empty()));
        }
        Value::Array(items) => {
            items.retain(|i| !points_at(i));
            for i in items {
                drop_references(i, target);
            }
        }
        _ => {}
    }
}

/// Replace references by the map (fullUrl → `Type/id`).
fn rewrite_references(v: &mut Value, map: &HashMap<String, String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                if k == "reference" {
                    if let Some(to) = child.as_str().and_then(|s| map.get(s)) {
                        *child = json!(to);
                    }
                } else {
                    rewrite_references(child, map);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| rewrite_references(i, map)),
        _ => {}
    }
}

/// Variants of the base laboratory transaction.
#[derive(Clone)]
struct Lab {
    bundle: Value,
}

impl Lab {
    /// The fixture as it is: K. pneumoniae in blood, MEM / IPM / ETP R, blaKPC detected.
    fn base() -> Self {
        Lab {
            bundle: fixture("cre/kpn-blood-transaction.json"),
        }
    }

    /// Meropenem R is the only support: imipenem and ertapenem S, no carbapenemase test.
    fn meropenem_r() -> Self {
        Self::base()
            .susceptible(Role::Ipm)
            .susceptible(Role::Etp)
            .without(Role::Kpc)
    }

    /// A panel of one susceptibility (`agent`) and nothing else: no other agent, no carbapenemase.
    fn only(agent: Role) -> Self {
        let mut lab = Self::base().without(Role::Kpc);
        for other in [Role::Mem, Role::Ipm, Role::Etp] {
            if other != agent {
                lab = lab.without(other);
            }
        }
        lab
    }

    fn has(&self, role: Role) -> bool {
        self.bundle["entry"]
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| e["fullUrl"] == role.full_url().as_str())
    }

    fn resource(&mut self, role: Role) -> &mut Value {
        let url = role.full_url();
        let entry = self.bundle["entry"]
            .as_array_mut()
            .expect("entries")
            .iter_mut()
            .find(|e| e["fullUrl"] == url.as_str())
            .unwrap_or_else(|| panic!("{role:?} is not in this Bundle"));
        &mut entry["resource"]
    }

    fn set(mut self, role: Role, key: &str, value: Option<Value>) -> Self {
        let resource = self.resource(role).as_object_mut().expect("object");
        match value {
            Some(v) => {
                resource.insert(key.to_string(), v);
            }
            None => {
                resource.remove(key);
            }
        }
        self
    }

    /// Another person: codice fiscale, name, sex and birth date of test person `n`.
    fn person(self, n: u32) -> Self {
        self.cf(&person_cf(n))
            .set(
                Role::Patient,
                "name",
                Some(json!([{"family": "Verdi", "given": ["Luca"]}])),
            )
            .set(Role::Patient, "birthDate", Some(json!("1980-01-01")))
            .set(Role::Patient, "gender", Some(json!("male")))
    }

    fn cf(mut self, cf: &str) -> Self {
        self.resource(Role::Patient)["identifier"][0]["value"] = json!(cf);
        self
    }

    /// Make the business identifiers of the episode (encounter, specimen, results, report) unique, so
    /// that another Bundle with the same tag-less content is another culture, not a redelivery.
    fn tag(mut self, tag: &str) -> Self {
        for role in [
            Role::Encounter,
            Role::Specimen,
            Role::Isolate,
            Role::Mem,
            Role::Ipm,
            Role::Etp,
            Role::Kpc,
            Role::Report,
        ] {
            if self.has(role) {
                let id = &mut self.resource(role)["identifier"][0]["value"];
                *id = json!(format!("{}-{tag}", id.as_str().expect("identifier value")));
            }
        }
        self
    }

    fn species(self, (code, display): (&str, &str)) -> Self {
        let value = json!({"coding": [{"system": SNOMED, "code": code, "display": display}]});
        self.set(Role::Isolate, "valueCodeableConcept", Some(value))
    }

    fn specimen_type(self, code: &str, display: &str) -> Self {
        let value = json!({"coding": [{"system": SNOMED, "code": code, "display": display}]});
        self.set(Role::Specimen, "type", Some(value))
    }

    /// `Specimen.collection.collectedDateTime` (None: no collection at all).
    fn collected(self, when: Option<&str>) -> Self {
        let collection = when.map(|w| json!({"collectedDateTime": w}));
        self.set(Role::Specimen, "collection", collection)
    }

    /// `effectiveDateTime` of every Observation in the Bundle.
    fn effective(mut self, when: Option<&str>) -> Self {
        for role in [Role::Isolate, Role::Mem, Role::Ipm, Role::Etp, Role::Kpc] {
            if self.has(role) {
                self = self.set(role, "effectiveDateTime", when.map(|w| json!(w)));
            }
        }
        self
    }

    fn issued(self, when: &str) -> Self {
        self.set(Role::Report, "issued", Some(json!(when)))
    }

    /// The dates of a culture: collected, isolate identified, report issued.
    fn dated(self, collected: &str, effective: &str, issued: &str) -> Self {
        self.collected(Some(collected))
            .effective(Some(effective))
            .issued(issued)
    }

    /// A susceptibility's interpretation (v3 S / I / R), or none.
    fn sir(self, agent: Role, code: Option<&str>) -> Self {
        let interpretation = code.map(|c| {
            let display = match c {
                "S" => "Susceptible",
                "I" => "Intermediate",
                "R" => "Resistant",
                _ => c,
            };
            json!([{"coding": [{"system": V3_INTERPRETATION, "code": c, "display": display}]}])
        });
        self.set(agent, "interpretation", interpretation)
    }

    /// A susceptibility's `valueQuantity` (decimal as written, UCUM unit `mg/L` or `mm`), or none.
    fn quantity(self, agent: Role, value: Option<(&str, &str)>) -> Self {
        let quantity = value.map(|(v, unit)| {
            let number: Value = serde_json::from_str(v).expect("a decimal");
            json!({"value": number, "unit": unit, "system": UCUM, "code": unit})
        });
        self.set(agent, "valueQuantity", quantity)
    }

    /// Interpretation only (no number).
    fn interpreted(self, agent: Role, code: &str) -> Self {
        self.sir(agent, Some(code)).quantity(agent, None)
    }

    /// A number only (no interpretation): the engine must read it against EUCAST.
    fn measured(self, agent: Role, value: &str, unit: &str) -> Self {
        self.sir(agent, None).quantity(agent, Some((value, unit)))
    }

    fn susceptible(self, agent: Role) -> Self {
        let mic = agent.susceptible_mic();
        self.sir(agent, Some("S"))
            .quantity(agent, Some((mic, "mg/L")))
    }

    fn status(self, role: Role, status: &str) -> Self {
        self.set(role, "status", Some(json!(status)))
    }

    /// Take an entry out, and every reference to it.
    fn without(mut self, role: Role) -> Self {
        let url = role.full_url();
        self.bundle["entry"]
            .as_array_mut()
            .expect("entries")
            .retain(|e| e["fullUrl"] != url.as_str());
        drop_references(&mut self.bundle, &url);
        self
    }

    fn unlink_specimen(self, role: Role) -> Self {
        self.set(role, "specimen", None)
    }

    /// The transaction Bundle, every `ifNoneExist` matching its resource's identifier.
    fn bundle(&self) -> Value {
        let mut bundle = self.bundle.clone();
        for entry in bundle["entry"].as_array_mut().expect("entries") {
            let identifier = &entry["resource"]["identifier"][0];
            if entry["request"]["ifNoneExist"].is_string() && identifier.is_object() {
                let query = format!(
                    "identifier={}|{}",
                    identifier["system"].as_str().expect("system"),
                    identifier["value"].as_str().expect("value")
                );
                entry["request"]["ifNoneExist"] = json!(query);
            }
        }
        bundle
    }

    /// Each resource on its own, with its fixed id and literal references between the pieces.
    fn pieces(&self) -> HashMap<Role, Value> {
        let bundle = self.bundle();
        let entries = bundle["entry"].as_array().expect("entries");
        let map: HashMap<String, String> = entries
            .iter()
            .map(|e| {
                let url = e["fullUrl"].as_str().expect("fullUrl");
                (url.to_string(), Role::of_full_url(url).fixed_reference())
            })
            .collect();
        entries
            .iter()
            .map(|e| {
                let role = Role::of_full_url(e["fullUrl"].as_str().expect("fullUrl"));
                let mut resource = e["resource"].clone();
                resource["id"] = json!(role.fixed_id());
                rewrite_references(&mut resource, &map);
                (role, resource)
            })
            .collect()
    }
}

/// A transaction that went through, with what each `fullUrl` became.
struct Posted {
    body: Value,
    refs: HashMap<String, String>,
}

impl Posted {
    /// `Type/id` of the entry with this fullUrl.
    fn at(&self, full_url: &str) -> String {
        self.refs
            .get(full_url)
            .unwrap_or_else(|| panic!("no entry {full_url}"))
            .clone()
    }

    fn of(&self, role: Role) -> String {
        self.at(&role.full_url())
    }
}

/// The index of the entry with this fullUrl.
fn entry_index(bundle: &Value, full_url: &str) -> usize {
    bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .position(|e| e["fullUrl"] == full_url)
        .expect("entry present")
}

fn stored_reference(entry: &Value) -> String {
    let resource = &entry["resource"];
    if let (Some(rt), Some(id)) = (resource["resourceType"].as_str(), resource["id"].as_str()) {
        return format!("{rt}/{id}");
    }
    let location = entry["response"]["location"].as_str().expect("a location");
    let parts: Vec<&str> = location.split('/').collect();
    let end = parts
        .iter()
        .position(|p| *p == "_history")
        .unwrap_or(parts.len());
    format!("{}/{}", parts[end - 2], parts[end - 1])
}

async fn post_lab(app: &TestApp, bundle: &Value) -> Posted {
    let r = app.post("/fhir", bundle).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["type"], "transaction-response", "{}", r.text);
    let answers = r.body["entry"].as_array().expect("response entries");
    let requests = bundle["entry"].as_array().expect("request entries");
    assert_eq!(answers.len(), requests.len(), "{}", r.text);
    let refs = requests
        .iter()
        .zip(answers)
        .map(|(q, a)| {
            let url = q["fullUrl"].as_str().expect("fullUrl").to_string();
            (url, stored_reference(a))
        })
        .collect();
    Posted { body: r.body, refs }
}

/// Issues of severity warning in a transaction-response entry's `response.outcome`.
fn warnings(entry: &Value) -> Vec<Value> {
    entry["response"]["outcome"]["issue"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["severity"] == "warning")
        .cloned()
        .collect()
}

fn assert_no_warnings(posted: &Posted) {
    for (i, entry) in posted.body["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .enumerate()
    {
        assert!(
            warnings(entry).is_empty(),
            "entry {i} has warnings: {}",
            entry["response"]["outcome"]
        );
    }
}

/// Read, change and write back a stored resource (a laboratory's correction).
async fn correct(app: &TestApp, reference: &str, change: impl FnOnce(&mut Value)) {
    let current = app.get(&format!("/fhir/{reference}")).await;
    assert_eq!(current.status, StatusCode::OK, "{}", current.text);
    let mut resource = current.body;
    change(&mut resource);
    let r = app.put(&format!("/fhir/{reference}"), &resource, &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

/// The amended meropenem result: susceptible after all.
fn amend_to_susceptible(obs: &mut Value) {
    obs["status"] = json!("amended");
    obs["interpretation"] =
        json!([{"coding": [{"system": V3_INTERPRETATION, "code": "S", "display": "Susceptible"}]}]);
    obs["valueQuantity"] = json!({"value": 0.125, "unit": "mg/L", "system": UCUM, "code": "mg/L"});
}

/// Current CRE case Communications matching the contract's search (plus `extra` parameters).
async fn cases_where(app: &TestApp, extra: &str) -> Vec<Value> {
    let r = app
        .get(&format!(
            "/fhir/Communication?category={CANON}/CodeSystem/tipo-notifica|cre{extra}&_count=100"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
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

async fn cases(app: &TestApp) -> Vec<Value> {
    cases_where(app, "").await
}

/// The one and only CRE case.
async fn the_case(app: &TestApp) -> Value {
    let mut all = cases(app).await;
    assert_eq!(all.len(), 1, "expected exactly one case: {all:#?}");
    all.remove(0)
}

fn extensions<'a>(v: &'a Value, url: &str) -> Vec<&'a Value> {
    v["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["url"] == url)
        .collect()
}

/// The one extension with this url.
fn extension<'a>(v: &'a Value, url: &str) -> &'a Value {
    let found = extensions(v, url);
    assert_eq!(found.len(), 1, "expected one extension {url} in {v:#}");
    found[0]
}

fn sub_extension<'a>(ext: &'a Value, url: &str) -> Option<&'a Value> {
    let found = extensions(ext, url);
    assert!(found.len() <= 1, "sub-extension {url} repeated in {ext:#}");
    found.first().copied()
}

fn canon(path: &str) -> String {
    format!("{CANON}/{path}")
}

/// One `criteri-soddisfatti` as the tests compare it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Criterion {
    criterio: String,
    evidenza: String,
    agente: Option<String>,
    origine: Option<String>,
    breakpoint: Option<String>,
}

/// Criterion a on a laboratory interpretation.
fn resistance(evidence: &str, agent: &str) -> Criterion {
    Criterion {
        criterio: "resistenza-carbapenemi".into(),
        evidenza: evidence.into(),
        agente: Some(agent.into()),
        origine: Some("interpretazione-laboratorio".into()),
        breakpoint: None,
    }
}

/// Criterion a on an MIC or zone read against the default EUCAST table.
fn resistance_by_breakpoint(evidence: &str, agent: &str) -> Criterion {
    Criterion {
        origine: Some("breakpoint-eucast".into()),
        breakpoint: Some("EUCAST 16.1".into()),
        ..resistance(evidence, agent)
    }
}

/// Criterion b: the contract fixes only `criterio` and `evidenza` for it.
fn carbapenemase(evidence: &str) -> Criterion {
    Criterion {
        criterio: "carbapenemasi".into(),
        evidenza: evidence.into(),
        agente: None,
        origine: None,
        breakpoint: None,
    }
}

/// The case's `criteri-soddisfatti`, sorted.
fn criteria(case: &Value) -> Vec<Criterion> {
    let mut found: Vec<Criterion> =
        extensions(case, &canon("StructureDefinition/criteri-soddisfatti"))
            .into_iter()
            .map(|ext| {
                let criterio = &sub_extension(ext, "criterio").expect("criterio")["valueCoding"];
                assert_eq!(
                    criterio["system"],
                    canon("CodeSystem/criterio-cre").as_str(),
                    "{ext:#}"
                );
                let criterio = criterio["code"]
                    .as_str()
                    .expect("criterio code")
                    .to_string();
                let evidenza = sub_extension(ext, "evidenza").expect("evidenza")["valueReference"]
                    ["reference"]
                    .as_str()
                    .expect("evidenza reference")
                    .to_string();
                if criterio == "carbapenemasi" {
                    return carbapenemase(&evidenza);
                }
                let agente = sub_extension(ext, "agente").map(|a| {
                    let coding = &a["valueCoding"];
                    assert_eq!(
                        coding["system"],
                        canon("CodeSystem/agente-antimicrobico").as_str(),
                        "{ext:#}"
                    );
                    coding["code"].as_str().expect("agente code").to_string()
                });
                let origine = sub_extension(ext, "origine")
                    .map(|o| o["valueCode"].as_str().expect("origine code").to_string());
                let breakpoint = sub_extension(ext, "breakpoint")
                    .map(|b| b["valueString"].as_str().expect("breakpoint").to_string());
                Criterion {
                    criterio,
                    evidenza,
                    agente,
                    origine,
                    breakpoint,
                }
            })
            .collect();
    found.sort();
    found
}

fn sorted(mut v: Vec<Criterion>) -> Vec<Criterion> {
    v.sort();
    v
}

/// The references in `about`.
fn about(case: &Value) -> BTreeSet<String> {
    case["about"]
        .as_array()
        .expect("about")
        .iter()
        .map(|r| {
            r["reference"]
                .as_str()
                .expect("about reference")
                .to_string()
        })
        .collect()
}

fn set_of(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The ICD-9-CM codes in `reasonCode`.
fn reason_codes(case: &Value) -> BTreeSet<String> {
    case["reasonCode"]
        .as_array()
        .expect("reasonCode")
        .iter()
        .flat_map(|rc| rc["coding"].as_array().cloned().unwrap_or_default())
        .map(|c| {
            assert_eq!(c["system"], ICD9, "{c}");
            c["code"].as_str().expect("code").to_string()
        })
        .collect()
}

fn instant(s: &str) -> OffsetDateTime {
    OffsetDateTime::parse(s, &Rfc3339).unwrap_or_else(|e| panic!("{s} is not a dateTime: {e}"))
}

/// The `data-riferimento` extension: which date decided the year, where it came from, the year.
fn assert_reference_date(case: &Value, when: &str, fonte: &str, anno: i64) {
    let ext = extension(case, &canon("StructureDefinition/data-riferimento"));
    let data = sub_extension(ext, "data").expect("data")["valueDateTime"]
        .as_str()
        .expect("data valueDateTime");
    assert_eq!(instant(data), instant(when), "{ext:#}");
    assert_eq!(
        sub_extension(ext, "fonte").expect("fonte")["valueCode"],
        fonte,
        "{ext:#}"
    );
    assert_eq!(
        sub_extension(ext, "anno").expect("anno")["valueInteger"],
        anno,
        "{ext:#}"
    );
}

/// The treating facility's ASL (with its reference), the region Lombardia and ISS.
fn assert_recipients(case: &Value, asl: &str) {
    let recipients = case["recipient"].as_array().expect("recipient");
    assert_eq!(recipients.len(), 3, "{:#}", case["recipient"]);
    let by_system = |system: String| {
        recipients
            .iter()
            .find(|r| r["identifier"]["system"] == system.as_str())
            .unwrap_or_else(|| panic!("no recipient {system}: {:#}", case["recipient"]))
    };
    let asl_recipient = by_system(canon("sid/asl"));
    assert_eq!(asl_recipient["reference"], asl);
    assert_eq!(asl_recipient["identifier"]["value"], "030308");
    let region = by_system(canon("sid/regione"));
    assert_eq!(region["identifier"]["value"], "030");
    assert_eq!(region["display"], "Lombardia");
    let iss = by_system(canon("sid/ente"));
    assert_eq!(iss["identifier"]["value"], "ISS");
    assert_eq!(iss["display"], "Istituto Superiore di Sanità");
}

/// Everything the contract fixes for every active case, whatever the evidence.
fn assert_case(case: &Value, patient: &str, asl: &str, organism_icd9: &str) {
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
    let case_ids: Vec<&Value> = case["identifier"]
        .as_array()
        .expect("identifier")
        .iter()
        .filter(|i| i["system"] == canon("sid/caso").as_str())
        .collect();
    assert_eq!(case_ids.len(), 1, "{case:#}");
    assert_eq!(case_ids[0]["value"], id, "{case:#}");
    assert_eq!(case["status"], "completed", "{case:#}");
    assert!(
        case["category"]
            .as_array()
            .expect("category")
            .iter()
            .flat_map(|c| c["coding"].as_array().cloned().unwrap_or_default())
            .any(
                |c| c["system"] == canon("CodeSystem/tipo-notifica").as_str() && c["code"] == "cre"
            ),
        "{case:#}"
    );
    assert_eq!(case["priority"], "routine");
    assert_eq!(case["subject"]["reference"], patient);
    instant(case["sent"].as_str().expect("sent"));
    assert_recipients(case, asl);
    assert_eq!(
        reason_codes(case),
        set_of(&[organism_icd9, "790.7", "V09.1"]),
        "{case:#}"
    );
    let definition = extension(case, &canon("StructureDefinition/definizione-caso"));
    assert_eq!(
        definition["valueCanonical"],
        canon("definizione-caso/cre|1.0.0").as_str()
    );
    assert!(
        !case["payload"][0]["contentString"]
            .as_str()
            .expect("payload contentString")
            .trim()
            .is_empty()
    );
}

/// A case on the base fixture's K. pneumoniae, decided on `criteria` from `evidence`.
fn assert_kpn_case(case: &Value, posted: &Posted, expected: Vec<Criterion>, evidence: &[Role]) {
    assert_case(
        case,
        &posted.of(Role::Patient),
        &posted.of(Role::Asl),
        "041.3",
    );
    assert_eq!(criteria(case), sorted(expected), "{case:#}");
    let mut listed = vec![posted.of(Role::Isolate), posted.of(Role::Report)];
    listed.extend(evidence.iter().map(|r| posted.of(*r)));
    assert_eq!(
        about(case),
        listed.into_iter().collect::<BTreeSet<_>>(),
        "{case:#}"
    );
    assert_reference_date(case, COLLECTED, "raccolta-campione", 2026);
}

/// MIC or zone with no interpretation, one step below resistance and at resistance, for two people.
async fn assert_breakpoint(
    app: &TestApp,
    agent: Role,
    unit: &str,
    not_resistant: &str,
    resistant: &str,
) {
    let lab = Lab::only(agent);
    post_lab(
        app,
        &lab.clone()
            .person(1)
            .tag("a")
            .measured(agent, not_resistant, unit)
            .bundle(),
    )
    .await;
    assert!(
        cases(app).await.is_empty(),
        "{} {not_resistant} {unit} is not resistance",
        agent.agent()
    );
    let posted = post_lab(
        app,
        &lab.person(2)
            .tag("b")
            .measured(agent, resistant, unit)
            .bundle(),
    )
    .await;
    let case = the_case(app).await;
    assert_kpn_case(
        &case,
        &posted,
        vec![resistance_by_breakpoint(&posted.of(agent), agent.agent())],
        &[agent],
    );
}

/// Send the pieces one request each, in `order`: no case until the last one, then exactly one.
async fn assert_arrival_order(app: &TestApp, lab: Lab, order: &[Role]) {
    let pieces = lab.pieces();
    assert_eq!(order.len(), pieces.len(), "every piece is sent once");
    for (i, role) in order.iter().enumerate() {
        let r = app
            .put(
                &format!("/fhir/{}", role.fixed_reference()),
                &pieces[role],
                &[],
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{role:?}: {}", r.text);
        let found = cases(app).await;
        if i + 1 < order.len() {
            assert!(
                found.is_empty(),
                "a case after {role:?}, before {:?}: {found:#?}",
                order.last()
            );
        } else {
            assert_eq!(found.len(), 1, "one case once {role:?} arrived: {found:#?}");
        }
    }
    let case = the_case(app).await;
    assert_case(
        &case,
        &Role::Patient.fixed_reference(),
        &Role::Asl.fixed_reference(),
        "041.3",
    );
    assert_eq!(
        criteria(&case),
        vec![resistance(&Role::Mem.fixed_reference(), "MEM")]
    );
    assert_eq!(
        about(&case),
        [Role::Isolate, Role::Mem, Role::Report]
            .iter()
            .map(|r| r.fixed_reference())
            .collect::<BTreeSet<_>>()
    );
}

/// The pieces of a meropenem-only culture (isolate, one susceptibility, report and their context).
fn meropenem_pieces() -> Lab {
    Lab::only(Role::Mem).interpreted(Role::Mem, "R")
}

fn two_species(n: u32) -> String {
    format!("urn:uuid:9b3d41f2-6c0a-4e57-b1a8-{n:012}")
}

fn niguarda(n: u32) -> String {
    format!("urn:uuid:c4a8e2d1-0f3b-4b6e-9d27-{n:012}")
}

on_both_databases! {
    // ---- case definition ------------------------------------------------------------------------

    async fn meropenem_resistance_alone_is_a_case(app) {
        let posted = post_lab(&app, &Lab::meropenem_r().bundle()).await;
        assert!(posted.body["entry"].as_array().unwrap().iter().all(|e| e["response"]["status"] == "201 Created"));
        assert_no_warnings(&posted);
        let case = the_case(&app).await;
        assert_kpn_case(&case, &posted, vec![resistance(&posted.of(Role::Mem), "MEM")], &[Role::Mem]);
        assert_eq!(case["meta"]["versionId"], "1");
        // the contract's search parameters
        assert_eq!(cases_where(&app, "&status=completed").await.len(), 1);
        assert_eq!(cases_where(&app, &format!("&subject={}", posted.of(Role::Patient))).await.len(), 1);
        assert_eq!(cases_where(&app, "&status=entered-in-error").await.len(), 0);
        // read by id, same resource
        let read = app.get(&format!("/fhir/Communication/{}", case["id"].as_str().unwrap())).await;
        assert_eq!(read.status, StatusCode::OK);
        assert_eq!(read.body["identifier"], case["identifier"]);
    }

    async fn imipenem_resistance_alone_is_a_case(app) {
        let lab = Lab::base().susceptible(Role::Mem).susceptible(Role::Etp).without(Role::Kpc)
            .sir(Role::Ipm, Some("R")).quantity(Role::Ipm, Some(("16", "mg/L")));
        let posted = post_lab(&app, &lab.bundle()).await;
        let case = the_case(&app).await;
        assert_kpn_case(&case, &posted, vec![resistance(&posted.of(Role::Ipm), "IPM")], &[Role::Ipm]);
    }

    async fn ertapenem_resistance_alone_is_a_case(app) {
        let lab = Lab::base().susceptible(Role::Mem).susceptible(Role::Ipm).without(Role::Kpc)
            .sir(Role::Etp, Some("R")).quantity(Role::Etp, Some(("2", "mg/L")));
        let posted = post_lab(&app, &lab.bundle()).await;
        let case = the_case(&app).await;
        assert_kpn_case(&case, &posted, vec![resistance(&posted.of(Role::Etp), "ETP")], &[Role::Etp]);
    }

    async fn carbapenemase_detected_alone_is_a_case(app) {
        let lab = Lab::base().susceptible(Role::Mem).susceptible(Role::Ipm).susceptible(Role::Etp);
        let posted = post_lab(&app, &lab.bundle()).await;
        let case = the_case(&app).await;
        // the blaKPC Observation is linked to the isolate by derivedFrom (and its specimen), not hasMember
        assert_kpn_case(&case, &posted, vec![carbapenemase(&posted.of(Role::Kpc))], &[Role::Kpc]);
    }

    async fn every_satisfying_observation_is_a_criterion(app) {
        // the fixture as it is: three carbapenems R and blaKPC detected
        let posted = post_lab(&app, &Lab::base().bundle()).await;
        let case = the_case(&app).await;
        assert_kpn_case(&case, &posted, vec![
            resistance(&posted.of(Role::Mem), "MEM"),
            resistance(&posted.of(Role::Ipm), "IPM"),
            resistance(&posted.of(Role::Etp), "ETP"),
            carbapenemase(&posted.of(Role::Kpc)),
        ], &[Role::Mem, Role::Ipm, Role::Etp, Role::Kpc]);
    }

    async fn carbapenemase_not_detected_is_not_a_case(app) {
        let mut lab = Lab::base().susceptible(Role::Mem).susceptible(Role::Ipm).susceptible(Role::Etp);
        lab.resource(Role::Kpc)["valueCodeableConcept"] =
            json!({"coding": [{"system": SNOMED, "code": "260415000", "display": "Not detected"}]});
        post_lab(&app, &lab.bundle()).await;
        assert!(cases(&app).await.is_empty());
    }

    async fn escherichia_coli_is_a_case_coded_041_4(app) {
        let posted = post_lab(&app, &Lab::meropenem_r().species(ESCHERICHIA_COLI).bundle()).await;
        let case = the_case(&app).await;
        assert_case(&case, &posted.of(Role::Patient), &posted.of(Role::Asl), "041.4");
        assert_eq!(criteria(&case), vec![resistance(&posted.of(Role::Mem), "MEM")]);
    }

    async fn intermediate_is_not_resistance(app) {
        // meropenem I (MIC 4: EUCAST I), everything else S
        let lab = Lab::meropenem_r().sir(Role::Mem, Some("I")).quantity(Role::Mem, Some(("4", "mg/L")));
        post_lab(&app, &lab.person(1).tag("a").bundle()).await;
        // imipenem I (MIC 4: EUCAST I), everything else S
        let lab = Lab::meropenem_r().susceptible(Role::Mem)
            .sir(Role::Ipm, Some("I")).quantity(Role::Ipm, Some(("4", "mg/L")));
        post_lab(&app, &lab.person(2).tag("b").bundle()).await;
        assert!(cases(&app).await.is_empty());
        assert_eq!(app.count("Communication").await, 0);
    }

    // ---- EUCAST 16.1 breakpoints (no interpretation sent) --------------------------------------------

    async fn meropenem_mic_above_8_is_resistance_by_eucast(app) {
        assert_breakpoint(&app, Role::Mem, "mg/L", "8", "16").await;
    }

    async fn imipenem_mic_above_4_is_resistance_by_eucast(app) {
        assert_breakpoint(&app, Role::Ipm, "mg/L", "4", "8").await;
    }

    async fn ertapenem_mic_above_0_5_is_resistance_by_eucast(app) {
        assert_breakpoint(&app, Role::Etp, "mg/L", "0.5", "1").await;
    }

    async fn meropenem_zone_below_16_mm_is_resistance_by_eucast(app) {
        assert_breakpoint(&app, Role::Mem, "mm", "16", "15").await;
    }

    async fn imipenem_zone_below_19_mm_is_resistance_by_eucast(app) {
        assert_breakpoint(&app, Role::Ipm, "mm", "19", "18").await;
    }

    async fn ertapenem_zone_below_23_mm_is_resistance_by_eucast(app) {
        assert_breakpoint(&app, Role::Etp, "mm", "23", "22").await;
    }

    // ---- specimen and species ----------------------------------------------------------------------

    async fn non_blood_specimen_is_not_a_case(app) {
        // everything else as in a case (all R, blaKPC detected); only the specimen is urine
        let lab = Lab::base().specimen_type("122575003", "Urine specimen");
        post_lab(&app, &lab.bundle()).await;
        assert!(cases(&app).await.is_empty());
    }

    async fn other_species_are_not_cases(app) {
        post_lab(&app, &Lab::base().species(KLEBSIELLA_OXYTOCA).person(1).tag("a").bundle()).await;
        post_lab(&app, &Lab::base().species(ENTEROBACTER_CLOACAE).person(2).tag("b").bundle()).await;
        assert!(cases(&app).await.is_empty());
    }

    async fn two_species_in_one_culture_are_two_cases(app) {
        let bundle = fixture("cre/kpn-eco-one-culture-transaction.json");
        let posted = post_lab(&app, &bundle).await;
        let found = cases(&app).await;
        assert_eq!(found.len(), 2, "{found:#?}");
        let patient = posted.at(&two_species(1));
        let asl = posted.at(&two_species(2));
        let report = posted.at(&two_species(12));
        let kpn = found.iter().find(|c| reason_codes(c).contains("041.3")).expect("the K. pneumoniae case");
        let eco = found.iter().find(|c| reason_codes(c).contains("041.4")).expect("the E. coli case");
        assert_ne!(kpn["id"], eco["id"]);
        assert_case(kpn, &patient, &asl, "041.3");
        assert_case(eco, &patient, &asl, "041.4");
        // each case has its own isolate and its own isolate's evidence, nothing of the other
        assert_eq!(criteria(kpn), sorted(vec![
            resistance(&posted.at(&two_species(7)), "MEM"),
            resistance(&posted.at(&two_species(8)), "IPM"),
        ]));
        assert_eq!(about(kpn), set_of(&[&posted.at(&two_species(6)), &posted.at(&two_species(7)), &posted.at(&two_species(8)), &report]));
        assert_eq!(criteria(eco), sorted(vec![
            resistance(&posted.at(&two_species(10)), "MEM"),
            resistance(&posted.at(&two_species(11)), "ETP"),
        ]));
        assert_eq!(about(eco), set_of(&[&posted.at(&two_species(9)), &posted.at(&two_species(10)), &posted.at(&two_species(11)), &report]));
        for case in [kpn, eco] {
            assert_reference_date(case, "2026-04-19T06:30:00+02:00", "raccolta-campione", 2026);
        }
    }

    // ---- one case per person × species × calendar year --------------------------------------------

    async fn same_species_again_in_the_same_year_is_not_a_new_case(app) {
        let first = post_lab(&app, &Lab::meropenem_r().bundle()).await;
        let november = Lab::meropenem_r().tag("nov")
            .dated("2026-11-15T07:50:00+01:00", "2026-11-16T10:00:00+01:00", "2026-11-17T12:30:00+01:00");
        let again = post_lab(&app, &november.bundle()).await;
        assert_eq!(again.of(Role::Patient), first.of(Role::Patient));
        assert_eq!(app.count("Specimen").await, 2);
        let case = the_case(&app).await;
        assert!(about(&case).contains(&first.of(Role::Isolate)), "{case:#}");
        assert_reference_date(&case, COLLECTED, "raccolta-campione", 2026);
    }

    async fn another_species_in_the_same_year_is_a_new_case(app) {
        let first = post_lab(&app, &Lab::meropenem_r().bundle()).await;
        let may = Lab::meropenem_r().species(ESCHERICHIA_COLI).tag("mag")
            .dated("2026-05-20T06:45:00+02:00", "2026-05-21T09:10:00+02:00", "2026-05-22T13:00:00+02:00");
        let second = post_lab(&app, &may.bundle()).await;
        let found = cases(&app).await;
        assert_eq!(found.len(), 2, "{found:#?}");
        let kpn = found.iter().find(|c| reason_codes(c).contains("041.3")).expect("the K. pneumoniae case");
        let eco = found.iter().find(|c| reason_codes(c).contains("041.4")).expect("the E. coli case");
        assert_case(kpn, &first.of(Role::Patient), &first.of(Role::Asl), "041.3");
        assert_case(eco, &first.of(Role::Patient), &first.of(Role::Asl), "041.4");
        assert!(about(eco).contains(&second.of(Role::Isolate)));
        assert_reference_date(eco, "2026-05-20T06:45:00+02:00", "raccolta-campione", 2026);
    }

    async fn a_new_calendar_year_in_rome_is_a_new_case(app) {
        let march = Lab::meropenem_r()
            .dated("2025-03-10T09:00:00+01:00", "2025-03-11T10:00:00+01:00", "2025-03-12T12:00:00+01:00");
        post_lab(&app, &march.bundle()).await;
        // 23:30 UTC on 31 December 2025 is 00:30 on 1 January 2026 in Rome
        let new_year = Lab::meropenem_r().tag("capodanno")
            .dated("2025-12-31T23:30:00Z", "2026-01-01T10:00:00+01:00", "2026-01-02T12:00:00+01:00");
        let second = post_lab(&app, &new_year.bundle()).await;
        let found = cases(&app).await;
        assert_eq!(found.len(), 2, "{found:#?}");
        let year = |c: &Value| extension(c, &canon("StructureDefinition/data-riferimento"))["extension"]
            .as_array().unwrap().iter().find(|e| e["url"] == "anno").unwrap()["valueInteger"].as_i64().unwrap();
        let old = found.iter().find(|c| year(c) == 2025).expect("the 2025 case");
        let new = found.iter().find(|c| year(c) == 2026).expect("the 2026 case");
        assert_ne!(old["id"], new["id"]);
        assert_reference_date(old, "2025-03-10T09:00:00+01:00", "raccolta-campione", 2025);
        assert_reference_date(new, "2025-12-31T23:30:00Z", "raccolta-campione", 2026);
        assert!(about(new).contains(&second.of(Role::Isolate)));
    }

    async fn the_last_hour_of_the_year_in_rome_is_still_the_old_year(app) {
        let march = Lab::meropenem_r()
            .dated("2025-03-10T09:00:00+01:00", "2025-03-11T10:00:00+01:00", "2025-03-12T12:00:00+01:00");
        post_lab(&app, &march.bundle()).await;
        // 22:30 UTC on 31 December 2025 is 23:30 in Rome: still 2025 (the isolate is dated 2026: the
        // specimen's date decides)
        let late = Lab::meropenem_r().tag("san-silvestro")
            .dated("2025-12-31T22:30:00Z", "2026-01-01T10:00:00+01:00", "2026-01-02T12:00:00+01:00");
        post_lab(&app, &late.bundle()).await;
        let case = the_case(&app).await;
        assert_reference_date(&case, "2025-03-10T09:00:00+01:00", "raccolta-campione", 2025);
    }

    async fn year_falls_back_to_the_isolate_effective_date(app) {
        let posted = post_lab(&app, &Lab::meropenem_r().collected(None).bundle()).await;
        let case = the_case(&app).await;
        assert_case(&case, &posted.of(Role::Patient), &posted.of(Role::Asl), "041.3");
        assert_reference_date(&case, ISOLATE_EFFECTIVE, "osservazione", 2026);
    }

    async fn year_falls_back_to_the_report_issued_date(app) {
        let posted = post_lab(&app, &Lab::meropenem_r().collected(None).effective(None).bundle()).await;
        let case = the_case(&app).await;
        assert_case(&case, &posted.of(Role::Patient), &posted.of(Role::Asl), "041.3");
        assert_reference_date(&case, REPORT_ISSUED, "referto", 2026);
    }

    // ---- evidence in pieces, in any order -----------------------------------------------------------

    async fn pieces_isolate_then_susceptibility(app) {
        use Role::*;
        assert_arrival_order(&app, meropenem_pieces(),
            &[Patient, Asl, Hospital, Encounter, Specimen, Report, Isolate, Mem]).await;
    }

    async fn pieces_susceptibility_then_isolate(app) {
        use Role::*;
        assert_arrival_order(&app, meropenem_pieces(),
            &[Patient, Asl, Hospital, Encounter, Specimen, Report, Mem, Isolate]).await;
    }

    async fn pieces_report_last(app) {
        use Role::*;
        // the report is what names the specimen: the isolate and its susceptibility carry none
        let lab = meropenem_pieces().unlink_specimen(Isolate).unlink_specimen(Mem);
        assert_arrival_order(&app, lab,
            &[Patient, Asl, Hospital, Encounter, Specimen, Isolate, Mem, Report]).await;
    }

    async fn pieces_specimen_last(app) {
        use Role::*;
        assert_arrival_order(&app, meropenem_pieces(),
            &[Patient, Asl, Hospital, Encounter, Isolate, Mem, Report, Specimen]).await;
    }

    async fn pieces_patient_last(app) {
        use Role::*;
        assert_arrival_order(&app, meropenem_pieces(),
            &[Asl, Hospital, Encounter, Specimen, Isolate, Mem, Report, Patient]).await;
    }

    async fn a_later_carbapenemase_result_posted_on_its_own_completes_the_case(app) {
        // all three carbapenems S, no carbapenemase test yet: no case
        let lab = Lab::base().susceptible(Role::Mem).susceptible(Role::Ipm).susceptible(Role::Etp).without(Role::Kpc);
        let posted = post_lab(&app, &lab.bundle()).await;
        assert!(cases(&app).await.is_empty());
        // hours later the molecular lab POSTs the KPC result (a new, server-assigned id) derived from the isolate
        let kpc = json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "49617-4"}]},
            "subject": {"reference": posted.of(Role::Patient)},
            "derivedFrom": [{"reference": posted.of(Role::Isolate)}],
            "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "260373001", "display": "Detected"}]}
        });
        let r = app.post("/fhir/Observation", &kpc).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let kpc_ref = format!("Observation/{}", r.body["id"].as_str().unwrap());
        let case = the_case(&app).await;
        assert_eq!(case["status"], "completed");
        assert!(about(&case).contains(&kpc_ref), "{case:#}");
        assert!(about(&case).contains(&posted.of(Role::Isolate)), "{case:#}");
    }

    async fn recipients_follow_facility_data_that_arrives_later(app) {
        // every piece but the ASL: the case is decided, addressed to ISS only
        let pieces = meropenem_pieces().pieces();
        for role in [Role::Patient, Role::Hospital, Role::Encounter, Role::Specimen, Role::Mem, Role::Isolate, Role::Report] {
            let r = app.put(&format!("/fhir/{}", role.fixed_reference()), &pieces[&role], &[]).await;
            assert_eq!(r.status, StatusCode::CREATED, "{role:?}: {}", r.text);
        }
        let before = the_case(&app).await;
        assert_eq!(before["recipient"].as_array().unwrap().len(), 1, "{before:#}");
        assert_eq!(before["recipient"][0]["identifier"]["value"], "ISS");
        // the ASL arrives: the same case, a new version, addressed to the ASL and its region too
        let r = app.put(&format!("/fhir/{}", Role::Asl.fixed_reference()), &pieces[&Role::Asl], &[]).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let after = the_case(&app).await;
        assert_eq!(after["id"], before["id"]);
        let version = |c: &Value| c["meta"]["versionId"].as_str().unwrap().parse::<u32>().unwrap();
        assert_eq!(version(&after), version(&before) + 1);
        assert_case(&after, &Role::Patient.fixed_reference(), &Role::Asl.fixed_reference(), "041.3");
    }

    async fn preliminary_isolate_does_not_decide_until_final(app) {
        let posted = post_lab(&app, &Lab::meropenem_r().status(Role::Isolate, "preliminary").bundle()).await;
        assert!(cases(&app).await.is_empty());
        correct(&app, &posted.of(Role::Isolate), |obs| obs["status"] = json!("final")).await;
        let case = the_case(&app).await;
        assert_kpn_case(&case, &posted, vec![resistance(&posted.of(Role::Mem), "MEM")], &[Role::Mem]);
    }

    // ---- redelivery and concurrency -----------------------------------------------------------------

    async fn the_same_bundle_twice_is_one_case_at_version_1(app) {
        let bundle = Lab::meropenem_r().bundle();
        let first = post_lab(&app, &bundle).await;
        let again = post_lab(&app, &bundle).await;
        assert!(again.body["entry"].as_array().unwrap().iter().all(|e| e["response"]["status"] == "200 OK"), "{}", again.body);
        assert_eq!(again.of(Role::Isolate), first.of(Role::Isolate));
        let case = the_case(&app).await;
        assert_eq!(case["meta"]["versionId"], "1");
        let history = app.get(&format!("/fhir/Communication/{}/_history", case["id"].as_str().unwrap())).await;
        assert_eq!(history.body["total"], 1, "{}", history.text);
    }

    async fn concurrent_bundles_make_one_case(app) {
        let app = Arc::new(app);
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let app = app.clone();
                let bundle = Lab::meropenem_r().tag(&format!("set{i}")).bundle();
                tokio::spawn(async move { app.post("/fhir", &bundle).await })
            })
            .collect();
        for task in futures::future::join_all(tasks).await {
            let r = task.expect("task");
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        }
        assert_eq!(app.count("Patient").await, 1);
        assert_eq!(app.count("Specimen").await, 8);
        let found = cases(&app).await;
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0]["status"], "completed");
        assert_eq!(app.count("Communication").await, 1);
    }

    async fn two_servers_on_one_database_make_one_case(app) {
        // two server instances (two pools, two SQLite writers) racing on the same patient and year
        let other = app.another_server().await;
        let app = Arc::new(app);
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let app = app.clone();
                let other = other.clone();
                let bundle = Lab::meropenem_r().tag(&format!("srv{i}")).bundle();
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
        assert_eq!(app.count("Specimen").await, 8);
        let found = cases(&app).await;
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(app.count("Communication").await, 1);
    }

    async fn a_second_isolate_on_the_specimen_re_decides_the_first(app) {
        // evidence linked to its isolate only by the specimen (no hasMember, derivedFrom or report)
        let mut pieces = meropenem_pieces().pieces();
        pieces.get_mut(&Role::Isolate).unwrap().as_object_mut().unwrap().shift_remove("hasMember");
        pieces.get_mut(&Role::Mem).unwrap().as_object_mut().unwrap().shift_remove("derivedFrom");
        for role in [Role::Patient, Role::Asl, Role::Hospital, Role::Encounter, Role::Specimen, Role::Mem, Role::Isolate] {
            let r = app.put(&format!("/fhir/{}", role.fixed_reference()), &pieces[&role], &[]).await;
            assert_eq!(r.status, StatusCode::CREATED, "{role:?}: {}", r.text);
        }
        let case = the_case(&app).await;
        assert_eq!(case["status"], "completed");
        // a second organism is identified in the same culture: the meropenem result can no longer be
        // told to belong to the first isolate, so its case is withdrawn, and the second has none
        let mut second = pieces[&Role::Isolate].clone();
        second["id"] = json!("cre-isolate-2");
        second["identifier"] = json!([{"system": "urn:oid:2.16.840.1.113883.2.9.4.3.9", "value": "ISO-2"}]);
        second["valueCodeableConcept"] = json!({"coding": [{"system": "http://snomed.info/sct", "code": "112283007"}]});
        let r = app.put("/fhir/Observation/cre-isolate-2", &second, &[]).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let after = the_case(&app).await;
        assert_eq!(after["id"], case["id"]);
        assert_eq!(after["status"], "entered-in-error", "{after:#}");
    }

    async fn case_notifications_are_written_by_the_rules_only(app) {
        post_lab(&app, &Lab::meropenem_r().bundle()).await;
        let case = the_case(&app).await;
        let path = format!("/fhir/Communication/{}", case["id"].as_str().unwrap());
        let mut forged = case.clone();
        forged["status"] = json!("entered-in-error");
        let r = app.put(&path, &forged, &[]).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        let r = app.delete(&path).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        let mut new = case.clone();
        new.as_object_mut().unwrap().shift_remove("id");
        let r = app.post("/fhir/Communication", &new).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        let unchanged = the_case(&app).await;
        assert_eq!(unchanged["meta"]["versionId"], "1");
        assert_eq!(unchanged["status"], "completed");
    }

    async fn omocodia_variants_are_one_person(app) {
        let cf = "RSSMRA85T10A562S";
        let variant = CodiceFiscale::complete("RSSMRA85T10A56N").unwrap().as_str().to_ascii_lowercase();
        let first = post_lab(&app, &Lab::meropenem_r().cf(cf).bundle()).await;
        let later = Lab::meropenem_r().cf(&variant).tag("omocodia")
            .dated("2026-06-08T10:00:00+02:00", "2026-06-09T10:00:00+02:00", "2026-06-10T10:00:00+02:00");
        let second = post_lab(&app, &later.bundle()).await;
        // two Patient resources, one person
        assert_ne!(second.of(Role::Patient), first.of(Role::Patient));
        assert_eq!(app.count("Patient").await, 2);
        let case = the_case(&app).await;
        assert_eq!(case["subject"]["reference"], first.of(Role::Patient));
    }

    // ---- corrections -----------------------------------------------------------------------------

    async fn correction_withdraws_the_case(app) {
        let posted = post_lab(&app, &Lab::meropenem_r().bundle()).await;
        let case = the_case(&app).await;
        correct(&app, &posted.of(Role::Mem), amend_to_susceptible).await;
        let withdrawn = the_case(&app).await;
        assert_eq!(withdrawn["id"], case["id"]);
        assert_eq!(withdrawn["identifier"], case["identifier"]);
        assert_eq!(withdrawn["status"], "entered-in-error");
        assert_eq!(withdrawn["meta"]["versionId"], "2");
        assert!(cases_where(&app, "&status=completed").await.is_empty());
        assert_eq!(cases_where(&app, "&status=entered-in-error").await.len(), 1);
        // nothing silently deleted: version 1 is still there as it was
        let v1 = app.get(&format!("/fhir/Communication/{}/_history/1", case["id"].as_str().unwrap())).await;
        assert_eq!(v1.status, StatusCode::OK);
        assert_eq!(v1.body["status"], "completed");
    }

    async fn deleting_the_only_evidence_withdraws_the_case(app) {
        // carbapenems all S: the KPC result (linked by derivedFrom only) is the only evidence
        let lab = Lab::base().susceptible(Role::Mem).susceptible(Role::Ipm).susceptible(Role::Etp);
        let posted = post_lab(&app, &lab.bundle()).await;
        let case = the_case(&app).await;
        let r = app.delete(&format!("/fhir/{}", posted.of(Role::Kpc))).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        let withdrawn = the_case(&app).await;
        assert_eq!(withdrawn["id"], case["id"]);
        assert_eq!(withdrawn["status"], "entered-in-error");
    }

    async fn an_earlier_isolate_arriving_later_carries_the_case(app) {
        // the March culture is reported first, a February culture of the same species later:
        // the case is the first of the year, so it moves to February and keeps its identifier
        post_lab(&app, &Lab::meropenem_r().bundle()).await;
        let march = the_case(&app).await;
        let february = Lab::meropenem_r().tag("feb")
            .dated("2026-02-10T09:00:00+01:00", "2026-02-11T10:00:00+01:00", "2026-02-12T12:00:00+01:00");
        let posted = post_lab(&app, &february.bundle()).await;
        let moved = the_case(&app).await;
        assert_eq!(moved["id"], march["id"]);
        assert_eq!(moved["identifier"], march["identifier"]);
        assert_eq!(moved["status"], "completed");
        assert_ne!(moved["meta"]["versionId"], march["meta"]["versionId"]);
        assert!(about(&moved).contains(&posted.of(Role::Isolate)), "{moved:#}");
        assert_reference_date(&moved, "2026-02-10T09:00:00+01:00", "raccolta-campione", 2026);
    }

    async fn a_replacement_report_keeps_the_case(app) {
        let posted = post_lab(&app, &Lab::meropenem_r().bundle()).await;
        let case = the_case(&app).await;
        // the laboratory issues a corrected report for the same isolate, then withdraws the first
        let replacement = json!({
            "resourceType": "DiagnosticReport",
            "status": "corrected",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "MB"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "600-7"}]},
            "subject": {"reference": posted.of(Role::Patient)},
            "issued": "2026-03-06T09:00:00+01:00",
            "result": [{"reference": posted.of(Role::Isolate)}, {"reference": posted.of(Role::Mem)}]
        });
        let r = app.post("/fhir/DiagnosticReport", &replacement).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        correct(&app, &posted.of(Role::Report), |report| report["status"] = json!("entered-in-error")).await;
        let after = the_case(&app).await;
        assert_eq!(after["id"], case["id"]);
        assert_eq!(after["status"], "completed", "{after:#}");
        assert!(!about(&after).contains(&posted.of(Role::Report)), "{after:#}");
    }

    async fn mic_units_are_read_whatever_their_case(app) {
        // UCUM 'mg/l' is the same unit as 'mg/L'
        post_lab(&app, &Lab::only(Role::Mem).measured(Role::Mem, "16", "mg/l").bundle()).await;
        assert_eq!(cases(&app).await.len(), 1);
    }

    async fn correction_keeps_the_case_while_other_evidence_holds(app) {
        // meropenem R and imipenem R (the fixture's), ertapenem S, no carbapenemase test
        let lab = Lab::base().susceptible(Role::Etp).without(Role::Kpc);
        let posted = post_lab(&app, &lab.bundle()).await;
        let case = the_case(&app).await;
        assert_kpn_case(&case, &posted, vec![
            resistance(&posted.of(Role::Mem), "MEM"),
            resistance(&posted.of(Role::Ipm), "IPM"),
        ], &[Role::Mem, Role::Ipm]);
        correct(&app, &posted.of(Role::Mem), amend_to_susceptible).await;
        let after = the_case(&app).await;
        assert_eq!(after["id"], case["id"]);
        assert_eq!(after["identifier"], case["identifier"]);
        assert_kpn_case(&after, &posted, vec![resistance(&posted.of(Role::Ipm), "IPM")], &[Role::Ipm]);
        assert!(!about(&after).contains(&posted.of(Role::Mem)));
    }

    async fn after_a_withdrawal_a_later_isolate_is_a_new_case(app) {
        let posted = post_lab(&app, &Lab::meropenem_r().bundle()).await;
        let withdrawn_id = the_case(&app).await["id"].clone();
        correct(&app, &posted.of(Role::Mem), amend_to_susceptible).await;
        let november = Lab::meropenem_r().tag("nov")
            .dated("2026-11-15T07:50:00+01:00", "2026-11-16T10:00:00+01:00", "2026-11-17T12:30:00+01:00");
        let later = post_lab(&app, &november.bundle()).await;
        assert_eq!(cases(&app).await.len(), 2);
        let active = cases_where(&app, "&status=completed").await;
        assert_eq!(active.len(), 1, "{active:#?}");
        let new = &active[0];
        assert_ne!(new["id"], withdrawn_id);
        assert_ne!(new["identifier"][0]["value"], withdrawn_id);
        assert_case(new, &posted.of(Role::Patient), &posted.of(Role::Asl), "041.3");
        assert_eq!(criteria(new), vec![resistance(&later.of(Role::Mem), "MEM")]);
        assert!(about(new).contains(&later.of(Role::Isolate)));
        assert_reference_date(new, "2026-11-15T07:50:00+01:00", "raccolta-campione", 2026);
        let old = app.get(&format!("/fhir/Communication/{}", withdrawn_id.as_str().unwrap())).await;
        assert_eq!(old.body["status"], "entered-in-error");
    }

    async fn report_entered_in_error_withdraws_the_case(app) {
        let posted = post_lab(&app, &Lab::meropenem_r().bundle()).await;
        let case = the_case(&app).await;
        correct(&app, &posted.of(Role::Report), |r| r["status"] = json!("entered-in-error")).await;
        let withdrawn = the_case(&app).await;
        assert_eq!(withdrawn["id"], case["id"]);
        assert_eq!(withdrawn["identifier"], case["identifier"]);
        assert_eq!(withdrawn["status"], "entered-in-error");
        assert_eq!(withdrawn["meta"]["versionId"], "2");
    }

    async fn isolate_entered_in_error_withdraws_the_case(app) {
        let posted = post_lab(&app, &Lab::meropenem_r().bundle()).await;
        let case = the_case(&app).await;
        correct(&app, &posted.of(Role::Isolate), |o| o["status"] = json!("entered-in-error")).await;
        let withdrawn = the_case(&app).await;
        assert_eq!(withdrawn["id"], case["id"]);
        assert_eq!(withdrawn["identifier"], case["identifier"]);
        assert_eq!(withdrawn["status"], "entered-in-error");
        assert_eq!(withdrawn["meta"]["versionId"], "2");
    }

    // ---- codice fiscale ----------------------------------------------------------------------------

    async fn invalid_codice_fiscale_in_a_transaction_is_422_and_stores_nothing(app) {
        // the check character of RSSMRA85T10A562 is S
        let r = app.post("/fhir", &Lab::meropenem_r().cf("RSSMRA85T10A562X").bundle()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        assert_eq!(r.body["resourceType"], "OperationOutcome");
        assert!(r.expressions().contains(&"Bundle.entry[0].resource.identifier[0].value".to_string()), "{}", r.text);
        for rt in ["Patient", "Organization", "Specimen", "Observation", "DiagnosticReport", "Communication"] {
            assert_eq!(app.count(rt).await, 0, "{rt}");
        }
    }

    async fn invalid_codice_fiscale_on_its_own_is_422(app) {
        let mut patient = fixture("patient-rossi.json");
        patient["identifier"] = json!([
            {"system": "https://adt.niguarda.example/pazienti", "value": "0012345"},
            {"system": "http://hl7.it/sid/codiceFiscale", "value": "RSSMRA85T10A562X"}
        ]);
        let r = app.post("/fhir/Patient", &patient).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        assert!(r.expressions().contains(&"Patient.identifier[1].value".to_string()), "{}", r.text);
        assert_eq!(app.count("Patient").await, 0);
        // the same with the right check character is accepted
        patient["identifier"][1]["value"] = json!("RSSMRA85T10A562S");
        assert_eq!(app.post("/fhir/Patient", &patient).await.status, StatusCode::CREATED);
    }

    // ---- local codes -------------------------------------------------------------------------------

    async fn unmapped_local_code_is_stored_with_a_warning(app) {
        let url = "urn:uuid:5e7a0c3e-2d4b-4f6a-8c1d-000000000099";
        let mut bundle = Lab::meropenem_r().bundle();
        bundle["entry"].as_array_mut().unwrap().push(json!({
            "fullUrl": url,
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
                "code": {"coding": [{"system": "https://lis.altro-ospedale.example/codici", "code": "TTP-EMO", "display": "Tempo di positivizzazione emocoltura"}]},
                "subject": {"reference": Role::Patient.full_url()},
                "specimen": {"reference": Role::Specimen.full_url()},
                "effectiveDateTime": "2026-03-03T02:10:00+01:00",
                "valueQuantity": {"value": 17.9, "unit": "h", "system": UCUM, "code": "h"}
            },
            "request": {"method": "POST", "url": "Observation"}
        }));
        let posted = post_lab(&app, &bundle).await;
        let i = entry_index(&bundle, url);
        let entry = &posted.body["entry"][i];
        assert_eq!(entry["response"]["status"], "201 Created");
        assert_eq!(entry["response"]["outcome"]["resourceType"], "OperationOutcome", "{entry:#}");
        assert!(!warnings(entry).is_empty(), "{entry:#}");
        // stored as sent
        let stored = app.get(&format!("/fhir/{}", posted.at(url))).await;
        assert_eq!(stored.status, StatusCode::OK);
        assert_eq!(stored.body["code"]["coding"][0]["code"], "TTP-EMO");
        // the other entries carry standard codes: no warnings; the case stands on them
        for (j, other) in posted.body["entry"].as_array().unwrap().iter().enumerate() {
            if j != i {
                assert!(warnings(other).is_empty(), "entry {j}: {other:#}");
            }
        }
        assert_eq!(cases(&app).await.len(), 1);
    }

    async fn unmapped_local_code_on_a_single_resource_is_a_warning_in_the_outcome(app) {
        let obs = json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "https://lis.altro-ospedale.example/codici", "code": "TTP-EMO"}]},
            "valueQuantity": {"value": 17.9, "unit": "h", "system": UCUM, "code": "h"}
        });
        let r = app.post_with("/fhir/Observation", &obs, &[("Prefer", "return=OperationOutcome")]).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let warned: Vec<&Value> = r.body["issue"].as_array().unwrap().iter()
            .filter(|i| i["severity"] == "warning").collect();
        assert_eq!(warned.len(), 1, "{}", r.text);
        assert_eq!(warned[0]["expression"][0], "Observation.code", "{}", r.text);
        assert!(warned[0]["diagnostics"].as_str().unwrap().contains("TTP-EMO"));
        assert_eq!(app.count("Observation").await, 1);
    }

    async fn mapped_local_codes_work_like_standard_codes(app) {
        // culture EMOC, species KPN, meropenem MEM-I: mapped by ConceptMap laboratorio-niguarda
        let posted = post_lab(&app, &fixture("cre/niguarda-local-codes-transaction.json")).await;
        assert_no_warnings(&posted);
        let case = the_case(&app).await;
        assert_case(&case, &posted.at(&niguarda(1)), &posted.at(&niguarda(2)), "041.3");
        assert_eq!(criteria(&case), vec![resistance(&posted.at(&niguarda(7)), "MEM")]);
        assert_eq!(about(&case), set_of(&[&posted.at(&niguarda(6)), &posted.at(&niguarda(7)), &posted.at(&niguarda(8))]));
        assert_reference_date(&case, "2026-05-12T07:40:00+02:00", "raccolta-campione", 2026);
    }
}

// ---- the configured EUCAST table ------------------------------------------------------------------

async fn the_configured_breakpoint_table_is_recorded(app: TestApp) {
    let posted = post_lab(
        &app,
        &Lab::only(Role::Mem)
            .measured(Role::Mem, "16", "mg/L")
            .bundle(),
    )
    .await;
    let case = the_case(&app).await;
    let expected = Criterion {
        breakpoint: Some("EUCAST 15.0".into()),
        ..resistance_by_breakpoint(&posted.of(Role::Mem), "MEM")
    };
    assert_eq!(criteria(&case), vec![expected]);
}

mod configured_eucast_version_applies {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let app = TestApp::sqlite_with(|c| c.eucast_version = Some("15.0".into())).await;
        the_configured_breakpoint_table_is_recorded(app).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let app = TestApp::postgres_with(|c| c.eucast_version = Some("15.0".into())).await;
        the_configured_breakpoint_table_is_recorded(app).await;
    }
}

#[tokio::test]
async fn an_unknown_eucast_version_stops_the_server_at_start() {
    let path = std::env::temp_dir().join(format!(
        "sentinella-eucast-{}.db",
        uuid::Uuid::new_v4().simple()
    ));
    let mut config =
        sentinella::config::Config::with_database(format!("sqlite://{}", path.display()));
    config.eucast_version = Some("9.9".into());
    let err = sentinella::server::build_app(config)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("9.9"), "{err}");
    assert!(err.to_string().contains("16.1"), "{err}");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
