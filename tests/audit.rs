//! The audit trail (issue "Security and hardening", item 3): every read, search and write of case
//! data and patients leaves an R4 AuditEvent naming the client, what it touched and whose data it
//! was; refused accesses leave none; only the auditor reads the trail and nobody writes it through
//! the API; events past their retention are removed. On SQLite and PostgreSQL.
mod common;

use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use common::{Resp, TestApp};
use sentinella::config::Config;
use serde_json::{Value, json};

const ACCESS: &str = r#"
[[client]]
id = "admin"
role = "admin"
token_sha256 = "TOKEN_ADMIN"

[[client]]
id = "lab-niguarda"
role = "laboratory"
token_sha256 = "TOKEN_LAB"

[[client]]
id = "regione-lombardia"
role = "region"
regions = ["030"]
token_sha256 = "TOKEN_LOMBARDIA"

[[client]]
id = "garante"
role = "auditor"
token_sha256 = "TOKEN_AUDITOR"
"#;

fn with_access(c: &mut Config) {
    c.access_file = Some(common::access_file(
        ACCESS,
        &[
            ("TOKEN_ADMIN", "admin-token"),
            ("TOKEN_LAB", "lab-token"),
            ("TOKEN_LOMBARDIA", "lombardia-token"),
            ("TOKEN_AUDITOR", "auditor-token"),
        ],
    ));
}

async fn call(app: &TestApp, method: Method, uri: &str, token: &str, body: Option<&Value>) -> Resp {
    let auth = format!("Bearer {token}");
    let mut headers = vec![("authorization", auth.as_str())];
    if body.is_some() {
        headers.push(("content-type", "application/fhir+json"));
    }
    app.request(
        method,
        uri,
        &headers,
        body.map(|b| serde_json::to_vec(b).unwrap()),
    )
    .await
}

/// The AuditEvents an auditor finds for `query`, once at least `n` are there (they are written by a
/// background batch: wait for them, never for a fixed time).
async fn audit_events(app: &TestApp, query: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = call(
            app,
            Method::GET,
            &format!("/fhir/AuditEvent?{query}&_count=1000"),
            "auditor-token",
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let found: Vec<Value> = r.body["entry"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e["resource"].clone())
            .collect();
        if found.len() >= n || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn subtype(ev: &Value) -> String {
    ev["subtype"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn client(ev: &Value) -> String {
    ev["agent"][0]["altId"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn entities(ev: &Value) -> Vec<String> {
    ev["entity"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["what"]["reference"].as_str().map(String::from))
        .collect()
}

fn patient() -> Value {
    common::fixture("patient-rossi.json")
}

fn observation(patient_id: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "600-7", "display": "Bacteria identified in Blood by Culture"}]},
        "subject": {"reference": format!("Patient/{patient_id}")},
        "effectiveDateTime": "2026-11-30T08:00:00+01:00",
        "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "56415008", "display": "Klebsiella pneumoniae"}]}
    })
}

on_both_databases_with! {
    super::with_access;
    async fn every_access_to_case_data_leaves_an_audit_event(app) {
        let p = call(&app, Method::POST, "/fhir/Patient", "lab-token", Some(&patient())).await;
        assert_eq!(p.status, StatusCode::CREATED, "{}", p.text);
        let pid = p.body["id"].as_str().unwrap().to_string();
        let o = call(&app, Method::POST, "/fhir/Observation", "lab-token", Some(&observation(&pid))).await;
        assert_eq!(o.status, StatusCode::CREATED, "{}", o.text);
        let oid = o.body["id"].as_str().unwrap().to_string();
        let read = call(&app, Method::GET, &format!("/fhir/Patient/{pid}"), "admin-token", None).await;
        assert_eq!(read.status, StatusCode::OK);
        let search = call(&app, Method::GET, &format!("/fhir/Observation?subject=Patient/{pid}"), "admin-token", None).await;
        assert_eq!(search.status, StatusCode::OK);

        // who saw or touched this patient's data: two writes by the lab, a read and a search by admin
        let events = audit_events(&app, &format!("patient=Patient/{pid}"), 4).await;
        let mut seen: Vec<(String, String)> = events.iter().map(|e| (client(e), subtype(e))).collect();
        seen.sort();
        assert_eq!(seen, vec![
            ("admin".to_string(), "read".to_string()),
            ("admin".to_string(), "search-type".to_string()),
            ("lab-niguarda".to_string(), "create".to_string()),
            ("lab-niguarda".to_string(), "create".to_string()),
        ], "{events:#?}");
        let created = events.iter().find(|e| subtype(e) == "create" && entities(e).iter().any(|x| x.starts_with("Observation/"))).unwrap();
        assert!(entities(created).contains(&format!("Observation/{oid}/_history/1")), "{created}");
        assert_eq!(created["action"], "C");
        assert_eq!(created["outcome"], "0");
        assert_eq!(created["type"]["code"], "rest");
        let searched = events.iter().find(|e| subtype(e) == "search-type").unwrap();
        let query = searched["entity"].as_array().unwrap().iter().find(|e| e["role"]["code"] == "24").expect("the query entity");
        assert!(query["description"].as_str().unwrap().contains(&format!("subject=Patient/{pid}")), "{query}");
        // the trail is searchable by client and by what was touched
        let by_lab = audit_events(&app, "altid=lab-niguarda", 2).await;
        assert_eq!(by_lab.len(), 2);
        let by_entity = audit_events(&app, &format!("entity=Observation/{oid}"), 2).await;
        assert_eq!(by_entity.len(), 2, "the create and the search that found it");
    }

    async fn a_refused_access_leaves_no_audit_event(app) {
        let p = call(&app, Method::POST, "/fhir/Patient", "admin-token", Some(&patient())).await;
        let pid = p.body["id"].as_str().unwrap().to_string();
        // refused by the policy, by the scope, or as invalid: nothing disclosed, nothing changed
        assert_eq!(call(&app, Method::GET, &format!("/fhir/Patient/{pid}"), "lombardia-token", None).await.status, StatusCode::FORBIDDEN);
        assert_eq!(call(&app, Method::GET, "/fhir/Communication", "lab-token", None).await.status, StatusCode::FORBIDDEN);
        let bad = json!({"resourceType": "Observation", "status": "no-such-status", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{pid}")}});
        assert_eq!(call(&app, Method::POST, "/fhir/Observation", "lab-token", Some(&bad)).await.status.as_u16() / 100, 4);
        // then one allowed access by each of them; the trail is written in order, so once these
        // are there the refused ones would be too
        call(&app, Method::GET, "/fhir/Communication", "lombardia-token", None).await;
        let o = call(&app, Method::POST, "/fhir/Observation", "lab-token", Some(&observation(&pid))).await;
        assert_eq!(o.status, StatusCode::CREATED);
        let lab = audit_events(&app, "altid=lab-niguarda", 1).await;
        let region = audit_events(&app, "altid=regione-lombardia", 1).await;
        audit_events(&app, "altid=admin", 1).await;
        assert_eq!(lab.len(), 1, "{lab:#?}");
        assert_eq!(subtype(&lab[0]), "create");
        assert_eq!(region.len(), 1, "{region:#?}");
        assert_eq!(subtype(&region[0]), "search-type");
        assert_eq!(region[0]["agent"][0]["extension"][0]["valueCoding"]["code"], "030");
    }

    async fn only_the_auditor_reads_the_trail_and_nobody_writes_it(app) {
        call(&app, Method::POST, "/fhir/Patient", "admin-token", Some(&patient())).await;
        let events = audit_events(&app, "altid=admin", 1).await;
        let id = events[0]["id"].as_str().unwrap().to_string();
        for token in ["admin-token", "lab-token", "lombardia-token"] {
            let r = call(&app, Method::GET, "/fhir/AuditEvent", token, None).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{token}: {}", r.text);
            let r = call(&app, Method::GET, &format!("/fhir/AuditEvent/{id}"), token, None).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{token}");
        }
        for token in ["admin-token", "auditor-token"] {
            let r = call(&app, Method::DELETE, &format!("/fhir/AuditEvent/{id}"), token, None).await;
            assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{token}: {}", r.text);
            assert_eq!(r.body["resourceType"], "OperationOutcome");
            let r = call(&app, Method::PUT, &format!("/fhir/AuditEvent/{id}"), token, Some(&events[0])).await;
            assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{token}");
            let r = call(&app, Method::POST, "/fhir/AuditEvent", token, Some(&events[0])).await;
            assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{token}");
        }
        // nor inside a Bundle
        let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "DELETE", "url": format!("AuditEvent/{id}")}}]});
        let r = call(&app, Method::POST, "/fhir", "admin-token", Some(&bundle)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(!r.body["entry"][0]["response"]["status"].as_str().unwrap().starts_with('2'), "{}", r.text);
        let r = call(&app, Method::GET, &format!("/fhir/AuditEvent/{id}"), "auditor-token", None).await;
        assert_eq!(r.status, StatusCode::OK, "still there: {}", r.text);
        // the auditor reads nothing else
        let r = call(&app, Method::GET, "/fhir/Patient", "auditor-token", None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
    }

    async fn audit_events_past_their_retention_are_removed(app) {
        call(&app, Method::POST, "/fhir/Patient", "admin-token", Some(&patient())).await;
        call(&app, Method::GET, "/fhir/Patient", "admin-token", None).await;
        let before = audit_events(&app, "altid=admin", 2).await;
        assert_eq!(before.len(), 2);
        let store = sentinella::store::connect(&app.database_url()).await.unwrap();
        // nothing is older than an hour ago
        let hour_ago = sentinella::fhir::datetime::now_micros() - 3_600_000_000;
        assert_eq!(sentinella::audit::prune(&store, hour_ago).await.unwrap(), 0);
        // with a retention ending now, both go, for good (no history left either)
        let now = sentinella::fhir::datetime::now_micros();
        assert_eq!(sentinella::audit::prune(&store, now).await.unwrap(), 2);
        let id = before[0]["id"].as_str().unwrap();
        let r = call(&app, Method::GET, &format!("/fhir/AuditEvent/{id}/_history"), "auditor-token", None).await;
        assert!(r.status == StatusCode::NOT_FOUND || r.body["total"] == 0, "{}", r.text);
        assert_eq!(audit_events(&app, "altid=admin", 0).await.len(), 0);
    }
}

/// In development mode (no access file) the single user reads the trail too.
async fn wait_active(app: &TestApp, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.get(&format!("/fhir/Subscription/{id}")).await.body["status"] != "active" {
        assert!(
            Instant::now() < deadline,
            "Subscription/{id} never became active"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

on_both_databases! {
    async fn a_delivery_of_case_data_leaves_an_audit_event(app) {
        use common::subscriber::{Hook, case_bundle, subscription};
        let hook = Hook::start().await;
        let s = app.post("/fhir/Subscription", &subscription(&hook.url, "cre-case", "full-resource", &[], None)).await;
        assert_eq!(s.status, StatusCode::CREATED, "{}", s.text);
        let sid = s.body["id"].as_str().unwrap().to_string();
        wait_active(&app, &sid).await;
        let r = app.post("/fhir", &case_bundle(1, "030308")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        hook.wait_for("event-notification", 1, 20).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        let ev = loop {
            let found = app.get(&format!("/fhir/AuditEvent?entity=Subscription/{sid}")).await;
            if let Some(e) = found.body["entry"][0]["resource"].as_object() {
                break Value::Object(e.clone());
            }
            assert!(Instant::now() < deadline, "no AuditEvent for the delivery");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(ev["type"]["code"], "110106", "{ev}");
        assert_eq!(ev["agent"][1]["network"]["address"], hook.url.as_str(), "{ev}");
        let what = entities(&ev);
        assert!(what.iter().any(|e| e.starts_with("Communication/")), "{what:?}");
        assert!(what.iter().any(|e| e.starts_with("Patient/")), "the case's patient: {what:?}");
        // the server's own writes of the case are not a client's access; the client's
        // transaction that caused it is
        let tx = app.get("/fhir/AuditEvent?subtype=transaction").await;
        assert_eq!(tx.body["total"], 1, "{}", tx.text);
    }
}
