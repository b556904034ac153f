//! Bearer tokens of an OpenID Connect / OAuth issuer the access file trusts (`[[issuer]]`): a JWT
//! signed by a key of the issuer's set, with its `iss`, an `aud` naming this server, `exp` (and
//! `nbf`, if present) within a minute's clock skew. A claim of the token names the client entry of
//! the access file it acts as; that entry's role, regions and endpoints apply, narrowed by the
//! token's SMART scopes when it carries a `scope` (or `scp`) claim.
use std::sync::Arc;

use jsonwebtoken::{Header, Validation};
use serde_json::{Map, Value};

use super::jwks::KeySource;
use super::smart::describe;
use super::{Access, Principal, Scopes};

/// Clock difference tolerated between an issuer and this server (seconds).
const LEEWAY: u64 = 60;

/// The claims that name the client, in order, when the entry does not say which.
const DEFAULT_CLIENT_CLAIMS: [&str; 3] = ["client_id", "azp", "sub"];

/// A trusted issuer (`[[issuer]]` of the access file).
#[derive(Debug)]
pub struct Issuer {
    pub issuer: String,
    pub audience: String,
    pub keys: KeySource,
    /// The claim naming the client entry (`None`: `client_id`, else `azp`, else `sub`).
    pub client_claim: Option<String>,
    /// The client entries its tokens may act as (`None`: any).
    pub clients: Option<Vec<String>>,
}

impl Issuer {
    pub fn may_act_as(&self, client: &str) -> bool {
        self.clients
            .as_ref()
            .is_none_or(|c| c.iter().any(|x| x == client))
    }

    fn client_of<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a str> {
        match &self.client_claim {
            Some(c) => claims.get(c).and_then(Value::as_str),
            None => DEFAULT_CLIENT_CLAIMS
                .iter()
                .find_map(|c| claims.get(*c).and_then(Value::as_str)),
        }
    }
}

#[derive(Debug, serde::Deserialize)]
struct Unverified {
    iss: Option<String>,
}

/// The scopes of a token: `scope` (space-separated) or `scp` (a list, or a string).
fn scopes_of(claims: &Map<String, Value>) -> Option<Scopes> {
    match (claims.get("scope"), claims.get("scp")) {
        (Some(Value::String(s)), _) | (None, Some(Value::String(s))) => Some(Scopes::parse(s)),
        (None, Some(Value::Array(list))) => {
            let joined: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
            Some(Scopes::parse(&joined.join(" ")))
        }
        (None, None) => None,
        // a scope claim of another shape: narrowed to nothing rather than not at all
        _ => Some(Scopes::default()),
    }
}

impl Access {
    /// The principal of a token of a trusted issuer.
    pub(super) async fn issuer_token(
        &self,
        token: &str,
        header: &Header,
    ) -> Result<Arc<Principal>, String> {
        let iss = jsonwebtoken::dangerous::insecure_decode::<Unverified>(token)
            .ok()
            .and_then(|t| t.claims.iss)
            .ok_or_else(|| "no iss".to_string())?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or_else(|| "not from a trusted issuer".to_string())?;
        let key = issuer
            .keys
            .key(header.kid.as_deref(), header.alg)
            .await
            .map_err(|e| e.to_string())?;
        let mut v = Validation::new(header.alg);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.set_issuer(&[&issuer.issuer]);
        v.set_audience(&[&issuer.audience]);
        v.leeway = LEEWAY;
        v.validate_nbf = true;
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v)
            .map_err(|e| describe(&e))?
            .claims;
        let client = issuer
            .client_of(&claims)
            .ok_or_else(|| "no claim names the client".to_string())?;
        if !issuer.may_act_as(client) {
            return Err(format!("the issuer may not act as client '{client}'"));
        }
        let base = self
            .by_id
            .get(client)
            .ok_or_else(|| "the client it names is not in the access file".to_string())?;
        let mut p = Principal::clone(base);
        p.scopes = scopes_of(&claims);
        Ok(Arc::new(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_come_from_scope_or_scp() {
        let m = |v: Value| v.as_object().unwrap().clone();
        assert!(scopes_of(&m(serde_json::json!({}))).is_none());
        let s = scopes_of(&m(serde_json::json!({"scope": "openid system/Patient.rs"}))).unwrap();
        assert!(s.allows_read("Patient") && !s.allows_read("Observation"));
        let s = scopes_of(&m(serde_json::json!({"scp": ["system/Observation.c"]}))).unwrap();
        assert!(s.allows_write("Observation"));
        assert!(
            scopes_of(&m(serde_json::json!({"scope": 3})))
                .unwrap()
                .is_empty()
        );
    }
}
