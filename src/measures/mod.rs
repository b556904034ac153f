//! Periodic summaries (D.M. 15/12/1990 Modello 16 and 16-bis, the class V annual summary, the CRE
//! monthly summary) as FHIR Measures evaluated over the case register the rules keep: computed on
//! demand (`$evaluate-measure`) and stored once a period is over (`generate`).
pub mod definition;
pub mod evaluate;
pub mod generate;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A parameter (named first) that cannot be used.
    #[error("{1}")]
    Invalid(String, String),
    /// More than one evaluation may cost.
    #[error("{0}")]
    TooCostly(String),
}
