//! Subscriptions (FHIR R4 Subscriptions Backport IG 1.1.0, SPEC.md §4): topics as data, admission
//! of Subscription resources, outbox events written in the causing transaction, notification
//! bundles, and the delivery worker with its channels (rest-hook, NATS JetStream).
pub mod bundle;
pub mod channel;
pub mod dispatch;
pub mod spec;
pub mod topics;
pub mod worker;

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::store::{Note, PreCommit, StoreResult, StoreTx, Touched};

/// Keeps the delivery state of Subscriptions in step with clients' writes of them, in the writing
/// transaction (a pre-commit hook), and wakes the delivery worker once they commit.
pub struct SubscriptionHook {
    pub dispatcher: Arc<dispatch::Dispatcher>,
}

#[async_trait]
impl PreCommit for SubscriptionHook {
    fn watches(&self, resource_type: &str) -> bool {
        resource_type == "Subscription"
    }

    async fn before_commit(
        &self,
        tx: &mut dyn StoreTx,
        touched: &[Touched],
        _notes: &mut Vec<Note>,
    ) -> StoreResult<bool> {
        for t in touched {
            on_subscription_written(tx, &t.id, t.body.as_deref()).await?;
        }
        Ok(true)
    }

    fn after_commit(&self) {
        self.dispatcher.wake();
    }
}

/// A new or changed subscription is due for its handshake, a deleted one is off.
async fn on_subscription_written(
    tx: &mut dyn StoreTx,
    id: &str,
    resource: Option<&Value>,
) -> StoreResult<()> {
    match resource {
        Some(resource) => {
            if let Ok(spec) = spec::Spec::parse(resource) {
                tx.sub_define(&spec.row(id)).await?;
            }
        }
        None => {
            if let Some(mut row) = tx.sub_row(id).await? {
                row.status = "off".into();
                tx.sub_define(&row).await?;
            }
        }
    }
    Ok(())
}

/// The body of a stored version, parsed.
pub fn parse_body(body: Option<&str>) -> Option<Value> {
    body.and_then(|b| serde_json::from_str(b).ok())
}
