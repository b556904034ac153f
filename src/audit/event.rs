//! One access as an R4 AuditEvent, in the shapes of IHE Basic Audit Log Patterns (BALP): a RESTful
//! interaction (`audit-event-type#rest` with its `restful-interaction` subtype), the client as the
//! requesting agent, Sentinella as the observer, and one entity per resource touched plus one per
//! patient whose data it was, so an auditor can ask "who saw Patient/123" or "who read this case".
use std::sync::Arc;

use serde_json::{Value, json};

use crate::auth::{Principal, owner_system};
use crate::terminology::CANON;

/// What was done, as the codes of `restful-interaction` and `audit-event-action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    Read,
    Vread,
    SearchType,
    SearchSystem,
    HistoryInstance,
    HistoryType,
    HistorySystem,
    Create,
    Update,
    /// A PATCH: an update described by its changes (restful-interaction `patch`).
    Patch,
    Delete,
    Transaction,
    Batch,
    Operation,
    /// A subscription notification carrying case data went out to its endpoint.
    Deliver,
}

impl Interaction {
    pub fn code(self) -> &'static str {
        match self {
            Interaction::Read => "read",
            Interaction::Vread => "vread",
            Interaction::SearchType => "search-type",
            Interaction::SearchSystem => "search-system",
            Interaction::HistoryInstance => "history-instance",
            Interaction::HistoryType => "history-type",
            Interaction::HistorySystem => "history-system",
            Interaction::Create => "create",
            Interaction::Update => "update",
            Interaction::Patch => "patch",
            Interaction::Delete => "delete",
            Interaction::Transaction => "transaction",
            Interaction::Batch => "batch",
            Interaction::Operation | Interaction::Deliver => "operation",
        }
    }

    /// C, R, U, D or E (BALP: searches and operations are Execute).
    pub fn action(self) -> &'static str {
        match self {
            Interaction::Read
            | Interaction::Vread
            | Interaction::HistoryInstance
            | Interaction::HistoryType
            | Interaction::HistorySystem
            | Interaction::Deliver => "R",
            Interaction::Create => "C",
            Interaction::Update | Interaction::Patch => "U",
            Interaction::Delete => "D",
            Interaction::SearchType
            | Interaction::SearchSystem
            | Interaction::Transaction
            | Interaction::Batch
            | Interaction::Operation => "E",
        }
    }
}

/// One access, as the API or the delivery worker saw it.
#[derive(Debug, Clone)]
pub struct Record {
    /// µs since the epoch
    pub recorded: i64,
    /// The client; `None` when the server itself acted (a delivery).
    pub client: Option<Arc<Principal>>,
    pub interaction: Interaction,
    /// The request as received (`GET /fhir/Patient?identifier=…`), for searches and operations.
    pub query: Option<String>,
    /// `Type/id/_history/v` (or `Type/id`) of each resource read or written.
    pub entities: Vec<String>,
    /// `Patient/id` of each patient whose data it was.
    pub patients: Vec<String>,
    /// Where a delivery went (the subscription's endpoint) and for which Subscription.
    pub destination: Option<(String, String)>,
}

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";

/// The extension naming a client's regions (a region client sees only their cases).
pub fn region_extension_url() -> String {
    format!("{CANON}/StructureDefinition/regione-cliente")
}

pub fn audit_event(r: &Record, recorded: &str) -> Value {
    let mut agents = Vec::new();
    match &r.client {
        Some(p) => agents.push(client_agent(p)),
        None => agents.push(server_agent(true)),
    }
    match &r.destination {
        Some((endpoint, _)) => agents.push(json!({
            "type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
            "who": {"display": endpoint},
            "requestor": false,
            "network": {"address": endpoint, "type": "5"},
        })),
        None if r.client.is_some() => agents.push(server_agent(false)),
        None => {}
    }
    let mut entities: Vec<Value> = Vec::new();
    for p in &r.patients {
        entities.push(json!({
            "what": {"reference": p},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"},
        }));
    }
    for e in &r.entities {
        entities.push(json!({
            "what": {"reference": e},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4", "display": "Domain Resource"},
        }));
    }
    if let Some(q) = &r.query {
        use base64::Engine;
        let encode = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        entities.push(json!({
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24", "display": "Query"},
            "description": q,
            "query": encode(q.as_bytes()),
        }));
    }
    if let Some((_, subscription)) = &r.destination {
        entities.push(json!({
            "what": {"reference": format!("Subscription/{subscription}")},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4", "display": "Domain Resource"},
        }));
    }
    let (type_, subtype) = if r.interaction == Interaction::Deliver {
        (
            json!({"system": DCM, "code": "110106", "display": "Export"}),
            json!([{"system": "http://hl7.org/fhir/restful-interaction", "code": "operation"},
                   {"system": format!("{CANON}/CodeSystem/audit-sentinella"), "code": "consegna-notifica", "display": "Subscription notification delivered"}]),
        )
    } else {
        (
            json!({"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation"}),
            json!([{"system": "http://hl7.org/fhir/restful-interaction", "code": r.interaction.code()}]),
        )
    };
    let mut ev = json!({
        "resourceType": "AuditEvent",
        "type": type_,
        "subtype": subtype,
        "action": r.interaction.action(),
        "recorded": recorded,
        "outcome": "0",
        "agent": agents,
        "source": {
            "site": "sentinella",
            "observer": {"display": "Sentinella"},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}],
        },
    });
    if !entities.is_empty() {
        ev["entity"] = Value::Array(entities);
    }
    ev
}

fn client_agent(p: &Principal) -> Value {
    let id = if p.development {
        "development"
    } else {
        p.id.as_str()
    };
    let mut a = json!({
        "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
        "who": {"identifier": {"system": owner_system(), "value": id}, "display": id},
        "altId": id,
        "name": id,
        "requestor": true,
        "role": [{"coding": [{"system": format!("{CANON}/CodeSystem/ruolo-cliente"), "code": role_code(p)}]}],
    });
    if !p.regions.is_empty() {
        a["extension"] = Value::Array(
            p.regions
                .iter()
                .map(|r| {
                    json!({"url": region_extension_url(),
                           "valueCoding": {"system": format!("{CANON}/CodeSystem/regione"), "code": r}})
                })
                .collect(),
        );
    }
    a
}

fn role_code(p: &Principal) -> &'static str {
    use crate::auth::Role;
    match p.role {
        Role::Laboratory => "laboratory",
        Role::Ehr => "ehr",
        Role::Region => "region",
        Role::Ministry => "ministry",
        Role::Admin => "admin",
        Role::Auditor => "auditor",
        Role::Monitoring => "monitoring",
    }
}

fn server_agent(requestor: bool) -> Value {
    let code = if requestor { "110153" } else { "110152" };
    let display = if requestor {
        "Source Role ID"
    } else {
        "Destination Role ID"
    };
    json!({
        "type": {"coding": [{"system": DCM, "code": code, "display": display}]},
        "who": {"display": "Sentinella"},
        "requestor": requestor,
    })
}
