//! Sentinella: an HL7 FHIR R4 server for Italian infectious-disease notification and CRE surveillance.
//!
//! The modules read as the pipeline: `api` (HTTP) → `fhir` (parsing, validation, search extraction)
//! → `store` (versioned storage on SQLite or PostgreSQL) → `surveillance` (the case definitions,
//! applied inside each write transaction) with `terminology` (the code lists they read) →
//! `subscriptions` (outbox events and their delivery). `auth` says who may do what; `audit` records
//! who read or wrote which case data.
pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod conformance;
pub mod error;
pub mod fhir;
pub mod italy;
pub mod measures;
pub mod observability;
pub mod server;
pub mod store;
pub mod subscriptions;
pub mod surveillance;
pub mod terminology;
