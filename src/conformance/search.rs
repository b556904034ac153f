//! Searching the conformance resources: by `url`, `version`, `name`, `status` (and `_id`, `title`,
//! and `type` of a StructureDefinition). A few hundred resources in memory: a filter, no index.
use serde_json::Value;

use super::{Conformance, field};

/// Results per page unless `_count` says otherwise, and the most it may say.
pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 500;
/// The most values one parameter may list (`url=a,b,…`) and parameters one search may have.
const MAX_VALUES: usize = 100;
const MAX_PARAMETERS: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SearchError {
    #[error(
        "'{0}' is not a search parameter of {1} here (url, version, name, title, status, _id{2})"
    )]
    Unknown(String, String, &'static str),
    #[error("{why}")]
    Invalid { param: String, why: String },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Match {
    /// Strings: case-insensitive prefix (the FHIR default for string parameters).
    StartsWith,
    Exact,
    Contains,
    /// `url:below`: the URL or anything under it.
    Below,
}

#[derive(Debug, Clone, PartialEq)]
struct Criterion {
    name: String,
    how: Match,
    /// Any of these (a comma-separated list).
    values: Vec<String>,
}

/// A parsed search: what selects, which page, and the parameters as the server understood them
/// (for the `self` link).
#[derive(Debug, Clone, PartialEq)]
pub struct ConformanceQuery {
    criteria: Vec<Criterion>,
    pub count: usize,
    pub offset: usize,
    /// The selecting parameters as applied, in the order given (paging links repeat them).
    pub applied: Vec<(String, String)>,
    /// Parameters ignored under `Prefer: handling=lenient`.
    pub ignored: Vec<String>,
}

/// Parameters that shape the answer rather than select; `_summary`/`_elements` are read by the
/// HTTP layer.
const RESULT_PARAMS: &[&str] = &[
    "_count",
    "_offset",
    "_format",
    "_pretty",
    "_summary",
    "_elements",
    "_total",
];

fn extra_params(rt: &str) -> &'static [&'static str] {
    match rt {
        "StructureDefinition" => &["type"],
        "SearchParameter" => &["code", "base"],
        _ => &[],
    }
}

impl ConformanceQuery {
    /// Read the query pairs of a search of `rt`; unknown parameters are a 400 unless `lenient`.
    pub fn parse(rt: &str, pairs: &[(String, String)], lenient: bool) -> Result<Self, SearchError> {
        let invalid = |param: &str, why: String| SearchError::Invalid {
            param: param.to_string(),
            why,
        };
        if pairs.len() > MAX_PARAMETERS {
            return Err(invalid(
                "",
                format!("a search takes at most {MAX_PARAMETERS} parameters"),
            ));
        }
        let mut q = ConformanceQuery {
            criteria: Vec::new(),
            count: DEFAULT_COUNT,
            offset: 0,
            applied: Vec::new(),
            ignored: Vec::new(),
        };
        for (key, value) in pairs {
            let (name, modifier) = match key.split_once(':') {
                Some((n, m)) => (n, Some(m)),
                None => (key.as_str(), None),
            };
            if RESULT_PARAMS.contains(&name) {
                let number = || {
                    value.parse::<usize>().map_err(|_| {
                        invalid(
                            name,
                            format!("{name} must be a non-negative integer, not '{value}'"),
                        )
                    })
                };
                match name {
                    "_count" => q.count = number()?.min(MAX_COUNT),
                    "_offset" => q.offset = number()?,
                    _ => {}
                }
                continue;
            }
            let base = ["url", "version", "name", "title", "status", "_id"];
            if !base.contains(&name) && !extra_params(rt).contains(&name) {
                if lenient {
                    q.ignored.push(key.clone());
                    continue;
                }
                let extra = match rt {
                    "StructureDefinition" => ", type",
                    "SearchParameter" => ", code, base",
                    _ => "",
                };
                return Err(SearchError::Unknown(key.clone(), rt.to_string(), extra));
            }
            let string_param = matches!(name, "name" | "title");
            let how = match (modifier, string_param) {
                (None, true) => Match::StartsWith,
                (None, false) => Match::Exact,
                (Some("exact"), true) => Match::Exact,
                (Some("contains"), true) => Match::Contains,
                (Some("below"), false) if name == "url" => Match::Below,
                (Some(m), _) => {
                    return Err(invalid(
                        key,
                        format!("the modifier :{m} is not supported on {name}"),
                    ));
                }
            };
            let values: Vec<String> = value
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(String::from)
                .collect();
            if values.is_empty() {
                return Err(invalid(key, format!("{key} has no value")));
            }
            if values.len() > MAX_VALUES {
                return Err(invalid(
                    key,
                    format!("{key} lists more than {MAX_VALUES} values"),
                ));
            }
            q.applied.push((key.clone(), value.clone()));
            q.criteria.push(Criterion {
                name: name.to_string(),
                how,
                values,
            });
        }
        Ok(q)
    }

    /// The matching resources of `rt` (all of them, in registry order) and this page of them.
    pub fn run<'a>(&self, c: &'a Conformance, rt: &str) -> (usize, Vec<&'a Value>) {
        let matching: Vec<&Value> = c
            .all(rt)
            .iter()
            .filter(|r| self.criteria.iter().all(|k| k.matches(r)))
            .collect();
        let total = matching.len();
        let page = matching
            .into_iter()
            .skip(self.offset)
            .take(self.count)
            .collect();
        (total, page)
    }
}

impl Criterion {
    fn matches(&self, r: &Value) -> bool {
        let found: Vec<&str> = match self.name.as_str() {
            "_id" => r["id"].as_str().into_iter().collect(),
            "base" => r["base"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect(),
            other => field(r, other).into_iter().collect(),
        };
        found
            .iter()
            .any(|f| self.values.iter().any(|v| self.how.holds(f, v)))
    }
}

impl Match {
    fn holds(self, found: &str, wanted: &str) -> bool {
        match self {
            Match::Exact => found == wanted,
            Match::StartsWith => fold(found).starts_with(&fold(wanted)),
            Match::Contains => fold(found).contains(&fold(wanted)),
            Match::Below => {
                found == wanted
                    || found
                        .strip_prefix(wanted)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        }
    }
}

/// Case- and accent-insensitive form of a string (FHIR string search), enough for the Latin
/// letters of Italian names.
fn fold(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            'à' | 'á' | 'À' | 'Á' => 'a',
            'è' | 'é' | 'È' | 'É' => 'e',
            'ì' | 'í' | 'Ì' | 'Í' => 'i',
            'ò' | 'ó' | 'Ò' | 'Ó' => 'o',
            'ù' | 'ú' | 'Ù' | 'Ú' => 'u',
            other => other.to_ascii_lowercase(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &str) -> Vec<(String, String)> {
        form_urlencoded::parse(q.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    fn ids(rt: &str, q: &str) -> Vec<String> {
        let query = ConformanceQuery::parse(rt, &pairs(q), false).unwrap();
        let (_, page) = query.run(Conformance::get(), rt);
        page.iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn url_version_name_and_status_select() {
        let canon = crate::terminology::CANON;
        assert_eq!(
            ids(
                "StructureDefinition",
                &format!("url={canon}/StructureDefinition/notifica-caso")
            ),
            vec!["notifica-caso"]
        );
        let by_name = ids("ValueSet", "name=dm1990");
        assert!(by_name.len() >= 5, "{by_name:?}");
        assert!(by_name.iter().all(|i| i.starts_with("dm1990")));
        let below = ids(
            "StructureDefinition",
            &format!("url:below={canon}/StructureDefinition&_count=500"),
        );
        assert!(below.contains(&"segnalazione".to_string()));
        assert!(!below.contains(&"Patient".to_string()));
        let r4_status = ids("StructureDefinition", "type=Patient&status=active");
        assert!(r4_status.contains(&"Patient".to_string()));
        assert!(ids("CodeSystem", "url=http://x/none").is_empty());
    }

    #[test]
    fn unknown_parameters_are_refused_unless_lenient() {
        let e = ConformanceQuery::parse("ValueSet", &pairs("colour=red"), false).unwrap_err();
        assert!(matches!(e, SearchError::Unknown(..)));
        let q = ConformanceQuery::parse("ValueSet", &pairs("colour=red"), true).unwrap();
        assert_eq!(q.ignored, vec!["colour"]);
        assert!(ConformanceQuery::parse("ValueSet", &pairs("status:below=x"), false).is_err());
        assert!(ConformanceQuery::parse("ValueSet", &pairs("_count=x"), false).is_err());
    }

    #[test]
    fn paging_is_stable_and_bounded() {
        let all = ids("SearchParameter", "_count=500");
        let first = ids("SearchParameter", "_count=10");
        let second = ids("SearchParameter", "_count=10&_offset=10");
        assert_eq!(first, all[..10]);
        assert_eq!(second, all[10..20]);
        let q = ConformanceQuery::parse("ValueSet", &pairs("_count=100000"), false).unwrap();
        assert_eq!(q.count, MAX_COUNT);
    }
}
