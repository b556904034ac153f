//! Writing a case notification, for every rule set: a new version only when the notification
//! changed (server metadata aside), checked against the `notifica-caso` profile, with the
//! subscription events its change makes, all in the transaction that caused it.
use serde_json::Value;

use crate::store::{NewVersion, StoreError, StoreResult, StoreTx};
use crate::subscriptions::dispatch::Dispatcher;

/// Make `Communication/{id}` say `body` for the rule set `rule_set` (`cre`, `dm1990`). `sent`
/// (when the case was first decided) is kept from the stored notification; a withdrawal of
/// something never notified writes nothing.
pub async fn publish(
    dispatcher: &Dispatcher,
    tx: &mut dyn StoreTx,
    rule_set: &'static str,
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
    let change = case_change(old.as_ref(), &body);
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
        .await?;
    match change {
        Some((Change::Created, category)) => {
            crate::observability::metrics::case_created(rule_set, &category)
        }
        Some((Change::Withdrawn, category)) => {
            crate::observability::metrics::case_withdrawn(rule_set, &category)
        }
        None => {}
    }
    Ok(())
}

enum Change {
    Created,
    Withdrawn,
}

/// A notification that did not stand before and does now was created; one that stood and is now
/// entered-in-error was withdrawn; with its category (for the metrics: counted as the rules
/// decide, inside the transaction, so one that then fails to commit, a database error, counts
/// all the same).
fn case_change(old: Option<&Value>, new: &Value) -> Option<(Change, String)> {
    let withdrawn = |v: &Value| v["status"] == "entered-in-error";
    let change = match old {
        None if !withdrawn(new) => Change::Created,
        Some(o) if !withdrawn(o) && withdrawn(new) => Change::Withdrawn,
        _ => return None,
    };
    let category = new["category"][0]["coding"][0]["code"]
        .as_str()
        .unwrap_or("unknown");
    Some((change, category.to_string()))
}

/// Withdraw a notification (status entered-in-error, same identifier), if one stands.
pub async fn withdraw(
    dispatcher: &Dispatcher,
    tx: &mut dyn StoreTx,
    rule_set: &'static str,
    id: &str,
) -> StoreResult<()> {
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
    publish(dispatcher, tx, rule_set, id, body).await
}

fn without_meta(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(obj) = v.as_object_mut() {
        obj.shift_remove("meta");
    }
    v
}
