//! The dashboard (`/dashboard`): the numbers it shows for seeded cases, each the total of the FHIR
//! search it links to; what a regional client sees and may ask for; who is refused; the login
//! cookie that only the dashboard accepts. Router tests on SQLite and PostgreSQL, and one test
//! that opens the page in headless Chromium (Debian `chromium`, driven by `playwright-core` from
//! tests/browser) against the server binary and saves a screenshot under target/.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use common::TestApp;
use common::process::ServerProcess;
use sentinella::config::Config;
use serde_json::{Value, json};

const CANON: &str = "https://sentinella-fhir.github.io/ig";

const ACCESS: &str = r#"
[[client]]
id = "admin"
role = "admin"
token_sha256 = "TOKEN_ADMIN"

[[client]]
id = "regione-lombardia"
role = "region"
regions = ["030"]
token_sha256 = "TOKEN_LOMBARDIA"
endpoints = ["http://127.0.0.1:"]

[[client]]
id = "lab-niguarda"
role = "laboratory"
token_sha256 = "TOKEN_LAB"

[[client]]
id = "ehr-sacco"
role = "ehr"
token_sha256 = "TOKEN_EHR"

[[client]]
id = "garante"
role = "auditor"
token_sha256 = "TOKEN_AUDITOR"
"#;

const TOKENS: [(&str, &str); 5] = [
    ("TOKEN_ADMIN", "admin-token"),
    ("TOKEN_LOMBARDIA", "lombardia-token"),
    ("TOKEN_LAB", "lab-token"),
    ("TOKEN_EHR", "ehr-token"),
    ("TOKEN_AUDITOR", "auditor-token"),
];

fn with_access(c: &mut Config) {
    c.access_file = Some(common::access_file(ACCESS, &TOKENS));
}

fn bearer(token: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {token}"))
}

// ---------------------------------------------------------------------------------------------
// Seeded cases

fn rfc3339(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn hours_ago(h: i64) -> String {
    rfc3339(jiff::Timestamp::now() - jiff::SignedDuration::from_hours(h))
}

/// The current month in Italy (`YYYY-MM`): the seeded notifications are sent now.
fn this_month() -> String {
    jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::get("Europe/Rome").unwrap())
        .strftime("%Y-%m")
        .to_string()
}

/// Where a patient lives and which ASL notifies.
struct Place {
    comune: &'static str,
    city: &'static str,
    asl: &'static str,
}

const MILANO: Place = Place {
    comune: "015146",
    city: "Milano",
    asl: "030321",
};
const AOSTA: Place = Place {
    comune: "007003",
    city: "Aosta",
    asl: "020101",
};

/// `examples/segnalazione-morbillo-transaction.json` made into another doctor's report: patient
/// `person` (a distinct codice fiscale) living in `place`, ICD-9-CM `code`, diagnosis recorded
/// `recorded_hours_ago`, onset two days ago, optionally in a school (outbreak key and name).
fn report(
    tag: &str,
    person: u32,
    code: &str,
    place: &Place,
    recorded_hours_ago: i64,
    school: Option<(&str, &str)>,
) -> Value {
    let mut b = common::fixture("dm1990/segnalazione-morbillo-transaction.json");
    let cf = sentinella::italy::codice_fiscale::CodiceFiscale::complete(&format!(
        "SPSGNN80A01F{:03}",
        100 + person
    ))
    .unwrap()
    .as_str()
    .to_string();
    for e in b["entry"].as_array_mut().unwrap() {
        let r = &mut e["resource"];
        match r["resourceType"].as_str().unwrap() {
            "Patient" => {
                r["identifier"][0]["value"] = json!(cf);
                e["request"]["ifNoneExist"] =
                    json!(format!("identifier=http://hl7.it/sid/codiceFiscale|{cf}"));
                let r = &mut e["resource"];
                r["address"][0]["city"] = json!(place.city);
                r["address"][0]["_city"]["extension"][0]["valueCoding"]["code"] =
                    json!(place.comune);
            }
            "Organization" => {
                r["identifier"][0]["value"] = json!(place.asl);
                e["request"]["ifNoneExist"] =
                    json!(format!("identifier={CANON}/sid/asl|{}", place.asl));
            }
            "Condition" => {
                r["code"]["coding"][0] =
                    json!({"system": "http://hl7.org/fhir/sid/icd-9-cm", "code": code});
                r["onsetDateTime"] = json!(hours_ago(48));
                r["recordedDate"] = json!(hours_ago(recorded_hours_ago));
                if let Some((id, name)) = school {
                    r["extension"] = json!([{
                        "url": format!("{CANON}/StructureDefinition/comunita"),
                        "extension": [
                            {"url": "tipo", "valueCode": "scuola"},
                            {"url": "identificativo", "valueIdentifier": {"system": "https://www.istruzione.it/sid/codice-meccanografico", "value": id}},
                            {"url": "nome", "valueString": name},
                            {"url": "persone-a-rischio", "valueInteger": 120}
                        ]
                    }]);
                }
            }
            "Observation" => r["effectiveDateTime"] = json!(hours_ago(recorded_hours_ago)),
            "Communication" => {
                r["reasonCode"][0]["coding"][0] =
                    json!({"system": "http://hl7.org/fhir/sid/icd-9-cm", "code": code});
                r["sent"] = json!(hours_ago(recorded_hours_ago.min(1)));
            }
            _ => {}
        }
        // every report its own identifiers (the fixture's ifNoneExist would merge them)
        let r = &mut e["resource"];
        if !matches!(
            r["resourceType"].as_str(),
            Some("Patient" | "Organization" | "Practitioner")
        ) {
            let v = format!("{}-{tag}", r["identifier"][0]["value"].as_str().unwrap());
            r["identifier"][0]["value"] = json!(v);
            let system = r["identifier"][0]["system"].as_str().unwrap().to_string();
            e["request"]["ifNoneExist"] = json!(format!("identifier={system}|{v}"));
        }
    }
    b
}

/// A community name that must come out escaped.
const SCHOOL_NAME: &str = "Scuola \"Manzoni\" <b>primaria</b>";

/// Lombardy (Milano): two class II measles reports within their 48 h, one late (recorded five days
/// ago), one class I cholera, two class IV pediculosis cases in one school (an outbreak), two CRE
/// K. pneumoniae bacteraemias; Valle d'Aosta: one class II measles. A Lombard Subscription to CRE
/// cases whose endpoint refuses connections.
async fn seed(app: &TestApp) {
    let admin = bearer("admin-token");
    let h = [(admin.0, admin.1.as_str())];
    let reports = [
        report("m1", 1, "055.9", &MILANO, 1, None),
        report("m2", 2, "055.9", &MILANO, 2, None),
        report("m3", 3, "055.9", &MILANO, 120, None),
        report("c1", 4, "001", &MILANO, 1, None),
        report(
            "p1",
            5,
            "132.0",
            &MILANO,
            1,
            Some(("MIEE000001", SCHOOL_NAME)),
        ),
        report(
            "p2",
            6,
            "132.0",
            &MILANO,
            1,
            Some(("MIEE000001", SCHOOL_NAME)),
        ),
        report("a1", 7, "055.9", &AOSTA, 1, None),
    ];
    for b in &reports {
        let r = app.post_with("/fhir", b, &h).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    for person in [1, 2] {
        let b = common::distinct_lab_transaction(&format!("dash-{person}"), 500 + person);
        let r = app.post_with("/fhir", &b, &h).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    let lombardia = bearer("lombardia-token");
    let sub = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Casi CRE della Lombardia",
        "criteria": format!("{CANON}/SubscriptionTopic/cre-case"),
        "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/nessuno", "payload": "application/fhir+json"}
    });
    let r = app
        .post_with(
            "/fhir/Subscription",
            &sub,
            &[(lombardia.0, lombardia.1.as_str())],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
}

// ---------------------------------------------------------------------------------------------
// Reading the page

/// Every number of a page (`data-n` key → (number, link)).
fn numbers(html: &str) -> BTreeMap<String, (i64, String)> {
    let mut out = BTreeMap::new();
    for part in html.split("data-n=\"").skip(1) {
        let key = part.split('"').next().unwrap().to_string();
        let href = part
            .split("href=\"")
            .nth(1)
            .and_then(|h| h.split('"').next())
            .unwrap()
            .replace("&amp;", "&");
        let n: i64 = part
            .split('>')
            .nth(1)
            .and_then(|t| t.split('<').next())
            .unwrap()
            .parse()
            .unwrap();
        out.insert(key, (n, href));
    }
    out
}

fn n(numbers: &BTreeMap<String, (i64, String)>, key: &str) -> i64 {
    numbers
        .get(key)
        .unwrap_or_else(|| panic!("the page shows no number {key}: {:?}", numbers.keys()))
        .0
}

/// What admin and Lombardy must see for the seeded cases, by key.
fn expected(month: &str, lombardy: bool) -> Vec<(String, i64)> {
    let mut e = vec![
        (format!("casi/classe-1/{month}"), 1),
        ("casi/classe-1/totale".into(), 1),
        (
            format!("casi/classe-2/{month}"),
            if lombardy { 3 } else { 4 },
        ),
        ("casi/classe-2/totale".into(), if lombardy { 3 } else { 4 }),
        ("casi/classe-3/totale".into(), 0),
        // class IV goes to the ASL only: a region never sees it
        (
            format!("casi/classe-4/{month}"),
            if lombardy { 0 } else { 2 },
        ),
        (format!("casi/cre/{month}"), 2),
        ("casi/cre/totale".into(), 2),
        (format!("cre/klebsiella-pneumoniae/{month}"), 2),
        ("cre/klebsiella-pneumoniae/totale".into(), 2),
        ("cre/escherichia-coli/totale".into(), 0),
        // m1, m2, c1 (+ p1, p2 and Aosta's a1 for the administrator); m3's deadline has passed
        ("scadenze/aperte".into(), if lombardy { 3 } else { 6 }),
        ("ritardo/classe-1".into(), 0),
        ("ritardo/classe-2".into(), 1),
        ("ritardo/classe-4".into(), 0),
        ("focolai/attivi".into(), 1),
        ("sottoscrizioni/totale".into(), 1),
    ];
    e.sort();
    e
}

async fn page(app: &TestApp, query: &str, token: Option<&str>) -> common::Resp {
    let auth = token.map(bearer);
    let headers: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    app.request(Method::GET, &format!("/dashboard{query}"), &headers, None)
        .await
}

/// Each number is the `total` of the search it links to, run with the same token.
async fn links_give_the_numbers(
    app: &TestApp,
    nums: &BTreeMap<String, (i64, String)>,
    token: &str,
) {
    let auth = bearer(token);
    for (key, (count, href)) in nums {
        let r = app
            .request(Method::GET, href, &[(auth.0, auth.1.as_str())], None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{key}: {href}: {}", r.text);
        if href.ends_with("/$status") {
            // the delivery state: what is still to go out is at most what was produced
            let status = &r.body["entry"][0]["resource"];
            assert_eq!(status["resourceType"], "Parameters", "{key}: {}", r.text);
            let produced: i64 = status["parameter"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == "events-since-subscription-start")
                .and_then(|p| p["valueString"].as_str()?.parse().ok())
                .expect("events-since-subscription-start");
            assert!(*count <= produced, "{key}: {count} waiting of {produced}");
            continue;
        }
        assert_eq!(r.body["total"], json!(count), "{key}: {href}");
    }
}

// ---------------------------------------------------------------------------------------------
// Router tests (no browser), on both databases

on_both_databases_with! { with_access;
    async fn the_numbers_are_the_seeded_cases_and_their_searches(app) {
        seed(&app).await;
        let month = this_month();

        let r = page(&app, "", Some("admin-token")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(r.header("content-type").unwrap().starts_with("text/html"));
        assert!(r.header("content-security-policy").unwrap().contains("default-src 'none'"));
        let nums = numbers(&r.text);
        let shown: Vec<(String, i64)> = expected(&month, false)
            .into_iter()
            .map(|(k, _)| (k.clone(), n(&nums, &k)))
            .collect();
        assert_eq!(shown, expected(&month, false));
        // a month before the cases: nothing
        let earlier = &nums
            .keys()
            .find(|k| k.starts_with("casi/classe-2/") && !k.ends_with("totale") && !k.ends_with(&month))
            .cloned()
            .expect("twelve months by default");
        assert_eq!(n(&nums, earlier), 0);
        // the outbreak's school comes out escaped, never as markup
        assert!(r.text.contains("Scuola &quot;Manzoni&quot; &lt;b&gt;primaria&lt;/b&gt;"), "{}", r.text);
        assert!(!r.text.contains("<b>primaria"));
        assert!(r.text.contains("Epicurva CRE per specie e mese"));
        // diseases by the decree's Italian names, not ICD-9-CM's English displays
        assert!(r.text.contains(">055 Morbillo</td>"), "{}", r.text);
        assert!(r.text.contains(">001 Colera</td>"), "{}", r.text);
        assert!(!r.text.contains("Measles"));
        links_give_the_numbers(&app, &nums, "admin-token").await;

        // the region filter: Valle d'Aosta alone
        let r = page(&app, "?regione=020", Some("admin-token")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let aosta = numbers(&r.text);
        assert_eq!(n(&aosta, "casi/classe-2/totale"), 1);
        assert_eq!(n(&aosta, "casi/cre/totale"), 0);
        assert_eq!(n(&aosta, "scadenze/aperte"), 1);
        links_give_the_numbers(&app, &aosta, "admin-token").await;
    }

    async fn a_region_sees_its_own_cases_only(app) {
        seed(&app).await;
        let month = this_month();
        let r = page(&app, "", Some("lombardia-token")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let nums = numbers(&r.text);
        let shown: Vec<(String, i64)> = expected(&month, true)
            .into_iter()
            .map(|(k, _)| (k.clone(), n(&nums, &k)))
            .collect();
        assert_eq!(shown, expected(&month, true));
        // the region choice offers its own region only
        assert!(r.text.contains(r#"<option value="030""#));
        assert!(!r.text.contains(r#"<option value="020""#));
        assert!(!r.text.contains(SCHOOL_NAME));
        links_give_the_numbers(&app, &nums, "lombardia-token").await;
        // another region is refused, not shown empty
        let r = page(&app, "?regione=020", Some("lombardia-token")).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
        let r = page(&app, "?regione=030", Some("lombardia-token")).await;
        assert_eq!(r.status, StatusCode::OK);
        // the same numbers (their links name the region too)
        let counts = |m: &BTreeMap<String, (i64, String)>| {
            m.iter().map(|(k, v)| (k.clone(), v.0)).collect::<Vec<_>>()
        };
        assert_eq!(counts(&numbers(&r.text)), counts(&nums));
    }
}

on_both_databases_with! { with_access;
    async fn who_may_look_and_how_they_log_in(app) {
        for token in ["lab-token", "ehr-token", "auditor-token"] {
            let r = page(&app, "", Some(token)).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{token}: {}", r.text);
            assert!(r.text.contains("non può consultare il cruscotto"));
        }
        // no token: the login form; a wrong one: refused there
        let r = page(&app, "", None).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        assert_eq!(r.header("location"), Some("/dashboard/login"));
        let r = page(&app, "", Some("wrong-token")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(r.text.contains("token non riconosciuto"));

        let form = |token: &str| format!("token={token}").into_bytes();
        let login = |token: &'static str, origin: &'static str| {
            let app = &app;
            async move {
                app.request(
                    Method::POST,
                    "/dashboard/login",
                    &[
                        ("content-type", "application/x-www-form-urlencoded"),
                        ("host", "127.0.0.1:8080"),
                        ("origin", origin),
                    ],
                    Some(form(token)),
                )
                .await
            }
        };
        let r = login("lab-token", "http://127.0.0.1:8080").await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(r.header("set-cookie").is_none());
        let r = login("lombardia-token", "https://evil.example").await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(r.header("set-cookie").is_none());
        let r = login("lombardia-token", "http://127.0.0.1:8080").await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
        let cookie = r.header("set-cookie").unwrap().to_string();
        for attribute in ["HttpOnly", "SameSite=Strict", "Path=/dashboard"] {
            assert!(cookie.contains(attribute), "{cookie}");
        }
        let pair = cookie.split(';').next().unwrap().to_string();
        let r = app
            .request(Method::GET, "/dashboard", &[("cookie", pair.as_str())], None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(r.text.contains("regione-lombardia"));
        // the cookie opens the dashboard only, never the API
        let r = app
            .request(Method::GET, "/fhir/Communication", &[("cookie", pair.as_str())], None)
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        // logging out clears it
        let r = app
            .request(
                Method::POST,
                "/dashboard/logout",
                &[("cookie", pair.as_str()), ("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:8080")],
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    }

    async fn filters_are_validated_and_bounded(app) {
        for (query, why) in [
            ("?regione=999", "non è un codice di regione"),
            ("?regione=%3Cscript%3E", "non è un codice di regione"),
            ("?da=2020-01&a=2026-12", "al massimo 36"),
            ("?da=2026-13", "AAAA-MM"),
            ("?da=2026-05&a=2026-04", "viene dopo"),
            ("?%3Cx%3E=1", "parametro sconosciuto"),
        ] {
            let r = page(&app, query, Some("admin-token")).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}: {}", r.text);
            assert!(r.text.contains(why), "{query}: {}", r.text);
            assert!(!r.text.contains("<script>") && !r.text.contains("<x>"));
        }
        let r = page(&app, "?da=2024-01&a=2026-12", Some("admin-token")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(numbers(&r.text).contains_key("casi/classe-1/2024-01"));
    }
}

/// Development mode (no access file): no login, the single user sees everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_mode_needs_no_login() {
    let app = TestApp::sqlite().await;
    let r = page(&app, "", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.text.contains("modalità sviluppo"));
    assert_eq!(n(&numbers(&r.text), "casi/classe-2/totale"), 0);
    let r = app
        .request(Method::GET, "/dashboard/login", &[], None)
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
}

// ---------------------------------------------------------------------------------------------
// Headless Chromium against the server binary

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

const CHROMIUM: &str = "/usr/bin/chromium";

/// Chromium and the test's Node package, or a failure that says how to install them.
fn browser_tools() -> PathBuf {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the dashboard test opens the page in Debian's Chromium; install it with\n  apt-get install -y chromium"
    );
    let install = "npm ci --prefix tests/browser";
    let installed = root().join("tests/browser/node_modules/playwright-core/package.json");
    let version = std::fs::read_to_string(&installed)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["version"].as_str().map(String::from));
    let locked: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/browser/package.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        version.as_deref(),
        locked["dependencies"]["playwright-core"].as_str(),
        "playwright-core is not installed in tests/browser/node_modules; install it with\n  {install}"
    );
    match std::process::Command::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => PathBuf::from("node"),
        _ => panic!("node (Node.js 20 or later) is needed to run tests/browser/dashboard.mjs"),
    }
}

/// The seeded cases posted to a running server (the same requests as `seed`).
async fn seed_server(origin: &str) {
    let client = reqwest::Client::new();
    let post = |path: &str, token: &str, body: &Value| {
        client
            .post(format!("{origin}{path}"))
            .bearer_auth(token)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
    };
    let reports = [
        report("m1", 1, "055.9", &MILANO, 1, None),
        report("m2", 2, "055.9", &MILANO, 2, None),
        report("m3", 3, "055.9", &MILANO, 120, None),
        report("c1", 4, "001", &MILANO, 1, None),
        report(
            "p1",
            5,
            "132.0",
            &MILANO,
            1,
            Some(("MIEE000001", SCHOOL_NAME)),
        ),
        report(
            "p2",
            6,
            "132.0",
            &MILANO,
            1,
            Some(("MIEE000001", SCHOOL_NAME)),
        ),
        report("a1", 7, "055.9", &AOSTA, 1, None),
    ];
    for b in &reports {
        let r = post("/fhir", "admin-token", b).await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    for person in [1, 2] {
        let b = common::distinct_lab_transaction(&format!("dash-{person}"), 500 + person);
        let r = post("/fhir", "admin-token", &b).await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    let sub = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Casi CRE della Lombardia",
        "criteria": format!("{CANON}/SubscriptionTopic/cre-case"),
        "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/nessuno", "payload": "application/fhir+json"}
    });
    let r = post("/fhir/Subscription", "lombardia-token", &sub)
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_headless_chromium() {
    let node = browser_tools();
    let access = common::access_file(ACCESS, &TOKENS);
    let server = ServerProcess::start("dashboard", &["--config", &access]).await;
    seed_server(&server.origin).await;

    let shots = root().join("target/dashboard");
    std::fs::create_dir_all(&shots).unwrap();
    let screenshot = shots.join("dashboard-admin.png");
    let scenario_path = std::env::temp_dir().join(format!(
        "sentinella-dashboard-{}.json",
        uuid::Uuid::new_v4().simple()
    ));
    let scenario = json!({
        "base": server.origin,
        "chromium": CHROMIUM,
        "screenshot": screenshot,
        "clients": [
            {"name": "admin", "token": "admin-token", "screenshot": true},
            {"name": "lombardia", "token": "lombardia-token"},
            {"name": "lab", "token": "lab-token"},
        ]
    });
    std::fs::write(&scenario_path, scenario.to_string()).unwrap();
    let run = tokio::process::Command::new(&node)
        .arg(root().join("tests/browser/dashboard.mjs"))
        .arg(&scenario_path)
        .current_dir(root())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser run finishes within 3 minutes")
        .expect("node runs");
    let _ = std::fs::remove_file(&scenario_path);
    let _ = std::fs::remove_file(&access);
    assert!(
        output.status.success(),
        "the browser run failed:\n{}\n{}\n--- server log ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        server.log_tail()
    );
    let results: Vec<Value> = serde_json::from_slice(&output.stdout).expect("JSON results");
    println!("dashboard screenshot: {}", screenshot.display());
    assert!(screenshot.exists());

    let month = this_month();
    for (result, lombardy) in [(&results[0], false), (&results[1], true)] {
        let who = &result["name"];
        assert_eq!(result["loginRedirect"], "/dashboard/login", "{who}");
        assert_eq!(result["status"], 200, "{who}: {result}");
        assert_eq!(result["path"], "/dashboard", "{who}");
        let cookie = &result["cookies"][0];
        assert_eq!(cookie["name"], "sentinella_dashboard");
        assert_eq!(cookie["path"], "/dashboard");
        assert_eq!(cookie["httpOnly"], true);
        assert_eq!(cookie["sameSite"], "Strict");
        let shown: Vec<(String, i64)> = expected(&month, lombardy)
            .into_iter()
            .map(|(k, _)| {
                let v = result["numbers"][&k]["n"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("{who}: no number {k} in {}", result["numbers"]));
                (k, v)
            })
            .collect();
        assert_eq!(shown, expected(&month, lombardy), "{who}");
        assert_eq!(
            result["sections"],
            json!(["casi", "cre", "scadenze", "focolai", "sottoscrizioni"]),
            "{who}"
        );
        // bars drawn for the month with cases (and nothing else)
        assert!(result["charts"][0].as_u64().unwrap() >= 1, "{who}");
        assert_eq!(result["charts"][1], 1, "{who}: one species this month");
        assert_eq!(result["afterLogout"], "/dashboard/login", "{who}");
        assert_eq!(result["cookiesAfterLogout"], 0, "{who}");
        // everything the page needed came from this server
        for url in result["requests"].as_array().unwrap() {
            assert!(
                url.as_str().unwrap().starts_with(&server.origin),
                "{who}: the page fetched {url}"
            );
        }
    }
    assert!(results[0]["viewer"].as_str().unwrap().contains("admin"));
    let lombardy = &results[1];
    assert!(lombardy["viewer"].as_str().unwrap().contains("Lombardia"));
    assert_eq!(lombardy["regions"], json!(["", "030"]));
    let lab = &results[2];
    assert_eq!(lab["status"], 403, "{lab}");
    assert!(
        lab["message"]
            .as_str()
            .unwrap()
            .contains("non può consultare il cruscotto")
    );
    assert_eq!(lab["cookies"], json!([]));
}
