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

// Bad input never crashes the sidecar: a panic in a check would reset Envoy's stream, and Envoy
// would answer with its own reason-less status instead of subguard's reason. So the library has
// no `unwrap`, `expect` or explicit panic outside its unit tests; a `None` or an `Err` that
// "cannot happen" becomes `internal_error` (fail closed) or a startup error instead. Logs are JSON
// lines on stdout: nothing in the library prints around them.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::todo,
        clippy::unimplemented,
        clippy::dbg_macro,
        clippy::print_stdout,
        clippy::print_stderr
    )
)]

pub mod check;
pub mod config;
pub mod decision;
pub mod directory;
pub mod explain;
pub mod keys;
pub mod revocation;
pub mod server;
pub mod strict;
pub mod telemetry;
