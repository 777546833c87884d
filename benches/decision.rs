//! Micro-benchmarks of the in-process decision: `Policy::check` on a request view, with the real
//! config loader, key stores, token parser, signature verification and directories. No gRPC, no
//! Envoy: this is the floor under the sidecar's latency, not a load test of the whole path.
//!
//! Groups (see `docs/benchmarks.md` for results and how to read them):
//! - `allow_file_directory`: allowed requests against the in-memory users file. `same_token/RS256`
//!   sends one token every time, with the verified-token cache (the warm path) and without it
//!   (`token.cache_max_entries: 0`, a signature verification per check). `new_token/*` cycles
//!   through 10 000 distinct pre-minted tokens with the cache off, so every check verifies.
//! - Every group but the warm `same_token` runs with the token cache off, so its numbers show the
//!   pipeline's own costs.
//! - `deny_early`: the cheap denials decided before any key is looked up; `untrusted_issuer` also
//!   with 5 000 more tenants, one of which trusts the issuer (the deny names it).
//! - `directory_eddsa`: an `http` directory against a fixture server on 127.0.0.1 (own thread,
//!   own runtime, answering 200 `{"id":"u-1"}`), cache hit versus miss; the file directory with the
//!   same token is the baseline. EdDSA tokens keep the signature share small and make minting a
//!   fresh `sub` per iteration affordable.
//! - `signature_only`: `jsonwebtoken::crypto::verify` alone with subguard's parsed JWKS keys, to
//!   show how much of a check is the signature.
//!
//! Run: `cargo bench --bench decision` (add a filter, e.g. `-- deny_early`, to run one group).

use std::collections::HashMap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;
use subguard::check::{Policy, RequestView};
use subguard::keys::KeySet;
use subguard::telemetry::Metrics;
use tokio::runtime::Runtime;

const ISSUER: &str = "https://idp.acme.test/";
const AUDIENCE: &str = "orders";
/// The sub every allowed file-directory token carries (present in the users file).
const SUB: &str = "5b7e0a52-0e6f-4c1e-9d1a-0c2f3e4d5a6b";
/// Distinct tokens per algorithm for the `new_token/*` benchmarks.
const DISTINCT_TOKENS: usize = 10_000;

fn keys_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys")
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

// ---------------------------------------------------------------------------------------------
// The request view.

/// A request as the pipeline sees it: lowercase header names and the host.
struct Request {
    headers: HashMap<&'static str, String>,
    host: Option<String>,
}

impl Request {
    fn new(tenant: &str, authorization: Option<String>) -> Self {
        let mut headers = HashMap::new();
        headers.insert("x-tenant-id", tenant.to_string());
        headers.insert("x-request-id", "bench-0001".to_string());
        if let Some(a) = authorization {
            headers.insert("authorization", a);
        }
        Request { headers, host: Some("api.example.com".into()) }
    }

    fn bearer(tenant: &str, token: &str) -> Self {
        Request::new(tenant, Some(format!("Bearer {token}")))
    }
}

impl RequestView for Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    fn route_tenant(&self) -> Option<&str> {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Token minting (outside every timed loop).

/// Loads fixture key `<name>.pem` (PKCS#8 PEM). jsonwebtoken is built without `use_pem`, so the
/// PEM is decoded here: EC and Ed keys take the PKCS#8 DER; aws-lc wants RSA as the PKCS#1 key
/// that PKCS#8 wraps.
fn signing_key(name: &str) -> EncodingKey {
    let path = keys_dir().join(format!("{name}.pem"));
    let pem = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = STANDARD.decode(body).expect("PEM body is base64");
    match name {
        n if n.starts_with("rsa") => EncodingKey::from_rsa_der(pkcs8_private_key(&der)),
        n if n.starts_with("ec") => EncodingKey::from_ec_der(&der),
        n if n.starts_with("ed") => EncodingKey::from_ed_der(&der),
        n => panic!("no key kind for {n}"),
    }
}

/// One DER TLV: (tag, contents, rest).
fn der_tlv(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let (len, header) = match input[1] {
        l if l < 0x80 => (l as usize, 2),
        l => {
            let n = (l & 0x7f) as usize;
            (input[2..2 + n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize), 2 + n)
        }
    };
    (input[0], &input[header..header + len], &input[header + len..])
}

/// The `privateKey` OCTET STRING of a PKCS#8 `PrivateKeyInfo`.
fn pkcs8_private_key(der: &[u8]) -> &[u8] {
    let (_, info, _) = der_tlv(der);
    let (_, _version, rest) = der_tlv(info);
    let (_, _alg_id, rest) = der_tlv(rest);
    let (tag, key, _) = der_tlv(rest);
    assert_eq!(tag, 0x04, "PKCS#8 privateKey OCTET STRING");
    key
}

struct Minter {
    kid: &'static str,
    alg: Algorithm,
    alg_name: &'static str,
    key: EncodingKey,
    /// `iat` and `nbf` of every token: fixed, so tokens minted late in the run are not in the
    /// future of the fixed `now` the checks use.
    issued_at: i64,
}

impl Minter {
    fn new(kid: &'static str, alg: Algorithm, alg_name: &'static str, issued_at: i64) -> Self {
        Minter { kid, alg, alg_name, key: signing_key(kid), issued_at }
    }

    /// A valid token for `sub`, valid for an hour from `issued_at`, with a distinguishing `jti`.
    fn token(&self, iss: &str, sub: &str, jti: u64) -> String {
        let t = self.issued_at;
        let header = json!({"alg": self.alg_name, "typ": "JWT", "kid": self.kid});
        let claims = json!({
            "iss": iss, "aud": AUDIENCE, "sub": sub,
            "iat": t, "nbf": t, "exp": t + 3600, "jti": format!("bench-{jti}"),
        });
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &self.key, self.alg).expect("signing");
        format!("{message}.{signature}")
    }

    /// `n` distinct tokens for the same user, minted on two threads (RSA signing is slow).
    fn distinct_tokens(&self, n: usize) -> Vec<String> {
        let half = n / 2;
        std::thread::scope(|s| {
            let a = s.spawn(|| (0..half).map(|i| self.token(ISSUER, SUB, i as u64)).collect::<Vec<_>>());
            let b = s.spawn(|| (half..n).map(|i| self.token(ISSUER, SUB, i as u64)).collect::<Vec<_>>());
            let mut all = a.join().unwrap();
            all.extend(b.join().unwrap());
            all
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The policy: a real config file in a temporary folder, loaded and built as `serve` does.

const USERS_YAML: &str = r#"
acme:
  - sub: "5b7e0a52-0e6f-4c1e-9d1a-0c2f3e4d5a6b"
    id: "u-1001"
    roles: [admin, billing]
  - sub: "alice@acme.test"
    roles: [viewer]
"#;

fn config_yaml(directory_url: &str, token_cache_entries: u64, other_tenants: usize) -> String {
    let others: String = (0..other_tenants)
        .map(|i| {
            format!(
                "  t{i:05}:\n    issuers:\n      - issuer: \"https://idp.t{i:05}.test/\"\n        audiences: [\"{AUDIENCE}\"]\n        algorithms: [\"EdDSA\"]\n        jwks_file: issuer-a.jwks.json\n"
            )
        })
        .collect();
    let yaml = format!(
        r#"
tenant:
  header: x-tenant-id
token:
  cache_max_entries: {token_cache_entries}
directory:
  kind: file
  path: users.yaml
tenants:
  acme:
    issuers:
      - issuer: "{ISSUER}"
        audiences: ["{AUDIENCE}"]
        algorithms: ["RS256", "ES256", "EdDSA"]
        jwks_file: issuer-a.jwks.json
  remote:
    issuers:
      - issuer: "{ISSUER}"
        audiences: ["{AUDIENCE}"]
        algorithms: ["RS256", "ES256", "EdDSA"]
        jwks_file: issuer-a.jwks.json
    directory:
      kind: http
      url: "{directory_url}"
      # Generous: a scheduling hiccup on a busy 2-core machine must not turn into a deny.
      timeout_ms: 2000
      connect_timeout_ms: 1000
      cache:
        ttl_seconds: 3600
        negative_ttl_seconds: 5
        max_entries: 1000000
"#
    );
    yaml + &others
}

/// Writes the config, users file and JWKS into a temporary folder and builds the [`Policy`].
fn build_policy(
    rt: &Runtime,
    directory_addr: SocketAddr,
    token_cache_entries: u64,
    other_tenants: usize,
) -> (tempfile::TempDir, Policy) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(keys_dir().join("issuer-a.jwks.json"), dir.path().join("issuer-a.jwks.json")).unwrap();
    std::fs::write(dir.path().join("users.yaml"), USERS_YAML).unwrap();
    let url = format!("http://{directory_addr}/tenants/{{tenant}}/users/{{sub}}");
    let config_path = dir.path().join("subguard.yaml");
    std::fs::write(&config_path, config_yaml(&url, token_cache_entries, other_tenants)).unwrap();
    let config = subguard::config::load(&config_path).unwrap_or_else(|errs| {
        panic!("bench config invalid:\n{}", errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))
    });
    // The HTTP directory's client is built inside the runtime it will be used from.
    let _guard = rt.enter();
    let policy = Policy::build(config, Metrics::detached()).expect("policy builds");
    assert!(policy.is_ready(), "file key stores are ready at build");
    (dir, policy)
}

// ---------------------------------------------------------------------------------------------
// The fixture user directory: its own thread and runtime, like a separate service would be.

struct DirectoryFixture {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

fn start_directory() -> DirectoryFixture {
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("directory-fixture".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let app = axum::Router::new().fallback(move || {
                    counter.fetch_add(1, Ordering::Relaxed);
                    async { ([(axum::http::header::CONTENT_TYPE, "application/json")], r#"{"id":"u-1"}"#) }
                });
                axum::serve(listener, app).await.unwrap();
            });
        })
        .unwrap();
    DirectoryFixture { addr: rx.recv().unwrap(), requests }
}

// ---------------------------------------------------------------------------------------------
// Benchmarks.

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn expect(rt: &Runtime, policy: &Policy, req: &Request, now: i64, code: &str) {
    let d = rt.block_on(policy.check(req, now));
    assert_eq!(d.reason_code(), code, "bench precondition: expected {code}, got {:?}", d);
}

fn decision(c: &mut Criterion) {
    let rt = runtime();
    let fixture = start_directory();
    let (_dir, policy) = build_policy(&rt, fixture.addr, 0, 0);
    let policy = &policy;
    let (_dir_cached, cached_policy) = build_policy(&rt, fixture.addr, 100_000, 0);
    let cached_policy = &cached_policy;
    let now = now();

    let rs = Minter::new("rsa-1", Algorithm::RS256, "RS256", now - 10);
    let es = Minter::new("ec-256", Algorithm::ES256, "ES256", now - 10);
    let ed = Minter::new("ed-1", Algorithm::EdDSA, "EdDSA", now - 10);

    // --- allowed requests, file directory -------------------------------------------------
    {
        let mut g = c.benchmark_group("allow_file_directory");
        let same = Request::bearer("acme", &rs.token(ISSUER, SUB, 0));
        expect(&rt, policy, &same, now, "ok");
        expect(&rt, cached_policy, &same, now, "ok");
        g.bench_function("same_token/RS256 (verified-token cache: the warm path)", |b| {
            b.to_async(&rt).iter(|| cached_policy.check(&same, now))
        });
        g.bench_function("same_token/RS256 (token cache off: verifies every check)", |b| {
            b.to_async(&rt).iter(|| policy.check(&same, now))
        });
        for minter in [&rs, &es, &ed] {
            let started = Instant::now();
            let requests: Vec<Request> =
                minter.distinct_tokens(DISTINCT_TOKENS).iter().map(|t| Request::bearer("acme", t)).collect();
            eprintln!("minted {DISTINCT_TOKENS} {} tokens in {:.1?}", minter.alg_name, started.elapsed());
            expect(&rt, policy, &requests[0], now, "ok");
            expect(&rt, policy, &requests[DISTINCT_TOKENS - 1], now, "ok");
            let mut i = 0usize;
            g.bench_function(format!("new_token/{}", minter.alg_name), |b| {
                b.to_async(&rt).iter(|| {
                    i = (i + 1) % requests.len();
                    policy.check(&requests[i], now)
                })
            });
        }
        g.finish();
    }

    // --- early denials ---------------------------------------------------------------------
    {
        let mut g = c.benchmark_group("deny_early");
        let missing = Request::new("acme", None);
        expect(&rt, policy, &missing, now, "missing_token");
        g.bench_function("missing_token", |b| b.to_async(&rt).iter(|| policy.check(&missing, now)));

        // Three base64url segments whose header is not JSON: fails in the parser.
        let malformed = Request::bearer("acme", "bm90LWpzb24.eyJzdWIiOiJ4In0.c2ln");
        expect(&rt, policy, &malformed, now, "malformed_token");
        g.bench_function("malformed_token", |b| b.to_async(&rt).iter(|| policy.check(&malformed, now)));

        // Well-formed and signed, by an issuer no tenant trusts: parsed, never verified.
        let untrusted = Request::bearer("acme", &ed.token("https://idp.unknown.test/", SUB, 0));
        expect(&rt, policy, &untrusted, now, "untrusted_issuer");
        g.bench_function("untrusted_issuer", |b| b.to_async(&rt).iter(|| policy.check(&untrusted, now)));

        // The same with 5 000 more tenants, the last of which trusts the token's issuer: the
        // deny's detail names that tenant.
        let (_many_dir, many) = build_policy(&rt, fixture.addr, 0, 5_000);
        let elsewhere = Request::bearer("acme", &ed.token("https://idp.t04999.test/", SUB, 0));
        expect(&rt, &many, &elsewhere, now, "untrusted_issuer");
        g.bench_function("untrusted_issuer (5 000 tenants, trusted by another)", |b| {
            b.to_async(&rt).iter(|| many.check(&elsewhere, now))
        });
        g.finish();
    }

    // --- remote (http) directory versus the file directory ---------------------------------
    {
        let mut g = c.benchmark_group("directory_eddsa");
        let token = ed.token(ISSUER, SUB, 0);
        let file = Request::bearer("acme", &token);
        expect(&rt, policy, &file, now, "ok");
        g.bench_function("file", |b| b.to_async(&rt).iter(|| policy.check(&file, now)));

        let hit = Request::bearer("remote", &token);
        expect(&rt, policy, &hit, now, "ok"); // fills the cache
        let before = fixture.requests.load(Ordering::Relaxed);
        g.bench_function("http_cache_hit", |b| b.to_async(&rt).iter(|| policy.check(&hit, now)));
        let hit_requests = fixture.requests.load(Ordering::Relaxed) - before;

        // A new sub per iteration: tokens are minted per batch outside the timed loop, with subs
        // never used before, so every check misses the cache and asks the fixture.
        let next_sub = AtomicU64::new(0);
        let checks = AtomicU64::new(0);
        let not_allowed = AtomicU64::new(0);
        let before = fixture.requests.load(Ordering::Relaxed);
        g.bench_function("http_cache_miss", |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let requests: Vec<Request> = (0..iters)
                    .map(|_| {
                        let n = next_sub.fetch_add(1, Ordering::Relaxed);
                        Request::bearer("remote", &ed.token(ISSUER, &format!("user-{n}"), n))
                    })
                    .collect();
                let (checks, not_allowed) = (&checks, &not_allowed);
                async move {
                    let start = Instant::now();
                    for req in &requests {
                        let d = policy.check(req, now).await;
                        if !d.is_allow() {
                            not_allowed.fetch_add(1, Ordering::Relaxed);
                        }
                        black_box(d);
                    }
                    let elapsed = start.elapsed();
                    checks.fetch_add(requests.len() as u64, Ordering::Relaxed);
                    elapsed
                }
            })
        });
        let miss_requests = fixture.requests.load(Ordering::Relaxed) - before;
        g.finish();
        eprintln!(
            "directory fixture: {hit_requests} requests during http_cache_hit; {miss_requests} requests for {} \
             http_cache_miss checks ({} not allowed)",
            checks.load(Ordering::Relaxed),
            not_allowed.load(Ordering::Relaxed),
        );
    }

    // --- the signature alone -----------------------------------------------------------------
    // subguard's verification (the key parsed once, when the JWKS was read) beside jsonwebtoken's
    // `crypto::verify`, which parses the key again for every signature.
    {
        let mut g = c.benchmark_group("signature_only");
        let jwks = std::fs::read(keys_dir().join("issuer-a.jwks.json")).unwrap();
        let set = KeySet::from_jwks(&jwks).expect("fixture JWKS parses");
        let doc: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&jwks).expect("fixture JWKS");
        for minter in [&rs, &es, &ed] {
            let key = set.keys.iter().find(|k| k.kid.as_deref() == Some(minter.kid)).unwrap();
            let jwk = doc.find(minter.kid).expect("fixture kid");
            let decoding = jsonwebtoken::DecodingKey::from_jwk(jwk).expect("fixture JWK");
            let token = minter.token(ISSUER, SUB, 0);
            let (message, signature) = token.rsplit_once('.').unwrap();
            assert!(key.verify(minter.alg, message.as_bytes(), signature));
            assert!(
                jsonwebtoken::crypto::verify(signature, message.as_bytes(), &decoding, minter.alg).unwrap()
            );
            g.bench_function(format!("{} (parsed key)", minter.alg_name), |b| {
                b.iter(|| key.verify(minter.alg, message.as_bytes(), black_box(signature)))
            });
            g.bench_function(format!("{} (jsonwebtoken::crypto::verify)", minter.alg_name), |b| {
                b.iter(|| {
                    jsonwebtoken::crypto::verify(
                        black_box(signature),
                        message.as_bytes(),
                        &decoding,
                        minter.alg,
                    )
                })
            });
        }
        g.finish();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(40)
}

criterion_group! {
    name = benches;
    config = config();
    targets = decision
}
criterion_main!(benches);
