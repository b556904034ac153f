//! Who is looking at the dashboard. Browsers send no bearer token, so `/dashboard/login` takes one
//! in a form, checks it exactly as the API checks a bearer token, and keeps it in a cookie that
//! only `/dashboard` pages receive (`Path=/dashboard`, `HttpOnly`, `SameSite=Strict`): the FHIR API
//! never accepts the cookie, so it opens no cross-site request path into `/fhir`. The token is
//! checked again on every page, so an expired or withdrawn token ends the session.
use std::sync::Arc;

use axum::http::{HeaderMap, header};

use crate::api::AppState;
use crate::auth::{BearerContext, BearerError, Principal};

pub const COOKIE: &str = "sentinella_dashboard";
/// Browsers keep cookies up to about 4 KB; a longer token cannot be a session.
pub const MAX_TOKEN_BYTES: usize = 3800;

/// Why no viewer could be established.
#[derive(Debug, PartialEq)]
pub enum NoViewer {
    /// No token at all: the login form.
    Anonymous,
    /// A token that is not (or no longer) valid, with the reason in Italian.
    Rejected(String),
}

/// The viewer of a request and whether it came through the session cookie.
pub async fn viewer(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(Arc<Principal>, bool), NoViewer> {
    if state.access.is_development() {
        return Ok((Arc::new(Principal::development()), false));
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    if let Some(token) = bearer {
        return check(state, headers, token.trim())
            .await
            .map(|p| (p, false));
    }
    match cookie(headers) {
        Some(token) => check(state, headers, &token).await.map(|p| (p, true)),
        None => Err(NoViewer::Anonymous),
    }
}

/// The API's own bearer check (static tokens, this server's JWTs, trusted issuers' JWTs).
pub async fn check(
    state: &AppState,
    headers: &HeaderMap,
    token: &str,
) -> Result<Arc<Principal>, NoViewer> {
    if token.is_empty() {
        return Err(NoViewer::Anonymous);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(NoViewer::Rejected(format!(
            "il token è più lungo di {MAX_TOKEN_BYTES} byte e non può essere conservato in un cookie"
        )));
    }
    let ctx = BearerContext {
        secret: crate::auth::smart::token_key(
            state.config.token_secret.as_ref().map(|s| s.as_bytes()),
        ),
        fhir_base: &crate::api::token::fhir_base(&state.config, headers),
    };
    match state.access.authenticate_bearer(token, ctx).await {
        Ok(p) => Ok(p),
        Err(BearerError::Unknown) => Err(NoViewer::Rejected(
            "token non riconosciuto: nessun client del file di accesso ha questo token".into(),
        )),
        Err(BearerError::Invalid(why)) => {
            Err(NoViewer::Rejected(format!("il token non è valido ({why})")))
        }
    }
}

/// The session cookie's token, if the request has one.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| {
            form_urlencoded::parse(format!("t={value}").as_bytes())
                .next()
                .map(|(_, t)| t.into_owned())
                .unwrap_or_default()
        })
        .filter(|t| !t.is_empty())
}

/// Served over HTTPS (the configured base, or a proxy that says so): the cookie is `Secure`.
fn secure(state: &AppState, headers: &HeaderMap) -> bool {
    state
        .config
        .base_url
        .as_deref()
        .is_some_and(|b| b.starts_with("https://"))
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

/// `Set-Cookie` for a session holding `token`.
pub fn set_cookie(state: &AppState, headers: &HeaderMap, token: &str) -> String {
    let value: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
    format!(
        "{COOKIE}={value}; Path=/dashboard; HttpOnly; SameSite=Strict{}",
        if secure(state, headers) {
            "; Secure"
        } else {
            ""
        }
    )
}

/// `Set-Cookie` that ends the session.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// A form post from another site is refused: its `Origin` (browsers send one with every POST)
/// must be this server's.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        // not a browser's cross-site form (they always send Origin on POST)
        return true;
    };
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    origin == format!("http://{host}") || origin == format!("https://{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_round_trips_any_token() {
        let mut h = HeaderMap::new();
        let token = "a b;c=d%e";
        let value: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
        h.insert(
            header::COOKIE,
            format!("other=1; {COOKIE}={value}").parse().unwrap(),
        );
        assert_eq!(cookie(&h).as_deref(), Some(token));
    }

    #[test]
    fn posts_from_elsewhere_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(!same_origin(&h));
    }
}
