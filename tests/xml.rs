//! FHIR XML in and out (through fhirbolt at the edge), on SQLite and PostgreSQL.
mod common;

use axum::http::{Method, StatusCode};

const OBSERVATION_XML: &str = r#"<Observation xmlns="http://hl7.org/fhir">
  <status value="final"/>
  <code><coding><system value="http://loinc.org"/><code value="18932-4"/></coding></code>
  <valueQuantity><value value="6.30"/><unit value="mg/L"/><system value="http://unitsofmeasure.org"/><code value="mg/L"/></valueQuantity>
</Observation>"#;

on_both_databases! {
    async fn answers_the_server_makes_itself_are_served_in_xml(app) {
        // the CapabilityStatement and an empty $status searchset once held empty arrays, which
        // FHIR JSON forbids and the XML writer could not take (a 500)
        for path in ["/fhir/metadata?_format=xml", "/fhir/Subscription/$status?_format=xml"] {
            let r = app.get(path).await;
            assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
            assert!(r.header("content-type").unwrap().starts_with("application/fhir+xml"));
            assert!(r.text.starts_with("<?xml"), "{path}: {}", r.text);
        }
        let cs = app.get("/fhir/metadata?_format=xml").await;
        assert!(cs.text.contains("<CapabilityStatement"), "{}", cs.text);
        assert!(cs.text.contains("<searchInclude value=\"Observation:patient\"/>"), "{}", cs.text);
        let status = app.get("/fhir/Subscription/$status").await;
        assert_eq!(status.body["total"], 0);
        assert!(status.body.get("entry").is_none(), "{}", status.text);
    }

    async fn xml_in_and_out(app) {
        let xml_in = [("content-type", "application/fhir+xml"), ("accept", "application/fhir+xml")];
        let r = app.request(Method::POST, "/fhir/Observation", &xml_in, Some(OBSERVATION_XML.as_bytes().to_vec())).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert!(r.header("content-type").unwrap().starts_with("application/fhir+xml"));
        assert!(r.text.contains(r#"<value value="6.30"/>"#), "{}", r.text);
        let id_start = r.text.find("<id value=\"").unwrap() + 11;
        let id = &r.text[id_start..id_start + 36];

        // stored as JSON, decimal kept
        let json = app.get(&format!("/fhir/Observation/{id}")).await;
        assert!(json.text.contains(r#""value":6.30"#), "{}", json.text);
        // _format wins over Accept
        let xml = app.request(Method::GET, &format!("/fhir/Observation/{id}?_format=xml"), &[("accept", "application/fhir+json")], None).await;
        assert!(xml.text.starts_with("<?xml"), "{}", xml.text);
        let bundle = app.get("/fhir/Observation?code=18932-4&_format=application/fhir+xml").await;
        assert!(bundle.text.contains("<Bundle"), "{}", bundle.text);
        assert!(bundle.text.contains(r#"<total value="1"/>"#), "{}", bundle.text);
    }

    async fn xml_errors_are_operation_outcomes_in_xml(app) {
        let xml_in = [("content-type", "application/fhir+xml"), ("accept", "application/fhir+xml")];
        let r = app.request(Method::POST, "/fhir/Patient", &xml_in, Some(b"<Patient xmlns=\"http://hl7.org/fhir\"><nickname value=\"x\"/></Patient>".to_vec())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("<OperationOutcome"), "{}", r.text);
        assert!(r.text.contains("nickname"));
        let r = app.request(Method::POST, "/fhir/Patient", &[("content-type", "application/fhir+xml")], Some(b"<Patient xmlns=".to_vec())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.body["resourceType"], "OperationOutcome");
        assert_eq!(app.get("/fhir/_history").await.body["total"], 0);
    }
}
