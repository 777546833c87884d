//! The bearer-token front end: `check::token::bearer` and `check::token::parse` never panic, only
//! ever fail with `missing_token` / `malformed_token`, and whatever `parse` accepts really is a
//! compact JWS of UTF-8 JSON whose parts say what the parsed values say.
//!
//! Input: the first byte picks a mode.
//! - even: the rest is an `Authorization` value (lossy UTF-8), fed to `bearer`, and to `parse`
//!   directly too;
//! - odd: the rest is split at NUL bytes into header JSON, payload JSON and signature bytes, which
//!   are base64url-encoded into a token here, so the fuzzer explores JSON rather than base64.

#![no_main]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use subguard::check::token::{Audience, bearer, parse};
use subguard::decision::Reason;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        let value = String::from_utf8_lossy(rest);
        check_bearer(&value);
        check_parse(&value);
    } else {
        let mut parts = rest.splitn(3, |b| *b == 0);
        let header = parts.next().unwrap_or_default();
        let payload = parts.next().unwrap_or_default();
        let signature = parts.next().unwrap_or_default();
        let token = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(signature)
        );
        check_parse(&token);
        check_bearer(&format!("Bearer {token}"));
    }
});

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'
}

fn check_bearer(value: &str) {
    match bearer(Some(value)) {
        Ok(token) => {
            assert!(!token.is_empty(), "bearer accepted an empty token from {value:?}");
            assert!(token.bytes().all(is_token_char), "bearer let a non-JWS character through: {token:?}");
            assert!(value.contains(token), "bearer invented a token: {token:?} from {value:?}");
            let scheme = value.trim_start_matches([' ', '\t']);
            assert!(
                scheme.len() >= 6 && scheme.as_bytes()[..6].eq_ignore_ascii_case(b"bearer"),
                "bearer accepted another scheme: {value:?}"
            );
            // A canonical re-rendering gives the same token.
            assert_eq!(bearer(Some(&format!("Bearer {token}"))), Ok(token));
            check_parse(token);
        }
        Err(reason) => assert!(
            matches!(reason, Reason::MissingToken | Reason::MalformedToken),
            "bearer failed with {reason:?} for {value:?}"
        ),
    }
}

fn check_parse(token: &str) {
    let jws = match parse(token) {
        Ok(jws) => jws,
        Err(reason) => {
            assert_eq!(reason, Reason::MalformedToken, "parse failed with another reason for {token:?}");
            return;
        }
    };
    // Exactly three base64url segments, and the views point at them.
    let segments: Vec<&str> = token.split('.').collect();
    assert_eq!(segments.len(), 3, "parse accepted {token:?}");
    assert_eq!(jws.signing_input, &token[..segments[0].len() + 1 + segments[1].len()]);
    assert_eq!(jws.signature, segments[2]);
    assert!(!segments[0].is_empty() && !segments[1].is_empty(), "empty header or payload accepted");

    // Each segment is canonical base64url: decoding and re-encoding gives it back.
    let mut decoded = Vec::new();
    for segment in &segments {
        let bytes = URL_SAFE_NO_PAD.decode(segment).expect("an accepted segment decodes");
        assert_eq!(&URL_SAFE_NO_PAD.encode(&bytes), segment, "non-canonical base64url accepted");
        decoded.push(bytes);
    }

    // Header and payload are UTF-8 JSON objects (RFC 8259 §8.1, also in members subguard does not
    // read), and what was parsed is what they say.
    for part in &decoded[..2] {
        assert!(std::str::from_utf8(part).is_ok(), "a header or payload that is not UTF-8 was accepted");
        assert_eq!(
            part.iter().find(|b| !b.is_ascii_whitespace()),
            Some(&b'{'),
            "a header or payload that is not a JSON object was accepted"
        );
    }
    // serde_json's Value has a recursion limit the typed parse does not hit for ignored members,
    // so only compare when the generic parse succeeds.
    if let Ok(Value::Object(h)) = serde_json::from_slice::<Value>(&decoded[0]) {
        assert_eq!(h.get("alg").and_then(Value::as_str), Some(jws.header.alg.as_str()));
        match h.get("kid") {
            None | Some(Value::Null) => assert_eq!(jws.header.kid, None),
            Some(k) => assert_eq!(k.as_str(), jws.header.kid.as_deref()),
        }
        assert!(!h.contains_key("crit"), "a token with a crit header was accepted");
    }
    if let Ok(Value::Object(c)) = serde_json::from_slice::<Value>(&decoded[1]) {
        let claims = &jws.claims;
        for (name, parsed) in
            [("iss", claims.iss.as_deref()), ("sub", claims.sub.as_deref()), ("jti", claims.jti.as_deref())]
        {
            match c.get(name) {
                None | Some(Value::Null) => assert_eq!(parsed, None, "{name}"),
                Some(v) => assert_eq!(v.as_str(), parsed, "{name}"),
            }
        }
        for (name, parsed) in [("exp", claims.exp), ("nbf", claims.nbf), ("iat", claims.iat)] {
            match c.get(name) {
                None | Some(Value::Null) => assert_eq!(parsed, None, "{name}"),
                Some(v) => {
                    let n = v.as_f64().expect("an accepted time is a number");
                    assert!(n.is_finite(), "{name} is not finite");
                    assert_eq!(Some(n), parsed, "{name}");
                }
            }
        }
        match (c.get("aud"), &claims.aud) {
            (None | Some(Value::Null), None) => {}
            (Some(Value::String(s)), Some(Audience::One(a))) => assert_eq!(s, a),
            (Some(Value::Array(list)), Some(Audience::Many(parsed))) => {
                let strings: Vec<&str> =
                    list.iter().map(|v| v.as_str().expect("aud items are strings")).collect();
                assert_eq!(strings, parsed.iter().map(String::as_str).collect::<Vec<_>>());
            }
            (raw, parsed) => panic!("aud {raw:?} parsed as {parsed:?}"),
        }
    }
}
