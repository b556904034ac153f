//! `sentinella import FILES…`: FHIR NDJSON (as `$export` writes it) and Bundles into a database
//! through the server's write path (see `writer`), resumable (see `checkpoint`), with a summary
//! of what was rejected and why.
//!
//! Idempotence, so that a batch replayed after a crash (killed between the database's commit and
//! the checkpoint) creates nothing twice: every resource is written with `PUT Type/id`. A
//! resource without an id gets one derived from its content (the first 40 hex digits of the
//! SHA-256 of its line, or of its JSON inside a Bundle): the same content always lands on the
//! same resource. A transaction or batch Bundle's `POST` entries without `ifNoneExist` become
//! `PUT`s the same way (their `fullUrl` keeps resolving the Bundle's `urn:uuid:` references).
pub mod checkpoint;
pub mod writer;

use std::io::{BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::input::{self, Format, Lines};
use super::{Exit, fail, redact};
use crate::error::Issue;
use checkpoint::{Checkpoint, StatePaths};
use writer::{Item, Reject, Stop, Writer};

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = concat!(
    "Examples:
  sentinella import --database sqlite://sentinella.db export/Patient.ndjson export/Observation.ndjson
  sentinella import --database postgres://sentinella@db/sentinella --config access.toml \\
      --token \"$IMPORT_TOKEN\" lab-2025/*.json
  # interrupted (Ctrl-C, kill -9, a crash)? run the same command again: it resumes

Writes go through the server's own write path: the same validation, access rules, surveillance
rules (cases, notifications, subscription events) and audit trail as HTTP writes. Resources are
written in transactions of --batch resources; when one is refused, its resources are retried one
by one so that only the bad ones are rejected. Every resource is written as PUT Type/id; one
without an id gets an id derived from its content, so a resumed import never duplicates it.

Who writes: without --config the import acts as the development administrator (whoever can run
it can open the database anyway). With --config (the server's access file) it acts as the client
whose --token it is, under that client's rights, and the audit trail names that client.

Resuming: after each batch the database has committed, FILE.import-progress.json (next to the
input, or in --state-dir) records how far the import got; rejected resources are listed in
FILE.import-rejects.ndjson. Run the same command again to resume; a file already imported is
skipped (--restart imports it from the start: resources already written get a new version of the
same content, never a duplicate). A batch replayed after a crash is written again the same way.

SQLite has one writing process: stop the server before importing into its SQLite file (a server
writing at the same time makes the import wait, then stop with exit code 3; it resumes when run
again). On PostgreSQL the import can run while the server runs.

Subscription notifications caused by imported data are queued in the database's outbox, which is
durable: the server's delivery worker sends them; the import exits without waiting for them.

",
    exit_codes!()
))]
pub struct Args {
    /// NDJSON files (`.ndjson`, `.jsonl`: one resource a line), or JSON/XML files each holding a
    /// resource or a Bundle (transaction and batch Bundles are written as such; the resources of
    /// any other Bundle are written one by one).
    #[arg(required = true, value_name = "FILES")]
    pub files: Vec<PathBuf>,
    /// Database: sqlite://PATH or postgres://USER@HOST/DB (migrated first if needed).
    #[arg(
        long,
        env = "SENTINELLA_DATABASE",
        default_value = "sqlite://sentinella.db"
    )]
    pub database: String,
    /// The server's access file; then --token says which client the import acts as.
    #[arg(long = "config", env = "SENTINELLA_CONFIG")]
    pub access_file: Option<String>,
    /// A static bearer token of the access file's client the import acts as.
    #[arg(long, env = "SENTINELLA_IMPORT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Resources per transaction.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub batch: u16,
    /// Import from the start, ignoring (and replacing) earlier progress files.
    #[arg(long)]
    pub restart: bool,
    /// Folder for the progress and rejects files (default: next to each input).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Largest NDJSON line or JSON/XML document, in bytes (the server's body limit).
    #[arg(long, env = "SENTINELLA_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Public base URL of the FHIR endpoint, for the notifications imported data causes (as the
    /// server's --base-url).
    #[arg(long, env = "SENTINELLA_BASE_URL")]
    pub base_url: Option<String>,
    /// EUCAST breakpoint table of the surveillance rules (as the server's --eucast-version).
    #[arg(long, env = "SENTINELLA_EUCAST_VERSION")]
    pub eucast_version: Option<String>,
    /// NATS server, when imported Subscriptions use the JetStream channel (as the server's).
    #[arg(long, env = "SENTINELLA_NATS_URL")]
    pub nats_url: Option<String>,
    /// No progress bar; only the summary.
    #[arg(long, short)]
    pub quiet: bool,
    /// Stop (as if interrupted) once this many lines of an input are done: for tests and drills.
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
}

/// How one file went.
struct FileResult {
    input: PathBuf,
    paths: StatePaths,
    checkpoint: Checkpoint,
    resumed_at: Option<u64>,
    skipped: bool,
    /// Resources written by this run.
    written_now: u64,
}

pub async fn run(args: &Args) -> Exit {
    if args.access_file.is_some() && args.token.is_none() {
        return fail(
            Exit::Usage,
            "with --config, give --token: a token of the access file's client the import acts as",
        );
    }
    if let Some(path) = &args.access_file
        && let Err(e) = crate::auth::Access::load(path)
    {
        return fail(Exit::Usage, format!("invalid access file: {e}"));
    }
    for f in &args.files {
        if !f.is_file() {
            return fail(Exit::Usage, format!("{}: no such file", f.display()));
        }
    }
    let mut config = crate::config::Config::with_database(args.database.clone());
    config.access_file = args.access_file.clone();
    config.base_url = args.base_url.clone();
    config.eucast_version = args.eucast_version.clone();
    config.nats_url = args.nats_url.clone();
    // our own Bundles wrap lines of up to the body limit
    config.max_body_bytes = args.max_body_bytes.saturating_mul(2).max(64 * 1024 * 1024);
    let app = match crate::server::build_app(config).await {
        Ok(app) => app,
        Err(e) => {
            return fail(
                Exit::Database,
                format!("cannot open {}: {e:#}", redact(&args.database)),
            );
        }
    };
    if !args.quiet {
        eprintln!(
            "importing into {} as {}",
            redact(&args.database),
            if args.access_file.is_some() {
                "the access file's client of --token"
            } else {
                "the development administrator (no --config)"
            }
        );
    }
    let writer = Writer {
        app,
        token: args.token.clone(),
    };
    let started = Instant::now();
    let mut results = Vec::new();
    let mut outcome = Exit::Ok;
    for file in &args.files {
        match import_file(args, &writer, file).await {
            Ok((r, stopped)) => {
                results.push(r);
                if stopped {
                    break;
                }
            }
            Err(Failure::Usage(why)) => {
                outcome = fail(Exit::Usage, format!("{}: {why}", file.display()));
                break;
            }
            Err(Failure::Stop(Stop::Refused(why))) => {
                outcome = fail(Exit::Usage, why);
                break;
            }
            Err(Failure::Stop(Stop::Database(why))) => {
                let hint = if args.database.starts_with("sqlite:") {
                    " (SQLite has one writing process: if a server runs on this file, stop it)"
                } else {
                    ""
                };
                outcome = fail(
                    Exit::Database,
                    format!(
                        "{}: the database did not take the writes: {why}{hint}; run the same \
                         command again to resume",
                        file.display()
                    ),
                );
                break;
            }
        }
    }
    let rejected = summary(&results, started);
    match outcome {
        Exit::Ok if rejected > 0 => Exit::Rejected,
        other => other,
    }
}

enum Failure {
    Usage(String),
    Stop(Stop),
}

impl From<Stop> for Failure {
    fn from(s: Stop) -> Self {
        Failure::Stop(s)
    }
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Failure {
    let msg = format!("cannot {what} {}", path.display());
    move |e| Failure::Usage(format!("{msg}: {e}"))
}

/// Import one file; `true` when `--stop-after` stopped it.
async fn import_file(
    args: &Args,
    writer: &Writer,
    file: &Path,
) -> Result<(FileResult, bool), Failure> {
    let paths = StatePaths::for_input(file, args.state_dir.as_deref());
    let database = redact(&args.database);
    let head = checkpoint::head_sha256(file).map_err(io("read", file))?;
    let size = std::fs::metadata(file).map_err(io("read", file))?.len();
    let earlier = if args.restart {
        None
    } else {
        Checkpoint::load(&paths.progress).map_err(Failure::Usage)?
    };
    if let Some(cp) = &earlier {
        if cp.database != database {
            return Err(Failure::Usage(format!(
                "{} records an import into {}, not {database}: give --restart to import into this one",
                paths.progress.display(),
                cp.database
            )));
        }
        if cp.head_sha256 != head || cp.offset > size {
            return Err(Failure::Usage(format!(
                "the file changed since {} was written: give --restart to import it from the start",
                paths.progress.display()
            )));
        }
    }
    let mut result = FileResult {
        input: file.to_path_buf(),
        resumed_at: earlier.as_ref().filter(|c| c.offset > 0).map(|c| c.line),
        skipped: earlier.as_ref().is_some_and(|c| c.done),
        checkpoint: earlier.unwrap_or_else(|| Checkpoint::fresh(file, &database, head)),
        paths,
        written_now: 0,
    };
    if result.skipped {
        return Ok((result, false));
    }
    let mut rejects =
        checkpoint::open_rejects(&result.paths.rejects, result.checkpoint.rejects_len)
            .map_err(io("write", &result.paths.rejects))?;
    // can the progress be recorded at all? (a read-only folder: say so before writing anything)
    result
        .checkpoint
        .save(&result.paths.progress)
        .map_err(io("write", &result.paths.progress))?;
    let format = input::detect(file).map_err(io("read", file))?;
    let stopped = if format == Format::Ndjson {
        import_ndjson(args, writer, file, size, &mut result, &mut rejects).await?
    } else {
        import_document(args, writer, file, format, &mut result, &mut rejects).await?;
        false
    };
    Ok((result, stopped))
}

/// Record a batch as done: its rejects first (synced), then the checkpoint that counts them.
fn commit_progress(
    result: &mut FileResult,
    rejects_file: &mut std::fs::File,
    rejects: &[Reject],
) -> Result<(), Failure> {
    let path = result.paths.rejects.clone();
    for r in rejects {
        writeln!(rejects_file, "{}", r.json()).map_err(io("write", &path))?;
    }
    rejects_file.sync_data().map_err(io("write", &path))?;
    result.checkpoint.rejects_len = rejects_file.metadata().map_err(io("write", &path))?.len();
    result.checkpoint.rejected += rejects.len() as u64;
    result
        .checkpoint
        .save(&result.paths.progress)
        .map_err(io("write", &result.paths.progress))
}

/// The id a resource is written under: its own, or one derived from its content; else why not.
fn id_of(resource: &Value, content: &[u8]) -> Result<String, String> {
    match resource.get("id") {
        None => Ok(checkpoint::hex(&Sha256::digest(content))[..40].to_string()),
        Some(Value::String(id)) if crate::fhir::resource::is_valid_id(id) => Ok(id.clone()),
        Some(other) => Err(format!(
            "{other} is not a valid id (1 to 64 of A-Z a-z 0-9 - .)"
        )),
    }
}

/// A resource (an NDJSON line, a Bundle entry's resource) ready to write, or why not.
fn item_of(
    line: Option<u64>,
    entry: Option<usize>,
    resource: Value,
    content: &[u8],
) -> Result<Item, Reject> {
    let rt = match crate::fhir::resource::resource_type(&resource) {
        Ok(rt) => rt.to_string(),
        Err(e) => return Err(Reject::local(line, None, &e.issues())),
    };
    if rt == "Bundle" {
        return Err(Reject::local(
            line,
            Some("Bundle".into()),
            &[Issue::error(
                "not-supported",
                "a Bundle among resources is not imported: give each Bundle a file of its own",
                Some("Bundle".into()),
            )],
        ));
    }
    let id = id_of(&resource, content).map_err(|why| {
        let issue = Issue::error("value", why, Some(format!("{rt}.id")));
        Reject::local(line, Some(rt.clone()), &[issue])
    })?;
    Ok(Item {
        line,
        entry,
        resource_type: rt,
        id,
        resource,
    })
}

async fn import_ndjson(
    args: &Args,
    writer: &Writer,
    file: &Path,
    size: u64,
    result: &mut FileResult,
    rejects_file: &mut std::fs::File,
) -> Result<bool, Failure> {
    let mut f = std::fs::File::open(file).map_err(io("read", file))?;
    f.seek(SeekFrom::Start(result.checkpoint.offset))
        .map_err(io("read", file))?;
    let mut lines = Lines::new(
        BufReader::with_capacity(1 << 20, f),
        args.max_body_bytes,
        result.checkpoint.offset,
        result.checkpoint.line,
    );
    let bar = super::progress::bytes(size, args.quiet);
    bar.set_prefix(
        file.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    bar.set_position(result.checkpoint.offset);
    bar.reset_eta();
    let started = Instant::now();
    // a batch's lines stay below the body limit together
    let budget = args.max_body_bytes;
    loop {
        let mut items = Vec::new();
        let mut rejects = Vec::new();
        let mut bytes = 0usize;
        let mut end = None;
        while items.len() < args.batch as usize && bytes < budget {
            let Some(line) = lines.next_line().map_err(io("read", file))? else {
                break;
            };
            end = Some((line.end, line.number));
            let Some(text) = line.text else {
                rejects.push(Reject::local(
                    Some(line.number),
                    None,
                    &[Issue::error(
                        "too-costly",
                        format!(
                            "the line is longer than {} bytes (--max-body-bytes)",
                            args.max_body_bytes
                        ),
                        None,
                    )],
                ));
                continue;
            };
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            bytes += text.len();
            let parsed = match crate::fhir::resource::parse_json(&text) {
                Ok(v) => v,
                Err(e) => {
                    rejects.push(Reject::local(Some(line.number), None, &e.issues()));
                    continue;
                }
            };
            match item_of(Some(line.number), None, parsed, &text) {
                Ok(item) => items.push(item),
                Err(r) => rejects.push(r),
            }
        }
        let Some((offset, number)) = end else {
            break;
        };
        let n = items.len() as u64;
        let mut refused = writer.write(&items).await?;
        let written = n - refused.len() as u64;
        refused.extend(rejects);
        refused.sort_by_key(|r| r.line);
        result.checkpoint.offset = offset;
        result.checkpoint.line = number;
        result.checkpoint.imported += written;
        result.written_now += written;
        commit_progress(result, rejects_file, &refused)?;
        bar.set_position(offset);
        let secs = started.elapsed().as_secs_f64().max(0.001);
        bar.set_message(format!(
            "{} lines, {} written ({:.0}/s), {} rejected",
            number,
            result.checkpoint.imported,
            result.written_now as f64 / secs,
            result.checkpoint.rejected
        ));
        if args.stop_after.is_some_and(|s| result.checkpoint.line >= s) {
            bar.finish_and_clear();
            return Ok(true);
        }
    }
    result.checkpoint.done = true;
    result
        .checkpoint
        .save(&result.paths.progress)
        .map_err(io("write", &result.paths.progress))?;
    bar.finish_and_clear();
    Ok(false)
}

/// A `POST` entry of a transaction or batch Bundle, made a `PUT` under a content-derived id.
fn idempotent_entry(entry: &mut Value) {
    let req = &entry["request"];
    if req["method"] != "POST" || req.get("ifNoneExist").is_some() {
        return;
    }
    let Some(rt) = entry["resource"]["resourceType"].as_str().map(String::from) else {
        return;
    };
    if entry["resource"].get("id").is_some() {
        // the server ignores a POSTed id; so does the import (the content decides)
        if let Some(o) = entry["resource"].as_object_mut() {
            o.shift_remove("id");
        }
    }
    let content = serde_json::to_vec(&entry["resource"]).unwrap_or_default();
    let id = checkpoint::hex(&Sha256::digest(&content))[..40].to_string();
    entry["resource"]["id"] = Value::String(id.clone());
    entry["request"] = serde_json::json!({"method": "PUT", "url": format!("{rt}/{id}")});
}

async fn import_document(
    args: &Args,
    writer: &Writer,
    file: &Path,
    format: Format,
    result: &mut FileResult,
    rejects_file: &mut std::fs::File,
) -> Result<(), Failure> {
    let parsed = input::read_document(file, args.max_body_bytes)
        .map_err(|why| crate::error::ApiError::invalid(vec![Issue::error("too-costly", why, None)]))
        .and_then(|bytes| input::parse_document(&bytes, format).map(|v| (v, bytes)));
    let mut rejects = Vec::new();
    match parsed {
        Err(e) => rejects.push(Reject::local(None, None, &e.issues())),
        Ok((mut doc, bytes)) => {
            let kind = doc["type"].as_str().unwrap_or_default().to_string();
            if doc["resourceType"] == "Bundle" && (kind == "transaction" || kind == "batch") {
                let mut entries = 0u64;
                for e in doc["entry"].as_array_mut().into_iter().flatten() {
                    idempotent_entry(e);
                    if matches!(e["request"]["method"].as_str(), Some("PUT" | "POST")) {
                        entries += 1;
                    }
                }
                let (status, body) = writer.post(&doc).await?;
                if !status.is_success() {
                    rejects.push(writer::bundle_reject(status, &body));
                } else {
                    let mut written = entries;
                    for (i, answer) in body["entry"].as_array().into_iter().flatten().enumerate() {
                        let code = answer["response"]["status"].as_str().unwrap_or("");
                        if !code.starts_with('2') {
                            written = written.saturating_sub(1);
                            rejects.push(Reject {
                                line: None,
                                entry: Some(i),
                                what: doc["entry"][i]["request"]["url"].as_str().map(String::from),
                                status: code.to_string(),
                                issues: answer["response"]["outcome"]["issue"]
                                    .as_array()
                                    .cloned()
                                    .unwrap_or_default(),
                            });
                        }
                    }
                    result.checkpoint.imported += written;
                    result.written_now += written;
                }
            } else if doc["resourceType"] == "Bundle" {
                // a collection, searchset, document…: its resources, one by one
                let mut items = Vec::new();
                for (i, e) in doc["entry"].as_array().into_iter().flatten().enumerate() {
                    let Some(r) = e.get("resource") else { continue };
                    let content = serde_json::to_vec(r).unwrap_or_default();
                    match item_of(None, Some(i), r.clone(), &content) {
                        Ok(item) => items.push(item),
                        Err(mut rej) => {
                            rej.entry = Some(i);
                            rejects.push(rej);
                        }
                    }
                }
                for chunk in items.chunks(args.batch as usize) {
                    let refused = writer.write(chunk).await?;
                    let written = (chunk.len() - refused.len()) as u64;
                    result.checkpoint.imported += written;
                    result.written_now += written;
                    rejects.extend(refused);
                }
            } else {
                match item_of(None, None, doc, &bytes) {
                    Err(r) => rejects.push(r),
                    Ok(item) => {
                        let refused = writer.write(std::slice::from_ref(&item)).await?;
                        let written = 1 - refused.len() as u64;
                        result.checkpoint.imported += written;
                        result.written_now += written;
                        rejects.extend(refused);
                    }
                }
            }
        }
    }
    result.checkpoint.done = true;
    result.checkpoint.offset = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    commit_progress(result, rejects_file, &rejects)
}

/// The reason a reject is counted under: its first issue.
fn reason(reject: &Value) -> String {
    let i = &reject["issues"][0];
    let mut d = i["diagnostics"]
        .as_str()
        .unwrap_or("(no reason given)")
        .to_string();
    if d.chars().count() > 140 {
        d = d.chars().take(140).collect::<String>() + "…";
    }
    format!("[{}] {d}", i["code"].as_str().unwrap_or("?"))
}

/// Print what was done and the rejects, by reason and the first few; the number rejected.
fn summary(results: &[FileResult], started: Instant) -> u64 {
    let secs = started.elapsed().as_secs_f64();
    let written: u64 = results.iter().map(|r| r.written_now).sum();
    let mut total_rejected = 0;
    for r in results {
        let cp = &r.checkpoint;
        let state = if r.skipped {
            format!(
                "already imported (see {}; --restart imports it again)",
                r.paths.progress.display()
            )
        } else if cp.done {
            "done".into()
        } else {
            format!("stopped after line {} (run again to resume)", cp.line)
        };
        let resumed = r
            .resumed_at
            .filter(|_| !r.skipped)
            .map(|l| format!(", resumed after line {l}"))
            .unwrap_or_default();
        println!(
            "{}: {} written, {} rejected: {state}{resumed}",
            r.input.display(),
            cp.imported,
            cp.rejected
        );
        total_rejected += cp.rejected;
        if cp.rejected == 0 {
            continue;
        }
        // the log is ours and line-sized; read it back for the counts by reason
        let text = std::fs::read_to_string(&r.paths.rejects).unwrap_or_default();
        let mut by_reason: Vec<(String, u64)> = Vec::new();
        let mut first = Vec::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let why = reason(&v);
            match by_reason.iter_mut().find(|(w, _)| *w == why) {
                Some((_, n)) => *n += 1,
                None => by_reason.push((why.clone(), 1)),
            }
            if first.len() < 10 {
                let at = match (v["line"].as_u64(), v["entry"].as_u64()) {
                    (Some(l), _) => format!("line {l}"),
                    (None, Some(e)) => format!("entry {e}"),
                    _ => "file".into(),
                };
                let what = v["resource"].as_str().unwrap_or("");
                let expr = v["issues"][0]["expression"][0].as_str().unwrap_or("");
                first.push(format!(
                    "    {at} {what} {}: {why} {expr}",
                    v["status"].as_str().unwrap_or("")
                ));
            }
        }
        by_reason.sort_by_key(|r| std::cmp::Reverse(r.1));
        println!("  rejected, by reason:");
        for (why, n) in by_reason.iter().take(10) {
            println!("    {n:>7} × {why}");
        }
        if by_reason.len() > 10 {
            println!("    … and {} other reasons", by_reason.len() - 10);
        }
        println!("  first rejected:");
        for f in first {
            println!("{}", f.trim_end());
        }
        println!("  all of them: {}", r.paths.rejects.display());
    }
    if written > 0 {
        println!(
            "{written} resources written in {secs:.1} s ({:.0}/s)",
            written as f64 / secs.max(0.001)
        );
    }
    total_rejected
}
