//! Standard tokens beside the static ones (security issue, item 2): SMART Backend Services
//! (`POST /auth/token` with a signed client assertion), bearer JWTs of a trusted OIDC issuer, and
//! SMART scopes that narrow a client's role. On SQLite and PostgreSQL, with an access file holding a
//! static-token admin, two laboratories with key set files, a region with a key set URL and an EHR
//! reached through an issuer. The private keys are the test-only ones of tests/fixtures/keys/.
mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{Method, StatusCode};
use common::{Resp, TestApp};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sentinella::config::Config;
use serde_json::{Value, json};

const BASE: &str = "https://sentinella.test/fhir";
const TOKEN_URL: &str = "https://sentinella.test/auth/token";
const SECRET: &str = "test-only-token-secret-0123456789abcdef";
const ADMIN_TOKEN: &str = "admin-static-token";
const ISSUER: &str = "https://idp.test/realms/sanita";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/keys/{name}.pem",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("test key exists")
}

/// A test private key: `rsa-1`, `rsa-2`, `ec-p384`, `ec-p256`.
fn key(name: &str) -> EncodingKey {
    if name.starts_with("rsa") {
        EncodingKey::from_rsa_pem(&pem(name)).expect("RSA PEM")
    } else {
        EncodingKey::from_ec_pem(&pem(name)).expect("EC PEM")
    }
}

/// A JWKS document with the public halves of `(key, alg, kid)`.
fn jwks(keys: &[(&str, Algorithm, &str)]) -> String {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(name, alg, kid)| {
            let mut jwk = Jwk::from_encoding_key(&key(name), *alg).expect("public JWK");
            jwk.common.key_id = Some(kid.to_string());
            serde_json::to_value(jwk).unwrap()
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign(claims: &Value, key_name: &str, alg: Algorithm, kid: Option<&str>) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(String::from);
    jsonwebtoken::encode(&header, claims, &key(key_name)).expect("signed")
}

/// A client assertion of `client` as SMART asks for it.
fn assertion(client: &str, key_name: &str, alg: Algorithm, kid: &str) -> String {
    sign(
        &json!({
            "iss": client, "sub": client, "aud": TOKEN_URL,
            "exp": now() + 240, "jti": uuid::Uuid::new_v4().to_string(),
        }),
        key_name,
        alg,
        Some(kid),
    )
}

fn hs256(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A local server publishing a key set (the region's `jwks_url`), counting its fetches.
struct JwksServer {
    url: String,
    doc: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(doc: String) -> JwksServer {
        let doc = Arc::new(Mutex::new(doc));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (d, f) = (doc.clone(), fetches.clone());
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let (d, f) = (d.clone(), f.clone());
                async move {
                    f.fetch_add(1, Ordering::SeqCst);
                    let body = d.lock().unwrap().clone();
                    ([("content-type", "application/json")], body)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        JwksServer { url, doc, fetches }
    }
}

/// The access file and key sets of one test, in a folder of its own.
struct Fixture {
    dir: PathBuf,
    jwks_server: JwksServer,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = std::env::temp_dir().join(format!(
            "sentinella-tokens-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let jwks_server = JwksServer::start(jwks(&[("ec-p384", Algorithm::ES384, "reg-1")])).await;
        std::fs::write(
            dir.join("niguarda.jwks.json"),
            jwks(&[("rsa-1", Algorithm::RS384, "niguarda-1")]),
        )
        .unwrap();
        std::fs::write(
            dir.join("sacco.jwks.json"),
            jwks(&[
                ("ec-p384", Algorithm::ES384, "sacco-384"),
                ("ec-p256", Algorithm::ES256, "sacco-256"),
            ]),
        )
        .unwrap();
        std::fs::write(
            dir.join("idp.jwks.json"),
            jwks(&[("rsa-2", Algorithm::RS256, "idp-1")]),
        )
        .unwrap();
        let access = format!(
            r#"
[[client]]
id = "admin"
role = "admin"
token_sha256 = "{admin}"

[[client]]
id = "lab-niguarda"
role = "laboratory"
jwks_file = "niguarda.jwks.json"

[[client]]
id = "lab-sacco"
role = "laboratory"
jwks_file = "{dir}/sacco.jwks.json"

[[client]]
id = "regione-lombardia"
role = "region"
regions = ["030"]
jwks_url = "{url}"

[[client]]
id = "ehr-sso"
role = "ehr"

[[issuer]]
issuer = "{ISSUER}"
audience = "sentinella"
jwks_file = "idp.jwks.json"
clients = ["ehr-sso", "regione-lombardia"]
"#,
            admin = common::sha256(ADMIN_TOKEN),
            dir = dir.display(),
            url = jwks_server.url,
        );
        std::fs::write(dir.join("access.toml"), access).unwrap();
        Fixture { dir, jwks_server }
    }

    fn configure(&self, c: &mut Config) {
        c.access_file = Some(self.dir.join("access.toml").display().to_string());
        c.base_url = Some(BASE.into());
        c.token_secret = Some(SECRET.parse().unwrap());
    }

    /// Replace a key set file the way a deployment does: write aside, then rename over it.
    fn replace(&self, file: &str, doc: String) {
        let aside = self.dir.join(format!("{file}.new"));
        std::fs::write(&aside, doc).unwrap();
        std::fs::rename(&aside, self.dir.join(file)).unwrap();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Run each test once on SQLite and once on PostgreSQL, with the fixture's access file.
macro_rules! on_both_databases_with_tokens {
    ($(async fn $name:ident($app:ident, $fx:ident) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                async fn run($app: TestApp, $fx: Fixture) $body
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let fx = Fixture::new().await;
                    run(TestApp::sqlite_with(|c| fx.configure(c)).await, fx).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let fx = Fixture::new().await;
                    run(TestApp::postgres_with(|c| fx.configure(c)).await, fx).await
                }
            }
        )*
    };
}

fn form(params: &[(&str, &str)]) -> Vec<u8> {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish()
        .into_bytes()
}

async fn token_request(app: &TestApp, params: &[(&str, &str)]) -> Resp {
    app.request(
        Method::POST,
        "/auth/token",
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(form(params)),
    )
    .await
}

async fn ask(app: &TestApp, assertion: &str, scope: &str) -> Resp {
    token_request(
        app,
        &[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", assertion),
            ("scope", scope),
        ],
    )
    .await
}

/// An access token for `client` (signed with `key_name` under `kid`).
async fn access_token(
    app: &TestApp,
    client: &str,
    key_name: &str,
    alg: Algorithm,
    kid: &str,
    scope: &str,
) -> String {
    let r = ask(app, &assertion(client, key_name, alg, kid), scope).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body["access_token"]
        .as_str()
        .expect("a token")
        .to_string()
}

async fn with_token(
    app: &TestApp,
    method: Method,
    uri: &str,
    token: &str,
    body: Option<&Value>,
) -> Resp {
    let auth = format!("Bearer {token}");
    let mut headers = vec![("authorization", auth.as_str())];
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

fn patient() -> Value {
    common::fixture("patient-rossi.json")
}

fn observation() -> Value {
    json!({"resourceType": "Observation", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "600-7"}]}})
}

/// An OAuth error answer: the status, the code, a description, and not the assertion.
fn assert_oauth_error(r: &Resp, status: StatusCode, error: &str, secret_part: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.body["error"], error, "{}", r.text);
    assert!(r.body["error_description"].is_string(), "{}", r.text);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    if !secret_part.is_empty() {
        assert!(!r.text.contains(secret_part), "the answer echoes the token");
    }
}

/// A 401 for a bearer JWT: OperationOutcome, `error="invalid_token"`, the token not echoed.
fn assert_invalid_token(r: &Resp, token: &str) {
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
    assert_eq!(r.body["resourceType"], "OperationOutcome", "{}", r.text);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"sentinella\", error=\"invalid_token\"")
    );
    let signature = token.rsplit('.').next().unwrap_or(token);
    assert!(
        signature.is_empty() || !r.text.contains(signature),
        "the answer echoes the token"
    );
}

on_both_databases_with_tokens! {
    async fn a_backend_service_gets_a_token_and_uses_it(app, _fx) {
        let r = ask(
            &app,
            &assertion("lab-niguarda", "rsa-1", Algorithm::RS384, "niguarda-1"),
            "system/Patient.cruds system/Observation.rs system/Communication.rs launch",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(r.body["token_type"], "bearer");
        assert_eq!(r.body["expires_in"], 300);
        // a laboratory does not read cases: that scope is not granted
        assert_eq!(r.body["scope"], "system/Patient.cruds system/Observation.rs");
        let token = r.body["access_token"].as_str().unwrap().to_string();

        let created = with_token(&app, Method::POST, "/fhir/Patient", &token, Some(&patient())).await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
        let id = created.body["id"].as_str().unwrap().to_string();
        let read = with_token(&app, Method::GET, &format!("/fhir/Patient/{id}"), &token, None).await;
        assert_eq!(read.status, StatusCode::OK, "{}", read.text);
        let search = with_token(&app, Method::GET, "/fhir/Observation", &token, None).await;
        assert_eq!(search.status, StatusCode::OK, "{}", search.text);
        // the role still decides: no cases for a laboratory
        let cases = with_token(&app, Method::GET, "/fhir/Communication", &token, None).await;
        assert_eq!(cases.status, StatusCode::FORBIDDEN, "{}", cases.text);

        // ES384 and ES256 clients, and an aud with a trailing slash
        let t = access_token(&app, "lab-sacco", "ec-p384", Algorithm::ES384, "sacco-384", "system/Patient.rs").await;
        let r = with_token(&app, Method::GET, "/fhir/Patient", &t, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let slash = sign(
            &json!({"iss": "lab-sacco", "sub": "lab-sacco", "aud": format!("{TOKEN_URL}/"),
                    "exp": now() + 60, "jti": "es256-slash"}),
            "ec-p256", Algorithm::ES256, Some("sacco-256"),
        );
        let r = ask(&app, &slash, "system/*.rs").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["scope"], "system/*.rs");
    }

    async fn scopes_narrower_than_the_role_are_enforced(app, _fx) {
        let token = access_token(&app, "lab-niguarda", "rsa-1", Algorithm::RS384, "niguarda-1", "system/Patient.c").await;
        let created = with_token(&app, Method::POST, "/fhir/Patient", &token, Some(&patient())).await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
        let id = created.body["id"].as_str().unwrap().to_string();
        // the laboratory's role reads patients; this token's scope does not
        for uri in [format!("/fhir/Patient/{id}"), "/fhir/Patient".to_string(), format!("/fhir/Patient/{id}/_history")] {
            let r = with_token(&app, Method::GET, &uri, &token, None).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{uri}: {}", r.text);
        }
        let r = with_token(&app, Method::POST, "/fhir/Observation", &token, Some(&observation())).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
        // a transaction entry is checked against the scope too
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:0d3bd3b1-98b5-4f39-8b5e-3e3b0c1a2b01", "resource": observation(),
             "request": {"method": "POST", "url": "Observation"}}]});
        let r = with_token(&app, Method::POST, "/fhir", &token, Some(&bundle)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
        let all = with_token(&app, Method::GET, "/fhir/Observation?_summary=count", ADMIN_TOKEN, None).await;
        assert_eq!(all.body["total"], 0, "{}", all.text);

        // SMART v1: read only
        let token = access_token(&app, "lab-niguarda", "rsa-1", Algorithm::RS384, "niguarda-1", "system/Patient.read").await;
        let r = with_token(&app, Method::GET, &format!("/fhir/Patient/{id}"), &token, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let r = with_token(&app, Method::POST, "/fhir/Patient", &token, Some(&patient())).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    }

    async fn bad_assertions_get_oauth_errors(app, _fx) {
        let claims = |client: &str, aud: &str, exp: i64| json!({
            "iss": client, "sub": client, "aud": aud, "exp": exp,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        let rs384 = |c: &Value| sign(c, "rsa-1", Algorithm::RS384, Some("niguarda-1"));
        let scope = "system/Patient.rs";

        let expired = rs384(&claims("lab-niguarda", TOKEN_URL, now() - 600));
        assert_oauth_error(&ask(&app, &expired, scope).await, StatusCode::UNAUTHORIZED, "invalid_client", &expired);
        let too_long = rs384(&claims("lab-niguarda", TOKEN_URL, now() + 3600));
        assert_oauth_error(&ask(&app, &too_long, scope).await, StatusCode::UNAUTHORIZED, "invalid_client", &too_long);
        let wrong_aud = rs384(&claims("lab-niguarda", "https://other.test/auth/token", now() + 60));
        assert_oauth_error(&ask(&app, &wrong_aud, scope).await, StatusCode::UNAUTHORIZED, "invalid_client", &wrong_aud);
        let fhir_aud = rs384(&claims("lab-niguarda", BASE, now() + 60));
        assert_oauth_error(&ask(&app, &fhir_aud, scope).await, StatusCode::UNAUTHORIZED, "invalid_client", "");
        // signed by another key under the client's kid
        let wrong_key = sign(&claims("lab-niguarda", TOKEN_URL, now() + 60), "rsa-2", Algorithm::RS384, Some("niguarda-1"));
        assert_oauth_error(&ask(&app, &wrong_key, scope).await, StatusCode::UNAUTHORIZED, "invalid_client", &wrong_key);
        // another client's key
        let other_client = sign(&claims("lab-niguarda", TOKEN_URL, now() + 60), "ec-p384", Algorithm::ES384, Some("sacco-384"));
        assert_oauth_error(&ask(&app, &other_client, scope).await, StatusCode::UNAUTHORIZED, "invalid_client", "");
        // iss and sub differ
        let mut c = claims("lab-niguarda", TOKEN_URL, now() + 60);
        c["sub"] = json!("lab-sacco");
        assert_oauth_error(&ask(&app, &rs384(&c), scope).await, StatusCode::UNAUTHORIZED, "invalid_client", "");
        // no jti
        let mut c = claims("lab-niguarda", TOKEN_URL, now() + 60);
        c.as_object_mut().unwrap().remove("jti");
        assert_oauth_error(&ask(&app, &rs384(&c), scope).await, StatusCode::UNAUTHORIZED, "invalid_client", "");
        // a symmetric signature is not a client assertion
        let hs = hs256(&claims("lab-niguarda", TOKEN_URL, now() + 60), SECRET);
        assert_oauth_error(&ask(&app, &hs, scope).await, StatusCode::UNAUTHORIZED, "invalid_client", "");
        let unknown = sign(&claims("lab-unknown", TOKEN_URL, now() + 60), "rsa-1", Algorithm::RS384, Some("niguarda-1"));
        assert_oauth_error(&ask(&app, &unknown, scope).await, StatusCode::UNAUTHORIZED, "invalid_client", "");
        // the admin has a static token only
        let admin = sign(&claims("admin", TOKEN_URL, now() + 60), "rsa-1", Algorithm::RS384, Some("niguarda-1"));
        assert_oauth_error(&ask(&app, &admin, scope).await, StatusCode::UNAUTHORIZED, "invalid_client", "");

        // a replayed assertion
        let once = rs384(&claims("lab-niguarda", TOKEN_URL, now() + 120));
        assert_eq!(ask(&app, &once, scope).await.status, StatusCode::OK);
        assert_oauth_error(&ask(&app, &once, scope).await, StatusCode::UNAUTHORIZED, "invalid_client", &once);

        // scopes the role allows nothing of
        let fresh = rs384(&claims("lab-niguarda", TOKEN_URL, now() + 60));
        assert_oauth_error(&ask(&app, &fresh, "system/Communication.rs openid").await, StatusCode::BAD_REQUEST, "invalid_scope", "");

        // the request itself
        let fresh = rs384(&claims("lab-niguarda", TOKEN_URL, now() + 60));
        let r = token_request(&app, &[("grant_type", "authorization_code"), ("client_assertion_type", ASSERTION_TYPE), ("client_assertion", &fresh), ("scope", scope)]).await;
        assert_oauth_error(&r, StatusCode::BAD_REQUEST, "unsupported_grant_type", &fresh);
        let r = token_request(&app, &[("client_assertion_type", ASSERTION_TYPE), ("client_assertion", &fresh), ("scope", scope)]).await;
        assert_oauth_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "");
        let r = token_request(&app, &[("grant_type", "client_credentials"), ("client_assertion_type", ASSERTION_TYPE), ("scope", scope)]).await;
        assert_oauth_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "");
        let r = token_request(&app, &[("grant_type", "client_credentials"), ("client_assertion_type", ASSERTION_TYPE), ("client_assertion", &fresh)]).await;
        assert_oauth_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "");
        let r = token_request(&app, &[("grant_type", "client_credentials"), ("client_assertion_type", "urn:other"), ("client_assertion", &fresh), ("scope", scope)]).await;
        assert_oauth_error(&r, StatusCode::UNAUTHORIZED, "invalid_client", "");
        let r = token_request(&app, &[("grant_type", "client_credentials"), ("grant_type", "client_credentials"), ("client_assertion_type", ASSERTION_TYPE), ("client_assertion", &fresh), ("scope", scope)]).await;
        assert_oauth_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "");
        let r = app.request(Method::POST, "/auth/token", &[("content-type", "application/json")], Some(b"{}".to_vec())).await;
        assert_oauth_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "");
        // limits: a body over 64 KB, an assertion over 16 KB
        let big = "x".repeat(70 * 1024);
        let r = token_request(&app, &[("grant_type", "client_credentials"), ("padding", &big)]).await;
        assert_oauth_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "");
        let mut c = claims("lab-niguarda", TOKEN_URL, now() + 60);
        c["padding"] = json!("x".repeat(17 * 1024));
        let long = rs384(&c);
        assert_oauth_error(&ask(&app, &long, scope).await, StatusCode::UNAUTHORIZED, "invalid_client", "");
        // the untouched assertion still works: nothing above consumed its jti
        assert_eq!(ask(&app, &fresh, scope).await.status, StatusCode::OK);
    }

    async fn bad_access_tokens_are_refused(app, _fx) {
        let claims = |exp: i64, aud: &str, sub: &str| json!({
            "iss": TOKEN_URL, "sub": sub, "aud": aud, "exp": exp, "iat": now() - 400,
            "jti": uuid::Uuid::new_v4().to_string(), "scope": "system/*.cruds",
        });
        // the shape the server signs: accepted (the secret is the configured one)
        let good = hs256(&claims(now() + 60, BASE, "lab-niguarda"), SECRET);
        let r = with_token(&app, Method::GET, "/fhir/Patient", &good, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);

        let expired = hs256(&claims(now() - 10, BASE, "lab-niguarda"), SECRET);
        let other_secret = hs256(&claims(now() + 60, BASE, "lab-niguarda"), "another-secret-another-secret-0123456789");
        let wrong_aud = hs256(&claims(now() + 60, "https://other.test/fhir", "lab-niguarda"), SECRET);
        let unknown_client = hs256(&claims(now() + 60, BASE, "nobody"), SECRET);
        let alg_none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhZG1pbiJ9.".to_string();
        let garbage = "abc.def.ghi".to_string();
        let too_long = format!("{}.e30.c2ln", "e".repeat(17 * 1024));
        for token in [expired, other_secret, wrong_aud, unknown_client, alg_none, garbage, too_long] {
            let r = with_token(&app, Method::GET, "/fhir/Patient", &token, None).await;
            assert_invalid_token(&r, &token);
        }
        // a client's own assertion is not an access token
        let assertion = assertion("lab-niguarda", "rsa-1", Algorithm::RS384, "niguarda-1");
        let r = with_token(&app, Method::GET, "/fhir/Patient", &assertion, None).await;
        assert_invalid_token(&r, &assertion);
        // no token at all: the plain challenge
        let r = app.get("/fhir/Patient").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"sentinella\""));
    }

    async fn oidc_issuer_tokens_act_as_their_client(app, _fx) {
        let claims = |iss: &str, aud: &str, client: &str| json!({
            "iss": iss, "aud": aud, "client_id": client, "sub": "service-account-7",
            "exp": now() + 300, "iat": now(), "scope": "openid system/Patient.rs",
        });
        let idp = |c: &Value| sign(c, "rsa-2", Algorithm::RS256, Some("idp-1"));

        let token = idp(&claims(ISSUER, "sentinella", "ehr-sso"));
        let r = with_token(&app, Method::GET, "/fhir/Patient", &token, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        // the EHR role writes patients; the token's scope does not
        let r = with_token(&app, Method::POST, "/fhir/Patient", &token, Some(&patient())).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
        // without a scope claim the role alone decides; azp names the client when client_id is absent
        let mut c = claims(ISSUER, "sentinella", "ehr-sso");
        let obj = c.as_object_mut().unwrap();
        obj.remove("scope");
        obj.remove("client_id");
        obj.insert("azp".into(), json!("ehr-sso"));
        let r = with_token(&app, Method::POST, "/fhir/Patient", &idp(&c), Some(&patient())).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        // an audience list naming this server
        let mut c = claims(ISSUER, "sentinella", "ehr-sso");
        c["aud"] = json!(["account", "sentinella"]);
        let r = with_token(&app, Method::GET, "/fhir/Patient", &idp(&c), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);

        let mut expired = claims(ISSUER, "sentinella", "ehr-sso");
        expired["exp"] = json!(now() - 120);
        let mut not_yet = claims(ISSUER, "sentinella", "ehr-sso");
        not_yet["nbf"] = json!(now() + 600);
        let refused = [
            idp(&claims(ISSUER, "account", "ehr-sso")),
            idp(&claims("https://evil.test", "sentinella", "ehr-sso")),
            idp(&claims(&format!("{ISSUER}/"), "sentinella", "ehr-sso")),
            idp(&expired),
            idp(&not_yet),
            // a client the issuer may not act as, and one not in the file
            idp(&claims(ISSUER, "sentinella", "admin")),
            idp(&claims(ISSUER, "sentinella", "nobody")),
            // the issuer's kid, another key
            sign(&claims(ISSUER, "sentinella", "ehr-sso"), "rsa-1", Algorithm::RS256, Some("idp-1")),
            sign(&claims(ISSUER, "sentinella", "ehr-sso"), "rsa-2", Algorithm::RS256, Some("idp-2")),
        ];
        for token in refused {
            let r = with_token(&app, Method::GET, "/fhir/Patient", &token, None).await;
            assert_invalid_token(&r, &token);
        }
    }

    async fn keys_rotate_without_restart(app, fx) {
        let before = access_token(&app, "lab-niguarda", "rsa-1", Algorithm::RS384, "niguarda-1", "system/Patient.rs").await;
        fx.replace("niguarda.jwks.json", jwks(&[("rsa-2", Algorithm::RS384, "niguarda-2")]));
        let after = access_token(&app, "lab-niguarda", "rsa-2", Algorithm::RS384, "niguarda-2", "system/Patient.rs").await;
        let r = with_token(&app, Method::GET, "/fhir/Patient", &after, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        // the retired key no longer authenticates; tokens it obtained live out their five minutes
        let r = ask(&app, &assertion("lab-niguarda", "rsa-1", Algorithm::RS384, "niguarda-1"), "system/Patient.rs").await;
        assert_oauth_error(&r, StatusCode::UNAUTHORIZED, "invalid_client", "");
        let r = with_token(&app, Method::GET, "/fhir/Patient", &before, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);

        // an issuer's key set rotates the same way
        fx.replace("idp.jwks.json", jwks(&[("rsa-1", Algorithm::RS256, "idp-2")]));
        let c = json!({"iss": ISSUER, "aud": "sentinella", "client_id": "ehr-sso", "exp": now() + 60});
        let r = with_token(&app, Method::GET, "/fhir/Patient", &sign(&c, "rsa-1", Algorithm::RS256, Some("idp-2")), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let old = sign(&c, "rsa-2", Algorithm::RS256, Some("idp-1"));
        assert_invalid_token(&with_token(&app, Method::GET, "/fhir/Patient", &old, None).await, &old);
    }

    async fn key_set_urls_are_fetched_once_and_cached(app, fx) {
        assert_eq!(fx.jwks_server.fetches.load(Ordering::SeqCst), 0, "fetched on first use only");
        let token = access_token(&app, "regione-lombardia", "ec-p384", Algorithm::ES384, "reg-1", "system/Communication.rs system/Patient.rs").await;
        let r = with_token(&app, Method::GET, "/fhir/Communication", &token, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        access_token(&app, "regione-lombardia", "ec-p384", Algorithm::ES384, "reg-1", "system/Communication.rs").await;
        assert_eq!(fx.jwks_server.fetches.load(Ordering::SeqCst), 1, "the cached copy serves known keys");
        // a new kid: fetched again at most once per 30 s, so right after the first fetch it waits
        *fx.jwks_server.doc.lock().unwrap() = jwks(&[("ec-p256", Algorithm::ES256, "reg-2")]);
        let r = ask(&app, &assertion("regione-lombardia", "ec-p256", Algorithm::ES256, "reg-2"), "system/Communication.rs").await;
        assert_oauth_error(&r, StatusCode::UNAUTHORIZED, "invalid_client", "");
        assert_eq!(fx.jwks_server.fetches.load(Ordering::SeqCst), 1);
        // and the cached key still works meanwhile
        access_token(&app, "regione-lombardia", "ec-p384", Algorithm::ES384, "reg-1", "system/Communication.rs").await;
        // a jku header other than the registered URL is refused
        let mut header = Header::new(Algorithm::ES384);
        header.kid = Some("reg-1".into());
        header.jku = Some("https://evil.test/jwks".into());
        let c = json!({"iss": "regione-lombardia", "sub": "regione-lombardia", "aud": TOKEN_URL,
                       "exp": now() + 60, "jti": "jku"});
        let forged = jsonwebtoken::encode(&header, &c, &key("ec-p384")).unwrap();
        assert_oauth_error(&ask(&app, &forged, "system/Communication.rs").await, StatusCode::UNAUTHORIZED, "invalid_client", "");
    }

    async fn static_tokens_still_work(app, _fx) {
        let r = with_token(&app, Method::POST, "/fhir/Patient", ADMIN_TOKEN, Some(&patient())).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let r = with_token(&app, Method::GET, "/fhir/Patient", ADMIN_TOKEN, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["total"], 1);
        let r = with_token(&app, Method::GET, "/fhir/Patient", "not-a-known-token", None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"sentinella\""));
    }

    async fn smart_configuration_is_public(app, _fx) {
        for uri in ["/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"] {
            let r = app.get(uri).await;
            assert_eq!(r.status, StatusCode::OK, "{uri}: {}", r.text);
            assert_eq!(r.body["token_endpoint"], TOKEN_URL);
            assert_eq!(r.body["token_endpoint_auth_methods_supported"], json!(["private_key_jwt"]));
            assert_eq!(r.body["grant_types_supported"], json!(["client_credentials"]));
            let algs = r.body["token_endpoint_auth_signing_alg_values_supported"].as_array().unwrap();
            assert!(algs.contains(&json!("RS384")) && algs.contains(&json!("ES384")));
            assert!(r.body["capabilities"].as_array().unwrap().contains(&json!("client-confidential-asymmetric")));
            assert!(r.body["scopes_supported"].as_array().unwrap().contains(&json!("system/*.rs")));
        }
        // the token endpoint takes only POST
        let r = app.get("/auth/token").await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    }
}

/// Token requests have a rate per client too (here 1/s, bursts of 2), counted before the
/// assertion's signature is checked; another client is not held back.
async fn token_requests_over_a_clients_rate_get_429(app: TestApp) {
    let ask_as = |client: &'static str, key: &'static str, alg: Algorithm, kid: &'static str| {
        let app = &app;
        async move { ask(app, &assertion(client, key, alg, kid), "system/Patient.rs").await }
    };
    for _ in 0..2 {
        let r = ask_as("lab-niguarda", "rsa-1", Algorithm::RS384, "niguarda-1").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    let r = ask_as("lab-niguarda", "rsa-1", Algorithm::RS384, "niguarda-1").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    assert!(r.header("retry-after").is_some());
    let other = ask_as("lab-sacco", "ec-p384", Algorithm::ES384, "sacco-384").await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_requests_over_a_clients_rate_get_429_sqlite() {
    let fx = Fixture::new().await;
    let app = TestApp::sqlite_with(|c| {
        fx.configure(c);
        c.rate_limit_per_second = 1;
    })
    .await;
    token_requests_over_a_clients_rate_get_429(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_requests_over_a_clients_rate_get_429_postgres() {
    let fx = Fixture::new().await;
    let app = TestApp::postgres_with(|c| {
        fx.configure(c);
        c.rate_limit_per_second = 1;
    })
    .await;
    token_requests_over_a_clients_rate_get_429(app).await
}
