//! The calendar year of a case: a FHIR date or dateTime read in the definition's time zone
//! (Europe/Rome), so that 31 December 23:30 UTC is already 1 January in Italy.
use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;

/// The date that decided a case's year, and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceDate {
    /// As the sender wrote it.
    pub text: String,
    /// `raccolta-campione`, `osservazione` or `referto`.
    pub source: &'static str,
    pub year: i32,
    /// µs since the epoch (the earliest isolate of a year is the case).
    pub micros: i64,
}

pub fn reference_date(text: &str, source: &'static str, tz: &TimeZone) -> Option<ReferenceDate> {
    let (year, micros) = if text.contains('T') {
        let ts: Timestamp = truncate_fraction(text).parse().ok()?;
        (ts.to_zoned(tz.clone()).year() as i32, ts.as_microsecond())
    } else {
        // a date without a time: its year is the written one; it starts at local midnight
        let mut parts = text.split('-');
        let y: i16 = parts.next()?.parse().ok()?;
        let m: i8 = parts.next().map_or(Some(1), |m| m.parse().ok())?;
        let d: i8 = parts.next().map_or(Some(1), |d| d.parse().ok())?;
        let date = Date::new(y, m, d).ok()?;
        let start = date.to_zoned(tz.clone()).ok()?;
        (y as i32, start.timestamp().as_microsecond())
    };
    Some(ReferenceDate {
        text: text.to_string(),
        source,
        year,
        micros,
    })
}

/// Italy's time zone: the decree's days (deadlines, rule sets in force, months) are Italian days.
pub fn rome() -> TimeZone {
    // bundled with the binary (jiff's tzdb-bundle-always): never missing
    TimeZone::get("Europe/Rome").expect("the bundled time zone database has Europe/Rome")
}

/// A FHIR date or dateTime as an instant: a date without a time starts at Italian midnight.
pub fn italian_instant(text: &str) -> Option<i64> {
    reference_date(text, "", &rome()).map(|d| d.micros)
}

/// The Italian day (`YYYY-MM-DD`) of a FHIR date or dateTime (`2026-11-29T23:30:00Z` is the 30th).
pub fn italian_day(text: &str) -> Option<String> {
    if !text.contains('T') {
        return Some(text.get(..10).unwrap_or(text).to_string());
    }
    let ts: Timestamp = truncate_fraction(text).parse().ok()?;
    Some(ts.to_zoned(rome()).date().to_string())
}

/// FHIR allows any number of fractional-second digits; the parser takes nine (nanoseconds).
fn truncate_fraction(text: &str) -> String {
    let Some(dot) = text.find('.') else {
        return text.to_string();
    };
    let digits = text[dot + 1..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    if digits <= 9 {
        return text.to_string();
    }
    format!("{}{}", &text[..dot + 10], &text[dot + 1 + digits..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rome() -> TimeZone {
        TimeZone::get("Europe/Rome").unwrap()
    }

    #[test]
    fn new_year_is_decided_in_rome_not_in_utc() {
        let d = reference_date("2025-12-31T23:30:00Z", "raccolta-campione", &rome()).unwrap();
        assert_eq!(d.year, 2026);
        let d = reference_date("2025-12-31T22:30:00Z", "raccolta-campione", &rome()).unwrap();
        assert_eq!(d.year, 2025);
        let d = reference_date("2026-01-01T00:10:00+01:00", "osservazione", &rome()).unwrap();
        assert_eq!(d.year, 2026);
        let d = reference_date(
            "2025-12-31T23:30:00.1234567891Z",
            "raccolta-campione",
            &rome(),
        );
        assert_eq!(d.unwrap().year, 2026);
    }

    #[test]
    fn italian_days_and_midnights() {
        assert_eq!(italian_day("2026-11-29T23:30:00Z").unwrap(), "2026-11-30");
        assert_eq!(italian_day("2026-11-29T22:30:00Z").unwrap(), "2026-11-29");
        assert_eq!(italian_day("2026-11-29").unwrap(), "2026-11-29");
        // a date alone starts at midnight in Rome: 23:00 UTC the day before in winter, 22:00 in summer
        assert_eq!(
            italian_instant("2026-01-15"),
            Some(
                jiff::Timestamp::from_second(1_768_431_600)
                    .unwrap()
                    .as_microsecond()
            )
        );
        assert_eq!(
            italian_instant("2026-07-15").unwrap()
                - italian_instant("2026-07-15T00:00:00Z").unwrap(),
            -2 * 3_600_000_000
        );
    }

    #[test]
    fn dates_without_time_keep_their_year() {
        assert_eq!(
            reference_date("2025-12-31", "referto", &rome())
                .unwrap()
                .year,
            2025
        );
        assert_eq!(
            reference_date("2025", "referto", &rome()).unwrap().year,
            2025
        );
        assert!(reference_date("soon", "referto", &rome()).is_none());
    }
}
