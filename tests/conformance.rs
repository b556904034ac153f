//! Conformance resources served read-only and `$validate` (issue 13, items 1 and 2; README
//! "Validating before sending"). Black box through the real router, on SQLite and PostgreSQL where
//! something is stored.
mod common;

use axum::http::{Method, StatusCode};
use common::{Resp, TestApp, fixture};
use serde_json::{Value, json};

const CANON: &str = "https://sentinella-fhir.github.io/ig";

fn canon(path: &str) -> String {
    format!("{CANON}/{path}")
}

/// The issues of an OperationOutcome as (severity, expression or "", diagnostics).
fn issues(r: &Resp) -> Vec<(String, String, String)> {
    assert_eq!(r.body["resourceType"], "OperationOutcome", "{}", r.text);
    r.body["issue"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (
                i["severity"].as_str().unwrap_or_default().to_string(),
                i["expression"][0].as_str().unwrap_or_default().to_string(),
                i["diagnostics"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn errors(r: &Resp) -> Vec<(String, String)> {
    issues(r)
        .into_iter()
        .filter(|(s, _, _)| s == "error" || s == "fatal")
        .map(|(_, e, d)| (e, d))
        .collect()
}

/// A valid $validate answer: 200, one information issue, no error.
fn assert_valid(r: &Resp) {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(errors(r).is_empty(), "{}", r.text);
}

fn transaction() -> Value {
    fixture("antibiogram-transaction.json")
}

fn entry_of<'a>(bundle: &'a mut Value, rt: &str) -> (usize, &'a mut Value) {
    let entries = bundle["entry"].as_array_mut().unwrap();
    let i = entries
        .iter()
        .position(|e| e["resource"]["resourceType"] == rt)
        .unwrap_or_else(|| panic!("the fixture has a {rt}"));
    (i, &mut entries[i]["resource"])
}

/// Every resource of a searchset, following `next` links.
async fn search_all(app: &TestApp, first: &str) -> (i64, Vec<Value>) {
    let mut url = first.to_string();
    let mut out = Vec::new();
    let mut total = -1;
    for _ in 0..100 {
        let r = app.get(&url).await;
        assert_eq!(r.status, StatusCode::OK, "{url}: {}", r.text);
        total = r.body["total"].as_i64().unwrap();
        out.extend(
            r.body["entry"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["search"]["mode"] == "match")
                .map(|e| e["resource"].clone()),
        );
        let next = r.body["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(String::from);
        match next {
            // the links are absolute; the router takes the path
            Some(n) => url = n[n.find("/fhir/").unwrap()..].to_string(),
            None => break,
        }
    }
    (total, out)
}

#[tokio::test]
async fn our_profiles_value_sets_and_maps_are_read_by_id_and_found_by_url() {
    let app = TestApp::sqlite().await;
    for (rt, id) in [
        ("StructureDefinition", "notifica-caso"),
        ("StructureDefinition", "segnalazione"),
        ("StructureDefinition", "Patient"),
        ("ValueSet", "dm1990-classe-1"),
        ("ValueSet", "observation-status"),
        ("CodeSystem", "icd9cm"),
        ("ConceptMap", "laboratorio-niguarda"),
        ("SearchParameter", "communication-region"),
        ("OperationDefinition", "generate-reports"),
        ("Basic", "cre-case"),
    ] {
        let r = app.get(&format!("/fhir/{rt}/{id}")).await;
        assert_eq!(r.status, StatusCode::OK, "{rt}/{id}: {}", r.text);
        assert_eq!(r.body["resourceType"], rt);
        assert_eq!(r.body["id"], id);
    }
    // by canonical URL, name, version and status
    let url = canon("StructureDefinition/notifica-caso");
    let r = app
        .get(&format!("/fhir/StructureDefinition?url={url}"))
        .await;
    assert_eq!(r.body["total"], 1, "{}", r.text);
    assert_eq!(r.body["entry"][0]["resource"]["url"], url.as_str());
    let version = r.body["entry"][0]["resource"]["version"]
        .as_str()
        .unwrap()
        .to_string();
    let r = app
        .get(&format!(
            "/fhir/StructureDefinition?url={url}&version={version}"
        ))
        .await;
    assert_eq!(r.body["total"], 1);
    let r = app
        .get(&format!(
            "/fhir/StructureDefinition?url={url}&version=0.0.0-none"
        ))
        .await;
    assert_eq!(r.body["total"], 0);
    let (total, sets) = search_all(&app, "/fhir/ValueSet?name=Dm1990&_count=2").await;
    assert!(total >= 5, "dm1990 value sets: {total}");
    assert_eq!(sets.len() as i64, total, "paging returns every match once");
    assert!(sets.iter().all(|s| {
        s["name"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .starts_with("dm1990")
    }));
    let r = app.get("/fhir/CodeSystem?status=retired").await;
    assert_eq!(r.body["total"], 0, "{}", r.text);
    let r = app
        .get(&format!(
            "/fhir/StructureDefinition?url:below={CANON}/StructureDefinition&_count=500"
        ))
        .await;
    let ours = r.body["entry"].as_array().unwrap();
    assert!(ours.len() >= 20, "{}", ours.len());
    assert!(
        ours.iter()
            .all(|e| e["resource"]["url"].as_str().unwrap().starts_with(CANON))
    );
    // the topics are Basic resources found by their canonical URL too
    let r = app
        .get(&format!(
            "/fhir/Basic?url={}",
            canon("SubscriptionTopic/notifiable-case")
        ))
        .await;
    assert_eq!(r.body["total"], 1, "{}", r.text);
}

#[tokio::test]
async fn conformance_resources_cannot_be_written_and_unknown_ones_are_404() {
    let app = TestApp::sqlite().await;
    let sd = app.get("/fhir/StructureDefinition/segnalazione").await.body;
    for (method, uri) in [
        (Method::POST, "/fhir/StructureDefinition"),
        (Method::PUT, "/fhir/StructureDefinition/segnalazione"),
        (Method::DELETE, "/fhir/StructureDefinition/segnalazione"),
        (Method::PUT, "/fhir/CodeSystem/icd9cm"),
        (Method::DELETE, "/fhir/ValueSet/dm1990-classe-1"),
        (Method::POST, "/fhir/ConceptMap"),
    ] {
        let r = app
            .request(
                method.clone(),
                uri,
                &[("content-type", "application/fhir+json")],
                Some(serde_json::to_vec(&sd).unwrap()),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {uri}: {}",
            r.text
        );
        assert_eq!(r.body["resourceType"], "OperationOutcome", "{}", r.text);
    }
    // nothing changed
    assert_eq!(
        app.get("/fhir/StructureDefinition/segnalazione").await.body,
        sd
    );
    let r = app.get("/fhir/ValueSet/no-such-set").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body["resourceType"], "OperationOutcome");
    let r = app.get("/fhir/ValueSet?colour=red").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(r.expressions(), vec!["colour"]);
    let r = app
        .request(
            Method::GET,
            "/fhir/ValueSet?colour=red",
            &[("prefer", "handling=lenient")],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn the_capability_statement_lists_the_conformance_types_and_operations() {
    let app = TestApp::sqlite().await;
    let cs = app.get("/fhir/metadata").await.body;
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    for t in [
        "StructureDefinition",
        "ValueSet",
        "CodeSystem",
        "ConceptMap",
        "SearchParameter",
    ] {
        let r = resources
            .iter()
            .find(|r| r["type"] == t)
            .unwrap_or_else(|| panic!("{t} is listed"));
        let interactions: Vec<&str> = r["interaction"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["code"].as_str())
            .collect();
        assert_eq!(
            interactions,
            vec!["read", "search-type"],
            "{t} is read-only"
        );
        let params: Vec<&str> = r["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        for p in ["url", "version", "name", "status"] {
            assert!(params.contains(&p), "{t} searches by {p}");
        }
    }
    let ops: Vec<String> = resources
        .iter()
        .flat_map(|r| r["operation"].as_array().cloned().unwrap_or_default())
        .chain(
            cs["rest"][0]["operation"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        )
        .filter_map(|o| o["name"].as_str().map(String::from))
        .collect();
    for op in [
        "validate",
        "lookup",
        "subsumes",
        "expand",
        "validate-code",
        "translate",
    ] {
        assert!(ops.iter().any(|o| o == op), "{op} among {ops:?}");
    }
}

on_both_databases! {
    async fn validate_reports_every_error_with_its_location_and_stores_nothing(app) {
        let before = app.count("Observation").await;
        // two errors of one layer (the StructureDefinition's): no status, two values
        let obs = json!({"resourceType": "Observation",
            "code": {"coding": [{"system": "http://loinc.org", "code": "600-7"}]},
            "valueString": "a", "valueBoolean": true});
        let r = app.post("/fhir/Observation/$validate", &obs).await;
        assert_eq!(r.status, StatusCode::OK, "R4: 200 with the issues: {}", r.text);
        let at: Vec<String> = errors(&r).into_iter().map(|(e, _)| e).collect();
        assert!(at.contains(&"Observation.status".to_string()), "{at:?}");
        assert!(at.contains(&"Observation.value".to_string()), "{at:?}");
        assert_eq!(app.count("Observation").await, before, "$validate stores nothing");
        // the same as a Parameters body with mode create
        let params = json!({"resourceType": "Parameters", "parameter": [
            {"name": "resource", "resource": obs}, {"name": "mode", "valueCode": "create"}]});
        let r2 = app.post("/fhir/Observation/$validate", &params).await;
        assert_eq!(errors(&r2), errors(&r));
        // a valid one: one information issue
        let mut good = obs.clone();
        good.as_object_mut().unwrap().insert("status".into(), json!("final"));
        good.as_object_mut().unwrap().shift_remove("valueBoolean");
        let r = app.post("/fhir/Observation/$validate", &good).await;
        assert_valid(&r);
        assert_eq!(issues(&r)[0].0, "information");
        // the write refuses what $validate refused, at the same place
        let w = app.post("/fhir/Observation", &obs).await;
        assert!(w.status.is_client_error());
        assert!(w.expressions().contains(&"Observation.status".to_string()));
        assert_eq!(app.count("Observation").await, before);
    }

    async fn validate_checks_our_profiles_and_extensions_like_a_write(app) {
        let mut bundle = fixture("dm1990/segnalazione-morbillo-transaction.json");
        let (_, report) = entry_of(&mut bundle, "Communication");
        let mut report = report.clone();
        report.as_object_mut().unwrap().shift_remove("sender");
        // the profile it claims (segnalazione) requires a sender
        let r = app.post("/fhir/Communication/$validate", &report).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let errs = errors(&r);
        assert!(errs.iter().any(|(e, d)| e == "Communication.sender" && d.contains("segnalazione")), "{errs:?}");
        // asked for by parameter, on a resource that does not claim it
        report.as_object_mut().unwrap().shift_remove("meta");
        let r = app
            .post(&format!("/fhir/Communication/$validate?profile={}", canon("StructureDefinition/segnalazione")), &report)
            .await;
        assert!(errors(&r).iter().any(|(e, _)| e == "Communication.sender"), "{}", r.text);
        let r = app.post("/fhir/Communication/$validate", &report).await;
        assert!(errors(&r).iter().all(|(e, _)| e != "Communication.sender"), "unclaimed: {}", r.text);
        // an extension of ours is checked against its definition wherever it is: a community
        // whose kind is not in tipo-comunita
        let mut with_ext = report.clone();
        with_ext["extension"] = json!([{"url": canon("StructureDefinition/comunita"), "extension": [
            {"url": "tipo", "valueCode": "astronave"},
            {"url": "identificativo", "valueIdentifier": {"system": "urn:x", "value": "1"}}]}]);
        let r = app.post("/fhir/Communication/$validate", &with_ext).await;
        let errs = errors(&r);
        assert!(errs.iter().any(|(e, d)| e.starts_with("Communication.extension[0]") && d.contains("tipo-comunita")), "{errs:?}");
        // and a write refuses it the same way, storing nothing
        let before = app.count("Communication").await;
        let w = app.post("/fhir/Communication", &with_ext).await;
        assert_eq!(w.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", w.text);
        assert_eq!(app.count("Communication").await, before);
    }

    async fn validate_takes_a_whole_transaction_bundle(app) {
        let before = app.count("Observation").await;
        let r = app.post("/fhir/Bundle/$validate", &transaction()).await;
        assert_valid(&r);
        let mut bad = transaction();
        let (i, obs) = entry_of(&mut bad, "Observation");
        obs["status"] = json!("banana");
        let r = app.post("/fhir/Bundle/$validate", &bad).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let at: Vec<String> = errors(&r).into_iter().map(|(e, _)| e).collect();
        assert!(at.contains(&format!("Bundle.entry[{i}].resource.status")), "{at:?}");
        // bdl-7 too, as the transaction would
        let mut twice = transaction();
        let entries = twice["entry"].as_array_mut().unwrap();
        let first_url = entries[0]["fullUrl"].clone();
        entries[1]["fullUrl"] = first_url;
        let r = app.post("/fhir/Bundle/$validate", &twice).await;
        assert!(errors(&r).iter().any(|(e, _)| e == "Bundle.entry[1].fullUrl"), "{}", r.text);
        assert_eq!(app.count("Observation").await, before, "nothing stored");
    }

    async fn validate_modes_update_and_delete_name_a_stored_resource(app) {
        let patient = fixture("patient-rossi.json");
        let created = app.post("/fhir/Patient", &patient).await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
        let id = created.body["id"].as_str().unwrap().to_string();
        let mut stored = created.body.clone();
        let r = app.post(&format!("/fhir/Patient/{id}/$validate?mode=update"), &stored).await;
        assert_valid(&r);
        stored["id"] = json!("someone-else");
        let r = app.post(&format!("/fhir/Patient/{id}/$validate?mode=update"), &stored).await;
        assert!(errors(&r).iter().any(|(e, _)| e == "Patient.id"), "{}", r.text);
        let r = app
            .request(Method::POST, &format!("/fhir/Patient/{id}/$validate?mode=delete"), &[], None)
            .await;
        assert_valid(&r);
        let r = app
            .request(Method::POST, "/fhir/Patient/not-there/$validate?mode=delete", &[], None)
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
        // and nothing was deleted
        assert_eq!(app.get(&format!("/fhir/Patient/{id}")).await.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn validate_refuses_what_it_cannot_validate() {
    let app = TestApp::sqlite().await;
    let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}});
    // a profile that does not exist
    let r = app
        .post(
            "/fhir/Observation/$validate?profile=https://example.org/StructureDefinition/none",
            &obs,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(r.expressions(), vec!["profile"]);
    // a Parameters without a resource, and one with a parameter $validate does not take
    let r = app
        .post("/fhir/Observation/$validate", &json!({"resourceType": "Parameters", "parameter": [{"name": "mode", "valueCode": "create"}]}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(r.expressions(), vec!["resource"]);
    let r = app
        .post("/fhir/Observation/$validate", &json!({"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": obs}, {"name": "colour", "valueString": "red"}]}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    // a resource of another type, a bad mode, no body, a type not served
    let r = app.post("/fhir/Patient/$validate", &obs).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(r.expressions(), vec!["resourceType"]);
    let r = app
        .post("/fhir/Observation/$validate?mode=sideways", &obs)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let r = app
        .request(Method::POST, "/fhir/Observation/$validate", &[], None)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let r = app.post("/fhir/Spaceship/$validate", &obs).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    // malformed JSON
    let r = app
        .request(
            Method::POST,
            "/fhir/Observation/$validate",
            &[("content-type", "application/fhir+json")],
            Some(b"{\"resourceType\":".to_vec()),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
}
