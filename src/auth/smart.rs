//! SMART Backend Services (HL7 SMART App Launch, "Backend Services"): a client proves who it is
//! with a JWT it signs with its private key (`private_key_jwt`, RFC 7523) and gets a short-lived
//! access token, a JWT this server signs (HS256) with its token secret.
//!
//! The assertion: signed RS384 or ES384 (RS256 and ES256 accepted too) by a key of the client's
//! registered set, `kid` in the header, `iss` = `sub` = the client id, `aud` = the token endpoint
//! URL, `exp` at most five minutes ahead, and a `jti` never seen before within its lifetime.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::jwks::ALGORITHMS;
use super::{Access, Principal};

/// `client_assertion_type` of a JWT client assertion.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Lifetime of an access token this server issues (seconds).
pub const ACCESS_TOKEN_SECONDS: u64 = 300;

/// Furthest an assertion's `exp` may be ahead (seconds; SMART: five minutes).
pub const MAX_ASSERTION_LIFETIME: u64 = 300;

/// A JWT longer than this (bytes) is refused before it is parsed.
pub const MAX_JWT_BYTES: usize = 16 * 1024;

/// Clock difference tolerated between a client and this server (seconds).
const CLOCK_SKEW: u64 = 60;

/// Most `jti`s remembered at once (each for at most its assertion's lifetime); beyond it, assertions
/// are refused until old ones expire.
const MAX_REMEMBERED_JTIS: usize = 100_000;

/// The key the server signs access tokens with: the configured secret, or else one drawn at
/// random when the process starts (tokens then do not survive a restart nor cross processes).
pub fn token_key(configured: Option<&[u8]>) -> &[u8] {
    static RANDOM: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    configured.unwrap_or_else(|| RANDOM.get_or_init(rand::random::<[u8; 32]>).as_slice())
}

pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// The `jti`s of the assertions accepted, until they expire. Each server process keeps its own
/// set: with several processes behind one address an assertion could be replayed once against each
/// of them within its lifetime (at most five minutes); a shared store would close that.
#[derive(Debug, Default)]
pub struct ReplayCache {
    seen: Mutex<HashMap<(String, String), u64>>,
}

impl ReplayCache {
    /// Record `jti` of `client` valid until `exp`; false if it was seen before (a replay) or if the
    /// cache is full.
    pub fn first_use(&self, client: &str, jti: &str, exp: u64, now: u64) -> bool {
        let mut seen = self.seen.lock().expect("replay cache lock");
        if seen.len() >= MAX_REMEMBERED_JTIS / 2 {
            seen.retain(|_, e| *e + CLOCK_SKEW >= now);
        }
        if seen.len() >= MAX_REMEMBERED_JTIS {
            return false;
        }
        let key = (client.to_string(), jti.to_string());
        match seen.get(&key) {
            Some(e) if *e + CLOCK_SKEW >= now => false,
            _ => {
                seen.insert(key, exp);
                true
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct AssertionClaims {
    exp: u64,
    jti: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Unverified {
    iss: Option<String>,
}

impl Access {
    /// The client a client assertion authenticates (`endpoint`: the token endpoint URL, which
    /// the assertion's `aud` must name; `client_id`: the request's parameter, if sent). The error is
    /// a reason for the log and the `error_description`.
    pub async fn client_assertion(
        &self,
        assertion: &str,
        endpoint: &str,
        client_id: Option<&str>,
    ) -> Result<Arc<Principal>, String> {
        if assertion.len() > MAX_JWT_BYTES {
            return Err(format!(
                "the client assertion is longer than {MAX_JWT_BYTES} bytes"
            ));
        }
        let header = jsonwebtoken::decode_header(assertion)
            .map_err(|_| "the client assertion is not a JWT".to_string())?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(format!(
                "the client assertion is signed {:?}: use RS384 or ES384 (or RS256, ES256)",
                header.alg
            ));
        }
        // the issuer names the client whose keys are to verify it; nothing else is trusted before
        let iss = jsonwebtoken::dangerous::insecure_decode::<Unverified>(assertion)
            .ok()
            .and_then(|t| t.claims.iss)
            .ok_or_else(|| "the client assertion has no iss".to_string())?;
        if client_id.is_some_and(|c| c != iss) {
            return Err("client_id and the assertion's iss differ".into());
        }
        let (principal, keys) = match (self.by_id.get(&iss), self.client_keys.get(&iss)) {
            (Some(p), Some(k)) => (p.clone(), k.clone()),
            (Some(_), None) => {
                return Err(format!(
                    "client '{iss}' has no registered key set (jwks_file or jwks_url)"
                ));
            }
            _ => return Err("unknown client".into()),
        };
        if let Some(jku) = &header.jku
            && keys.jwks_url.as_deref() != Some(jku.as_str())
        {
            return Err("the assertion's jku is not the client's registered jwks_url".into());
        }
        let key: DecodingKey = keys
            .source
            .key(header.kid.as_deref(), header.alg)
            .await
            .map_err(|e| e.to_string())?;
        let mut v = Validation::new(header.alg);
        v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        v.set_issuer(&[&principal.id]);
        v.sub = Some(principal.id.clone());
        v.set_audience(&[endpoint.to_string(), format!("{endpoint}/")]);
        v.leeway = CLOCK_SKEW;
        v.validate_nbf = true;
        let claims = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &v)
            .map_err(|e| format!("the client assertion is not valid: {}", describe(&e)))?
            .claims;
        let now = now();
        if claims.exp > now + MAX_ASSERTION_LIFETIME + CLOCK_SKEW {
            return Err(format!(
                "the client assertion expires more than {MAX_ASSERTION_LIFETIME} s from now"
            ));
        }
        let jti = claims
            .jti
            .filter(|j| !j.is_empty() && j.len() <= 256)
            .ok_or_else(|| "the client assertion has no jti (or one over 256 bytes)".to_string())?;
        if !self.replay.first_use(&principal.id, &jti, claims.exp, now) {
            return Err("the client assertion's jti was used before".into());
        }
        Ok(principal)
    }
}

/// A verification failure in words (never the token).
pub fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "expired".into(),
        K::ImmatureSignature => "not valid yet (nbf)".into(),
        K::InvalidAudience => "wrong audience (aud)".into(),
        K::InvalidIssuer => "wrong issuer (iss)".into(),
        K::InvalidSubject => "sub is not the client".into(),
        K::InvalidSignature => "the signature does not verify".into(),
        K::InvalidAlgorithm => "algorithm not accepted".into(),
        K::MissingRequiredClaim(c) => format!("claim {c} missing"),
        K::InvalidClaimFormat(c) => format!("claim {c} malformed"),
        _ => "malformed".into(),
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct AccessClaims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    iat: u64,
    jti: String,
    scope: String,
}

/// An access token for `client` with `scope`, for the FHIR base `audience`, issued by `issuer`
/// (the token endpoint).
pub fn issue(
    secret: &[u8],
    client: &str,
    scope: &str,
    issuer: &str,
    audience: &str,
) -> Result<String, String> {
    let now = now();
    let claims = AccessClaims {
        iss: issuer.to_string(),
        sub: client.to_string(),
        aud: audience.to_string(),
        exp: now + ACCESS_TOKEN_SECONDS,
        iat: now,
        jti: uuid::Uuid::new_v4().to_string(),
        scope: scope.to_string(),
    };
    let key = EncodingKey::from_secret(secret).map_err(|e| e.to_string())?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).map_err(|e| e.to_string())
}

impl Access {
    /// The principal of an access token this server issued, for the FHIR base `audience`: the
    /// client's, narrowed to the token's scopes.
    pub(super) fn own_token(
        &self,
        token: &str,
        secret: &[u8],
        audience: &str,
    ) -> Result<Arc<Principal>, String> {
        let key = DecodingKey::from_secret(secret).map_err(|e| e.to_string())?;
        let mut v = Validation::new(Algorithm::HS256);
        v.set_required_spec_claims(&["exp", "sub", "aud"]);
        v.set_audience(&[audience.to_string(), format!("{audience}/")]);
        // the server's own clock issued it
        v.leeway = 0;
        let claims = jsonwebtoken::decode::<AccessClaims>(token, &key, &v)
            .map_err(|e| describe(&e))?
            .claims;
        let base = self
            .by_id
            .get(&claims.sub)
            .ok_or_else(|| "its client is not in the access file".to_string())?;
        let mut p = Principal::clone(base);
        p.scopes = Some(super::Scopes::parse(&claims.scope));
        Ok(Arc::new(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jti_is_accepted_once_while_it_lives() {
        let cache = ReplayCache::default();
        assert!(cache.first_use("lab", "1", 1000, 900));
        assert!(!cache.first_use("lab", "1", 1000, 950));
        // another client's jti is its own
        assert!(cache.first_use("ehr", "1", 1000, 950));
        // long after it expired, a jti is forgotten (the assertion itself is refused as expired)
        assert!(cache.first_use("lab", "1", 3000, 2000));
    }

    #[test]
    fn access_tokens_round_trip_and_are_bound_to_their_audience() {
        let access = Access::parse(
            "[[client]]\nid='lab'\nrole='laboratory'\ntoken_sha256='9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08'",
        )
        .unwrap();
        let secret = [7u8; 32];
        let t = issue(
            &secret,
            "lab",
            "system/Patient.rs",
            "http://h/auth/token",
            "http://h/fhir",
        )
        .unwrap();
        let p = access.own_token(&t, &secret, "http://h/fhir").unwrap();
        assert_eq!(p.id, "lab");
        assert!(p.may_read("Patient") && !p.may_write("Patient") && !p.may_read("Observation"));
        assert!(access.own_token(&t, &secret, "http://other/fhir").is_err());
        assert!(access.own_token(&t, &[8u8; 32], "http://h/fhir").is_err());
    }
}
