//! The dashboard's filters (query parameters `regione`, `da`, `a`), validated and bounded: an
//! unknown parameter, a region that is not an NSIS code of the region list, a month that is not
//! `YYYY-MM` or a period longer than `MAX_MONTHS` is refused with a message in Italian.
use jiff::civil::{Date, date};
use jiff::tz::TimeZone;

use crate::terminology::{CANON, Terminology};

/// The longest period one page counts: each month costs one indexed count per series.
pub const MAX_MONTHS: i32 = 36;
/// The months shown when no period is asked for (the current one and the eleven before).
pub const DEFAULT_MONTHS: i32 = 12;

/// A calendar month in Italy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Month {
    pub year: i16,
    pub month: i8,
}

const MONTH_NAMES: [&str; 12] = [
    "gen", "feb", "mar", "apr", "mag", "giu", "lug", "ago", "set", "ott", "nov", "dic",
];

impl Month {
    pub fn parse(text: &str) -> Option<Month> {
        let (y, m) = text.split_once('-')?;
        if y.len() != 4 || m.len() != 2 {
            return None;
        }
        let year: i16 = y.parse().ok()?;
        let month: i8 = m.parse().ok()?;
        ((2000..=2100).contains(&year) && (1..=12).contains(&month))
            .then_some(Month { year, month })
    }

    /// The month of Italy's calendar that `now` falls in.
    pub fn containing(now: jiff::Timestamp, tz: &TimeZone) -> Month {
        let d = now.to_zoned(tz.clone()).date();
        Month {
            year: d.year(),
            month: d.month(),
        }
    }

    pub fn plus(self, months: i32) -> Month {
        let index = self.year as i32 * 12 + (self.month as i32 - 1) + months;
        Month {
            year: (index.div_euclid(12)) as i16,
            month: (index.rem_euclid(12) + 1) as i8,
        }
    }

    /// Months from `self` to `other` (0 when equal).
    pub fn until(self, other: Month) -> i32 {
        (other.year as i32 * 12 + other.month as i32) - (self.year as i32 * 12 + self.month as i32)
    }

    fn first_day(self) -> Date {
        date(self.year, self.month, 1)
    }

    /// Midnight of the first day in Italy, as a FHIR dateTime with its offset (CET or CEST).
    pub fn start_instant(self, tz: &TimeZone) -> String {
        let z = self
            .first_day()
            .to_zoned(tz.clone())
            .expect("the first of a month exists in Europe/Rome");
        z.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string()
    }

    /// `YYYY-MM`, as the filters take it.
    pub fn key(self) -> String {
        format!("{:04}-{:02}", self.year, self.month)
    }

    /// `dic 2026`
    pub fn label(self) -> String {
        format!("{} {}", MONTH_NAMES[(self.month - 1) as usize], self.year)
    }

    /// `dic` (with `26` under January or the first month, on the charts' axis).
    pub fn short(self) -> &'static str {
        MONTH_NAMES[(self.month - 1) as usize]
    }
}

/// What a dashboard page shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Filters {
    /// An NSIS region code (`030`), or every region the viewer sees.
    pub region: Option<String>,
    pub from: Month,
    /// Inclusive.
    pub to: Month,
}

impl Filters {
    /// The months of the period, in order.
    pub fn months(&self) -> Vec<Month> {
        (0..=self.from.until(self.to))
            .map(|i| self.from.plus(i))
            .collect()
    }

    /// The query string that reproduces these filters (for the form and the links).
    pub fn query(&self) -> String {
        let mut pairs = vec![("da", self.from.key()), ("a", self.to.key())];
        if let Some(r) = &self.region {
            pairs.push(("regione", r.clone()));
        }
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    }
}

/// The Italian region name of an NSIS code, if it is one.
pub fn region_name(code: &str) -> Option<&'static str> {
    Terminology::get().display(&format!("{CANON}/CodeSystem/regione"), code)
}

/// Every region of the code system, in code order.
pub fn all_regions() -> Vec<(String, String)> {
    let url = format!("{CANON}/CodeSystem/regione");
    let mut out: Vec<(String, String)> = Terminology::get()
        .resources
        .iter()
        .filter(|r| r["resourceType"] == "CodeSystem" && r["url"] == url.as_str())
        .flat_map(|r| r["concept"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| {
            Some((
                c["code"].as_str()?.to_string(),
                c["display"].as_str()?.to_string(),
            ))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Parse the query string of a dashboard page; `now` is the current month.
pub fn parse(query: Option<&str>, now: Month) -> Result<Filters, String> {
    let mut region = None;
    let mut from = None;
    let mut to = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let value = value.trim().to_string();
        match key.as_ref() {
            "regione" if value.is_empty() => {}
            "regione" => {
                if region_name(&value).is_none() {
                    return Err(format!(
                        "«{value}» non è un codice di regione (codice NSIS a tre cifre, ad esempio 030 per la Lombardia)"
                    ));
                }
                region = Some(value);
            }
            "da" | "a" if value.is_empty() => {}
            "da" | "a" => {
                let m = Month::parse(&value).ok_or_else(|| {
                    format!("«{value}» non è un mese nella forma AAAA-MM (ad esempio 2026-01)")
                })?;
                if key == "da" {
                    from = Some(m);
                } else {
                    to = Some(m);
                }
            }
            other => return Err(format!("parametro sconosciuto «{other}»")),
        }
    }
    let to = to.unwrap_or(now);
    let from = from.unwrap_or(to.plus(1 - DEFAULT_MONTHS));
    if from > to {
        return Err("il mese iniziale («da») viene dopo quello finale («a»)".into());
    }
    if from.until(to) + 1 > MAX_MONTHS {
        return Err(format!(
            "il periodo copre {} mesi: al massimo {MAX_MONTHS}",
            from.until(to) + 1
        ));
    }
    Ok(Filters { region, from, to })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Month = Month {
        year: 2026,
        month: 12,
    };

    #[test]
    fn the_default_period_is_the_last_twelve_months() {
        let f = parse(None, NOW).unwrap();
        assert_eq!(f.from.key(), "2026-01");
        assert_eq!(f.to.key(), "2026-12");
        assert_eq!(f.months().len(), 12);
        assert_eq!(f.region, None);
    }

    #[test]
    fn bad_filters_are_refused() {
        assert!(parse(Some("regione=999"), NOW).is_err());
        assert!(parse(Some("regione=<script>"), NOW).is_err());
        assert!(parse(Some("da=2026-13"), NOW).is_err());
        assert!(
            parse(Some("da=2020-01&a=2026-12"), NOW)
                .unwrap_err()
                .contains("al massimo")
        );
        assert!(parse(Some("da=2026-05&a=2026-04"), NOW).is_err());
        assert!(parse(Some("x=1"), NOW).is_err());
        let f = parse(Some("regione=030&da=2024-01&a=2026-12"), NOW).unwrap();
        assert_eq!(f.months().len(), 36);
        assert_eq!(f.region.as_deref(), Some("030"));
    }

    #[test]
    fn months_start_at_italian_midnight() {
        let tz = crate::surveillance::calendar::rome();
        let jan = Month::parse("2026-01").unwrap();
        assert_eq!(jan.start_instant(&tz), "2026-01-01T00:00:00+01:00");
        assert_eq!(
            Month::parse("2026-07").unwrap().start_instant(&tz),
            "2026-07-01T00:00:00+02:00"
        );
        assert_eq!(jan.plus(-1).key(), "2025-12");
        assert_eq!(jan.plus(12).key(), "2027-01");
        assert!(region_name("030").is_some());
        assert!(all_regions().len() >= 20);
    }
}
