//! The OAuth side of the server: `POST /auth/token` (SMART Backend Services: client credentials
//! with a signed client assertion, RFC 6749 §4.4 and RFC 7523) and the SMART discovery document
//! (`/.well-known/smart-configuration`, also under `/fhir`). Neither needs a bearer token.
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use crate::auth::Scopes;
use crate::auth::smart::{self, ACCESS_TOKEN_SECONDS, ASSERTION_TYPE};
use crate::config::Config;

/// Largest token request body (bytes).
const MAX_FORM_BYTES: usize = 64 * 1024;

/// The path of the token endpoint.
pub const TOKEN_PATH: &str = "/auth/token";

fn host(headers: &HeaderMap) -> &str {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
}

/// The FHIR base URL as clients see it (as `format::BaseUrl`): `--base-url`, else from the Host
/// header. The audience of the access tokens.
pub fn fhir_base(config: &Config, headers: &HeaderMap) -> String {
    match &config.base_url {
        Some(b) => b.trim_end_matches('/').to_string(),
        None => format!("http://{}/fhir", host(headers)),
    }
}

/// The token endpoint URL: the origin of `--base-url` (else of the Host header) and `/auth/token`.
/// A client assertion's `aud` must name it.
pub fn token_endpoint(config: &Config, headers: &HeaderMap) -> String {
    let origin = match &config.base_url {
        Some(b) => {
            let authority = b.find("://").map(|i| i + 3).unwrap_or(0);
            match b[authority..].find('/') {
                Some(slash) => b[..authority + slash].to_string(),
                None => b.trim_end_matches('/').to_string(),
            }
        }
        None => format!("http://{}", host(headers)),
    };
    format!("{origin}{TOKEN_PATH}")
}

/// An OAuth error answer (RFC 6749 §5.2).
fn oauth_error(
    status: StatusCode,
    error: &'static str,
    description: impl Into<String>,
) -> Response {
    let description = description.into();
    tracing::info!(error, reason = %description, "token request refused");
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

fn invalid_request(description: impl Into<String>) -> Response {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

/// The form parameters, each at most once (RFC 6749 §3.2; `Err`: the repeated one).
fn form(bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut params: Vec<(String, String)> = Vec::new();
    for (k, v) in form_urlencoded::parse(bytes) {
        if params.iter().any(|(seen, _)| *seen == k) {
            return Err(k.into_owned());
        }
        params.push((k.into_owned(), v.into_owned()));
    }
    Ok(params)
}

/// `POST /auth/token`.
pub async fn token(State(state): State<AppState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let form_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
        .unwrap_or(false);
    if !form_type {
        return invalid_request("send the parameters as application/x-www-form-urlencoded");
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_FORM_BYTES) {
        return invalid_request(format!("the request is larger than {MAX_FORM_BYTES} bytes"));
    }
    let bytes = match axum::body::to_bytes(Body::new(body), MAX_FORM_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return invalid_request(format!(
                "the request is unreadable or larger than {MAX_FORM_BYTES} bytes"
            ));
        }
    };
    let params = match form(&bytes) {
        Ok(p) => p,
        Err(name) => return invalid_request(format!("parameter {name} is repeated")),
    };
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    match get("grant_type") {
        None => return invalid_request("grant_type is missing"),
        Some("client_credentials") => {}
        Some(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only grant_type=client_credentials is supported",
            );
        }
    }
    match get("client_assertion_type") {
        None => {
            return invalid_request(format!(
                "client_assertion_type is missing (SMART Backend Services: {ASSERTION_TYPE})"
            ));
        }
        Some(t) if t == ASSERTION_TYPE => {}
        Some(_) => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                format!("client_assertion_type must be {ASSERTION_TYPE}"),
            );
        }
    }
    let Some(assertion) = get("client_assertion") else {
        return invalid_request("client_assertion is missing");
    };
    let Some(requested) = get("scope") else {
        return invalid_request("scope is missing (e.g. scope=system/Observation.cruds)");
    };
    // each client's rate, before the signature is checked (the costly part): the client the
    // assertion claims to be, when the access file knows it (so the buckets stay bounded)
    if let Some(claimed) = claimed_client(assertion, get("client_id"))
        && state.access.client(&claimed).is_some()
        && let Err(wait) = state.rate_limits.check(&format!("token:{claimed}"))
    {
        let mut r = oauth_error(
            StatusCode::TOO_MANY_REQUESTS,
            "invalid_request",
            format!(
                "client '{claimed}' asked for tokens faster than its rate allows: retry after {wait} s"
            ),
        );
        r.headers_mut().insert(
            header::RETRY_AFTER,
            axum::http::HeaderValue::from_str(&wait.max(1).to_string())
                .expect("digits are a valid header"),
        );
        return r;
    }
    let endpoint = token_endpoint(&state.config, &parts.headers);
    let client = match state
        .access
        .client_assertion(assertion, &endpoint, get("client_id"))
        .await
    {
        Ok(p) => p,
        Err(why) => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", why),
    };
    // the role decides what can be granted: scopes never widen it
    let granted = Scopes::grantable(requested, |t| client.may_read(t), |t| client.may_write(t));
    if granted.is_empty() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!(
                "none of the requested scopes is allowed to client '{}' ({:?}); ask for system/<Type>.<cruds> scopes of its role",
                client.id, client.role
            ),
        );
    }
    let scope = granted.render();
    let secret = smart::token_key(state.config.token_secret.as_ref().map(|s| s.as_bytes()));
    let audience = fhir_base(&state.config, &parts.headers);
    let access_token = match smart::issue(secret, &client.id, &scope, &endpoint, &audience) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "could not sign an access token");
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "server_error", "error_description": "could not sign the token"}),
            );
        }
    };
    tracing::info!(client = %client.id, %scope, "access token issued");
    json_response(
        StatusCode::OK,
        &json!({
            "access_token": access_token,
            "token_type": "bearer",
            "expires_in": ACCESS_TOKEN_SECONDS,
            "scope": scope,
        }),
    )
}

/// `GET /.well-known/smart-configuration` (and under `/fhir`): SMART discovery.
pub async fn smart_configuration(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let scopes: Vec<String> = [
        "system/*.rs",
        "system/*.cruds",
        "system/*.read",
        "system/*.*",
    ]
    .into_iter()
    .map(String::from)
    .chain(
        crate::fhir::SERVED_TYPES
            .iter()
            .flat_map(|t| [format!("system/{t}.rs"), format!("system/{t}.cruds")]),
    )
    .collect();
    let mut r = json_response(
        StatusCode::OK,
        &json!({
            "token_endpoint": token_endpoint(&state.config, &headers),
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384", "RS256", "ES256"],
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": scopes,
            "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
        }),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=3600"),
    );
    r.headers_mut().remove(header::PRAGMA);
    r
}

/// The client an assertion says it comes from (`client_id`, else its unverified `iss`): only a
/// key for the rate limit, never trusted for anything else.
fn claimed_client(assertion: &str, client_id: Option<&str>) -> Option<String> {
    use base64::Engine as _;
    if let Some(id) = client_id {
        return Some(id.to_string());
    }
    let payload = assertion.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["iss"].as_str().map(String::from)
}
