//! `sentinella serve --otlp-endpoint`: the server binary exports its spans over OTLP/HTTP to a
//! collector (here a receiver in the test that decodes the protobuf requests), continues the
//! caller's W3C trace, and puts no URL, query or identifier in what it exports.
mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::process::{SqliteFile, free_port, wait_until_ok};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::process::{Child, Command};

const CODICE_FISCALE: &str = "RSSMRA85T10A562S";
/// The caller's trace (W3C `traceparent`, sampled).
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// What the collector received: the export requests, decoded.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

impl Received {
    fn spans(&self) -> Vec<Span> {
        let requests = self.0.lock().unwrap();
        requests
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| ss.spans.clone())
            .collect()
    }

    fn service_names(&self) -> Vec<String> {
        let requests = self.0.lock().unwrap();
        requests
            .iter()
            .flat_map(|r| &r.resource_spans)
            .filter_map(|rs| rs.resource.as_ref())
            .filter_map(|r| string_attribute(&r.attributes, "service.name"))
            .collect()
    }
}

async fn collect(State(received): State<Received>, body: Bytes) -> &'static str {
    let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
    received.0.lock().unwrap().push(request);
    ""
}

/// An OTLP/HTTP receiver on a free port; its traces URL.
async fn collector() -> (Received, String) {
    let received = Received::default();
    let app = Router::new()
        .route("/v1/traces", post(collect))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (received, url)
}

/// The server on `db`, its log (stdout) in `<db>.log`.
fn server(db: &SqliteFile, port: u16, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sentinella"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--database", &db.url()])
        .args(extra)
        // export every few hundred milliseconds rather than every five seconds
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdout(Stdio::from(std::fs::File::create(log_of(db)).unwrap()))
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("server binary starts")
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(any_value::Value::StringValue(s)) => Some(s.clone()),
            Some(any_value::Value::IntValue(i)) => Some(i.to_string()),
            _ => None,
        })
}

/// Every string an attribute carries, however nested.
fn attribute_text(value: &AnyValue, out: &mut String) {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => out.push_str(s),
        Some(any_value::Value::ArrayValue(a)) => {
            a.values.iter().for_each(|v| attribute_text(v, out))
        }
        Some(any_value::Value::KvlistValue(l)) => l
            .values
            .iter()
            .filter_map(|kv| kv.value.as_ref())
            .for_each(|v| attribute_text(v, out)),
        _ => {}
    }
    out.push('\n');
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Wait until the collector holds spans satisfying `done`, or fail after 30 s.
fn log_of(db: &SqliteFile) -> std::path::PathBuf {
    db.path.with_extension("log")
}

async fn wait_for(received: &Received, what: &str, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = received.spans();
        if done(&spans) {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "the collector never received {what}; it has: {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn otlp_traces_continue_the_callers_trace_and_carry_no_identifiers() {
    let (received, endpoint) = collector().await;
    let db = SqliteFile::new("traces");
    let port = free_port();
    let mut child = server(&db, port, &["--otlp-endpoint", &endpoint]);
    let client = reqwest::Client::new();
    wait_until_ok(&format!("http://127.0.0.1:{port}/healthz"), String::new).await;
    let base = format!("http://127.0.0.1:{port}/fhir");

    let created = client
        .post(format!("{base}/Patient"))
        .header("content-type", "application/fhir+json")
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .body(include_str!("fixtures/patient-rossi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let found = client
        .get(format!(
            "{base}/Patient?identifier=http://hl7.it/sid/codiceFiscale|{CODICE_FISCALE}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(found.status(), 200);
    assert!(found.text().await.unwrap().contains(CODICE_FISCALE));

    let spans = wait_for(&received, "the write and the search", |spans| {
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        ["POST /fhir/{type}", "write", "commit", "GET /fhir/{type}"]
            .iter()
            .all(|n| names.contains(n))
    })
    .await;

    // the write: a server span continuing the caller's trace, its write task and commit inside it
    let request = spans
        .iter()
        .find(|s| s.name == "POST /fhir/{type}")
        .unwrap();
    assert_eq!(hex(&request.trace_id), TRACE_ID);
    assert_eq!(hex(&request.parent_span_id), CALLER_SPAN);
    assert_eq!(request.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(
        string_attribute(&request.attributes, "http.route").as_deref(),
        Some("/fhir/{type}")
    );
    assert_eq!(
        string_attribute(&request.attributes, "http.response.status_code").as_deref(),
        Some("201")
    );
    let write = spans.iter().find(|s| s.name == "write").unwrap();
    assert_eq!(write.parent_span_id, request.span_id);
    assert_eq!(hex(&write.trace_id), TRACE_ID);
    let commit = spans.iter().find(|s| s.name == "commit").unwrap();
    assert_eq!(hex(&commit.trace_id), TRACE_ID);

    // the search: a trace of its own (no traceparent), with status 200
    let search = spans.iter().find(|s| s.name == "GET /fhir/{type}").unwrap();
    assert_ne!(hex(&search.trace_id), TRACE_ID);
    assert!(search.parent_span_id.is_empty());
    assert_eq!(
        string_attribute(&search.attributes, "http.response.status_code").as_deref(),
        Some("200")
    );

    // nothing of the patient or the URL in anything exported
    let mut exported = String::new();
    for span in &spans {
        exported.push_str(&span.name);
        for kv in span
            .attributes
            .iter()
            .chain(span.events.iter().flat_map(|e| &e.attributes))
        {
            exported.push_str(&kv.key);
            if let Some(v) = &kv.value {
                attribute_text(v, &mut exported);
            }
        }
        exported.extend(span.events.iter().map(|e| e.name.clone()));
    }
    for secret in [
        CODICE_FISCALE,
        "Rossi",
        "codiceFiscale",
        "identifier=",
        "Patient/",
    ] {
        assert!(!exported.contains(secret), "{secret} exported: {exported}");
    }
    assert!(
        received
            .service_names()
            .iter()
            .all(|name| name == "sentinella")
    );

    child.kill().await.unwrap();
    let _ = std::fs::remove_file(log_of(&db));
}

#[tokio::test]
async fn otlp_collector_down_does_not_slow_or_fail_requests() {
    // a port nobody listens on: every export fails, in the exporter's own thread
    let endpoint = format!("http://127.0.0.1:{}/v1/traces", free_port());
    let db = SqliteFile::new("traces");
    let port = free_port();
    let mut child = server(&db, port, &["--otlp-endpoint", &endpoint]);
    let client = reqwest::Client::new();
    wait_until_ok(&format!("http://127.0.0.1:{port}/healthz"), String::new).await;
    for _ in 0..20 {
        let started = Instant::now();
        let created = client
            .post(format!("http://127.0.0.1:{port}/fhir/Patient"))
            .header("content-type", "application/fhir+json")
            .body(include_str!("fixtures/patient-rossi.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the server is still up"
    );
    // and the operator is told, in the log
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(log_of(&db)).unwrap_or_default();
        if log
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("BatchSpanProcessor.ExportError"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "no export error logged:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().await.unwrap();
    let _ = std::fs::remove_file(log_of(&db));
}

#[tokio::test]
async fn otlp_bad_settings_stop_the_server_at_start() {
    let db = SqliteFile::new("traces");
    for (args, expected) in [
        (
            vec!["--otlp-endpoint", "http://exa mple/v1/traces"],
            "exa mple",
        ),
        (vec!["--otlp-sample-ratio", "1.5"], "1.5"),
    ] {
        let child = server(&db, free_port(), &args);
        let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("the server stops at once")
            .unwrap();
        assert!(!output.status.success(), "{args:?} accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_file(log_of(&db));
}
