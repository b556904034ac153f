//! The XML reader (`sentinella-fhir-xml`, re-exported as `sentinella::api::xml`): an XML body is
//! depth-checked, converted to JSON by fhirbolt, then read and validated like a JSON body; a JSON
//! response is written back as XML when the client asks for it.
//!
//! Asserts: no panic and no stack overflow on the server's 2 MiB stack (fhirbolt recurses once per
//! element); a document nested deeper than `MAX_DEPTH` is always refused; a refused document is a
//! 400 OperationOutcome as `FhirBody` builds it; what the converter produces is answered by the JSON
//! reader with a resource or a 4xx OperationOutcome; a resource accepted in XML can be written back
//! as XML and read again.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use sentinella::api::xml::{json_to_xml, xml_to_json};
use sentinella::error::{ApiError, Issue};
use sentinella::fhir::resource::{parse_json, resource_type, validate};
use sentinella_fhir_xml::{MAX_DEPTH, check_depth};

fuzz_target!(|data: &[u8]| {
    common::on_server_stack(|| check(data));
});

fn check(data: &[u8]) {
    let too_deep = check_depth(data, MAX_DEPTH).is_err();
    let json = match xml_to_json(data) {
        Ok(json) => json,
        Err(msg) => {
            assert!(!msg.is_empty(), "an XML error without a message");
            // as `FhirBody` answers it
            let err = ApiError::invalid(vec![Issue::error(
                "structure",
                format!("the body is not a valid FHIR R4 XML resource: {msg}"),
                None,
            )]);
            return common::assert_rejected(&err, "xml_to_json");
        }
    };
    assert!(
        !too_deep,
        "a document nested deeper than {MAX_DEPTH} was converted"
    );
    let value = match parse_json(&json) {
        Ok(v) => v,
        Err(e) => return common::assert_rejected(&e, "parse_json of converted XML"),
    };
    let rt = resource_type(&value)
        .expect("fhirbolt writes a resourceType")
        .to_string();
    if let Err(e) = validate(&value) {
        return common::assert_rejected(&e, "validate of converted XML");
    }
    // an XML client reads back what it wrote
    let xml = json_to_xml(&json)
        .unwrap_or_else(|e| panic!("a valid {rt} read from XML cannot be written as XML: {e}"));
    let back = xml_to_json(xml.as_bytes())
        .unwrap_or_else(|e| panic!("the XML written for a valid {rt} does not read back: {e}"));
    let back = parse_json(&back).expect("the XML written for a valid resource reads back as JSON");
    assert_eq!(back["resourceType"], rt.as_str());
}
