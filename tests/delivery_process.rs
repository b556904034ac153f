//! Delivery across processes, with the real `sentinella serve` binary: an event committed before a
//! SIGKILL arrives after the restart, and two server processes on one PostgreSQL deliver each
//! event once.
mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::process::{SqliteFile, free_port, wait_until_ok};
use common::subscriber::*;
use serde_json::Value;

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(db: &str) -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_sentinella"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--database",
            db,
        ])
        .env("SENTINELLA_DELIVERY_BACKOFF_MS", "50")
        .env("SENTINELLA_DELIVERY_BACKOFF_MAX_MS", "200")
        .env("SENTINELLA_DELIVERY_POLL_MS", "50")
        .env("SENTINELLA_DELIVERY_MAX_ATTEMPTS", "1000")
        .env_remove("SENTINELLA_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("server binary starts");
    let base = format!("http://127.0.0.1:{port}/fhir");
    let server = Server { child, base };
    wait_until_ok(&format!("{}/metadata", server.base), String::new).await;
    server
}

async fn post(base: &str, path: &str, body: &Value) -> Value {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", "application/fhir+json")
        .body(serde_json::to_vec(body).unwrap())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.unwrap()
}

async fn status_of(base: &str, id: &str) -> String {
    let r: Value = reqwest::get(format!("{base}/Subscription/{id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["status"].as_str().unwrap_or_default().to_string()
}

async fn wait_active(base: &str, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while status_of(base, id).await != "active" {
        assert!(Instant::now() < deadline, "never active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fresh_postgres() -> String {
    use sqlx::Connection;
    let name = format!("sentinella_test_{}", uuid::Uuid::new_v4().simple());
    let admin = common::postgres_admin_url();
    let mut conn = sqlx::PgConnection::connect(&format!("{admin}/postgres"))
        .await
        .expect("PostgreSQL is reachable (start it: see .ci/run)");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    format!("{admin}/{name}")
}

/// Commit, fail to deliver, SIGKILL, restart: the event still arrives.
async fn killed_between_commit_and_delivery(db: String) {
    let hook = Hook::start().await;
    let server = start(&db).await;
    let sub = post(
        &server.base,
        "/Subscription",
        &subscription(&hook.url, "cre-case", "id-only", &[], None),
    )
    .await;
    let id = sub["id"].as_str().unwrap().to_string();
    wait_active(&server.base, &id).await;
    hook.fail(true);
    post(&server.base, "", &case_bundle(1, "030308")).await;
    // the event is committed (2xx) and its delivery has been tried and failed
    let deadline = Instant::now() + Duration::from_secs(10);
    while hook.refused.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no delivery attempt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut server = server;
    server.child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
    server.child.wait().unwrap();
    assert!(hook.of_type("event-notification").await.is_empty());
    hook.fail(false);
    let restarted = start(&db).await;
    // when the kill caught it holding the lease, the lease must lapse first (60 s after its last
    // renewal, `LEASE_MICROS`): the deadline is that plus room for a loaded machine
    let ev = hook.wait_for("event-notification", 1, 90).await;
    assert_eq!(events_of(&ev[0])[0].0, 1);
    assert_eq!(status_of(&restarted.base, &id).await, "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_before_a_sigkill_arrives_after_restart_sqlite() {
    let file = SqliteFile::new("proc");
    killed_between_commit_and_delivery(file.url()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_before_a_sigkill_arrives_after_restart_postgres() {
    killed_between_commit_and_delivery(fresh_postgres().await).await
}

/// Two processes on one PostgreSQL, cases arriving at both: every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_server_processes_deliver_each_event_once_postgres() {
    let db = fresh_postgres().await;
    let hook = Hook::start().await;
    let a = start(&db).await;
    let b = start(&db).await;
    let sub = post(
        &a.base,
        "/Subscription",
        &subscription(&hook.url, "cre-case", "id-only", &[], None),
    )
    .await;
    wait_active(&a.base, sub["id"].as_str().unwrap()).await;
    const CASES: u32 = 20;
    for n in 1..=CASES {
        let server = if n % 2 == 0 { &a } else { &b };
        post(&server.base, "", &case_bundle(n, "030308")).await;
    }
    let ev = hook
        .wait_for("event-notification", CASES as usize, 30)
        .await;
    // let any duplicate arrive before counting
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let ev_all = hook.of_type("event-notification").await;
    let numbers: Vec<i64> = ev_all.iter().flat_map(events_of).map(|e| e.0).collect();
    assert_eq!(
        numbers,
        (1..=CASES as i64).collect::<Vec<_>>(),
        "once each, in order"
    );
    assert_eq!(ev.len(), CASES as usize);
    assert_eq!(hook.of_type("handshake").await.len(), 1);
}
