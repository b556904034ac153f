//! FHIR R4 XML <-> JSON through fhirbolt's `Resource` enum (its concrete resource types fail on JSON
//! decimals: shared/DEPENDENCIES.md). Decimals keep their text (`6.30`).
use fhirbolt::model::r4::Resource;

/// Convert an R4 XML resource into JSON text.
pub fn xml_to_json(xml: &[u8]) -> Result<Vec<u8>, String> {
    // fhirbolt unwraps the UTF-8 of names and namespaces (a fuzzer found `xmlns="\xff"`): FHIR XML is
    // UTF-8, so anything else is refused before it gets there
    if let Err(e) = std::str::from_utf8(xml) {
        return Err(format!(
            "the XML is not UTF-8 (at byte {})",
            e.valid_up_to()
        ));
    }
    check_depth(xml, MAX_DEPTH)?;
    // and any other panic of the reader is a refused document, not a failed server
    let read = std::panic::catch_unwind(|| fhirbolt::xml::from_slice::<Resource>(xml, None));
    let resource: Resource = match read {
        Ok(r) => r.map_err(|e| e.to_string())?,
        Err(_) => return Err("the XML could not be read as a FHIR resource".into()),
    };
    fhirbolt::json::to_vec(&resource, None).map_err(|e| e.to_string())
}

/// The deepest element nesting accepted, the same as JSON's (serde_json's recursion limit): fhirbolt
/// recurses once per level, and a deep enough document would overflow a worker thread's stack.
pub const MAX_DEPTH: usize = 128;

/// Refuse a document nested deeper than `max` elements, by a streaming pass that does not recurse.
/// A DOCTYPE is refused first: FHIR XML has no DTD, entity declarations are nothing a server should
/// read, and quick-xml asserts that a DOCTYPE has a name (a debug-build panic on `<!DOCTYPE >`, found
/// by fuzzing).
pub fn check_depth(xml: &[u8], max: usize) -> Result<(), String> {
    use quick_xml::events::Event;
    if xml.windows(9).any(|w| w.eq_ignore_ascii_case(b"<!doctype")) {
        return Err("the XML has a DOCTYPE: FHIR XML has none".into());
    }
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut buf = Vec::new();
    let mut depth = 0usize;
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(_)) => {
                depth += 1;
                if depth > max {
                    return Err(format!(
                        "the XML is nested deeper than {max} elements (at byte {})",
                        reader.buffer_position()
                    ));
                }
            }
            Ok(Event::End(_)) => depth = depth.saturating_sub(1),
            Ok(Event::Eof) => return Ok(()),
            Ok(_) => {}
            // malformed XML: fhirbolt reports it with its own words
            Err(_) => return Ok(()),
        }
        buf.clear();
    }
}

/// Convert R4 JSON text into XML.
pub fn json_to_xml(json: &[u8]) -> Result<String, String> {
    // fhirbolt's JSON reader unwraps where it meets an empty array (`"entry": []`, which FHIR JSON
    // forbids): whatever JSON it cannot take is an error here, never a panic in a request
    let read = std::panic::catch_unwind(|| fhirbolt::json::from_slice::<Resource>(json, None));
    let resource: Resource = match read {
        Ok(r) => r.map_err(|e| e.to_string())?,
        Err(_) => return Err("the JSON could not be read as a FHIR resource".into()),
    };
    fhirbolt::xml::to_string(&resource, None).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_empty_array_is_an_error_not_a_panic() {
        let json = br#"{"resourceType":"Bundle","type":"searchset","entry":[]}"#;
        assert!(super::json_to_xml(json).is_err());
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let mut xml = String::from(r#"<Patient xmlns="http://hl7.org/fhir">"#);
        for _ in 0..2000 {
            xml.push_str("<extension>");
        }
        for _ in 0..2000 {
            xml.push_str("</extension>");
        }
        xml.push_str("</Patient>");
        let err = super::xml_to_json(xml.as_bytes()).unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
    }

    #[test]
    fn round_trip_keeps_decimals() {
        let json = br#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":6.30}}"#;
        let xml = super::json_to_xml(json).unwrap();
        assert!(xml.contains(r#"<value value="6.30"/>"#), "{xml}");
        let back = String::from_utf8(super::xml_to_json(xml.as_bytes()).unwrap()).unwrap();
        assert!(back.contains("6.30"), "{back}");
    }
}

#[cfg(test)]
mod utf8_tests {
    #[test]
    fn a_doctype_is_refused() {
        let err =
            super::xml_to_json(b"<!DOCTYPE ><Patient xmlns=\"http://hl7.org/fhir\"/>").unwrap_err();
        assert!(err.contains("DOCTYPE"), "{err}");
    }

    #[test]
    fn a_namespace_that_is_not_utf8_is_refused_not_a_panic() {
        let err = super::xml_to_json(b"<Patient xmlns=\"\xff\"/>").unwrap_err();
        assert!(err.contains("UTF-8"), "{err}");
    }
}
