//! Delivery latency benchmark: the time from the 2xx of the request that caused a CRE case to a
//! rest-hook subscriber receiving its event, at a fixed offered rate (open loop), for one or many
//! subscribers.
//!
//! The server runs in process on a loopback port with a fresh database (SQLite by default,
//! `SENTINELLA_BENCH_DATABASE=postgres://…/db` for PostgreSQL: the database is created). Every Bundle
//! is the CRE blood culture of tests/fixtures/cre for a new person, so every Bundle makes one case
//! and one event per subscriber. Subscriptions use `full-resource`, so the receiver knows the
//! person (the Patient's codice fiscale) and matches it to the 2xx.
//!
//! Knobs: `SENTINELLA_BENCH_RATE` (Bundles/s offered, default 100), `SENTINELLA_BENCH_SECONDS`
//! (default 10), `SENTINELLA_BENCH_SUBSCRIBERS` (default 1).
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use sentinella::config::Config;
use sentinella::italy::codice_fiscale::CodiceFiscale;

type Times = Arc<Mutex<HashMap<String, Instant>>>;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cf(n: u32) -> String {
    CodiceFiscale::complete(&format!("VRDLCU{:02}A01F{:03}", (n / 1000) % 100, n % 1000))
        .expect("well formed")
        .as_str()
        .to_string()
}

fn bundle(template: &str, n: u32) -> Vec<u8> {
    let person = cf(n);
    let mut b: Value =
        serde_json::from_str(&template.replace("RSSMRA85T10A562S", &person)).unwrap();
    for e in b["entry"].as_array_mut().unwrap() {
        if let Some(q) = e["request"]["ifNoneExist"].as_str().map(String::from)
            && !q.contains("codiceFiscale")
            && !q.contains("/sid/")
        {
            e["request"]["ifNoneExist"] = json!(format!("{q}-{n}"));
            for id in e["resource"]["identifier"].as_array_mut().unwrap() {
                let v = id["value"].as_str().unwrap().to_string();
                id["value"] = json!(format!("{v}-{n}"));
            }
        }
    }
    serde_json::to_vec(&b).unwrap()
}

/// The codice fiscale of the Patient in a notification.
fn person_of(notification: &Value) -> Option<String> {
    notification["entry"]
        .as_array()?
        .iter()
        .find(|e| e["resource"]["resourceType"] == "Patient")
        .and_then(|e| e["resource"]["identifier"][0]["value"].as_str())
        .map(String::from)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let rate: f64 = env("SENTINELLA_BENCH_RATE", 100.0);
    let seconds: f64 = env("SENTINELLA_BENCH_SECONDS", 10.0);
    let subscribers: usize = env("SENTINELLA_BENCH_SUBSCRIBERS", 1);
    let database = match std::env::var("SENTINELLA_BENCH_DATABASE") {
        Ok(url) => {
            use sqlx::Connection;
            let (admin, name) = url.rsplit_once('/').expect("postgres://host/db");
            let mut c = sqlx::PgConnection::connect(&format!("{admin}/postgres")).await?;
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name}"
            )))
            .execute(&mut c)
            .await;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut c)
                .await?;
            url
        }
        Err(_) => format!(
            "sqlite://{}",
            std::env::temp_dir()
                .join(format!(
                    "sentinella-delivery-{}.db",
                    uuid::Uuid::new_v4().simple()
                ))
                .display()
        ),
    };

    // the subscribers: one listener, one path each
    let received: Vec<Times> = (0..subscribers).map(|_| Times::default()).collect();
    let hook_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook_addr = hook_listener.local_addr()?;
    let mut hooks = axum::Router::new();
    for (i, times) in received.iter().enumerate() {
        let times = times.clone();
        hooks = hooks.route(
            &format!("/hook/{i}"),
            axum::routing::post(move |body: Bytes| {
                let times = times.clone();
                async move {
                    let at = Instant::now();
                    if let Ok(v) = serde_json::from_slice::<Value>(&body)
                        && let Some(p) = person_of(&v)
                    {
                        times.lock().await.entry(p).or_insert(at);
                    }
                    axum::http::StatusCode::OK
                }
            }),
        );
    }
    tokio::spawn(async move { axum::serve(hook_listener, hooks).await });

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut config = Config::with_database(&database);
    config.listen = addr;
    config.delivery_poll_ms = 500;
    let app = sentinella::server::build_app(config).await?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    let base = format!("http://{addr}/fhir");
    let client = reqwest::Client::new();

    for i in 0..subscribers {
        let s = json!({
            "resourceType": "Subscription", "status": "requested", "reason": "benchmark",
            "criteria": "https://sentinella-fhir.github.io/ig/SubscriptionTopic/cre-case",
            "channel": {"type": "rest-hook", "endpoint": format!("http://{hook_addr}/hook/{i}"),
                "payload": "application/fhir+json",
                "_payload": {"extension": [{"url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content", "valueCode": "full-resource"}]}},
        });
        let r = client
            .post(format!("{base}/Subscription"))
            .header("content-type", "application/fhir+json")
            .body(s.to_string())
            .send()
            .await?;
        anyhow::ensure!(r.status() == 201, "subscription: {}", r.text().await?);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // handshakes

    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cre/kpn-blood-transaction.json"
    ))?;
    let total = (rate * seconds).round() as u32;
    let acked: Times = Times::default();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 1..=total {
        ticker.tick().await;
        let body = bundle(&template, n);
        let (client, base, acked) = (client.clone(), base.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(&base)
                .header("content-type", "application/fhir+json")
                .body(body)
                .send()
                .await;
            let at = Instant::now();
            match r {
                Ok(r) if r.status().is_success() => {
                    acked.lock().await.insert(cf(n), at);
                }
                Ok(r) => {
                    let status = r.status();
                    eprintln!("{status}: {}", r.text().await.unwrap_or_default());
                }
                Err(e) => eprintln!("request failed: {e}"),
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let ingest = started.elapsed();
    // wait for the deliveries to drain
    let deadline = Instant::now() + Duration::from_secs(120);
    let expected = acked.lock().await.len();
    loop {
        let mut done = true;
        for r in &received {
            if r.lock().await.len() < expected {
                done = false;
            }
        }
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered_by = started.elapsed();
    let acked = acked.lock().await;
    let mut lat = Vec::new();
    let mut before_2xx = 0;
    let mut missing = 0;
    for r in &received {
        let r = r.lock().await;
        for (p, t) in acked.iter() {
            match r.get(p) {
                Some(got) if got >= t => lat.push(got.duration_since(*t).as_secs_f64() * 1000.0),
                Some(_) => {
                    before_2xx += 1;
                    lat.push(0.0)
                }
                None => missing += 1,
            }
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let db = if database.starts_with("sqlite") {
        "SQLite"
    } else {
        "PostgreSQL"
    };
    println!(
        "{db}: offered {rate} Bundles/s for {seconds} s to {subscribers} subscriber(s): {} of {total} Bundles 2xx, achieved {:.1} Bundles/s",
        acked.len(),
        acked.len() as f64 / ingest.as_secs_f64()
    );
    println!(
        "2xx -> subscriber received (ms): p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  ({} deliveries, {} arrived before the 2xx reached the client, {} missing)",
        pct(&lat, 0.5),
        pct(&lat, 0.9),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
        lat.len(),
        before_2xx,
        missing
    );
    println!(
        "delivery throughput: {:.1} events/s over the run ({} events in {:.1} s)",
        lat.len() as f64 / delivered_by.as_secs_f64(),
        lat.len(),
        delivered_by.as_secs_f64()
    );
    Ok(())
}
