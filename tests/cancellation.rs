//! Cancellation safety of the write path, in process (the real router), on SQLite and PostgreSQL.
//!
//! A request whose client disconnects, times out or sends half a body must leave no lock,
//! savepoint, counter or connection behind: either its transaction completes (and is durable) or
//! it leaves no trace. Each test sends hundreds of writes at once (transaction Bundles, creates,
//! updates, update-as-create, conditional creates), at most `IN_FLIGHT` at a time so that many are
//! queued for the writer, and drops each request's future at a random point: after its first poll
//! (before the body is read), at its n-th suspension (validation done, queued for the writer, inside
//! the transaction, waiting for the commit), after a random time, or while its body is half sent.
//! Then every later write must answer within `ANSWER_BOUND` (a hang is a failure, never a stuck
//! test), and what is stored must be whole: each Bundle all there (with its CRE case notification)
//! or not there at all, no duplicate from a conditional create, histories without holes.
//!
//! The plan is random and seeded: the seed is printed and named in every failure message, and
//! `SENTINELLA_TEST_SEED=<seed>` replays the same plan (the timing still varies from run to run).
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Method, Request, StatusCode};
use common::{
    Db, Resp, TestApp, cancellation_marks, cancellation_system, distinct_lab_transaction,
};
use futures::StreamExt;
use http_body_util::BodyExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Writes in the server at once during a storm (the others wait for their turn in the test).
const IN_FLIGHT: usize = 40;
/// A write after the storm must answer within this.
const ANSWER_BOUND: Duration = Duration::from_secs(10);
/// A storm write still unanswered after this is dropped too (and counted as overdue).
const OVERDUE: Duration = Duration::from_secs(5);
/// How long the stored state may keep changing after the storm (writes finishing in the
/// background after their client left).
const SETTLE_BOUND: Duration = Duration::from_secs(30);
/// Patients created before the storm, for the storm's updates.
const UPDATED_PATIENTS: usize = 10;
/// Conditional creates sharing one identifier.
const CONDITIONAL_GROUP: usize = 4;
const CRE_CATEGORY: &str = "https://sentinella-fhir.github.io/ig/CodeSystem/tipo-notifica|cre";

// ---------------------------------------------------------------------------------------------
// What is sent

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// `POST /fhir`: a laboratory transaction of its own (patient, specimen, results, report).
    Bundle,
    /// `POST /fhir/Patient`.
    Create,
    /// `POST /fhir/Patient` with `If-None-Exist` on an identifier `CONDITIONAL_GROUP` writes share.
    Conditional,
    /// `PUT /fhir/Patient/<id>` of a patient created before the storm.
    Update,
    /// `PUT /fhir/Patient/<new id>`: update as create.
    PutCreate,
}

#[derive(Clone, Debug)]
struct Write {
    kind: Kind,
    method: Method,
    uri: String,
    headers: Vec<(&'static str, String)>,
    body: Value,
    /// The mark (`cancellation_system()` identifier value) of what it writes; a Bundle's marks
    /// are `cancellation_marks(&body)`.
    mark: String,
    /// An update's `name[0].text`: which version of the patient it wrote.
    text: String,
}

/// Where a write is dropped.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cut {
    /// When it suspends for the n-th time (0: after its first poll, before the body is read).
    Suspension(u32),
    /// After this long (tokio's timer rounds up to the next millisecond).
    Time(Duration),
    /// Its body sends the first half and then nothing; dropped after this long.
    HalfBody(Duration),
}

impl Cut {
    fn name(&self) -> &'static str {
        match self {
            Cut::Suspension(0) => "first poll",
            Cut::Suspension(_) => "n-th suspension",
            Cut::Time(_) => "timeout",
            Cut::HalfBody(_) => "half body",
        }
    }
}

#[derive(Debug)]
enum Outcome {
    /// The cut fired before the answer.
    Dropped,
    /// Unanswered after `OVERDUE` (dropped then).
    Overdue,
    Answered(StatusCode, Value),
}

impl Outcome {
    fn describe(&self) -> String {
        match self {
            Outcome::Dropped => "dropped".into(),
            Outcome::Overdue => format!("unanswered after {OVERDUE:?}, dropped"),
            Outcome::Answered(s, _) => format!("answered {s}"),
        }
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

fn fhir_json() -> Vec<(&'static str, String)> {
    vec![("content-type", "application/fhir+json".to_string())]
}

/// A write that completes a CRE case of its own: the example laboratory transaction for test
/// person `person`.
fn bundle_write(tag: &str, person: u32) -> Write {
    Write {
        kind: Kind::Bundle,
        method: Method::POST,
        uri: "/fhir".into(),
        headers: fhir_json(),
        body: distinct_lab_transaction(tag, person),
        mark: tag.into(),
        text: String::new(),
    }
}

fn create_write(mark: String) -> Write {
    Write {
        kind: Kind::Create,
        method: Method::POST,
        uri: "/fhir/Patient".into(),
        headers: fhir_json(),
        body: patient(&mark, "created"),
        text: "created".into(),
        mark,
    }
}

fn conditional_write(mark: String) -> Write {
    let mut headers = fhir_json();
    headers.push((
        "if-none-exist",
        format!("identifier={}|{mark}", cancellation_system()),
    ));
    Write {
        kind: Kind::Conditional,
        method: Method::POST,
        uri: "/fhir/Patient".into(),
        headers,
        body: patient(&mark, "conditional"),
        text: "conditional".into(),
        mark,
    }
}

fn update_write(id: &str, mark: &str, text: String) -> Write {
    let mut body = patient(mark, &text);
    body["id"] = json!(id);
    Write {
        kind: Kind::Update,
        method: Method::PUT,
        uri: format!("/fhir/Patient/{id}"),
        headers: fhir_json(),
        body,
        mark: mark.into(),
        text,
    }
}

fn put_create_write(id: &str, mark: String) -> Write {
    let mut body = patient(&mark, "put-create");
    body["id"] = json!(id);
    Write {
        kind: Kind::PutCreate,
        method: Method::PUT,
        uri: format!("/fhir/Patient/{id}"),
        headers: fhir_json(),
        body,
        text: "put-create".into(),
        mark,
    }
}

// ---------------------------------------------------------------------------------------------
// Sending, and dropping at a chosen suspension

/// Polls a future and gives up on it (dropping it with itself) when it is about to suspend for
/// the `limit`-th time; counts its suspensions.
struct DropAtSuspension<F> {
    inner: Pin<Box<F>>,
    limit: Option<u32>,
    suspensions: u32,
}

impl<F: Future> Future for DropAtSuspension<F> {
    type Output = (Option<F::Output>, u32);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match this.inner.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready((Some(v), this.suspensions)),
            Poll::Pending if this.limit == Some(this.suspensions) => {
                Poll::Ready((None, this.suspensions))
            }
            Poll::Pending => {
                this.suspensions += 1;
                Poll::Pending
            }
        }
    }
}

fn request(w: &Write, half_body: bool) -> Request<Body> {
    let bytes = serde_json::to_vec(&w.body).expect("JSON");
    let mut req = Request::builder().method(w.method.clone()).uri(&w.uri);
    for (k, v) in &w.headers {
        req = req.header(*k, v);
    }
    req = req.header("content-length", bytes.len().to_string());
    let body = if half_body {
        let half = Bytes::copy_from_slice(&bytes[..bytes.len() / 2]);
        let first = futures::stream::iter([Ok::<Bytes, std::io::Error>(half)]);
        Body::from_stream(first.chain(futures::stream::pending()))
    } else {
        Body::from(bytes)
    };
    req.body(body).expect("request")
}

async fn read_answer(resp: axum::response::Response) -> Outcome {
    let status = resp.status();
    let bytes = tokio::time::timeout(ANSWER_BOUND, resp.into_body().collect())
        .await
        .expect("a response body is complete once the handler answered")
        .expect("response body")
        .to_bytes();
    Outcome::Answered(
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Send one write and drop it at `cut`.
async fn send_cut(router: Router, w: &Write, cut: Cut) -> Outcome {
    let req = request(w, matches!(cut, Cut::HalfBody(_)));
    let call = router.oneshot(req);
    let answered = match cut {
        Cut::Suspension(n) => {
            let cut = DropAtSuspension {
                inner: Box::pin(call),
                limit: Some(n),
                suspensions: 0,
            };
            match tokio::time::timeout(OVERDUE, cut).await {
                Err(_) => return Outcome::Overdue,
                Ok((None, _)) => return Outcome::Dropped,
                Ok((Some(r), _)) => r,
            }
        }
        Cut::Time(d) | Cut::HalfBody(d) => match tokio::time::timeout(d, call).await {
            Err(_) => return Outcome::Dropped,
            Ok(r) => r,
        },
    };
    read_answer(answered.expect("the router is infallible")).await
}

/// Send one write to the end: its answer, how long it took and how often it suspended.
async fn send_whole(app: &TestApp, w: &Write, ctx: &str) -> (Outcome, Duration, u32) {
    let started = Instant::now();
    let call = DropAtSuspension {
        inner: Box::pin(app.router.clone().oneshot(request(w, false))),
        limit: None,
        suspensions: 0,
    };
    let (resp, suspensions) = tokio::time::timeout(ANSWER_BOUND, call)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} {} did not answer within {ANSWER_BOUND:?} ({ctx})",
                w.method, w.uri
            )
        });
    let took = started.elapsed();
    let outcome = read_answer(resp.expect("a complete call").expect("infallible")).await;
    (outcome, took, suspensions)
}

/// Send with `send`, retrying a 503 (overload, with Retry-After) until `ANSWER_BOUND` has passed:
/// the answer, or a panic naming `what` if none came in time.
async fn within_bound<F, Fut>(what: &str, ctx: &str, mut send: F) -> Resp
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Resp>,
{
    let deadline = Instant::now() + ANSWER_BOUND;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(left, send())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{what} did not answer within {ANSWER_BOUND:?} after the cancelled writes: \
                 the write path is stuck ({ctx})"
                )
            });
        if r.status == StatusCode::SERVICE_UNAVAILABLE
            && Instant::now() + Duration::from_millis(100) < deadline
        {
            eprintln!("{what}: 503 after the storm, retrying ({})", r.text);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        return r;
    }
}

// ---------------------------------------------------------------------------------------------
// The storm

/// How each kind of write is chosen (weights), how many, and how they are cut.
struct Plan {
    mix: &'static [(Kind, u32)],
    writes: usize,
    /// Only half bodies (otherwise: every cut, half bodies among them).
    half_bodies_only: bool,
}

struct Storm {
    run: String,
    ctx: String,
    writes: Vec<(Write, Cut)>,
    outcomes: Vec<Outcome>,
    /// Update target: id and mark of each patient created before the storm.
    updated: Vec<(String, String)>,
}

fn database(app: &TestApp) -> &'static str {
    match app.db {
        Db::Sqlite(_) => "SQLite",
        Db::Postgres(_) => "PostgreSQL",
    }
}

fn seed() -> u64 {
    std::env::var("SENTINELLA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

fn log_uniform(rng: &mut StdRng, low: Duration, high: Duration) -> Duration {
    let (lo, hi) = (low.as_secs_f64().ln(), high.as_secs_f64().ln());
    Duration::from_secs_f64(rng.random_range(lo..hi).exp())
}

/// Calibrate on whole writes (also proving that what the storm sends is accepted), plan the
/// storm, run it, and return what happened.
async fn storm(app: &TestApp, plan: Plan) -> Storm {
    let seed = seed();
    let ctx = format!(
        "{}, seed {seed}: rerun with SENTINELLA_TEST_SEED={seed}",
        database(app)
    );
    eprintln!("cancellation storm on {ctx}");
    let mut rng = StdRng::seed_from_u64(seed);
    let run = format!("{:08x}", rng.random::<u32>());

    // whole writes: accepted, how long they take, how often they suspend
    let probe = bundle_write(&format!("{run}-probe"), 25_001);
    let (outcome, bundle_time, bundle_suspensions) = send_whole(app, &probe, &ctx).await;
    assert!(
        matches!(outcome, Outcome::Answered(StatusCode::OK, _)),
        "the storm's transaction Bundle is not accepted: {outcome:?} ({ctx})"
    );
    let mut updated = Vec::new();
    let mut patient_time = Duration::ZERO;
    let mut patient_suspensions = 0;
    for i in 0..UPDATED_PATIENTS {
        let mark = format!("{run}/upd-{i}");
        let (outcome, took, suspensions) = send_whole(app, &create_write(mark.clone()), &ctx).await;
        let Outcome::Answered(StatusCode::CREATED, body) = outcome else {
            panic!("the storm's Patient is not accepted: {outcome:?} ({ctx})");
        };
        updated.push((body["id"].as_str().expect("id").to_string(), mark));
        patient_time = patient_time.max(took);
        patient_suspensions = patient_suspensions.max(suspensions);
    }
    eprintln!(
        "whole writes: a Bundle {bundle_time:?} ({bundle_suspensions} suspensions), \
         a Patient up to {patient_time:?} ({patient_suspensions} suspensions)"
    );

    // the plan: kinds by weight, cuts spread from before the body is read to after the commit
    let total: u32 = plan.mix.iter().map(|(_, w)| w).sum();
    let mut writes = Vec::with_capacity(plan.writes);
    let mut conditional = 0usize;
    let mut next_version: HashMap<usize, usize> = HashMap::new();
    for k in 0..plan.writes {
        let mut pick = rng.random_range(0..total);
        let kind = plan
            .mix
            .iter()
            .find(|(_, w)| {
                let hit = pick < *w;
                pick = pick.saturating_sub(*w);
                hit
            })
            .expect("a kind")
            .0;
        let write = match kind {
            Kind::Bundle => bundle_write(&format!("{run}-b{k}"), k as u32),
            Kind::Create => create_write(format!("{run}/create-{k}")),
            Kind::Conditional => {
                conditional += 1;
                conditional_write(format!("{run}/cond-{}", conditional / CONDITIONAL_GROUP))
            }
            Kind::Update => {
                let i = rng.random_range(0..UPDATED_PATIENTS);
                let v = next_version.entry(i).or_insert(0);
                *v += 1;
                let (id, mark) = &updated[i];
                update_write(id, mark, format!("{mark}/v{v}"))
            }
            Kind::PutCreate => {
                put_create_write(&format!("putc-{run}-{k}"), format!("{run}/putc-{k}"))
            }
        };
        let (time, suspensions) = if kind == Kind::Bundle {
            (bundle_time, bundle_suspensions)
        } else {
            (patient_time, patient_suspensions)
        };
        // long enough for a write queued behind half the others to reach the database
        let longest = (time * IN_FLIGHT as u32 / 2).max(Duration::from_millis(20));
        let cut = match rng.random_range(0..100) {
            _ if plan.half_bodies_only => {
                Cut::HalfBody(Duration::from_micros(rng.random_range(0..5_000)))
            }
            0..10 => Cut::Suspension(0),
            10..40 => Cut::Suspension(rng.random_range(1..=suspensions.max(2) * 3 / 2)),
            40..85 => Cut::Time(log_uniform(&mut rng, Duration::from_micros(20), longest)),
            _ => Cut::HalfBody(Duration::from_micros(rng.random_range(0..5_000))),
        };
        writes.push((write, cut));
    }

    // run: at most IN_FLIGHT at once, each in a task of its own
    let started = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = Vec::with_capacity(writes.len());
    for (write, cut) in &writes {
        let slot = slots.clone().acquire_owned().await.expect("semaphore");
        let (router, write, cut) = (app.router.clone(), write.clone(), *cut);
        tasks.push(tokio::spawn(async move {
            let outcome = send_cut(router, &write, cut).await;
            drop(slot);
            outcome
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        let outcome = tokio::time::timeout(OVERDUE + ANSWER_BOUND, task)
            .await
            .map(|joined| joined.expect("a storm task does not panic"))
            .unwrap_or(Outcome::Overdue);
        outcomes.push(outcome);
    }
    let storm = Storm {
        run,
        ctx,
        writes,
        outcomes,
        updated,
    };
    storm.summary(started.elapsed());
    storm
}

impl Storm {
    fn summary(&self, took: Duration) {
        let mut by_kind: BTreeMap<(Kind, String), usize> = BTreeMap::new();
        let mut by_cut: BTreeMap<(&'static str, String), usize> = BTreeMap::new();
        for ((w, cut), o) in self.writes.iter().zip(&self.outcomes) {
            *by_kind.entry((w.kind, o.describe())).or_default() += 1;
            *by_cut.entry((cut.name(), o.describe())).or_default() += 1;
        }
        eprintln!(
            "{} writes in {took:?} ({}):\n  by kind: {by_kind:?}\n  by cut: {by_cut:?}",
            self.writes.len(),
            self.ctx
        );
    }

    fn dropped(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| !matches!(o, Outcome::Answered(..)))
            .count()
    }

    /// What no write of the storm may have left: an answer it should not have given.
    fn check_answers(&self) {
        for ((w, cut), o) in self.writes.iter().zip(&self.outcomes) {
            let Outcome::Answered(status, body) = o else {
                continue;
            };
            let expected: &[StatusCode] = match w.kind {
                Kind::Bundle => &[StatusCode::OK],
                Kind::Create => &[StatusCode::CREATED],
                Kind::Conditional => &[StatusCode::CREATED, StatusCode::OK],
                Kind::Update => &[StatusCode::OK, StatusCode::CONFLICT],
                Kind::PutCreate => &[StatusCode::CREATED, StatusCode::OK],
            };
            assert!(
                expected.contains(status) || *status == StatusCode::SERVICE_UNAVAILABLE,
                "{} {} ({:?}, cut {cut:?}) was answered {status}: {body} ({})",
                w.method,
                w.uri,
                w.kind,
                self.ctx
            );
            assert!(
                !matches!(cut, Cut::HalfBody(_)),
                "a write whose body was half sent was answered {status}: {body} ({})",
                self.ctx
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// After the storm: writes still work

/// Writes of every kind, one after the other, then a few at once, each within `ANSWER_BOUND`.
/// Returns the tag of the Bundle it posted (whole, with its case).
async fn writes_still_work(app: &TestApp, s: &Storm) -> String {
    let ctx = &s.ctx;
    let mark = format!("{}/after-create", s.run);
    let new_patient = patient(&mark, "after");
    let created = within_bound("POST /fhir/Patient", ctx, || {
        app.post("/fhir/Patient", &new_patient)
    })
    .await;
    assert_eq!(
        created.status,
        StatusCode::CREATED,
        "POST /fhir/Patient after the storm: {} ({ctx})",
        created.text
    );
    let id = created.body["id"].as_str().expect("id").to_string();

    let tag = format!("{}-after", s.run);
    let bundle = distinct_lab_transaction(&tag, 25_000);
    let posted = within_bound("POST /fhir (transaction)", ctx, || {
        app.post("/fhir", &bundle)
    })
    .await;
    assert_eq!(
        posted.status,
        StatusCode::OK,
        "a transaction Bundle after the storm: {} ({ctx})",
        posted.text
    );

    let mut changed = patient(&mark, "after, updated");
    changed["id"] = json!(id);
    let uri = format!("/fhir/Patient/{id}");
    let updated = within_bound("PUT /fhir/Patient/<id>", ctx, || {
        app.put(&uri, &changed, &[])
    })
    .await;
    assert_eq!(
        updated.status,
        StatusCode::OK,
        "PUT after the storm: {} ({ctx})",
        updated.text
    );
    assert_eq!(updated.body["meta"]["versionId"], "2", "{}", updated.text);

    let condition = format!(
        "identifier={}|{}/after-conditional",
        cancellation_system(),
        s.run
    );
    let body = patient(&format!("{}/after-conditional", s.run), "after");
    let headers = [("if-none-exist", condition.as_str())];
    let first = within_bound("conditional POST /fhir/Patient", ctx, || {
        app.post_with("/fhir/Patient", &body, &headers)
    })
    .await;
    assert_eq!(first.status, StatusCode::CREATED, "{} ({ctx})", first.text);
    let again = within_bound("conditional POST /fhir/Patient again", ctx, || {
        app.post_with("/fhir/Patient", &body, &headers)
    })
    .await;
    assert_eq!(again.status, StatusCode::OK, "{} ({ctx})", again.text);
    assert_eq!(again.body["id"], first.body["id"], "({ctx})");

    // several at once: a group of commits (SQLite) or several connections (PostgreSQL)
    let together = futures::future::join_all((0..8).map(|i| {
        let body = patient(&format!("{}/after-together-{i}", s.run), "after");
        async move {
            within_bound("concurrent POST /fhir/Patient", ctx, || {
                app.post("/fhir/Patient", &body)
            })
            .await
        }
    }))
    .await;
    for r in together {
        assert_eq!(r.status, StatusCode::CREATED, "{} ({ctx})", r.text);
    }

    let read = within_bound("GET /fhir/Patient/<id>", ctx, || app.get(&uri)).await;
    assert_eq!(read.status, StatusCode::OK, "{} ({ctx})", read.text);
    assert_eq!(read.body["name"][0]["text"], "after, updated");
    tag
}

// ---------------------------------------------------------------------------------------------
// After the storm: nothing half written

#[derive(Debug, Clone, PartialEq)]
struct Stored {
    /// `Type/id`
    reference: String,
    version: String,
    /// `name[0].text` of a Patient
    text: Option<String>,
}

/// What is stored, as far as the checks are concerned.
#[derive(Debug, Clone, PartialEq, Default)]
struct Snapshot {
    /// mark → every current resource carrying it
    marked: BTreeMap<String, Vec<Stored>>,
    /// the subject (`Patient/<id>`) of every current CRE case notification, sorted
    cases: Vec<String>,
    /// Organization identifier (`system|value`) → how many current Organizations carry it
    organizations: BTreeMap<String, usize>,
}

/// Every current resource a search finds (all pages).
async fn search_all(app: &TestApp, query: &str, ctx: &str) -> Vec<Value> {
    let mut found = Vec::new();
    loop {
        let uri = format!("{query}&_sort=_id&_count=1000&_offset={}", found.len());
        let r = tokio::time::timeout(ANSWER_BOUND, app.get(&uri))
            .await
            .unwrap_or_else(|_| panic!("GET {uri} did not answer within {ANSWER_BOUND:?} ({ctx})"));
        assert_eq!(r.status, StatusCode::OK, "GET {uri}: {} ({ctx})", r.text);
        let page: Vec<Value> = r.body["entry"]
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

async fn snapshot(app: &TestApp, ctx: &str) -> Snapshot {
    let mut s = Snapshot::default();
    for rt in ["Patient", "Specimen", "Observation", "DiagnosticReport"] {
        let query = format!("/fhir/{rt}?identifier={}|", cancellation_system());
        for r in search_all(app, &query, ctx).await {
            let stored = Stored {
                reference: format!("{rt}/{}", r["id"].as_str().expect("id")),
                version: r["meta"]["versionId"].as_str().unwrap_or("?").to_string(),
                text: r["name"][0]["text"].as_str().map(String::from),
            };
            for id in r["identifier"].as_array().into_iter().flatten() {
                if id["system"] == cancellation_system() {
                    let mark = id["value"].as_str().expect("value").to_string();
                    s.marked.entry(mark).or_default().push(stored.clone());
                }
            }
        }
    }
    let query = format!("/fhir/Communication?category={CRE_CATEGORY}");
    s.cases = search_all(app, &query, ctx)
        .await
        .iter()
        .map(|c| {
            c["subject"]["reference"]
                .as_str()
                .unwrap_or("?")
                .to_string()
        })
        .collect();
    s.cases.sort();
    for org in search_all(app, "/fhir/Organization?_summary=false", ctx).await {
        for id in org["identifier"].as_array().into_iter().flatten() {
            let key = format!(
                "{}|{}",
                id["system"].as_str().unwrap_or(""),
                id["value"].as_str().unwrap_or("")
            );
            *s.organizations.entry(key).or_default() += 1;
        }
    }
    s
}

/// A snapshot taken when the stored state has stopped changing: two in a row alike. (Writes only
/// add and update here, so a snapshot torn by a commit differs from the next one.)
async fn settled(app: &TestApp, ctx: &str) -> Snapshot {
    let deadline = Instant::now() + SETTLE_BOUND;
    let mut last = snapshot(app, ctx).await;
    loop {
        let next = snapshot(app, ctx).await;
        if next == last {
            return next;
        }
        assert!(
            Instant::now() < deadline,
            "what is stored kept changing for {SETTLE_BOUND:?} after the storm ({ctx})"
        );
        last = next;
    }
}

fn ok(o: &Outcome) -> Option<&Value> {
    match o {
        Outcome::Answered(s, body) if s.is_success() => Some(body),
        _ => None,
    }
}

/// Nothing may be known of this write: its body was never complete, or it was refused.
fn must_leave_nothing(cut: Cut, o: &Outcome) -> bool {
    matches!(cut, Cut::HalfBody(_)) || matches!(o, Outcome::Answered(s, _) if !s.is_success())
}

/// Every Bundle whole or absent (a whole one with its case), every single write at most once,
/// answered writes durable, half-sent writes absent, histories without holes.
async fn check_nothing_half_written(app: &TestApp, s: &Storm, after_tag: &str) {
    let ctx = &s.ctx;
    let snap = settled(app, ctx).await;
    let stored = |mark: &str| snap.marked.get(mark).cloned().unwrap_or_default();

    // Bundles (the storm's, the probe and the one posted after the storm)
    let mut whole_bundles = BTreeSet::new();
    let mut bundles: Vec<(Write, Option<(Cut, &Outcome)>)> = s
        .writes
        .iter()
        .zip(&s.outcomes)
        .filter(|((w, _), _)| w.kind == Kind::Bundle)
        .map(|((w, cut), o)| (w.clone(), Some((*cut, o))))
        .collect();
    bundles.push((bundle_write(&format!("{}-probe", s.run), 25_001), None));
    bundles.push((bundle_write(after_tag, 25_000), None));
    for (w, sent) in &bundles {
        let marks = cancellation_marks(&w.body);
        let mut present = BTreeSet::new();
        for m in &marks {
            let found = stored(m);
            assert!(
                found.len() <= 1,
                "Bundle {}: {m} is stored {} times: {found:?} ({ctx})",
                w.mark,
                found.len()
            );
            if !found.is_empty() {
                present.insert(m.clone());
            }
        }
        let how = sent.map_or("posted whole".to_string(), |(cut, o)| {
            format!("cut {cut:?}, {}", o.describe())
        });
        assert!(
            present.is_empty() || present == marks,
            "Bundle {} is half written ({how}): stored {present:?} of {marks:?} ({ctx})",
            w.mark
        );
        let answered = sent.is_none_or(|(_, o)| ok(o).is_some());
        assert!(
            !answered || present == marks,
            "Bundle {} was answered 200 but is not stored ({how}) ({ctx})",
            w.mark
        );
        if let Some((cut, o)) = sent
            && must_leave_nothing(*cut, o)
        {
            assert!(
                present.is_empty(),
                "Bundle {} left {present:?} ({how}) ({ctx})",
                w.mark
            );
        }
        if present == marks {
            let patient_entry = w.body["entry"]
                .as_array()
                .expect("entries")
                .iter()
                .position(|e| e["resource"]["resourceType"] == "Patient")
                .expect("a Patient entry");
            let patient = &stored(&format!("{}#{patient_entry}", w.mark))[0].reference;
            let cases = snap.cases.iter().filter(|c| *c == patient).count();
            assert_eq!(
                cases, 1,
                "Bundle {} is stored whole ({how}) but its patient {patient} has {cases} CRE case \
                 notifications, not 1 ({ctx})",
                w.mark
            );
            whole_bundles.insert(patient.clone());
        }
    }
    let orphans: Vec<&String> = snap
        .cases
        .iter()
        .filter(|c| !whole_bundles.contains(*c))
        .collect();
    assert!(
        orphans.is_empty(),
        "CRE case notifications without their whole Bundle: {orphans:?} ({ctx})"
    );
    for (identifier, n) in &snap.organizations {
        assert_eq!(
            *n, 1,
            "{n} Organizations carry {identifier}: a conditional entry created a duplicate ({ctx})"
        );
    }

    // creates, update-as-create and conditional creates: at most once, durable when answered
    let mut by_mark: BTreeMap<&str, Vec<(&Write, Cut, &Outcome)>> = BTreeMap::new();
    for ((w, cut), o) in s.writes.iter().zip(&s.outcomes) {
        if matches!(w.kind, Kind::Create | Kind::Conditional | Kind::PutCreate) {
            by_mark.entry(&w.mark).or_default().push((w, *cut, o));
        }
    }
    for (mark, sent) in &by_mark {
        let found = stored(mark);
        let kind = sent[0].0.kind;
        let how: Vec<String> = sent
            .iter()
            .map(|(_, cut, o)| format!("cut {cut:?}, {}", o.describe()))
            .collect();
        assert!(
            found.len() <= 1,
            "{kind:?} {mark} is stored {} times: {found:?} ({how:?}) ({ctx})",
            found.len()
        );
        let answered: Vec<&Value> = sent.iter().filter_map(|(_, _, o)| ok(o)).collect();
        if !answered.is_empty() {
            assert_eq!(
                found.len(),
                1,
                "{kind:?} {mark} was answered but is not stored ({how:?}) ({ctx})"
            );
        }
        if sent.iter().all(|(_, cut, o)| must_leave_nothing(*cut, o)) {
            assert!(
                found.is_empty(),
                "{kind:?} {mark} left {found:?} though no request for it was processed \
                 ({how:?}) ({ctx})"
            );
        }
        for body in answered {
            let id = body["id"].as_str().unwrap_or("?");
            assert_eq!(
                found[0].reference,
                format!("Patient/{id}"),
                "{kind:?} {mark} answered with another resource ({ctx})"
            );
        }
        if kind == Kind::PutCreate
            && let Some(f) = found.first()
        {
            let asked = sent[0].0.uri.trim_start_matches("/fhir/");
            assert_eq!(f.reference, asked, "update as create: another id ({ctx})");
        }
    }

    // updates: each patient's history is versions 1..=n, each version written once; what was
    // answered is in it, what was half sent is not
    for (id, mark) in &s.updated {
        let sent: Vec<(&Write, Cut, &Outcome)> = s
            .writes
            .iter()
            .zip(&s.outcomes)
            .filter(|((w, _), _)| w.kind == Kind::Update && w.uri.ends_with(&format!("/{id}")))
            .map(|((w, cut), o)| (w, *cut, o))
            .collect();
        let uri = format!("/fhir/Patient/{id}/_history?_count=1000");
        let history = tokio::time::timeout(ANSWER_BOUND, app.get(&uri))
            .await
            .unwrap_or_else(|_| panic!("GET {uri} did not answer ({ctx})"));
        assert_eq!(history.status, StatusCode::OK, "{} ({ctx})", history.text);
        let versions: Vec<(i64, String)> = history.body["entry"]
            .as_array()
            .expect("history entries")
            .iter()
            .map(|e| {
                let r = &e["resource"];
                let v = r["meta"]["versionId"].as_str().expect("versionId");
                let text = r["name"][0]["text"].as_str().unwrap_or("").to_string();
                (v.parse().expect("a number"), text)
            })
            .collect();
        let mut numbers: Vec<i64> = versions.iter().map(|(v, _)| *v).collect();
        numbers.sort();
        let expected: Vec<i64> = (1..=versions.len() as i64).collect();
        assert_eq!(
            numbers, expected,
            "Patient/{id} ({mark}) has a history with holes or repeats ({ctx})"
        );
        let current = stored(mark);
        assert_eq!(current.len(), 1, "Patient {mark}: {current:?} ({ctx})");
        assert_eq!(
            current[0].version,
            versions.len().to_string(),
            "Patient/{id}: the current version is not the last of its history ({ctx})"
        );
        let texts: Vec<&String> = versions.iter().map(|(_, t)| t).collect();
        for (w, cut, o) in sent {
            let times = texts.iter().filter(|t| ***t == w.text).count();
            let how = format!("cut {cut:?}, {}", o.describe());
            assert!(
                times <= 1,
                "{} is in the history {times} times ({how}) ({ctx})",
                w.text
            );
            if matches!(o, Outcome::Answered(StatusCode::OK, _)) {
                assert_eq!(
                    times, 1,
                    "{} was answered 200 but is not in the history ({ctx})",
                    w.text
                );
            }
            if must_leave_nothing(cut, o) {
                assert_eq!(times, 0, "{} left a version ({how}) ({ctx})", w.text);
            }
        }
    }
}

async fn cancelled_storm_then_everything_works(app: TestApp, plan: Plan) {
    let started = Instant::now();
    let s = storm(&app, plan).await;
    assert!(
        s.dropped() >= s.writes.len() / 4,
        "only {} of {} writes were cancelled: the storm tests nothing ({})",
        s.dropped(),
        s.writes.len(),
        s.ctx
    );
    let after_tag = writes_still_work(&app, &s).await;
    s.check_answers();
    check_nothing_half_written(&app, &s, &after_tag).await;
    eprintln!("done in {:?} ({})", started.elapsed(), s.ctx);
}

on_both_databases! {
    // Laboratory transactions dropped anywhere: each is stored whole with its CRE case, or not at
    // all; later writes work.
    async fn cancelled_transaction_bundles_are_all_or_nothing(app) {
        cancelled_storm_then_everything_works(app, Plan {
            mix: &[(Kind::Bundle, 1)],
            writes: 150,
            half_bodies_only: false,
        }).await;
    }

    // Creates, updates, update-as-create and conditional creates dropped anywhere: each stored at
    // most once, durable when answered, histories without holes; later writes work.
    async fn cancelled_single_resource_writes_leave_no_trace(app) {
        cancelled_storm_then_everything_works(app, Plan {
            mix: &[
                (Kind::Create, 3),
                (Kind::Conditional, 3),
                (Kind::Update, 3),
                (Kind::PutCreate, 2),
            ],
            writes: 240,
            half_bodies_only: false,
        }).await;
    }

    // Every kind of write at once, dropped anywhere.
    async fn cancelled_writes_of_every_kind_at_once(app) {
        cancelled_storm_then_everything_works(app, Plan {
            mix: &[
                (Kind::Bundle, 4),
                (Kind::Create, 2),
                (Kind::Conditional, 2),
                (Kind::Update, 2),
                (Kind::PutCreate, 1),
            ],
            writes: 200,
            half_bodies_only: false,
        }).await;
    }

    // Writes whose body stops half way: nothing of them is stored, and later writes work.
    async fn half_sent_bodies_leave_no_trace(app) {
        cancelled_storm_then_everything_works(app, Plan {
            mix: &[
                (Kind::Bundle, 2),
                (Kind::Create, 1),
                (Kind::Conditional, 1),
                (Kind::Update, 1),
                (Kind::PutCreate, 1),
            ],
            writes: 80,
            half_bodies_only: true,
        }).await;
    }
}
