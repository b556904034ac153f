//! Transaction and batch Bundles, on SQLite and PostgreSQL.
mod common;

use axum::http::StatusCode;
use common::fixture;
use sentinella::italy::codice_fiscale::CodiceFiscale;
use serde_json::json;

on_both_databases! {
    async fn a_transaction_posted_to_the_base_with_a_trailing_slash_is_processed(app) {
        // fhirpy and fhir-kit-client post Bundles to `{base}/`
        let r = app.post("/fhir/", &fixture("antibiogram-transaction.json")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["type"], "transaction-response");
        assert_eq!(app.count("Patient").await, 1);
        let r = app.get("/fhir/").await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{}", r.text);
        assert_eq!(r.body["resourceType"], "OperationOutcome");
    }

    async fn a_fullurl_used_by_two_entries_is_400_and_stores_nothing(app) {
        let mut b = fixture("antibiogram-transaction.json");
        let first = b["entry"][0]["fullUrl"].clone();
        b["entry"][1]["fullUrl"] = first;
        let r = app.post("/fhir", &b).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert_eq!(r.body["resourceType"], "OperationOutcome");
        assert!(r.expressions().iter().any(|e| e == "Bundle.entry[1].fullUrl"), "{}", r.text);
        assert_eq!(app.count("Patient").await, 0);
        assert_eq!(app.count("Observation").await, 0);
    }

    async fn transaction_resolves_urn_uuid_references(app) {
        let r = app.post("/fhir", &fixture("antibiogram-transaction.json")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["type"], "transaction-response");
        let entries = r.body["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 8);
        assert!(entries.iter().all(|e| e["response"]["status"] == "201 Created"));
        let patient_id = entries[0]["resource"]["id"].as_str().unwrap();
        let isolate = &entries[3]["resource"];
        assert_eq!(isolate["subject"]["reference"], format!("Patient/{patient_id}"));
        assert!(isolate["hasMember"][0]["reference"].as_str().unwrap().starts_with("Observation/"));
        // the references point at stored resources
        let member = isolate["hasMember"][0]["reference"].as_str().unwrap();
        assert_eq!(app.get(&format!("/fhir/{member}")).await.status, StatusCode::OK);
        // decimal precision survives the transaction
        let imipenem = app.get(&format!("/fhir/{}", isolate["hasMember"][1]["reference"].as_str().unwrap())).await;
        assert!(imipenem.text.contains("\"value\":6.30"), "{}", imipenem.text);
    }

    async fn transaction_conditional_entries_reuse_existing_resources(app) {
        let first = app.post("/fhir", &fixture("antibiogram-transaction.json")).await;
        assert_eq!(first.status, StatusCode::OK);
        let again = app.post("/fhir", &fixture("antibiogram-transaction.json")).await;
        assert_eq!(again.status, StatusCode::OK, "{}", again.text);
        assert_eq!(again.body["entry"][0]["response"]["status"], "200 OK");
        assert_eq!(again.body["entry"][0]["resource"]["id"], first.body["entry"][0]["resource"]["id"]);
        assert_eq!(app.count("Patient").await, 1);
        assert_eq!(app.count("Organization").await, 1);
        // the new Specimen of the second Bundle points at the existing patient
        let patient = first.body["entry"][0]["resource"]["id"].as_str().unwrap();
        assert_eq!(again.body["entry"][2]["resource"]["subject"]["reference"], format!("Patient/{patient}"));
    }

    async fn transaction_is_atomic_when_an_entry_fails_midway(app) {
        let p = app.post("/fhir/Patient", &fixture("patient-rossi.json")).await;
        let pid = p.body["id"].as_str().unwrap().to_string();
        let mut changed = p.body.clone();
        changed["gender"] = json!("female");
        // entries 0-7 are valid; entry 8 updates with a stale version: the whole transaction fails
        let mut bundle = fixture("antibiogram-transaction.json");
        bundle["entry"].as_array_mut().unwrap().push(json!({
            "resource": changed,
            "request": {"method": "PUT", "url": format!("Patient/{pid}"), "ifMatch": "W/\"7\""}
        }));
        let r = app.post("/fhir", &bundle).await;
        assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{}", r.text);
        assert_eq!(r.expressions(), vec!["Bundle.entry[8]".to_string()]);
        assert_eq!(app.count("Patient").await, 1);
        assert_eq!(app.count("Observation").await, 0);
        assert_eq!(app.count("Specimen").await, 0);
        assert_eq!(app.count("DiagnosticReport").await, 0);
        assert_eq!(app.get(&format!("/fhir/Patient/{pid}")).await.body["gender"], "male");
        assert_eq!(app.get("/fhir/_history").await.body["total"], 1);
    }

    async fn transaction_with_dangling_urn_uuid_is_rejected_and_stores_nothing(app) {
        let mut bundle = fixture("antibiogram-transaction.json");
        bundle["entry"][3]["resource"]["specimen"]["reference"] = json!("urn:uuid:00000000-0000-0000-0000-00000000dead");
        let r = app.post("/fhir", &bundle).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert_eq!(r.expressions(), vec!["Bundle.entry[3].resource.specimen.reference".to_string()]);
        assert_eq!(app.get("/fhir/_history").await.body["total"], 0);
    }

    async fn transaction_entry_errors_carry_the_entry_path(app) {
        let mut bundle = fixture("antibiogram-transaction.json");
        bundle["entry"][4]["resource"]["status"] = json!("banana");
        let r = app.post("/fhir", &bundle).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.expressions().contains(&"Bundle.entry[4].resource.status".to_string()), "{}", r.text);
        assert_eq!(app.get("/fhir/_history").await.body["total"], 0);
    }

    async fn transaction_update_and_delete_entries(app) {
        let p = app.post("/fhir/Patient", &fixture("patient-rossi.json")).await;
        let pid = p.body["id"].as_str().unwrap().to_string();
        let mut changed = p.body.clone();
        changed["gender"] = json!("female");
        let gone = app.post("/fhir/Patient", &fixture("patient-rossi.json")).await;
        let gid = gone.body["id"].as_str().unwrap().to_string();
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": changed, "request": {"method": "PUT", "url": format!("Patient/{pid}"), "ifMatch": "W/\"1\""}},
            {"request": {"method": "DELETE", "url": format!("Patient/{gid}")}},
            {"request": {"method": "GET", "url": format!("Patient/{pid}")}}
        ]});
        let r = app.post("/fhir", &bundle).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["entry"][0]["response"]["status"], "200 OK");
        assert_eq!(r.body["entry"][1]["response"]["status"], "204 No Content");
        assert_eq!(r.body["entry"][2]["resource"]["gender"], "female");
        assert_eq!(app.get(&format!("/fhir/Patient/{gid}")).await.status, StatusCode::GONE);
    }

    async fn batch_processes_each_entry_on_its_own(app) {
        let mut bad = fixture("patient-rossi.json");
        bad["gender"] = json!("unknown-gender");
        let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": fixture("patient-rossi.json"), "request": {"method": "POST", "url": "Patient"}},
            {"resource": bad, "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": "Patient/does-not-exist"}}
        ]});
        let r = app.post("/fhir", &bundle).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["type"], "batch-response");
        assert_eq!(r.body["entry"][0]["response"]["status"], "201 Created");
        assert!(r.body["entry"][1]["response"]["status"].as_str().unwrap().starts_with("400"));
        let issue = &r.body["entry"][1]["response"]["outcome"]["issue"][0];
        assert_eq!(issue["expression"][0], "Bundle.entry[1].resource.gender");
        assert!(r.body["entry"][2]["response"]["status"].as_str().unwrap().starts_with("404"));
        assert_eq!(app.count("Patient").await, 1);
    }

    async fn other_bundle_types_are_refused(app) {
        let r = app.post("/fhir", &json!({"resourceType": "Bundle", "type": "collection"})).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
        let r = app.post("/fhir", &fixture("patient-rossi.json")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }

    async fn concurrent_transactions_succeed_or_fail_independently(app) {
        let p = app.post("/fhir/Patient", &fixture("patient-rossi.json")).await;
        let pid = p.body["id"].as_str().unwrap().to_string();
        let app = std::sync::Arc::new(app);
        let mut tasks = Vec::new();
        for i in 0..24 {
            let app = app.clone();
            let mut bundle = fixture("antibiogram-transaction.json");
            // a distinct, valid codice fiscale per Bundle: day of birth i+1
            let cf = CodiceFiscale::complete(&format!("BNCLRA90A{:02}F205", i + 1)).expect("valid");
            bundle["entry"][0]["resource"]["identifier"][0]["value"] = json!(cf.as_str());
            bundle["entry"][0]["request"]["ifNoneExist"] = json!(format!("identifier=http://hl7.it/sid/codiceFiscale|{}", cf.as_str()));
            let failing = i % 4 == 0;
            if failing {
                bundle["entry"].as_array_mut().unwrap().push(json!({
                    "resource": p.body.clone(),
                    "request": {"method": "PUT", "url": format!("Patient/{pid}"), "ifMatch": "W/\"9\""}
                }));
            }
            tasks.push(tokio::spawn(async move { (failing, app.post("/fhir", &bundle).await.status) }));
        }
        for t in tasks {
            let (failing, status) = t.await.unwrap();
            let expected = if failing { StatusCode::PRECONDITION_FAILED } else { StatusCode::OK };
            assert_eq!(status, expected);
        }
        // 18 Bundles landed whole, 6 left nothing; the patient posted first is untouched
        assert_eq!(app.count("Patient").await, 19);
        assert_eq!(app.count("Specimen").await, 18);
        assert_eq!(app.count("Observation").await, 18 * 4);
        assert_eq!(app.get(&format!("/fhir/Patient/{pid}")).await.body["meta"]["versionId"], "1");
    }
}
