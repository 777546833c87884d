//! The verified-token cache: a repeated token skips signature verification, but never outlives
//! its own expiry or the key that verified it.

mod common;

use std::time::{Duration, Instant};

use common::check::CheckCall;
use common::metrics::required;
use common::{Algorithm, ConfigDir, JwksServer, Subguard, TokenBuilder, jwks_text};

const ISS: &str = "https://idp.acme.test/";

fn config(jwks_uri: &str) -> String {
    format!(
        r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
token:
  leeway_seconds: 0
keys:
  refresh_seconds: 1
  min_refetch_seconds: 0
directory:
  kind: file
  path: users.yaml
tenants:
  acme:
    issuers:
      - issuer: "{ISS}"
        audiences: [orders]
        jwks_uri: "{jwks_uri}"
"#
    )
}

fn token_cache_count(sg: &Subguard, outcome: &str) -> f64 {
    required(&sg.metrics(), "subguard_token_cache_lookups_total", &[("outcome", outcome)])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cached_token_still_expires_and_dies_with_its_key() {
    let idp = JwksServer::start(&jwks_text("issuer-a.jwks.json"));
    let sg = Subguard::start_in(ConfigDir::with(&config(&idp.jwks_uri()), "acme:\n  - sub: alice\n"));
    let mut client = sg.client().await;
    let ask = |token: String| CheckCall::new().tenant("acme").bearer(&token);

    // The same token twice: the second check is a cache hit.
    let token =
        TokenBuilder::new("rsa-1", Algorithm::RS256).iss(ISS).aud("orders").sub("alice").exp_in(300).build();
    let (hits, misses) = (token_cache_count(&sg, "hit"), token_cache_count(&sg, "miss"));
    assert!(client.call(&ask(token.clone())).await.allowed);
    assert!(client.call(&ask(token.clone())).await.allowed);
    assert_eq!(token_cache_count(&sg, "miss"), misses + 1.0);
    assert_eq!(token_cache_count(&sg, "hit"), hits + 1.0);

    // A cached token past its exp is token_expired, cache or not.
    let short =
        TokenBuilder::new("rsa-1", Algorithm::RS256).iss(ISS).aud("orders").sub("alice").exp_in(2).build();
    assert!(client.call(&ask(short.clone())).await.allowed);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = client.call(&ask(short.clone())).await;
        if out.reason() == Some("token_expired") {
            break;
        }
        assert!(out.allowed, "{out:#?}");
        assert!(Instant::now() < deadline, "a cached token outlived its exp");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The IdP drops rsa-1 from its JWKS: once subguard refreshes, the cached token is refused.
    idp.set_jwks(&jwks_text("issuer-a-rotated.jwks.json"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = client.call(&ask(token.clone())).await;
        if out.reason() == Some("unknown_key") {
            break;
        }
        assert!(out.allowed, "{out:#?}");
        assert!(Instant::now() < deadline, "a cached token outlived the removal of its key");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A token of the new key works.
    let rotated = TokenBuilder::new("rsa-2", Algorithm::RS256).iss(ISS).aud("orders").sub("alice").build();
    assert!(client.call(&ask(rotated)).await.allowed);
}

/// The same key material republished under another `kid` is, for a token naming the old `kid`,
/// a key that is gone: the cached token stops as a fresh verification would.
#[tokio::test(flavor = "multi_thread")]
async fn a_cached_token_dies_when_its_key_moves_to_another_kid() {
    let idp = JwksServer::start(&jwks_text("issuer-a.jwks.json"));
    let sg = Subguard::start_in(ConfigDir::with(&config(&idp.jwks_uri()), "acme:\n  - sub: alice\n"));
    let mut client = sg.client().await;
    let token =
        TokenBuilder::new("rsa-1", Algorithm::RS256).iss(ISS).aud("orders").sub("alice").exp_in(300).build();
    let ask = CheckCall::new().tenant("acme").bearer(&token);
    assert!(client.call(&ask).await.allowed);
    assert!(client.call(&ask).await.allowed);
    assert!(token_cache_count(&sg, "hit") >= 1.0, "the second check was not a cache hit");

    let mut jwks: serde_json::Value = serde_json::from_str(&jwks_text("issuer-a.jwks.json")).unwrap();
    let keys = jwks["keys"].as_array_mut().unwrap();
    let rsa1 = keys.iter_mut().find(|k| k["kid"] == "rsa-1").expect("issuer-a has rsa-1");
    rsa1["kid"] = "rsa-1-renamed".into();
    idp.set_jwks(&jwks.to_string());

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = client.call(&ask).await;
        if out.reason() == Some("unknown_key") {
            break;
        }
        assert!(out.allowed, "{out:#?}");
        assert!(Instant::now() < deadline, "a cached token outlived the renaming of its key");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_token_cache_counts_what_it_evicts_and_the_users_file_shows_its_users() {
    let idp = JwksServer::start(&jwks_text("issuer-a.jwks.json"));
    let small = config(&idp.jwks_uri())
        .replace("  leeway_seconds: 0\n", "  leeway_seconds: 0\n  cache_max_entries: 8\n");
    let sg = Subguard::start_in(ConfigDir::with(&small, "acme:\n  - sub: alice\n  - sub: bob\n"));
    let mut client = sg.client().await;
    let token = |n: usize| {
        let sub = if n.is_multiple_of(2) { "alice" } else { "bob" };
        TokenBuilder::new("rsa-1", Algorithm::RS256)
            .iss(ISS)
            .aud("orders")
            .sub(sub)
            .claim("jti", format!("t-{n}").into())
            .exp_in(300)
            .build()
    };
    let entries = |sg: &Subguard| required(&sg.metrics(), "subguard_token_cache_entries", &[]);
    let evicted = |sg: &Subguard| required(&sg.metrics(), "subguard_token_cache_evictions_total", &[]);
    let users =
        |sg: &Subguard| required(&sg.metrics(), "subguard_directory_file_users", &[("tenant", "acme")]);

    assert_eq!(entries(&sg), 0.0);
    assert_eq!(evicted(&sg), 0.0);
    assert_eq!(users(&sg), 2.0);

    // Five distinct tokens fit.
    for n in 0..5 {
        assert!(client.call(&CheckCall::new().tenant("acme").bearer(&token(n))).await.allowed);
    }
    assert_eq!(entries(&sg), 5.0);
    assert_eq!(evicted(&sg), 0.0);

    // Twenty more do not: the cache stays within its 8, and every valid token it let go is
    // counted (none has expired, so what went in is what is held plus what was evicted).
    for n in 5..25 {
        assert!(client.call(&CheckCall::new().tenant("acme").bearer(&token(n))).await.allowed);
    }
    let held = entries(&sg);
    assert!((1.0..=8.0).contains(&held), "{held} tokens held by a cache of 8");
    assert_eq!(evicted(&sg) + held, 25.0);

    // A new users file: the gauge follows it, and the eviction count runs on.
    let before = evicted(&sg);
    sg.dir.replace("users.yaml", "acme:\n  - sub: alice\n  - sub: bob\n  - sub: carol\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while users(&sg) != 3.0 {
        assert!(Instant::now() < deadline, "the users gauge did not follow the new users file");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(evicted(&sg) >= before);
}
