//! Pre-commit hooks: rules that run inside a write transaction, on what it wrote, just before it
//! commits. The store calls them from `commit`, so no write path can skip them; higher layers
//! (surveillance rules, subscriptions) register them at start and the store never names them.
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use super::{StoreResult, StoreTx};

/// A resource a transaction wrote (body `None`: deleted).
#[derive(Debug, Clone)]
pub struct Touched {
    pub resource_type: String,
    pub id: String,
    pub body: Option<Arc<Value>>,
    /// The version this write replaced, if any: its links count too (a correction can drop them).
    pub previous: Option<Arc<Value>>,
    /// Created with a server-assigned id: nothing written before this transaction can refer to it.
    pub created: bool,
}

/// What a hook tells the writer about one of the resources it wrote (a receipt).
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub resource_type: String,
    pub id: String,
    /// `information` or `warning`
    pub severity: &'static str,
    /// The system and code of the outcome (e.g. `esito-segnalazione` `notificato`).
    pub system: String,
    pub code: String,
    pub text: String,
}

/// A hook sees the request's writes only: what hooks write themselves (case notifications) is their
/// output, never another hook's input, so hooks cannot trigger each other.
#[async_trait]
pub trait PreCommit: Send + Sync {
    /// Does a write of this type concern the hook? (The previous version is read only for these.)
    fn watches(&self, resource_type: &str) -> bool;
    /// Apply the hook to the transaction's writes of watched types, before the commit. Returns
    /// whether `after_commit` has something to announce.
    async fn before_commit(
        &self,
        tx: &mut dyn StoreTx,
        touched: &[Touched],
        notes: &mut Vec<Note>,
    ) -> StoreResult<bool>;
    /// Called once the transaction committed, when `before_commit` asked for it.
    fn after_commit(&self) {}
}

pub type Hooks = Arc<[Arc<dyn PreCommit>]>;

/// Run every hook on its share of `touched` (in registration order).
pub async fn run_before_commit(
    hooks: &Hooks,
    tx: &mut dyn StoreTx,
    touched: &[Touched],
    notes: &mut Vec<Note>,
) -> StoreResult<Vec<usize>> {
    let mut announce = Vec::new();
    for (i, h) in hooks.iter().enumerate() {
        let mine: Vec<Touched> = touched
            .iter()
            .filter(|t| h.watches(&t.resource_type))
            .cloned()
            .collect();
        if !mine.is_empty() && h.before_commit(tx, &mine, notes).await? {
            announce.push(i);
        }
    }
    Ok(announce)
}
