//! A rejected request changes nothing: a few hundred bad requests, generated from valid ones (a
//! Patient, an Observation, the laboratory's transaction Bundle) by a seeded RNG, each answered 4xx
//! must leave the database as it was: the same `_history` total and the same (type, id, version)
//! set. On SQLite and PostgreSQL.
//!
//! The seed is printed and appears in every failure; `SENTINELLA_TEST_SEED=<n>` replays a run and
//! `SENTINELLA_REJECTED_REQUESTS=<n>` changes how many requests are generated (default 400).
mod common;

use std::collections::BTreeSet;

use axum::http::{Method, StatusCode};
use common::{Resp, TestApp, fixture};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Versions in the database: the system history total and every (type, id, version) in it.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    total: i64,
    versions: BTreeSet<(String, String, String)>,
}

async fn snapshot(app: &TestApp) -> Snapshot {
    let r = app.get("/fhir/_history?_count=1000").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let total = r.body["total"].as_i64().expect("a history total");
    assert!(
        total <= 1000,
        "{total} versions: more than one history page, the comparison would be partial"
    );
    let versions = r.body["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let url = e["fullUrl"].as_str().expect("fullUrl");
            let mut parts = url.rsplit('/');
            let id = parts.next().expect("id").to_string();
            let rt = parts.next().expect("type").to_string();
            let version = e["response"]["etag"].as_str().expect("etag").to_string();
            (rt, id, version)
        })
        .collect();
    Snapshot { total, versions }
}

/// One generated request, and what was done to make it bad.
struct BadRequest {
    what: String,
    method: Method,
    uri: String,
    content_type: Option<&'static str>,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl BadRequest {
    fn json(what: impl Into<String>, method: Method, uri: &str, body: Vec<u8>) -> Self {
        BadRequest {
            what: what.into(),
            method,
            uri: uri.to_string(),
            content_type: Some("application/fhir+json"),
            headers: Vec::new(),
            body,
        }
    }
}

/// The valid requests the bad ones are made from, with the ids the seed data got.
struct Bases {
    patient: Value,
    patient_id: String,
    observation: Value,
    transaction: Value,
}

/// JSON pointers of every node under `v` (not `v` itself).
fn pointers(v: &Value, at: &str, out: &mut Vec<String>) {
    let children: Vec<(String, &Value)> = match v {
        Value::Object(o) => o
            .iter()
            .map(|(k, c)| (k.replace('~', "~0").replace('/', "~1"), c))
            .collect(),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, c)| (i.to_string(), c))
            .collect(),
        _ => return,
    };
    for (k, c) in children {
        let p = format!("{at}/{k}");
        out.push(p.clone());
        pointers(c, &p, out);
    }
}

fn pick_pointer(v: &Value, rng: &mut StdRng, keep: impl Fn(&Value) -> bool) -> Option<String> {
    let mut all = Vec::new();
    pointers(v, "", &mut all);
    let candidates: Vec<String> = all
        .into_iter()
        .filter(|p| v.pointer(p).is_some_and(&keep))
        .collect();
    candidates.choose(rng).cloned()
}

/// A value of another JSON type than `v`.
fn wrong_type(v: &Value, rng: &mut StdRng) -> Value {
    let options = match v {
        Value::String(_) => vec![json!(42), json!(true), json!({"value": "x"}), json!(["x"])],
        Value::Number(_) => vec![json!("12"), json!(false), json!([1])],
        Value::Bool(_) => vec![json!("true"), json!(1), json!({})],
        Value::Array(_) => vec![json!("not a list"), json!(7), json!({"a": []})],
        Value::Object(_) => vec![json!("not an object"), json!([1, 2]), json!(3.5)],
        Value::Null => vec![json!("x")],
    };
    options.choose(rng).cloned().expect("options")
}

/// Replace the node at `pointer`, or add it to its parent object.
fn set(v: &mut Value, pointer: &str, new: Value) {
    if let Some(node) = v.pointer_mut(pointer) {
        *node = new;
        return;
    }
    let (parent, key) = pointer.rsplit_once('/').expect("a pointer");
    v.pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("{parent} is an object"))
        .insert(key.to_string(), new);
}

fn remove(v: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').expect("a pointer");
    match v.pointer_mut(parent).expect("the parent exists") {
        Value::Object(o) => {
            o.shift_remove(key);
        }
        Value::Array(a) => {
            a.remove(key.parse().expect("an index"));
        }
        _ => panic!("{parent} is no container"),
    }
}

/// The resource's text with one member of a random object written twice (the second one wins
/// in a lax reader: FHIR says names are unique).
fn with_duplicate_key(v: &Value, rng: &mut StdRng) -> (String, Vec<u8>) {
    let mut v = v.clone();
    let objects: Vec<String> = {
        let mut all = vec![String::new()];
        pointers(&v, "", &mut all);
        all.into_iter()
            .filter(|p| {
                v.pointer(p)
                    .and_then(Value::as_object)
                    .is_some_and(|o| !o.is_empty())
            })
            .collect()
    };
    let at = objects.choose(rng).expect("an object").clone();
    let obj = v
        .pointer_mut(&at)
        .and_then(Value::as_object_mut)
        .expect("an object");
    let keys: Vec<String> = obj.keys().cloned().collect();
    let key = keys.choose(rng).expect("a key").clone();
    let dup = obj[&key].clone();
    obj.insert("__duplicate__".into(), Value::Null);
    let text = serde_json::to_string(&v).expect("JSON").replacen(
        "\"__duplicate__\":null",
        &format!("{}:{}", json!(key), dup),
        1,
    );
    (
        format!("duplicate key '{key}' at '{at}'"),
        text.into_bytes(),
    )
}

/// Malformed JSON made from the valid text.
fn bad_json(v: &Value, rng: &mut StdRng) -> (String, Vec<u8>) {
    let text = serde_json::to_vec(v).expect("JSON");
    match rng.random_range(0..9) {
        0 => {
            let cut = rng.random_range(0..text.len());
            (format!("truncated at byte {cut}"), text[..cut].to_vec())
        }
        1 => {
            let mut t = text.clone();
            let at = rng.random_range(0..t.len());
            t.splice(at..at, [0xff, 0xfe]);
            (format!("invalid UTF-8 at byte {at}"), t)
        }
        2 => {
            let mut t = text.clone();
            t.insert(t.len() - 1, b',');
            ("a trailing comma".into(), t)
        }
        3 => {
            let mut t = b"\xef\xbb\xbf".to_vec();
            t.extend_from_slice(&text);
            ("a byte-order mark".into(), t)
        }
        4 => {
            let mut t = text.clone();
            t.extend_from_slice(b"}");
            ("trailing garbage".into(), t)
        }
        5 => {
            let depth = 5000;
            let t = format!(
                "{{\"resourceType\":\"Patient\",\"extension\":{}{}}}",
                "[".repeat(depth),
                "]".repeat(depth)
            );
            ("nesting 5000 deep".into(), t.into_bytes())
        }
        6 => {
            let bodies: [&[u8]; 6] = [b"", b"   ", b"null", b"[]", b"\"Patient\"", b"{}"];
            let b = bodies.choose(rng).expect("a body");
            (
                format!("not a resource: {:?}", String::from_utf8_lossy(b)),
                b.to_vec(),
            )
        }
        7 => {
            let t = String::from_utf8(text)
                .expect("UTF-8")
                .replacen(":", ":NaN,\"x\":", 1);
            ("a NaN literal".into(), t.into_bytes())
        }
        _ => {
            // a raw NUL, not the \u0000 escape: not a JSON character at all
            let mut t = text.clone();
            let at = t.iter().position(|b| *b == b':').unwrap_or(0) + 2;
            t.insert(at.min(t.len()), 0);
            ("a raw NUL byte".into(), t)
        }
    }
}

/// Mutations every resource-shaped body can take: (description, body).
fn mutate_resource(
    v: &Value,
    required: &[&str],
    coded: &[&str],
    dated: &[&str],
    rng: &mut StdRng,
) -> (String, Vec<u8>) {
    let mut v = v.clone();
    let what = match rng.random_range(0..10) {
        0 => {
            let p = required.choose(rng).expect("a required element");
            remove(&mut v, p);
            format!("required {p} removed")
        }
        1 => {
            let p = pick_pointer(&v, rng, |_| true).expect("a node");
            let old = v.pointer(&p).expect("node").clone();
            let new = wrong_type(&old, rng);
            set(&mut v, &p, new.clone());
            format!("wrong type at {p}: {new}")
        }
        2 => {
            let mut objects = vec![String::new()];
            pointers(&v, "", &mut objects);
            objects.retain(|p| v.pointer(p).is_some_and(Value::is_object));
            let p = objects.choose(rng).expect("an object").clone();
            let name = ["colour", "nickname", "resourcetype", "_status", "Status"]
                .choose(rng)
                .expect("a name");
            v.pointer_mut(&p)
                .and_then(Value::as_object_mut)
                .expect("an object")
                .insert(name.to_string(), json!("red"));
            format!("unknown element '{name}' at '{p}'")
        }
        3 => {
            let p = coded.choose(rng).expect("a coded element");
            let code = ["banana", "", " final", "FINAL", "final\n"]
                .choose(rng)
                .expect("a code");
            set(&mut v, p, json!(code));
            format!("invalid code {code:?} at {p}")
        }
        4 => {
            let p = dated.choose(rng).expect("a dated element");
            let date = [
                "2024-02-30",
                "10/12/1985",
                "1985-13-01",
                "2023-02-29",
                "yesterday",
                "2026-03-02T25:00:00Z",
                "2026-03-02T08:15:00",
                "2026-03-02T08:15:00+25:00",
                "20260302",
                "",
            ]
            .choose(rng)
            .expect("a date");
            set(&mut v, p, json!(date));
            format!("invalid date {date:?} at {p}")
        }
        5 => {
            let p = pick_pointer(&v, rng, Value::is_string).expect("a string");
            let ch = ["\u{0}", "\u{1}", "\u{1b}"]
                .choose(rng)
                .expect("a control character");
            let s = format!(
                "{}{ch}",
                v.pointer(&p).and_then(Value::as_str).expect("a string")
            );
            set(&mut v, &p, json!(s));
            format!("control character {ch:?} in {p}")
        }
        6 => {
            // past the body limit (10 MiB): 413 before anything is parsed
            let p = pick_pointer(&v, rng, Value::is_string).expect("a string");
            set(&mut v, &p, json!("x".repeat(10 * 1024 * 1024 + 1)));
            format!("an 11 MB string at {p}")
        }
        7 => return with_duplicate_key(&v, rng),
        8 => return bad_json(&v, rng),
        _ => {
            let current = v["resourceType"].clone();
            let rt = [
                "Banana",
                "patient",
                "",
                "Bundle",
                "Patient",
                "OperationOutcome",
            ]
            .iter()
            .filter(|t| current != **t)
            .copied()
            .collect::<Vec<_>>()
            .choose(rng)
            .copied()
            .expect("a type");
            set(&mut v, "/resourceType", json!(rt));
            format!("resourceType {rt:?}")
        }
    };
    (what, serde_json::to_vec(&v).expect("JSON"))
}

const WRONG_CONTENT_TYPES: &[Option<&str>] = &[
    None,
    Some("text/plain"),
    Some("application/x-www-form-urlencoded"),
    Some("text/turtle"),
    Some("multipart/form-data; boundary=x"),
    Some("application/fhir+xml"),
    Some("application/octet-stream"),
];

fn patient_request(b: &Bases, rng: &mut StdRng) -> BadRequest {
    let coded = ["/gender", "/address/0/use", "/name/0/use"];
    let kind = rng.random_range(0..4);
    let mut base = b.patient.clone();
    if kind == 1 {
        // an update of the seeded Patient: a new version would be a change
        base["id"] = json!(b.patient_id);
    }
    let (what, body) = mutate_resource(&base, &["/resourceType"], &coded, &["/birthDate"], rng);
    match kind {
        0 => BadRequest::json(
            format!("create Patient: {what}"),
            Method::POST,
            "/fhir/Patient",
            body,
        ),
        1 => BadRequest::json(
            format!("update Patient: {what}"),
            Method::PUT,
            &format!("/fhir/Patient/{}", b.patient_id),
            body,
        ),
        2 => BadRequest::json(
            format!("conditional update Patient: {what}"),
            Method::PUT,
            "/fhir/Patient?identifier=urn:sentinella-test:rejected|new-1",
            body,
        ),
        _ => {
            let mut r = BadRequest::json(
                format!("conditional create Patient: {what}"),
                Method::POST,
                "/fhir/Patient",
                body,
            );
            r.headers.push((
                "if-none-exist",
                "identifier=urn:sentinella-test:rejected|new-2".into(),
            ));
            r
        }
    }
}

fn observation_request(b: &Bases, rng: &mut StdRng) -> BadRequest {
    let (what, body) = mutate_resource(
        &b.observation,
        &["/status", "/code", "/resourceType"],
        &["/status"],
        &["/effectiveDateTime"],
        rng,
    );
    BadRequest::json(
        format!("create Observation: {what}"),
        Method::POST,
        "/fhir/Observation",
        body,
    )
}

/// A transaction that is valid up to one bad entry, or whose envelope is bad.
fn transaction_request(b: &Bases, rng: &mut StdRng) -> BadRequest {
    let tx = &b.transaction;
    let n = tx["entry"].as_array().expect("entries").len();
    let i = rng.random_range(0..n);
    let mut v = tx.clone();
    let what = match rng.random_range(0..6) {
        0 | 1 => {
            let (what, body) = mutate_resource(
                tx,
                &[
                    "/type",
                    &format!("/entry/{i}/request/method"),
                    &format!("/entry/{i}/request/url"),
                    &format!("/entry/{i}/request"),
                    &format!("/entry/{i}/resource/resourceType"),
                    "/entry/3/resource/status",
                    "/entry/3/resource/code",
                    "/entry/7/resource/status",
                ],
                &[
                    "/type",
                    &format!("/entry/{i}/request/method"),
                    "/entry/2/resource/status",
                    "/entry/3/resource/status",
                    "/entry/7/resource/status",
                ],
                &[
                    "/entry/2/resource/collection/collectedDateTime",
                    "/entry/3/resource/effectiveDateTime",
                    "/entry/7/resource/issued",
                    "/entry/0/resource/birthDate",
                ],
                rng,
            );
            return BadRequest::json(format!("transaction: {what}"), Method::POST, "/fhir", body);
        }
        2 => {
            // a reference to no entry of the Bundle
            let refs =
                pick_pointer(&v, rng, |n| n.get("reference").is_some()).expect("a reference");
            let target = [
                "urn:uuid:00000000-0000-4000-8000-000000000000",
                "urn:oid:1.2.3",
                "urn:uuid:",
            ]
            .choose(rng)
            .expect("a target");
            set(&mut v, &format!("{refs}/reference"), json!(target));
            format!("dangling reference {target} at {refs}")
        }
        3 => {
            let url = [
                "Banana",
                "Patient/bad id",
                "Patient/1/2",
                "/",
                "Patient/",
                "Patient?identifier=x|y",
            ]
            .choose(rng)
            .expect("a url");
            set(&mut v, &format!("/entry/{i}/request/url"), json!(url));
            format!("entry {i} request.url {url:?}")
        }
        4 => {
            let full = v["entry"][0]["fullUrl"].clone();
            set(&mut v, &format!("/entry/{i}/fullUrl"), full);
            if i == 0 {
                set(
                    &mut v,
                    "/entry/0/fullUrl",
                    json!("urn:uuid:11111111-1111-4111-8111-111111111111"),
                );
            }
            format!("entry {i} fullUrl changed: references dangle or a fullUrl is repeated")
        }
        _ => {
            // an entry that fails after the others were written in the same database transaction
            let late = match rng.random_range(0..5) {
                0 => {
                    json!({"resource": {"resourceType": "Patient", "id": b.patient_id, "gender": "male"},
                    "request": {"method": "PUT", "url": format!("Patient/{}", b.patient_id), "ifMatch": "W/\"999\""}})
                }
                1 => json!({"request": {"method": "GET", "url": "Patient/not-there"}}),
                2 => {
                    json!({"request": {"method": "DELETE", "url": format!("Patient/{}", b.patient_id), "ifMatch": "W/\"999\""}})
                }
                3 => json!({"resource": {"resourceType": "Patient", "gender": "male"},
                    "request": {"method": "POST", "url": "Patient", "ifNoneExist": "family=Doppio"}}),
                _ => json!({"resource": {"resourceType": "Patient", "gender": "male"},
                    "request": {"method": "PUT", "url": "Patient?family=Doppio"}}),
            };
            let what = format!("a failing last entry {}", late["request"]);
            v["entry"].as_array_mut().expect("entries").push(late);
            what
        }
    };
    BadRequest::json(
        format!("transaction: {what}"),
        Method::POST,
        "/fhir",
        serde_json::to_vec(&v).expect("JSON"),
    )
}

fn generate(b: &Bases, rng: &mut StdRng) -> BadRequest {
    let mut r = match rng.random_range(0..10) {
        0..=2 => patient_request(b, rng),
        3..=4 => observation_request(b, rng),
        _ => transaction_request(b, rng),
    };
    // a valid or invalid body under a content type the server does not read as FHIR JSON
    if rng.random_ratio(1, 12) {
        let ct = *WRONG_CONTENT_TYPES.choose(rng).expect("a content type");
        r.what = format!("{} sent as {ct:?}", r.what);
        r.content_type = ct;
    }
    r
}

async fn send(app: &TestApp, r: &BadRequest) -> Resp {
    let mut headers: Vec<(&str, &str)> = r.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if let Some(ct) = r.content_type {
        headers.push(("content-type", ct));
    }
    app.request(r.method.clone(), &r.uri, &headers, Some(r.body.clone()))
        .await
}

async fn seed_data(app: &TestApp) -> Bases {
    let patient = fixture("patient-rossi.json");
    let first = app.post("/fhir/Patient", &patient).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    let patient_id = first.body["id"].as_str().expect("id").to_string();
    // two Patients no request may change: `family=Doppio` matches more than one
    for given in ["Primo", "Secondo"] {
        let twin =
            json!({"resourceType": "Patient", "name": [{"family": "Doppio", "given": [given]}]});
        let r = app.post("/fhir/Patient", &twin).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    let transaction = fixture("antibiogram-transaction.json");
    let tx = app.post("/fhir", &transaction).await;
    assert_eq!(tx.status, StatusCode::OK, "{}", tx.text);
    let mut observation = transaction["entry"][3]["resource"].clone();
    observation["subject"] = json!({"reference": format!("Patient/{patient_id}")});
    observation
        .as_object_mut()
        .expect("an object")
        .shift_remove("specimen");
    let obs = app.post("/fhir/Observation", &observation).await;
    assert_eq!(obs.status, StatusCode::CREATED, "{}", obs.text);
    Bases {
        patient: fixture("patient-rossi.json"),
        patient_id,
        observation,
        transaction,
    }
}

fn difference(before: &Snapshot, after: &Snapshot) -> String {
    let added: Vec<_> = after.versions.difference(&before.versions).collect();
    let gone: Vec<_> = before.versions.difference(&after.versions).collect();
    format!(
        "total {} -> {}, added {added:?}, gone {gone:?}",
        before.total, after.total
    )
}

on_both_databases! {
    async fn a_rejected_request_leaves_the_database_unchanged(app) {
        let seed: u64 = std::env::var("SENTINELLA_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        let count: usize = std::env::var("SENTINELLA_REJECTED_REQUESTS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(400);
        eprintln!("rejected requests: seed {seed} (replay with SENTINELLA_TEST_SEED={seed})");
        let mut rng = StdRng::seed_from_u64(seed);
        let bases = seed_data(&app).await;
        let mut before = snapshot(&app).await;
        let (mut rejected, mut accepted) = (0usize, Vec::new());
        for n in 0..count {
            let r = generate(&bases, &mut rng);
            let resp = send(&app, &r).await;
            let context = format!("seed {seed}, request {n}: {} {} ({})", r.method, r.uri, r.what);
            assert!(!resp.status.is_server_error(), "{context}: answered {}: {}", resp.status, resp.text);
            if resp.status.is_client_error() {
                rejected += 1;
                assert_eq!(resp.body["resourceType"], "OperationOutcome", "{context}: answered {}: {}", resp.status, resp.text);
                let after = snapshot(&app).await;
                assert!(after == before, "{context}: answered {} but changed the database: {}; {}",
                    resp.status, difference(&before, &after), resp.text);
            } else {
                // a mutation that happened to be valid (an optional element removed, say): its
                // writes are the new baseline
                accepted.push(format!("{} {}", resp.status.as_u16(), r.what));
                before = snapshot(&app).await;
            }
        }
        eprintln!("rejected requests: {rejected} of {count} rejected; accepted: {accepted:#?}");
        assert!(rejected * 10 >= count * 8, "seed {seed}: only {rejected} of {count} generated requests were rejected: {accepted:#?}");
    }
}
