//! Issuer keys beyond the first read (SPEC §3 key lookup, §5 "Issuer keys"): `jwks_uri` and OIDC
//! discovery against a fixture identity provider on loopback, a `jwks_file` rewritten on disk, and
//! keys a token names itself (`jku`, `x5u`, `jwk`), which are never used.
//!
//! Each scenario gets its own IdP and subguard: they change the IdP's state.

mod common;

use std::time::{Duration, Instant};

use common::check::CheckCall;
use common::metrics::sample;
use common::{Algorithm, CheckClient, ConfigDir, JwksServer, Outcome, Subguard, TokenBuilder, jwks_text};
use serde_json::{Value, json};

const USERS: &str = r#"
acme:
  - sub: "u-1"
    id: "user-one"
"#;

/// A config with one tenant (acme, tenant from `x-tenant-id`) and one issuer whose keys come from
/// `key_source` (`jwks_uri: "..."` or `discovery: true`).
fn config(issuer: &str, key_source: &str, min_refetch_seconds: u64) -> String {
    format!(
        r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
keys:
  refresh_seconds: 300
  min_refetch_seconds: {min_refetch_seconds}
directory:
  kind: file
  path: users.yaml
tenants:
  acme:
    issuers:
      - issuer: "{issuer}"
        audiences: ["orders"]
        algorithms: ["RS256", "ES256"]
        {key_source}
"#
    )
}

fn jwks_uri_config(idp: &JwksServer, min_refetch_seconds: u64) -> String {
    config(ISS, &format!(r#"jwks_uri: "{}""#, idp.jwks_uri()), min_refetch_seconds)
}

const ISS: &str = "https://idp.acme.test/";

fn token(kid: &str) -> String {
    token_for(ISS, kid)
}

fn token_for(iss: &str, kid: &str) -> String {
    TokenBuilder::new(kid, Algorithm::RS256).iss(iss).aud("orders").sub("u-1").build()
}

async fn ask(client: &mut CheckClient, token: &str) -> Outcome {
    client.call(&CheckCall::new().tenant("acme").bearer(token)).await
}

#[track_caller]
fn assert_reason(out: &Outcome, code: &str, status: u16) {
    assert!(!out.allowed, "expected {code}, got {out:#?}");
    assert_eq!(out.status, Some(status), "{out:#?}");
    assert_eq!(out.header("x-subguard-reason"), Some(code), "{out:#?}");
    assert_eq!(out.meta("reason"), Some(code), "{out:#?}");
}

#[track_caller]
fn assert_allowed(out: &Outcome) {
    assert!(out.allowed, "expected allow, got {out:#?}");
    assert_eq!(out.header("x-user-id"), Some("user-one"), "{out:#?}");
}

/// Waits past the unknown-kid rate-limit window.
fn wait_refetch_window(seconds: u64) {
    std::thread::sleep(Duration::from_millis(seconds * 1000 + 150));
}

#[tokio::test]
async fn jwks_uri_keys_are_fetched_at_start() {
    let idp = JwksServer::start(&jwks_text("issuer-a.jwks.json"));
    let sg = Subguard::start(&jwks_uri_config(&idp, 10), USERS);
    assert!(idp.jwks_requests() >= 1, "keys are fetched at start");
    let mut client = sg.client().await;
    assert_allowed(&ask(&mut client, &token("rsa-1")).await);
    let es = TokenBuilder::new("ec-256", Algorithm::ES256).iss(ISS).aud("orders").sub("u-1").build();
    assert_allowed(&ask(&mut client, &es).await);
    let (status, metrics) = sg.admin_get("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.lines().any(|l| l.starts_with("subguard_jwks_fetches_total{")), "{metrics}");
}

#[tokio::test]
async fn rotation_new_kid_is_accepted_after_the_unknown_kid_refetch() {
    let idp = JwksServer::start(&jwks_text("issuer-a.jwks.json"));
    let sg = Subguard::start(&jwks_uri_config(&idp, 1), USERS);
    let mut client = sg.client().await;
    assert_allowed(&ask(&mut client, &token("rsa-1")).await);

    // The IdP rotates: only rsa-2 now. subguard doesn't know yet (refresh is every 300 s).
    idp.set_jwks(&jwks_text("issuer-a-rotated.jwks.json"));
    wait_refetch_window(1);
    let before = idp.jwks_requests();
    let out = ask(&mut client, &token("rsa-2")).await;
    assert_allowed(&out);
    assert_eq!(idp.jwks_requests(), before + 1, "exactly one re-fetch for the unknown kid");

    // The new set replaced the old one: the retired key is gone.
    wait_refetch_window(1);
    assert_reason(&ask(&mut client, &token("rsa-1")).await, "unknown_key", 401);
    assert_allowed(&ask(&mut client, &token("rsa-2")).await);
}

/// A re-fetch slower than `keys.check_wait_ms` (400 ms by default) does not hold the check until
/// Envoy's own timeout answers for it, reason-less: the check is `keys_unavailable` (503, with
/// `retry-after`), the fetch goes on, and the client's retry finds the new key. Checks that
/// arrive meanwhile wait for that same fetch instead of starting another.
#[tokio::test]
async fn a_slow_refetch_is_keys_unavailable_and_the_retry_finds_the_key() {
    let idp = JwksServer::start(&jwks_text("issuer-a.jwks.json"));
    let sg = Subguard::start(&jwks_uri_config(&idp, 1), USERS);
    let mut client = sg.client().await;
    assert_allowed(&ask(&mut client, &token("rsa-1")).await);

    idp.set_jwks(&jwks_text("issuer-a-rotated.jwks.json"));
    idp.set_delay(Duration::from_millis(1500));
    wait_refetch_window(1);
    let before = idp.jwks_requests();
    let out = ask(&mut client, &token("rsa-2")).await;
    assert_reason(&out, "keys_unavailable", 503);
    assert!(out.header("retry-after").is_some(), "{out:#?}");
    assert!(
        sg.logged("the re-fetch of the issuer's keys is still running after 400 ms").len() == 1,
        "the deny's detail says why:\n{}",
        sg.logs().join("\n")
    );
    // A second check while the fetch runs joins it.
    assert_reason(&ask(&mut client, &token("rsa-2")).await, "keys_unavailable", 503);
    assert!(idp.wait_for_jwks_requests(before + 1, Duration::from_secs(5)), "the fetch was made");
    // The fetch finishes on its own; then the rotated key is there, with no fetch of its own.
    let mut out = ask(&mut client, &token("rsa-2")).await;
    for _ in 0..50 {
        if out.allowed {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        out = ask(&mut client, &token("rsa-2")).await;
    }
    assert_allowed(&out);
    assert_eq!(idp.jwks_requests(), before + 1, "one fetch served every check of the new kid");
}

/// A slow on-demand fetch that finishes after a later fetch (here a periodic refresh) must not put
/// its older keys back: a key the issuer withdrew in between would be accepted again until the
/// next refresh. (Found by an audit once on-demand fetches went on in the background.)
#[tokio::test]
async fn a_fetch_that_finishes_late_never_puts_older_keys_back() {
    let idp = JwksServer::start(&jwks_text("issuer-a.jwks.json"));
    let config = jwks_uri_config(&idp, 1).replace("refresh_seconds: 300", "refresh_seconds: 2");
    let sg = Subguard::start(&config, USERS);
    let mut client = sg.client().await;
    assert_allowed(&ask(&mut client, &token("rsa-1")).await);

    // An unknown kid starts a fetch that the IdP answers 3 s later, with the keys of now (rsa-1).
    wait_refetch_window(1);
    idp.set_delay(Duration::from_secs(3));
    let slow_started = std::time::Instant::now();
    assert_reason(&ask(&mut client, &token("rsa-2")).await, "keys_unavailable", 503);
    // Then the issuer rotates: rsa-2 only, answered at once. A periodic refresh installs it.
    idp.set_jwks(&jwks_text("issuer-a-rotated.jwks.json"));
    idp.set_delay(Duration::ZERO);
    let mut out = ask(&mut client, &token("rsa-2")).await;
    while !out.allowed && slow_started.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        out = ask(&mut client, &token("rsa-2")).await;
    }
    assert_allowed(&out);
    // The slow fetch answers now, with the old keys: they stay out.
    let answered = Duration::from_millis(3300);
    if let Some(left) = answered.checked_sub(slow_started.elapsed()) {
        tokio::time::sleep(left).await;
    }
    assert_reason(&ask(&mut client, &token("rsa-1")).await, "unknown_key", 401);
    assert_allowed(&ask(&mut client, &token("rsa-2")).await);
}

#[tokio::test]
async fn unknown_kid_refetch_is_rate_limited_per_issuer() {
    let idp = JwksServer::start(&jwks_text("issuer-a.jwks.json"));
    let sg = Subguard::start(&jwks_uri_config(&idp, 10), USERS);
    let mut client = sg.client().await;
    let before = idp.jwks_requests();

    // Sequential unknown kids.
    for i in 0..15 {
        let t = TokenBuilder::new(&format!("nope-{i}"), Algorithm::RS256)
            .signed_by("rsa-1")
            .iss(ISS)
            .aud("orders")
            .sub("u-1")
            .build();
        assert_reason(&ask(&mut client, &t).await, "unknown_key", 401);
    }
    // And concurrent ones.
    let mut tasks = Vec::new();
    for i in 0..15 {
        let mut c = client.clone();
        let t = TokenBuilder::new(&format!("burst-{i}"), Algorithm::RS256)
            .signed_by("rsa-1")
            .iss(ISS)
            .aud("orders")
            .sub("u-1")
            .build();
        tasks.push(tokio::spawn(async move { ask(&mut c, &t).await }));
    }
    for task in tasks {
        assert_reason(&task.await.unwrap(), "unknown_key", 401);
    }
    let fetched = idp.jwks_requests() - before;
    assert!(fetched <= 1, "30 unknown-kid checks within min_refetch_seconds made {fetched} fetches");
    // Known keys keep working meanwhile.
    assert_allowed(&ask(&mut client, &token("rsa-1")).await);
}

#[tokio::test]
async fn failing_jwks_server_keeps_the_last_good_keys() {
    let idp = JwksServer::start(&jwks_text("issuer-a.jwks.json"));
    let sg = Subguard::start(&jwks_uri_config(&idp, 1), USERS);
    let mut client = sg.client().await;
    assert_allowed(&ask(&mut client, &token("rsa-1")).await);

    // An unknown kid makes subguard re-fetch; each re-fetch fails in another way.
    let failures: [(&str, &dyn Fn()); 2] =
        [("HTTP 500", &|| idp.set_status(500)), ("a body that is not a JWKS", &|| idp.set_garbage())];
    for (what, fail) in failures {
        wait_refetch_window(1);
        fail();
        let before = idp.jwks_requests();
        assert_reason(&ask(&mut client, &token("rsa-2")).await, "unknown_key", 401);
        assert!(idp.jwks_requests() > before, "{what}: the unknown kid triggered a fetch");
        assert_allowed(&ask(&mut client, &token("rsa-1")).await);
        assert_eq!(sg.admin_get("/readyz").0, 200, "{what}: still ready with the last good keys");
    }

    // The IdP is down altogether (connections refused).
    wait_refetch_window(1);
    idp.stop();
    assert_reason(&ask(&mut client, &token("rsa-2")).await, "unknown_key", 401);
    assert_allowed(&ask(&mut client, &token("rsa-1")).await);
    assert_eq!(sg.admin_get("/readyz").0, 200);

    // It comes back, rotated: the next unknown-kid re-fetch picks the new key up.
    idp.set_jwks(&jwks_text("issuer-a-rotated.jwks.json"));
    idp.start_again();
    wait_refetch_window(1);
    assert_allowed(&ask(&mut client, &token("rsa-2")).await);
}

#[tokio::test]
async fn keys_recover_when_the_jwks_server_comes_back() {
    let idp = JwksServer::start(&jwks_text("issuer-a.jwks.json"));
    idp.stop();
    let sg = Subguard::start_unready(ConfigDir::with(&jwks_uri_config(&idp, 1), USERS));
    let mut client = sg.client().await;
    let out = ask(&mut client, &token("rsa-1")).await;
    assert_reason(&out, "keys_unavailable", 503);
    assert!(out.header("retry-after").is_some(), "{out:#?}");
    assert_eq!(sg.admin_get("/readyz").0, 503);

    idp.start_again();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ask(&mut client, &token("rsa-1")).await;
        if out.allowed {
            break;
        }
        assert_reason(&out, "keys_unavailable", 503);
        assert!(Instant::now() < deadline, "keys never recovered after the IdP came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sg.wait_ready(Duration::from_secs(10));
}

#[tokio::test]
async fn discovery_finds_the_jwks_uri_from_the_issuer() {
    let idp = JwksServer::start(&jwks_text("issuer-a.jwks.json"));
    let issuer = idp.base_url();
    let sg = Subguard::start(&config(&issuer, "discovery: true", 10), USERS);
    assert!(idp.discovery_requests() >= 1, "the discovery document was read");
    assert!(idp.jwks_requests() >= 1, "then the jwks_uri it names");
    let mut client = sg.client().await;
    let out = ask(&mut client, &token_for(&issuer, "rsa-1")).await;
    assert_allowed(&out);
    assert_eq!(out.meta("issuer"), Some(issuer.as_str()));
    // Another issuer's token still isn't trusted.
    assert_reason(&ask(&mut client, &token("rsa-1")).await, "untrusted_issuer", 401);
}

#[tokio::test]
async fn discovery_with_a_mismatched_issuer_yields_no_keys() {
    // OpenID Connect Discovery §4.3: the document's issuer must equal the configured issuer,
    // or the document (and its jwks_uri) must not be used.
    let idp = JwksServer::start(&jwks_text("issuer-a.jwks.json"));
    idp.set_issuer("https://evil.test/");
    let issuer = idp.base_url();
    let sg = Subguard::start_unready(ConfigDir::with(&config(&issuer, "discovery: true", 1), USERS));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sg.admin_get("/readyz").0, 503, "no usable keys: not ready");
    let mut client = sg.client().await;
    let out = ask(&mut client, &token_for(&issuer, "rsa-1")).await;
    assert_reason(&out, "keys_unavailable", 503);
    assert!(idp.discovery_requests() >= 1);
    assert_eq!(idp.jwks_requests(), 0, "the jwks_uri of a mismatched document is never fetched");
}

#[tokio::test]
async fn jwks_file_is_reread_on_an_unknown_kid() {
    let dir = ConfigDir::with(&config(ISS, "jwks_file: keys/acme.json", 1), USERS);
    dir.write("keys/acme.json", &jwks_text("issuer-a.jwks.json"));
    let sg = Subguard::start_in(dir);
    let mut client = sg.client().await;
    assert_allowed(&ask(&mut client, &token("rsa-1")).await);
    assert_reason(&ask(&mut client, &token("rsa-2")).await, "unknown_key", 401);

    // The operator rotates the file in place.
    sg.dir.write("keys/acme.json", &jwks_text("issuer-a-rotated.jwks.json"));
    wait_refetch_window(1);
    assert_allowed(&ask(&mut client, &token("rsa-2")).await);
}

#[tokio::test]
async fn keys_named_by_the_token_itself_are_never_fetched_or_trusted() {
    // The attacker's IdP serves the attacker's key (rsa-2); acme trusts only issuer-a's keys.
    let attacker = JwksServer::start(&jwks_text("issuer-a-rotated.jwks.json"));
    let dir = ConfigDir::with(&config(ISS, "jwks_file: keys/issuer-a.jwks.json", 1), USERS);
    let sg = Subguard::start_in(dir);
    let mut client = sg.client().await;
    let rsa2_jwk: Value =
        serde_json::from_str::<Value>(&jwks_text("issuer-a-rotated.jwks.json")).unwrap()["keys"][0].clone();

    let attacks = [
        ("jku", json!(attacker.jwks_uri())),
        ("x5u", json!(format!("{}/cert.pem", attacker.base_url()))),
        ("jwk", rsa2_jwk.clone()),
    ];
    for (header, value) in attacks {
        let t = TokenBuilder::new("rsa-2", Algorithm::RS256)
            .header(header, value)
            .iss(ISS)
            .aud("orders")
            .sub("u-1")
            .build();
        let out = ask(&mut client, &t).await;
        assert!(!out.allowed, "a key named by the token's {header} header was trusted");
        assert_reason(&out, "unknown_key", 401);
        wait_refetch_window(1);
    }
    // Even with the kid of a trusted key, an embedded key does not replace the trusted one.
    let t = TokenBuilder::new("rsa-1", Algorithm::RS256)
        .signed_by("rsa-2")
        .header("jwk", rsa2_jwk)
        .iss(ISS)
        .aud("orders")
        .sub("u-1")
        .build();
    assert_reason(&ask(&mut client, &t).await, "invalid_signature", 401);
    assert_eq!(attacker.jwks_requests(), 0, "jku was fetched");
    assert_eq!(attacker.requests("/cert.pem"), 0, "x5u was fetched");
}

/// `subguard_jwks_keys` and `subguard_jwks_last_success_timestamp_seconds` of tenant acme's
/// `issuer`, if exported.
fn key_gauges(sg: &Subguard, issuer: &str) -> (Option<f64>, Option<f64>) {
    let metrics = sg.metrics();
    let labels = [("tenant", "acme"), ("issuer", issuer)];
    (
        sample(&metrics, "subguard_jwks_keys", &labels),
        sample(&metrics, "subguard_jwks_last_success_timestamp_seconds", &labels),
    )
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

#[tokio::test]
async fn the_key_metrics_show_each_issuers_keys_and_when_they_were_last_fetched() {
    let idp = JwksServer::start(&jwks_text("issuer-a.jwks.json"));
    idp.stop();
    let sg = Subguard::start_unready(ConfigDir::with(&jwks_uri_config(&idp, 1), USERS));
    assert_eq!(key_gauges(&sg, ISS), (Some(0.0), None), "no keys yet, so no time of their fetch");

    idp.start_again();
    sg.wait_ready(Duration::from_secs(10));
    let (keys, fetched) = key_gauges(&sg, ISS);
    let published: Value = serde_json::from_str(&jwks_text("issuer-a.jwks.json")).unwrap();
    let kinds: Vec<_> =
        published["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["rsa-1", "ec-256", "ec-384", "ed-1"]);
    assert_eq!(keys, Some(2.0), "rsa-1 for RS256 and ec-256 for ES256; ec-384 and ed-1 verify neither");
    let fetched = fetched.expect("a timestamp once the keys loaded");
    assert!((unix_now() - 30.0..=unix_now()).contains(&fetched), "fetched just now: {fetched}");

    // A failed fetch (an unknown kid while the IdP is down) keeps the last good keys and their time.
    let mut client = sg.client().await;
    wait_refetch_window(1);
    idp.stop();
    let before = idp.jwks_requests();
    assert_reason(&ask(&mut client, &token("rsa-2")).await, "unknown_key", 401);
    assert_eq!(idp.jwks_requests(), before, "refused connections never reach the server's count");
    assert_eq!(key_gauges(&sg, ISS), (keys, Some(fetched)));

    // The next successful fetch moves the time.
    idp.start_again();
    wait_refetch_window(1);
    assert_reason(&ask(&mut client, &token("rsa-2")).await, "unknown_key", 401);
    let (_, again) = key_gauges(&sg, ISS);
    assert!(again.is_some_and(|t| t > fetched), "fetched again: {again:?} after {fetched}");

    // A reload that replaces the issuer takes its series away and brings the new one's.
    let other = "https://idp.other.test/";
    sg.dir.write_config(&config(other, "jwks_file: keys/issuer-b.jwks.json", 1));
    sg.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(15);
    while key_gauges(&sg, ISS) != (None, None) {
        assert!(Instant::now() < deadline, "the removed issuer's series stayed: {:?}", key_gauges(&sg, ISS));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(key_gauges(&sg, other).0, Some(1.0), "issuer-b's one key");
}

#[tokio::test]
async fn an_issuer_whose_keys_fit_none_of_its_algorithms_shows_no_usable_keys() {
    // An ES256-only issuer and a JWKS of RSA keys: it serves (validate warns), but nothing verifies.
    let es_only =
        config(ISS, "jwks_file: keys/rsa-only.json", 1).replace(r#"["RS256", "ES256"]"#, r#"["ES256"]"#);
    let dir = ConfigDir::with(&es_only, USERS);
    let published: Value = serde_json::from_str(&jwks_text("issuer-a.jwks.json")).unwrap();
    let rsa: Vec<_> =
        published["keys"].as_array().unwrap().iter().filter(|k| k["kty"] == "RSA").cloned().collect();
    assert_eq!(rsa.len(), 1);
    dir.write("keys/rsa-only.json", &json!({ "keys": rsa }).to_string());
    let sg = Subguard::start_in(dir);
    assert_eq!(key_gauges(&sg, ISS).0, Some(0.0), "an RSA key counted as usable for an ES256-only issuer");

    // The same key for an issuer that allows RS256 is one usable key.
    sg.dir.write_config(&config(ISS, "jwks_file: keys/rsa-only.json", 1));
    sg.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(15);
    while key_gauges(&sg, ISS).0 != Some(1.0) {
        assert!(Instant::now() < deadline, "the RSA key of an RS256 issuer: {:?}", key_gauges(&sg, ISS));
        std::thread::sleep(Duration::from_millis(50));
    }
}
