//! Tokens and keys made by other libraries, through the real Envoy. Two minters, each making a
//! fresh key for every algorithm subguard verifies, publishing them as a JWKS the way that library
//! exports keys, and minting the tokens (`tests/interop/`):
//!
//! - PyJWT with `cryptography` (`pyjwt_mint.py`), run with the project's `.venv` python
//!   (`$SUBGUARD_PYTHON` overrides; `make venv` installs it from requirements-dev.txt);
//! - panva/jose on Node's WebCrypto (`jose_mint.mjs`), from the `node_modules` that `make
//!   interop-tools` installs under `.tools/interop` (`$SUBGUARD_JOSE` overrides; `make test` sets it).
//!
//! The rest of the suite mints with the Rust `jsonwebtoken` crate, whose backend subguard's
//! verification shares; this file is where an encoding both might get wrong the same way (an
//! ECDSA signature's form, PSS parameters, a JWK member) would show. The keys reach subguard three
//! ways: a `jwks_file`, a `jwks_uri` and OIDC discovery (a fixture IdP). A missing python or node
//! fails the test with what to run; it is never skipped.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::envoy::{Envoy, shipped_config};
use common::{ConfigDir, JwksServer, Subguard, Upstream};
use serde_json::Value;

const SUB: &str = "interop-user";

/// The tenants, each reading the one issuer's keys its own way.
const TENANTS: [&str; 3] = ["file", "uri", "discovery"];

/// Three tenants trust one issuer (the fixture IdP's URL, as discovery wants) and read its keys
/// from a file, from `jwks_uri` and by OIDC discovery. `forward` keeps its defaults (`x-tenant-id`,
/// `x-user-id`, `x-user-roles`).
fn config(issuer: &str, jwks_uri: &str) -> String {
    let tenant = |source: &str| {
        format!(
            r#"
    issuers:
      - issuer: "{issuer}"
        audiences: ["orders"]
        algorithms: ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
        {source}"#
        )
    };
    format!(
        r#"
listen: {{ grpc: "127.0.0.1:0", admin: "127.0.0.1:0" }}
tenant: {{ header: x-tenant-id }}
directory: {{ kind: file, path: users.yaml }}
tenants:
  file:{}
  uri:{}
  discovery:{}
"#,
        tenant("jwks_file: keys/minted.jwks.json"),
        tenant(&format!(r#"jwks_uri: "{jwks_uri}""#)),
        tenant("discovery: true"),
    )
}

const USERS: &str = r#"
file: [{ sub: interop-user, id: u-interop }]
uri: [{ sub: interop-user, id: u-interop }]
discovery: [{ sub: interop-user, id: u-interop }]
"#;

fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// `$var`, else `default` under the repository; it must exist, or the test fails with `fix`.
fn tool_path(var: &str, default: &str, fix: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| repo_path(default));
    assert!(path.exists(), "{} not found: {fix}, or set {var}", path.display());
    path
}

/// The JWKS and the cases (name, token, expected reason or `ok`) that a minter printed.
fn mint(mut minter: Command, issuer: &str) -> (Value, Vec<(String, String, String)>) {
    let out = minter
        .args([issuer, "orders", SUB])
        .output()
        .unwrap_or_else(|e| panic!("running {minter:?}: {e} (is it installed?)"));
    assert!(out.status.success(), "{minter:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let made: Value = serde_json::from_slice(&out.stdout).expect("the minter prints JSON");
    let cases = made["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| {
            let text = |k: &str| t[k].as_str().unwrap_or_else(|| panic!("{k} in {t}")).to_string();
            (text("case"), text("token"), text("expect"))
        })
        .collect();
    (made["jwks"].clone(), cases)
}

fn pyjwt() -> Command {
    let python = tool_path(
        "SUBGUARD_PYTHON",
        ".venv/bin/python",
        "run `make venv` (it installs PyJWT and cryptography from requirements-dev.txt)",
    );
    let mut command = Command::new(python);
    command.arg(repo_path("tests/interop/pyjwt_mint.py"));
    command
}

fn jose() -> Command {
    let node_modules = tool_path(
        "SUBGUARD_JOSE",
        ".tools/interop/node_modules",
        "run `make interop-tools` (it installs jose from tests/interop/package-lock.json; needs node and npm)",
    );
    let mut command = Command::new("node");
    command.arg(repo_path("tests/interop/jose_mint.mjs")).arg(node_modules);
    command
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_minted_by_pyjwt_for_every_algorithm_are_verified_through_envoy() {
    verify_through_envoy("PyJWT", pyjwt()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_minted_by_jose_for_every_algorithm_are_verified_through_envoy() {
    verify_through_envoy("jose", jose()).await;
}

/// Mints with `minter` for a fixture IdP and asks every case of every tenant through Envoy.
async fn verify_through_envoy(library: &str, minter: Command) {
    let idp = JwksServer::start(r#"{"keys": []}"#);
    let (jwks, cases) = mint(minter, &idp.base_url());
    assert_eq!(cases.len(), 9 * 4 + 5, "four cases for each of the nine algorithms, five token shapes");
    idp.set_jwks(&jwks.to_string());
    let dir = ConfigDir::with(&config(&idp.base_url(), &idp.jwks_uri()), USERS);
    dir.write("keys/minted.jwks.json", &jwks.to_string());
    let subguard = Subguard::start_in(dir);
    let upstream = Upstream::start();
    let envoy = Envoy::start(
        shipped_config("subguard-sidecar-tcp.yaml"),
        upstream.port(),
        subguard.grpc_addr().port(),
    );

    let mut wrong = Vec::new();
    let asked = TENANTS.into_iter().flat_map(|tenant| cases.iter().map(move |case| (tenant, case)));
    for (i, (tenant, (case, token, expect))) in asked.enumerate() {
        let marker = format!("interop-{i}");
        let bearer = format!("Bearer {token}");
        let headers = [("x-tenant-id", tenant), ("authorization", &bearer), ("x-test-marker", &marker)];
        let reply = envoy.get("/orders", &headers).await;
        let seen = upstream.saw(&marker);
        let got = match (reply.status, reply.header("x-subguard-reason")) {
            (200, None) => match seen.as_ref().and_then(|r| r.header("x-user-id")) {
                Some("u-interop") => "ok".to_string(),
                other => format!("200 but the application saw x-user-id {other:?}"),
            },
            (status, reason) => format!("{} ({status})", reason.unwrap_or("no reason header")),
        };
        if got.split(' ').next() != Some(expect.as_str()) || (expect != "ok" && seen.is_some()) {
            wrong.push(format!("{tenant}: {case}: expected {expect}, got {got}"));
        }
    }
    assert_eq!(idp.requests("/jku-never-fetched"), 0, "a token's jku was fetched");
    let asked = TENANTS.len() * cases.len();
    assert!(wrong.is_empty(), "{} of {asked} {library} cases wrong:\n{}", wrong.len(), wrong.join("\n"));
}
