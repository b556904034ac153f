//! Access rules hold however the request is written: the decision is made on the routed, decoded
//! request (issue "Security and hardening"), and conditional matches disclose nothing a client may
//! not read. On SQLite and PostgreSQL, with an access file holding an admin, a laboratory, an EHR
//! and two regions.
mod common;

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use common::{Resp, TestApp};
use sentinella::config::Config;
use serde_json::{Value, json};

const ACCESS: &str = r#"
[[client]]
id = "admin"
role = "admin"
token_sha256 = "TOKEN_ADMIN"

[[client]]
id = "lab-niguarda"
role = "laboratory"
token_sha256 = "TOKEN_LAB"

[[client]]
id = "ehr-sacco"
role = "ehr"
token_sha256 = "TOKEN_EHR"

[[client]]
id = "regione-lombardia"
role = "region"
regions = ["030"]
token_sha256 = "TOKEN_LOMBARDIA"
endpoints = ["http://127.0.0.1:", "https://sorveglianza.regione.lombardia.it/"]

[[client]]
id = "regione-piemonte"
role = "region"
regions = ["010"]
token_sha256 = "TOKEN_PIEMONTE"
endpoints = ["https://sorveglianza.regione.piemonte.it/"]

[[client]]
id = "garante"
role = "auditor"
token_sha256 = "TOKEN_AUDITOR"
"#;

const ROLES: [(&str, &str); 6] = [
    ("admin", "admin-token"),
    ("laboratory", "lab-token"),
    ("ehr", "ehr-token"),
    ("lombardia", "lombardia-token"),
    ("piemonte", "piemonte-token"),
    ("auditor", "auditor-token"),
];

fn with_access(c: &mut Config) {
    c.access_file = Some(common::access_file(
        ACCESS,
        &[
            ("TOKEN_ADMIN", "admin-token"),
            ("TOKEN_LAB", "lab-token"),
            ("TOKEN_EHR", "ehr-token"),
            ("TOKEN_LOMBARDIA", "lombardia-token"),
            ("TOKEN_PIEMONTE", "piemonte-token"),
            ("TOKEN_AUDITOR", "auditor-token"),
        ],
    ));
}

fn bearer(token: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {token}"))
}

async fn call(app: &TestApp, method: Method, uri: &str, token: &str, body: Option<&Value>) -> Resp {
    let (k, v) = bearer(token);
    let mut headers = vec![(k, v.as_str())];
    if body.is_some() {
        headers.push(("content-type", "application/fhir+json"));
    }
    app.request(
        method,
        uri,
        &headers,
        body.map(|b| serde_json::to_vec(b).unwrap()),
    )
    .await
}

/// Percent-encode every character of a type name (what a client may send; the router decodes it).
fn encoded(rt: &str) -> String {
    rt.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// A measles segnalazione of a patient living in Milano (Lombardia, 030): a class II case.
fn segnalazione_bundle() -> Value {
    serde_json::from_str(include_str!(
        "fixtures/dm1990/segnalazione-morbillo-transaction.json"
    ))
    .unwrap()
}

/// A case of Lombardia, made by the EHR's segnalazione; its id.
async fn a_lombardia_case(app: &TestApp) -> String {
    let r = call(
        app,
        Method::POST,
        "/fhir",
        "ehr-token",
        Some(&segnalazione_bundle()),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let found = call(
        app,
        Method::GET,
        "/fhir/Communication?category=https://sentinella-fhir.github.io/ig/CodeSystem/tipo-notifica|classe-2",
        "admin-token",
        None,
    )
    .await;
    found.body["entry"][0]["resource"]["id"]
        .as_str()
        .expect("the case")
        .to_string()
}

async fn route_matrix_encoded_types_decide_like_plain_ones(app: TestApp) {
    // every served type × role × (search, read, create, history): the encoded path gets the same
    // answer as the plain one, and a refusal is a 403 either way
    let types = sentinella::fhir::SERVED_TYPES;
    for (role, token) in ROLES {
        for rt in types {
            for (method, suffix, body) in [
                (Method::GET, "?_count=1", None),
                (Method::GET, "/no-such-id", None),
                (Method::GET, "/_history?_count=1", None),
                (Method::POST, "", Some(json!({"resourceType": rt}))),
            ] {
                let plain = call(
                    &app,
                    method.clone(),
                    &format!("/fhir/{rt}{suffix}"),
                    token,
                    body.as_ref(),
                )
                .await;
                let enc = call(
                    &app,
                    method.clone(),
                    &format!("/fhir/{}{suffix}", encoded(rt)),
                    token,
                    body.as_ref(),
                )
                .await;
                assert_eq!(
                    plain.status, enc.status,
                    "{role} {method} {rt}{suffix}: plain {} vs encoded {}: {}",
                    plain.status, enc.status, enc.text
                );
            }
        }
    }
}

/// The auditor reads the audit trail and nothing else; nobody writes the trail (405), plain or
/// encoded.
async fn route_matrix_the_audit_trail_is_the_auditors_alone(app: TestApp) {
    for (role, token) in ROLES {
        for name in ["AuditEvent".to_string(), encoded("AuditEvent")] {
            for (method, suffix) in [
                (Method::GET, "?_count=1"),
                (Method::GET, "/no-such-id"),
                (Method::GET, "/_history?_count=1"),
            ] {
                let r = call(
                    &app,
                    method.clone(),
                    &format!("/fhir/{name}{suffix}"),
                    token,
                    None,
                )
                .await;
                let expected = match (role, suffix) {
                    ("auditor", "/no-such-id") => StatusCode::NOT_FOUND,
                    ("auditor", _) => StatusCode::OK,
                    _ => StatusCode::FORBIDDEN,
                };
                assert_eq!(
                    r.status, expected,
                    "{role} {method} {name}{suffix}: {}",
                    r.text
                );
            }
            let body = json!({"resourceType": "AuditEvent"});
            for (method, suffix) in [
                (Method::POST, ""),
                (Method::PUT, "/x"),
                (Method::DELETE, "/x"),
                (Method::DELETE, "?_id=x"),
            ] {
                let r = call(
                    &app,
                    method.clone(),
                    &format!("/fhir/{name}{suffix}"),
                    token,
                    Some(&body),
                )
                .await;
                assert_eq!(
                    r.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{role} {method} {name}{suffix}: {}",
                    r.text
                );
            }
        }
    }
    for rt in sentinella::fhir::SERVED_TYPES
        .iter()
        .filter(|t| **t != "AuditEvent")
    {
        let r = call(
            &app,
            Method::GET,
            &format!("/fhir/{rt}"),
            "auditor-token",
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "auditor GET {rt}");
        let r = call(
            &app,
            Method::POST,
            &format!("/fhir/{rt}"),
            "auditor-token",
            Some(&json!({"resourceType": rt})),
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "auditor POST {rt}");
    }
    let r = call(&app, Method::GET, "/fhir/_history", "auditor-token", None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

async fn percent_encoded_type_does_not_open_case_notifications_to_a_laboratory(app: TestApp) {
    let case = a_lombardia_case(&app).await;
    for token in ["lab-token", "ehr-token"] {
        for uri in [
            format!("/fhir/{}", encoded("Communication")),
            format!("/fhir/{}/{case}", encoded("Communication")),
            format!("/fhir/{}/{case}/_history", encoded("Communication")),
            format!("/fhir/Communic%61tion/{case}"),
        ] {
            let r = call(&app, Method::GET, &uri, token, None).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{token} {uri}: {}", r.text);
            assert!(!r.text.contains(&case) || uri.contains(&case), "{}", r.text);
        }
    }
    // a region reads no Patient and no Observation history, encoded or not
    for uri in [
        format!("/fhir/{}", encoded("Patient")),
        format!("/fhir/{}/_history", encoded("Observation")),
    ] {
        let r = call(&app, Method::GET, &uri, "lombardia-token", None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{uri}: {}", r.text);
    }
}

const CRITERIA_QUERY: &str =
    "criteria=https://sentinella-fhir.github.io/ig/SubscriptionTopic/notifiable-case";

fn subscription(secret: &str, endpoint: &str) -> Value {
    json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "casi della regione",
        "criteria": "https://sentinella-fhir.github.io/ig/SubscriptionTopic/notifiable-case",
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "header": [format!("Authorization: Bearer {secret}")]
        }
    })
}

async fn conditional_create_never_returns_another_clients_subscription(app: TestApp) {
    let mine = subscription(
        "segreto-lombardia",
        "https://sorveglianza.regione.lombardia.it/hook",
    );
    let r = call(
        &app,
        Method::POST,
        "/fhir/Subscription",
        "lombardia-token",
        Some(&mine),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // Piemonte asks for "a Subscription to notifiable-case, unless one exists"
    let theirs = subscription(
        "segreto-piemonte",
        "https://sorveglianza.regione.piemonte.it/hook",
    );
    let (k, v) = bearer("piemonte-token");
    let r = app
        .request(
            Method::POST,
            "/fhir/Subscription",
            &[
                (k, v.as_str()),
                ("content-type", "application/fhir+json"),
                ("if-none-exist", CRITERIA_QUERY),
            ],
            Some(serde_json::to_vec(&theirs).unwrap()),
        )
        .await;
    assert!(!r.text.contains("segreto-lombardia"), "{}", r.text);
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // the same through a transaction's ifNoneExist
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{
        "fullUrl": "urn:uuid:9b7d0a2e-6a43-4c57-9f1e-0d5c2b1a7e01",
        "resource": theirs,
        "request": {"method": "POST", "url": "Subscription", "ifNoneExist": CRITERIA_QUERY}
    }]});
    let r = call(&app, Method::POST, "/fhir", "piemonte-token", Some(&bundle)).await;
    assert!(!r.text.contains("segreto-lombardia"), "{}", r.text);
}

async fn conditional_create_never_returns_a_case_the_client_may_not_read(app: TestApp) {
    let case = a_lombardia_case(&app).await;
    let query = format!("identifier=https://sentinella-fhir.github.io/ig/sid/caso|{case}");
    // Piemonte, in a transaction: the entry must not yield Lombardia's case
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{
        "fullUrl": "urn:uuid:9b7d0a2e-6a43-4c57-9f1e-0d5c2b1a7e02",
        "resource": {"resourceType": "Communication", "status": "completed"},
        "request": {"method": "POST", "url": "Communication", "ifNoneExist": query}
    }]});
    let r = call(&app, Method::POST, "/fhir", "piemonte-token", Some(&bundle)).await;
    assert!(
        !r.text.contains("Batteriemia") && !r.text.contains("morbillo"),
        "{}",
        r.text
    );
    assert_ne!(r.status, StatusCode::OK, "{}", r.text);
    // the EHR may write Communications but reads none: the match stands, its content is not shown
    let (k, v) = bearer("ehr-token");
    let r = app
        .request(
            Method::POST,
            "/fhir/Communication",
            &[
                (k, v.as_str()),
                ("content-type", "application/fhir+json"),
                ("if-none-exist", query.as_str()),
            ],
            Some(
                serde_json::to_vec(
                    &json!({"resourceType": "Communication", "status": "completed"}),
                )
                .unwrap(),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(!r.text.contains("morbillo"), "{}", r.text);
    let r = call(&app, Method::POST, "/fhir", "ehr-token", Some(&bundle)).await;
    assert!(!r.text.contains("morbillo"), "{}", r.text);
}

async fn conditional_creates_written_differently_but_meaning_the_same_make_one_patient(
    app: TestApp,
) {
    let app = Arc::new(app);
    for round in 0..5 {
        let value = format!("MRN-{round}");
        let tasks: Vec<_> = ["urn:oid:2.16.840.1.113883.2.9.4.3.2|", ""]
            .into_iter()
            .cycle()
            .take(6)
            .enumerate()
            .map(|(i, system)| {
                let app = app.clone();
                let value = value.clone();
                tokio::spawn(async move {
                    let patient = json!({"resourceType": "Patient", "identifier": [{
                        "system": "urn:oid:2.16.840.1.113883.2.9.4.3.2", "value": value}],
                        "name": [{"family": format!("Rossi{i}")}]});
                    let query = format!("identifier={system}{value}");
                    let (k, v) = bearer("lab-token");
                    app.request(
                        Method::POST,
                        "/fhir/Patient",
                        &[
                            (k, v.as_str()),
                            ("content-type", "application/fhir+json"),
                            ("if-none-exist", query.as_str()),
                        ],
                        Some(serde_json::to_vec(&patient).unwrap()),
                    )
                    .await
                })
            })
            .collect();
        for t in tasks {
            let r = t.await.unwrap();
            assert!(r.status.is_success(), "{}", r.text);
        }
        let found = call(
            &app,
            Method::GET,
            &format!("/fhir/Patient?identifier={value}"),
            "admin-token",
            None,
        )
        .await;
        assert_eq!(found.body["total"], 1, "round {round}: {}", found.text);
    }
}

macro_rules! on_both_with_access {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name(super::TestApp::sqlite_with(super::with_access).await).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name(super::TestApp::postgres_with(super::with_access).await).await
                }
            }
        )*
    };
}

/// Item 8: a deleted Subscription's id could be re-created by another client, which then read the
/// previous owner's history (its endpoint and header secret in the old versions).
async fn a_deleted_subscriptions_id_stays_its_owners(app: TestApp) {
    let mut mine = subscription(
        "segreto-lombardia",
        "https://sorveglianza.regione.lombardia.it/hook",
    );
    mine["id"] = json!("sub-lombardia");
    let uri = "/fhir/Subscription/sub-lombardia";
    let r = call(&app, Method::PUT, uri, "lombardia-token", Some(&mine)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = call(&app, Method::DELETE, uri, "lombardia-token", None).await;
    assert!(r.status.is_success(), "{}", r.text);
    let mut theirs = subscription(
        "segreto-piemonte",
        "https://sorveglianza.regione.piemonte.it/hook",
    );
    theirs["id"] = json!("sub-lombardia");
    let r = call(&app, Method::PUT, uri, "piemonte-token", Some(&theirs)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    // the same inside a transaction
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "Subscription/sub-lombardia", "resource": theirs,
         "request": {"method": "PUT", "url": "Subscription/sub-lombardia"}}]});
    let r = call(&app, Method::POST, "/fhir", "piemonte-token", Some(&bundle)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    let h = call(
        &app,
        Method::GET,
        &format!("{uri}/_history"),
        "piemonte-token",
        None,
    )
    .await;
    assert!(!h.text.contains("segreto-lombardia"), "{}", h.text);
    // its owner may bring it back
    let r = call(&app, Method::PUT, uri, "lombardia-token", Some(&mine)).await;
    assert!(r.status.is_success(), "{}", r.text);
}

on_both_with_access!(
    a_deleted_subscriptions_id_stays_its_owners,
    route_matrix_the_audit_trail_is_the_auditors_alone,
    route_matrix_encoded_types_decide_like_plain_ones,
    percent_encoded_type_does_not_open_case_notifications_to_a_laboratory,
    conditional_create_never_returns_another_clients_subscription,
    conditional_create_never_returns_a_case_the_client_may_not_read,
    conditional_creates_written_differently_but_meaning_the_same_make_one_patient,
);

/// Item 4: per-client request rates. A client over its rate is answered 429 with `Retry-After`
/// and nothing runs; other clients are not affected.
async fn a_client_over_its_rate_gets_429_and_others_go_on(app: TestApp) {
    let patient = json!({"resourceType": "Patient", "gender": "female"});
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(
            call(
                &app,
                Method::POST,
                "/fhir/Patient",
                "lab-token",
                Some(&patient),
            )
            .await
            .status,
        );
    }
    let limited = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    // a burst of twice the rate (2/s) passes, the rest of ten immediate requests do not
    assert!(limited >= 5, "{statuses:?}");
    let r = call(
        &app,
        Method::POST,
        "/fhir/Patient",
        "lab-token",
        Some(&patient),
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "{wait}");
    assert_eq!(r.body["issue"][0]["code"], "throttled");
    // what was refused was not written
    let admin = call(
        &app,
        Method::GET,
        "/fhir/Patient?_summary=count",
        "admin-token",
        None,
    )
    .await;
    assert_eq!(
        admin.body["total"].as_i64().unwrap() as usize,
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CREATED)
            .count()
    );
    // another client has its own bucket
    let r = call(&app, Method::GET, "/fhir/Patient", "ehr-token", None).await;
    assert_eq!(r.status, StatusCode::OK);
}

fn with_access_and_a_low_rate(c: &mut Config) {
    with_access(c);
    c.rate_limit_per_second = 2;
}

mod a_client_over_its_rate_gets_429_and_others_go_on {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::a_client_over_its_rate_gets_429_and_others_go_on(
            super::TestApp::sqlite_with(super::with_access_and_a_low_rate).await,
        )
        .await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::a_client_over_its_rate_gets_429_and_others_go_on(
            super::TestApp::postgres_with(super::with_access_and_a_low_rate).await,
        )
        .await
    }
}
