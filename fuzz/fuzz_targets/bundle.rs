//! The Bundle processor (`POST /fhir`): transactions and batches. It cannot run without a store
//! (ids, conditional matches and reference resolution happen inside the database transaction),
//! so this target drives the real router (`server::build_app`) on a scratch SQLite database, in
//! one tokio runtime made once. The body is sent as FHIR XML when it starts with `<`, else as JSON.
//!
//! Asserts: never a 5xx (a handler panic is one: `CatchPanicLayer`; here the fuzzer's panic hook
//! aborts first); a 4xx is an OperationOutcome with an error issue, and changes nothing (the
//! system history total is the same before and after); a 200 is a transaction-response or
//! batch-response Bundle whose entries each have a status, none of them a 5xx, and a failed batch
//! entry carries an OperationOutcome.
#![no_main]

mod common;

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use sentinella::config::Config;
use serde_json::Value;
use tower::ServiceExt;

struct Server {
    runtime: tokio::runtime::Runtime,
    app: axum::Router,
}

/// The server, started on the first input. Its database lives in `SENTINELLA_FUZZ_DB_DIR`
/// (`fuzz/run.sh` makes and removes one per run), else in the temporary directory.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let dir = std::env::var_os("SENTINELLA_FUZZ_DB_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let path = dir.join(format!("sentinella-fuzz-bundle-{}.db", std::process::id()));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        let config = Config::with_database(format!("sqlite://{}", path.display()));
        let app = runtime
            .block_on(sentinella::server::build_app(config))
            .expect("the server starts on a scratch SQLite database");
        Server { runtime, app }
    })
}

async fn call(app: &axum::Router, req: Request<Body>) -> (StatusCode, Value, String) {
    let resp = app.clone().oneshot(req).await.expect("the router answers");
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .expect("the body is read")
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        text,
    )
}

/// How many versions the database holds (every write adds one).
async fn versions(app: &axum::Router) -> i64 {
    let req = Request::get("/fhir/_history?_count=1")
        .body(Body::empty())
        .expect("a request");
    let (status, body, text) = call(app, req).await;
    assert_eq!(status, StatusCode::OK, "GET /fhir/_history: {text}");
    body["total"].as_i64().expect("a history total")
}

fuzz_target!(|data: &[u8]| {
    let server = server();
    let xml = data.trim_ascii_start().starts_with(b"<");
    let content_type = if xml {
        "application/fhir+xml"
    } else {
        "application/fhir+json"
    };
    server.runtime.block_on(async {
        let app = &server.app;
        let before = versions(app).await;
        let req = Request::post("/fhir")
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(data.to_vec()))
            .expect("a request");
        let (status, body, text) = call(app, req).await;
        assert!(
            !status.is_server_error(),
            "POST /fhir answered {status}: {text}"
        );
        if status.is_client_error() {
            common::assert_operation_outcome(&body, &format!("POST /fhir answered {status}"));
            let after = versions(app).await;
            assert_eq!(
                before, after,
                "a rejected Bundle ({status}) changed the database: {text}"
            );
            return;
        }
        assert_eq!(
            status,
            StatusCode::OK,
            "POST /fhir answered {status}: {text}"
        );
        assert_eq!(body["resourceType"], "Bundle", "{text}");
        let kind = body["type"].as_str().unwrap_or_default();
        assert!(
            matches!(kind, "transaction-response" | "batch-response"),
            "a {kind} answered a Bundle: {text}"
        );
        for entry in body["entry"].as_array().into_iter().flatten() {
            let entry_status = entry["response"]["status"]
                .as_str()
                .unwrap_or_else(|| panic!("an entry without response.status: {text}"));
            assert!(
                !entry_status.starts_with('5'),
                "an entry answered {entry_status}: {text}"
            );
            if !entry_status.starts_with('2') {
                assert_eq!(
                    kind, "batch-response",
                    "a failed entry in a transaction: {text}"
                );
                common::assert_operation_outcome(
                    &entry["response"]["outcome"],
                    &format!("a batch entry answered {entry_status}"),
                );
            }
        }
    });
});
