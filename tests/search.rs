//! Search parameters, _include/_revinclude, paging and strictness, on SQLite and PostgreSQL.
mod common;

use axum::http::StatusCode;
use common::{TestApp, fixture};
use serde_json::{Value, json};

async fn load_antibiogram(app: &TestApp) -> Value {
    let r = app
        .post("/fhir", &fixture("antibiogram-transaction.json"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body
}

fn ids(bundle: &Value, rt: &str) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["resource"]["resourceType"] == rt)
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect()
}

fn id_from(entry: &Value) -> String {
    entry["response"]["location"]
        .as_str()
        .unwrap()
        .split('/')
        .nth_back(2)
        .unwrap()
        .to_string()
}

on_both_databases! {
    async fn a_reference_to_another_server_is_not_the_local_resource(app) {
        let local = app.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Locale"}]})).await;
        let id = local.body["id"].as_str().unwrap().to_string();
        let foreign = format!("http://elsewhere.example/fhir/Patient/{id}");
        let obs = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "600-7"}]},
            "subject": {"reference": foreign}});
        let r = app.post("/fhir/Observation", &obs).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let by_local = app.get(&format!("/fhir/Observation?subject=Patient/{id}")).await;
        assert_eq!(by_local.body["total"], 0, "{}", by_local.text);
        let by_url = app.get(&format!("/fhir/Observation?subject={foreign}")).await;
        assert_eq!(by_url.body["total"], 1, "{}", by_url.text);
    }

    async fn token_reference_date_and_string_parameters(app) {
        let tx = load_antibiogram(&app).await;
        let patient = id_from(&tx["entry"][0]);
        let specimen = id_from(&tx["entry"][2]);
        let isolate = id_from(&tx["entry"][3]);

        let by_code = app.get("/fhir/Observation?code=http://loinc.org|600-7").await;
        assert_eq!(by_code.body["total"], 1, "{}", by_code.text);
        assert_eq!(app.get("/fhir/Observation?code=600-7").await.body["total"], 1);
        assert_eq!(app.get("/fhir/Observation?code=http://snomed.info/sct|600-7").await.body["total"], 0);
        assert_eq!(app.get("/fhir/Observation?code=18943-1,18932-4").await.body["total"], 2);
        assert_eq!(app.get("/fhir/Observation?code:not=600-7").await.body["total"], 3);

        assert_eq!(app.get(&format!("/fhir/Observation?patient={patient}")).await.body["total"], 4);
        assert_eq!(app.get(&format!("/fhir/Observation?subject=Patient/{patient}")).await.body["total"], 4);
        assert_eq!(app.get(&format!("/fhir/Observation?specimen={specimen}")).await.body["total"], 4);
        assert_eq!(app.get(&format!("/fhir/Observation?has-member=Observation/{}", id_from(&tx["entry"][4]))).await.body["total"], 1);
        assert_eq!(app.get(&format!("/fhir/DiagnosticReport?result={isolate}")).await.body["total"], 1);
        assert_eq!(app.get("/fhir/DiagnosticReport?category=MB&status=final").await.body["total"], 1);
        assert_eq!(app.get("/fhir/Specimen?type=http://snomed.info/sct|119297000").await.body["total"], 1);

        // dates: collected 2026-03-02T08:15+01:00 (07:15Z)
        assert_eq!(app.get("/fhir/Specimen?collected=2026-03-02").await.body["total"], 1);
        assert_eq!(app.get("/fhir/Specimen?collected=ge2026-03-01&collected=lt2026-03-03").await.body["total"], 1);
        assert_eq!(app.get("/fhir/Specimen?collected=gt2026-03-02").await.body["total"], 0);
        assert_eq!(app.get("/fhir/Observation?date=2026-03").await.body["total"], 1);
        assert_eq!(app.get("/fhir/DiagnosticReport?issued=lt2026-03-04T11:00:00Z").await.body["total"], 1);

        // strings: case- and accent-insensitive prefix; :exact; :contains
        assert_eq!(app.get("/fhir/Patient?name=bian").await.body["total"], 1);
        assert_eq!(app.get("/fhir/Patient?family:exact=Bianchi").await.body["total"], 1);
        assert_eq!(app.get("/fhir/Patient?family:exact=Bian").await.body["total"], 0);
        assert_eq!(app.get("/fhir/Organization?name:contains=niguarda").await.body["total"], 1);
        assert_eq!(app.get("/fhir/Patient?identifier=http://hl7.it/sid/codiceFiscale|BNCLRA90A41F205I").await.body["total"], 1);

        assert_eq!(app.get(&format!("/fhir/Patient?_id={patient}")).await.body["total"], 1);
        assert_eq!(app.get("/fhir/Patient?_lastUpdated=gt2000-01-01").await.body["total"], 1);
        assert_eq!(app.get("/fhir/Patient?_lastUpdated=lt2000-01-01").await.body["total"], 0);
    }

    async fn profile_parameter(app) {
        let mut p = fixture("patient-rossi.json");
        p["meta"] = json!({"profile": ["https://sentinella-fhir.github.io/ig/StructureDefinition/paziente"]});
        app.post("/fhir/Patient", &p).await;
        app.post("/fhir/Patient", &fixture("patient-rossi.json")).await;
        let r = app.get("/fhir/Patient?_profile=https://sentinella-fhir.github.io/ig/StructureDefinition/paziente").await;
        assert_eq!(r.body["total"], 1, "{}", r.text);
    }

    async fn include_and_revinclude(app) {
        let tx = load_antibiogram(&app).await;
        let isolate = id_from(&tx["entry"][3]);
        let r = app.get(&format!("/fhir/Observation?_id={isolate}&_include=Observation:specimen&_include=Observation:patient&_include=Observation:has-member")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["total"], 1);
        assert_eq!(ids(&r.body, "Specimen").len(), 1);
        assert_eq!(ids(&r.body, "Patient").len(), 1);
        assert_eq!(ids(&r.body, "Observation").len(), 4);
        let modes: Vec<_> = r.body["entry"].as_array().unwrap().iter().map(|e| e["search"]["mode"].as_str().unwrap()).collect();
        assert_eq!(modes.iter().filter(|m| **m == "match").count(), 1);

        let rev = app.get(&format!("/fhir/Observation?_id={isolate}&_revinclude=DiagnosticReport:result")).await;
        assert_eq!(ids(&rev.body, "DiagnosticReport").len(), 1, "{}", rev.text);
        let bad = app.get("/fhir/Observation?_include=Observation:code").await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    }

    async fn paging_over_more_results_than_count(app) {
        for i in 0..7 {
            let mut p = fixture("patient-rossi.json");
            p["name"][0]["given"] = json!([format!("Mario{i}")]);
            assert_eq!(app.post("/fhir/Patient", &p).await.status, StatusCode::CREATED);
        }
        let mut seen = std::collections::HashSet::new();
        let mut url = "/fhir/Patient?family=rossi&_count=3".to_string();
        let mut pages = 0;
        loop {
            let r = app.get(&url).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            assert_eq!(r.body["total"], 7);
            for id in ids(&r.body, "Patient") {
                assert!(seen.insert(id), "a resource appeared on two pages");
            }
            pages += 1;
            let next = r.body["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next");
            match next {
                Some(l) => url = l["url"].as_str().unwrap().split_once("/fhir").map(|(_, p)| format!("/fhir{p}")).unwrap(),
                None => break,
            }
            assert!(pages < 10);
        }
        assert_eq!(pages, 3);
        assert_eq!(seen.len(), 7);
        let count_only = app.get("/fhir/Patient?_summary=count").await;
        assert_eq!(count_only.body["total"], 7);
        assert!(count_only.body.get("entry").is_none());
    }

    async fn unknown_search_parameter_is_400_unless_lenient(app) {
        app.post("/fhir/Patient", &fixture("patient-rossi.json")).await;
        let r = app.get("/fhir/Patient?nmae=rossi").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.body["resourceType"], "OperationOutcome");
        assert_eq!(r.expressions(), vec!["nmae".to_string()]);
        assert!(r.text.contains("nmae"));
        let lenient = app.request(axum::http::Method::GET, "/fhir/Patient?nmae=rossi", &[("prefer", "handling=lenient")], None).await;
        assert_eq!(lenient.status, StatusCode::OK);
        assert_eq!(lenient.body["total"], 1);
        let outcome = lenient.body["entry"].as_array().unwrap().iter().find(|e| e["search"]["mode"] == "outcome").unwrap();
        assert_eq!(outcome["resource"]["issue"][0]["severity"], "warning");
        assert_eq!(app.get("/fhir/Patient?name:fuzzy=x").await.status, StatusCode::BAD_REQUEST);
        assert_eq!(app.get("/fhir/Patient?birthdate=yesterday").await.status, StatusCode::BAD_REQUEST);
        assert_eq!(app.get("/fhir/Patient?_count=many").await.status, StatusCode::BAD_REQUEST);
        assert_eq!(app.get("/fhir/Patient?_sort=name").await.status, StatusCode::BAD_REQUEST);
    }
}

on_both_databases! {
    async fn parameters_that_share_a_path_find_what_the_other_stores(app) {
        // `patient` is `subject` restricted to Patient references; `combo-code` is `code` plus the
        // components' codes: those values are stored once, and each parameter still finds them
        let patient = app.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Galli"}]})).await;
        assert_eq!(patient.status, StatusCode::CREATED, "{}", patient.text);
        let pid = patient.body["id"].as_str().unwrap().to_string();
        let place = app.post("/fhir/Location", &json!({"resourceType": "Location", "name": "Reparto"})).await;
        assert_eq!(place.status, StatusCode::CREATED, "{}", place.text);
        let lid = place.body["id"].as_str().unwrap().to_string();
        let bp = |subject: String| json!({
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
            "subject": {"reference": subject},
            "component": [{"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                           "valueQuantity": {"value": 120, "unit": "mm[Hg]"}}]
        });
        let r = app.post("/fhir/Observation", &bp(format!("Patient/{pid}"))).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let obs = r.body["id"].as_str().unwrap().to_string();
        let n = |b: &Value| b["total"].as_i64().unwrap();
        assert_eq!(n(&app.get(&format!("/fhir/Observation?patient={pid}")).await.body), 1);
        assert_eq!(n(&app.get(&format!("/fhir/Observation?patient=Patient/{pid}")).await.body), 1);
        assert_eq!(n(&app.get(&format!("/fhir/Observation?subject={pid}")).await.body), 1);
        assert_eq!(n(&app.get("/fhir/Observation?patient:missing=false").await.body), 1);
        assert_eq!(n(&app.get("/fhir/Observation?patient:missing=true").await.body), 0);
        assert_eq!(n(&app.get("/fhir/Observation?combo-code=85354-9").await.body), 1);
        assert_eq!(n(&app.get("/fhir/Observation?combo-code=8480-6").await.body), 1);
        assert_eq!(n(&app.get("/fhir/Observation?code=8480-6").await.body), 0);
        assert_eq!(n(&app.get("/fhir/Observation?combo-code:not=85354-9").await.body), 0);
        // _include and _revinclude through the shared rows
        let inc = app.get(&format!("/fhir/Observation?_id={obs}&_include=Observation:patient")).await;
        assert_eq!(ids(&inc.body, "Patient"), vec![pid.clone()], "{}", inc.text);
        let rev = app.get(&format!("/fhir/Patient?_id={pid}&_revinclude=Observation:patient")).await;
        assert_eq!(ids(&rev.body, "Observation"), vec![obs.clone()], "{}", rev.text);
        // a subject that is not a Patient is no `patient`
        let r = app.post("/fhir/Observation", &bp(format!("Location/{lid}"))).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(n(&app.get(&format!("/fhir/Observation?subject=Location/{lid}")).await.body), 1);
        assert_eq!(n(&app.get("/fhir/Observation?patient:missing=true").await.body), 1);
        assert_eq!(n(&app.get(&format!("/fhir/Observation?patient={lid}")).await.body), 0);
    }
}
