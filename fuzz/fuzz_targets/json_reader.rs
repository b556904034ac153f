//! The JSON reader and the structural validation every JSON (and converted XML) body goes through:
//! `parse_json`, `resource_type`, `validate`, then `stamp` as a create does before storing.
//!
//! Asserts: no panic and no stack overflow on the server's 2 MiB stack; every rejection is a 4xx
//! with an OperationOutcome; an accepted body was UTF-8 and reads back equal once re-serialised;
//! only a served type validates, and it stays valid once the server stamps id and meta on it.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use sentinella::fhir::resource::{parse_json, resource_type, stamp, validate};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    common::on_server_stack(|| check(data));
});

fn check(data: &[u8]) {
    let value = match parse_json(data) {
        Ok(v) => v,
        Err(e) => return common::assert_rejected(&e, "parse_json"),
    };
    assert!(
        std::str::from_utf8(data).is_ok(),
        "parse_json accepted a body that is not UTF-8"
    );
    let text = serde_json::to_vec(&value).expect("a parsed value serialises");
    let again = parse_json(&text).expect("re-serialised JSON reads back");
    assert_eq!(again, value, "re-serialised JSON reads back different");

    let rt = match resource_type(&value) {
        Ok(rt) => rt.to_string(),
        Err(e) => return common::assert_rejected(&e, "resource_type"),
    };
    if let Err(e) = validate(&value) {
        return common::assert_rejected(&e, "validate");
    }
    assert!(
        sentinella::fhir::is_served(&rt),
        "validate accepted a {rt}, which is not served"
    );
    // what a create stores: the same resource with the server's id and meta
    let mut stored = value.clone();
    stamp(&mut stored, "fuzz-1", 1, "2026-01-01T00:00:00Z");
    assert_eq!(stored["resourceType"], Value::from(rt.as_str()));
    assert_eq!(stored["id"], "fuzz-1");
    assert_eq!(stored["meta"]["versionId"], "1");
    if let Err(e) = validate(&stored) {
        panic!(
            "a valid {rt} is invalid once stamped: {e:?} {:?}",
            e.issues()
        );
    }
}
