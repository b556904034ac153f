//! The delivery worker: it leases due subscriptions (on PostgreSQL `FOR UPDATE SKIP LOCKED`, so
//! several server processes share the work and an event goes out once in the normal case), sends
//! the handshake, the events in number order, and heartbeats, and records progress after every
//! acknowledged send. A failure is retried with exponential backoff and jitter; after the
//! configured number of attempts the subscription goes to `error` and its events wait (they keep
//! accumulating) until a client sets it `active` again. A crash loses nothing: an event counts as
//! delivered only once the endpoint acknowledged it and that was committed.
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::bundle::{EventContent, StatusInfo, notification};
use super::channel::Channels;
use super::spec::{Content, Spec};
use crate::fhir::datetime::now_micros;
use crate::store::{
    DeliveryState, EventRow, NewVersion, SharedStore, Store, StoreResult, SubscriptionRow,
};

/// A lease is long enough to send a batch; a crashed holder's lease lapses after it.
const LEASE_MICROS: i64 = 60_000_000;
/// Events sent per lease before the subscription goes back in line (fairness between subscribers).
const BATCH: i64 = 50;

#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub max_attempts: i64,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub poll: Duration,
    pub timeout: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            max_attempts: 10,
            backoff_base: Duration::from_millis(1000),
            backoff_max: Duration::from_secs(600),
            poll: Duration::from_millis(500),
            timeout: Duration::from_secs(10),
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
    wake: Arc<Notify>,
    /// This process's name in leases.
    name: String,
}

enum Outcome {
    /// Done for now (sent everything, or recorded a failure).
    Done,
}

impl Worker {
    pub fn new(
        store: SharedStore,
        channels: Channels,
        settings: DeliverySettings,
        base: String,
        wake: Arc<Notify>,
    ) -> Worker {
        Worker {
            store,
            channels,
            settings,
            base,
            wake,
            name: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// Run until the process ends.
    pub async fn run(self: Arc<Self>) {
        tracing::info!(worker = %self.name, base = %self.base, "subscription delivery started");
        loop {
            let worked = match self.round().await {
                Ok(n) => n > 0,
                Err(e) => {
                    tracing::warn!(error = %e, "subscription delivery round failed; retrying");
                    false
                }
            };
            if !worked {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(self.settings.poll) => {}
                }
            }
        }
    }

    /// Lease what is due and serve it; the number of subscriptions served.
    async fn round(&self) -> StoreResult<usize> {
        let now = now_micros();
        if !self.store.subscriptions_due(now).await? {
            return Ok(0);
        }
        let mut tx = self.store.begin().await?;
        let ids = tx
            .sub_claim(&self.name, now, now + LEASE_MICROS, 16)
            .await?;
        tx.commit().await?;
        let served = ids.len();
        futures::future::join_all(ids.iter().map(|id| async move {
            if let Err(e) = self.serve(id).await {
                tracing::warn!(subscription = %id, error = %e, "delivery failed");
                // give the lease back so the subscription is retried, not stuck until it lapses
                let _ = self.release_after_error(id, &e.to_string()).await;
            }
        }))
        .await;
        Ok(served)
    }

    async fn release_after_error(&self, id: &str, error: &str) -> StoreResult<()> {
        let Some(row) = self.store.subscription(id).await? else {
            return Ok(());
        };
        self.fail(&row, error, &Value::Null).await
    }

    async fn serve(&self, id: &str) -> StoreResult<Outcome> {
        let Some(row) = self.store.subscription(id).await? else {
            return Ok(Outcome::Done);
        };
        let stored = self.store.read("Subscription", id).await?;
        let resource: Option<Value> = stored
            .as_ref()
            .filter(|s| !s.deleted)
            .and_then(|s| s.body.as_deref())
            .and_then(|b| serde_json::from_str(b).ok());
        let Some(resource) = resource else {
            return self.finish(&row, "off", None).await;
        };
        let spec = match Spec::parse(&resource) {
            Ok(s) => s,
            Err(issues) => {
                let why = issues
                    .iter()
                    .map(|i| i.diagnostics.as_str())
                    .collect::<Vec<_>>()
                    .join("; ");
                return self.finish(&row, "error", Some(&why)).await;
            }
        };
        let now = now_micros();
        if spec.end_at.is_some_and(|e| e <= now) {
            return self.finish(&row, "off", None).await;
        }
        let timeout = spec
            .timeout_secs
            .map(|s| Duration::from_secs(s as u64))
            .unwrap_or(self.settings.timeout);
        let info = |status: &'static str| StatusInfo {
            subscription_id: id,
            topic: spec.topic.url.as_str(),
            status,
            events_since_start: row.events_count,
            error: None,
        };
        if row.status == "requested" {
            let body = notification(
                &self.base,
                &info("requested"),
                "handshake",
                spec.content,
                &[],
            );
            return match self.send(&spec, &body, timeout).await {
                Ok(()) => {
                    tracing::info!(subscription = %id, "handshake acknowledged: active");
                    self.finish(&row, "active", None).await
                }
                Err(e) => {
                    let why = format!("handshake failed: {e}");
                    tracing::info!(subscription = %id, error = %why, "subscription in error");
                    self.finish(&row, "error", Some(&why)).await
                }
            };
        }
        let mut delivered = row.delivered_count;
        let mut last_sent = row.last_sent_at;
        if delivered < row.events_count {
            let events = self
                .store
                .subscription_events(id, delivered + 1, row.events_count, BATCH)
                .await?;
            for event in events {
                let content =
                    event_content(self.store.as_ref(), &spec, spec.content, event).await?;
                let info = StatusInfo {
                    events_since_start: row.events_count.max(content.event.event_number),
                    ..info("active")
                };
                let body = notification(
                    &self.base,
                    &info,
                    "event-notification",
                    spec.content,
                    std::slice::from_ref(&content),
                );
                match self.send(&spec, &body, timeout).await {
                    Ok(()) => {
                        delivered = content.event.event_number;
                        last_sent = now_micros();
                        self.progress(&row, delivered, last_sent, true).await?;
                    }
                    Err(e) => {
                        let r = SubscriptionRow {
                            delivered_count: delivered,
                            last_sent_at: last_sent,
                            ..row.clone()
                        };
                        return self
                            .fail(&r, &e.to_string(), &json!(content.event.event_number))
                            .await
                            .map(|_| Outcome::Done);
                    }
                }
            }
            self.progress(&row, delivered, last_sent, false).await?;
            return Ok(Outcome::Done);
        }
        if row
            .heartbeat_secs
            .is_some_and(|h| row.last_sent_at + h * 1_000_000 <= now)
        {
            let body = notification(&self.base, &info("active"), "heartbeat", spec.content, &[]);
            return match self.send(&spec, &body, timeout).await {
                Ok(()) => {
                    self.progress(&row, delivered, now_micros(), false).await?;
                    Ok(Outcome::Done)
                }
                Err(e) => self
                    .fail(&row, &format!("heartbeat: {e}"), &Value::Null)
                    .await
                    .map(|_| Outcome::Done),
            };
        }
        self.progress(&row, delivered, last_sent, false).await?;
        Ok(Outcome::Done)
    }

    async fn send(
        &self,
        spec: &Spec,
        body: &Value,
        timeout: Duration,
    ) -> Result<(), super::channel::SendError> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        self.channels.send(&spec.channel, bytes, timeout).await
    }

    /// Record acknowledged sends; `keep` keeps the lease (more to send in this round).
    async fn progress(
        &self,
        row: &SubscriptionRow,
        delivered: i64,
        last_sent: i64,
        keep: bool,
    ) -> StoreResult<()> {
        let mut tx = self.store.begin().await?;
        tx.sub_delivered(
            &row.id,
            &DeliveryState {
                status: "active".into(),
                delivered_count: delivered,
                attempts: 0,
                next_attempt_at: 0,
                last_sent_at: last_sent,
                last_error: None,
                lease_until: if keep { now_micros() + LEASE_MICROS } else { 0 },
            },
        )
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

    async fn finish(
        &self,
        row: &SubscriptionRow,
        status: &str,
        error: Option<&str>,
    ) -> StoreResult<Outcome> {
        self.set_status(row, status, error, 0).await?;
        Ok(Outcome::Done)
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
