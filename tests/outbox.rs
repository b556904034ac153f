//! The subscription outbox (commit d7c7e1f): a case-making transaction appends its events to a
//! global sequence without locking the subscription's row; the delivery lease holder numbers them
//! (consecutively per subscription, in sequence order); `$status` and `$events` number what waits
//! first, so a subscription in error still counts its events; delivered events older than
//! `--event-retention-days` are pruned when a lease starts, and `$events` says which are gone.
//!
//! A real webhook listener on 127.0.0.1 receives the notifications. Where a test has to know that
//! the delivery worker is done with a subscription (its lease given back, nothing waiting), it
//! reads the delivery state from the database on a connection of its own: the API does not show
//! leases, and waiting on a condition is deterministic where sleeping past `LINGER` is not.
//!
//! `status_and_events_count_every_waiting_event_beyond_500` is ignored: it shows a bug in src/
//! (run it with `cargo test --test outbox -- --ignored`).
mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::subscriber::*;
use common::{Db, Resp, TestApp};
use sentinella::config::Config;
use serde_json::{Value, json};
use sqlx::Connection;

/// Fast retries and polling for tests (no NATS: only rest-hook channels here).
fn fast(c: &mut Config) {
    c.delivery_backoff_ms = 50;
    c.delivery_backoff_max_ms = 200;
    c.delivery_poll_ms = 50;
    c.delivery_timeout_ms = 2000;
}

/// One failed delivery puts a subscription in error.
fn one_attempt(c: &mut Config) {
    fast(c);
    c.delivery_max_attempts = 1;
}

/// Whatever was delivered is older than the retention at the next lease.
fn no_retention(c: &mut Config) {
    fast(c);
    c.event_retention_days = 0;
}

/// `name::sqlite` and `name::postgres`, each on a fresh database with `tune`d settings.
macro_rules! on_both {
    ($($(#[$meta:meta])* $name:ident: $tune:ident => $body:ident;)*) => {
        $(
            mod $name {
                use super::*;
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                $(#[$meta])*
                async fn sqlite() {
                    $body(TestApp::sqlite_with($tune).await).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                $(#[$meta])*
                async fn postgres() {
                    $body(TestApp::postgres_with($tune).await).await
                }
            }
        )*
    };
}

/// SQLite numbers a subscription's events in the transaction that causes them.
fn numbered_at_commit(app: &TestApp) -> bool {
    matches!(app.db, common::Db::Sqlite(_))
}

on_both! {
    events_from_concurrent_writers_are_numbered_once_in_order: fast => concurrent_writers;
    a_subscription_in_error_still_counts_its_events: one_attempt => error_counts;
    delivered_events_are_pruned_after_the_retention_and_events_says_so: no_retention => pruning;
    status_and_events_count_every_waiting_event_beyond_500: one_attempt => many_waiting;
}

// ---------------------------------------------------------------------------------------------
// Waiting on conditions, reading the delivery state

/// Poll `probe` every 50 ms until it gives `Some`, at most `secs` seconds; `what` names the
/// condition, and the last thing `probe` reported is shown when the deadline passes.
async fn wait_until<T, F, Fut>(secs: u64, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let last = match probe().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "{what}: not within {secs} s; last seen: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A subscription's delivery state as the database holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Delivery {
    events_count: i64,
    delivered_count: i64,
    pruned_count: i64,
    lease_until: i64,
    /// Outbox rows not yet numbered.
    waiting: i64,
    /// Numbered events still stored (not pruned).
    stored: i64,
}

const DELIVERY_SQL: &str = "SELECT events_count, delivered_count, pruned_count, lease_until, \
     (SELECT COUNT(*) FROM subscription_outbox o WHERE o.subscription_id = s.id), \
     (SELECT COUNT(*) FROM subscription_events e WHERE e.subscription_id = s.id) \
     FROM subscriptions s WHERE s.id = $1";

type DeliveryTuple = (i64, i64, i64, i64, i64, i64);

/// Read on a connection of the test's own (read-only on SQLite: a WAL reader never blocks the
/// writer).
async fn delivery(app: &TestApp, id: &str) -> Delivery {
    let t: DeliveryTuple = match &app.db {
        Db::Sqlite(path) => {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(path)
                .read_only(true);
            let mut c = sqlx::SqliteConnection::connect_with(&options)
                .await
                .expect("the test database opens");
            let t = sqlx::query_as(DELIVERY_SQL)
                .bind(id)
                .fetch_one(&mut c)
                .await
                .expect("the subscription's row");
            let _ = c.close().await;
            t
        }
        Db::Postgres(name) => {
            let url = format!("{}/{name}", common::postgres_admin_url());
            let mut c = sqlx::PgConnection::connect(&url)
                .await
                .expect("the test database opens");
            let t = sqlx::query_as(DELIVERY_SQL)
                .bind(id)
                .fetch_one(&mut c)
                .await
                .expect("the subscription's row");
            let _ = c.close().await;
            t
        }
    };
    Delivery {
        events_count: t.0,
        delivered_count: t.1,
        pruned_count: t.2,
        lease_until: t.3,
        waiting: t.4,
        stored: t.5,
    }
}

/// Wait until the worker has numbered and delivered `n` events and given the lease back: from then
/// on nothing is sent for the subscription until something new happens (no heartbeat is set).
async fn wait_settled(app: &TestApp, id: &str, n: i64) -> Delivery {
    wait_until(
        30,
        &format!("{n} events delivered and the lease given back"),
        || async move {
            let d = delivery(app, id).await;
            if d.events_count == n && d.delivered_count == n && d.waiting == 0 && d.lease_until == 0
            {
                Ok(d)
            } else {
                Err(format!("{d:?}"))
            }
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Subscriptions and cases

async fn subscribe(app: &TestApp, s: &Value) -> String {
    let r = app.post("/fhir/Subscription", s).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.body["id"].as_str().unwrap().to_string()
}

/// The Subscription resource once its status is `status`.
async fn wait_status(app: &TestApp, id: &str, status: &str) -> Value {
    wait_until(20, &format!("Subscription/{id} {status}"), || async move {
        let r = app.get(&format!("/fhir/Subscription/{id}")).await;
        if r.body["status"] == status {
            Ok(r.body)
        } else {
            Err(r.text)
        }
    })
    .await
}

async fn post_case(app: &TestApp, n: u32) {
    let r = app.post("/fhir", &case_bundle(n, "030308")).await;
    assert_eq!(r.status, StatusCode::OK, "case {n}: {}", r.text);
}

/// `{base}/Communication/<id>/_history/<v>` → the local path `/fhir/Communication/<id>`.
fn case_path(focus: &str) -> String {
    let at = focus
        .find("/Communication/")
        .unwrap_or_else(|| panic!("the focus is a Communication: {focus}"));
    let reference = &focus[at..];
    let reference = reference.split("/_history/").next().unwrap();
    format!("/fhir{reference}")
}

/// The CRE case a focus refers to, and its patient.
async fn case_of(app: &TestApp, focus: &str) -> (String, String) {
    let r = app.get(&case_path(focus)).await;
    assert_eq!(r.status, StatusCode::OK, "{focus}: {}", r.text);
    assert_eq!(r.body["resourceType"], "Communication", "{}", r.text);
    assert_eq!(
        r.body["category"][0]["coding"][0]["code"], "cre",
        "{}",
        r.text
    );
    let patient = r.body["subject"]["reference"]
        .as_str()
        .unwrap_or_else(|| panic!("the case has a subject: {}", r.text))
        .to_string();
    (r.body["id"].as_str().unwrap().to_string(), patient)
}

fn param<'a>(r: &'a Resp, name: &str) -> &'a Value {
    status_param(&r.body, name)
}

fn since_start(r: &Resp) -> i64 {
    param(r, "events-since-subscription-start")["valueString"]
        .as_str()
        .unwrap_or_else(|| panic!("events-since-subscription-start in {}", r.text))
        .parse()
        .unwrap()
}

async fn status_of(app: &TestApp, id: &str) -> Resp {
    let r = app.get(&format!("/fhir/Subscription/{id}/$status")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(param(&r, "type")["valueCode"], "query-status", "{}", r.text);
    r
}

async fn events(app: &TestApp, id: &str, query: &str) -> Resp {
    let r = app
        .get(&format!("/fhir/Subscription/{id}/$events{query}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(notification_type(&r.body), "query-event", "{}", r.text);
    r
}

fn numbers(events: &[(i64, String)]) -> Vec<i64> {
    events.iter().map(|e| e.0).collect()
}

/// The event of each notification received (one event per notification), in arrival order.
fn received_events(notifications: &[Value]) -> Vec<(i64, String)> {
    notifications
        .iter()
        .map(|b| {
            let events = events_of(b);
            assert_eq!(events.len(), 1, "one event per notification: {b}");
            events[0].clone()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Concurrent writers

async fn concurrent_writers(app: TestApp) {
    const CASES: u32 = 20;
    let hook = Hook::start().await;
    let id = subscribe(
        &app,
        &subscription(&hook.url, "cre-case", "id-only", &[], None),
    )
    .await;
    wait_status(&app, &id, "active").await;

    // every writer is ready before any of them posts
    let app = Arc::new(app);
    let start = Arc::new(tokio::sync::Barrier::new(CASES as usize));
    let writers: Vec<_> = (1..=CASES)
        .map(|n| {
            let (app, start) = (app.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                post_case(&app, n).await;
            })
        })
        .collect();
    // meanwhile a client asks for the status: $status numbers what waits, beside the lease holder
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (app, id, done) = (app.clone(), id.clone(), done.clone());
        tokio::spawn(async move {
            let mut seen = vec![0];
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                seen.push(since_start(&status_of(&app, &id).await));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    };
    for w in writers {
        w.await.expect("a writer finished");
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = reader.await.expect("the status reader finished");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]) && seen.iter().all(|&n| n <= CASES as i64),
        "events-since-subscription-start never goes back nor beyond {CASES}: {seen:?}"
    );

    hook.wait_for("event-notification", CASES as usize, 60)
        .await;
    // all delivered and the lease given back: nothing more will come
    wait_settled(&app, &id, CASES as i64).await;
    let got = received_events(&hook.of_type("event-notification").await);
    assert_eq!(
        got.len(),
        CASES as usize,
        "exactly one notification per case: {got:?}"
    );
    assert_eq!(
        numbers(&got),
        (1..=CASES as i64).collect::<Vec<_>>(),
        "numbered 1..{CASES}, each once, sent in number order: {got:?}"
    );
    let mut cases = BTreeSet::new();
    let mut patients = BTreeSet::new();
    for (_, focus) in &got {
        let (case, patient) = case_of(&app, focus).await;
        cases.insert(case);
        patients.insert(patient);
    }
    assert_eq!(cases.len(), CASES as usize, "distinct cases: {got:?}");
    assert_eq!(patients.len(), CASES as usize, "one case per patient");
    assert_eq!(app.count("Communication").await, CASES as i64);

    let st = status_of(&app, &id).await;
    assert_eq!(param(&st, "status")["valueCode"], "active");
    assert_eq!(since_start(&st), CASES as i64, "{}", st.text);

    let replay = events(&app, &id, "").await;
    let replayed = events_of(&replay.body);
    assert_eq!(
        numbers(&replayed),
        (1..=CASES as i64).collect::<Vec<_>>(),
        "{}",
        replay.text
    );
    assert_eq!(since_start(&replay), CASES as i64);
    // the same focus under the same number as delivered (bases may differ: compare the paths)
    for ((n, delivered), (m, replayed)) in got.iter().zip(&replayed) {
        assert_eq!(n, m);
        assert_eq!(
            case_path(delivered),
            case_path(replayed),
            "event {n}: delivered {delivered}, replayed {replayed}"
        );
    }
    assert!(
        param(&replay, "error").is_null(),
        "nothing pruned: {}",
        replay.text
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A subscription in error

async fn error_counts(app: TestApp) {
    let hook = Hook::start().await;
    let id = subscribe(
        &app,
        &subscription(&hook.url, "cre-case", "id-only", &[], None),
    )
    .await;
    wait_status(&app, &id, "active").await;

    // the endpoint fails: one attempt (delivery_max_attempts = 1) and the subscription is in error
    hook.fail(true);
    post_case(&app, 1).await;
    let mut resource = wait_status(&app, &id, "error").await;
    assert!(
        resource["error"]
            .as_str()
            .unwrap_or_default()
            .contains("503"),
        "{resource}"
    );
    let d = delivery(&app, &id).await;
    assert_eq!(
        (d.events_count, d.delivered_count, d.waiting),
        (1, 0, 0),
        "the lease holder numbered event 1 before it tried to send it: {d:?}"
    );

    // cases while in error: appended, but no lease holder comes to number them
    post_case(&app, 2).await;
    post_case(&app, 3).await;
    let d = delivery(&app, &id).await;
    // SQLite numbers events at commit (one writer: no row to contend for); PostgreSQL leaves
    // them in the outbox for the lease holder, which does not come to a subscription in error
    let expected = if numbered_at_commit(&app) {
        (3, 0)
    } else {
        (1, 2)
    };
    assert_eq!(
        (d.events_count, d.waiting),
        expected,
        "waiting in the outbox: {d:?}"
    );

    // $status numbers them
    let st = status_of(&app, &id).await;
    assert_eq!(param(&st, "status")["valueCode"], "error", "{}", st.text);
    assert_eq!(since_start(&st), 3, "{}", st.text);
    assert!(
        param(&st, "error")["valueCodeableConcept"]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("503"),
        "the delivery error: {}",
        st.text
    );
    let d = delivery(&app, &id).await;
    assert_eq!((d.events_count, d.waiting), (3, 0), "{d:?}");

    // and so does $events, without $status first
    post_case(&app, 4).await;
    post_case(&app, 5).await;
    let waiting = if numbered_at_commit(&app) { 0 } else { 2 };
    assert_eq!(delivery(&app, &id).await.waiting, waiting);
    let replay = events(&app, &id, "").await;
    let listed = events_of(&replay.body);
    assert_eq!(numbers(&listed), vec![1, 2, 3, 4, 5], "{}", replay.text);
    assert_eq!(since_start(&replay), 5, "{}", replay.text);
    assert_eq!(param(&replay, "status")["valueCode"], "error");
    let mut cases = BTreeSet::new();
    for (_, focus) in &listed {
        cases.insert(case_of(&app, focus).await.0);
    }
    assert_eq!(cases.len(), 5, "five distinct cases: {listed:?}");
    let d = delivery(&app, &id).await;
    assert_eq!(
        (d.events_count, d.delivered_count, d.waiting),
        (5, 0, 0),
        "{d:?}"
    );
    let st = status_of(&app, &id).await;
    assert_eq!(since_start(&st), 5, "{}", st.text);
    assert!(
        hook.of_type("event-notification").await.is_empty(),
        "nothing was acknowledged while failing"
    );

    // set active again: every event goes out once, in number order, under the number it was
    // listed with
    hook.fail(false);
    resource["status"] = json!("active");
    let r = app
        .put(&format!("/fhir/Subscription/{id}"), &resource, &[])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    hook.wait_for("event-notification", 5, 30).await;
    wait_settled(&app, &id, 5).await;
    let got = received_events(&hook.of_type("event-notification").await);
    assert_eq!(numbers(&got), vec![1, 2, 3, 4, 5], "{got:?}");
    for ((n, delivered), (_, listed)) in got.iter().zip(&listed) {
        assert_eq!(
            case_path(delivered),
            case_path(listed),
            "event {n}: delivered {delivered}, listed {listed}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Pruning after the retention

async fn pruning(app: TestApp) {
    let hook = Hook::start().await;
    let id = subscribe(
        &app,
        &subscription(&hook.url, "cre-case", "id-only", &[], None),
    )
    .await;
    wait_status(&app, &id, "active").await;

    post_case(&app, 1).await;
    let first = received_events(&hook.wait_for("event-notification", 1, 20).await);
    assert_eq!(numbers(&first), vec![1]);
    // the lease that delivered event 1 lingers, then is given back
    let d = wait_settled(&app, &id, 1).await;
    assert_eq!((d.pruned_count, d.stored), (0, 1), "{d:?}");
    // pruning happens when a lease starts: event 1 is still there
    let replay = events(&app, &id, "?eventsSinceNumber=1").await;
    assert_eq!(
        numbers(&events_of(&replay.body)),
        vec![1],
        "{}",
        replay.text
    );
    assert!(param(&replay, "error").is_null(), "{}", replay.text);

    // a second case: a new lease, which first prunes event 1 (delivered, older than 0 days)
    post_case(&app, 2).await;
    let got = received_events(&hook.wait_for("event-notification", 2, 20).await);
    assert_eq!(numbers(&got), vec![1, 2], "event 2 is still delivered");
    let d = wait_settled(&app, &id, 2).await;
    assert_eq!(
        (d.pruned_count, d.stored),
        (1, 1),
        "event 1 pruned, event 2 kept: {d:?}"
    );

    for query in ["?eventsSinceNumber=1", ""] {
        let replay = events(&app, &id, query).await;
        let listed = events_of(&replay.body);
        assert_eq!(numbers(&listed), vec![2], "$events{query}: {}", replay.text);
        assert_eq!(case_path(&listed[0].1), case_path(&got[1].1));
        let error = param(&replay, "error")["valueCodeableConcept"]["text"]
            .as_str()
            .unwrap_or_else(|| panic!("$events{query} says what was pruned: {}", replay.text))
            .to_string();
        assert!(
            error.contains("events 1 to 1") && error.contains("pruned"),
            "{error}"
        );
        assert!(error.contains("earliest available is 2"), "{error}");
        assert_eq!(since_start(&replay), 2, "{}", replay.text);
    }
    // nothing pruned from where the caller asks
    let replay = events(&app, &id, "?eventsSinceNumber=2").await;
    assert_eq!(
        numbers(&events_of(&replay.body)),
        vec![2],
        "{}",
        replay.text
    );
    assert!(param(&replay, "error").is_null(), "{}", replay.text);
    // only pruned numbers asked for: nothing, and why
    let replay = events(&app, &id, "?eventsSinceNumber=1&eventsUntilNumber=1").await;
    assert!(events_of(&replay.body).is_empty(), "{}", replay.text);
    assert!(!param(&replay, "error").is_null(), "{}", replay.text);

    let st = status_of(&app, &id).await;
    assert_eq!(since_start(&st), 2, "{}", st.text);
    assert_eq!(param(&st, "status")["valueCode"], "active");
}

// ---------------------------------------------------------------------------------------------
// 4. More waiting events than one numbering pass takes

async fn many_waiting(app: TestApp) {
    /// More than the 500 outbox rows `sub_number_events` takes at a time.
    const WAITING: u32 = 501;
    let hook = Hook::start().await;
    let id = subscribe(
        &app,
        &subscription(&hook.url, "cre-case", "id-only", &[], None),
    )
    .await;
    wait_status(&app, &id, "active").await;
    hook.fail(true);
    post_case(&app, 1).await;
    wait_status(&app, &id, "error").await;

    // the Walkthrough's laboratory transaction for distinct people: one CRE case each, 16 at a time
    let app = Arc::new(app);
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    let writers: Vec<_> = (1..=WAITING)
        .map(|n| {
            let (app, slots) = (app.clone(), slots.clone());
            tokio::spawn(async move {
                let _slot = slots.acquire().await.expect("open");
                let bundle = common::distinct_lab_transaction(&format!("outbox-{n}"), n);
                let r = app.post("/fhir", &bundle).await;
                assert_eq!(r.status, StatusCode::OK, "case {n}: {}", r.text);
            })
        })
        .collect();
    for w in writers {
        w.await.expect("a writer finished");
    }
    let d = delivery(&app, &id).await;
    let expected = if numbered_at_commit(&app) {
        (WAITING as i64 + 1, 0)
    } else {
        (1, WAITING as i64)
    };
    assert_eq!((d.events_count, d.waiting), expected, "{d:?}");

    let total = WAITING as i64 + 1;
    let replay = events(&app, &id, "").await;
    assert_eq!(since_start(&replay), total, "$events' count");
    assert_eq!(
        numbers(&events_of(&replay.body)),
        (1..=total).collect::<Vec<_>>(),
        "$events lists every event"
    );
    let st = status_of(&app, &id).await;
    assert_eq!(since_start(&st), total, "{}", st.text);
}
