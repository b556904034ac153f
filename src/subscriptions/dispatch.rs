//! Turning a write into outbox events, inside the writing transaction: for each topic the write
//! fires, every subscription whose filters (and whose owner's regions) the resource meets gets the
//! next event number. Nothing is sent here; the delivery worker sends after commit.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;
use tokio::sync::watch;

use super::spec::Spec;
use super::topics::{Interaction, topics};
use crate::auth::{Access, Principal};
use crate::fhir::Definitions;
use crate::fhir::datetime::now_micros;
use crate::fhir::search_params::IndexEntry;
use crate::store::{StoreResult, StoreTx};

pub struct Dispatcher {
    access: Arc<Access>,
    /// Events written so far (by transactions that may still roll back): a change tells the
    /// committing transaction to wake the delivery worker.
    enqueued: AtomicU64,
    /// Counts commits that enqueued events; delivery loops watch it.
    wake: watch::Sender<u64>,
    /// A NATS server is configured: the JetStream channel can be offered.
    pub has_broker: bool,
}

impl Dispatcher {
    pub fn new(access: Arc<Access>, has_broker: bool) -> Dispatcher {
        Dispatcher {
            access,
            enqueued: AtomicU64::new(0),
            wake: watch::Sender::new(0),
            has_broker,
        }
    }

    /// Tell the delivery worker that events were committed.
    pub fn wake(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn waker(&self) -> watch::Receiver<u64> {
        self.wake.subscribe()
    }

    pub fn enqueued(&self) -> u64 {
        self.enqueued.load(Ordering::Relaxed)
    }

    /// Record the events a new version (`current`, `None` when deleted) of `rt/id` causes.
    pub async fn on_write(
        &self,
        tx: &mut dyn StoreTx,
        rt: &str,
        id: &str,
        version: i64,
        previous: Option<&Value>,
        current: Option<&Value>,
    ) -> StoreResult<()> {
        let watching: Vec<_> = topics().iter().filter(|t| t.resource_type == rt).collect();
        if watching.is_empty() {
            return Ok(());
        }
        let interaction = match (previous, current) {
            (None, Some(_)) => Interaction::Create,
            (Some(_), Some(_)) => Interaction::Update,
            (Some(_), None) => Interaction::Delete,
            (None, None) => return Ok(()),
        };
        let registry = &Definitions::get().search;
        let before: Option<Vec<IndexEntry>> = previous.map(|p| registry.extract_all(p));
        let after: Option<Vec<IndexEntry>> = current.map(|c| registry.extract_all(c));
        let focus = format!("{rt}/{id}/_history/{version}");
        let now = now_micros();
        for topic in watching {
            let fired = topic.fires(interaction, id, before.as_deref(), after.as_deref());
            let created_shape = interaction == Interaction::Update
                && after
                    .as_deref()
                    .is_some_and(|a| topic.fires_as_created(id, a));
            if !fired && !created_shape {
                continue;
            }
            for (row, body) in tx.sub_of_topic(&topic.url).await? {
                if row.end_at.is_some_and(|end| end <= now) {
                    continue;
                }
                let Ok(resource) = serde_json::from_str::<Value>(&body) else {
                    continue;
                };
                let Ok(spec) = Spec::parse(&resource) else {
                    continue;
                };
                // a client removed from the configuration receives nothing more
                let Some(owner) = self.access.client(&row.owner) else {
                    continue;
                };
                let visible_now = visible(&spec, &owner, rt, id, after.as_deref());
                let visible_before = visible(&spec, &owner, rt, id, before.as_deref());
                let event = (fired
                    && (visible_now || (interaction == Interaction::Delete && visible_before)))
                    || (created_shape && visible_now && !visible_before);
                if event {
                    tx.sub_append_event(&row.id, &focus, now).await?;
                    self.enqueued.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }
}

/// Does a version meet the subscription's filters and lie within its owner's regions?
fn visible(
    spec: &Spec,
    owner: &Principal,
    rt: &str,
    id: &str,
    entries: Option<&[IndexEntry]>,
) -> bool {
    let Some(entries) = entries else {
        return false;
    };
    owner.may_read(rt)
        && spec.filters.iter().all(|c| c.matches(id, entries))
        && owner
            .scope(rt)
            .is_none_or(|scope| scope.iter().all(|c| c.matches(id, entries)))
}
