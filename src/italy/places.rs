//! Where a patient lives, from the comune's ISTAT code (SPEC.md §2.1): its province (the code's
//! first three digits), its region (`ConceptMap-provincia-regione`) and its ASL
//! (`ConceptMap-comune-asl`: province-level defaults, comune-level exceptions).
use serde_json::Value;

use crate::terminology::{CANON, Terminology};

/// The ISTAT comuni system as HL7 Italia carries it.
pub const ISTAT_COMUNI: &str = "https://www.hl7.it/fhir/terminology/CodeSystem/istat-comuni";
/// The extension HL7 Italia puts on `Address.city` to carry the comune's code.
pub const CITY_CODING: &str = "http://hl7.org/fhir/StructureDefinition/iso21090-SC-coding";

#[derive(Debug, Clone, PartialEq)]
pub struct Place {
    pub comune: String,
    pub province: String,
    /// NSIS region code (`CodeSystem-regione`), when the province is known.
    pub region: Option<String>,
    /// NSIS ASL code, when the map covers the comune.
    pub asl: Option<String>,
}

fn province_system() -> String {
    format!("{CANON}/CodeSystem/provincia")
}

/// The place of an ISTAT comune code (6 digits).
pub fn place_of_comune(comune: &str) -> Option<Place> {
    if comune.len() != 6 || !comune.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let t = Terminology::get();
    let province = comune[..3].to_string();
    let by_province = (province_system(), province.clone());
    let region = t
        .translate("provincia-regione", &by_province)
        .first()
        .map(|c| c.1.clone());
    let asl = t
        .translate(
            "comune-asl",
            &(ISTAT_COMUNI.to_string(), comune.to_string()),
        )
        .first()
        .or_else(|| t.translate("comune-asl", &by_province).first())
        .map(|c| c.1.clone());
    Some(Place {
        comune: comune.to_string(),
        province,
        region,
        asl,
    })
}

/// The ISTAT code of a Patient's comune of residence: the home address (else the first) whose
/// `city` carries the HL7 Italia coding.
pub fn residence_comune(patient: &Value) -> Option<String> {
    let addresses = patient["address"].as_array()?;
    let mut ordered: Vec<&Value> = addresses.iter().filter(|a| a["use"] == "home").collect();
    ordered.extend(addresses.iter().filter(|a| a["use"] != "home"));
    ordered.into_iter().find_map(|a| {
        // on the `city` primitive (`_city`), as HL7 Italia does; tolerated on the Address too
        a["_city"]["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(a["extension"].as_array().into_iter().flatten())
            .filter(|e| e["url"] == CITY_CODING)
            .find_map(|e| {
                let c = &e["valueCoding"];
                (c["system"] == ISTAT_COMUNI)
                    .then(|| c["code"].as_str().map(String::from))
                    .flatten()
            })
    })
}
