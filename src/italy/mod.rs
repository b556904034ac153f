//! Italian identifiers and places (shared/DOMAIN.md §3).
pub mod codice_fiscale;
