//! Shared helpers for the integration tests: token minting, the real `subguard` binary, a gRPC
//! `Check` client, fixture HTTP servers (an IdP's JWKS endpoint, an echo upstream) and the real
//! Envoy.
//!
//! Every test file compiles this module separately and uses only part of it.
#![allow(dead_code, unused_imports)]

pub mod check;
pub mod directory_server;
pub mod envoy;
pub mod http_fixture;
pub mod jwks_server;
pub mod metrics;
pub mod redis_server;
pub mod subguard;
pub mod tokens;
pub mod upstream;

pub use check::{CheckCall, CheckClient, Outcome};
pub use jwks_server::JwksServer;
pub use subguard::{ConfigDir, Subguard};
pub use tokens::{Algorithm, TokenBuilder, mint_raw, now};
pub use upstream::Upstream;

use std::path::PathBuf;

/// `tests/fixtures/keys/`: the signing keys (`<kid>.pem`) and JWKS files.
pub fn keys_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys")
}

/// A JWKS fixture file's text (`issuer-a.jwks.json`, `issuer-a-rotated.jwks.json`, ...).
pub fn jwks_text(name: &str) -> String {
    let path = keys_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Sends `signal` (`"TERM"`, `"HUP"`, `"STOP"`, ...) to process `pid` with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg("-s")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -s {signal} {pid} failed");
}

/// Makes a named pipe at `path` with mkfifo(1): a file whose open blocks until something writes.
pub fn mkfifo(path: &std::path::Path) {
    let status = std::process::Command::new("mkfifo").arg(path).status().expect("running mkfifo");
    assert!(status.success(), "mkfifo {} failed", path.display());
}

/// A port that was free a moment ago (bind `127.0.0.1:0`, read the port, release it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
