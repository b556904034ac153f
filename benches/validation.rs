//! `$validate` benchmark: how many antibiogram transaction Bundles (tests/fixtures/
//! antibiogram-transaction.json) the server validates per second.
//!
//! Two measures, neither asserting a timing:
//! - the checks alone (`api::bundle::validation_issues`, what `POST /Bundle/$validate` runs after
//!   parsing), on one thread and on every core;
//! - the whole request through the real router in process (parsing, policy, the blocking pool,
//!   the OperationOutcome), with `SENTINELLA_VALIDATE_CONCURRENCY` requests in flight (default 8).
//!
//! `SENTINELLA_VALIDATE_SECONDS` (default 5) sets each measure's length. Over HTTP, against the
//! release binary: benches/wrk/validate.lua (its header gives the command).
//!
//! A Bundle the checks find an error in fails the run: the figures are of valid input, as a
//! laboratory's would be.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use sentinella::config::Config;
use serde_json::Value;
use tower::ServiceExt;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fixture() -> Result<(Value, Vec<u8>)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/antibiogram-transaction.json"
    );
    let text = std::fs::read(path).context("the antibiogram fixture")?;
    Ok((serde_json::from_slice(&text)?, text))
}

/// The checks alone on `threads` threads for `secs`: Bundles per second.
fn checks_per_second(bundle: &Value, threads: usize, secs: f64) -> Result<f64> {
    let issues = sentinella::api::bundle::validation_issues(bundle);
    ensure!(
        issues
            .iter()
            .all(|i| i.severity != sentinella::error::Severity::Error),
        "the fixture must validate: {issues:?}"
    );
    let done = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while start.elapsed().as_secs_f64() < secs {
                    std::hint::black_box(sentinella::api::bundle::validation_issues(bundle));
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// Whole requests through the router: (requests per second, p50 ms, p99 ms).
async fn requests_per_second(
    body: &[u8],
    concurrency: usize,
    secs: f64,
) -> Result<(f64, f64, f64)> {
    let dir = std::env::temp_dir().join(format!(
        "sentinella-bench-validate-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    let config = Config::with_database(format!("sqlite://{}/bench.db", dir.display()));
    let router = sentinella::server::build_app(config).await?;
    let body = bytes::Bytes::copy_from_slice(body);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let router = router.clone();
        let body = body.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let req = Request::post("/fhir/Bundle/$validate")
                    .header("content-type", "application/fhir+json")
                    .body(Body::from(body.clone()))?;
                let t = Instant::now();
                let resp = router.clone().oneshot(req).await?;
                let status = resp.status();
                let bytes = resp.into_body().collect().await?.to_bytes();
                latencies.push(t.elapsed());
                ensure!(
                    status == StatusCode::OK
                        && !bytes.windows(17).any(|w| w == b"\"severity\":\"error"),
                    "unexpected answer {status}: {}",
                    String::from_utf8_lossy(&bytes)
                );
            }
            anyhow::Ok(latencies)
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e3;
    Ok((all.len() as f64 / elapsed, pct(0.5), pct(0.99)))
}

fn main() -> Result<()> {
    let secs: f64 = env_or("SENTINELLA_VALIDATE_SECONDS", 5.0);
    let concurrency: usize = env_or("SENTINELLA_VALIDATE_CONCURRENCY", 8);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (bundle, text) = fixture()?;
    println!(
        "antibiogram transaction: {} entries, {} bytes; {cores} cores",
        bundle["entry"].as_array().map_or(0, Vec::len),
        text.len()
    );
    // parse the definitions and compile the validators before timing
    sentinella::fhir::schema::SchemaValidators::get().warm_up();
    checks_per_second(&bundle, 1, 0.5)?;
    println!(
        "checks only, 1 thread:       {:>9.0} Bundles/s",
        checks_per_second(&bundle, 1, secs)?
    );
    println!(
        "checks only, {cores} threads:      {:>9.0} Bundles/s",
        checks_per_second(&bundle, cores, secs)?
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()?;
    let (rps, p50, p99) = rt.block_on(requests_per_second(&text, concurrency, secs))?;
    println!(
        "POST /fhir/Bundle/$validate through the router, {concurrency} in flight: {rps:>9.0} req/s, p50 {p50:.2} ms, p99 {p99:.2} ms"
    );
    Ok(())
}
