//! REST conventions (issue 13, item 4): `_summary` and `_elements` on read, vread, search and
//! history; PATCH with JSON Patch on the update's write path; the `_format` aliases; a `self` link
//! that reproduces the search. On SQLite and PostgreSQL.
mod common;

use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use common::{Resp, TestApp, fixture};
use sentinella::config::Config;
use serde_json::{Value, json};

const SUBSETTED: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// The Rossi patient with what `_summary` leaves out: a narrative, a marital status, a language.
fn rossi() -> Value {
    let mut p = fixture("patient-rossi.json");
    p["text"] = json!({"status": "generated",
        "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Mario Rossi, 10/12/1985</div>"});
    p["maritalStatus"] = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M"}]});
    p["communication"] = json!([{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "it"}]}, "preferred": true}]);
    p
}

async fn create(app: &TestApp, resource: &Value) -> String {
    let rt = resource["resourceType"].as_str().unwrap();
    let r = app.post(&format!("/fhir/{rt}"), resource).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.body["id"].as_str().unwrap().to_string()
}

async fn load_antibiogram(app: &TestApp) -> Value {
    let r = app
        .post("/fhir", &fixture("antibiogram-transaction.json"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body
}

/// The id a transaction answer gives entry `i`.
fn id_of_entry(answer: &Value, i: usize) -> String {
    answer["entry"][i]["response"]["location"]
        .as_str()
        .unwrap()
        .split('/')
        .nth_back(2)
        .unwrap()
        .to_string()
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort();
    k
}

fn is_subsetted(r: &Value) -> bool {
    r["meta"]["tag"].as_array().is_some_and(|t| {
        t.iter()
            .any(|t| t["system"] == SUBSETTED && t["code"] == "SUBSETTED")
    })
}

/// A subset must still be an R4 resource (and one our validator takes).
fn assert_valid_r4(r: &Value) {
    if let Err(e) = sentinella::fhir::resource::validate(r) {
        panic!("not valid R4: {:?}\n{r}", e.issues());
    }
}

fn link<'a>(bundle: &'a Value, relation: &str) -> Option<&'a str> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == relation)?
        .get("url")?
        .as_str()
}

/// A link the server wrote, as a path for the test router (`http://host/fhir/…` → `/fhir/…`).
fn local(url: &str) -> String {
    let (_, rest) = url.split_once("/fhir").expect("a link under /fhir");
    format!("/fhir{rest}")
}

/// The decoded query of a link, in order.
fn query_of(url: &str) -> Vec<(String, String)> {
    let q = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

fn full_urls(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["fullUrl"].as_str().map(String::from))
        .collect()
}

async fn patch(app: &TestApp, uri: &str, ops: &Value, headers: &[(&str, &str)]) -> Resp {
    let mut h = vec![("content-type", "application/json-patch+json")];
    h.extend_from_slice(headers);
    app.request(
        Method::PATCH,
        uri,
        &h,
        Some(serde_json::to_vec(ops).unwrap()),
    )
    .await
}

async fn version_count(app: &TestApp, rt: &str, id: &str) -> i64 {
    let h = app.get(&format!("/fhir/{rt}/{id}/_history")).await;
    assert_eq!(h.status, StatusCode::OK, "{}", h.text);
    h.body["total"].as_i64().unwrap()
}

fn assert_outcome(r: &Resp, status: StatusCode) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.body["resourceType"], "OperationOutcome", "{}", r.text);
}

on_both_databases! {
    async fn summary_of_a_patient_read_keeps_the_summary_elements_and_says_so(app) {
        let id = create(&app, &rossi()).await;
        let whole = app.get(&format!("/fhir/Patient/{id}")).await;
        assert!(!is_subsetted(&whole.body), "a whole resource is not tagged");

        let r = app.get(&format!("/fhir/Patient/{id}?_summary=true")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(keys(&r.body), vec!["address", "birthDate", "gender", "id", "identifier", "meta", "name", "resourceType"]);
        assert!(is_subsetted(&r.body), "{}", r.text);
        // what is kept is kept whole (data types are summary throughout), with the version
        assert_eq!(r.body["address"], whole.body["address"]);
        assert_eq!(r.body["meta"]["versionId"], "1");
        assert_eq!(r.header("etag"), Some("W/\"1\""));
        assert_valid_r4(&r.body);

        let text = app.get(&format!("/fhir/Patient/{id}?_summary=text")).await;
        assert_eq!(keys(&text.body), vec!["id", "meta", "resourceType", "text"]);
        assert!(is_subsetted(&text.body));
        assert_valid_r4(&text.body);

        let data = app.get(&format!("/fhir/Patient/{id}?_summary=data")).await;
        let mut expected = keys(&whole.body);
        expected.retain(|k| *k != "text");
        assert_eq!(keys(&data.body), expected);
        assert!(is_subsetted(&data.body));

        let not = app.get(&format!("/fhir/Patient/{id}?_summary=false")).await;
        assert_eq!(not.body, whole.body);

        // vread too
        let v1 = app.get(&format!("/fhir/Patient/{id}/_history/1?_summary=true")).await;
        assert_eq!(v1.status, StatusCode::OK, "{}", v1.text);
        assert_eq!(v1.body, r.body);

        // what a read cannot do, and what no request may combine
        for (q, at) in [("_summary=count", "_summary"), ("_summary=short", "_summary"), ("_summary=true&_elements=name", "_elements")] {
            let bad = app.get(&format!("/fhir/Patient/{id}?{q}")).await;
            assert_outcome(&bad, StatusCode::BAD_REQUEST);
            assert_eq!(bad.expressions(), vec![at.to_string()], "{q}");
        }
        // the stored resource is untouched
        assert_eq!(app.get(&format!("/fhir/Patient/{id}")).await.body, whole.body);
    }

    async fn elements_name_what_comes_back_with_what_is_mandatory(app) {
        let id = create(&app, &rossi()).await;
        let r = app.get(&format!("/fhir/Patient/{id}?_elements=identifier,birthDate")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(keys(&r.body), vec!["birthDate", "id", "identifier", "meta", "resourceType"]);
        assert!(is_subsetted(&r.body));
        assert_valid_r4(&r.body);

        // an Observation keeps its mandatory status and code, and the patient it is about
        let answer = load_antibiogram(&app).await;
        let obs = id_of_entry(&answer, 4);
        let r = app.get(&format!("/fhir/Observation/{obs}?_elements=valueQuantity")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(keys(&r.body), vec!["code", "id", "meta", "resourceType", "status", "subject", "valueQuantity"]);
        assert_valid_r4(&r.body);

        // on a search: the matches are shaped, the link says how
        let s = app.get("/fhir/Patient?family=rossi&_elements=birthDate,identifier").await;
        assert_eq!(s.status, StatusCode::OK, "{}", s.text);
        let entry = &s.body["entry"][0]["resource"];
        assert_eq!(keys(entry), vec!["birthDate", "id", "identifier", "meta", "resourceType"]);
        assert!(query_of(link(&s.body, "self").unwrap()).contains(&("_elements".into(), "birthDate,identifier".into())));

        // a name the type does not have is a 400 at _elements, as is a path below the root
        for q in ["_elements=identifier,colour", "_elements=name.family", "_elements=Observation.code"] {
            let bad = app.get(&format!("/fhir/Patient/{id}?{q}")).await;
            assert_outcome(&bad, StatusCode::BAD_REQUEST);
            assert_eq!(bad.expressions(), vec!["_elements".to_string()], "{q}");
            let bad = app.get(&format!("/fhir/Patient?{q}")).await;
            assert_outcome(&bad, StatusCode::BAD_REQUEST);
        }
    }

    async fn summary_on_searches_and_histories(app) {
        let answer = load_antibiogram(&app).await;
        let patient = id_of_entry(&answer, 0);

        let count = app.get("/fhir/Observation?_summary=count").await;
        assert_eq!(count.status, StatusCode::OK, "{}", count.text);
        assert_eq!(count.body["total"], 4);
        assert!(count.body.get("entry").is_none(), "{}", count.text);
        let self_link = link(&count.body, "self").unwrap();
        assert_eq!(query_of(self_link), vec![("_summary".to_string(), "count".to_string())]);
        assert_eq!(app.get(&local(self_link)).await.body["total"], 4);

        // `_summary` applies to the matches and to what they include; `_elements` to the matches only
        let s = app.get(&format!("/fhir/Observation?subject={patient}&_include=Observation:subject&_summary=true")).await;
        assert_eq!(s.status, StatusCode::OK, "{}", s.text);
        let entries = s.body["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 5, "{}", s.text);
        for e in entries {
            let r = &e["resource"];
            assert!(is_subsetted(r), "{r}");
            // not summary elements of Observation: specimen, interpretation, category
            assert!(r.get("specimen").is_none() && r.get("interpretation").is_none() && r.get("category").is_none(), "{r}");
            assert!(r.get("text").is_none());
            assert_valid_r4(r);
        }
        let included = entries.iter().find(|e| e["search"]["mode"] == "include").unwrap();
        assert_eq!(included["resource"]["resourceType"], "Patient");
        let el = app.get(&format!("/fhir/Observation?subject={patient}&_include=Observation:subject&_elements=code")).await;
        let included = el.body["entry"].as_array().unwrap().iter().find(|e| e["search"]["mode"] == "include").unwrap();
        assert!(!is_subsetted(&included["resource"]), "_elements does not apply to included resources");
        assert!(included["resource"].get("address").is_some());

        // POST _search takes them in the body
        let r = app.request(Method::POST, "/fhir/Observation/_search", &[("content-type", "application/x-www-form-urlencoded")],
            Some(format!("subject={patient}&_summary=text").into_bytes())).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        for e in r.body["entry"].as_array().unwrap() {
            assert_eq!(keys(&e["resource"]), vec!["code", "id", "meta", "resourceType", "status", "subject"]);
        }

        // history: each version shaped; count is the total alone
        let p = &format!("/fhir/Patient/{patient}");
        let mut changed = app.get(p).await.body;
        changed["gender"] = json!("female");
        assert_eq!(app.put(p, &changed, &[]).await.status, StatusCode::OK);
        let h = app.get(&format!("{p}/_history?_summary=true")).await;
        assert_eq!(h.status, StatusCode::OK, "{}", h.text);
        assert_eq!(h.body["total"], 2);
        for e in h.body["entry"].as_array().unwrap() {
            assert!(is_subsetted(&e["resource"]));
        }
        let h = app.get(&format!("{p}/_history?_elements=gender")).await;
        assert_eq!(keys(&h.body["entry"][0]["resource"]), vec!["gender", "id", "meta", "resourceType"]);
        let c = app.get("/fhir/_history?_summary=count").await;
        assert_eq!(c.status, StatusCode::OK, "{}", c.text);
        assert!(c.body["total"].as_i64().unwrap() >= 9);
        assert!(c.body.get("entry").is_none());
        let c = app.get("/fhir/Patient/_history?_summary=count").await;
        assert_eq!(c.body["total"], 2);
    }

    async fn patch_replaces_adds_and_removes_and_answers_like_put(app) {
        let id = create(&app, &rossi()).await;
        let uri = format!("/fhir/Patient/{id}");
        let ops = json!([
            {"op": "test", "path": "/gender", "value": "male"},
            {"op": "replace", "path": "/gender", "value": "other"},
            {"op": "add", "path": "/telecom", "value": [{"system": "phone", "value": "+39 011 123456"}]},
            {"op": "add", "path": "/name/0/given/-", "value": "Giuseppe"},
            {"op": "remove", "path": "/address/0/extension"},
            {"op": "remove", "path": "/maritalStatus"}
        ]);
        let r = patch(&app, &uri, &ops, &[("if-match", "W/\"1\"")]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.header("etag"), Some("W/\"2\""));
        assert!(r.header("location").unwrap().ends_with(&format!("/fhir/Patient/{id}/_history/2")));
        assert!(r.header("last-modified").is_some());
        assert_eq!(r.body["meta"]["versionId"], "2");
        assert_eq!(r.body["gender"], "other");
        assert_eq!(r.body["name"][0]["given"], json!(["Mario", "Giuseppe"]));
        assert_eq!(r.body["telecom"][0]["value"], "+39 011 123456");
        assert!(r.body["address"][0].get("extension").is_none());
        assert!(r.body.get("maritalStatus").is_none());
        assert_eq!(r.body["identifier"], rossi()["identifier"]);
        let read = app.get(&uri).await;
        assert_eq!(read.body, r.body);
        // the history records an update
        let h = app.get(&format!("{uri}/_history")).await;
        assert_eq!(h.body["total"], 2);
        assert_eq!(h.body["entry"][0]["request"]["method"], "PUT");

        // Prefer as for PUT
        let minimal = patch(&app, &uri, &json!([{"op": "replace", "path": "/gender", "value": "female"}]), &[("prefer", "return=minimal")]).await;
        assert_eq!(minimal.status, StatusCode::OK, "{}", minimal.text);
        assert!(minimal.text.is_empty());
        assert_eq!(minimal.header("etag"), Some("W/\"3\""));
        let oo = patch(&app, &uri, &json!([{"op": "replace", "path": "/gender", "value": "male"}]), &[("prefer", "return=OperationOutcome")]).await;
        assert_eq!(oo.status, StatusCode::OK, "{}", oo.text);
        assert_eq!(oo.body["resourceType"], "OperationOutcome");
        assert_eq!(version_count(&app, "Patient", &id).await, 4);
    }

    async fn patch_refusals_store_nothing(app) {
        let id = create(&app, &rossi()).await;
        let uri = format!("/fhir/Patient/{id}");
        let before = app.get(&uri).await.body;
        let replace_gender = json!([{"op": "replace", "path": "/gender", "value": "female"}]);

        // another version than the current one: 412
        let r = patch(&app, &uri, &replace_gender, &[("if-match", "W/\"7\"")]).await;
        assert_outcome(&r, StatusCode::PRECONDITION_FAILED);

        // a result that is not valid R4 is refused as the same body PUT would be
        let bad_code = json!([{"op": "replace", "path": "/gender", "value": "banana"}]);
        let r = patch(&app, &uri, &bad_code, &[]).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        assert_eq!(r.expressions(), vec!["Patient.gender".to_string()]);
        let mut put_body = before.clone();
        put_body["gender"] = json!("banana");
        assert_eq!(app.put(&uri, &put_body, &[]).await.status, r.status);
        // … and so is one that breaks a national rule (a codice fiscale that does not check)
        let bad_cf = json!([{"op": "replace", "path": "/identifier/0/value", "value": "RSSMRA85T10A562X"}]);
        let r = patch(&app, &uri, &bad_cf, &[]).await;
        assert!(r.status.is_client_error(), "{}", r.text);
        let mut put_body = before.clone();
        put_body["identifier"][0]["value"] = json!("RSSMRA85T10A562X");
        assert_eq!(app.put(&uri, &put_body, &[]).await.status, r.status, "{}", r.text);
        // an empty array left behind is not R4 either (ele-1)
        let r = patch(&app, &uri, &json!([{"op": "remove", "path": "/address/0/extension/0"}]), &[]).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);

        // a test that fails, a path that is not there: 422 at the operation's location
        let r = patch(&app, &uri, &json!([
            {"op": "replace", "path": "/gender", "value": "female"},
            {"op": "test", "path": "/name/0/family", "value": "Bianchi"}
        ]), &[]).await;
        assert_outcome(&r, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(r.expressions(), vec!["Patient.name[0].family".to_string()]);
        let r = patch(&app, &uri, &json!([{"op": "remove", "path": "/deceasedBoolean"}]), &[]).await;
        assert_outcome(&r, StatusCode::UNPROCESSABLE_ENTITY);

        // what the server maintains
        for path in ["/id", "/resourceType", "/meta/versionId"] {
            let r = patch(&app, &uri, &json!([{"op": "replace", "path": path, "value": "x"}]), &[]).await;
            assert_outcome(&r, StatusCode::UNPROCESSABLE_ENTITY);
        }

        // not a JSON Patch: 400; not JSON Patch at all: 415
        let r = patch(&app, &uri, &json!({"op": "replace", "path": "/gender", "value": "female"}), &[]).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        let r = patch(&app, &uri, &json!([{"op": "replace", "path": "/gender"}]), &[]).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        let fhirpath_patch = json!({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
            {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Patient.gender"},
            {"name": "value", "valueCode": "female"}]}]});
        for ct in ["application/fhir+json", "application/json", "application/merge-patch+json"] {
            let r = app.request(Method::PATCH, &uri, &[("content-type", ct)], Some(serde_json::to_vec(&fhirpath_patch).unwrap())).await;
            assert_outcome(&r, StatusCode::UNSUPPORTED_MEDIA_TYPE);
            assert!(r.text.contains("application/json-patch+json"), "{}", r.text);
        }
        let r = app.request(Method::PATCH, &uri, &[], None).await;
        assert_outcome(&r, StatusCode::UNSUPPORTED_MEDIA_TYPE);

        // bounded: a body over the limit, a patch of too many operations
        let many: Vec<Value> = (0..1001).map(|_| json!({"op": "test", "path": "/gender", "value": "male"})).collect();
        let r = patch(&app, &uri, &Value::Array(many), &[]).await;
        assert_outcome(&r, StatusCode::BAD_REQUEST);
        let huge = json!([{"op": "replace", "path": "/name/0/family", "value": "x".repeat(11 * 1024 * 1024)}]);
        let r = patch(&app, &uri, &huge, &[]).await;
        // (the default limit is 10 MiB)
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);

        assert_eq!(app.get(&uri).await.body, before, "nothing was stored");
        assert_eq!(version_count(&app, "Patient", &id).await, 1);

        // what is not there
        let r = patch(&app, "/fhir/Patient/no-such-patient", &replace_gender, &[]).await;
        assert_outcome(&r, StatusCode::NOT_FOUND);
        let r = patch(&app, "/fhir/Medication/1", &replace_gender, &[]).await;
        assert_outcome(&r, StatusCode::NOT_FOUND);
        assert_eq!(app.delete(&uri).await.status, StatusCode::NO_CONTENT);
        let r = patch(&app, &uri, &replace_gender, &[]).await;
        assert_outcome(&r, StatusCode::GONE);
        assert_eq!(version_count(&app, "Patient", &id).await, 2);
    }

    async fn concurrent_patches_lose_no_update(app) {
        let id = create(&app, &rossi()).await;
        let uri = format!("/fhir/Patient/{id}");
        let app = std::sync::Arc::new(app);
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (app, uri) = (app.clone(), uri.clone());
            tasks.push(tokio::spawn(async move {
                let ops = json!([{"op": "add", "path": "/name/0/given/-", "value": format!("Nome{i}")}]);
                (i, patch(&app, &uri, &ops, &[]).await)
            }));
        }
        let mut applied = Vec::new();
        for t in tasks {
            let (i, r) = t.await.unwrap();
            match r.status {
                StatusCode::OK => applied.push(format!("Nome{i}")),
                // the patch met another write to the same resource: the client retries
                StatusCode::CONFLICT => {}
                other => panic!("{other}: {}", r.text),
            }
        }
        assert!(!applied.is_empty());
        let now = app.get(&uri).await.body;
        let given: Vec<String> = now["name"][0]["given"].as_array().unwrap().iter().map(|g| g.as_str().unwrap().to_string()).collect();
        // each accepted patch is in the resource, on top of the one before it
        for name in &applied {
            assert!(given.contains(name), "{name} was lost: {given:?}");
        }
        assert_eq!(given.len(), 1 + applied.len(), "{given:?}");
        assert_eq!(version_count(&app, "Patient", &id).await, 1 + applied.len() as i64);
    }

    async fn format_aliases_are_the_same_everywhere(app) {
        let id = create(&app, &rossi()).await;
        let uri = format!("/fhir/Patient/{id}");
        for f in ["json", "JSON", "application/json", "application/fhir%2Bjson", "application/fhir+json", "application/json%2Bfhir"] {
            let r = app.get(&format!("{uri}?_format={f}")).await;
            assert_eq!(r.status, StatusCode::OK, "{f}: {}", r.text);
            assert!(r.header("content-type").unwrap().starts_with("application/fhir+json"), "{f}");
            assert_eq!(r.body["id"], id.as_str());
        }
        for f in ["xml", "text/xml", "application/xml", "application/fhir%2Bxml", "application/fhir+xml"] {
            let r = app.get(&format!("{uri}?_format={f}")).await;
            assert_eq!(r.status, StatusCode::OK, "{f}: {}", r.text);
            assert!(r.header("content-type").unwrap().starts_with("application/fhir+xml"), "{f}");
            assert!(r.text.contains("<Patient"), "{f}: {}", r.text);
        }
        // with the other conventions: a subset in XML, a PATCH answered in XML
        let r = app.get(&format!("{uri}?_format=xml&_summary=true")).await;
        assert!(r.text.contains("SUBSETTED") && !r.text.contains("maritalStatus"), "{}", r.text);
        let r = patch(&app, &format!("{uri}?_format=xml"), &json!([{"op": "replace", "path": "/gender", "value": "other"}]), &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(r.text.contains("<gender value=\"other\"/>"), "{}", r.text);
        // Accept with quality values
        let r = app.request(Method::GET, &uri, &[("accept", "application/fhir+xml;q=0.5, application/fhir+json")], None).await;
        assert!(r.header("content-type").unwrap().starts_with("application/fhir+json"));

        // a search answered in XML keeps the format in its links (normalised)
        let s = app.get("/fhir/Patient?family=rossi&_format=application/xml").await;
        assert!(s.header("content-type").unwrap().starts_with("application/fhir+xml"), "{}", s.text);
        let self_url = xml_self_link(&s.text);
        assert!(query_of(&self_url).contains(&("_format".into(), "xml".into())), "{self_url}");
        let again = app.get(&local(&self_url)).await;
        assert!(again.header("content-type").unwrap().starts_with("application/fhir+xml"));
        assert_eq!(xml_self_link(&again.text), self_url);

        // a format the server does not write: 406 everywhere, before anything is done
        for (method, u) in [(Method::GET, uri.clone()), (Method::GET, "/fhir/Patient?family=rossi".into()),
                            (Method::GET, format!("{uri}/_history")), (Method::DELETE, uri.clone())] {
            let sep = if u.contains('?') { '&' } else { '?' };
            let r = app.request(method.clone(), &format!("{u}{sep}_format=text/turtle"), &[], None).await;
            assert_outcome(&r, StatusCode::NOT_ACCEPTABLE);
        }
        let r = patch(&app, &format!("{uri}?_format=ttl"), &json!([{"op": "replace", "path": "/gender", "value": "male"}]), &[]).await;
        assert_outcome(&r, StatusCode::NOT_ACCEPTABLE);
        assert_eq!(app.get(&uri).await.body["gender"], "other", "nothing was deleted or patched");
    }

    async fn the_self_link_reproduces_the_search(app) {
        let answer = load_antibiogram(&app).await;
        let patient = id_of_entry(&answer, 0);
        // the search below, its parameters in any order, with some the server does not apply
        let query = format!("code=http://loinc.org|18943-1,http://loinc.org|18932-4,http://loinc.org|600-7&_count=2\
            &status=final&_sort=_id&subject:Patient={patient}&_include=Observation:subject&_pretty=true&_total=accurate");
        let first = app.get(&format!("/fhir/Observation?{query}")).await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.text);
        assert_eq!(first.body["total"], 3);
        let self_url = link(&first.body, "self").unwrap().to_string();
        let code = "http://loinc.org|18943-1,http://loinc.org|18932-4,http://loinc.org|600-7";
        let expected: Vec<(String, String)> = [
            ("code", code), ("status", "final"), ("subject:Patient", patient.as_str()),
            ("_include", "Observation:subject"), ("_sort", "_id"), ("_count", "2"), ("_offset", "0"),
        ].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(query_of(&self_url), expected, "{self_url}");

        // following it gives the same page, and says the same
        let again = app.get(&local(&self_url)).await;
        assert_eq!(full_urls(&again.body), full_urls(&first.body));
        assert_eq!(again.body["total"], first.body["total"]);
        assert_eq!(link(&again.body, "self"), Some(self_url.as_str()));

        // the same search written otherwise has the same self link
        let reordered = format!("/fhir/Observation?_include=Observation:subject&subject:Patient={patient}&_sort=_id\
            &_count=2&status=final&code={}", code.replace('|', "%7C"));
        assert_eq!(link(&app.get(&reordered).await.body, "self"), Some(self_url.as_str()));
        let post = app.request(Method::POST, "/fhir/Observation/_search", &[("content-type", "application/x-www-form-urlencoded")],
            Some(query.replace('|', "%7C").into_bytes())).await;
        assert_eq!(post.status, StatusCode::OK, "{}", post.text);
        assert_eq!(link(&post.body, "self"), Some(self_url.as_str()));

        // paging through next links finds every match once; each page's self link gives that page
        let mut seen = Vec::new();
        let mut page = first.body.clone();
        loop {
            let here = link(&page, "self").unwrap().to_string();
            assert_eq!(full_urls(&app.get(&local(&here)).await.body), full_urls(&page));
            seen.extend(page["entry"].as_array().unwrap().iter()
                .filter(|e| e["search"]["mode"] == "match")
                .map(|e| e["fullUrl"].as_str().unwrap().to_string()));
            match link(&page, "next") {
                Some(next) => page = app.get(&local(next)).await.body,
                None => break,
            }
        }
        let mut unique = seen.clone();
        unique.dedup();
        assert_eq!((seen.len(), unique.len()), (3, 3), "{seen:?}");

        // what was clamped says its value; what was ignored is not there
        let s = app.get("/fhir/Observation?_count=5000").await;
        assert!(query_of(link(&s.body, "self").unwrap()).contains(&("_count".into(), "1000".into())));
        let lenient = app.request(Method::GET, "/fhir/Observation?status=final&nmae=x&_include:iterate=Observation:subject",
            &[("prefer", "handling=lenient")], None).await;
        assert_eq!(lenient.status, StatusCode::OK, "{}", lenient.text);
        let lenient_self = link(&lenient.body, "self").unwrap();
        assert_eq!(query_of(lenient_self), vec![("status".to_string(), "final".to_string()), ("_count".into(), "50".into()), ("_offset".into(), "0".into())]);
        let outcome = lenient.body["entry"].as_array().unwrap().iter().find(|e| e["search"]["mode"] == "outcome").unwrap();
        assert_eq!(outcome["resource"]["issue"].as_array().unwrap().len(), 2, "{outcome}");
        assert_eq!(app.get(&local(lenient_self)).await.body["total"], lenient.body["total"]);
        // strict: the same parameters are refused
        for q in ["status=final&nmae=x", "_include:iterate=Observation:subject", "_count:exact=3"] {
            assert_outcome(&app.get(&format!("/fhir/Observation?{q}")).await, StatusCode::BAD_REQUEST);
        }
        // a shape and a format are part of the search
        let shaped = app.get("/fhir/Observation?status=final&_summary=data&_format=json").await;
        assert_eq!(query_of(link(&shaped.body, "self").unwrap()), vec![
            ("status".to_string(), "final".to_string()), ("_summary".into(), "data".into()),
            ("_count".into(), "50".into()), ("_offset".into(), "0".into()), ("_format".into(), "json".into()),
        ]);

        // a history's self link keeps its _since
        let h = app.get(&format!("/fhir/Patient/{patient}/_history?_since=2000-01-01T00:00:00Z&_count=1&_summary=true")).await;
        assert_eq!(h.status, StatusCode::OK, "{}", h.text);
        let hs = link(&h.body, "self").unwrap();
        assert_eq!(query_of(hs), vec![("_since".to_string(), "2000-01-01T00:00:00Z".to_string()),
            ("_summary".into(), "true".into()), ("_count".into(), "1".into()), ("_offset".into(), "0".into())]);
        assert_eq!(app.get(&local(hs)).await.body["entry"], h.body["entry"]);
    }
}

/// The `self` link of a Bundle written in XML.
fn xml_self_link(xml: &str) -> String {
    let at = xml.find("<relation value=\"self\"/>").expect("a self link");
    let rest = &xml[at..];
    let start = rest.find("<url value=\"").expect("its url") + "<url value=\"".len();
    let end = rest[start..].find('"').unwrap();
    rest[start..start + end]
        .replace("&#38;", "&")
        .replace("&amp;", "&")
}

// --- with an access file: who may patch, and what a subset still tells the audit trail ---

const ACCESS: &str = r#"
[[client]]
id = "lab-niguarda"
role = "laboratory"
token_sha256 = "TOKEN_LAB"

[[client]]
id = "garante"
role = "auditor"
token_sha256 = "TOKEN_AUDITOR"

[[client]]
id = "regione-lombardia"
role = "region"
regions = ["030"]
token_sha256 = "TOKEN_LOMBARDIA"
endpoints = ["https://sorveglianza.regione.lombardia.it/"]

[[client]]
id = "regione-piemonte"
role = "region"
regions = ["010"]
token_sha256 = "TOKEN_PIEMONTE"
endpoints = ["https://sorveglianza.regione.piemonte.it/"]
"#;

fn with_access(c: &mut Config) {
    c.access_file = Some(common::access_file(
        ACCESS,
        &[
            ("TOKEN_LAB", "lab-token"),
            ("TOKEN_AUDITOR", "auditor-token"),
            ("TOKEN_LOMBARDIA", "lombardia-token"),
            ("TOKEN_PIEMONTE", "piemonte-token"),
        ],
    ));
}

async fn call(
    app: &TestApp,
    method: Method,
    uri: &str,
    token: &str,
    body: Option<(&str, Vec<u8>)>,
) -> Resp {
    let auth = format!("Bearer {token}");
    let mut headers = vec![("authorization", auth.as_str())];
    if let Some((ct, _)) = &body {
        headers.push(("content-type", ct));
    }
    app.request(method, uri, &headers, body.map(|(_, b)| b))
        .await
}

fn fhir(v: &Value) -> Option<(&'static str, Vec<u8>)> {
    Some(("application/fhir+json", serde_json::to_vec(v).unwrap()))
}

fn json_patch(v: &Value) -> Option<(&'static str, Vec<u8>)> {
    Some((
        "application/json-patch+json",
        serde_json::to_vec(v).unwrap(),
    ))
}

/// The `read` AuditEvents of `entity_prefix`, once there is one (written by a background batch).
async fn reads_of(app: &TestApp, entity_prefix: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = call(
            app,
            Method::GET,
            "/fhir/AuditEvent?subtype=read&_count=1000",
            "auditor-token",
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let found: Vec<Value> = r.body["entry"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e["resource"].clone())
            .filter(|ev| entities(ev).iter().any(|e| e.starts_with(entity_prefix)))
            .collect();
        if !found.is_empty() || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn entities(ev: &Value) -> Vec<String> {
    ev["entity"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["what"]["reference"].as_str().map(String::from))
        .collect()
}

on_both_databases_with! { with_access;
    async fn patch_is_a_write_under_the_same_rules(app) {
        let r = call(&app, Method::POST, "/fhir/Patient", "lab-token", fhir(&rossi())).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let uri = format!("/fhir/Patient/{}", r.body["id"].as_str().unwrap());
        let ops = json!([{"op": "replace", "path": "/gender", "value": "other"}]);
        // a client that may not write Patients
        for token in ["auditor-token", "lombardia-token"] {
            let r = call(&app, Method::PATCH, &uri, token, json_patch(&ops)).await;
            assert_outcome(&r, StatusCode::FORBIDDEN);
        }
        let r = call(&app, Method::PATCH, &uri, "lab-token", json_patch(&ops)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["meta"]["versionId"], "2");
        // without a token
        let r = app.request(Method::PATCH, &uri, &[("content-type", "application/json-patch+json")], Some(serde_json::to_vec(&ops).unwrap())).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);

        // another client's Subscription does not exist for a patch either
        let sub = json!({"resourceType": "Subscription", "status": "requested", "reason": "casi della regione",
            "criteria": "https://sentinella-fhir.github.io/ig/SubscriptionTopic/notifiable-case",
            "channel": {"type": "rest-hook", "endpoint": "https://sorveglianza.regione.lombardia.it/hook",
                        "payload": "application/fhir+json"}});
        let r = call(&app, Method::POST, "/fhir/Subscription", "lombardia-token", fhir(&sub)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let sub_uri = format!("/fhir/Subscription/{}", r.body["id"].as_str().unwrap());
        let reason = json!([{"op": "replace", "path": "/reason", "value": "cambiata"}]);
        let r = call(&app, Method::PATCH, &sub_uri, "piemonte-token", json_patch(&reason)).await;
        assert_outcome(&r, StatusCode::NOT_FOUND);
        let r = call(&app, Method::PATCH, &sub_uri, "lombardia-token", json_patch(&reason)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["reason"], "cambiata");
    }

    async fn a_subset_is_audited_like_the_whole_resource(app) {
        let r = call(&app, Method::POST, "/fhir", "lab-token", fhir(&fixture("antibiogram-transaction.json"))).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let patient = id_of_entry(&r.body, 0);
        let obs = id_of_entry(&r.body, 4);
        // the narrative and the code say whose result this is: the read is of that patient's data
        let r = call(&app, Method::GET, &format!("/fhir/Observation/{obs}?_elements=code"), "lab-token", None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["subject"]["reference"], format!("Patient/{patient}"));
        let events = reads_of(&app, &format!("Observation/{obs}")).await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(entities(&events[0]).contains(&format!("Patient/{patient}")), "{:?}", entities(&events[0]));
    }
}
