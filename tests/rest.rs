//! Single-resource interactions, versioning and concurrency, on SQLite and PostgreSQL.
mod common;

use axum::http::StatusCode;
use common::fixture;
use serde_json::{Value, json};

on_both_databases! {
    async fn create_read_vread_update_delete_and_history(app) {
        let created = app.post("/fhir/Patient", &fixture("patient-rossi.json")).await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
        let id = created.body["id"].as_str().unwrap().to_string();
        assert_eq!(created.body["meta"]["versionId"], "1");
        assert_eq!(created.header("etag"), Some("W/\"1\""));
        assert!(created.header("location").unwrap().ends_with(&format!("/fhir/Patient/{id}/_history/1")));

        let read = app.get(&format!("/fhir/Patient/{id}")).await;
        assert_eq!(read.status, StatusCode::OK);
        assert_eq!(read.body, created.body);
        assert!(read.header("content-type").unwrap().starts_with("application/fhir+json"));

        let mut changed = read.body.clone();
        changed["gender"] = json!("other");
        let updated = app.put(&format!("/fhir/Patient/{id}"), &changed, &[("if-match", "W/\"1\"")]).await;
        assert_eq!(updated.status, StatusCode::OK, "{}", updated.text);
        assert_eq!(updated.body["meta"]["versionId"], "2");

        let v1 = app.get(&format!("/fhir/Patient/{id}/_history/1")).await;
        assert_eq!(v1.body["gender"], "male");
        let v2 = app.get(&format!("/fhir/Patient/{id}/_history/2")).await;
        assert_eq!(v2.body["gender"], "other");
        assert_eq!(app.get(&format!("/fhir/Patient/{id}/_history/3")).await.status, StatusCode::NOT_FOUND);

        let deleted = app.delete(&format!("/fhir/Patient/{id}")).await;
        assert_eq!(deleted.status, StatusCode::NO_CONTENT);
        assert_eq!(app.get(&format!("/fhir/Patient/{id}")).await.status, StatusCode::GONE);
        assert_eq!(app.count("Patient").await, 0);

        let history = app.get(&format!("/fhir/Patient/{id}/_history")).await;
        assert_eq!(history.body["type"], "history");
        assert_eq!(history.body["total"], 3);
        let methods: Vec<_> = history.body["entry"].as_array().unwrap().iter().map(|e| e["request"]["method"].clone()).collect();
        assert_eq!(methods, vec![json!("DELETE"), json!("PUT"), json!("POST")]);
        let type_history = app.get("/fhir/Patient/_history").await;
        assert_eq!(type_history.body["total"], 3);
        assert_eq!(app.get("/fhir/Patient/nope/_history").await.status, StatusCode::NOT_FOUND);
    }

    async fn decimal_precision_and_key_order_are_kept(app) {
        let body = r#"{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"18932-4"}]},"valueQuantity":{"value":6.30,"unit":"mg/L","system":"http://unitsofmeasure.org","code":"mg/L"}}"#;
        let r = app.request(axum::http::Method::POST, "/fhir/Observation", &[("content-type", "application/fhir+json")], Some(body.as_bytes().to_vec())).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let id = r.body["id"].as_str().unwrap();
        let read = app.get(&format!("/fhir/Observation/{id}")).await;
        assert!(read.text.contains(r#""valueQuantity":{"value":6.30,"unit":"mg/L""#), "{}", read.text);
        assert!(read.text.contains(r#""status":"final","code""#), "{}", read.text);
    }

    async fn update_with_stale_if_match_is_412_and_changes_nothing(app) {
        let created = app.post("/fhir/Patient", &fixture("patient-rossi.json")).await;
        let id = created.body["id"].as_str().unwrap().to_string();
        let mut v = created.body.clone();
        v["gender"] = json!("female");
        assert_eq!(app.put(&format!("/fhir/Patient/{id}"), &v, &[("if-match", "W/\"1\"")]).await.status, StatusCode::OK);
        v["gender"] = json!("other");
        let stale = app.put(&format!("/fhir/Patient/{id}"), &v, &[("if-match", "W/\"1\"")]).await;
        assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED, "{}", stale.text);
        assert_eq!(stale.body["resourceType"], "OperationOutcome");
        assert_eq!(app.get(&format!("/fhir/Patient/{id}")).await.body["gender"], "female");
    }

    async fn update_as_create_with_client_id(app) {
        let mut p = fixture("patient-rossi.json");
        p["id"] = json!("rossi-mario");
        let r = app.put("/fhir/Patient/rossi-mario", &p, &[]).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.body["meta"]["versionId"], "1");
        let again = app.put("/fhir/Patient/rossi-mario", &p, &[]).await;
        assert_eq!(again.status, StatusCode::OK);
        assert_eq!(again.body["meta"]["versionId"], "2");
    }

    async fn concurrent_updates_one_wins_one_gets_412(app) {
        let created = app.post("/fhir/Patient", &fixture("patient-rossi.json")).await;
        let id = created.body["id"].as_str().unwrap().to_string();
        let app = std::sync::Arc::new(app);
        let mut tasks = Vec::new();
        for gender in ["female", "other"] {
            let (app, id) = (app.clone(), id.clone());
            let mut v = created.body.clone();
            v["gender"] = json!(gender);
            tasks.push(tokio::spawn(async move {
                app.put(&format!("/fhir/Patient/{id}"), &v, &[("if-match", "W/\"1\"")]).await.status
            }));
        }
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap());
        }
        statuses.sort();
        assert_eq!(statuses, vec![StatusCode::OK, StatusCode::PRECONDITION_FAILED]);
        let h = app.get(&format!("/fhir/Patient/{id}/_history")).await;
        assert_eq!(h.body["total"], 2);
    }

    async fn conditional_create_returns_the_existing_resource(app) {
        let cf = "identifier=http://hl7.it/sid/codiceFiscale|RSSMRA85T10A562S";
        let first = app.post_with("/fhir/Patient", &fixture("patient-rossi.json"), &[("if-none-exist", cf)]).await;
        assert_eq!(first.status, StatusCode::CREATED);
        let second = app.post_with("/fhir/Patient", &fixture("patient-rossi.json"), &[("if-none-exist", cf)]).await;
        assert_eq!(second.status, StatusCode::OK, "{}", second.text);
        assert_eq!(second.body["id"], first.body["id"]);
        assert_eq!(app.count("Patient").await, 1);
        // two matches: 412
        app.post("/fhir/Patient", &fixture("patient-rossi.json")).await;
        let many = app.post_with("/fhir/Patient", &fixture("patient-rossi.json"), &[("if-none-exist", cf)]).await;
        assert_eq!(many.status, StatusCode::PRECONDITION_FAILED);
    }

    async fn concurrent_identical_conditional_creates_make_one_resource(app) {
        let app = std::sync::Arc::new(app);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let app = app.clone();
            tasks.push(tokio::spawn(async move {
                let cf = "identifier=http://hl7.it/sid/codiceFiscale|RSSMRA85T10A562S";
                let r = app.post_with("/fhir/Patient", &fixture("patient-rossi.json"), &[("if-none-exist", cf)]).await;
                (r.status, r.body["id"].clone())
            }));
        }
        let mut ids = std::collections::HashSet::new();
        let mut created = 0;
        for t in tasks {
            let (status, id) = t.await.unwrap();
            assert!(status == StatusCode::CREATED || status == StatusCode::OK, "{status}");
            if status == StatusCode::CREATED {
                created += 1;
            }
            ids.insert(id.to_string());
        }
        assert_eq!(created, 1);
        assert_eq!(ids.len(), 1);
        assert_eq!(app.count("Patient").await, 1);
    }

    async fn prefer_return_minimal_and_operation_outcome(app) {
        let minimal = app.post_with("/fhir/Patient", &fixture("patient-rossi.json"), &[("prefer", "return=minimal")]).await;
        assert_eq!(minimal.status, StatusCode::CREATED);
        assert!(minimal.text.is_empty());
        assert!(minimal.header("location").is_some());
        let oo = app.post_with("/fhir/Patient", &fixture("patient-rossi.json"), &[("prefer", "return=OperationOutcome")]).await;
        assert_eq!(oo.body["resourceType"], "OperationOutcome");
    }

    async fn capability_statement_lists_what_is_served(app) {
        let r = app.get("/fhir/metadata").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body["fhirVersion"], "4.0.1");
        let resources = r.body["rest"][0]["resource"].as_array().unwrap();
        let types: Vec<&str> = resources.iter().map(|x| x["type"].as_str().unwrap()).collect();
        for t in sentinella::fhir::SERVED_TYPES {
            assert!(types.contains(t), "{t} missing");
        }
        let obs = resources.iter().find(|x| x["type"] == "Observation").unwrap();
        let params: Vec<&str> = obs["searchParam"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        for p in ["code", "patient", "subject", "specimen", "date", "has-member", "based-on", "_profile", "_lastUpdated"] {
            assert!(params.contains(&p), "Observation search parameter {p} missing");
        }
        assert_eq!(r.body["format"], json!(["application/fhir+json", "json", "application/fhir+xml", "xml"]));
        // FHIR JSON has no empty arrays or objects and no nulls
        fn no_empty(v: &Value, at: &str) {
            match v {
                Value::Array(a) => {
                    assert!(!a.is_empty(), "empty array at {at}");
                    a.iter().enumerate().for_each(|(i, x)| no_empty(x, &format!("{at}[{i}]")));
                }
                Value::Object(o) => {
                    assert!(!o.is_empty(), "empty object at {at}");
                    o.iter().for_each(|(k, x)| no_empty(x, &format!("{at}.{k}")));
                }
                Value::Null => panic!("null at {at}"),
                _ => {}
            }
        }
        no_empty(&r.body, "CapabilityStatement");
    }
}
