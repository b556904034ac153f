//! Subscription topics as data: `profiles/SubscriptionTopic-*.json`, the R4 representation of an R5
//! SubscriptionTopic (a `Basic` resource with the cross-version extensions the Backport IG uses).
//! A topic's triggers are search expressions (`queryCriteria`) judged on the version written and the
//! one it replaced; its filters are search parameters. Adding a topic is adding a file.
use std::sync::OnceLock;

use serde_json::Value;

use crate::api::search::{SearchRequest, parse_search};
use crate::fhir::Definitions;
use crate::fhir::search_params::IndexEntry;
use crate::store::Condition;

const X: &str = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.";

/// What a write did to a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    Create,
    Update,
    Delete,
}

impl Interaction {
    fn code(self) -> &'static str {
        match self {
            Interaction::Create => "create",
            Interaction::Update => "update",
            Interaction::Delete => "delete",
        }
    }
}

#[derive(Debug)]
pub struct Trigger {
    pub description: String,
    pub interactions: Vec<String>,
    previous: Option<Vec<Condition>>,
    current: Option<Vec<Condition>>,
    result_for_create: bool,
    result_for_delete: bool,
    require_both: bool,
}

#[derive(Debug)]
pub struct FilterDef {
    pub parameter: String,
    pub description: String,
    pub definition: String,
}

#[derive(Debug)]
pub struct Topic {
    pub url: String,
    pub id: String,
    pub title: String,
    pub description: String,
    /// The resource type the triggers watch (`Communication`).
    pub resource_type: String,
    pub triggers: Vec<Trigger>,
    pub filters: Vec<FilterDef>,
    /// `Communication:subject`: what `full-resource` notifications carry besides the focus.
    pub includes: Vec<String>,
    /// The file, served as is.
    pub resource: Value,
}

fn ext<'a>(v: &'a Value, url: &str) -> impl Iterator<Item = &'a Value> {
    v["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(move |e| e["url"] == url)
}

fn value_str<'a>(v: &'a Value, url: &str) -> Option<&'a str> {
    ext(v, url).next().and_then(|e| {
        e.as_object()?
            .iter()
            .find(|(k, _)| k.starts_with("value"))
            .and_then(|(_, v)| v.as_str())
    })
}

fn type_of(uri: &str) -> String {
    uri.rsplit('/').next().unwrap_or(uri).to_string()
}

/// Parse a search expression (`a=b&c=d`) for `rt` into conditions, strictly.
pub fn conditions(rt: &str, query: &str) -> Result<Vec<Condition>, String> {
    let request = SearchRequest::from_query(query);
    let parsed = parse_search(rt, &request, false).map_err(|e| {
        e.issues()
            .into_iter()
            .map(|i| i.diagnostics)
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    Ok(parsed.query.conditions)
}

impl Topic {
    fn parse(resource: Value) -> Result<Topic, String> {
        let url = value_str(&resource, &format!("{X}url"))
            .ok_or("a topic without a url")?
            .to_string();
        let id = resource["id"].as_str().unwrap_or_default().to_string();
        let mut triggers = Vec::new();
        let mut resource_type = String::new();
        for t in ext(&resource, &format!("{X}resourceTrigger")) {
            let rt = type_of(value_str(t, "resource").ok_or("a trigger without a resource")?);
            if !resource_type.is_empty() && rt != resource_type {
                return Err(format!("{url}: triggers on two resource types"));
            }
            resource_type = rt.clone();
            let q = ext(t, "queryCriteria").next();
            let criteria = |name: &str| -> Result<Option<Vec<Condition>>, String> {
                q.and_then(|q| value_str(q, name))
                    .map(|text| conditions(&rt, text).map_err(|e| format!("{url}: {name}: {e}")))
                    .transpose()
            };
            let result = |name: &str, default: bool| {
                q.and_then(|q| value_str(q, name))
                    .map_or(default, |c| c == "test-passes")
            };
            triggers.push(Trigger {
                description: value_str(t, "description").unwrap_or_default().to_string(),
                interactions: ext(t, "supportedInteraction")
                    .filter_map(|e| e["valueCode"].as_str().map(String::from))
                    .collect(),
                previous: criteria("previous")?,
                current: criteria("current")?,
                result_for_create: result("resultForCreate", true),
                result_for_delete: result("resultForDelete", false),
                require_both: q
                    .and_then(|q| ext(q, "requireBoth").next())
                    .and_then(|e| e["valueBoolean"].as_bool())
                    .unwrap_or(false),
            });
        }
        let filters = ext(&resource, &format!("{X}canFilterBy"))
            .map(|f| FilterDef {
                parameter: value_str(f, "filterParameter")
                    .unwrap_or_default()
                    .to_string(),
                description: value_str(f, "description").unwrap_or_default().to_string(),
                definition: value_str(f, "filterDefinition")
                    .unwrap_or_default()
                    .to_string(),
            })
            .collect::<Vec<_>>();
        for f in &filters {
            if Definitions::get()
                .search
                .get(&resource_type, &f.parameter)
                .is_none()
            {
                return Err(format!(
                    "{url}: filter '{}' is not a search parameter of {resource_type}",
                    f.parameter
                ));
            }
        }
        let includes = ext(&resource, &format!("{X}notificationShape"))
            .flat_map(|s| ext(s, "include"))
            .filter_map(|e| e["valueString"].as_str().map(String::from))
            .collect();
        Ok(Topic {
            title: value_str(&resource, &format!("{X}title"))
                .unwrap_or_default()
                .to_string(),
            description: value_str(&resource, &format!("{X}description"))
                .unwrap_or_default()
                .to_string(),
            url,
            id,
            resource_type,
            triggers,
            filters,
            includes,
            resource,
        })
    }

    /// Does a write of `interaction` from `previous` to `current` fire one of the triggers?
    pub fn fires(
        &self,
        interaction: Interaction,
        id: &str,
        previous: Option<&[IndexEntry]>,
        current: Option<&[IndexEntry]>,
    ) -> bool {
        self.triggers
            .iter()
            .any(|t| t.fires(interaction, id, previous, current))
    }

    /// Would `current` fire a creation trigger? (A resource that becomes visible to a subscriber
    /// through an update counts as created for that subscriber.)
    pub fn fires_as_created(&self, id: &str, current: &[IndexEntry]) -> bool {
        self.fires(Interaction::Create, id, None, Some(current))
    }

    pub fn filter(&self, parameter: &str) -> Option<&FilterDef> {
        self.filters.iter().find(|f| f.parameter == parameter)
    }
}

impl Trigger {
    fn fires(
        &self,
        interaction: Interaction,
        id: &str,
        previous: Option<&[IndexEntry]>,
        current: Option<&[IndexEntry]>,
    ) -> bool {
        if !self.interactions.iter().any(|i| i == interaction.code()) {
            return false;
        }
        let test = |criteria: &Option<Vec<Condition>>,
                    entries: Option<&[IndexEntry]>,
                    absent: bool|
         -> Option<bool> {
            let c = criteria.as_ref()?;
            Some(match entries {
                Some(e) => c.iter().all(|c| c.matches(id, e)),
                None => absent,
            })
        };
        let prev = test(&self.previous, previous, self.result_for_create);
        let curr = test(&self.current, current, self.result_for_delete);
        match (prev, curr) {
            (None, None) => true,
            (Some(p), None) => p,
            (None, Some(c)) => c,
            (Some(p), Some(c)) if self.require_both => p && c,
            (Some(p), Some(c)) => p || c,
        }
    }
}

/// Every topic in `profiles/`, loaded and checked once.
pub fn topics() -> &'static [Topic] {
    static T: OnceLock<Vec<Topic>> = OnceLock::new();
    T.get_or_init(|| {
        crate::fhir::profile::resources_of_kind("SubscriptionTopic")
            .into_iter()
            .map(|r| Topic::parse(r).unwrap_or_else(|e| panic!("profiles/: topic: {e}")))
            .collect()
    })
}

pub fn topic(url: &str) -> Option<&'static Topic> {
    let url = url.split('|').next().unwrap_or(url);
    topics().iter().find(|t| t.url == url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::terminology::CANON;
    use serde_json::json;

    fn case(status: &str, category: &str) -> Vec<IndexEntry> {
        let c = json!({"resourceType": "Communication", "id": "c1", "status": status,
            "meta": {"profile": [format!("{CANON}/StructureDefinition/notifica-caso")]},
            "category": [{"coding": [{"system": format!("{CANON}/CodeSystem/tipo-notifica"), "code": category}]}]});
        Definitions::get().search.extract_all(&c)
    }

    #[test]
    fn every_topic_file_loads_with_its_filters() {
        let urls: Vec<&str> = topics().iter().map(|t| t.url.as_str()).collect();
        for id in ["cre-case", "notifiable-case", "outbreak"] {
            assert!(urls.contains(&format!("{CANON}/SubscriptionTopic/{id}").as_str()));
        }
        let cre = topic(&format!("{CANON}/SubscriptionTopic/cre-case")).unwrap();
        assert!(cre.filter("region").is_some() && cre.filter("organism").is_some());
    }

    #[test]
    fn cre_case_fires_on_creation_and_withdrawal_only() {
        let cre = topic(&format!("{CANON}/SubscriptionTopic/cre-case")).unwrap();
        let done = case("completed", "cre");
        let withdrawn = case("entered-in-error", "cre");
        assert!(cre.fires(Interaction::Create, "c1", None, Some(&done)));
        assert!(cre.fires(Interaction::Update, "c1", Some(&done), Some(&withdrawn)));
        assert!(!cre.fires(Interaction::Update, "c1", Some(&done), Some(&done)));
        assert!(!cre.fires(
            Interaction::Update,
            "c1",
            Some(&withdrawn),
            Some(&withdrawn)
        ));
        let other = case("completed", "classe-2");
        assert!(!cre.fires(Interaction::Create, "c1", None, Some(&other)));
    }
}
