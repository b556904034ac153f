//! The case register the periodic summaries count (Modello 16 / 16-bis, class V annual, CRE
//! monthly): each rule set records here, in the transaction that decides a case, the day, age band
//! inputs, sex and area of the case, so that a summary reads one area's rows through an index
//! instead of every stored notification.
use jiff::civil::Date;
use serde_json::Value;

use super::calendar::rome;
use crate::italy::places::place_of_comune;
use crate::store::RegisteredCase;

/// Modello 15 records ages in completed years, "under 1" as 0 and anything above 99 as 99.
const OLDEST_RECORDED_AGE: i32 = 99;

/// `yyyymmdd` of a `YYYY-MM-DD` day.
pub fn day_number(day: &str) -> Option<i32> {
    let d: Date = day.get(..10)?.parse().ok()?;
    Some(d.year() as i32 * 10_000 + d.month() as i32 * 100 + d.day() as i32)
}

/// The Italian day (`yyyymmdd`) of an instant (µs).
pub fn rome_day_of_micros(micros: i64) -> Option<i32> {
    let ts = jiff::Timestamp::from_microsecond(micros).ok()?;
    let d = ts.to_zoned(rome()).date();
    Some(d.year() as i32 * 10_000 + d.month() as i32 * 100 + d.day() as i32)
}

/// Completed years from a FHIR birth date (`YYYY`, `YYYY-MM` or `YYYY-MM-DD`) to `day`, capped as
/// Modello 15 records them. A birth date given to the year or month only is taken at its first day:
/// the age is then at most one year too high, as a registry clerk would read it.
pub fn age_on(birth_date: &str, day: i32) -> Option<i32> {
    let mut parts = birth_date.split('-');
    let y: i32 = parts.next()?.parse().ok()?;
    let m: i32 = parts.next().map_or(Some(1), |m| m.parse().ok())?;
    let d: i32 = parts.next().map_or(Some(1), |d| d.get(..2)?.parse().ok())?;
    let (dy, dm, dd) = (day / 10_000, day / 100 % 100, day % 100);
    if (y, m, d) > (dy, dm, dd) {
        return None;
    }
    let mut age = dy - y;
    if (dm, dd) < (m, d) {
        age -= 1;
    }
    Some(age.clamp(0, OLDEST_RECORDED_AGE))
}

/// The administrative gender of a Patient (`unknown` when absent).
pub fn sex_of(patient: &Value) -> String {
    match patient["gender"].as_str() {
        Some(g @ ("male" | "female" | "other" | "unknown")) => g.to_string(),
        _ => "unknown".to_string(),
    }
}

/// Where a case is counted: the comune of residence and what it maps to, else the fallback ASL.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CaseArea {
    pub comune: Option<String>,
    pub province: Option<String>,
    pub asl: Option<String>,
    pub region: Option<String>,
}

impl CaseArea {
    /// The residence comune's province, ASL and region; an ASL the comune does not give (no map,
    /// no residence) is `fallback_asl` when that ASL lies in the region of residence (NSIS ASL codes
    /// start with their region's code), or when the region of residence is not known either (the
    /// region then follows that ASL). A resident of another region is never counted in an ASL of
    /// the region that notified it.
    pub fn of(comune: Option<&str>, fallback_asl: Option<&str>) -> CaseArea {
        let place = comune.and_then(place_of_comune);
        let mut area = CaseArea {
            comune: comune.map(String::from),
            province: place.as_ref().map(|p| p.province.clone()),
            asl: place.as_ref().and_then(|p| p.asl.clone()),
            region: place.as_ref().and_then(|p| p.region.clone()),
        };
        if area.asl.is_none()
            && let Some(a) = fallback_asl
        {
            let asl_region = a.get(..3).map(String::from);
            if area.region.is_none() || area.region == asl_region {
                area.asl = Some(a.to_string());
                area.region = area.region.or(asl_region);
            }
        }
        area
    }
}

/// What the register needs to know of a case, whichever rules decided it.
pub struct CaseFacts<'a> {
    pub case_id: &'a str,
    pub family: &'a str,
    pub category: &'a str,
    pub disease: &'a str,
    pub code: &'a str,
    /// The Italian day that puts the case in a period (`yyyymmdd`).
    pub day: i32,
    pub birth_date: Option<&'a str>,
    pub sex: String,
    pub area: CaseArea,
    pub refs: Vec<String>,
}

impl CaseFacts<'_> {
    pub fn row(self) -> RegisteredCase {
        RegisteredCase {
            case_id: self.case_id.to_string(),
            family: self.family.to_string(),
            category: self.category.to_string(),
            disease: self.disease.to_string(),
            code: self.code.to_string(),
            day: self.day,
            age: self.birth_date.and_then(|b| age_on(b, self.day)),
            sex: self.sex,
            comune: self.area.comune,
            province: self.area.province,
            asl: self.area.asl,
            region: self.area.region,
            active: true,
            refs: self.refs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_notifying_asl_stands_in_only_within_the_region_of_residence() {
        // Torino (province 001, Piemonte 010) has no ASL in the map: a Lombard ATS does not take it
        let torino = CaseArea::of(Some("001272"), Some("030321"));
        assert_eq!(torino.region.as_deref(), Some("010"));
        assert_eq!(torino.asl, None);
        // no residence at all: the notifying ASL and its region
        let nowhere = CaseArea::of(None, Some("030321"));
        assert_eq!(
            (nowhere.asl.as_deref(), nowhere.region.as_deref()),
            (Some("030321"), Some("030"))
        );
    }

    #[test]
    fn ages_are_completed_years_capped_as_modello_15_records_them() {
        assert_eq!(age_on("2026-01-15", 20260131), Some(0));
        assert_eq!(age_on("2025-02-01", 20260131), Some(0));
        assert_eq!(age_on("2025-01-31", 20260131), Some(1));
        assert_eq!(age_on("1920-01-01", 20260131), Some(99));
        assert_eq!(age_on("2027-01-01", 20260131), None);
        assert_eq!(age_on("1980", 20260131), Some(46));
    }

    #[test]
    fn the_day_is_the_italian_day() {
        // 23:30 UTC on 31 January is 00:30 on 1 February in Rome
        let t = crate::surveillance::calendar::italian_instant("2026-01-31T23:30:00Z").unwrap();
        assert_eq!(rome_day_of_micros(t), Some(20260201));
        let t =
            crate::surveillance::calendar::italian_instant("2026-01-31T23:30:00+01:00").unwrap();
        assert_eq!(rome_day_of_micros(t), Some(20260131));
    }
}
