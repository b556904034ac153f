//! Probes (issue 15, item 1): `/healthz` answers while the process lives; `/readyz` answers 200
//! only while a write commits within its bound and the delivery worker goes round, and turns 503
//! within seconds when the database stops taking writes or the worker dies. On SQLite and
//! PostgreSQL.
mod common;

use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use common::{Db, Resp, TestApp, fixture};
use sentinella::api::health::PROBE_TIMEOUT;
use sentinella::config::Config;
use sqlx::Connection;

const ACCESS: &str = r#"
[[client]]
id = "lab-niguarda"
role = "laboratory"
token_sha256 = "TOKEN_LAB"
"#;

fn with_access(c: &mut Config) {
    c.access_file = Some(common::access_file(ACCESS, &[("TOKEN_LAB", "lab-token")]));
}

async fn readyz(app: &TestApp) -> Resp {
    app.request(Method::GET, "/readyz", &[], None).await
}

/// Ask `/readyz` until it answers `want`; how long that took. Fails after `limit`.
async fn wait_ready(app: &TestApp, want: StatusCode, limit: Duration) -> (Duration, Resp) {
    let start = Instant::now();
    loop {
        let r = readyz(app).await;
        if r.status == want {
            return (start.elapsed(), r);
        }
        assert!(
            start.elapsed() < limit,
            "/readyz still answers {} after {limit:?}: {}",
            r.status,
            r.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Another connection that holds the database's write lock until it is dropped or released: the
/// server's writer can then not commit (a stuck writer, as far as the server can tell).
enum WriteLock {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl WriteLock {
    async fn take(app: &TestApp) -> WriteLock {
        match &app.db {
            Db::Sqlite(_) => {
                use std::str::FromStr;
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(&app.database_url())
                    .unwrap()
                    .busy_timeout(Duration::from_secs(30));
                let mut c = sqlx::SqliteConnection::connect_with(&options)
                    .await
                    .unwrap();
                let t = Instant::now();
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut c)
                    .await
                    .unwrap();
                eprintln!("write lock taken after {:?}", t.elapsed());
                WriteLock::Sqlite(c)
            }
            Db::Postgres(_) => {
                let mut c = sqlx::PgConnection::connect(&app.database_url())
                    .await
                    .unwrap();
                sqlx::query("BEGIN").execute(&mut c).await.unwrap();
                // every table a write touches could be locked; the probe's is enough to hold it
                sqlx::query("LOCK TABLE rule_state IN EXCLUSIVE MODE")
                    .execute(&mut c)
                    .await
                    .unwrap();
                WriteLock::Postgres(c)
            }
        }
    }

    async fn release(self) {
        match self {
            WriteLock::Sqlite(mut c) => {
                sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
            }
            WriteLock::Postgres(mut c) => {
                sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
            }
        }
    }
}

on_both_databases_with! {
    super::with_access;
    async fn healthz_and_readyz_answer_without_a_token_and_say_nothing_internal(app) {
        let h = app.request(Method::GET, "/healthz", &[], None).await;
        assert_eq!(h.status, StatusCode::OK, "{}", h.text);
        assert_eq!(h.body["status"], "pass");
        let r = readyz(&app).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["status"], "pass");
        assert_eq!(r.body["checks"]["database:write"]["status"], "pass");
        assert_eq!(r.body["checks"]["subscriptions:delivery-worker"]["status"], "pass");
        assert_eq!(r.header("cache-control"), Some("no-store"));
        // HEAD works for probes that use it; the FHIR API still wants its token
        let head = app.request(Method::HEAD, "/readyz", &[], None).await;
        assert_eq!(head.status, StatusCode::OK);
        let fhir = app.request(Method::GET, "/fhir/Patient", &[], None).await;
        assert_eq!(fhir.status, StatusCode::UNAUTHORIZED);
        // other methods are not probes
        let post = app.request(Method::POST, "/readyz", &[], Some(b"{}".to_vec())).await;
        assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    }
}

on_both_databases! {
    async fn readyz_fails_within_seconds_when_the_writer_cannot_commit_and_recovers(app) {
        wait_ready(&app, StatusCode::OK, Duration::from_secs(10)).await;
        let lock = WriteLock::take(&app).await;
        // reads still answer while writes are stuck: that is what /metadata alone would miss
        let meta = app.get("/fhir/metadata").await;
        assert_eq!(meta.status, StatusCode::OK);
        // a second for a reused earlier answer, the probe's bound, and slack for a busy machine
        let (took, red) = wait_ready(
            &app,
            StatusCode::SERVICE_UNAVAILABLE,
            PROBE_TIMEOUT + Duration::from_secs(5),
        )
        .await;
        assert_eq!(red.body["status"], "fail", "{}", red.text);
        assert_eq!(red.body["checks"]["database:write"]["status"], "fail", "{}", red.text);
        // the worker is fine: only the write check fails
        assert_eq!(red.body["checks"]["subscriptions:delivery-worker"]["status"], "pass");
        assert!(!red.text.contains("rule_state") && !red.text.contains("sqlx"), "{}", red.text);
        eprintln!("/readyz went red {took:?} after the write lock was taken");
        let h = app.request(Method::GET, "/healthz", &[], None).await;
        assert_eq!(h.status, StatusCode::OK, "the process lives: only readiness fails");

        // many probes at once while stuck: each answers within the bound, none piles up writes
        let start = Instant::now();
        let probes = (0..20).map(|_| readyz(&app));
        for r in futures::future::join_all(probes).await {
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
        }
        assert!(start.elapsed() < PROBE_TIMEOUT * 3, "{:?}", start.elapsed());

        lock.release().await;
        wait_ready(&app, StatusCode::OK, Duration::from_secs(15)).await;
        // and writes work again
        let w = app.post("/fhir/Patient", &fixture("patient-rossi.json")).await;
        assert_eq!(w.status, StatusCode::CREATED, "{}", w.text);
    }

    async fn readyz_fails_when_the_delivery_worker_is_dead(app) {
        wait_ready(&app, StatusCode::OK, Duration::from_secs(10)).await;
        app.state.readiness.stop_worker();
        let (_, red) = wait_ready(&app, StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(5)).await;
        assert_eq!(red.body["checks"]["subscriptions:delivery-worker"]["status"], "fail", "{}", red.text);
        assert_eq!(red.body["checks"]["database:write"]["status"], "pass", "{}", red.text);
    }
}

/// What an operator does to PostgreSQL (README, "Health and readiness"): make the database
/// read-only and close its sessions. The pool reconnects into read-only sessions, the probe's
/// write is refused, and `/readyz` goes red; undone, it goes green again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_when_the_postgres_database_is_made_read_only() {
    let app = TestApp::postgres().await;
    let Db::Postgres(name) = &app.db else {
        unreachable!()
    };
    wait_ready(&app, StatusCode::OK, Duration::from_secs(10)).await;
    let mut admin =
        sqlx::PgConnection::connect(&format!("{}/postgres", common::postgres_admin_url()))
            .await
            .unwrap();
    let set = |on: bool| {
        format!(
            "ALTER DATABASE {name} SET default_transaction_read_only = {}",
            if on { "on" } else { "off" }
        )
    };
    let close_sessions =
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'");
    sqlx::query(sqlx::AssertSqlSafe(set(true)))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(close_sessions.clone()))
        .execute(&mut admin)
        .await
        .unwrap();
    let (_, red) = wait_ready(
        &app,
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        red.body["checks"]["database:write"]["status"], "fail",
        "{}",
        red.text
    );
    // a FHIR write is refused too, and reads answer
    let w = app
        .post("/fhir/Patient", &fixture("patient-rossi.json"))
        .await;
    assert!(w.status.is_server_error(), "{} {}", w.status, w.text);
    assert_eq!(app.get("/fhir/Patient").await.status, StatusCode::OK);

    sqlx::query(sqlx::AssertSqlSafe(set(false)))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(close_sessions))
        .execute(&mut admin)
        .await
        .unwrap();
    wait_ready(&app, StatusCode::OK, Duration::from_secs(15)).await;
}

/// A transaction the server drops without committing (a rule that finds nothing to do, a write
/// that fails) must not leave the SQLite writer idling inside an open transaction: its write lock
/// would keep every other process on the file (another server, `sentinella import`) waiting until
/// this server's next write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sqlite_writer_holds_no_write_lock_after_a_dropped_transaction() {
    use std::str::FromStr;
    let app = TestApp::sqlite().await;
    wait_ready(&app, StatusCode::OK, Duration::from_secs(10)).await;
    let store = &app.state.store;
    let mut tx = store.begin().await.unwrap();
    tx.state_get("health", "readyz").await.unwrap();
    drop(tx);
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(&app.database_url())
        .unwrap()
        .busy_timeout(Duration::from_secs(3));
    let mut other = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .expect("another process gets the write lock while the server is idle");
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
}
