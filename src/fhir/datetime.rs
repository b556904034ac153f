//! FHIR date, dateTime, instant and Period values as half-open ranges of microseconds since the epoch,
//! and the R4 date-search prefixes. A partial date stands for its whole span ("2024-05" is all of May).
//! Hand-written: FHIR's precision-dependent ranges are not what general date crates model.
use serde_json::Value;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// `[start, end)` in µs since the Unix epoch; open ends are `i64::MIN` / `i64::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: i64,
    pub end: i64,
}

pub fn now_micros() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

/// `2026-11-26T11:25:17.123456Z`, the form used for meta.lastUpdated.
pub fn format_instant(micros: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(micros as i128 * 1000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// HTTP-date (RFC 7231) for Last-Modified.
pub fn format_http_date(micros: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(micros as i128 * 1000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.format(&f).unwrap_or_default()
}

fn micros(dt: OffsetDateTime) -> i64 {
    (dt.unix_timestamp_nanos() / 1000) as i64
}

/// Parse a FHIR date / dateTime / instant (or a search value of that shape) into its range.
/// Values without a time zone are read as UTC.
pub fn parse_range(s: &str) -> Option<Range> {
    let s = s.trim();
    let (date_part, time_part) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut it = date_part.split('-');
    let year: i32 = it.next().filter(|y| y.len() == 4)?.parse().ok()?;
    let month = it
        .next()
        .map(|m| (m.len() == 2).then(|| m.parse::<u8>().ok()).flatten());
    let day = it
        .next()
        .map(|d| (d.len() == 2).then(|| d.parse::<u8>().ok()).flatten());
    if it.next().is_some() {
        return None;
    }
    let utc = UtcOffset::UTC;
    let at = |d: Date| micros(PrimitiveDateTime::new(d, Time::MIDNIGHT).assume_offset(utc));
    match (month, day, time_part) {
        (None, None, None) => {
            let start = Date::from_calendar_date(year, Month::January, 1).ok()?;
            let end = Date::from_calendar_date(year + 1, Month::January, 1).ok()?;
            Some(Range {
                start: at(start),
                end: at(end),
            })
        }
        (Some(Some(m)), None, None) => {
            let month = Month::try_from(m).ok()?;
            let start = Date::from_calendar_date(year, month, 1).ok()?;
            let (ny, nm) = if m == 12 {
                (year + 1, Month::January)
            } else {
                (year, month.next())
            };
            let end = Date::from_calendar_date(ny, nm, 1).ok()?;
            Some(Range {
                start: at(start),
                end: at(end),
            })
        }
        (Some(Some(m)), Some(Some(d)), None) => {
            let date = Date::from_calendar_date(year, Month::try_from(m).ok()?, d).ok()?;
            Some(Range {
                start: at(date),
                end: at(date.next_day()?),
            })
        }
        (Some(Some(m)), Some(Some(d)), Some(t)) => {
            let date = Date::from_calendar_date(year, Month::try_from(m).ok()?, d).ok()?;
            parse_time(date, t)
        }
        _ => None,
    }
}

/// `hh:mm[:ss[.fff…]]` followed by `Z` or `±hh:mm`.
fn parse_time(date: Date, t: &str) -> Option<Range> {
    let tz_at = t.find(['Z', '+', '-']).unwrap_or(t.len());
    let (clock, tz) = t.split_at(tz_at);
    let offset = match tz {
        "" | "Z" => UtcOffset::UTC,
        _ => {
            // exactly `±hh:mm` (R4's pattern): `-00:-128` once overflowed `sign * i8`
            let sign: i8 = if tz.starts_with('-') { -1 } else { 1 };
            let (h, m) = tz[1..].split_once(':')?;
            let two_digits = |p: &str| -> Option<i8> {
                (p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| p.parse().ok())
                    .flatten()
            };
            UtcOffset::from_hms(sign * two_digits(h)?, sign * two_digits(m)?, 0).ok()?
        }
    };
    let mut parts = clock.split(':');
    let h: u8 = parts.next()?.parse().ok()?;
    let m: u8 = parts.next()?.parse().ok()?;
    let (sec, frac, span) = match parts.next() {
        None => (0u8, 0u32, 60_000_000i64),
        Some(s) => match s.split_once('.') {
            None => (s.parse().ok()?, 0, 1_000_000),
            Some((whole, f)) => {
                if f.is_empty() || !f.chars().all(|c| c.is_ascii_digit()) {
                    return None;
                }
                let digits = f.len().min(6);
                let value: u32 = f[..digits].parse().ok()?;
                let scale = 10u32.pow(6 - digits as u32);
                (whole.parse().ok()?, value * scale, scale as i64)
            }
        },
    };
    // R4 allows a leap second (`23:59:60`): it is read as the last instant of the minute
    let (sec, frac) = if sec == 60 {
        (59, 999_999)
    } else {
        (sec, frac)
    };
    let time = Time::from_hms_micro(h, m, sec, frac).ok()?;
    let start = micros(PrimitiveDateTime::new(date, time).assume_offset(offset));
    Some(Range {
        start,
        end: start + span,
    })
}

/// The range of an indexed element value: a date-like string or a Period.
pub fn value_range(v: &Value) -> Option<Range> {
    match v {
        Value::String(s) => parse_range(s),
        Value::Object(o) if o.contains_key("start") || o.contains_key("end") => {
            let start = o
                .get("start")
                .and_then(Value::as_str)
                .and_then(parse_range)
                .map_or(i64::MIN, |r| r.start);
            let end = o
                .get("end")
                .and_then(Value::as_str)
                .and_then(parse_range)
                .map_or(i64::MAX, |r| r.end);
            Some(Range { start, end })
        }
        _ => None,
    }
}

/// The R4 search prefixes for dates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

impl Prefix {
    /// Split a search value into its prefix and the rest (`ge2024-01-01`).
    pub fn split(value: &str) -> (Prefix, &str) {
        let table = [
            ("eq", Prefix::Eq),
            ("ne", Prefix::Ne),
            ("gt", Prefix::Gt),
            ("lt", Prefix::Lt),
            ("ge", Prefix::Ge),
            ("le", Prefix::Le),
            ("sa", Prefix::Sa),
            ("eb", Prefix::Eb),
            ("ap", Prefix::Ap),
        ];
        for (p, prefix) in table {
            if let Some(rest) = value.strip_prefix(p) {
                return (prefix, rest);
            }
        }
        (Prefix::Eq, value)
    }

    /// SQL condition over columns `lo`/`hi` (the stored range) with the parameter range bound as
    /// `{ps}` and `{pe}` placeholders, following R4 §3.1.1.5.1.
    pub fn sql(self, ps: &str, pe: &str) -> String {
        match self {
            Prefix::Eq => format!("(s.lo >= {ps} AND s.hi <= {pe})"),
            Prefix::Ne => format!("NOT (s.lo >= {ps} AND s.hi <= {pe})"),
            Prefix::Gt => format!("s.hi > {pe}"),
            Prefix::Lt => format!("s.lo < {ps}"),
            Prefix::Ge => format!("s.hi > {ps}"),
            Prefix::Le => format!("s.lo < {pe}"),
            Prefix::Sa => format!("s.lo >= {pe}"),
            Prefix::Eb => format!("s.hi <= {ps}"),
            Prefix::Ap => format!("(s.lo < {pe} AND s.hi > {ps})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_is_two_digits_each_and_never_overflows() {
        // found by the datetime fuzz target: `sign * i8` overflowed on `-128`
        assert!(parse_range("2024-01-01T10:00-00:-128").is_none());
        assert!(parse_range("2024-01-01T10:00+1:5").is_none());
        assert!(parse_range("2024-01-01T10:00:00-05:30").is_some());
    }

    #[test]
    fn partial_dates_cover_their_span() {
        let y = parse_range("2024").unwrap();
        let d = parse_range("2024-02-29").unwrap();
        assert!(y.start <= d.start && d.end <= y.end);
        assert_eq!(d.end - d.start, 86_400_000_000);
        assert!(parse_range("2023-02-29").is_none());
        assert!(parse_range("yesterday").is_none());
    }

    #[test]
    fn time_zones_are_applied() {
        let rome = parse_range("2024-12-31T23:30:00+01:00").unwrap();
        let utc = parse_range("2024-12-31T22:30:00Z").unwrap();
        assert_eq!(rome, utc);
        let frac = parse_range("2024-12-31T22:30:00.250Z").unwrap();
        assert_eq!(frac.start - utc.start, 250_000);
        assert_eq!(frac.end - frac.start, 1_000);
    }

    #[test]
    fn prefixes_split() {
        assert_eq!(Prefix::split("ge2024"), (Prefix::Ge, "2024"));
        assert_eq!(Prefix::split("2024"), (Prefix::Eq, "2024"));
    }
}
