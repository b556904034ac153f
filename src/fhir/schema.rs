//! The official R4 JSON schema (fhir/r4/fhir.schema.json), one compiled validator per resource type so
//! that errors carry exact paths (against the whole schema every error collapses into one `oneOf`).
use std::collections::HashMap;
use std::sync::OnceLock;

use jsonschema::Validator;
use jsonschema::paths::LocationSegment;
use serde_json::{Value, json};

use crate::error::Issue;

const SCHEMA: &str = include_str!("../../fhir/r4/fhir.schema.json");

/// Types that can be validated: those served plus the envelopes the API accepts.
const VALIDATED: &[&str] = &["Bundle", "Parameters"];

pub struct SchemaValidators {
    validators: HashMap<&'static str, OnceLock<Validator>>,
    definitions: Value,
}

impl SchemaValidators {
    pub fn get() -> &'static SchemaValidators {
        static V: OnceLock<SchemaValidators> = OnceLock::new();
        V.get_or_init(|| {
            let schema: Value =
                serde_json::from_str(SCHEMA).expect("packaged R4 schema is valid JSON");
            let types = super::SERVED_TYPES.iter().chain(VALIDATED.iter()).copied();
            SchemaValidators {
                validators: types.map(|t| (t, OnceLock::new())).collect(),
                definitions: schema["definitions"].clone(),
            }
        })
    }

    /// Compile every validator now (at server start) instead of on first use.
    pub fn warm_up(&self) {
        for t in self.validators.keys() {
            self.validator(t);
        }
    }

    fn validator(&self, resource_type: &str) -> Option<&Validator> {
        let cell = self.validators.get(resource_type)?;
        Some(cell.get_or_init(|| {
            let root = json!({
                "$schema": "http://json-schema.org/draft-06/schema#",
                "$ref": format!("#/definitions/{resource_type}"),
                "definitions": self.definitions,
            });
            jsonschema::options()
                .with_draft(jsonschema::Draft::Draft6)
                .build(&root)
                .expect("packaged R4 schema compiles")
        }))
    }

    /// Schema errors of a resource, each with the FHIRPath of the offending element.
    pub fn validate(&self, resource: &Value) -> Vec<Issue> {
        let Some(rt) = resource.get("resourceType").and_then(Value::as_str) else {
            return vec![Issue::error("required", "resourceType is missing", None)];
        };
        let Some(validator) = self.validator(rt) else {
            return vec![Issue::error(
                "not-supported",
                format!("resource type {rt} is not supported"),
                None,
            )];
        };
        validator
            .iter_errors(resource)
            .map(|e| {
                let mut path = rt.to_string();
                for seg in e.instance_path().iter() {
                    match seg {
                        LocationSegment::Property(p) => {
                            path.push('.');
                            path.push_str(&p);
                        }
                        LocationSegment::Index(i) => path.push_str(&format!("[{i}]")),
                    }
                }
                Issue::error("structure", e.to_string(), Some(path))
            })
            .collect()
    }
}
