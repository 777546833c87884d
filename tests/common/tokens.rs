//! Token minting from the fixture keys with `jsonwebtoken` (a library other than the one under
//! test's own code paths decides nothing here: it only signs).
//!
//! [`TokenBuilder`] makes well-formed tokens with chosen claims and headers; [`mint_raw`] signs
//! arbitrary header and payload text, for malformed and hostile tokens.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
pub use jsonwebtoken::Algorithm;
use jsonwebtoken::EncodingKey;
use serde_json::{Map, Value, json};

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// base64url without padding, as JWS uses.
pub fn b64(data: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// The `alg` header value for an algorithm (`RS256`, `EdDSA`, ...).
pub fn alg_name(alg: Algorithm) -> String {
    serde_json::to_value(alg).unwrap().as_str().unwrap().to_string()
}

/// Which kind of private key a fixture PEM holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    Ec,
    Ed,
}

/// Loads `tests/fixtures/keys/<name>.pem` (PKCS#8) as a signing key.
///
/// The crate is built without jsonwebtoken's `use_pem` feature, so the PEM is decoded here: its
/// base64 body is the PKCS#8 DER, which EC and Ed keys take as is; aws-lc wants an RSA key as the
/// PKCS#1 `RSAPrivateKey` that PKCS#8 wraps in its `privateKey` OCTET STRING.
pub fn signing_key(name: &str) -> (KeyKind, EncodingKey) {
    let path = super::keys_dir().join(format!("{name}.pem"));
    let pem = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body).expect("PEM body is base64");
    let (oid, private_key) = parse_pkcs8(&der);
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    const EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    const ED25519: &[u8] = &[0x2b, 0x65, 0x70];
    match oid {
        o if o == RSA => (KeyKind::Rsa, EncodingKey::from_rsa_der(private_key)),
        o if o == EC => (KeyKind::Ec, EncodingKey::from_ec_der(&der)),
        o if o == ED25519 => (KeyKind::Ed, EncodingKey::from_ed_der(&der)),
        o => panic!("{name}.pem: unsupported key algorithm OID {o:02x?}"),
    }
}

/// Splits one DER TLV off `input`: (tag, contents, rest).
fn der_tlv(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = input[0];
    let (len, header) = match input[1] {
        l if l < 0x80 => (l as usize, 2),
        l => {
            let n = (l & 0x7f) as usize;
            let len = input[2..2 + n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
            (len, 2 + n)
        }
    };
    (tag, &input[header..header + len], &input[header + len..])
}

/// PKCS#8 `PrivateKeyInfo ::= SEQUENCE { version, AlgorithmIdentifier, privateKey OCTET STRING }`:
/// returns (algorithm OID contents, privateKey contents).
fn parse_pkcs8(der: &[u8]) -> (&[u8], &[u8]) {
    let (tag, info, _) = der_tlv(der);
    assert_eq!(tag, 0x30, "PKCS#8: SEQUENCE");
    let (tag, _version, rest) = der_tlv(info);
    assert_eq!(tag, 0x02, "PKCS#8: version INTEGER");
    let (tag, alg_id, rest) = der_tlv(rest);
    assert_eq!(tag, 0x30, "PKCS#8: AlgorithmIdentifier");
    let (tag, oid, _) = der_tlv(alg_id);
    assert_eq!(tag, 0x06, "PKCS#8: OID");
    let (tag, private_key, _) = der_tlv(rest);
    assert_eq!(tag, 0x04, "PKCS#8: privateKey OCTET STRING");
    (oid, private_key)
}

/// Signs `header_json`.`payload_json` (any text, valid JSON or not) with fixture key `key_name`
/// under `alg`, and returns the compact JWS.
pub fn mint_raw(header_json: &str, payload_json: &str, key_name: &str, alg: Algorithm) -> String {
    let (_, key) = signing_key(key_name);
    sign_segments(&b64(header_json), &b64(payload_json), &key, alg)
}

/// Signs two already-encoded segments with any key (e.g. an HMAC secret).
pub fn sign_segments(header_b64: &str, payload_b64: &str, key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!("{header_b64}.{payload_b64}");
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg)
        .unwrap_or_else(|e| panic!("signing with {alg:?}: {e}"));
    format!("{message}.{signature}")
}

/// Builds a signed token. Defaults: header `{"alg", "typ": "JWT", "kid": <kid>}`, claims
/// `iat` = now and `exp` = now + 300; everything else is set by the test.
///
/// ```ignore
/// TokenBuilder::new("rsa-1", Algorithm::RS256).iss(ISS_A).aud("orders").sub("u").exp_in(60).build()
/// ```
#[derive(Clone, Debug)]
pub struct TokenBuilder {
    key: String,
    alg: Algorithm,
    header: Map<String, Value>,
    claims: Map<String, Value>,
    hmac_secret: Option<Vec<u8>>,
}

impl TokenBuilder {
    /// A token whose header names `kid` and which is signed by the fixture key of that name.
    pub fn new(kid: &str, alg: Algorithm) -> Self {
        let mut header = Map::new();
        header.insert("alg".into(), json!(alg_name(alg)));
        header.insert("typ".into(), json!("JWT"));
        header.insert("kid".into(), json!(kid));
        let mut claims = Map::new();
        claims.insert("iat".into(), json!(now()));
        claims.insert("exp".into(), json!(now() + 300));
        TokenBuilder { key: kid.to_string(), alg, header, claims, hmac_secret: None }
    }

    pub fn iss(self, iss: &str) -> Self {
        self.claim("iss", json!(iss))
    }

    /// `aud` as a string (`"orders"`) or an array (`json!(["a", "orders"])`).
    pub fn aud(self, aud: impl Into<Value>) -> Self {
        self.claim("aud", aud.into())
    }

    pub fn sub(self, sub: &str) -> Self {
        self.claim("sub", json!(sub))
    }

    /// `exp` = now + `secs` (negative: already expired).
    pub fn exp_in(self, secs: i64) -> Self {
        self.claim("exp", json!(now() + secs))
    }

    /// `iat` = now − `secs` (negative: issued in the future).
    pub fn iat_ago(self, secs: i64) -> Self {
        self.claim("iat", json!(now() - secs))
    }

    /// `nbf` = now + `secs_from_now`.
    pub fn nbf(self, secs_from_now: i64) -> Self {
        self.claim("nbf", json!(now() + secs_from_now))
    }

    pub fn claim(mut self, name: &str, value: Value) -> Self {
        self.claims.insert(name.into(), value);
        self
    }

    /// Removes a claim, defaults included (`without("exp")`, `without("iat")`).
    pub fn without(mut self, name: &str) -> Self {
        self.claims.remove(name);
        self
    }

    pub fn header(mut self, name: &str, value: Value) -> Self {
        self.header.insert(name.into(), value);
        self
    }

    /// Removes a header member (`without_header("kid")`).
    pub fn without_header(mut self, name: &str) -> Self {
        self.header.remove(name);
        self
    }

    /// Signs with another fixture key than the one the header's `kid` names.
    pub fn signed_by(mut self, key_name: &str) -> Self {
        self.key = key_name.to_string();
        self
    }

    /// Signs with HMAC (`alg` must be HS*) using this secret instead of a fixture key.
    pub fn hmac_secret(mut self, secret: &[u8]) -> Self {
        self.hmac_secret = Some(secret.to_vec());
        self
    }

    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }

    pub fn build(&self) -> String {
        let header = serde_json::to_string(&self.header).unwrap();
        let claims = serde_json::to_string(&self.claims).unwrap();
        let key = match &self.hmac_secret {
            Some(secret) => EncodingKey::from_secret(secret),
            None => signing_key(&self.key).1,
        };
        sign_segments(&b64(header), &b64(claims), &key, self.alg)
    }
}

/// Replaces the payload of a signed token (the signature no longer matches).
pub fn with_payload(token: &str, payload_json: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    format!("{}.{}.{}", parts[0], b64(payload_json), parts[2])
}

/// Decodes a token's payload segment.
pub fn payload_of(token: &str) -> Value {
    let seg = token.split('.').nth(1).expect("payload segment");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(seg).expect("base64url")).expect("json")
}
