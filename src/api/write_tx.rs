//! A write transaction of the API: the store's transaction (whose pre-commit hooks apply the
//! rules) together with the client it writes for, whose rights are checked on every write.
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use serde_json::Value;
use tracing::Instrument;

use crate::auth::{Principal, Role};
use crate::error::{ApiError, ApiResult};
use crate::store::{Note, StoreTx, StoredResource};

pub struct WriteTx {
    tx: Box<dyn StoreTx>,
    caller: Arc<Principal>,
    /// A NATS broker is configured (Subscriptions may use the NATS channel).
    has_broker: bool,
}

impl Deref for WriteTx {
    type Target = dyn StoreTx;
    fn deref(&self) -> &Self::Target {
        &*self.tx
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut *self.tx
    }
}

impl WriteTx {
    pub fn new(tx: Box<dyn StoreTx>, caller: Arc<Principal>, has_broker: bool) -> WriteTx {
        WriteTx {
            tx,
            caller,
            has_broker,
        }
    }

    /// Commit; what the rules noted about the written resources (the sender's receipt).
    pub async fn commit(self) -> ApiResult<Vec<Note>> {
        Ok(self
            .tx
            .commit_noting()
            .instrument(tracing::info_span!("commit"))
            .await?)
    }

    /// May the caller write this (`resource` `None`: delete)? A Subscription is also checked and
    /// normalised here (owner, starting status).
    pub fn admit(
        &self,
        resource_type: &str,
        resource: Option<&mut Value>,
        current: Option<&StoredResource>,
    ) -> ApiResult<()> {
        if !self.caller.may_write(resource_type) {
            return Err(ApiError::Forbidden(format!(
                "client '{}' ({:?}) may not write {resource_type}",
                self.caller.id, self.caller.role
            )));
        }
        if resource_type == "Subscription" {
            match resource {
                Some(r) => {
                    crate::subscriptions::spec::admit(&self.caller, r, current, self.has_broker)?
                }
                None => {
                    let owner = current
                        .and_then(|c| crate::subscriptions::parse_body(c.body.as_deref()))
                        .map(|b| crate::subscriptions::spec::owner_of(&b))
                        .unwrap_or_default();
                    if !self.caller.development
                        && self.caller.role != Role::Admin
                        && owner != self.caller.id
                    {
                        return Err(ApiError::NotFound(
                            "this Subscription is not one of yours".into(),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// A deleted Subscription's id stays its owner's: another client re-creating it would inherit
    /// its history (and its `$events`). `NotFound`, as for a live one that is not the caller's.
    pub async fn admit_revival(
        &mut self,
        resource_type: &str,
        id: &str,
        current: Option<&StoredResource>,
    ) -> ApiResult<()> {
        if resource_type != "Subscription"
            || !current.is_some_and(|c| c.deleted)
            || self.caller.development
            || self.caller.role == Role::Admin
        {
            return Ok(());
        }
        let owner = self
            .tx
            .last_live(resource_type, id)
            .await?
            .and_then(|c| crate::subscriptions::parse_body(c.body.as_deref()))
            .map(|b| crate::subscriptions::spec::owner_of(&b));
        match owner {
            Some(o) if o != self.caller.id => Err(ApiError::NotFound(format!(
                "Subscription/{id} is not one of yours"
            ))),
            _ => Ok(()),
        }
    }

    /// Search conditions that keep the caller's conditional matches within what it may see (its
    /// region's cases, its own Subscriptions): another client's resource is never "the match".
    pub fn scope(&self, resource_type: &str) -> Vec<crate::store::Condition> {
        self.caller.scope(resource_type).unwrap_or_default()
    }

    /// May the caller read this version (a GET inside a Bundle)? `NotFound` when not.
    pub fn admit_read(&self, stored: &StoredResource) -> ApiResult<()> {
        match crate::subscriptions::parse_body(stored.body.as_deref()) {
            Some(b) if !self.caller.sees(&b) => Err(ApiError::NotFound(format!(
                "{}/{} is not known",
                stored.resource_type, stored.id
            ))),
            _ => Ok(()),
        }
    }
}
