//! Periodic summaries benchmark: does `$evaluate-measure` for one region and one month answer in
//! well under a second when a million case notifications are stored, on SQLite and PostgreSQL?
//!
//! The store is seeded through `StoreTx::register_case` (the call the rules make when they decide a
//! case), `SENTINELLA_MEASURES_N` cases (default 1 000 000) over the twelve months of 2026 and the
//! 21 regions, with the class mix of a year of notifications: 45% class II, 10% class III (half of
//! them tuberculosis), 15% class V, 20% class IV, 5% class I, 5% CRE; ages 0–100, both sexes, the
//! province drawn among the region's own (`ConceptMap-provincia-regione`), an ASL for Lombardy's
//! cases (`CodeSystem-asl`), 3% withdrawn. Lombardy gets a sixth of the cases (its share of
//! notifications is about that), so its region-month is the largest: about 14 000 cases per month
//! at 1 M.
//!
//! Then `sentinella::measures::evaluate::evaluate` — what the HTTP operation calls — is timed
//! `SENTINELLA_MEASURES_RUNS` times (default 50) for each of: Modello 16-bis for Lombardy for
//! March (summary), Modello 16 for one ATS for March, the CRE monthly summary for Lombardy, the
//! class V annual summary for Lombardy (a year), Modello 16-bis for the whole country for March, and
//! once the subject-list report for Lombardy for March. Reported: min, p50, p95, max, and the
//! count, which is checked against the seeded cases (an independent count kept while seeding).
//! Last, the stored reports of March are generated twice (`generate`, what the hourly run and
//! `MeasureReport/$generate-reports` call): the first run creates them, the second finds them
//! unchanged.
//!
//! SQLite by default (a temporary file, removed at the end unless `SENTINELLA_MEASURES_KEEP=1`,
//! which prints its URL: serve it with the release binary and drive `$evaluate-measure` with wrk,
//! e.g. `target/release/sentinella serve --database <URL> --summary-every-minutes 0` and
//! `wrk -t2 -c16 -d30s --latency 'http://127.0.0.1:8080/fhir/Measure/modello-16-bis/$evaluate-measure?periodStart=2026-03&periodEnd=2026-03&subject=https://sentinella-fhir.github.io/ig/sid/regione|030'`);
//! `SENTINELLA_BENCH_DATABASE=postgres://postgres@127.0.0.1:5432/<name>` measures PostgreSQL (the
//! database is created if missing and dropped at the end unless kept). `SENTINELLA_BENCH_SEED`
//! fixes the generated data (random by default, printed).
use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sentinella::measures::definition::measure;
use sentinella::measures::evaluate::{Detail, Period, Subject, evaluate};
use sentinella::store::{RegisteredCase, SharedStore};
use serde_json::Value;
use sqlx::Connection;

const BATCH: usize = 10_000;
const LOMBARDIA: &str = "030";
const ATS: &[&str] = &[
    "030321", "030322", "030323", "030324", "030325", "030326", "030327", "030328",
];

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The provinces of each region, from the ConceptMap the server itself reads.
fn provinces() -> Result<Vec<(String, Vec<String>)>> {
    let text = std::fs::read_to_string("terminology/ConceptMap-provincia-regione.json")
        .context("run from the repository root")?;
    let map: Value = serde_json::from_str(&text)?;
    let mut by_region: HashMap<String, Vec<String>> = HashMap::new();
    for g in map["group"].as_array().into_iter().flatten() {
        for e in g["element"].as_array().into_iter().flatten() {
            if let (Some(p), Some(r)) = (e["code"].as_str(), e["target"][0]["code"].as_str()) {
                by_region
                    .entry(r.to_string())
                    .or_default()
                    .push(p.to_string());
            }
        }
    }
    let mut out: Vec<_> = by_region.into_iter().collect();
    out.sort();
    Ok(out)
}

/// What the seeding put where: the independent count the timings are checked against.
#[derive(Default)]
struct Expected {
    /// (measure id, area, period label) → standing cases
    counts: HashMap<(String, String, String), i64>,
}

impl Expected {
    fn add(&mut self, measure: &str, area: &str, period: &str) {
        *self
            .counts
            .entry((measure.into(), area.into(), period.into()))
            .or_default() += 1;
    }

    fn get(&self, measure: &str, area: &str, period: &str) -> i64 {
        self.counts
            .get(&(measure.into(), area.into(), period.into()))
            .copied()
            .unwrap_or(0)
    }
}

fn case(
    rng: &mut StdRng,
    i: u64,
    regions: &[(String, Vec<String>)],
    x: &mut Expected,
) -> RegisteredCase {
    let lombardy = rng.random_range(0..6) == 0;
    let (region, provinces) = if lombardy {
        regions
            .iter()
            .find(|(r, _)| r == LOMBARDIA)
            .expect("Lombardy")
    } else {
        &regions[rng.random_range(0..regions.len())]
    };
    let province = provinces[rng.random_range(0..provinces.len())].clone();
    let asl = (region == LOMBARDIA).then(|| ATS[rng.random_range(0..ATS.len())].to_string());
    let month = rng.random_range(1..=12);
    let day = 20260000 + month * 100 + rng.random_range(1..=28);
    let roll = rng.random_range(0..100);
    let (family, category, disease, code) = match roll {
        0..45 => ("dm-1990", "classe-2", "055", "055.9"),
        45..50 => ("dm-1990", "classe-3", "010-018", "011.93"),
        50..55 => ("dm-1990", "classe-3", "084", "084.0"),
        55..70 => ("dm-1990", "classe-5", "001-139", "088.81"),
        70..90 => ("dm-1990", "classe-4", "133.0", "133.0"),
        90..95 => ("dm-1990", "classe-1", "032", "032.9"),
        _ => ("cre", "cre", "041.3", "041.3"),
    };
    let active = rng.random_range(0..100) >= 3;
    if active {
        let m = format!("2026-{month:02}");
        let counted16 = category == "classe-2" || disease == "010-018";
        if counted16 {
            x.add("modello-16-bis", region, &m);
            x.add("modello-16-bis", "IT", &m);
            if let Some(a) = &asl {
                x.add("modello-16", a, &m);
            }
        }
        if category == "cre" {
            x.add("cre-mensile", region, &m);
        }
        if category == "classe-5" {
            x.add("classe-5-annuale", region, "2026");
        }
    }
    RegisteredCase {
        case_id: format!("bench-{i:08}"),
        family: family.into(),
        category: category.into(),
        disease: disease.into(),
        code: code.into(),
        day,
        age: Some(rng.random_range(0..=100).min(99)),
        sex: if rng.random_bool(0.5) {
            "male"
        } else {
            "female"
        }
        .into(),
        comune: Some(format!("{province}001")),
        province: Some(province),
        asl,
        region: Some(region.clone()),
        active,
        refs: vec![format!("Communication/bench-{i:08}")],
    }
}

async fn seed(store: &SharedStore, n: u64, rng: &mut StdRng) -> Result<Expected> {
    let regions = provinces()?;
    let mut x = Expected::default();
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        let mut tx = store.begin().await?;
        let end = (i + BATCH as u64).min(n);
        while i < end {
            tx.register_case(&case(rng, i, &regions, &mut x)).await?;
            i += 1;
        }
        tx.commit().await?;
        if i % 100_000 == 0 || i == n {
            eprintln!(
                "  seeded {i} cases ({:.0}/s)",
                i as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(x)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn time(
    store: &SharedStore,
    label: &str,
    (measure_id, period, subject): (&str, Period, Option<Subject>),
    detail: Detail,
    runs: u64,
    expected: i64,
) -> Result<()> {
    let m = measure(measure_id).context("measure")?;
    let mut times = Vec::new();
    let mut count = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let report = evaluate(store.as_ref(), m, &period, subject.as_ref(), detail).await?;
        times.push(t.elapsed());
        count = report["group"][0]["population"][0]["count"]
            .as_i64()
            .unwrap_or(-1);
    }
    ensure!(
        count == expected,
        "{label}: counted {count}, the seeding put {expected}"
    );
    times.sort();
    println!(
        "| {label} | {count} | {:.1} | {:.1} | {:.1} | {:.1} |",
        pct(&times, 0.0),
        pct(&times, 0.5),
        pct(&times, 0.95),
        pct(&times, 1.0)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let n = env_num("SENTINELLA_MEASURES_N", 1_000_000);
    let runs = env_num("SENTINELLA_MEASURES_RUNS", 50).max(1);
    let keep = std::env::var("SENTINELLA_MEASURES_KEEP").is_ok_and(|v| v == "1");
    let seed_value = std::env::var("SENTINELLA_BENCH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let (url, sqlite_file, pg) = match std::env::var("SENTINELLA_BENCH_DATABASE") {
        Ok(url) if url.starts_with("postgres") => {
            let (admin, name) = url.rsplit_once('/').context("postgres://…/NAME")?;
            let mut conn = sqlx::PgConnection::connect(&format!("{admin}/postgres")).await?;
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut conn)
                .await;
            (
                url.clone(),
                None,
                Some((admin.to_string(), name.to_string())),
            )
        }
        Ok(url) => (url, None, None),
        Err(_) => {
            let path = std::env::temp_dir().join(format!(
                "sentinella-measures-bench-{}.db",
                uuid::Uuid::new_v4().simple()
            ));
            (format!("sqlite://{}", path.display()), Some(path), None)
        }
    };
    println!("measures benchmark: N={n} runs={runs} SENTINELLA_BENCH_SEED={seed_value}");
    let store = sentinella::store::connect(&url).await?;
    let mut rng = StdRng::seed_from_u64(seed_value);
    let t = Instant::now();
    let x = seed(&store, n, &mut rng).await?;
    println!(
        "seeded {n} cases through the store in {:.1} s ({})",
        t.elapsed().as_secs_f64(),
        store.backend()
    );
    let march = Period::month(2026, 3).context("month")?;
    let year = Period::year(2026).context("year")?;
    let region = || Some(Subject::of("regione", LOMBARDIA));
    println!(
        "\n| evaluation | count | min ms | p50 ms | p95 ms | max ms |\n|---|---|---|---|---|---|"
    );
    let cases = [
        (
            "Modello 16-bis, Lombardia, March (summary)",
            ("modello-16-bis", march, region()),
            Detail::Summary,
            runs,
            x.get("modello-16-bis", LOMBARDIA, "2026-03"),
        ),
        (
            "Modello 16, ATS 030321, March (summary)",
            ("modello-16", march, Some(Subject::of("asl", "030321"))),
            Detail::Summary,
            runs,
            x.get("modello-16", "030321", "2026-03"),
        ),
        (
            "CRE monthly, Lombardia, March (summary)",
            ("cre-mensile", march, region()),
            Detail::Summary,
            runs,
            x.get("cre-mensile", LOMBARDIA, "2026-03"),
        ),
        (
            "Class V annual, Lombardia, 2026 (summary)",
            ("classe-5-annuale", year, region()),
            Detail::Summary,
            runs,
            x.get("classe-5-annuale", LOMBARDIA, "2026"),
        ),
        (
            "Modello 16-bis, Italy, March (summary)",
            ("modello-16-bis", march, None),
            Detail::Summary,
            runs.min(10),
            x.get("modello-16-bis", "IT", "2026-03"),
        ),
        (
            "Modello 16-bis, Lombardia, March (subject-list)",
            ("modello-16-bis", march, region()),
            Detail::SubjectList,
            runs.min(5),
            x.get("modello-16-bis", LOMBARDIA, "2026-03"),
        ),
    ];
    let mut failed = None;
    for (label, what, detail, r, expected) in cases {
        if let Err(e) = time(&store, label, what, detail, r, expected).await {
            eprintln!("{e:#}");
            failed = Some(e);
        }
    }
    // the stored reports of a month: every ASL's Modello 16, every region's 16-bis and CRE
    let dispatcher = sentinella::subscriptions::dispatch::Dispatcher::new(
        std::sync::Arc::new(sentinella::auth::Access::development()),
        false,
    );
    let month = sentinella::measures::generate::Due::Month(2026, 3);
    for run in ["first", "again"] {
        let t = Instant::now();
        let g = sentinella::measures::generate::generate(&store, &dispatcher, month).await?;
        println!(
            "\n$generate-reports 2026-03 ({run}): {} created, {} updated, {} unchanged in {:.0} ms",
            g.created,
            g.updated,
            g.unchanged,
            t.elapsed().as_secs_f64() * 1000.0
        );
    }
    drop(store);
    if keep {
        println!("\nkept: {url}");
    } else {
        if let Some(path) = sqlite_file {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
        if let Some((admin, name)) = pg {
            let mut conn = sqlx::PgConnection::connect(&format!("{admin}/postgres")).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await?;
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
