//! An HTTP user directory's answers as a client behind the real Envoy sees them, with the shipped
//! `envoy/subguard-sidecar-tcp.yaml` as is (its ext_authz timeout, `failure_mode_allow: false`,
//! `status_on_error: 503`) and subguard's `timeout_ms: 100`, well below Envoy's timeout:
//!
//! | the directory | the client gets |
//! |---|---|
//! | 404 | 403 `user_not_found` |
//! | 500 | 503 `directory_unavailable` with `retry-after` |
//! | slower than `timeout_ms` | 503 `directory_unavailable` from subguard (not Envoy's own timeout) |
//!
//! And `outage_response: error` (outages sent as `CheckResponse.error_response`): Envoy then treats
//! an outage as an authorization-service error. With the shipped `failure_mode_allow: false` the
//! client still gets subguard's 503; with `failure_mode_allow: true` the request goes to the
//! application unchecked. That is the trade-off these tests document.
//!
//! The directory's circuit breaker is off, so every outage here really asks the directory.
//!
//! Envoy comes from `$SUBGUARD_ENVOY` or `.venv/bin/envoy` (`make venv`); without it these tests
//! fail with that instruction, they are never skipped.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::directory_server::{Answer, DirectoryServer};
use common::envoy::{Envoy, EnvoyBuilder, Reply, shipped_config};
use common::{Algorithm, Subguard, TokenBuilder, Upstream};
use serde_json::json;

const ISS: &str = "https://idp.acme.test/";
const SHIPPED: &str = "subguard-sidecar-tcp.yaml";

fn config(directory: &DirectoryServer, outage_response: &str) -> String {
    format!(
        r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
outage_response: {outage_response}
directory:
  kind: http
  url: "{url}"
  timeout_ms: 100
  breaker:
    failure_threshold: 0
tenants:
  acme:
    issuers:
      - issuer: "{ISS}"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-a.jwks.json
"#,
        url = directory.url_template()
    )
}

struct Stack {
    directory: DirectoryServer,
    upstream: Upstream,
    subguard: Subguard,
    envoy: Envoy,
}

fn start_stack(outage_response: &str) -> Stack {
    let directory = DirectoryServer::start();
    directory.set("alice", Answer::user(json!({"id": "u-alice", "roles": ["reader"]})));
    directory.set("broken", Answer::status(500));
    // Far past timeout_ms (100) and past Envoy's own ext_authz timeout.
    directory.set("slow", Answer::user(json!({"id": "u-slow"})).delayed(Duration::from_secs(2)));
    let upstream = Upstream::start();
    let subguard = Subguard::start(&config(&directory, outage_response), "");
    let envoy = Envoy::start(shipped_config(SHIPPED), upstream.port(), subguard.grpc_addr().port());
    Stack { directory, upstream, subguard, envoy }
}

/// subguard with the default `outage_response: deny`, behind the shipped Envoy.
fn deny_stack() -> &'static Stack {
    static SHARED: OnceLock<Stack> = OnceLock::new();
    SHARED.get_or_init(|| start_stack("deny"))
}

/// subguard with `outage_response: error`, behind the shipped Envoy.
fn error_stack() -> &'static Stack {
    static SHARED: OnceLock<Stack> = OnceLock::new();
    SHARED.get_or_init(|| start_stack("error"))
}

/// A second Envoy in front of `stack`'s subguard and application, with the shipped config changed
/// to `failure_mode_allow: true` (fail open).
fn fail_open_envoy(stack: &Stack) -> Envoy {
    EnvoyBuilder::new(shipped_config(SHIPPED))
        .upstream_port(stack.upstream.port())
        .subguard_port(stack.subguard.grpc_addr().port())
        .replace("failure_mode_allow: false", "failure_mode_allow: true")
        .start()
}

fn bearer(sub: &str) -> String {
    let token = TokenBuilder::new("rsa-1", Algorithm::RS256).iss(ISS).aud("orders").sub(sub).build();
    format!("Bearer {token}")
}

/// `GET path` through Envoy as tenant acme with `sub`'s token, marked for the application's log.
async fn get_as(envoy: &Envoy, sub: &str, marker: &str, extra: &[(&str, &str)]) -> Reply {
    let bearer = bearer(sub);
    let mut headers =
        vec![("x-tenant-id", "acme"), ("authorization", bearer.as_str()), ("x-test-marker", marker)];
    headers.extend_from_slice(extra);
    envoy.get("/orders/1", &headers).await
}

/// subguard's own 503 `directory_unavailable`, as the client gets it.
#[track_caller]
fn assert_subguards_503(reply: &Reply) {
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(
        reply.header("x-subguard-reason"),
        Some("directory_unavailable"),
        "subguard's answer, not an Envoy-generated 503 (headers: {:?}, body: {})",
        reply.headers,
        reply.body
    );
    assert!(reply.header("retry-after").is_some_and(|s| s.parse::<u32>().is_ok()), "{:?}", reply.headers);
    assert!(reply.header("content-type").is_some_and(|c| c.starts_with("application/json")));
    let body = reply.json();
    assert_eq!(body["code"], "directory_unavailable");
    assert_eq!(body["tenant"], "acme");
}

// ---------------------------------------------------------------------------------------------
// outage_response: deny (the default)

#[tokio::test]
async fn a_found_user_reaches_the_application() {
    let s = deny_stack();
    let reply = get_as(&s.envoy, "alice", "found-1", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = s.upstream.saw("found-1").expect("the app got the request");
    assert_eq!(seen.header("x-user-id"), Some("u-alice"));
    assert_eq!(seen.header("x-user-roles"), Some("reader"));
}

#[tokio::test]
async fn directory_404_is_403_user_not_found() {
    let s = deny_stack();
    let reply = get_as(&s.envoy, "nobody", "nf-1", &[]).await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert_eq!(reply.header("x-subguard-reason"), Some("user_not_found"));
    assert_eq!(reply.json()["code"], "user_not_found");
    assert!(reply.header("retry-after").is_none(), "not an outage: {:?}", reply.headers);
    assert!(s.upstream.saw("nf-1").is_none());
    assert_eq!(s.directory.requests("acme", "nobody"), 1);
}

#[tokio::test]
async fn directory_500_is_503_directory_unavailable_with_retry_after() {
    let s = deny_stack();
    let reply = get_as(&s.envoy, "broken", "err-1", &[]).await;
    assert_subguards_503(&reply);
    assert!(s.upstream.saw("err-1").is_none());
}

#[tokio::test]
async fn a_directory_slower_than_timeout_ms_is_subguards_503_not_envoys_timeout() {
    let s = deny_stack();
    let reply = get_as(&s.envoy, "slow", "slow-1", &[]).await;
    assert_subguards_503(&reply);
    assert!(s.upstream.saw("slow-1").is_none());
}

#[tokio::test]
async fn with_outage_response_deny_failure_mode_allow_does_not_open_the_door() {
    // A deny is a decision, not an error: even a fail-open Envoy keeps it.
    let s = deny_stack();
    let envoy = fail_open_envoy(s);
    let reply = get_as(&envoy, "broken", "deny-open-1", &[]).await;
    assert_subguards_503(&reply);
    assert!(s.upstream.saw("deny-open-1").is_none());
}

// ---------------------------------------------------------------------------------------------
// outage_response: error

#[tokio::test]
async fn outage_response_error_with_the_shipped_config_still_gives_subguards_503() {
    let s = error_stack();
    for (sub, marker) in [("broken", "oe-500"), ("slow", "oe-slow")] {
        let reply = get_as(&s.envoy, sub, marker, &[]).await;
        assert_subguards_503(&reply);
        assert!(s.upstream.saw(marker).is_none(), "{sub}: fail closed");
    }
    // Decisions are unchanged.
    let reply = get_as(&s.envoy, "nobody", "oe-nf", &[]).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.header("x-subguard-reason"), Some("user_not_found"));
    assert_eq!(get_as(&s.envoy, "alice", "oe-ok", &[]).await.status, 200);
}

#[tokio::test]
async fn outage_response_error_with_failure_mode_allow_fails_open() {
    let s = error_stack();
    let envoy = fail_open_envoy(s);

    // The trade-off: during a directory outage the request reaches the application unchecked,
    // and the identity headers the client sent are not replaced by subguard's.
    let reply = get_as(&envoy, "broken", "open-1", &[("x-user-id", "forged-by-client")]).await;
    assert_eq!(reply.status, 200, "fail open: {}", reply.body);
    assert_eq!(reply.header("x-subguard-reason"), None);
    let seen = s.upstream.saw("open-1").expect("the app got the request");
    assert_eq!(seen.header("x-user-id"), Some("forged-by-client"), "{:?}", seen.headers);

    // Only outages fail open: a user the directory does not know is still denied.
    let reply = get_as(&envoy, "nobody", "open-nf", &[]).await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert_eq!(reply.header("x-subguard-reason"), Some("user_not_found"));
    assert!(s.upstream.saw("open-nf").is_none());
}
