//! What the dashboard shows, each number counted by the FHIR search its link names: the search is
//! written once as parameters, parsed by the API's own parser, limited by the viewer's scope as
//! the API limits it (`Principal::scope`), and counted by the store. Following the link with the
//! same client's token gives a searchset whose `total` is the number shown.
use futures::StreamExt;
use serde_json::Value;

use super::filters::{Filters, Month};
use crate::api::AppState;
use crate::api::search::{SearchRequest, parse_search};
use crate::auth::Principal;
use crate::error::ApiResult;
use crate::store::{StoredResource, SubscriptionRow};
use crate::surveillance::dm1990::rules::RuleSet;
use crate::terminology::{CANON, ICD9CM};

/// Counts run this many at a time: a page waits for the slowest, not for their sum.
const PARALLEL_COUNTS: usize = 6;
/// Rows a listing shows (the count above it is the search's total).
pub const LIST_MAX: i64 = 50;
/// Subscriptions shown with their delivery state (one state read each).
pub const SUBSCRIPTIONS_MAX: i64 = 100;

/// The D.M. 1990 categories that are notified, and the CRE one, as the cases panel shows them.
pub const CASE_CATEGORIES: &[(&str, &str)] = &[
    ("classe-1", "Classe I"),
    ("classe-2", "Classe II"),
    ("classe-3", "Classe III"),
    ("classe-4", "Classe IV"),
    ("cre", "CRE"),
];
/// The categories whose notifications carry a deadline (D.M. 1990).
const DEADLINE_CATEGORIES: &[&str] = &["classe-1", "classe-2", "classe-3", "classe-4"];

/// A number and the search that counted it.
#[derive(Debug, Clone, PartialEq)]
pub struct Count {
    pub n: i64,
    /// The FHIR search URL (below the FHIR base).
    pub href: String,
}

/// One line of a month grid: a count per month and over the whole period.
#[derive(Debug, Clone)]
pub struct Series {
    pub code: String,
    pub label: String,
    pub cells: Vec<Count>,
    pub total: Count,
}

#[derive(Debug, Clone)]
pub struct Grid {
    pub months: Vec<Month>,
    pub series: Vec<Series>,
}

/// A listing: the search's total and its first rows.
#[derive(Debug, Clone)]
pub struct Listing<T> {
    pub count: Count,
    pub rows: Vec<T>,
}

#[derive(Debug, Clone)]
pub struct DeadlineRow {
    pub id: String,
    pub category: String,
    pub disease: String,
    /// The deadline as written (`2026-12-05T10:30:00+01:00`).
    pub deadline: String,
    pub asl: String,
}

#[derive(Debug, Clone)]
pub struct OutbreakRow {
    pub id: String,
    pub disease: String,
    pub community: String,
    pub community_kind: String,
    pub cases: Option<i64>,
    pub first_onset: String,
    pub days: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct SubscriptionHealth {
    pub row: SubscriptionRow,
    /// The Subscription's own resource link and its `$status`.
    pub href: String,
    pub status_href: String,
}

/// Everything one page shows.
pub struct Dashboard {
    pub cases: Grid,
    pub cre: Grid,
    pub open_deadlines: Listing<DeadlineRow>,
    pub late: Vec<(String, Count)>,
    pub outbreaks: Listing<OutbreakRow>,
    /// `None` for a viewer that may not read Subscriptions.
    pub subscriptions: Option<Listing<SubscriptionHealth>>,
}

type Pairs = Vec<(String, String)>;

fn p(k: &str, v: impl Into<String>) -> (String, String) {
    (k.to_string(), v.into())
}

fn category(code: &str) -> String {
    format!("{CANON}/CodeSystem/tipo-notifica|{code}")
}

/// Runs the dashboard's searches for one viewer.
pub struct Searcher<'a> {
    pub state: &'a AppState,
    pub viewer: &'a Principal,
    /// The FHIR base the links start with (`/fhir`, or the configured public base).
    pub base: String,
}

impl Searcher<'_> {
    fn href(&self, rt: &str, pairs: &Pairs) -> String {
        format!("{}/{rt}?{}", self.base, SearchRequest::encode(pairs))
    }

    /// The search `pairs` on `rt` as this viewer would run it: its total and up to `rows` matches.
    async fn run(
        &self,
        rt: &str,
        pairs: Pairs,
        rows: i64,
    ) -> ApiResult<(Count, Vec<StoredResource>)> {
        let href = self.href(rt, &pairs);
        let mut parsed = parse_search(rt, &SearchRequest { pairs }, false)?;
        parsed.query.count = rows;
        parsed.query.total = true;
        if let Some(scope) = self.viewer.scope(rt) {
            parsed.query.conditions.extend(scope);
        }
        let page = self.state.store.search(&parsed.query).await?;
        Ok((
            Count {
                n: page.total.unwrap_or(0),
                href,
            },
            page.matches,
        ))
    }

    async fn count(&self, rt: &str, pairs: Pairs) -> ApiResult<Count> {
        Ok(self.run(rt, pairs, 0).await?.0)
    }

    /// Count many searches, a few at a time, in order.
    async fn counts(&self, rt: &str, searches: Vec<Pairs>) -> ApiResult<Vec<Count>> {
        futures::stream::iter(searches.into_iter().map(|s| self.count(rt, s)))
            .buffered(PARALLEL_COUNTS)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// Standing notifications (not withdrawn) in the region filter.
    fn standing(&self, f: &Filters, mut pairs: Pairs) -> Pairs {
        pairs.push(p("status", "completed"));
        if let Some(r) = &f.region {
            pairs.push(p("region", r.clone()));
        }
        pairs
    }

    /// One series per `(code, label, criteria)`, counted by month of notification (`sent`, Italian
    /// months) and over the period.
    async fn grid(&self, f: &Filters, series: Vec<(String, String, Pairs)>) -> ApiResult<Grid> {
        let tz = crate::surveillance::calendar::rome();
        let months = f.months();
        let sent = |from: Month, to: Month| {
            vec![
                p("sent", format!("ge{}", from.start_instant(&tz))),
                p("sent", format!("lt{}", to.plus(1).start_instant(&tz))),
            ]
        };
        let mut searches = Vec::new();
        for (_, _, criteria) in &series {
            for m in &months {
                let mut s = criteria.clone();
                s.extend(sent(*m, *m));
                searches.push(self.standing(f, s));
            }
            let mut s = criteria.clone();
            s.extend(sent(f.from, f.to));
            searches.push(self.standing(f, s));
        }
        let mut counts = self.counts("Communication", searches).await?.into_iter();
        let series = series
            .into_iter()
            .map(|(code, label, _)| {
                let cells: Vec<Count> = counts.by_ref().take(months.len()).collect();
                let total = counts.next().expect("one total per series");
                Series {
                    code,
                    label,
                    cells,
                    total,
                }
            })
            .collect();
        Ok(Grid { months, series })
    }

    pub async fn dashboard(&self, f: &Filters, now: jiff::Timestamp) -> ApiResult<Dashboard> {
        let cases = self
            .grid(
                f,
                CASE_CATEGORIES
                    .iter()
                    .map(|(code, label)| {
                        (
                            code.to_string(),
                            label.to_string(),
                            vec![p("category", category(code))],
                        )
                    })
                    .collect(),
            )
            .await?;
        let species = &self.state.engine.definition.species;
        let cre = self
            .grid(
                f,
                species
                    .iter()
                    .map(|s| {
                        (
                            s.code.clone(),
                            s.name.clone(),
                            vec![
                                p("category", category("cre")),
                                p("organism", format!("{ICD9CM}|{}", s.reason_code.code)),
                            ],
                        )
                    })
                    .collect(),
            )
            .await?;
        let dm_categories = DEADLINE_CATEGORIES
            .iter()
            .map(|c| category(c))
            .collect::<Vec<_>>()
            .join(",");
        let now_text = jiff::Timestamp::from_second(now.as_second())
            .unwrap_or(now)
            .to_string();
        let (count, found) = self
            .run(
                "Communication",
                self.standing(
                    f,
                    vec![
                        p("category", dm_categories),
                        p("scadenza", format!("ge{now_text}")),
                    ],
                ),
                LIST_MAX,
            )
            .await?;
        let mut rows: Vec<DeadlineRow> = found.iter().filter_map(deadline_row).collect();
        rows.sort_by(|a, b| a.deadline.cmp(&b.deadline).then(a.id.cmp(&b.id)));
        let open_deadlines = Listing { count, rows };

        let tz = crate::surveillance::calendar::rome();
        let period = [
            p("sent", format!("ge{}", f.from.start_instant(&tz))),
            p("sent", format!("lt{}", f.to.plus(1).start_instant(&tz))),
        ];
        let late_searches = DEADLINE_CATEGORIES
            .iter()
            .map(|c| {
                let mut s = vec![p("category", category(c)), p("in-ritardo", "true")];
                s.extend(period.iter().cloned());
                self.standing(f, s)
            })
            .collect();
        let late = DEADLINE_CATEGORIES
            .iter()
            .map(|c| label_of(c).to_string())
            .zip(self.counts("Communication", late_searches).await?)
            .collect();

        let mut outbreak_search = vec![p("category", category("focolaio"))];
        outbreak_search.extend(period.iter().cloned());
        let (count, found) = self
            .run("Communication", self.standing(f, outbreak_search), LIST_MAX)
            .await?;
        let outbreaks = Listing {
            count,
            rows: found.iter().filter_map(outbreak_row).collect(),
        };

        let subscriptions = if self.viewer.may_read("Subscription") {
            Some(self.subscriptions().await?)
        } else {
            None
        };
        Ok(Dashboard {
            cases,
            cre,
            open_deadlines,
            late,
            outbreaks,
            subscriptions,
        })
    }

    /// The viewer's Subscriptions (every one for an administrator) with their delivery state.
    async fn subscriptions(&self) -> ApiResult<Listing<SubscriptionHealth>> {
        let (count, found) = self
            .run("Subscription", vec![p("_sort", "_id")], SUBSCRIPTIONS_MAX)
            .await?;
        let mut rows = Vec::new();
        for s in found {
            if let Some(row) = self.state.store.subscription(&s.id).await? {
                rows.push(SubscriptionHealth {
                    href: format!("{}/Subscription/{}", self.base, s.id),
                    status_href: format!("{}/Subscription/{}/$status", self.base, s.id),
                    row,
                });
            }
        }
        Ok(Listing { count, rows })
    }
}

/// The Italian label of a notification category.
pub fn label_of(code: &str) -> &str {
    CASE_CATEGORIES
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, l)| *l)
        .unwrap_or(code)
}

fn body(stored: &StoredResource) -> Option<Value> {
    serde_json::from_str(stored.body.as_deref()?).ok()
}

fn extension<'a>(resource: &'a Value, name: &str) -> Option<&'a Value> {
    let url = format!("{CANON}/StructureDefinition/{name}");
    resource["extension"]
        .as_array()?
        .iter()
        .find(|e| e["url"] == url.as_str())
}

fn sub_extension<'a>(ext: &'a Value, name: &str) -> Option<&'a Value> {
    ext["extension"]
        .as_array()?
        .iter()
        .find(|e| e["url"] == name)
}

/// `055 Morbillo` of the first reason code: the D.M. 1990 name of the disease where the decree
/// lists it, else the code's own display (ICD-9-CM's is English).
fn disease(resource: &Value) -> String {
    let coding = &resource["reasonCode"][0]["coding"][0];
    let Some(code) = coding["code"].as_str() else {
        return String::new();
    };
    match italian_name(code).or_else(|| coding["display"].as_str().map(str::to_string)) {
        Some(name) => format!("{code} {name}"),
        None => code.to_string(),
    }
}

/// The decree's (Italian) name of the disease a code belongs to, from the rule sets in
/// `profiles/`, capitalised: `055` → `Morbillo`.
fn italian_name(code: &str) -> Option<String> {
    let name = RuleSet::shared()
        .iter()
        .find_map(|s| s.classify(code))?
        .disease
        .name
        .clone();
    let mut chars = name.chars();
    let first = chars.next()?;
    Some(first.to_uppercase().chain(chars).collect())
}

fn category_code(resource: &Value) -> String {
    resource["category"][0]["coding"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn deadline_row(stored: &StoredResource) -> Option<DeadlineRow> {
    let r = body(stored)?;
    let deadline = extension(&r, "scadenza")?["valueDateTime"]
        .as_str()?
        .to_string();
    let asl_system = format!("{CANON}/sid/asl");
    let asl = r["recipient"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["identifier"]["system"] == asl_system.as_str())
        .map(|x| {
            x["display"]
                .as_str()
                .or(x["identifier"]["value"].as_str())
                .unwrap_or_default()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(", ");
    Some(DeadlineRow {
        id: stored.id.clone(),
        category: category_code(&r),
        disease: disease(&r),
        deadline,
        asl,
    })
}

fn outbreak_row(stored: &StoredResource) -> Option<OutbreakRow> {
    let r = body(stored)?;
    let ext = extension(&r, "focolaio");
    let text = |name: &str, key: &str| {
        ext.and_then(|e| sub_extension(e, name))
            .and_then(|x| x[key].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let int = |name: &str| {
        ext.and_then(|e| sub_extension(e, name))
            .and_then(|x| x["valueInteger"].as_i64())
    };
    let community = match text("nome", "valueString") {
        name if !name.is_empty() => name,
        _ => ext
            .and_then(|e| sub_extension(e, "comunita"))
            .and_then(|x| x["valueIdentifier"]["value"].as_str())
            .unwrap_or_default()
            .to_string(),
    };
    Some(OutbreakRow {
        id: stored.id.clone(),
        disease: disease(&r),
        community,
        community_kind: text("tipo-comunita", "valueCode"),
        cases: int("numero-casi"),
        first_onset: text("data-inizio", "valueDate"),
        days: int("durata-giorni"),
    })
}
