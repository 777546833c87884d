//! Issuer verification keys: parsing JWKS documents into [`KeySet`]s, fetching them from their
//! [`KeySource`] (a file, a `jwks_uri`, OIDC discovery), and keeping them fresh in a [`KeyStore`].
//!
//! Readers on the request path only ever `load()` the current set from an `ArcSwap`; fetching
//! happens in background refresh tasks, or — rate-limited and coalesced — when a token names a
//! `kid` the current set does not have. A failed fetch never replaces the last good set.
//!
//! Key material named by the token itself (`jku`, `x5u`, `jwk`, `x5c`) is never looked at here.

use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use aws_lc_rs::signature::{self as sig, ParsedPublicKey, RsaParameters, RsaPublicKeyComponents};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use crate::config::{KeySettings, KeySource};
use crate::telemetry::Metrics;

/// Largest JWKS or discovery document accepted from the network.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// RSA keys shorter than this are refused (NIST SP 800-131A).
pub const MIN_RSA_BITS: usize = 2048;
/// RSA keys longer than this are refused: aws-lc verifies RSA signatures of 2048 to 8192 bits.
pub const MAX_RSA_BITS: usize = 8192;
/// The largest RSA public exponent aws-lc verifies with: 2^33 − 1. RFC 7518 allows larger ones;
/// a key with one could never verify a token, so it is skipped with that reason rather than
/// turning every token it signed into `invalid_signature`.
const MAX_RSA_EXPONENT_BITS: usize = 33;

/// Ed25519 public keys of small order (the eight points of the curve's 8-torsion), as their
/// y-coordinate with x's sign bit cleared: 0 and 1, the y of the order-8 points, p − 1, and p and
/// p + 1 (the non-canonical spellings of 0 and 1). A signature made without any private key
/// verifies under such a key (for the identity: R = the identity, S = 0), so one such entry in a
/// JWKS, an all-zero placeholder say, would let anyone sign as anyone.
const ED25519_SMALL_ORDER: [[u8; 32]; 7] = [
    low(0x00),
    low(0x01),
    [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98, 0xf0, 0xd5,
        0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53, 0xfc, 0x05,
    ],
    [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67, 0x0f, 0x2a,
        0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac, 0x03, 0x7a,
    ],
    high(0xec),
    high(0xed),
    high(0xee),
];

/// A 32-byte little-endian number below 256.
const fn low(first: u8) -> [u8; 32] {
    let mut y = [0; 32];
    y[0] = first;
    y
}

/// A 32-byte little-endian number just around p = 2^255 − 19: `first` then all ones, top bit clear.
const fn high(first: u8) -> [u8; 32] {
    let mut y = [0xff; 32];
    y[0] = first;
    y[31] = 0x7f;
    y
}

/// Whether an Ed25519 public key is one of [`ED25519_SMALL_ORDER`], whatever x's sign bit says.
fn ed25519_small_order(key: &[u8; 32]) -> bool {
    let mut y = *key;
    y[31] &= 0x7f;
    ED25519_SMALL_ORDER.contains(&y)
}

/// Why aws-lc could never verify with an RSA key of these (minimal, big-endian) components, if it
/// could not: a public exponent that is even, below 3 or over [`MAX_RSA_EXPONENT_BITS`], or an
/// even modulus.
fn rsa_unusable(n: &[u8], e: &[u8]) -> Option<String> {
    let bits = e.first().map_or(0, |top| (e.len() - 1) * 8 + (8 - top.leading_zeros() as usize));
    if bits > MAX_RSA_EXPONENT_BITS {
        return Some(format!(
            "the RSA public exponent has {bits} bits; aws-lc verifies with exponents of at most \
             {MAX_RSA_EXPONENT_BITS} bits (65537, the usual one, has 17)"
        ));
    }
    if e.last().is_none_or(|low| low % 2 == 0) || (e.len() == 1 && e[0] < 3) {
        return Some("the RSA public exponent must be odd and at least 3".into());
    }
    if n.last().is_none_or(|low| low % 2 == 0) {
        return Some("the RSA modulus is even, so it is no RSA modulus".into());
    }
    None
}

/// Key fetches over the network in flight at once, across every issuer.
const MAX_CONCURRENT_FETCHES: usize = 32;
static FETCH_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CONCURRENT_FETCHES);

/// The longest signature any accepted key makes (RSA-8192: 1024 bytes), with room for base64's
/// length estimate on top.
const SIGNATURE_BUFFER: usize = MAX_RSA_BITS / 8 + 8;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum KeyError {
    #[error("not a JWKS document: {0}")]
    NotJwks(String),
    #[error("the JWKS has no usable signing key{0}")]
    NoUsableKeys(String),
    #[error("cannot read the key file: {0}")]
    Io(String),
    #[error("fetching {url} failed: {reason}")]
    Fetch { url: String, reason: String },
    #[error("discovery document of {issuer} names issuer `{found}`")]
    IssuerMismatch { issuer: String, found: String },
    #[error("{0}")]
    Url(String),
}

/// The kind of public key, which decides the algorithms it may verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    /// Whether a key of this kind may verify `alg` (SPEC §3: the algorithm is checked against the
    /// found key's type).
    pub fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::EcP256 => alg == ES256,
            KeyKind::EcP384 => alg == ES384,
            KeyKind::Ed25519 => alg == EdDSA,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Rsa => "RSA",
            KeyKind::EcP256 => "EC P-256",
            KeyKind::EcP384 => "EC P-384",
            KeyKind::Ed25519 => "OKP Ed25519",
        }
    }
}

/// One verification key.
pub struct VerifyingKey {
    pub kid: Option<String>,
    /// SHA-256 of the `kid` and the key material: a key replaced under the same `kid`, or the same
    /// key under another `kid`, is a different key (the verified-token cache relies on this).
    pub fingerprint: [u8; 32],
    pub kind: KeyKind,
    /// The JWK's own `alg`, when it pins one.
    pub alg: Option<Algorithm>,
    /// The key as aws-lc verifies with it, parsed once when the JWKS is read: one per algorithm
    /// the key accepts. Parsing it for every token (building the RSA key and its Montgomery
    /// constants) cost about a fifth of an RS256 verification.
    parsed: Vec<(Algorithm, ParsedPublicKey)>,
}

impl VerifyingKey {
    /// Whether this key may verify a token signed with `alg`.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }

    /// Whether `signature` (base64url, as in the token) is this key's valid `alg` signature of
    /// `message`. An algorithm the key does not accept, bad base64 or a signature longer than any
    /// accepted key makes is `false`.
    pub fn verify(&self, alg: Algorithm, message: &[u8], signature: &str) -> bool {
        let Some((_, key)) = self.parsed.iter().find(|(a, _)| *a == alg) else {
            return false;
        };
        let mut buf = [0u8; SIGNATURE_BUFFER];
        match URL_SAFE_NO_PAD.decode_slice(signature, &mut buf) {
            Ok(len) => buf.get(..len).is_some_and(|raw| key.verify_sig(message, raw).is_ok()),
            Err(_) => false,
        }
    }
}

/// The RSA JWS algorithms (RFC 7518 §3.3, §3.5) with their aws-lc parameters, the same
/// jsonwebtoken uses.
fn rsa_algorithms() -> [(Algorithm, &'static RsaParameters); 6] {
    [
        (Algorithm::RS256, &sig::RSA_PKCS1_2048_8192_SHA256),
        (Algorithm::RS384, &sig::RSA_PKCS1_2048_8192_SHA384),
        (Algorithm::RS512, &sig::RSA_PKCS1_2048_8192_SHA512),
        (Algorithm::PS256, &sig::RSA_PSS_2048_8192_SHA256),
        (Algorithm::PS384, &sig::RSA_PSS_2048_8192_SHA384),
        (Algorithm::PS512, &sig::RSA_PSS_2048_8192_SHA512),
    ]
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .field("alg", &self.alg)
            .finish()
    }
}

/// The usable keys of one JWKS document.
#[derive(Debug)]
pub struct KeySet {
    pub keys: Vec<VerifyingKey>,
    /// Keys that were left out, and why (for logs and `explain`).
    pub skipped: Vec<String>,
    /// The `kid`s of the left-out keys, with why: a token naming one is `unsupported_algorithm`
    /// (the issuer has that key, subguard does not verify with it), not a reason to fetch again.
    pub unusable: Vec<(String, String)>,
    pub fetched_at: SystemTime,
}

/// The members of a JWK subguard reads; everything else is ignored.
#[derive(Deserialize)]
struct RawJwk {
    kty: Option<String>,
    kid: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    alg: Option<String>,
    key_ops: Option<Vec<String>>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// What a key lookup for one token found.
pub enum KeyMatch<'a> {
    /// Keys that may verify the token (one for a `kid` match; the fitting keys for a token without
    /// `kid`).
    Candidates(Vec<&'a VerifyingKey>),
    /// The `kid` exists but its key cannot verify this algorithm.
    WrongType(&'a VerifyingKey),
    /// The `kid` names a key of the set that subguard left out (an Ed448 or encryption key, a
    /// short RSA key...); the text says why.
    Unusable(&'a str),
    /// No key has this `kid` (or, without `kid`, none fits the algorithm).
    NotFound,
}

impl KeySet {
    /// Parses a JWKS document. Keys that cannot be used for signature verification (encryption
    /// keys, symmetric keys, unknown types, short RSA keys) are skipped and listed in `skipped`;
    /// a document with no usable key at all is an error.
    pub fn from_jwks(bytes: &[u8]) -> Result<KeySet, KeyError> {
        #[derive(Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        let doc: Doc =
            crate::strict::object_from_slice(bytes).map_err(|e| KeyError::NotJwks(e.to_string()))?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        let mut unusable = Vec::new();
        for (i, v) in doc.keys.into_iter().enumerate() {
            let kid = v.get("kid").and_then(|k| k.as_str()).map(str::to_string);
            match parse_jwk(v) {
                Ok(k) => keys.push(k),
                Err(why) => {
                    skipped.push(format!("keys[{i}]: {why}"));
                    if let Some(kid) = kid {
                        unusable.push((kid, why));
                    }
                }
            }
        }
        if keys.is_empty() {
            let detail =
                if skipped.is_empty() { String::new() } else { format!(" ({})", skipped.join("; ")) };
            return Err(KeyError::NoUsableKeys(detail));
        }
        Ok(KeySet { keys, skipped, unusable, fetched_at: SystemTime::now() })
    }

    /// Whether no key of the set can verify any of `algorithms`: every token of such an issuer
    /// is `unsupported_algorithm` (its `kid` names a key of another type) or `unknown_key`.
    pub fn fits_none(&self, algorithms: &[Algorithm]) -> bool {
        self.fitting(algorithms) == 0
    }

    /// How many keys of the set can verify at least one of `algorithms`: the keys an issuer
    /// that allows those can use.
    pub fn fitting(&self, algorithms: &[Algorithm]) -> usize {
        self.keys.iter().filter(|k| algorithms.iter().any(|&a| k.accepts(a))).count()
    }

    /// Finds the keys that may verify a token with this `kid` and `alg`. A `kid` may name keys of
    /// several types (RFC 7517 §4.5 allows it when they differ in `kty`): the ones that fit `alg`
    /// are the candidates.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> KeyMatch<'_> {
        match kid {
            Some(kid) => {
                let mut named = self.keys.iter().filter(|k| k.kid.as_deref() == Some(kid)).peekable();
                let Some(&first) = named.peek() else {
                    return match self.unusable.iter().find(|(k, _)| k == kid) {
                        Some((_, why)) => KeyMatch::Unusable(why),
                        None => KeyMatch::NotFound,
                    };
                };
                let fitting: Vec<_> = named.filter(|k| k.accepts(alg)).collect();
                if fitting.is_empty() { KeyMatch::WrongType(first) } else { KeyMatch::Candidates(fitting) }
            }
            None => {
                let fitting: Vec<_> = self.keys.iter().filter(|k| k.accepts(alg)).collect();
                if fitting.is_empty() { KeyMatch::NotFound } else { KeyMatch::Candidates(fitting) }
            }
        }
    }
}

/// The members of a private JWK (RFC 7518 §6.2.2, §6.3.2, RFC 8037 §2) that a public one lacks.
const PRIVATE_MEMBERS: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "oth"];

fn parse_jwk(v: serde_json::Value) -> Result<VerifyingKey, String> {
    let is_oct = v.get("kty").and_then(|k| k.as_str()) == Some("oct");
    if !is_oct && let Some(m) = PRIVATE_MEMBERS.iter().find(|m| v.get(**m).is_some()) {
        // Whoever can read the set can sign with this key: trusting it would let anyone in.
        return Err(format!(
            "the key holds private key material (`{m}`): a JWKS must publish public keys only, and \
             whoever can read this one can sign tokens with this key"
        ));
    }
    let jwk: RawJwk = serde_json::from_value(v).map_err(|e| format!("not a JWK: {e}"))?;
    if let Some(u) = &jwk.use_
        && u != "sig"
    {
        return Err(format!("use is `{u}`, not `sig`"));
    }
    if let Some(ops) = &jwk.key_ops
        && !ops.iter().any(|o| o == "verify")
    {
        return Err(format!("key_ops {ops:?} does not include `verify`"));
    }
    let alg = match jwk.alg.as_deref() {
        None => None,
        Some(a) => Some(crate::config::parse_algorithm(a).ok_or_else(|| format!("unsupported alg `{a}`"))?),
    };
    let need = |m: &Option<String>, name: &str| -> Result<String, String> {
        m.clone().ok_or_else(|| format!("missing `{name}`"))
    };
    let (kind, parsed) = match jwk.kty.as_deref() {
        Some("RSA") => {
            let n = need(&jwk.n, "n")?;
            let e = need(&jwk.e, "e")?;
            let n = URL_SAFE_NO_PAD
                .decode(n.trim_end_matches('='))
                .map_err(|_| "a key member is not base64url".to_string())?;
            // RFC 7518 §6.3.1 wants no leading zero octets; some producers add one (a DER habit).
            // The integer is the same, and aws-lc refuses the non-minimal form.
            let n = without_leading_zeros(&n);
            let bits = n.len() * 8;
            if bits < MIN_RSA_BITS {
                return Err(format!("RSA key of {bits} bits is shorter than {MIN_RSA_BITS}"));
            }
            if bits > MAX_RSA_BITS {
                return Err(format!("RSA key of {bits} bits is longer than {MAX_RSA_BITS}"));
            }
            let e = URL_SAFE_NO_PAD.decode(e.trim_end_matches('=')).map_err(|_| "`e` is not base64url")?;
            let e = without_leading_zeros(&e);
            if let Some(why) = rsa_unusable(n, e) {
                return Err(why);
            }
            let components = RsaPublicKeyComponents { n, e };
            let mut parsed = Vec::new();
            for (a, params) in
                rsa_algorithms().into_iter().filter(|(a, _)| alg.is_none_or(|pinned| pinned == *a))
            {
                parsed.push((
                    a,
                    components.to_parsed_public_key(params).map_err(|e| format!("invalid key: {e}"))?,
                ));
            }
            (KeyKind::Rsa, parsed)
        }
        Some("EC") => {
            let kind = match jwk.crv.as_deref() {
                Some("P-256") => KeyKind::EcP256,
                Some("P-384") => KeyKind::EcP384,
                other => return Err(format!("unsupported EC curve {other:?}")),
            };
            let x = need(&jwk.x, "x")?;
            let y = need(&jwk.y, "y")?;
            let size = if kind == KeyKind::EcP256 { 32 } else { 48 };
            let mut point = vec![0x04];
            for (name, value) in [("x", &x), ("y", &y)] {
                let raw = URL_SAFE_NO_PAD.decode(value).map_err(|_| format!("`{name}` is not base64url"))?;
                // RFC 7518 §6.2.1.2 wants the full size; some producers drop leading zero octets
                // (or add one). The coordinate is the same number: pad or trim it to the size.
                let raw = without_leading_zeros(&raw);
                if raw.len() > size {
                    return Err(format!(
                        "`{name}` is {} bytes, longer than a {} coordinate ({size})",
                        raw.len(),
                        kind.name()
                    ));
                }
                point.resize(point.len() + size - raw.len(), 0);
                point.extend_from_slice(raw);
            }
            let (a, params) = match kind {
                KeyKind::EcP256 => (Algorithm::ES256, &sig::ECDSA_P256_SHA256_FIXED),
                _ => (Algorithm::ES384, &sig::ECDSA_P384_SHA384_FIXED),
            };
            let key = ParsedPublicKey::new(params, &point)
                .map_err(|e| format!("invalid key: the point is not on {} ({e})", kind.name()))?;
            (kind, vec![(a, key)])
        }
        Some("OKP") => {
            if jwk.crv.as_deref() != Some("Ed25519") {
                return Err(format!("unsupported OKP curve {:?}", jwk.crv));
            }
            let x = need(&jwk.x, "x")?;
            let raw: [u8; 32] = match URL_SAFE_NO_PAD.decode(&x).map(<[u8; 32]>::try_from) {
                Ok(Ok(raw)) => raw,
                _ => return Err("Ed25519 key is not 32 bytes".into()),
            };
            if ed25519_small_order(&raw) {
                return Err("the Ed25519 key is a point of small order (an all-zero placeholder, say), \
                            under which signatures made without any private key verify"
                    .into());
            }
            let key = ParsedPublicKey::new(&sig::ED25519, raw).map_err(|e| format!("invalid key: {e}"))?;
            (KeyKind::Ed25519, vec![(Algorithm::EdDSA, key)])
        }
        Some("oct") => return Err("symmetric keys are never used".into()),
        other => return Err(format!("unsupported kty {other:?}")),
    };
    if let Some(a) = alg
        && !kind.fits(a)
    {
        return Err(format!("alg {a:?} does not fit an {} key", kind.name()));
    }
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    match &jwk.kid {
        Some(kid) => {
            ctx.update(&[1]);
            ctx.update(kid.as_bytes());
            ctx.update(&[0]);
        }
        None => ctx.update(&[0]),
    }
    for part in [&jwk.kty, &jwk.crv, &jwk.n, &jwk.e, &jwk.x, &jwk.y] {
        ctx.update(part.as_deref().unwrap_or("").as_bytes());
        ctx.update(&[0]);
    }
    // The `alg` a key pins is part of what it verifies: a key that comes to pin another one is
    // another key to the token cache, whose remembered tokens are then checked again.
    ctx.update(alg.map(|a| format!("{a:?}")).unwrap_or_default().as_bytes());
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(ctx.finish().as_ref());
    Ok(VerifyingKey { kid: jwk.kid, fingerprint, kind, alg, parsed })
}

fn without_leading_zeros(bytes: &[u8]) -> &[u8] {
    &bytes[bytes.iter().take_while(|&&b| b == 0).count()..]
}

/// Key URLs must be `https`, except loopback addresses, which may use `http` (local setups and
/// tests). Anything else would let a network attacker substitute keys.
pub fn url_is_allowed(url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    match u.scheme() {
        "https" => Ok(()),
        "http" => {
            let loopback = match u.host() {
                Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                Err(format!("`{url}` must use https (http is allowed for loopback addresses only)"))
            }
        }
        s => Err(format!("`{url}` has scheme `{s}`; key URLs must use https")),
    }
}

/// The on-demand fetches of a [`KeyStore`].
#[derive(Default)]
struct Refetch {
    /// When the last one started.
    last: Option<Instant>,
    /// Resolves to `true` when the running one has finished.
    running: Option<tokio::sync::watch::Receiver<bool>>,
}

/// Ends an on-demand fetch however its task ends: the next miss may start another, and whoever
/// waits for this one stops waiting.
struct Finish {
    store: Arc<KeyStore>,
    finished: tokio::sync::watch::Sender<bool>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.store.refetch.lock().unwrap_or_else(PoisonError::into_inner).running = None;
        let _ = self.finished.send(true);
    }
}

/// What [`KeyStore::refetch_on_miss`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refetched {
    /// The keys may have changed since the caller looked: look again.
    Maybe,
    /// Nothing was fetched: the last fetch was too recent.
    No,
    /// A fetch is running and did not finish within `check_wait`.
    StillFetching,
}

/// The keys of one issuer, kept fresh.
pub struct KeyStore {
    issuer: Arc<str>,
    source: KeySource,
    settings: KeySettings,
    client: reqwest::Client,
    current: ArcSwapOption<KeySet>,
    /// The on-demand (unknown `kid`) fetches: when the last one started, and the one running.
    refetch: std::sync::Mutex<Refetch>,
    /// Fetches started so far, and the number of the one whose keys are installed: a fetch that
    /// finishes after a later one (an on-demand fetch slowed down, a refresh quicker) must not
    /// put back the keys the later one replaced, a key the issuer withdrew among them.
    fetches_started: std::sync::atomic::AtomicU64,
    installed: std::sync::Mutex<u64>,
    /// The issuer's algorithms, to warn when a fetched set has no key for any of them.
    algorithms: Vec<Algorithm>,
    /// Where the keys last came from (a JWKS URL after discovery), for logs and `explain`.
    resolved_from: ArcSwapOption<String>,
    metrics: Arc<Metrics>,
    /// Set once the background refresh task runs (a store reused by a reload keeps its task).
    refreshing: std::sync::atomic::AtomicBool,
    /// Told when the store is dropped (a reload replaced it), so its refresh task ends at once
    /// instead of sleeping out `refresh_seconds`: until then the task and the store's allocation
    /// (held by the task's weak reference) stay, about a kilobyte per issuer and reload.
    dropped: Arc<tokio::sync::Notify>,
}

impl Drop for KeyStore {
    fn drop(&mut self) {
        self.dropped.notify_one();
    }
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore").field("issuer", &self.issuer).field("source", &self.source.kind()).finish()
    }
}

impl KeyStore {
    pub fn new(
        issuer: Arc<str>,
        algorithms: Vec<Algorithm>,
        source: KeySource,
        settings: KeySettings,
        client: reqwest::Client,
        metrics: Arc<Metrics>,
    ) -> Self {
        let initial = match &source {
            KeySource::File { initial, .. } => Some(initial.clone()),
            _ => None,
        };
        KeyStore {
            issuer,
            algorithms,
            source,
            settings,
            client,
            current: ArcSwapOption::new(initial),
            refetch: std::sync::Mutex::new(Refetch::default()),
            fetches_started: std::sync::atomic::AtomicU64::new(0),
            installed: std::sync::Mutex::new(0),
            resolved_from: ArcSwapOption::empty(),
            metrics,
            refreshing: std::sync::atomic::AtomicBool::new(false),
            dropped: Arc::new(tokio::sync::Notify::new()),
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// How long a check waits for an on-demand fetch ([`KeyStore::refetch_on_miss`]).
    pub fn check_wait(&self) -> Duration {
        self.settings.check_wait
    }

    /// The current keys, if any were ever loaded. Lock-free.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.current.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    /// Where the keys were last fetched from (a file path or URL).
    pub fn resolved_from(&self) -> Option<Arc<String>> {
        self.resolved_from.load_full()
    }

    /// Fetches the keys now and installs them; on failure the last good keys stay.
    pub async fn refresh(&self) -> Result<Arc<KeySet>, KeyError> {
        let number = self.fetches_started.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let result = self.fetch().await;
        self.metrics.jwks_fetch(&self.issuer, result.is_ok());
        match &result {
            Ok(set) => {
                for s in &set.skipped {
                    tracing::warn!(issuer = %self.issuer, skipped = %s, "jwks key skipped");
                }
                if set.fits_none(&self.algorithms) {
                    tracing::warn!(
                        issuer = %self.issuer,
                        algorithms = ?self.algorithms,
                        keys = set.keys.len(),
                        "jwks has no key for any of the issuer's algorithms: its tokens cannot verify"
                    );
                }
                let mut installed = self.installed.lock().unwrap_or_else(PoisonError::into_inner);
                if number > *installed {
                    *installed = number;
                    self.current.store(Some(set.clone()));
                    tracing::debug!(issuer = %self.issuer, keys = set.keys.len(), "jwks loaded");
                } else {
                    tracing::debug!(issuer = %self.issuer, "jwks fetched after a later fetch had finished; kept the later keys");
                }
            }
            Err(e) => {
                tracing::warn!(issuer = %self.issuer, error = %e, kept_last_good = self.is_ready(), "jwks fetch failed");
            }
        }
        result
    }

    /// Called when a token names a key the current set lacks (or its issuer has none): fetches
    /// again unless a fetch started less than `min_refetch` ago, and waits for it at most
    /// `check_wait`. Concurrent callers share one fetch, which runs on in the background when they
    /// stop waiting, so the keys are there for the client's retry.
    pub async fn refetch_on_miss(self: &Arc<Self>, seen: Option<&Arc<KeySet>>) -> Refetched {
        let mut done = {
            let mut refetch = self.refetch.lock().unwrap_or_else(PoisonError::into_inner);
            // Someone else refreshed since the caller looked: look again before fetching.
            if !same_set(self.current.load_full().as_ref(), seen) {
                return Refetched::Maybe;
            }
            match &refetch.running {
                Some(running) => running.clone(),
                None => {
                    if refetch.last.is_some_and(|at| at.elapsed() < self.settings.min_refetch) {
                        return Refetched::No;
                    }
                    refetch.last = Some(Instant::now());
                    let (finished, running) = tokio::sync::watch::channel(false);
                    refetch.running = Some(running.clone());
                    let finish = Finish { store: self.clone(), finished };
                    tokio::spawn(async move {
                        let _ = finish.store.refresh().await;
                        drop(finish);
                    });
                    running
                }
            }
        };
        match tokio::time::timeout(self.settings.check_wait, done.wait_for(|finished| *finished)).await {
            Ok(_) => Refetched::Maybe,
            Err(_) => Refetched::StillFetching,
        }
    }

    async fn fetch(&self) -> Result<Arc<KeySet>, KeyError> {
        // Network fetches take one of the process's slots: at start every issuer fetches at once,
        // and two thousand tenants' worth of connections at once ran a pod with the common limit
        // of 1 024 open files out of descriptors (its probes failed too), and hit the identity
        // providers all together. The semaphore is never closed, so acquiring cannot fail.
        let _slot = match &self.source {
            KeySource::File { .. } => None,
            _ => FETCH_SLOTS.acquire().await.ok(),
        };
        let set = match &self.source {
            KeySource::File { path, .. } => {
                let file = path.clone();
                let bytes = tokio::task::spawn_blocking(move || {
                    crate::config::read::file(&file, MAX_DOCUMENT_BYTES as u64)
                })
                .await
                .map_err(|e| KeyError::Io(e.to_string()))?
                .map_err(|e| KeyError::Io(format!("{e}: {}", path.display())))?;
                self.resolved_from.store(Some(Arc::new(path.display().to_string())));
                KeySet::from_jwks(&bytes)?
            }
            KeySource::Uri(uri) => {
                self.resolved_from.store(Some(Arc::new(uri.clone())));
                KeySet::from_jwks(&self.get(uri).await?)?
            }
            KeySource::Discovery => {
                let uri = self.discover().await?;
                let set = KeySet::from_jwks(&self.get(&uri).await?)?;
                self.resolved_from.store(Some(Arc::new(uri)));
                set
            }
        };
        Ok(Arc::new(set))
    }

    /// Reads `{issuer}/.well-known/openid-configuration`, checks it names this issuer, and returns
    /// its `jwks_uri`.
    async fn discover(&self) -> Result<String, KeyError> {
        #[derive(Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let url = format!("{}/.well-known/openid-configuration", self.issuer.trim_end_matches('/'));
        let body = self.get(&url).await?;
        let doc: Discovery = crate::strict::object_from_slice(&body).map_err(|e| KeyError::Fetch {
            url: url.clone(),
            reason: format!("not an OpenID configuration: {e}"),
        })?;
        if doc.issuer != *self.issuer {
            return Err(KeyError::IssuerMismatch { issuer: self.issuer.to_string(), found: doc.issuer });
        }
        url_is_allowed(&doc.jwks_uri).map_err(KeyError::Url)?;
        Ok(doc.jwks_uri)
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, KeyError> {
        let fail = |reason: String| KeyError::Fetch { url: url.to_string(), reason };
        url_is_allowed(url).map_err(KeyError::Url)?;
        let mut resp = self
            .client
            .get(url)
            .timeout(self.settings.fetch_timeout)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| fail(error_chain(&e)))?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(fail(format!("status {}", resp.status().as_u16())));
        }
        if resp.content_length().is_some_and(|l| l as usize > MAX_DOCUMENT_BYTES) {
            return Err(fail(format!("document larger than {MAX_DOCUMENT_BYTES} bytes")));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| fail(error_chain(&e)))? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(fail(format!("document larger than {MAX_DOCUMENT_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

fn same_set(a: Option<&Arc<KeySet>>, b: Option<&Arc<KeySet>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// The error with its causes, e.g. "error sending request: connection refused".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The HTTP client for key fetches: rustls, no redirects to non-https places.
pub fn http_client(settings: &KeySettings) -> reqwest::Client {
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        // `previous()` holds every URL visited so far, the original included: at most 3 redirects.
        if attempt.previous().len() > 3 {
            attempt.error("too many redirects")
        } else if url_is_allowed(attempt.url().as_str()).is_err() {
            attempt.error("redirect to a URL that is not https")
        } else {
            attempt.follow()
        }
    });
    reqwest::Client::builder()
        .redirect(policy)
        .connect_timeout(settings.fetch_timeout)
        .user_agent(concat!("subguard/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

/// Keeps a store fresh: until it has keys, retries with backoff (1 s doubling to 30 s, capped by
/// the refresh period); then refreshes every `refresh` period. Ends when the store is dropped
/// (a reload replaced it).
pub fn spawn_refresh(store: &Arc<KeyStore>) {
    if store.refreshing.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    let weak: Weak<KeyStore> = Arc::downgrade(store);
    let dropped = store.dropped.clone();
    let period = store.settings.refresh;
    tokio::spawn(async move {
        let mut backoff = Duration::from_secs(1);
        let mut first = true;
        loop {
            let Some(store) = weak.upgrade() else { return };
            // Key files were parsed when the config loaded; no need to read them again right away.
            let ok = if first && store.is_ready() { true } else { store.refresh().await.is_ok() };
            first = false;
            let wait = if !store.is_ready() {
                let w = backoff.min(period);
                backoff = (backoff * 2).min(Duration::from_secs(30));
                w
            } else if ok {
                backoff = Duration::from_secs(1);
                period
            } else {
                // Serving the last good keys; try again sooner than a full period.
                period.min(Duration::from_secs(30))
            };
            drop(store);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = dropped.notified() => return,
            }
        }
    });
}

/// Signs and verifies a throwaway token at startup, so a crypto-backend mix-up (jsonwebtoken
/// panics on first use without exactly one backend) fails the start, not the first request.
pub fn self_test() -> anyhow::Result<()> {
    // HMAC here only exercises the crypto provider; tokens signed with HS* are never accepted.
    let secret = b"subguard-startup-self-test";
    let sig = jsonwebtoken::crypto::sign(
        b"self.test",
        &jsonwebtoken::EncodingKey::from_secret(secret),
        Algorithm::HS256,
    )?;
    let key = DecodingKey::from_secret(secret);
    if !jsonwebtoken::crypto::verify(&sig, b"self.test", &key, Algorithm::HS256)?
        || jsonwebtoken::crypto::verify(&sig, b"self.tesT", &key, Algorithm::HS256)?
    {
        anyhow::bail!("crypto self-test failed: signatures do not verify as they should");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};

    const MESSAGE: &[u8] = b"eyJhbGciOiJSUzI1NiIsImtpZCI6InJzYS0xIn0.eyJzdWIiOiJ1LTEifQ";

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys").join(name))
            .unwrap()
    }

    fn pkcs8(kid: &str) -> Vec<u8> {
        let pem = String::from_utf8(fixture(&format!("{kid}.pem"))).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).unwrap()
    }

    fn keys() -> KeySet {
        KeySet::from_jwks(&fixture("issuer-a.jwks.json")).unwrap()
    }

    fn key<'a>(set: &'a KeySet, kid: &str) -> &'a VerifyingKey {
        set.keys.iter().find(|k| k.kid.as_deref() == Some(kid)).unwrap()
    }

    /// `alg`'s signature of MESSAGE by the fixture key `kid`, base64url as in a token.
    fn sign(kid: &str, alg: Algorithm) -> String {
        let rng = SystemRandom::new();
        let raw = match alg {
            Algorithm::ES256 | Algorithm::ES384 => {
                let params = match alg {
                    Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                    _ => &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
                };
                EcdsaKeyPair::from_pkcs8(params, &pkcs8(kid))
                    .unwrap()
                    .sign(&rng, MESSAGE)
                    .unwrap()
                    .as_ref()
                    .to_vec()
            }
            Algorithm::EdDSA => Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8(kid))
                .unwrap()
                .sign(MESSAGE)
                .as_ref()
                .to_vec(),
            rsa => {
                let padding: &dyn sig::RsaEncoding = match rsa {
                    Algorithm::RS256 => &sig::RSA_PKCS1_SHA256,
                    Algorithm::RS384 => &sig::RSA_PKCS1_SHA384,
                    Algorithm::RS512 => &sig::RSA_PKCS1_SHA512,
                    Algorithm::PS256 => &sig::RSA_PSS_SHA256,
                    Algorithm::PS384 => &sig::RSA_PSS_SHA384,
                    _ => &sig::RSA_PSS_SHA512,
                };
                let pair = RsaKeyPair::from_pkcs8(&pkcs8(kid)).unwrap();
                let mut out = vec![0; pair.public_modulus_len()];
                pair.sign(padding, &rng, MESSAGE, &mut out).unwrap();
                out
            }
        };
        URL_SAFE_NO_PAD.encode(raw)
    }

    #[test]
    fn every_algorithm_verifies_its_own_signature_and_nothing_else() {
        use Algorithm::*;
        let set = keys();
        let cases = [
            ("rsa-1", RS256),
            ("rsa-1", RS384),
            ("rsa-1", RS512),
            ("rsa-1", PS256),
            ("rsa-1", PS384),
            ("rsa-1", PS512),
        ]
        .into_iter()
        .chain([("ec-256", ES256), ("ec-384", ES384), ("ed-1", EdDSA)]);
        let all = [RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256];
        for (kid, alg) in cases {
            let k = key(&set, kid);
            let signature = sign(kid, alg);
            assert!(k.verify(alg, MESSAGE, &signature), "{kid} {alg:?}");
            let mut altered = MESSAGE.to_vec();
            altered[10] ^= 1;
            assert!(!k.verify(alg, &altered, &signature), "{kid} {alg:?}: altered message");
            // The same signature under any other algorithm (RS256 as PS256, as RS384...) fails.
            for other in all.into_iter().filter(|a| *a != alg) {
                assert!(
                    !k.verify(other, MESSAGE, &signature),
                    "{kid}: {alg:?} signature accepted as {other:?}"
                );
            }
            // Another key of the set never verifies it.
            for other in set.keys.iter().filter(|o| o.kid.as_deref() != Some(kid)) {
                assert!(!other.verify(alg, MESSAGE, &signature), "{kid} {alg:?} verified by {:?}", other.kid);
            }
        }
    }

    #[test]
    fn malformed_signatures_are_false() {
        let set = keys();
        let k = key(&set, "rsa-1");
        let good = sign("rsa-1", Algorithm::RS256);
        for bad in [
            String::new(),
            format!("{good}="),
            format!("{good}A"),
            good[..good.len() - 4].to_string(),
            good.replace(|c: char| c.is_ascii_digit(), "+"),
            "A".repeat(4000), // longer than any key's signature
        ] {
            assert!(!k.verify(Algorithm::RS256, MESSAGE, &bad), "{bad:.40}");
        }
    }

    #[test]
    fn a_key_set_is_a_json_object_with_keys() {
        let doc: serde_json::Value = serde_json::from_slice(&fixture("issuer-a.jwks.json")).unwrap();
        assert!(KeySet::from_jwks(&serde_json::to_vec(&doc).unwrap()).is_ok());
        // The same keys as a list, which serde alone reads as `{"keys": ...}` by position.
        let listed = serde_json::to_vec(&serde_json::json!([doc["keys"]])).unwrap();
        match KeySet::from_jwks(&listed) {
            Err(KeyError::NotJwks(why)) => assert_eq!(why, "invalid type: sequence, expected a JSON object"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_jwk_that_pins_its_alg_verifies_that_alg_only() {
        let mut doc: serde_json::Value = serde_json::from_slice(&fixture("issuer-a.jwks.json")).unwrap();
        doc["keys"][0]["alg"] = "PS256".into();
        assert_eq!(doc["keys"][0]["kid"], "rsa-1");
        let set = KeySet::from_jwks(&serde_json::to_vec(&doc).unwrap()).unwrap();
        let k = key(&set, "rsa-1");
        assert!(k.verify(Algorithm::PS256, MESSAGE, &sign("rsa-1", Algorithm::PS256)));
        assert!(!k.verify(Algorithm::RS256, MESSAGE, &sign("rsa-1", Algorithm::RS256)));
    }

    #[test]
    fn keys_aws_lc_cannot_verify_with_are_left_out_with_a_reason() {
        let mut doc: serde_json::Value = serde_json::from_slice(&fixture("issuer-a.jwks.json")).unwrap();
        // A point off the curve is no EC key.
        let mut y = URL_SAFE_NO_PAD.decode(doc["keys"][1]["y"].as_str().unwrap()).unwrap();
        y[31] ^= 1;
        doc["keys"][1]["y"] = URL_SAFE_NO_PAD.encode(&y).into();
        // A 16384-bit modulus is longer than aws-lc verifies.
        let mut big = serde_json::json!({"kty": "RSA", "kid": "huge", "e": "AQAB"});
        big["n"] = URL_SAFE_NO_PAD.encode([0xc3u8; 2048]).into();
        doc["keys"].as_array_mut().unwrap().push(big);
        let set = KeySet::from_jwks(&serde_json::to_vec(&doc).unwrap()).unwrap();
        let kids: Vec<_> = set.keys.iter().filter_map(|k| k.kid.as_deref()).collect();
        assert_eq!(kids, ["rsa-1", "ec-384", "ed-1"]);
        assert_eq!(set.skipped.len(), 2, "{:?}", set.skipped);
        assert!(set.skipped[0].starts_with("keys[1]: invalid key"), "{:?}", set.skipped);
        assert_eq!(set.skipped[1], "keys[4]: RSA key of 16384 bits is longer than 8192");
    }

    #[test]
    fn ed25519_keys_of_small_order_are_left_out() {
        let mut doc = fixture_doc();
        let mut small = Vec::new();
        for (i, y) in ED25519_SMALL_ORDER.iter().enumerate() {
            for sign in [0, 0x80] {
                let mut x = *y;
                x[31] |= sign;
                small.push(format!("small-{i}-{sign}"));
                doc["keys"].as_array_mut().unwrap().push(serde_json::json!({
                    "kty": "OKP", "crv": "Ed25519", "kid": small.last().unwrap(), "x": URL_SAFE_NO_PAD.encode(x)
                }));
            }
        }
        let set = set_of(&doc);
        let kids: Vec<_> = set.keys.iter().filter_map(|k| k.kid.as_deref()).collect();
        assert_eq!(kids, ["rsa-1", "ec-256", "ec-384", "ed-1"], "{:?}", set.skipped);
        assert_eq!(set.skipped.len(), small.len());
        assert!(set.skipped.iter().all(|s| s.contains("a point of small order")), "{:?}", set.skipped);
        // With the identity as key, R = the identity and S = 0 is a valid signature of anything.
        let forged = URL_SAFE_NO_PAD.encode([&low(1)[..], &[0; 32]].concat());
        let identity = ParsedPublicKey::new(&sig::ED25519, low(1)).unwrap();
        assert!(identity.verify_sig(MESSAGE, &URL_SAFE_NO_PAD.decode(&forged).unwrap()).is_ok());
        assert!(matches!(set.find(Some("small-1-0"), Algorithm::EdDSA), KeyMatch::Unusable(_)));
        assert!(!key(&set, "ed-1").verify(Algorithm::EdDSA, MESSAGE, &forged));
    }

    #[test]
    fn rsa_keys_with_an_exponent_aws_lc_cannot_use_are_left_out() {
        let mut doc = fixture_doc();
        let n = doc["keys"][0]["n"].as_str().unwrap().to_string();
        let mut even_n = URL_SAFE_NO_PAD.decode(&n).unwrap();
        *even_n.last_mut().unwrap() &= 0xfe;
        let rsa = |kid: &str, n: &str, e: &[u8]| serde_json::json!({"kty": "RSA", "kid": kid, "n": n, "e": URL_SAFE_NO_PAD.encode(e)});
        for key in [
            rsa("e-33-bits", &n, &[0x01, 0xff, 0xff, 0xff, 0xff]),
            rsa("e-34-bits", &n, &[0x02, 0x00, 0x00, 0x00, 0x01]),
            rsa("e-1", &n, &[1]),
            rsa("e-2", &n, &[2]),
            rsa("e-even", &n, &[0x01, 0x00, 0x00]),
            rsa("n-even", &URL_SAFE_NO_PAD.encode(&even_n), &[0x01, 0x00, 0x01]),
        ] {
            doc["keys"].as_array_mut().unwrap().push(key);
        }
        let set = set_of(&doc);
        let kids: Vec<_> = set.keys.iter().filter_map(|k| k.kid.as_deref()).collect();
        assert_eq!(kids, ["rsa-1", "ec-256", "ec-384", "ed-1", "e-33-bits"], "{:?}", set.skipped);
        let why = |kid: &str| match set.find(Some(kid), Algorithm::RS256) {
            KeyMatch::Unusable(why) => why.to_string(),
            _ => panic!("{kid} should be left out"),
        };
        assert!(why("e-34-bits").contains("exponent has 34 bits"), "{}", why("e-34-bits"));
        for kid in ["e-1", "e-2", "e-even"] {
            assert_eq!(why(kid), "the RSA public exponent must be odd and at least 3");
        }
        assert!(why("n-even").contains("modulus is even"), "{}", why("n-even"));
    }

    fn set_of(doc: &serde_json::Value) -> KeySet {
        KeySet::from_jwks(&serde_json::to_vec(doc).unwrap()).unwrap()
    }

    fn fixture_doc() -> serde_json::Value {
        serde_json::from_slice(&fixture("issuer-a.jwks.json")).unwrap()
    }

    #[test]
    fn keys_for_other_operations_or_with_private_parts_are_never_used() {
        let mut doc = fixture_doc();
        doc["keys"][0]["key_ops"] = serde_json::json!(["encrypt", "wrapKey"]);
        doc["keys"][1]["key_ops"] = serde_json::json!(["verify"]);
        // A private key published by mistake: whoever read the set could sign with it.
        doc["keys"][2]["d"] = "AAAA".into();
        let set = set_of(&doc);
        let kids: Vec<_> = set.keys.iter().filter_map(|k| k.kid.as_deref()).collect();
        assert_eq!(kids, ["ec-256", "ed-1"]);
        assert!(set.skipped[0].contains("key_ops [\"encrypt\", \"wrapKey\"] does not include `verify`"));
        assert!(set.skipped[1].contains("private key material (`d`)"), "{:?}", set.skipped);
        // A token naming a left-out key is told why, and is not sent fetching again.
        match set.find(Some("rsa-1"), Algorithm::RS256) {
            KeyMatch::Unusable(why) => assert!(why.contains("key_ops"), "{why}"),
            _ => panic!("rsa-1 should be unusable"),
        }
        assert!(matches!(set.find(Some("ec-384"), Algorithm::ES384), KeyMatch::Unusable(_)));
        assert!(matches!(set.find(Some("nope"), Algorithm::ES384), KeyMatch::NotFound));
    }

    #[test]
    fn numbers_written_with_leading_zeros_or_short_are_the_same_key() {
        let mut doc = fixture_doc();
        let pad = |v: &serde_json::Value, zeros: usize| {
            let raw = URL_SAFE_NO_PAD.decode(v.as_str().unwrap()).unwrap();
            URL_SAFE_NO_PAD.encode([vec![0; zeros], raw].concat())
        };
        doc["keys"][0]["n"] = pad(&doc["keys"][0]["n"], 1).into();
        doc["keys"][0]["e"] = pad(&doc["keys"][0]["e"], 2).into();
        // The P-256 key with a zero octet in front of x: trimmed back to 32 bytes.
        doc["keys"][1]["x"] = pad(&doc["keys"][1]["x"], 1).into();
        let set = set_of(&doc);
        assert!(set.skipped.is_empty(), "{:?}", set.skipped);
        assert!(key(&set, "rsa-1").verify(Algorithm::RS256, MESSAGE, &sign("rsa-1", Algorithm::RS256)));
        assert!(key(&set, "ec-256").verify(Algorithm::ES256, MESSAGE, &sign("ec-256", Algorithm::ES256)));
        // A P-256 key whose x starts with a zero octet (one key in 256), published without it.
        let rng = SystemRandom::new();
        let alg = &sig::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pair = std::iter::repeat_with(|| {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
            EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref()).unwrap()
        })
        .find(|p| p.public_key().as_ref()[1] == 0)
        .unwrap();
        let point = pair.public_key().as_ref();
        let short = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "short",
            "x": URL_SAFE_NO_PAD.encode(&point[2..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])}]});
        let set = set_of(&short);
        let signature = URL_SAFE_NO_PAD.encode(pair.sign(&rng, MESSAGE).unwrap());
        assert!(key(&set, "short").verify(Algorithm::ES256, MESSAGE, &signature));
        let mut doc = fixture_doc();
        doc["keys"][1]["x"] = URL_SAFE_NO_PAD.encode([1u8; 33]).into();
        assert!(set_of(&doc).skipped[0].contains("`x` is 33 bytes, longer than a EC P-256 coordinate (32)"));
    }

    #[test]
    fn one_kid_on_keys_of_two_types_finds_the_one_that_fits() {
        let mut doc = fixture_doc();
        doc["keys"][1]["kid"] = "shared".into(); // ec-256
        doc["keys"][0]["kid"] = "shared".into(); // rsa-1
        let set = set_of(&doc);
        match set.find(Some("shared"), Algorithm::ES256) {
            KeyMatch::Candidates(c) => {
                assert_eq!(c.iter().map(|k| k.kind).collect::<Vec<_>>(), [KeyKind::EcP256])
            }
            _ => panic!("the EC key fits ES256"),
        }
        match set.find(Some("shared"), Algorithm::PS256) {
            KeyMatch::Candidates(c) => {
                assert_eq!(c.iter().map(|k| k.kind).collect::<Vec<_>>(), [KeyKind::Rsa])
            }
            _ => panic!("the RSA key fits PS256"),
        }
        assert!(matches!(set.find(Some("shared"), Algorithm::EdDSA), KeyMatch::WrongType(_)));
    }
}
