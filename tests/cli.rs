//! The operator's commands, run as the real binary: `validate` reports what the API's `$validate`
//! reports; `import` writes through the server's rules, resumes after `kill -9` and after a batch
//! replayed past its checkpoint without duplicating anything; `reindex` rebuilds missing index
//! rows and resumes from its cursor; `migrate`; `config check`.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use common::TestApp;
use serde_json::{Value, json};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sentinella"));
    for v in [
        "SENTINELLA_DATABASE",
        "SENTINELLA_CONFIG",
        "SENTINELLA_IMPORT_TOKEN",
        "RUST_LOG",
    ] {
        c.env_remove(v);
    }
    c.stdin(Stdio::null());
    c
}

/// Blocks its thread: the async tests are multi-threaded so that the app under test (on SQLite,
/// its writer) keeps running while a command runs against the same database.
fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("sentinella-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------------------------
// validate

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_reports_the_same_issues_as_the_api() {
    let app = TestApp::sqlite().await;
    // (file, the type in the $validate URL, content type)
    let cases = [
        ("patient-rossi.json", "Patient", "application/fhir+json"),
        (
            "cli/patient-invalid.json",
            "Patient",
            "application/fhir+json",
        ),
        ("cli/patient.xml", "Patient", "application/fhir+xml"),
        ("cli/patient-invalid.xml", "Patient", "application/fhir+xml"),
        (
            "cli/transaction-bad-entry.json",
            "Bundle",
            "application/fhir+json",
        ),
        (
            "cli/collection-bundle.json",
            "Bundle",
            "application/fhir+json",
        ),
        (
            "antibiogram-transaction.json",
            "Bundle",
            "application/fhir+json",
        ),
        ("cli/not-json.json", "Patient", "application/fhir+json"),
        ("cli/unknown-type.json", "Ricetta", "application/fhir+json"),
    ];
    let mut errors_seen = 0;
    for (file, rt, ct) in cases {
        let path = fixture(file);
        let out = run(&["validate", "--json", path_str(&path)]);
        let line: Value = serde_json::from_str(
            stdout(&out)
                .lines()
                .next()
                .unwrap_or_else(|| panic!("{file}: no output")),
        )
        .unwrap_or_else(|e| panic!("{file}: not JSON: {e}"));
        let cli = line["outcome"]["issue"].clone();
        let api = app
            .request(
                Method::POST,
                &format!("/fhir/{rt}/$validate"),
                &[("content-type", ct)],
                Some(std::fs::read(&path).unwrap()),
            )
            .await;
        assert_eq!(
            api.body["resourceType"], "OperationOutcome",
            "{file}: {}",
            api.text
        );
        assert_eq!(cli, api.body["issue"], "{file}: CLI and $validate differ");
        let has_error = cli
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["severity"] == "error" || i["severity"] == "fatal");
        errors_seen += has_error as u32;
        assert_eq!(
            out.status.code(),
            Some(if has_error { 1 } else { 0 }),
            "{file}: {}",
            stdout(&out)
        );
    }
    // not vacuous: the invalid fixtures are found invalid, the valid ones valid
    assert_eq!(errors_seen, 6, "six of the fixtures are invalid");
}

#[test]
fn validate_reads_ndjson_line_by_line_and_reports_in_words() {
    let dir = temp_dir();
    let file = dir.join("mixed.ndjson");
    let good = std::fs::read_to_string(fixture("patient-rossi.json")).unwrap();
    let good: Value = serde_json::from_str(&good).unwrap();
    std::fs::write(
        &file,
        format!(
            "{}\n\n{{\"resourceType\": \"Patient\", \"gender\": \"maschio\"}}\nnot json\n{}\n",
            good, good
        ),
    )
    .unwrap();
    let out = run(&["validate", path_str(&file)]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("mixed.ndjson:3: Patient: INVALID"), "{text}");
    assert!(
        text.contains("mixed.ndjson:4: (not a resource): INVALID"),
        "{text}"
    );
    assert!(text.contains("4 resources, 2 valid, 2 invalid"), "{text}");
    let valid = run(&["validate", path_str(&fixture("patient-rossi.json"))]);
    assert_eq!(valid.status.code(), Some(0), "{}", stdout(&valid));
    assert!(
        stdout(&valid).contains("Patient: valid"),
        "{}",
        stdout(&valid)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn help_shows_examples_and_exit_codes() {
    for cmd in [
        vec!["validate", "--help"],
        vec!["import", "--help"],
        vec!["reindex", "--help"],
        vec!["migrate", "--help"],
        vec!["config", "check", "--help"],
    ] {
        let out = run(&cmd);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{cmd:?}");
        assert!(text.contains("Examples:"), "{cmd:?}: {text}");
        assert!(text.contains("Exit codes:"), "{cmd:?}: {text}");
    }
    // a usage error is exit code 2
    assert_eq!(run(&["import"]).status.code(), Some(2));
}

// ---------------------------------------------------------------------------------------------
// import

/// The database an import goes to. SQLite: a file no server has open (SQLite has one writing
/// process: the documented way is to import with the server stopped). PostgreSQL: a server (the
/// test's app) stays open on it, since the import runs online there.
struct Target {
    url: String,
    path: Option<PathBuf>,
    _app: Option<TestApp>,
}

impl Target {
    fn sqlite() -> Target {
        let path = std::env::temp_dir().join(format!(
            "sentinella-cli-{}.db",
            uuid::Uuid::new_v4().simple()
        ));
        Target {
            url: format!("sqlite://{}", path.display()),
            path: Some(path),
            _app: None,
        }
    }

    async fn postgres() -> Target {
        let app = TestApp::postgres().await;
        Target {
            url: app.database_url(),
            path: None,
            _app: Some(app),
        }
    }

    /// One number from the database, read directly (no server of the test writes to it).
    async fn scalar(&self, sql: &str, a: &str, b: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        if self.url.starts_with("sqlite:") {
            let pool = sqlx::SqlitePool::connect(&self.url)
                .await
                .expect("sqlite opens");
            let n = sqlx::query_scalar::<_, i64>(sql)
                .bind(a)
                .bind(b)
                .fetch_one(&pool)
                .await
                .expect("query");
            pool.close().await;
            n
        } else {
            let pool = sqlx::PgPool::connect(&self.url)
                .await
                .expect("postgres opens");
            let n = sqlx::query_scalar::<_, i64>(sql)
                .bind(a)
                .bind(b)
                .fetch_one(&pool)
                .await
                .expect("query");
            pool.close().await;
            n
        }
    }

    /// Current resources of a type.
    async fn count(&self, rt: &str) -> i64 {
        self.scalar(
            "SELECT COUNT(*) FROM resources WHERE resource_type = $1 AND NOT deleted AND id <> $2",
            rt,
            "",
        )
        .await
    }

    /// Stored versions of one resource (0: it does not exist).
    async fn versions(&self, rt: &str, id: &str) -> i64 {
        self.scalar(
            "SELECT COUNT(*) FROM resource_versions WHERE resource_type = $1 AND id = $2",
            rt,
            id,
        )
        .await
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
            }
        }
    }
}

/// An NDJSON file of `n` Patients: even lines have an id, odd ones none (the content decides
/// theirs); line 10 repeats line 9 (same content: the same resource); lines 7 (not JSON), 1234
/// (an invalid gender: refused by the server) and `n - 1` (an invalid id: refused before sending)
/// are bad. Returns the Patients it should leave and the bad lines.
fn patients_ndjson(path: &Path, n: u64) -> (i64, Vec<u64>) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let bad = vec![7, 1234.min(n - 2), n - 1];
    let mut previous = String::new();
    for i in 1..=n {
        let line = if i == bad[0] {
            "{\"resourceType\": \"Patient\", \"name\": [".to_string()
        } else if i == bad[1] {
            json!({"resourceType": "Patient", "id": format!("imp-{i}"), "gender": "maschio"})
                .to_string()
        } else if i == bad[2] {
            json!({"resourceType": "Patient", "id": "not an id!", "gender": "female"}).to_string()
        } else if i == 10 {
            previous.clone()
        } else if i % 2 == 0 {
            json!({"resourceType": "Patient", "id": format!("imp-{i}"), "name": [{"family": format!("Cognome{i}")}], "gender": "female"}).to_string()
        } else {
            json!({"resourceType": "Patient", "name": [{"family": format!("Cognome{i}")}], "gender": "male", "birthDate": "1970-01-01"}).to_string()
        };
        writeln!(f, "{line}").unwrap();
        previous = line;
    }
    f.flush().unwrap();
    (n as i64 - bad.len() as i64 - 1, bad)
}

fn progress_of(input: &Path) -> Option<Value> {
    let p = PathBuf::from(format!("{}.import-progress.json", input.display()));
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

fn rejected_lines(input: &Path) -> Vec<u64> {
    let p = PathBuf::from(format!("{}.import-rejects.ndjson", input.display()));
    let mut lines: Vec<u64> = std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["line"]
                .as_u64()
                .unwrap()
        })
        .collect();
    lines.sort();
    lines
}

async fn import_resumes_after_kill(app: Target) {
    let dir = temp_dir();
    let input = dir.join("patients.ndjson");
    let (expected, bad) = patients_ndjson(&input, 4000);
    let url = app.url.clone();
    let args = [
        "import",
        "--quiet",
        "--batch",
        "20",
        "--database",
        &url,
        path_str(&input),
    ];
    let mut child = bin()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("import starts");
    // wait until some batches are recorded, then kill -9 mid-file
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if progress_of(&input).is_some_and(|p| p["line"].as_u64() >= Some(600)) {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the import ended ({status}) before it could be interrupted");
        }
        assert!(Instant::now() < deadline, "no progress recorded");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    let cp = progress_of(&input).unwrap();
    assert_eq!(cp["done"], false, "interrupted mid-file: {cp}");
    let killed_at = cp["line"].as_u64().unwrap();
    assert!(killed_at < 4000, "{cp}");
    let partial = app.count("Patient").await;
    assert!(partial > 0 && partial < expected, "{partial} of {expected}");

    let out = run(&args);
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "rejects make exit code 1: {text}{}",
        stderr(&out)
    );
    assert!(text.contains("resumed after line"), "{text}");
    // every good line written once (line 10 rewrites line 9's resource); 3 rejected
    assert!(text.contains("3997 written, 3 rejected: done"), "{text}");
    assert!(
        text.contains("[value]") && text.contains("not a valid id"),
        "{text}"
    );
    assert_eq!(
        app.count("Patient").await,
        expected,
        "no duplicates, nothing lost"
    );
    assert_eq!(rejected_lines(&input), bad, "each bad line rejected once");
    // the rejected line the server refused: with the server's reason
    let rejects =
        std::fs::read_to_string(format!("{}.import-rejects.ndjson", input.display())).unwrap();
    assert!(
        rejects.contains("400 Bad Request") || rejects.contains("422"),
        "{rejects}"
    );

    // a file already imported is skipped
    let again = run(&args);
    assert!(
        stdout(&again).contains("already imported"),
        "{}",
        stdout(&again)
    );
    assert_eq!(app.count("Patient").await, expected);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_resumes_after_kill_without_duplicates_sqlite() {
    import_resumes_after_kill(Target::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_resumes_after_kill_without_duplicates_postgres() {
    import_resumes_after_kill(Target::postgres().await).await;
}

/// Killed after the database committed a batch but before the checkpoint recorded it: the next
/// run writes that batch again, and nothing is duplicated (the resources, the rejects).
async fn replayed_batches_duplicate_nothing(app: Target) {
    let dir = temp_dir();
    let input = dir.join("replay.ndjson");
    let (expected, bad) = patients_ndjson(&input, 300);
    let url = app.url.clone();
    let base = ["import", "--quiet", "--batch", "25", "--database", &url];
    let stop = run(&[&base[..], &["--stop-after", "100", path_str(&input)]].concat());
    assert_eq!(
        stop.status.code(),
        Some(1),
        "{}{}",
        stdout(&stop),
        stderr(&stop)
    );
    let progress = PathBuf::from(format!("{}.import-progress.json", input.display()));
    let early = std::fs::read(&progress).unwrap();
    let stopped_at = serde_json::from_slice::<Value>(&early).unwrap()["line"]
        .as_u64()
        .unwrap();
    assert!((100..150).contains(&stopped_at), "{stopped_at}");

    let done = run(&[&base[..], &[path_str(&input)]].concat());
    assert_eq!(done.status.code(), Some(1), "{}", stdout(&done));
    assert_eq!(app.count("Patient").await, expected);

    // the crash: everything is committed, the checkpoint still says line 100
    std::fs::write(&progress, &early).unwrap();
    let replay = run(&[&base[..], &[path_str(&input)]].concat());
    assert!(
        stdout(&replay).contains(&format!("resumed after line {stopped_at}")),
        "{}",
        stdout(&replay)
    );
    assert_eq!(
        app.count("Patient").await,
        expected,
        "a replayed batch duplicates nothing"
    );
    assert_eq!(rejected_lines(&input), bad, "rejects logged once");
    // the replayed resources are new versions of the same resources
    assert_eq!(app.versions("Patient", "imp-200").await, 2);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_batches_duplicate_nothing_sqlite() {
    replayed_batches_duplicate_nothing(Target::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_batches_duplicate_nothing_postgres() {
    replayed_batches_duplicate_nothing(Target::postgres().await).await;
}

/// Transaction Bundles go in whole, through the surveillance rules; importing one again writes
/// the same resources (its POSTs become PUTs under content-derived ids); a Bundle refused is
/// reported with the server's reason.
async fn bundles_import_idempotently(app: Target) {
    let dir = temp_dir();
    let bundle = dir.join("antibiogram.json");
    std::fs::copy(fixture("antibiogram-transaction.json"), &bundle).unwrap();
    let bad = dir.join("bad.json");
    std::fs::copy(fixture("cli/transaction-bad-entry.json"), &bad).unwrap();
    let collection = dir.join("collection.json");
    std::fs::copy(fixture("cli/collection-bundle.json"), &collection).unwrap();
    let url = app.url.clone();
    let types = [
        "Patient",
        "Organization",
        "Specimen",
        "Observation",
        "DiagnosticReport",
        "Communication",
    ];
    let out = run(&["import", "--quiet", "--database", &url, path_str(&bundle)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let mut first = Vec::new();
    for t in types {
        first.push(app.count(t).await);
    }
    assert!(first[3] > 0, "observations written: {first:?}");
    let again = run(&[
        "import",
        "--quiet",
        "--restart",
        "--database",
        &url,
        path_str(&bundle),
    ]);
    assert_eq!(again.status.code(), Some(0), "{}", stdout(&again));
    for (t, n) in types.iter().zip(&first) {
        assert_eq!(
            app.count(t).await,
            *n,
            "{t}: importing again duplicates nothing"
        );
    }
    let out = run(&[
        "import",
        "--quiet",
        "--database",
        &url,
        path_str(&bad),
        path_str(&collection),
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("bad.json: 0 written, 1 rejected"), "{text}");
    assert!(
        text.contains("collection.json: 1 written, 1 rejected"),
        "{text}"
    );
    assert_eq!(app.versions("Patient", "coll-1").await, 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_import_idempotently_sqlite() {
    bundles_import_idempotently(Target::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_import_idempotently_postgres() {
    bundles_import_idempotently(Target::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_with_an_access_file_acts_as_the_token_client() {
    let app = Target::sqlite();
    let access = common::access_file(
        &std::fs::read_to_string(fixture("cli/access.toml")).unwrap(),
        &[
            ("LAB_TOKEN_SHA", "lab-token-0123456789"),
            ("REGION_TOKEN_SHA", "region-token-0123456789"),
            ("ADMIN_TOKEN_SHA", "admin-token-0123456789"),
        ],
    );
    let dir = temp_dir();
    let input = dir.join("p.ndjson");
    std::fs::write(
        &input,
        format!("{}\n", json!({"resourceType": "Patient", "id": "tok-1"})),
    )
    .unwrap();
    let url = app.url.clone();
    let no_token = run(&[
        "import",
        "--quiet",
        "--database",
        &url,
        "--config",
        &access,
        path_str(&input),
    ]);
    assert_eq!(no_token.status.code(), Some(2), "{}", stderr(&no_token));
    let wrong = run(&[
        "import",
        "--quiet",
        "--database",
        &url,
        "--config",
        &access,
        "--token",
        "nope",
        path_str(&input),
    ]);
    assert_eq!(wrong.status.code(), Some(2), "{}", stderr(&wrong));
    assert!(stderr(&wrong).contains("token"), "{}", stderr(&wrong));
    let ok = run(&[
        "import",
        "--quiet",
        "--database",
        &url,
        "--config",
        &access,
        "--token",
        "admin-token-0123456789",
        path_str(&input),
    ]);
    assert_eq!(ok.status.code(), Some(0), "{}{}", stdout(&ok), stderr(&ok));
    assert_eq!(app.versions("Patient", "tok-1").await, 1);
    std::fs::remove_dir_all(dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// reindex, migrate, config check

async fn found(app: &TestApp) -> i64 {
    let r = app
        .get("/fhir/Patient?family=Reindexato&_summary=count")
        .await;
    r.body["total"].as_i64().expect("a total")
}

async fn reindex_rebuilds_and_resumes(app: TestApp) {
    let url = app.database_url();
    let mut ids = Vec::new();
    for i in 0..6 {
        let r = app
            .post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Reindexato", "given": [format!("N{i}")]}]}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        ids.push(r.body["id"].as_str().unwrap().to_string());
    }
    ids.sort();
    assert_eq!(found(&app).await, 6);
    let drop_index = || async {
        let sql = "DELETE FROM search_index WHERE resource_type = 'Patient'";
        if url.starts_with("sqlite:") {
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        } else {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        }
    };
    // search parameters "changed": the rows are gone
    drop_index().await;
    assert_eq!(found(&app).await, 0);
    let out = run(&["reindex", "--quiet", "--batch", "2", "--database", &url]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(found(&app).await, 6, "{}", stdout(&out));

    // interrupted after the third Patient: the cursor resumes after it
    drop_index().await;
    let store = sentinella::store::connect(&url).await.unwrap();
    let mut tx = store.begin().await.unwrap();
    tx.state_put(
        "cli-reindex",
        "cursor",
        &json!({"type": "Patient", "id": ids[2], "done": 3, "finished": false}),
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let after = store
        .current_after(("Patient", ids[2].as_str()), 100_000)
        .await
        .unwrap()
        .len() as u64;
    let pass = sentinella::cli::reindex::pass(&store, 2, false, |_| {})
        .await
        .unwrap();
    assert_eq!(
        pass.resumed_after,
        Some(("Patient".to_string(), ids[2].clone()))
    );
    assert_eq!(pass.reindexed, after);
    assert_eq!(found(&app).await, 3, "only the Patients after the cursor");
    let c = sentinella::cli::reindex::cursor(&store)
        .await
        .unwrap()
        .unwrap();
    assert!(c.finished, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reindex_rebuilds_and_resumes_sqlite() {
    reindex_rebuilds_and_resumes(TestApp::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reindex_rebuilds_and_resumes_postgres() {
    reindex_rebuilds_and_resumes(TestApp::postgres().await).await;
}

#[test]
fn migrate_applies_then_has_nothing_to_do() {
    let dir = temp_dir();
    let url = format!("sqlite://{}", dir.join("m.db").display());
    let first = run(&["migrate", "--database", &url]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert!(
        stdout(&first).contains("applied 0001"),
        "{}",
        stdout(&first)
    );
    let second = run(&["migrate", "--database", &url]);
    assert!(
        stdout(&second).contains(", 0 applied now"),
        "{}",
        stdout(&second)
    );
    let bad = run(&["migrate", "--database", "mysql://x"]);
    assert_eq!(bad.status.code(), Some(2));
    let unreachable = run(&["migrate", "--database", "postgres://nobody@127.0.0.1:1/x"]);
    assert_eq!(
        unreachable.status.code(),
        Some(3),
        "{}",
        stderr(&unreachable)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_postgres() {
    use sqlx::Connection;
    let name = format!("sentinella_cli_{}", uuid::Uuid::new_v4().simple());
    let admin = common::postgres_admin_url();
    let mut conn = sqlx::PgConnection::connect(&format!("{admin}/postgres"))
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let url = format!("{admin}/{name}");
    let first = run(&["migrate", "--database", &url]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert!(
        stdout(&first).contains("applied 0006"),
        "{}",
        stdout(&first)
    );
    let second = run(&["migrate", "--database", &url]);
    assert!(
        stdout(&second).contains(", 0 applied now"),
        "{}",
        stdout(&second)
    );
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
}

#[test]
fn config_check_explains_each_client() {
    let access = common::access_file(
        &std::fs::read_to_string(fixture("cli/access.toml")).unwrap(),
        &[
            ("LAB_TOKEN_SHA", "lab-token-0123456789"),
            ("REGION_TOKEN_SHA", "region-token-0123456789"),
            ("ADMIN_TOKEN_SHA", "admin-token-0123456789"),
        ],
    );
    let out = run(&["config", "check", &access]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(text.contains("is valid: 3 clients"), "{text}");
    assert!(text.contains("client 'regione-lombardia'"), "{text}");
    assert!(text.contains("regions:   030"), "{text}");
    assert!(
        text.contains(
            "only to endpoints starting with https://regione.lombardia.example/fhir-notify"
        ),
        "{text}"
    );
    assert!(text.contains("a static bearer token"), "{text}");
    // the laboratory writes results and reads no cases (the server's own rules say so)
    let lab = text.split("client 'lab-niguarda'").nth(1).unwrap();
    let lab = lab.split("client '").next().unwrap();
    assert!(
        lab.contains("may write:") && lab.contains("Observation"),
        "{lab}"
    );
    assert!(
        !lab.split("may write:")
            .next()
            .unwrap()
            .contains("Communication"),
        "{lab}"
    );

    let bad = run(&[
        "config",
        "check",
        path_str(&fixture("cli/access-invalid.toml")),
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("needs regions"), "{}", stderr(&bad));
    let missing = run(&["config", "check", "/nonexistent/access.toml"]);
    assert_eq!(missing.status.code(), Some(2));
}
