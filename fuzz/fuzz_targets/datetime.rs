//! FHIR date / dateTime / instant reading (`sentinella::fhir::datetime`): search values with their
//! prefixes, indexed element values and Periods.
//!
//! Asserts: no panic; a range is never empty (`start < end`); a plain `YYYY`, `YYYY-MM` or
//! `YYYY-MM-DD` is accepted exactly when it is a real calendar date (checked against an
//! independent leap-year rule: `2024-02-30` and `2023-02-29` are refused) and spans its whole
//! year, month or day; a time-of-day value spans a minute, a second or its fraction's precision;
//! an instant the server writes (`format_instant`) reads back as the same microsecond;
//! `value_range` agrees with `parse_range` for strings and Periods.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use sentinella::fhir::datetime::{
    Prefix, Range, format_http_date, format_instant, parse_range, value_range,
};
use serde_json::json;

const DAY: i64 = 86_400_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    check(s);
    let (prefix, rest) = Prefix::split(s);
    assert!(s.ends_with(rest), "the prefix split lost text");
    assert!(!prefix.sql("$1", "$2").is_empty());
    check(rest);
});

fn check(s: &str) {
    let range = parse_range(s);
    assert_eq!(value_range(&json!(s)), range, "value_range of a string");
    let period = value_range(&json!({"start": s, "end": s})).expect("a Period has a range");
    match range {
        Some(r) => assert_eq!(period, r),
        None => assert_eq!(
            period,
            Range {
                start: i64::MIN,
                end: i64::MAX
            }
        ),
    }
    let t = s.trim();
    if let Some(expected) = plain_date(t) {
        assert_eq!(
            range.map(|r| r.end - r.start),
            expected,
            "{t:?} read as {range:?}"
        );
    }
    let Some(r) = range else { return };
    assert!(r.start < r.end, "an empty range for {s:?}: {r:?}");
    if let Some((_, time)) = t.split_once('T') {
        let clock = time.split(['Z', '+', '-']).next().unwrap_or_default();
        let span = r.end - r.start;
        // hh:mm[:ss[.fff]], the seconds being the third `:` part (parse_time ignores any more)
        let expected = match clock.split(':').nth(2).map(|s| s.split_once('.')) {
            None => 60_000_000,
            Some(None) => 1_000_000,
            Some(Some((_, frac))) => 10i64.pow(6u32.saturating_sub(frac.len() as u32)),
        };
        assert_eq!(span, expected, "{s:?} spans {span} µs");
    }
    // what the server writes as meta.lastUpdated reads back as the same instant
    let written = format_instant(r.start);
    if !written.is_empty() && (r.start == 0 || written != format_instant(0)) {
        assert_eq!(
            parse_range(&written).map(|w| w.start),
            Some(r.start),
            "{written} (written for {s:?}) does not read back"
        );
    }
    let _ = format_http_date(r.start);
}

/// The span of a plain `YYYY`, `YYYY-MM` or `YYYY-MM-DD` of ASCII digits, `None` inside when it is
/// no calendar date; `None` when `t` has another shape.
fn plain_date(t: &str) -> Option<Option<i64>> {
    let parts: Vec<&str> = t.split('-').collect();
    let digits = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit());
    let ok = match parts.as_slice() {
        [y] => digits(y, 4),
        [y, m] => digits(y, 4) && digits(m, 2),
        [y, m, d] => digits(y, 4) && digits(m, 2) && digits(d, 2),
        _ => false,
    };
    if !ok {
        return None;
    }
    let year: i32 = parts[0].parse().ok()?;
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in = |m: u32| match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        _ => 28,
    };
    // the last representable day is 9999-12-31: a range needs the day after it
    let ends_on_last_day = match parts.as_slice() {
        [_] => true,
        [_, m] => *m == "12",
        [_, m, d] => *m == "12" && *d == "31",
        _ => false,
    };
    if year == 9999 && ends_on_last_day {
        return Some(None);
    }
    Some(match parts.len() {
        1 => Some(if leap { 366 } else { 365 } * DAY),
        2 => {
            let m: u32 = parts[1].parse().ok()?;
            (1..=12).contains(&m).then(|| days_in(m) * DAY)
        }
        _ => {
            let m: u32 = parts[1].parse().ok()?;
            let d: i64 = parts[2].parse().ok()?;
            ((1..=12).contains(&m) && (1..=days_in(m)).contains(&d)).then_some(DAY)
        }
    })
}
