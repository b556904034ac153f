//! The audit trail: who read, searched, wrote or was sent which case data and patients, as R4
//! AuditEvents stored beside the data they describe. Append-only: the API never writes or deletes
//! one (policy: `AUDIT_TYPE`), only this module does, and only the `auditor` role reads them.
//!
//! A request hands its record to a bounded queue and goes on; one task writes the queue in batches
//! (one transaction per batch), so auditing a read costs the read no database turn. The queue is
//! bounded: when the database falls behind, requests wait for room rather than drop records. What
//! was queued but not yet written when the process dies is lost (at most one batch interval).
pub mod event;

use std::time::Duration;

use tokio::sync::mpsc;

use crate::fhir::datetime::{format_instant, now_micros};
use crate::store::{NewVersion, SharedStore, StoreResult};
pub use event::{Interaction, Record};

/// Records waiting to be written before requests start to wait.
const QUEUE: usize = 8192;
/// Records written in one transaction at most.
const BATCH: usize = 256;
/// How long a record may wait for others to share its transaction.
const LINGER: Duration = Duration::from_millis(50);
/// How often records older than the retention are removed.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Events removed per transaction while pruning (keeps each turn of the writer short).
const PRUNE_BATCH: i64 = 1000;

/// The handle requests record through (cheap to clone).
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Record>,
}

impl AuditLog {
    /// Start the writer (and the pruner if `retention` is set) on `store`.
    pub fn start(store: SharedStore, retention: Option<Duration>) -> AuditLog {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(store.clone(), rx));
        if let Some(keep) = retention {
            tokio::spawn(prune_loop(store, keep));
        }
        AuditLog { tx }
    }

    /// Queue one record (waits only while the queue is full).
    pub async fn record(&self, record: Record) {
        if self.tx.send(record).await.is_err() {
            tracing::error!("audit writer stopped: an access went unrecorded");
        }
    }
}

async fn write_loop(store: SharedStore, mut rx: mpsc::Receiver<Record>) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => batch.push(r),
                _ => break,
            }
        }
        // a failed batch is retried (the database may be briefly unavailable); records are only
        // dropped from memory once written
        let mut delay = Duration::from_millis(100);
        while let Err(e) = write_batch(&store, &batch).await {
            tracing::error!(error = %e, records = batch.len(), "audit batch not written; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        batch.clear();
    }
}

async fn write_batch(store: &SharedStore, batch: &[Record]) -> StoreResult<()> {
    // building and indexing the events is CPU work: off the async workers, before the transaction
    let records = batch.to_vec();
    let versions: Vec<NewVersion> = tokio::task::spawn_blocking(move || {
        records
            .iter()
            .map(|r| {
                let body = event::audit_event(r, &format_instant(r.recorded));
                let id = uuid::Uuid::new_v4().to_string();
                NewVersion::stamped(body, crate::auth::AUDIT_TYPE, &id, 1, "POST")
            })
            .collect()
    })
    .await
    .map_err(|e| crate::store::StoreError::Rule(format!("audit events not built: {e}")))?;
    let mut tx = store.begin().await?;
    for v in &versions {
        tx.write(v).await?;
    }
    tx.commit().await
}

async fn prune_loop(store: SharedStore, keep: Duration) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    loop {
        tick.tick().await;
        let before = now_micros() - keep.as_micros() as i64;
        match prune(&store, before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "audit events past their retention removed"),
            Err(e) => tracing::warn!(error = %e, "audit pruning failed; retried at the next tick"),
        }
    }
}

/// Remove the audit events recorded before `before` (µs); returns how many went.
pub async fn prune(store: &SharedStore, before: i64) -> StoreResult<u64> {
    let mut total = 0;
    loop {
        let mut tx = store.begin().await?;
        let n = tx
            .purge_before(crate::auth::AUDIT_TYPE, before, PRUNE_BATCH)
            .await?;
        tx.commit().await?;
        total += n;
        if n < PRUNE_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// The records of an access to case data or patients are the ones kept (see `AUDITED_TYPES`).
pub fn is_audited(resource_type: &str) -> bool {
    AUDITED_TYPES.contains(&resource_type)
}

/// Case data and the people it is about (GDPR art. 9 health data).
pub const AUDITED_TYPES: &[&str] = &[
    "Patient",
    "Communication",
    "Condition",
    "Observation",
    "DiagnosticReport",
    "Specimen",
    "Encounter",
];

/// The record of a notification the delivery worker handed to a subscriber's endpoint.
pub fn delivery(
    subscription: &str,
    endpoint: &str,
    entities: Vec<String>,
    patients: Vec<String>,
) -> Record {
    Record {
        recorded: now_micros(),
        client: None,
        interaction: Interaction::Deliver,
        query: None,
        entities,
        patients,
        destination: Some((endpoint.to_string(), subscription.to_string())),
    }
}
