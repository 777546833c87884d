//! Hostile input over gRPC of the real `subguard` binary: the attacks people actually use on JWT
//! verifiers and multi-tenant gateways (SECURITY.md lists them). Every attack expects one precise
//! reason code; none may allow. Where the contract says a strange-looking request *is* fine (a
//! far-future `exp`, deep nesting in a claim subguard never reads), the test says so and why.
//!
//! Attacks already pinned down elsewhere are not repeated: `alg: none` casings, HS256 keyed with
//! the public JWKS, a key of another type under a known `kid`, `crit`, claims of the wrong JSON
//! type, repeated `Authorization` headers joined by Envoy, `max_bytes` (`grpc_decisions.rs`);
//! `jku` / `x5u` / `jwk` never fetched and the unknown-`kid` rate limit (`keys_remote.rs`);
//! load shedding (`load_shedding.rs`). Through the real Envoy: `attacks_envoy.rs`.
//!
//! One subguard serves the stateless attacks (config below); attacks on key fetching and logs
//! start their own, with fixture servers that record every request they get.

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::check::CheckCall;
use common::http_fixture::{FixtureResponse, Handler, HttpFixture};
use common::tokens::{b64, mint_raw, sign_segments, signing_key};
use common::{Algorithm, ConfigDir, Outcome, Subguard, TokenBuilder, jwks_text, now};
use serde_json::{Value, json};

const ISS_ACME: &str = "https://idp.acme.test/";
const ISS_GLOBEX: &str = "https://idp.globex.test/";
const MAX_BYTES: usize = 4096;

/// acme and twin trust the *same* issuer (same keys); globex has its own. Tenants come from the
/// `x-tenant-id` header, the host, or the route.
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
  min_refetch_seconds: 10
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
        algorithms: ["RS256", "PS256", "ES256", "EdDSA"]
        jwks_file: keys/issuer-a.jwks.json
  twin:
    issuers:
      - issuer: "https://idp.acme.test/"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-a.jwks.json
  globex:
    issuers:
      - issuer: "https://idp.globex.test/"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-b.jwks.json
"#;

/// `alice` exists in acme and in twin, as two different users; `carol` only in twin.
const USERS: &str = r#"
acme:
  - sub: alice
    id: acme-alice
    roles: [admin]
  - sub: bob
  - sub: "user with spaces"
    id: spaced
twin:
  - sub: alice
    id: twin-alice
    roles: [viewer]
  - sub: carol
    id: twin-carol
globex:
  - sub: u-77
"#;

fn shared() -> &'static Subguard {
    static SHARED: OnceLock<Subguard> = OnceLock::new();
    SHARED.get_or_init(|| Subguard::start(CONFIG, USERS))
}

async fn ask(call: CheckCall) -> Outcome {
    shared().client().await.call(&call).await
}

async fn ask_acme(token: &str) -> Outcome {
    ask(CheckCall::new().tenant("acme").bearer(token)).await
}

/// A valid acme token for `sub`, RS256 with `rsa-1`.
fn acme(sub: &str) -> TokenBuilder {
    TokenBuilder::new("rsa-1", Algorithm::RS256).iss(ISS_ACME).aud("orders").sub(sub)
}

/// The claims of a valid acme token for alice, as a JSON object to edit.
fn alice_claims() -> serde_json::Map<String, Value> {
    acme("alice").claims().clone()
}

/// alice's claims without `without`, plus `extra` raw members (any bytes) at the end.
fn payload_plus(without: &[&str], extra: &[u8]) -> Vec<u8> {
    let mut claims = alice_claims();
    for name in without {
        claims.remove(*name);
    }
    let text = serde_json::to_string(&claims).unwrap();
    let inner = &text.as_bytes()[1..text.len() - 1];
    match (inner.is_empty(), extra.is_empty()) {
        (true, _) => [b"{", extra, b"}"].concat(),
        (false, true) => text.into_bytes(),
        (false, false) => [b"{", inner, b",", extra, b"}"].concat(),
    }
}

const RSA1_HEADER: &str = r#"{"alg":"RS256","typ":"JWT","kid":"rsa-1"}"#;

/// Header and payload bytes (any bytes, valid UTF-8 or not), correctly signed by `rsa-1` with
/// RS256: whatever subguard refuses, it refuses for the content, never for the signature.
fn signed_bytes(header: &[u8], payload: &[u8]) -> String {
    let (_, key) = signing_key("rsa-1");
    sign_segments(&b64(header), &b64(payload), &key, Algorithm::RS256)
}

/// The HTTP status SPEC §3 gives each code.
fn status_of(code: &str) -> u16 {
    match code {
        "missing_tenant" => 400,
        "unknown_tenant" => 404,
        "tenant_mismatch" | "user_not_found" | "user_disabled" => 403,
        "directory_unavailable" | "keys_unavailable" => 503,
        "internal_error" => 500,
        _ => 401,
    }
}

/// What the metadata `sub` holds for `sub`: control characters as `\u` escapes (Envoy's text
/// access log prints metadata as is), everything else unchanged.
fn metadata_form(sub: &str) -> String {
    sub.chars().map(|c| if c.is_control() { format!("\\u{:04x}", c as u32) } else { c.to_string() }).collect()
}

/// Denied with exactly `code` (and its status), no identity forwarded, and `token` echoed
/// nowhere in the answer.
#[track_caller]
fn assert_denied(out: &Outcome, code: &str, token: &str, what: &str) {
    let ctx = format!("{what}: expected {code}, got {out:#?}");
    assert!(!out.allowed, "WRONG ALLOW — {ctx}");
    assert_ne!(out.grpc_code, 0, "{ctx}");
    assert_eq!(out.http_response, "denied", "{ctx}");
    assert_eq!(out.reason(), Some(code), "{ctx}");
    assert_eq!(out.meta("reason"), Some(code), "{ctx}");
    assert_eq!(out.status, Some(status_of(code)), "{ctx}");
    assert_eq!(out.body["code"], code, "{ctx}");
    for name in ["x-user-id", "x-user-roles"] {
        assert!(out.header(name).is_none(), "a deny carries {name}: {ctx}");
    }
    if token.len() >= 16 {
        assert!(!out.raw_body.contains(token), "the body echoes the token: {ctx}");
        for (k, v) in &out.headers {
            assert!(!v.contains(token), "header {k} echoes the token: {ctx}");
        }
    }
}

#[track_caller]
fn assert_allowed_as(out: &Outcome, tenant: &str, user_id: &str, what: &str) {
    assert!(out.allowed, "{what}: expected allow, got {out:#?}");
    assert_eq!(out.http_response, "ok", "{what}: {out:#?}");
    assert_eq!(out.header_all("x-tenant-id"), [tenant], "{what}: {out:#?}");
    assert_eq!(out.header_all("x-user-id"), [user_id], "{what}: {out:#?}");
}

// ---------------------------------------------------------------------------------------------
// A fixture HTTP server that records every request (method, path, query) and serves a switchable
// JWKS at `/jwks`: an IdP, or an attacker's server that must never be called.

struct Recorder {
    http: HttpFixture,
    jwks: Arc<Mutex<String>>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    fn start(jwks: &str) -> Recorder {
        let body = Arc::new(Mutex::new(jwks.to_string()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = {
            let (body, seen) = (body.clone(), seen.clone());
            Arc::new(move |req| {
                let target = match &req.query {
                    Some(q) => format!("{} {}?{q}", req.method, req.path),
                    None => format!("{} {}", req.method, req.path),
                };
                seen.lock().unwrap().push(target);
                let answer = if req.path == "/jwks" {
                    FixtureResponse::json(200, body.lock().unwrap().clone())
                } else {
                    FixtureResponse::text(404, "not found")
                };
                Box::pin(async move { answer })
            })
        };
        Recorder { http: HttpFixture::start(handler), jwks: body, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.http.base_url())
    }

    fn set_jwks(&self, jwks: &str) {
        *self.jwks.lock().unwrap() = jwks.to_string();
    }

    fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// One tenant (acme, from `x-tenant-id`), one issuer whose keys come from `key_source`.
fn single_tenant_config(key_source: &str, max_bytes: usize, min_refetch_seconds: u64) -> String {
    format!(
        r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
token:
  max_bytes: {max_bytes}
keys:
  min_refetch_seconds: {min_refetch_seconds}
directory:
  kind: file
  path: users.yaml
tenants:
  acme:
    issuers:
      - issuer: "{ISS_ACME}"
        audiences: ["orders"]
        algorithms: ["RS256", "PS256", "ES256"]
        {key_source}
"#
    )
}

const ACME_ALICE: &str = "acme:\n  - sub: alice\n    id: acme-alice\n";

/// Log lines (parsed) at WARN level whose text mentions `needle`, polling briefly: stdout is read
/// by a thread.
fn warnings_mentioning(sg: &Subguard, needle: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let found: Vec<String> =
            sg.logs().into_iter().filter(|l| l.contains("\"WARN\"") && l.contains(needle)).collect();
        if !found.is_empty() || std::time::Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// kid: paths, URLs, SQL, templates, huge. A kid is only ever compared, never used as a path, a
// URL or a query: unknown_key, at most one rate-limited re-fetch of the issuer's own jwks_uri,
// and nothing else on the network.

#[tokio::test]
async fn hostile_kid_values_are_unknown_key_and_fetch_nothing_but_the_issuers_jwks() {
    let idp = Recorder::start(&jwks_text("issuer-a.jwks.json"));
    let attacker = Recorder::start(&jwks_text("issuer-a-rotated.jwks.json"));
    let key_source = format!(r#"jwks_uri: "{}""#, idp.url("/jwks"));
    let sg = Subguard::start(&single_tenant_config(&key_source, 16384, 10), ACME_ALICE);
    let mut client = sg.client().await;
    let at_start = idp.requests().len();
    assert!(at_start >= 1, "keys are fetched at start");

    let kids = [
        "../../../../etc/passwd".to_string(),
        "/etc/passwd".into(),
        "..\\..\\..\\windows\\win.ini".into(),
        "file:///etc/passwd".into(),
        "/dev/zero".into(),
        attacker.url("/jwks"),
        attacker.url("/"),
        format!("//{}/jwks", attacker.http.addr()),
        "../jwks?kid=rsa-1".into(),
        "%2e%2e%2fjwks".into(),
        "rsa-1/../rsa-1".into(),
        "' OR '1'='1".into(),
        "rsa-1' --".into(),
        "1; DROP TABLE keys; --".into(),
        "{{7*7}}".into(),
        format!("${{jndi:ldap://{}/a}}", attacker.http.addr()),
        "rsa-1\u{0}".into(),
        "rsa-1 ".into(),
        "RSA-1".into(),
        "rsa\u{2010}1".into(),
        "".into(),
        "\r\n".into(),
        "k".repeat(10_000),
    ];
    for kid in &kids {
        // Signed by rsa-1: a kid matched loosely (prefix, case, trimming) would verify and allow.
        let token = TokenBuilder::new(kid, Algorithm::RS256)
            .signed_by("rsa-1")
            .iss(ISS_ACME)
            .aud("orders")
            .sub("alice")
            .build();
        assert!(token.len() <= 16384, "kid {} makes a token over max_bytes", kid.len());
        let out = client.call(&CheckCall::new().tenant("acme").bearer(&token)).await;
        assert_denied(&out, "unknown_key", &token, &format!("kid {kid:.60?}"));
    }

    assert!(attacker.requests().is_empty(), "a kid reached the attacker's server: {:?}", attacker.requests());
    let after: Vec<String> = idp.requests()[at_start..].to_vec();
    assert!(after.iter().all(|r| r == "GET /jwks"), "a kid shaped a key request: {after:?}");
    assert!(
        after.len() <= 1,
        "{} unknown kids within min_refetch_seconds made {} fetches",
        kids.len(),
        after.len()
    );
    // The real key still works.
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&acme("alice").build())).await;
    assert_allowed_as(&out, "acme", "acme-alice", "rsa-1 after the kid attacks");
}

#[tokio::test]
async fn keys_named_by_the_token_jku_x5u_jwk_x5c_are_never_fetched_or_trusted() {
    // keys_remote.rs covers jku, x5u and jwk one by one; here x5c too, all four at once, with the
    // kid of the attacker's key and with the kid of the trusted key.
    let attacker = Recorder::start(&jwks_text("issuer-a-rotated.jwks.json"));
    let sg =
        Subguard::start(&single_tenant_config("jwks_file: keys/issuer-a.jwks.json", 8192, 10), ACME_ALICE);
    let mut client = sg.client().await;
    let rsa2: Value =
        serde_json::from_str::<Value>(&jwks_text("issuer-a-rotated.jwks.json")).unwrap()["keys"][0].clone();
    // An x5c is base64 DER; its content never matters, since it is never read.
    let x5c = json!([base64::engine::general_purpose::STANDARD.encode(b"attacker certificate chain")]);
    let with_keys = |kid: &str| {
        TokenBuilder::new(kid, Algorithm::RS256)
            .signed_by("rsa-2")
            .header("jku", json!(attacker.url("/jwks")))
            .header("x5u", json!(attacker.url("/cert.pem")))
            .header("jwk", rsa2.clone())
            .header("x5c", x5c.clone())
            .iss(ISS_ACME)
            .aud("orders")
            .sub("alice")
    };
    let token = with_keys("rsa-2").build();
    assert_denied(
        &client.call(&CheckCall::new().tenant("acme").bearer(&token)).await,
        "unknown_key",
        &token,
        "attacker kid",
    );
    let token = with_keys("rsa-1").build();
    assert_denied(
        &client.call(&CheckCall::new().tenant("acme").bearer(&token)).await,
        "invalid_signature",
        &token,
        "trusted kid, attacker signature",
    );
    let token = with_keys("rsa-2").without_header("kid").build();
    assert_denied(
        &client.call(&CheckCall::new().tenant("acme").bearer(&token)).await,
        "invalid_signature",
        &token,
        "no kid",
    );
    let token = TokenBuilder::new("rsa-2", Algorithm::RS256)
        .header("x5c", x5c.clone())
        .iss(ISS_ACME)
        .aud("orders")
        .sub("alice")
        .build();
    assert_denied(
        &client.call(&CheckCall::new().tenant("acme").bearer(&token)).await,
        "unknown_key",
        &token,
        "x5c alone",
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        attacker.requests().is_empty(),
        "the token's own key URLs were fetched: {:?}",
        attacker.requests()
    );
}

// ---------------------------------------------------------------------------------------------
// JSON tricks.

#[tokio::test]
async fn duplicate_members_in_the_header_or_claims_are_malformed() {
    let claims = serde_json::to_string(&alice_claims()).unwrap();
    let body = claims.trim_start_matches('{').trim_end_matches('}').to_string();
    let headers = [
        r#"{"alg":"RS256","alg":"none","kid":"rsa-1"}"#,
        r#"{"alg":"none","alg":"RS256","kid":"rsa-1"}"#,
        r#"{"alg":"RS256","kid":"rsa-1","kid":"ec-256"}"#,
        r#"{"alg":"RS256","kid":"rsa-1","k\u0069d":"other"}"#,
        r#"{"alg":"RS256","kid":"rsa-1","crit":["exp"],"crit":null}"#,
    ];
    for header in headers {
        let token = signed_bytes(header.as_bytes(), claims.as_bytes());
        assert_denied(&ask_acme(&token).await, "malformed_token", &token, header);
    }
    let late = now() + 300;
    let payloads = [
        format!(r#"{{{body},"sub":"bob"}}"#),
        format!(r#"{{"sub":"bob",{body}}}"#),
        format!(r#"{{{body},"iss":"https://evil.test/"}}"#),
        format!(r#"{{"iss":"https://evil.test/",{body}}}"#),
        format!(r#"{{{body},"aud":"billing"}}"#),
        format!(r#"{{{body},"exp":{late}}}"#),
        format!(r#"{{"nbf":0,{body},"nbf":{late}}}"#),
        format!(r#"{{{body},"iat":0}}"#),
        format!(r#"{{{body},"s\u0075b":"bob"}}"#),
        format!(r#"{{{body},"\u0073\u0075\u0062":"bob"}}"#),
    ];
    for payload in payloads {
        let token = signed_bytes(RSA1_HEADER.as_bytes(), payload.as_bytes());
        assert_denied(&ask_acme(&token).await, "malformed_token", &token, &payload);
    }
    // Members that differ in case are different members (RFC 8259): only `sub` is the subject.
    let mut claims = alice_claims();
    claims.insert("Sub".into(), json!("bob"));
    claims.insert("SUB".into(), json!("bob"));
    let token = signed_bytes(RSA1_HEADER.as_bytes(), serde_json::to_string(&claims).unwrap().as_bytes());
    assert_allowed_as(&ask_acme(&token).await, "acme", "acme-alice", "Sub/SUB beside sub");
}

/// `depth` nested arrays.
fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn deep_nesting_within_max_bytes_never_crashes() {
    // Within max_bytes (4096). A claim subguard does not read may be as deep as the token allows
    // (it is skipped without recursion); a claim it does read has a depth limit.
    let mut claims = alice_claims();
    claims.insert("x".into(), serde_json::from_str(&nested_arrays(100)).unwrap());
    let shallow = signed_bytes(RSA1_HEADER.as_bytes(), serde_json::to_string(&claims).unwrap().as_bytes());
    assert_allowed_as(
        &ask_acme(&shallow).await,
        "acme",
        "acme-alice",
        "100 nested arrays in an unread claim",
    );

    let cases = [
        (
            payload_plus(&[], format!(r#""x":{}"#, nested_arrays(1000)).as_bytes()),
            "allow",
            "1000 nested arrays",
        ),
        (
            payload_plus(&[], format!(r#""x":{}1{}"#, r#"{"a":"#.repeat(300), "}".repeat(300)).as_bytes()),
            "allow",
            "300 nested objects",
        ),
        (
            payload_plus(&[], format!(r#""x":{}"#, "[".repeat(1500)).as_bytes()),
            "malformed_token",
            "1500 unclosed arrays",
        ),
        (
            payload_plus(&["aud"], format!(r#""aud":{}"#, nested_arrays(1000)).as_bytes()),
            "malformed_token",
            "aud 1000 deep",
        ),
        (
            payload_plus(&["sub"], format!(r#""sub":{}"#, nested_arrays(1000)).as_bytes()),
            "malformed_token",
            "sub 1000 deep",
        ),
    ];
    for (payload, expected, what) in cases {
        let token = signed_bytes(RSA1_HEADER.as_bytes(), &payload);
        assert!(token.len() <= MAX_BYTES, "{what} is meant to be within max_bytes: {}", token.len());
        let out = ask_acme(&token).await;
        match expected {
            "allow" => assert_allowed_as(&out, "acme", "acme-alice", what),
            code => assert_denied(&out, code, &token, what),
        }
    }
    // Deep nesting in the header.
    let header = format!(r#"{{"alg":"RS256","kid":"rsa-1","x5c":{}}}"#, nested_arrays(1000));
    let token = signed_bytes(header.as_bytes(), serde_json::to_string(&alice_claims()).unwrap().as_bytes());
    assert_allowed_as(
        &ask_acme(&token).await,
        "acme",
        "acme-alice",
        "1000 nested arrays in an unread header member",
    );
    let header = format!(r#"{{"alg":{}}}"#, nested_arrays(1000));
    let token = signed_bytes(header.as_bytes(), b"{}");
    assert_denied(&ask_acme(&token).await, "malformed_token", &token, "alg nested 1000 deep");
}

#[tokio::test]
async fn huge_tokens_beyond_max_bytes_are_malformed_at_once() {
    let cases = [
        payload_plus(&[], format!(r#""x":{}"#, nested_arrays(300_000)).as_bytes()),
        payload_plus(&["aud"], format!(r#""aud":{}"#, nested_arrays(300_000)).as_bytes()),
        payload_plus(&[], format!(r#""x":"{}""#, "x".repeat(2 << 20)).as_bytes()),
    ];
    for payload in cases {
        let token = signed_bytes(RSA1_HEADER.as_bytes(), &payload);
        let started = std::time::Instant::now();
        let out = ask_acme(&token).await;
        assert_denied(&out, "malformed_token", &token, &format!("{} bytes", token.len()));
        assert!(started.elapsed() < Duration::from_secs(5), "a huge token took {:?}", started.elapsed());
    }
}

#[tokio::test]
async fn deep_nesting_never_crashes_even_when_max_bytes_allows_megabytes() {
    // An operator may raise max_bytes: the parser must still not recurse on attacker input.
    let sg =
        Subguard::start(&single_tenant_config("jwks_file: keys/issuer-a.jwks.json", 3 << 20, 10), ACME_ALICE);
    let mut client = sg.client().await;
    let cases = [
        (
            payload_plus(&[], format!(r#""x":{}"#, nested_arrays(500_000)).as_bytes()),
            "allow",
            "500k nested arrays",
        ),
        (
            payload_plus(
                &[],
                format!(r#""x":{}1{}"#, r#"{"a":"#.repeat(200_000), "}".repeat(200_000)).as_bytes(),
            ),
            "allow",
            "200k nested objects",
        ),
        (
            payload_plus(&[], format!(r#""x":{}"#, "[".repeat(1_000_000)).as_bytes()),
            "malformed_token",
            "1M unclosed",
        ),
        (
            payload_plus(&["aud"], format!(r#""aud":{}"#, nested_arrays(500_000)).as_bytes()),
            "malformed_token",
            "aud 500k deep",
        ),
    ];
    for (payload, expected, what) in cases {
        let token = signed_bytes(RSA1_HEADER.as_bytes(), &payload);
        let out = client.call(&CheckCall::new().tenant("acme").bearer(&token)).await;
        match expected {
            "allow" => assert_allowed_as(&out, "acme", "acme-alice", what),
            code => assert_denied(&out, code, &token, what),
        }
    }
    // Still alive and answering.
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&acme("alice").build())).await;
    assert_allowed_as(&out, "acme", "acme-alice", "after the deep tokens");
}

#[tokio::test]
async fn non_utf8_bytes_and_raw_control_characters_are_malformed() {
    let body = serde_json::to_string(&alice_claims()).unwrap();
    let payloads: Vec<(Vec<u8>, &str)> = vec![
        (payload_plus(&["sub"], b"\"sub\":\"al\xffice\""), "sub with 0xff"),
        (payload_plus(&["sub"], b"\"sub\":\"\xc3\x28\""), "sub with a bad 2-byte sequence"),
        (payload_plus(&["sub"], b"\"sub\":\"\xed\xa0\x80\""), "sub with an encoded surrogate"),
        (payload_plus(&["sub"], b"\"sub\":\"\xc0\xaf\""), "sub with an overlong '/'"),
        (payload_plus(&["iss"], b"\"iss\":\"https://idp.acme.test/\xff\""), "iss with 0xff"),
        (payload_plus(&["sub"], b"\"s\xffb\":\"alice\""), "member name with 0xff"),
        ([b"\xef\xbb\xbf".as_slice(), body.as_bytes()].concat(), "a UTF-8 byte order mark"),
        (body.encode_utf16().flat_map(|u| u.to_le_bytes()).collect(), "UTF-16"),
        (payload_plus(&["sub"], b"\"sub\":\"ali\nce\""), "a raw newline in sub"),
        (payload_plus(&["sub"], b"\"sub\":\"alice\0\""), "a raw NUL in sub"),
        (payload_plus(&["sub"], b"\"sub\":\"\x1b[31malice\""), "a raw ESC in sub"),
        (payload_plus(&["sub"], b"\"sub\":\"a\\ud800\""), "a lone surrogate escape in sub"),
    ];
    for (payload, what) in payloads {
        let token = signed_bytes(RSA1_HEADER.as_bytes(), &payload);
        assert_denied(&ask_acme(&token).await, "malformed_token", &token, what);
    }
    let header = b"{\"alg\":\"RS256\",\"kid\":\"rsa-\xff1\"}";
    let token = signed_bytes(header, body.as_bytes());
    assert_denied(&ask_acme(&token).await, "malformed_token", &token, "kid with 0xff");
}

#[tokio::test]
async fn invalid_utf8_in_a_claim_subguard_does_not_read_is_still_malformed() {
    // RFC 7519 §7.2 step 10: the payload must be "a UTF-8-encoded representation of a completely
    // valid JSON object"; SPEC §3: bad JSON is malformed_token. An IdP never mints this, so a
    // token carrying it was not made by a conforming issuer, and the application behind subguard
    // (which gets the token) must not be the first to find out.
    let body = serde_json::to_string(&alice_claims()).unwrap();
    let mut cases: Vec<(String, &str)> = [
        (b"\"x\":\"\xff\xfe\"".as_slice(), "0xff 0xfe in an unread claim"),
        (b"\"x\":[\"\xc3\x28\"]".as_slice(), "a bad 2-byte sequence in an unread claim"),
        (b"\"x\":{\"\xed\xa0\x80\":1}".as_slice(), "an encoded surrogate in an unread member name"),
    ]
    .into_iter()
    .map(|(extra, what)| (signed_bytes(RSA1_HEADER.as_bytes(), &payload_plus(&[], extra)), what))
    .collect();
    let header = b"{\"alg\":\"RS256\",\"kid\":\"rsa-1\",\"typ\":\"JW\xffT\"}";
    cases.push((signed_bytes(header, body.as_bytes()), "0xff in an unread header member"));
    // Every case is asked before judging, so a failure lists them all.
    let mut wrong = Vec::new();
    for (token, what) in &cases {
        let out = ask_acme(token).await;
        if out.reason() != Some("malformed_token") || out.allowed {
            let got = if out.allowed { "ALLOWED".to_string() } else { format!("{:?}", out.reason()) };
            wrong.push(format!("{what}: expected malformed_token, got {got}"));
        }
    }
    assert!(wrong.is_empty(), "invalid UTF-8 accepted:\n{}", wrong.join("\n"));
    for (token, what) in &cases {
        assert_denied(&ask_acme(token).await, "malformed_token", token, what);
    }
}

#[tokio::test]
async fn escaped_control_characters_in_sub_are_just_other_subs() {
    // Escaped in JSON, these are valid strings: the sub is looked up exactly as it is, and it can
    // never become a header or a log line of its own.
    for sub in [
        "alice\u{0}",
        "alice\n",
        "alice\r\nx-user-id: root",
        "\u{1b}[31malice",
        "alice\u{7f}",
        "alice\u{2028}",
        "alice\u{feff}",
    ] {
        let token = acme(sub).build();
        let out = ask_acme(&token).await;
        assert_denied(&out, "user_not_found", &token, &format!("sub {sub:?}"));
        let meta = out.meta("sub").unwrap_or_default();
        assert_eq!(meta, metadata_form(sub), "the metadata carries the sub, control characters escaped");
        assert!(!meta.chars().any(char::is_control), "a control character reached the metadata: {meta:?}");
        assert!(out.headers.iter().all(|(k, _)| k != "x-user-id" && !k.contains('\n')), "{out:#?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Signatures.

#[tokio::test]
async fn signatures_stripped_truncated_or_forged_never_verify() {
    let token = acme("alice").build();
    let (signing_input, signature) = token.rsplit_once('.').unwrap();

    let stripped = format!("{signing_input}.");
    assert_denied(&ask_acme(&stripped).await, "invalid_signature", &stripped, "RS256, signature stripped");
    for k in 1..=8 {
        let cut = &signature[..signature.len() - k];
        let truncated = format!("{signing_input}.{cut}");
        // Not valid base64url any more is malformed; valid but short is a bad signature.
        let code = if URL_SAFE_NO_PAD.decode(cut).is_ok() { "invalid_signature" } else { "malformed_token" };
        assert_denied(&ask_acme(&truncated).await, code, &truncated, &format!("signature cut by {k}"));
    }
    let extended = format!("{token}AAAA");
    assert_denied(
        &ask_acme(&extended).await,
        "invalid_signature",
        &extended,
        "signature with 3 zero bytes appended",
    );
    let sig_bytes = URL_SAFE_NO_PAD.decode(signature).unwrap();
    let doubled = format!("{signing_input}.{}", b64([sig_bytes.clone(), sig_bytes.clone()].concat()));
    assert_denied(&ask_acme(&doubled).await, "invalid_signature", &doubled, "signature twice");
    let mut flipped = sig_bytes.clone();
    flipped[0] ^= 1;
    let flipped = format!("{signing_input}.{}", b64(&flipped));
    assert_denied(&ask_acme(&flipped).await, "invalid_signature", &flipped, "one bit flipped");
    // A genuine signature of another token by the same key.
    let other = acme("bob").build();
    let transplanted = format!("{signing_input}.{}", other.rsplit_once('.').unwrap().1);
    assert_denied(
        &ask_acme(&transplanted).await,
        "invalid_signature",
        &transplanted,
        "signature of another token",
    );

    // ECDSA: empty, all-zero r and s (CVE-2022-21449, "psychic signatures"), r = s = n, DER
    // instead of the JWS r||s form, and EdDSA of wrong lengths.
    let es = TokenBuilder::new("ec-256", Algorithm::ES256).iss(ISS_ACME).aud("orders").sub("alice").build();
    let (es_input, es_sig) = es.rsplit_once('.').unwrap();
    let raw = URL_SAFE_NO_PAD.decode(es_sig).unwrap();
    assert_eq!(raw.len(), 64);
    let n = hex("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551");
    let mut der = vec![0x30, 0x46, 0x02, 0x21, 0x00];
    der.extend_from_slice(&raw[..32]);
    der.extend_from_slice(&[0x02, 0x21, 0x00]);
    der.extend_from_slice(&raw[32..]);
    for (sig, what) in [
        (String::new(), "ES256, signature stripped"),
        (b64([0u8; 64]), "ES256, r = s = 0"),
        (b64([n.clone(), n.clone()].concat()), "ES256, r = s = n"),
        (b64(&der), "ES256, DER-encoded signature"),
        (b64(&raw[..63]), "ES256, 63 bytes"),
        (b64([raw.clone(), vec![0]].concat()), "ES256, 65 bytes"),
    ] {
        let forged = format!("{es_input}.{sig}");
        assert_denied(&ask_acme(&forged).await, "invalid_signature", &forged, what);
    }
    let ed = TokenBuilder::new("ed-1", Algorithm::EdDSA).iss(ISS_ACME).aud("orders").sub("alice").build();
    let (ed_input, ed_sig) = ed.rsplit_once('.').unwrap();
    let raw = URL_SAFE_NO_PAD.decode(ed_sig).unwrap();
    for (sig, what) in [
        (String::new(), "EdDSA, signature stripped"),
        (b64([0u8; 64]), "EdDSA, all zeros"),
        (b64(&raw[..63]), "EdDSA, 63 bytes"),
        (b64([raw.clone(), vec![0]].concat()), "EdDSA, 65 bytes"),
    ] {
        let forged = format!("{ed_input}.{sig}");
        assert_denied(&ask_acme(&forged).await, "invalid_signature", &forged, what);
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[tokio::test]
async fn hmac_with_the_public_key_is_refused_for_every_hs_size_and_alg_spelling() {
    // grpc_decisions.rs covers HS256; the other HMAC sizes and spellings of real algorithms.
    let jwks = jwks_text("issuer-a.jwks.json");
    let rsa1: Value = serde_json::from_str::<Value>(&jwks).unwrap()["keys"][0].clone();
    let n = URL_SAFE_NO_PAD.decode(rsa1["n"].as_str().unwrap()).unwrap();
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        for secret in [jwks.as_bytes(), rsa1.to_string().as_bytes(), n.as_slice()] {
            let header = format!(r#"{{"alg":"{}","kid":"rsa-1"}}"#, common::tokens::alg_name(alg));
            let payload = serde_json::to_string(&alice_claims()).unwrap();
            let key = jsonwebtoken::EncodingKey::from_secret(secret);
            let token = sign_segments(&b64(header), &b64(payload), &key, alg);
            assert_denied(&ask_acme(&token).await, "unsupported_algorithm", &token, &format!("{alg:?}"));
        }
    }
    let claims = serde_json::to_string(&alice_claims()).unwrap();
    for alg in [
        "rs256",
        "Rs256",
        "RS256 ",
        " RS256",
        "RS256\u{0}",
        "RS 256",
        "RSA256",
        "RS-256",
        "ES256K",
        "ECDSA",
        "Ed25519",
        "EDDSA",
        "PS256\n",
        "",
    ] {
        let header = json!({"alg": alg, "kid": "rsa-1"}).to_string();
        let token = mint_raw(&header, &claims, "rsa-1", Algorithm::RS256);
        assert_denied(&ask_acme(&token).await, "unsupported_algorithm", &token, &format!("alg {alg:?}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Tenants and issuers.

#[tokio::test]
async fn a_token_of_tenant_b_is_refused_by_tenant_a_from_every_tenant_source() {
    let globex =
        TokenBuilder::new("other-rsa", Algorithm::RS256).iss(ISS_GLOBEX).aud("orders").sub("u-77").build();
    let out = ask(CheckCall::new().tenant("globex").bearer(&globex)).await;
    assert_allowed_as(&out, "globex", "u-77", "globex's own token");
    for call in [
        CheckCall::new().tenant("acme"),
        CheckCall::new().host("acme.api.example.com"),
        CheckCall::new().route_tenant("acme"),
        CheckCall::new().tenant("ACME").host("Acme.Api.Example.Com:443").route_tenant("acme"),
    ] {
        let out = ask(call.bearer(&globex)).await;
        assert_denied(&out, "untrusted_issuer", &globex, "globex token at acme");
    }
    // The other way round, and a globex-issued token claiming an acme user.
    let token = acme("alice").build();
    assert_denied(
        &ask(CheckCall::new().tenant("globex").bearer(&token)).await,
        "untrusted_issuer",
        &token,
        "acme token at globex",
    );
    let token =
        TokenBuilder::new("other-rsa", Algorithm::RS256).iss(ISS_ACME).aud("orders").sub("alice").build();
    assert_denied(&ask_acme(&token).await, "unknown_key", &token, "acme iss, signed by globex's key");
}

#[tokio::test]
async fn an_issuer_trusted_by_two_tenants_resolves_the_sub_only_in_the_requests_tenant() {
    let alice = acme("alice").build();
    let carol = acme("carol").build();
    let bob = acme("bob").build();
    let out = ask(CheckCall::new().tenant("acme").bearer(&alice)).await;
    assert_allowed_as(&out, "acme", "acme-alice", "alice at acme");
    assert_eq!(out.header_all("x-user-roles"), ["admin"]);
    let out = ask(CheckCall::new().host("twin.api.example.com").bearer(&alice)).await;
    assert_allowed_as(&out, "twin", "twin-alice", "alice at twin");
    assert_eq!(out.header_all("x-user-roles"), ["viewer"], "twin's roles, never acme's");

    let out = ask(CheckCall::new().tenant("twin").bearer(&carol)).await;
    assert_allowed_as(&out, "twin", "twin-carol", "carol at twin");
    assert_denied(
        &ask(CheckCall::new().tenant("acme").bearer(&carol)).await,
        "user_not_found",
        &carol,
        "carol at acme",
    );
    assert_denied(
        &ask(CheckCall::new().tenant("twin").bearer(&bob)).await,
        "user_not_found",
        &bob,
        "bob at twin",
    );
    // twin allows RS256 only: acme's wider algorithm list does not leak into it.
    let es = TokenBuilder::new("ec-256", Algorithm::ES256).iss(ISS_ACME).aud("orders").sub("alice").build();
    assert_allowed_as(&ask_acme(&es).await, "acme", "acme-alice", "ES256 at acme");
    assert_denied(
        &ask(CheckCall::new().tenant("twin").bearer(&es)).await,
        "unsupported_algorithm",
        &es,
        "ES256 at twin",
    );
    // And the sources must still agree.
    let out = ask(CheckCall::new().tenant("acme").host("twin.api.example.com").bearer(&alice)).await;
    assert_denied(&out, "tenant_mismatch", &alice, "acme header, twin host");
}

#[tokio::test]
async fn tenant_header_and_host_edge_cases() {
    let token = acme("alice").build();
    // (header, host, expected): expected is "acme" for an allow as acme, else a reason code.
    let cases: [(Option<&str>, Option<&str>, &str); 24] = [
        (None, Some("acme.api.example.com:8443"), "acme"),
        (None, Some("ACME.API.EXAMPLE.COM."), "acme"),
        (None, Some("acme.api.example.com.:65535"), "acme"),
        (Some("ACME"), Some("acme.API.example.com"), "acme"),
        // An empty port is a valid authority (RFC 3986 §3.2.3, `port = *DIGIT`): the default port.
        (None, Some("acme.api.example.com:"), "acme"),
        (None, Some("acme.api.example.com:80:80"), "missing_tenant"),
        (None, Some("acme.api.example.com:http"), "missing_tenant"),
        (None, Some("acme.api.example.com.."), "missing_tenant"),
        (None, Some("acme..api.example.com"), "missing_tenant"),
        (None, Some("evil.test@acme.api.example.com"), "missing_tenant"),
        (None, Some("acme.api.example.com.evil.test"), "missing_tenant"),
        (None, Some("acme.api.example.com\r\nx-tenant-id: globex"), "missing_tenant"),
        (None, Some("acme.api.example.com\u{0}"), "missing_tenant"),
        (None, Some("[::1]:443"), "missing_tenant"),
        // IDN: a look-alike of acme (Cyrillic а) as raw UTF-8 is no DNS label, as punycode it is
        // a label that names no configured tenant.
        (None, Some("аcme.api.example.com"), "missing_tenant"),
        (None, Some("xn--cme-5cd.api.example.com"), "unknown_tenant"),
        (Some("acme"), Some("xn--cme-5cd.api.example.com"), "tenant_mismatch"),
        // A host that is not a label is no tenant source at all (SPEC §3): the header decides,
        // and the token must still be acme's.
        (Some("acme"), Some("аcme.api.example.com"), "acme"),
        (Some("аcme"), None, "missing_tenant"),
        (Some("acme "), None, "missing_tenant"),
        (Some("acme\u{0}"), None, "missing_tenant"),
        (Some("acme\r\nx-user-id: root"), None, "missing_tenant"),
        (Some("acme"), Some("globex.api.example.com:8443"), "tenant_mismatch"),
        (Some("twin"), Some("acme.api.example.com."), "tenant_mismatch"),
    ];
    for (header, host, expected) in cases {
        let mut call = CheckCall::new().bearer(&token);
        if let Some(h) = header {
            call = call.tenant(h);
        }
        if let Some(h) = host {
            call = call.host(h);
        }
        let what = format!("header {header:?}, host {host:?}");
        let out = ask(call).await;
        match expected {
            "acme" => assert_allowed_as(&out, "acme", "acme-alice", &what),
            code => assert_denied(&out, code, &token, &what),
        }
    }
    // Repeated tenant headers as separate header_map entries (encode_raw_headers) are joined too.
    let out = ask(CheckCall::new().raw_headers().tenant("acme").tenant("acme").bearer(&token)).await;
    assert_denied(&out, "missing_tenant", &token, "two x-tenant-id entries in header_map");
    let out = ask(CheckCall::new()
        .raw_headers()
        .header("X-Tenant-Id", "acme")
        .header("x-tenant-id", "globex")
        .bearer(&token))
    .await;
    assert_denied(&out, "missing_tenant", &token, "x-tenant-id in two casings in header_map");
}

// ---------------------------------------------------------------------------------------------
// Claims.

#[tokio::test]
async fn audience_shapes() {
    let allowed = [json!("orders"), json!(["orders"]), json!(["orders", "orders"]), json!(["", "orders"])];
    for aud in allowed {
        let token = acme("alice").aud(aud.clone()).build();
        assert_allowed_as(&ask_acme(&token).await, "acme", "acme-alice", &format!("aud {aud}"));
    }
    let refused = [
        (json!([]), "invalid_audience"),
        (json!([""]), "invalid_audience"),
        (json!(""), "invalid_audience"),
        (Value::Null, "invalid_audience"),
        (json!("orders "), "invalid_audience"),
        (json!(" orders"), "invalid_audience"),
        (json!("ORDERS"), "invalid_audience"),
        (json!(["ORDERS", "Orders"]), "invalid_audience"),
        (json!("оrders"), "invalid_audience"),
        (json!("orders\u{0}"), "invalid_audience"),
        (json!("orders,billing"), "invalid_audience"),
        (json!("*"), "invalid_audience"),
        (json!([["orders"]]), "malformed_token"),
        (json!(["orders", null]), "malformed_token"),
        (json!({"orders": true}), "malformed_token"),
        (json!(true), "malformed_token"),
    ];
    for (aud, code) in refused {
        let token = acme("alice").aud(aud.clone()).build();
        assert_denied(&ask_acme(&token).await, code, &token, &format!("aud {aud}"));
    }
}

#[tokio::test]
async fn numeric_dates_at_the_edges() {
    let n = now();
    // (claim, value, expected): "allow" or a reason code. Leeway is 60 s.
    let cases: Vec<(&str, Value, &str)> = vec![
        ("exp", json!(-1), "token_expired"),
        ("exp", json!(0), "token_expired"),
        ("exp", json!(-0.0), "token_expired"),
        ("exp", json!(-1e300), "token_expired"),
        ("exp", json!(n - 61), "token_expired"),
        ("exp", json!((n - 61) as f64 + 0.5), "token_expired"),
        ("exp", json!(n - 55), "allow"),
        // SPEC sets no maximum lifetime: a far-future exp from the trusted IdP is valid.
        ("exp", json!(1e12), "allow"),
        ("exp", json!(1e300), "allow"),
        ("exp", json!(f64::MAX), "allow"),
        ("exp", json!(u64::MAX), "allow"),
        ("exp", json!(n.to_string()), "malformed_token"),
        ("exp", json!("1e300"), "malformed_token"),
        ("exp", json!([n + 300]), "malformed_token"),
        ("exp", json!({"$date": n + 300}), "malformed_token"),
        ("exp", json!(true), "malformed_token"),
        ("nbf", json!(1e12), "token_not_yet_valid"),
        ("nbf", json!(1e300), "token_not_yet_valid"),
        ("nbf", json!(f64::MAX), "token_not_yet_valid"),
        ("nbf", json!(n + 120), "token_not_yet_valid"),
        ("nbf", json!(-1e300), "allow"),
        ("nbf", json!(-1), "allow"),
        ("nbf", json!("0"), "malformed_token"),
        ("iat", json!(1e12), "token_not_yet_valid"),
        ("iat", json!(1e300), "token_not_yet_valid"),
        ("iat", json!(-1), "allow"),
        ("iat", json!(0.5), "allow"),
        ("iat", json!("now"), "malformed_token"),
    ];
    for (claim, value, expected) in cases {
        let token = acme("alice").claim(claim, value.clone()).build();
        let what = format!("{claim} = {value}");
        let out = ask_acme(&token).await;
        match expected {
            "allow" => assert_allowed_as(&out, "acme", "acme-alice", &what),
            code => assert_denied(&out, code, &token, &what),
        }
    }
    // Numbers JSON allows but f64 cannot hold are not a time.
    for (payload, what) in [
        (payload_plus(&["exp"], br#""exp":1e400"#), "exp 1e400"),
        (payload_plus(&[], br#""nbf":-1e400"#), "nbf -1e400"),
    ] {
        let token = signed_bytes(RSA1_HEADER.as_bytes(), &payload);
        assert_denied(&ask_acme(&token).await, "malformed_token", &token, what);
    }
}

#[tokio::test]
async fn sub_is_matched_exactly_spaces_case_and_look_alikes_included() {
    for sub in [
        "alice ",
        " alice",
        "Alice",
        "ALICE",
        "аlice",        // Cyrillic а
        "ali\u{0441}e", // Cyrillic с
        "ａlice",       // fullwidth a
        "alice\u{200b}",
        "al ice",
        "alice\t",
        "user  with spaces",
        "user with spaces ",
        "*",
        "%",
        ".",
        "..",
        "../twin/alice",
        "twin/alice",
        "alice@twin",
        "' OR '1'='1",
    ] {
        let token = acme(sub).build();
        let out = ask_acme(&token).await;
        assert_denied(&out, "user_not_found", &token, &format!("sub {sub:?}"));
        assert_eq!(out.meta("sub"), Some(metadata_form(sub).as_str()));
    }
    let token = acme("user with spaces").build();
    assert_allowed_as(&ask_acme(&token).await, "acme", "spaced", "the exact spaced sub");
}

// ---------------------------------------------------------------------------------------------
// Authorization and other headers.

#[tokio::test]
async fn authorization_values_that_are_not_exactly_one_bearer_token() {
    let t1 = acme("alice").build();
    let t2 = acme("bob").build();
    let cases: Vec<(String, &str)> = vec![
        (format!("Bearer {t1},Bearer {t2}"), "malformed_token"),
        (format!("Bearer {t1}, Bearer {t1}"), "malformed_token"),
        (format!("Bearer {t1},{t1}"), "malformed_token"),
        (format!("Bearer {t1} {t2}"), "malformed_token"),
        (format!("Bearer Bearer {t1}"), "malformed_token"),
        (format!("Bearer {t1}\r\nx-user-id: root"), "malformed_token"),
        (format!("Bearer {t1}\u{0}"), "malformed_token"),
        (format!("Bearer \"{t1}\""), "malformed_token"),
        (format!("Bearer {t1};"), "malformed_token"),
        (format!("Bearer=\"{t1}\""), "missing_token"),
        (format!("Basic {t1}"), "missing_token"),
        (format!("DPoP {t1}"), "missing_token"),
        (t1.clone(), "missing_token"),
        (format!("Bearer\u{a0}{t1}"), "missing_token"),
        ("Bearer \u{0}".to_string(), "malformed_token"),
    ];
    for (value, code) in cases {
        for raw in [false, true] {
            let mut call = CheckCall::new().tenant("acme").header("authorization", &value);
            if raw {
                call = call.raw_headers();
            }
            let out = ask(call).await;
            assert_denied(&out, code, &t1, &format!("authorization {value:.40?} (raw {raw})"));
        }
    }
    // Two header_map entries, also in two casings: joined, never one valid token.
    for (a, b) in [("authorization", "authorization"), ("Authorization", "authorization")] {
        let call = CheckCall::new()
            .raw_headers()
            .tenant("acme")
            .header(a, &format!("Bearer {t1}"))
            .header(b, &format!("Bearer {t1}"));
        assert_denied(&ask(call).await, "malformed_token", &t1, &format!("{a} + {b} in header_map"));
    }
}

#[tokio::test]
async fn a_hundred_headers_and_huge_values_are_answered_and_never_help() {
    let token = acme("alice").build();
    let junk: Vec<(String, String)> =
        (0..100).map(|i| (format!("x-junk-{i}-{}", "h".repeat(200)), "v".repeat(1024))).collect();
    let with_junk = |mut call: CheckCall| {
        for (k, v) in &junk {
            call = call.header(k, v);
        }
        call
    };
    // Identity headers the client sent are ignored by the check itself: only the token counts.
    let spoof = |call: CheckCall| {
        call.header("x-user-id", "root")
            .header("x-user-roles", "admin,superuser")
            .header("x-forwarded-user", "root")
    };
    let out = ask(spoof(with_junk(CheckCall::new().tenant("acme").bearer(&token)))).await;
    assert_allowed_as(&out, "acme", "acme-alice", "100 junk headers, valid token");
    assert_eq!(out.header_all("x-user-roles"), ["admin"]);
    let bob = acme("bob").build();
    let out = ask(spoof(with_junk(CheckCall::new().tenant("acme").bearer(&bob)))).await;
    assert_allowed_as(&out, "acme", "bob", "bob with spoofed identity headers");
    assert!(out.header("x-user-roles").is_none() && out.removes("x-user-roles"), "{out:#?}");
    let out = ask(spoof(with_junk(CheckCall::new().tenant("acme")))).await;
    assert_denied(&out, "missing_token", "", "spoofed identity, no token");

    let huge = "A".repeat(1 << 20);
    let out = ask(with_junk(CheckCall::new().tenant(&huge).bearer(&token))).await;
    assert_denied(&out, "missing_tenant", &token, "1 MiB tenant header");
    assert_eq!(out.body["tenant"], Value::Null);
    let out = ask(CheckCall::new().host(&format!("{huge}.api.example.com")).bearer(&token)).await;
    assert_denied(&out, "missing_tenant", &token, "1 MiB host");
    let out = ask(CheckCall::new()
        .tenant("acme")
        .header("authorization", &format!("Bearer {}", "a.b.c".repeat(600_000))))
    .await;
    assert_denied(&out, "malformed_token", "", "3 MB authorization");
    // A huge request id is cut (on a character boundary) in the body.
    for id in ["r".repeat(1 << 20), "é".repeat(100_000), format!("r{}", "🦀".repeat(50_000))] {
        let out = ask(CheckCall::new().tenant("acme").request_id(&id)).await;
        assert_denied(&out, "missing_token", "", "huge request id");
        let echoed = out.body["request_id"].as_str().unwrap_or_else(|| panic!("{out:#?}"));
        assert!(echoed.len() <= 128 && id.starts_with(echoed), "request id echoed as {} bytes", echoed.len());
    }
}

// ---------------------------------------------------------------------------------------------
// Keys: JWKS hygiene (src/keys/mod.rs).

/// A JWKS holding issuer-a's keys plus `extra` JWKs.
fn issuer_a_plus(extra: &[Value]) -> String {
    let mut doc: Value = serde_json::from_str(&jwks_text("issuer-a.jwks.json")).unwrap();
    doc["keys"].as_array_mut().unwrap().extend(extra.iter().cloned());
    doc.to_string()
}

/// A 1024-bit RSA public key (generated for this test only) under kid `weak-1024`, and a token for
/// acme's alice that its private key signed (exp 2100-01-01). Refusing the key is what stops it.
const WEAK_1024_JWK: &str = r#"{"kty": "RSA", "kid": "weak-1024", "use": "sig", "n": "2V3agM2pdcmqYtdEp8YQ334dDBZ0WVDfE8_LChoVSAAkZT-amwpZt6byYndlrar-pI4sswU308DAuA1e_A2EIv4b4uqnbBVYMhS2uyRTbCns-OlDx08VK3zY1I6DImp_05M-fdxAFBS-Ym1AoekdaI91T5d2vzLOYRDOF_3Zu2M", "e": "AQAB"}"#;
const WEAK_1024_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IndlYWstMTAyNCIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2lkcC5hY21lLnRlc3QvIiwiYXVkIjoib3JkZXJzIiwic3ViIjoiYWxpY2UiLCJpYXQiOjE3MDAwMDAwMDAsImV4cCI6NDEwMjQ0NDgwMH0.TixF3_xN96pwpkBDbEWVei2Rv2vqdIFMPAoj3mdEdxgO-5DP8MmIIDeBU8W59PAXCdXyuSe-wXOA0WmmgoqtrkAqfN9FgYkrKzFjjQavP3BasixigYCzdUKM_E-38R2GGt1Ur5e4V9AN_4ERhSXEjIjyRzSaXyqeTD2MNtASD4o";

#[tokio::test]
async fn a_short_rsa_key_in_the_jwks_is_refused_with_a_warning() {
    let dir = ConfigDir::with(&single_tenant_config("jwks_file: keys/acme.json", 8192, 1), ACME_ALICE);
    dir.write("keys/acme.json", &issuer_a_plus(&[serde_json::from_str(WEAK_1024_JWK).unwrap()]));
    let sg = Subguard::start_in(dir);
    let mut client = sg.client().await;
    let out = client.call(&CheckCall::new().tenant("acme").bearer(WEAK_1024_TOKEN)).await;
    // The issuer has that key; subguard does not verify with it: the algorithm cannot be accepted.
    assert_denied(&out, "unsupported_algorithm", WEAK_1024_TOKEN, "token signed by a 1024-bit key");
    let warned = warnings_mentioning(&sg, "1024 bits");
    assert!(!warned.is_empty(), "no warning names the refused 1024-bit key:\n{}", sg.logs().join("\n"));
    // The good keys of the same document are in use.
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&acme("alice").build())).await;
    assert_allowed_as(&out, "acme", "acme-alice", "rsa-1 beside the weak key");
}

/// An Ed25519 key of small order in the JWKS (an all-zero placeholder, the identity point)
/// verifies signatures nobody made: with the identity, R = the identity and S = 0 signs anything,
/// for anyone. subguard leaves such keys out with a warning, so the forgery is refused with or
/// without a `kid` (the reverted check let both through: the identity point always, the
/// all-zero key for some messages).
#[tokio::test]
async fn an_ed25519_key_of_small_order_in_the_jwks_verifies_nothing() {
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let placeholders = [
        json!({"kty": "OKP", "crv": "Ed25519", "kid": "placeholder", "x": URL_SAFE_NO_PAD.encode(identity)}),
        json!({"kty": "OKP", "crv": "Ed25519", "kid": "zeros", "x": URL_SAFE_NO_PAD.encode([0u8; 32])}),
    ];
    let config = single_tenant_config("jwks_file: keys/acme.json", 8192, 1)
        .replace(r#"["RS256", "PS256", "ES256"]"#, r#"["RS256", "EdDSA"]"#);
    let dir = ConfigDir::with(&config, "acme:\n  - sub: admin\n    roles: [admin]\n");
    dir.write("keys/acme.json", &issuer_a_plus(&placeholders));
    let sg = Subguard::start_in(dir);
    let mut client = sg.client().await;
    let forged = |header: Value| {
        let claims = json!({"iss": ISS_ACME, "aud": "orders", "sub": "admin", "exp": now() + 600});
        let signature = [&identity[..], &[0u8; 32]].concat();
        format!(
            "{}.{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes()),
            b64(&signature)
        )
    };
    for (kid, code) in [
        (Some("placeholder"), "unsupported_algorithm"),
        (Some("zeros"), "unsupported_algorithm"),
        // Without kid, the set's one real Ed25519 key (ed-1) is tried.
        (None, "invalid_signature"),
    ] {
        let header = match kid {
            Some(kid) => json!({"alg": "EdDSA", "kid": kid}),
            None => json!({"alg": "EdDSA"}),
        };
        let token = forged(header);
        let out = client.call(&CheckCall::new().tenant("acme").bearer(&token)).await;
        assert_denied(&out, code, &token, &format!("forged EdDSA token, kid {kid:?}"));
    }
    assert_eq!(warnings_mentioning(&sg, "a point of small order").len(), 2, "{}", sg.logs().join("\n"));
}

#[tokio::test]
async fn encryption_symmetric_and_alg_pinned_keys_are_used_only_as_they_say() {
    let jwks = |name: &str, i: usize| -> Value {
        serde_json::from_str::<Value>(&jwks_text(name)).unwrap()["keys"][i].clone()
    };
    let mut rsa1_enc = jwks("issuer-a.jwks.json", 0);
    rsa1_enc["use"] = json!("enc");
    let mut rsa2_rs256 = jwks("issuer-a-rotated.jwks.json", 0);
    rsa2_rs256["alg"] = json!("RS256");
    let ec256 = jwks("issuer-a.jwks.json", 1);
    let secret = b"a shared secret that must never verify anything";
    let oct = json!({"kty": "oct", "kid": "shared", "use": "sig", "k": b64(secret)});
    let doc = json!({"keys": [rsa1_enc, rsa2_rs256, ec256, oct]}).to_string();
    let idp = Recorder::start(&doc);
    let sg = Subguard::start(
        &single_tenant_config(&format!(r#"jwks_uri: "{}""#, idp.url("/jwks")), 8192, 10),
        ACME_ALICE,
    );
    let client = sg.client().await;
    let check = |token: &str| {
        let mut client = client.clone();
        let call = CheckCall::new().tenant("acme").bearer(token);
        async move { client.call(&call).await }
    };

    let fetches = idp.requests().len();
    let token = acme("alice").build();
    assert_denied(&check(&token).await, "unsupported_algorithm", &token, "rsa-1 published with use: enc");
    let token = acme("alice").without_header("kid").build();
    assert_denied(
        &check(&token).await,
        "invalid_signature",
        &token,
        "kid-less rsa-1 (only rsa-2 is a signing RSA key)",
    );
    let token = TokenBuilder::new("shared", Algorithm::RS256)
        .signed_by("rsa-1")
        .iss(ISS_ACME)
        .aud("orders")
        .sub("alice")
        .build();
    assert_denied(&check(&token).await, "unsupported_algorithm", &token, "kid of the oct key");
    // Both kids are in the set: neither sent subguard fetching it again (min_refetch_seconds: 10).
    assert_eq!(idp.requests().len(), fetches, "{:?}", idp.requests());
    let token = {
        let header = r#"{"alg":"HS256","kid":"shared"}"#;
        let payload = serde_json::to_string(&alice_claims()).unwrap();
        sign_segments(
            &b64(header),
            &b64(payload),
            &jsonwebtoken::EncodingKey::from_secret(secret),
            Algorithm::HS256,
        )
    };
    assert_denied(&check(&token).await, "unsupported_algorithm", &token, "HS256 with the published oct key");
    let token = TokenBuilder::new("rsa-2", Algorithm::PS256).iss(ISS_ACME).aud("orders").sub("alice").build();
    assert_denied(&check(&token).await, "unsupported_algorithm", &token, "PS256 under a key pinned to RS256");
    // The log says the pin refused it: an RSA key as such verifies PS256.
    let detail = r#"kid \"rsa-2\" pins alg RS256 in the JWKS; the token is PS256"#;
    assert_eq!(sg.logged(detail).len(), 1, "no deny logged with {detail}:\n{}", sg.logs().join("\n"));
    let token = TokenBuilder::new("rsa-2", Algorithm::RS256).iss(ISS_ACME).aud("orders").sub("alice").build();
    assert_allowed_as(&check(&token).await, "acme", "acme-alice", "RS256 under the key pinned to RS256");
    let token =
        TokenBuilder::new("ec-256", Algorithm::ES256).iss(ISS_ACME).aud("orders").sub("alice").build();
    assert_allowed_as(&check(&token).await, "acme", "acme-alice", "the use: sig EC key");

    for needle in ["use is `enc`", "symmetric keys are never used"] {
        assert!(
            !warnings_mentioning(&sg, needle).is_empty(),
            "no warning says {needle:?}:\n{}",
            sg.logs().join("\n")
        );
    }
}

#[tokio::test]
async fn an_oversized_jwks_response_is_refused_and_the_last_good_keys_stay() {
    let idp = Recorder::start(&jwks_text("issuer-a.jwks.json"));
    let sg = Subguard::start(
        &single_tenant_config(&format!(r#"jwks_uri: "{}""#, idp.url("/jwks")), 8192, 1),
        ACME_ALICE,
    );
    let mut client = sg.client().await;
    let rsa1 = acme("alice").build();
    let rsa2 = TokenBuilder::new("rsa-2", Algorithm::RS256).iss(ISS_ACME).aud("orders").sub("alice").build();
    assert_allowed_as(
        &client.call(&CheckCall::new().tenant("acme").bearer(&rsa1)).await,
        "acme",
        "acme-alice",
        "before",
    );

    // The rotated JWKS (rsa-2 only), padded past 1 MiB with a member JWKS readers ignore.
    let padded = |bytes: usize| {
        let mut doc: Value = serde_json::from_str(&jwks_text("issuer-a-rotated.jwks.json")).unwrap();
        doc["padding"] = json!(" ".repeat(bytes));
        doc.to_string()
    };
    idp.set_jwks(&padded(1_100_000));
    std::thread::sleep(Duration::from_millis(1200));
    let before = idp.requests().len();
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&rsa2)).await;
    assert_denied(&out, "unknown_key", &rsa2, "rsa-2 from an oversized JWKS");
    assert_eq!(idp.requests().len(), before + 1, "the unknown kid made one fetch");
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&rsa1)).await;
    assert_allowed_as(&out, "acme", "acme-alice", "last good keys after the oversized answer");
    assert_eq!(sg.admin_get("/readyz").0, 200);
    assert!(
        !warnings_mentioning(&sg, "larger than").is_empty(),
        "no warning about the size:\n{}",
        sg.logs().join("\n")
    );

    // Just under the limit is fine: it is the size that was refused.
    idp.set_jwks(&padded(900_000));
    std::thread::sleep(Duration::from_millis(1200));
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&rsa2)).await;
    assert_allowed_as(&out, "acme", "acme-alice", "rsa-2 from a 900 kB JWKS");
}

#[tokio::test]
async fn a_kidless_token_tries_at_most_eight_keys() {
    // A JWKS with many keys cannot turn one kid-less token into many RSA verifications: the ninth
    // fitting key is never tried (documented limit).
    let rsa2: Value =
        serde_json::from_str::<Value>(&jwks_text("issuer-a-rotated.jwks.json")).unwrap()["keys"][0].clone();
    let rsa1: Value =
        serde_json::from_str::<Value>(&jwks_text("issuer-a.jwks.json")).unwrap()["keys"][0].clone();
    let mut keys: Vec<Value> = (0..8)
        .map(|i| {
            let mut k = rsa2.clone();
            k["kid"] = json!(format!("decoy-{i}"));
            k
        })
        .collect();
    keys.push(rsa1);
    let dir = ConfigDir::with(&single_tenant_config("jwks_file: keys/many.json", 8192, 10), ACME_ALICE);
    dir.write("keys/many.json", &json!({"keys": keys}).to_string());
    let sg = Subguard::start_in(dir);
    let mut client = sg.client().await;
    let kidless = acme("alice").without_header("kid").build();
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&kidless)).await;
    assert_denied(&out, "invalid_signature", &kidless, "rsa-1 is the ninth RSA key");
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&acme("alice").build())).await;
    assert_allowed_as(&out, "acme", "acme-alice", "with its kid");
}

// ---------------------------------------------------------------------------------------------
// Logs.

#[tokio::test]
async fn attacker_text_never_breaks_a_log_line_and_tokens_are_never_logged() {
    let sg =
        Subguard::start(&single_tenant_config("jwks_file: keys/issuer-a.jwks.json", 8192, 1), ACME_ALICE);
    let mut client = sg.client().await;
    let forged = r#"{"level":"INFO","fields":{"message":"check allowed","forged":true}}"#;
    let sub = format!("mallory\n{forged}\r\n\"quoted\" \\ \u{1b}[2J \u{2028} \u{0}");
    let iss = format!("https://evil.test/\n{forged}");
    let kid = format!("k\n{forged}");
    let tokens = [
        acme(&sub).build(),
        acme("alice").iss(&iss).build(),
        TokenBuilder::new(&kid, Algorithm::RS256)
            .signed_by("rsa-1")
            .iss(ISS_ACME)
            .aud("orders")
            .sub("alice")
            .build(),
        acme("alice").build(),
        acme("alice").exp_in(-3600).build(),
    ];
    for token in &tokens {
        let call = CheckCall::new().tenant("acme").bearer(token).request_id(&format!("id\n{forged}\""));
        client.call(&call).await;
    }
    client.call(&CheckCall::new().tenant(&format!("acme\n{forged}"))).await;

    // Wait for the deny of the hostile sub, then judge every line.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let found = sg.log_events().iter().any(|e| e["fields"]["sub"] == sub.as_str());
        if found || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let lines = sg.logs();
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {l}")))
        .collect();
    for (line, event) in lines.iter().zip(&events) {
        assert!(event.is_object() && event.get("forged").is_none(), "forged line: {line}");
        assert!(event["fields"].get("forged").is_none(), "forged event: {line}");
        for token in &tokens {
            assert!(!line.contains(token.as_str()), "a log line holds a whole token: {line}");
            let signature = token.rsplit_once('.').unwrap().1;
            assert!(!line.contains(signature), "a log line holds a token's signature: {line}");
        }
    }
    let deny = events
        .iter()
        .find(|e| e["fields"]["sub"] == sub.as_str())
        .unwrap_or_else(|| panic!("no log event carries the hostile sub:\n{}", lines.join("\n")));
    assert_eq!(deny["fields"]["reason"], "user_not_found", "{deny}");
    assert!(
        events.iter().any(|e| e["fields"]["reason"] == "untrusted_issuer"
            && e["fields"]["detail"].as_str().is_some_and(|d| d.contains("evil.test"))),
        "the hostile iss is logged, escaped"
    );
}

#[tokio::test]
async fn issuer_look_alikes_are_untrusted() {
    // grpc_decisions.rs covers a missing slash, case and a trailing space.
    for iss in [
        "https://idp.acme.test/\u{0}",
        "https://idp.аcme.test/",
        "https://idp.acme.test/%2F",
        "https://idp.acme.test//",
        "https://idp.acme.test/.",
        "https://idp.acme.test:443/",
        "https://idp.acme.test./",
        "http://idp.acme.test/",
        "https://idp.acme.test/\n",
        "https://idp.acme.test/ https://idp.acme.test/",
        "https://evil.test/?https://idp.acme.test/",
        "https://idp.acme.test@evil.test/",
    ] {
        let token = acme("alice").iss(iss).build();
        assert_denied(&ask_acme(&token).await, "untrusted_issuer", &token, &format!("iss {iss:?}"));
    }
}

#[tokio::test]
async fn check_requests_envoy_would_never_send_are_denied() {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
    let mut client = shared().client().await;
    let token = acme("alice").build();

    // No attributes at all, or no HTTP request in them.
    let out = client.send(CheckRequest::default()).await.expect("answered");
    assert_denied(&out, "missing_tenant", "", "an empty CheckRequest");
    let mut req = CheckCall::new().tenant("acme").bearer(&token).to_request();
    req.attributes.as_mut().unwrap().request.as_mut().unwrap().http = None;
    let out = client.send(req).await.expect("answered");
    assert_denied(&out, "missing_tenant", "", "no http attributes");

    // Raw header bytes that are not UTF-8 (encode_raw_headers).
    let raw = |headers: Vec<(&str, Vec<u8>)>| {
        let mut req = CheckCall::new().raw_headers().to_request();
        let http = req.attributes.as_mut().unwrap().request.as_mut().unwrap().http.as_mut().unwrap();
        http.header_map = Some(HeaderMap {
            headers: headers
                .into_iter()
                .map(|(k, v)| HeaderValue { key: k.into(), raw_value: v, ..Default::default() })
                .collect(),
        });
        req
    };
    let bearer = format!("Bearer {token}").into_bytes();
    let cases = [
        (vec![("x-tenant-id", b"ac\xffme".to_vec()), ("authorization", bearer.clone())], "missing_tenant"),
        (
            vec![("x-tenant-id", b"acme".to_vec()), ("authorization", [bearer.as_slice(), b"\xff"].concat())],
            "malformed_token",
        ),
        (
            vec![
                ("x-tenant-id", b"acme".to_vec()),
                ("authorization", [b"Bearer \xff".as_slice(), &bearer[7..]].concat()),
            ],
            "malformed_token",
        ),
        (
            vec![("x-tenant-id", b"acme".to_vec()), ("authorization", b"\xffBearer x.y.z".to_vec())],
            "missing_token",
        ),
        // The same value once raw and once as text: two entries, joined.
        (
            vec![
                ("x-tenant-id", b"acme".to_vec()),
                ("authorization", bearer.clone()),
                ("AUTHORIZATION", bearer.clone()),
            ],
            "malformed_token",
        ),
    ];
    for (headers, code) in cases {
        let what = format!("{headers:?}");
        let out = client.send(raw(headers)).await.expect("answered");
        assert_denied(&out, code, &token, &what);
    }
    // Header names Envoy would have lowercased are not the names subguard reads: no token.
    let mut req = CheckCall::new().tenant("acme").to_request();
    let http = req.attributes.as_mut().unwrap().request.as_mut().unwrap().http.as_mut().unwrap();
    http.headers.insert("Authorization".into(), format!("Bearer {token}"));
    let out = client.send(req).await.expect("answered");
    assert_denied(&out, "missing_token", &token, "Authorization in the headers map");
}

#[tokio::test]
async fn bytes_that_are_not_utf8_get_a_reason_where_subguard_reads_them_and_are_ignored_elsewhere() {
    // Envoy passes header bytes through as they came, into protobuf strings. subguard reads only
    // the headers, host and route tenant of a CheckRequest: invalid bytes there read as U+FFFD
    // (so no tenant or token matches: a precise deny), and anywhere else they change nothing.
    // A placeholder of the same length is swapped for invalid bytes in the encoded message.
    use prost::Message;
    const MARK: &str = "#not-utf8#"; // header names are lowercased
    const BAD: &[u8] = b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0";
    assert_eq!(MARK.len(), BAD.len());
    let encode = |req: envoy_types::pb::envoy::service::auth::v3::CheckRequest| {
        let bytes = req.encode_to_vec();
        let at = bytes.windows(MARK.len()).position(|w| w == MARK.as_bytes()).expect("placeholder encoded");
        [&bytes[..at], BAD, &bytes[at + MARK.len()..]].concat()
    };
    let token = acme("alice").build();
    let mut client = shared().client().await;

    let denied = [
        (CheckCall::new().header("x-tenant-id", &format!("ac{MARK}me")).bearer(&token), "missing_tenant"),
        (
            CheckCall::new().tenant("acme").header("authorization", &format!("Bearer {token}{MARK}")),
            "malformed_token",
        ),
        (
            CheckCall::new().tenant("acme").header("authorization", &format!("Bearer {MARK}{token}")),
            "malformed_token",
        ),
    ];
    for (call, code) in denied {
        let what = format!("{call:?}");
        let out = client.send_encoded(encode(call.to_request())).await.expect("answered, not a gRPC error");
        assert_denied(&out, code, &token, &what);
    }

    let valid = || CheckCall::new().tenant("acme").bearer(&token);
    let mut in_path = valid().to_request();
    in_path.attributes.as_mut().unwrap().request.as_mut().unwrap().http.as_mut().unwrap().path =
        format!("/{MARK}");
    let allowed = [
        ("a header subguard does not read", valid().header("user-agent", MARK).to_request()),
        ("a header name", valid().header(&format!("x-{MARK}"), "1").to_request()),
        ("the path", in_path),
    ];
    for (what, req) in allowed {
        let out = client.send_encoded(encode(req)).await.expect("answered, not a gRPC error");
        assert_allowed_as(&out, "acme", "acme-alice", &format!("invalid UTF-8 in {what}"));
    }
}

#[tokio::test]
async fn a_check_request_over_the_grpc_message_limit_is_refused_and_the_server_stays_up() {
    let mut client = shared().client().await;
    let huge = "x".repeat(5 << 20);
    let call = CheckCall::new().tenant("acme").bearer(&acme("alice").build()).header("x-junk", &huge);
    // tonic's default 4 MiB decoding limit bounds what one check may make subguard hold; Envoy
    // then applies its status_on_error (fail closed).
    match client.try_call(&call).await {
        Err(status) => assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}"),
        Ok(out) => panic!("a 5 MiB CheckRequest was decoded and answered: {out:#?}"),
    }
    let out =
        shared().client().await.call(&CheckCall::new().tenant("acme").bearer(&acme("alice").build())).await;
    assert_allowed_as(&out, "acme", "acme-alice", "after the oversized request");
}

#[tokio::test]
async fn a_key_replaced_under_the_same_kid_stops_the_tokens_it_no_longer_verifies() {
    // An IdP answering a key compromise may publish a new key under the old kid. From the next key
    // refresh on, tokens of the old key must fail, also those seen (and remembered) before.
    key_replaced_under_the_same_kid("").await;
}

#[tokio::test]
async fn a_key_replaced_under_the_same_kid_without_the_token_cache() {
    key_replaced_under_the_same_kid("\n  cache_max_entries: 0").await;
}

/// Makes subguard fetch `idp`'s keys now, instead of at the next refresh: once the 1 s re-fetch
/// limit has passed, a token with an unknown kid does.
async fn fetch_now(idp: &Recorder, client: &mut common::CheckClient) {
    std::thread::sleep(Duration::from_millis(1200));
    let before = idp.requests().len();
    let probe = TokenBuilder::new("probe", Algorithm::RS256)
        .signed_by("rsa-2")
        .iss(ISS_ACME)
        .aud("orders")
        .sub("alice")
        .build();
    assert_denied(
        &client.call(&CheckCall::new().tenant("acme").bearer(&probe)).await,
        "unknown_key",
        &probe,
        "probe",
    );
    assert_eq!(idp.requests().len(), before + 1, "the probe fetched the new key set");
}

async fn key_replaced_under_the_same_kid(token_settings: &str) {
    let under_k1 = |file: &str| {
        let mut key: Value = serde_json::from_str::<Value>(&jwks_text(file)).unwrap()["keys"][0].clone();
        key["kid"] = json!("k1");
        json!({"keys": [key]}).to_string()
    };
    let idp = Recorder::start(&under_k1("issuer-a.jwks.json"));
    let key_source = format!(r#"jwks_uri: "{}""#, idp.url("/jwks"));
    let config = single_tenant_config(&key_source, 8192, 1)
        .replace("  max_bytes: 8192", &format!("  max_bytes: 8192{token_settings}"));
    let sg = Subguard::start(&config, ACME_ALICE);
    let mut client = sg.client().await;
    let k1 = |key: &str| {
        TokenBuilder::new("k1", Algorithm::RS256)
            .signed_by(key)
            .iss(ISS_ACME)
            .aud("orders")
            .sub("alice")
            .build()
    };
    let old = k1("rsa-1");
    for _ in 0..3 {
        let out = client.call(&CheckCall::new().tenant("acme").bearer(&old)).await;
        assert_allowed_as(&out, "acme", "acme-alice", "the old key's token before the swap");
    }

    idp.set_jwks(&under_k1("issuer-a-rotated.jwks.json"));
    fetch_now(&idp, &mut client).await;

    let out = client.call(&CheckCall::new().tenant("acme").bearer(&old)).await;
    assert_denied(&out, "invalid_signature", &old, "the old key's token after k1 was replaced");
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&k1("rsa-2"))).await;
    assert_allowed_as(&out, "acme", "acme-alice", "the new key's token");
}

#[tokio::test]
async fn a_key_that_comes_to_pin_another_alg_stops_the_tokens_it_no_longer_accepts() {
    // The same key material under the same kid, now published with `alg: PS256`: RS256 tokens
    // verified (and remembered) before must fail from the next key fetch on.
    let k1 = |alg: Option<&str>| {
        let mut key: Value =
            serde_json::from_str::<Value>(&jwks_text("issuer-a.jwks.json")).unwrap()["keys"][0].clone();
        key["kid"] = json!("k1");
        if let Some(alg) = alg {
            key["alg"] = json!(alg);
        }
        json!({"keys": [key]}).to_string()
    };
    let idp = Recorder::start(&k1(None));
    let config = single_tenant_config(&format!(r#"jwks_uri: "{}""#, idp.url("/jwks")), 8192, 1);
    let sg = Subguard::start(&config, ACME_ALICE);
    let mut client = sg.client().await;
    let token = |alg| {
        TokenBuilder::new("k1", alg).signed_by("rsa-1").iss(ISS_ACME).aud("orders").sub("alice").build()
    };
    let rs256 = token(Algorithm::RS256);
    for _ in 0..3 {
        let out = client.call(&CheckCall::new().tenant("acme").bearer(&rs256)).await;
        assert_allowed_as(&out, "acme", "acme-alice", "RS256 before the key pins PS256");
    }

    idp.set_jwks(&k1(Some("PS256")));
    fetch_now(&idp, &mut client).await;

    let out = client.call(&CheckCall::new().tenant("acme").bearer(&rs256)).await;
    assert_denied(
        &out,
        "unsupported_algorithm",
        &rs256,
        "the remembered RS256 token once the key pins PS256",
    );
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&token(Algorithm::PS256))).await;
    assert_allowed_as(&out, "acme", "acme-alice", "a PS256 token of the same key");
}

#[test]
fn a_users_file_with_control_characters_in_ids_or_roles_is_refused() {
    // The forwarded id and roles become header values for the application: a CR or LF there would
    // be a header injection (the HTTP directory refuses such answers; the users file must too).
    for (user, what) in [
        ("    id: \"u-1\\r\\nx-admin: true\"\n", "CRLF in id"),
        ("    id: \"u-1\\u0000\"\n", "NUL in id"),
        ("    roles: [\"admin\\nsuperuser\"]\n", "LF in a role"),
    ] {
        let dir = ConfigDir::with(
            &single_tenant_config("jwks_file: keys/issuer-a.jwks.json", 8192, 10),
            &format!("acme:\n  - sub: alice\n{user}"),
        );
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_subguard"))
            .arg("validate")
            .arg("--config")
            .arg(dir.config_path())
            .env_remove("SUBGUARD_CONFIG")
            .output()
            .expect("running subguard validate");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{what}: validate accepted it: {text}");
        assert!(text.contains("acme[0]"), "{what}: the error names the user: {text}");
    }
}

/// Values taken from an unverified token reach the deny's logged detail cut to 128 bytes: a
/// forged token with a kilobytes-long `kid`, `alg` or `iss` costs the log no more than any other.
#[tokio::test]
async fn long_unverified_header_and_claim_values_are_cut_in_the_log() {
    let long = |c: char| c.to_string().repeat(1000);
    let tokens = [
        ("unknown_key", acme("alice").header("kid", json!(long('k'))).build()),
        ("unsupported_algorithm", acme("alice").header("alg", json!(long('A'))).build()),
        ("untrusted_issuer", acme("alice").iss(&long('i')).build()),
    ];
    for (code, token) in &tokens {
        assert_denied(&ask_acme(token).await, code, token, code);
    }
    for c in ['k', 'A', 'i'] {
        let run = c.to_string().repeat(129);
        let lines = shared().logged(&c.to_string().repeat(128));
        assert!(!lines.is_empty(), "no log line shows the {c} value");
        for line in lines {
            assert!(!line.contains(&run) && line.contains("… (1000 bytes)"), "{line:.400}");
        }
    }
}

/// A tenant may be called `default`, the name logs and metrics give the top-level directory. Its
/// own directory is still its own, whichever tenant comes first by name: the tenants sharing the
/// top-level directory never get its users, and it never gets theirs. Both orders by name.
#[tokio::test]
async fn a_tenant_named_default_keeps_its_own_directory() {
    const SHARED_USERS: &str = "
aaa:
  - sub: carol
    id: shared-carol
globex:
  - sub: carol
    id: shared-carol
default:
  - sub: intruder
    id: shared-intruder
    roles: [admin]
";
    const OWN_USERS: &str = "
default:
  - sub: root
    id: own-root
    roles: [superadmin]
";
    for other in ["aaa", "globex"] {
        let config = format!(
            r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
directory:
  kind: file
  path: users.yaml
tenants:
  {other}:
    issuers:
      - issuer: "{ISS_ACME}"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-a.jwks.json
  default:
    issuers:
      - issuer: "{ISS_ACME}"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-a.jwks.json
    directory:
      kind: file
      path: own-users.yaml
"#
        );
        let dir = ConfigDir::with(&config, SHARED_USERS);
        dir.write("own-users.yaml", OWN_USERS);
        let sg = Subguard::start_in(dir);
        let mut client = sg.client().await;
        let mut ask = async |tenant: &str, sub: &str| {
            let token = acme(sub).build();
            (client.call(&CheckCall::new().tenant(tenant).bearer(&token)).await, token)
        };
        let what = |s: &str| format!("{s} (tenants default and {other})");
        let (out, _) = ask("default", "root").await;
        assert_allowed_as(&out, "default", "own-root", &what("default's own user"));
        let (out, token) = ask("default", "intruder").await;
        assert_denied(&out, "user_not_found", &token, &what("the shared file's default: section"));
        let (out, token) = ask(other, "root").await;
        assert_denied(&out, "user_not_found", &token, &what("default's user asked for by another tenant"));
        let (out, _) = ask(other, "carol").await;
        assert_allowed_as(&out, other, "shared-carol", &what("a user of the shared directory"));
    }
}
