//! Bad input is answered with an OperationOutcome and changes nothing, on SQLite and PostgreSQL.
mod common;

use axum::http::{Method, StatusCode};
use common::{Resp, TestApp, fixture};
use serde_json::json;

async fn assert_nothing_stored(app: &TestApp) {
    let h = app.get("/fhir/_history").await;
    assert_eq!(h.body["total"], 0, "something was stored: {}", h.text);
}

fn assert_outcome(r: &Resp, status: StatusCode) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.body["resourceType"], "OperationOutcome", "{}", r.text);
    assert_eq!(r.body["issue"][0]["severity"], "error");
}

on_both_databases! {
    async fn malformed_json_is_400(app) {
        let r = app.request(Method::POST, "/fhir/Patient", &[("content-type", "application/fhir+json")], Some(b"{\"resourceType\": \"Patient\",".to_vec())).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("line 1"));
        assert_nothing_stored(&app).await;
    }

    async fn invalid_utf8_is_400(app) {
        let mut body = br#"{"resourceType":"Patient","name":[{"family":"Ro"#.to_vec();
        body.extend_from_slice(&[0xff, 0xfe]);
        body.extend_from_slice(br#""}]}"#);
        let r = app.request(Method::POST, "/fhir/Patient", &[("content-type", "application/fhir+json")], Some(body)).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert_nothing_stored(&app).await;
    }

    async fn a_string_with_nul_is_400_naming_the_element_on_both_stores(app) {
        let body = br#"{"resourceType":"Patient","name":[{"family":"Ros\u0000si"}]}"#.to_vec();
        let r = app.request(Method::POST, "/fhir/Patient", &[("content-type", "application/fhir+json")], Some(body)).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert_eq!(r.body["issue"][0]["expression"][0], "Patient.name[0].family", "{}", r.text);
        assert_nothing_stored(&app).await;
    }

    async fn a_long_indexed_string_is_stored_and_found_on_both_stores(app) {
        // ~3 KB in an indexed element: PostgreSQL's B-tree refused it with a 500
        let family = format!("Lungo{}", "abcdefghij".repeat(300));
        let r = app.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": family}]})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let found = app.get("/fhir/Patient?family=Lungoabcdefghij").await;
        assert_eq!(found.body["total"], 1, "{}", found.text);
        let read = app.get(&format!("/fhir/Patient/{}", r.body["id"].as_str().unwrap())).await;
        assert_eq!(read.body["name"][0]["family"].as_str().unwrap().len(), family.len());
    }

    async fn deeply_nested_xml_is_400_not_a_crash(app) {
        // ~10 KB nested 1,500 levels: fhirbolt's recursive reader used to overflow the stack
        let body = format!(
            r#"<Patient xmlns="http://hl7.org/fhir">{}{}</Patient>"#,
            "<contact>".repeat(1500),
            "</contact>".repeat(1500)
        );
        let r = app.request(Method::POST, "/fhir/Patient", &[("content-type", "application/fhir+xml")], Some(body.into_bytes())).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("nested deeper"), "{}", r.text);
        assert_nothing_stored(&app).await;
    }

    async fn deeply_nested_json_is_400(app) {
        let body = format!("{{\"resourceType\":\"Patient\",\"extension\":{}{}}}", "[".repeat(5000), "]".repeat(5000));
        let r = app.request(Method::POST, "/fhir/Patient", &[("content-type", "application/fhir+json")], Some(body.into_bytes())).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert_nothing_stored(&app).await;
    }

    async fn wrong_content_type_is_415(app) {
        let body = serde_json::to_vec(&fixture("patient-rossi.json")).unwrap();
        for ct in ["text/plain", "application/x-www-form-urlencoded", "text/turtle"] {
            let r = app.request(Method::POST, "/fhir/Patient", &[("content-type", ct)], Some(body.clone())).await;
            assert_outcome(&r, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        }
        let r = app.request(Method::POST, "/fhir/Patient", &[], Some(body)).await;
        assert_outcome(&r, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_nothing_stored(&app).await;
    }

    async fn unsupported_format_is_406(app) {
        assert_outcome(&app.get("/fhir/metadata?_format=text/turtle").await, StatusCode::NOT_ACCEPTABLE);
        let r = app.request(Method::GET, "/fhir/metadata", &[("accept", "text/html")], None).await;
        assert_outcome(&r, StatusCode::NOT_ACCEPTABLE);
        assert_eq!(app.get("/fhir/metadata?_format=json").await.status, StatusCode::OK);
    }

    async fn id_in_body_differing_from_url_is_400(app) {
        let mut p = fixture("patient-rossi.json");
        p["id"] = json!("abc");
        let r = app.put("/fhir/Patient/xyz", &p, &[]).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert_eq!(r.expressions(), vec!["Patient.id".to_string()]);
        let wrong_type = app.post("/fhir/Observation", &fixture("patient-rossi.json")).await;
        assert_outcome(&wrong_type, StatusCode::BAD_REQUEST);
        assert_nothing_stored(&app).await;
    }

    async fn missing_resource_type_unknown_element_bad_date_bad_code(app) {
        let mut p = fixture("patient-rossi.json");
        p.as_object_mut().unwrap().shift_remove("resourceType");
        assert_outcome(&app.post("/fhir/Patient", &p).await, StatusCode::BAD_REQUEST);

        let mut p = fixture("patient-rossi.json");
        p["nickname"] = json!("Mariolino");
        let r = app.post("/fhir/Patient", &p).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);

        let mut p = fixture("patient-rossi.json");
        p["birthDate"] = json!("10/12/1985");
        let r = app.post("/fhir/Patient", &p).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert_eq!(r.expressions(), vec!["Patient.birthDate".to_string()]);

        let mut p = fixture("patient-rossi.json");
        p["gender"] = json!("maschio");
        let r = app.post("/fhir/Patient", &p).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert_eq!(r.expressions(), vec!["Patient.gender".to_string()]);

        let obs = json!({"resourceType": "Observation", "code": {"text": "emocoltura"}});
        let r = app.post("/fhir/Observation", &obs).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert_eq!(r.expressions(), vec!["Observation.status".to_string()]);

        let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueString": "a", "valueBoolean": true});
        let r = app.post("/fhir/Observation", &obs).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);

        let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {}});
        let r = app.post("/fhir/Observation", &obs).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert_eq!(r.expressions(), vec!["Observation.subject".to_string()]);
        assert_nothing_stored(&app).await;
    }

    async fn unknown_type_and_endpoint_are_404(app) {
        assert_outcome(&app.get("/fhir/Medication/1").await, StatusCode::NOT_FOUND);
        assert_outcome(&app.post("/fhir/Medication", &json!({"resourceType": "Medication"})).await, StatusCode::NOT_FOUND);
        assert_outcome(&app.get("/fhir/Patient/does-not-exist").await, StatusCode::NOT_FOUND);
        assert_outcome(&app.get("/nothing-here").await, StatusCode::NOT_FOUND);
        assert_outcome(&app.request(Method::PATCH, "/fhir/Patient/1", &[], None).await, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}

async fn oversized(app: TestApp) {
    let mut p = fixture("patient-rossi.json");
    p["name"][0]["text"] = json!("x".repeat(4096));
    let r = app.post("/fhir/Patient", &p).await;
    assert_outcome(&r, StatusCode::PAYLOAD_TOO_LARGE);
    assert_nothing_stored(&app).await;
    assert_eq!(
        app.post("/fhir/Patient", &fixture("patient-rossi.json"))
            .await
            .status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn body_over_the_limit_is_413_sqlite() {
    oversized(TestApp::sqlite_with(|c| c.max_body_bytes = 2048).await).await;
}

#[tokio::test]
async fn body_over_the_limit_is_413_postgres() {
    oversized(TestApp::postgres_with(|c| c.max_body_bytes = 2048).await).await;
}

// Issue "Security and hardening", item 8: each of these was accepted (or overflowed) before.
on_both_databases! {
    async fn a_repeated_json_key_is_400_naming_it(app) {
        let body = br#"{"resourceType":"Patient","gender":"male","resourceType":"Observation","status":"final","code":{"text":"x"}}"#.to_vec();
        let r = app.request(Method::POST, "/fhir/Patient", &[("content-type", "application/fhir+json")], Some(body)).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert_eq!(r.body["issue"][0]["expression"][0], "resourceType", "{}", r.text);
        let body = br#"{"resourceType":"Patient","name":[{"family":"Rossi","family":"Bianchi"}]}"#.to_vec();
        let r = app.request(Method::POST, "/fhir/Patient", &[("content-type", "application/fhir+json")], Some(body)).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert_eq!(r.body["issue"][0]["expression"][0], "Patient.name[0].family", "{}", r.text);
        assert_nothing_stored(&app).await;
    }

    async fn a_number_beyond_r4_ranges_is_400(app) {
        // a decimal too large for any number (stored, then unserialisable to XML, before)
        let body = br#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":1e999999}}"#.to_vec();
        let r = app.request(Method::POST, "/fhir/Observation", &[("content-type", "application/fhir+json")], Some(body)).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert_eq!(r.body["issue"][0]["expression"][0], "Observation.valueQuantity.value", "{}", r.text);
        // an integer beyond 32 bits
        let body = br#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueInteger":4294967296}"#.to_vec();
        let r = app.request(Method::POST, "/fhir/Observation", &[("content-type", "application/fhir+json")], Some(body)).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert_nothing_stored(&app).await;
        // the largest 32-bit integer and a long exact decimal are fine
        let ok = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueInteger": 2147483647});
        assert_eq!(app.post("/fhir/Observation", &ok).await.status, StatusCode::CREATED);
    }

    async fn a_date_that_is_not_in_the_calendar_is_400(app) {
        for (field, value) in [("birthDate", "2024-02-30"), ("birthDate", "2023-02-29"), ("deceasedDateTime", "2024-04-31T10:00:00Z")] {
            let r = app.post("/fhir/Patient", &json!({"resourceType": "Patient", field: value})).await;
            assert_outcome(&r, StatusCode::BAD_REQUEST);
            assert_eq!(r.body["issue"][0]["expression"][0], format!("Patient.{field}"), "{}", r.text);
        }
        assert_nothing_stored(&app).await;
        // a leap day, and a leap second, are real
        let r = app.post("/fhir/Patient", &json!({"resourceType": "Patient", "birthDate": "2024-02-29", "deceasedDateTime": "2016-12-31T23:59:60Z"})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let found = app.get("/fhir/Patient?birthdate=2024-02-29").await;
        assert_eq!(found.body["total"], 1, "{}", found.text);
    }

    async fn a_bundle_or_a_search_beyond_its_limits_is_400_too_costly(app) {
        let entry = json!({"resource": {"resourceType": "Patient", "gender": "male"}, "request": {"method": "POST", "url": "Patient"}});
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": vec![entry; 1001]});
        let r = app.post("/fhir", &bundle).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert_eq!(r.body["issue"][0]["code"], "too-costly", "{}", r.text);
        assert_eq!(r.body["issue"][0]["expression"][0], "Bundle.entry");
        assert_nothing_stored(&app).await;
        let many: Vec<String> = (0..31).map(|i| format!("family=f{i}")).collect();
        let r = app.get(&format!("/fhir/Patient?{}", many.join("&"))).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert_eq!(r.body["issue"][0]["code"], "too-costly", "{}", r.text);
        let values: Vec<String> = (0..101).map(|i| format!("v{i}")).collect();
        let r = app.get(&format!("/fhir/Patient?identifier={}", values.join(","))).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        // at the limits, they answer
        let r = app.get(&format!("/fhir/Patient?{}", many[..30].join("&"))).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let r = app.get(&format!("/fhir/Patient?identifier={}", values[..100].join(","))).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }

    async fn xml_that_is_not_utf8_is_400_not_a_500(app) {
        // found by the xml_reader fuzz target: the XML reader panicked on a namespace that is not UTF-8
        let body = b"<Patient xmlns=\"\xff\"/>".to_vec();
        let r = app.request(Method::POST, "/fhir/Patient", &[("content-type", "application/fhir+xml")], Some(body)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert!(r.text.contains("UTF-8"), "{}", r.text);
        assert_nothing_stored(&app).await;
    }

    async fn a_number_or_an_array_where_an_object_belongs_is_400(app) {
        // found by tests/rejected_requests.rs: these were stored
        for (field, value, at) in [
            ("subject", json!(3.5), "Observation.subject"),
            ("identifier", json!([3.5]), "Observation.identifier[0]"),
            ("code", json!({"coding": [[1, 2]]}), "Observation.code.coding[0]"),
        ] {
            let mut o = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}});
            o[field] = value;
            let r = app.post("/fhir/Observation", &o).await;
            assert_outcome(&r, StatusCode::BAD_REQUEST);
            assert!(r.expressions().iter().any(|e| e == at), "{at}: {}", r.text);
        }
        assert_nothing_stored(&app).await;
    }

    async fn an_offset_near_the_largest_integer_is_400_not_an_overflow(app) {
        app.post("/fhir/Patient", &json!({"resourceType": "Patient", "gender": "female"})).await;
        for uri in ["/fhir/Patient?_offset=9223372036854775800", "/fhir/Patient/_history?_offset=9223372036854775800", "/fhir/_history?_offset=9223372036854775807&_count=1000"] {
            let r = app.get(uri).await;
            assert_outcome(&r, StatusCode::BAD_REQUEST);
            assert!(r.text.contains("_offset"), "{}", r.text);
        }
        // the deepest allowed page answers, with no next link past the end
        let r = app.get("/fhir/Patient?_offset=1000000&_count=1000").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(!r.text.contains("\"next\""), "{}", r.text);
    }
}
