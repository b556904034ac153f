//! Writing a case notification, for every rule set: a new version only when the notification
//! changed (server metadata aside), checked against the `notifica-caso` profile, with the
//! subscription events its change makes, all in the transaction that caused it.
use serde_json::Value;

use crate::store::{NewVersion, StoreError, StoreResult, StoreTx};
use crate::subscriptions::dispatch::Dispatcher;

/// Make `Communication/{id}` say `body`. `sent` (when the case was first decided) is kept from the
/// stored notification; a withdrawal of something never notified writes nothing.
pub async fn publish(
    dispatcher: &Dispatcher,
    tx: &mut dyn StoreTx,
    id: &str,
    mut body: Value,
) -> StoreResult<()> {
    let current = tx.current("Communication", id).await?;
    let old: Option<Value> = current
        .as_ref()
        .filter(|c| !c.deleted)
        .and_then(|c| c.body.as_deref())
        .and_then(|b| serde_json::from_str(b).ok());
    match &old {
        Some(o) => {
            if let Some(sent) = o.get("sent") {
                body["sent"] = sent.clone();
            }
            if without_meta(o) == without_meta(&body) {
                return Ok(());
            }
        }
        None if body["status"] == "entered-in-error" => return Ok(()),
        None => {}
    }
    crate::fhir::profile::check_notifica_caso(&body).map_err(StoreError::Rule)?;
    let (version, method) = match &current {
        Some(c) => (c.version_id + 1, "PUT"),
        None => (1, "POST"),
    };
    let v = NewVersion::stamped(body, "Communication", id, version, method);
    tx.write(&v).await?;
    dispatcher
        .on_write(
            tx,
            "Communication",
            id,
            version,
            old.as_ref(),
            v.resource.as_deref(),
        )
        .await
}

/// Withdraw a notification (status entered-in-error, same identifier), if one stands.
pub async fn withdraw(dispatcher: &Dispatcher, tx: &mut dyn StoreTx, id: &str) -> StoreResult<()> {
    let Some(mut body) = tx
        .current("Communication", id)
        .await?
        .filter(|c| !c.deleted)
        .and_then(|c| c.body)
        .and_then(|b| serde_json::from_str::<Value>(&b).ok())
    else {
        return Ok(());
    };
    if body["status"] == "entered-in-error" {
        return Ok(());
    }
    body["status"] = Value::String("entered-in-error".into());
    publish(dispatcher, tx, id, body).await
}

fn without_meta(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(obj) = v.as_object_mut() {
        obj.shift_remove("meta");
    }
    v
}
