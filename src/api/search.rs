//! Search: parameters parsed strictly into a store query (a typo is a 400, never "everything"),
//! `_include`/`_revinclude`, `_summary`/`_elements`, paging links and the searchset Bundle.
//!
//! The `self` link states the search the server ran, in a stable form: the criteria it applied
//! (with their modifiers, sorted), the includes, `_sort`, `_summary`/`_elements`, `_count`,
//! `_offset`, and `_format` when one was asked for. What it did not apply is not there: a parameter
//! ignored under `Prefer: handling=lenient` (reported in the outcome entry), `_total` (the total is
//! always counted), `_pretty`. Following the `self` link gives the same page.
use std::collections::HashSet;

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};

use super::format::{BaseUrl, Format, Prefer, fhir_json, format_in_query, format_param, negotiate};
use super::responses::bundle_entry_json;
use super::summary::Shape;
use super::{AppState, Caller};
use crate::error::{ApiError, ApiResult, Issue};
use crate::fhir::Definitions;
use crate::fhir::datetime::{Prefix, parse_range};
use crate::fhir::fhirpath::split_reference;
use crate::fhir::search_params::{ParamType, normalize};
use crate::store::query::{Match, SystemMatch};
use crate::store::{Condition, SearchQuery, Sort};

/// The raw parameters of a search, in order.
#[derive(Debug, Clone, Default)]
pub struct SearchRequest {
    pub pairs: Vec<(String, String)>,
}

impl SearchRequest {
    pub fn from_query(q: &str) -> Self {
        SearchRequest {
            pairs: form_urlencoded::parse(q.trim_start_matches('?').as_bytes())
                .into_owned()
                .collect(),
        }
    }

    /// Order-independent form (lock keys for conditional create).
    pub fn canonical(&self) -> String {
        let mut p: Vec<String> = self.pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        p.sort();
        p.join("&")
    }

    pub fn encode(pairs: &[(String, String)]) -> String {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct Include {
    pub source_type: String,
    pub param: String,
    pub target_type: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ParsedSearch {
    pub query: SearchQuery,
    pub includes: Vec<Include>,
    pub revincludes: Vec<Include>,
    /// The criteria applied (`name[:modifier]`, value as given), for the links.
    pub criteria: Vec<(String, String)>,
    /// `_include` / `_revinclude` as applied, for the links.
    include_params: Vec<(String, String)>,
    /// The `_sort` applied (the last one given: each replaces the one before).
    sort_param: Option<String>,
    /// `_summary` / `_elements`.
    pub shape: Shape,
    /// `_format` of the URL, kept in the links so that paging stays in the format asked for
    /// (set by the handler: it is the URL's `_format` that the answer is written in).
    pub format: Option<Format>,
    pub warnings: Vec<Issue>,
}

impl ParsedSearch {
    /// The parameters of this search at `offset`, in a stable form (see the module comment).
    pub fn link_params(&self, offset: i64) -> Vec<(String, String)> {
        let mut criteria = self.criteria.clone();
        criteria.sort();
        let mut includes = self.include_params.clone();
        includes.sort();
        let mut pairs = criteria;
        pairs.extend(includes);
        if let Some(sort) = &self.sort_param {
            pairs.push(("_sort".into(), sort.clone()));
        }
        pairs.extend(self.shape.params());
        if !self.shape.is_count() {
            pairs.push(("_count".into(), self.query.count.to_string()));
            pairs.push(("_offset".into(), offset.to_string()));
        }
        if let Some(f) = self.format {
            pairs.push(("_format".into(), f.param().into()));
        }
        pairs
    }
}

/// Parameters that control the result rather than select resources.
const RESULT_PARAMS: &[&str] = &[
    "_count",
    "_offset",
    "_sort",
    "_total",
    "_summary",
    "_elements",
    "_format",
    "_pretty",
    "_include",
    "_revinclude",
];

/// The deepest page a client may ask for. Offsets are counted by the database, so a deeper page
/// costs more; beyond this a search should be narrowed (`_lastUpdated`, `_since`) instead.
pub const MAX_OFFSET: i64 = 1_000_000;

pub fn too_deep(n: i64) -> String {
    format!(
        "_offset {n} is beyond the deepest page ({MAX_OFFSET}): narrow the search instead (e.g. by _lastUpdated)"
    )
}

fn bad(param: &str, msg: String) -> ApiError {
    ApiError::invalid(vec![Issue::error(
        "processing",
        msg,
        Some(param.to_string()),
    )])
}

/// Split a parameter value on commas that are not escaped (`\,`).
fn split_or(value: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if matches!(chars.peek(), Some(',' | '|' | '$' | '\\')) => {
                out.last_mut().unwrap().push(chars.next().unwrap())
            }
            ',' => out.push(String::new()),
            other => out.last_mut().unwrap().push(other),
        }
    }
    out
}

pub fn parse_search(rt: &str, req: &SearchRequest, lenient: bool) -> ApiResult<ParsedSearch> {
    let defs = Definitions::get();
    let mut q = SearchQuery {
        resource_type: rt.to_string(),
        count: 50,
        total: true,
        ..Default::default()
    };
    let mut parsed = ParsedSearch {
        query: SearchQuery::default(),
        includes: vec![],
        revincludes: vec![],
        criteria: vec![],
        include_params: vec![],
        sort_param: None,
        shape: Shape::full(),
        format: None,
        warnings: vec![],
    };
    let mut shape_pairs: Vec<(String, String)> = Vec::new();
    // an error a lenient search reports and goes on without (an unknown or unsupported parameter)
    let ignore = |e: ApiError, warnings: &mut Vec<Issue>| -> ApiResult<()> {
        if !lenient {
            return Err(e);
        }
        warnings.extend(e.issues().into_iter().map(|mut i| {
            i.severity = crate::error::Severity::Warning;
            i.diagnostics = format!("ignored (Prefer: handling=lenient): {}", i.diagnostics);
            i
        }));
        Ok(())
    };
    for (key, value) in &req.pairs {
        let (name, modifier) = match key.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (key.as_str(), None),
        };
        if RESULT_PARAMS.contains(&name) {
            if name == "_summary" || name == "_elements" {
                // checked (modifiers too) by `Shape`, once all are known
                shape_pairs.push((key.clone(), value.clone()));
                continue;
            }
            if let Some(m) = modifier {
                let why = match (name, m) {
                    ("_include" | "_revinclude", "iterate" | "recurse") => format!(
                        "{key} is not supported: includes are not followed further than one level"
                    ),
                    _ => format!("{name} takes no modifier (:{m})"),
                };
                ignore(bad(key, why), &mut parsed.warnings)?;
                continue;
            }
            match name {
                "_count" => {
                    let n: i64 = value
                        .parse()
                        .map_err(|_| bad(key, format!("_count '{value}' is not a number")))?;
                    q.count = n.clamp(0, 1000);
                }
                "_offset" => {
                    let n: i64 = value
                        .parse()
                        .map_err(|_| bad(key, format!("_offset '{value}' is not a number")))?;
                    if n > MAX_OFFSET {
                        return Err(bad(key, too_deep(n)));
                    }
                    q.offset = n.max(0);
                }
                "_sort" => {
                    q.sort = match value.as_str() {
                        "_lastUpdated" => Sort::LastUpdatedAsc,
                        "-_lastUpdated" => Sort::LastUpdatedDesc,
                        "_id" => Sort::IdAsc,
                        "-_id" => Sort::IdDesc,
                        other => {
                            return Err(bad(
                                key,
                                format!("_sort={other} is not supported (use _lastUpdated or _id)"),
                            ));
                        }
                    };
                    parsed.sort_param = Some(value.clone());
                }
                // the handler reads it from the URL (`run_search`), as the response is written
                "_total" if matches!(value.as_str(), "accurate" | "estimate" | "none") => {}
                "_total" => return Err(bad(key, format!("_total={value} is not valid"))),
                "_include" | "_revinclude" => {
                    let inc = parse_include(key, value, name == "_revinclude", rt)?;
                    if name == "_include" {
                        parsed.includes.push(inc)
                    } else {
                        parsed.revincludes.push(inc)
                    }
                    parsed.include_params.push((key.clone(), value.clone()));
                }
                _ => {}
            }
            continue;
        }
        if value.split(',').count() > MAX_VALUES {
            return Err(bad(
                key,
                format!("at most {MAX_VALUES} comma-separated values in one parameter"),
            ));
        }
        match parse_condition(rt, name, modifier, value, defs) {
            Ok(c) => {
                q.conditions.push(c);
                parsed.criteria.push((key.clone(), value.clone()));
            }
            Err(e) => ignore(e, &mut parsed.warnings)?,
        }
    }
    parsed.shape = Shape::from_pairs(rt, &shape_pairs)?;
    if q.conditions.len() > MAX_CRITERIA {
        return Err(too_costly(format!(
            "{} search criteria; at most {MAX_CRITERIA} in one search",
            q.conditions.len()
        )));
    }
    if parsed.includes.len() + parsed.revincludes.len() > MAX_INCLUDES {
        return Err(too_costly(format!(
            "at most {MAX_INCLUDES} _include and _revinclude in one search"
        )));
    }
    parsed.query = q;
    Ok(parsed)
}

/// Each criterion is a join and each value a comparison: a search is bounded in both.
const MAX_CRITERIA: usize = 30;
const MAX_VALUES: usize = 100;
const MAX_INCLUDES: usize = 20;

fn too_costly(msg: String) -> ApiError {
    ApiError::invalid(vec![Issue::error("too-costly", msg, None)])
}

fn parse_include(key: &str, value: &str, rev: bool, rt: &str) -> ApiResult<Include> {
    let parts: Vec<&str> = value.split(':').collect();
    let (source, param, target) = match parts.as_slice() {
        [s, p] => (*s, *p, None),
        [s, p, t] => (*s, *p, Some(t.to_string())),
        _ => {
            return Err(bad(
                key,
                format!("{key}={value} must be Type:parameter[:TargetType]"),
            ));
        }
    };
    if !rev && source != rt {
        return Err(bad(
            key,
            format!("_include={value}: the source type must be {rt}"),
        ));
    }
    let sp = Definitions::get()
        .search
        .get(source, param)
        .filter(|sp| sp.kind == ParamType::Reference)
        .ok_or_else(|| {
            bad(
                key,
                format!("{key}={value}: {source} has no reference parameter '{param}'"),
            )
        })?;
    if rev && !sp.targets.is_empty() && !sp.targets.iter().any(|t| t == rt) {
        return Err(bad(
            key,
            format!("_revinclude={value}: {source}.{param} never points to {rt}"),
        ));
    }
    Ok(Include {
        source_type: source.to_string(),
        param: param.to_string(),
        target_type: target,
    })
}

fn parse_condition(
    rt: &str,
    name: &str,
    modifier: Option<&str>,
    value: &str,
    defs: &Definitions,
) -> ApiResult<Condition> {
    let key = match modifier {
        Some(m) => format!("{name}:{m}"),
        None => name.to_string(),
    };
    let values = split_or(value);
    if values.iter().all(String::is_empty) {
        return Err(bad(&key, format!("{key} has no value")));
    }
    match name {
        "_id" if modifier.is_none() => return Ok(Condition::Id(values)),
        "_lastUpdated" if modifier.is_none() => {
            let ranges = values
                .iter()
                .map(|v| {
                    let (p, rest) = Prefix::split(v);
                    parse_range(rest)
                        .map(|r| (p, r))
                        .ok_or_else(|| bad(&key, format!("'{v}' is not a valid date")))
                })
                .collect::<ApiResult<_>>()?;
            return Ok(Condition::LastUpdated(ranges));
        }
        _ => {}
    }
    let sp = defs.search.get(rt, name).ok_or_else(|| {
        bad(&key, format!("unknown search parameter '{name}' for {rt} (see GET /metadata for the supported ones)"))
    })?;
    if modifier == Some("missing") {
        let missing = match value {
            "true" => true,
            "false" => false,
            other => return Err(bad(&key, format!("{key}={other}: use true or false"))),
        };
        return Ok(Condition::Missing {
            param: sp.code.clone(),
            missing,
        });
    }
    // a parameter stored under a wider one (`patient` under `subject`) is told apart by its
    // references' type, which an identifier does not have
    if modifier == Some("identifier")
        && let Some(t) = defs.search.stored_as(rt, name).reference_type
    {
        return Err(bad(
            &key,
            format!(
                "{key} is not supported: {name} is the {t} subset of another reference parameter; search that one by :identifier"
            ),
        ));
    }
    let mut negate = false;
    let mut any_of = Vec::new();
    for v in &values {
        let m = match (sp.kind, modifier) {
            (ParamType::Token, None | Some("not")) => {
                negate = modifier == Some("not");
                match v.split_once('|') {
                    Some(("", code)) => Match::Exact {
                        value: code.to_string(),
                        system: SystemMatch::Absent,
                    },
                    Some((sys, "")) => Match::System(sys.to_string()),
                    Some((sys, code)) => Match::Exact {
                        value: code.to_string(),
                        system: SystemMatch::Is(sys.to_string()),
                    },
                    None => Match::Exact {
                        value: v.clone(),
                        system: SystemMatch::Any,
                    },
                }
            }
            (ParamType::String, None) => Match::StartsWith(normalize(v)),
            (ParamType::String, Some("exact")) => Match::Exact {
                value: normalize(v),
                system: SystemMatch::Any,
            },
            (ParamType::String, Some("contains")) => Match::Contains(normalize(v)),
            (ParamType::Uri, None) => Match::Exact {
                value: v.clone(),
                system: SystemMatch::Any,
            },
            (ParamType::Date, None) => {
                let (p, rest) = Prefix::split(v);
                let r = parse_range(rest)
                    .ok_or_else(|| bad(&key, format!("'{v}' is not a valid date")))?;
                Match::Date(p, r)
            }
            (ParamType::Reference, m) => reference_match(&key, v, m, &sp.targets)?,
            (kind, Some(m)) => {
                return Err(bad(
                    &key,
                    format!(
                        "modifier :{m} is not supported for {} parameter {name}",
                        kind.as_str()
                    ),
                ));
            }
        };
        any_of.push(m);
    }
    Ok(Condition::Index {
        param: sp.code.clone(),
        any_of,
        negate,
    })
}

fn reference_match(
    key: &str,
    v: &str,
    modifier: Option<&str>,
    targets: &[String],
) -> ApiResult<Match> {
    // a reference's own entries have no system; its identifier's have one (`:identifier`)
    let exact = |t: &str, id: &str| Match::Exact {
        value: format!("{t}/{id}"),
        system: SystemMatch::Absent,
    };
    match modifier {
        None => Ok(match split_reference(v) {
            Some((t, id)) => exact(t, id),
            None if v.contains("://") => Match::Exact {
                value: v.to_string(),
                system: SystemMatch::Absent,
            },
            None if targets.len() == 1 => exact(&targets[0], v),
            None => Match::AnyTypeId(v.to_string()),
        }),
        Some(t) if t.starts_with(|c: char| c.is_ascii_uppercase()) && crate::fhir::is_served(t) => {
            Ok(exact(t, v))
        }
        // the reference's logical identifier: `system|value`
        Some("identifier") => match v.split_once('|') {
            Some((system, value)) if !system.is_empty() && !value.is_empty() => Ok(Match::Exact {
                value: value.to_string(),
                system: SystemMatch::Is(system.to_string()),
            }),
            _ => Err(bad(
                key,
                format!("{key}={v}: give the identifier as system|value"),
            )),
        },
        Some(m) => Err(bad(
            key,
            format!("modifier :{m} is not supported for reference parameters"),
        )),
    }
}

/// `GET /{type}` and `POST /{type}/_search`.
pub async fn search_type(
    State(state): State<AppState>,
    caller: Caller,
    Path(rt): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    prefer: Prefer,
    base: BaseUrl,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    super::require_type(&rt)?;
    let req = SearchRequest::from_query(query.as_deref().unwrap_or(""));
    let format = url_format(query.as_deref());
    run_search(&state, &caller, &rt, req, prefer, &base, format).await
}

/// The `_format` of the URL, which the answer is written in (`negotiate` refused any other).
fn url_format(query: Option<&str>) -> Option<Format> {
    format_in_query(query).and_then(|f| format_param(&f).ok())
}

#[allow(clippy::too_many_arguments)] // an axum handler: one argument per extractor
pub async fn search_post(
    State(state): State<AppState>,
    caller: Caller,
    Path(rt): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    prefer: Prefer,
    base: BaseUrl,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    super::require_type(&rt)?;
    let ct = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return Err(ApiError::UnsupportedMediaType(
            "POST _search takes application/x-www-form-urlencoded".into(),
        ));
    }
    let mut req = SearchRequest::from_query(query.as_deref().unwrap_or(""));
    req.pairs
        .extend(SearchRequest::from_query(&String::from_utf8_lossy(&body)).pairs);
    let format = url_format(query.as_deref());
    run_search(&state, &caller, &rt, req, prefer, &base, format).await
}

async fn run_search(
    state: &AppState,
    caller: &Caller,
    rt: &str,
    req: SearchRequest,
    prefer: Prefer,
    base: &BaseUrl,
    format: Option<Format>,
) -> ApiResult<Response> {
    let mut parsed = parse_search(rt, &req, prefer.lenient)?;
    parsed.format = format;
    if parsed.shape.is_count() {
        parsed.query.count = 0;
    }
    let included_shape = parsed.shape.for_included();
    // a client limited to some regions (or to its own subscriptions) searches within them only
    if let Some(scope) = caller.0.scope(rt) {
        parsed.query.conditions.extend(scope);
    }
    let store = &state.store;
    let page = store.search(&parsed.query).await?;
    let total = page.total.unwrap_or(0);
    let mut entries: Vec<Value> = Vec::new();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    for m in &page.matches {
        seen.insert((m.resource_type.clone(), m.id.clone()));
        entries.push(shaped_entry(base, m, "match", &parsed.shape)?);
    }
    let ids: Vec<String> = page.matches.iter().map(|m| m.id.clone()).collect();
    if !ids.is_empty() {
        for inc in &parsed.includes {
            let refs = store.references_of(rt, &inc.param, &ids).await?;
            let wanted: Vec<(String, String)> = refs
                .iter()
                .filter_map(|r| r.split_once('/'))
                .filter(|(t, _)| inc.target_type.as_deref().is_none_or(|want| want == *t))
                .map(|(t, id)| (t.to_string(), id.to_string()))
                .filter(|k| !seen.contains(k))
                .collect();
            for r in store.read_many(&wanted).await? {
                if caller.check_sees(&r).is_ok()
                    && seen.insert((r.resource_type.clone(), r.id.clone()))
                {
                    entries.push(shaped_entry(base, &r, "include", &included_shape)?);
                }
            }
        }
        let targets: Vec<String> = ids.iter().map(|id| format!("{rt}/{id}")).collect();
        for inc in &parsed.revincludes {
            for r in store
                .referencing(&inc.source_type, &inc.param, &targets)
                .await?
            {
                if caller.check_sees(&r).is_ok()
                    && seen.insert((r.resource_type.clone(), r.id.clone()))
                {
                    entries.push(shaped_entry(base, &r, "include", &included_shape)?);
                }
            }
        }
    }
    let q = &parsed.query;
    let link = |offset: i64| {
        format!(
            "{}/{rt}?{}",
            base.0,
            SearchRequest::encode(&parsed.link_params(offset))
        )
    };
    let mut links = vec![json!({"relation": "self", "url": link(q.offset)})];
    if q.count > 0 {
        links.push(json!({"relation": "first", "url": link(0)}));
        if q.offset + q.count < total {
            links.push(json!({"relation": "next", "url": link(q.offset + q.count)}));
        }
        if q.offset > 0 {
            links.push(json!({"relation": "previous", "url": link((q.offset - q.count).max(0))}));
        }
        let last = if total == 0 {
            0
        } else {
            ((total - 1) / q.count) * q.count
        };
        links.push(json!({"relation": "last", "url": link(last)}));
    }
    if !parsed.warnings.is_empty() {
        entries.push(json!({
            "resource": crate::error::operation_outcome(&parsed.warnings),
            "search": {"mode": "outcome"}
        }));
    }
    let bundle = super::responses::bundle("searchset", Some(total), links, entries);
    Ok(fhir_json(axum::http::StatusCode::OK, &bundle))
}

/// A searchset entry, its resource in the shape `_summary` / `_elements` asked for.
fn shaped_entry(
    base: &BaseUrl,
    stored: &crate::store::StoredResource,
    mode: &str,
    shape: &Shape,
) -> ApiResult<Value> {
    let mut e = bundle_entry_json(base, stored, Some(mode))?;
    if !shape.is_full()
        && let Some(r) = e.get_mut("resource")
    {
        *r = shape.apply(r);
    }
    Ok(e)
}
