//! Checks of the test harness itself, independent of subguard: the key fixtures match their
//! JWKS files, minted tokens verify with an independent verifier, and the fixture servers
//! behave as the other tests assume (switchable answers, refusing connections when stopped).

mod common;

use std::time::Duration;

use common::tokens::{KeyKind, mint_raw, payload_of, signing_key, with_payload};
use common::{Algorithm, JwksServer, TokenBuilder, Upstream, jwks_text};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation, decode};
use serde_json::{Value, json};

fn verify(
    token: &str,
    jwks_file: &str,
    kid: &str,
    alg: Algorithm,
) -> Result<Value, jsonwebtoken::errors::Error> {
    let set: JwkSet = serde_json::from_str(&jwks_text(jwks_file)).unwrap();
    let jwk = set.find(kid).unwrap_or_else(|| panic!("{kid} not in {jwks_file}"));
    let key = DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = Validation::new(alg);
    validation.set_audience(&["orders"]);
    validation.set_issuer(&["https://idp.test/"]);
    decode::<Value>(token, &key, &validation).map(|d| d.claims)
}

#[test]
fn every_fixture_key_signs_tokens_its_jwk_verifies() {
    let cases = [
        ("issuer-a.jwks.json", "rsa-1", Algorithm::RS256),
        ("issuer-a.jwks.json", "rsa-1", Algorithm::PS256),
        ("issuer-a.jwks.json", "ec-256", Algorithm::ES256),
        ("issuer-a.jwks.json", "ec-384", Algorithm::ES384),
        ("issuer-a.jwks.json", "ed-1", Algorithm::EdDSA),
        ("issuer-a-rotated.jwks.json", "rsa-2", Algorithm::RS256),
        ("issuer-b.jwks.json", "other-rsa", Algorithm::RS256),
    ];
    for (file, kid, alg) in cases {
        let token = TokenBuilder::new(kid, alg).iss("https://idp.test/").aud("orders").sub("s").build();
        let claims = verify(&token, file, kid, alg).unwrap_or_else(|e| panic!("{kid} {alg:?}: {e}"));
        assert_eq!(claims["sub"], "s");
    }
}

#[test]
fn jwks_files_hold_the_documented_keys_without_alg() {
    let kids = |file: &str| -> Vec<String> {
        let v: Value = serde_json::from_str(&jwks_text(file)).unwrap();
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                assert!(k.get("alg").is_none(), "{file}: JWKs carry no alg");
                assert_eq!(k["use"], "sig");
                k["kid"].as_str().unwrap().to_string()
            })
            .collect()
    };
    assert_eq!(kids("issuer-a.jwks.json"), ["rsa-1", "ec-256", "ec-384", "ed-1"]);
    assert_eq!(kids("issuer-a-rotated.jwks.json"), ["rsa-2"]);
    assert_eq!(kids("issuer-b.jwks.json"), ["other-rsa"]);
    assert_eq!(signing_key("rsa-1").0, KeyKind::Rsa);
    assert_eq!(signing_key("ec-384").0, KeyKind::Ec);
    assert_eq!(signing_key("ed-1").0, KeyKind::Ed);
}

#[test]
fn builder_and_raw_minter_produce_what_they_say() {
    let token = TokenBuilder::new("rsa-1", Algorithm::RS256)
        .iss("https://idp.test/")
        .aud(json!(["a", "orders"]))
        .sub("s")
        .exp_in(60)
        .iat_ago(5)
        .nbf(-5)
        .claim("roles", json!(["x"]))
        .header("typ", json!("at+jwt"))
        .build();
    let claims = payload_of(&token);
    assert_eq!(claims["aud"], json!(["a", "orders"]));
    assert!((claims["exp"].as_i64().unwrap() - common::now() - 60).abs() <= 1);
    assert!(verify(&token, "issuer-a.jwks.json", "rsa-1", Algorithm::RS256).is_ok());

    // A key other than the kid's does not verify; nor does a tampered payload.
    let wrong = TokenBuilder::new("rsa-1", Algorithm::RS256)
        .signed_by("rsa-2")
        .iss("https://idp.test/")
        .aud("orders")
        .build();
    assert!(verify(&wrong, "issuer-a.jwks.json", "rsa-1", Algorithm::RS256).is_err());
    let tampered = with_payload(&token, r#"{"sub":"admin"}"#);
    assert!(verify(&tampered, "issuer-a.jwks.json", "rsa-1", Algorithm::RS256).is_err());

    let raw = mint_raw(
        r#"{"alg":"ES256","kid":"ec-256"}"#,
        r#"{"iss":"https://idp.test/","aud":"orders","exp":99999999999}"#,
        "ec-256",
        Algorithm::ES256,
    );
    assert!(verify(&raw, "issuer-a.jwks.json", "ec-256", Algorithm::ES256).is_ok());
}

#[test]
fn jwks_server_switches_answers_counts_and_refuses_when_stopped() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let idp = JwksServer::start(&jwks_text("issuer-a.jwks.json"));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let get = |url: String| {
        let client = client.clone();
        rt.block_on(async move {
            match client.get(&url).send().await {
                Ok(r) => Ok((r.status().as_u16(), r.text().await.unwrap())),
                Err(e) => Err(e),
            }
        })
    };

    let (status, body) = get(idp.jwks_uri()).unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("rsa-1"));
    idp.set_status(500);
    assert_eq!(get(idp.jwks_uri()).unwrap().0, 500);
    idp.set_garbage();
    let (status, body) = get(idp.jwks_uri()).unwrap();
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<Value>(&body).is_err());
    idp.set_jwks(&jwks_text("issuer-a-rotated.jwks.json"));
    assert!(get(idp.jwks_uri()).unwrap().1.contains("rsa-2"));

    let (status, body) = get(format!("{}/.well-known/openid-configuration", idp.base_url())).unwrap();
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["issuer"], idp.base_url());
    assert_eq!(doc["jwks_uri"], idp.jwks_uri());
    idp.set_issuer("https://other.test/");
    let (_, body) = get(format!("{}/.well-known/openid-configuration", idp.base_url())).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["issuer"], "https://other.test/");
    assert_eq!(idp.jwks_requests(), 4);
    assert_eq!(idp.discovery_requests(), 2);

    // Stopped: refused, even on a pooled keep-alive connection.
    idp.stop();
    assert!(get(idp.jwks_uri()).is_err(), "a stopped server refuses connections");
    idp.start_again();
    assert_eq!(get(idp.jwks_uri()).unwrap().0, 200);

    idp.set_delay(Duration::from_millis(300));
    let started = std::time::Instant::now();
    get(idp.jwks_uri()).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[test]
fn upstream_echoes_request_headers() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let app = Upstream::start();
    let body: Value = rt.block_on(async {
        reqwest::Client::new()
            .get(format!("{}/orders", app.base_url()))
            .header("x-user-id", "u-1")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(body["x-user-id"], "u-1");
    assert_eq!(app.requests().len(), 1);
    assert_eq!(app.requests()[0].path, "/orders");
}
