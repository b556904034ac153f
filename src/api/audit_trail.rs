//! Every routed request that read, searched or wrote case data or patients leaves an AuditEvent
//! (`crate::audit`). A route layer inside the access decision: a request the policy refused never
//! reaches it, and only answers that succeeded are recorded (a refusal, a 404 for another region's
//! case or a rejected write disclosed and changed nothing). What was touched is read off the answer
//! itself — the resource, the Bundle's entries, the `Location` — so no handler can forget to report it.
use axum::body::Body;
use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::policy::route_below_base;
use super::{AppState, Caller};
use crate::audit::{Interaction, Record, is_audited};
use crate::fhir::datetime::now_micros;
use crate::fhir::fhirpath::split_reference;

/// Answers larger than this are not buffered for auditing (none of ours is: pages are bounded).
const MAX_AUDITED_BODY: usize = 64 * 1024 * 1024;

pub async fn record(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map(|m| route_below_base(m.as_str()))
        .unwrap_or_default();
    let rt = RawPathParams::from_request_parts(&mut parts, &())
        .await
        .ok()
        .and_then(|p| {
            p.iter()
                .find(|(k, _)| *k == "type")
                .map(|(_, v)| v.to_string())
        });
    let caller = parts.extensions.get::<Caller>().map(|c| c.0.clone());
    let interaction = interaction(&parts.method, &route);
    let query = matches!(
        interaction,
        Some(Interaction::SearchType | Interaction::SearchSystem | Interaction::Operation)
    )
    .then(|| format!("{} {}", parts.method, parts.uri));
    let response = next.run(Request::from_parts(parts, body)).await;
    let (Some(interaction), Some(client)) = (interaction, caller) else {
        return response;
    };
    if !response.status().is_success() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_AUDITED_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return super::ApiError::Internal("the answer could not be read".into())
                .into_response();
        }
    };
    let mut interaction = interaction;
    let mut touched = Touched::default();
    if let Some(loc) = parts
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
    {
        touched.location(loc);
    }
    if !bytes.is_empty()
        && let Ok(answer) = serde_json::from_slice::<Value>(&bytes)
    {
        touched.answer(&answer);
        if answer["type"] == "batch-response" {
            interaction = Interaction::Batch;
        }
    }
    let route_type_audited = rt.as_deref().is_some_and(is_audited);
    if route_type_audited || touched.any_audited() {
        state
            .audit
            .record(Record {
                recorded: now_micros(),
                client: Some(client),
                interaction,
                query,
                entities: touched.entities,
                patients: touched.patients,
                destination: None,
            })
            .await;
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// The interaction of a routed request (`None`: nothing to audit, e.g. the CapabilityStatement).
fn interaction(method: &Method, route: &str) -> Option<Interaction> {
    let get = matches!(*method, Method::GET | Method::HEAD);
    Some(match (route, get) {
        ("/metadata", _) => return None,
        ("/", false) => Interaction::Transaction, // refined from the answer's Bundle.type
        ("/_history", true) => Interaction::HistorySystem,
        ("/{type}", true) | ("/{type}/_search", false) => Interaction::SearchType,
        ("/{type}", false) => match *method {
            Method::POST => Interaction::Create,
            Method::PUT => Interaction::Update,
            _ => Interaction::Delete,
        },
        ("/{type}/{id}", true) => Interaction::Read,
        ("/{type}/{id}", false) => match *method {
            Method::DELETE => Interaction::Delete,
            Method::PATCH => Interaction::Patch,
            _ => Interaction::Update,
        },
        ("/{type}/_history", true) => Interaction::HistoryType,
        ("/{type}/{id}/_history", true) => Interaction::HistoryInstance,
        ("/{type}/{id}/_history/{vid}", true) => Interaction::Vread,
        _ => Interaction::Operation,
    })
}

/// What an answer shows was read or written.
#[derive(Default)]
struct Touched {
    entities: Vec<String>,
    patients: Vec<String>,
}

impl Touched {
    fn any_audited(&self) -> bool {
        !self.patients.is_empty()
            || self
                .entities
                .iter()
                .any(|e| split_reference(e).is_some_and(|(t, _)| is_audited(t)))
    }

    fn push(list: &mut Vec<String>, value: String) {
        if !list.contains(&value) {
            list.push(value);
        }
    }

    /// `…/fhir/Patient/1/_history/2` → `Patient/1/_history/2`
    fn location(&mut self, loc: &str) {
        let parts: Vec<&str> = loc.split('/').collect();
        let local = match parts.iter().rposition(|p| *p == "_history") {
            Some(h) if h >= 2 => parts[h - 2..].join("/"),
            _ if parts.len() >= 2 => parts[parts.len() - 2..].join("/"),
            _ => return,
        };
        if let Some((t, id)) = split_reference(&local) {
            if t == "Patient" {
                Self::push(&mut self.patients, format!("Patient/{id}"));
            }
            Self::push(&mut self.entities, local);
        }
    }

    fn answer(&mut self, v: &Value) {
        if v["resourceType"] == "Bundle" {
            for e in v["entry"].as_array().into_iter().flatten() {
                if let Some(loc) = e["response"]["location"].as_str() {
                    self.location(loc);
                }
                if e["resource"].is_object() {
                    self.resource(&e["resource"]);
                }
            }
        } else if v["resourceType"] != "OperationOutcome" {
            self.resource(v);
        }
    }

    fn resource(&mut self, r: &Value) {
        let (Some(rt), Some(id)) = (r["resourceType"].as_str(), r["id"].as_str()) else {
            return;
        };
        // a Bundle inside a Bundle: a notification's or a transaction answer's own entries
        if rt == "Bundle" {
            return self.answer(r);
        }
        if rt == "OperationOutcome" {
            return;
        }
        let entity = match r["meta"]["versionId"].as_str() {
            Some(v) => format!("{rt}/{id}/_history/{v}"),
            None => format!("{rt}/{id}"),
        };
        Self::push(&mut self.entities, entity);
        if rt == "Patient" {
            Self::push(&mut self.patients, format!("Patient/{id}"));
        }
        for field in ["subject", "patient"] {
            if let Some(reference) = r[field]["reference"].as_str()
                && let Some(("Patient", pid)) = split_reference(reference)
            {
                Self::push(&mut self.patients, format!("Patient/{pid}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_transaction_answer_names_what_it_wrote_and_whose_it_was() {
        let mut t = Touched::default();
        t.answer(&json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201 Created", "location": "Patient/p1/_history/1"}},
            {"response": {"status": "201 Created", "location": "http://h/fhir/Observation/o1/_history/3"},
             "resource": {"resourceType": "Observation", "id": "o1", "meta": {"versionId": "3"},
                          "subject": {"reference": "Patient/p1"}}}
        ]}));
        assert_eq!(
            t.entities,
            vec!["Patient/p1/_history/1", "Observation/o1/_history/3"]
        );
        assert_eq!(t.patients, vec!["Patient/p1"]);
        assert!(t.any_audited());
    }

    #[test]
    fn routes_map_to_restful_interactions() {
        assert_eq!(
            interaction(&Method::GET, "/{type}/{id}"),
            Some(Interaction::Read)
        );
        assert_eq!(
            interaction(&Method::POST, "/{type}/_search"),
            Some(Interaction::SearchType)
        );
        assert_eq!(
            interaction(&Method::GET, "/Subscription/{id}/$events"),
            Some(Interaction::Operation)
        );
        assert_eq!(interaction(&Method::GET, "/metadata"), None);
    }
}
