//! `$evaluate-measure`: a Measure's MeasureReport for a period and an area, computed from the case
//! register (counts grouped by the database; the cases one by one only for a subject list).
use std::collections::BTreeMap;

use jiff::civil::Date;
use serde_json::{Value, json};

use super::MeasureError;
use super::definition::{Dimension, MeasureDef};
use crate::fhir::datetime::{format_instant, now_micros};
use crate::store::{Area, RegisterGroup, RegisterQuery, Store};
use crate::terminology::{CANON, ICD9CM, Terminology};

/// At most this many cases are listed in one subject-list report (a longer list is asked for by
/// a smaller area or period).
pub const MAX_LISTED_CASES: i64 = 50_000;
/// The longest period one evaluation covers.
const MAX_PERIOD_DAYS: i32 = 366;

const GENDER: &str = "http://hl7.org/fhir/administrative-gender";
const ABSENT: &str = "http://terminology.hl7.org/CodeSystem/data-absent-reason";

/// A period of whole Italian days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub start: Date,
    pub end: Date,
}

fn day_number(d: Date) -> i32 {
    d.year() as i32 * 10_000 + d.month() as i32 * 100 + d.day() as i32
}

/// A FHIR date (`YYYY`, `YYYY-MM`, `YYYY-MM-DD`) as its first or its last day.
fn parse_date(text: &str, last: bool) -> Option<Date> {
    let mut parts = text.split('-');
    let y: i16 = parts.next()?.parse().ok()?;
    let m: Option<i8> = parts.next().map(|m| m.parse().ok()).unwrap_or(Some(0));
    let d: Option<i8> = parts.next().map(|d| d.parse().ok()).unwrap_or(Some(0));
    if parts.next().is_some() || text.len() > 10 {
        return None;
    }
    let (m, d) = (m?, d?);
    match (m, d) {
        (0, _) if last => Date::new(y, 12, 31).ok(),
        (0, _) => Date::new(y, 1, 1).ok(),
        (m, 0) if last => Some(Date::new(y, m, 1).ok()?.last_of_month()),
        (m, 0) => Date::new(y, m, 1).ok(),
        (m, d) => Date::new(y, m, d).ok(),
    }
}

impl Period {
    pub fn parse(start: &str, end: &str) -> Result<Period, MeasureError> {
        let bad = |name: &str, v: &str| {
            MeasureError::Invalid(
                name.to_string(),
                format!("{name}={v} is not a date (YYYY, YYYY-MM or YYYY-MM-DD)"),
            )
        };
        let p = Period {
            start: parse_date(start, false).ok_or_else(|| bad("periodStart", start))?,
            end: parse_date(end, true).ok_or_else(|| bad("periodEnd", end))?,
        };
        if p.end < p.start {
            return Err(MeasureError::Invalid(
                "periodEnd".into(),
                format!("periodEnd {end} is before periodStart {start}"),
            ));
        }
        let days = (p.end - p.start).get_days();
        if days >= MAX_PERIOD_DAYS {
            return Err(MeasureError::TooCostly(format!(
                "a period of {} days: at most {MAX_PERIOD_DAYS} per evaluation",
                days + 1
            )));
        }
        Ok(p)
    }

    pub fn month(year: i16, month: i8) -> Option<Period> {
        let start = Date::new(year, month, 1).ok()?;
        Some(Period {
            start,
            end: start.last_of_month(),
        })
    }

    pub fn year(year: i16) -> Option<Period> {
        Some(Period {
            start: Date::new(year, 1, 1).ok()?,
            end: Date::new(year, 12, 31).ok()?,
        })
    }

    pub fn days(&self) -> (i32, i32) {
        (day_number(self.start), day_number(self.end))
    }

    fn json(&self) -> Value {
        json!({"start": self.start.to_string(), "end": self.end.to_string()})
    }
}

/// The area a report is about: an ASL, a province or a region, as its identifier names it.
#[derive(Debug, Clone, PartialEq)]
pub struct Subject {
    pub area: Area,
    /// `asl`, `provincia`, `regione` (the `sid` and CodeSystem names).
    pub kind: &'static str,
    pub code: String,
    /// The region the area lies in (an ASL's code starts with it; a province maps to it).
    pub region: Option<String>,
}

impl Subject {
    /// `CANON/sid/{asl|provincia|regione}|CODE`, a code of the CodeSystem of that name.
    pub fn parse(text: &str) -> Result<Subject, MeasureError> {
        let bad = |why: String| MeasureError::Invalid("subject".into(), why);
        let (system, code) = text.split_once('|').ok_or_else(|| {
            bad(format!(
                "subject={text}: give the area as the system|code of its identifier, e.g. {CANON}/sid/regione|030"
            ))
        })?;
        let kind = match system.strip_prefix(&format!("{CANON}/sid/")) {
            Some("asl") => "asl",
            Some("provincia") => "provincia",
            Some("regione") => "regione",
            _ => {
                return Err(bad(format!(
                    "subject system {system} is not one of {CANON}/sid/asl, /sid/provincia, /sid/regione"
                )));
            }
        };
        let subject = Subject::of(kind, code);
        if subject.display().is_none() {
            return Err(bad(format!(
                "{code} is not a code of {CANON}/CodeSystem/{kind}"
            )));
        }
        Ok(subject)
    }

    pub fn of(kind: &'static str, code: &str) -> Subject {
        let code = code.to_string();
        let (area, region) = match kind {
            "asl" => (Area::Asl(code.clone()), code.get(..3).map(String::from)),
            "provincia" => {
                let region = Terminology::get()
                    .translate(
                        "provincia-regione",
                        &(format!("{CANON}/CodeSystem/provincia"), code.clone()),
                    )
                    .first()
                    .map(|c| c.1.clone());
                (Area::Province(code.clone()), region)
            }
            _ => (Area::Region(code.clone()), Some(code.clone())),
        };
        Subject {
            area,
            kind,
            code,
            region,
        }
    }

    pub fn display(&self) -> Option<&'static str> {
        Terminology::get().display(&format!("{CANON}/CodeSystem/{}", self.kind), &self.code)
    }

    /// The report's `reporter`: the area by its identifier.
    pub fn reference(&self) -> Value {
        let mut r = json!({"identifier": {"system": format!("{CANON}/sid/{}", self.kind), "value": self.code}});
        if let Some(d) = self.display() {
            r["display"] = json!(d);
        }
        r
    }
}

/// What a report lists besides its counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    Summary,
    /// Each population's cases, as contained Lists.
    SubjectList,
}

/// The value of one component for one case: `(system, code, display)`.
type Value3 = (String, String, Option<String>);

/// The strata of a report: each stratum's component values, its count and (subject list) cases.
#[derive(Default)]
struct Strata {
    total: i64,
    total_refs: Vec<String>,
    by_key: BTreeMap<Vec<Value3>, (i64, Vec<String>)>,
}

/// The value of one dimension for cases of a group.
fn value_of(d: &Dimension, g: &RegisterGroup) -> Value3 {
    let t = Terminology::get();
    let coded = |system: &str, code: &str| {
        (
            system.to_string(),
            code.to_string(),
            t.display(system, code).map(String::from),
        )
    };
    // a place the CodeSystem does not know (a comune of an unknown province) is not a stratum code
    let place = |kind: &str, code: Option<&str>| {
        let system = format!("{CANON}/CodeSystem/{kind}");
        match code.filter(|c| t.display(&system, c).is_some()) {
            Some(c) => coded(&system, c),
            None => (ABSENT.into(), "unknown".into(), Some("Unknown".into())),
        }
    };
    match d {
        Dimension::Disease | Dimension::Species => coded(ICD9CM, &g.disease),
        Dimension::Code => coded(ICD9CM, &g.code),
        Dimension::AgeBand(bands) => {
            let (c, display) = bands.of(g.age);
            (
                bands.system.clone(),
                c.to_string(),
                Some(display.to_string()),
            )
        }
        Dimension::Sex => {
            let display = match g.sex.as_str() {
                "male" => "Male",
                "female" => "Female",
                "other" => "Other",
                _ => "Unknown",
            };
            (GENDER.into(), g.sex.clone(), Some(display.into()))
        }
        Dimension::Province => place("provincia", g.province.as_deref()),
        Dimension::Asl => place("asl", g.asl.as_deref()),
        Dimension::Region => place("regione", g.region.as_deref()),
    }
}

/// Count (and, for a subject list, list) the cases of `m` standing in `subject` over `period`.
pub async fn evaluate(
    store: &dyn Store,
    m: &MeasureDef,
    period: &Period,
    subject: Option<&Subject>,
    detail: Detail,
) -> Result<Value, MeasureError> {
    let (from_day, to_day) = period.days();
    let mut categories: Vec<String> = m.terms.iter().map(|t| t.category.clone()).collect();
    categories.sort();
    categories.dedup();
    let q = RegisterQuery {
        family: m.family.clone(),
        categories,
        area: subject.map_or(Area::Country, |s| s.area.clone()),
        within_region: subject
            .filter(|s| !matches!(s.area, Area::Region(_)))
            .and_then(|s| s.region.clone()),
        from_day,
        to_day,
    };
    let mut strata = Strata::default();
    let key_of = |g: &RegisterGroup| -> Vec<Value3> {
        m.components
            .iter()
            .map(|c| value_of(&c.dimension, g))
            .collect()
    };
    match detail {
        Detail::Summary => {
            for (g, n) in store.register_counts(&q).await? {
                if !m.counts(&g.category, &g.disease) {
                    continue;
                }
                let key = key_of(&g);
                strata.total += n;
                strata.by_key.entry(key).or_default().0 += n;
            }
        }
        Detail::SubjectList => {
            let cases = store.register_cases(&q, MAX_LISTED_CASES + 1).await?;
            if cases.len() as i64 > MAX_LISTED_CASES {
                return Err(MeasureError::TooCostly(format!(
                    "more than {MAX_LISTED_CASES} cases to list: ask for a smaller area or period, or for reportType=summary"
                )));
            }
            for c in cases {
                if !m.counts(&c.category, &c.disease) {
                    continue;
                }
                let key = key_of(&RegisterGroup {
                    category: c.category,
                    disease: c.disease,
                    code: c.code,
                    age: c.age,
                    sex: c.sex,
                    province: c.province,
                    asl: c.asl,
                    region: c.region,
                });
                // one entry per case: its notification, or (class V) its first report
                let Some(first) = c.refs.into_iter().next() else {
                    continue;
                };
                strata.total += 1;
                strata.total_refs.push(first.clone());
                let entry = strata.by_key.entry(key).or_default();
                entry.0 += 1;
                entry.1.push(first);
            }
        }
    }
    Ok(report(m, period, subject, &strata, detail))
}

fn population(count: i64, list: Option<&str>) -> Value {
    let mut p = json!({
        "code": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/measure-population", "code": "initial-population", "display": "Initial Population"}]},
        "count": count
    });
    if let Some(id) = list {
        p["subjectResults"] = json!({"reference": format!("#{id}")});
    }
    p
}

/// A contained List of cases, one entry each (an empty one says so: FHIR has no empty arrays).
fn case_list(id: &str, title: String, refs: &[String]) -> Value {
    let mut list = json!({
        "resourceType": "List",
        "id": id,
        "status": "current",
        "mode": "snapshot",
        "title": title,
    });
    if refs.is_empty() {
        list["emptyReason"] = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": "nilknown"}]});
    } else {
        list["entry"] = json!(
            refs.iter()
                .map(|r| json!({"item": {"reference": r}}))
                .collect::<Vec<_>>()
        );
    }
    list
}

fn coding(v: &Value3) -> Value {
    let mut c = json!({"system": v.0, "code": v.1});
    if let Some(d) = &v.2 {
        c["display"] = json!(d);
    }
    c
}

fn report(
    m: &MeasureDef,
    period: &Period,
    subject: Option<&Subject>,
    strata: &Strata,
    detail: Detail,
) -> Value {
    let lists = detail == Detail::SubjectList;
    let mut contained = Vec::new();
    let dimension = |code: &str| json!({"coding": [{"system": format!("{CANON}/CodeSystem/dimensione-riepilogo"), "code": code}]});
    let mut stratum_list = Vec::new();
    for (i, (key, (count, refs))) in strata.by_key.iter().enumerate() {
        let list_id = lists.then(|| format!("strato-{}", i + 1));
        if let Some(id) = &list_id {
            let label: Vec<&str> = key.iter().map(|v| v.1.as_str()).collect();
            contained.push(case_list(
                id,
                format!("Casi dello strato {}", label.join(" / ")),
                refs,
            ));
        }
        stratum_list.push(json!({
            "component": m.components.iter().zip(key).map(|(c, v)| json!({
                "code": dimension(&c.code),
                "value": {"coding": [coding(v)]}
            })).collect::<Vec<_>>(),
            "population": [population(*count, list_id.as_deref())]
        }));
    }
    let total_list = lists.then(|| "casi".to_string());
    if let Some(id) = &total_list {
        contained.insert(
            0,
            case_list(id, "Casi conteggiati".into(), &strata.total_refs),
        );
    }
    let mut stratifier = json!({"code": [dimension(&m.stratifier_code)]});
    if !stratum_list.is_empty() {
        stratifier["stratum"] = json!(stratum_list);
    }
    let mut r = json!({
        "resourceType": "MeasureReport",
        "status": "complete",
        "type": if lists { "subject-list" } else { "summary" },
        "measure": m.url,
        "date": format_instant(now_micros()),
        "period": period.json(),
        "group": [{
            "population": [population(strata.total, total_list.as_deref())],
            "stratifier": [stratifier]
        }]
    });
    if let Some(s) = subject {
        r["reporter"] = s.reference();
    }
    if !contained.is_empty() {
        r["contained"] = json!(contained);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_dates_cover_their_whole_month_or_year() {
        let p = Period::parse("2026-02", "2026-02").unwrap();
        assert_eq!(p.days(), (20260201, 20260228));
        let p = Period::parse("2024", "2024").unwrap();
        assert_eq!(p.days(), (20240101, 20241231));
        assert!(Period::parse("2026-02-01", "2026-01-31").is_err());
        assert!(Period::parse("2026-13", "2026-13").is_err());
        assert!(Period::parse("2024-01-01", "2025-06-30").is_err());
    }

    #[test]
    fn a_subject_is_an_area_of_a_known_code() {
        let s = Subject::parse(&format!("{CANON}/sid/asl|030321")).unwrap();
        assert_eq!(s.region.as_deref(), Some("030"));
        assert!(Subject::parse(&format!("{CANON}/sid/asl|999999")).is_err());
        assert!(Subject::parse("Organization/1").is_err());
        let p = Subject::parse(&format!("{CANON}/sid/provincia|015")).unwrap();
        assert_eq!(p.region.as_deref(), Some("030"));
    }
}
