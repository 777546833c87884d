//! The verified-token cache: a repeated token skips signature verification, but never outlives
//! its own expiry or the key that verified it.

mod common;

use std::time::{Duration, Instant};

use common::check::CheckCall;
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
    let metrics = sg.metrics();
    common::metrics::sample(&metrics, "subguard_token_cache_lookups_total", &[("outcome", outcome)])
        .unwrap_or_else(|| panic!("no token cache {outcome} series:\n{metrics}"))
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
