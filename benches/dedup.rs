//! Dedup benchmark: does the CRE case lookup stay flat as the case tables grow?
//!
//! Uses the library's store directly (no HTTP): seeds cases into `cre_cases` / `cre_isolates` with
//! `cre_claim_case` + `cre_put_isolate` (one qualifying isolate per case, 10 000 per transaction),
//! then times lookups as the engine does them for a key (`cre_active_case` + `cre_isolates_of_key`),
//! half of them hits and half misses, inside transactions that only read. The same database grows
//! from one size to the next.
//!
//! SQLite by default (a temporary file, removed at the end);
//! `SENTINELLA_BENCH_DATABASE=postgres://postgres@127.0.0.1:5432/<name>` measures PostgreSQL (the
//! database is created if missing and, if it was created here, dropped at the end).
//!
//! Other knobs: `SENTINELLA_DEDUP_SIZES` (stored cases, ascending, default
//! "10000,100000,1000000"), `SENTINELLA_DEDUP_LOOKUPS` (timed lookups per size, default 20000)
//! and `SENTINELLA_BENCH_SEED` (which keys are looked up; random by default and printed).
//!
//! Nothing is asserted about timings; a lookup that returns the wrong answer is counted and makes
//! the run fail.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use sentinella::store::{CaseKey, CaseRow, IsolateState, SharedStore};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection};

const SEED_BATCH: usize = 10_000;
/// Timed lookups per read transaction.
const LOOKUPS_PER_TX: usize = 1_000;
/// Untimed lookups before each measurement (statement caches, connection warm-up).
const WARMUP_LOOKUPS: usize = 1_000;
const SPECIES: [&str; 2] = ["klebsiella-pneumoniae", "escherichia-coli"];
const FIRST_YEAR: i32 = 2021;
const YEARS: u64 = 5;

// ---------------------------------------------------------------------------------------------
// Configuration

struct Config {
    /// The database URL and whether it is a temporary SQLite file of this run.
    database: String,
    fresh_sqlite: bool,
    sizes: Vec<usize>,
    lookups: usize,
    seed: u64,
}

fn env_opt(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres:") || url.starts_with("postgresql:")
}

impl Config {
    fn from_env() -> Result<Self> {
        let sizes_text =
            env_opt("SENTINELLA_DEDUP_SIZES").unwrap_or_else(|| "10000,100000,1000000".into());
        let mut sizes = sizes_text
            .split(',')
            .map(|s| {
                s.trim()
                    .replace('_', "")
                    .parse::<usize>()
                    .with_context(|| format!("SENTINELLA_DEDUP_SIZES={sizes_text}"))
            })
            .collect::<Result<Vec<_>>>()?;
        ensure!(
            sizes.iter().all(|&n| n > 0),
            "SENTINELLA_DEDUP_SIZES: sizes must be at least 1"
        );
        sizes.sort_unstable();
        sizes.dedup();
        let lookups = match env_opt("SENTINELLA_DEDUP_LOOKUPS") {
            Some(v) => v
                .trim()
                .parse()
                .with_context(|| format!("SENTINELLA_DEDUP_LOOKUPS={v}"))?,
            None => 20_000,
        };
        ensure!(lookups >= 2, "SENTINELLA_DEDUP_LOOKUPS must be at least 2");
        let seed = match env_opt("SENTINELLA_BENCH_SEED") {
            Some(s) => s
                .trim()
                .parse()
                .with_context(|| format!("SENTINELLA_BENCH_SEED={s}"))?,
            None => uuid::Uuid::new_v4().as_u64_pair().0,
        };
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
                let path = std::env::temp_dir()
                    .join(format!("sentinella-dedup-{}.db", uuid::Uuid::new_v4()));
                (format!("sqlite://{}", path.display()), true)
            }
        };
        Ok(Config {
            database,
            fresh_sqlite,
            sizes,
            lookups,
            seed,
        })
    }

    fn reproduce_line(&self) -> String {
        let sizes: Vec<String> = self.sizes.iter().map(usize::to_string).collect();
        let mut s = format!(
            "SENTINELLA_DEDUP_SIZES={} SENTINELLA_DEDUP_LOOKUPS={} SENTINELLA_BENCH_SEED={}",
            sizes.join(","),
            self.lookups,
            self.seed
        );
        if !self.fresh_sqlite {
            let _ = write!(s, " SENTINELLA_BENCH_DATABASE={}", redact(&self.database));
        }
        s + " cargo bench --bench dedup"
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
// The synthetic cases: case `i` is a pure function of `i`, so nothing is kept in memory and a hit
// can be rebuilt at lookup time. Indexes at or above the largest size are never stored: misses.

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
}

/// A codice-fiscale-shaped identity (`CF:` + 16 characters, as the engine stores it), unique per
/// `i` in practice (about 59 bits of the bijective hash; a collision would show as a failed claim).
fn identity(i: u64) -> String {
    const MONTHS: &[u8; 12] = b"ABCDEHLMPRST";
    let mut v = mix(i ^ 0x5e17_1e11a);
    let mut take = |n: u64| {
        let r = v % n;
        v /= n;
        r
    };
    let mut s = String::with_capacity(19);
    s.push_str("CF:");
    for _ in 0..6 {
        s.push(char::from(b'A' + take(26) as u8));
    }
    let _ = write!(s, "{:02}", take(100));
    s.push(char::from(MONTHS[take(12) as usize]));
    let day = 1 + take(31) + 40 * take(2);
    let _ = write!(s, "{day:02}");
    s.push(char::from(b'A' + take(26) as u8));
    let _ = write!(s, "{:03}", take(1000));
    s.push(char::from(b'A' + (mix(i) % 26) as u8));
    s
}

fn case_key(i: u64) -> CaseKey {
    let h = mix(i.wrapping_mul(31).wrapping_add(7));
    CaseKey {
        identity: identity(i),
        species: SPECIES[(h % 2) as usize].to_string(),
        year: FIRST_YEAR + ((h >> 8) % YEARS) as i32,
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

fn case_id(i: u64) -> String {
    uuid_of(i, 0xca5e)
}

fn isolate_id(i: u64) -> String {
    uuid_of(i, 0x150_1a7e)
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

/// Store cases `from..to`, `SEED_BATCH` per committed transaction. Returns the failed claims.
async fn seed(store: &SharedStore, from: usize, to: usize) -> Result<usize> {
    let mut refused = 0;
    let mut start = from;
    while start < to {
        let end = (start + SEED_BATCH).min(to);
        let mut tx = store.begin().await?;
        for i in start as u64..end as u64 {
            let key = case_key(i);
            // the year's reference time: 1 March of the key's year, plus a little per case
            let ref_time = (i64::from(key.year - 1970) * 365 + 59) * 86_400_000_000
                + (i % 86_400) as i64 * 1_000_000;
            tx.cre_put_isolate(&IsolateState {
                isolate_id: isolate_id(i),
                key: key.clone(),
                ref_time,
                qualifies: true,
            })
            .await?;
            let claimed = tx
                .cre_claim_case(
                    &CaseRow {
                        case_id: case_id(i),
                        key,
                        isolate_id: isolate_id(i),
                        active: true,
                    },
                    now_micros(),
                )
                .await?;
            refused += usize::from(!claimed);
        }
        tx.commit().await?;
        start = end;
    }
    Ok(refused)
}

// ---------------------------------------------------------------------------------------------
// The lookups

/// Which case to look up: a stored one (hit) or one never stored (miss).
#[derive(Clone, Copy)]
struct Probe {
    index: u64,
    hit: bool,
}

/// Half hits among the `stored` cases, half misses (indexes above everything ever stored), shuffled.
fn probes(rng: &mut Rng, n: usize, stored: usize, never_stored_from: u64) -> Vec<Probe> {
    let mut out: Vec<Probe> = (0..n)
        .map(|k| {
            if k % 2 == 0 {
                Probe {
                    index: rng.below(stored) as u64,
                    hit: true,
                }
            } else {
                Probe {
                    index: never_stored_from + rng.next_u64() % (1 << 40),
                    hit: false,
                }
            }
        })
        .collect();
    for i in (1..out.len()).rev() {
        out.swap(i, rng.below(i + 1));
    }
    out
}

struct Measured {
    wall: Duration,
    /// Per lookup (`cre_active_case` + `cre_isolates_of_key`), sorted.
    latencies: Vec<Duration>,
    wrong: usize,
    first_wrong: Option<String>,
}

/// Run the probes, `LOOKUPS_PER_TX` per transaction that only reads (committed with no changes).
async fn look_up(store: &SharedStore, probes: &[Probe]) -> Result<Measured> {
    let mut latencies = Vec::with_capacity(probes.len());
    let mut wrong = 0;
    let mut first_wrong = None;
    let start = Instant::now();
    for chunk in probes.chunks(LOOKUPS_PER_TX) {
        let mut tx = store.begin().await?;
        for p in chunk {
            let key = case_key(p.index);
            let t = Instant::now();
            let active = tx.cre_active_case(&key).await?;
            let qualifying = tx.cre_isolates_of_key(&key).await?;
            latencies.push(t.elapsed());
            let right = if p.hit {
                let isolate = isolate_id(p.index);
                active.is_some_and(|c| c.case_id == case_id(p.index) && c.isolate_id == isolate)
                    && qualifying == [isolate]
            } else {
                active.is_none() && qualifying.is_empty()
            };
            if !right {
                wrong += 1;
                first_wrong.get_or_insert_with(|| {
                    format!(
                        "{} {}|{}|{}",
                        if p.hit { "hit" } else { "miss" },
                        key.identity,
                        key.species,
                        key.year
                    )
                });
            }
        }
        tx.commit().await?;
    }
    let wall = start.elapsed();
    latencies.sort_unstable();
    Ok(Measured {
        wall,
        latencies,
        wrong,
        first_wrong,
    })
}

/// Nearest-rank percentile of sorted durations, in µs.
fn percentile_us(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e6
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL database for the run (as in benches/load.rs)

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

    async fn finish(self) -> Result<()> {
        if !self.created {
            println!(
                "note: database {} existed before the run and was kept (with the seeded cases)",
                self.name
            );
            return Ok(());
        }
        let mut conn = PgConnection::connect_with(&self.admin).await?;
        // FORCE: the store's pooled connections may still be closing
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

// ---------------------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("dedup bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run() -> Result<bool> {
    let cfg = Config::from_env()?;
    let sizes: Vec<String> = cfg.sizes.iter().map(usize::to_string).collect();
    println!(
        "config: sizes={} lookups={} (half hits) seed={} database: {}",
        sizes.join(","),
        cfg.lookups,
        cfg.seed,
        redact(&cfg.database)
    );
    println!("reproduce: {}", cfg.reproduce_line());

    let pg = if is_postgres(&cfg.database) {
        Some(PgDatabase::prepare(&cfg.database).await?)
    } else {
        None
    };
    if !cfg.fresh_sqlite && !pg.as_ref().is_some_and(|p| p.created) {
        println!(
            "note: the database existed before the run; sizes count only the cases seeded here"
        );
    }
    let result = measure(&cfg).await;
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

async fn measure(cfg: &Config) -> Result<bool> {
    let t = Instant::now();
    let store = sentinella::store::connect(&cfg.database)
        .await
        .with_context(|| format!("opening {}", redact(&cfg.database)))?;
    println!(
        "store {} opened (migrations run) in {:.2} s",
        store.backend(),
        t.elapsed().as_secs_f64()
    );
    let never_stored_from = *cfg.sizes.last().expect("at least one size") as u64;
    let mut rng = Rng(cfg.seed);
    let mut stored = 0;
    let mut all_ok = true;
    let mut rows = Vec::new();
    for &size in &cfg.sizes {
        let t = Instant::now();
        let refused = seed(&store, stored, size).await?;
        let seeding = t.elapsed();
        let added = size - stored;
        println!(
            "seeded {added} cases ({stored} → {size}) in {:.2} s, {:.0} cases/s{}",
            seeding.as_secs_f64(),
            added as f64 / seeding.as_secs_f64(),
            if refused > 0 {
                format!(" ({refused} claims refused: key collisions)")
            } else {
                String::new()
            }
        );
        stored = size;

        let warmup = probes(&mut rng, WARMUP_LOOKUPS, stored, never_stored_from);
        look_up(&store, &warmup).await?;
        let timed = probes(&mut rng, cfg.lookups, stored, never_stored_from);
        let m = look_up(&store, &timed).await?;
        let rate = timed.len() as f64 / m.wall.as_secs_f64();
        let (p50, p99, max) = (
            percentile_us(&m.latencies, 50.0),
            percentile_us(&m.latencies, 99.0),
            percentile_us(&m.latencies, 100.0),
        );
        println!(
            "  {size} cases: {} lookups in {:.2} s | {rate:.0} lookups/s | µs per lookup: p50 {p50:.1} | p99 {p99:.1} | max {max:.1} | wrong {}",
            timed.len(),
            m.wall.as_secs_f64(),
            m.wrong
        );
        if let Some(w) = &m.first_wrong {
            println!("  first wrong answer: {w}");
        }
        all_ok &= m.wrong == 0;
        rows.push(Row {
            size,
            added,
            seeding,
            rate,
            p50,
            p99,
        });
    }
    drop(store);

    println!("---");
    println!(
        "database={} lookups={} (half hits, {LOOKUPS_PER_TX} per read transaction) seed={}",
        if is_postgres(&cfg.database) {
            "postgres"
        } else {
            "sqlite"
        },
        cfg.lookups,
        cfg.seed
    );
    println!(
        "{:>10} | {:>10} | {:>12} | {:>10} | {:>9} | {:>9}",
        "cases", "seeding s", "seeded/s", "lookups/s", "p50 µs", "p99 µs"
    );
    for r in &rows {
        println!(
            "{:>10} | {:>10.2} | {:>12.0} | {:>10.0} | {:>9.1} | {:>9.1}",
            r.size,
            r.seeding.as_secs_f64(),
            r.added as f64 / r.seeding.as_secs_f64(),
            r.rate,
            r.p50,
            r.p99
        );
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last())
        && rows.len() > 1
    {
        println!(
            "p50 {}→{} cases: ×{:.2} | p99: ×{:.2}",
            first.size,
            last.size,
            last.p50 / first.p50,
            last.p99 / first.p99
        );
    }
    if !all_ok {
        println!(
            "WRONG ANSWERS: some lookups did not return the stored case (or found one that was never stored)"
        );
    }
    Ok(all_ok)
}

/// One size's figures, for the summary table.
struct Row {
    size: usize,
    added: usize,
    seeding: Duration,
    rate: f64,
    p50: f64,
    p99: f64,
}
