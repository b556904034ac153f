//! `sentinella validate FILES…`: the checks `$validate` runs (`api::validate::resource_issues`,
//! which for a Bundle is `api::bundle::validation_issues`), offline, on JSON and XML resources and
//! Bundles and on NDJSON files, reported per file (and line) in words or as OperationOutcomes.
use std::io::BufReader;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::Exit;
use super::input::{self, Format, Lines};
use crate::error::{ApiError, Issue, Severity};

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = concat!(
    "Examples:
  sentinella validate patient.json antibiogram.xml
  sentinella validate --json export/Observation.ndjson > outcomes.ndjson
  sentinella validate lab-bundles/*.json && echo all valid

The checks are the server's own (the same as POST /fhir/{type}/$validate and
POST /fhir/Bundle/$validate): JSON schema, StructureDefinitions and invariants, the
Sentinella profiles and bindings, Italian identifiers, ICD-9-CM. Nothing is written and no
server or database is needed. Warnings alone do not make a file invalid.

",
    exit_codes!()
))]
pub struct Args {
    /// Files to check: JSON or XML resources and Bundles (transaction, batch or any other type),
    /// or NDJSON (`.ndjson`, `.jsonl`: one resource a line, as `$export` writes them).
    #[arg(required = true, value_name = "FILES")]
    pub files: Vec<PathBuf>,
    /// Print one JSON object per resource checked: {"file", "line" (NDJSON), "resourceType",
    /// "outcome" (the OperationOutcome `$validate` answers)}.
    #[arg(long)]
    pub json: bool,
    /// No progress bar; only what is found.
    #[arg(long, short)]
    pub quiet: bool,
    /// Largest document or NDJSON line, in bytes (the server's body limit).
    #[arg(long, env = "SENTINELLA_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_body_bytes: usize,
}

/// The issues of one document, exactly as `POST /fhir/{its type}/$validate` reports them: the
/// issues of a 200 answer, or those of the 4xx answer when it cannot be validated (not JSON, no
/// resourceType, a type the server does not serve).
pub fn document_issues(parsed: Result<Value, ApiError>) -> (Option<String>, Vec<Issue>) {
    let value = match parsed {
        Ok(v) => v,
        Err(e) => return (None, e.issues()),
    };
    let rt = match crate::fhir::resource::resource_type(&value) {
        Ok(rt) => rt.to_string(),
        Err(e) => return (None, e.issues()),
    };
    if let Err(e) = crate::api::validate::validatable(&rt) {
        return (Some(rt), e.issues());
    }
    let issues = crate::api::validate::resource_issues(&rt, &value, None);
    (Some(rt), issues)
}

/// The OperationOutcome `$validate` answers for these issues.
pub fn outcome(issues: &[Issue]) -> Value {
    crate::api::validate::outcome(issues)
}

fn is_error(i: &Issue) -> bool {
    matches!(i.severity, Severity::Error | Severity::Fatal)
}

/// What was found in one document (a file, or a line of an NDJSON file).
struct Report<'a> {
    file: &'a Path,
    line: Option<u64>,
    resource_type: Option<String>,
    id: Option<String>,
    issues: Vec<Issue>,
}

impl Report<'_> {
    fn invalid(&self) -> bool {
        self.issues.iter().any(is_error)
    }

    fn json(&self) -> Value {
        let mut v = json!({"file": self.file.display().to_string()});
        if let Some(l) = self.line {
            v["line"] = json!(l);
        }
        if let Some(rt) = &self.resource_type {
            v["resourceType"] = json!(rt);
        }
        if let Some(id) = &self.id {
            v["id"] = json!(id);
        }
        v["outcome"] = outcome(&self.issues);
        v
    }

    fn text(&self) -> String {
        let mut head = self.file.display().to_string();
        if let Some(l) = self.line {
            head.push_str(&format!(":{l}"));
        }
        let what = match (&self.resource_type, &self.id) {
            (Some(rt), Some(id)) => format!("{rt}/{id}"),
            (Some(rt), None) => rt.clone(),
            _ => "(not a resource)".into(),
        };
        let errors = self.issues.iter().filter(|i| is_error(i)).count();
        let warnings = self
            .issues
            .iter()
            .filter(|i| i.severity == Severity::Warning)
            .count();
        let verdict = if errors > 0 {
            format!(
                "INVALID ({}, {})",
                counted(errors, "error"),
                counted(warnings, "warning")
            )
        } else if warnings > 0 {
            format!("valid ({})", counted(warnings, "warning"))
        } else {
            "valid".into()
        };
        let mut out = format!("{head}: {what}: {verdict}");
        for i in &self.issues {
            out.push_str(&format!(
                "\n  {:<11} [{}] {}{}",
                i.severity.as_str(),
                i.code,
                i.expression
                    .as_deref()
                    .map(|e| format!("{e}: "))
                    .unwrap_or_default(),
                i.diagnostics
            ));
        }
        out
    }
}

fn report_of<'a>(file: &'a Path, line: Option<u64>, parsed: Result<Value, ApiError>) -> Report<'a> {
    let id = parsed
        .as_ref()
        .ok()
        .and_then(|v| v["id"].as_str())
        .map(String::from);
    let (resource_type, issues) = document_issues(parsed);
    Report {
        file,
        line,
        resource_type,
        id,
        issues,
    }
}

/// Counts over all files, for the exit code and the last line.
#[derive(Default)]
struct Tally {
    checked: u64,
    invalid: u64,
    unreadable: u64,
}

pub fn run(args: &Args) -> Exit {
    let total: u64 = args
        .files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = super::progress::bytes(total, args.quiet || args.json);
    bar.set_prefix("validate");
    let mut tally = Tally::default();
    let emit = |r: Report<'_>, tally: &mut Tally| {
        tally.checked += 1;
        let invalid = r.invalid();
        if invalid {
            tally.invalid += 1;
        }
        if args.json {
            bar.suspend(|| println!("{}", r.json()));
        } else if r.line.is_none() || !r.issues.is_empty() {
            // NDJSON: only the lines with something to say
            bar.suspend(|| println!("{}", r.text()));
        }
    };
    for file in &args.files {
        let format = match input::detect(file) {
            Ok(f) => f,
            Err(e) => {
                tally.unreadable += 1;
                bar.suspend(|| eprintln!("{}: cannot read: {e}", file.display()));
                continue;
            }
        };
        if format == Format::Ndjson {
            let before = (tally.checked, tally.invalid);
            let base = bar.position();
            let done = std::fs::File::open(file).and_then(|f| {
                let mut lines = Lines::new(BufReader::new(f), args.max_body_bytes, 0, 0);
                while let Some(line) = lines.next_line()? {
                    let parsed = match &line.text {
                        Some(t) if t.iter().all(u8::is_ascii_whitespace) => continue,
                        Some(t) => crate::fhir::resource::parse_json(t),
                        None => Err(ApiError::PayloadTooLarge(args.max_body_bytes)),
                    };
                    emit(report_of(file, Some(line.number), parsed), &mut tally);
                    bar.set_position(base + line.end);
                }
                Ok(())
            });
            if let Err(e) = done {
                tally.unreadable += 1;
                bar.suspend(|| eprintln!("{}: cannot read: {e}", file.display()));
            } else if !args.json {
                let (checked, invalid) = (tally.checked - before.0, tally.invalid - before.1);
                bar.suspend(|| {
                    println!(
                        "{}: {checked} resources, {} valid, {invalid} invalid",
                        file.display(),
                        checked - invalid
                    )
                });
            }
            continue;
        }
        let parsed = input::read_document(file, args.max_body_bytes)
            .map_err(|why| ApiError::invalid(vec![Issue::error("too-costly", why, None)]))
            .and_then(|bytes| input::parse_document(&bytes, format));
        emit(report_of(file, None, parsed), &mut tally);
        bar.inc(std::fs::metadata(file).map(|m| m.len()).unwrap_or(0));
    }
    bar.finish_and_clear();
    if !args.json {
        println!(
            "{} checked: {} valid, {} invalid{}",
            tally.checked,
            tally.checked - tally.invalid,
            tally.invalid,
            if tally.unreadable > 0 {
                format!(", {} files unreadable", tally.unreadable)
            } else {
                String::new()
            }
        );
    }
    if tally.invalid > 0 || tally.unreadable > 0 {
        Exit::Rejected
    } else {
        Exit::Ok
    }
}

/// `1 error`, `3 errors`.
fn counted(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}
