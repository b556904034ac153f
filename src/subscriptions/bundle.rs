//! Notification bundles (Backport IG 1.1.0, R4): a `history` Bundle whose first entry is the
//! SubscriptionStatus as Parameters, then the focus of each event (a reference only for `id-only`,
//! the resource and its patient for `full-resource`, nothing for `empty`).
use serde_json::{Value, json};

use super::spec::{BACKPORT, Content};
use crate::fhir::datetime::format_instant;
use crate::store::EventRow;

/// handshake | heartbeat | event-notification | query-status | query-event
pub type Kind = &'static str;

/// An event with what its notification carries.
pub struct EventContent {
    pub event: EventRow,
    /// The focus version, for `full-resource`.
    pub focus: Option<Value>,
    /// The resources the topic's notification shape adds (the patient), for `full-resource`.
    pub included: Vec<Value>,
}

pub struct StatusInfo<'a> {
    pub subscription_id: &'a str,
    pub topic: &'a str,
    pub status: &'a str,
    pub events_since_start: i64,
    pub error: Option<&'a str>,
}

pub fn status_parameters(
    base: &str,
    info: &StatusInfo<'_>,
    kind: Kind,
    content: Content,
    events: &[EventContent],
) -> Value {
    let mut parameter = vec![
        json!({"name": "subscription", "valueReference": {
            "reference": format!("{base}/Subscription/{}", info.subscription_id)}}),
        json!({"name": "topic", "valueCanonical": info.topic}),
        json!({"name": "status", "valueCode": info.status}),
        json!({"name": "type", "valueCode": kind}),
        json!({"name": "events-since-subscription-start",
            "valueString": info.events_since_start.to_string()}),
    ];
    for e in events {
        let mut part = vec![
            json!({"name": "event-number", "valueString": e.event.event_number.to_string()}),
            json!({"name": "timestamp", "valueInstant": format_instant(e.event.occurred_at)}),
        ];
        if content != Content::Empty {
            part.push(json!({"name": "focus", "valueReference": {
                "reference": format!("{base}/{}", e.event.focus)}}));
        }
        parameter.push(json!({"name": "notification-event", "part": part}));
    }
    if let Some(err) = info.error {
        parameter.push(json!({"name": "error", "valueCodeableConcept": {"text": err}}));
    }
    json!({
        "resourceType": "Parameters",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"profile": [format!("{BACKPORT}/backport-subscription-status-r4")]},
        "parameter": parameter,
    })
}

/// `Type/id/_history/v` → (`Type/id`, v)
fn split_focus(focus: &str) -> (&str, &str) {
    match focus.split_once("/_history/") {
        Some((r, v)) => (r, v),
        None => (focus, ""),
    }
}

pub fn notification(
    base: &str,
    info: &StatusInfo<'_>,
    kind: Kind,
    content: Content,
    events: &[EventContent],
) -> Value {
    let status = status_parameters(base, info, kind, content, events);
    let mut entry = vec![json!({
        "fullUrl": format!("urn:uuid:{}", status["id"].as_str().unwrap_or_default()),
        "resource": status,
        "request": {"method": "GET", "url": format!("Subscription/{}/$status", info.subscription_id)},
        "response": {"status": "200"},
    })];
    if content != Content::Empty {
        for e in events {
            let (reference, version) = split_focus(&e.event.focus);
            let mut item = json!({
                "fullUrl": format!("{base}/{reference}"),
                "request": {"method": if version == "1" { "POST" } else { "PUT" }, "url": reference},
                "response": {"status": if version == "1" { "201" } else { "200" },
                    "etag": format!("W/\"{version}\"")},
            });
            if content == Content::FullResource
                && let Some(r) = &e.focus
            {
                item["resource"] = r.clone();
            }
            entry.push(item);
            if content == Content::FullResource {
                for r in &e.included {
                    let rt = r["resourceType"].as_str().unwrap_or_default();
                    let id = r["id"].as_str().unwrap_or_default();
                    entry.push(json!({
                        "fullUrl": format!("{base}/{rt}/{id}"),
                        "resource": r,
                        "request": {"method": "GET", "url": format!("{rt}/{id}")},
                        "response": {"status": "200"},
                    }));
                }
            }
        }
    }
    json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "history",
        "timestamp": format_instant(crate::fhir::datetime::now_micros()),
        "entry": entry,
    })
}
