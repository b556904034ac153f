//! FHIR R4 XML <-> JSON through fhirbolt's `Resource` enum (its concrete resource types fail on JSON
//! decimals: shared/DEPENDENCIES.md). Decimals keep their text (`6.30`).
use fhirbolt::model::r4::Resource;

/// Convert an R4 XML resource into JSON text.
pub fn xml_to_json(xml: &[u8]) -> Result<Vec<u8>, String> {
    let resource: Resource = fhirbolt::xml::from_slice(xml, None).map_err(|e| e.to_string())?;
    fhirbolt::json::to_vec(&resource, None).map_err(|e| e.to_string())
}

/// Convert R4 JSON text into XML.
pub fn json_to_xml(json: &[u8]) -> Result<String, String> {
    let resource: Resource = fhirbolt::json::from_slice(json, None).map_err(|e| e.to_string())?;
    fhirbolt::xml::to_string(&resource, None).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip_keeps_decimals() {
        let json = br#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":6.30}}"#;
        let xml = super::json_to_xml(json).unwrap();
        assert!(xml.contains(r#"<value value="6.30"/>"#), "{xml}");
        let back = String::from_utf8(super::xml_to_json(xml.as_bytes()).unwrap()).unwrap();
        assert!(back.contains("6.30"), "{back}");
    }
}
