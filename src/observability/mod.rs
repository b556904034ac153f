//! What the server tells its operators about itself: Prometheus metrics (`metrics`), logs and
//! OpenTelemetry traces (`traces`). The bottom layer: it imports nothing of the crate, so every
//! other layer may record into it.
pub mod metrics;
pub mod traces;
