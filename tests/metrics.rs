//! `GET /metrics` (issue 15): the Prometheus exposition changes as the server works — a transaction
//! Bundle's writes and the case it makes, a validation failure by kind, the outbox of a
//! subscription whose endpoint fails — and only monitoring clients and administrators may read it.
//! The recorder is one per process and the tests of this file run in parallel, so every test that
//! compares counters holds `SERIAL` between its two scrapes and compares deltas.
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use common::TestApp;
use common::subscriber::{Hook, case_bundle, subscription};
use sentinella::config::Config;
use serde_json::{Value, json};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One scrape: every sample, keyed by metric name and its labels.
#[derive(Debug)]
struct Scrape {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    /// The sum of the samples of `name` whose labels include every pair of `labels` (0 if none).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|(_, v)| v).sum()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a BTreeMap<String, String>, f64)> + 'a {
        self.samples
            .iter()
            .filter(move |(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, l, v)| (l, *v))
    }

    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }
}

/// Parse the text exposition (label values may hold `{`, `}` and escaped quotes).
fn parse(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => continue,
        };
        let mut labels = BTreeMap::new();
        let mut rest = rest;
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let mut key = String::new();
            let mut end = body.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '}' => {
                        end = i + 1;
                        break;
                    }
                    ',' => {}
                    '=' => {
                        // a quoted value
                        chars.next();
                        let mut value = String::new();
                        while let Some((_, c)) = chars.next() {
                            match c {
                                '\\' => {
                                    if let Some((_, e)) = chars.next() {
                                        value.push(if e == 'n' { '\n' } else { e });
                                    }
                                }
                                '"' => break,
                                other => value.push(other),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    other => key.push(other),
                }
            }
            rest = &body[end..];
        }
        let value = rest.trim().split(' ').next().unwrap_or("");
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("a sample value: {line}")),
        };
        out.push((name.to_string(), labels, value));
    }
    out
}

async fn scrape(app: &TestApp) -> Scrape {
    scrape_as(app, &[]).await
}

async fn scrape_as(app: &TestApp, headers: &[(&str, &str)]) -> Scrape {
    let r = app.request(Method::GET, "/metrics", headers, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.headers
    );
    Scrape {
        samples: parse(&r.text),
        text: r.text,
    }
}

/// The resources a transaction Bundle on a fresh database creates, by type.
fn creates_by_type(bundle: &Value) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for e in bundle["entry"].as_array().expect("entries") {
        assert!(matches!(
            e["request"]["method"].as_str(),
            Some("POST" | "PUT")
        ));
        let rt = e["resource"]["resourceType"].as_str().expect("a type");
        *out.entry(rt.to_string()).or_insert(0.0) += 1.0;
    }
    out
}

const REQUESTS: &str = "sentinella_http_requests_total";
const DURATION: &str = "sentinella_http_request_duration_seconds";

on_both_databases! {
    async fn a_transaction_bundle_counts_its_writes_its_request_and_its_case(app) {
        let bundle = common::fixture("antibiogram-transaction.json");
        let expected = creates_by_type(&bundle);
        let _serial = SERIAL.lock().await;
        let before = scrape(&app).await;
        let r = app.post("/fhir", &bundle).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let after = scrape(&app).await;
        let delta = |name: &str, labels: &[(&str, &str)]| after.value(name, labels) - before.value(name, labels);

        assert_eq!(delta("sentinella_bundles_written_total", &[("type", "transaction")]), 1.0);
        for (rt, n) in &expected {
            assert_eq!(
                delta("sentinella_resources_written_total", &[("type", rt), ("interaction", "create")]),
                *n,
                "{rt}"
            );
        }
        let all: f64 = expected.values().sum();
        assert_eq!(delta("sentinella_resources_written_total", &[]), all);
        // the route is the pattern the router matched, never the raw path
        let route = [("route", "/fhir"), ("method", "POST"), ("status", "200")];
        assert_eq!(delta(REQUESTS, &route), 1.0, "{}", after.text);
        assert_eq!(delta(&format!("{DURATION}_count"), &route), 1.0);
        // a histogram with buckets (a summary would have quantiles)
        assert!(after.has(&format!("{DURATION}_bucket"), &[("route", "/fhir"), ("le", "0.005")]));
        assert!(!after.has(DURATION, &[("quantile", "0.5")]));
        // the fixture is a K. pneumoniae with carbapenem resistance: one CRE case
        assert_eq!(
            delta("sentinella_cases_created_total", &[("rule_set", "cre"), ("category", "cre")]),
            1.0
        );
        assert_eq!(delta("sentinella_cases_withdrawn_total", &[]), 0.0);
        // answered: no write is running any more
        assert_eq!(after.value("sentinella_writes_in_progress", &[]), 0.0);
        if matches!(app.db, common::Db::Sqlite(_)) {
            // every write went through a group commit of at least one member
            assert!(delta("sentinella_commit_group_size_count", &[]) >= 1.0);
        }

        // withdrawing the isolate withdraws the case
        let found = app.get("/fhir/Observation?code=http://loinc.org|600-7").await;
        let mut isolate = found.body["entry"][0]["resource"].clone();
        let id = isolate["id"].as_str().expect("the isolate").to_string();
        isolate["status"] = json!("entered-in-error");
        let before = scrape(&app).await;
        let r = app.put(&format!("/fhir/Observation/{id}"), &isolate, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let after = scrape(&app).await;
        let delta = |name: &str, labels: &[(&str, &str)]| after.value(name, labels) - before.value(name, labels);
        assert_eq!(
            delta("sentinella_cases_withdrawn_total", &[("rule_set", "cre"), ("category", "cre")]),
            1.0
        );
        assert_eq!(
            delta("sentinella_resources_written_total", &[("type", "Observation"), ("interaction", "update")]),
            1.0
        );
        assert_eq!(
            delta(REQUESTS, &[("route", "/fhir/{type}/{id}"), ("method", "PUT"), ("status", "200")]),
            1.0
        );
    }

    async fn unknown_paths_and_methods_share_fixed_labels(app) {
        let _serial = SERIAL.lock().await;
        let before = scrape(&app).await;
        for i in 0..3 {
            let r = app.get(&format!("/no-such-place-{i}")).await;
            assert_eq!(r.status, StatusCode::NOT_FOUND);
        }
        let brew = Method::from_bytes(b"BREW").unwrap();
        app.request(brew, "/fhir/Patient", &[], None).await;
        let after = scrape(&app).await;
        assert!(!after.text.contains("no-such-place"), "a raw path became a label");
        assert!(!after.text.contains("BREW"), "a client's method became a label");
        assert_eq!(
            after.value(REQUESTS, &[("route", "unmatched"), ("status", "404")])
                - before.value(REQUESTS, &[("route", "unmatched"), ("status", "404")]),
            3.0,
            "{}",
            after.text
        );
        assert_eq!(
            after.value(REQUESTS, &[("method", "other")]) - before.value(REQUESTS, &[("method", "other")]),
            1.0
        );
    }
}

on_both_databases! {
    async fn validation_failures_are_counted_by_kind(app) {
        let _serial = SERIAL.lock().await;
        let before = scrape(&app).await;
        // a code outside its required value set, in a resource and in a batch entry
        let patient = json!({"resourceType": "Patient", "gender": "robot"});
        let r = app.post("/fhir/Patient", &patient).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        let kinds: std::collections::BTreeSet<String> = r.body["issue"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["severity"] == "error")
            .map(|i| i["code"].as_str().unwrap().to_string())
            .collect();
        assert!(!kinds.is_empty(), "{}", r.text);
        // too many payload items: the `too-costly` kind, a 422
        let parts: Vec<Value> = (0..201).map(|i| json!({"contentString": format!("parte {i}")})).collect();
        let big = json!({"resourceType": "Communication", "status": "completed", "payload": parts});
        let r = app.post("/fhir/Communication", &big).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        let after = scrape(&app).await;
        let delta = |name: &str, labels: &[(&str, &str)]| after.value(name, labels) - before.value(name, labels);
        for k in &kinds {
            assert_eq!(delta("sentinella_validation_failures_total", &[("kind", k)]), 1.0, "{k}: {}", after.text);
        }
        assert_eq!(delta("sentinella_validation_failures_total", &[("kind", "too-costly")]), 1.0);
        assert_eq!(delta(REQUESTS, &[("route", "/fhir/{type}"), ("method", "POST"), ("status", "400")]), 1.0);
        assert_eq!(delta(REQUESTS, &[("route", "/fhir/{type}"), ("method", "POST"), ("status", "422")]), 1.0);
        // nothing was written
        assert_eq!(delta("sentinella_resources_written_total", &[]), 0.0);
    }
}

/// Fast retries, so a failing endpoint is retried within the test.
fn fast(c: &mut Config) {
    c.delivery_backoff_ms = 50;
    c.delivery_backoff_max_ms = 200;
    c.delivery_poll_ms = 50;
    c.delivery_timeout_ms = 2000;
}

/// Scrape until `done` holds (or fail after `secs`).
async fn scrape_until(
    app: &TestApp,
    secs: u64,
    what: &str,
    done: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = scrape(app).await;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never saw {what}:\n{}", s.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

on_both_databases_with! { fast;
    async fn the_outbox_of_a_failing_endpoint_shows_its_depth_and_age(app) {
        // alone: the delivery counters are the process's, and only this test's deliveries fail
        let _serial = SERIAL.lock().await;
        let hook = Hook::start().await;
        let r = app.post("/fhir/Subscription", &subscription(&hook.url, "cre-case", "id-only", &[], None)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let id = r.body["id"].as_str().unwrap().to_string();
        let mine = [("subscription", id.as_str()), ("topic", "cre-case")];
        let depth = "sentinella_subscription_outbox_depth";
        let age = "sentinella_subscription_oldest_undelivered_age_seconds";
        scrape_until(&app, 20, "the subscription active with nothing waiting", |s| {
            s.value(depth, &[("subscription", &id), ("status", "active")]) == 0.0
                && s.has(depth, &[("subscription", &id), ("status", "active")])
        })
        .await;

        hook.fail(true);
        let failures = [("channel", "rest-hook"), ("reason", "http-5xx")];
        let before = scrape(&app).await;
        for n in 1..=2 {
            let r = app.post("/fhir", &case_bundle(n, "030308")).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        }
        let failing = scrape_until(&app, 20, "two events waiting and failed attempts", |s| {
            s.value(depth, &mine) == 2.0
                && s.value("sentinella_delivery_failures_total", &failures)
                    > before.value("sentinella_delivery_failures_total", &failures)
        })
        .await;
        assert!(failing.value(age, &mine) > 0.0, "{}", failing.text);
        // every attempt since the endpoint went down failed
        let attempts = [("channel", "rest-hook")];
        let tried = failing.value("sentinella_delivery_attempts_total", &attempts)
            - before.value("sentinella_delivery_attempts_total", &attempts);
        let failed = failing.value("sentinella_delivery_failures_total", &failures)
            - before.value("sentinella_delivery_failures_total", &failures);
        // (a scrape may fall between an attempt's two counters: one attempt of slack)
        assert!(
            failed >= 1.0 && tried >= failed && tried - failed <= 1.0,
            "{tried} attempts, {failed} failures"
        );
        assert!(failing.value("sentinella_subscriptions_live", &[]) >= 1.0);
        // the age grows while nothing is delivered
        let older = scrape_until(&app, 10, "an older oldest event", |s| {
            s.value(age, &mine) > failing.value(age, &mine)
        })
        .await;
        assert_eq!(older.value(depth, &mine), 2.0);

        // the endpoint is back (the subscription may have gone to error after its attempts:
        // setting it active again resumes)
        hook.fail(false);
        let current = app.get(&format!("/fhir/Subscription/{id}")).await.body;
        if current["status"] != "active" {
            let mut s = current.clone();
            s["status"] = json!("active");
            let r = app.put(&format!("/fhir/Subscription/{id}"), &s, &[]).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        }
        hook.wait_for("event-notification", 2, 20).await;
        let drained = scrape_until(&app, 20, "an empty outbox", |s| {
            s.has(depth, &mine) && s.value(depth, &mine) == 0.0
        })
        .await;
        assert_eq!(drained.value(age, &mine), 0.0);

        // a subscription that ended has no series any more
        let r = app.delete(&format!("/fhir/Subscription/{id}")).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        scrape_until(&app, 20, "the deleted subscription's series gone", |s| !s.has(depth, &mine)).await;
    }
}

const ACCESS: &str = r#"
[[client]]
id = "admin"
role = "admin"
token_sha256 = "TOKEN_ADMIN"

[[client]]
id = "prometheus"
role = "monitoring"
token_sha256 = "TOKEN_MONITORING"

[[client]]
id = "lab-niguarda"
role = "laboratory"
token_sha256 = "TOKEN_LAB"
"#;

fn with_access(c: &mut Config) {
    c.access_file = Some(common::access_file(
        ACCESS,
        &[
            ("TOKEN_ADMIN", "admin-token"),
            ("TOKEN_MONITORING", "monitoring-token"),
            ("TOKEN_LAB", "lab-token"),
        ],
    ));
}

on_both_databases_with! { with_access;
    async fn only_monitoring_clients_and_admins_may_scrape(app) {
        let bearer = |t: &str| format!("Bearer {t}");
        let monitoring = bearer("monitoring-token");
        let s = scrape_as(&app, &[("authorization", monitoring.as_str())]).await;
        assert!(s.text.contains("# TYPE sentinella_http_requests_total counter"), "{}", s.text);
        let admin = bearer("admin-token");
        scrape_as(&app, &[("authorization", admin.as_str())]).await;

        let lab = bearer("lab-token");
        let r = app.request(Method::GET, "/metrics", &[("authorization", lab.as_str())], None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
        let r = app.request(Method::GET, "/metrics", &[], None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
        let r = app.request(Method::GET, "/metrics", &[("authorization", "Bearer nobody")], None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);

        // the monitoring role reads no FHIR data and writes none
        let r = app.request(Method::GET, "/fhir/Patient", &[("authorization", monitoring.as_str())], None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
        let r = app.request(Method::GET, "/fhir/Communication", &[("authorization", monitoring.as_str())], None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
        let patient = serde_json::to_vec(&json!({"resourceType": "Patient"})).unwrap();
        let r = app
            .request(
                Method::POST,
                "/fhir/Patient",
                &[("authorization", monitoring.as_str()), ("content-type", "application/fhir+json")],
                Some(patient),
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    }
}

#[test]
fn the_parser_reads_label_values_with_braces() {
    let s = parse(
        "# TYPE x counter\nx{route=\"/fhir/{type}/{id}\",method=\"GET\"} 3\ny 1.5\nz_bucket{le=\"+Inf\"} 2\n",
    );
    assert_eq!(s.len(), 3);
    assert_eq!(s[0].1["route"], "/fhir/{type}/{id}");
    assert_eq!(s[0].2, 3.0);
    assert_eq!(s[1].0, "y");
    assert_eq!(s[2].1["le"], "+Inf");
}

/// Every metric the Grafana dashboard queries is one the server exports, and it shows them all.
#[test]
fn the_grafana_dashboard_queries_the_exported_metrics() {
    use sentinella::observability::metrics as m;
    let exported = [
        m::HTTP_REQUESTS,
        m::HTTP_DURATION,
        m::BUNDLES_WRITTEN,
        m::RESOURCES_WRITTEN,
        m::VALIDATION_FAILURES,
        m::WRITES_IN_PROGRESS,
        m::WRITER_QUEUE_DEPTH,
        m::COMMIT_GROUP_SIZE,
        m::CASES_CREATED,
        m::CASES_WITHDRAWN,
        m::DELIVERY_ATTEMPTS,
        m::DELIVERY_FAILURES,
        m::DELIVERY_DURATION,
        m::OUTBOX_DEPTH,
        m::OUTBOX_OLDEST_AGE,
    ];
    let path = format!(
        "{}/docs/grafana/sentinella.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("sentinella_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|b| exported.contains(b)))
                    .unwrap_or(&name)
                    .to_string();
                assert!(
                    exported.contains(&base.as_str()),
                    "the dashboard queries {name}, which is not exported"
                );
                queried.insert(base);
            }
        }
    }
    for name in exported {
        assert!(queried.contains(name), "the dashboard does not show {name}");
    }
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
}
