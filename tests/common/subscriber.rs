//! Helpers for subscription tests: a webhook listener on 127.0.0.1, CRE case Bundles for distinct
//! people and regions, Subscriptions as the Backport IG writes them.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use sentinella::italy::codice_fiscale::CodiceFiscale;
use serde_json::{Value, json};
use tokio::sync::Mutex;

pub const CANON: &str = "https://sentinella-fhir.github.io/ig";
pub const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition";

// ---------------------------------------------------------------------------------------------
// A webhook listener: records every notification it acknowledges; can be made to fail.

#[derive(Clone, Default)]
pub struct Hook {
    pub received: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    pub failing: Arc<AtomicBool>,
    pub refused: Arc<AtomicUsize>,
    pub url: String,
}

impl Hook {
    pub async fn start() -> Hook {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let hook = Hook {
            url,
            ..Default::default()
        };
        let h = hook.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let h = h.clone();
                async move {
                    if h.failing.load(Ordering::SeqCst) {
                        h.refused.fetch_add(1, Ordering::SeqCst);
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    h.received.lock().await.push((headers, v));
                    StatusCode::OK
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        hook
    }

    pub fn fail(&self, on: bool) {
        self.failing.store(on, Ordering::SeqCst);
    }

    /// The notifications of one type (handshake, heartbeat, event-notification) received so far.
    pub async fn of_type(&self, kind: &str) -> Vec<Value> {
        self.received
            .lock()
            .await
            .iter()
            .filter(|(_, b)| notification_type(b) == kind)
            .map(|(_, b)| b.clone())
            .collect()
    }

    pub async fn wait_for(&self, kind: &str, n: usize, secs: u64) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.of_type(kind).await;
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} {kind} notifications, got {}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn status_param<'a>(bundle: &'a Value, name: &str) -> &'a Value {
    bundle["entry"][0]["resource"]["parameter"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == name))
        .unwrap_or(&Value::Null)
}

pub fn notification_type(bundle: &Value) -> String {
    status_param(bundle, "type")["valueCode"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The event numbers and focus references of a notification.
pub fn events_of(bundle: &Value) -> Vec<(i64, String)> {
    bundle["entry"][0]["resource"]["parameter"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == "notification-event")
        .map(|p| {
            let part = |n: &str| {
                p["part"]
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["name"] == n).cloned())
                    .unwrap_or(Value::Null)
            };
            (
                part("event-number")["valueString"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap(),
                part("focus")["valueReference"]["reference"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Cases and subscriptions

pub fn person_cf(n: u32) -> String {
    CodiceFiscale::complete(&format!("BNCGPP75C12F{n:03}"))
        .expect("well formed")
        .as_str()
        .to_string()
}

/// The blood-culture transaction of tests/fixtures/cre for person `n` treated in the ASL `asl`
/// (NSIS code: its first 3 digits are the region): one CRE case.
pub fn case_bundle(n: u32, asl: &str) -> Value {
    let mut b = super::fixture("cre/kpn-blood-transaction.json");
    let cf = person_cf(n);
    let text = serde_json::to_string(&b)
        .unwrap()
        .replace("RSSMRA85T10A562S", &cf)
        .replace("030308", asl)
        .replace("030906", &format!("{}9{n:02}", &asl[..3]));
    b = serde_json::from_str(&text).unwrap();
    // distinct business identifiers, so the conditional creates of two cases never match
    for e in b["entry"].as_array_mut().unwrap() {
        if let Some(q) = e["request"]["ifNoneExist"].as_str().map(String::from)
            && !q.contains("codiceFiscale")
            && !q.contains("/sid/")
        {
            e["request"]["ifNoneExist"] = json!(format!("{q}-{n}"));
            if let Some(ids) = e["resource"]["identifier"].as_array_mut() {
                for id in ids {
                    let v = id["value"].as_str().unwrap().to_string();
                    id["value"] = json!(format!("{v}-{n}"));
                }
            }
        }
    }
    b
}

pub fn subscription(
    endpoint: &str,
    topic: &str,
    content: &str,
    filters: &[&str],
    heartbeat: Option<u32>,
) -> Value {
    let mut channel = json!({
        "type": "rest-hook",
        "endpoint": endpoint,
        "header": ["Authorization: Bearer regione-secret"],
        "payload": "application/fhir+json",
        "_payload": {"extension": [{"url": format!("{BACKPORT}/backport-payload-content"), "valueCode": content}]},
    });
    if let Some(h) = heartbeat {
        channel["extension"] = json!([{"url": format!("{BACKPORT}/backport-heartbeat-period"), "valueUnsignedInt": h}]);
    }
    let mut s = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Sorveglianza regionale delle batteriemie da CRE",
        "criteria": format!("{CANON}/SubscriptionTopic/{topic}"),
        "channel": channel,
    });
    if !filters.is_empty() {
        s["_criteria"] = json!({"extension": filters.iter().map(|f| json!({
            "url": format!("{BACKPORT}/backport-filter-criteria"), "valueString": f})).collect::<Vec<_>>()});
    }
    s
}
