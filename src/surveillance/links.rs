//! Reading linked resources inside the write transaction: the engine sees the request's own
//! uncommitted writes and everything committed before it. What the request wrote is already in
//! memory, so reads go through a cache seeded with it (fewer queries inside the writer's turn).
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use crate::fhir::fhirpath::split_reference;
use crate::store::{Condition, Match, SearchQuery, StoreResult, StoreTx, SystemMatch};
use crate::terminology::Code;

pub struct Reader<'t> {
    pub tx: &'t mut dyn StoreTx,
    cache: HashMap<(String, String), Option<Arc<Value>>>,
    /// What this transaction wrote, in order, and which of it it created with fresh ids.
    written: Vec<(String, String)>,
    fresh: HashSet<(String, String)>,
}

/// The element behind each reference search parameter the rules use (to answer a reverse lookup
/// from memory when its target was created in this transaction).
fn element_of(param: &str) -> Option<&'static str> {
    Some(match param {
        "has-member" => "hasMember",
        "derived-from" => "derivedFrom",
        "specimen" => "specimen",
        "subject" => "subject",
        "result" => "result",
        "encounter" => "encounter",
        "performer" => "performer",
        "service-provider" => "serviceProvider",
        "partof" => "partOf",
        _ => return None,
    })
}

impl<'t> Reader<'t> {
    pub fn new(tx: &'t mut dyn StoreTx) -> Self {
        Reader {
            tx,
            cache: HashMap::new(),
            written: Vec::new(),
            fresh: HashSet::new(),
        }
    }

    /// Seed the cache with a version this transaction wrote (`None`: deleted); `created`: with a
    /// server-assigned id, so only this transaction's own resources can refer to it.
    pub fn seed(&mut self, rt: &str, id: &str, body: Option<Arc<Value>>, created: bool) {
        let key = (rt.to_string(), id.to_string());
        if created {
            self.fresh.insert(key.clone());
        }
        if !self.cache.contains_key(&key) {
            self.written.push(key.clone());
        }
        self.cache.insert(key, body);
    }

    /// Created in this transaction with a server-assigned id: nothing stored before refers to it.
    pub fn is_fresh(&self, rt: &str, id: &str) -> bool {
        self.fresh.contains(&(rt.to_string(), id.to_string()))
    }

    /// The current, not deleted, version of `Type/id`, parsed.
    pub async fn read(&mut self, rt: &str, id: &str) -> StoreResult<Option<Arc<Value>>> {
        let key = (rt.to_string(), id.to_string());
        if let Some(v) = self.cache.get(&key) {
            return Ok(v.clone());
        }
        let v = self
            .tx
            .current(rt, id)
            .await?
            .filter(|s| !s.deleted)
            .and_then(|s| s.body)
            .and_then(|b| serde_json::from_str(&b).ok())
            .map(Arc::new);
        self.cache.insert(key, v.clone());
        Ok(v)
    }

    /// Follow a Reference element to a resource of type `rt`.
    pub async fn follow(
        &mut self,
        reference: &Value,
        rt: &str,
    ) -> StoreResult<Option<(String, Arc<Value>)>> {
        match target(reference, rt) {
            Some(id) => Ok(self.read(rt, &id).await?.map(|v| (id, v))),
            None => Ok(None),
        }
    }

    /// Ids of `source_type` resources whose reference parameter `param` points at `target`
    /// (`Type/id`), through the search index.
    pub async fn referencing(
        &mut self,
        source_type: &str,
        param: &str,
        target: &str,
    ) -> StoreResult<Vec<String>> {
        self.referencing_coded(source_type, param, target, &[])
            .await
    }

    /// The results of the DiagnosticReports whose `param` points at `target`.
    pub async fn report_results(&mut self, param: &str, target: &str) -> StoreResult<Vec<String>> {
        let mut out = Vec::new();
        for r in self.referencing("DiagnosticReport", param, target).await? {
            if let Some(report) = self.read("DiagnosticReport", &r).await? {
                out.extend(targets(&report["result"], "Observation"));
            }
        }
        Ok(out)
    }

    /// `referencing`, narrowed to resources whose `code` is one of `codes` (when not empty): a
    /// patient's or an encounter's isolates, not all of their observations.
    pub async fn referencing_coded(
        &mut self,
        source_type: &str,
        param: &str,
        target: &str,
        codes: &[Code],
    ) -> StoreResult<Vec<String>> {
        if let (Some((t, id)), Some(element)) = (split_reference(target), element_of(param))
            && self.fresh.contains(&(t.to_string(), id.to_string()))
        {
            // created in this transaction: only this transaction's own writes can point at it
            let mut out = Vec::new();
            for (rt, rid) in &self.written {
                if rt != source_type {
                    continue;
                }
                if let Some(Some(body)) = self.cache.get(&(rt.clone(), rid.clone()))
                    && refers_to(&body[element], t, id)
                {
                    out.push(rid.clone());
                }
            }
            return Ok(out);
        }
        let mut conditions = vec![Condition::Index {
            param: param.to_string(),
            any_of: vec![Match::Exact {
                value: target.to_string(),
                system: SystemMatch::Any,
            }],
            negate: false,
        }];
        if !codes.is_empty() {
            conditions.push(Condition::Index {
                param: "code".to_string(),
                any_of: codes
                    .iter()
                    .map(|(system, code)| Match::Exact {
                        value: code.clone(),
                        system: SystemMatch::Is(system.clone()),
                    })
                    .collect(),
                negate: false,
            });
        }
        let q = SearchQuery {
            resource_type: source_type.to_string(),
            conditions,
            count: 1000,
            ..Default::default()
        };
        self.tx.search_ids(&q).await
    }
}

/// The id a Reference element points to, when it points to a resource of type `rt`.
pub fn target(reference: &Value, rt: &str) -> Option<String> {
    let r = reference.get("reference")?.as_str()?;
    let (t, id) = split_reference(r)?;
    (t == rt).then(|| id.to_string())
}

/// The ids a list of References (`hasMember`, `result`, …) points to, of type `rt`.
pub fn targets(list: &Value, rt: &str) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| target(r, rt))
        .collect()
}

/// Does a Reference, or a list of them, point at `rt/id`?
fn refers_to(element: &Value, rt: &str, id: &str) -> bool {
    match element {
        Value::Array(items) => items.iter().any(|r| refers_to(r, rt, id)),
        r => target(r, rt).is_some_and(|t| t == id),
    }
}
