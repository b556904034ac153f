//! The official R4 examples (`hl7.fhir.r4.examples` 4.0.1, tests/fixtures/r4-examples/SOURCES.md) of
//! every served type, PUT to their ids on both databases: each one a client may write is accepted,
//! but for the two classic query-criteria Subscriptions, which get a 422 that says why; the
//! AuditEvents, which no client may write (the server keeps the audit trail), get the 405 that says
//! so, and pass the same validation a write runs. The counts are exact so that a regression (an
//! example newly refused, or one missing from the fixtures) fails here.
mod common;

use std::collections::BTreeMap;

use axum::http::StatusCode;
use serde_json::Value;

/// The examples the package holds per served type (AuditEvent included).
const EXPECTED_PER_TYPE: &[(&str, usize)] = &[
    ("AuditEvent", 9),
    ("Communication", 3),
    ("Condition", 12),
    ("DiagnosticReport", 6),
    ("Encounter", 10),
    ("Location", 6),
    ("MeasureReport", 4),
    ("Observation", 64),
    ("Organization", 13),
    ("Patient", 22),
    ("Practitioner", 14),
    ("PractitionerRole", 1),
    ("Provenance", 5),
    ("Specimen", 5),
    ("Subscription", 2),
];

/// Accepted when PUT: every example of a type a client may write, but the two below.
const ACCEPTED: usize = 165;

/// Classic R4 Subscriptions whose `criteria` is a search query: this server delivers topic-based
/// notifications only, and says so. (In file order: `-` sorts before `.`.)
const REFUSED_SUBSCRIPTIONS: &[&str] = &["example-error", "example"];

struct Example {
    file: String,
    resource_type: String,
    id: String,
    resource: Value,
}

fn examples() -> Vec<Example> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/r4-examples");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("tests/fixtures/r4-examples exists")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    // file order is alphabetical, so referrers come before what they point to (Condition before
    // Patient, DiagnosticReport before Observation): the server does not check that a reference
    // resolves at write time, and this order would show it if it started to
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("readable example");
            let resource: Value = serde_json::from_str(&text).expect("example is JSON");
            let resource_type = resource["resourceType"]
                .as_str()
                .expect("resourceType")
                .to_string();
            let id = resource["id"]
                .as_str()
                .expect("every example has an id")
                .to_string();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            assert_eq!(
                file,
                format!("{resource_type}-{id}.json"),
                "fixture named after its id"
            );
            Example {
                file,
                resource_type,
                id,
                resource,
            }
        })
        .collect()
}

#[test]
fn the_fixtures_hold_every_example_of_every_served_type() {
    let mut per_type: BTreeMap<String, usize> = BTreeMap::new();
    for e in examples() {
        assert!(
            sentinella::fhir::is_served(&e.resource_type),
            "{}: {} is not a served type",
            e.file,
            e.resource_type
        );
        *per_type.entry(e.resource_type).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = EXPECTED_PER_TYPE
        .iter()
        .map(|(t, n)| (t.to_string(), *n))
        .collect();
    assert_eq!(per_type, expected);
    // and every served type has examples
    for t in sentinella::fhir::SERVED_TYPES {
        assert!(expected.contains_key(*t), "no R4 example of {t}");
    }
}

/// The audit trail cannot be written by a client, but its examples are valid R4: the validation a
/// write runs accepts each of them.
#[test]
fn the_audit_event_examples_pass_the_validation_a_write_runs() {
    let audit: Vec<_> = examples()
        .into_iter()
        .filter(|e| e.resource_type == "AuditEvent")
        .collect();
    assert_eq!(audit.len(), 9);
    for e in audit {
        let result = sentinella::fhir::resource::validate(&e.resource);
        assert!(result.is_ok(), "{}: {result:?}", e.file);
    }
}

on_both_databases! {
    async fn every_example_a_client_may_write_is_accepted_when_put_to_its_id(app) {
        let mut accepted = 0;
        let mut refused_subscriptions = Vec::new();
        let mut refused_audit = 0;
        let mut unexpected = Vec::new();
        for e in examples() {
            let uri = format!("/fhir/{}/{}", e.resource_type, e.id);
            let r = app.put(&uri, &e.resource, &[]).await;
            let message = r.body["issue"][0]["diagnostics"].as_str().unwrap_or_default().to_string();
            match (e.resource_type.as_str(), r.status) {
                (_, StatusCode::OK | StatusCode::CREATED) if e.resource_type != "AuditEvent" => {
                    assert_eq!(r.body["id"], e.id.as_str(), "{}", e.file);
                    accepted += 1;
                }
                ("Subscription", StatusCode::UNPROCESSABLE_ENTITY)
                    if REFUSED_SUBSCRIPTIONS.contains(&e.id.as_str()) =>
                {
                    assert_eq!(r.body["resourceType"], "OperationOutcome", "{}", r.text);
                    assert!(
                        message.contains("criteria") && message.contains("topic"),
                        "{}: the refusal says why: {}",
                        e.file,
                        r.text
                    );
                    refused_subscriptions.push(e.id.clone());
                }
                ("AuditEvent", StatusCode::METHOD_NOT_ALLOWED) => {
                    assert!(message.contains("audit trail"), "{}: {}", e.file, r.text);
                    refused_audit += 1;
                }
                _ => unexpected.push(format!("{} -> {}: {}", e.file, r.status, r.text)),
            }
        }
        assert!(unexpected.is_empty(), "refused or mis-answered:\n{}", unexpected.join("\n"));
        assert_eq!(accepted, ACCEPTED);
        assert_eq!(refused_subscriptions, REFUSED_SUBSCRIPTIONS);
        assert_eq!(refused_audit, 9);

        // what was stored reads back under its id (a sample of each type)
        for (t, _) in EXPECTED_PER_TYPE.iter().filter(|(t, _)| *t != "AuditEvent" && *t != "Subscription") {
            assert_eq!(app.count(t).await as usize, EXPECTED_PER_TYPE.iter().find(|(x, _)| x == t).unwrap().1, "{t}");
        }
    }
}
