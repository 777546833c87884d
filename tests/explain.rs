//! `subguard explain` (issue 9): its final decision is the gRPC server's for the same input, one
//! test per reason code; its hints for a user that is not found; its exit codes; and what it must
//! never print (the token's signature).

mod common;

use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use common::check::CheckCall;
use common::{Algorithm, ConfigDir, Subguard, TokenBuilder, now};
use serde_json::{Value, json};

const ISS_ACME: &str = "https://idp.acme.test/";
const ISS_GLOBEX: &str = "https://idp.globex.test/";

const ADMIN_SUB: &str = "5b7e0a52-0e6f-4c1e-9d1a-0c2f3e4d5a6b";
const DISABLED_SUB: &str = "alice@acme.test";
const REVOKED_SUB: &str = "revoked-before";

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
  refresh_seconds: 300
  min_refetch_seconds: 10
shutdown_grace_seconds: 1
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
        algorithms: ["RS256", "ES256"]
        jwks_file: keys/issuer-a.jwks.json
  globex:
    issuers:
      - issuer: "https://idp.globex.test/"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-b.jwks.json
"#;

fn users_yaml() -> String {
    format!(
        r#"
acme:
  - sub: "{ADMIN_SUB}"
    id: "u-1001"
    roles: [admin, billing]
  - sub: "{DISABLED_SUB}"
    disabled: true
  - sub: "{REVOKED_SUB}"
    tokens_valid_after: {}
  - sub: "Mixed.Case@acme.test"
  - sub: " padded@acme.test "
globex:
  - sub: "u-77"
"#,
        now() - 1000
    )
}

fn shared() -> &'static Subguard {
    static SHARED: OnceLock<Subguard> = OnceLock::new();
    SHARED.get_or_init(|| Subguard::start(CONFIG, &users_yaml()))
}

fn acme() -> TokenBuilder {
    TokenBuilder::new("rsa-1", Algorithm::RS256).iss(ISS_ACME).aud("orders").sub(ADMIN_SUB)
}

/// One request, as both `explain` flags and a gRPC `CheckCall`.
#[derive(Default, Clone)]
struct Input {
    tenant: Option<&'static str>,
    host: Option<&'static str>,
    headers: Vec<(&'static str, &'static str)>,
    token: Option<String>,
}

impl Input {
    fn acme(token: String) -> Self {
        Input { tenant: Some("acme"), token: Some(token), ..Default::default() }
    }

    fn args(&self, config: &std::path::Path) -> Vec<String> {
        let mut a = vec!["explain".into(), "--config".into(), config.display().to_string()];
        if let Some(t) = self.tenant {
            a.extend(["--tenant".into(), t.into()]);
        }
        if let Some(h) = self.host {
            a.extend(["--host".into(), h.into()]);
        }
        for (k, v) in &self.headers {
            a.extend(["--header".into(), format!("{k}:{v}")]);
        }
        if let Some(t) = &self.token {
            a.extend(["--token".into(), t.clone()]);
        }
        a
    }

    fn call(&self) -> CheckCall {
        let mut c = CheckCall::new();
        if let Some(t) = self.tenant {
            c = c.tenant(t);
        }
        if let Some(h) = self.host {
            c = c.host(h);
        }
        for (k, v) in &self.headers {
            c = c.header(k, v);
        }
        if let Some(t) = &self.token {
            c = c.bearer(t);
        }
        c
    }
}

fn run(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_subguard"))
        .args(args)
        .env_remove("SUBGUARD_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("running subguard explain")
}

fn explain_json(config: &std::path::Path, input: &Input) -> (Value, Option<i32>) {
    let mut args = input.args(config);
    args.extend(["--format".into(), "json".into()]);
    let out = run(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    (v, out.status.code())
}

/// Runs `explain` and the server on the same input, asserts they agree on the whole response
/// (allow or deny, status, headers, body) and that the reason is `expected`; returns explain's JSON.
async fn agree(sg: &Subguard, input: Input, expected: &str) -> Value {
    let (report, code) = explain_json(&sg.dir.config_path(), &input);
    let served = sg.client().await.call(&input.call()).await;
    let d = &report["decision"];
    assert_eq!(d["reason"], expected, "explain: {report:#}");
    assert_eq!(d["decision"] == "allow", served.allowed, "{report:#}");
    assert_eq!(code, Some(if served.allowed { 0 } else { 1 }));
    assert_eq!(d["status"].as_u64().map(|s| s as u16), served.status);
    assert_eq!(d["grpc_status"], served.grpc_code);
    let headers: Vec<(String, String)> = d["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h[0].as_str().unwrap().to_string(), h[1].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(headers, served.headers, "{report:#}");
    if !served.allowed {
        assert_eq!(served.header("x-subguard-reason"), Some(expected));
        assert_eq!(d["body"], served.body);
    }
    if let Some(t) = &input.token
        && let Some(sig) = t.rsplit('.').next().filter(|s| s.len() > 8)
    {
        assert!(!report.to_string().contains(sig), "the signature was printed: {report:#}");
    }
    report
}

fn step<'a>(report: &'a Value, stage: &str) -> &'a Value {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|s| s["stage"] == stage)
        .unwrap_or_else(|| panic!("no {stage} step: {report:#}"))
}

#[tokio::test]
async fn allow() {
    let r = agree(shared(), Input::acme(acme().build()), "ok").await;
    assert_eq!(r["decision"]["headers_to_remove"], json!([]));
    assert!(step(&r, "tenant")["summary"].as_str().unwrap().contains("from header"));
    assert_eq!(step(&r, "token")["data"]["claims"]["sub"], ADMIN_SUB);
    assert_eq!(step(&r, "key")["data"]["source"], "file");
    assert_eq!(step(&r, "key")["data"]["kid"], "rsa-1");
    assert_eq!(step(&r, "signature")["status"], "pass");
    assert_eq!(step(&r, "directory")["status"], "pass");
}

/// A header given twice, by `--header` twice or beside `--token` / `--tenant`, is joined with a
/// comma as Envoy joins a repeated header: `explain` answers what `serve` would (it used to keep
/// the last one and allow what `serve` refuses).
#[tokio::test]
async fn repeated_headers_are_joined_as_envoy_joins_them() {
    let sg = shared();
    let token = acme().build();
    let bearer: &'static str = Box::leak(format!("Bearer {token}").into_boxed_str());
    let twice = |headers: Vec<(&'static str, &'static str)>, tenant, token: Option<String>| Input {
        tenant,
        headers,
        token,
        ..Default::default()
    };
    agree(
        sg,
        twice(vec![("x-tenant-id", "acme"), ("x-tenant-id", "acme")], None, Some(token.clone())),
        "missing_tenant",
    )
    .await;
    agree(sg, twice(vec![("x-tenant-id", "acme")], Some("acme"), Some(token.clone())), "missing_tenant")
        .await;
    agree(sg, twice(vec![("authorization", bearer)], Some("acme"), Some(token.clone())), "malformed_token")
        .await;
    agree(
        sg,
        twice(vec![("authorization", bearer), ("authorization", bearer)], Some("acme"), None),
        "malformed_token",
    )
    .await;
}

#[tokio::test]
async fn missing_tenant() {
    agree(shared(), Input { token: Some(acme().build()), ..Default::default() }, "missing_tenant").await;
}

#[tokio::test]
async fn unknown_tenant() {
    let r =
        agree(shared(), Input { tenant: Some("nosuch"), ..Input::acme(acme().build()) }, "unknown_tenant")
            .await;
    assert!(step(&r, "tenant")["summary"].as_str().unwrap().contains("configured: acme, globex"), "{r:#}");
}

#[tokio::test]
async fn tenant_mismatch() {
    let input = Input {
        host: Some("globex.api.example.com"),
        headers: vec![("x-tenant-id", "acme")],
        token: Some(acme().build()),
        ..Default::default()
    };
    let r = agree(shared(), input, "tenant_mismatch").await;
    assert!(step(&r, "tenant")["summary"].as_str().unwrap().contains("host=globex"), "{r:#}");
}

#[tokio::test]
async fn tenant_from_host() {
    let input =
        Input { host: Some("acme.api.example.com"), token: Some(acme().build()), ..Default::default() };
    let r = agree(shared(), input, "ok").await;
    assert!(step(&r, "tenant")["summary"].as_str().unwrap().contains("from host"), "{r:#}");
}

#[tokio::test]
async fn missing_token() {
    agree(shared(), Input { tenant: Some("acme"), ..Default::default() }, "missing_token").await;
}

#[tokio::test]
async fn malformed_token() {
    agree(shared(), Input::acme("not-a-jwt".into()), "malformed_token").await;
    let big = acme().claim("pad", json!("x".repeat(5000))).build();
    let r = agree(shared(), Input::acme(big), "malformed_token").await;
    assert_eq!(step(&r, "token")["data"]["max_bytes"], 4096);
}

#[tokio::test]
async fn untrusted_issuer_names_the_tenant_that_trusts_it() {
    let token =
        TokenBuilder::new("rsa-2", Algorithm::RS256).iss(ISS_GLOBEX).aud("orders").sub("u-77").build();
    let r = agree(shared(), Input::acme(token), "untrusted_issuer").await;
    assert_eq!(step(&r, "issuer")["data"]["trusted_by_tenant"], "globex", "{r:#}");
    assert!(r["decision"]["detail"].as_str().unwrap().contains("trusted by tenant globex"));
}

#[tokio::test]
async fn untrusted_issuer_names_the_first_tenant_by_name_that_trusts_it_or_none() {
    // globex, zeta and beta all trust globex's issuer; acme does not.
    let more: String = ["zeta", "beta"]
        .iter()
        .map(|t| {
            format!(
                "  {t}:\n    issuers:\n      - issuer: \"{ISS_GLOBEX}\"\n        audiences: [\"orders\"]\n        jwks_file: keys/issuer-b.jwks.json\n"
            )
        })
        .collect();
    let sg = Subguard::start(&format!("{CONFIG}{more}"), &users_yaml());
    let token =
        |iss: &str| TokenBuilder::new("rsa-2", Algorithm::RS256).iss(iss).aud("orders").sub("u-77").build();
    let r = agree(&sg, Input::acme(token(ISS_GLOBEX)), "untrusted_issuer").await;
    assert_eq!(step(&r, "issuer")["data"]["trusted_by_tenant"], "beta", "{r:#}");
    assert!(
        r["decision"]["detail"].as_str().unwrap().contains("trusted by tenant beta, not this one"),
        "{r:#}"
    );
    let r = agree(&sg, Input::acme(token("https://idp.nobody.test/")), "untrusted_issuer").await;
    assert_eq!(step(&r, "issuer")["data"]["trusted_by_tenant"], Value::Null, "{r:#}");
    assert!(r["decision"]["detail"].as_str().unwrap().contains("is not trusted by any tenant"), "{r:#}");
}

#[tokio::test]
async fn unsupported_algorithm() {
    let token =
        TokenBuilder::new("ec-384", Algorithm::ES384).iss(ISS_ACME).aud("orders").sub(ADMIN_SUB).build();
    let r = agree(shared(), Input::acme(token), "unsupported_algorithm").await;
    assert_eq!(step(&r, "algorithm")["status"], "fail");
}

#[tokio::test]
async fn unknown_key() {
    let token = acme().header("kid", json!("no-such-kid")).build();
    let r = agree(shared(), Input::acme(token), "unknown_key").await;
    assert!(step(&r, "key")["summary"].as_str().unwrap().contains("no-such-kid"), "{r:#}");
}

#[tokio::test]
async fn invalid_signature() {
    let r = agree(shared(), Input::acme(acme().signed_by("other-rsa").build()), "invalid_signature").await;
    assert_eq!(step(&r, "signature")["status"], "fail");
}

#[tokio::test]
async fn token_expired_spells_out_clock_and_leeway() {
    let r = agree(shared(), Input::acme(acme().exp_in(-600).build()), "token_expired").await;
    let s = step(&r, "time")["summary"].as_str().unwrap().to_string();
    assert!(s.starts_with("expired 10m") && s.contains("ago, leeway 60s"), "{s}");
}

#[tokio::test]
async fn token_not_yet_valid() {
    let r = agree(shared(), Input::acme(acme().nbf(600).build()), "token_not_yet_valid").await;
    assert!(step(&r, "time")["summary"].as_str().unwrap().contains("in the future, leeway 60s"), "{r:#}");
}

#[tokio::test]
async fn invalid_audience() {
    agree(shared(), Input::acme(acme().aud("billing").build()), "invalid_audience").await;
}

#[tokio::test]
async fn missing_subject() {
    agree(shared(), Input::acme(acme().without("sub").build()), "missing_subject").await;
}

#[tokio::test]
async fn user_not_found() {
    let r = agree(shared(), Input::acme(acme().sub("nobody").build()), "user_not_found").await;
    let lookup = step(&r, "directory")["data"]["lookup"].as_str().unwrap().to_string();
    assert!(lookup.contains("users.yaml") && lookup.contains("tenant acme"), "{lookup}");
    assert_eq!(r["hints"], json!([]));
}

#[tokio::test]
async fn user_disabled() {
    agree(shared(), Input::acme(acme().sub(DISABLED_SUB).build()), "user_disabled").await;
}

#[tokio::test]
async fn token_revoked() {
    agree(shared(), Input::acme(acme().sub(REVOKED_SUB).iat_ago(2000).build()), "token_revoked").await;
}

/// `explain` fetches the keys of the request's tenant only: another tenant's identity provider is
/// never asked (with two thousand tenants it used to fetch every issuer to explain one token).
#[tokio::test]
async fn explain_fetches_the_keys_of_the_requests_tenant_only() {
    let jwks = std::fs::read_to_string("tests/fixtures/keys/issuer-b.jwks.json").unwrap();
    let idp = common::jwks_server::JwksServer::start(&jwks);
    let config =
        CONFIG.replace("jwks_file: keys/issuer-b.jwks.json", &format!("jwks_uri: \"{}\"", idp.jwks_uri()));
    let dir = ConfigDir::with(&config, &users_yaml());
    let (report, code) = explain_json(&dir.config_path(), &Input::acme(acme().build()));
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(idp.jwks_requests(), 0, "globex's keys were fetched to explain an acme token");
    let globex = Input { tenant: Some("globex"), ..Input::acme(acme().build()) };
    let (report, _) = explain_json(&dir.config_path(), &globex);
    assert_eq!(report["decision"]["reason"], "untrusted_issuer", "{report:#}");
    assert_eq!(idp.jwks_requests(), 1, "globex's own keys are fetched for a globex request");
}

#[tokio::test]
async fn keys_unavailable_shows_the_failed_fetch() {
    let down = format!("http://127.0.0.1:{}/jwks", common::free_port());
    let config = CONFIG.replace("jwks_file: keys/issuer-a.jwks.json", &format!("jwks_uri: \"{down}\""));
    let sg = Subguard::start_unready(ConfigDir::with(&config, &users_yaml()));
    let r = agree(&sg, Input::acme(acme().build()), "keys_unavailable").await;
    assert!(step(&r, "keys")["summary"].as_str().unwrap().contains("could not fetch keys"), "{r:#}");
    assert_eq!(step(&r, "key")["data"]["source"], "uri");
    let headers = r["decision"]["headers"].as_array().unwrap();
    assert!(headers.iter().any(|h| h[0] == "retry-after"), "{r:#}");
}

#[tokio::test]
async fn directory_unavailable_shows_the_failed_lookup() {
    // The directory is an HTTP service nobody listens on.
    let down = format!("http://127.0.0.1:{}/users/{{sub}}", common::free_port());
    let config = CONFIG.replace(
        "directory:\n  kind: file\n  path: users.yaml",
        &format!("directory:\n  kind: http\n  url: \"{down}\"\n  timeout_ms: 500"),
    );
    assert!(config.contains("kind: http"), "the config replacement must apply");
    let sg = Subguard::start_in(ConfigDir::with(&config, &users_yaml()));
    let r = agree(&sg, Input::acme(acme().build()), "directory_unavailable").await;
    let directory = step(&r, "directory");
    assert!(directory.to_string().contains("127.0.0.1"), "the exact lookup is shown: {r:#}");
    let headers = r["decision"]["headers"].as_array().unwrap();
    assert!(headers.iter().any(|h| h[0] == "retry-after"), "{r:#}");
}

// Hints: the seeds' common root causes of `user_not_found`.

fn hints_for(sub: &str, tenant: &'static str) -> Vec<String> {
    let dir = &shared().dir;
    let (r, code) = explain_json(
        &dir.config_path(),
        &Input { tenant: Some(tenant), ..Input::acme(acme().sub(sub).build()) },
    );
    assert_eq!(code, Some(1), "{r:#}");
    assert_eq!(r["decision"]["reason"], "user_not_found", "{r:#}");
    r["hints"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().to_string()).collect()
}

#[test]
fn hint_same_sub_in_another_tenant() {
    let hints = hints_for("u-77", "acme");
    assert_eq!(hints.len(), 1, "{hints:?}");
    assert!(hints[0].contains("exists in tenant globex"), "{hints:?}");
}

#[test]
fn hint_sub_differs_only_in_case() {
    let hints = hints_for("mixed.case@acme.test", "acme");
    assert_eq!(hints.len(), 1, "{hints:?}");
    assert!(hints[0].contains("\"Mixed.Case@acme.test\"") && hints[0].contains("only in case"), "{hints:?}");
}

#[test]
fn hint_sub_differs_only_in_whitespace() {
    let hints = hints_for("padded@acme.test", "acme");
    assert_eq!(hints.len(), 1, "{hints:?}");
    assert!(hints[0].contains("only in surrounding whitespace"), "{hints:?}");
}

// Exit codes and the text format.

#[test]
fn exit_codes() {
    let dir = &shared().dir;
    let ok = run(&Input::acme(acme().build()).args(&dir.config_path()));
    assert_eq!(ok.status.code(), Some(0));
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(text.contains("[pass] directory") && text.contains("decision: ALLOW"), "{text}");
    assert!(text.contains("x-user-id: u-1001"), "{text}");

    let deny = run(&Input::acme(acme().exp_in(-600).build()).args(&dir.config_path()));
    assert_eq!(deny.status.code(), Some(1));
    let text = String::from_utf8_lossy(&deny.stdout);
    assert!(text.contains("decision: DENY 401 token_expired"), "{text}");

    let missing = run(&Input::acme(acme().build()).args(&dir.path().join("nope.yaml")));
    assert_eq!(missing.status.code(), Some(2));
    let bad_header = run(&[
        "explain".into(),
        "--config".into(),
        dir.config_path().display().to_string(),
        "--header".into(),
        "no-colon".into(),
    ]);
    assert_eq!(bad_header.status.code(), Some(2));
    let no_file = run(&[
        "explain".into(),
        "--config".into(),
        dir.config_path().display().to_string(),
        "--token-file".into(),
        "/nonexistent/token".into(),
    ]);
    assert_eq!(no_file.status.code(), Some(2));
}

#[test]
fn token_from_a_file_and_from_stdin() {
    let dir = &shared().dir;
    let token = acme().build();
    dir.write("token.txt", &format!("{token}\n"));
    let base = vec![
        "explain".to_string(),
        "--config".into(),
        dir.config_path().display().to_string(),
        "--tenant".into(),
        "acme".into(),
    ];
    let mut args = base.clone();
    args.extend(["--token-file".into(), dir.path().join("token.txt").display().to_string()]);
    assert_eq!(run(&args).status.code(), Some(0));

    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_subguard"))
        .args(&base)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(token.as_bytes()).unwrap();
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(0));
}

#[test]
fn hint_for_a_remote_directory_tries_the_case_variant_and_never_prints_credentials() {
    use common::directory_server::{Answer, DirectoryServer};
    let directory = DirectoryServer::start();
    directory.set("alice@acme.test", Answer::user(json!({"id": "u-1"})));
    let config = format!(
        r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
directory:
  kind: http
  url: "{}"
  timeout_ms: 500
  headers:
    authorization:
      value: "s3cr3t-directory-credential"
      prefix: "Bearer "
tenants:
  acme:
    issuers:
      - issuer: "https://idp.acme.test/"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-a.jwks.json
"#,
        directory.url_template()
    );
    let dir = ConfigDir::with(&config, "");
    let input = Input::acme(acme().sub("Alice@acme.test").build());
    for format in ["json", "text"] {
        let mut args = input.args(&dir.config_path());
        args.extend(["--format".into(), format.into()]);
        let out = run(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(!stdout.contains("s3cr3t"), "a credential was printed: {stdout}");
        assert!(stdout.contains("Alice%40acme.test"), "the lookup URL is shown: {stdout}");
        assert!(
            stdout.contains("\\\"alice@acme.test\\\"") || stdout.contains("\"alice@acme.test\""),
            "{stdout}"
        );
        assert!(stdout.contains("only in case"), "{stdout}");
    }
}
