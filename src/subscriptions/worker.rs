//! The delivery worker: it leases due subscriptions (on PostgreSQL `FOR UPDATE SKIP LOCKED`, so
//! several server processes share the work and an event goes out once in the normal case), sends
//! the handshake, the events in number order, and heartbeats. A failure is retried with
//! exponential backoff and jitter; after the configured number of attempts the subscription goes
//! to `error` and its events wait (they keep accumulating) until a client sets it `active` again.
//! A crash loses nothing: an event counts as delivered only once the endpoint acknowledged it and
//! that was committed.
//!
//! Latency: a lease holder keeps serving its subscription while events keep coming (and a little
//! after), reading new events without a write, and commits its progress in the background. On
//! SQLite every write waits for the one writer behind the ingest transactions; a lease write and
//! a progress write per event made delivery slower than ingest at 100 Bundles/s (benches/delivery).
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, watch};
use tracing::Instrument;

use super::bundle::{EventContent, StatusInfo, notification};
use super::channel::Channels;
use super::spec::{Content, Spec};
use crate::fhir::datetime::now_micros;
use crate::store::{
    DeliveryState, EventRow, NewVersion, SharedStore, Store, StoreResult, SubscriptionRow,
};

/// A lease is long enough to send a batch; a crashed holder's lease lapses after it.
const LEASE_MICROS: i64 = 60_000_000;
/// Events read (and sent, in order) at a time.
const BATCH: i64 = 50;
/// Subscriptions served at once by one process.
const PARALLEL: usize = 16;
/// After catching up, a lease holder waits this long for more events before giving the lease back.
const LINGER: Duration = Duration::from_millis(1000);
/// While waiting, it also looks at the events this often: events written by another server
/// process on the same database do not wake this one.
const LINGER_POLL: Duration = Duration::from_millis(50);
/// A lease holder gives the lease back after this long, so that other processes get their share.
const MAX_SERVE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub max_attempts: i64,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub poll: Duration,
    pub timeout: Duration,
    /// Delivered events older than this are pruned from the outbox ($events no longer has them).
    pub retention: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            max_attempts: 10,
            backoff_base: Duration::from_millis(1000),
            backoff_max: Duration::from_secs(600),
            poll: Duration::from_millis(500),
            timeout: Duration::from_secs(10),
            retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl DeliverySettings {
    /// The wait after the `attempts`-th failure in a row: doubling, capped, with jitter (half to
    /// all of it) so that many subscriptions failing together do not retry together.
    pub fn backoff(&self, attempts: i64) -> Duration {
        let exp = attempts.clamp(1, 30) - 1;
        let full = self
            .backoff_base
            .saturating_mul(1u32 << exp.min(20))
            .min(self.backoff_max);
        let half = full / 2;
        half + full.mul_f64(rand::rng().random_range(0.0..=0.5))
    }
}

pub struct Worker {
    store: SharedStore,
    channels: Channels,
    settings: DeliverySettings,
    base: String,
    /// Changes when a transaction that enqueued events commits.
    wake: watch::Receiver<u64>,
    /// This process's name in leases.
    name: String,
    slots: Arc<Semaphore>,
    /// Subscriptions this process is serving now.
    serving: Mutex<HashSet<String>>,
    /// A serving task ended (its slot is free, its subscription may be due again).
    freed: Notify,
    /// Where deliveries of case data are recorded (none in tools that only deliver).
    audit: Option<crate::audit::AuditLog>,
    /// When the delivery loop last went round (readiness reads it).
    heartbeat: Heartbeat,
}

/// When the delivery loop last went round, in µs since the epoch: a loop that stopped (its task
/// ended or hangs on the database) stops beating, and `/readyz` notices.
#[derive(Clone, Default)]
pub struct Heartbeat(Arc<std::sync::atomic::AtomicI64>);

impl Heartbeat {
    fn beat(&self) {
        self.0
            .store(now_micros(), std::sync::atomic::Ordering::Relaxed);
    }

    /// How long ago the loop last went round (`None`: it never has).
    pub fn age(&self) -> Option<Duration> {
        let last = self.0.load(std::sync::atomic::Ordering::Relaxed);
        (last > 0).then(|| Duration::from_micros(now_micros().saturating_sub(last).max(0) as u64))
    }
}

/// How a delivery loop ended.
enum Stop {
    /// Caught up (or served long enough): give the lease back.
    Release,
    /// The subscription was finished (off, error) or is no longer active: nothing more to write.
    Finished,
    /// A send failed: retry later.
    Failed(String, Value),
}

impl Worker {
    pub fn new(
        store: SharedStore,
        channels: Channels,
        settings: DeliverySettings,
        base: String,
        wake: watch::Receiver<u64>,
    ) -> Worker {
        Worker {
            store,
            channels,
            settings,
            base,
            wake,
            name: uuid::Uuid::new_v4().to_string(),
            slots: Arc::new(Semaphore::new(PARALLEL)),
            serving: Mutex::new(HashSet::new()),
            freed: Notify::new(),
            audit: None,
            heartbeat: Heartbeat::default(),
        }
    }

    /// Record every notification that carries case data in the audit trail.
    pub fn audited(mut self, audit: crate::audit::AuditLog) -> Worker {
        self.audit = Some(audit);
        self
    }

    async fn audit_delivery(&self, subscription: &str, spec: &Spec, content: &EventContent) {
        let Some(audit) = &self.audit else { return };
        // an empty notification names no resource
        if spec.content == super::spec::Content::Empty {
            return;
        }
        let focus = content.event.focus.clone();
        let Some((rt, _)) = crate::fhir::fhirpath::split_reference(&focus) else {
            return;
        };
        let patients: Vec<String> = content
            .included
            .iter()
            .filter(|r| r["resourceType"] == "Patient")
            .filter_map(|r| r["id"].as_str().map(|id| format!("Patient/{id}")))
            .collect();
        if !crate::audit::is_audited(rt) && patients.is_empty() {
            return;
        }
        let endpoint = match &spec.channel {
            super::spec::Channel::RestHook { endpoint, .. } => endpoint.clone(),
            super::spec::Channel::Nats { subject } => format!("nats:{subject}"),
        };
        audit
            .record(crate::audit::delivery(
                subscription,
                &endpoint,
                vec![focus],
                patients,
            ))
            .await;
    }

    /// The loop's heartbeat, for readiness.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// The longest a healthy loop goes between two beats: one poll, plus a round's database work.
    pub fn beat_interval(&self) -> Duration {
        self.settings.poll
    }

    /// Run until the process ends.
    pub async fn run(self: Arc<Self>) {
        tracing::info!(worker = %self.name, base = %self.base, "subscription delivery started");
        let mut wake = self.wake.clone();
        loop {
            self.heartbeat.beat();
            wake.mark_unchanged();
            if let Err(e) = self.clone().round().await {
                tracing::warn!(error = %e, "subscription delivery round failed; retrying");
            }
            tokio::select! {
                _ = wake.changed() => {}
                _ = self.freed.notified() => {}
                _ = tokio::time::sleep(self.settings.poll) => {}
            }
        }
    }

    /// Lease what is due, as far as there are free slots, and serve each in its own task.
    async fn round(self: Arc<Self>) -> StoreResult<()> {
        let free = self.slots.available_permits();
        let now = now_micros();
        if free == 0 || !self.store.subscriptions_due(now).await? {
            return Ok(());
        }
        let t = Instant::now();
        let mut tx = self.store.begin().await?;
        let ids = tx
            .sub_claim(&self.name, now, now + LEASE_MICROS, free as i64)
            .await?;
        tx.commit().await?;
        tracing::debug!(
            leased = ids.len(),
            claim_ms = t.elapsed().as_secs_f64() * 1e3,
            "delivery round"
        );
        for id in ids {
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                break; // cannot happen: no more than `free` were leased
            };
            let fresh = self
                .serving
                .lock()
                .expect("not poisoned")
                .insert(id.clone());
            if !fresh {
                // Its task here is finishing: it gave the lease back a moment ago and has not
                // yet left `serving`. Give this lease back too, or the subscription would wait
                // for it to lapse; the task's end wakes the next round, which claims it again.
                let mut tx = self.store.begin().await?;
                tx.sub_progress(&id, 0, 0, 0).await?;
                tx.commit().await?;
                continue;
            }
            let worker = self.clone();
            tokio::spawn(async move {
                if let Err(e) = worker.serve(&id).await {
                    tracing::warn!(subscription = %id, error = %e, "delivery failed");
                    // give the lease back so the subscription is retried, not stuck until it lapses
                    let _ = worker.release_after_error(&id, &e.to_string()).await;
                }
                worker.serving.lock().expect("not poisoned").remove(&id);
                drop(permit);
                // a slot is free: look for more work
                worker.freed.notify_one();
            });
        }
        Ok(())
    }

    async fn release_after_error(&self, id: &str, error: &str) -> StoreResult<()> {
        let Some(row) = self.store.subscription(id).await? else {
            return Ok(());
        };
        self.fail(&row, error, &Value::Null).await
    }

    /// The subscription's current definition, or `None` after recording that it ended (deleted,
    /// unreadable, past its `end`).
    async fn spec_of(&self, row: &SubscriptionRow) -> StoreResult<Option<Spec>> {
        let stored = self.store.read("Subscription", &row.id).await?;
        let resource: Option<Value> = stored
            .as_ref()
            .filter(|s| !s.deleted)
            .and_then(|s| s.body.as_deref())
            .and_then(|b| serde_json::from_str(b).ok());
        let Some(resource) = resource else {
            self.set_status(row, "off", None, 0).await?;
            return Ok(None);
        };
        match Spec::parse(&resource) {
            Ok(spec) if spec.end_at.is_some_and(|e| e <= now_micros()) => {
                self.set_status(row, "off", None, 0).await?;
                Ok(None)
            }
            Ok(spec) => Ok(Some(spec)),
            Err(issues) => {
                let why = issues
                    .iter()
                    .map(|i| i.diagnostics.as_str())
                    .collect::<Vec<_>>()
                    .join("; ");
                self.set_status(row, "error", Some(&why), 0).await?;
                Ok(None)
            }
        }
    }

    fn timeout(&self, spec: &Spec) -> Duration {
        spec.timeout_secs
            .map(|s| Duration::from_secs(s as u64))
            .unwrap_or(self.settings.timeout)
    }

    async fn serve(&self, id: &str) -> StoreResult<()> {
        let Some(row) = self.store.subscription(id).await? else {
            return Ok(());
        };
        let Some(spec) = self.spec_of(&row).await? else {
            return Ok(());
        };
        if row.status != "requested" {
            return self.deliver(row).await;
        }
        self.store.durable().await;
        let info = StatusInfo {
            subscription_id: id,
            topic: spec.topic.url.as_str(),
            status: "requested",
            events_since_start: row.events_count,
            error: None,
        };
        let body = notification(&self.base, &info, "handshake", spec.content, &[]);
        match self.send(&spec, &body).await {
            Ok(()) => {
                tracing::info!(subscription = %id, "handshake acknowledged: active");
                self.set_status(&row, "active", None, 0).await
            }
            Err(e) => {
                let why = format!("handshake failed: {e}");
                tracing::info!(subscription = %id, error = %why, "subscription in error");
                self.set_status(&row, "error", Some(&why), 0).await
            }
        }
    }

    /// Delete what was delivered longer ago than the retention (once per lease).
    async fn prune(&self, id: &str) -> StoreResult<()> {
        let cutoff = now_micros() - self.settings.retention.as_micros() as i64;
        let mut tx = self.store.begin().await?;
        tx.sub_prune_events(id, cutoff).await?;
        tx.commit().await
    }

    /// Send an active subscription's events in order (and heartbeats) while it holds the lease.
    async fn deliver(&self, mut row: SubscriptionRow) -> StoreResult<()> {
        let started = Instant::now();
        let mut wake = self.wake.clone();
        let mut delivered = row.delivered_count;
        let mut last_sent = row.last_sent_at;
        let mut sent_any = false;
        self.prune(&row.id).await?;
        let (progress, committer) = self.progress_committer(&row.id, delivered, last_sent);
        let mut idle = Instant::now();
        let stop = 'serve: loop {
            wake.mark_unchanged();
            if row.unnumbered {
                // only the lease holder numbers: one numbering per subscription at a time
                let mut tx = self.store.begin().await?;
                row.events_count = tx.sub_number_events(&row.id).await?;
                tx.commit().await?;
                row.unnumbered = false;
            }
            let now = now_micros();
            let heartbeat_due = row
                .heartbeat_secs
                .is_some_and(|h| last_sent + h * 1_000_000 <= now);
            if delivered < row.events_count || heartbeat_due {
                let Some(spec) = self.spec_of(&row).await? else {
                    break Stop::Finished;
                };
                let info = |status: &'static str, since: i64| StatusInfo {
                    subscription_id: &row.id,
                    topic: spec.topic.url.as_str(),
                    status,
                    events_since_start: since,
                    error: None,
                };
                if delivered < row.events_count {
                    let t = Instant::now();
                    let events = self
                        .store
                        .subscription_events(&row.id, delivered + 1, row.events_count, BATCH)
                        .await?;
                    // nothing leaves before it is on disk (a SQLite commit is visible a moment
                    // before its log sync)
                    self.store.durable().await;
                    for event in events {
                        let number = event.event_number;
                        let content =
                            event_content(self.store.as_ref(), &spec, spec.content, event).await?;
                        let info = info("active", row.events_count.max(number));
                        let body = notification(
                            &self.base,
                            &info,
                            "event-notification",
                            spec.content,
                            std::slice::from_ref(&content),
                        );
                        if let Err(e) = self.send(&spec, &body).await {
                            break 'serve Stop::Failed(e.to_string(), json!(number));
                        }
                        self.audit_delivery(&row.id, &spec, &content).await;
                        delivered = number;
                        last_sent = now_micros();
                        sent_any = true;
                        progress.send_replace((delivered, last_sent));
                    }
                    tracing::debug!(subscription = %row.id, delivered,
                        ms = t.elapsed().as_secs_f64() * 1e3, "sent a batch");
                } else {
                    let body = notification(
                        &self.base,
                        &info("active", row.events_count),
                        "heartbeat",
                        spec.content,
                        &[],
                    );
                    if let Err(e) = self.send(&spec, &body).await {
                        break Stop::Failed(format!("heartbeat: {e}"), Value::Null);
                    }
                    last_sent = now_micros();
                    progress.send_replace((delivered, last_sent));
                }
                idle = Instant::now();
            } else if idle.elapsed() >= LINGER {
                break Stop::Release;
            } else {
                tokio::select! {
                    _ = wake.changed() => {}
                    _ = tokio::time::sleep(LINGER_POLL) => {}
                }
            }
            if started.elapsed() >= MAX_SERVE {
                break Stop::Release;
            }
            let t = Instant::now();
            let refreshed = self.store.subscription(&row.id).await?;
            tracing::trace!(
                ms = t.elapsed().as_secs_f64() * 1e3,
                events = refreshed.as_ref().map(|r| r.events_count),
                "refreshed"
            );
            match refreshed {
                Some(r) if r.status == "active" => row = r,
                _ => break Stop::Finished, // a client changed it: the next round sees to it
            }
        };
        drop(progress);
        let _ = committer.await;
        let row = SubscriptionRow {
            delivered_count: delivered,
            last_sent_at: last_sent,
            attempts: if sent_any { 0 } else { row.attempts },
            ..row
        };
        match stop {
            Stop::Release | Stop::Finished => self.release(&row).await,
            Stop::Failed(error, event) => self.fail(&row, &error, &event).await,
        }
    }

    /// Commits acknowledged progress in the background, the latest value each time, so that
    /// sending never waits for the database writer; it also renews the lease.
    fn progress_committer(
        &self,
        id: &str,
        delivered: i64,
        last_sent: i64,
    ) -> (watch::Sender<(i64, i64)>, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = watch::channel((delivered, last_sent));
        let (store, id) = (self.store.clone(), id.to_string());
        let task = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let (delivered, last_sent) = *rx.borrow_and_update();
                let commit = async {
                    let mut tx = store.begin().await?;
                    tx.sub_progress(&id, delivered, last_sent, now_micros() + LEASE_MICROS)
                        .await?;
                    tx.commit().await
                };
                if let Err(e) = commit.await {
                    // not fatal: the final release records it, or events are sent again
                    tracing::warn!(subscription = %id, error = %e, "could not record delivery progress");
                }
            }
        });
        (tx, task)
    }

    async fn send(&self, spec: &Spec, body: &Value) -> Result<(), super::channel::SendError> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        let started = Instant::now();
        let channel = channel_label(&spec.channel);
        // a trace of its own per attempt (the worker is not inside any request)
        let span = tracing::info_span!(
            "deliver",
            otel.kind = "client",
            channel,
            failure = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let sent = self
            .channels
            .send(&spec.channel, bytes, self.timeout(spec))
            .instrument(span.clone())
            .await;
        let failure = sent.as_ref().err().map(failure_label);
        if let Some(failure) = failure {
            span.record("failure", failure);
            span.record("otel.status_code", "ERROR");
        }
        crate::observability::metrics::delivery(channel, failure, started.elapsed());
        sent
    }

    /// Record the final progress and give the lease back.
    async fn release(&self, row: &SubscriptionRow) -> StoreResult<()> {
        let mut tx = self.store.begin().await?;
        tx.sub_progress(&row.id, row.delivered_count, row.last_sent_at, 0)
            .await?;
        tx.commit().await
    }

    /// A failed send: retry later, or after the last attempt put the subscription in `error`.
    async fn fail(&self, row: &SubscriptionRow, error: &str, event: &Value) -> StoreResult<()> {
        let attempts = row.attempts + 1;
        if attempts >= self.settings.max_attempts {
            tracing::warn!(subscription = %row.id, attempts, event = %event, error,
                "delivery failed too often: subscription in error until set active again");
            let why = format!("delivery failed {attempts} times in a row; last: {error}");
            self.set_status(row, "error", Some(&why), attempts).await
        } else {
            let wait = self.settings.backoff(attempts);
            tracing::info!(subscription = %row.id, attempts, event = %event, error,
                retry_in_ms = wait.as_millis() as u64, "delivery failed: will retry");
            let mut tx = self.store.begin().await?;
            tx.sub_delivered(
                &row.id,
                &DeliveryState {
                    status: row.status.clone(),
                    delivered_count: row.delivered_count,
                    attempts,
                    next_attempt_at: now_micros() + wait.as_micros() as i64,
                    last_sent_at: row.last_sent_at,
                    last_error: Some(error.to_string()),
                    lease_until: 0,
                },
            )
            .await?;
            tx.commit().await
        }
    }

    /// Change the status: the Subscription resource gets a new version saying so (a client reads
    /// it there), and the delivery state follows in the same transaction.
    async fn set_status(
        &self,
        row: &SubscriptionRow,
        status: &str,
        error: Option<&str>,
        attempts: i64,
    ) -> StoreResult<()> {
        let mut tx = self.store.begin().await?;
        if let Some(current) = tx.current("Subscription", &row.id).await?
            && !current.deleted
            && let Some(mut body) = current
                .body
                .as_deref()
                .and_then(|b| serde_json::from_str::<Value>(b).ok())
            && (body["status"] != status || body["error"].as_str() != error)
        {
            body["status"] = json!(status);
            match error {
                Some(e) => body["error"] = json!(e),
                None => {
                    if let Some(o) = body.as_object_mut() {
                        o.shift_remove("error");
                    }
                }
            }
            let v =
                NewVersion::stamped(body, "Subscription", &row.id, current.version_id + 1, "PUT");
            tx.write(&v).await?;
        }
        let now = now_micros();
        tx.sub_delivered(
            &row.id,
            &DeliveryState {
                status: status.to_string(),
                delivered_count: row.delivered_count,
                attempts,
                next_attempt_at: 0,
                last_sent_at: if status == "active" {
                    now
                } else {
                    row.last_sent_at
                },
                last_error: error.map(String::from),
                lease_until: 0,
            },
        )
        .await?;
        tx.commit().await
    }
}

/// An event with what its notification carries: for `full-resource` the focus version and the
/// resources of the topic's notification shape (the patient).
/// The channel as a metrics label.
fn channel_label(channel: &super::spec::Channel) -> &'static str {
    match channel {
        super::spec::Channel::RestHook { .. } => "rest-hook",
        super::spec::Channel::Nats { .. } => "nats",
    }
}

/// Why a send failed, as a metrics label (a few fixed values: never the endpoint's own words).
fn failure_label(e: &super::channel::SendError) -> &'static str {
    use super::channel::SendError;
    match e {
        SendError::Status(code) if (400..500).contains(code) => "http-4xx",
        SendError::Status(code) if (500..600).contains(code) => "http-5xx",
        SendError::Status(_) => "http-other",
        SendError::Http(e) if e.is_timeout() => "timeout",
        SendError::Http(_) => "unreachable",
        SendError::NoBroker => "no-broker",
        SendError::Nats(_) => "nats",
    }
}

pub async fn event_content(
    store: &dyn Store,
    spec: &Spec,
    content: Content,
    event: EventRow,
) -> StoreResult<EventContent> {
    if content != Content::FullResource {
        return Ok(EventContent {
            event,
            focus: None,
            included: vec![],
        });
    }
    let (reference, version) = event
        .focus
        .split_once("/_history/")
        .unwrap_or((event.focus.as_str(), ""));
    let (rt, id) = reference.split_once('/').unwrap_or((reference, ""));
    let focus: Option<Value> = match version.parse::<i64>() {
        Ok(v) => store.read_version(rt, id, v).await?,
        Err(_) => store.read(rt, id).await?,
    }
    .and_then(|s| s.body)
    .and_then(|b| serde_json::from_str(&b).ok());
    let mut included = Vec::new();
    if let Some(f) = &focus {
        for include in &spec.topic.includes {
            // `Communication:subject`: the resource the element refers to
            let Some((_, element)) = include.split_once(':') else {
                continue;
            };
            let target = f[element]["reference"].as_str().unwrap_or_default();
            if let Some((trt, tid)) = target.split_once('/')
                && let Some(s) = store.read(trt, tid).await?
                && let Some(b) = s.body
                && let Ok(v) = serde_json::from_str::<Value>(&b)
            {
                included.push(v);
            }
        }
    }
    Ok(EventContent {
        event,
        focus,
        included,
    })
}
