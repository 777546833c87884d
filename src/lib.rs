//! subguard: an Envoy external-authorization sidecar that validates a request's JWT against its
//! tenant's issuers, resolves the token's `sub` in that tenant's user directory, and allows (with
//! trusted identity headers) or denies with a precise, stable reason.
//!
//! - [`config`]: the YAML schema and its validation into typed runtime values.
//! - [`check`]: the decision pipeline, free of gRPC types.
//! - [`keys`]: issuer key sets and their sources.
//! - [`directory`]: user directories.
//! - [`decision`]: the table of reasons.
//! - [`explain`]: `subguard explain`, the traced pipeline for one token.
//! - [`server`]: gRPC and admin listeners, Envoy request/response mapping, shutdown.

pub mod check;
pub mod config;
pub mod decision;
pub mod directory;
pub mod explain;
pub mod keys;
pub mod revocation;
pub mod server;
pub mod telemetry;
