//! Who may do what. Clients authenticate with a bearer token; the configuration file (TOML, path by
//! `--config`) lists each client with its role, the regions it may see, the endpoints it may have
//! notifications sent to, and how it proves who it is: the SHA-256 of a static token (never the
//! token), and/or a public key set for SMART Backend Services (`smart`: it signs an assertion and
//! gets a short-lived access token from `POST /auth/token`). `[[issuer]]` entries trust the tokens
//! of an OIDC issuer (`oidc`) acting as one of the clients. A token's SMART scopes (`scopes`) only
//! ever narrow its client's role. Without a file the server runs in single-user development mode:
//! every request acts as an administrator.
pub mod jwks;
pub mod oidc;
pub mod scopes;
pub mod smart;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::fhir::Definitions;
use crate::store::query::{Condition, Match, SystemMatch};
use crate::terminology::CANON;
use jwks::KeySource;
pub use scopes::Scopes;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sends microbiology results; cannot read cases.
    Laboratory,
    /// Sends doctors' notifications; cannot read cases.
    Ehr,
    /// A regional system: reads and subscribes to the cases addressed to its regions.
    Region,
    /// The ministry or ISS: reads and subscribes to every case.
    Ministry,
    /// Everything but the audit trail.
    Admin,
    /// Reads the audit trail (AuditEvent) and nothing else.
    Auditor,
    /// Scrapes the server's metrics (`GET /metrics`); no FHIR data at all.
    Monitoring,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    id: String,
    role: Role,
    #[serde(default)]
    regions: Vec<String>,
    /// Lower-case hex SHA-256 of a static bearer token (`printf %s TOKEN | sha256sum`).
    #[serde(default)]
    token_sha256: Option<String>,
    /// The client's public keys (a JWKS file; a relative path is read from the access file's
    /// folder), for SMART Backend Services client assertions.
    #[serde(default)]
    jwks_file: Option<String>,
    /// The same, published at a URL (`https://…`).
    #[serde(default)]
    jwks_url: Option<String>,
    /// URL prefixes (`https://…`) and NATS subject prefixes (`nats:…`) notifications may go to.
    #[serde(default)]
    endpoints: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessFile {
    #[serde(default, rename = "client")]
    clients: Vec<ClientEntry>,
    #[serde(default, rename = "issuer")]
    issuers: Vec<IssuerEntry>,
}

/// An OIDC issuer whose bearer tokens act as client entries of the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuerEntry {
    /// The tokens' `iss`.
    issuer: String,
    /// The `aud` the tokens must name (this server).
    audience: String,
    #[serde(default)]
    jwks_file: Option<String>,
    #[serde(default)]
    jwks_url: Option<String>,
    /// The claim naming the client entry (default `client_id`, else `azp`, else `sub`).
    #[serde(default)]
    client_claim: Option<String>,
    /// The client entries its tokens may act as (default: any).
    #[serde(default)]
    clients: Option<Vec<String>>,
}

/// An authenticated client.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub id: String,
    pub role: Role,
    pub regions: Vec<String>,
    pub endpoints: Vec<String>,
    /// Development mode: no configuration file, any endpoint.
    pub development: bool,
    /// The SMART scopes of the token it came with (`None`: a static token, or a token without
    /// scopes: the role alone decides). Scopes only narrow the role.
    pub scopes: Option<Scopes>,
}

/// The types whose content is surveillance output or subscription state.
const CASE_TYPES: &[&str] = &["Communication", "Subscription", "MeasureReport"];

/// The audit trail: read by auditors only, written by the server only.
pub const AUDIT_TYPE: &str = "AuditEvent";

impl Principal {
    pub fn development() -> Principal {
        Principal {
            id: String::new(),
            role: Role::Admin,
            regions: vec![],
            endpoints: vec![],
            development: true,
            scopes: None,
        }
    }

    pub fn may_read(&self, rt: &str) -> bool {
        self.role_may_read(rt) && self.scopes.as_ref().is_none_or(|s| s.allows_read(rt))
    }

    pub fn may_write(&self, rt: &str) -> bool {
        self.role_may_write(rt) && self.scopes.as_ref().is_none_or(|s| s.allows_write(rt))
    }

    /// What the role alone allows to read.
    fn role_may_read(&self, rt: &str) -> bool {
        if self.development {
            return true;
        }
        if rt == AUDIT_TYPE || self.role == Role::Auditor {
            return rt == AUDIT_TYPE && self.role == Role::Auditor;
        }
        match self.role {
            Role::Admin | Role::Ministry => true,
            Role::Laboratory | Role::Ehr => !CASE_TYPES.contains(&rt),
            Role::Region => CASE_TYPES.contains(&rt),
            // answered above: the audit trail only
            Role::Auditor => false,
            Role::Monitoring => false,
        }
    }

    /// What the role alone allows to write.
    fn role_may_write(&self, rt: &str) -> bool {
        if rt == AUDIT_TYPE {
            return false;
        }
        match self.role {
            Role::Admin => true,
            Role::Auditor | Role::Monitoring => false,
            Role::Laboratory => !CASE_TYPES.contains(&rt),
            // doctors' notifications are Communications (the case ones are refused elsewhere)
            Role::Ehr => rt == "Communication" || !CASE_TYPES.contains(&rt),
            Role::Region | Role::Ministry => rt == "Subscription",
        }
    }

    /// Search conditions every read of `rt` by this client must also meet (`None`: no limit).
    pub fn scope(&self, rt: &str) -> Option<Vec<Condition>> {
        if self.role == Role::Admin {
            return None;
        }
        match rt {
            "Subscription" => Some(vec![Condition::Index {
                param: "owner".into(),
                any_of: vec![Match::Exact {
                    value: self.id.clone(),
                    system: SystemMatch::Is(owner_system()),
                }],
                negate: false,
            }]),
            "Communication" | "MeasureReport" if self.role == Role::Region => {
                Some(vec![Condition::Index {
                    param: "region".into(),
                    any_of: self
                        .regions
                        .iter()
                        .map(|r| Match::Exact {
                            value: r.clone(),
                            system: SystemMatch::Any,
                        })
                        .collect(),
                    negate: false,
                }])
            }
            _ => None,
        }
    }

    /// May this client see this resource? (A read outside its scope is answered as not found.)
    pub fn sees(&self, resource: &Value) -> bool {
        let rt = resource["resourceType"].as_str().unwrap_or_default();
        if !self.may_read(rt) {
            return false;
        }
        match self.scope(rt) {
            None => true,
            Some(conditions) => {
                let entries = Definitions::get().search.extract_all(resource);
                let id = resource["id"].as_str().unwrap_or_default();
                conditions.iter().all(|c| c.matches(id, &entries))
            }
        }
    }

    /// May notifications go to this endpoint (`nats:<subject>` for the NATS channel)?
    pub fn may_send_to(&self, endpoint: &str) -> bool {
        self.development
            || self
                .endpoints
                .iter()
                .any(|p| endpoint.starts_with(p.as_str()))
    }
}

/// The system of the `meta.tag` that records which client owns a Subscription.
pub fn owner_system() -> String {
    format!("{CANON}/sid/cliente")
}

/// The clients of the configuration file, by token hash and by id; their key sets; the trusted
/// issuers.
#[derive(Debug, Default)]
pub struct Access {
    by_hash: HashMap<String, Arc<Principal>>,
    by_id: HashMap<String, Arc<Principal>>,
    development: bool,
    /// The registered public keys of SMART Backend Services clients, by client id.
    client_keys: HashMap<String, Arc<ClientKeys>>,
    issuers: Vec<oidc::Issuer>,
    /// The `jti`s of the client assertions accepted (this process only).
    replay: smart::ReplayCache,
}

/// A client's registered key set.
#[derive(Debug)]
struct ClientKeys {
    source: KeySource,
    /// The URL it was registered by (what an assertion's `jku` header may name).
    jwks_url: Option<String>,
}

/// Why a bearer token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BearerError {
    /// Not a static token of the file, nor shaped as a JWT.
    Unknown,
    /// A JWT that does not verify (why, in words; never the token).
    Invalid(String),
}

/// What a bearer JWT is checked against besides keys.
#[derive(Debug, Clone, Copy)]
pub struct BearerContext<'a> {
    /// The key this server signs its access tokens with.
    pub secret: &'a [u8],
    /// The FHIR base URL, the audience of this server's access tokens.
    pub fhir_base: &'a str,
}

/// Exactly one of `jwks_file`, `jwks_url` (or none: `Ok(None)`).
fn key_source(
    who: &str,
    file: Option<&str>,
    url: Option<&str>,
    dir: Option<&Path>,
) -> Result<Option<KeySource>, String> {
    match (file, url) {
        (Some(_), Some(_)) => Err(format!("{who}: give jwks_file or jwks_url, not both")),
        (Some(f), None) => {
            let path = PathBuf::from(f);
            let path = match dir {
                Some(d) if path.is_relative() => d.join(path),
                _ => path,
            };
            KeySource::file(path)
                .map(Some)
                .map_err(|e| format!("{who}: {e}"))
        }
        (None, Some(u)) => KeySource::url(u)
            .map(Some)
            .map_err(|e| format!("{who}: {e}")),
        (None, None) => Ok(None),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Access {
    pub fn development() -> Access {
        Access {
            development: true,
            ..Default::default()
        }
    }

    pub fn load(path: &str) -> Result<Access, AccessError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessError::Read {
            path: path.into(),
            source,
        })?;
        let dir = Path::new(path).parent();
        Access::parse_in(&text, dir).map_err(|message| AccessError::Invalid {
            path: path.into(),
            message,
        })
    }

    /// An access file's text (a relative `jwks_file` is read from the current folder).
    pub fn parse(text: &str) -> Result<Access, String> {
        Access::parse_in(text, None)
    }

    /// An access file's text, `dir` its folder (where a relative `jwks_file` is).
    fn parse_in(text: &str, dir: Option<&Path>) -> Result<Access, String> {
        let file: AccessFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut access = Access::default();
        for i in &file.issuers {
            let who = format!("issuer '{}'", i.issuer);
            if i.issuer.trim().is_empty() || i.audience.trim().is_empty() {
                return Err(format!("{who}: issuer and audience must not be empty"));
            }
            if access.issuers.iter().any(|o| o.issuer == i.issuer) {
                return Err(format!("{who} is listed twice"));
            }
            if let Some(unknown) = i
                .clients
                .iter()
                .flatten()
                .find(|c| !file.clients.iter().any(|e| &e.id == *c))
            {
                return Err(format!("{who}: client '{unknown}' is not listed"));
            }
            let keys = key_source(&who, i.jwks_file.as_deref(), i.jwks_url.as_deref(), dir)?
                .ok_or_else(|| format!("{who}: needs jwks_file or jwks_url"))?;
            access.issuers.push(oidc::Issuer {
                issuer: i.issuer.clone(),
                audience: i.audience.clone(),
                keys,
                client_claim: i.client_claim.clone(),
                clients: i.clients.clone(),
            });
        }
        for c in file.clients {
            let who = format!("client '{}'", c.id);
            let hash = match &c.token_sha256 {
                Some(h) => {
                    let hash = h.trim().to_ascii_lowercase();
                    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(format!(
                            "{who}: token_sha256 must be 64 hex digits (the SHA-256 of the token)"
                        ));
                    }
                    Some(hash)
                }
                None => None,
            };
            let keys = key_source(&who, c.jwks_file.as_deref(), c.jwks_url.as_deref(), dir)?;
            if hash.is_none()
                && keys.is_none()
                && !access.issuers.iter().any(|i| i.may_act_as(&c.id))
            {
                return Err(format!(
                    "{who}: no way to authenticate: give token_sha256, jwks_file or jwks_url \
                     (or an [[issuer]] whose tokens act as it)"
                ));
            }
            if c.role == Role::Region && c.regions.is_empty() {
                return Err(format!(
                    "client '{}': a region client needs regions = [...]",
                    c.id
                ));
            }
            let p = Arc::new(Principal {
                id: c.id.clone(),
                role: c.role,
                regions: c.regions,
                endpoints: c.endpoints,
                development: false,
                scopes: None,
            });
            if access.by_id.insert(c.id.clone(), p.clone()).is_some() {
                return Err(format!("client '{}' is listed twice", c.id));
            }
            if let Some(hash) = hash
                && access.by_hash.insert(hash, p).is_some()
            {
                return Err(format!(
                    "client '{}' shares a token with another client",
                    c.id
                ));
            }
            if let Some(source) = keys {
                access.client_keys.insert(
                    c.id.clone(),
                    Arc::new(ClientKeys {
                        source,
                        jwks_url: c.jwks_url.clone(),
                    }),
                );
            }
        }
        Ok(access)
    }

    pub fn is_development(&self) -> bool {
        self.development
    }

    /// The client a bearer token belongs to.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Principal>> {
        let hash = Sha256::digest(token.as_bytes());
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        self.by_hash.get(&hex).cloned()
    }

    /// The client a bearer token acts for: a static token of the file, else a JWT (an access
    /// token this server issued, or a token of a trusted issuer). Static tokens are looked up
    /// first and exactly as before.
    pub async fn authenticate_bearer(
        &self,
        token: &str,
        ctx: BearerContext<'_>,
    ) -> Result<Arc<Principal>, BearerError> {
        if let Some(p) = self.authenticate(token) {
            return Ok(p);
        }
        if !token.contains('.') {
            return Err(BearerError::Unknown);
        }
        if token.len() > smart::MAX_JWT_BYTES {
            return Err(BearerError::Invalid(format!(
                "longer than {} bytes",
                smart::MAX_JWT_BYTES
            )));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| BearerError::Invalid("not a JWT".into()))?;
        let verified = if header.alg == jsonwebtoken::Algorithm::HS256 {
            self.own_token(token, ctx.secret, ctx.fhir_base)
        } else if jwks::ALGORITHMS.contains(&header.alg) {
            self.issuer_token(token, &header).await
        } else {
            Err(format!("algorithm {:?} not accepted", header.alg))
        };
        verified.map_err(BearerError::Invalid)
    }

    /// A client by id (the owner of a subscription); in development mode, the single user.
    pub fn client(&self, id: &str) -> Option<Arc<Principal>> {
        if self.development {
            return Some(Arc::new(Principal::development()));
        }
        self.by_id.get(id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[client]]
id = "regione-lombardia"
role = "region"
regions = ["030"]
token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
endpoints = ["https://sorveglianza.regione.lombardia.it/"]
"#;

    #[test]
    fn a_token_authenticates_by_its_hash_only() {
        let a = Access::parse(FILE).unwrap();
        let p = a.authenticate("test").expect("sha256(test) is listed");
        assert_eq!(p.role, Role::Region);
        assert!(
            a.authenticate("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
                .is_none()
        );
        assert!(p.may_send_to("https://sorveglianza.regione.lombardia.it/hook"));
        assert!(!p.may_send_to("https://example.org/hook"));
        assert!(!p.may_read("Observation") && p.may_read("Communication"));
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(Access::parse("[[client]]\nid='x'\nrole='admin'\ntoken_sha256='abc'").is_err());
        assert!(Access::parse("[[client]]\nid='x'\nrole='region'\ntoken_sha256='9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08'").is_err());
        assert!(Access::parse("[[client]]\nid='x'\nrole='wizard'\ntoken_sha256=''").is_err());
    }

    /// A JWKS file of the test key `rsa-1.pem`, in a folder of its own.
    fn jwks_dir() -> PathBuf {
        let private = jsonwebtoken::EncodingKey::from_rsa_pem(include_bytes!(
            "../../tests/fixtures/keys/rsa-1.pem"
        ))
        .unwrap();
        let mut jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&private, jsonwebtoken::Algorithm::RS384)
                .unwrap();
        jwk.common.key_id = Some("k1".into());
        let dir = std::env::temp_dir().join(format!("sentinella-auth-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let set = serde_json::json!({ "keys": [jwk] });
        std::fs::write(dir.join("lab.jwks.json"), set.to_string()).unwrap();
        dir
    }

    #[test]
    fn a_client_may_register_keys_instead_of_a_token() {
        let dir = jwks_dir();
        let text = "[[client]]\nid='lab'\nrole='laboratory'\njwks_file='lab.jwks.json'\n";
        // a relative jwks_file is read from the access file's folder
        let path = dir.join("access.toml");
        std::fs::write(&path, text).unwrap();
        let a = Access::load(path.to_str().unwrap()).unwrap();
        assert!(a.client("lab").is_some());
        assert!(a.client_keys.contains_key("lab"));
        // no way to authenticate at all
        assert!(Access::parse("[[client]]\nid='lab'\nrole='laboratory'").is_err());
        // both a file and a URL
        let both = format!(
            "[[client]]\nid='lab'\nrole='laboratory'\njwks_file='{}'\njwks_url='https://lab.example.org/jwks'",
            dir.join("lab.jwks.json").display()
        );
        assert!(Access::parse(&both).is_err());
        // a missing file, an unknown field, a plain-http URL
        assert!(
            Access::parse("[[client]]\nid='lab'\nrole='laboratory'\njwks_file='/nonexistent.json'")
                .is_err()
        );
        assert!(
            Access::parse(
                "[[client]]\nid='lab'\nrole='laboratory'\njwks_url='https://x.org/j'\njwks='x'"
            )
            .is_err()
        );
        assert!(
            Access::parse(
                "[[client]]\nid='lab'\nrole='laboratory'\njwks_url='http://lab.example.org/jwks'"
            )
            .is_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn issuers_are_checked() {
        let dir = jwks_dir();
        let keys = dir.join("lab.jwks.json").display().to_string();
        let ok = format!(
            "[[client]]\nid='regione'\nrole='region'\nregions=['030']\n\
             [[issuer]]\nissuer='https://idp.example.org'\naudience='sentinella'\njwks_file='{keys}'\nclients=['regione']\n"
        );
        // a client reached only through an issuer needs no credentials of its own
        let a = Access::parse(&ok).unwrap();
        assert_eq!(a.issuers.len(), 1);
        assert!(Access::parse(&ok.replace("clients=['regione']", "clients=['nobody']")).is_err());
        assert!(Access::parse(&ok.replace("audience='sentinella'", "audience=''")).is_err());
        assert!(Access::parse(&ok.replace(&format!("jwks_file='{keys}'"), "")).is_err());
        assert!(Access::parse(&format!("{ok}\n[[issuer]]\nissuer='https://idp.example.org'\naudience='x'\njwks_file='{keys}'\n")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn scopes_narrow_a_role_and_never_widen_it() {
        let a = Access::parse(FILE).unwrap();
        let region = a.client("regione-lombardia").unwrap();
        let mut scoped = Principal::clone(&region);
        scoped.scopes = Some(Scopes::parse(
            "system/Communication.r system/Observation.cruds",
        ));
        assert!(scoped.may_read("Communication") && !scoped.may_read("Subscription"));
        // the role does not read Observation: a scope does not change that
        assert!(!scoped.may_read("Observation") && !scoped.may_write("Observation"));
        scoped.scopes = Some(Scopes::default());
        assert!(!scoped.may_read("Communication"));
        // the static token's principal is not narrowed
        assert!(region.may_read("Communication") && region.may_read("Subscription"));
    }

    #[tokio::test]
    async fn a_bearer_that_is_neither_a_token_nor_a_jwt_is_unknown() {
        let a = Access::parse(FILE).unwrap();
        let ctx = BearerContext {
            secret: b"0123456789abcdef0123456789abcdef",
            fhir_base: "http://localhost/fhir",
        };
        assert!(a.authenticate_bearer("test", ctx).await.is_ok());
        assert_eq!(
            a.authenticate_bearer("nope", ctx).await.unwrap_err(),
            BearerError::Unknown
        );
        assert!(matches!(
            a.authenticate_bearer("a.b.c", ctx).await.unwrap_err(),
            BearerError::Invalid(_)
        ));
        let long = format!("{}.b.c", "a".repeat(20_000));
        assert!(matches!(
            a.authenticate_bearer(&long, ctx).await.unwrap_err(),
            BearerError::Invalid(why) if why.contains("longer")
        ));
    }
}
