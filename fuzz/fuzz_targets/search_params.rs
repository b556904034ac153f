//! The search request parser: `SearchRequest::from_query` (the query string), `parse_search` (the
//! parameters into a store query, strict and `Prefer: handling=lenient`) and the SQL the store runs.
//!
//! Input: `Type?query` (a served type, else the whole input is the query of an Observation search).
//! Asserts: no panic; a refused search is a 400 OperationOutcome whose issues name one of the
//! request's parameters (or none, for a search `too-costly` as a whole); lenient handling refuses
//! nothing strict handling accepts, and accepts the same query without warnings when strict does; `_count`/`_offset` stay within their bounds; the
//! compiled SQL binds every value (no quote but the fixed `ESCAPE '\'`, placeholders all among the
//! binds `$1..$n`); the paging-link encoding reads back as the same parameters.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use sentinella::api::search::{MAX_OFFSET, ParsedSearch, SearchRequest, parse_search};
use sentinella::error::Severity;
use sentinella::store::query::Sql;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return; // a URI's query is text: axum hands the handler a &str
    };
    // percent-decoding could spell it too: test what the parser will see
    let decoded: String = SearchRequest::from_query(input)
        .pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}&"))
        .collect();
    let (rt, query) = match input.split_once('?') {
        Some((t, q)) if sentinella::fhir::is_served(t) => (t, q),
        _ => ("Observation", input),
    };
    check(rt, query);
});

fn check(rt: &str, query: &str) {
    let req = SearchRequest::from_query(query);
    let _ = req.canonical();
    // the paging links re-encode the criteria: they must mean the same search
    let encoded = SearchRequest::encode(&req.pairs);
    assert_eq!(
        SearchRequest::from_query(&encoded).pairs,
        req.pairs,
        "the encoded parameters {encoded:?} read back different"
    );
    let keys: Vec<&str> = req.pairs.iter().map(|(k, _)| k.as_str()).collect();

    let strict = parse_search(rt, &req, false);
    let lenient = parse_search(rt, &req, true);
    match (&strict, &lenient) {
        (Err(e), _) => {
            common::assert_rejected(e, "parse_search");
            assert_eq!(e.status().as_u16(), 400, "a refused search is a 400");
            for issue in e.issues() {
                // a parameter's fault names it; a search too costly as a whole names none
                match issue.expression.as_deref() {
                    Some(expr) => assert!(
                        keys.contains(&expr),
                        "the issue names {expr}, which is none of the parameters {keys:?}"
                    ),
                    None => assert_eq!(
                        issue.code, "too-costly",
                        "an issue naming no parameter: {issue:?}"
                    ),
                }
            }
        }
        (Ok(_), Err(e)) => panic!("lenient handling refused what strict handling accepted: {e:?}"),
        (Ok(s), Ok(l)) => {
            assert!(l.warnings.is_empty(), "lenient warned about a valid search");
            assert_eq!(s.query.conditions, l.query.conditions);
            assert_eq!(
                (s.query.count, s.query.offset),
                (l.query.count, l.query.offset)
            );
        }
    }
    if let Ok(l) = &lenient {
        for w in &l.warnings {
            assert_eq!(
                w.severity,
                Severity::Warning,
                "a lenient warning is a warning"
            );
        }
    }
    for parsed in [strict.ok(), lenient.ok()].into_iter().flatten() {
        check_query(rt, &parsed);
    }
}

fn check_query(rt: &str, parsed: &ParsedSearch) {
    let q = &parsed.query;
    assert_eq!(q.resource_type, rt);
    assert!(
        (0..=1000).contains(&q.count),
        "_count {} out of bounds",
        q.count
    );
    assert!(
        (0..=MAX_OFFSET).contains(&q.offset),
        "_offset {} out of bounds",
        q.offset
    );
    for inc in parsed.includes.iter() {
        assert_eq!(inc.source_type, rt, "an _include from another type");
    }
    for sql in [q.page_sql(), q.count_sql(), q.ids_sql()] {
        check_sql(&sql);
    }
    // subscriptions judge the same conditions in memory
    for c in &q.conditions {
        let _ = c.matches("fuzz", &[]);
    }
}

/// Only placeholders carry values: the text is the fixed template.
fn check_sql(sql: &Sql) {
    let text = &sql.text;
    let quotes = text.matches('\'').count();
    let escapes = text.matches("ESCAPE '\\'").count();
    assert_eq!(quotes, 2 * escapes, "a quote outside ESCAPE '\\' in {text}");
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let digits: String = text[i + 1..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let n: usize = digits
                .parse()
                .unwrap_or_else(|_| panic!("a '$' that is no placeholder in {text}"));
            assert!(
                (1..=sql.binds.len()).contains(&n),
                "placeholder ${n} with {} binds in {text}",
                sql.binds.len()
            );
            i += 1 + digits.len();
        } else {
            i += 1;
        }
    }
}
