//! Subscriptions (SPEC.md §4, Backport IG 1.1.0) end to end: a real webhook listener on 127.0.0.1
//! receives the handshake, heartbeats and events; NATS JetStream for the broker channel; the server
//! binary killed between commit and delivery; two server processes sharing one PostgreSQL.
mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::subscriber::*;
use common::{Resp, TestApp};
use sentinella::config::Config;
use serde_json::{Value, json};

/// Fast retries for tests.
fn fast(c: &mut Config) {
    c.delivery_backoff_ms = 50;
    c.delivery_backoff_max_ms = 200;
    c.delivery_poll_ms = 50;
    c.delivery_timeout_ms = 2000;
    c.nats_url = Some(nats_url());
}

fn nats_url() -> String {
    std::env::var("SENTINELLA_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn subscribe(app: &TestApp, s: &Value, headers: &[(&str, &str)]) -> String {
    let r = app.post_with("/fhir/Subscription", s, headers).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.body["id"].as_str().unwrap().to_string()
}

async fn wait_status(app: &TestApp, id: &str, status: &str, headers: &[(&str, &str)]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = app
            .request(
                axum::http::Method::GET,
                &format!("/fhir/Subscription/{id}"),
                headers,
                None,
            )
            .await;
        if r.body["status"] == status {
            return r.body;
        }
        assert!(
            Instant::now() < deadline,
            "Subscription/{id} never became {status}: {}",
            r.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn post_case(app: &TestApp, n: u32, asl: &str, headers: &[(&str, &str)]) -> Resp {
    let r = app.post_with("/fhir", &case_bundle(n, asl), headers).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r
}

/// Both databases, with fast delivery settings.
macro_rules! on_both {
    ($(async fn $name:ident($app:ident) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                async fn run($app: TestApp) $body
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() { run(TestApp::sqlite_with(fast).await).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() { run(TestApp::postgres_with(fast).await).await }
            }
        )*
    };
}

on_both! {
    async fn the_capability_statement_lists_the_topics_and_operations(app) {
        let cs = app.get("/fhir/metadata").await;
        let sub = cs.body["rest"][0]["resource"].as_array().unwrap().iter().find(|r| r["type"] == "Subscription").unwrap().clone();
        let topics: Vec<&str> = sub["extension"].as_array().unwrap().iter().filter_map(|e| e["valueCanonical"].as_str()).collect();
        for t in ["cre-case", "notifiable-case", "outbreak"] {
            assert!(topics.contains(&format!("{CANON}/SubscriptionTopic/{t}").as_str()), "{topics:?}");
        }
        let ops: Vec<&str> = sub["operation"].as_array().unwrap().iter().filter_map(|o| o["name"].as_str()).collect();
        assert_eq!(ops, vec!["validate", "status", "events"]);
        let comm = cs.body["rest"][0]["resource"].as_array().unwrap().iter().find(|r| r["type"] == "Communication").unwrap().clone();
        assert!(comm["searchParam"].as_array().unwrap().iter().any(|p| p["name"] == "region"));
    }

    async fn handshake_activates_and_a_cre_case_arrives_with_its_patient(app) {
        let hook = Hook::start().await;
        let id = subscribe(&app, &subscription(&hook.url, "cre-case", "full-resource", &[], None), &[]).await;
        let hs = hook.wait_for("handshake", 1, 10).await;
        assert_eq!(hs[0]["type"], "history");
        assert_eq!(status_param(&hs[0], "topic")["valueCanonical"], format!("{CANON}/SubscriptionTopic/cre-case"));
        wait_status(&app, &id, "active", &[]).await;

        post_case(&app, 1, "030308", &[]).await;
        let ev = hook.wait_for("event-notification", 1, 10).await;
        let b = &ev[0];
        assert_eq!(b["type"], "history");
        assert_eq!(status_param(b, "events-since-subscription-start")["valueString"], "1");
        let events = events_of(b);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].0, 1);
        assert!(events[0].1.contains("/Communication/") && events[0].1.ends_with("/_history/1"), "{:?}", events[0]);
        let entries = b["entry"].as_array().unwrap();
        let comm = entries.iter().find(|e| e["resource"]["resourceType"] == "Communication").expect("the case");
        assert_eq!(comm["resource"]["category"][0]["coding"][0]["code"], "cre");
        let patient = entries.iter().find(|e| e["resource"]["resourceType"] == "Patient").expect("its patient");
        assert_eq!(patient["resource"]["identifier"][0]["value"], person_cf(1));
        // the channel's headers go with every POST
        let received = hook.received.lock().await;
        assert!(received.iter().all(|(h, _)| h["authorization"] == "Bearer regione-secret"));
        assert!(received.iter().all(|(h, _)| h["content-type"] == "application/fhir+json"));
    }

    async fn events_count_up_from_one_in_order_and_id_only_carries_no_resource(app) {
        let hook = Hook::start().await;
        let id = subscribe(&app, &subscription(&hook.url, "cre-case", "id-only", &[], None), &[]).await;
        wait_status(&app, &id, "active", &[]).await;
        for n in 1..=4 {
            post_case(&app, n, "030308", &[]).await;
        }
        let ev = hook.wait_for("event-notification", 4, 15).await;
        let numbers: Vec<i64> = ev.iter().flat_map(events_of).map(|e| e.0).collect();
        assert_eq!(numbers, vec![1, 2, 3, 4]);
        for b in &ev {
            assert!(b["entry"].as_array().unwrap().iter().skip(1).all(|e| e["resource"].is_null()), "id-only: {b}");
            assert!(b["entry"][1]["fullUrl"].as_str().unwrap().contains("/Communication/"));
        }
    }

    async fn the_endpoint_down_then_up_gets_every_event_in_order(app) {
        let hook = Hook::start().await;
        let id = subscribe(&app, &subscription(&hook.url, "cre-case", "id-only", &[], None), &[]).await;
        wait_status(&app, &id, "active", &[]).await;
        hook.fail(true);
        for n in 1..=3 {
            post_case(&app, n, "030308", &[]).await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while hook.refused.load(Ordering::SeqCst) < 3 {
            assert!(Instant::now() < deadline, "no retries seen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        hook.fail(false);
        let ev = hook.wait_for("event-notification", 3, 15).await;
        let numbers: Vec<i64> = ev.iter().flat_map(events_of).map(|e| e.0).collect();
        assert_eq!(numbers, vec![1, 2, 3], "retried in order, none lost");
        assert_eq!(wait_status(&app, &id, "active", &[]).await["status"], "active");
    }

    async fn a_failed_handshake_puts_the_subscription_in_error(app) {
        // a port nobody listens on
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}/hook");
        let id = subscribe(&app, &subscription(&url, "cre-case", "id-only", &[], None), &[]).await;
        let s = wait_status(&app, &id, "error", &[]).await;
        assert!(s["error"].as_str().unwrap_or_default().contains("handshake"), "{s}");
    }

    async fn heartbeats_come_when_nothing_happens(app) {
        let hook = Hook::start().await;
        subscribe(&app, &subscription(&hook.url, "cre-case", "empty", &[], Some(1)), &[]).await;
        let hb = hook.wait_for("heartbeat", 2, 10).await;
        assert_eq!(status_param(&hb[0], "events-since-subscription-start")["valueString"], "0");
    }

    async fn status_and_events_replay_by_number(app) {
        let hook = Hook::start().await;
        let id = subscribe(&app, &subscription(&hook.url, "cre-case", "id-only", &[], None), &[]).await;
        wait_status(&app, &id, "active", &[]).await;
        post_case(&app, 1, "030308", &[]).await;
        post_case(&app, 2, "030308", &[]).await;
        hook.wait_for("event-notification", 2, 10).await;

        let st = app.get(&format!("/fhir/Subscription/{id}/$status")).await;
        assert_eq!(st.status, StatusCode::OK, "{}", st.text);
        let p = &st.body["entry"][0]["resource"];
        let param = |n: &str| p["parameter"].as_array().unwrap().iter().find(|x| x["name"] == n).cloned().unwrap();
        assert_eq!(param("status")["valueCode"], "active");
        assert_eq!(param("type")["valueCode"], "query-status");
        assert_eq!(param("events-since-subscription-start")["valueString"], "2");
        let all = app.get("/fhir/Subscription/$status").await;
        assert_eq!(all.body["total"], 1, "{}", all.text);

        let replay = app.get(&format!("/fhir/Subscription/{id}/$events?eventsSinceNumber=2&content=full-resource")).await;
        assert_eq!(replay.status, StatusCode::OK, "{}", replay.text);
        assert_eq!(notification_type(&replay.body), "query-event");
        let events = events_of(&replay.body);
        assert_eq!(events.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2]);
        assert!(replay.body["entry"].as_array().unwrap().iter().any(|e| e["resource"]["resourceType"] == "Communication"));
        let both = app.get(&format!("/fhir/Subscription/{id}/$events")).await;
        assert_eq!(events_of(&both.body).iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2]);
        let bad = app.get(&format!("/fhir/Subscription/{id}/$events?eventsSinceNumber=two")).await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    }

    async fn a_withdrawn_case_is_an_event(app) {
        let hook = Hook::start().await;
        let id = subscribe(&app, &subscription(&hook.url, "cre-case", "full-resource", &[], None), &[]).await;
        wait_status(&app, &id, "active", &[]).await;
        post_case(&app, 1, "030308", &[]).await;
        hook.wait_for("event-notification", 1, 10).await;
        // the laboratory withdraws the isolate
        let found = app.get("/fhir/Observation?identifier=https://lis.niguarda.example/risultati|EMO-2026-004512-ISO1-1").await;
        let mut iso = found.body["entry"][0]["resource"].clone();
        let iso_id = iso["id"].as_str().unwrap().to_string();
        iso["status"] = json!("entered-in-error");
        let r = app.put(&format!("/fhir/Observation/{iso_id}"), &iso, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let ev = hook.wait_for("event-notification", 2, 10).await;
        let (number, focus) = events_of(&ev[1])[0].clone();
        assert_eq!(number, 2);
        assert!(focus.ends_with("/_history/2"), "{focus}");
        let comm = ev[1]["entry"].as_array().unwrap().iter().find(|e| e["resource"]["resourceType"] == "Communication").unwrap();
        assert_eq!(comm["resource"]["status"], "entered-in-error");
    }

    async fn too_many_failures_mean_error_and_setting_active_resumes(app) {
        let hook = Hook::start().await;
        let id = subscribe(&app, &subscription(&hook.url, "cre-case", "id-only", &[], None), &[]).await;
        wait_status(&app, &id, "active", &[]).await;
        hook.fail(true);
        post_case(&app, 1, "030308", &[]).await;
        // the default limit is 10 attempts; with 50-200 ms backoff that is about 2 s
        let mut s = wait_status(&app, &id, "error", &[]).await;
        assert!(s["error"].as_str().unwrap().contains("503"), "{s}");
        // the events keep accumulating while in error
        post_case(&app, 2, "030308", &[]).await;
        hook.fail(false);
        s["status"] = json!("active");
        let r = app.put(&format!("/fhir/Subscription/{id}"), &s, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["status"], "active");
        let ev = hook.wait_for("event-notification", 2, 15).await;
        let numbers: Vec<i64> = ev.iter().flat_map(events_of).map(|e| e.0).collect();
        assert_eq!(numbers, vec![1, 2]);
    }

    async fn filters_select_cases_by_region_and_bad_subscriptions_are_refused(app) {
        let hook = Hook::start().await;
        let id = subscribe(&app, &subscription(&hook.url, "cre-case", "id-only", &["Communication?region=010"], None), &[]).await;
        wait_status(&app, &id, "active", &[]).await;
        post_case(&app, 1, "030308", &[]).await; // Lombardia
        post_case(&app, 2, "010203", &[]).await; // Piemonte
        let ev = hook.wait_for("event-notification", 1, 10).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ev2 = hook.of_type("event-notification").await;
        assert_eq!(ev2.len(), 1, "only the Piemonte case: {ev2:?}");
        let focus = &events_of(&ev[0])[0].1;
        let case = app.get(&focus.replace("http://127.0.0.1:0", "")).await;
        assert_eq!(case.status, StatusCode::OK, "{}", case.text);
        assert!(case.text.contains("\"010\""), "{}", case.text);

        let unknown = subscription(&hook.url, "no-such-topic", "id-only", &[], None);
        let r = app.post("/fhir/Subscription", &unknown).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        assert_eq!(r.expressions(), vec!["Subscription.criteria"]);
        let bad_filter = subscription(&hook.url, "cre-case", "id-only", &["Communication?subject=Patient/1"], None);
        let r = app.post("/fhir/Subscription", &bad_filter).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        assert!(r.text.contains("is not a filter of"), "{}", r.text);
        let mut bad_channel = subscription(&hook.url, "cre-case", "id-only", &[], None);
        bad_channel["channel"]["type"] = json!("email");
        let r = app.post("/fhir/Subscription", &bad_channel).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        assert_eq!(r.expressions(), vec!["Subscription.channel.type"]);
    }

    async fn the_nats_channel_delivers_to_a_jetstream_consumer(app) {
        use futures::StreamExt;
        let client = async_nats::connect(nats_url()).await.expect("NATS runs (see .ci/run)");
        let js = async_nats::jetstream::new(client);
        let stream_name = format!("SENTINELLA_TEST_{}", uuid::Uuid::new_v4().simple());
        let subject = format!("sentinella.test.{}", uuid::Uuid::new_v4().simple());
        let stream = js
            .create_stream(async_nats::jetstream::stream::Config {
                name: stream_name.clone(),
                subjects: vec![subject.clone()],
                ..Default::default()
            })
            .await
            .expect("stream");
        let mut s = subscription(&subject, "cre-case", "id-only", &[], None);
        s["channel"]["type"] = json!("message");
        s["channel"]["_type"] = json!({"extension": [{"url": format!("{BACKPORT}/backport-channel-type"),
            "valueCoding": {"system": format!("{CANON}/CodeSystem/canale-sottoscrizione"), "code": "nats-jetstream"}}]});
        let id = subscribe(&app, &s, &[]).await;
        wait_status(&app, &id, "active", &[]).await;
        post_case(&app, 1, "030308", &[]).await;
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                durable_name: Some("test".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut kinds = Vec::new();
        while kinds.len() < 2 {
            let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await
                .expect("a message in time")
                .unwrap()
                .unwrap();
            let b: Value = serde_json::from_slice(&m.payload).unwrap();
            kinds.push(notification_type(&b));
            if kinds.len() == 2 {
                assert_eq!(events_of(&b)[0].0, 1);
            }
            m.ack().await.unwrap();
        }
        assert_eq!(kinds, vec!["handshake", "event-notification"]);
        js.delete_stream(&stream_name).await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Who may subscribe to what (an access configuration file)

const ACCESS: &str = r#"
[[client]]
id = "lab-niguarda"
role = "laboratory"
token_sha256 = "TOKEN_LAB"

[[client]]
id = "regione-lombardia"
role = "region"
regions = ["030"]
token_sha256 = "TOKEN_LOMBARDIA"
endpoints = ["http://127.0.0.1:"]

[[client]]
id = "regione-piemonte"
role = "region"
regions = ["010"]
token_sha256 = "TOKEN_PIEMONTE"
endpoints = ["https://sorveglianza.regione.piemonte.it/"]
"#;

fn with_access(c: &mut Config) {
    fast(c);
    c.access_file = Some(common::access_file(
        ACCESS,
        &[
            ("TOKEN_LAB", "lab-token"),
            ("TOKEN_LOMBARDIA", "lombardia-token"),
            ("TOKEN_PIEMONTE", "piemonte-token"),
        ],
    ));
}

const LAB: (&str, &str) = ("authorization", "Bearer lab-token");
const LOMBARDIA: (&str, &str) = ("authorization", "Bearer lombardia-token");
const PIEMONTE: (&str, &str) = ("authorization", "Bearer piemonte-token");

async fn access_rules(app: TestApp) {
    // no token, a wrong token
    let r = app.get("/fhir/Patient").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
    let r = app
        .request(
            axum::http::Method::GET,
            "/fhir/Patient",
            &[("authorization", "Bearer nope")],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // the CapabilityStatement stays public
    assert_eq!(app.get("/fhir/metadata").await.status, StatusCode::OK);

    let hook = Hook::start().await;
    // Lombardia asks for Piemonte's cases: it gets none of them, whatever its filter says
    let greedy = subscribe(
        &app,
        &subscription(
            &hook.url,
            "cre-case",
            "id-only",
            &["Communication?region=010"],
            None,
        ),
        &[LOMBARDIA],
    )
    .await;
    let own = Hook::start().await;
    let mine = subscribe(
        &app,
        &subscription(&own.url, "notifiable-case", "id-only", &[], None),
        &[LOMBARDIA],
    )
    .await;
    wait_status(&app, &greedy, "active", &[LOMBARDIA]).await;
    wait_status(&app, &mine, "active", &[LOMBARDIA]).await;

    // the laboratory sends; it cannot read cases or subscribe
    post_case(&app, 1, "010203", &[LAB]).await; // Piemonte
    post_case(&app, 2, "030308", &[LAB]).await; // Lombardia
    let r = app
        .request(axum::http::Method::GET, "/fhir/Communication", &[LAB], None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    let r = app
        .post_with(
            "/fhir/Subscription",
            &subscription(&hook.url, "cre-case", "id-only", &[], None),
            &[LAB],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);

    let ev = own.wait_for("event-notification", 1, 10).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        own.of_type("event-notification").await.len(),
        1,
        "only the Lombardia case"
    );
    assert!(
        hook.of_type("event-notification").await.is_empty(),
        "nothing of Piemonte reaches Lombardia"
    );
    let _ = ev;

    // reads: Lombardia sees its case, not Piemonte's
    let r = app
        .request(
            axum::http::Method::GET,
            "/fhir/Communication",
            &[LOMBARDIA],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["total"], 1, "{}", r.text);
    let r = app
        .request(
            axum::http::Method::GET,
            "/fhir/Communication",
            &[PIEMONTE],
            None,
        )
        .await;
    assert_eq!(r.body["total"], 1);
    let piemonte_case = r.body["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = app
        .request(
            axum::http::Method::GET,
            &format!("/fhir/Communication/{piemonte_case}"),
            &[LOMBARDIA],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    let r = app
        .request(
            axum::http::Method::GET,
            "/fhir/Communication?region=010",
            &[LOMBARDIA],
            None,
        )
        .await;
    assert_eq!(r.body["total"], 0, "{}", r.text);
    // region clients read no laboratory data
    let r = app
        .request(
            axum::http::Method::GET,
            "/fhir/Observation",
            &[LOMBARDIA],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // subscriptions belong to their client
    let r = app
        .request(
            axum::http::Method::GET,
            &format!("/fhir/Subscription/{mine}"),
            &[PIEMONTE],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    let r = app
        .request(
            axum::http::Method::GET,
            &format!("/fhir/Subscription/{mine}/$events"),
            &[PIEMONTE],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .request(
            axum::http::Method::GET,
            "/fhir/Subscription",
            &[PIEMONTE],
            None,
        )
        .await;
    assert_eq!(r.body["total"], 0, "{}", r.text);
    // an endpoint outside the client's allowed prefixes
    let r = app
        .post_with(
            "/fhir/Subscription",
            &subscription(
                "https://attacker.example/hook",
                "cre-case",
                "id-only",
                &[],
                None,
            ),
            &[PIEMONTE],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert_eq!(r.expressions(), vec!["Subscription.channel.endpoint"]);
    assert_eq!(r.body["issue"][0]["code"], "security");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_clients_see_and_receive_only_their_regions_sqlite() {
    access_rules(TestApp::sqlite_with(with_access).await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_clients_see_and_receive_only_their_regions_postgres() {
    access_rules(TestApp::postgres_with(with_access).await).await
}
