//! The ICD-9-CM hierarchy (`terminology/CodeSystem-icd9cm.json`, CMS version 32): which codes
//! exist and what their parents are, for the D.M. 1990 classification and for checking codes.
use std::collections::HashMap;

use serde_json::Value;

use super::ICD9CM;

#[derive(Default)]
pub struct Icd9 {
    /// code → parent code (`None`: a chapter)
    parents: HashMap<String, Option<String>>,
}

impl Icd9 {
    /// Read the hierarchy from the ICD-9-CM CodeSystem among `resources` (empty when absent).
    pub fn from_resources(resources: &[Value]) -> Icd9 {
        let mut parents = HashMap::new();
        for r in resources {
            if r["resourceType"] != "CodeSystem" || r["url"] != ICD9CM {
                continue;
            }
            for c in r["concept"].as_array().into_iter().flatten() {
                let Some(code) = c["code"].as_str() else {
                    continue;
                };
                let parent = c["property"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["code"] == "parent")
                    .and_then(|p| p["valueCode"].as_str())
                    .map(String::from);
                parents.insert(code.to_string(), parent);
            }
        }
        Icd9 { parents }
    }

    pub fn is_loaded(&self) -> bool {
        !self.parents.is_empty()
    }

    pub fn len(&self) -> usize {
        self.parents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parents.is_empty()
    }

    pub fn contains(&self, code: &str) -> bool {
        self.parents.contains_key(code)
    }

    /// The code, then its parent, and so on up to its chapter (empty for an unknown code).
    pub fn lineage<'a>(&'a self, code: &'a str) -> Vec<&'a str> {
        let mut out = Vec::new();
        let mut current = Some(code);
        while let Some(c) = current {
            let Some((key, parent)) = self.parents.get_key_value(c) else {
                break;
            };
            // a malformed file must not loop
            if out.len() > 16 {
                break;
            }
            out.push(key.as_str());
            current = parent.as_deref();
        }
        out
    }
}

/// ICD-9-CM codes where the rules read a disease (`Condition.code`, `Communication.reasonCode`)
/// must exist in the code system: a code that does not is a bad input, not a disease to ignore.
pub fn check(resource: &Value) -> Vec<crate::error::Issue> {
    let t = super::Terminology::get();
    if !t.icd9.is_loaded() {
        return Vec::new();
    }
    let rt = resource["resourceType"].as_str().unwrap_or_default();
    let concepts: Vec<(String, &Value)> = match rt {
        "Condition" => vec![("Condition.code".to_string(), &resource["code"])],
        "Communication" => resource["reasonCode"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, c)| (format!("Communication.reasonCode[{i}]"), c))
            .collect(),
        _ => return Vec::new(),
    };
    let mut issues = Vec::new();
    for (path, concept) in concepts {
        for (i, coding) in concept["coding"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            if coding["system"] != ICD9CM {
                continue;
            }
            let code = coding["code"].as_str().unwrap_or_default();
            if !t.icd9.contains(code) {
                issues.push(crate::error::Issue::error(
                    "code-invalid",
                    format!("'{code}' is not an ICD-9-CM code (CMS version 32 code system)"),
                    Some(format!("{path}.coding[{i}]")),
                ));
            }
        }
    }
    issues
}
