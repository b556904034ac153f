//! Writes go through the server's own router, in process: a Bundle posted to `/fhir` is parsed,
//! validated, authorised, run through the surveillance rules and audited exactly as one sent over
//! HTTP. A batch of resources goes first as one transaction (one commit: fast); when the
//! transaction is refused, the same entries go again as a batch, so each bad resource is
//! rejected on its own with its reason and the good ones are written.
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;

/// One resource to write with `PUT Type/id` (idempotent: writing it again after a crash makes a
/// new version of the same resource, never a second resource).
#[derive(Debug, Clone)]
pub struct Item {
    /// Where it came from: the NDJSON line, or the Bundle entry.
    pub line: Option<u64>,
    pub entry: Option<usize>,
    pub resource_type: String,
    pub id: String,
    pub resource: Value,
}

/// A resource (or a whole Bundle) that was not written, and why.
#[derive(Debug, Clone)]
pub struct Reject {
    pub line: Option<u64>,
    pub entry: Option<usize>,
    /// `Type/id`, when known.
    pub what: Option<String>,
    /// The HTTP status the server gave it (`400 Bad Request`…), or `not sent`.
    pub status: String,
    /// The OperationOutcome's issues.
    pub issues: Vec<Value>,
}

impl Reject {
    pub fn json(&self) -> Value {
        let mut v = json!({"status": self.status, "issues": self.issues});
        if let Some(l) = self.line {
            v["line"] = json!(l);
        }
        if let Some(e) = self.entry {
            v["entry"] = json!(e);
        }
        if let Some(w) = &self.what {
            v["resource"] = json!(w);
        }
        v
    }

    /// A local refusal (the line never reached the server: not JSON, too long…).
    pub fn local(line: Option<u64>, what: Option<String>, issues: &[crate::error::Issue]) -> Self {
        Reject {
            line,
            entry: None,
            what,
            status: "not sent".into(),
            issues: crate::error::operation_outcome(issues)["issue"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        }
    }
}

/// Why the import cannot go on (nothing of the current batch is recorded as done).
#[derive(Debug)]
pub enum Stop {
    /// The server refused the importer itself (the token).
    Refused(String),
    /// The database failed or stayed busy.
    Database(String),
}

pub struct Writer {
    pub app: Router,
    /// `Authorization: Bearer` value, with an access file.
    pub token: Option<String>,
}

/// Statuses worth waiting for: the writer queue was full, or a rate limit.
fn transient(s: StatusCode) -> bool {
    s == StatusCode::SERVICE_UNAVAILABLE || s == StatusCode::TOO_MANY_REQUESTS
}

fn diagnostics(body: &Value) -> String {
    body["issue"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["diagnostics"].as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

impl Writer {
    /// POST a Bundle to the base; retries while the database is busy (up to about a minute).
    pub async fn post(&self, bundle: &Value) -> Result<(StatusCode, Value), Stop> {
        let body = serde_json::to_vec(bundle).map_err(|e| Stop::Database(e.to_string()))?;
        let mut wait = Duration::from_millis(250);
        for attempt in 0.. {
            let mut req = Request::post("/fhir")
                .header(header::CONTENT_TYPE, "application/fhir+json")
                .header(header::ACCEPT, "application/fhir+json")
                .header(header::HOST, "localhost");
            if let Some(t) = &self.token {
                req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let req = req
                .body(Body::from(body.clone()))
                .map_err(|e| Stop::Database(e.to_string()))?;
            let resp = self
                .app
                .clone()
                .oneshot(req)
                .await
                .map_err(|e| Stop::Database(e.to_string()))?;
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .map_err(|e| Stop::Database(e.to_string()))?;
            let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if transient(status) && attempt < 8 {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(15));
                continue;
            }
            if status == StatusCode::UNAUTHORIZED {
                return Err(Stop::Refused(format!(
                    "the server did not accept the importer's token: {}",
                    diagnostics(&value)
                )));
            }
            if status.is_server_error() {
                return Err(Stop::Database(format!("{status}: {}", diagnostics(&value))));
            }
            return Ok((status, value));
        }
        unreachable!("the loop returns")
    }

    /// Write `items`; those refused come back with their reasons.
    pub async fn write(&self, items: &[Item]) -> Result<Vec<Reject>, Stop> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let entries: Vec<Value> = items
            .iter()
            .map(|i| {
                json!({
                    "resource": i.resource,
                    "request": {"method": "PUT", "url": format!("{}/{}", i.resource_type, i.id)},
                })
            })
            .collect();
        let (status, _) = self
            .post(&json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}))
            .await?;
        if status.is_success() {
            return Ok(Vec::new());
        }
        // one entry spoiled the transaction: each on its own, to know which
        let (status, body) = self
            .post(&json!({"resourceType": "Bundle", "type": "batch", "entry": entries}))
            .await?;
        if !status.is_success() {
            return Ok(items.iter().map(|i| reject_of(i, status, &body)).collect());
        }
        let answers = body["entry"].as_array().cloned().unwrap_or_default();
        let mut rejects = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let answer = answers.get(i).cloned().unwrap_or(Value::Null);
            let code = answer["response"]["status"]
                .as_str()
                .and_then(|s| s.split_whitespace().next())
                .and_then(|c| c.parse::<u16>().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if code.is_success() {
                continue;
            }
            if code.is_server_error() || transient(code) {
                return Err(Stop::Database(format!(
                    "{code}: {}",
                    diagnostics(&answer["response"]["outcome"])
                )));
            }
            rejects.push(reject_of(item, code, &answer["response"]["outcome"]));
        }
        Ok(rejects)
    }
}

fn reject_of(item: &Item, status: StatusCode, outcome: &Value) -> Reject {
    Reject {
        line: item.line,
        entry: item.entry,
        what: Some(format!("{}/{}", item.resource_type, item.id)),
        status: format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .trim()
        .to_string(),
        issues: outcome["issue"].as_array().cloned().unwrap_or_default(),
    }
}

/// A whole Bundle refused (a transaction is all or nothing).
pub fn bundle_reject(status: StatusCode, outcome: &Value) -> Reject {
    Reject {
        line: None,
        entry: None,
        what: Some("Bundle".into()),
        status: format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .trim()
        .to_string(),
        issues: outcome["issue"].as_array().cloned().unwrap_or_default(),
    }
}
