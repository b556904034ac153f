//! SMART system scopes (`system/Observation.rs`, `system/*.read`): what a token allows, and what
//! of a requested scope a client's role lets it have. Scopes only ever narrow a role: a token's
//! principal may do something only if both its role and one of its scopes allow it.
//!
//! Understood: SMART v1 (`system/T.read`, `.write`, `.*`) and v2 (`system/T.cruds` and any
//! in-order subset of those letters: `c`, `u`, `d` write, `r`, `s` read), for a served type or `*`.
//! Everything else (`openid`, `launch`, `patient/…`, `user/…`, a v2 scope with a `?query`
//! restriction the server cannot enforce, an unknown type) grants nothing.

/// What one scope grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Perms {
    read: bool,
    write: bool,
}

/// One understood scope.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Scope {
    /// `None`: every type (`*`).
    resource: Option<String>,
    perms: Perms,
    /// Written in SMART v1 form (`read`, `write`, `*`) rather than v2 letters.
    v1: bool,
    /// The v2 letters as written (`rs`, `cruds`), to answer with the same spelling.
    letters: String,
}

/// The scopes a token carries (only the understood ones).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scopes {
    grants: Vec<Scope>,
}

fn known_type(t: &str) -> bool {
    crate::fhir::is_served(t) || t == super::AUDIT_TYPE
}

/// Parse one scope; `None` if it grants nothing this server understands.
fn parse_one(s: &str) -> Option<Scope> {
    let rest = s.strip_prefix("system/")?;
    if rest.contains('?') {
        // a v2 finer-grained scope (`system/Observation.rs?category=…`): not enforceable here,
        // so it grants nothing rather than more than meant
        return None;
    }
    let (resource, perm) = rest.split_once('.')?;
    let resource = match resource {
        "*" => None,
        t if known_type(t) => Some(t.to_string()),
        _ => return None,
    };
    let (perms, v1, letters) = match perm {
        "read" => (
            Perms {
                read: true,
                write: false,
            },
            true,
            String::new(),
        ),
        "write" => (
            Perms {
                read: false,
                write: true,
            },
            true,
            String::new(),
        ),
        "*" => (
            Perms {
                read: true,
                write: true,
            },
            true,
            String::new(),
        ),
        letters => {
            // a non-empty subsequence of "cruds", each letter once, in that order
            let mut order = "cruds".chars();
            if letters.is_empty() || !letters.chars().all(|c| order.any(|o| o == c)) {
                return None;
            }
            (
                Perms {
                    read: letters.contains(['r', 's']),
                    write: letters.contains(['c', 'u', 'd']),
                },
                false,
                letters.to_string(),
            )
        }
    };
    Some(Scope {
        resource,
        perms,
        v1,
        letters,
    })
}

impl Scope {
    fn covers(&self, rt: &str) -> bool {
        self.resource.as_deref().is_none_or(|t| t == rt)
    }

    /// The same scope limited to `perms`; `None` when nothing is left.
    fn limited_to(&self, perms: Perms) -> Option<Scope> {
        let read = self.perms.read && perms.read;
        let write = self.perms.write && perms.write;
        if !read && !write {
            return None;
        }
        let letters = if self.v1 {
            String::new()
        } else {
            self.letters
                .chars()
                .filter(|c| match c {
                    'r' | 's' => read,
                    _ => write,
                })
                .collect()
        };
        Some(Scope {
            resource: self.resource.clone(),
            perms: Perms { read, write },
            v1: self.v1,
            letters,
        })
    }

    fn render(&self) -> String {
        let perm = if self.v1 {
            match (self.perms.read, self.perms.write) {
                (true, true) => "*",
                (true, false) => "read",
                _ => "write",
            }
            .to_string()
        } else {
            self.letters.clone()
        };
        format!("system/{}.{perm}", self.resource.as_deref().unwrap_or("*"))
    }
}

impl Scopes {
    /// The understood scopes of a space-separated scope string.
    pub fn parse(text: &str) -> Scopes {
        Scopes {
            grants: text
                .split_ascii_whitespace()
                .filter_map(parse_one)
                .collect(),
        }
    }

    pub fn allows_read(&self, rt: &str) -> bool {
        self.grants.iter().any(|g| g.perms.read && g.covers(rt))
    }

    pub fn allows_write(&self, rt: &str) -> bool {
        self.grants.iter().any(|g| g.perms.write && g.covers(rt))
    }

    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    /// The scope string (space-separated, in the order given, no repeats).
    pub fn render(&self) -> String {
        let mut out: Vec<String> = Vec::new();
        for g in &self.grants {
            let s = g.render();
            if !out.contains(&s) {
                out.push(s);
            }
        }
        out.join(" ")
    }

    /// What of the `requested` scopes a client whose role says `may_read` / `may_write` may have:
    /// each understood scope keeps the permissions the role has on its type (on some type, for
    /// `*`); one the role allows nothing of is dropped, as is anything not understood.
    pub fn grantable(
        requested: &str,
        may_read: impl Fn(&str) -> bool,
        may_write: impl Fn(&str) -> bool,
    ) -> Scopes {
        let all_types = || {
            crate::fhir::SERVED_TYPES
                .iter()
                .copied()
                .chain(std::iter::once(super::AUDIT_TYPE))
        };
        let grants = Scopes::parse(requested)
            .grants
            .into_iter()
            .filter_map(|g| {
                let role = match &g.resource {
                    Some(t) => Perms {
                        read: may_read(t),
                        write: may_write(t),
                    },
                    None => Perms {
                        read: all_types().any(&may_read),
                        write: all_types().any(&may_write),
                    },
                };
                g.limited_to(role)
            })
            .collect();
        Scopes { grants }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_scopes_are_understood() {
        let s = Scopes::parse("system/Observation.read system/Patient.cruds openid launch");
        assert!(s.allows_read("Observation") && !s.allows_write("Observation"));
        assert!(s.allows_read("Patient") && s.allows_write("Patient"));
        assert!(!s.allows_read("Communication"));
        let s = Scopes::parse("system/Observation.c system/Patient.s");
        assert!(s.allows_write("Observation") && !s.allows_read("Observation"));
        assert!(s.allows_read("Patient") && !s.allows_write("Patient"));
        let s = Scopes::parse("system/*.rs");
        assert!(s.allows_read("Communication") && !s.allows_write("Communication"));
        let s = Scopes::parse("system/*.*");
        assert!(s.allows_read("Patient") && s.allows_write("Patient"));
    }

    #[test]
    fn what_is_not_understood_grants_nothing() {
        for bad in [
            "system/Observation.rs?category=laboratory",
            "system/Observation.sr",
            "system/Observation.rr",
            "system/Observation.",
            "system/Observation.x",
            "system/Unknown.read",
            "patient/Observation.read",
            "user/*.*",
            "Observation.read",
        ] {
            assert!(Scopes::parse(bad).is_empty(), "{bad}");
        }
    }

    #[test]
    fn a_role_limits_what_is_granted() {
        // a laboratory: may not read or write the case types
        let lab_read = |t: &str| !["Communication", "Subscription", "MeasureReport"].contains(&t);
        let granted = Scopes::grantable(
            "system/Observation.cruds system/Communication.rs system/*.read openid system/Patient.write",
            lab_read,
            lab_read,
        );
        assert_eq!(
            granted.render(),
            "system/Observation.cruds system/*.read system/Patient.write"
        );
        // a region: reads cases, writes only subscriptions
        let region_read = |t: &str| ["Communication", "Subscription", "MeasureReport"].contains(&t);
        let region_write = |t: &str| t == "Subscription";
        let granted = Scopes::grantable(
            "system/Communication.cruds system/Observation.rs system/Subscription.*",
            region_read,
            region_write,
        );
        assert_eq!(
            granted.render(),
            "system/Communication.rs system/Subscription.*"
        );
    }
}
