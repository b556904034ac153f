//! JSON objects with a repeated key. RFC 8259 leaves their meaning open and serde_json keeps the last
//! value, so `{"resourceType":"Patient", …, "resourceType":"Observation"}` would be read as whatever a
//! parser happens to pick. FHIR requires unique names; such a body is refused, naming the element.
//!
//! Hand-written because serde_json has no option for it: this is a validating pass with serde's
//! visitor API over the same bytes, building nothing but the set of keys of the object being read.
use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// The FHIRPath-like location of the first repeated key, if any (`Patient.name[0].family`).
pub fn first_duplicate(body: &[u8]) -> Option<String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match (Seed {
        path: String::new(),
    })
    .deserialize(&mut de)
    {
        Err(e) => {
            let msg = e.to_string();
            msg.strip_prefix(MARK)
                .map(|rest| rest.split(" at line ").next().unwrap_or(rest).to_string())
        }
        Ok(()) => None,
    }
}

const MARK: &str = "duplicate key: ";

struct Seed {
    path: String,
}

impl<'de> DeserializeSeed<'de> for Seed {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while seq
            .next_element_seed(Seed {
                path: format!("{}[{i}]", self.path),
            })?
            .is_some()
        {
            i += 1;
        }
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen: HashSet<String> = HashSet::new();
        // (with arbitrary_precision a number arrives as a one-key map: nothing repeats in it)
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            if !seen.insert(key) {
                return Err(serde::de::Error::custom(format!("{MARK}{path}")));
            }
            map.next_value_seed(Seed { path })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_is_found_with_its_place() {
        assert_eq!(
            first_duplicate(br#"{"resourceType":"Patient","resourceType":"Observation"}"#),
            Some("resourceType".into())
        );
        assert_eq!(
            first_duplicate(br#"{"name":[{"family":"A"},{"family":"B","family":"C"}]}"#),
            Some("name[1].family".into())
        );
        assert_eq!(
            first_duplicate(br#"{"a":{"b":1.50,"c":[1,2e3]},"d":"b"}"#),
            None
        );
    }
}
