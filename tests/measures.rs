//! Periodic summaries as FHIR Measures (issue 12; README "Periodic summaries"): Modello 16
//! (per ASL, monthly), Modello 16-bis (per region, by province, monthly), the class V annual summary
//! and the CRE monthly count; `Measure/$evaluate-measure`, the stored monthly `MeasureReport`s
//! (`MeasureReport/$generate-reports`) and who may see them. Black box, on SQLite and PostgreSQL.
//!
//! Cases go in as the EHR and the laboratory send them (a doctor's segnalazione transaction, a
//! laboratory's blood-culture transaction); every expected count is computed here, from the list of
//! cases the test seeded (their birth date, sex, residence, reference day and standing), never from
//! what the server says.
mod common;

use std::collections::{BTreeMap, BTreeSet};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::{Resp, TestApp, fixture};
use http_body_util::BodyExt;
use sentinella::config::Config;
use sentinella::italy::codice_fiscale::CodiceFiscale;
use serde_json::{Value, json};
use time::format_description::well_known::Rfc3339;
use time::macros::date;
use time::{Date, Duration, OffsetDateTime};

const CANON: &str = "https://sentinella-fhir.github.io/ig";
const ICD9: &str = "http://hl7.org/fhir/sid/icd-9-cm";
const GENDER: &str = "http://hl7.org/fhir/administrative-gender";
const DATA_ABSENT: &str = "http://terminology.hl7.org/CodeSystem/data-absent-reason";
const ISTAT_COMUNI: &str = "https://www.hl7.it/fhir/terminology/CodeSystem/istat-comuni";
const SC_CODING: &str = "http://hl7.org/fhir/StructureDefinition/iso21090-SC-coding";
const CODICE_FISCALE: &str = "http://hl7.it/sid/codiceFiscale";
const VER_STATUS: &str = "http://terminology.hl7.org/CodeSystem/condition-ver-status";
const CLINICAL_STATUS: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
const CONDITION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/condition-category";
const SNOMED: &str = "http://snomed.info/sct";
const EHR_CONDITIONS: &str = "https://cartella.ospedale-sacco.example/problemi";
const EHR_CRITERIA: &str = "https://cartella.ospedale-sacco.example/criteri";
const EHR_SEGNALAZIONI: &str = "https://cartella.ospedale-sacco.example/segnalazioni";

fn canon(path: &str) -> String {
    format!("{CANON}/{path}")
}

// =================================================================================================
// Places: ISTAT comune → ASL (terminology/ConceptMap-comune-asl.json), province (first three digits)
// and region (ConceptMap-provincia-regione.json), as read from those files.

#[derive(Debug, Clone, Copy, PartialEq)]
struct Place {
    comune: &'static str,
    name: &'static str,
    cap: &'static str,
    asl: &'static str,
    asl_name: &'static str,
    province: &'static str,
    region: &'static str,
}

const MILANO: Place = Place {
    comune: "015146",
    name: "Milano",
    cap: "20121",
    asl: "030321",
    asl_name: "ATS della Città Metropolitana di Milano",
    province: "015",
    region: "030",
};
/// Province of Lodi (098), ATS di Milano.
const LODI: Place = Place {
    comune: "098031",
    name: "Lodi",
    cap: "26900",
    asl: "030321",
    asl_name: "ATS della Città Metropolitana di Milano",
    province: "098",
    region: "030",
};
const BERGAMO: Place = Place {
    comune: "016024",
    name: "Bergamo",
    cap: "24121",
    asl: "030325",
    asl_name: "ATS di Bergamo",
    province: "016",
    region: "030",
};
/// Province of Brescia (017), but ATS della Montagna (a comune-level exception of the map).
const DARFO: Place = Place {
    comune: "017065",
    name: "Darfo Boario Terme",
    cap: "25047",
    asl: "030323",
    asl_name: "ATS della Montagna",
    province: "017",
    region: "030",
};
const BRESCIA: Place = Place {
    comune: "017029",
    name: "Brescia",
    cap: "25121",
    asl: "030326",
    asl_name: "ATS di Brescia",
    province: "017",
    region: "030",
};
const MONZA: Place = Place {
    comune: "108033",
    name: "Monza",
    cap: "20900",
    asl: "030324",
    asl_name: "ATS della Brianza",
    province: "108",
    region: "030",
};
const AOSTA: Place = Place {
    comune: "007003",
    name: "Aosta",
    cap: "11100",
    asl: "020101",
    asl_name: "Azienda USL Valle d'Aosta",
    province: "007",
    region: "020",
};
const TRENTO: Place = Place {
    comune: "022205",
    name: "Trento",
    cap: "38122",
    asl: "042101",
    asl_name: "Azienda Provinciale per i Servizi Sanitari (P.A. Trento)",
    province: "022",
    region: "042",
};
const CAMPOBASSO: Place = Place {
    comune: "070006",
    name: "Campobasso",
    cap: "86100",
    asl: "140201",
    asl_name: "Azienda Sanitaria Regionale del Molise (ASREM)",
    province: "070",
    region: "140",
};

/// Where a case counts: ASL, province ("ignota" when unknown), region.
#[derive(Debug, Clone, PartialEq)]
struct Area {
    asl: String,
    province: String,
    region: String,
}

// =================================================================================================
// Terminology read from the data files (the lists of ASLs and regions reports are made for)

fn codes_of(file: &str) -> Vec<(String, String)> {
    let path = format!("{}/terminology/{file}", env!("CARGO_MANIFEST_DIR"));
    let cs: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("terminology file"))
            .expect("JSON");
    cs["concept"]
        .as_array()
        .expect("concepts")
        .iter()
        .map(|c| {
            (
                c["code"].as_str().unwrap().to_string(),
                c["display"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn all_asl() -> Vec<String> {
    codes_of("CodeSystem-asl.json")
        .into_iter()
        .map(|c| c.0)
        .collect()
}

fn all_regions() -> Vec<String> {
    codes_of("CodeSystem-regione.json")
        .into_iter()
        .map(|c| c.0)
        .collect()
}

/// The display of an area code in its CodeSystem (asl, regione, provincia).
fn area_display(kind: &str, code: &str) -> String {
    let file = match kind {
        "asl" => "CodeSystem-asl.json",
        "regione" => "CodeSystem-regione.json",
        "provincia" => "CodeSystem-provincia.json",
        other => panic!("no area kind {other}"),
    };
    codes_of(file)
        .into_iter()
        .find(|c| c.0 == code)
        .unwrap_or_else(|| panic!("{code} is not in {file}"))
        .1
}

/// Reports one month's generation makes: modello-16 per ASL, modello-16-bis and cre-mensile per
/// region. (id → region it belongs to)
fn monthly_report_ids(month: &str) -> BTreeMap<String, String> {
    let mut ids = BTreeMap::new();
    for asl in all_asl() {
        ids.insert(
            format!("modello-16-asl-{asl}-{month}"),
            asl[..3].to_string(),
        );
    }
    for region in all_regions() {
        ids.insert(
            format!("modello-16-bis-regione-{region}-{month}"),
            region.clone(),
        );
        ids.insert(
            format!("cre-mensile-regione-{region}-{month}"),
            region.clone(),
        );
    }
    ids
}

fn yearly_report_ids(year: &str) -> BTreeMap<String, String> {
    let mut ids = BTreeMap::new();
    for asl in all_asl() {
        ids.insert(
            format!("classe-5-annuale-asl-{asl}-{year}"),
            asl[..3].to_string(),
        );
    }
    for region in all_regions() {
        ids.insert(
            format!("classe-5-annuale-regione-{region}-{year}"),
            region.clone(),
        );
    }
    ids
}

// =================================================================================================
// The measures, as the contract describes them

#[derive(Debug, Clone, Copy)]
struct MeasureDef {
    id: &'static str,
    stratifier: &'static str,
    components: &'static [&'static str],
}

const MODELLO_16: MeasureDef = MeasureDef {
    id: "modello-16",
    stratifier: "malattia-eta-sesso",
    components: &["malattia", "fascia-eta", "sesso"],
};
const MODELLO_16_BIS: MeasureDef = MeasureDef {
    id: "modello-16-bis",
    stratifier: "malattia-provincia-eta-sesso",
    components: &["malattia", "provincia", "fascia-eta", "sesso"],
};
const CLASSE_5: MeasureDef = MeasureDef {
    id: "classe-5-annuale",
    stratifier: "codice-eta-sesso",
    components: &["codice", "fascia-eta", "sesso"],
};
const CRE_MENSILE: MeasureDef = MeasureDef {
    id: "cre-mensile",
    stratifier: "specie-eta-sesso",
    components: &["specie", "fascia-eta", "sesso"],
};

fn measure_def(id: &str) -> MeasureDef {
    match id {
        "modello-16" => MODELLO_16,
        "modello-16-bis" => MODELLO_16_BIS,
        "classe-5-annuale" => CLASSE_5,
        "cre-mensile" => CRE_MENSILE,
        other => panic!("no measure {other}"),
    }
}

fn component_system(component: &str) -> String {
    match component {
        "malattia" | "codice" | "specie" => ICD9.to_string(),
        "fascia-eta" => canon("CodeSystem/fascia-eta"),
        "sesso" => GENDER.to_string(),
        "provincia" => canon("CodeSystem/provincia"),
        other => panic!("no component {other}"),
    }
}

// =================================================================================================
// Independent computation: D.M. 1990 classes (DOMAIN.md §2), age bands, counts

/// (class, listed disease of the D.M. table) of the ICD-9-CM codes the tests report.
fn dm_class(code: &str) -> (u8, &'static str) {
    match code {
        "055.9" => (2, "055"),
        "052.9" => (2, "052"),
        "072.9" => (2, "072"),
        "033.9" => (2, "033"),
        "034.1" => (2, "034.1"),
        "056.9" => (2, "056"),
        "070.1" => (2, "070.1"),
        // under 070.3 (hepatitis B): the most specific listed entry
        "070.30" => (2, "070.3"),
        "011.94" | "011.90" | "012.0" | "018.9" => (3, "010-018"),
        "088.81" | "008.61" | "053.9" => (5, ""),
        other => panic!("the tests do not report {other}"),
    }
}

/// The criterion Observations that make a report of `code` notifiable.
fn criteria_for(code: &str) -> Vec<(&'static str, &'static str)> {
    match dm_class(code) {
        (2, "070.3") | (2, "070.1") => vec![("clinica", "positivo"), ("sierologia", "positivo")],
        (2, _) => vec![("clinica", "positivo")],
        (3, _) => vec![("coltura", "positivo")],
        _ => vec![],
    }
}

/// Completed years between the birth date and the day.
fn completed_years(birth: Date, day: Date) -> i32 {
    let mut years = day.year() - birth.year();
    if (day.month() as u8, day.day()) < (birth.month() as u8, birth.day()) {
        years -= 1;
    }
    years
}

/// Modello 15: under 1 → 0, over 99 → 99; then the default bands.
fn band(birth: Option<Date>, day: Date) -> &'static str {
    let Some(birth) = birth else { return "ignota" };
    match completed_years(birth, day).clamp(0, 99) {
        0 => "0",
        1..=4 => "1-4",
        5..=9 => "5-9",
        10..=14 => "10-14",
        15..=24 => "15-24",
        25..=64 => "25-64",
        _ => "65+",
    }
}

/// Stratum key (component value codes, in the measure's component order) → count.
type Counts = BTreeMap<Vec<String>, i64>;

fn total(counts: &Counts) -> i64 {
    counts.values().sum()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Species {
    Kpn,
    Eco,
}

impl Species {
    fn icd9(self) -> &'static str {
        match self {
            Species::Kpn => "041.3",
            Species::Eco => "041.4",
        }
    }
    fn snomed(self) -> (&'static str, &'static str) {
        match self {
            Species::Kpn => ("56415008", "Klebsiella pneumoniae"),
            Species::Eco => ("112283007", "Escherichia coli"),
        }
    }
}

/// The treating facility of a CRE culture: its ASL (first three digits: the region).
#[derive(Debug, Clone, Copy)]
struct Facility {
    asl: &'static str,
    asl_name: &'static str,
    code: &'static str,
    name: &'static str,
}

const NIGUARDA: Facility = Facility {
    asl: "030308",
    asl_name: "ASL di Milano",
    code: "030906",
    name: "ASST Grande Ospedale Metropolitano Niguarda",
};
const PARINI: Facility = Facility {
    asl: "020101",
    asl_name: "Azienda USL Valle d'Aosta",
    code: "020001",
    name: "Ospedale Regionale Umberto Parini",
};

#[derive(Debug, Clone)]
enum Kind {
    Dm {
        code: &'static str,
        onset: Option<String>,
        recorded: Option<String>,
        sent: String,
    },
    Cre {
        species: Species,
        facility: Facility,
        collected: String,
    },
}

/// One case a test seeds: who, where, what, and the reference day the contract gives it (written
/// by the test, not read from the server).
#[derive(Debug, Clone)]
struct Case {
    tag: String,
    person: u32,
    gender: Option<&'static str>,
    birth: Option<Date>,
    home: Option<Place>,
    notifier: Place,
    doctor: u32,
    kind: Kind,
    /// The Europe/Rome reference day.
    day: Date,
    withdrawn: bool,
    // filled in when posted
    patient: String,
    condition: String,
    segnalazione: String,
    /// `Communication/<id>` of the case notification (None for class V).
    notification: Option<String>,
}

fn rome_noon(day: Date) -> String {
    // 10:00 in Rome's winter offset: the same Rome calendar day all year
    format!("{day}T10:00:00+01:00")
}

/// A D.M. 1990 report of `code` with onset on `day` (10:00), recorded the next morning, sent after.
fn dm(tag: &str, person: u32, code: &'static str, day: Date) -> Case {
    let next = day + Duration::days(1);
    Case {
        tag: tag.into(),
        person,
        gender: Some("male"),
        birth: Some(date!(1980 - 06 - 15)),
        home: Some(MILANO),
        notifier: MILANO,
        doctor: 1,
        kind: Kind::Dm {
            code,
            onset: Some(rome_noon(day)),
            recorded: Some(format!("{next}T09:00:00+01:00")),
            sent: format!("{next}T11:00:00+01:00"),
        },
        day,
        withdrawn: false,
        patient: String::new(),
        condition: String::new(),
        segnalazione: String::new(),
        notification: None,
    }
}

/// A CRE blood culture (the laboratory's transaction) collected on `day` at 08:15 in Rome.
fn cre(tag: &str, person: u32, species: Species, facility: Facility, day: Date) -> Case {
    Case {
        tag: tag.into(),
        person,
        gender: Some("male"),
        birth: Some(date!(1955 - 04 - 20)),
        home: Some(MILANO),
        notifier: MILANO,
        doctor: 0,
        kind: Kind::Cre {
            species,
            facility,
            collected: format!("{day}T08:15:00+01:00"),
        },
        day,
        withdrawn: false,
        patient: String::new(),
        condition: String::new(),
        segnalazione: String::new(),
        notification: None,
    }
}

impl Case {
    fn gender(mut self, g: Option<&'static str>) -> Self {
        self.gender = g;
        self
    }
    fn female(self) -> Self {
        self.gender(Some("female"))
    }
    fn born(mut self, birth: Option<Date>) -> Self {
        self.birth = birth;
        self
    }
    fn lives_in(mut self, place: Place) -> Self {
        self.home = Some(place);
        self.notifier = place;
        self
    }
    fn homeless(mut self) -> Self {
        self.home = None;
        self
    }
    fn notified_by(mut self, place: Place) -> Self {
        self.notifier = place;
        self
    }
    fn doctor(mut self, n: u32) -> Self {
        self.doctor = n;
        self
    }
    /// Onset at an exact instant; `rome_day` is its Europe/Rome calendar day.
    fn onset_at(mut self, instant: &str, rome_day: Date) -> Self {
        if let Kind::Dm { onset, .. } = &mut self.kind {
            *onset = Some(instant.into());
        }
        self.day = rome_day;
        self
    }
    /// An onset given as a date alone (FHIR dateTime "YYYY-MM-DD").
    fn onset_date_only(mut self) -> Self {
        let day = self.day;
        if let Kind::Dm { onset, .. } = &mut self.kind {
            *onset = Some(day.to_string());
        }
        self
    }
    /// No onset: the recordedDate (10:00 in Rome on `day`) decides.
    fn no_onset(mut self, day: Date) -> Self {
        if let Kind::Dm {
            onset,
            recorded,
            sent,
            ..
        } = &mut self.kind
        {
            *onset = None;
            *recorded = Some(rome_noon(day));
            *sent = format!("{day}T15:00:00+01:00");
        }
        self.day = day;
        self
    }
    /// The specimen collected at an exact instant; `rome_day` is its Europe/Rome calendar day.
    fn collected_at(mut self, instant: &str, rome_day: Date) -> Self {
        if let Kind::Cre { collected, .. } = &mut self.kind {
            *collected = instant.into();
        }
        self.day = rome_day;
        self
    }

    fn is_dm(&self) -> bool {
        matches!(self.kind, Kind::Dm { .. })
    }

    fn sex(&self) -> &'static str {
        self.gender.unwrap_or("unknown")
    }

    fn area(&self) -> Area {
        match &self.kind {
            Kind::Dm { .. } => match self.home {
                Some(p) => Area {
                    asl: p.asl.into(),
                    province: p.province.into(),
                    region: p.region.into(),
                },
                None => Area {
                    asl: self.notifier.asl.into(),
                    province: "ignota".into(),
                    region: self.notifier.region.into(),
                },
            },
            Kind::Cre { facility, .. } => Area {
                asl: facility.asl.into(),
                province: self
                    .home
                    .map(|p| p.province.to_string())
                    .unwrap_or_else(|| "ignota".into()),
                region: facility.asl[..3].into(),
            },
        }
    }

    /// The stratum this case falls in for `m`, if `m` counts it at all (period and area aside).
    fn stratum(&self, m: &MeasureDef) -> Option<Vec<String>> {
        let band = band(self.birth, self.day).to_string();
        let sex = self.sex().to_string();
        match (&self.kind, m.id) {
            (Kind::Dm { code, .. }, "modello-16") => {
                let (class, listed) = dm_class(code);
                matches!(class, 2 | 3).then(|| vec![listed.into(), band, sex])
            }
            (Kind::Dm { code, .. }, "modello-16-bis") => {
                let (class, listed) = dm_class(code);
                matches!(class, 2 | 3).then(|| vec![listed.into(), self.area().province, band, sex])
            }
            (Kind::Dm { code, .. }, "classe-5-annuale") => {
                (dm_class(code).0 == 5).then(|| vec![code.to_string(), band, sex])
            }
            (Kind::Cre { species, .. }, "cre-mensile") => {
                Some(vec![species.icd9().into(), band, sex])
            }
            _ => None,
        }
    }

    fn in_subject(&self, subject: Option<(&str, &str)>) -> bool {
        let area = self.area();
        match subject {
            None => true,
            Some(("asl", code)) => area.asl == code,
            Some(("regione", code)) => area.region == code,
            Some(("provincia", code)) => area.province == code,
            Some((kind, _)) => panic!("no subject kind {kind}"),
        }
    }

    /// What a subject-list names for this case: its notifica-caso, or (class V) its segnalazione.
    fn listed_reference(&self) -> String {
        match &self.notification {
            Some(n) => n.clone(),
            None => self.segnalazione.clone(),
        }
    }
}

/// The expected strata of `m` over `[start, end]` for `subject`, from the seeded list.
fn expected(
    cases: &[Case],
    m: &MeasureDef,
    start: Date,
    end: Date,
    subject: Option<(&str, &str)>,
) -> Counts {
    let mut counts = Counts::new();
    for c in cases.iter().filter(|c| !c.withdrawn) {
        if c.day < start || c.day > end || !c.in_subject(subject) {
            continue;
        }
        if let Some(key) = c.stratum(m) {
            *counts.entry(key).or_default() += 1;
        }
    }
    counts
}

/// The cases behind each expected stratum (their listed references), and behind the whole group.
fn expected_lists(
    cases: &[Case],
    m: &MeasureDef,
    start: Date,
    end: Date,
    subject: Option<(&str, &str)>,
) -> BTreeMap<Vec<String>, BTreeSet<String>> {
    let mut lists: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    for c in cases.iter().filter(|c| !c.withdrawn) {
        if c.day < start || c.day > end || !c.in_subject(subject) {
            continue;
        }
        if let Some(key) = c.stratum(m) {
            lists.entry(key).or_default().insert(c.listed_reference());
        }
    }
    lists
}

fn last_day_of_month(year: i32, month: u8) -> Date {
    let first_next = if month == 12 {
        Date::from_calendar_date(year + 1, time::Month::January, 1)
    } else {
        Date::from_calendar_date(year, time::Month::try_from(month + 1).unwrap(), 1)
    }
    .unwrap();
    first_next - Duration::days(1)
}

fn first_day(year: i32, month: u8) -> Date {
    Date::from_calendar_date(year, time::Month::try_from(month).unwrap(), 1).unwrap()
}

// =================================================================================================
// Codici fiscali that agree with the person's sex and birth date

/// A valid codice fiscale: surname and name letters of the sex's test name, year, month letter,
/// day (+40 for women), a place code unique to `person`, check character.
fn codice_fiscale(person: u32, gender: Option<&str>, birth: Option<Date>) -> String {
    assert!(person < 26_000, "person {person} out of range");
    let female = gender == Some("female");
    let letters = match gender {
        Some("female") => "BNCLRA",
        Some("male") => "SPSGNN",
        _ => "RSSNDR",
    };
    let b = birth.unwrap_or(date!(1970 - 01 - 01));
    let month = b"ABCDEHLMPRST"[b.month() as usize - 1] as char;
    let day = b.day() as u32 + if female { 40 } else { 0 };
    let place = format!(
        "{}{:03}",
        (b'A' + (person / 1000) as u8) as char,
        person % 1000
    );
    CodiceFiscale::complete(&format!(
        "{letters}{:02}{month}{day:02}{place}",
        b.year().rem_euclid(100)
    ))
    .expect("a well formed codice fiscale")
    .as_str()
    .to_string()
}

fn person_name(gender: Option<&str>) -> (&'static str, &'static str) {
    match gender {
        Some("female") => ("Bianchi", "Laura"),
        Some("male") => ("Esposito", "Giovanni"),
        _ => ("Rossi", "Andrea"),
    }
}

fn doctor_cf(n: u32) -> String {
    CodiceFiscale::complete(&format!("BNCMRC70A01F{n:03}"))
        .expect("well formed")
        .as_str()
        .to_string()
}

impl Case {
    fn cf(&self) -> String {
        codice_fiscale(self.person, self.gender, self.birth)
    }

    fn patient_resource(&self) -> Value {
        let (family, given) = person_name(self.gender);
        let mut p = json!({
            "resourceType": "Patient",
            "identifier": [{"system": CODICE_FISCALE, "value": self.cf()}],
            "name": [{"family": family, "given": [given]}]
        });
        if let Some(g) = self.gender {
            p["gender"] = json!(g);
        }
        if let Some(b) = self.birth {
            p["birthDate"] = json!(b.to_string());
        }
        if let Some(home) = self.home {
            p["address"] = json!([{
                "use": "home",
                "type": "physical",
                "line": ["Via Giuseppe Garibaldi 7"],
                "city": home.name,
                "_city": {"extension": [{
                    "url": SC_CODING,
                    "valueCoding": {"system": ISTAT_COMUNI, "code": home.comune, "display": home.name}
                }]},
                "postalCode": home.cap,
                "country": "IT"
            }]);
        }
        p
    }
}

// =================================================================================================
// The EHR's segnalazione transaction

fn urn(slot: usize) -> String {
    format!("urn:uuid:6a1b1990-7c2d-4e3f-8a00-{slot:012}")
}

fn entry(slot: usize, resource: Value, if_none_exist: Option<String>) -> Value {
    let rt = resource["resourceType"].as_str().unwrap().to_string();
    let mut request = json!({"method": "POST", "url": rt});
    if let Some(q) = if_none_exist {
        request["ifNoneExist"] = json!(q);
    }
    json!({"fullUrl": urn(slot), "resource": resource, "request": request})
}

fn by_identifier(resource: &Value) -> Option<String> {
    let id = &resource["identifier"][0];
    Some(format!(
        "identifier={}|{}",
        id["system"].as_str()?,
        id["value"].as_str()?
    ))
}

fn dm_bundle(c: &Case) -> Value {
    let Kind::Dm {
        code,
        onset,
        recorded,
        sent,
    } = &c.kind
    else {
        panic!("not a D.M. case")
    };
    let (family, given) = match c.doctor % 3 {
        1 => ("Bianchi", "Marco"),
        2 => ("Colombo", "Chiara"),
        _ => ("Ferrari", "Luca"),
    };
    let patient = c.patient_resource();
    let doctor = json!({
        "resourceType": "Practitioner",
        "identifier": [{"system": CODICE_FISCALE, "value": doctor_cf(c.doctor)}],
        "active": true,
        "name": [{"family": family, "given": [given], "prefix": ["Dott."]}],
        "telecom": [{"system": "phone", "value": format!("+39 02 3904 {:04}", 1000 + c.doctor), "use": "work"}]
    });
    let asl = json!({
        "resourceType": "Organization",
        "identifier": [{"system": canon("sid/asl"), "value": c.notifier.asl}],
        "active": true,
        "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type", "code": "govt", "display": "Government"}]}],
        "name": c.notifier.asl_name
    });
    let mut condition = json!({
        "resourceType": "Condition",
        "identifier": [{"system": EHR_CONDITIONS, "value": format!("{}-diagnosi", c.tag)}],
        "clinicalStatus": {"coding": [{"system": CLINICAL_STATUS, "code": "active"}]},
        "verificationStatus": {"coding": [{"system": VER_STATUS, "code": "confirmed"}]},
        "category": [{"coding": [{"system": CONDITION_CATEGORY, "code": "encounter-diagnosis", "display": "Encounter Diagnosis"}]}],
        "code": {"coding": [{"system": ICD9, "code": code}]},
        "subject": {"reference": urn(1)},
        "recorder": {"reference": urn(2)}
    });
    if let Some(o) = onset {
        condition["onsetDateTime"] = json!(o);
    }
    if let Some(r) = recorded {
        condition["recordedDate"] = json!(r);
    }
    if dm_class(code).0 == 3 {
        condition["extension"] = json!([{
            "url": canon("StructureDefinition/precedenti-trattamenti"),
            "valueCode": "nuovo-caso"
        }]);
    }
    let effective = recorded.clone().unwrap_or_else(|| sent.clone());
    let mut entries = vec![
        entry(1, patient.clone(), by_identifier(&patient)),
        entry(2, doctor.clone(), by_identifier(&doctor)),
        entry(3, asl.clone(), by_identifier(&asl)),
        entry(4, condition.clone(), by_identifier(&condition)),
    ];
    let mut payload =
        vec![json!({"contentReference": {"reference": urn(4), "display": "Diagnosi"}})];
    for (i, (criterion, esito)) in criteria_for(code).into_iter().enumerate() {
        let mut obs = json!({
            "resourceType": "Observation",
            "meta": {"profile": [canon("StructureDefinition/criterio-diagnostico")]},
            "identifier": [{"system": EHR_CRITERIA, "value": format!("{}-criterio-{i}", c.tag)}],
            "status": "final",
            "code": {"coding": [{"system": canon("CodeSystem/criterio-diagnostico"), "code": criterion}]},
            "subject": {"reference": urn(1)},
            "effectiveDateTime": effective,
            "valueCodeableConcept": {"coding": [{"system": canon("CodeSystem/esito-criterio"), "code": esito}]}
        });
        if criterion == "coltura" {
            obs["bodySite"] = json!({"coding": [{"system": SNOMED, "code": "39607008", "display": "Lung structure"}]});
        }
        let q = by_identifier(&obs);
        entries.push(entry(10 + i, obs, q));
        payload.push(json!({"contentReference": {"reference": urn(10 + i)}}));
    }
    let segnalazione = json!({
        "resourceType": "Communication",
        "meta": {"profile": [canon("StructureDefinition/segnalazione")]},
        "identifier": [{"system": EHR_SEGNALAZIONI, "value": format!("{}-segnalazione", c.tag)}],
        "status": "completed",
        "subject": {"reference": urn(1)},
        "sent": sent,
        "sender": {"reference": urn(2)},
        "recipient": [{"reference": urn(3)}],
        "reasonCode": [{"coding": [{"system": ICD9, "code": code}]}],
        "payload": payload
    });
    let q = by_identifier(&segnalazione);
    entries.push(entry(5, segnalazione, q));
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

// =================================================================================================
// The laboratory's CRE transaction (tests/fixtures/cre/kpn-blood-transaction.json, made distinct)

/// Shift every RFC 3339 instant in `v` by `days`.
fn shift_instants(v: &mut Value, days: i64) {
    match v {
        Value::String(s) => {
            if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
                *s = (t + Duration::days(days)).format(&Rfc3339).unwrap();
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| shift_instants(i, days)),
        Value::Object(map) => map.values_mut().for_each(|i| shift_instants(i, days)),
        _ => {}
    }
}

fn cre_bundle(c: &Case) -> Value {
    let Kind::Cre {
        species,
        facility,
        collected,
    } = &c.kind
    else {
        panic!("not a CRE case")
    };
    let mut bundle = fixture("cre/kpn-blood-transaction.json");
    // the fixture's culture was collected on 2026-03-02: move the whole episode to the case's day
    let base = date!(2026 - 03 - 02);
    shift_instants(&mut bundle, (c.day - base).whole_days());
    for e in bundle["entry"].as_array_mut().unwrap() {
        let r = &mut e["resource"];
        match r["resourceType"].as_str().unwrap() {
            "Patient" => *r = c.patient_resource(),
            "Organization" => {
                if r["identifier"][0]["system"] == canon("sid/asl").as_str() {
                    r["identifier"][0]["value"] = json!(facility.asl);
                    r["name"] = json!(facility.asl_name);
                } else {
                    r["identifier"][0]["value"] = json!(facility.code);
                    r["name"] = json!(facility.name);
                }
            }
            "Specimen" => {
                r["collection"]["collectedDateTime"] = json!(collected);
                let id = r["identifier"][0]["value"].as_str().unwrap().to_string();
                r["identifier"][0]["value"] = json!(format!("{id}-{}", c.tag));
            }
            _ => {
                if r["resourceType"] == "Observation" && r["code"]["coding"][0]["code"] == "600-7" {
                    let (code, display) = species.snomed();
                    r["valueCodeableConcept"] =
                        json!({"coding": [{"system": SNOMED, "code": code, "display": display}]});
                }
                if let Some(id) = r["identifier"][0]["value"].as_str().map(String::from) {
                    r["identifier"][0]["value"] = json!(format!("{id}-{}", c.tag));
                }
            }
        }
        let q = by_identifier(&e["resource"]);
        if e["request"]["ifNoneExist"].is_string() {
            e["request"]["ifNoneExist"] = json!(q.unwrap());
        }
    }
    bundle
}

// =================================================================================================
// Requests

async fn call(
    app: &TestApp,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    if body.is_some() {
        headers.push(("content-type", "application/fhir+json"));
    }
    app.request(
        method,
        uri,
        &headers,
        body.map(|b| serde_json::to_vec(b).unwrap()),
    )
    .await
}

/// A request to another server (a Router on the same database).
async fn request_to(router: &Router, method: Method, uri: &str, body: Option<&Value>) -> Resp {
    let mut req = Request::builder().method(method).uri(uri);
    if body.is_some() {
        req = req.header("content-type", "application/fhir+json");
    }
    let req = req
        .body(
            body.map(|b| Body::from(b.to_string()))
                .unwrap_or_else(Body::empty),
        )
        .unwrap();
    let resp = tower::ServiceExt::oneshot(router.clone(), req)
        .await
        .expect("router answers");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        body,
        text,
    }
}

fn stored_reference(answer: &Value) -> String {
    let resource = &answer["resource"];
    if let (Some(rt), Some(id)) = (resource["resourceType"].as_str(), resource["id"].as_str()) {
        return format!("{rt}/{id}");
    }
    let location = answer["response"]["location"]
        .as_str()
        .unwrap_or_else(|| panic!("a location in {answer:#}"));
    let location = location.split("/_history").next().unwrap();
    let parts: Vec<&str> = location.rsplitn(3, '/').collect();
    format!("{}/{}", parts[1], parts[0])
}

/// The esito-segnalazione code of a transaction-response entry's outcome.
fn receipt_code(answer: &Value) -> Option<String> {
    let system = canon("CodeSystem/esito-segnalazione");
    answer["response"]["outcome"]["issue"]
        .as_array()?
        .iter()
        .flat_map(|i| {
            i["details"]["coding"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .find(|c| c["system"] == system.as_str())
        .and_then(|c| c["code"].as_str().map(String::from))
}

/// Current resources of a search (`Type?params`), one page of up to 200, total checked.
async fn search_as(app: &TestApp, token: Option<&str>, query: &str) -> Vec<Value> {
    let sep = if query.contains('?') { '&' } else { '?' };
    let r = call(
        app,
        Method::GET,
        &format!("/fhir/{query}{sep}_count=200"),
        token,
        None,
    )
    .await;
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
        "{query}: {}",
        r.text
    );
    found
}

async fn search(app: &TestApp, query: &str) -> Vec<Value> {
    search_as(app, None, query).await
}

/// Post a case as its sender would (the EHR's segnalazione, or the laboratory's culture), check that
/// the rules made of it what the test means (notified, recorded or a CRE case), and remember what
/// was stored.
async fn post_case_as(app: &TestApp, token: Option<&str>, c: &mut Case) {
    let bundle = match &c.kind {
        Kind::Dm { .. } => dm_bundle(c),
        Kind::Cre { .. } => cre_bundle(c),
    };
    let r = call(app, Method::POST, "/fhir", token, Some(&bundle)).await;
    assert_eq!(r.status, StatusCode::OK, "{}: {}", c.tag, r.text);
    let answers = r.body["entry"]
        .as_array()
        .expect("response entries")
        .clone();
    let requests = bundle["entry"].as_array().unwrap();
    assert_eq!(answers.len(), requests.len(), "{}", r.text);
    for (q, a) in requests.iter().zip(&answers) {
        let rt = q["resource"]["resourceType"].as_str().unwrap();
        let reference = stored_reference(a);
        match rt {
            "Patient" => c.patient = reference,
            "Condition" => c.condition = reference,
            "Communication" => c.segnalazione = reference.clone(),
            _ => {}
        }
    }
    let read_token = Some("admin-token").filter(|_| token.is_some());
    match &c.kind {
        Kind::Dm { code, .. } => {
            let answer = answers.last().unwrap();
            let class = dm_class(code).0;
            let want = if class == 5 {
                "registrato"
            } else {
                "notificato"
            };
            assert_eq!(
                receipt_code(answer).as_deref(),
                Some(want),
                "{} ({code}) is not {want}: {:#}",
                c.tag,
                answer["response"]
            );
            if class != 5 {
                let found = search_as(
                    app,
                    read_token,
                    &format!(
                        "Communication?_profile={}&subject={}&status=completed",
                        canon("StructureDefinition/notifica-caso"),
                        c.patient
                    ),
                )
                .await;
                assert_eq!(
                    found.len(),
                    1,
                    "one case notification for {}: {found:#?}",
                    c.tag
                );
                c.notification = Some(format!(
                    "Communication/{}",
                    found[0]["id"].as_str().unwrap()
                ));
            }
        }
        Kind::Cre { .. } => {
            let found = search_as(
                app,
                read_token,
                &format!(
                    "Communication?category={}|cre&subject={}&status=completed",
                    canon("CodeSystem/tipo-notifica"),
                    c.patient
                ),
            )
            .await;
            assert_eq!(found.len(), 1, "one CRE case for {}: {found:#?}", c.tag);
            c.notification = Some(format!(
                "Communication/{}",
                found[0]["id"].as_str().unwrap()
            ));
        }
    }
}

async fn post_case(app: &TestApp, c: &mut Case) {
    post_case_as(app, None, c).await
}

async fn post_all(app: &TestApp, cases: &mut [Case]) {
    for c in cases.iter_mut() {
        post_case(app, c).await;
    }
}

/// Read, change and write back a stored resource (the EHR's correction).
async fn correct_as(
    app: &TestApp,
    token: Option<&str>,
    reference: &str,
    change: impl FnOnce(&mut Value),
) {
    let current = call(app, Method::GET, &format!("/fhir/{reference}"), token, None).await;
    assert_eq!(current.status, StatusCode::OK, "{}", current.text);
    let mut resource = current.body;
    change(&mut resource);
    let r = call(
        app,
        Method::PUT,
        &format!("/fhir/{reference}"),
        token,
        Some(&resource),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{reference}: {}", r.text);
}

/// The doctor withdraws the diagnosis (Condition entered-in-error): the case notification is
/// withdrawn (checked), and the case must drop out of the next computation.
async fn withdraw(app: &TestApp, c: &mut Case) {
    withdraw_as(app, None, c).await
}

async fn withdraw_as(app: &TestApp, token: Option<&str>, c: &mut Case) {
    correct_as(app, token, &c.condition.clone(), |cond| {
        cond["verificationStatus"] =
            json!({"coding": [{"system": VER_STATUS, "code": "entered-in-error"}]});
        cond.as_object_mut().unwrap().shift_remove("clinicalStatus");
    })
    .await;
    if let Some(n) = &c.notification {
        let read_token = Some("admin-token").filter(|_| token.is_some());
        let r = call(app, Method::GET, &format!("/fhir/{n}"), read_token, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(
            r.body["status"], "entered-in-error",
            "the case is withdrawn: {}",
            r.text
        );
    }
    c.withdrawn = true;
}

/// The doctor withdraws the report itself (segnalazione entered-in-error).
async fn withdraw_segnalazione(app: &TestApp, c: &mut Case) {
    correct_as(app, None, &c.segnalazione.clone(), |s| {
        s["status"] = json!("entered-in-error")
    })
    .await;
    if let Some(n) = &c.notification {
        let r = app.get(&format!("/fhir/{n}")).await;
        assert_eq!(
            r.body["status"], "entered-in-error",
            "the case is withdrawn: {}",
            r.text
        );
    }
    c.withdrawn = true;
}

fn subject_param(subject: Option<(&str, &str)>) -> String {
    match subject {
        None => String::new(),
        Some((kind, code)) => format!("&subject={CANON}/sid/{kind}|{code}"),
    }
}

/// `GET /fhir/Measure/{id}/$evaluate-measure?…` (raw query after the measure).
async fn evaluate_raw(app: &TestApp, token: Option<&str>, measure: &str, query: &str) -> Resp {
    call(
        app,
        Method::GET,
        &format!("/fhir/Measure/{measure}/$evaluate-measure?{query}"),
        token,
        None,
    )
    .await
}

/// Evaluate a summary over dates and check the answer is a well formed report of it.
async fn evaluate(
    app: &TestApp,
    m: &MeasureDef,
    start: Date,
    end: Date,
    subject: Option<(&str, &str)>,
) -> Value {
    let r = evaluate_raw(
        app,
        None,
        m.id,
        &format!(
            "periodStart={start}&periodEnd={end}{}",
            subject_param(subject)
        ),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{} {start}..{end} {subject:?}: {}",
        m.id,
        r.text
    );
    assert_report_shape(&r.body, m, "summary", subject);
    assert_eq!(r.body["period"]["start"], start.to_string(), "{}", r.text);
    assert_eq!(r.body["period"]["end"], end.to_string(), "{}", r.text);
    r.body
}

/// The common shape of a MeasureReport (evaluated or stored).
fn assert_report_shape(
    report: &Value,
    m: &MeasureDef,
    report_type: &str,
    subject: Option<(&str, &str)>,
) {
    assert_eq!(report["resourceType"], "MeasureReport", "{report:#}");
    assert_eq!(report["status"], "complete", "{report:#}");
    assert_eq!(report["type"], report_type, "{report:#}");
    assert_eq!(
        report["measure"],
        canon(&format!("Measure/{}", m.id)),
        "{report:#}"
    );
    assert!(
        report["date"].is_string(),
        "a report has its date: {report:#}"
    );
    match subject {
        Some((kind, code)) => {
            assert_eq!(
                report["reporter"]["identifier"]["system"],
                canon(&format!("sid/{kind}")),
                "{report:#}"
            );
            assert_eq!(
                report["reporter"]["identifier"]["value"], code,
                "{report:#}"
            );
            assert_eq!(
                report["reporter"]["display"],
                area_display(kind, code),
                "{report:#}"
            );
        }
        None => assert!(
            report.get("reporter").is_none(),
            "no reporter without subject: {report:#}"
        ),
    }
    let group = &report["group"][0];
    assert_eq!(
        group["population"][0]["code"]["coding"][0]["code"], "initial-population",
        "{report:#}"
    );
    assert_eq!(
        group["stratifier"][0]["code"][0]["coding"][0]["code"], m.stratifier,
        "{report:#}"
    );
    // the group total is the sum of the strata
    let strata = strata_of(report, m);
    assert_eq!(
        group["population"][0]["count"].as_i64(),
        Some(total(&strata)),
        "group count = sum of strata: {report:#}"
    );
}

/// A report's strata as (component codes in the measure's order) → count; only non-empty strata
/// may be listed, each once.
fn strata_of(report: &Value, m: &MeasureDef) -> Counts {
    let mut counts = Counts::new();
    let strata = report["group"][0]["stratifier"][0]["stratum"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for s in strata {
        let key = stratum_key(&s, m);
        assert_eq!(
            s["population"][0]["code"]["coding"][0]["code"], "initial-population",
            "{s:#}"
        );
        let count = s["population"][0]["count"]
            .as_i64()
            .unwrap_or_else(|| panic!("a count: {s:#}"));
        assert!(count > 0, "only non-empty strata are listed: {s:#}");
        assert!(
            counts.insert(key.clone(), count).is_none(),
            "stratum {key:?} listed twice: {report:#}"
        );
    }
    counts
}

/// A stratum's key: its component value codes in the measure's component order (checked), a
/// place not known (data-absent-reason "unknown") written "ignota".
fn stratum_key(s: &Value, m: &MeasureDef) -> Vec<String> {
    let components = s["component"]
        .as_array()
        .unwrap_or_else(|| panic!("components in {s:#}"));
    let codes: Vec<&str> = components
        .iter()
        .map(|c| c["code"]["coding"][0]["code"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        codes, m.components,
        "components of {} in order: {s:#}",
        m.id
    );
    components
        .iter()
        .zip(m.components)
        .map(|(c, name)| {
            let coding = &c["value"]["coding"][0];
            if *name == "provincia" && coding["system"] == DATA_ABSENT {
                assert_eq!(coding["code"], "unknown", "{name}: {s:#}");
                return "ignota".to_string();
            }
            assert_eq!(
                coding["system"],
                component_system(name),
                "{name} system: {s:#}"
            );
            coding["code"]
                .as_str()
                .unwrap_or_else(|| panic!("{name} code: {s:#}"))
                .to_string()
        })
        .collect()
}

fn group_count(report: &Value) -> i64 {
    report["group"][0]["population"][0]["count"]
        .as_i64()
        .expect("group count")
}

/// `POST /fhir/MeasureReport/$generate-reports?period=…` (a type-level operation on MeasureReport).
async fn generate_on(app: &TestApp, token: Option<&str>, period: &str) -> Resp {
    call(app, Method::POST, &generate_uri(period), token, None).await
}

fn generate_uri(period: &str) -> String {
    format!("/fhir/MeasureReport/$generate-reports?period={period}")
}

fn generation_counts(r: &Resp) -> (i64, i64, i64) {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["resourceType"], "Parameters", "{}", r.text);
    let get = |name: &str| {
        r.body["parameter"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .and_then(|p| p["valueInteger"].as_i64())
            .unwrap_or_else(|| panic!("parameter {name} in {}", r.text))
    };
    (get("created"), get("updated"), get("unchanged"))
}

async fn generate(app: &TestApp, period: &str) -> (i64, i64, i64) {
    generation_counts(&generate_on(app, None, period).await)
}

/// The stored reports of a period (`period=` search), by id.
async fn stored_reports(
    app: &TestApp,
    token: Option<&str>,
    period: &str,
) -> BTreeMap<String, Value> {
    let found = search_as(app, token, &format!("MeasureReport?period={period}")).await;
    let mut by_id = BTreeMap::new();
    for r in found {
        let id = r["id"].as_str().unwrap().to_string();
        assert!(by_id.insert(id.clone(), r).is_none(), "{id} found twice");
    }
    by_id
}

/// Check a stored report: id, identifier, region extension, measure, reporter, no subject results.
fn assert_stored(report: &Value, id: &str, region: &str) {
    let (measure, kind, code) = parse_report_id(id);
    let m = measure_def(&measure);
    assert_eq!(report["id"], id, "{report:#}");
    let identifiers = report["identifier"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| vec![report["identifier"].clone()]);
    assert!(
        identifiers
            .iter()
            .any(|i| i["system"] == canon("sid/riepilogo").as_str() && i["value"] == id),
        "identifier riepilogo|{id}: {report:#}"
    );
    let ext: Vec<&Value> = report["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["url"] == canon("StructureDefinition/regione-riepilogo").as_str())
        .collect();
    assert_eq!(ext.len(), 1, "one regione-riepilogo: {report:#}");
    assert_eq!(
        ext[0]["valueCoding"]["system"],
        canon("CodeSystem/regione"),
        "{report:#}"
    );
    assert_eq!(ext[0]["valueCoding"]["code"], region, "{report:#}");
    assert_report_shape(report, &m, "summary", Some((&kind, &code)));
    assert!(
        !report.to_string().contains("subjectResults"),
        "no subject results in a stored report: {report:#}"
    );
}

/// `modello-16-asl-030321-2026-01` → ("modello-16", "asl", "030321").
fn parse_report_id(id: &str) -> (String, String, String) {
    for measure in [
        "modello-16-bis",
        "modello-16",
        "classe-5-annuale",
        "cre-mensile",
    ] {
        if let Some(rest) = id.strip_prefix(&format!("{measure}-")) {
            let mut parts = rest.splitn(3, '-');
            let kind = parts.next().unwrap().to_string();
            let code = parts.next().unwrap().to_string();
            if kind == "asl" || kind == "regione" {
                return (measure.to_string(), kind, code);
            }
        }
    }
    panic!("not a stored report id: {id}")
}

/// No report may name a patient: no Patient reference, no codice fiscale, no patient id.
fn assert_no_identity(text: &str, cases: &[Case]) {
    assert!(
        !text.contains("Patient/"),
        "a report names a Patient: {text}"
    );
    assert!(
        !text.contains("\"Patient\""),
        "a report holds a Patient: {text}"
    );
    for c in cases {
        assert!(
            !text.contains(&c.cf()),
            "a report holds the codice fiscale of {}: {text}",
            c.tag
        );
        let patient_id = c.patient.trim_start_matches("Patient/");
        assert!(
            patient_id.is_empty() || !text.contains(patient_id),
            "a report holds the patient id of {}: {text}",
            c.tag
        );
    }
}

// =================================================================================================
// Seeds

/// Measles cases in ATS Milano in January 2026 whose ages at onset sit on every band's edges: each
/// age both on its birthday (exactly N) and on the eve of the next (N, turning N+1 tomorrow), both
/// sexes; plus no birth date, no sex and sex "other".
fn band_edge_cases() -> Vec<Case> {
    let ages = [0, 1, 4, 5, 9, 10, 14, 15, 24, 25, 64, 65, 99, 100];
    let mut cases = Vec::new();
    let mut person = 100;
    for (i, age) in ages.into_iter().enumerate() {
        for sex in ["male", "female"] {
            for eve in [false, true] {
                let day =
                    date!(2026 - 01 - 03) + Duration::days(((i * 2 + eve as usize) % 27) as i64);
                let birth = if eve {
                    // born the day after the (age+1)th-birthday-to-be: still `age` on the onset day
                    day.replace_year(day.year() - age - 1).unwrap() + Duration::days(1)
                } else if age == 0 {
                    day - Duration::days(20)
                } else {
                    day.replace_year(day.year() - age).unwrap()
                };
                assert_eq!(completed_years(birth, day), age, "the seed means age {age}");
                person += 1;
                cases.push(
                    dm(&format!("eta-{age}-{sex}-{eve}"), person, "055.9", day)
                        .gender(Some(sex))
                        .born(Some(birth)),
                );
            }
        }
    }
    let day = date!(2026 - 01 - 20);
    cases.push(dm("senza-nascita", 900, "055.9", day).born(None).female());
    cases.push(
        dm("senza-sesso", 901, "055.9", day)
            .gender(None)
            .born(Some(date!(2019 - 05 - 02))),
    );
    cases.push(
        dm("sesso-altro", 902, "055.9", day)
            .gender(Some("other"))
            .born(Some(date!(1990 - 07 - 07))),
    );
    // elsewhere or at another time: not in ATS Milano's January
    cases.push(dm("bergamo", 903, "055.9", day).lives_in(BERGAMO));
    cases.push(dm("febbraio", 904, "055.9", date!(2026 - 02 - 01)));
    cases.push(dm("dicembre", 905, "055.9", date!(2025 - 12 - 31)));
    cases
}

/// A deterministic year of cases: D.M. reports over December 2025 – November 2026 in several ASLs
/// and regions (some without residence, some withdrawn later), and CRE cultures.
fn seeded_year() -> Vec<Case> {
    let mut state: u64 = 0x5eed_1990_2026;
    let mut next = move |n: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    let homes: [Option<Place>; 11] = [
        Some(MILANO),
        Some(MILANO),
        Some(LODI),
        Some(BERGAMO),
        Some(DARFO),
        Some(BRESCIA),
        Some(MONZA),
        Some(AOSTA),
        Some(TRENTO),
        Some(CAMPOBASSO),
        None,
    ];
    let notifiers = [MILANO, BERGAMO, AOSTA, TRENTO];
    let codes = [
        "055.9", "052.9", "072.9", "033.9", "034.1", "056.9", "070.30", "070.1", "011.94", "012.0",
        "088.81", "008.61", "053.9",
    ];
    let genders = [
        Some("male"),
        Some("female"),
        Some("female"),
        Some("male"),
        Some("other"),
        None,
    ];
    let mut cases = Vec::new();
    for i in 0..48u32 {
        let month = next(12) as u8; // 0 = December 2025
        let (year, month) = if month == 0 {
            (2025, 12)
        } else {
            (2026, month)
        };
        let day = first_day(year, month) + Duration::days(next(28) as i64);
        let code = codes[next(codes.len() as u64) as usize];
        let gender = genders[next(genders.len() as u64) as usize];
        let age = next(103) as i32;
        let birth = (next(15) != 0).then(|| {
            let b = day.replace_year(day.year() - age).unwrap() - Duration::days(next(300) as i64);
            if b.month() == time::Month::February && b.day() == 29 {
                b - Duration::days(1)
            } else {
                b
            }
        });
        let home = homes[next(homes.len() as u64) as usize];
        let mut c = dm(&format!("anno-{i}"), 1000 + i, code, day)
            .gender(gender)
            .born(birth)
            .doctor(1 + i % 3);
        c = match home {
            Some(p) => c.lives_in(p).notified_by(if next(4) == 0 {
                notifiers[next(4) as usize]
            } else {
                p
            }),
            None => c.homeless().notified_by(notifiers[next(4) as usize]),
        };
        if i % 7 == 3 {
            c = c.onset_date_only();
        }
        if i % 11 == 5 {
            let d = c.day + Duration::days(2);
            c = c.no_onset(d);
        }
        cases.push(c);
    }
    cases.push(
        cre("cre-1", 2001, Species::Kpn, NIGUARDA, date!(2026 - 01 - 20))
            .female()
            .born(Some(date!(1956 - 02 - 11))),
    );
    cases.push(
        cre("cre-2", 2002, Species::Eco, NIGUARDA, date!(2026 - 03 - 10))
            .born(Some(date!(1971 - 03 - 10))),
    );
    cases.push(
        cre("cre-3", 2003, Species::Kpn, PARINI, date!(2026 - 03 - 22))
            .born(Some(date!(1946 - 09 - 30)))
            .lives_in(AOSTA),
    );
    cases.push(
        cre("cre-4", 2004, Species::Eco, NIGUARDA, date!(2026 - 07 - 05))
            .female()
            .born(Some(date!(2026 - 06 - 20))),
    );
    cases.push(
        cre("cre-5", 2005, Species::Kpn, NIGUARDA, date!(2026 - 07 - 18))
            .born(Some(date!(1966 - 07 - 19))),
    );
    // collected at 23:30 UTC on 31 October (winter time since the 25th): 1 November in Rome
    cases.push(
        cre("cre-6", 2006, Species::Kpn, NIGUARDA, date!(2026 - 10 - 31))
            .collected_at("2026-10-31T23:30:00Z", date!(2026 - 11 - 01))
            .female()
            .born(Some(date!(1980 - 01 - 01))),
    );
    cases
}

// =================================================================================================
// Access (as tests/security.rs)

const ACCESS: &str = r#"
[[client]]
id = "admin"
role = "admin"
token_sha256 = "TOKEN_ADMIN"

[[client]]
id = "ministero"
role = "ministry"
token_sha256 = "TOKEN_MINISTRY"

[[client]]
id = "lab-niguarda"
role = "laboratory"
token_sha256 = "TOKEN_LAB"

[[client]]
id = "ehr-sacco"
role = "ehr"
token_sha256 = "TOKEN_EHR"

[[client]]
id = "regione-lombardia"
role = "region"
regions = ["030"]
token_sha256 = "TOKEN_LOMBARDIA"

[[client]]
id = "regione-valle-d-aosta"
role = "region"
regions = ["020"]
token_sha256 = "TOKEN_AOSTA"
"#;

fn with_access(c: &mut Config) {
    c.access_file = Some(common::access_file(
        ACCESS,
        &[
            ("TOKEN_ADMIN", "admin-token"),
            ("TOKEN_MINISTRY", "ministry-token"),
            ("TOKEN_LAB", "lab-token"),
            ("TOKEN_EHR", "ehr-token"),
            ("TOKEN_LOMBARDIA", "lombardia-token"),
            ("TOKEN_AOSTA", "aosta-token"),
        ],
    ));
}

fn assert_outcome(r: &Resp, status: StatusCode, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text);
    assert_eq!(
        r.body["resourceType"], "OperationOutcome",
        "{what}: {}",
        r.text
    );
    assert!(
        r.body["issue"].as_array().is_some_and(|i| !i.is_empty()),
        "{what}: an issue: {}",
        r.text
    );
}

// =================================================================================================

on_both_databases! {
    async fn measures_are_served_as_data(app) {
        let all = search(&app, "Measure").await;
        let urls: BTreeSet<String> = all.iter().map(|m| m["url"].as_str().unwrap().to_string()).collect();
        for id in ["modello-16", "modello-16-bis", "classe-5-annuale", "cre-mensile"] {
            assert!(urls.contains(&canon(&format!("Measure/{id}"))), "{id} among {urls:?}");
            let r = app.get(&format!("/fhir/Measure/{id}")).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            assert_eq!(r.body["resourceType"], "Measure");
            assert_eq!(r.body["url"], canon(&format!("Measure/{id}")));
            let by_url = search(&app, &format!("Measure?url={}", canon(&format!("Measure/{id}")))).await;
            assert_eq!(by_url.len(), 1, "{by_url:#?}");
            assert_eq!(by_url[0]["id"], id);
        }
        let by_id = search(&app, "Measure?_id=modello-16-bis").await;
        assert_eq!(by_id.len(), 1, "{by_id:#?}");
        assert_eq!(by_id[0]["url"], canon("Measure/modello-16-bis"));
        let r = app.get("/fhir/Measure/no-such-measure").await;
        assert_outcome(&r, StatusCode::NOT_FOUND, "unknown Measure");
    }

    async fn counts_by_age_band_and_sex_at_each_band_edge(app) {
        let mut cases = band_edge_cases();
        post_all(&app, &mut cases).await;
        let (start, end) = (date!(2026 - 01 - 01), date!(2026 - 01 - 31));
        let subject = Some(("asl", MILANO.asl));
        let want = expected(&cases, &MODELLO_16, start, end, subject);
        // the seed itself: 56 edge cases + 3 without birth date or with another sex
        assert_eq!(total(&want), 59);
        assert_eq!(want.get(&vec!["055".to_string(), "0".into(), "male".into()]), Some(&2));
        assert_eq!(want.get(&vec!["055".to_string(), "1-4".into(), "female".into()]), Some(&4));
        assert_eq!(want.get(&vec!["055".to_string(), "65+".into(), "female".into()]), Some(&6));
        assert_eq!(want.get(&vec!["055".to_string(), "ignota".into(), "female".into()]), Some(&1));
        assert_eq!(want.get(&vec!["055".to_string(), "5-9".into(), "unknown".into()]), Some(&1));
        assert_eq!(want.get(&vec!["055".to_string(), "25-64".into(), "other".into()]), Some(&1));

        let report = evaluate(&app, &MODELLO_16, start, end, subject).await;
        assert_eq!(strata_of(&report, &MODELLO_16), want, "{report:#}");
        assert_eq!(group_count(&report), 59);
        assert_no_identity(&report.to_string(), &cases);

        // partial dates: a month written YYYY-MM is its first to its last day
        let r = evaluate_raw(&app, None, "modello-16", &format!("periodStart=2026-01&periodEnd=2026-01{}", subject_param(subject))).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(strata_of(&r.body, &MODELLO_16), want, "{}", r.text);

        // the same by POST with a Parameters body, reportType population (the R4 name of summary)
        let params = json!({"resourceType": "Parameters", "parameter": [
            {"name": "periodStart", "valueDate": "2026-01-01"},
            {"name": "periodEnd", "valueDate": "2026-01-31"},
            {"name": "subject", "valueString": format!("{CANON}/sid/asl|{}", MILANO.asl)},
            {"name": "reportType", "valueCode": "population"}
        ]});
        let r = app.post("/fhir/Measure/modello-16/$evaluate-measure", &params).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_report_shape(&r.body, &MODELLO_16, "summary", subject);
        assert_eq!(strata_of(&r.body, &MODELLO_16), want, "{}", r.text);

        // the whole country in January also holds the Bergamo case; February holds one
        let country = evaluate(&app, &MODELLO_16, start, end, None).await;
        assert_eq!(strata_of(&country, &MODELLO_16), expected(&cases, &MODELLO_16, start, end, None));
        assert_eq!(group_count(&country), 60);
        let february = evaluate(&app, &MODELLO_16, date!(2026 - 02 - 01), date!(2026 - 02 - 28), subject).await;
        assert_eq!(group_count(&february), 1, "{february:#}");
    }

    async fn withdrawn_cases_are_excluded_from_the_next_evaluation(app) {
        let day = date!(2026 - 02 - 10);
        let mut cases = vec![
            dm("m-1", 1, "055.9", day).born(Some(date!(2020 - 01 - 01))),
            dm("m-2", 2, "055.9", day + Duration::days(3)).female().born(Some(date!(2001 - 05 - 05))),
            dm("m-3", 3, "052.9", day + Duration::days(5)).born(Some(date!(2018 - 03 - 03))),
            dm("m-4", 4, "052.9", day + Duration::days(6)).female().born(Some(date!(1950 - 03 - 03))),
        ];
        post_all(&app, &mut cases).await;
        let (start, end) = (date!(2026 - 02 - 01), date!(2026 - 02 - 28));
        let subject = Some(("asl", MILANO.asl));
        let before = evaluate(&app, &MODELLO_16, start, end, subject).await;
        assert_eq!(strata_of(&before, &MODELLO_16), expected(&cases, &MODELLO_16, start, end, subject));
        assert_eq!(group_count(&before), 4);

        // the diagnosis is withdrawn: the next evaluation drops the case, and its stratum with it
        withdraw(&app, &mut cases[1]).await;
        let after = evaluate(&app, &MODELLO_16, start, end, subject).await;
        let want = expected(&cases, &MODELLO_16, start, end, subject);
        assert_eq!(strata_of(&after, &MODELLO_16), want, "{after:#}");
        assert_eq!(group_count(&after), 3);
        assert!(!want.contains_key(&vec!["055".to_string(), "25-64".into(), "female".into()]));

        // the report itself withdrawn (segnalazione entered-in-error): the same
        withdraw_segnalazione(&app, &mut cases[2]).await;
        let after = evaluate(&app, &MODELLO_16, start, end, subject).await;
        assert_eq!(strata_of(&after, &MODELLO_16), expected(&cases, &MODELLO_16, start, end, subject), "{after:#}");
        assert_eq!(group_count(&after), 2);
        let bis = evaluate(&app, &MODELLO_16_BIS, start, end, Some(("regione", "030"))).await;
        assert_eq!(group_count(&bis), 2, "{bis:#}");
    }

    async fn two_reports_of_one_case_count_once_on_the_earliest_standing_onset(app) {
        // one patient, one disease, two doctors: one case; its reference day is the earliest onset
        let first = dm("dup-1", 1, "055.9", date!(2026 - 02 - 03)).born(Some(date!(2015 - 02 - 02)));
        let mut second = first.clone();
        second.tag = "dup-2".into();
        second.doctor = 2;
        second = second.onset_at("2026-01-30T18:00:00+01:00", date!(2026 - 01 - 30));
        let mut first = first;
        post_case(&app, &mut first).await;
        post_case(&app, &mut second).await;
        assert_eq!(first.notification, second.notification, "the second report joins the case");
        let subject = Some(("asl", MILANO.asl));
        let jan = evaluate(&app, &MODELLO_16, date!(2026 - 01 - 01), date!(2026 - 01 - 31), subject).await;
        let feb = evaluate(&app, &MODELLO_16, date!(2026 - 02 - 01), date!(2026 - 02 - 28), subject).await;
        assert_eq!(group_count(&jan), 1, "counted once, in January: {jan:#}");
        assert_eq!(group_count(&feb), 0, "{feb:#}");
        assert_eq!(
            strata_of(&jan, &MODELLO_16),
            Counts::from([(vec!["055".to_string(), "10-14".into(), "male".into()], 1)])
        );
        // the January report is withdrawn: the case stands on the February report alone
        correct_as(&app, None, &second.segnalazione, |s| s["status"] = json!("entered-in-error")).await;
        let jan = evaluate(&app, &MODELLO_16, date!(2026 - 01 - 01), date!(2026 - 01 - 31), subject).await;
        let feb = evaluate(&app, &MODELLO_16, date!(2026 - 02 - 01), date!(2026 - 02 - 28), subject).await;
        assert_eq!(group_count(&jan), 0, "{jan:#}");
        assert_eq!(
            strata_of(&feb, &MODELLO_16),
            Counts::from([(vec!["055".to_string(), "10-14".into(), "male".into()], 1)]),
            "{feb:#}"
        );
    }

    async fn reference_day_is_the_europe_rome_calendar_day_near_midnight(app) {
        let mut cases = vec![
            // 23:30 in Rome on 31 January
            dm("rome-jan", 1, "055.9", date!(2026 - 01 - 31))
                .onset_at("2026-01-31T23:30:00+01:00", date!(2026 - 01 - 31)),
            // 23:30 UTC on 31 January is 00:30 on 1 February in Rome
            dm("utc-feb", 2, "055.9", date!(2026 - 01 - 31))
                .female()
                .onset_at("2026-01-31T23:30:00Z", date!(2026 - 02 - 01)),
            // without onset, the recordedDate decides: 23:45 UTC on 28 February is 1 March in Rome
            dm("rec-mar", 3, "052.9", date!(2026 - 02 - 27)).no_onset(date!(2026 - 02 - 27)),
            // a CRE specimen collected at 23:30 UTC on 31 January: February in Rome
            cre("cre-feb", 4, Species::Kpn, NIGUARDA, date!(2026 - 01 - 31))
                .collected_at("2026-01-31T23:30:00Z", date!(2026 - 02 - 01)),
            cre("cre-jan", 5, Species::Eco, NIGUARDA, date!(2026 - 01 - 31))
                .female()
                .collected_at("2026-01-31T23:59:00+01:00", date!(2026 - 01 - 31)),
        ];
        if let Kind::Dm { recorded, sent, .. } = &mut cases[2].kind {
            *recorded = Some("2026-02-28T23:45:00Z".into());
            *sent = "2026-03-01T09:00:00+01:00".into();
        }
        cases[2].day = date!(2026 - 03 - 01);
        post_all(&app, &mut cases).await;
        let subject = Some(("asl", MILANO.asl));
        let months = [
            (date!(2026 - 01 - 01), date!(2026 - 01 - 31)),
            (date!(2026 - 02 - 01), date!(2026 - 02 - 28)),
            (date!(2026 - 03 - 01), date!(2026 - 03 - 31)),
            // a single day is a period too
            (date!(2026 - 01 - 31), date!(2026 - 01 - 31)),
            (date!(2026 - 02 - 01), date!(2026 - 02 - 01)),
        ];
        for (start, end) in months {
            let r = evaluate(&app, &MODELLO_16, start, end, subject).await;
            assert_eq!(strata_of(&r, &MODELLO_16), expected(&cases, &MODELLO_16, start, end, subject), "{start}..{end}: {r:#}");
            let r = evaluate(&app, &CRE_MENSILE, start, end, Some(("regione", "030"))).await;
            assert_eq!(strata_of(&r, &CRE_MENSILE), expected(&cases, &CRE_MENSILE, start, end, Some(("regione", "030"))), "{start}..{end}: {r:#}");
        }
        // spelled out
        let jan = evaluate(&app, &MODELLO_16, date!(2026 - 01 - 01), date!(2026 - 01 - 31), subject).await;
        assert_eq!(strata_of(&jan, &MODELLO_16), Counts::from([(vec!["055".to_string(), "25-64".into(), "male".into()], 1)]));
        let feb = evaluate(&app, &MODELLO_16, date!(2026 - 02 - 01), date!(2026 - 02 - 28), subject).await;
        assert_eq!(strata_of(&feb, &MODELLO_16), Counts::from([(vec!["055".to_string(), "25-64".into(), "female".into()], 1)]));
        let mar = evaluate(&app, &MODELLO_16, date!(2026 - 03 - 01), date!(2026 - 03 - 31), subject).await;
        assert_eq!(strata_of(&mar, &MODELLO_16), Counts::from([(vec!["052".to_string(), "25-64".into(), "male".into()], 1)]));
        let cre_feb = evaluate(&app, &CRE_MENSILE, date!(2026 - 02 - 01), date!(2026 - 02 - 28), Some(("regione", "030"))).await;
        assert_eq!(strata_of(&cre_feb, &CRE_MENSILE), Counts::from([(vec!["041.3".to_string(), "65+".into(), "male".into()], 1)]));
    }

    async fn tuberculosis_counts_in_modello_16_and_class_v_only_in_the_annual_summary(app) {
        let day = date!(2026 - 03 - 12);
        let mut cases = vec![
            dm("tbc", 1, "011.94", day).born(Some(date!(1961 - 01 - 01))),
            dm("tbc-pleura", 2, "012.0", day + Duration::days(4)).female().born(Some(date!(1999 - 12 - 31))),
            dm("morbillo", 3, "055.9", day).born(Some(date!(2022 - 01 - 01))),
            dm("lyme", 4, "088.81", day).female().born(Some(date!(1975 - 05 - 05))),
            dm("rotavirus", 5, "008.61", day + Duration::days(1)).born(Some(date!(2025 - 09 - 09))),
            dm("lyme-bg", 6, "088.81", day).lives_in(BERGAMO).born(Some(date!(1960 - 05 - 05))),
            // class V of the previous year: not in 2026's summary
            dm("lyme-2025", 7, "088.81", date!(2025 - 12 - 20)).born(Some(date!(1985 - 05 - 05))),
            // a class V case in November
            dm("zoster", 8, "053.9", date!(2026 - 11 - 02)).female().born(Some(date!(1940 - 02 - 02))),
        ];
        post_all(&app, &mut cases).await;
        // a TB report whose culture is still in progress is no case (not notified): not counted
        let waiting = dm_bundle(&dm("tbc-in-corso", 9, "011.90", day).born(Some(date!(1970 - 01 - 01))));
        let mut waiting = waiting;
        for e in waiting["entry"].as_array_mut().unwrap() {
            if e["resource"]["resourceType"] == "Observation" {
                e["resource"]["valueCodeableConcept"]["coding"][0]["code"] = json!("in-corso");
            }
        }
        let r = app.post("/fhir", &waiting).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_ne!(receipt_code(r.body["entry"].as_array().unwrap().last().unwrap()).as_deref(), Some("notificato"));

        let (start, end) = (date!(2026 - 03 - 01), date!(2026 - 03 - 31));
        let subject = Some(("asl", MILANO.asl));
        let march = evaluate(&app, &MODELLO_16, start, end, subject).await;
        let want = Counts::from([
            (vec!["010-018".to_string(), "65+".into(), "male".into()], 1),
            (vec!["010-018".to_string(), "25-64".into(), "female".into()], 1),
            (vec!["055".to_string(), "1-4".into(), "male".into()], 1),
        ]);
        assert_eq!(want, expected(&cases, &MODELLO_16, start, end, subject));
        assert_eq!(strata_of(&march, &MODELLO_16), want, "{march:#}");
        let text = march.to_string();
        for code in ["088.81", "008.61", "011.94", "012.0"] {
            assert!(!text.contains(&format!("\"{code}\"")), "{code} is not a stratum of modello-16: {march:#}");
        }
        let bis = evaluate(&app, &MODELLO_16_BIS, start, end, Some(("regione", "030"))).await;
        assert_eq!(strata_of(&bis, &MODELLO_16_BIS), expected(&cases, &MODELLO_16_BIS, start, end, Some(("regione", "030"))));
        assert_eq!(group_count(&bis), 3);

        // class V annual: a calendar year, the code the doctor reported
        let (ys, ye) = (date!(2026 - 01 - 01), date!(2026 - 12 - 31));
        let annual = evaluate(&app, &CLASSE_5, ys, ye, subject).await;
        let want = Counts::from([
            (vec!["088.81".to_string(), "25-64".into(), "female".into()], 1),
            (vec!["008.61".to_string(), "0".into(), "male".into()], 1),
            (vec!["053.9".to_string(), "65+".into(), "female".into()], 1),
        ]);
        assert_eq!(want, expected(&cases, &CLASSE_5, ys, ye, subject));
        assert_eq!(strata_of(&annual, &CLASSE_5), want, "{annual:#}");
        let region = evaluate(&app, &CLASSE_5, ys, ye, Some(("regione", "030"))).await;
        assert_eq!(strata_of(&region, &CLASSE_5), expected(&cases, &CLASSE_5, ys, ye, Some(("regione", "030"))), "{region:#}");
        assert_eq!(group_count(&region), 4);
        // the year written as YYYY
        let r = evaluate_raw(&app, None, "classe-5-annuale", &format!("periodStart=2026&periodEnd=2026{}", subject_param(subject))).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(strata_of(&r.body, &CLASSE_5), want, "{}", r.text);
        let last_year = evaluate(&app, &CLASSE_5, date!(2025 - 01 - 01), date!(2025 - 12 - 31), subject).await;
        assert_eq!(strata_of(&last_year, &CLASSE_5), Counts::from([(vec!["088.81".to_string(), "25-64".into(), "male".into()], 1)]));

        // stored: the year's generation
        let (created, _, _) = generate(&app, "2026").await;
        assert_eq!(created as usize, yearly_report_ids("2026").len());
        let stored = search(&app, &format!("MeasureReport?measure={}&period=2026&reporter:identifier={CANON}/sid/asl|{}", canon("Measure/classe-5-annuale"), MILANO.asl)).await;
        assert_eq!(stored.len(), 1, "{stored:#?}");
        assert_stored(&stored[0], &format!("classe-5-annuale-asl-{}-2026", MILANO.asl), "030");
        assert_eq!(strata_of(&stored[0], &CLASSE_5), want);
    }

    async fn province_comes_from_the_residence_comune(app) {
        let day = date!(2026 - 04 - 14);
        let born = Some(date!(1988 - 08 - 08));
        let mut cases = vec![
            dm("mi", 1, "055.9", day).lives_in(MILANO).born(born),
            dm("mi-2", 2, "055.9", day).lives_in(MILANO).born(born).female(),
            dm("lodi", 3, "055.9", day).lives_in(LODI).born(born),
            dm("bg", 4, "055.9", day).lives_in(BERGAMO).born(born),
            // Bergamo resident notified by ATS Milano: the residence decides
            dm("bg-mi", 5, "055.9", day).lives_in(BERGAMO).notified_by(MILANO).born(born),
            dm("darfo", 6, "055.9", day).lives_in(DARFO).born(born),
            dm("brescia", 7, "055.9", day).lives_in(BRESCIA).born(born),
            dm("monza", 8, "052.9", day).lives_in(MONZA).born(born),
            // no residence: the notifying ASL's region, province unknown
            dm("senza-casa", 9, "055.9", day).homeless().notified_by(BERGAMO).born(born),
            // an Aosta resident notified in Milano counts in Valle d'Aosta
            dm("aosta-mi", 10, "055.9", day).lives_in(AOSTA).notified_by(MILANO).born(born),
        ];
        post_all(&app, &mut cases).await;
        let (start, end) = (date!(2026 - 04 - 01), date!(2026 - 04 - 30));
        let lombardia = Some(("regione", "030"));
        let report = evaluate(&app, &MODELLO_16_BIS, start, end, lombardia).await;
        let m = |d: &str, p: &str, s: &str| vec![d.to_string(), p.to_string(), "25-64".to_string(), s.to_string()];
        let want = Counts::from([
            (m("055", "015", "male"), 1),
            (m("055", "015", "female"), 1),
            (m("055", "098", "male"), 1),
            (m("055", "016", "male"), 2),
            (m("055", "017", "male"), 2),
            (m("052", "108", "male"), 1),
            (m("055", "ignota", "male"), 1),
        ]);
        assert_eq!(want, expected(&cases, &MODELLO_16_BIS, start, end, lombardia));
        assert_eq!(strata_of(&report, &MODELLO_16_BIS), want, "{report:#}");
        assert_eq!(group_count(&report), 9);
        let aosta = evaluate(&app, &MODELLO_16_BIS, start, end, Some(("regione", "020"))).await;
        assert_eq!(strata_of(&aosta, &MODELLO_16_BIS), Counts::from([(m("055", "007", "male"), 1)]));
        // a province as subject
        let brescia = evaluate(&app, &MODELLO_16_BIS, start, end, Some(("provincia", "017"))).await;
        assert_eq!(strata_of(&brescia, &MODELLO_16_BIS), Counts::from([(m("055", "017", "male"), 2)]));
        // ASLs: from the comune (Lodi is ATS Milano; Darfo is ATS della Montagna, not Brescia)
        for (asl, n) in [(MILANO.asl, 3), (BERGAMO.asl, 3), (DARFO.asl, 1), (BRESCIA.asl, 1), (MONZA.asl, 1), (AOSTA.asl, 1)] {
            let r = evaluate(&app, &MODELLO_16, start, end, Some(("asl", asl))).await;
            assert_eq!(strata_of(&r, &MODELLO_16), expected(&cases, &MODELLO_16, start, end, Some(("asl", asl))), "ASL {asl}: {r:#}");
            assert_eq!(group_count(&r), n, "ASL {asl}: {r:#}");
        }
    }

    async fn a_seeded_year_evaluated_and_stored_matches_an_independent_count(app) {
        let mut cases = seeded_year();
        post_all(&app, &mut cases).await;
        // corrections before any computation: three diagnoses withdrawn
        let mut withdrawn = 0;
        for i in [4usize, 17, 30, 41] {
            if cases[i].notification.is_some() && withdrawn < 3 {
                withdraw(&app, &mut cases[i]).await;
                withdrawn += 1;
            }
        }
        assert!(withdrawn >= 2, "the seed withdraws notified cases");
        let dm_standing = cases.iter().filter(|c| c.is_dm() && !c.withdrawn).count();
        assert!(dm_standing >= 40, "a few dozen standing D.M. cases");

        let asls = all_asl();
        let mut months: Vec<(i32, u8)> = vec![(2025, 12)];
        months.extend((1..=12).map(|m| (2026, m)));
        for (year, month) in &months {
            let (start, end) = (first_day(*year, *month), last_day_of_month(*year, *month));
            for asl in &asls {
                let subject = Some(("asl", asl.as_str()));
                let r = evaluate(&app, &MODELLO_16, start, end, subject).await;
                assert_eq!(strata_of(&r, &MODELLO_16), expected(&cases, &MODELLO_16, start, end, subject), "modello-16 {asl} {start}: {r:#}");
            }
            for region in ["030", "020", "042", "140", "010"] {
                let subject = Some(("regione", region));
                let r = evaluate(&app, &MODELLO_16_BIS, start, end, subject).await;
                assert_eq!(strata_of(&r, &MODELLO_16_BIS), expected(&cases, &MODELLO_16_BIS, start, end, subject), "modello-16-bis {region} {start}: {r:#}");
                let r = evaluate(&app, &CRE_MENSILE, start, end, subject).await;
                assert_eq!(strata_of(&r, &CRE_MENSILE), expected(&cases, &CRE_MENSILE, start, end, subject), "cre-mensile {region} {start}: {r:#}");
            }
            let r = evaluate(&app, &MODELLO_16_BIS, start, end, None).await;
            assert_eq!(strata_of(&r, &MODELLO_16_BIS), expected(&cases, &MODELLO_16_BIS, start, end, None), "modello-16-bis Italy {start}: {r:#}");
        }
        // a quarter, and the class V year per ASL and region
        let (qs, qe) = (date!(2026 - 01 - 01), date!(2026 - 03 - 31));
        let r = evaluate(&app, &MODELLO_16_BIS, qs, qe, Some(("regione", "030"))).await;
        assert_eq!(strata_of(&r, &MODELLO_16_BIS), expected(&cases, &MODELLO_16_BIS, qs, qe, Some(("regione", "030"))));
        let (ys, ye) = (date!(2026 - 01 - 01), date!(2026 - 12 - 31));
        for asl in &asls {
            let subject = Some(("asl", asl.as_str()));
            let r = evaluate(&app, &CLASSE_5, ys, ye, subject).await;
            assert_eq!(strata_of(&r, &CLASSE_5), expected(&cases, &CLASSE_5, ys, ye, subject), "classe-5 {asl}: {r:#}");
        }

        // stored monthly reports: every ASL and region, the same counts
        for (year, month) in [(2025, 12u8), (2026, 1), (2026, 3), (2026, 7), (2026, 10), (2026, 11)] {
            let period = format!("{year}-{month:02}");
            let (start, end) = (first_day(year, month), last_day_of_month(year, month));
            let ids = monthly_report_ids(&period);
            let (created, updated, unchanged) = generate(&app, &period).await;
            assert_eq!((created as usize, updated, unchanged), (ids.len(), 0, 0), "{period}");
            let stored = stored_reports(&app, None, &period).await;
            assert_eq!(stored.keys().cloned().collect::<BTreeSet<_>>(), ids.keys().cloned().collect::<BTreeSet<_>>(), "{period}");
            for (id, region) in &ids {
                let report = &stored[id];
                assert_stored(report, id, region);
                let (measure, kind, code) = parse_report_id(id);
                let m = measure_def(&measure);
                let subject = Some((kind.as_str(), code.as_str()));
                assert!(report["period"]["start"].as_str().unwrap_or_default().starts_with(&period), "{report:#}");
                assert!(report["period"]["end"].as_str().unwrap_or_default().starts_with(&period), "{report:#}");
                assert_eq!(strata_of(report, &m), expected(&cases, &m, start, end, subject), "stored {id}: {report:#}");
            }
        }
        let ids = yearly_report_ids("2026");
        let params = json!({"resourceType": "Parameters", "parameter": [{"name": "period", "valueString": "2026"}]});
        let r = app.post("/fhir/MeasureReport/$generate-reports", &params).await;
        let (created, _, _) = generation_counts(&r);
        assert_eq!(created as usize, ids.len());
        let stored = search(&app, &format!("MeasureReport?measure={}&period=2026", canon("Measure/classe-5-annuale"))).await;
        assert_eq!(stored.len(), ids.len());
        for report in &stored {
            let id = report["id"].as_str().unwrap();
            assert_stored(report, id, &ids[id]);
            let (_, kind, code) = parse_report_id(id);
            assert_eq!(strata_of(report, &CLASSE_5), expected(&cases, &CLASSE_5, ys, ye, Some((kind.as_str(), code.as_str()))), "stored {id}");
        }
        // the search by measure, period and reporter finds the one report
        let found = search(&app, &format!("MeasureReport?measure={}&period=2026-03&reporter:identifier={CANON}/sid/regione|030", canon("Measure/modello-16-bis"))).await;
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0]["id"], "modello-16-bis-regione-030-2026-03");
        let found = search(&app, &format!("MeasureReport?measure={}&period=2026-03", canon("Measure/modello-16"))).await;
        assert_eq!(found.len(), asls.len());
        for report in stored_reports(&app, None, "2026-03").await.values() {
            assert_no_identity(&report.to_string(), &cases);
        }
    }

    async fn monthly_generation_is_idempotent_across_two_processes(app) {
        let day = date!(2026 - 05 - 06);
        let mut cases = vec![
            dm("a", 1, "055.9", day).born(Some(date!(2019 - 01 - 01))),
            dm("b", 2, "055.9", day).female().born(Some(date!(2019 - 01 - 01))),
            dm("c", 3, "072.9", day).lives_in(BERGAMO).born(Some(date!(2010 - 01 - 01))),
            dm("d", 4, "033.9", day).lives_in(AOSTA).born(Some(date!(2025 - 11 - 01))),
            cre("e", 5, Species::Kpn, NIGUARDA, day),
        ];
        post_all(&app, &mut cases).await;
        let other = app.another_server().await;
        let period = "2026-05";
        let ids = monthly_report_ids(period);
        let uri = generate_uri(period);
        let (mine, theirs) = tokio::join!(
            generate_on(&app, None, period),
            request_to(&other, Method::POST, &uri, None),
        );
        let (c1, u1, _) = generation_counts(&mine);
        let (c2, u2, _) = generation_counts(&theirs);
        assert_eq!((c1 + c2) as usize, ids.len(), "every report created once: {} / {}", mine.text, theirs.text);
        assert_eq!((u1, u2), (0, 0), "{} / {}", mine.text, theirs.text);

        let stored = stored_reports(&app, None, period).await;
        assert_eq!(stored.keys().cloned().collect::<BTreeSet<_>>(), ids.keys().cloned().collect::<BTreeSet<_>>());
        for (id, report) in &stored {
            assert_eq!(report["meta"]["versionId"], "1", "{id}: {report:#}");
        }
        let (start, end) = (first_day(2026, 5), last_day_of_month(2026, 5));
        let milano_id = format!("modello-16-asl-{}-{period}", MILANO.asl);
        let lombardia_id = format!("modello-16-bis-regione-030-{period}");
        assert_eq!(group_count(&stored[&milano_id]), 2);
        assert_eq!(group_count(&stored[&lombardia_id]), 3);
        assert_eq!(group_count(&stored[&format!("cre-mensile-regione-030-{period}")]), 1);

        // again, from either server: nothing changes
        assert_eq!(generate(&app, period).await, (0, 0, ids.len() as i64));
        let r = request_to(&other, Method::POST, &uri, None).await;
        assert_eq!(generation_counts(&r), (0, 0, ids.len() as i64));
        let again = stored_reports(&app, None, period).await;
        for (id, report) in &again {
            assert_eq!(report["meta"]["versionId"], "1", "{id}: {report:#}");
        }

        // a correction: the next generation makes version 2 of the affected reports, same id
        withdraw(&app, &mut cases[1]).await;
        let affected: BTreeSet<String> = [milano_id.clone(), lombardia_id.clone()].into();
        let r = request_to(&other, Method::POST, &uri, None).await;
        assert_eq!(generation_counts(&r), (0, affected.len() as i64, (ids.len() - affected.len()) as i64), "{}", r.text);
        let after = stored_reports(&app, None, period).await;
        assert_eq!(after.len(), ids.len());
        for (id, report) in &after {
            let version = if affected.contains(id) { "2" } else { "1" };
            assert_eq!(report["meta"]["versionId"], version, "{id}: {report:#}");
            let (measure, kind, code) = parse_report_id(id);
            let m = measure_def(&measure);
            assert_eq!(strata_of(report, &m), expected(&cases, &m, start, end, Some((kind.as_str(), code.as_str()))), "{id}: {report:#}");
        }
        assert_eq!(group_count(&after[&milano_id]), 1);
        assert_eq!(group_count(&after[&lombardia_id]), 2);
        // the search still finds one report, the new version; the first version is history
        let found = search(&app, &format!("MeasureReport?measure={}&period={period}&reporter:identifier={CANON}/sid/asl|{}", canon("Measure/modello-16"), MILANO.asl)).await;
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0]["id"], milano_id.as_str());
        assert_eq!(found[0]["meta"]["versionId"], "2");
        let v1 = app.get(&format!("/fhir/MeasureReport/{milano_id}/_history/1")).await;
        assert_eq!(v1.status, StatusCode::OK, "{}", v1.text);
        assert_eq!(group_count(&v1.body), 2);
        // and generating once more is unchanged again
        assert_eq!(generate(&app, period).await, (0, 0, ids.len() as i64));
    }

    async fn subject_list_names_the_cases_behind_each_stratum(app) {
        let day = date!(2026 - 06 - 09);
        let mut cases = vec![
            dm("m-1", 1, "055.9", day).born(Some(date!(2020 - 01 - 01))),
            dm("m-2", 2, "055.9", day).born(Some(date!(2021 - 01 - 01))),
            dm("m-3", 3, "055.9", day).female().born(Some(date!(2021 - 01 - 01))),
            dm("tb", 4, "011.94", day).born(Some(date!(1950 - 01 - 01))),
            dm("hbv", 5, "070.30", day).female().born(Some(date!(1990 - 01 - 01))),
            dm("lyme", 6, "088.81", day).born(Some(date!(1970 - 01 - 01))),
            dm("lyme-2", 7, "088.81", day).born(Some(date!(1971 - 01 - 01))),
            dm("ritirato", 8, "055.9", day).born(Some(date!(2020 - 01 - 01))),
            cre("cre", 9, Species::Eco, NIGUARDA, day).female(),
        ];
        post_all(&app, &mut cases).await;
        withdraw(&app, &mut cases[7]).await;
        let (start, end) = (date!(2026 - 06 - 01), date!(2026 - 06 - 30));
        let (ys, ye) = (date!(2026 - 01 - 01), date!(2026 - 12 - 31));
        for (m, s, e, subject) in [
            (MODELLO_16, start, end, ("asl", MILANO.asl)),
            (MODELLO_16_BIS, start, end, ("regione", "030")),
            (CLASSE_5, ys, ye, ("asl", MILANO.asl)),
            (CRE_MENSILE, start, end, ("regione", "030")),
        ] {
            let r = evaluate_raw(&app, None, m.id, &format!("periodStart={s}&periodEnd={e}{}&reportType=subject-list", subject_param(Some(subject)))).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            let report = r.body;
            assert_report_shape(&report, &m, "subject-list", Some(subject));
            assert_no_identity(&report.to_string(), &cases);
            let want = expected_lists(&cases, &m, s, e, Some(subject));
            assert!(!want.is_empty());
            let contained = report["contained"].as_array().cloned().unwrap_or_default();
            let list = |population: &Value| -> BTreeSet<String> {
                let reference = population["subjectResults"]["reference"].as_str().unwrap_or_else(|| panic!("subjectResults in {population:#}"));
                let id = reference.strip_prefix('#').unwrap_or_else(|| panic!("a contained reference: {reference}"));
                let l = contained.iter().find(|c| c["id"] == id).unwrap_or_else(|| panic!("no contained {id}: {report:#}"));
                assert_eq!(l["resourceType"], "List", "{l:#}");
                let items: Vec<String> = l["entry"].as_array().cloned().unwrap_or_default().iter()
                    .map(|e| e["item"]["reference"].as_str().unwrap().to_string()).collect();
                let set: BTreeSet<String> = items.iter().cloned().collect();
                assert_eq!(set.len(), items.len(), "each case once: {l:#}");
                set
            };
            let mut all = BTreeSet::new();
            for st in report["group"][0]["stratifier"][0]["stratum"].as_array().unwrap() {
                let key = stratum_key(st, &m);
                let got = list(&st["population"][0]);
                assert_eq!(Some(&got), want.get(&key), "{} stratum {key:?}", m.id);
                assert_eq!(st["population"][0]["count"].as_i64(), Some(got.len() as i64));
                all.extend(got);
            }
            assert_eq!(strata_of(&report, &m).keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{report:#}");
            let group = list(&report["group"][0]["population"][0]);
            assert_eq!(group, all, "the group's list is every stratum's cases");
            // what the lists name is retrievable: the case notification (or, class V, the report)
            for reference in &group {
                assert!(reference.starts_with("Communication/"), "{reference}");
                let c = cases.iter().find(|c| &c.listed_reference() == reference).unwrap_or_else(|| panic!("{reference} is none of the seeded cases"));
                let read = app.get(&format!("/fhir/{reference}")).await;
                assert_eq!(read.status, StatusCode::OK, "{}", read.text);
                assert_eq!(read.body["subject"]["reference"], c.patient.as_str());
                assert_eq!(read.body["status"], "completed");
                if m.id == "classe-5-annuale" {
                    assert_eq!(reference, &c.segnalazione);
                } else {
                    assert!(read.body["meta"]["profile"].to_string().contains("notifica-caso"), "{}", read.text);
                }
            }
            // the summary names no case and no patient
            let summary = evaluate(&app, &m, s, e, Some(subject)).await;
            let text = summary.to_string();
            assert!(!text.contains("subjectResults") && !text.contains("\"contained\""), "{summary:#}");
            assert!(!text.contains("Communication/") && !text.contains("\"reference\""), "{summary:#}");
            assert_no_identity(&text, &cases);
            assert_eq!(strata_of(&summary, &m), strata_of(&report, &m));
        }
    }

    async fn errors_are_operation_outcomes(app) {
        let q = "periodStart=2026-01-01&periodEnd=2026-01-31";
        let r = evaluate_raw(&app, None, "no-such-measure", q).await;
        assert_outcome(&r, StatusCode::NOT_FOUND, "unknown measure");
        let r = evaluate_raw(&app, None, "modello-16", "periodEnd=2026-01-31").await;
        assert_outcome(&r, StatusCode::BAD_REQUEST, "missing periodStart");
        let r = evaluate_raw(&app, None, "modello-16", "periodStart=2026-01-01").await;
        assert_outcome(&r, StatusCode::BAD_REQUEST, "missing periodEnd");
        let r = evaluate_raw(&app, None, "modello-16", "periodStart=2026-02-01&periodEnd=2026-01-31").await;
        assert_outcome(&r, StatusCode::BAD_REQUEST, "end before start");
        let r = evaluate_raw(&app, None, "modello-16", "periodStart=2025-01-01&periodEnd=2026-01-31").await;
        assert_outcome(&r, StatusCode::BAD_REQUEST, "a period over 366 days");
        let r = evaluate_raw(&app, None, "modello-16", "periodStart=2025-01-01&periodEnd=2026-01-03").await;
        assert_outcome(&r, StatusCode::BAD_REQUEST, "368 days");
        // a leap year is 366 days: allowed
        let r = evaluate_raw(&app, None, "classe-5-annuale", "periodStart=2024-01-01&periodEnd=2024-12-31").await;
        assert_eq!(r.status, StatusCode::OK, "a leap year: {}", r.text);
        let r = evaluate_raw(&app, None, "modello-16", "periodStart=2026-13-01&periodEnd=2026-12-31").await;
        assert_outcome(&r, StatusCode::BAD_REQUEST, "not a date");
        let r = evaluate_raw(&app, None, "modello-16", &format!("{q}&reportType=individual")).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST, "bad reportType");
        let r = evaluate_raw(&app, None, "modello-16", &format!("{q}&reportType=sommario")).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST, "bad reportType");
        let r = evaluate_raw(&app, None, "modello-16", &format!("{q}&subject={CANON}/sid/asl|999999")).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST, "unknown ASL");
        let r = evaluate_raw(&app, None, "modello-16", &format!("{q}&subject={CANON}/sid/regione|999")).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST, "unknown region");
        let r = evaluate_raw(&app, None, "modello-16", &format!("{q}&subject={CANON}/sid/provincia|999")).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST, "unknown province");
        let r = evaluate_raw(&app, None, "modello-16", &format!("{q}&subject=https://example.org/sid/comune|015146")).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST, "unknown subject system");
        // the same by POST
        let params = json!({"resourceType": "Parameters", "parameter": [
            {"name": "periodStart", "valueDate": "2026-03-01"},
            {"name": "periodEnd", "valueDate": "2026-02-01"}
        ]});
        let r = app.post("/fhir/Measure/modello-16/$evaluate-measure", &params).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST, "POST: end before start");
        // and a correct request still works
        let r = evaluate_raw(&app, None, "modello-16", &format!("{q}&subject={CANON}/sid/asl|{}", MILANO.asl)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(group_count(&r.body), 0);
    }
}

on_both_databases_with! {
    with_access;

    async fn access_regions_see_their_own_reports_and_no_patient_identity(app) {
        let day = date!(2026 - 03 - 17);
        let ehr = Some("ehr-token");
        let mut cases = vec![
            dm("mi", 1, "055.9", day).born(Some(date!(2016 - 03 - 01))),
            dm("mi-2", 2, "055.9", day).born(Some(date!(2016 - 03 - 01))).female(),
            dm("bg", 3, "072.9", day).lives_in(BERGAMO).born(Some(date!(2001 - 03 - 01))),
            dm("ao", 4, "055.9", day).lives_in(AOSTA).born(Some(date!(1996 - 03 - 01))),
            dm("lyme", 5, "088.81", day).born(Some(date!(1976 - 03 - 01))),
        ];
        for c in cases.iter_mut() {
            post_case_as(&app, ehr, c).await;
        }
        let mut lab_case = cre("cre", 6, Species::Kpn, NIGUARDA, day);
        post_case_as(&app, Some("lab-token"), &mut lab_case).await;
        cases.push(lab_case);

        // only the admin generates
        for token in ["ministry-token", "lombardia-token", "lab-token", "ehr-token"] {
            let r = generate_on(&app, Some(token), "2026-03").await;
            assert_outcome(&r, StatusCode::FORBIDDEN, &format!("$generate-reports as {token}"));
        }
        let r = generate_on(&app, None, "2026-03").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
        let ids = monthly_report_ids("2026-03");
        let (created, _, _) = generation_counts(&generate_on(&app, Some("admin-token"), "2026-03").await);
        assert_eq!(created as usize, ids.len());

        // the region sees its region's reports only
        let lombardia: BTreeSet<String> = ids.iter().filter(|(_, r)| *r == "030").map(|(id, _)| id.clone()).collect();
        assert_eq!(lombardia.len(), all_asl().iter().filter(|a| a.starts_with("030")).count() + 2);
        let seen = stored_reports(&app, Some("lombardia-token"), "2026-03").await;
        assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), lombardia);
        let all_seen = search_as(&app, Some("lombardia-token"), "MeasureReport").await;
        assert_eq!(all_seen.len(), lombardia.len());
        let aosta: BTreeSet<String> = ids.iter().filter(|(_, r)| *r == "020").map(|(id, _)| id.clone()).collect();
        let seen = stored_reports(&app, Some("aosta-token"), "2026-03").await;
        assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), aosta);
        // region=… is the report's region
        let by_region = search_as(&app, Some("admin-token"), "MeasureReport?region=030&period=2026-03").await;
        assert_eq!(by_region.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect::<BTreeSet<_>>(), lombardia);
        // reads
        let own = call(&app, Method::GET, "/fhir/MeasureReport/modello-16-bis-regione-030-2026-03", Some("lombardia-token"), None).await;
        assert_eq!(own.status, StatusCode::OK, "{}", own.text);
        assert_eq!(group_count(&own.body), 3);
        let own_asl = call(&app, Method::GET, &format!("/fhir/MeasureReport/modello-16-asl-{}-2026-03", BERGAMO.asl), Some("lombardia-token"), None).await;
        assert_eq!(own_asl.status, StatusCode::OK, "{}", own_asl.text);
        for other in ["modello-16-bis-regione-020-2026-03", "modello-16-asl-020101-2026-03", "cre-mensile-regione-020-2026-03"] {
            let r = call(&app, Method::GET, &format!("/fhir/MeasureReport/{other}"), Some("lombardia-token"), None).await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{other}: {}", r.text);
        }
        // the ministry and the admin see everything
        for token in ["ministry-token", "admin-token"] {
            let seen = stored_reports(&app, Some(token), "2026-03").await;
            assert_eq!(seen.len(), ids.len(), "{token}");
        }
        // laboratories and EHRs: no reports, no evaluation; but the Measures are open
        let q = format!("periodStart=2026-03-01&periodEnd=2026-03-31&subject={CANON}/sid/regione|030");
        for token in ["lab-token", "ehr-token"] {
            let r = call(&app, Method::GET, "/fhir/MeasureReport", Some(token), None).await;
            assert_outcome(&r, StatusCode::FORBIDDEN, &format!("MeasureReport search as {token}"));
            let r = call(&app, Method::GET, "/fhir/MeasureReport/modello-16-bis-regione-030-2026-03", Some(token), None).await;
            assert_outcome(&r, StatusCode::FORBIDDEN, &format!("MeasureReport read as {token}"));
            let r = evaluate_raw(&app, Some(token), "modello-16-bis", &q).await;
            assert_outcome(&r, StatusCode::FORBIDDEN, &format!("$evaluate-measure as {token}"));
            let r = call(&app, Method::GET, "/fhir/Measure", Some(token), None).await;
            assert_eq!(r.status, StatusCode::OK, "Measure search as {token}: {}", r.text);
            let r = call(&app, Method::GET, "/fhir/Measure/modello-16", Some(token), None).await;
            assert_eq!(r.status, StatusCode::OK, "Measure read as {token}: {}", r.text);
        }
        // the region evaluates its own subjects only
        let p = "periodStart=2026-03-01&periodEnd=2026-03-31";
        for (measure, subject) in [
            ("modello-16", format!("asl|{}", MILANO.asl)),
            ("modello-16", format!("asl|{}", BERGAMO.asl)),
            ("modello-16-bis", "regione|030".to_string()),
            ("modello-16-bis", "provincia|015".to_string()),
            ("cre-mensile", "regione|030".to_string()),
        ] {
            let r = evaluate_raw(&app, Some("lombardia-token"), measure, &format!("{p}&subject={CANON}/sid/{subject}")).await;
            assert_eq!(r.status, StatusCode::OK, "{measure} {subject}: {}", r.text);
            assert_no_identity(&r.text, &cases);
        }
        let r = evaluate_raw(&app, Some("lombardia-token"), "modello-16-bis", &format!("{p}&subject={CANON}/sid/regione|030")).await;
        assert_eq!(group_count(&r.body), 3);
        for subject in [format!("asl|{}", AOSTA.asl), "regione|020".to_string(), "provincia|007".to_string()] {
            let r = evaluate_raw(&app, Some("lombardia-token"), "modello-16-bis", &format!("{p}&subject={CANON}/sid/{subject}")).await;
            assert_outcome(&r, StatusCode::FORBIDDEN, &format!("Lombardia evaluating {subject}"));
        }
        let r = evaluate_raw(&app, Some("lombardia-token"), "modello-16-bis", p).await;
        assert_outcome(&r, StatusCode::FORBIDDEN, "Lombardia evaluating the whole country");
        let r = evaluate_raw(&app, Some("ministry-token"), "modello-16-bis", p).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(group_count(&r.body), 4, "{}", r.text);

        // no report, stored or evaluated, in any form, names a patient
        for report in stored_reports(&app, Some("admin-token"), "2026-03").await.values() {
            assert_no_identity(&report.to_string(), &cases);
        }
        for (measure, period, subject) in [
            ("modello-16", p.to_string(), format!("asl|{}", MILANO.asl)),
            ("modello-16-bis", p.to_string(), "regione|030".to_string()),
            ("cre-mensile", p.to_string(), "regione|030".to_string()),
            ("classe-5-annuale", "periodStart=2026&periodEnd=2026".to_string(), "regione|030".to_string()),
        ] {
            for token in ["admin-token", "ministry-token", "lombardia-token"] {
                for report_type in ["summary", "subject-list"] {
                    let r = evaluate_raw(&app, Some(token), measure, &format!("{period}&subject={CANON}/sid/{subject}&reportType={report_type}")).await;
                    assert_eq!(r.status, StatusCode::OK, "{measure} {token} {report_type}: {}", r.text);
                    assert_no_identity(&r.text, &cases);
                }
            }
        }
    }
}

// =================================================================================================
// The measure-report topic

/// Fast delivery settings for the subscription test.
fn fast(c: &mut Config) {
    c.delivery_backoff_ms = 50;
    c.delivery_backoff_max_ms = 200;
    c.delivery_poll_ms = 50;
    c.delivery_timeout_ms = 2000;
}

/// Create a Subscription and wait for its handshake to make it active.
async fn subscribe_active(app: &TestApp, s: &Value) -> String {
    let r = app.post("/fhir/Subscription", s).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r = app.get(&format!("/fhir/Subscription/{id}")).await;
        if r.body["status"] == "active" {
            return id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Subscription/{id} never became active: {}",
            r.text
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The MeasureReport ids a hook received in event notifications, in event order.
async fn report_events(hook: &common::subscriber::Hook) -> Vec<String> {
    hook.of_type("event-notification")
        .await
        .iter()
        .flat_map(common::subscriber::events_of)
        .map(|(_, focus)| {
            focus
                .split("MeasureReport/")
                .nth(1)
                .unwrap_or_else(|| panic!("focus is not a MeasureReport: {focus}"))
                .split('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

on_both_databases_with! {
    fast;

    async fn the_measure_report_topic_notifies_the_region_of_created_and_corrected_reports(app) {
        let hook = common::subscriber::Hook::start().await;
        let s = common::subscriber::subscription(&hook.url, "measure-report", "id-only", &["MeasureReport?region=020"], None);
        subscribe_active(&app, &s).await;
        let day = date!(2026 - 05 - 11);
        let mut cases = vec![
            dm("ao", 1, "055.9", day).lives_in(AOSTA).born(Some(date!(2012 - 01 - 01))),
            dm("ao-2", 2, "055.9", day).lives_in(AOSTA).female().born(Some(date!(2012 - 01 - 01))),
            dm("mi", 3, "055.9", day).born(Some(date!(2012 - 01 - 01))),
        ];
        post_all(&app, &mut cases).await;
        let period = "2026-05";
        let ids = monthly_report_ids(period);
        let (created, _, _) = generate(&app, period).await;
        assert_eq!(created as usize, ids.len());
        // generating again changes nothing: no event
        assert_eq!(generate(&app, period).await, (0, 0, ids.len() as i64));
        // a correction: Valle d'Aosta's two Modello 16 reports change
        withdraw(&app, &mut cases[1]).await;
        let (_, updated, _) = generate(&app, period).await;
        assert_eq!(updated, 2);

        let asl = format!("modello-16-asl-{}-{period}", AOSTA.asl);
        let bis = format!("modello-16-bis-regione-020-{period}");
        let cre = format!("cre-mensile-regione-020-{period}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let got = loop {
            let got = report_events(&hook).await;
            if got.iter().filter(|i| **i == asl).count() >= 2 && got.iter().filter(|i| **i == bis).count() >= 2 {
                break got;
            }
            assert!(std::time::Instant::now() < deadline, "no events about the corrected reports: {got:?}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        // deliveries come in event order: everything due before the corrections is there too
        assert_eq!(got.len(), 5, "three created, two updated, nothing else (no other region, no unchanged report): {got:?}");
        assert_eq!(got[..3].iter().cloned().collect::<BTreeSet<_>>(), BTreeSet::from([asl.clone(), bis.clone(), cre.clone()]), "{got:?}");
        assert_eq!(got[3..].iter().cloned().collect::<BTreeSet<_>>(), BTreeSet::from([asl.clone(), bis.clone()]), "{got:?}");
    }
}

/// A comune of a region whose ASLs are not in the map (Torino, Piemonte 010).
const TORINO: Place = Place {
    comune: "001272",
    name: "Torino",
    cap: "10121",
    asl: "",
    asl_name: "",
    province: "001",
    region: "010",
};

on_both_databases! {
    async fn a_resident_of_another_region_never_counts_in_the_notifying_asl(app) {
        // a Torino resident notified by ATS Milano: Piemonte's case, not the ATS's nor Lombardia's
        let day = date!(2026 - 04 - 14);
        let mut cases = vec![dm("torino-mi", 1, "055.9", day).lives_in(TORINO).notified_by(MILANO).born(Some(date!(1990 - 01 - 01)))];
        post_all(&app, &mut cases).await;
        let (start, end) = (date!(2026 - 04 - 01), date!(2026 - 04 - 30));
        let piemonte = evaluate(&app, &MODELLO_16_BIS, start, end, Some(("regione", "010"))).await;
        assert_eq!(group_count(&piemonte), 1, "{piemonte:#}");
        let ats = evaluate(&app, &MODELLO_16, start, end, Some(("asl", MILANO.asl))).await;
        assert_eq!(group_count(&ats), 0, "{ats:#}");
        let lombardia = evaluate(&app, &MODELLO_16_BIS, start, end, Some(("regione", "030"))).await;
        assert_eq!(group_count(&lombardia), 0, "{lombardia:#}");
    }

    async fn a_corrected_patient_moves_a_cre_case_to_its_new_age_band_and_sex(app) {
        let day = date!(2026 - 03 - 10);
        let mut c = cre("kpn-corretto", 1, Species::Kpn, NIGUARDA, day).born(Some(date!(1950 - 05 - 05)));
        post_case(&app, &mut c).await;
        let (start, end) = (date!(2026 - 03 - 01), date!(2026 - 03 - 31));
        let lombardia = Some(("regione", "030"));
        let s = |band: &str, sex: &str| vec!["041.3".to_string(), band.to_string(), sex.to_string()];
        let before = evaluate(&app, &CRE_MENSILE, start, end, lombardia).await;
        assert_eq!(strata_of(&before, &CRE_MENSILE), Counts::from([(s("65+", c.sex()), 1)]), "{before:#}");
        // the laboratory corrects the patient's birth date and sex: the case is the same one,
        // counted in its new band and sex
        correct_as(&app, None, &c.patient.clone(), |p| {
            p["birthDate"] = json!("1990-05-05");
            p["gender"] = json!("female");
        })
        .await;
        let after = evaluate(&app, &CRE_MENSILE, start, end, lombardia).await;
        assert_eq!(strata_of(&after, &CRE_MENSILE), Counts::from([(s("25-64", "female"), 1)]), "{after:#}");
    }

    async fn identifier_search_on_a_narrowed_reference_parameter_is_refused(app) {
        // `patient` is the Patient subset of `subject`: an identifier has no type to tell it by
        let r = app.get("/fhir/Observation?patient:identifier=http://hl7.it/sid/codiceFiscale|X").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert_eq!(r.body["resourceType"], "OperationOutcome");
        let r = app.get("/fhir/MeasureReport?reporter:identifier=https://sentinella-fhir.github.io/ig/sid/regione").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "a system without a value: {}", r.text);
    }
}

/// Make the database look as a server without the case register left it: no register rows, no
/// backfill mark, and reports remembered without the patient's birth date and sex.
async fn forget_the_register(app: &TestApp) {
    use sqlx::{Connection, Row};
    const READ: &str =
        "SELECT key, value FROM rule_state WHERE rule_set = 'dm-1990' AND key LIKE 'report:%'";
    const WRITE: &str = "UPDATE rule_state SET value = $1 WHERE rule_set = 'dm-1990' AND key = $2";
    const CLEAR: [&str; 2] = [
        "DELETE FROM case_register",
        "DELETE FROM rule_state WHERE rule_set = 'case-register'",
    ];
    let strip = |v: String| {
        let mut r: Value = serde_json::from_str(&v).unwrap();
        let o = r.as_object_mut().unwrap();
        o.remove("birth_date");
        o.remove("sex");
        r.to_string()
    };
    match &app.db {
        common::Db::Sqlite(_) => {
            let mut c = sqlx::SqliteConnection::connect(&app.database_url())
                .await
                .unwrap();
            for q in CLEAR {
                sqlx::query(q).execute(&mut c).await.unwrap();
            }
            for row in sqlx::query(READ).fetch_all(&mut c).await.unwrap() {
                let (k, v): (String, String) = (row.get(0), row.get(1));
                sqlx::query(WRITE)
                    .bind(strip(v))
                    .bind(k)
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
        }
        common::Db::Postgres(_) => {
            let mut c = sqlx::PgConnection::connect(&app.database_url())
                .await
                .unwrap();
            for q in CLEAR {
                sqlx::query(q).execute(&mut c).await.unwrap();
            }
            for row in sqlx::query(READ).fetch_all(&mut c).await.unwrap() {
                let (k, v): (String, String) = (row.get(0), row.get(1));
                sqlx::query(WRITE)
                    .bind(strip(v))
                    .bind(k)
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
        }
    }
}

on_both_databases! {
    async fn cases_decided_before_the_register_existed_are_counted_after_an_upgrade(app) {
        let day = date!(2026 - 02 - 09);
        let born = Some(date!(2019 - 06 - 01));
        let mut cases = vec![
            dm("prima-1", 1, "055.9", day).born(born),
            dm("prima-2", 2, "055.9", day).female().born(born).lives_in(BERGAMO),
            dm("prima-v", 3, "088.81", day).born(born),
            cre("prima-cre", 4, Species::Eco, NIGUARDA, day).born(born),
        ];
        post_all(&app, &mut cases).await;
        forget_the_register(&app).await;
        let (start, end) = (date!(2026 - 02 - 01), date!(2026 - 02 - 28));
        let lombardia = Some(("regione", "030"));
        let empty = evaluate(&app, &MODELLO_16_BIS, start, end, lombardia).await;
        assert_eq!(group_count(&empty), 0, "the register was emptied: {empty:#}");
        // the upgraded server starts: it fills the register from what the rules remember
        let _upgraded = app.another_server().await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        for (m, from) in [(&MODELLO_16_BIS, start), (&CRE_MENSILE, start), (&CLASSE_5, date!(2026 - 01 - 01))] {
            let to = if m.id == CLASSE_5.id { date!(2026 - 12 - 31) } else { end };
            let want = expected(&cases, m, from, to, lombardia);
            assert!(!want.is_empty(), "{}: the test seeds cases for it", m.id);
            loop {
                let r = evaluate(&app, m, from, to, lombardia).await;
                if strata_of(&r, m) == want {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "{}: not backfilled: {r:#}", m.id);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
