//! `GET /metadata`: a CapabilityStatement generated from what the server really registers.
use std::sync::Mutex;

use axum::extract::RawQuery;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};

use super::format::{BaseUrl, negotiate, raw_json};
use crate::error::ApiResult;
use crate::fhir::{Definitions, SERVED_TYPES};
use crate::subscriptions::spec::BACKPORT;

/// `token_endpoint`: where SMART Backend Services clients get tokens (`None` in development mode).
pub fn capability_statement(base: &str, token_endpoint: Option<&str>) -> Value {
    let defs = Definitions::get();
    let resources: Vec<Value> = SERVED_TYPES
        .iter()
        .map(|rt| {
            let mut params = vec![
                json!({"name": "_id", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id", "type": "token"}),
                json!({"name": "_lastUpdated", "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated", "type": "date"}),
            ];
            let mut includes = Vec::new();
            let mut revincludes = Vec::new();
            for sp in defs.search.for_type(rt) {
                params.push(json!({"name": sp.code, "definition": sp.url, "type": sp.kind.as_str()}));
                if sp.kind == crate::fhir::search_params::ParamType::Reference {
                    includes.push(json!(format!("{rt}:{}", sp.code)));
                }
            }
            for other in SERVED_TYPES {
                for sp in defs.search.for_type(other) {
                    if sp.kind == crate::fhir::search_params::ParamType::Reference
                        && (sp.targets.is_empty() || sp.targets.iter().any(|t| t == rt))
                    {
                        revincludes.push(json!(format!("{other}:{}", sp.code)));
                    }
                }
            }
            // the audit trail is written by the server only (policy: 405 for any write)
            let audit = *rt == crate::auth::AUDIT_TYPE;
            let codes: &[&str] = if audit {
                &["read", "vread", "history-instance", "history-type", "search-type"]
            } else {
                &["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"]
            };
            let interactions: Vec<Value> = codes.iter().map(|c| json!({"code": c})).collect();
            // our profiles of this type (profiles/): notifica-caso is what the rules emit and are
            // checked against; the lab-input profiles document what the rules read
            let mut supported: Vec<&str> = crate::fhir::profile::profiles()
                .values()
                .filter(|sd| sd["type"] == *rt && sd["kind"] == "resource")
                .filter_map(|sd| sd["url"].as_str())
                .collect();
            supported.sort_unstable();
            let mut entry = json!({
                "type": rt,
                "profile": format!("http://hl7.org/fhir/StructureDefinition/{rt}"),
                "interaction": interactions,
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": !audit,
                "conditionalCreate": !audit,
                "conditionalUpdate": !audit,
                "conditionalDelete": if audit { "not-supported" } else { "single" },
                "searchParam": params,
            });
            // FHIR JSON has no empty arrays (and fhirbolt's reader, behind XML, panics on them)
            if !includes.is_empty() {
                entry["searchInclude"] = json!(includes);
            }
            if !revincludes.is_empty() {
                entry["searchRevInclude"] = json!(revincludes);
            }
            if !supported.is_empty() {
                entry["supportedProfile"] = json!(supported);
            }
            entry["operation"] = json!([validate_operation()]);
            if *rt == "Subscription" {
                // the topics (profiles/SubscriptionTopic-*.json) and operations of the Backport IG
                entry["extension"] = json!(crate::subscriptions::topics::topics()
                    .iter()
                    .map(|t| json!({"url": format!("{BACKPORT}/capabilitystatement-subscriptiontopic-canonical"),
                        "valueCanonical": t.url}))
                    .collect::<Vec<_>>());
                entry["operation"] = json!([
                    validate_operation(),
                    {"name": "status", "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status"},
                    {"name": "events", "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-events"},
                ]);
            }
            if *rt == "MeasureReport" {
                entry["operation"] = json!([validate_operation(), {
                    "name": "generate-reports",
                    "definition": format!("{}/OperationDefinition/generate-reports", crate::terminology::CANON),
                    "documentation": "POST ?period=YYYY-MM (or YYYY): store now the periodic summaries of that month (Modello 16 per ASL, Modello 16-bis and CRE monthly per region) or year (class V annual per ASL and region), as the server does once a period is over; a new version only where a count changed. Administrators only."
                }]);
            }
            entry
        })
        .collect();
    // the Measures of profiles/: read-only resources the server does not store
    let mut resources = resources;
    resources.push(json!({
        "type": "Measure",
        "profile": "http://hl7.org/fhir/StructureDefinition/Measure",
        "documentation": format!("Read-only: the summaries' definitions are data in the repository ({}).",
            crate::measures::definition::measures().iter().map(|m| m.url.as_str()).collect::<Vec<_>>().join(", ")),
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchParam": [
            {"name": "_id", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id", "type": "token"},
            {"name": "url", "definition": "http://hl7.org/fhir/SearchParameter/conformance-url", "type": "uri"},
            {"name": "name", "definition": "http://hl7.org/fhir/SearchParameter/conformance-name", "type": "string"},
            {"name": "status", "definition": "http://hl7.org/fhir/SearchParameter/conformance-status", "type": "token"},
        ],
        "operation": [{
            "name": "evaluate-measure",
            "definition": "http://hl7.org/fhir/OperationDefinition/Measure-evaluate-measure",
            "documentation": "periodStart, periodEnd (dates), subject (an area as CANON/sid/asl|CODE, /sid/provincia|CODE or /sid/regione|CODE), reportType summary (default) or subject-list (the cases behind each count, for clients who may read them)."
        }]
    }));
    resources.extend(conformance_resources());
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": crate::fhir::datetime::format_instant(crate::fhir::datetime::now_micros()),
        "publisher": "Sentinella",
        "kind": "instance",
        "software": {"name": "Sentinella", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Sentinella FHIR R4 server", "url": base},
        "description": description(),
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json", "application/fhir+xml", "xml"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
            "operation": [{
                "name": "validate",
                "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
                "documentation": "POST /Bundle/$validate: a whole transaction or batch, checked as POST / would check it, nothing stored."
            }],
            "security": security(token_endpoint),
        }],
    })
}

fn validate_operation() -> Value {
    json!({
        "name": "validate",
        "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
        "documentation": "The checks a write runs (R4 schema, StructureDefinitions and invariants, the profiles of ours the resource claims or `profile` names, our extensions, bindings by strength, codice fiscale, ICD-9-CM), answered as an OperationOutcome with FHIRPath locations; nothing is stored. mode create (default), update, or delete (instance level)."
    })
}

/// The conformance resources (src/conformance): read and search only, by url, version, name and
/// status; the terminology operations on the types that have them.
fn conformance_resources() -> Vec<Value> {
    let conf = |name: &str, kind: &str| json!({"name": name, "definition": format!("http://hl7.org/fhir/SearchParameter/conformance-{name}"), "type": kind});
    crate::conformance::SERVED_CONFORMANCE_TYPES
        .iter()
        .map(|rt| {
            let mut params = vec![
                json!({"name": "_id", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id", "type": "token"}),
                conf("url", "uri"),
                conf("version", "token"),
                conf("name", "string"),
                json!({"name": "title", "definition": "http://hl7.org/fhir/SearchParameter/conformance-title", "type": "string"}),
                conf("status", "token"),
            ];
            match *rt {
                "StructureDefinition" => params.push(json!({"name": "type", "definition": "http://hl7.org/fhir/SearchParameter/StructureDefinition-type", "type": "token"})),
                "SearchParameter" => {
                    params.push(json!({"name": "code", "definition": "http://hl7.org/fhir/SearchParameter/SearchParameter-code", "type": "token"}));
                    params.push(json!({"name": "base", "definition": "http://hl7.org/fhir/SearchParameter/SearchParameter-base", "type": "token"}));
                }
                _ => {}
            }
            let n = crate::conformance::Conformance::get().all(rt).len();
            let what = if *rt == "Basic" {
                "the subscription topics (R4 Subscriptions Backport: Basic resources whose url, version and name are extensions)".to_string()
            } else {
                format!("{n} {rt} resources: ours (profiles/, terminology/) and the packaged R4 ones the server validates with (tagged SUBSETTED: only what validation reads is kept)")
            };
            let mut entry = json!({
                "type": rt,
                "profile": format!("http://hl7.org/fhir/StructureDefinition/{rt}"),
                "documentation": format!("Read-only, {what}; other methods answer 405."),
                "interaction": [{"code": "read"}, {"code": "search-type"}],
                "searchParam": params,
            });
            let op = |name: &str, def: &str| json!({"name": name, "definition": format!("http://hl7.org/fhir/OperationDefinition/{def}")});
            match *rt {
                "CodeSystem" => entry["operation"] = json!([op("lookup", "CodeSystem-lookup"), op("subsumes", "CodeSystem-subsumes")]),
                "ValueSet" => entry["operation"] = json!([op("expand", "ValueSet-expand"), op("validate-code", "ValueSet-validate-code")]),
                "ConceptMap" => entry["operation"] = json!([op("translate", "ConceptMap-translate")]),
                _ => {}
            }
            entry
        })
        .collect()
}

/// What the rules do, with the canonical URLs of the rule sets and of the extensions and code
/// systems senders use (they are not resource profiles, so `supportedProfile` cannot list them).
fn description() -> String {
    let mut sets = vec![
        crate::surveillance::definition::CaseDefinition::cre()
            .map(|d| d.canonical())
            .unwrap_or_default(),
    ];
    sets.extend(
        crate::surveillance::dm1990::rules::RuleSet::shared()
            .iter()
            .map(|s| s.canonical()),
    );
    let canon = crate::terminology::CANON;
    format!(
        "Every write runs the surveillance rule sets ({}) inside its own transaction: laboratory results against the CRE case definition, doctors' notifications (Communication profile segnalazione, with the Condition, criterio-diagnostico Observations and laboratory evidence) against the five classes of D.M. 15/12/1990, with deadlines, routing to the residence ASL and region, and outbreaks. Cases and outbreaks are Communication resources with profile notifica-caso; each segnalazione is answered with a receipt (OperationOutcome issue coded in {canon}/CodeSystem/esito-segnalazione). Extensions senders use: {canon}/StructureDefinition/comunita, {canon}/StructureDefinition/precedenti-trattamenti. Code systems: {canon}/CodeSystem/criterio-diagnostico, {canon}/CodeSystem/esito-criterio, http://hl7.org/fhir/sid/icd-9-cm (CMS version 32, every code checked). Subscribers receive notifications per the Subscriptions Backport IG 1.1.0 (rest-hook, or NATS JetStream by the backport-channel-type extension) from a durable outbox.",
        sets.join(", ")
    )
}

fn security(token_endpoint: Option<&str>) -> Value {
    let Some(token) = token_endpoint else {
        return json!({
            "cors": false,
            "description": "Development mode: no access configuration, every request acts as a single administrator.",
        });
    };
    json!({
        "cors": false,
        "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}],
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [{"url": "token", "valueUri": token}],
        }],
        "description": "Bearer tokens: static tokens of the clients in the server's access configuration, access tokens from the SMART Backend Services token endpoint (client credentials with private_key_jwt; see .well-known/smart-configuration), or JWTs of a configured OpenID Connect issuer. Each client has a role (laboratory, ehr, region, ministry, admin, auditor), which token scopes may narrow but never widen; region clients see and receive only the cases addressed to their regions. Each client's request rate is limited (429 with Retry-After). Every read, search, write and delivery of case data and patients is recorded as an AuditEvent, readable by the auditor role only.",
    })
}

pub async fn metadata(
    axum::extract::State(state): axum::extract::State<super::AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    base: BaseUrl,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let token_endpoint = (!state.access.is_development())
        .then(|| super::token::token_endpoint(&state.config, &headers));
    let key = (base.0, token_endpoint);
    let cached = LAST.lock().ok().and_then(|last| {
        last.as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, b)| b.clone())
    });
    let body = match cached {
        Some(body) => body,
        None => {
            let statement = capability_statement(&key.0, key.1.as_deref());
            let body = Bytes::from(serde_json::to_vec(&statement).unwrap_or_default());
            if let Ok(mut last) = LAST.lock() {
                *last = Some((key, body.clone()));
            }
            body
        }
    };
    Ok(raw_json(StatusCode::OK, body))
}

/// The last statement served, by base URL and token endpoint (it depends on nothing else while
/// the process runs): building and serialising its 65 kB took most of a millisecond a request.
/// One entry only, since the base comes from the client's Host header: a map keyed on it would
/// grow with whatever clients send.
type StatementKey = (String, Option<String>);
static LAST: Mutex<Option<(StatementKey, Bytes)>> = Mutex::new(None);
