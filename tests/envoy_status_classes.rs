//! subguard behind the real Envoy, wired with the configs we ship in `envoy/` (ports and paths
//! substituted only): one deny per HTTP status class (400/401/403/404/503) as the client sees it,
//! the health-route bypass that path tricks cannot reach, and the Unix-socket sidecar config.
//! (What an allowed request carries to the application: `envoy_e2e.rs`.)
//!
//! Envoy comes from `.venv/bin/envoy` (`make venv`) or `$SUBGUARD_ENVOY`; a missing Envoy fails
//! these tests with instructions, it never skips them.

mod common;

use common::envoy::{Envoy, EnvoyBuilder, Reply, shipped_config};
use common::{Algorithm, ConfigDir, Subguard, TokenBuilder, Upstream, free_port};
use serde_json::Value;

const ISS_ACME: &str = "https://idp.acme.test/";
const ISS_GLOBEX: &str = "https://idp.globex.test/";

fn config(grpc: &str, dead_port: u16) -> String {
    format!(
        r#"
listen:
  grpc: "{grpc}"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
  host: "{{tenant}}.api.example.com"
shutdown_grace_seconds: 1
directory:
  kind: file
  path: users.yaml
tenants:
  acme:
    issuers:
      - issuer: "{ISS_ACME}"
        audiences: [orders]
        algorithms: [RS256, ES256]
        jwks_file: keys/issuer-a.jwks.json
  globex:
    issuers:
      - issuer: "{ISS_GLOBEX}"
        audiences: [orders]
        jwks_file: keys/issuer-b.jwks.json
  initech:
    issuers:
      - issuer: "https://idp.initech.test/"
        audiences: [orders]
        jwks_uri: "http://127.0.0.1:{dead_port}/jwks"
"#
    )
}

const USERS: &str = r#"
acme:
  - sub: alice
    id: u-1001
    roles: [admin, billing]
  - sub: bob
globex:
  - sub: u-77
"#;

/// subguard (TCP), the echo application and Envoy on `envoy/subguard-sidecar-tcp.yaml`.
struct Stack {
    subguard: Subguard,
    upstream: Upstream,
    envoy: common::envoy::Envoy,
}

impl Stack {
    fn start() -> Stack {
        let dir = ConfigDir::with(&config("127.0.0.1:0", free_port()), USERS);
        // The initech issuer's keys can never load, so /readyz stays 503: wait for listeners only.
        let subguard = Subguard::start_unready(dir);
        let upstream = Upstream::start();
        let envoy = EnvoyBuilder::new(shipped_config("subguard-sidecar-tcp.yaml"))
            .upstream_port(upstream.port())
            .subguard_port(subguard.grpc_addr().port())
            .start();
        Stack { subguard, upstream, envoy }
    }

    async fn get(&self, host: &str, headers: &[(&str, &str)]) -> Reply {
        get(&self.envoy, "/orders", host, headers).await
    }
}

/// `GET path` through `envoy` to `host` with `headers`.
async fn get(envoy: &Envoy, path: &str, host: &str, headers: &[(&str, &str)]) -> Reply {
    let mut all = vec![("host", host)];
    all.extend_from_slice(headers);
    envoy.get(path, &all).await
}

/// A GET with the path sent exactly as given (HTTP clients normalise `..` away before sending).
fn raw_get_status(port: u16, path: &str, host: &str) -> u16 {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to envoy");
    write!(conn, "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    let _ = conn.read_to_string(&mut reply);
    reply.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status line: {reply}"))
}

fn acme_token(sub: &str) -> String {
    TokenBuilder::new("rsa-1", Algorithm::RS256).iss(ISS_ACME).aud("orders").sub(sub).exp_in(300).build()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The access-log line Envoy wrote for the request with this `x-request-id`.
fn log_line(stack: &Stack, request_id: &str, expected_lines: usize) -> String {
    let lines = stack.envoy.access_log(expected_lines);
    lines
        .iter()
        .find(|l| l.contains(&format!("request_id={request_id}")))
        .cloned()
        .unwrap_or_else(|| panic!("no access-log line for {request_id}:\n{}", lines.join("\n")))
}

#[tokio::test(flavor = "multi_thread")]
async fn through_envoy_allow_and_deny_as_the_spec_says() {
    let stack = Stack::start();
    let alice = acme_token("alice");

    // (Allowed requests and their forwarded identity: envoy_e2e.rs.)
    let r = stack
        .get("acme.api.example.com", &[("authorization", &bearer(&alice)), ("x-request-id", "req-allow")])
        .await;
    assert_eq!(r.status, 200, "body: {}", r.body);
    assert_eq!(r.json()["x-user-id"], "u-1001");

    // 400: no tenant from header or host.
    let r = stack.get("localhost", &[("authorization", &bearer(&alice)), ("x-request-id", "req-400")]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-subguard-reason"), Some("missing_tenant"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["tenant"], Value::Null);
    assert!(log_line(&stack, "req-400", 2).contains("decision=deny reason=missing_tenant"));

    // 401 without a token: a bare challenge.
    let r = stack.get("acme.api.example.com", &[("x-request-id", "req-401a")]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-subguard-reason"), Some("missing_token"));
    assert_eq!(r.header("www-authenticate"), Some(r#"Bearer realm="acme""#));

    // 401 with an expired token: the RFC 6750 error form.
    let expired = TokenBuilder::new("rsa-1", Algorithm::RS256)
        .iss(ISS_ACME)
        .aud("orders")
        .sub("alice")
        .iat_ago(4000)
        .exp_in(-3600)
        .build();
    let r = stack
        .get("acme.api.example.com", &[("authorization", &bearer(&expired)), ("x-request-id", "req-401b")])
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-subguard-reason"), Some("token_expired"));
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"Bearer realm="acme", error="invalid_token", error_description="the token has expired""#)
    );
    let line = log_line(&stack, "req-401b", 4);
    assert!(line.contains(" 401 ") && line.contains("reason=token_expired tenant=acme"), "{line}");

    // 403: a validly signed token naming a user acme does not have. The body says so precisely.
    let r = stack
        .get(
            "acme.api.example.com",
            &[("authorization", &bearer(&acme_token("mallory"))), ("x-request-id", "req-403")],
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-subguard-reason"), Some("user_not_found"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.json(),
        serde_json::json!({
            "code": "user_not_found",
            "message": "no user with this sub in tenant acme",
            "tenant": "acme",
            "request_id": "req-403",
        })
    );
    assert!(!r.body.contains(&acme_token("mallory")[..40]));
    let line = log_line(&stack, "req-403", 5);
    assert!(line.contains("decision=deny reason=user_not_found tenant=acme sub=mallory"), "{line}");

    // globex's user, with globex's valid token, asked of acme: another tenant's issuer is untrusted.
    let globex = TokenBuilder::new("other-rsa", Algorithm::RS256)
        .iss(ISS_GLOBEX)
        .aud("orders")
        .sub("u-77")
        .exp_in(300)
        .build();
    let r = stack.get("acme.api.example.com", &[("authorization", &bearer(&globex))]).await;
    assert_eq!((r.status, r.header("x-subguard-reason")), (401, Some("untrusted_issuer")));
    let r = stack.get("globex.api.example.com", &[("authorization", &bearer(&globex))]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["x-user-id"], "u-77");

    // Header and host naming different tenants.
    let r = stack
        .get("acme.api.example.com", &[("authorization", &bearer(&alice)), ("x-tenant-id", "globex")])
        .await;
    assert_eq!((r.status, r.header("x-subguard-reason")), (403, Some("tenant_mismatch")));

    // 404: a tenant nobody configured.
    let r = stack.get("nope.api.example.com", &[("authorization", &bearer(&alice))]).await;
    assert_eq!((r.status, r.header("x-subguard-reason")), (404, Some("unknown_tenant")));

    // 503: the tenant's issuer keys never loaded. Not invalid_signature: an outage, with retry-after.
    let initech = TokenBuilder::new("rsa-1", Algorithm::RS256)
        .iss("https://idp.initech.test/")
        .aud("orders")
        .sub("x")
        .exp_in(300)
        .build();
    let r = stack
        .get("initech.api.example.com", &[("authorization", &bearer(&initech)), ("x-request-id", "req-503")])
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-subguard-reason"), Some("keys_unavailable"));
    assert_eq!(r.header("retry-after"), Some("5"));
    assert_eq!(r.json()["code"], "keys_unavailable");

    // Denied requests never reached the application.
    assert_eq!(stack.upstream.requests().len(), 2);

    // /healthz bypasses ext_authz by route, so probes need no token.
    let r = get(&stack.envoy, "/healthz", "localhost", &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.header("x-subguard-reason").is_none());

    // ...and only that exact path: tricks that look like it after normalisation are checked.
    for path in
        ["/healthz/../orders", "//healthz/../orders", "/healthzX", "/healthz/x", "/%2e%2e/healthz/../orders"]
    {
        let status = raw_get_status(stack.envoy.listener_port, path, "acme.api.example.com");
        assert!(
            status == 401 || status == 307 || status == 400,
            "{path} reached the app unchecked: {status}"
        );
    }

    // Nothing subguard logged carries a whole token.
    for line in stack.subguard.logs() {
        assert!(!line.contains(&alice) && !line.contains(&expired), "token in log: {line}");
    }
}

/// subguard on a Unix socket, the echo application, and Envoy on the shipped config `name`, which
/// reaches subguard at `/run/subguard/authz.sock`.
fn over_the_unix_socket(name: &str) -> (Subguard, Upstream, Envoy) {
    let dir = ConfigDir::new();
    let socket = dir.socket_path();
    dir.write_config(&config(&format!("unix://{}", socket.display()), free_port()));
    dir.write_users(USERS);
    let subguard = Subguard::start_unready(dir);
    let upstream = Upstream::start();
    let envoy = EnvoyBuilder::new(shipped_config(name))
        .upstream_port(upstream.port())
        .replace("path: /run/subguard/authz.sock", &format!("path: {}", socket.display()))
        .start();
    (subguard, upstream, envoy)
}

#[tokio::test(flavor = "multi_thread")]
async fn through_envoy_over_the_unix_socket_config() {
    let (subguard, _upstream, envoy) = over_the_unix_socket("subguard-sidecar.yaml");

    let r =
        get(&envoy, "/orders", "acme.api.example.com", &[("authorization", &bearer(&acme_token("alice")))])
            .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["x-user-id"], "u-1001");

    let r = get(
        &envoy,
        "/orders",
        "ACME.api.example.com:8443",
        &[("authorization", &bearer(&acme_token("ghost")))],
    )
    .await;
    assert_eq!((r.status, r.header("x-subguard-reason")), (403, Some("user_not_found")));
    drop(subguard);
}

/// `envoy/subguard-routes-pinned.yaml`: /acme/... is pinned to acme, /globex/... to globex, in any
/// case of the path; a first segment that only starts with a tenant's name (`/acme;v=1/`, which
/// servlet containers read as `/acme/`, `/acme%3B/`, `/acme./`) is refused; and the host pinned
/// to acme stays pinned with a trailing dot or an empty port. So a globex user cannot reach acme's
/// paths or host by another spelling of them.
#[tokio::test(flavor = "multi_thread")]
async fn routes_pinned_config_pins_every_spelling_of_a_tenants_path() {
    let (subguard, _upstream, envoy) = over_the_unix_socket("subguard-routes-pinned.yaml");
    let globex =
        TokenBuilder::new("other-rsa", Algorithm::RS256).iss(ISS_GLOBEX).aud("orders").sub("u-77").build();
    let headers = [("authorization", bearer(&globex)), ("x-tenant-id", "globex".to_string())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let status = |r: &Reply| (r.status, r.header("x-subguard-reason").map(str::to_string));
    for path in ["/globex/orders", "/globex", "/GLOBEX/orders", "/orders"] {
        let r = get(&envoy, path, "shared.internal", &headers).await;
        assert_eq!(status(&r), (200, None), "{path}: {}", r.body);
    }
    for path in ["/acme/orders", "/acme", "/ACME/orders", "/Acme/orders"] {
        let r = get(&envoy, path, "shared.internal", &headers).await;
        assert_eq!(status(&r), (403, Some("tenant_mismatch".into())), "{path}: {}", r.body);
    }
    for path in [
        "/acme;v=1/orders",
        "/ACME;x/orders",
        "/globex;x/orders",
        "/acme%3Bv=1/orders",
        "/acme%3bv=1/orders",
        "/acme./orders",
        "/acme%2e/orders",
        "/acme%20/orders",
        "/acme.",
        "/;/acme/orders",
        "/;v=1/acme/orders",
        "/%2e;/acme/orders",
        "/x/%2e%2e;/acme/orders",
        "/x/%2E%2E;jsessionid=1/acme/orders",
        "/x/..%3b/acme/orders",
    ] {
        let r = get(&envoy, path, "shared.internal", &headers).await;
        assert_eq!(r.status, 400, "{path}: {}", r.body);
    }
    // The host pinned to acme, however it is spelled: a globex token naming globex is refused.
    for host in [
        "orders.acme.internal",
        "orders.acme.internal:8080",
        "orders.acme.internal.",
        "orders.acme.internal.:8080",
        "orders.acme.internal:",
        "ORDERS.ACME.INTERNAL.",
    ] {
        let r = get(&envoy, "/orders", host, &headers).await;
        assert_eq!(status(&r), (403, Some("tenant_mismatch".into())), "{host}: {}", r.body);
    }
    // A host with userinfo is refused; a client's forwarded-host headers never reach the app.
    let r = get(&envoy, "/orders", "u@orders.acme.internal", &headers).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let mut forwarded = headers.clone();
    forwarded
        .extend([("x-forwarded-host", "orders.acme.internal"), ("forwarded", "host=orders.acme.internal")]);
    let r = get(&envoy, "/orders", "shared.internal", &forwarded).await;
    assert_eq!(status(&r), (200, None), "{}", r.body);
    for name in ["x-forwarded-host", "forwarded"] {
        assert!(r.json().get(name).is_none(), "{name} reached the app: {}", r.body);
    }
    drop(subguard);
}
