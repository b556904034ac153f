//! `sentinella reindex`: rebuild the search index rows of every current resource from its stored
//! body with the server's search parameters (after an upgrade added or changed one). Online: small
//! transactions, each replacing the rows of a page of resources and moving the cursor kept in the
//! database's rule-state table in the same transaction, so an interrupted run resumes exactly
//! where its last commit left it. A resource written meanwhile is skipped: its writer indexed it
//! with the current parameters already.
use std::time::Instant;

use serde_json::json;

use super::{Exit, fail, redact};
use crate::store::{NewVersion, SharedStore, StoreResult};

/// Where the cursor lives in the rule-state table.
const RULE_SET: &str = "cli-reindex";
const KEY: &str = "cursor";

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = concat!(
    "Examples:
  sentinella reindex --database sqlite://sentinella.db
  SENTINELLA_DATABASE=postgres://sentinella@db/sentinella sentinella reindex --batch 500
  sentinella reindex --restart     # a full pass again, even after an interrupted one

Runs while the server runs (on SQLite too: each transaction is short, the server's writes
interleave). Interrupted (Ctrl-C, kill -9)? Run it again: it resumes after the last resource it
committed; a finished pass is followed by a new full pass when run again.

",
    exit_codes!()
))]
pub struct Args {
    /// Database: sqlite://PATH or postgres://USER@HOST/DB.
    #[arg(
        long,
        env = "SENTINELLA_DATABASE",
        default_value = "sqlite://sentinella.db"
    )]
    pub database: String,
    /// Resources per transaction.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u16).range(1..=5000))]
    pub batch: u16,
    /// Start a full pass from the first resource, even if an earlier pass was interrupted.
    #[arg(long)]
    pub restart: bool,
    /// No progress bar; only the summary.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The cursor: the last `(type, id)` committed, how many were done in this pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cursor {
    pub resource_type: String,
    pub id: String,
    pub done: u64,
    pub finished: bool,
}

impl Cursor {
    fn from_json(v: &serde_json::Value) -> Cursor {
        Cursor {
            resource_type: v["type"].as_str().unwrap_or_default().into(),
            id: v["id"].as_str().unwrap_or_default().into(),
            done: v["done"].as_u64().unwrap_or(0),
            finished: v["finished"].as_bool().unwrap_or(false),
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({"type": self.resource_type, "id": self.id, "done": self.done, "finished": self.finished})
    }
}

/// The cursor as the database has it.
pub async fn cursor(store: &SharedStore) -> StoreResult<Option<Cursor>> {
    let mut tx = store.begin().await?;
    let v = tx.state_get(RULE_SET, KEY).await?;
    tx.commit().await?;
    Ok(v.as_ref().map(Cursor::from_json))
}

/// What a pass did.
#[derive(Debug, Default)]
pub struct Pass {
    pub reindexed: u64,
    /// Changed since the page was read: indexed by their writer.
    pub skipped: u64,
    /// Bodies that are not JSON (none are written so; counted, never fatal).
    pub unreadable: u64,
    pub resumed_after: Option<(String, String)>,
}

/// One pass from the cursor (or the start) to the end; `progress` hears after each commit.
pub async fn pass(
    store: &SharedStore,
    batch: i64,
    restart: bool,
    mut progress: impl FnMut(&Cursor),
) -> StoreResult<Pass> {
    let mut at = match cursor(store).await? {
        Some(c) if !c.finished && !restart => c,
        _ => Cursor::default(),
    };
    let mut out = Pass {
        resumed_after: (!at.resource_type.is_empty())
            .then(|| (at.resource_type.clone(), at.id.clone())),
        ..Pass::default()
    };
    let search = &crate::fhir::Definitions::get().search;
    loop {
        let page = store
            .current_after((at.resource_type.as_str(), at.id.as_str()), batch)
            .await?;
        let last = page.len() < batch as usize;
        let mut tx = store.begin().await?;
        for stored in &page {
            let Some(resource) = stored
                .body
                .as_deref()
                .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
            else {
                out.unreadable += 1;
                continue;
            };
            let v = NewVersion {
                resource_type: stored.resource_type.clone(),
                id: stored.id.clone(),
                version_id: stored.version_id,
                last_updated: stored.last_updated,
                body: None,
                method: "PUT",
                index: search.extract(&resource),
                resource: None,
            };
            if tx.replace_index(&v).await? {
                out.reindexed += 1;
            } else {
                out.skipped += 1;
            }
        }
        if let Some(s) = page.last() {
            at.resource_type = s.resource_type.clone();
            at.id = s.id.clone();
            at.done += page.len() as u64;
        }
        at.finished = last;
        tx.state_put(RULE_SET, KEY, &at.json(), &[]).await?;
        tx.commit().await?;
        progress(&at);
        if last {
            return Ok(out);
        }
    }
}

pub async fn run(args: &Args) -> Exit {
    let store = match crate::store::connect(&args.database).await {
        Ok(s) => s,
        Err(e) => {
            return fail(
                Exit::Database,
                format!("cannot open {}: {e}", redact(&args.database)),
            );
        }
    };
    let total = store.count_current().await.unwrap_or(0).max(0) as u64;
    let bar = super::progress::items(total, args.quiet);
    bar.set_prefix("reindex");
    let started = Instant::now();
    let result = pass(&store, args.batch as i64, args.restart, |c| {
        bar.set_position(c.done.min(total));
        bar.set_message(format!("{}/{}", c.resource_type, c.id));
    })
    .await;
    bar.finish_and_clear();
    match result {
        Ok(p) => {
            if let Some((rt, id)) = &p.resumed_after {
                println!("resumed after {rt}/{id}");
            }
            println!(
                "reindexed {} resources in {:.1} s ({} changed meanwhile and left to their writer{})",
                p.reindexed,
                started.elapsed().as_secs_f64(),
                p.skipped,
                if p.unreadable > 0 {
                    format!(", {} stored bodies unreadable", p.unreadable)
                } else {
                    String::new()
                }
            );
            Exit::Ok
        }
        Err(e) => fail(
            Exit::Database,
            format!("reindex stopped: {e}; run it again to resume"),
        ),
    }
}
