//! Subscriptions (FHIR R4 Subscriptions Backport IG 1.1.0, SPEC.md §4): topics as data, admission
//! of Subscription resources, outbox events written in the causing transaction, notification
//! bundles, and the delivery worker with its channels (rest-hook, NATS JetStream).
pub mod bundle;
pub mod channel;
pub mod dispatch;
pub mod spec;
pub mod topics;
pub mod worker;

use serde_json::Value;

use crate::store::{NewVersion, StoreResult, StoreTx};

/// Keep the delivery state of a Subscription in step with a client's write of it (same
/// transaction): a new or changed subscription is due for its handshake, a deleted one is off.
pub async fn on_subscription_written(tx: &mut dyn StoreTx, v: &NewVersion) -> StoreResult<()> {
    match v.resource.as_deref() {
        Some(resource) => {
            if let Ok(spec) = spec::Spec::parse(resource) {
                tx.sub_define(&spec.row(&v.id)).await?;
            }
        }
        None => {
            if let Some(mut row) = tx.sub_row(&v.id).await? {
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
