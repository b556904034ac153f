//! `sentinella config check FILE`: load an access file with the server's own loader (so a file
//! this accepts, the server accepts) and say in words what each client may do: its role, what it
//! may read and write (asked of the server's own `Principal` rules), its regions, where
//! notifications may go, and how it proves who it is.
use std::path::PathBuf;

use crate::auth::{Access, Principal, Role};

use super::Exit;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum ConfigCommand {
    /// Check an access file and explain what it grants to each client.
    #[command(after_help = concat!(
        "Examples:
  sentinella config check /etc/sentinella/access.toml
  sentinella config check access.toml && systemctl restart sentinella
  (the server reads its access file when it starts: a changed file takes effect on restart)

",
        exit_codes!()
    ))]
    Check {
        /// The access file (TOML), as given to `serve --config`.
        file: PathBuf,
    },
}

/// Roles in words (what the role is for; the type lists below come from the rules themselves).
fn role_words(role: Role) -> String {
    match role {
        Role::Laboratory => "laboratory: sends microbiology results; cannot read cases".into(),
        Role::Ehr => "EHR: sends doctors' notifications; cannot read cases".into(),
        Role::Region => "region: reads and subscribes to the cases addressed to its regions".into(),
        Role::Ministry => "ministry: reads and subscribes to every case".into(),
        Role::Admin => "administrator: everything but the audit trail".into(),
        Role::Auditor => "auditor: reads the audit trail and nothing else".into(),
        Role::Monitoring => "monitoring: scrapes /metrics; reads and writes no FHIR data".into(),
    }
}

/// A list of types in words: "all 15 types", "every type except X", or the types.
fn types_words(allowed: &[&str]) -> String {
    let all = crate::fhir::SERVED_TYPES;
    if allowed.is_empty() {
        return "nothing".into();
    }
    if allowed.len() == all.len() {
        return format!("every resource type ({})", all.len());
    }
    let missing: Vec<&str> = all
        .iter()
        .copied()
        .filter(|t| !allowed.contains(t))
        .collect();
    if missing.len() <= 3 && allowed.len() > missing.len() {
        return format!("every resource type except {}", missing.join(", "));
    }
    allowed.join(", ")
}

fn strings(v: &toml::Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(String::from))
        .collect()
}

/// One client, in words.
fn describe(p: &Principal, entry: &toml::Value, issuers: &[toml::Value]) -> String {
    let read: Vec<&str> = crate::fhir::SERVED_TYPES
        .iter()
        .copied()
        .filter(|t| p.may_read(t))
        .collect();
    let write: Vec<&str> = crate::fhir::SERVED_TYPES
        .iter()
        .copied()
        .filter(|t| p.may_write(t))
        .collect();
    let mut out = format!("client '{}'\n  role:      {}\n", p.id, role_words(p.role));
    out.push_str(&format!("  may read:  {}\n", types_words(&read)));
    out.push_str(&format!("  may write: {}\n", types_words(&write)));
    if !p.regions.is_empty() {
        out.push_str(&format!(
            "  regions:   {} (it sees only resources addressed to these)\n",
            p.regions.join(", ")
        ));
    }
    if p.endpoints.is_empty() {
        out.push_str("  notifications: may not have notifications sent anywhere\n");
    } else {
        out.push_str(&format!(
            "  notifications: only to endpoints starting with {}\n",
            p.endpoints.join(", ")
        ));
    }
    let mut proofs = Vec::new();
    if entry.get("token_sha256").is_some() {
        proofs.push("a static bearer token (its SHA-256 is in the file)".to_string());
    }
    if let Some(f) = entry.get("jwks_file").and_then(|v| v.as_str()) {
        proofs.push(format!(
            "SMART Backend Services: an assertion signed with a key of {f}, exchanged at POST /auth/token"
        ));
    }
    if let Some(u) = entry.get("jwks_url").and_then(|v| v.as_str()) {
        proofs.push(format!(
            "SMART Backend Services: an assertion signed with a key published at {u}, exchanged at POST /auth/token"
        ));
    }
    for i in issuers {
        let clients = i.get("clients").map(|_| strings(i, "clients"));
        if clients.as_ref().is_none_or(|c| c.contains(&p.id)) {
            proofs.push(format!(
                "an OIDC token of {} (audience {})",
                i.get("issuer").and_then(|v| v.as_str()).unwrap_or("?"),
                i.get("audience").and_then(|v| v.as_str()).unwrap_or("?")
            ));
        }
    }
    out.push_str(&format!("  signs in with: {}\n", proofs.join("; or ")));
    out
}

pub fn run(cmd: &ConfigCommand) -> Exit {
    let ConfigCommand::Check { file } = cmd;
    let path = file.display().to_string();
    let access = match Access::load(&path) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{path} is NOT valid: {e}");
            eprintln!("the server would refuse to start with it");
            return Exit::Usage;
        }
    };
    // the loader accepted it: read it again as plain TOML for the order and the token kinds
    let raw: toml::Value = match std::fs::read_to_string(file)
        .map_err(|e| e.to_string())
        .and_then(|t| toml::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{path}: {e}");
            return Exit::Usage;
        }
    };
    let entries = raw
        .get("client")
        .and_then(|c| c.as_array())
        .cloned()
        .unwrap_or_default();
    let issuers = raw
        .get("issuer")
        .and_then(|c| c.as_array())
        .cloned()
        .unwrap_or_default();
    println!(
        "{path} is valid: {} clients, {} trusted token issuers. Bearer tokens are required; \
         /healthz, /readyz, /fhir/metadata and the token endpoint answer without one.\n",
        entries.len(),
        issuers.len()
    );
    if entries.is_empty() {
        println!("no client is listed: every request but those will be refused (401)");
    }
    for entry in &entries {
        let Some(id) = entry.get("id").and_then(|v| v.as_str()) else {
            continue;
        };
        let Some(p) = access.client(id) else {
            continue;
        };
        println!("{}", describe(&p, entry, &issuers));
    }
    for i in &issuers {
        let clients = strings(i, "clients");
        println!(
            "issuer '{}' (audience {}): its tokens act as {} (named by the claim {})",
            i.get("issuer").and_then(|v| v.as_str()).unwrap_or("?"),
            i.get("audience").and_then(|v| v.as_str()).unwrap_or("?"),
            if i.get("clients").is_some() {
                format!("the clients {}", clients.join(", "))
            } else {
                "any listed client".into()
            },
            i.get("client_claim")
                .and_then(|v| v.as_str())
                .unwrap_or("client_id, else azp, else sub")
        );
    }
    Exit::Ok
}
