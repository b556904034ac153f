//! Who may do what. Clients authenticate with a bearer token; the configuration file (TOML, path by
//! `--config`) lists each client with its role, the regions it may see, the endpoints it may have
//! notifications sent to, and the SHA-256 of its token (never the token). Without a file the server
//! runs in single-user development mode: every request acts as an administrator.
use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::fhir::Definitions;
use crate::store::query::{Condition, Match, SystemMatch};
use crate::terminology::CANON;

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
    /// Everything.
    Admin,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    id: String,
    role: Role,
    #[serde(default)]
    regions: Vec<String>,
    /// Lower-case hex SHA-256 of the bearer token (`printf %s TOKEN | sha256sum`).
    token_sha256: String,
    /// URL prefixes (`https://…`) and NATS subject prefixes (`nats:…`) notifications may go to.
    #[serde(default)]
    endpoints: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessFile {
    #[serde(default, rename = "client")]
    clients: Vec<ClientEntry>,
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
}

/// The types whose content is surveillance output or subscription state.
const CASE_TYPES: &[&str] = &["Communication", "Subscription", "MeasureReport"];

impl Principal {
    pub fn development() -> Principal {
        Principal {
            id: String::new(),
            role: Role::Admin,
            regions: vec![],
            endpoints: vec![],
            development: true,
        }
    }

    pub fn may_read(&self, rt: &str) -> bool {
        match self.role {
            Role::Admin | Role::Ministry => true,
            Role::Laboratory | Role::Ehr => !CASE_TYPES.contains(&rt),
            Role::Region => CASE_TYPES.contains(&rt),
        }
    }

    pub fn may_write(&self, rt: &str) -> bool {
        match self.role {
            Role::Admin => true,
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

/// The clients of the configuration file, by token hash and by id.
#[derive(Debug, Default)]
pub struct Access {
    by_hash: HashMap<String, Arc<Principal>>,
    by_id: HashMap<String, Arc<Principal>>,
    development: bool,
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
        Access::parse(&text).map_err(|message| AccessError::Invalid {
            path: path.into(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Access, String> {
        let file: AccessFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut access = Access::default();
        for c in file.clients {
            let hash = c.token_sha256.trim().to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "client '{}': token_sha256 must be 64 hex digits (the SHA-256 of the token)",
                    c.id
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
            });
            if access.by_id.insert(c.id.clone(), p.clone()).is_some() {
                return Err(format!("client '{}' is listed twice", c.id));
            }
            if access.by_hash.insert(hash, p).is_some() {
                return Err(format!(
                    "client '{}' shares a token with another client",
                    c.id
                ));
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
}
