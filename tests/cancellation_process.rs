//! Clients that go away mid-request, against the real `sentinella serve` binary on SQLite and on
//! PostgreSQL: for a few seconds many clients post laboratory transactions, patients and updates
//! with client timeouts of 1–5 ms, send headers and half a body and close the socket, or send a
//! whole request and close without reading the answer. Then a new patient must be created (201),
//! a transaction Bundle accepted (200) and an update made (200), each within `ANSWER_BOUND`, reads
//! must answer, and every laboratory transaction sent during the load must be stored whole (with
//! its CRE case notification) or not at all.
//!
//! The clients' choices are seeded: the seed is printed and named in every failure message
//! (`SENTINELLA_TEST_SEED=<seed>` replays them; the timing still varies). The server's log is kept
//! in a file named in the failure messages.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::process::{SqliteFile, free_port, wait_until_ok};
use common::{cancellation_marks, cancellation_system, distinct_lab_transaction};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long the clients keep coming and going.
const LOAD: Duration = Duration::from_secs(4);
/// Clients at once.
const CLIENTS: usize = 16;
/// A write after the load must answer within this.
const ANSWER_BOUND: Duration = Duration::from_secs(10);
/// How long the stored state may keep changing after the load.
const SETTLE_BOUND: Duration = Duration::from_secs(30);
/// Test persons for the load's Bundles (each Bundle its own patient); `distinct_codice_fiscale`
/// goes up to 26 000, the last ones are for the writes after the load.
const PERSONS: u32 = 25_000;
const CRE_CATEGORY: &str = "https://sentinella-fhir.github.io/ig/CodeSystem/tipo-notifica|cre";

/// The server process, killed when dropped.
struct Server {
    child: Child,
    port: u16,
    base: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(db: &str) -> Server {
    let port = free_port();
    let log = std::env::temp_dir().join(format!(
        "sentinella-cancellation-{}.log",
        uuid::Uuid::new_v4().simple()
    ));
    let file = std::fs::File::create(&log).expect("a log file");
    let child = Command::new(env!("CARGO_BIN_EXE_sentinella"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--database",
            db,
        ])
        .env_remove("SENTINELLA_CONFIG")
        .stdout(file.try_clone().expect("the log file"))
        .stderr(file)
        .spawn()
        .expect("server binary starts");
    let server = Server {
        child,
        port,
        base: format!("http://127.0.0.1:{port}/fhir"),
        log,
    };
    wait_until_ok(&format!("{}/metadata", server.base), || {
        format!("log: {}", server.log.display())
    })
    .await;
    server
}

/// A fresh PostgreSQL database, dropped with this guard.
struct PgDatabase {
    name: String,
}

impl PgDatabase {
    async fn create() -> PgDatabase {
        use sqlx::Connection;
        let name = format!("sentinella_test_{}", uuid::Uuid::new_v4().simple());
        let admin = common::postgres_admin_url();
        let mut conn = sqlx::PgConnection::connect(&format!("{admin}/postgres"))
            .await
            .expect("PostgreSQL is reachable (start it: see .ci/run)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create db");
        PgDatabase { name }
    }

    fn url(&self) -> String {
        format!("{}/{}", common::postgres_admin_url(), self.name)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                use sqlx::Connection;
                let admin = format!("{}/postgres", common::postgres_admin_url());
                if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut c).await;
                }
            });
        })
        .join();
    }
}

fn patient(mark: &str, text: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": cancellation_system(), "value": mark}],
        "name": [{"family": "Cancellata", "given": ["Prova"], "text": text}],
        "gender": "female",
        "birthDate": "1990-01-01"
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Whole,
    Nothing,
    WholeOrNothing,
}

/// What the clients did.
#[derive(Default)]
struct Tally {
    counts: std::sync::Mutex<BTreeMap<String, usize>>,
    /// Tags of every laboratory transaction sent, whole or in part, and what must be stored of
    /// it: all (answered 200), nothing (half sent, or refused), or either (the client went away).
    bundles: std::sync::Mutex<Vec<(String, Expect)>>,
}

impl Tally {
    fn count(&self, what: String) {
        *self.counts.lock().unwrap().entry(what).or_default() += 1;
    }
}

/// Headers of a request with a JSON body of `length` bytes.
fn head(method: &str, path: &str, port: u16, length: usize) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Type: application/fhir+json\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// Open a connection, send `bytes`, wait `linger`, close; never more than two seconds.
async fn send_raw_and_close(port: u16, bytes: Vec<u8>, linger: Duration) -> &'static str {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(&bytes).await?;
        tokio::time::sleep(linger).await;
        drop(stream);
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        Ok(Ok(())) => "closed",
        Ok(Err(_)) => "io error",
        Err(_) => "stuck 2 s",
    }
}

/// One client: until `until`, requests of every kind, each abandoned.
#[allow(clippy::too_many_arguments)]
async fn client(
    n: usize,
    seed: u64,
    run: String,
    port: u16,
    base: String,
    updated: Vec<(String, String)>,
    persons: Arc<AtomicU32>,
    versions: Arc<AtomicUsize>,
    tally: Arc<Tally>,
    until: Instant,
) {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(n as u64));
    let http = reqwest::Client::new();
    let mut i = 0usize;
    while Instant::now() < until {
        i += 1;
        // what: a Bundle of its own (its own patient) while test persons last, a patient, an update
        let what = rng.random_range(0..100);
        let person = if what < 50 {
            persons.fetch_add(1, Ordering::SeqCst)
        } else {
            PERSONS
        };
        let tag = format!("{run}-c{n}-{i}");
        let (what, path, method, body) = if person < PERSONS {
            (
                "Bundle",
                "/fhir".to_string(),
                "POST",
                distinct_lab_transaction(&tag, person),
            )
        } else if what < 80 || updated.is_empty() {
            let mark = format!("{run}/c{n}-{i}");
            (
                "Patient",
                "/fhir/Patient".to_string(),
                "POST",
                patient(&mark, "created"),
            )
        } else {
            let (id, mark) = &updated[rng.random_range(0..updated.len())];
            let v = versions.fetch_add(1, Ordering::SeqCst);
            let mut body = patient(mark, &format!("v{v}"));
            body["id"] = json!(id);
            ("update", format!("/fhir/Patient/{id}"), "PUT", body)
        };
        // how: mostly clients that give up after 1–5 ms, some later, a few that wait for the answer
        let action = rng.random_range(0..100);
        let bytes = serde_json::to_vec(&body).unwrap();
        let outcome = match action {
            // a client with a 1–5 ms timeout (5–40 ms, 2 s for a few)
            0..60 => {
                let timeout = match action {
                    0..45 => Duration::from_millis(rng.random_range(1..=5)),
                    45..55 => Duration::from_millis(rng.random_range(5..=40)),
                    _ => Duration::from_secs(2),
                };
                let url = format!("{base}{}", path.trim_start_matches("/fhir"));
                let request = if method == "PUT" {
                    http.put(url)
                } else {
                    http.post(url)
                };
                let sent = request
                    .header("content-type", "application/fhir+json")
                    .timeout(timeout)
                    .body(bytes)
                    .send();
                match tokio::time::timeout(Duration::from_secs(2), sent).await {
                    Ok(Ok(r)) if r.status() == 200 => {
                        (format!("answered {}", r.status()), Expect::Whole)
                    }
                    Ok(Ok(r)) => (format!("answered {}", r.status()), Expect::Nothing),
                    Ok(Err(e)) if e.is_timeout() => {
                        ("client timeout".to_string(), Expect::WholeOrNothing)
                    }
                    Ok(Err(_)) => ("client error".to_string(), Expect::WholeOrNothing),
                    Err(_) => ("stuck 2 s".to_string(), Expect::WholeOrNothing),
                }
            }
            // headers and half the body, then the socket closes
            60..80 => {
                let mut raw = head(method, &path, port, bytes.len()).into_bytes();
                raw.extend_from_slice(&bytes[..bytes.len() / 2]);
                let linger = Duration::from_micros(rng.random_range(0..3_000));
                let closed = send_raw_and_close(port, raw, linger).await;
                (format!("half body, {closed}"), Expect::Nothing)
            }
            // the whole request, then the socket closes without reading the answer
            80..90 => {
                let mut raw = head(method, &path, port, bytes.len()).into_bytes();
                raw.extend_from_slice(&bytes);
                let linger = Duration::from_micros(rng.random_range(0..5_000));
                let closed = send_raw_and_close(port, raw, linger).await;
                (format!("unread answer, {closed}"), Expect::WholeOrNothing)
            }
            // headers only
            _ => {
                let raw = head(method, &path, port, bytes.len()).into_bytes();
                let closed = send_raw_and_close(port, raw, Duration::ZERO).await;
                (format!("headers only, {closed}"), Expect::Nothing)
            }
        };
        let (outcome, expect) = outcome;
        if what == "Bundle" {
            tally.bundles.lock().unwrap().push((tag, expect));
        }
        tally.count(format!("{what}: {outcome}"));
    }
}

/// Send with `send`, retrying a 503 (overload) until `ANSWER_BOUND` has passed: the status and
/// body, or a panic naming `what` if no answer came in time.
async fn within_bound<F, Fut>(what: &str, ctx: &str, mut send: F) -> (u16, Value)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = reqwest::Result<reqwest::Response>>,
{
    let deadline = Instant::now() + ANSWER_BOUND;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = tokio::time::timeout(left, async {
            let r = send().await?;
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            Ok::<_, reqwest::Error>((status, body))
        })
        .await;
        let (status, body) = match answer {
            Err(_) => panic!(
                "{what} did not answer within {ANSWER_BOUND:?} after the clients went away: \
                 the write path is stuck ({ctx})"
            ),
            Ok(Err(e)) => panic!("{what}: {e:?} ({ctx})"),
            Ok(Ok(answer)) => answer,
        };
        if status == 503 && Instant::now() + Duration::from_millis(100) < deadline {
            eprintln!("{what}: 503 after the load, retrying ({body})");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        return (status, body);
    }
}

/// Every current resource a search finds (all pages).
async fn search_all(http: &reqwest::Client, base: &str, query: &str, ctx: &str) -> Vec<Value> {
    let mut found = Vec::new();
    loop {
        let url = format!(
            "{base}{query}&_sort=_id&_count=1000&_offset={}",
            found.len()
        );
        let (status, body) =
            within_bound(&format!("GET {url}"), ctx, || http.get(&url).send()).await;
        assert_eq!(status, 200, "GET {url}: {body} ({ctx})");
        let page: Vec<Value> = body["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["search"]["mode"].as_str().unwrap_or("match") == "match")
            .map(|e| e["resource"].clone())
            .collect();
        let last = page.len() < 1000;
        found.extend(page);
        if last {
            return found;
        }
    }
}

/// mark → references of the resources carrying it; subjects of the CRE cases; Organizations per
/// identifier.
type Snapshot = (
    BTreeMap<String, Vec<String>>,
    Vec<String>,
    BTreeMap<String, usize>,
);

async fn snapshot(http: &reqwest::Client, base: &str, ctx: &str) -> Snapshot {
    let mut marked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for rt in ["Patient", "Specimen", "Observation", "DiagnosticReport"] {
        let query = format!("/{rt}?identifier={}|", cancellation_system());
        for r in search_all(http, base, &query, ctx).await {
            let reference = format!("{rt}/{}", r["id"].as_str().expect("id"));
            for id in r["identifier"].as_array().into_iter().flatten() {
                if id["system"] == cancellation_system() {
                    let mark = id["value"].as_str().expect("value").to_string();
                    marked.entry(mark).or_default().push(reference.clone());
                }
            }
        }
    }
    let mut cases: Vec<String> = search_all(
        http,
        base,
        &format!("/Communication?category={CRE_CATEGORY}"),
        ctx,
    )
    .await
    .iter()
    .map(|c| {
        c["subject"]["reference"]
            .as_str()
            .unwrap_or("?")
            .to_string()
    })
    .collect();
    cases.sort();
    let mut organizations = BTreeMap::new();
    for org in search_all(http, base, "/Organization?_summary=false", ctx).await {
        for id in org["identifier"].as_array().into_iter().flatten() {
            let key = format!(
                "{}|{}",
                id["system"].as_str().unwrap_or(""),
                id["value"].as_str().unwrap_or("")
            );
            *organizations.entry(key).or_default() += 1;
        }
    }
    (marked, cases, organizations)
}

async fn run(db: String, database: &str) {
    let seed: u64 = std::env::var("SENTINELLA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let server = start(&db).await;
    let ctx = format!(
        "{database}, seed {seed}: rerun with SENTINELLA_TEST_SEED={seed}; server log {}",
        server.log.display()
    );
    eprintln!("clients going away on {ctx}");
    let run = format!("{:08x}", StdRng::seed_from_u64(seed).random::<u32>());
    // the bound is `within_bound`'s; this one only keeps a broken connection from hanging
    let http = reqwest::Client::builder()
        .timeout(ANSWER_BOUND * 2)
        .build()
        .unwrap();
    let base = server.base.clone();

    // a whole Bundle and the patients to update: accepted when nobody goes away
    let probe_tag = format!("{run}-probe");
    let probe = distinct_lab_transaction(&probe_tag, PERSONS + 1);
    let (status, body) = within_bound("POST /fhir (probe)", &ctx, || {
        http.post(&base)
            .header("content-type", "application/fhir+json")
            .body(probe.to_string())
            .send()
    })
    .await;
    assert_eq!(
        status, 200,
        "the load's Bundle is not accepted: {body} ({ctx})"
    );
    let mut updated = Vec::new();
    for i in 0..8 {
        let mark = format!("{run}/upd-{i}");
        let p = patient(&mark, "v0");
        let (status, body) = within_bound("POST /fhir/Patient", &ctx, || {
            http.post(format!("{base}/Patient"))
                .header("content-type", "application/fhir+json")
                .body(p.to_string())
                .send()
        })
        .await;
        assert_eq!(status, 201, "{body} ({ctx})");
        updated.push((body["id"].as_str().expect("id").to_string(), mark));
    }

    // the load
    let tally = Arc::new(Tally::default());
    let persons = Arc::new(AtomicU32::new(0));
    let versions = Arc::new(AtomicUsize::new(1));
    let until = Instant::now() + LOAD;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            tokio::spawn(client(
                n,
                seed,
                run.clone(),
                server.port,
                base.clone(),
                updated.clone(),
                persons.clone(),
                versions.clone(),
                tally.clone(),
                until,
            ))
        })
        .collect();
    for c in clients {
        tokio::time::timeout(LOAD + Duration::from_secs(10), c)
            .await
            .unwrap_or_else(|_| panic!("a client did not stop ({ctx})"))
            .expect("a client does not panic");
    }
    eprintln!("the load ({ctx}): {:#?}", tally.counts.lock().unwrap());

    // every later write answers, and reads too
    let mark = format!("{run}/after");
    let p = patient(&mark, "after");
    let (status, created) = within_bound("POST /fhir/Patient", &ctx, || {
        http.post(format!("{base}/Patient"))
            .header("content-type", "application/fhir+json")
            .body(p.to_string())
            .send()
    })
    .await;
    assert_eq!(
        status, 201,
        "POST /fhir/Patient after the load: {created} ({ctx})"
    );
    let id = created["id"].as_str().expect("id").to_string();

    let after_tag = format!("{run}-after");
    let bundle = distinct_lab_transaction(&after_tag, PERSONS + 2);
    let (status, body) = within_bound("POST /fhir (transaction)", &ctx, || {
        http.post(&base)
            .header("content-type", "application/fhir+json")
            .body(bundle.to_string())
            .send()
    })
    .await;
    assert_eq!(
        status, 200,
        "a transaction Bundle after the load: {body} ({ctx})"
    );

    let mut changed = patient(&mark, "after, updated");
    changed["id"] = json!(id);
    let (status, body) = within_bound("PUT /fhir/Patient/<id>", &ctx, || {
        http.put(format!("{base}/Patient/{id}"))
            .header("content-type", "application/fhir+json")
            .body(changed.to_string())
            .send()
    })
    .await;
    assert_eq!(status, 200, "PUT after the load: {body} ({ctx})");

    let (status, read) = within_bound("GET /fhir/Patient/<id>", &ctx, || {
        http.get(format!("{base}/Patient/{id}")).send()
    })
    .await;
    assert_eq!(status, 200, "{read} ({ctx})");
    assert_eq!(read["meta"]["versionId"], "2", "{read} ({ctx})");
    assert_eq!(read["name"][0]["text"], "after, updated", "{read} ({ctx})");

    // every laboratory transaction whole (with its case) or absent
    let deadline = Instant::now() + SETTLE_BOUND;
    let mut last = snapshot(&http, &base, &ctx).await;
    let (marked, cases, organizations) = loop {
        let next = snapshot(&http, &base, &ctx).await;
        if next == last {
            break next;
        }
        assert!(
            Instant::now() < deadline,
            "what is stored kept changing for {SETTLE_BOUND:?} after the load ({ctx})"
        );
        last = next;
    };
    let template = cancellation_marks(&distinct_lab_transaction("T", 0));
    let patient_entry = distinct_lab_transaction("T", 0)["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .position(|e| e["resource"]["resourceType"] == "Patient")
        .expect("a Patient entry");
    let mut tags = tally.bundles.lock().unwrap().clone();
    tags.push((probe_tag.clone(), Expect::Whole));
    tags.push((after_tag.clone(), Expect::Whole));
    let mut whole = BTreeSet::new();
    for (tag, expect) in &tags {
        let marks: BTreeSet<String> = template.iter().map(|m| m.replacen('T', tag, 1)).collect();
        let present: BTreeSet<String> = marks
            .iter()
            .filter(|m| marked.contains_key(*m))
            .cloned()
            .collect();
        for m in &present {
            assert_eq!(
                marked[m].len(),
                1,
                "{m} is stored more than once: {:?} ({ctx})",
                marked[m]
            );
        }
        assert!(
            present.is_empty() || present == marks,
            "Bundle {tag} is half written: stored {present:?} of {marks:?} ({ctx})"
        );
        match expect {
            Expect::Whole => assert!(
                present == marks,
                "Bundle {tag} was answered 200 but is not stored ({ctx})"
            ),
            Expect::Nothing => assert!(
                present.is_empty(),
                "Bundle {tag} was half sent or refused but left {present:?} ({ctx})"
            ),
            Expect::WholeOrNothing => {}
        }
        if present == marks {
            let patient = &marked[&format!("{tag}#{patient_entry}")][0];
            let n = cases.iter().filter(|c| *c == patient).count();
            assert_eq!(
                n, 1,
                "Bundle {tag} is stored whole but its patient {patient} has {n} CRE case \
                 notifications, not 1 ({ctx})"
            );
            whole.insert(patient.clone());
        }
    }
    let orphans: Vec<&String> = cases.iter().filter(|c| !whole.contains(*c)).collect();
    assert!(
        orphans.is_empty(),
        "CRE case notifications without their whole Bundle: {orphans:?} ({ctx})"
    );
    for (identifier, n) in &organizations {
        assert_eq!(*n, 1, "{n} Organizations carry {identifier} ({ctx})");
    }
    eprintln!(
        "{} laboratory transactions sent, {} stored whole ({ctx})",
        tags.len(),
        whole.len()
    );
    let log = server.log.clone();
    drop(server);
    let _ = std::fs::remove_file(log);
}

mod clients_go_away_mid_load {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite() {
        let file = SqliteFile::new("cancellation");
        run(file.url(), "SQLite").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres() {
        let db = PgDatabase::create().await;
        run(db.url(), "PostgreSQL").await;
    }
}
