//! Terminology services over HTTP (issue 13, item 3): `CodeSystem/$lookup`, `CodeSystem/$subsumes`,
//! `ValueSet/$expand`, `ValueSet/$validate-code`, `ConceptMap/$translate`, through the real router,
//! with inputs as query parameters and as a `Parameters` body. Answers are compared with the shapes
//! of the FHIR R4 specification's examples (parameter names, value types, order of `result` /
//! `message` / `display`) and checked against the R4 JSON schema. Nothing is stored: SQLite only.
//!
//! Expected codes and counts are read from the terminology files themselves (or are the spec's own
//! facts: ICD-9-CM 011.93 lies under 010-018), never from what the server answers.
mod common;

use std::collections::HashSet;

use axum::http::{Method, StatusCode};
use common::{Resp, TestApp};
use serde_json::{Value, json};

const ICD9: &str = "http://hl7.org/fhir/sid/icd-9-cm";
const LOINC: &str = "http://loinc.org";
const SNOMED: &str = "http://snomed.info/sct";
const CANON: &str = "https://sentinella-fhir.github.io/ig";
const NIGUARDA: &str = "https://lis.niguarda.example/codici";

fn canon(path: &str) -> String {
    format!("{CANON}/{path}")
}

/// A query string, each value encoded.
fn q(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

fn terminology_file(name: &str) -> Value {
    let path = format!("{}/terminology/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("terminology file")).unwrap()
}

/// The parameters of a Parameters resource named `name`.
fn params<'a>(body: &'a Value, name: &str) -> Vec<&'a Value> {
    body["parameter"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == name)
        .collect()
}

fn param<'a>(body: &'a Value, name: &str) -> &'a Value {
    params(body, name)
        .first()
        .copied()
        .unwrap_or_else(|| panic!("no parameter {name} in {body}"))
}

fn part<'a>(p: &'a Value, name: &str) -> &'a Value {
    p["part"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x["name"] == name)
        .unwrap_or_else(|| panic!("no part {name} in {p}"))
}

/// The answer is R4: a Parameters checked by the R4 JSON schema directly, a ValueSet wrapped as a
/// Parameters' resource (embedded resources are checked against their own type).
fn assert_r4(body: &Value) {
    let checked = if body["resourceType"] == "Parameters" {
        body.clone()
    } else {
        json!({"resourceType": "Parameters", "parameter": [{"name": "return", "resource": body}]})
    };
    let issues = sentinella::fhir::schema::SchemaValidators::get().validate(&checked);
    assert!(issues.is_empty(), "not valid R4: {issues:?}\n{body}");
}

fn assert_ok(r: &Resp) {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_r4(&r.body);
}

/// An OperationOutcome with this status, issue code and expression.
fn assert_outcome(r: &Resp, status: StatusCode, code: &str, expression: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.body["resourceType"], "OperationOutcome", "{}", r.text);
    assert_eq!(r.body["issue"][0]["code"], code, "{}", r.text);
    match expression {
        Some(e) => assert_eq!(r.expressions(), vec![e.to_string()], "{}", r.text),
        None => assert!(r.expressions().is_empty(), "{}", r.text),
    }
}

fn parameters(list: Value) -> Value {
    json!({"resourceType": "Parameters", "parameter": list})
}

fn codes(expansion: &Value) -> Vec<String> {
    expansion["expansion"]["contains"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["code"].as_str().unwrap().to_string())
        .collect()
}

// =================================================================================================
// $lookup

#[tokio::test]
async fn lookup_answers_like_the_r4_example_by_get_and_by_post() {
    let app = TestApp::sqlite().await;
    let r = app
        .get(&format!(
            "/fhir/CodeSystem/$lookup?{}",
            q(&[("system", ICD9), ("code", "041.3")])
        ))
        .await;
    assert_ok(&r);
    // R4 example: name, version, display as valueString, first and in this order
    let names: Vec<&str> = r.body["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(&names[..3], ["name", "version", "display"]);
    assert_eq!(param(&r.body, "version")["valueString"], "32");
    let icd9 = terminology_file("CodeSystem-icd9cm.json");
    let expected = icd9["concept"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["code"] == "041.3")
        .unwrap();
    assert_eq!(
        param(&r.body, "display")["valueString"],
        expected["display"]
    );
    let parent = params(&r.body, "property")
        .into_iter()
        .find(|p| part(p, "code")["valueCode"] == "parent")
        .expect("the parent is a property");
    assert_eq!(part(parent, "value")["valueCode"], "041");

    let post = app
        .post(
            "/fhir/CodeSystem/$lookup",
            &parameters(json!([
                {"name": "coding", "valueCoding": {"system": ICD9, "code": "041.3"}},
                {"name": "property", "valueCode": "parent"}
            ])),
        )
        .await;
    assert_ok(&post);
    assert_eq!(
        param(&post.body, "display"),
        param(&r.body, "display"),
        "the same concept by POST"
    );
    assert_eq!(params(&post.body, "property").len(), 1, "{}", post.text);

    // a code of the LOINC subset we ship, and the tuberculosis chapter with its children
    let loinc = app
        .get(&format!(
            "/fhir/CodeSystem/$lookup?{}",
            q(&[("system", LOINC), ("code", "600-7")])
        ))
        .await;
    assert_ok(&loinc);
    assert_eq!(param(&loinc.body, "name")["valueString"], "LOINC");
    assert_eq!(
        param(&loinc.body, "display")["valueString"],
        "Bacteria identified in Blood by Culture"
    );
    let tb = app
        .get(&format!(
            "/fhir/CodeSystem/$lookup?{}",
            q(&[("system", ICD9), ("code", "010-018"), ("property", "child")])
        ))
        .await;
    assert_ok(&tb);
    let children: HashSet<&str> = params(&tb.body, "property")
        .into_iter()
        .map(|p| part(p, "value")["valueCode"].as_str().unwrap())
        .collect();
    let expected: HashSet<&str> = icd9["concept"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["property"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["code"] == "parent" && p["valueCode"] == "010-018")
        })
        .map(|c| c["code"].as_str().unwrap())
        .collect();
    assert_eq!(children, expected);
    assert_eq!(children.len(), 9, "010 … 018");
}

#[tokio::test]
async fn lookup_of_an_unknown_code_system_or_code_is_not_found() {
    let app = TestApp::sqlite().await;
    let r = app
        .get(&format!(
            "/fhir/CodeSystem/$lookup?{}",
            q(&[
                ("system", "http://example.org/no-such-system"),
                ("code", "x")
            ])
        ))
        .await;
    assert_outcome(&r, StatusCode::NOT_FOUND, "not-found", Some("system"));
    let r = app
        .get(&format!(
            "/fhir/CodeSystem/$lookup?{}",
            q(&[("system", ICD9), ("code", "041.99")])
        ))
        .await;
    assert_outcome(&r, StatusCode::NOT_FOUND, "not-found", Some("code"));
    // a LOINC code outside the subset: the message says the server has a fragment only
    let r = app
        .post(
            "/fhir/CodeSystem/$lookup",
            &parameters(json!([
                {"name": "coding", "valueCoding": {"system": LOINC, "code": "1963-8"}}
            ])),
        )
        .await;
    assert_outcome(&r, StatusCode::NOT_FOUND, "not-found", Some("coding.code"));
    assert!(r.text.contains("fragment"), "{}", r.text);
    // a version the server does not have
    let r = app
        .get(&format!(
            "/fhir/CodeSystem/$lookup?{}",
            q(&[("system", ICD9), ("code", "041.3"), ("version", "31")])
        ))
        .await;
    assert_outcome(&r, StatusCode::NOT_FOUND, "not-found", Some("version"));
    // a code without its system
    let r = app.get("/fhir/CodeSystem/$lookup?code=041.3").await;
    assert_outcome(&r, StatusCode::BAD_REQUEST, "invalid", Some("system"));
}

#[tokio::test]
async fn operations_refuse_unknown_parameters_and_bodies_that_are_not_parameters() {
    let app = TestApp::sqlite().await;
    let r = app
        .get(&format!(
            "/fhir/CodeSystem/$lookup?{}",
            q(&[("system", ICD9), ("code", "041.3"), ("cdoe", "x")])
        ))
        .await;
    assert_outcome(&r, StatusCode::BAD_REQUEST, "invalid", Some("cdoe"));
    for url in [
        "/fhir/CodeSystem/$lookup",
        "/fhir/CodeSystem/$subsumes",
        "/fhir/ValueSet/$expand",
        "/fhir/ValueSet/dm1990-classe-3/$validate-code",
        "/fhir/ConceptMap/$translate",
    ] {
        let r = app
            .post(url, &json!({"resourceType": "Patient", "id": "x"}))
            .await;
        assert_outcome(
            &r,
            StatusCode::BAD_REQUEST,
            "structure",
            Some("resourceType"),
        );
        let r = app
            .request(
                Method::POST,
                url,
                &[("content-type", "application/fhir+json")],
                Some(b"{not json".to_vec()),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{url}: {}", r.text);
    }
    // a parameter R4 defines but this server does not take
    let r = app
        .post(
            "/fhir/ValueSet/$expand",
            &parameters(json!([{"name": "valueSet", "resource": {"resourceType": "ValueSet", "status": "active"}}])),
        )
        .await;
    assert_outcome(
        &r,
        StatusCode::BAD_REQUEST,
        "not-supported",
        Some("valueSet"),
    );
}

// =================================================================================================
// $subsumes

#[tokio::test]
async fn subsumes_over_the_icd9_tuberculosis_hierarchy() {
    let app = TestApp::sqlite().await;
    let outcome = |r: &Resp| {
        assert_ok(r);
        assert_eq!(r.body["parameter"].as_array().unwrap().len(), 1);
        param(&r.body, "outcome")["valueCode"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let ask = |a: &str, b: &str| {
        format!(
            "/fhir/CodeSystem/$subsumes?{}",
            q(&[("system", ICD9), ("codeA", a), ("codeB", b)])
        )
    };
    assert_eq!(
        outcome(&app.get(&ask("010-018", "011.93")).await),
        "subsumes"
    );
    assert_eq!(
        outcome(&app.get(&ask("011.93", "011")).await),
        "subsumed-by"
    );
    assert_eq!(
        outcome(&app.get(&ask("003.0", "003.0")).await),
        "equivalent"
    );
    assert_eq!(
        outcome(&app.get(&ask("010-018", "041.3")).await),
        "not-subsumed"
    );
    // instance level, codings in a Parameters body
    let r = app
        .post(
            "/fhir/CodeSystem/icd9cm/$subsumes",
            &parameters(json!([
                {"name": "codingA", "valueCoding": {"system": ICD9, "code": "001-139"}},
                {"name": "codingB", "valueCoding": {"system": ICD9, "code": "003.0"}}
            ])),
        )
        .await;
    assert_eq!(outcome(&r), "subsumes");
    let r = app
        .get("/fhir/CodeSystem/no-such/$subsumes?codeA=a&codeB=b")
        .await;
    assert_outcome(&r, StatusCode::NOT_FOUND, "not-found", None);
    let r = app.get(&ask("010-018", "zzz")).await;
    assert_outcome(&r, StatusCode::NOT_FOUND, "not-found", Some("codeB"));
}

#[tokio::test]
async fn subsumption_cannot_be_decided_in_a_fragment() {
    let app = TestApp::sqlite().await;
    // K. pneumoniae and one of its subspecies: both in our SNOMED CT subset, which has no hierarchy
    let r = app
        .get(&format!(
            "/fhir/CodeSystem/$subsumes?{}",
            q(&[
                ("system", SNOMED),
                ("codeA", "56415008"),
                ("codeB", "18400002")
            ])
        ))
        .await;
    assert_outcome(&r, StatusCode::BAD_REQUEST, "not-supported", None);
    assert!(
        r.text
            .contains("subsumption cannot be decided in SNOMED CT"),
        "{}",
        r.text
    );
    let r = app
        .get(&format!(
            "/fhir/CodeSystem/$subsumes?{}",
            q(&[
                ("system", "http://example.org/none"),
                ("codeA", "a"),
                ("codeB", "b")
            ])
        ))
        .await;
    assert_outcome(&r, StatusCode::NOT_FOUND, "not-found", Some("system"));
}

// =================================================================================================
// $expand

#[tokio::test]
async fn expand_a_value_set_by_id_and_by_url() {
    let app = TestApp::sqlite().await;
    let file = terminology_file("ValueSet-klebsiella-pneumoniae.json");
    let listed: Vec<(String, String)> = file["compose"]["include"][0]["concept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["code"].as_str().unwrap().to_string(),
                c["display"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let by_id = app
        .get("/fhir/ValueSet/klebsiella-pneumoniae/$expand")
        .await;
    assert_ok(&by_id);
    assert_eq!(by_id.body["resourceType"], "ValueSet");
    assert_eq!(by_id.body["url"], canon("ValueSet/klebsiella-pneumoniae"));
    let e = &by_id.body["expansion"];
    assert!(e["identifier"].as_str().unwrap().starts_with("urn:uuid:"));
    assert!(e["timestamp"].as_str().is_some());
    assert_eq!(e["total"], listed.len());
    let got: Vec<(String, String)> = e["contains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["system"], SNOMED);
            (
                c["code"].as_str().unwrap().to_string(),
                c["display"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got, listed,
        "the set's codes, in its order, with its displays"
    );
    let by_url = app
        .post(
            "/fhir/ValueSet/$expand",
            &parameters(json!([
                {"name": "url", "valueUri": canon("ValueSet/klebsiella-pneumoniae")}
            ])),
        )
        .await;
    assert_ok(&by_url);
    assert_eq!(codes(&by_url.body), codes(&by_id.body));
    // a version in the canonical or as valueSetVersion: the one the server has, or 404
    let versioned = format!("{}|1.0.0", canon("ValueSet/klebsiella-pneumoniae"));
    let r = app
        .get(&format!(
            "/fhir/ValueSet/$expand?{}",
            q(&[("url", &versioned)])
        ))
        .await;
    assert_ok(&r);
    let r = app
        .get("/fhir/ValueSet/klebsiella-pneumoniae/$expand?valueSetVersion=2.0.0")
        .await;
    assert_outcome(
        &r,
        StatusCode::NOT_FOUND,
        "not-found",
        Some("valueSetVersion"),
    );
    // an R4 value set of the packaged definitions
    let gender = app
        .get("/fhir/ValueSet/$expand?url=http://hl7.org/fhir/ValueSet/administrative-gender")
        .await;
    assert_ok(&gender);
    assert_eq!(codes(&gender.body), ["male", "female", "other", "unknown"]);
    // the packaged R4 code systems keep codes only: no display is made up
    assert!(
        gender.body["expansion"]["contains"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c.get("display").is_none()),
        "{}",
        gender.text
    );
    // unknown ValueSets
    let r = app.get("/fhir/ValueSet/no-such/$expand").await;
    assert_outcome(&r, StatusCode::NOT_FOUND, "not-found", None);
    let r = app
        .get("/fhir/ValueSet/$expand?url=http://example.org/ValueSet/none")
        .await;
    assert_outcome(&r, StatusCode::NOT_FOUND, "not-found", Some("url"));
    // a value set on a code system the server does not have (R4 mime types)
    let r = app
        .get("/fhir/ValueSet/$expand?url=http://hl7.org/fhir/ValueSet/mimetypes")
        .await;
    assert_outcome(&r, StatusCode::BAD_REQUEST, "not-supported", None);
    assert!(r.text.contains("urn:ietf:bcp:13"), "{}", r.text);
}

#[tokio::test]
async fn expand_pages_stably_with_a_correct_total() {
    let app = TestApp::sqlite().await;
    // class III: tuberculosis (010-018) and the rest, through the ICD-9-CM hierarchy
    let first = app
        .get("/fhir/ValueSet/dm1990-classe-3/$expand?count=1000")
        .await;
    assert_ok(&first);
    let all = codes(&first.body);
    let total = first.body["expansion"]["total"].as_u64().unwrap() as usize;
    assert_eq!(all.len(), total);
    assert!(total > 500, "{total}");
    assert!(all.iter().any(|c| c == "011.93"));
    assert!(
        all.iter().any(|c| c == "010-018"),
        "the section itself (is-a)"
    );
    assert!(!all.iter().any(|c| c == "041.3"));
    let mut paged = Vec::new();
    let mut offset = 0;
    while offset < total {
        let r = app
            .get(&format!(
                "/fhir/ValueSet/dm1990-classe-3/$expand?count=100&offset={offset}"
            ))
            .await;
        assert_ok(&r);
        assert_eq!(
            r.body["expansion"]["total"], total,
            "the same total on every page"
        );
        assert_eq!(r.body["expansion"]["offset"], offset);
        let page = codes(&r.body);
        assert_eq!(page.len(), 100.min(total - offset));
        paged.extend(page);
        offset += 100;
    }
    assert_eq!(
        paged, all,
        "pages concatenate to the whole, in the same order"
    );
    let again = app
        .get("/fhir/ValueSet/dm1990-classe-3/$expand?count=100&offset=200")
        .await;
    assert_eq!(codes(&again.body), all[200..300]);
    // past the end: the total, no contains
    let past = app
        .get(&format!(
            "/fhir/ValueSet/dm1990-classe-3/$expand?count=10&offset={total}"
        ))
        .await;
    assert_ok(&past);
    assert!(past.body["expansion"].get("contains").is_none());
    // the echoed parameters (R4 expansion.parameter)
    let echo = &again.body["expansion"]["parameter"];
    assert!(
        echo.as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "count" && p["valueInteger"] == 100)
    );
    // count has an upper bound; offset must be a number
    let r = app
        .get("/fhir/ValueSet/dm1990-classe-3/$expand?count=100000")
        .await;
    assert_outcome(&r, StatusCode::BAD_REQUEST, "invalid", Some("count"));
    let r = app
        .get("/fhir/ValueSet/dm1990-classe-3/$expand?offset=-1")
        .await;
    assert_outcome(&r, StatusCode::BAD_REQUEST, "invalid", Some("offset"));
}

#[tokio::test]
async fn a_value_set_too_large_to_expand_without_paging_is_too_costly() {
    let app = TestApp::sqlite().await;
    // the whole of ICD-9-CM: its implicit value set (R4's SNOMED CT convention, <system>?fhir_vs)
    let whole = format!("{ICD9}?fhir_vs");
    let r = app
        .get(&format!("/fhir/ValueSet/$expand?{}", q(&[("url", &whole)])))
        .await;
    assert_outcome(&r, StatusCode::BAD_REQUEST, "too-costly", Some("count"));
    let size = terminology_file("CodeSystem-icd9cm.json")["concept"]
        .as_array()
        .unwrap()
        .len();
    assert!(r.text.contains(&format!("{size} codes")), "{}", r.text);
    assert!(r.text.contains("offset"), "points to paging: {}", r.text);
    // paged, it expands; the total is the whole system
    let r = app
        .get(&format!(
            "/fhir/ValueSet/$expand?{}",
            q(&[("url", &whole), ("count", "20"), ("offset", "17000")])
        ))
        .await;
    assert_ok(&r);
    assert_eq!(r.body["expansion"]["total"], size);
    assert_eq!(codes(&r.body).len(), 20);
    // a filter that leaves few codes needs no paging
    let r = app
        .get(&format!(
            "/fhir/ValueSet/$expand?{}",
            q(&[("url", &whole), ("filter", "friedländer")])
        ))
        .await;
    assert_ok(&r);
    assert!(codes(&r.body).contains(&"041.3".to_string()), "{}", r.text);
    // a fragment has no implicit value set: it cannot be enumerated
    let r = app
        .get(&format!(
            "/fhir/ValueSet/$expand?{}",
            q(&[("url", &format!("{SNOMED}?fhir_vs"))])
        ))
        .await;
    assert_outcome(&r, StatusCode::BAD_REQUEST, "not-supported", Some("url"));
}

#[tokio::test]
async fn expand_filters_on_code_and_display_words() {
    let app = TestApp::sqlite().await;
    let r = app
        .get(&format!(
            "/fhir/ValueSet/dm1990-classe-3/$expand?{}",
            q(&[("filter", "pulmonary tuberc")])
        ))
        .await;
    assert_ok(&r);
    let contains = r.body["expansion"]["contains"].as_array().unwrap();
    assert_eq!(r.body["expansion"]["total"], contains.len());
    assert!(contains.iter().any(|c| c["code"] == "011.93"));
    for c in contains {
        let d = c["display"].as_str().unwrap().to_lowercase();
        assert!(d.contains("pulmonary") && d.contains("tuberc"), "{d}");
    }
    let echo = &r.body["expansion"]["parameter"][0];
    assert_eq!(echo["name"], "filter");
    assert_eq!(echo["valueString"], "pulmonary tuberc");
    // by the start of the code
    let r = app
        .get("/fhir/ValueSet/icd9cm-cre/$expand?filter=041.4")
        .await;
    assert_ok(&r);
    let found = codes(&r.body);
    assert!(found.iter().all(|c| c.starts_with("041.4")), "{found:?}");
    assert!(found.contains(&"041.41".to_string()));
    // case does not matter; nothing matched is a total of 0 without contains
    let r = app
        .get("/fhir/ValueSet/klebsiella-pneumoniae/$expand?filter=OZAENAE")
        .await;
    assert_eq!(codes(&r.body), ["65186004"]);
    let r = app
        .get("/fhir/ValueSet/klebsiella-pneumoniae/$expand?filter=escherichia")
        .await;
    assert_ok(&r);
    assert_eq!(r.body["expansion"]["total"], 0);
    assert!(r.body["expansion"].get("contains").is_none());
}

// =================================================================================================
// $validate-code

#[tokio::test]
async fn validate_code_in_a_dm1990_class_get_and_post() {
    let app = TestApp::sqlite().await;
    let r = app
        .get(&format!(
            "/fhir/ValueSet/dm1990-classe-3/$validate-code?{}",
            q(&[("system", ICD9), ("code", "011.93")])
        ))
        .await;
    assert_ok(&r);
    assert_eq!(param(&r.body, "result")["valueBoolean"], true);
    assert!(params(&r.body, "message").is_empty(), "{}", r.text);
    assert!(
        param(&r.body, "display")["valueString"]
            .as_str()
            .unwrap()
            .starts_with("Pulmonary tuberculosis")
    );
    // POST without a body: the parameters in the query
    let r = app
        .request(
            Method::POST,
            &format!(
                "/fhir/ValueSet/dm1990-classe-3/$validate-code?{}",
                q(&[("system", ICD9), ("code", "011.93")])
            ),
            &[],
            None,
        )
        .await;
    assert_ok(&r);
    assert_eq!(param(&r.body, "result")["valueBoolean"], true);
    // type level with url; a Coding in a Parameters body
    let r = app
        .post(
            "/fhir/ValueSet/$validate-code",
            &parameters(json!([
                {"name": "url", "valueUri": canon("ValueSet/dm1990-classe-2")},
                {"name": "coding", "valueCoding": {"system": ICD9, "code": "003.0", "display": "Salmonella gastroenteritis"}}
            ])),
        )
        .await;
    assert_ok(&r);
    assert_eq!(param(&r.body, "result")["valueBoolean"], true, "{}", r.text);
    // salmonellosis is class II, not class V
    let r = app
        .get(&format!(
            "/fhir/ValueSet/dm1990-classe-5/$validate-code?{}",
            q(&[("coding", &format!("{ICD9}|003.0"))])
        ))
        .await;
    assert_ok(&r);
    assert_eq!(param(&r.body, "result")["valueBoolean"], false);
    assert!(
        param(&r.body, "message")["valueString"]
            .as_str()
            .unwrap()
            .contains("not in the value set")
    );
    // LOINC 600-7 in the blood-culture tests; its urine culture is not
    let r = app
        .get(&format!(
            "/fhir/ValueSet/esame-colturale/$validate-code?{}",
            q(&[("system", LOINC), ("code", "600-7")])
        ))
        .await;
    assert_eq!(param(&r.body, "result")["valueBoolean"], true, "{}", r.text);
}

#[tokio::test]
async fn validate_code_with_a_wrong_display_answers_like_the_r4_example() {
    let app = TestApp::sqlite().await;
    // R4 example: result false, message 'The display "test" is incorrect', display the right one
    let r = app
        .get(&format!(
            "/fhir/ValueSet/esame-colturale/$validate-code?{}",
            q(&[("system", LOINC), ("code", "600-7"), ("display", "test")])
        ))
        .await;
    assert_ok(&r);
    let names: Vec<&str> = r.body["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["result", "message", "display"]);
    assert_eq!(param(&r.body, "result")["valueBoolean"], false);
    assert!(
        param(&r.body, "message")["valueString"]
            .as_str()
            .unwrap()
            .starts_with("The display \"test\" is incorrect")
    );
    assert_eq!(
        param(&r.body, "display")["valueString"],
        "Bacteria identified in Blood by Culture"
    );
    // the right display, in another case and spacing, is accepted
    let r = app
        .get(&format!(
            "/fhir/ValueSet/esame-colturale/$validate-code?{}",
            q(&[
                ("system", LOINC),
                ("code", "600-7"),
                ("display", "bacteria identified in  blood by culture")
            ])
        ))
        .await;
    assert_eq!(param(&r.body, "result")["valueBoolean"], true, "{}", r.text);
}

#[tokio::test]
async fn validate_code_of_an_unknown_code_or_system_is_false_not_an_error() {
    let app = TestApp::sqlite().await;
    for (system, code, says) in [
        (ICD9, "041.99", "Unknown code '041.99'"),
        (
            "http://example.org/nowhere",
            "x",
            "is not known to this server",
        ),
        (LOINC, "1963-8", "fragment"),
    ] {
        let r = app
            .get(&format!(
                "/fhir/ValueSet/dm1990-classe-3/$validate-code?{}",
                q(&[("system", system), ("code", code)])
            ))
            .await;
        assert_ok(&r);
        assert_eq!(param(&r.body, "result")["valueBoolean"], false);
        let message = param(&r.body, "message")["valueString"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }
    // a grouping code (the tuberculosis section) is valid only with abstract=true
    let section = format!(
        "/fhir/ValueSet/dm1990-classe-3/$validate-code?{}",
        q(&[("system", ICD9), ("code", "010-018")])
    );
    let r = app.get(&section).await;
    assert_eq!(
        param(&r.body, "result")["valueBoolean"],
        false,
        "{}",
        r.text
    );
    let r = app.get(&format!("{section}&abstract=true")).await;
    assert_eq!(param(&r.body, "result")["valueBoolean"], true, "{}", r.text);
    // what cannot be asked is an error: no system, no code, an unknown value set
    let r = app
        .get("/fhir/ValueSet/dm1990-classe-3/$validate-code?code=011.93")
        .await;
    assert_outcome(&r, StatusCode::BAD_REQUEST, "invalid", Some("system"));
    let r = app
        .get("/fhir/ValueSet/dm1990-classe-3/$validate-code")
        .await;
    assert_outcome(&r, StatusCode::BAD_REQUEST, "invalid", Some("code"));
    let r = app
        .get(&format!(
            "/fhir/ValueSet/no-such/$validate-code?{}",
            q(&[("system", ICD9), ("code", "011.93")])
        ))
        .await;
    assert_outcome(&r, StatusCode::NOT_FOUND, "not-found", None);
}

#[tokio::test]
async fn validate_code_of_a_codeable_concept_with_a_laboratory_code() {
    let app = TestApp::sqlite().await;
    // the laboratory's own code and the SNOMED CT organism code: valid, with a warning for the first
    let r = app
        .post(
            "/fhir/ValueSet/klebsiella-pneumoniae/$validate-code",
            &parameters(json!([
                {"name": "codeableConcept", "valueCodeableConcept": {"coding": [
                    {"system": NIGUARDA, "code": "KPN"},
                    {"system": SNOMED, "code": "56415008"}
                ], "text": "Klebsiella pneumoniae"}}
            ])),
        )
        .await;
    assert_ok(&r);
    assert_eq!(param(&r.body, "result")["valueBoolean"], true);
    assert_eq!(
        param(&r.body, "display")["valueString"],
        "Klebsiella pneumoniae"
    );
    assert!(
        param(&r.body, "message")["valueString"]
            .as_str()
            .unwrap()
            .contains("KPN")
    );
    // E. coli is not K. pneumoniae
    let r = app
        .post(
            "/fhir/ValueSet/klebsiella-pneumoniae/$validate-code",
            &parameters(json!([
                {"name": "codeableConcept", "valueCodeableConcept": {"coding": [
                    {"system": SNOMED, "code": "112283007"}]}}
            ])),
        )
        .await;
    assert_eq!(
        param(&r.body, "result")["valueBoolean"],
        false,
        "{}",
        r.text
    );
    // code and coding together is ambiguous
    let r = app
        .post(
            "/fhir/ValueSet/klebsiella-pneumoniae/$validate-code",
            &parameters(json!([
                {"name": "code", "valueCode": "56415008"},
                {"name": "system", "valueUri": SNOMED},
                {"name": "coding", "valueCoding": {"system": SNOMED, "code": "56415008"}}
            ])),
        )
        .await;
    assert_outcome(&r, StatusCode::BAD_REQUEST, "invalid", Some("coding"));
}

#[tokio::test]
async fn validate_code_against_all_of_icd9() {
    let app = TestApp::sqlite().await;
    let whole = format!("{ICD9}?fhir_vs");
    for (code, valid) in [("041.3", true), ("V09.1", true), ("041.99", false)] {
        let r = app
            .get(&format!(
                "/fhir/ValueSet/$validate-code?{}",
                q(&[("url", &whole), ("system", ICD9), ("code", code)])
            ))
            .await;
        assert_ok(&r);
        assert_eq!(param(&r.body, "result")["valueBoolean"], valid, "{code}");
    }
}

// =================================================================================================
// $translate

#[tokio::test]
async fn translate_a_laboratory_code_to_loinc_get_and_post() {
    let app = TestApp::sqlite().await;
    let map = terminology_file("ConceptMap-laboratorio-niguarda.json");
    let r = app
        .get(&format!(
            "/fhir/ConceptMap/$translate?{}",
            q(&[("system", NIGUARDA), ("code", "MEM-I")])
        ))
        .await;
    assert_ok(&r);
    // R4 example: result, then match with equivalence, concept (a Coding) and source
    assert_eq!(param(&r.body, "result")["valueBoolean"], true);
    let matches = params(&r.body, "match");
    assert_eq!(matches.len(), 1, "{}", r.text);
    let m = matches[0];
    assert_eq!(part(m, "equivalence")["valueCode"], "equivalent");
    let concept = &part(m, "concept")["valueCoding"];
    assert_eq!(concept["system"], LOINC);
    assert_eq!(concept["code"], "18943-1");
    assert_eq!(concept["display"], "Meropenem [Susceptibility]");
    assert_eq!(part(m, "source")["valueUri"], map["url"]);
    // instance level, a Coding in a Parameters body
    let r = app
        .post(
            "/fhir/ConceptMap/laboratorio-niguarda/$translate",
            &parameters(json!([
                {"name": "coding", "valueCoding": {"system": NIGUARDA, "code": "KPN"}}
            ])),
        )
        .await;
    assert_ok(&r);
    let concept = &part(param(&r.body, "match"), "concept")["valueCoding"];
    assert_eq!(concept["system"], SNOMED);
    assert_eq!(concept["code"], "56415008");
    // every element of the map translates to its target
    for g in map["group"].as_array().unwrap() {
        for e in g["element"].as_array().unwrap() {
            let r = app
                .get(&format!(
                    "/fhir/ConceptMap/laboratorio-niguarda/$translate?{}",
                    q(&[
                        ("system", g["source"].as_str().unwrap()),
                        ("code", e["code"].as_str().unwrap())
                    ])
                ))
                .await;
            let concept = &part(param(&r.body, "match"), "concept")["valueCoding"];
            assert_eq!(concept["code"], e["target"][0]["code"], "{}", e["code"]);
            assert_eq!(concept["system"], g["target"]);
        }
    }
}

#[tokio::test]
async fn translate_in_reverse_to_a_target_system_and_without_a_match() {
    let app = TestApp::sqlite().await;
    let r = app
        .get(&format!(
            "/fhir/ConceptMap/$translate?{}",
            q(&[
                ("system", LOINC),
                ("code", "18943-1"),
                ("targetsystem", NIGUARDA),
                ("reverse", "true")
            ])
        ))
        .await;
    assert_ok(&r);
    let matches = params(&r.body, "match");
    assert_eq!(matches.len(), 1, "{}", r.text);
    assert_eq!(part(matches[0], "concept")["valueCoding"]["code"], "MEM-I");
    // a code nothing maps: result false with a message, not an error
    let r = app
        .get(&format!(
            "/fhir/ConceptMap/$translate?{}",
            q(&[("system", NIGUARDA), ("code", "NOPE")])
        ))
        .await;
    assert_ok(&r);
    assert_eq!(param(&r.body, "result")["valueBoolean"], false);
    assert!(params(&r.body, "match").is_empty());
    assert!(
        param(&r.body, "message")["valueString"]
            .as_str()
            .unwrap()
            .contains("No mapping")
    );
    // a map scoped by its source ValueSet: the LOINC susceptibility test → meropenem
    let r = app
        .get(&format!(
            "/fhir/ConceptMap/$translate?{}",
            q(&[
                ("system", LOINC),
                ("code", "18943-1"),
                ("source", &canon("ValueSet/suscettibilita-carbapenemi"))
            ])
        ))
        .await;
    assert_ok(&r);
    let m = params(&r.body, "match");
    assert_eq!(m.len(), 1, "{}", r.text);
    assert_eq!(part(m[0], "concept")["valueCoding"]["code"], "MEM");
    assert_eq!(part(m[0], "equivalence")["valueCode"], "wider");
    // unknown maps
    let r = app
        .get("/fhir/ConceptMap/no-such/$translate?system=a&code=b")
        .await;
    assert_outcome(&r, StatusCode::NOT_FOUND, "not-found", None);
    let r = app
        .get(&format!(
            "/fhir/ConceptMap/$translate?{}",
            q(&[
                ("url", "http://example.org/ConceptMap/none"),
                ("system", NIGUARDA),
                ("code", "MEM-I")
            ])
        ))
        .await;
    assert_outcome(&r, StatusCode::NOT_FOUND, "not-found", Some("url"));
}

// =================================================================================================
// Formats

#[tokio::test]
async fn terminology_answers_in_xml_when_asked() {
    let app = TestApp::sqlite().await;
    let r = app
        .get(&format!(
            "/fhir/ValueSet/dm1990-classe-3/$validate-code?{}&_format=xml",
            q(&[("system", ICD9), ("code", "011.93")])
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/fhir+xml")
    );
    assert!(r.text.contains("<Parameters"), "{}", r.text);
    assert!(
        r.text.contains("<valueBoolean value=\"true\"/>"),
        "{}",
        r.text
    );
    let r = app
        .request(
            Method::GET,
            "/fhir/ValueSet/klebsiella-pneumoniae/$expand?filter=ozaenae",
            &[("accept", "application/fhir+xml")],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.text.contains("<expansion>"), "{}", r.text);
    assert!(r.text.contains("<code value=\"65186004\"/>"), "{}", r.text);
}
