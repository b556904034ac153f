//! Test harness: the real router in process, on a fresh SQLite file or a fresh PostgreSQL database.
#![allow(dead_code)]

pub mod process;
pub mod subscriber;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use sentinella::config::Config;
use serde_json::Value;
use tower::ServiceExt;

/// The PostgreSQL server the tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("SENTINELLA_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub enum Db {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

pub struct TestApp {
    pub router: Router,
    /// What the router serves from (its store, its readiness, …).
    pub state: sentinella::api::AppState,
    pub db: Db,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// The expressions of an OperationOutcome's issues.
    pub fn expressions(&self) -> Vec<String> {
        self.body["issue"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|i| i["expression"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e.as_str().map(String::from))
            .collect()
    }
}

pub fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture exists"))
        .expect("fixture is JSON")
}

impl TestApp {
    pub async fn sqlite() -> Self {
        Self::sqlite_with(|_| {}).await
    }

    pub async fn sqlite_with(tune: impl FnOnce(&mut Config)) -> Self {
        let path = std::env::temp_dir().join(format!(
            "sentinella-test-{}.db",
            uuid::Uuid::new_v4().simple()
        ));
        let mut config = Config::with_database(format!("sqlite://{}", path.display()));
        tune(&mut config);
        let state = sentinella::server::build_state(config)
            .await
            .expect("sqlite app starts");
        TestApp {
            router: sentinella::api::router(state.clone()),
            state,
            db: Db::Sqlite(path),
        }
    }

    pub async fn postgres() -> Self {
        Self::postgres_with(|_| {}).await
    }

    pub async fn postgres_with(tune: impl FnOnce(&mut Config)) -> Self {
        use sqlx::Connection;
        let name = format!("sentinella_test_{}", uuid::Uuid::new_v4().simple());
        let admin = postgres_admin_url();
        let mut conn = sqlx::PgConnection::connect(&format!("{admin}/postgres"))
            .await
            .expect("PostgreSQL is reachable (start it: see .ci/run)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create db");
        let mut config = Config::with_database(format!("{admin}/{name}"));
        tune(&mut config);
        let state = sentinella::server::build_state(config)
            .await
            .expect("postgres app starts");
        TestApp {
            router: sentinella::api::router(state.clone()),
            state,
            db: Db::Postgres(name),
        }
    }

    /// A second server on the same database (another process, as far as the database can tell:
    /// its own connections, its own SQLite writer), answering through `TestApp::request_to`.
    pub async fn another_server(&self) -> Router {
        sentinella::server::build_app(Config::with_database(self.database_url()))
            .await
            .expect("a second server starts on the same database")
    }

    pub async fn request(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(body.map(Body::from).unwrap_or_else(Body::empty))
            .expect("request");
        let resp = self
            .router
            .clone()
            .oneshot(req)
            .await
            .expect("router answers");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&bytes).to_string();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Resp {
            status,
            headers,
            body,
            text,
        }
    }

    pub async fn get(&self, uri: &str) -> Resp {
        self.request(Method::GET, uri, &[], None).await
    }

    pub async fn post(&self, uri: &str, body: &Value) -> Resp {
        self.post_with(uri, body, &[]).await
    }

    pub async fn post_with(&self, uri: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
        let mut h = vec![("content-type", "application/fhir+json")];
        h.extend_from_slice(headers);
        self.request(
            Method::POST,
            uri,
            &h,
            Some(serde_json::to_vec(body).unwrap()),
        )
        .await
    }

    pub async fn put(&self, uri: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
        let mut h = vec![("content-type", "application/fhir+json")];
        h.extend_from_slice(headers);
        self.request(
            Method::PUT,
            uri,
            &h,
            Some(serde_json::to_vec(body).unwrap()),
        )
        .await
    }

    pub async fn delete(&self, uri: &str) -> Resp {
        self.request(Method::DELETE, uri, &[], None).await
    }

    /// How many current resources of a type exist (a search total).
    pub async fn count(&self, rt: &str) -> i64 {
        let r = self.get(&format!("/fhir/{rt}?_summary=count")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.body["total"].as_i64().expect("total")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // the access file `access_file` wrote for this app (read once, when the app was built)
        if let Some(path) = &self.state.config.access_file
            && std::path::Path::new(path).starts_with(std::env::temp_dir())
            && path.contains("sentinella-access-")
        {
            let _ = std::fs::remove_file(path);
        }
        match &self.db {
            Db::Sqlite(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Db::Postgres(name) => {
                // drop the test database on a thread of its own: Drop cannot await
                let name = name.clone();
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    rt.block_on(async {
                        use sqlx::Connection;
                        if let Ok(mut c) = sqlx::PgConnection::connect(&format!(
                            "{}/postgres",
                            postgres_admin_url()
                        ))
                        .await
                        {
                            let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                            let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut c).await;
                        }
                    });
                })
                .join();
            }
        }
    }
}

/// Run each test body once on SQLite and once on PostgreSQL: `name::sqlite`, `name::postgres`.
#[macro_export]
macro_rules! on_both_databases {
    ($(async fn $name:ident($app:ident) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                async fn run($app: $crate::common::TestApp) $body
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() { run($crate::common::TestApp::sqlite().await).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() { run($crate::common::TestApp::postgres().await).await }
            }
        )*
    };
}

/// `on_both_databases!` with a configuration (an access file, limits) applied to both servers:
/// `on_both_databases_with!(tune; async fn name(app) { … })`.
#[macro_export]
macro_rules! on_both_databases_with {
    ($tune:path; $(async fn $name:ident($app:ident) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                async fn run($app: $crate::common::TestApp) $body
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() { run($crate::common::TestApp::sqlite_with($tune).await).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() { run($crate::common::TestApp::postgres_with($tune).await).await }
            }
        )*
    };
}

/// The identifier system the cancellation tests mark what they write with: every resource a test
/// request writes carries an identifier of this system naming the request, so what a cancelled
/// request left behind can be found with one search per type.
pub fn cancellation_system() -> &'static str {
    "urn:sentinella-test:cancellation"
}

/// A valid codice fiscale for test person `n` (below 26 000): Laura Bianchi, born 1 January 1990
/// (as in `examples/antibiogram-transaction.json`), in the comune coded by `n`. Each `n` is another
/// person (another identity, never an omocodia variant of another `n`).
pub fn distinct_codice_fiscale(n: u32) -> String {
    assert!(n < 26_000, "test person {n} is out of range");
    let comune = format!("{}{:03}", (b'A' + (n / 1000) as u8) as char, n % 1000);
    sentinella::italy::codice_fiscale::CodiceFiscale::complete(&format!("BNCLRA90A41{comune}"))
        .expect("a well formed codice fiscale")
        .as_str()
        .to_string()
}

/// `examples/antibiogram-transaction.json` (the laboratory's transaction: ASL, patient with
/// `ifNoneExist` on the codice fiscale, laboratory, blood specimen, K. pneumoniae isolate,
/// meropenem and imipenem R, blaKPC detected, report), made distinct: the patient is test person
/// `person` (`distinct_codice_fiscale`), the specimen has its own accession number, and every
/// resource but the two shared Organizations carries the identifier
/// `cancellation_system()|<tag>#<entry index>`. Posted whole it completes a CRE case of its own.
pub fn distinct_lab_transaction(tag: &str, person: u32) -> Value {
    let path = format!(
        "{}/examples/antibiogram-transaction.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut bundle: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the example exists"))
            .expect("the example is JSON");
    let cf = distinct_codice_fiscale(person);
    for (i, entry) in bundle["entry"]
        .as_array_mut()
        .expect("entries")
        .iter_mut()
        .enumerate()
    {
        let resource_type = entry["resource"]["resourceType"]
            .as_str()
            .expect("resourceType")
            .to_string();
        match resource_type.as_str() {
            "Organization" => continue,
            "Patient" => {
                entry["resource"]["identifier"][0]["value"] = Value::from(cf.clone());
                entry["request"]["ifNoneExist"] =
                    Value::from(format!("identifier=http://hl7.it/sid/codiceFiscale|{cf}"));
            }
            "Specimen" => {
                entry["resource"]["identifier"][0]["value"] = Value::from(format!("EMO-{tag}"));
            }
            _ => {}
        }
        let resource = &mut entry["resource"];
        let mark =
            serde_json::json!({"system": cancellation_system(), "value": format!("{tag}#{i}")});
        match resource["identifier"].as_array_mut() {
            Some(ids) => ids.push(mark),
            None => resource["identifier"] = serde_json::json!([mark]),
        }
    }
    bundle
}

/// The `cancellation_system()` identifier values of a Bundle made by `distinct_lab_transaction`:
/// what must be stored, all of it or none of it.
pub fn cancellation_marks(bundle: &Value) -> std::collections::BTreeSet<String> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| {
            e["resource"]["identifier"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|id| id["system"] == cancellation_system())
        .filter_map(|id| id["value"].as_str().map(String::from))
        .collect()
}

/// Lower-case hex SHA-256, as access files list tokens.
pub fn sha256(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Write an access file (TOML) to a fresh temporary path: every `(placeholder, token)` pair's
/// placeholder in `template` becomes the token's SHA-256. Returns the path.
pub fn access_file(template: &str, tokens: &[(&str, &str)]) -> String {
    let mut text = template.to_string();
    for (placeholder, token) in tokens {
        text = text.replace(placeholder, &sha256(token));
    }
    let path = std::env::temp_dir().join(format!(
        "sentinella-access-{}.toml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&path, text).expect("temporary access file");
    path.display().to_string()
}

impl TestApp {
    /// The database URL of this app (to open a second store or server on it).
    pub fn database_url(&self) -> String {
        match &self.db {
            Db::Sqlite(path) => format!("sqlite://{}", path.display()),
            Db::Postgres(name) => format!("{}/{name}", postgres_admin_url()),
        }
    }
}
