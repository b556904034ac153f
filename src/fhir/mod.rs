//! FHIR R4 parsing and validation: the packaged definitions, the JSON schema, the
//! StructureDefinition-driven checks, search-parameter extraction and FHIR date handling.
pub mod datetime;
pub mod definitions;
pub mod fhirpath;
pub mod invariants;
pub mod json_keys;
pub mod profile;
pub mod resource;
pub mod schema;
pub mod search_params;
pub mod structure;
pub mod valuesets;

pub use definitions::Definitions;

/// The resource types Sentinella stores and serves.
pub const SERVED_TYPES: &[&str] = &[
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Location",
    "Encounter",
    "Specimen",
    "Observation",
    "DiagnosticReport",
    "Condition",
    "Communication",
    "Provenance",
    "MeasureReport",
    "Subscription",
    // the audit trail: written by the server, read by auditors
    "AuditEvent",
];

pub fn is_served(resource_type: &str) -> bool {
    SERVED_TYPES.contains(&resource_type)
}
