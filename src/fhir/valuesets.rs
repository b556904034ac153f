//! Value-set membership for required bindings, expanded once from the packaged ValueSets and CodeSystems.
use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::definitions::by_url;

/// An expanded value set: the (system, code) pairs it holds. `None` when it cannot be enumerated
/// from the packaged data (filters, external code systems): such bindings are not checked.
pub struct ValueSets {
    expanded: HashMap<String, Option<HashSet<(String, String)>>>,
}

impl ValueSets {
    pub fn from_resources(resources: &[Value]) -> Self {
        let code_systems = by_url(resources, "CodeSystem");
        let value_sets = by_url(resources, "ValueSet");
        let expanded = value_sets
            .iter()
            .map(|(url, vs)| (url.clone(), expand(vs, &value_sets, &code_systems, 0)))
            .collect();
        ValueSets { expanded }
    }

    /// `Some(true|false)` when the value set is known and enumerable, `None` otherwise.
    pub fn contains(&self, value_set: &str, system: Option<&str>, code: &str) -> Option<bool> {
        let url = value_set.split('|').next().unwrap_or(value_set);
        let codes = self.expanded.get(url)?.as_ref()?;
        Some(match system {
            Some(s) => codes.contains(&(s.to_string(), code.to_string())),
            None => codes.iter().any(|(_, c)| c == code),
        })
    }

    /// Every (system, code) of an enumerable value set.
    pub fn codes(&self, value_set: &str) -> Option<&HashSet<(String, String)>> {
        let url = value_set.split('|').next().unwrap_or(value_set);
        self.expanded.get(url)?.as_ref()
    }

    /// The systems a value set draws from (to tell "another system" from "wrong code").
    pub fn systems(&self, value_set: &str) -> Option<HashSet<&str>> {
        let url = value_set.split('|').next().unwrap_or(value_set);
        let codes = self.expanded.get(url)?.as_ref()?;
        Some(codes.iter().map(|(s, _)| s.as_str()).collect())
    }
}

fn expand(
    vs: &Value,
    value_sets: &HashMap<String, &Value>,
    code_systems: &HashMap<String, &Value>,
    depth: usize,
) -> Option<HashSet<(String, String)>> {
    if depth > 8 {
        return None;
    }
    let mut out = HashSet::new();
    for inc in vs["compose"]["include"].as_array()? {
        if inc.get("filter").is_some() {
            return None;
        }
        if let Some(nested) = inc.get("valueSet").and_then(Value::as_array) {
            for url in nested.iter().filter_map(Value::as_str) {
                out.extend(expand(
                    value_sets.get(url)?,
                    value_sets,
                    code_systems,
                    depth + 1,
                )?);
            }
        }
        let Some(system) = inc.get("system").and_then(Value::as_str) else {
            continue;
        };
        match inc.get("concept").and_then(Value::as_array) {
            Some(concepts) => {
                for c in concepts.iter().filter_map(|c| c["code"].as_str()) {
                    out.insert((system.to_string(), c.to_string()));
                }
            }
            None => collect_codes(
                code_systems.get(system)?["concept"].as_array()?,
                system,
                &mut out,
            ),
        }
    }
    Some(out)
}

fn collect_codes(concepts: &[Value], system: &str, out: &mut HashSet<(String, String)>) {
    for c in concepts {
        if let Some(code) = c["code"].as_str() {
            out.insert((system.to_string(), code.to_string()));
        }
        if let Some(children) = c["concept"].as_array() {
            collect_codes(children, system, out);
        }
    }
}
