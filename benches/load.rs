//! Load benchmark: POST antibiogram-shaped transaction Bundles (11 resources each) at a fixed
//! concurrency and report throughput, latency percentiles and the server's peak memory.
//!
//! By default it spawns the `sentinella` binary on a free loopback port with a fresh SQLite file;
//! `SENTINELLA_BENCH_DATABASE=postgres://...` benchmarks PostgreSQL instead (the database is
//! created if missing and, if it was created here, dropped at the end), and
//! `SENTINELLA_BENCH_URL=http://127.0.0.1:8080/fhir` targets a server that is already running.
//!
//! Other knobs: `SENTINELLA_BENCH_N` (Bundles, default 5000), `SENTINELLA_BENCH_C` (concurrency,
//! default 16), `SENTINELLA_BENCH_REPEAT_PCT` (returning patients, default 0),
//! `SENTINELLA_BENCH_CRE_PCT` (Bundles that are CRE cases, default 0) and `SENTINELLA_BENCH_SEED`
//! (the generated data; random by default and printed, so a run can be repeated with exactly the
//! same Bundles).
//!
//! CRE cases: a CRE Bundle isolates K. pneumoniae or E. coli from blood with meropenem R (and the
//! KPC gene detected); every other Bundle is susceptible to all three carbapenems, KPC not
//! detected, so it must not make a case. A returning patient of a CRE Bundle is drawn among the
//! earlier CRE patients, so the one-case-per-patient-species-year deduplication is exercised (all
//! specimens are collected in 2025, Europe/Rome). Right after each CRE Bundle's 2xx the bench polls
//! `Communication?category=…tipo-notifica|cre&subject=Patient/<id>` until the case is there and
//! reports that delay; the poll holds the Bundle's concurrency slot but is not part of its
//! latency. At the end it counts the cases of every CRE patient (and, on a database created by
//! the run, all cases) against the distinct (patient, species) pairs of the CRE Bundles.
//!
//! `SENTINELLA_BENCH_WRITE_DIR=<dir>` only generates the workload (same generator and seed
//! semantics) and writes each Bundle, compact JSON, to `<dir>/bundle-NNNNN.json` (plus
//! `<dir>/workload.txt`, the configuration line), then exits without starting or calling a
//! server: the input of the wrk harness in `benches/wrk/`.
//!
//! Only loopback addresses are accepted: this is a local load test.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::{IpAddr, TcpListener};
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use serde_json::{Number, Value, json};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::datetime;

const RESOURCES_PER_BUNDLE: usize = 11;
const CF_SYSTEM: &str = "http://hl7.it/sid/codiceFiscale";
const SNOMED: &str = "http://snomed.info/sct";
const LOINC: &str = "http://loinc.org";
const UCUM: &str = "http://unitsofmeasure.org";
const INTERPRETATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation";
const OBS_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
const V2_0074: &str = "http://terminology.hl7.org/CodeSystem/v2-0074";
const TIPO_NOTIFICA_CRE: &str = "https://sentinella-fhir.github.io/ig/CodeSystem/tipo-notifica|cre";
const ICD9: &str = "http://hl7.org/fhir/sid/icd-9-cm";
/// How long a CRE Bundle's case may take to become visible after its 2xx.
const CASE_TIMEOUT: Duration = Duration::from_secs(10);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Configuration

#[derive(Debug)]
enum Target {
    /// Spawn the server binary on this database URL; `fresh` when it is a generated SQLite file.
    Spawn { database: String, fresh: bool },
    /// A server that is already running (its database is not ours to know).
    External { base: String },
    /// No server: write the Bundles to this directory (`SENTINELLA_BENCH_WRITE_DIR`).
    WriteDir(PathBuf),
}

#[derive(Debug)]
struct Config {
    target: Target,
    n: usize,
    c: usize,
    repeat_pct: u32,
    cre_pct: u32,
    seed: u64,
}

fn env_parse<T: FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("{name}={v}: {e}")),
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(e) => bail!("{name}: {e}"),
    }
}

fn env_opt(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Config {
    fn from_env() -> Result<Self> {
        let n: usize = env_parse("SENTINELLA_BENCH_N", 5000)?;
        let c: usize = env_parse("SENTINELLA_BENCH_C", 16)?;
        let repeat_pct: u32 = env_parse("SENTINELLA_BENCH_REPEAT_PCT", 0)?;
        let cre_pct: u32 = env_parse("SENTINELLA_BENCH_CRE_PCT", 0)?;
        ensure!(n > 0, "SENTINELLA_BENCH_N must be at least 1");
        ensure!(
            (1..=1024).contains(&c),
            "SENTINELLA_BENCH_C must be between 1 and 1024"
        );
        ensure!(
            repeat_pct <= 100,
            "SENTINELLA_BENCH_REPEAT_PCT must be between 0 and 100"
        );
        ensure!(
            cre_pct <= 100,
            "SENTINELLA_BENCH_CRE_PCT must be between 0 and 100"
        );
        let seed = match env_opt("SENTINELLA_BENCH_SEED") {
            Some(s) => s
                .trim()
                .parse()
                .with_context(|| format!("SENTINELLA_BENCH_SEED={s}"))?,
            None => uuid::Uuid::new_v4().as_u64_pair().0,
        };
        let target = match (
            env_opt("SENTINELLA_BENCH_URL"),
            env_opt("SENTINELLA_BENCH_DATABASE"),
            env_opt("SENTINELLA_BENCH_WRITE_DIR"),
        ) {
            (None, None, Some(dir)) => Target::WriteDir(PathBuf::from(dir)),
            (_, _, Some(_)) => {
                bail!(
                    "SENTINELLA_BENCH_WRITE_DIR writes the Bundles without a server: unset SENTINELLA_BENCH_URL and SENTINELLA_BENCH_DATABASE"
                )
            }
            (Some(_), Some(_), None) => {
                bail!(
                    "set SENTINELLA_BENCH_URL or SENTINELLA_BENCH_DATABASE, not both (a running server has its own database)"
                )
            }
            (Some(url), None, None) => {
                let base = url.trim().trim_end_matches('/').to_string();
                let parsed = reqwest::Url::parse(&base)
                    .with_context(|| format!("SENTINELLA_BENCH_URL={url}"))?;
                ensure!(
                    parsed.scheme() == "http",
                    "SENTINELLA_BENCH_URL must be plain http on loopback, got {url}"
                );
                ensure!(
                    parsed.host_str().is_some_and(is_loopback_host),
                    "SENTINELLA_BENCH_URL must point at a loopback address, got {url}"
                );
                Target::External { base }
            }
            (None, Some(database), None) if is_postgres(&database) => {
                pg_options(&database)?; // fail before generating the workload
                Target::Spawn {
                    database,
                    fresh: false,
                }
            }
            (None, Some(database), None) => Target::Spawn {
                database,
                fresh: false,
            },
            (None, None, None) => Target::Spawn {
                database: format!("sqlite:///tmp/sentinella-bench-{}.db", uuid::Uuid::new_v4()),
                fresh: true,
            },
        };
        Ok(Config {
            target,
            n,
            c,
            repeat_pct,
            cre_pct,
            seed,
        })
    }

    fn db_kind(&self) -> &'static str {
        match &self.target {
            Target::Spawn { database, .. } if database.starts_with("sqlite:") => "sqlite",
            Target::Spawn { database, .. } if is_postgres(database) => "postgres",
            Target::Spawn { .. } => "unknown",
            Target::External { .. } => "external server",
            Target::WriteDir(_) => "none (Bundles written to files)",
        }
    }

    /// The environment that reproduces this run (same Bundles, same target).
    fn reproduce_line(&self) -> String {
        let mut s = format!(
            "SENTINELLA_BENCH_N={} SENTINELLA_BENCH_C={} SENTINELLA_BENCH_REPEAT_PCT={} SENTINELLA_BENCH_CRE_PCT={} SENTINELLA_BENCH_SEED={}",
            self.n, self.c, self.repeat_pct, self.cre_pct, self.seed
        );
        match &self.target {
            Target::Spawn { fresh: true, .. } => {}
            Target::Spawn { database, .. } => {
                let _ = write!(s, " SENTINELLA_BENCH_DATABASE={}", redact(database));
            }
            Target::External { base } => {
                let _ = write!(s, " SENTINELLA_BENCH_URL={base}");
            }
            Target::WriteDir(dir) => {
                let _ = write!(s, " SENTINELLA_BENCH_WRITE_DIR={}", dir.display());
            }
        }
        s + " cargo bench --bench load"
    }
}

/// The URL with any password masked, for printing.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let Some(at) = url[scheme_end..].find('@').map(|i| i + scheme_end) else {
        return url.to_string();
    };
    match url[scheme_end..at].find(':') {
        Some(colon) => format!("{}:***{}", &url[..scheme_end + colon], &url[at..]),
        None => url.to_string(),
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres:") || url.starts_with("postgresql:")
}

fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

// ---------------------------------------------------------------------------------------------
// Deterministic data generation (splitmix64: tiny, seedable, good enough for test data)

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn urn(&mut self) -> String {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        bytes[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        format!(
            "urn:uuid:{}",
            uuid::Builder::from_random_bytes(bytes).into_uuid()
        )
    }
}

const SURNAMES: &[&str] = &[
    "Rossi", "Russo", "Ferrari", "Esposito", "Bianchi", "Romano", "Colombo", "Ricci", "Marino",
    "Greco", "Bruno", "Gallo", "Conti", "De Luca", "Mancini", "Costa", "Giordano", "Rizzo",
    "Lombardi", "Moretti", "Barbieri", "Fontana",
];
const MALE_NAMES: &[&str] = &[
    "Marco",
    "Giuseppe",
    "Luca",
    "Giovanni",
    "Antonio",
    "Francesco",
    "Alessandro",
    "Andrea",
    "Matteo",
    "Stefano",
];
const FEMALE_NAMES: &[&str] = &[
    "Maria",
    "Anna",
    "Giulia",
    "Francesca",
    "Chiara",
    "Sara",
    "Laura",
    "Elena",
    "Paola",
    "Valentina",
];
/// City and its cadastral (Belfiore) code, as used in the codice fiscale.
const CITIES: &[(&str, &str)] = &[
    ("Roma", "H501"),
    ("Milano", "F205"),
    ("Napoli", "F839"),
    ("Torino", "L219"),
    ("Palermo", "G273"),
    ("Genova", "D969"),
    ("Bologna", "A944"),
    ("Firenze", "D612"),
    ("Bari", "A662"),
    ("Catania", "C351"),
    ("Venezia", "L736"),
    ("Verona", "L781"),
];

#[derive(Clone)]
struct Patient {
    cf: String,
    family: &'static str,
    given: &'static str,
    female: bool,
    birth_date: String,
    city: &'static str,
}

fn letters(s: &str) -> (Vec<char>, Vec<char>) {
    let up: Vec<char> = s
        .chars()
        .filter(char::is_ascii_alphabetic)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    up.into_iter().partition(|c| !"AEIOU".contains(*c))
}

/// Three-letter codice fiscale code of a surname or (`is_name`) a first name.
fn cf_part(s: &str, is_name: bool) -> String {
    let (cons, vowels) = letters(s);
    if is_name && cons.len() >= 4 {
        return [cons[0], cons[2], cons[3]].iter().collect();
    }
    cons.iter()
        .chain(vowels.iter())
        .chain(['X'; 3].iter())
        .take(3)
        .collect()
}

/// The control character of a codice fiscale (its last character).
fn cf_check(first15: &str) -> char {
    // value of a character in an odd (1-based) position, digits 0-9 and letters A-Z alike
    const ODD: [u32; 26] = [
        1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25, 24,
        23,
    ];
    let sum: u32 = first15
        .chars()
        .enumerate()
        .map(|(i, ch)| {
            let v = ch.to_digit(10).unwrap_or_else(|| ch as u32 - 'A' as u32);
            if i % 2 == 0 { ODD[v as usize] } else { v }
        })
        .sum();
    char::from(b'A' + (sum % 26) as u8)
}

fn new_patient(rng: &mut Rng) -> Patient {
    const MONTHS: &[u8; 12] = b"ABCDEHLMPRST";
    let female = rng.below(2) == 1;
    let family = *rng.pick(SURNAMES);
    let given = *rng.pick(if female { FEMALE_NAMES } else { MALE_NAMES });
    let year = 1930 + rng.below(76);
    let month = 1 + rng.below(12);
    let day = 1 + rng.below(28);
    let (_, birth_code) = *rng.pick(CITIES);
    let (city, _) = *rng.pick(CITIES);
    let cf15 = format!(
        "{}{}{:02}{}{:02}{}",
        cf_part(family, false),
        cf_part(given, true),
        year % 100,
        MONTHS[month - 1] as char,
        day + if female { 40 } else { 0 },
        birth_code
    );
    let cf = format!("{cf15}{}", cf_check(&cf15));
    Patient {
        cf,
        family,
        given,
        female,
        birth_date: format!("{year:04}-{month:02}-{day:02}"),
        city,
    }
}

/// A susceptibility test: LOINC code and name, and (S ≤ s_max, R > r_above) MIC breakpoints in mg/L
/// (roughly EUCAST for Enterobacterales; only there to make S/I/R consistent with the MIC).
struct Drug {
    loinc: &'static str,
    display: &'static str,
    s_max: f64,
    r_above: f64,
}

const DRUGS: [Drug; 6] = [
    Drug {
        loinc: "18943-1",
        display: "Meropenem [Susceptibility] by Minimum inhibitory concentration (MIC)",
        s_max: 2.0,
        r_above: 8.0,
    },
    Drug {
        loinc: "18932-4",
        display: "Imipenem [Susceptibility] by Minimum inhibitory concentration (MIC)",
        s_max: 2.0,
        r_above: 4.0,
    },
    Drug {
        loinc: "35802-8",
        display: "Ertapenem [Susceptibility] by Minimum inhibitory concentration (MIC)",
        s_max: 0.5,
        r_above: 0.5,
    },
    Drug {
        loinc: "18928-2",
        display: "Gentamicin [Susceptibility] by Minimum inhibitory concentration (MIC)",
        s_max: 2.0,
        r_above: 2.0,
    },
    Drug {
        loinc: "18906-8",
        display: "Ciprofloxacin [Susceptibility] by Minimum inhibitory concentration (MIC)",
        s_max: 0.25,
        r_above: 0.5,
    },
    Drug {
        loinc: "18864-9",
        display: "Ampicillin [Susceptibility] by Minimum inhibitory concentration (MIC)",
        s_max: 8.0,
        r_above: 8.0,
    },
];
/// The LOINC codes of the carbapenem susceptibilities among DRUGS.
const CARBAPENEMS: [&str; 3] = ["18943-1", "18932-4", "35802-8"];
/// The meropenem MICs of a CRE Bundle: above its R breakpoint (8 mg/L).
const CRE_MEROPENEM_MICS: [&str; 2] = ["16.0", "32.0"];

/// An isolated species: SNOMED code and name, and the ICD-9-CM reason code of its case.
struct Species {
    snomed: &'static str,
    display: &'static str,
    icd9: &'static str,
}

const SPECIES: [Species; 2] = [
    Species {
        snomed: "56415008",
        display: "Klebsiella pneumoniae",
        icd9: "041.3",
    },
    Species {
        snomed: "112283007",
        display: "Escherichia coli",
        icd9: "041.4",
    },
];

/// MICs as written by the analyser: the decimals keep their trailing zeros on the wire.
const MICS: [&str; 9] = [
    "0.125", "0.25", "0.50", "1.0", "2.0", "4.0", "8.0", "16.0", "32.0",
];

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"coding": [{"system": system, "code": code, "display": display}]})
}

fn reference(urn: &str) -> Value {
    json!({"reference": urn})
}

fn entry(full_url: &str, resource: Value) -> Value {
    let rt = resource["resourceType"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    json!({"fullUrl": full_url, "resource": resource, "request": {"method": "POST", "url": rt}})
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .expect("UTC timestamps in 2025 format as RFC 3339")
}

/// One transaction Bundle: Patient, Specimen, DiagnosticReport, isolate, 6 MICs, KPC gene. A
/// `cre` Bundle is a CRE case (meropenem R, KPC detected); any other is susceptible to the three
/// carbapenems with KPC not detected, so it is not a case.
fn antibiogram(rng: &mut Rng, p: &Patient, species: &Species, cre: bool) -> Value {
    let [pat, spec, report, isolate, kpc] = std::array::from_fn(|_| rng.urn());
    let susc: Vec<String> = (0..DRUGS.len()).map(|_| rng.urn()).collect();
    // 2025-01-01T00:00Z up to 2025-12-31T00:00Z: inside 2025 in UTC and in Europe/Rome alike, so
    // the cases of a returning patient and species fall in the same year and are deduplicated
    let collected =
        datetime!(2025-01-01 0:00 UTC) + time::Duration::minutes(rng.below(364 * 24 * 60) as i64);
    let issued = collected + time::Duration::minutes(24 * 60 + rng.below(48 * 60) as i64);
    let (collected, issued) = (rfc3339(collected), rfc3339(issued));
    let lab = json!([coding(OBS_CATEGORY, "laboratory", "Laboratory")]);
    let observation = |code: Value| {
        json!({
            "resourceType": "Observation",
            "status": "final",
            "category": lab,
            "code": code,
            "subject": reference(&pat),
            "effectiveDateTime": collected,
            "specimen": reference(&spec),
        })
    };

    let mut entries = vec![
        entry(
            &pat,
            json!({
                "resourceType": "Patient",
                "identifier": [{"system": CF_SYSTEM, "value": p.cf}],
                "name": [{"family": p.family, "given": [p.given]}],
                "gender": if p.female { "female" } else { "male" },
                "birthDate": p.birth_date,
                "address": [{"city": p.city, "country": "IT"}],
            }),
        ),
        entry(
            &spec,
            json!({
                "resourceType": "Specimen",
                "type": coding(SNOMED, "119297000", "Blood specimen"),
                "subject": reference(&pat),
                "collection": {"collectedDateTime": collected},
            }),
        ),
    ];
    entries[0]["request"]["ifNoneExist"] = json!(format!("identifier={CF_SYSTEM}|{}", p.cf));

    let mut isolate_obs = observation(coding(
        LOINC,
        "600-7",
        "Bacteria identified in Blood by Culture",
    ));
    isolate_obs["valueCodeableConcept"] = coding(SNOMED, species.snomed, species.display);
    isolate_obs["hasMember"] = susc.iter().map(|u| reference(u)).collect();

    let mut carbapenem_r = false;
    let mut susc_entries = Vec::with_capacity(DRUGS.len());
    for (drug, urn) in DRUGS.iter().zip(&susc) {
        let carbapenem = CARBAPENEMS.contains(&drug.loinc);
        let mic = if cre && drug.loinc == "18943-1" {
            *rng.pick(&CRE_MEROPENEM_MICS)
        } else if carbapenem && !cre {
            let susceptible: Vec<&str> = MICS
                .iter()
                .copied()
                .filter(|m| m.parse::<f64>().is_ok_and(|v| v <= drug.s_max))
                .collect();
            *rng.pick(&susceptible)
        } else {
            *rng.pick(&MICS)
        };
        let v: f64 = mic.parse().expect("MICS are decimals");
        let (code, display) = if v <= drug.s_max {
            ("S", "Susceptible")
        } else if v > drug.r_above {
            ("R", "Resistant")
        } else {
            ("I", "Intermediate")
        };
        carbapenem_r |= code == "R" && carbapenem;
        let mut o = observation(coding(LOINC, drug.loinc, drug.display));
        o["valueQuantity"] = json!({
            "value": Number::from_str(mic).expect("MICS are JSON numbers"),
            "unit": "mg/L",
            "system": UCUM,
            "code": "mg/L",
        });
        o["interpretation"] = json!([coding(INTERPRETATION, code, display)]);
        o["derivedFrom"] = json!([reference(&isolate)]);
        susc_entries.push(entry(urn, o));
    }

    let mut kpc_obs = observation(
        json!({"coding": [{"system": LOINC, "code": "49617-4"}], "text": "KPC carbapenemase gene"}),
    );
    debug_assert_eq!(carbapenem_r, cre);
    kpc_obs["valueCodeableConcept"] = if cre {
        coding(SNOMED, "260373001", "Detected")
    } else {
        coding(SNOMED, "260415000", "Not detected")
    };
    kpc_obs["derivedFrom"] = json!([reference(&isolate)]);

    let results: Vec<Value> = std::iter::once(&isolate)
        .chain(&susc)
        .chain([&kpc])
        .map(|u| reference(u))
        .collect();
    entries.push(entry(
        &report,
        json!({
            "resourceType": "DiagnosticReport",
            "status": "final",
            "category": [coding(V2_0074, "MB", "Microbiology")],
            "code": coding(LOINC, "600-7", "Bacteria identified in Blood by Culture"),
            "subject": reference(&pat),
            "effectiveDateTime": collected,
            "issued": issued,
            "specimen": [reference(&spec)],
            "result": results,
        }),
    ));
    entries.push(entry(&isolate, isolate_obs));
    entries.extend(susc_entries);
    entries.push(entry(&kpc, kpc_obs));
    debug_assert_eq!(entries.len(), RESOURCES_PER_BUNDLE);
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

/// What a CRE Bundle must produce: a case for its patient and species.
#[derive(Clone, Copy)]
struct CreBundle {
    species: usize,
    /// The patient's CRE Bundles name both species: its search finds two cases in the end.
    patient_has_both: bool,
}

struct Workload {
    bodies: Vec<Vec<u8>>,
    returning: usize,
    distinct_patients: usize,
    /// Per Bundle: `Some` for a CRE Bundle.
    cre: Vec<Option<CreBundle>>,
    /// The CRE Bundles whose patient was seen before in a CRE Bundle.
    cre_returning: usize,
    /// Distinct (codice fiscale, species) among the CRE Bundles: the cases the server must make.
    cre_expected: usize,
}

fn generate(cfg: &Config) -> Result<Workload> {
    let mut rng = Rng(cfg.seed);
    let mut patients: Vec<Patient> = Vec::with_capacity(cfg.n);
    let mut seen = HashSet::with_capacity(cfg.n);
    let mut bodies = Vec::with_capacity(cfg.n);
    let mut returning = 0;
    let pct = cfg.repeat_pct as usize;
    // exactly round(N·cre%/100) CRE Bundles at random positions (independent of the returning
    // patients, which are spread evenly)
    let cre_count = (cfg.n * cfg.cre_pct as usize + 50) / 100;
    let mut order: Vec<usize> = (0..cfg.n).collect();
    for k in 0..cre_count {
        let j = k + rng.below(cfg.n - k);
        order.swap(k, j);
    }
    let cre_positions: HashSet<usize> = order[..cre_count].iter().copied().collect();
    drop(order);
    // (Bundle, species) of each CRE Bundle; the Bundle's patient is patients[Bundle]
    let mut cre_drawn: Vec<(usize, usize)> = Vec::with_capacity(cre_count);
    let mut cre_returning = 0;
    for i in 0..cfg.n {
        // exactly floor((N-1)·pct/100) returning patients, spread evenly (the first is always new)
        let repeat = i > 0 && (i * pct) / 100 != ((i - 1) * pct) / 100;
        let cre = cre_positions.contains(&i);
        let patient = if repeat {
            returning += 1;
            // a returning CRE patient is an earlier CRE patient: the case deduplication has work
            let earlier = if cre && !cre_drawn.is_empty() {
                cre_returning += 1;
                cre_drawn[rng.below(cre_drawn.len())].0
            } else {
                rng.below(i)
            };
            patients[earlier].clone()
        } else {
            // a name/birth collision would turn a new patient into a returning one: draw again
            let fresh = (0..1000)
                .map(|_| new_patient(&mut rng))
                .find(|p| !seen.contains(&p.cf));
            let p = fresh.context("could not draw a new codice fiscale in 1000 attempts")?;
            seen.insert(p.cf.clone());
            p
        };
        let species = rng.below(SPECIES.len());
        if cre {
            cre_drawn.push((i, species));
        }
        bodies.push(serde_json::to_vec(&antibiogram(
            &mut rng,
            &patient,
            &SPECIES[species],
            cre,
        ))?);
        patients.push(patient);
    }
    // the species of each CRE patient (by codice fiscale)
    let mut species_of: std::collections::HashMap<&str, HashSet<usize>> = Default::default();
    for &(i, species) in &cre_drawn {
        species_of
            .entry(&patients[i].cf)
            .or_default()
            .insert(species);
    }
    let cre_expected = species_of.values().map(HashSet::len).sum();
    let mut cre = vec![None; cfg.n];
    for &(i, species) in &cre_drawn {
        cre[i] = Some(CreBundle {
            species,
            patient_has_both: species_of[patients[i].cf.as_str()].len() > 1,
        });
    }
    Ok(Workload {
        bodies,
        returning,
        distinct_patients: seen.len(),
        cre,
        cre_returning,
        cre_expected,
    })
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL database for the run

struct PgDatabase {
    admin: PgConnectOptions,
    name: String,
    created: bool,
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Parse a PostgreSQL URL that names a database on this machine.
fn pg_options(url: &str) -> Result<(PgConnectOptions, String)> {
    let opts = PgConnectOptions::from_str(url)
        .with_context(|| format!("bad PostgreSQL URL {}", redact(url)))?;
    let host = opts.get_host();
    let local = opts.get_socket().is_some() || host.starts_with('/') || is_loopback_host(host);
    ensure!(
        local,
        "PostgreSQL must be on loopback or a local socket, got host {host}"
    );
    let name = opts
        .get_database()
        .context("the PostgreSQL URL must name a database")?;
    let name = name.to_string();
    Ok((opts, name))
}

impl PgDatabase {
    /// Create the database named in `url` if it does not exist (connecting to `postgres` on the same server).
    async fn prepare(url: &str) -> Result<Self> {
        let (opts, name) = pg_options(url)?;
        let admin = opts.clone().database("postgres");
        let mut conn = PgConnection::connect_with(&admin)
            .await
            .context("connecting to the postgres database")?;
        let exists = sqlx::query_scalar::<_, i32>("SELECT 1 FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_optional(&mut conn)
            .await?
            .is_some();
        if !exists {
            // an identifier cannot be a bind parameter: quote_ident makes the name safe
            sqlx::query(AssertSqlSafe(format!(
                "CREATE DATABASE {}",
                quote_ident(&name)
            )))
            .execute(&mut conn)
            .await?;
        }
        conn.close().await?;
        Ok(PgDatabase {
            admin,
            name,
            created: !exists,
        })
    }

    /// Drop the database if this run created it (the server must have stopped).
    async fn finish(self) -> Result<()> {
        if !self.created {
            println!(
                "note: database {} existed before the run and was kept",
                self.name
            );
            return Ok(());
        }
        let mut conn = PgConnection::connect_with(&self.admin).await?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {}",
            quote_ident(&self.name)
        )))
        .execute(&mut conn)
        .await?;
        conn.close().await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The spawned server

struct Server {
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
}

impl Server {
    fn spawn(database: &str, tag: &str) -> Result<(Self, String)> {
        // the port is free now; the short race with other processes is acceptable for a bench
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = PathBuf::from(format!("/tmp/sentinella-bench-{tag}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sentinella"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--database",
                database,
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("spawning the sentinella binary")?;
        let pid = child.id().context("the server exited immediately")?;
        Ok((
            Server { child, pid, log },
            format!("http://127.0.0.1:{port}/fhir"),
        ))
    }

    fn exited(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("the server exited ({status}); see {}", self.log.display()),
            None => Ok(()),
        }
    }

    /// A memory figure from /proc/<pid>/status (VmRSS: now, VmHWM: peak), in KiB.
    fn memory_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = status
            .lines()
            .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// SIGTERM (graceful shutdown), then SIGKILL if it has not exited in time.
    async fn stop(mut self) -> Result<std::process::ExitStatus> {
        if self.child.try_wait()?.is_none() {
            let sent = std::process::Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status();
            if !sent.is_ok_and(|s| s.success()) {
                self.child.start_kill()?;
            }
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                eprintln!("the server did not stop within {STOP_TIMEOUT:?} of SIGTERM: killing it");
                self.child.kill().await?;
                Ok(self.child.wait().await?)
            }
        }
    }
}

/// Poll `GET {base}/metadata` until it answers 200 (bounded by READY_TIMEOUT).
async fn wait_ready(
    client: &reqwest::Client,
    base: &str,
    mut server: Option<&mut Server>,
) -> Result<Duration> {
    let start = Instant::now();
    let mut last = String::from("no attempt");
    while start.elapsed() < READY_TIMEOUT {
        if let Some(s) = server.as_deref_mut() {
            s.exited()?;
        }
        match client
            .get(format!("{base}/metadata"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) if r.status() == reqwest::StatusCode::OK => return Ok(start.elapsed()),
            // up, but not a FHIR base that this bench can use: waiting will not help
            Ok(r) => bail!(
                "GET {base}/metadata answered HTTP {}: is this the FHIR base URL?",
                r.status()
            ),
            Err(e) => last = error_chain(&e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{base}/metadata did not answer 200 within {READY_TIMEOUT:?} (last: {last})")
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let _ = write!(s, ": {inner}");
        source = inner.source();
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The timed phase

struct Outcome {
    index: usize,
    latency: Duration,
    /// Ok(whether the Patient entry was created, not matched) or the failure, with the body.
    result: std::result::Result<bool, String>,
    /// The Patient's logical id (from the transaction-response).
    patient: Option<String>,
    /// CRE Bundles: the time from the 2xx until the case was found and the searches it took, or
    /// why it was not found.
    case_visible: Option<std::result::Result<(Duration, u32), String>>,
}

/// The logical id in a `Patient/<id>/_history/<v>` location or a `…/Patient/<id>` full URL.
fn patient_id(url: &str) -> Option<String> {
    let mut parts = url.split('/');
    while let Some(p) = parts.next() {
        if p == "Patient" {
            return parts.next().filter(|id| !id.is_empty()).map(str::to_string);
        }
    }
    None
}

/// Check a transaction-response: 11 entries, the Patient 201 or 200 (matched), the rest 201.
/// Returns whether the Patient was created, and its id.
fn check_response(body: &[u8]) -> std::result::Result<(bool, String), String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("response is not JSON ({e})"))?;
    if v["resourceType"] != "Bundle" || v["type"] != "transaction-response" {
        return Err("response is not a transaction-response Bundle".into());
    }
    let entries = v["entry"].as_array().map(Vec::as_slice).unwrap_or_default();
    if entries.len() != RESOURCES_PER_BUNDLE {
        return Err(format!(
            "response has {} entries, expected {RESOURCES_PER_BUNDLE}",
            entries.len()
        ));
    }
    let status = |i: usize| {
        entries[i]["response"]["status"]
            .as_str()
            .unwrap_or("(none)")
    };
    if let Some(i) = (1..entries.len()).find(|&i| !status(i).starts_with("201")) {
        return Err(format!("entry {i} has status {}, expected 201", status(i)));
    }
    let created = match status(0) {
        s if s.starts_with("201") => true,
        s if s.starts_with("200") => false,
        s => return Err(format!("Patient entry has status {s}")),
    };
    // a matched (200) Patient need not have a location: then its fullUrl names it
    let id = [&entries[0]["response"]["location"], &entries[0]["fullUrl"]]
        .into_iter()
        .find_map(|u| patient_id(u.as_str()?))
        .ok_or("the Patient entry names no Patient (response.location, fullUrl)")?;
    Ok((created, id))
}

/// The CRE cases of a patient: (total, the Communications found).
async fn patient_cases(
    client: &reqwest::Client,
    base: &str,
    patient: &str,
    timeout: Duration,
) -> std::result::Result<(i64, Vec<Value>), String> {
    let resp = client
        .get(format!("{base}/Communication"))
        .query(&[
            ("category", TIPO_NOTIFICA_CRE),
            ("subject", &format!("Patient/{patient}")),
            ("_count", "100"),
        ])
        .header(reqwest::header::ACCEPT, "application/fhir+json")
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("case search failed: {}", error_chain(&e)))?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("case search: HTTP {status}, {}", error_chain(&e)))?;
    if status != reqwest::StatusCode::OK {
        return Err(format!(
            "case search: HTTP {status}: {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("case search: response is not JSON ({e})"))?;
    let total = v["total"]
        .as_i64()
        .ok_or("case search: the searchset has no total")?;
    let found = v["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["resource"].clone())
        .collect();
    Ok((total, found))
}

/// Whether a case Communication is for this species (its ICD-9-CM reason code, per the contract).
fn is_case_of(communication: &Value, species: &Species) -> bool {
    communication["reasonCode"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|rc| rc["coding"].as_array().into_iter().flatten())
        .any(|c| c["system"] == ICD9 && c["code"] == species.icd9)
}

/// Poll the patient's CRE cases until this Bundle's case is there: total ≥ 1 and, when the
/// patient's CRE Bundles name both species, a case with this species' reason code.
async fn wait_for_case(
    client: &reqwest::Client,
    base: &str,
    patient: &str,
    cre: CreBundle,
) -> std::result::Result<(Duration, u32), String> {
    let start = Instant::now();
    let species = &SPECIES[cre.species];
    let mut pause = Duration::from_millis(2);
    let mut searches = 0;
    loop {
        let left = CASE_TIMEOUT.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(format!(
                "no {} case for Patient/{patient} within {CASE_TIMEOUT:?} of the 2xx",
                species.display
            ));
        }
        let (total, found) = patient_cases(client, base, patient, left).await?;
        searches += 1;
        if total >= 1 && (!cre.patient_has_both || found.iter().any(|c| is_case_of(c, species))) {
            return Ok((start.elapsed(), searches));
        }
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

async fn post_bundle(
    client: &reqwest::Client,
    base: &str,
    index: usize,
    body: Vec<u8>,
    cre: Option<CreBundle>,
) -> Outcome {
    let start = Instant::now();
    let sent = client
        .post(base)
        .header(reqwest::header::CONTENT_TYPE, "application/fhir+json")
        .header(reqwest::header::ACCEPT, "application/fhir+json")
        .header("Prefer", "return=minimal")
        .body(body)
        .send()
        .await;
    let result = match sent {
        Err(e) => Err(format!("request failed: {}", error_chain(&e))),
        Ok(resp) => {
            let status = resp.status();
            match resp.bytes().await {
                Err(e) => Err(format!(
                    "HTTP {status}, reading the body failed: {}",
                    error_chain(&e)
                )),
                Ok(bytes) if status != reqwest::StatusCode::OK => Err(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes)
                )),
                Ok(bytes) => check_response(&bytes).map_err(|e| {
                    format!("HTTP {status}, {e}: {}", String::from_utf8_lossy(&bytes))
                }),
            }
        }
    };
    let latency = start.elapsed();
    let (result, patient) = match result {
        Ok((created, id)) => (Ok(created), Some(id)),
        Err(e) => (Err(e), None),
    };
    let case_visible = match (cre, &patient) {
        (Some(cre), Some(id)) => Some(wait_for_case(client, base, id, cre).await),
        _ => None,
    };
    Outcome {
        index,
        latency,
        result,
        patient,
        case_visible,
    }
}

/// The CRE cases on the server after the timed phase.
struct Census {
    /// The CRE patients (of the Bundles that succeeded) and the total of their cases.
    patients: usize,
    found: i64,
    /// Distinct (patient, species) among the CRE Bundles that succeeded.
    expected: usize,
    /// The first patient whose cases differ from the expected ones.
    first_mismatch: Option<String>,
    /// Every CRE case on the server (`_summary=count`).
    all: std::result::Result<i64, String>,
}

/// Count the cases of every CRE patient, and all CRE cases.
async fn count_cases(
    client: &reqwest::Client,
    base: &str,
    outcomes: &[Outcome],
    cre: &[Option<CreBundle>],
    c: usize,
) -> Census {
    let mut want: std::collections::BTreeMap<&str, std::collections::BTreeSet<usize>> =
        Default::default();
    for o in outcomes {
        if let (Some(b), Some(p), Ok(_)) = (cre[o.index], &o.patient, &o.result) {
            want.entry(p.as_str()).or_default().insert(b.species);
        }
    }
    let expected = want.values().map(|s| s.len()).sum();
    let results: Vec<_> = futures::stream::iter(want.iter())
        .map(|(p, species)| async move {
            (
                *p,
                species,
                patient_cases(client, base, p, REQUEST_TIMEOUT).await,
            )
        })
        .buffer_unordered(c)
        .collect()
        .await;
    let mut found = 0;
    let mut first_mismatch = None;
    for (p, species, result) in results {
        let problem = match result {
            Err(e) => Some(format!("Patient/{p}: {e}")),
            Ok((total, cases)) => {
                found += total;
                let of = |sp: &Species| cases.iter().filter(|c| is_case_of(c, sp)).count();
                let right = total == species.len() as i64
                    && species.iter().all(|&sp| of(&SPECIES[sp]) == 1);
                (!right).then(|| {
                    let names: Vec<&str> = species.iter().map(|&sp| SPECIES[sp].display).collect();
                    let codes: Vec<&str> = SPECIES
                        .iter()
                        .flat_map(|sp| std::iter::repeat_n(sp.icd9, of(sp)))
                        .collect();
                    format!(
                        "Patient/{p}: {total} case(s) (reason codes {codes:?}), expected one each for {names:?}"
                    )
                })
            }
        };
        if let Some(problem) = problem {
            first_mismatch.get_or_insert(problem);
        }
    }
    let all = async {
        let resp = client
            .get(format!("{base}/Communication"))
            .query(&[("category", TIPO_NOTIFICA_CRE), ("_summary", "count")])
            .header(reqwest::header::ACCEPT, "application/fhir+json")
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        let status = resp.status();
        let v: Value = resp.json().await.map_err(|e| error_chain(&e))?;
        match v["total"].as_i64() {
            Some(t) if status == reqwest::StatusCode::OK => Ok(t),
            _ => Err(format!("HTTP {status}: {v}")),
        }
    }
    .await;
    Census {
        patients: want.len(),
        found,
        expected,
        first_mismatch,
        all,
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Nearest-rank percentile of sorted latencies, in ms.
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("load bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Ok(true) when every Bundle succeeded; Err for problems outside the timed requests.
async fn run() -> Result<bool> {
    let cfg = Config::from_env()?;
    let target = match &cfg.target {
        Target::Spawn { database, .. } => format!(
            "spawn {} --database {}",
            env!("CARGO_BIN_EXE_sentinella"),
            redact(database)
        ),
        Target::External { base } => format!("running server at {base}"),
        Target::WriteDir(dir) => format!("no server, write the Bundles to {}", dir.display()),
    };
    println!(
        "config: N={} C={} repeat={}% cre={}% seed={} target: {target}",
        cfg.n, cfg.c, cfg.repeat_pct, cfg.cre_pct, cfg.seed
    );
    println!("reproduce: {}", cfg.reproduce_line());

    let t = Instant::now();
    let work = generate(&cfg)?;
    let bytes: usize = work.bodies.iter().map(Vec::len).sum();
    println!(
        "generated {} Bundles ({} returning patients, {} distinct) in {:.2} s, {:.1} KiB per Bundle",
        cfg.n,
        work.returning,
        work.distinct_patients,
        t.elapsed().as_secs_f64(),
        bytes as f64 / cfg.n as f64 / 1024.0
    );
    let cre_bundles = work.cre.iter().flatten().count();
    if cre_bundles > 0 {
        println!(
            "CRE: {cre_bundles} Bundles ({} of a returning CRE patient), {} distinct patient × species cases expected",
            work.cre_returning, work.cre_expected
        );
    }

    // proxies must not divert loopback traffic
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(cfg.c)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("building the HTTP client")?;

    let tag = uuid::Uuid::new_v4().to_string();
    let mut pg = None;
    let mut server = None;
    let base = match &cfg.target {
        Target::WriteDir(dir) => return write_bundles(dir, &cfg, &work).map(|()| true),
        Target::External { base } => base.clone(),
        Target::Spawn { database, .. } => {
            if is_postgres(database) {
                pg = Some(PgDatabase::prepare(database).await?);
            }
            match Server::spawn(database, &tag) {
                Ok((s, base)) => {
                    server = Some(s);
                    base
                }
                Err(e) => {
                    cleanup(None, pg, &cfg.target, false).await;
                    return Err(e);
                }
            }
        }
    };

    let measured = async {
        let ready = wait_ready(&client, &base, server.as_mut()).await?;
        // the resident set before any load: definitions and compiled schemas
        match server.as_ref().and_then(|s| s.memory_kib("VmRSS")) {
            Some(kib) => println!(
                "server ready at {base} after {:.2} s, RSS {:.1} MiB",
                ready.as_secs_f64(),
                mib(kib)
            ),
            None => println!("server ready at {base} after {:.2} s", ready.as_secs_f64()),
        }
        let start = Instant::now();
        let outcomes: Vec<Outcome> = futures::stream::iter(
            work.bodies
                .into_iter()
                .zip(work.cre.iter().copied())
                .enumerate(),
        )
        .map(|(i, (body, cre))| post_bundle(&client, &base, i, body, cre))
        .buffer_unordered(cfg.c)
        .collect()
        .await;
        let elapsed = start.elapsed();
        let census = if cfg.cre_pct > 0 {
            Some(count_cases(&client, &base, &outcomes, &work.cre, cfg.c).await)
        } else {
            None
        };
        anyhow::Ok((elapsed, outcomes, census))
    }
    .await;
    let peak_rss = server.as_ref().and_then(|s| s.memory_kib("VmHWM"));
    let (elapsed, outcomes, census) = match measured {
        Ok(m) => m,
        Err(e) => {
            cleanup(server, pg, &cfg.target, false).await;
            return Err(e);
        }
    };

    let mut failures: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    failures.sort_by_key(|o| o.index);
    let created = outcomes
        .iter()
        .filter(|o| matches!(o.result, Ok(true)))
        .count();
    let mut latencies: Vec<Duration> = outcomes.iter().map(|o| o.latency).collect();
    latencies.sort_unstable();
    let secs = elapsed.as_secs_f64();
    let rate = cfg.n as f64 / secs;
    // each distinct codice fiscale must create exactly one Patient, however the requests interleave
    let dedup_ok = !failures.is_empty() || created == work.distinct_patients;

    println!("---");
    println!(
        "N={} C={} database={} repeat={}% cre={}% seed={}",
        cfg.n,
        cfg.c,
        cfg.db_kind(),
        cfg.repeat_pct,
        cfg.cre_pct,
        cfg.seed
    );
    println!(
        "elapsed {secs:.2} s | {rate:.1} Bundles/s | {:.1} resources/s",
        rate * RESOURCES_PER_BUNDLE as f64
    );
    println!(
        "latency ms: p50 {:.1} | p99 {:.1} | max {:.1}",
        percentile_ms(&latencies, 50.0),
        percentile_ms(&latencies, 99.0),
        percentile_ms(&latencies, 100.0)
    );
    println!(
        "failures {} | Patients created {created} (expected {}){}",
        failures.len(),
        work.distinct_patients,
        if dedup_ok {
            ""
        } else {
            " MISMATCH: ifNoneExist did not deduplicate"
        }
    );
    match peak_rss {
        Some(kib) => println!("server peak RSS {:.1} MiB", mib(kib)),
        None => println!("server peak RSS n/a"),
    }
    if let Some(first) = failures.first() {
        let msg = first
            .result
            .as_ref()
            .err()
            .map(String::as_str)
            .unwrap_or_default();
        println!("first failure (Bundle {}): {msg}", first.index);
    }

    let mut cre_ok = true;
    if let Some(census) = &census {
        let found: Vec<(Duration, u32)> = outcomes
            .iter()
            .filter_map(|o| o.case_visible.as_ref()?.as_ref().ok().copied())
            .collect();
        let first_search = found.iter().filter(|(_, n)| *n == 1).count();
        let mut visible: Vec<Duration> = found.iter().map(|(d, _)| *d).collect();
        visible.sort_unstable();
        let polled = outcomes.iter().filter(|o| o.case_visible.is_some()).count();
        let mut late: Vec<&Outcome> = outcomes
            .iter()
            .filter(|o| matches!(o.case_visible, Some(Err(_))))
            .collect();
        late.sort_by_key(|o| o.index);
        println!(
            "CRE case visible after 2xx ms: p50 {:.1} | p99 {:.1} | max {:.1} | visible {}/{polled} within {} s ({first_search} at the first search)",
            percentile_ms(&visible, 50.0),
            percentile_ms(&visible, 99.0),
            percentile_ms(&visible, 100.0),
            visible.len(),
            CASE_TIMEOUT.as_secs()
        );
        // on a database of this run, every CRE case on the server must be one of the expected:
        // more means a susceptible Bundle made a case or the deduplication let a duplicate through
        let fresh = matches!(cfg.target, Target::Spawn { fresh: true, .. })
            || pg.as_ref().is_some_and(|p| p.created);
        let all_ok = !fresh || census.all.as_ref().is_ok_and(|&a| a == census.found);
        let all = match (&census.all, fresh) {
            (Ok(a), true) => format!("{a}"),
            (Ok(a), false) => format!("{a} (database not of this run: not compared)"),
            (Err(e), _) => format!("n/a ({e})"),
        };
        let matched = census.found == census.expected as i64 && census.first_mismatch.is_none();
        println!(
            "CRE cases found {} for {} patients (expected {}) | CRE cases on the server {all}{}",
            census.found,
            census.patients,
            census.expected,
            match (matched, all_ok) {
                (true, true) => "",
                (false, _) => " MISMATCH: missing or duplicate cases",
                (true, false) => " MISMATCH: cases for non-CRE Bundles",
            }
        );
        if let Some(first) = late.first() {
            let msg = first
                .case_visible
                .as_ref()
                .and_then(|r| r.as_ref().err())
                .map(String::as_str)
                .unwrap_or_default();
            println!("first CRE case not visible (Bundle {}): {msg}", first.index);
        }
        if let Some(m) = &census.first_mismatch {
            println!("first CRE case mismatch: {m}");
        }
        cre_ok = late.is_empty() && matched && all_ok;
    }

    let ok = failures.is_empty() && dedup_ok && cre_ok;
    cleanup(server, pg, &cfg.target, ok).await;
    Ok(ok)
}

/// `SENTINELLA_BENCH_WRITE_DIR`: each Bundle to `<dir>/bundle-NNNNN.json` (index from 0, at least
/// five digits) and the configuration to `<dir>/workload.txt`. A directory that already holds
/// Bundles is refused, so a reader that stops at the first missing file never mixes two workloads.
fn write_bundles(dir: &std::path::Path, cfg: &Config, work: &Workload) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        ensure!(
            !(name.starts_with("bundle-") && name.ends_with(".json")),
            "{} already holds Bundles ({name}): use an empty or new directory",
            dir.display()
        );
    }
    let t = Instant::now();
    for (i, body) in work.bodies.iter().enumerate() {
        let path = dir.join(format!("bundle-{i:05}.json"));
        std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
    }
    let cre_bundles = work.cre.iter().flatten().count();
    let info = format!(
        "N={} repeat={}% cre={}% seed={} distinct_patients={} returning={} cre_bundles={} cre_cases_expected={}\nreproduce: {}\n",
        cfg.n,
        cfg.repeat_pct,
        cfg.cre_pct,
        cfg.seed,
        work.distinct_patients,
        work.returning,
        cre_bundles,
        work.cre_expected,
        cfg.reproduce_line()
    );
    std::fs::write(dir.join("workload.txt"), info)
        .with_context(|| format!("writing {}/workload.txt", dir.display()))?;
    let bytes: usize = work.bodies.iter().map(Vec::len).sum();
    println!(
        "wrote {} Bundles ({:.1} MiB) to {} in {:.2} s",
        work.bodies.len(),
        bytes as f64 / (1024.0 * 1024.0),
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Stop the server, drop a database this run created, remove a fresh SQLite file and, after a
/// clean run, the server log. Problems are reported, not fatal: the numbers are already out.
async fn cleanup(server: Option<Server>, pg: Option<PgDatabase>, target: &Target, ok: bool) {
    if let Some(s) = server {
        let log = s.log.clone();
        let clean = match s.stop().await {
            Ok(status) if status.success() => true,
            Ok(status) => {
                eprintln!("the server exited with {status}");
                false
            }
            Err(e) => {
                eprintln!("stopping the server: {e:#}");
                false
            }
        };
        if ok && clean {
            let _ = std::fs::remove_file(&log);
        } else {
            eprintln!("server log kept: {}", log.display());
        }
    }
    if let Some(db) = pg
        && let Err(e) = db.finish().await
    {
        eprintln!("dropping the benchmark database: {e:#}");
    }
    if let Target::Spawn {
        database,
        fresh: true,
    } = target
        && let Some(path) = database.strip_prefix("sqlite://")
    {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
    }
}
