//! The decision of SPEC §3, asked over gRPC of the real `subguard` binary.
//!
//! Every test sends one `CheckRequest` the way Envoy would and asserts the whole answer a client
//! or an operator sees: allow headers, or the deny status, reason header, `www-authenticate`,
//! `retry-after`, JSON body; and the dynamic metadata in both cases.
//!
//! One subguard serves the whole file (its config is below); scenarios that need another config
//! (strip_authorization, a key URL that is down, a Unix socket) start their own.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::check::CheckCall;
use common::tokens::{b64, mint_raw, sign_segments, with_payload};
use common::{Algorithm, ConfigDir, Outcome, Subguard, TokenBuilder, now};
use serde_json::{Value, json};

const ISS_ACME: &str = "https://idp.acme.test/";
const ISS_GLOBEX: &str = "https://idp.globex.test/";
const ISS_INITECH: &str = "https://idp.initech.test/";

/// A user with a directory id and roles.
const ADMIN_SUB: &str = "5b7e0a52-0e6f-4c1e-9d1a-0c2f3e4d5a6b";
/// A user with neither id nor roles: forwarded as its sub, roles header absent.
const PLAIN_SUB: &str = "plain-user";
const DISABLED_SUB: &str = "alice@acme.test";
/// `tokens_valid_after` = the time the shared subguard started − 1000 s.
const REVOKED_SUB: &str = "revoked-before";
/// Disabled, and with the same `tokens_valid_after`.
const GONE_SUB: &str = "gone@acme.test";

const MAX_BYTES: usize = 4096;

const CONFIG: &str = r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
  host: "{tenant}.api.example.com"
token:
  max_bytes: 4096
  leeway_seconds: 60
keys:
  refresh_seconds: 300
  min_refetch_seconds: 10
shutdown_grace_seconds: 1
directory:
  kind: file
  path: users.yaml
forward:
  tenant_header: x-tenant-id
  user_header: x-user-id
  roles_header: x-user-roles
  strip_authorization: false
tenants:
  acme:
    issuers:
      - issuer: "https://idp.acme.test/"
        audiences: ["orders"]
        algorithms: ["RS256", "PS256", "ES256", "EdDSA"]
        jwks_file: keys/issuer-a.jwks.json
  globex:
    issuers:
      - issuer: "https://idp.globex.test/"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-b.jwks.json
  initech:
    issuers:
      - issuer: "https://idp.initech.test/"
        audiences: ["billing"]
        algorithms: ["ES384"]
        jwks_file: keys/issuer-a.jwks.json
"#;

fn users_yaml(revoke_at: i64) -> String {
    format!(
        r#"
acme:
  - sub: "{ADMIN_SUB}"
    id: "u-1001"
    roles: [admin, billing]
  - sub: "{PLAIN_SUB}"
  - sub: "{DISABLED_SUB}"
    disabled: true
  - sub: "{REVOKED_SUB}"
    id: "u-2002"
    tokens_valid_after: {revoke_at}
  - sub: "{GONE_SUB}"
    disabled: true
    tokens_valid_after: {revoke_at}
globex:
  - sub: "u-77"
initech:
  - sub: "u-9"
"#
    )
}

/// The subguard every test of this file shares (it never outlives the test process).
fn shared() -> &'static Subguard {
    static SHARED: OnceLock<Subguard> = OnceLock::new();
    SHARED.get_or_init(|| Subguard::start(CONFIG, &users_yaml(revoke_at())))
}

/// The `tokens_valid_after` of [`REVOKED_SUB`] in the shared subguard's users file.
fn revoke_at() -> i64 {
    static AT: OnceLock<i64> = OnceLock::new();
    *AT.get_or_init(|| now() - 1000)
}

async fn ask(call: CheckCall) -> Outcome {
    shared().client().await.call(&call).await
}

/// A valid acme token for the admin user, signed by `kid` with `alg`.
fn acme(kid: &str, alg: Algorithm) -> TokenBuilder {
    TokenBuilder::new(kid, alg).iss(ISS_ACME).aud("orders").sub(ADMIN_SUB)
}

fn acme_rs256() -> TokenBuilder {
    acme("rsa-1", Algorithm::RS256)
}

/// Sends `token` for tenant acme (header source).
async fn ask_acme(token: &str) -> Outcome {
    ask(CheckCall::new().tenant("acme").bearer(token)).await
}

// ---------------------------------------------------------------------------------------------
// Assertions shared by every deny.

/// Asserts the complete deny contract of SPEC §3 for `code` and returns the body.
#[track_caller]
fn assert_deny(out: &Outcome, code: &str, status: u16, tenant: Option<&str>) -> Value {
    let ctx = format!("expected deny {code}/{status}, got {out:#?}");
    assert!(!out.allowed, "{ctx}");
    assert_ne!(out.grpc_code, 0, "a deny carries a non-OK gRPC status; {ctx}");
    assert_eq!(out.http_response, "denied", "{ctx}");
    assert_eq!(out.status, Some(status), "{ctx}");
    assert_eq!(out.header("x-subguard-reason"), Some(code), "{ctx}");
    assert_eq!(out.header("content-type"), Some("application/json"), "{ctx}");

    // Body: one JSON object with exactly these members.
    let body =
        out.body.as_object().unwrap_or_else(|| panic!("body is not a JSON object: {:?}", out.raw_body));
    let mut keys: Vec<&str> = body.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["code", "message", "request_id", "tenant"], "{ctx}");
    assert_eq!(body["code"], code, "{ctx}");
    let message = body["message"].as_str().expect("message is a string");
    assert!(!message.is_empty(), "{ctx}");
    if let Some(t) = tenant {
        assert_eq!(body["tenant"], t, "{ctx}");
    }

    // 401s carry an RFC 6750 challenge; error_description repeats the message.
    let challenge = out.header("www-authenticate");
    if status == 401 {
        let t = tenant.expect("a 401 always knows its tenant");
        let expected = if code == "missing_token" {
            format!(r#"Bearer realm="{t}""#)
        } else {
            assert!(!message.contains('"') && !message.contains('\\'), "{ctx}");
            format!(r#"Bearer realm="{t}", error="invalid_token", error_description="{message}""#)
        };
        assert_eq!(challenge, Some(expected.as_str()), "{ctx}");
    } else {
        assert_eq!(challenge, None, "www-authenticate only on 401; {ctx}");
    }

    // 503s say when to retry.
    if status == 503 {
        let retry = out.header("retry-after").unwrap_or_else(|| panic!("503 without retry-after; {ctx}"));
        assert!(retry.parse::<u32>().is_ok_and(|s| s > 0), "retry-after is positive seconds: {retry:?}");
    } else {
        assert_eq!(out.header("retry-after"), None, "{ctx}");
    }

    assert_eq!(out.meta("decision"), Some("deny"), "{ctx}");
    assert_eq!(out.meta("reason"), Some(code), "{ctx}");
    if let Some(t) = tenant {
        assert_eq!(out.meta("tenant"), Some(t), "{ctx}");
    }
    out.body.clone()
}

/// Denied with a 401 for tenant acme, and the token is nowhere in the answer.
#[track_caller]
fn assert_acme_401(out: &Outcome, code: &str, token: &str) {
    assert_deny(out, code, 401, Some("acme"));
    assert_no_echo(out, token);
}

#[track_caller]
fn assert_no_echo(out: &Outcome, token: &str) {
    if token.len() < 8 {
        return;
    }
    assert!(!out.raw_body.contains(token), "the body echoes the token: {}", out.raw_body);
    for (k, v) in &out.headers {
        assert!(!v.contains(token), "header {k} echoes the token");
    }
    // Not even a recognisable part of it (the signature segment is the secret-ish part).
    if let Some(sig) = token.split('.').nth(2).filter(|s| s.len() >= 16) {
        assert!(!out.raw_body.contains(sig), "the body echoes the signature");
    }
}

#[track_caller]
fn assert_allowed(out: &Outcome) {
    assert!(out.allowed, "expected allow, got {out:#?}");
    assert_eq!(out.grpc_code, 0);
    assert_eq!(out.http_response, "ok", "{out:#?}");
    assert_eq!(out.meta("decision"), Some("allow"), "{out:#?}");
    assert_eq!(out.meta("reason"), Some("ok"), "{out:#?}");
}

// ---------------------------------------------------------------------------------------------
// Allow.

#[tokio::test]
async fn allow_forwards_tenant_user_id_and_roles() {
    let token = acme_rs256().build();
    let out = ask(CheckCall::new().tenant("acme").bearer(&token).request_id("req-1")).await;
    assert_allowed(&out);
    assert_eq!(out.header_all("x-tenant-id"), ["acme"]);
    assert_eq!(out.header_all("x-user-id"), ["u-1001"], "the directory's id, not the sub");
    assert_eq!(out.header_all("x-user-roles"), ["admin,billing"]);
    assert!(!out.removes("authorization"), "strip_authorization is false: {out:#?}");
    assert_eq!(out.meta("tenant"), Some("acme"));
    assert_eq!(out.meta("sub"), Some(ADMIN_SUB));
    assert_eq!(out.meta("issuer"), Some(ISS_ACME));
    assert_eq!(out.status, None);
}

#[tokio::test]
async fn allow_without_directory_id_forwards_the_sub_and_removes_roles_header() {
    let token = acme_rs256().sub(PLAIN_SUB).build();
    // The client tries to choose its own identity.
    let out = ask(CheckCall::new()
        .tenant("acme")
        .bearer(&token)
        .header("x-user-id", "root")
        .header("x-user-roles", "admin"))
    .await;
    assert_allowed(&out);
    assert_eq!(out.header_all("x-user-id"), ["plain-user"]);
    assert!(out.header("x-user-roles").is_none(), "no roles: no roles header: {out:#?}");
    assert!(out.removes("x-user-roles"), "the client's roles header is removed: {out:#?}");
    assert_eq!(out.meta("sub"), Some(PLAIN_SUB));
}

#[tokio::test]
async fn allow_removes_roles_header_even_when_the_client_sent_none() {
    let token = acme_rs256().sub(PLAIN_SUB).build();
    let out = ask_acme(&token).await;
    assert_allowed(&out);
    assert!(out.header("x-user-roles").is_none());
    assert!(out.removes("x-user-roles"), "{out:#?}");
}

#[tokio::test]
async fn allow_rs256() {
    assert_allowed(&ask_acme(&acme("rsa-1", Algorithm::RS256).build()).await);
}

#[tokio::test]
async fn allow_ps256_with_the_same_rsa_key() {
    assert_allowed(&ask_acme(&acme("rsa-1", Algorithm::PS256).build()).await);
}

#[tokio::test]
async fn allow_es256() {
    assert_allowed(&ask_acme(&acme("ec-256", Algorithm::ES256).build()).await);
}

#[tokio::test]
async fn allow_eddsa() {
    assert_allowed(&ask_acme(&acme("ed-1", Algorithm::EdDSA).build()).await);
}

#[tokio::test]
async fn allow_es384_where_the_issuer_lists_it() {
    let token =
        TokenBuilder::new("ec-384", Algorithm::ES384).iss(ISS_INITECH).aud("billing").sub("u-9").build();
    let out = ask(CheckCall::new().tenant("initech").bearer(&token)).await;
    assert_allowed(&out);
    assert_eq!(out.header("x-tenant-id"), Some("initech"));
    assert_eq!(out.header("x-user-id"), Some("u-9"));
    assert_eq!(out.meta("issuer"), Some(ISS_INITECH));
}

#[tokio::test]
async fn allow_token_without_kid_tries_keys_of_the_algorithms_type() {
    let rsa = acme_rs256().without_header("kid").build();
    assert_allowed(&ask_acme(&rsa).await);
    let ec = acme("ec-256", Algorithm::ES256).without_header("kid").build();
    assert_allowed(&ask_acme(&ec).await);
}

#[tokio::test]
async fn allow_bearer_scheme_is_case_insensitive() {
    let token = acme_rs256().build();
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let out =
            ask(CheckCall::new().tenant("acme").header("authorization", &format!("{scheme} {token}"))).await;
        assert_allowed(&out);
    }
}

#[tokio::test]
async fn allow_with_audience_array_containing_an_accepted_audience() {
    let token = acme_rs256().aud(json!(["billing", "orders"])).build();
    assert_allowed(&ask_acme(&token).await);
}

#[tokio::test]
async fn allow_reads_headers_from_header_map_as_with_encode_raw_headers() {
    let token = acme_rs256().build();
    let out = ask(CheckCall::new().raw_headers().tenant("acme").bearer(&token)).await;
    assert_allowed(&out);
    assert_eq!(out.header("x-user-id"), Some("u-1001"));

    // The host arrives as `:authority` in the header map too.
    let out = ask(CheckCall::new().raw_headers().host("acme.api.example.com").bearer(&token)).await;
    assert_allowed(&out);
    assert_eq!(out.header("x-tenant-id"), Some("acme"));

    let out = ask(CheckCall::new().raw_headers().tenant("acme")).await;
    assert_deny(&out, "missing_token", 401, Some("acme"));
}

#[tokio::test]
async fn check_helper_puts_headers_host_and_route_into_the_request() {
    let token = acme_rs256().build();
    let auth = format!("Bearer {token}");
    let mut client = shared().client().await;
    let out = client.check(&[("Authorization", &auth)], "acme.api.example.com", &[("tenant", "acme")]).await;
    assert_allowed(&out);
    let out = client.check_raw(&[("authorization", &auth)], "acme.api.example.com", &[]).await;
    assert_allowed(&out);
}

// ---------------------------------------------------------------------------------------------
// Tenant.

#[tokio::test]
async fn tenant_from_host_ignores_port_case_and_trailing_dot() {
    let token = acme_rs256().build();
    for host in [
        "acme.api.example.com",
        "ACME.Api.Example.COM:8443",
        "acme.api.example.com.",
        "acme.api.example.com:443",
    ] {
        let out = ask(CheckCall::new().host(host).bearer(&token)).await;
        assert_allowed(&out);
        assert_eq!(out.header("x-tenant-id"), Some("acme"), "host {host}");
        assert_eq!(out.meta("tenant"), Some("acme"), "host {host}");
    }
}

#[tokio::test]
async fn tenant_header_value_is_lowercased() {
    let token = acme_rs256().build();
    let out = ask(CheckCall::new().tenant("ACME").bearer(&token)).await;
    assert_allowed(&out);
    assert_eq!(out.header("x-tenant-id"), Some("acme"));
}

#[tokio::test]
async fn tenant_from_route_context_extensions_alone() {
    let token = acme_rs256().build();
    for route in ["acme", "ACME"] {
        let out = ask(CheckCall::new().route_tenant(route).bearer(&token)).await;
        assert_allowed(&out);
        assert_eq!(out.header("x-tenant-id"), Some("acme"));
    }
}

#[tokio::test]
async fn tenant_sources_that_agree_allow() {
    let token = acme_rs256().build();
    let out =
        ask(CheckCall::new().tenant("acme").host("acme.api.example.com").route_tenant("acme").bearer(&token))
            .await;
    assert_allowed(&out);
}

#[tokio::test]
async fn host_outside_the_pattern_is_not_a_tenant_source() {
    let token = acme_rs256().build();
    let out = ask(CheckCall::new().tenant("acme").host("orders.internal:8080").bearer(&token)).await;
    assert_allowed(&out);
}

#[tokio::test]
async fn tenant_mismatch_header_vs_host() {
    let token = acme_rs256().build();
    let out = ask(CheckCall::new().tenant("acme").host("globex.api.example.com").bearer(&token)).await;
    assert_deny(&out, "tenant_mismatch", 403, None);
    assert_no_echo(&out, &token);
}

#[tokio::test]
async fn tenant_mismatch_header_vs_route() {
    let token = acme_rs256().build();
    let out = ask(CheckCall::new().tenant("acme").route_tenant("globex").bearer(&token)).await;
    assert_deny(&out, "tenant_mismatch", 403, None);
}

#[tokio::test]
async fn tenant_mismatch_host_vs_route() {
    let token = acme_rs256().build();
    let out = ask(CheckCall::new().host("acme.api.example.com").route_tenant("globex").bearer(&token)).await;
    assert_deny(&out, "tenant_mismatch", 403, None);
}

/// A route's pin comes from the operator's Envoy config. One that is present but no tenant name
/// (an unset template value rendered as "", a stray space, an underscore) never hands the choice
/// back to the client: beside a header or host it is `tenant_mismatch`, alone `missing_tenant`.
#[tokio::test]
async fn a_route_pin_that_is_no_tenant_name_fails_closed() {
    let token = acme_rs256().build();
    for pin in ["", "acme ", " ", "acme_prod", "-acme"] {
        let out = ask(CheckCall::new().tenant("acme").route_tenant(pin).bearer(&token)).await;
        assert_deny(&out, "tenant_mismatch", 403, None);
        let out = ask(CheckCall::new().host("acme.api.example.com").route_tenant(pin).bearer(&token)).await;
        assert_deny(&out, "tenant_mismatch", 403, None);
        let out = ask(CheckCall::new().route_tenant(pin).bearer(&token)).await;
        assert_deny(&out, "missing_tenant", 400, None);
    }
    let detail = r#"the route pins tenant \"acme \", which is not a tenant name"#;
    assert!(!shared().logged(detail).is_empty(), "no deny logged with {detail}");
}

#[tokio::test]
async fn missing_tenant_without_any_source() {
    let token = acme_rs256().build();
    let out = ask(CheckCall::new().bearer(&token).request_id("req-mt")).await;
    let body = assert_deny(&out, "missing_tenant", 400, None);
    assert_eq!(body["tenant"], Value::Null);
    assert_eq!(body["request_id"], "req-mt");
    assert_eq!(out.meta("tenant"), None, "no tenant is known: {out:#?}");
    assert_no_echo(&out, &token);
}

#[tokio::test]
async fn missing_tenant_when_the_value_is_not_a_dns_label() {
    let token = acme_rs256().build();
    for bad in ["acme_corp", "-acme", "acme-", "ac me", "acme.corp", "", &"a".repeat(64), "ácme"] {
        let out = ask(CheckCall::new().tenant(bad).bearer(&token)).await;
        let body = assert_deny(&out, "missing_tenant", 400, None);
        assert_eq!(body["tenant"], Value::Null, "tenant {bad:?}");
    }
    let out = ask(CheckCall::new().host("bad_label.api.example.com").bearer(&token)).await;
    assert_deny(&out, "missing_tenant", 400, None);
}

#[tokio::test]
async fn missing_tenant_when_the_tenant_header_is_repeated() {
    // Envoy joins a repeated header with a comma: `acme,acme` is not a DNS label.
    let token = acme_rs256().build();
    let out = ask(CheckCall::new().tenant("acme").tenant("acme").bearer(&token)).await;
    assert_deny(&out, "missing_tenant", 400, None);
}

/// Every combination of the three tenant sources (header, host, route), each absent, not a DNS
/// label, acme in either case, globex or an unknown tenant, with acme's token: a header or host
/// value that is not a label counts as no tenant, a route's is a mismatch with any tenant named
/// (`a_route_pin_that_is_no_tenant_name_fails_closed`), the others must all name one tenant, and
/// that tenant decides.
#[tokio::test]
async fn every_combination_of_tenant_sources_follows_the_rule() {
    let values = [None, Some("bad_label"), Some("acme"), Some("ACME"), Some("globex"), Some("nope")];
    let token = acme_rs256().build();
    let mut client = shared().client().await;
    let mut wrong = Vec::new();
    for header in values {
        for host in values {
            for route in values {
                let mut call = CheckCall::new().bearer(&token);
                if let Some(v) = header {
                    call = call.tenant(v);
                }
                if let Some(v) = host {
                    call = call.host(&format!("{v}.api.example.com"));
                }
                if let Some(v) = route {
                    call = call.route_tenant(v);
                }
                let mut named: Vec<String> = [header, host, route]
                    .into_iter()
                    .flatten()
                    .filter(|v| *v != "bad_label")
                    .map(str::to_ascii_lowercase)
                    .collect();
                named.sort();
                named.dedup();
                // A route's pin that is no tenant name fails closed (the operator set it).
                let bad_pin = route == Some("bad_label");
                let expected = match named.as_slice() {
                    [] => "missing_tenant",
                    _ if bad_pin => "tenant_mismatch",
                    [one] if one == "acme" => "ok",
                    [one] if one == "globex" => "untrusted_issuer",
                    [_] => "unknown_tenant",
                    _ => "tenant_mismatch",
                };
                let out = client.call(&call).await;
                if !out.answers(expected) {
                    wrong.push(format!(
                        "header {header:?}, host {host:?}, route {route:?}: expected {expected}, got {:?}",
                        out.meta("reason")
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{} of 216 answers wrong:\n{}", wrong.len(), wrong.join("\n"));
}

#[tokio::test]
async fn unknown_tenant_is_404() {
    let token = acme_rs256().build();
    let out = ask(CheckCall::new().tenant("umbrella").bearer(&token)).await;
    assert_deny(&out, "unknown_tenant", 404, None);
    assert_no_echo(&out, &token);
}

// ---------------------------------------------------------------------------------------------
// Token presence and shape.

#[tokio::test]
async fn missing_token_without_authorization() {
    let out = ask(CheckCall::new().tenant("acme").request_id("req-42")).await;
    let body = assert_deny(&out, "missing_token", 401, Some("acme"));
    assert_eq!(out.header("www-authenticate"), Some(r#"Bearer realm="acme""#));
    assert_eq!(body["request_id"], "req-42");
    assert_eq!(body["tenant"], "acme");
}

#[tokio::test]
async fn request_id_is_escaped_into_a_valid_json_body() {
    let id = r#"abc"def\ghi</script>{"x":1}"#;
    let out = ask(CheckCall::new().tenant("acme").request_id(id)).await;
    let body = assert_deny(&out, "missing_token", 401, Some("acme"));
    assert_eq!(body["request_id"], id, "raw body: {}", out.raw_body);
}

#[tokio::test]
async fn request_id_is_null_without_x_request_id() {
    let out = ask(CheckCall::new().tenant("acme")).await;
    let body = assert_deny(&out, "missing_token", 401, Some("acme"));
    assert_eq!(body["request_id"], Value::Null);
}

#[tokio::test]
async fn missing_token_with_empty_bearer() {
    for value in ["Bearer ", "Bearer", "Bearer    "] {
        let out = ask(CheckCall::new().tenant("acme").header("authorization", value)).await;
        assert_deny(&out, "missing_token", 401, Some("acme"));
    }
}

#[tokio::test]
async fn missing_token_with_another_scheme() {
    let out =
        ask(CheckCall::new().tenant("acme").header("authorization", "Basic dXNlcjpwYXNzd29yZA==")).await;
    assert_deny(&out, "missing_token", 401, Some("acme"));
    let token = acme_rs256().build();
    let out = ask(CheckCall::new().tenant("acme").header("authorization", &format!("Token {token}"))).await;
    assert_deny(&out, "missing_token", 401, Some("acme"));
    assert_no_echo(&out, &token);
}

#[tokio::test]
async fn repeated_authorization_headers_never_form_a_valid_token() {
    // Envoy joins them: `Bearer a.b.c,Bearer d.e.f`. Spec: never a valid value.
    let t1 = acme_rs256().build();
    let t2 = acme_rs256().sub(PLAIN_SUB).build();
    let out = ask(CheckCall::new().tenant("acme").bearer(&t1).bearer(&t2)).await;
    assert!(!out.allowed, "{out:#?}");
    // The joined value is not one token: either no usable bearer or not a compact JWS.
    let reason = out.reason().unwrap_or_default().to_string();
    assert!(["malformed_token", "missing_token"].contains(&reason.as_str()), "{out:#?}");
    assert_acme_401(&out, &reason, &t1);
    assert_no_echo(&out, &t2);
}

#[tokio::test]
async fn malformed_token_longer_than_max_bytes() {
    let token = acme_rs256().claim("pad", json!("x".repeat(MAX_BYTES))).build();
    assert!(token.len() > MAX_BYTES);
    assert_acme_401(&ask_acme(&token).await, "malformed_token", &token);
}

#[tokio::test]
async fn token_just_under_max_bytes_is_accepted() {
    // max_bytes applies to the token itself, not to the `Bearer ` prefix.
    let base = acme_rs256().claim("pad", json!("")).build().len();
    // Each 3 bytes of claim text grow the payload segment by 4 characters.
    let pad = (MAX_BYTES - base) * 3 / 4 - 3;
    let token = acme_rs256().claim("pad", json!("x".repeat(pad))).build();
    assert!(token.len() <= MAX_BYTES && token.len() > MAX_BYTES - 8, "len {}", token.len());
    assert_allowed(&ask_acme(&token).await);
}

#[tokio::test]
async fn malformed_token_with_crit_header() {
    let token = acme_rs256().header("crit", json!(["exp"])).build();
    assert_acme_401(&ask_acme(&token).await, "malformed_token", &token);
}

#[tokio::test]
async fn malformed_token_not_three_segments() {
    let token = acme_rs256().build();
    let parts: Vec<&str> = token.split('.').collect();
    let two = format!("{}.{}", parts[0], parts[1]);
    let four = format!("{token}.{}", parts[2]);
    for bad in [two.as_str(), four.as_str(), "not-a-jwt", "a.b", "..", "...."] {
        let out = ask_acme(bad).await;
        assert_deny(&out, "malformed_token", 401, Some("acme"));
    }
}

#[tokio::test]
async fn malformed_token_bad_base64url() {
    let token = acme_rs256().build();
    let parts: Vec<&str> = token.split('.').collect();
    let bad_header = format!("!!{}.{}.{}", parts[0], parts[1], parts[2]);
    let bad_payload = format!("{}.{}*.{}", parts[0], parts[1], parts[2]);
    let bad_signature = format!("{}.{}.{}+/=", parts[0], parts[1], parts[2]);
    for bad in [bad_header, bad_payload, bad_signature] {
        assert_acme_401(&ask_acme(&bad).await, "malformed_token", &bad);
    }
}

#[tokio::test]
async fn malformed_token_header_or_payload_not_json() {
    let header = r#"{"alg":"RS256","typ":"JWT","kid":"rsa-1"}"#;
    let claims = acme_rs256().claims().clone();
    let payload = serde_json::to_string(&claims).unwrap();
    let bad_header = mint_raw("{\"alg\":\"RS256\",", &payload, "rsa-1", Algorithm::RS256);
    let bad_payload = mint_raw(header, "not json", "rsa-1", Algorithm::RS256);
    let array_payload = mint_raw(header, "[1,2,3]", "rsa-1", Algorithm::RS256);
    for bad in [bad_header, bad_payload, array_payload] {
        assert_acme_401(&ask_acme(&bad).await, "malformed_token", &bad);
    }
}

#[tokio::test]
async fn malformed_token_when_a_claim_has_the_wrong_json_type() {
    let cases = [
        acme_rs256().claim("exp", json!((now() + 300).to_string())),
        acme_rs256().claim("nbf", json!("yesterday")),
        acme_rs256().claim("iat", json!(true)),
        acme_rs256().claim("sub", json!(1001)),
        acme_rs256().claim("aud", json!(42)),
        acme_rs256().claim("aud", json!(["orders", 7])),
        acme_rs256().claim("iss", json!(["https://idp.acme.test/"])),
    ];
    for case in cases {
        let token = case.build();
        let out = ask_acme(&token).await;
        assert!(!out.allowed, "claims {:?} must not pass", case.claims());
        assert_acme_401(&out, "malformed_token", &token);
    }
}

#[tokio::test]
async fn malformed_token_when_a_header_member_has_the_wrong_json_type() {
    let claims = serde_json::to_string(acme_rs256().claims()).unwrap();
    for header in [
        r#"{"alg":256,"kid":"rsa-1"}"#,
        r#"{"alg":"RS256","kid":1}"#,
        r#"{"alg":["RS256"],"kid":"rsa-1"}"#,
        r#""RS256""#,
    ] {
        let token = mint_raw(header, &claims, "rsa-1", Algorithm::RS256);
        let out = ask_acme(&token).await;
        assert!(!out.allowed, "header {header} must not pass");
        assert_acme_401(&out, "malformed_token", &token);
    }
}

#[tokio::test]
async fn numeric_dates_may_be_fractional() {
    // RFC 7519 §2: a NumericDate is a JSON number and "non-integer values can be represented".
    let t = now() as f64;
    let token = acme_rs256()
        .claim("exp", json!(t + 300.5))
        .claim("iat", json!(t - 0.25))
        .claim("nbf", json!(t - 1.5))
        .build();
    assert_allowed(&ask_acme(&token).await);
    let token = acme_rs256().claim("exp", json!(t - 120.5)).build();
    assert_acme_401(&ask_acme(&token).await, "token_expired", &token);
}

// ---------------------------------------------------------------------------------------------
// Issuer, algorithm, key, signature.

#[tokio::test]
async fn untrusted_issuer_when_iss_is_absent() {
    let token = acme_rs256().without("iss").build();
    assert_acme_401(&ask_acme(&token).await, "untrusted_issuer", &token);
}

#[tokio::test]
async fn untrusted_issuer_for_another_tenants_issuer() {
    // A perfectly valid globex token presented to acme.
    let token =
        TokenBuilder::new("other-rsa", Algorithm::RS256).iss(ISS_GLOBEX).aud("orders").sub("u-77").build();
    assert_allowed(&ask(CheckCall::new().tenant("globex").bearer(&token)).await);
    assert_acme_401(&ask_acme(&token).await, "untrusted_issuer", &token);
}

#[tokio::test]
async fn untrusted_issuer_compares_iss_exactly() {
    for iss in
        ["https://evil.test/", "https://idp.acme.test", "https://IDP.acme.test/", "https://idp.acme.test/ "]
    {
        let token = acme_rs256().iss(iss).build();
        assert_acme_401(&ask_acme(&token).await, "untrusted_issuer", &token);
    }
}

#[tokio::test]
async fn unsupported_algorithm_not_in_the_issuers_list() {
    let token = acme("rsa-1", Algorithm::RS384).build();
    assert_acme_401(&ask_acme(&token).await, "unsupported_algorithm", &token);
}

#[tokio::test]
async fn unsupported_algorithm_es384_when_only_es256_is_allowed() {
    let token = acme("ec-384", Algorithm::ES384).build();
    assert_acme_401(&ask_acme(&token).await, "unsupported_algorithm", &token);
}

#[tokio::test]
async fn unsupported_algorithm_none_never_passes() {
    let claims = serde_json::to_string(acme_rs256().claims()).unwrap();
    for header in [
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"none","kid":"rsa-1"}"#,
        r#"{"alg":"None"}"#,
        r#"{"alg":"NONE"}"#,
    ] {
        let unsigned = format!("{}.{}.", b64(header), b64(&claims));
        let out = ask_acme(&unsigned).await;
        assert!(!out.allowed, "alg {header} must never pass");
        assert_acme_401(&out, "unsupported_algorithm", &unsigned);
    }
}

#[tokio::test]
async fn unsupported_algorithm_hs256_signed_with_the_public_key() {
    // The classic confusion attack: HMAC keyed with the issuer's public key material.
    let public_jwks = common::jwks_text("issuer-a.jwks.json");
    let token = acme("rsa-1", Algorithm::HS256).hmac_secret(public_jwks.as_bytes()).build();
    assert_acme_401(&ask_acme(&token).await, "unsupported_algorithm", &token);
}

#[tokio::test]
async fn unsupported_algorithm_when_alg_does_not_fit_the_keys_type() {
    // RS256 is allowed for the issuer, but kid ec-256 is an EC key.
    let token = acme("ec-256", Algorithm::RS256).signed_by("rsa-1").build();
    assert_acme_401(&ask_acme(&token).await, "unsupported_algorithm", &token);
    // ES256 is allowed, but kid rsa-1 is an RSA key.
    let token = acme("rsa-1", Algorithm::ES256).signed_by("ec-256").build();
    assert_acme_401(&ask_acme(&token).await, "unsupported_algorithm", &token);
    // EdDSA is allowed, but kid ec-256 is not an Ed25519 key.
    let token = acme("ec-256", Algorithm::EdDSA).signed_by("ed-1").build();
    assert_acme_401(&ask_acme(&token).await, "unsupported_algorithm", &token);
    // The deny's log line says which key the kid named and why it cannot verify.
    for detail in [
        r#"kid \"rsa-1\" is an RSA key, which cannot verify ES256"#,
        r#"kid \"ec-256\" is an EC P-256 key, which cannot verify EdDSA"#,
    ] {
        assert!(!shared().logged(detail).is_empty(), "no deny logged with {detail}");
    }
}

#[tokio::test]
async fn unknown_key_for_a_kid_the_issuer_does_not_have() {
    let token = acme("no-such-key", Algorithm::RS256).signed_by("rsa-1").build();
    assert_acme_401(&ask_acme(&token).await, "unknown_key", &token);
    // The rotated key is not in acme's JWKS file.
    let token = acme("rsa-2", Algorithm::RS256).build();
    assert_acme_401(&ask_acme(&token).await, "unknown_key", &token);
}

#[tokio::test]
async fn invalid_signature_when_the_payload_is_tampered() {
    let token = acme_rs256().sub(PLAIN_SUB).build();
    let mut claims = acme_rs256().claims().clone();
    claims.insert("sub".into(), json!(ADMIN_SUB));
    let tampered = with_payload(&token, &serde_json::to_string(&claims).unwrap());
    let out = ask_acme(&tampered).await;
    assert_acme_401(&out, "invalid_signature", &tampered);
    assert_ne!(out.meta("sub"), Some(ADMIN_SUB), "an unverified sub is not reported as known");
}

#[tokio::test]
async fn invalid_signature_when_signed_by_another_key() {
    let token = acme("rsa-1", Algorithm::RS256).signed_by("rsa-2").build();
    assert_acme_401(&ask_acme(&token).await, "invalid_signature", &token);
    let token = acme("ec-256", Algorithm::ES256).signed_by("ec-256").build();
    let parts: Vec<&str> = token.split('.').collect();
    // A signature of the right length and alphabet that is not the signature.
    let forged = format!("{}.{}.{}", parts[0], parts[1], b64([7u8; 64]));
    assert_acme_401(&ask_acme(&forged).await, "invalid_signature", &forged);
}

// ---------------------------------------------------------------------------------------------
// Time: exp, nbf, iat (leeway 60 s).

#[tokio::test]
async fn token_expired_past_exp_plus_leeway() {
    let token = acme_rs256().exp_in(-120).build();
    assert_acme_401(&ask_acme(&token).await, "token_expired", &token);
}

#[tokio::test]
async fn token_expired_within_leeway_is_accepted() {
    let token = acme_rs256().exp_in(-30).iat_ago(600).build();
    assert_allowed(&ask_acme(&token).await);
}

#[tokio::test]
async fn token_expired_without_exp() {
    let token = acme_rs256().without("exp").build();
    assert_acme_401(&ask_acme(&token).await, "token_expired", &token);
}

#[tokio::test]
async fn token_not_yet_valid_before_nbf_minus_leeway() {
    let token = acme_rs256().nbf(120).build();
    assert_acme_401(&ask_acme(&token).await, "token_not_yet_valid", &token);
    let token = acme_rs256().nbf(30).build();
    assert_allowed(&ask_acme(&token).await);
}

#[tokio::test]
async fn token_not_yet_valid_when_issued_in_the_future() {
    let token = acme_rs256().iat_ago(-120).build();
    assert_acme_401(&ask_acme(&token).await, "token_not_yet_valid", &token);
    let token = acme_rs256().iat_ago(-30).build();
    assert_allowed(&ask_acme(&token).await);
}

#[tokio::test]
async fn token_without_iat_is_fine_for_a_user_without_tokens_valid_after() {
    let token = acme_rs256().without("iat").build();
    assert_allowed(&ask_acme(&token).await);
}

// ---------------------------------------------------------------------------------------------
// Audience and subject.

#[tokio::test]
async fn invalid_audience() {
    for aud in [json!("billing"), json!(["billing", "reports"]), json!([]), json!("Orders")] {
        let token = acme_rs256().aud(aud.clone()).build();
        let out = ask_acme(&token).await;
        assert!(!out.allowed, "aud {aud} must not pass");
        assert_acme_401(&out, "invalid_audience", &token);
    }
    let token = acme_rs256().without("aud").build();
    assert_acme_401(&ask_acme(&token).await, "invalid_audience", &token);
}

#[tokio::test]
async fn missing_subject() {
    let token = acme_rs256().without("sub").build();
    assert_acme_401(&ask_acme(&token).await, "missing_subject", &token);
    let token = acme_rs256().sub("").build();
    assert_acme_401(&ask_acme(&token).await, "missing_subject", &token);
}

// ---------------------------------------------------------------------------------------------
// Directory.

#[tokio::test]
async fn user_not_found() {
    let token = acme_rs256().sub("ghost").build();
    let out = ask(CheckCall::new().tenant("acme").bearer(&token).request_id("req-7")).await;
    let body = assert_deny(&out, "user_not_found", 403, Some("acme"));
    assert_eq!(
        body,
        json!({"code": "user_not_found", "message": "no user with this sub in tenant acme", "tenant": "acme", "request_id": "req-7"})
    );
    assert_eq!(out.meta("sub"), Some("ghost"));
    assert_eq!(out.meta("issuer"), Some(ISS_ACME));
    assert_no_echo(&out, &token);
}

#[tokio::test]
async fn user_of_another_tenant_is_not_found() {
    // u-77 exists in globex only; the directory is per tenant.
    let token = acme_rs256().sub("u-77").build();
    assert_deny(&ask_acme(&token).await, "user_not_found", 403, Some("acme"));
}

#[tokio::test]
async fn user_disabled() {
    let token = acme_rs256().sub(DISABLED_SUB).build();
    let out = ask_acme(&token).await;
    assert_deny(&out, "user_disabled", 403, Some("acme"));
    assert_eq!(out.meta("sub"), Some(DISABLED_SUB));
    assert_no_echo(&out, &token);
}

#[tokio::test]
async fn token_revoked_when_issued_before_tokens_valid_after() {
    let token = acme_rs256().sub(REVOKED_SUB).iat_ago(2000).build();
    let out = ask_acme(&token).await;
    assert_acme_401(&out, "token_revoked", &token);
    assert_eq!(out.meta("sub"), Some(REVOKED_SUB));
    // A token issued after the cut-off is fine.
    let token = acme_rs256().sub(REVOKED_SUB).iat_ago(10).build();
    let out = ask_acme(&token).await;
    assert_allowed(&out);
    assert_eq!(out.header("x-user-id"), Some("u-2002"));
}

#[tokio::test]
async fn token_revoked_only_when_iat_is_strictly_before_tokens_valid_after() {
    let at = revoke_at();
    let token = acme_rs256().sub(REVOKED_SUB).claim("iat", json!(at)).build();
    assert_allowed(&ask_acme(&token).await);
    let token = acme_rs256().sub(REVOKED_SUB).claim("iat", json!(at - 1)).build();
    assert_acme_401(&ask_acme(&token).await, "token_revoked", &token);
}

#[tokio::test]
async fn token_revoked_without_iat_when_the_user_has_tokens_valid_after() {
    let token = acme_rs256().sub(REVOKED_SUB).without("iat").build();
    assert_acme_401(&ask_acme(&token).await, "token_revoked", &token);
}

// ---------------------------------------------------------------------------------------------
// The order of checks: the first failing check is the reason.

#[tokio::test]
async fn order_tenant_before_token() {
    let out = ask(CheckCall::new().tenant("umbrella")).await;
    assert_deny(&out, "unknown_tenant", 404, None);
    let out = ask(CheckCall::new()).await;
    assert_deny(&out, "missing_tenant", 400, None);
}

#[tokio::test]
async fn order_issuer_before_algorithm_and_signature() {
    let token = acme("rsa-1", Algorithm::RS384).iss("https://evil.test/").signed_by("rsa-2").build();
    assert_acme_401(&ask_acme(&token).await, "untrusted_issuer", &token);
}

#[tokio::test]
async fn order_algorithm_before_key_lookup() {
    let token = acme("no-such-key", Algorithm::RS384).signed_by("rsa-1").build();
    assert_acme_401(&ask_acme(&token).await, "unsupported_algorithm", &token);
}

#[tokio::test]
async fn order_signature_before_time_audience_and_subject() {
    let token = acme_rs256().exp_in(-3600).aud("billing").without("sub").signed_by("rsa-2").build();
    assert_acme_401(&ask_acme(&token).await, "invalid_signature", &token);
}

#[tokio::test]
async fn order_time_before_audience_before_subject_before_directory() {
    let token = acme_rs256().exp_in(-3600).aud("billing").without("sub").build();
    assert_acme_401(&ask_acme(&token).await, "token_expired", &token);
    let token = acme_rs256().aud("billing").without("sub").build();
    assert_acme_401(&ask_acme(&token).await, "invalid_audience", &token);
    let token = acme_rs256().sub(DISABLED_SUB).nbf(3600).build();
    assert_acme_401(&ask_acme(&token).await, "token_not_yet_valid", &token);
}

#[tokio::test]
async fn order_disabled_before_revoked() {
    // A disabled user is refused as disabled, even with a token that is also revoked.
    let token = acme_rs256().sub(GONE_SUB).iat_ago(2000).build();
    assert_deny(&ask_acme(&token).await, "user_disabled", 403, Some("acme"));
}

/// Every combination of the token's own faults (issuer, algorithm, key, signature, exp, nbf,
/// audience), each with every kind of subject: the answer is the first failing check in SPEC §3's
/// order, whatever else is wrong with the token, and only a token with no fault is allowed.
#[tokio::test]
async fn every_combination_of_faults_is_answered_by_the_first_in_order() {
    const FAULTS: [&str; 7] = [
        "untrusted_issuer",
        "unsupported_algorithm",
        "unknown_key",
        "invalid_signature",
        "token_expired",
        "token_not_yet_valid",
        "invalid_audience",
    ];
    // (sub, iat seconds ago, the answer when the token itself has no fault)
    let subjects: [(Option<&str>, i64, &str); 6] = [
        (Some(ADMIN_SUB), 10, "ok"),
        (None, 10, "missing_subject"),
        (Some("ghost"), 10, "user_not_found"),
        (Some(DISABLED_SUB), 10, "user_disabled"),
        (Some(REVOKED_SUB), 2000, "token_revoked"),
        (Some(GONE_SUB), 2000, "user_disabled"),
    ];
    let mut client = shared().client().await;
    let mut mismatches = Vec::new();
    for faults in 0u32..1 << FAULTS.len() {
        let has = |i: usize| faults & (1 << i) != 0;
        for (sub, iat_ago, clean) in subjects {
            let kid = if has(2) { "no-such-key" } else { "rsa-1" };
            let alg = if has(1) { Algorithm::RS384 } else { Algorithm::RS256 };
            // A key the issuer has not got signs the token with the signature fault.
            let key = if has(3) { "rsa-2" } else { "rsa-1" };
            let mut token = acme(kid, alg).signed_by(key).iat_ago(iat_ago);
            token = match sub {
                Some(sub) => token.sub(sub),
                None => token.without("sub"),
            };
            if has(0) {
                token = token.iss("https://idp.globex.test/");
            }
            if has(4) {
                token = token.exp_in(-3600);
            }
            if has(5) {
                token = token.nbf(3600);
            }
            if has(6) {
                token = token.aud("billing");
            }
            let token = token.build();
            let out = client.call(&CheckCall::new().tenant("acme").bearer(&token)).await;
            let expected = (0..FAULTS.len()).find(|&i| has(i)).map_or(clean, |i| FAULTS[i]);
            if !out.answers(expected) {
                let named: Vec<_> = (0..FAULTS.len()).filter(|&i| has(i)).map(|i| FAULTS[i]).collect();
                mismatches.push(format!(
                    "faults {named:?}, sub {sub:?}: expected {expected}, got {:?} (allowed: {})",
                    out.meta("reason"),
                    out.allowed
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of 768 answers out of order:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Whole-process properties.

#[tokio::test]
async fn logs_never_contain_a_whole_token() {
    let sg = shared();
    let mut client = sg.client().await;
    let tokens = [
        acme_rs256().build(),
        acme_rs256().sub("ghost").build(),
        acme_rs256().exp_in(-3600).build(),
        acme_rs256().signed_by("rsa-2").build(),
        acme_rs256().header("crit", json!(["x"])).build(),
    ];
    for token in &tokens {
        client.call(&CheckCall::new().tenant("acme").bearer(token)).await;
    }
    // Stdout is read by a thread: give it a moment to catch up.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let logs = sg.logs();
    assert!(!logs.is_empty(), "subguard logs JSON lines on stdout");
    for token in &tokens {
        let signature = token.split('.').nth(2).unwrap();
        for line in &logs {
            assert!(!line.contains(token.as_str()), "a log line contains a whole token: {line}");
            assert!(!line.contains(signature), "a log line contains a token signature: {line}");
        }
    }
}

/// The one line a check logs, as operators' log queries read it: the decision in `fields`, and the
/// check's span (request id, trace id, tenant, reason) beside it.
#[tokio::test]
async fn each_check_logs_one_line_with_its_span() {
    let sg = shared();
    let mut client = sg.client().await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    let deny = CheckCall::new()
        .tenant("acme")
        .bearer(&acme_rs256().sub("ghost").build())
        .request_id("req-log-deny")
        .header("traceparent", &traceparent);
    client.call(&deny).await;
    // The shared subguard logs allows too (SUBGUARD_LOG=info,subguard=debug in tests/common).
    client
        .call(&CheckCall::new().tenant("acme").bearer(&acme_rs256().build()).request_id("req-log-allow"))
        .await;

    let line = |id: &str| -> Value {
        // Stdout is read by a thread: poll until the line is there.
        for _ in 0..100 {
            if let Some(e) = sg.log_events().into_iter().find(|e| {
                e["fields"]["request_id"] == id
                    && e["fields"]["message"].as_str().is_some_and(|m| m.starts_with("check "))
            }) {
                return e;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("no check line with request_id {id}: {:#?}", sg.logs());
    };
    let d = line("req-log-deny");
    assert_eq!(d["level"], "INFO");
    assert_eq!(d["fields"]["message"], "check denied");
    assert_eq!(d["fields"]["decision"], "deny");
    assert_eq!(d["fields"]["reason"], "user_not_found");
    assert_eq!(d["fields"]["tenant"], "acme");
    assert_eq!(d["fields"]["sub"], "ghost");
    assert_eq!(d["fields"]["issuer"], ISS_ACME);
    assert!(d["fields"]["detail"].as_str().is_some_and(|s| s.contains("no such user")), "{d}");
    assert_eq!(
        d["span"],
        json!({"name": "check", "request_id": "req-log-deny", "trace_id": trace, "tenant": "acme", "reason": "user_not_found"})
    );
    let a = line("req-log-allow");
    assert_eq!(a["level"], "DEBUG");
    assert_eq!(a["fields"]["message"], "check allowed");
    assert_eq!(a["fields"]["decision"], "allow");
    assert_eq!(a["fields"]["sub"], ADMIN_SUB);
    assert_eq!(
        a["span"],
        json!({"name": "check", "request_id": "req-log-allow", "trace_id": "", "tenant": "acme", "reason": "ok"})
    );
}

#[tokio::test]
async fn admin_endpoints() {
    let sg = shared();
    assert_eq!(sg.admin_get("/healthz").0, 200);
    assert_eq!(sg.admin_get("/readyz").0, 200);
    // Count at least one allow and one deny, then read the metrics.
    let mut client = sg.client().await;
    client.call(&CheckCall::new().tenant("acme").bearer(&acme_rs256().build())).await;
    client.call(&CheckCall::new().tenant("acme")).await;
    client.call(&CheckCall::new().tenant("no-such-tenant-xyz")).await;
    let (status, metrics) = sg.admin_get("/metrics");
    assert_eq!(status, 200);
    for family in [
        "subguard_checks_total",
        "subguard_check_duration_seconds",
        "subguard_directory_lookups_total",
        "subguard_jwks_fetches_total",
        "subguard_config_reloads_total",
    ] {
        assert!(metrics.contains(family), "metrics lack {family}:\n{metrics}");
    }
    let checks: Vec<&str> = metrics.lines().filter(|l| l.starts_with("subguard_checks_total{")).collect();
    assert!(
        checks.iter().any(|l| l.contains(r#"reason="ok""#) && l.contains(r#"tenant="acme""#)),
        "{checks:#?}"
    );
    assert!(checks.iter().any(|l| l.contains(r#"reason="missing_token""#)), "{checks:#?}");
    // Raw request input never becomes a label.
    assert!(!metrics.contains("no-such-tenant-xyz"), "an unknown tenant leaked into a label:\n{metrics}");
}

/// A plain gRPC connection to `sg`'s listener.
async fn grpc_channel(sg: &Subguard) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", sg.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn grpc_health_serving_once_ready() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let sg = shared();
    let channel = grpc_channel(sg).await;
    let mut health = HealthClient::new(channel);
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        let status = health
            .check(HealthCheckRequest { service: service.into() })
            .await
            .unwrap_or_else(|e| panic!("health check {service:?}: {e}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
}

#[tokio::test]
async fn other_grpc_methods_and_services_are_unimplemented() {
    let sg = shared();
    let channel = grpc_channel(sg).await;
    for path in [
        "/envoy.service.auth.v3.Authorization/CheckStream",
        "/envoy.service.auth.v2.Authorization/Check",
        "/grpc.health.v1.Health/List2",
        "/no.such.Service/Check",
        "/Check",
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<(), ()>::default();
        let path_and_query = tonic::codegen::http::uri::PathAndQuery::from_static(path);
        let status = grpc.unary(tonic::Request::new(()), path_and_query, codec).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented, "{path}: {status:?}");
    }
    // Checks are still answered afterwards.
    let mut client = sg.client().await;
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&acme_rs256().build())).await;
    assert_allowed(&out);
}

// ---------------------------------------------------------------------------------------------
// Scenarios with their own subguard.

#[tokio::test]
async fn strip_authorization_removes_the_header_on_allow() {
    let config = CONFIG.replace("strip_authorization: false", "strip_authorization: true");
    let sg = Subguard::start(&config, &users_yaml(now() - 1000));
    let mut client = sg.client().await;
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&acme_rs256().build())).await;
    assert_allowed(&out);
    assert!(out.removes("authorization"), "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some("u-1001"));
    // A deny leaves the request alone: it never reaches the upstream.
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&acme_rs256().sub("ghost").build())).await;
    assert_deny(&out, "user_not_found", 403, Some("acme"));
}

#[tokio::test]
async fn keys_unavailable_when_the_jwks_uri_is_down_at_startup() {
    // Nothing listens on this port: every fetch is refused.
    let down = format!("http://127.0.0.1:{}/jwks", common::free_port());
    let config = format!(
        r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
keys:
  refresh_seconds: 300
  min_refetch_seconds: 1
directory:
  kind: file
  path: users.yaml
tenants:
  acme:
    issuers:
      - issuer: "https://idp.acme.test/"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_uri: "{down}"
"#
    );
    let dir = ConfigDir::with(&config, &users_yaml(now() - 1000));
    let sg = Subguard::start_unready(dir);
    // Readiness never comes: the issuer has no usable keys.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(sg.admin_get("/readyz").0, 503);
    assert_eq!(sg.admin_get("/healthz").0, 200, "alive, just not ready");
    // Checks are still answered, and fail closed.
    let token = acme_rs256().build();
    let mut client = sg.client().await;
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&token).request_id("r-503")).await;
    let body = assert_deny(&out, "keys_unavailable", 503, Some("acme"));
    assert_eq!(body["request_id"], "r-503");
    assert_no_echo(&out, &token);
    // Tenant and token checks come first and still give their own reasons.
    let out = client.call(&CheckCall::new().tenant("acme")).await;
    assert_deny(&out, "missing_token", 401, Some("acme"));

    // gRPC health is SERVING only once ready.
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = grpc_channel(&sg).await;
    let mut health = HealthClient::new(channel);
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        let status =
            health.check(HealthCheckRequest { service: service.into() }).await.map(|r| r.into_inner().status);
        assert_ne!(
            status.ok(),
            Some(ServingStatus::Serving as i32),
            "not ready, yet SERVING for {service:?}"
        );
    }
}

#[tokio::test]
async fn grpc_over_a_unix_socket() {
    let dir = ConfigDir::new();
    let socket = dir.socket_path();
    let config = CONFIG.replace(r#"grpc: "127.0.0.1:0""#, &format!(r#"grpc: "unix://{}""#, socket.display()));
    dir.write_config(&config);
    dir.write_users(&users_yaml(now() - 1000));
    let sg = Subguard::start_in(dir);
    let mut client = common::CheckClient::connect_unix(&socket).await;
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&acme_rs256().build())).await;
    assert_allowed(&out);
    assert_eq!(out.header("x-user-id"), Some("u-1001"));
    drop(sg);
}

/// The socket file belongs to the subguard serving it. A second subguard started on the same path
/// is refused (it used to take the socket over, and whichever stopped first deleted the other's
/// socket, leaving it unreachable but ready); a subguard that stops removes the file only while
/// it is still its own; and a socket file left by a process that has ended is cleared at start.
#[tokio::test]
async fn a_unix_socket_is_never_taken_over_or_removed_from_under_another_process() {
    let dir = ConfigDir::new();
    let socket = dir.socket_path();
    let on_socket = |admin: &str| {
        CONFIG
            .replace(r#"grpc: "127.0.0.1:0""#, &format!(r#"grpc: "unix://{}""#, socket.display()))
            .replace(r#"admin: "127.0.0.1:0""#, admin)
    };
    dir.write_config(&on_socket(r#"admin: "127.0.0.1:0""#));
    dir.write_users(&users_yaml(now() - 1000));
    let mut first = Subguard::start_in(dir);

    let second = ConfigDir::with(&on_socket(r#"admin: "127.0.0.1:0""#), &users_yaml(now() - 1000));
    let refused = |dir: &ConfigDir| {
        let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_subguard"))
            .args(["serve", "--config", dir.config_path().to_str().unwrap()])
            .env_remove("SUBGUARD_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = second.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = second.kill();
                panic!("a second subguard took over the socket instead of refusing it");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("another process is serving on this socket"), "{stderr}");
    };
    refused(&second);
    let mut client = common::CheckClient::connect_unix(&socket).await;
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&acme_rs256().build())).await;
    assert_allowed(&out);

    // Another process's socket now at the path: the first subguard leaves it when it stops.
    std::fs::remove_file(&socket).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    first.signal("TERM");
    assert_eq!(first.wait_exit(Duration::from_secs(15)), Some(0));
    assert!(socket.exists(), "the other process's socket was removed");
    // That process ends without removing it, and the socket is stale. Whoever holds its lock
    // (`<socket>.lock`: a subguard starting at the same moment) still keeps others off it.
    drop(other);
    let mut lock_name = socket.clone().into_os_string();
    lock_name.push(".lock");
    let lock = std::fs::File::open(&lock_name).unwrap();
    lock.try_lock().unwrap();
    refused(&second);
    drop(lock);
    let third = ConfigDir::with(&on_socket(r#"admin: "127.0.0.1:0""#), &users_yaml(now() - 1000));
    let mut third = Subguard::start_in(third);
    let mut client = common::CheckClient::connect_unix(&socket).await;
    assert_allowed(&client.call(&CheckCall::new().tenant("acme").bearer(&acme_rs256().build())).await);
    third.signal("TERM");
    assert_eq!(third.wait_exit(Duration::from_secs(15)), Some(0));
    assert!(!socket.exists(), "a subguard removes its own socket when it stops");
}

// Keep the raw-minting helpers exercised even when no test above needs them directly.
#[test]
fn raw_minting_signs_arbitrary_segments() {
    let key = jsonwebtoken::EncodingKey::from_secret(b"k");
    let token = sign_segments(&b64("{}"), &b64("{}"), &key, Algorithm::HS256);
    assert_eq!(token.split('.').count(), 3);
}

/// Key sets as other JWT libraries and identity providers publish them: a `kid` shared by keys of
/// two types, keys marked for other operations or published with their private half, numbers with
/// a leading zero octet, and RFC 9864's `Ed25519` name for EdDSA.
#[tokio::test]
async fn key_sets_as_other_libraries_publish_them() {
    let mut jwks: Value = serde_json::from_str(&common::jwks_text("issuer-a.jwks.json")).unwrap();
    let keys = jwks["keys"].as_array_mut().unwrap();
    let by_kid = |keys: &[Value], kid: &str| keys.iter().position(|k| k["kid"] == kid).unwrap();
    let (rsa, ec256, ec384, ed) =
        (by_kid(keys, "rsa-1"), by_kid(keys, "ec-256"), by_kid(keys, "ec-384"), by_kid(keys, "ed-1"));
    // One kid on the RSA and the P-256 key (RFC 7517 §4.5 allows it across key types).
    keys[rsa]["kid"] = "shared".into();
    keys[ec256]["kid"] = "shared".into();
    // RSA's modulus with a leading zero octet, as a DER-minded producer writes it.
    let n = base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        keys[rsa]["n"].as_str().unwrap(),
    )
    .unwrap();
    keys[rsa]["n"] = b64([&[0u8][..], &n].concat()).into();
    // The P-384 key for encryption only; the Ed25519 key with its private half published.
    keys[ec384]["key_ops"] = json!(["encrypt"]);
    keys[ed]["d"] = "bm90IGEgcmVhbCBrZXk".into();
    let config = CONFIG
        .replace(
            "algorithms: [\"RS256\", \"PS256\", \"ES256\", \"EdDSA\"]",
            "algorithms: [\"RS256\", \"ES256\", \"ES384\", \"Ed25519\"]",
        )
        .replace("jwks_file: keys/issuer-a.jwks.json\n  globex", "jwks_file: keys/published.json\n  globex");
    assert!(config.contains("keys/published.json") && config.contains("\"Ed25519\"]"), "{config}");
    let dir = ConfigDir::with(&config, &users_yaml(now() - 1000));
    dir.write("keys/published.json", &jwks.to_string());
    let sg = Subguard::start_in(dir);
    let mut client = sg.client().await;
    let mut ask = async |token: String| client.call(&CheckCall::new().tenant("acme").bearer(&token)).await;

    // The shared kid finds the key that fits each algorithm.
    assert_allowed(&ask(acme("shared", Algorithm::ES256).signed_by("ec-256").build()).await);
    assert_allowed(&ask(acme("shared", Algorithm::RS256).signed_by("rsa-1").build()).await);
    // A token whose alg says Ed25519 is EdDSA on an Ed25519 key; the key here is refused, so it
    // is named as a key subguard does not verify with: unsupported_algorithm, not unknown_key.
    let ed25519 = acme("ed-1", Algorithm::EdDSA).header("alg", "Ed25519".into()).build();
    let out = ask(ed25519.clone()).await;
    assert_acme_401(&out, "unsupported_algorithm", &ed25519);
    let out = ask(acme("ec-384", Algorithm::ES384).build()).await;
    let token = acme("ec-384", Algorithm::ES384).build();
    assert_acme_401(&out, "unsupported_algorithm", &token);
    let logs = sg.logs().join("\n");
    assert!(logs.contains("private key material"), "{logs}");
    assert!(logs.contains("does not include `verify`"), "{logs}");
    // Neither sent subguard fetching again: the set has those kids.
    assert!(!logs.contains("no key with kid"), "{logs}");
}

/// `Ed25519` (RFC 9864) and `EdDSA` name one algorithm: either in the issuer's list allows both.
#[tokio::test]
async fn the_ed25519_alg_name_is_eddsa() {
    let token = acme("ed-1", Algorithm::EdDSA).header("alg", "Ed25519".into()).build();
    let out = ask_acme(&token).await;
    assert_allowed(&out);
    assert_eq!(out.meta("reason"), Some("ok"));
}

/// HTTP drops spaces and tabs around a header value: a users-file entry `bob ` without `id` would
/// reach the application as `bob`, another user. It loads with a warning and is never allowed;
/// with an `id` it is a user like any other.
#[tokio::test]
async fn a_sub_with_outer_spaces_is_never_forwarded_as_the_user_id() {
    let users = "acme:\n  - sub: bob\n  - sub: \"bob \"\n  - sub: \" carol\"\n    id: u-carol\n";
    let sg = Subguard::start(CONFIG, users);
    let mut client = sg.client().await;
    let mut ask = async |sub: &str| {
        client.call(&CheckCall::new().tenant("acme").bearer(&acme_rs256().sub(sub).build())).await
    };
    let out = ask("bob ").await;
    let body = assert_deny(&out, "internal_error", 500, Some("acme"));
    assert_eq!(body["code"], "internal_error");
    let out = ask("bob").await;
    assert_allowed(&out);
    assert_eq!(out.header("x-user-id"), Some("bob"));
    let out = ask(" carol").await;
    assert_allowed(&out);
    assert_eq!(out.header("x-user-id"), Some("u-carol"));
    assert!(!sg.logged("give the user an `id`").is_empty(), "the deny's detail is logged: {:?}", sg.logs());
    let logs = sg.logs().join("\n");
    assert!(logs.contains("without an `id` have a sub that starts or ends with a space or tab"), "{logs}");
}

/// A malformed token's deny says what is wrong, for the operator, without quoting the token.
#[tokio::test]
async fn malformed_token_detail_names_the_member_and_its_type() {
    let token = acme_rs256().claim("exp", json!("1767225600")).claim("jti", json!("marker-7f3a")).build();
    assert_acme_401(&ask_acme(&token).await, "malformed_token", &token);
    let line = shared()
        .logged("claim exp is a string, not a number (NumericDate)")
        .pop()
        .unwrap_or_else(|| panic!("no deny detail names the claim:\n{}", shared().logs().join("\n")));
    assert!(line.contains("malformed_token") && !line.contains("marker-7f3a"), "{line}");
}
