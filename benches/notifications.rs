//! D.M. 15/12/1990 benchmark: what do the notification rules cost on ingest, and does outbreak
//! detection stay flat as the stored notifications grow?
//!
//! The real application runs in process (`sentinella::server::build_app`, driven with
//! `tower::ServiceExt::oneshot`: no sockets, so the request cost is the server's own). Every request
//! is an EHR's segnalazione transaction Bundle of the shape `tests/dm1990.rs` sends (Patient with
//! codice fiscale and residence comune, the notifying doctor, the notifying ASL, the Condition, the
//! `criterio-diagnostico` Observations and the `segnalazione` Communication; conditional creates).
//!
//! Phase "ingest": N Bundles at concurrency C, mixed classes: 10% class I (cholera, diphtheria, …,
//! half of them suspected), 45% class II with their criteria met, 10% class III (pulmonary TB
//! confirmed by culture, new case), 20% class IV, 15% class V. A tenth of all Bundles (taken from
//! the class IV and V shares) are cases in communities that form outbreaks: 2 to 4 cases of one
//! disease in one school with onsets a few days apart. Before it, unless
//! `SENTINELLA_NOTIF_BASELINE=0`, the same number of Bundles of the same shape with a
//! non-notifiable code (ICD-9-CM 250.00, diabetes) and no community: the rules run but have
//! nothing to decide. Reported: Bundles/s, latency, and the rules' time per write (the
//! `sentinella::surveillance::dm1990::rule_time()` delta: time inside write transactions) against
//! the mean request latency, against wall time per Bundle × C, and against wall time per Bundle.
//!
//! Phase "scale": the rule state grows to each of `SENTINELLA_NOTIF_SIZES` stored reports
//! (segnalazioni as the rules remember them, each with its case): the records `state_claim` writes
//! for `report:<id>` with the tags `Report::tags` gives, and for `case:<identity>|<disease>|1`
//! tagged `group:<identity>|<disease>`, 10 000 reports per transaction, inserted with multi-row
//! INSERTs into `rule_state` / `rule_state_tags` on connections of their own (by default), or
//! through the store, `state_claim` by `state_claim` (`SENTINELLA_NOTIF_SEED=store`: the same rows,
//! about twice as slow: 1 M took 11 minutes on SQLite here, against 5.5 with INSERTs). Report `i`
//! belongs to community `i / 5` (1 M reports: 200 000 schools): its first report is a class IV or
//! V case of the community's disease 10 days ago, the other four follow the
//! class mix above with onsets 70, 130, 190 and 250 days ago (no outbreak among them). At each size:
//! - the lookup outbreak detection makes (`state_tagged` of `comm:<disease>|<community>`) timed
//!   through the store, `SENTINELLA_NOTIF_LOOKUPS` times, with its query plan;
//! - K "join" Bundles, one at a time: a new case of the community's disease in a random seeded
//!   community (onset 2 days ago): outbreak detection finds the seeded case and the rules write a
//!   `focolaio` (or extend it, when a community is drawn twice);
//! - interleaved with them K "alone" Bundles: the same kind of case in a school of its own (the
//!   lookup finds nothing else, no outbreak): the difference is the outbreak's own cost.
//!
//! Per write: the rules' µs (`rule_time()` delta around each request; requests are sequential
//! here) and the request latency. The claim checked by eye: the join figures at 1 M are about the
//! same as at 10 k. Only rule state grows: the seeded reports have no FHIR resources behind them.
//!
//! SQLite by default (a temporary file, removed at the end);
//! `SENTINELLA_BENCH_DATABASE=postgres://postgres@127.0.0.1:5432/<name>` measures PostgreSQL (the
//! database is created if missing and, if it was created here, dropped at the end).
//!
//! Knobs: `SENTINELLA_NOTIF_N` (ingest Bundles, default 2000), `SENTINELLA_NOTIF_C` (ingest
//! concurrency, default 8), `SENTINELLA_NOTIF_BASELINE` (1/0, default 1), `SENTINELLA_NOTIF_SIZES`
//! (stored reports, ascending, default "10000,1000000"; "0" skips the phase),
//! `SENTINELLA_NOTIF_K` (join and alone Bundles per size, default 500),
//! `SENTINELLA_NOTIF_LOOKUPS` (store-level lookups per size, default 2000),
//! `SENTINELLA_NOTIF_SEED` (sql or store, see above), `SENTINELLA_NOTIF_SEED_TASKS` (transactions
//! seeding at once; default 1 on SQLite, which has one writer, 4 on PostgreSQL),
//! `SENTINELLA_NOTIF_BUDGET_S` (wall-clock limit of the measurements at one size, default 300: the
//! lookups get a quarter of it, the request warm-up a tenth, the join and alone Bundles the rest;
//! when a lookup scans, fewer than asked are measured and the run says so) and
//! `SENTINELLA_BENCH_SEED` (the generated data; random by default and
//! printed). `SENTINELLA_NOTIF_WRITE_DIR=<dir>` only writes the ingest Bundles (compact JSON,
//! `bundle-NNNNN.json`, baseline excluded) for `benches/wrk/run.sh notifications` and exits.
//!
//! Nothing is asserted about timings. The run fails when a request is not 2xx, when a receipt is not
//! what the class calls for, or (on a database of its own) when the number of `focolaio`
//! notifications is not the number of outbreak communities.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Method, Request};
use http_body_util::BodyExt;
use sentinella::config::Config as AppConfig;
use sentinella::italy::codice_fiscale::CodiceFiscale;
use sentinella::store::SharedStore;
use sentinella::surveillance::dm1990::report::{Community, Evidence, Report, outcome};
use sentinella::surveillance::dm1990::rules::RuleSet;
use sentinella::surveillance::dm1990::{CaseRecord, STATE, rule_time};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection, Row};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tower::ServiceExt;

const CANON: &str = "https://sentinella-fhir.github.io/ig";
const ICD9: &str = "http://hl7.org/fhir/sid/icd-9-cm";
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
/// Schools are identified by their codice meccanografico.
const SCHOOLS: &str = "https://www.istruzione.it/sid/codice-meccanografico";

const SEED_BATCH: usize = 10_000;
/// Reports per seeded community.
const REPORTS_PER_COMMUNITY: usize = 5;
/// Untimed requests before each measurement.
const WARMUP: usize = 40;
/// Seeded identities live above the people of the Bundles (codice fiscale surname/name letters).
const SEEDED_PEOPLE: u64 = 250_000_000;

// ---------------------------------------------------------------------------------------------
// Configuration

struct Config {
    database: String,
    fresh_sqlite: bool,
    n: usize,
    c: usize,
    baseline: bool,
    sizes: Vec<usize>,
    k: usize,
    lookups: usize,
    seed_tasks: usize,
    /// Seed through the store (`state_claim`) rather than with multi-row INSERTs.
    seed_through_store: bool,
    /// Wall-clock limit of the scale phase's measurements at one size.
    budget: Duration,
    seed: u64,
    write_dir: Option<PathBuf>,
}

fn env_opt(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_num(name: &str, default: usize) -> Result<usize> {
    match env_opt(name) {
        Some(v) => v
            .trim()
            .replace('_', "")
            .parse()
            .with_context(|| format!("{name}={v}")),
        None => Ok(default),
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres:") || url.starts_with("postgresql:")
}

impl Config {
    fn from_env() -> Result<Self> {
        let sizes_text =
            env_opt("SENTINELLA_NOTIF_SIZES").unwrap_or_else(|| "10000,1000000".into());
        let mut sizes = sizes_text
            .split(',')
            .map(|s| {
                s.trim()
                    .replace('_', "")
                    .parse::<usize>()
                    .with_context(|| format!("SENTINELLA_NOTIF_SIZES={sizes_text}"))
            })
            .collect::<Result<Vec<_>>>()?;
        sizes.retain(|&s| s > 0);
        sizes.sort_unstable();
        sizes.dedup();
        ensure!(
            sizes.iter().all(|&s| s >= 2 * REPORTS_PER_COMMUNITY),
            "SENTINELLA_NOTIF_SIZES: sizes must be at least {}",
            2 * REPORTS_PER_COMMUNITY
        );
        let n = env_num("SENTINELLA_NOTIF_N", 2000)?;
        let c = env_num("SENTINELLA_NOTIF_C", 8)?;
        ensure!(n >= 10, "SENTINELLA_NOTIF_N must be at least 10");
        ensure!(c >= 1, "SENTINELLA_NOTIF_C must be at least 1");
        let baseline = env_num("SENTINELLA_NOTIF_BASELINE", 1)? != 0;
        let k = env_num("SENTINELLA_NOTIF_K", 500)?;
        ensure!(k >= 1, "SENTINELLA_NOTIF_K must be at least 1");
        let lookups = env_num("SENTINELLA_NOTIF_LOOKUPS", 2000)?;
        let seed_through_store = match env_opt("SENTINELLA_NOTIF_SEED").as_deref().map(str::trim) {
            None | Some("sql") => false,
            Some("store") => true,
            Some(other) => bail!("SENTINELLA_NOTIF_SEED={other}: use sql or store"),
        };
        let budget = Duration::from_secs(env_num("SENTINELLA_NOTIF_BUDGET_S", 300)?.max(1) as u64);
        let seed = match env_opt("SENTINELLA_BENCH_SEED") {
            Some(s) => s
                .trim()
                .parse()
                .with_context(|| format!("SENTINELLA_BENCH_SEED={s}"))?,
            None => uuid::Uuid::new_v4().as_u64_pair().0,
        };
        let write_dir = env_opt("SENTINELLA_NOTIF_WRITE_DIR").map(PathBuf::from);
        let (database, fresh_sqlite) = match env_opt("SENTINELLA_BENCH_DATABASE") {
            Some(url) if is_postgres(&url) => {
                pg_options(&url)?;
                (url.trim().to_string(), false)
            }
            Some(url) if url.starts_with("sqlite:") => (url.trim().to_string(), false),
            Some(url) => bail!(
                "SENTINELLA_BENCH_DATABASE={}: use postgres://… or sqlite://…",
                redact(&url)
            ),
            None => {
                let path = std::env::temp_dir().join(format!(
                    "sentinella-notifications-{}.db",
                    uuid::Uuid::new_v4()
                ));
                (format!("sqlite://{}", path.display()), true)
            }
        };
        let seed_tasks = env_num(
            "SENTINELLA_NOTIF_SEED_TASKS",
            if is_postgres(&database) { 4 } else { 1 },
        )?
        .max(1);
        Ok(Config {
            database,
            fresh_sqlite,
            n,
            c,
            baseline,
            sizes,
            k,
            lookups,
            seed_tasks,
            seed_through_store,
            budget,
            seed,
            write_dir,
        })
    }

    fn reproduce_line(&self) -> String {
        let sizes: Vec<String> = self.sizes.iter().map(usize::to_string).collect();
        let mut s = format!(
            "SENTINELLA_NOTIF_N={} SENTINELLA_NOTIF_C={} SENTINELLA_NOTIF_BASELINE={} SENTINELLA_NOTIF_SIZES={} SENTINELLA_NOTIF_K={} SENTINELLA_NOTIF_LOOKUPS={} SENTINELLA_NOTIF_SEED={} SENTINELLA_NOTIF_SEED_TASKS={} SENTINELLA_NOTIF_BUDGET_S={} SENTINELLA_BENCH_SEED={}",
            self.n,
            self.c,
            u8::from(self.baseline),
            if sizes.is_empty() {
                "0".to_string()
            } else {
                sizes.join(",")
            },
            self.k,
            self.lookups,
            if self.seed_through_store {
                "store"
            } else {
                "sql"
            },
            self.seed_tasks,
            self.budget.as_secs(),
            self.seed
        );
        if !self.fresh_sqlite {
            let _ = write!(s, " SENTINELLA_BENCH_DATABASE={}", redact(&self.database));
        }
        s + " cargo bench --bench notifications"
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

fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

// ---------------------------------------------------------------------------------------------
// Deterministic randomness

/// splitmix64's finaliser: a bijection on u64.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

fn uuid_of(i: u64, salt: u64) -> String {
    let (a, b) = (mix(i ^ salt), mix(i.rotate_left(17) ^ salt ^ 0xfeed));
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&a.to_le_bytes());
    bytes[8..].copy_from_slice(&b.to_le_bytes());
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// A person: codice fiscale (surname and name letters encode `p`, so distinct `p` are distinct
/// people), birth date and sex consistent with it.
struct Person {
    cf: String,
    birth_date: String,
    female: bool,
}

fn person(p: u64) -> Person {
    const MONTHS: &[u8; 12] = b"ABCDEHLMPRST";
    let mut s = String::with_capacity(16);
    let mut v = p;
    for _ in 0..6 {
        s.push(char::from(b'A' + (v % 26) as u8));
        v /= 26;
    }
    let h = mix(p ^ 0xc0d1ce);
    let year = 40 + h % 60;
    let month = ((h >> 8) % 12) as usize;
    let day = 1 + (h >> 16) % 28;
    let female = (h >> 24) & 1 == 1;
    let _ = write!(s, "{year:02}");
    s.push(char::from(MONTHS[month]));
    let _ = write!(s, "{:02}", day + if female { 40 } else { 0 });
    s.push_str("F205");
    let cf = CodiceFiscale::complete(&s)
        .expect("well formed codice fiscale")
        .as_str()
        .to_string();
    Person {
        cf,
        birth_date: format!("19{year:02}-{:02}-{day:02}", month + 1),
        female,
    }
}

/// `CF:<identity>`, as the rules key a person.
fn identity_of(cf: &str) -> String {
    format!(
        "CF:{}",
        CodiceFiscale::parse(cf)
            .expect("valid codice fiscale")
            .identity()
    )
}

// ---------------------------------------------------------------------------------------------
// What is notified

#[derive(Clone, Copy)]
struct Place {
    comune: &'static str,
    name: &'static str,
    postal_code: &'static str,
}

const MILANO: Place = Place {
    comune: "015146",
    name: "Milano",
    postal_code: "20121",
};
const PLACES: [Place; 4] = [
    MILANO,
    Place {
        comune: "016024",
        name: "Bergamo",
        postal_code: "24121",
    },
    Place {
        comune: "017065",
        name: "Darfo Boario Terme",
        postal_code: "25047",
    },
    Place {
        comune: "007003",
        name: "Aosta",
        postal_code: "11100",
    },
];
/// The notifying ASL (the hospital is in Milano).
const NOTIFIER: (&str, &str) = ("030321", "ATS della Città Metropolitana di Milano");

const CLASS_I: [&str; 5] = ["001.0", "032.9", "037", "071", "020.9"];
/// Class II codes with the criteria that make them notifiable.
const CLASS_II: [(&str, &[&str]); 8] = [
    ("055.9", &["clinica"]),
    ("052.9", &["clinica"]),
    ("034.1", &["clinica"]),
    ("072.9", &["clinica"]),
    ("033.9", &["clinica"]),
    ("070.1", &["clinica", "sierologia"]),
    ("003.0", &["clinica", "coltura"]),
    ("036.0", &["clinica", "esame-diretto"]),
];
const TB: &str = "011.94";
const CLASS_IV: [&str; 4] = ["132.0", "133.0", "110.0", "005.0"];
const CLASS_V: [&str; 4] = ["008.61", "007.1", "057.0", "127.4"];
const NOT_NOTIFIABLE: &str = "250.00";

fn icd9_display(code: &str) -> &'static str {
    match code {
        "001.0" => "Colera da Vibrio cholerae",
        "005.0" => "Intossicazione alimentare da stafilococco",
        "055.9" => "Morbillo senza menzione di complicazioni",
        "034.1" => "Scarlattina",
        "052.9" => "Varicella senza menzione di complicazioni",
        "070.1" => "Epatite virale A senza menzione di coma epatico",
        "003.0" => "Gastroenterite da Salmonella",
        "036.0" => "Meningite meningococcica",
        "011.94" => "Tubercolosi polmonare, bacilli trovati all'esame colturale",
        "132.0" => "Pediculosi del capo",
        "133.0" => "Scabbia",
        "110.0" => "Dermatofitosi del cuoio capelluto e della barba",
        "008.61" => "Enterite da rotavirus",
        "250.00" => "Diabete mellito senza complicazioni",
        _ => "",
    }
}

fn icd9_coding(code: &str) -> Value {
    match icd9_display(code) {
        "" => json!({"system": ICD9, "code": code}),
        display => json!({"system": ICD9, "code": code, "display": display}),
    }
}

/// What a Bundle is, for the receipts tally.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Class(u8),
    /// Class IV or V case in an outbreak community.
    Outbreak(u8),
    Baseline,
    /// Scale phase: a case joining a seeded community / a case in a school of its own.
    Join(u8),
    Alone(u8),
}

impl Kind {
    fn label(self) -> String {
        match self {
            Kind::Class(c) => format!("class {}", roman(c)),
            Kind::Outbreak(c) => format!("class {} in outbreak", roman(c)),
            Kind::Baseline => "250.00 (not notifiable)".into(),
            Kind::Join(c) => format!("join class {}", roman(c)),
            Kind::Alone(c) => format!("alone class {}", roman(c)),
        }
    }

    /// The receipt the rules must give.
    fn expected(self) -> &'static str {
        match self {
            Kind::Baseline => outcome::NOT_NOTIFIABLE,
            Kind::Class(5) | Kind::Outbreak(5) | Kind::Join(5) | Kind::Alone(5) => {
                outcome::RECORDED
            }
            _ => outcome::NOTIFIED,
        }
    }
}

fn roman(c: u8) -> &'static str {
    ["0", "I", "II", "III", "IV", "V"][usize::from(c.min(5))]
}

/// A community (`CANON/StructureDefinition/comunita`).
#[derive(Clone)]
struct School {
    code: String,
    at_risk: i64,
}

impl School {
    fn nome(&self) -> String {
        format!("Scuola primaria statale {}", self.code)
    }
}

/// One EHR segnalazione (the shape of `tests/dm1990.rs`'s `Report`).
struct Segnalazione {
    tag: String,
    person: Person,
    home: Place,
    doctor: u32,
    code: String,
    /// provisional | confirmed
    verification: &'static str,
    onset_days_ago: i64,
    community: Option<School>,
    treatments: Option<&'static str>,
    criteria: Vec<&'static str>,
}

const PATIENT: usize = 1;
const DOCTOR: usize = 2;
const ASL: usize = 3;
const CONDITION: usize = 4;
const SEGNALAZIONE: usize = 5;
const CRITERION: usize = 10;

fn full_url(slot: usize) -> String {
    format!("urn:uuid:0d3e1990-5a1e-4c0b-9f00-{slot:012}")
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).expect("formattable")
}

/// Noon UTC `d` days before `now`.
fn noon_days_ago(now: OffsetDateTime, d: i64) -> OffsetDateTime {
    (now - time::Duration::days(d))
        .date()
        .with_hms(12, 0, 0)
        .expect("noon")
        .assume_utc()
}

fn micros(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1000) as i64
}

impl Segnalazione {
    fn bundle(&self, now: OffsetDateTime) -> Value {
        let r = full_url;
        let recorded = rfc3339(now - time::Duration::hours(1));
        let sent = rfc3339(now - time::Duration::minutes(30));
        let (family, given) = match self.doctor % 3 {
            1 => ("Bianchi", "Marco"),
            2 => ("Colombo", "Chiara"),
            _ => ("Ferrari", "Luca"),
        };
        let doctor_cf = CodiceFiscale::complete(&format!("BNCMRC70A01F{:03}", self.doctor))
            .expect("well formed")
            .as_str()
            .to_string();
        let patient = json!({
            "resourceType": "Patient",
            "identifier": [{"system": CODICE_FISCALE, "value": self.person.cf}],
            "name": [{"family": "Esposito", "given": [if self.person.female { "Giovanna" } else { "Giovanni" }]}],
            "gender": if self.person.female { "female" } else { "male" },
            "birthDate": self.person.birth_date,
            "telecom": [{"system": "phone", "value": "+39 02 5555 0101", "use": "mobile"}],
            "address": [{
                "use": "home",
                "type": "physical",
                "line": ["Via Alessandro Manzoni 12"],
                "city": self.home.name,
                "_city": {"extension": [{
                    "url": SC_CODING,
                    "valueCoding": {"system": ISTAT_COMUNI, "code": self.home.comune, "display": self.home.name}
                }]},
                "postalCode": self.home.postal_code,
                "country": "IT"
            }]
        });
        let doctor = json!({
            "resourceType": "Practitioner",
            "identifier": [{"system": CODICE_FISCALE, "value": doctor_cf}],
            "active": true,
            "name": [{"family": family, "given": [given], "prefix": ["Dott."]}],
            "telecom": [
                {"system": "phone", "value": format!("+39 02 3904 {:04}", 1000 + self.doctor), "use": "work"},
                {"system": "email", "value": format!("{}.{}@ospedale-sacco.example", given.to_lowercase(), family.to_lowercase()), "use": "work"}
            ]
        });
        let asl = json!({
            "resourceType": "Organization",
            "identifier": [{"system": format!("{CANON}/sid/asl"), "value": NOTIFIER.0}],
            "active": true,
            "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type", "code": "govt", "display": "Government"}]}],
            "name": NOTIFIER.1
        });
        let mut condition = json!({
            "resourceType": "Condition",
            "identifier": [{"system": EHR_CONDITIONS, "value": format!("{}-diagnosi", self.tag)}],
            "clinicalStatus": {"coding": [{"system": CLINICAL_STATUS, "code": "active"}]},
            "verificationStatus": {"coding": [{"system": VER_STATUS, "code": self.verification}]},
            "category": [{"coding": [{"system": CONDITION_CATEGORY, "code": "encounter-diagnosis", "display": "Encounter Diagnosis"}]}],
            "code": {"coding": [icd9_coding(&self.code)]},
            "subject": {"reference": r(PATIENT)},
            "recorder": {"reference": r(DOCTOR)},
            "onsetDateTime": rfc3339(noon_days_ago(now, self.onset_days_ago)),
            "recordedDate": recorded,
        });
        let mut extensions = Vec::new();
        if let Some(k) = &self.community {
            extensions.push(json!({
                "url": format!("{CANON}/StructureDefinition/comunita"),
                "extension": [
                    {"url": "tipo", "valueCode": "scuola"},
                    {"url": "identificativo", "valueIdentifier": {"system": SCHOOLS, "value": k.code}},
                    {"url": "nome", "valueString": k.nome()},
                    {"url": "persone-a-rischio", "valueInteger": k.at_risk}
                ]
            }));
        }
        if let Some(t) = self.treatments {
            extensions.push(json!({
                "url": format!("{CANON}/StructureDefinition/precedenti-trattamenti"),
                "valueCode": t
            }));
        }
        if !extensions.is_empty() {
            condition["extension"] = Value::Array(extensions);
        }
        let mut resources = vec![
            (PATIENT, patient),
            (DOCTOR, doctor),
            (ASL, asl),
            (CONDITION, condition),
        ];
        let mut payload =
            vec![json!({"contentReference": {"reference": r(CONDITION), "display": "Diagnosi"}})];
        for (i, criterion) in self.criteria.iter().enumerate() {
            let mut o = json!({
                "resourceType": "Observation",
                "meta": {"profile": [format!("{CANON}/StructureDefinition/criterio-diagnostico")]},
                "identifier": [{"system": EHR_CRITERIA, "value": format!("{}-criterio-{i}", self.tag)}],
                "status": "final",
                "code": {"coding": [{"system": format!("{CANON}/CodeSystem/criterio-diagnostico"), "code": criterion}]},
                "subject": {"reference": r(PATIENT)},
                "effectiveDateTime": recorded,
                "valueCodeableConcept": {"coding": [{"system": format!("{CANON}/CodeSystem/esito-criterio"), "code": "positivo"}]}
            });
            if matches!(*criterion, "coltura" | "esame-diretto") {
                o["bodySite"] = json!({"coding": [{"system": SNOMED, "code": "39607008", "display": "Lung structure"}]});
            }
            resources.push((CRITERION + i, o));
            payload.push(json!({"contentReference": {"reference": r(CRITERION + i)}}));
        }
        resources.push((
            SEGNALAZIONE,
            json!({
                "resourceType": "Communication",
                "meta": {"profile": [format!("{CANON}/StructureDefinition/segnalazione")]},
                "identifier": [{"system": EHR_SEGNALAZIONI, "value": format!("{}-segnalazione", self.tag)}],
                "status": "completed",
                "subject": {"reference": r(PATIENT)},
                "sent": sent,
                "sender": {"reference": r(DOCTOR)},
                "recipient": [{"reference": r(ASL)}],
                "payload": payload,
                "reasonCode": [{"coding": [icd9_coding(&self.code)]}]
            }),
        ));
        let entries: Vec<Value> = resources
            .into_iter()
            .map(|(slot, resource)| {
                let rt = resource["resourceType"].as_str().expect("type").to_string();
                let id = &resource["identifier"][0];
                let request = json!({
                    "method": "POST",
                    "url": rt,
                    "ifNoneExist": format!(
                        "identifier={}|{}",
                        id["system"].as_str().expect("system"),
                        id["value"].as_str().expect("value")
                    )
                });
                json!({"fullUrl": r(slot), "resource": resource, "request": request})
            })
            .collect();
        json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    }
}

/// Generates the Bundles: people and business identifiers unique per run.
struct Generator {
    rng: Rng,
    run: String,
    next_person: u64,
    next_tag: u64,
    next_community: u64,
}

impl Generator {
    fn new(seed: u64) -> Self {
        Generator {
            rng: Rng(seed),
            run: format!("{:08x}", mix(seed) as u32),
            // 200 runs' worth of people below the seeded identities
            next_person: (seed % 200) * 1_000_000,
            next_tag: 0,
            next_community: 0,
        }
    }

    fn report(&mut self, code: &str) -> Segnalazione {
        self.next_person += 1;
        self.next_tag += 1;
        let home = match self.rng.below(10) {
            0..=5 => PLACES[0],
            6 | 7 => PLACES[1],
            8 => PLACES[2],
            _ => PLACES[3],
        };
        Segnalazione {
            tag: format!("bench-{}-{}", self.run, self.next_tag),
            person: person(self.next_person),
            home,
            doctor: 1 + self.rng.below(40) as u32,
            code: code.into(),
            verification: "confirmed",
            onset_days_ago: 1 + self.rng.below(4) as i64,
            community: None,
            treatments: None,
            criteria: Vec::new(),
        }
    }

    fn of_class(&mut self, class: u8) -> Segnalazione {
        match class {
            1 => {
                let code = CLASS_I[self.rng.below(CLASS_I.len())];
                let mut s = self.report(code);
                if self.rng.below(2) == 0 {
                    s.verification = "provisional";
                }
                s
            }
            2 => {
                let (code, criteria) = CLASS_II[self.rng.below(CLASS_II.len())];
                let mut s = self.report(code);
                s.criteria = criteria.to_vec();
                s
            }
            3 => {
                let mut s = self.report(TB);
                s.treatments = Some("nuovo-caso");
                s.criteria = vec!["coltura"];
                s
            }
            4 => {
                let code = CLASS_IV[self.rng.below(CLASS_IV.len())];
                self.report(code)
            }
            _ => {
                let code = CLASS_V[self.rng.below(CLASS_V.len())];
                self.report(code)
            }
        }
    }

    /// The ingest mix, shuffled; and the number of outbreak communities.
    fn ingest(&mut self, n: usize) -> (Vec<(Kind, Segnalazione)>, usize) {
        let count = |pct: usize| n * pct / 100;
        let (c1, c2, c3, c4) = (count(10), count(45), count(10), count(20));
        let c5 = n - c1 - c2 - c3 - c4;
        // a tenth of all Bundles are outbreak cases: 6 points from class IV, 4 from class V
        let outbreak_total = (n / 10).min(c4 + c5);
        let o4 = (outbreak_total * 6 / 10).min(c4);
        let o5 = (outbreak_total - o4).min(c5);
        let mut out = Vec::with_capacity(n);
        for (class, k) in [(1u8, c1), (2, c2), (3, c3), (4, c4 - o4), (5, c5 - o5)] {
            for _ in 0..k {
                out.push((Kind::Class(class), self.of_class(class)));
            }
        }
        let mut communities = 0;
        for (class, mut left, codes) in [(4u8, o4, &CLASS_IV[..]), (5, o5, &CLASS_V[..])] {
            while left > 0 {
                if left == 1 {
                    // a single case is no outbreak
                    out.push((Kind::Class(class), self.of_class(class)));
                    break;
                }
                // 2 to 4 cases, never leaving a single case behind
                let mut size = 2 + self.rng.below(3);
                if left < size + 2 {
                    size = left;
                }
                let code = codes[self.rng.below(codes.len())];
                self.next_community += 1;
                let school = School {
                    code: format!("MIOB{}{:04}", &self.run[..4], self.next_community)
                        .to_uppercase(),
                    at_risk: 20 + self.rng.below(200) as i64,
                };
                for _ in 0..size {
                    let mut s = self.report(code);
                    s.community = Some(school.clone());
                    s.onset_days_ago = 1 + self.rng.below(6) as i64;
                    out.push((Kind::Outbreak(class), s));
                }
                communities += 1;
                left -= size;
            }
        }
        self.rng.shuffle(&mut out);
        (out, communities)
    }

    /// The same Bundles with nothing for the rules to decide (not notifiable, no community).
    fn baseline(&mut self, n: usize) -> Vec<(Kind, Segnalazione)> {
        let (mut out, _) = self.ingest(n);
        for (kind, s) in &mut out {
            *kind = Kind::Baseline;
            s.code = NOT_NOTIFIABLE.into();
            s.community = None;
            s.treatments = None;
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Seeded rule state: report `i` is a pure function of `i`

/// The class mix of seeded reports 1..4 of a community (per mille thresholds: I, II, III, IV, V).
fn class_of_hash(h: u64) -> u8 {
    match h % 1000 {
        0..100 => 1,
        100..550 => 2,
        550..650 => 3,
        650..850 => 4,
        _ => 5,
    }
}

/// What the rule data says of the codes used.
struct Rules {
    canonical: String,
    /// code → (class, disease key, the class forms outbreaks)
    codes: BTreeMap<&'static str, (u8, String, bool)>,
}

impl Rules {
    fn load() -> Result<Self> {
        let sets = RuleSet::load_all().map_err(anyhow::Error::msg)?;
        let today = OffsetDateTime::now_utc().date().to_string();
        let set = sets
            .iter()
            .find(|s| s.valid_on(&today))
            .context("no D.M. 1990 rule set in force today")?;
        let mut codes = BTreeMap::new();
        let mut expect = |code: &'static str, class: u8| -> Result<()> {
            let c = set
                .classify(code)
                .with_context(|| format!("{code} is not classified by the rule data"))?;
            ensure!(
                c.class.class == class,
                "{code} is class {} in the rule data, the bench expects {class}",
                c.class.class
            );
            codes.insert(code, (class, c.disease.key(code), c.class.outbreaks));
            Ok(())
        };
        for code in CLASS_I {
            expect(code, 1)?;
        }
        for (code, _) in CLASS_II {
            expect(code, 2)?;
        }
        expect(TB, 3)?;
        for code in CLASS_IV {
            expect(code, 4)?;
        }
        for code in CLASS_V {
            expect(code, 5)?;
        }
        ensure!(
            set.classify(NOT_NOTIFIABLE).is_none(),
            "{NOT_NOTIFIABLE} is notifiable in the rule data"
        );
        Ok(Rules {
            canonical: set.canonical(),
            codes,
        })
    }
}

/// The outbreak disease of seeded community `c` (class IV or V).
fn community_code(c: u64) -> &'static str {
    let h = mix(c ^ 0xc0de);
    if h % 8 < 5 {
        CLASS_IV[((h >> 8) % 4) as usize]
    } else {
        CLASS_V[((h >> 8) % 4) as usize]
    }
}

fn community_school(c: u64) -> School {
    School {
        code: format!("MIEE{c:06}"),
        at_risk: 20 + (mix(c) % 200) as i64,
    }
}

/// Onset and recordedDate of report j of a community: (text, µs) each.
struct SeedClock {
    onsets: [(String, i64); REPORTS_PER_COMMUNITY],
    recorded: [(String, i64); REPORTS_PER_COMMUNITY],
}

impl SeedClock {
    fn now() -> Self {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).expect("ns");
        let onset = |j: usize| noon_days_ago(now, if j == 0 { 10 } else { 10 + 60 * j as i64 });
        SeedClock {
            onsets: std::array::from_fn(|j| (rfc3339(onset(j)), micros(onset(j)))),
            recorded: std::array::from_fn(|j| {
                let t = onset(j) + time::Duration::hours(30);
                (rfc3339(t), micros(t))
            }),
        }
    }
}

struct Seeded {
    report: Report,
    tags: Vec<String>,
    case_key: String,
    case: CaseRecord,
}

// every field is set; the update keeps this compiling when the rules remember more
#[allow(clippy::needless_update)]
fn seeded(rules: &Rules, clock: &SeedClock, salt: u64, i: u64) -> Seeded {
    let c = i / REPORTS_PER_COMMUNITY as u64;
    let j = (i % REPORTS_PER_COMMUNITY as u64) as usize;
    let h = mix(i ^ salt ^ 0x5eed);
    let class = if j == 0 {
        rules.codes[community_code(c)].0
    } else {
        class_of_hash(h)
    };
    let (code, criteria): (&'static str, &[&str]) = match class {
        1 => (CLASS_I[((h >> 12) % 5) as usize], &[]),
        2 => CLASS_II[((h >> 12) % 8) as usize],
        3 => (TB, &["coltura"]),
        // the community's own disease: every class IV/V report of the school is in its group
        _ => (community_code(c), &[]),
    };
    let (_, disease, outbreaks) = &rules.codes[code];
    let who = person(SEEDED_PEOPLE + i);
    let identity = identity_of(&who.cf);
    let id = uuid_of(i, salt ^ 0x4e9);
    let condition = uuid_of(i, salt ^ 0xc0d);
    let patient = uuid_of(i, salt ^ 0x9a7);
    let mut links = vec![format!("Condition/{condition}")];
    let mut evidence = Vec::new();
    for (n, criterion) in criteria.iter().enumerate() {
        let reference = format!("Observation/{}", uuid_of(i, salt ^ (0x0b5 + n as u64)));
        links.push(reference.clone());
        evidence.push(Evidence {
            criterion: criterion.to_string(),
            result: "positivo".into(),
            reference,
        });
    }
    let school = community_school(c);
    let group = format!("{identity}|{disease}");
    let case_key = format!("case:{group}|1");
    let (onset, onset_us) = clock.onsets[j].clone();
    let report = Report {
        id: id.clone(),
        rule_set: Some(rules.canonical.clone()),
        patient_id: Some(patient),
        identity,
        codice_fiscale: Some(who.cf),
        code: Some(code.to_string()),
        disease: Some(disease.clone()),
        class: Some(class),
        verification: if class == 1 && h & 1 == 0 {
            "sospetto"
        } else {
            "confermato"
        }
        .into(),
        condition: Some(condition),
        onset: Some(onset),
        recorded: Some(clock.recorded[j].0.clone()),
        onset_us: Some(onset_us),
        recorded_us: Some(clock.recorded[j].1),
        received_us: clock.recorded[j].1 + 3_600_000_000,
        community: Some(Community {
            key: format!("{SCHOOLS}|{}", school.code),
            tipo: Some("scuola".into()),
            nome: Some(school.nome()),
            identifier: json!({"system": SCHOOLS, "value": school.code}),
            persone: Some(school.at_risk),
        }),
        previous_treatment: (class == 3).then(|| "nuovo-caso".to_string()),
        comune: Some(MILANO.comune.into()),
        notifying_asl: Some((NOTIFIER.0.into(), NOTIFIER.1.into())),
        evidence,
        outcome: if class == 5 {
            outcome::RECORDED
        } else {
            outcome::NOTIFIED
        }
        .into(),
        met: match class {
            2 => vec!["criteri".into()],
            3 => vec!["A".into()],
            _ => vec![],
        },
        missing: vec![],
        case_key: Some(case_key.clone()),
        links,
        ..Default::default()
    };
    let tags = report.tags(*outbreaks);
    let case = CaseRecord {
        case_id: uuid_of(i, salt ^ 0xca5e),
        group,
        episode: 1,
        first_onset_us: Some(onset_us),
        members: vec![id],
        active: true,
        relapse: false,
    };
    Seeded {
        report,
        tags,
        case_key,
        case,
    }
}

/// Store reports `from..to` (with their cases), `SEED_BATCH` per transaction, `tasks` transactions
/// at once. Returns the claims refused (keys already there).
async fn seed(
    store: &SharedStore,
    rules: &Arc<Rules>,
    salt: u64,
    from: usize,
    to: usize,
    tasks: usize,
) -> Result<usize> {
    let clock = Arc::new(SeedClock::now());
    let batches: Vec<(usize, usize)> = (from..to)
        .step_by(SEED_BATCH)
        .map(|s| (s, (s + SEED_BATCH).min(to)))
        .collect();
    let batches = Arc::new(batches);
    let next = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (store, rules, clock, batches, next) = (
            store.clone(),
            rules.clone(),
            clock.clone(),
            batches.clone(),
            next.clone(),
        );
        handles.push(tokio::spawn(async move {
            let mut refused = 0usize;
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(start, end)) = batches.get(b) else {
                    break;
                };
                let mut tx = store.begin().await?;
                for i in start as u64..end as u64 {
                    let s = seeded(&rules, &clock, salt, i);
                    let value = serde_json::to_value(&s.report)?;
                    let key = format!("report:{}", s.report.id);
                    refused += usize::from(!tx.state_claim(STATE, &key, &value, &s.tags).await?);
                    let value = serde_json::to_value(&s.case)?;
                    let tags = [format!("group:{}", s.case.group)];
                    refused +=
                        usize::from(!tx.state_claim(STATE, &s.case_key, &value, &tags).await?);
                }
                tx.commit().await?;
            }
            anyhow::Ok(refused)
        }));
    }
    let mut refused = 0;
    for h in handles {
        refused += h.await??;
    }
    Ok(refused)
}

/// One rule-state record as `state_claim` writes it.
struct Record {
    key: String,
    value: String,
    tags: Vec<String>,
}

/// Rows per multi-row INSERT (4 and 3 parameters a row: far below either database's limit).
const RECORDS_PER_INSERT: usize = 200;
const TAGS_PER_INSERT: usize = 400;

/// `head ($1, $2, …), (…), … tail`: `$n` placeholders, which both SQLite and PostgreSQL read.
fn values_sql(head: &str, columns: usize, rows: usize, tail: &str) -> String {
    let mut sql = String::with_capacity(head.len() + tail.len() + rows * columns * 6);
    sql.push_str(head);
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..columns {
            if c > 0 {
                sql.push_str(", ");
            }
            let _ = write!(sql, "${}", r * columns + c + 1);
        }
        sql.push(')');
    }
    sql.push_str(tail);
    sql
}

/// Insert one batch in one transaction on a connection of either database (the same statements;
/// only the connection type differs). Evaluates to the records inserted.
macro_rules! bulk_batch {
    ($conn:expr, $records:expr, $now:expr) => {{
        let records: &[Record] = $records;
        let mut tx = $conn.begin().await?;
        let mut inserted = 0u64;
        for chunk in records.chunks(RECORDS_PER_INSERT) {
            let sql = values_sql(
                "INSERT INTO rule_state (rule_set, key, value, updated_at) VALUES ",
                4,
                chunk.len(),
                " ON CONFLICT (rule_set, key) DO NOTHING",
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for r in chunk {
                q = q.bind(STATE).bind(&r.key).bind(&r.value).bind($now);
            }
            inserted += q.execute(&mut *tx).await?.rows_affected();
        }
        let tags: Vec<(&str, &str)> = records
            .iter()
            .flat_map(|r| r.tags.iter().map(move |t| (t.as_str(), r.key.as_str())))
            .collect();
        for chunk in tags.chunks(TAGS_PER_INSERT) {
            let sql = values_sql(
                "INSERT INTO rule_state_tags (rule_set, tag, key) VALUES ",
                3,
                chunk.len(),
                " ON CONFLICT DO NOTHING",
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (tag, key) in chunk {
                q = q.bind(STATE).bind(*tag).bind(*key);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        inserted
    }};
}

enum BulkConn {
    Sqlite(sqlx::SqliteConnection),
    Pg(PgConnection),
}

impl BulkConn {
    async fn open(url: &str) -> Result<Self> {
        Ok(if is_postgres(url) {
            BulkConn::Pg(PgConnection::connect(url).await?)
        } else {
            let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)?
                .busy_timeout(Duration::from_secs(60))
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                // 512 MiB of page cache: the inserts land on random pages of a large file
                .pragma("cache_size", "-524288");
            BulkConn::Sqlite(sqlx::SqliteConnection::connect_with(&opts).await?)
        })
    }

    async fn insert(&mut self, records: &[Record]) -> Result<u64> {
        let now = OffsetDateTime::now_utc().unix_timestamp() * 1_000_000;
        Ok(match self {
            BulkConn::Sqlite(c) => bulk_batch!(c, records, now),
            BulkConn::Pg(c) => bulk_batch!(c, records, now),
        })
    }

    async fn close(self) {
        let _ = match self {
            BulkConn::Sqlite(c) => c.close().await,
            BulkConn::Pg(c) => c.close().await,
        };
    }
}

/// Reports `from..to` with their cases, `SEED_BATCH` per transaction with multi-row INSERTs into
/// the rule-state tables (the rows `state_claim` would write: the same keys, JSON text and tags),
/// `tasks` connections at once. Returns the records not inserted (keys already there).
async fn seed_sql(
    url: &str,
    rules: &Arc<Rules>,
    salt: u64,
    from: usize,
    to: usize,
    tasks: usize,
) -> Result<usize> {
    let clock = Arc::new(SeedClock::now());
    let batches: Arc<Vec<(usize, usize)>> = Arc::new(
        (from..to)
            .step_by(SEED_BATCH)
            .map(|s| (s, (s + SEED_BATCH).min(to)))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (url, rules, clock, batches, next) = (
            url.to_string(),
            rules.clone(),
            clock.clone(),
            batches.clone(),
            next.clone(),
        );
        handles.push(tokio::spawn(async move {
            let mut conn = BulkConn::open(&url).await?;
            let mut refused = 0usize;
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(start, end)) = batches.get(b) else {
                    break;
                };
                let mut records = Vec::with_capacity(2 * (end - start));
                for i in start as u64..end as u64 {
                    let s = seeded(&rules, &clock, salt, i);
                    records.push(Record {
                        key: format!("report:{}", s.report.id),
                        value: serde_json::to_value(&s.report)?.to_string(),
                        tags: s.tags,
                    });
                    records.push(Record {
                        key: s.case_key,
                        value: serde_json::to_value(&s.case)?.to_string(),
                        tags: vec![format!("group:{}", s.case.group)],
                    });
                }
                let inserted = conn.insert(&records).await?;
                refused += records.len() - inserted as usize;
            }
            conn.close().await;
            anyhow::Ok(refused)
        }));
    }
    let mut refused = 0;
    for h in handles {
        refused += h.await??;
    }
    Ok(refused)
}

/// The tag outbreak detection looks up for seeded community `c`.
fn comm_tag(rules: &Rules, c: u64) -> String {
    let code = community_code(c);
    format!(
        "comm:{}|{SCHOOLS}|{}",
        rules.codes[code].1,
        community_school(c).code
    )
}

/// Time `state_tagged` of random seeded communities' tags, as outbreak detection does it (one read
/// transaction per 100 lookups). Sorted latencies, and the rows found in all.
async fn time_lookups(
    store: &SharedStore,
    rules: &Rules,
    rng: &mut Rng,
    communities: usize,
    n: usize,
    deadline: Instant,
) -> Result<(Vec<Duration>, usize)> {
    let mut latencies = Vec::with_capacity(n);
    let mut rows = 0;
    let mut done = 0;
    while done < n && Instant::now() < deadline {
        let mut tx = store.begin().await?;
        for _ in 0..100.min(n - done) {
            if Instant::now() >= deadline {
                done = n;
                break;
            }
            let tag = comm_tag(rules, rng.below(communities) as u64);
            let t = Instant::now();
            rows += tx.state_tagged(STATE, &tag).await?.len();
            latencies.push(t.elapsed());
            done += 1;
        }
        tx.commit().await?;
    }
    latencies.sort_unstable();
    Ok((latencies, rows))
}

// ---------------------------------------------------------------------------------------------
// Driving the application

struct Answer {
    index: usize,
    status: u16,
    latency: Duration,
    body: Bytes,
    /// rule (transactions, µs) spent during this request (sequential runs only)
    rules: Option<(u64, u64)>,
}

fn post(body: Bytes) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri("/fhir")
        .header("content-type", "application/fhir+json")
        .header("accept", "application/fhir+json")
        .body(Body::from(body))
        .expect("request")
}

async fn send(router: &Router, body: Bytes) -> Result<(u16, Bytes)> {
    let resp = router
        .clone()
        .oneshot(post(body))
        .await
        .map_err(|e| anyhow::anyhow!("router: {e}"))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("response body: {e}"))?
        .to_bytes();
    Ok((status, bytes))
}

/// POST every body at concurrency `c`; answers in completion order, and the wall time.
async fn drive(router: &Router, bodies: &[Bytes], c: usize) -> Result<(Vec<Answer>, Duration)> {
    let bodies: Arc<Vec<Bytes>> = Arc::new(bodies.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..c {
        let (router, bodies, next) = (router.clone(), bodies.clone(), next.clone());
        handles.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(index) else {
                    break;
                };
                let t = Instant::now();
                let (status, body) = send(&router, body.clone()).await?;
                out.push(Answer {
                    index,
                    status,
                    latency: t.elapsed(),
                    body,
                    rules: None,
                });
            }
            anyhow::Ok(out)
        }));
    }
    let mut answers = Vec::with_capacity(bodies.len());
    for h in handles {
        answers.extend(h.await??);
    }
    Ok((answers, started.elapsed()))
}

/// POST one body at a time, with the rules' time of each, until `deadline` (if any).
async fn drive_sequential(
    router: &Router,
    bodies: &[Bytes],
    deadline: Option<Instant>,
) -> Result<Vec<Answer>> {
    let mut out = Vec::with_capacity(bodies.len());
    for (index, body) in bodies.iter().enumerate() {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let before = rule_time();
        let t = Instant::now();
        let (status, body) = send(router, body.clone()).await?;
        let latency = t.elapsed();
        let after = rule_time();
        out.push(Answer {
            index,
            status,
            latency,
            body,
            rules: Some((after.0 - before.0, after.1 - before.1)),
        });
    }
    Ok(out)
}

/// The esito-segnalazione code of a transaction-response (the segnalazione entry's receipt).
fn receipt(body: &Value) -> Option<String> {
    let system = format!("{CANON}/CodeSystem/esito-segnalazione");
    body["entry"]
        .as_array()?
        .iter()
        .flat_map(|e| {
            e["response"]["outcome"]["issue"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .flat_map(|i| i["details"]["coding"].as_array().into_iter().flatten())
        .find(|c| c["system"] == system.as_str())
        .and_then(|c| c["code"].as_str())
        .map(String::from)
}

/// Check the answers: statuses and receipts. Failures are counted into `checks`.
fn check(answers: &[Answer], kinds: &[Kind], checks: &mut Checks) {
    for a in answers {
        let kind = kinds[a.index];
        if !(200..300).contains(&a.status) {
            checks.fail(format!(
                "{}: HTTP {}: {}",
                kind.label(),
                a.status,
                String::from_utf8_lossy(&a.body[..a.body.len().min(600)])
            ));
            continue;
        }
        let got = serde_json::from_slice::<Value>(&a.body)
            .ok()
            .and_then(|b| receipt(&b))
            .unwrap_or_else(|| "(no receipt)".into());
        if got != kind.expected() {
            checks.fail(format!(
                "{}: receipt {got}, expected {}",
                kind.label(),
                kind.expected()
            ));
        }
        *checks.receipts.entry((kind, got)).or_default() += 1;
    }
}

#[derive(Default)]
struct Checks {
    failures: usize,
    first: Vec<String>,
    receipts: BTreeMap<(Kind, String), usize>,
}

impl Checks {
    fn fail(&mut self, what: String) {
        self.failures += 1;
        if self.first.len() < 5 {
            self.first.push(what);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Figures

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn sorted_ms(answers: &[Answer]) -> Vec<f64> {
    let mut v: Vec<f64> = answers
        .iter()
        .map(|a| a.latency.as_secs_f64() * 1e3)
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

struct IngestRow {
    label: &'static str,
    n: usize,
    wall: Duration,
    latencies_ms: Vec<f64>,
    rule_runs: u64,
    rule_us: u64,
}

impl IngestRow {
    fn rate(&self) -> f64 {
        self.n as f64 / self.wall.as_secs_f64()
    }
    fn rule_per_write_us(&self) -> f64 {
        self.rule_us as f64 / self.n as f64
    }
    fn mean_latency_us(&self) -> f64 {
        mean(&self.latencies_ms) * 1e3
    }
    fn wall_per_bundle_us(&self) -> f64 {
        self.wall.as_secs_f64() * 1e6 / self.n as f64
    }
}

struct ScaleRow {
    size: usize,
    /// join Bundles measured (K unless the time budget ran out)
    sent: usize,
    reports_in_db: i64,
    seeding: Duration,
    seeded: usize,
    lookup_p50_us: f64,
    lookup_p99_us: f64,
    lookup_rows: f64,
    join: SeqFigures,
    alone: SeqFigures,
}

struct SeqFigures {
    rule_mean_us: f64,
    rule_p50_us: f64,
    rule_p95_us: f64,
    lat_mean_ms: f64,
    lat_p50_ms: f64,
    lat_p95_ms: f64,
    runs: u64,
}

fn seq_figures(answers: &[Answer]) -> SeqFigures {
    let mut rule: Vec<f64> = answers
        .iter()
        .filter_map(|a| a.rules.map(|(_, us)| us as f64))
        .collect();
    rule.sort_by(f64::total_cmp);
    let lat = sorted_ms(answers);
    SeqFigures {
        rule_mean_us: mean(&rule),
        rule_p50_us: percentile(&rule, 50.0),
        rule_p95_us: percentile(&rule, 95.0),
        lat_mean_ms: mean(&lat),
        lat_p50_ms: percentile(&lat, 50.0),
        lat_p95_ms: percentile(&lat, 95.0),
        runs: answers.iter().filter_map(|a| a.rules.map(|r| r.0)).sum(),
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL database for the run (as in benches/dedup.rs), and a side connection to inspect

struct PgDatabase {
    admin: PgConnectOptions,
    name: String,
    created: bool,
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

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
        .context("the PostgreSQL URL must name a database")?
        .to_string();
    Ok((opts, name))
}

impl PgDatabase {
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

    async fn finish(self) -> Result<()> {
        if !self.created {
            println!(
                "note: database {} existed before the run and was kept (with what was written)",
                self.name
            );
            return Ok(());
        }
        let mut conn = PgConnection::connect_with(&self.admin).await?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&self.name)
        )))
        .execute(&mut conn)
        .await?;
        conn.close().await?;
        Ok(())
    }
}

/// The query `state_tagged` runs (src/store/sql.rs).
const TAGGED_SQL: &str = "SELECT s.key, s.value FROM rule_state_tags t JOIN rule_state s ON s.rule_set = t.rule_set AND s.key = t.key WHERE t.rule_set = $1 AND t.tag = $2 ORDER BY t.key";

enum Inspect {
    Sqlite(sqlx::SqliteConnection),
    Pg(PgConnection),
}

impl Inspect {
    async fn open(url: &str) -> Result<Self> {
        Ok(if is_postgres(url) {
            Inspect::Pg(PgConnection::connect(url).await?)
        } else {
            Inspect::Sqlite(sqlx::SqliteConnection::connect(url).await?)
        })
    }

    async fn count_reports(&mut self) -> Result<i64> {
        let sql = "SELECT COUNT(*) FROM rule_state WHERE rule_set = $1 AND key >= 'report:' AND key < 'report;'";
        Ok(match self {
            Inspect::Sqlite(c) => {
                sqlx::query_scalar::<_, i64>(sql)
                    .bind(STATE)
                    .fetch_one(c)
                    .await?
            }
            Inspect::Pg(c) => {
                sqlx::query_scalar::<_, i64>(sql)
                    .bind(STATE)
                    .fetch_one(c)
                    .await?
            }
        })
    }

    /// The plan of the comm-tag lookup (PostgreSQL: executed, with timing).
    async fn plan(&mut self, tag: &str) -> Result<Vec<String>> {
        Ok(match self {
            Inspect::Sqlite(c) => {
                let rows = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {TAGGED_SQL}")))
                    .bind(STATE)
                    .bind(tag)
                    .fetch_all(c)
                    .await?;
                rows.iter()
                    .map(|r| r.try_get::<String, _>(3).unwrap_or_default())
                    .collect()
            }
            Inspect::Pg(c) => {
                let rows = sqlx::query(AssertSqlSafe(format!(
                    "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {TAGGED_SQL}"
                )))
                .bind(STATE)
                .bind(tag)
                .fetch_all(c)
                .await?;
                rows.iter()
                    .map(|r| r.try_get::<String, _>(0).unwrap_or_default())
                    .collect()
            }
        })
    }

    async fn analyze(&mut self) -> Result<()> {
        if let Inspect::Pg(c) = self {
            sqlx::query("ANALYZE rule_state, rule_state_tags")
                .execute(c)
                .await?;
        }
        Ok(())
    }

    async fn close(self) {
        let _ = match self {
            Inspect::Sqlite(c) => c.close().await,
            Inspect::Pg(c) => c.close().await,
        };
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("notifications bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run() -> Result<bool> {
    let cfg = Config::from_env()?;
    if let Some(dir) = &cfg.write_dir {
        return write_bundles(&cfg, dir).map(|()| true);
    }
    let sizes: Vec<String> = cfg.sizes.iter().map(usize::to_string).collect();
    println!(
        "config: N={} C={} baseline={} sizes={} K={} lookups={} seed-tasks={} seed={} database: {}",
        cfg.n,
        cfg.c,
        cfg.baseline,
        if sizes.is_empty() {
            "(none)".to_string()
        } else {
            sizes.join(",")
        },
        cfg.k,
        cfg.lookups,
        cfg.seed_tasks,
        cfg.seed,
        redact(&cfg.database)
    );
    println!("reproduce: {}", cfg.reproduce_line());

    let pg = if is_postgres(&cfg.database) {
        Some(PgDatabase::prepare(&cfg.database).await?)
    } else {
        None
    };
    let own_database = cfg.fresh_sqlite || pg.as_ref().is_some_and(|p| p.created);
    if !own_database {
        println!(
            "note: the database existed before the run: sizes count only what is seeded here, and the focolaio count is not checked"
        );
    }
    let result = measure(&cfg, own_database).await;
    if let Some(db) = pg
        && let Err(e) = db.finish().await
    {
        eprintln!("dropping the benchmark database: {e:#}");
    }
    if cfg.fresh_sqlite
        && let Some(path) = cfg.database.strip_prefix("sqlite://")
    {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(PathBuf::from(format!("{path}{suffix}")));
        }
    }
    result
}

/// `SENTINELLA_NOTIF_WRITE_DIR`: the ingest Bundles as files, for wrk.
fn write_bundles(cfg: &Config, dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut generator = Generator::new(cfg.seed);
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).expect("ns");
    let (reports, communities) = generator.ingest(cfg.n);
    for (i, (_, s)) in reports.iter().enumerate() {
        let path = dir.join(format!("bundle-{i:05}.json"));
        std::fs::write(&path, serde_json::to_vec(&s.bundle(now))?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let line = format!(
        "notifications bench Bundles: N={} seed={} ({} outbreak communities); onsets relative to {}\n",
        cfg.n,
        cfg.seed,
        communities,
        rfc3339(now)
    );
    std::fs::write(dir.join("workload.txt"), &line)?;
    print!(
        "wrote {} Bundles to {}: {line}",
        reports.len(),
        dir.display()
    );
    Ok(())
}

fn to_bodies(
    reports: &[(Kind, Segnalazione)],
    now: OffsetDateTime,
) -> Result<(Vec<Kind>, Vec<Bytes>)> {
    let mut kinds = Vec::with_capacity(reports.len());
    let mut bodies = Vec::with_capacity(reports.len());
    for (k, s) in reports {
        kinds.push(*k);
        bodies.push(Bytes::from(serde_json::to_vec(&s.bundle(now))?));
    }
    Ok((kinds, bodies))
}

async fn ingest_phase(
    router: &Router,
    label: &'static str,
    reports: &[(Kind, Segnalazione)],
    c: usize,
    checks: &mut Checks,
) -> Result<IngestRow> {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).expect("ns");
    let (kinds, bodies) = to_bodies(reports, now)?;
    let before = rule_time();
    let (answers, wall) = drive(router, &bodies, c).await?;
    let after = rule_time();
    check(&answers, &kinds, checks);
    let row = IngestRow {
        label,
        n: bodies.len(),
        wall,
        latencies_ms: sorted_ms(&answers),
        rule_runs: after.0 - before.0,
        rule_us: after.1 - before.1,
    };
    println!(
        "{label}: {} Bundles at C={c} in {:.2} s | {:.1} Bundles/s | ms p50 {:.2} p95 {:.2} p99 {:.2} | rules: {} transactions, {:.0} µs per write",
        row.n,
        wall.as_secs_f64(),
        row.rate(),
        percentile(&row.latencies_ms, 50.0),
        percentile(&row.latencies_ms, 95.0),
        percentile(&row.latencies_ms, 99.0),
        row.rule_runs,
        row.rule_per_write_us()
    );
    Ok(row)
}

async fn count_focolai(router: &Router) -> Result<i64> {
    let uri = format!(
        "/fhir/Communication?_profile={CANON}/StructureDefinition/notifica-caso&category={CANON}/CodeSystem/tipo-notifica|focolaio&_summary=count"
    );
    let req = Request::builder()
        .method(Method::GET)
        .uri(uri.replace('|', "%7C"))
        .header("accept", "application/fhir+json")
        .body(Body::empty())?;
    let resp = router
        .clone()
        .oneshot(req)
        .await
        .map_err(|e| anyhow::anyhow!("router: {e}"))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .to_bytes();
    ensure!(
        status.is_success(),
        "focolaio search: HTTP {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    let v: Value = serde_json::from_slice(&bytes)?;
    v["total"].as_i64().context("a total in the search answer")
}

async fn measure(cfg: &Config, own_database: bool) -> Result<bool> {
    let rules = Arc::new(Rules::load()?);
    let t = Instant::now();
    let router = sentinella::server::build_app(AppConfig::with_database(&cfg.database))
        .await
        .with_context(|| format!("starting the application on {}", redact(&cfg.database)))?;
    println!(
        "application started (migrations, rules, schema warm-up) in {:.2} s; rule set {}",
        t.elapsed().as_secs_f64(),
        rules.canonical
    );
    let mut generator = Generator::new(cfg.seed);
    let mut checks = Checks::default();
    let mut outbreak_communities = 0usize;

    // ---- ingest ----
    let (warm, warm_communities) = generator.ingest(WARMUP.max(cfg.c * 4));
    outbreak_communities += warm_communities;
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).expect("ns");
    let (warm_kinds, warm_bodies) = to_bodies(&warm, now)?;
    let (answers, _) = drive(&router, &warm_bodies, cfg.c).await?;
    check(&answers, &warm_kinds, &mut checks);
    let mut ingest_rows = Vec::new();
    if cfg.baseline {
        let reports = generator.baseline(cfg.n);
        ingest_rows.push(ingest_phase(&router, "baseline", &reports, cfg.c, &mut checks).await?);
    }
    let (reports, communities) = generator.ingest(cfg.n);
    outbreak_communities += communities;
    ingest_rows.push(ingest_phase(&router, "mixed", &reports, cfg.c, &mut checks).await?);
    println!("  (mixed: {communities} outbreak communities of 2 to 4 cases)");

    // ---- scale ----
    let mut scale_rows = Vec::new();
    let mut joined: BTreeSet<u64> = BTreeSet::new();
    if !cfg.sizes.is_empty() {
        let store = sentinella::store::connect(&cfg.database)
            .await
            .with_context(|| format!("opening {}", redact(&cfg.database)))?;
        let salt = mix(cfg.seed ^ 0x5ca1e);
        let mut rng = Rng(mix(cfg.seed ^ 0x10c));
        let mut stored = 0usize;
        for &size in &cfg.sizes {
            let t = Instant::now();
            let refused = if cfg.seed_through_store {
                seed(&store, &rules, salt, stored, size, cfg.seed_tasks).await?
            } else {
                seed_sql(&cfg.database, &rules, salt, stored, size, cfg.seed_tasks).await?
            };
            let seeding = t.elapsed();
            let seeded_now = size - stored;
            println!(
                "seeded {seeded_now} reports and their cases ({stored} → {size}) {} in {:.1} s, {:.0} reports/s{}",
                if cfg.seed_through_store {
                    "through the store"
                } else {
                    "with multi-row INSERTs"
                },
                seeding.as_secs_f64(),
                seeded_now as f64 / seeding.as_secs_f64(),
                if refused > 0 {
                    format!(" ({refused} records refused: keys already there)")
                } else {
                    String::new()
                }
            );
            stored = size;
            let communities = size / REPORTS_PER_COMMUNITY;

            let mut inspect = Inspect::open(&cfg.database).await?;
            let reports_in_db = inspect.count_reports().await?;
            let probe = comm_tag(&rules, rng.below(communities) as u64);
            if is_postgres(&cfg.database) {
                println!("  plan of the comm lookup, statistics as seeding left them:");
                for line in inspect.plan(&probe).await? {
                    println!("    {line}");
                }
                inspect.analyze().await?;
                println!(
                    "  plan after ANALYZE rule_state, rule_state_tags (what autovacuum does):"
                );
            } else {
                println!("  plan of the comm lookup:");
            }
            for line in inspect.plan(&probe).await? {
                println!("    {line}");
            }
            inspect.close().await;

            // the lookup itself, through the store (a quarter of the time budget at most)
            let started = Instant::now();
            time_lookups(
                &store,
                &rules,
                &mut rng,
                communities,
                20,
                started + cfg.budget / 20,
            )
            .await?;
            let deadline = started + cfg.budget / 4;
            let (lookups, rows) = time_lookups(
                &store,
                &rules,
                &mut rng,
                communities,
                cfg.lookups.max(1),
                deadline.max(Instant::now() + Duration::from_secs(1)),
            )
            .await?;
            if lookups.len() < cfg.lookups {
                println!(
                    "  note: time budget reached after {} of {} lookups",
                    lookups.len(),
                    cfg.lookups
                );
            }
            let lookups_us: Vec<f64> = lookups.iter().map(|d| d.as_secs_f64() * 1e6).collect();
            let (l50, l99) = (percentile(&lookups_us, 50.0), percentile(&lookups_us, 99.0));
            println!(
                "  comm lookup through the store ({} lookups, {:.2} rows each): µs p50 {l50:.1} p99 {l99:.1}",
                lookups.len(),
                rows as f64 / lookups.len() as f64
            );

            // warm-up, then K join and K alone Bundles, interleaved, one at a time
            let now = OffsetDateTime::now_utc().replace_nanosecond(0).expect("ns");
            let mut kinds = Vec::new();
            let mut bodies = Vec::new();
            let mut alone_n = 0u64;
            let mut alone = |generator: &mut Generator, c: u64| -> Result<(Kind, Bytes)> {
                let code = community_code(c);
                let mut s = generator.report(code);
                s.onset_days_ago = 2;
                alone_n += 1;
                s.community = Some(School {
                    code: format!("MIAL{}{size}X{alone_n}", &generator.run[..4]).to_uppercase(),
                    at_risk: 30,
                });
                Ok((
                    Kind::Alone(rules.codes[code].0),
                    Bytes::from(serde_json::to_vec(&s.bundle(now))?),
                ))
            };
            let mut warm_kinds = Vec::new();
            let mut warm_bodies = Vec::new();
            let mut join_of: Vec<Option<u64>> = Vec::new();
            for _ in 0..WARMUP {
                let (k, b) = alone(&mut generator, rng.below(communities) as u64)?;
                warm_kinds.push(k);
                warm_bodies.push(b);
            }
            for _ in 0..cfg.k {
                let c = rng.below(communities) as u64;
                join_of.push(Some(c));
                join_of.push(None);
                let code = community_code(c);
                let mut s = generator.report(code);
                s.onset_days_ago = 2;
                s.community = Some(community_school(c));
                kinds.push(Kind::Join(rules.codes[code].0));
                bodies.push(Bytes::from(serde_json::to_vec(&s.bundle(now))?));
                let (k, b) = alone(&mut generator, rng.below(communities) as u64)?;
                kinds.push(k);
                bodies.push(b);
            }
            let deadline = started + cfg.budget;
            let answers = drive_sequential(
                &router,
                &warm_bodies,
                Some(Instant::now() + cfg.budget / 10),
            )
            .await?;
            check(&answers, &warm_kinds, &mut checks);
            let answers = drive_sequential(&router, &bodies, Some(deadline)).await?;
            check(&answers, &kinds, &mut checks);
            joined.extend(answers.iter().filter_map(|a| join_of[a.index]));
            if answers.len() < bodies.len() {
                println!(
                    "  note: time budget ({} s) reached after {} of {} join and alone Bundles",
                    cfg.budget.as_secs(),
                    answers.len(),
                    bodies.len()
                );
            }
            let (join, alone): (Vec<Answer>, Vec<Answer>) = answers
                .into_iter()
                .partition(|a| matches!(kinds[a.index], Kind::Join(_)));
            let row = ScaleRow {
                size,
                reports_in_db,
                seeding,
                seeded: seeded_now,
                lookup_p50_us: l50,
                lookup_p99_us: l99,
                lookup_rows: rows as f64 / lookups.len() as f64,
                join: seq_figures(&join),
                alone: seq_figures(&alone),
                sent: join.len(),
            };
            println!(
                "  {size} reports ({reports_in_db} in rule_state): join: rule µs mean {:.0} p50 {:.0} p95 {:.0} | ms mean {:.2} p95 {:.2} || alone: rule µs mean {:.0} p50 {:.0} p95 {:.0} | ms mean {:.2} p95 {:.2}",
                row.join.rule_mean_us,
                row.join.rule_p50_us,
                row.join.rule_p95_us,
                row.join.lat_mean_ms,
                row.join.lat_p95_ms,
                row.alone.rule_mean_us,
                row.alone.rule_p50_us,
                row.alone.rule_p95_us,
                row.alone.lat_mean_ms,
                row.alone.lat_p95_ms
            );
            if row.join.runs != join.len() as u64 || row.alone.runs != alone.len() as u64 {
                println!(
                    "  note: rules ran {} times for {} join and {} times for {} alone Bundles",
                    row.join.runs,
                    join.len(),
                    row.alone.runs,
                    alone.len()
                );
            }
            scale_rows.push(row);
        }
        drop(store);
    }
    let expected_focolai = outbreak_communities + joined.len();
    let focolai = count_focolai(&router).await?;
    drop(router);

    // ---- summary ----
    println!("---");
    let backend = if is_postgres(&cfg.database) {
        "postgres"
    } else {
        "sqlite"
    };
    println!(
        "database={backend} N={} C={} K={} seed={} (in process: tower oneshot, no sockets)",
        cfg.n, cfg.c, cfg.k, cfg.seed
    );
    println!(
        "{:>9} | {:>6} | {:>9} | {:>7} | {:>7} | {:>7} | {:>8} | {:>9} | {:>10} | {:>10} | {:>10}",
        "ingest",
        "N",
        "Bundles/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "mean ms",
        "rule µs/w",
        "÷ latency",
        "÷ wall×C",
        "÷ wall"
    );
    for r in &ingest_rows {
        let rule = r.rule_per_write_us();
        println!(
            "{:>9} | {:>6} | {:>9.1} | {:>7.2} | {:>7.2} | {:>7.2} | {:>8.2} | {:>9.0} | {:>9.1}% | {:>9.1}% | {:>9.1}%",
            r.label,
            r.n,
            r.rate(),
            percentile(&r.latencies_ms, 50.0),
            percentile(&r.latencies_ms, 95.0),
            percentile(&r.latencies_ms, 99.0),
            mean(&r.latencies_ms),
            rule,
            100.0 * rule / r.mean_latency_us(),
            100.0 * rule / (r.wall_per_bundle_us() * cfg.c as f64),
            100.0 * rule / r.wall_per_bundle_us(),
        );
    }
    println!(
        "  rule µs/w: rule_time() delta ÷ Bundles; ÷ latency: of the mean request latency; ÷ wall×C: of wall time per Bundle × C (the ingest cost of a Bundle); ÷ wall: of wall time per Bundle (the rules run inside the write transaction: on SQLite's single writer this is the share of the serial path)"
    );
    if let [base, mixed] = &ingest_rows[..] {
        println!(
            "  mixed vs baseline: throughput ×{:.2}, mean latency {:+.2} ms, rule µs per write {:+.0}",
            mixed.rate() / base.rate(),
            mean(&mixed.latencies_ms) - mean(&base.latencies_ms),
            mixed.rule_per_write_us() - base.rule_per_write_us()
        );
    }
    if !scale_rows.is_empty() {
        println!(
            "{:>9} | {:>9} | {:>9} | {:>8} | {:>13} | {:>5} | {:>21} | {:>25} | {:>21} | {:>25}",
            "seeded",
            "in table",
            "seeding s",
            "seeded/s",
            "lookup µs",
            "joins",
            "join rule µs",
            "join ms",
            "alone rule µs",
            "alone ms"
        );
        println!(
            "{:>9} | {:>9} | {:>9} | {:>8} | {:>13} | {:>5} | {:>21} | {:>25} | {:>21} | {:>25}",
            "reports",
            "reports",
            "",
            "",
            "p50 / p99",
            "",
            "mean / p50 / p95",
            "mean / p50 / p95",
            "mean / p50 / p95",
            "mean / p50 / p95"
        );
        for r in &scale_rows {
            println!(
                "{:>9} | {:>9} | {:>9.1} | {:>8.0} | {:>6.1} /{:>6.1} | {:>5} | {:>6.0} /{:>6.0} /{:>6.0} | {:>7.2} /{:>7.2} /{:>7.2} | {:>6.0} /{:>6.0} /{:>6.0} | {:>7.2} /{:>7.2} /{:>7.2}",
                r.size,
                r.reports_in_db,
                r.seeding.as_secs_f64(),
                r.seeded as f64 / r.seeding.as_secs_f64(),
                r.lookup_p50_us,
                r.lookup_p99_us,
                r.sent,
                r.join.rule_mean_us,
                r.join.rule_p50_us,
                r.join.rule_p95_us,
                r.join.lat_mean_ms,
                r.join.lat_p50_ms,
                r.join.lat_p95_ms,
                r.alone.rule_mean_us,
                r.alone.rule_p50_us,
                r.alone.rule_p95_us,
                r.alone.lat_mean_ms,
                r.alone.lat_p50_ms,
                r.alone.lat_p95_ms
            );
        }
        println!(
            "  seeded: rule-state reports seeded (each with its case; 5 per school, {:.2} rows per comm lookup at the last size); in table: every report: record in rule_state (the ingest phase's too)",
            scale_rows.last().map_or(f64::NAN, |r| r.lookup_rows)
        );
        if let (Some(first), Some(last)) = (scale_rows.first(), scale_rows.last())
            && scale_rows.len() > 1
        {
            println!(
                "  {}→{} reports: join rule µs mean ×{:.2}, p95 ×{:.2} | join latency mean ×{:.2} | lookup p50 ×{:.2} | alone rule µs mean ×{:.2}",
                first.size,
                last.size,
                last.join.rule_mean_us / first.join.rule_mean_us,
                last.join.rule_p95_us / first.join.rule_p95_us,
                last.join.lat_mean_ms / first.join.lat_mean_ms,
                last.lookup_p50_us / first.lookup_p50_us,
                last.alone.rule_mean_us / first.alone.rule_mean_us
            );
        }
    }
    println!("receipts:");
    for ((kind, code), n) in &checks.receipts {
        println!("  {:<28} {code:<18} {n}", kind.label());
    }
    let mut ok = checks.failures == 0;
    println!(
        "focolaio notifications: {focolai} (outbreak communities sent: {outbreak_communities} in ingest, {} seeded communities joined)",
        joined.len()
    );
    if own_database && focolai != expected_focolai as i64 {
        println!("WRONG: expected {expected_focolai} focolaio notifications, found {focolai}");
        ok = false;
    }
    if checks.failures > 0 {
        println!(
            "FAILED: {} requests or receipts wrong; first:",
            checks.failures
        );
        for f in &checks.first {
            println!("  {f}");
        }
    }
    Ok(ok)
}
