//! A remote directory (`kind: http`) that misbehaves, and the settings that keep subguard safe and
//! quick when it does: the circuit breaker, `timeout_ms`, refused connections,
//! `max_response_bytes`, roles that would forge the roles header, `normalize`, per-tenant
//! directories and request headers from the environment.
//!
//! The rule throughout (SPEC §2): anything but a 200 with a valid user or a 404/410 is
//! `directory_unavailable` (503 with `retry-after`), never `user_not_found`.
//!
//! Most scenarios share one subguard whose default directory (used by `acme`) has its circuit
//! breaker off, so every failing answer is really examined. The breaker and the environment
//! variable have a subguard of their own.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::check::{CheckCall, raw_check};
use common::directory_server::{Answer, DirectoryServer};
use common::{Algorithm, CheckClient, ConfigDir, Outcome, Subguard, TokenBuilder, free_port};
use serde_json::json;

fn issuer(tenant: &str) -> String {
    format!("https://idp.{tenant}.test/")
}

fn token(tenant: &str, sub: &str) -> String {
    TokenBuilder::new("rsa-1", Algorithm::RS256).iss(&issuer(tenant)).aud("orders").sub(sub).build()
}

async fn ask_with(client: &mut CheckClient, tenant: &str, sub: &str) -> Outcome {
    client.call(&CheckCall::new().tenant(tenant).bearer(&token(tenant, sub))).await
}

/// `  <name>:` with one issuer (its own URL, the `issuer-a` keys) and optional directory YAML.
fn tenant_yaml(name: &str, directory: &str) -> String {
    format!(
        r#"
  {name}:
    issuers:
      - issuer: "{iss}"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-a.jwks.json{directory}"#,
        iss = issuer(name)
    )
}

#[track_caller]
fn assert_reason(out: &Outcome, code: &str, status: u16) {
    assert!(!out.allowed, "expected {code}, got {out:#?}");
    assert_eq!(out.status, Some(status), "{out:#?}");
    assert_eq!(out.header("x-subguard-reason"), Some(code), "{out:#?}");
    assert_eq!(out.body["code"], code, "{out:#?}");
    if status == 503 {
        assert!(out.header("retry-after").is_some_and(|s| s.parse::<u32>().is_ok()), "{out:#?}");
    }
}

#[track_caller]
fn assert_unavailable(out: &Outcome) {
    assert_reason(out, "directory_unavailable", 503);
}

/// The default directory's `subguard_directory_breaker_state`, if exported.
fn breaker_state(sg: &Subguard) -> Option<f64> {
    common::metrics::sample(&sg.metrics(), "subguard_directory_breaker_state", &[("directory", "default")])
}

// ---------------------------------------------------------------------------------------------
// The shared subguard.

struct Fixture {
    /// `acme` (default directory, breaker off) and `norm` (own directory with normalize).
    main: DirectoryServer,
    /// `tenant-a` and `tenant-b` each have their own.
    a: DirectoryServer,
    b: DirectoryServer,
    subguard: Subguard,
}

fn shared() -> &'static Fixture {
    static SHARED: OnceLock<Fixture> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (main, a, b) = (DirectoryServer::start(), DirectoryServer::start(), DirectoryServer::start());
        let own = |url: &str, extra: &str| {
            format!(
                r#"
    directory:
      kind: http
      url: "{url}"
      timeout_ms: 1000{extra}"#
            )
        };
        let nothing_listens = format!("http://127.0.0.1:{}/tenants/{{tenant}}/users/{{sub}}", free_port());
        let config = format!(
            r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
directory:
  kind: http
  url: "{main}"
  timeout_ms: 300
  max_response_bytes: 2048
  breaker:
    failure_threshold: 0
  cache:
    ttl_seconds: 60
    negative_ttl_seconds: 1
tenants:{acme}{norm}{refused}{ta}{tb}
"#,
            main = main.url_template(),
            acme = tenant_yaml("acme", ""),
            norm = tenant_yaml("norm", &own(&main.url_template(), "\n      normalize: [trim, lowercase]")),
            refused = tenant_yaml(
                "refused",
                &own(&nothing_listens, "\n      breaker:\n        failure_threshold: 0")
            ),
            ta = tenant_yaml("tenant-a", &own(&a.url_template(), "")),
            tb = tenant_yaml("tenant-b", &own(&b.url_template(), "")),
        );
        let subguard = Subguard::start(&config, "");
        Fixture { main, a, b, subguard }
    })
}

fn main_dir() -> &'static DirectoryServer {
    &shared().main
}

async fn ask(tenant: &str, sub: &str) -> Outcome {
    ask_with(&mut shared().subguard.client().await, tenant, sub).await
}

#[tokio::test]
async fn a_directory_slower_than_timeout_ms_is_directory_unavailable() {
    // timeout_ms is 300: the answer comes from subguard's timeout, not from the directory.
    main_dir().set("slowpoke", Answer::user(json!({"id": "u-slow"})).delayed(Duration::from_secs(5)));
    let out = ask("acme", "slowpoke").await;
    assert_unavailable(&out);
    assert_eq!(out.body["tenant"], "acme");
    assert_eq!(main_dir().requests("acme", "slowpoke"), 1, "the directory was asked");
}

#[tokio::test]
async fn a_caller_deadline_shorter_than_the_directory_ends_the_check_with_deadline_exceeded() {
    // Envoy sends its ext_authz timeout as grpc-timeout; here 100 ms, under the directory's
    // timeout_ms (300) and far under its answer (5 s).
    main_dir().set("deadline", Answer::user(json!({"id": "u-deadline"})).delayed(Duration::from_secs(5)));
    // Sent over a bare HTTP/2 connection: tonic's client would enforce the deadline itself.
    let addr = shared().subguard.grpc_addr();
    let call = CheckCall::new().tenant("acme").bearer(&token("acme", "deadline"));
    let started = Instant::now();
    let status = raw_check(addr, &call, &[("grpc-timeout", "100m")]).await;
    assert_eq!(status.as_deref(), Some("4"), "grpc-status DEADLINE_EXCEEDED");
    assert!(started.elapsed() < Duration::from_millis(290), "answered after {:?}", started.elapsed());
    // Without a deadline the directory's own timeout_ms ends the check, with a decision (OK).
    assert_eq!(raw_check(addr, &call, &[]).await.as_deref(), Some("0"));
    // A deadline the check meets changes nothing.
    main_dir().set("in-time", Answer::user(json!({"id": "u-in-time"})));
    let call = CheckCall::new().tenant("acme").bearer(&token("acme", "in-time"));
    let mut client = shared().subguard.client().await;
    let out = client.try_call_within(&call, Duration::from_secs(5)).await.unwrap();
    assert!(out.allowed, "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some("u-in-time"));
}

#[tokio::test]
async fn a_refused_connection_is_directory_unavailable() {
    let out = ask("refused", "anyone").await;
    assert_unavailable(&out);
    assert_eq!(out.body["tenant"], "refused");
}

#[tokio::test]
async fn a_body_over_max_response_bytes_is_directory_unavailable() {
    // max_response_bytes is 2048. The same document, small and large: only the size differs.
    main_dir().set("small-doc", Answer::user(json!({"id": "u-small", "padding": "x".repeat(1000)})));
    main_dir().set("huge-doc", Answer::user(json!({"id": "u-huge", "padding": "x".repeat(64 * 1024)})));
    let out = ask("acme", "small-doc").await;
    assert!(out.allowed, "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some("u-small"));
    assert_unavailable(&ask("acme", "huge-doc").await);
    assert_eq!(main_dir().requests("acme", "huge-doc"), 1);
}

#[tokio::test]
async fn a_role_containing_a_comma_is_directory_unavailable() {
    // Roles are forwarded joined by `,`: a role "admin,superuser" would forge a second role.
    main_dir()
        .set("comma-role", Answer::user(json!({"id": "u-comma", "roles": ["viewer", "admin,superuser"]})));
    let out = ask("acme", "comma-role").await;
    assert_unavailable(&out);
    assert!(out.header("x-user-roles").is_none(), "{out:#?}");
}

#[tokio::test]
async fn normalize_trims_and_lowercases_the_sub_before_the_lookup() {
    main_dir().set("alice@acme.test", Answer::user(json!({"id": "u-alice", "roles": ["reader"]})));
    let sub = " Alice@Acme.Test ";

    let out = ask("norm", sub).await;
    assert!(out.allowed, "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some("u-alice"));
    assert!(
        main_dir()
            .raw_paths()
            .iter()
            .any(|p| p.eq_ignore_ascii_case("/tenants/norm/users/alice%40acme.test")),
        "{:#?}",
        main_dir().raw_paths()
    );

    // Without normalize (acme), the sub is sent exactly as the token has it.
    let out = ask("acme", sub).await;
    assert_reason(&out, "user_not_found", 403);
    assert!(
        main_dir()
            .raw_paths()
            .iter()
            .any(|p| p.eq_ignore_ascii_case("/tenants/acme/users/%20Alice%40Acme.Test%20")),
        "{:#?}",
        main_dir().raw_paths()
    );
    assert_eq!(main_dir().requests("acme", "alice@acme.test"), 0);
}

#[tokio::test]
async fn tenants_with_their_own_directories_never_share_requests_or_answers() {
    let (a, b) = (&shared().a, &shared().b);
    a.set("same-sub", Answer::user(json!({"id": "a-user", "roles": ["a-role"]})));
    b.set("same-sub", Answer::user(json!({"id": "b-user"})));

    let out = ask("tenant-a", "same-sub").await;
    assert_eq!(out.header("x-user-id"), Some("a-user"), "{out:#?}");
    let out = ask("tenant-a", "same-sub").await;
    assert_eq!(out.header("x-user-id"), Some("a-user"), "{out:#?}");
    assert_eq!(a.requests("tenant-a", "same-sub"), 1, "the second answer came from tenant-a's cache");

    // Cached for tenant-a, still looked up for tenant-b, in tenant-b's directory.
    let out = ask("tenant-b", "same-sub").await;
    assert!(out.allowed, "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some("b-user"));
    assert_eq!(out.header("x-user-roles"), None, "tenant-a's roles never leak: {out:#?}");
    assert_eq!(b.requests("tenant-b", "same-sub"), 1);

    // A sub only tenant-a knows is not found for tenant-b.
    a.set("only-a", Answer::user(json!({"id": "a-only"})));
    assert!(ask("tenant-a", "only-a").await.allowed);
    assert_reason(&ask("tenant-b", "only-a").await, "user_not_found", 403);

    for path in a.raw_paths() {
        assert!(path.starts_with("/tenants/tenant-a/"), "tenant-a's directory saw {path}");
    }
    for path in b.raw_paths() {
        assert!(path.starts_with("/tenants/tenant-b/"), "tenant-b's directory saw {path}");
    }
    for path in main_dir().raw_paths() {
        assert!(
            !path.contains("/tenant-a/") && !path.contains("/tenant-b/"),
            "the default directory saw {path}"
        );
    }
}

/// A subguard whose default directory is `directory` (HTTP, `timeout_ms: 1000`) with this
/// `breaker:` block, serving `tenants` (each with its own issuer).
fn over_http_with_breaker(directory: &DirectoryServer, breaker: &str, tenants: &[&str]) -> Subguard {
    let config = format!(
        r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
directory:
  kind: http
  url: "{url}"
  timeout_ms: 1000
  breaker:
{breaker}
tenants:{tenants}
"#,
        url = directory.url_template(),
        tenants = tenants.iter().map(|t| tenant_yaml(t, "")).collect::<String>(),
    );
    Subguard::start(&config, "")
}

// ---------------------------------------------------------------------------------------------
// The circuit breaker (subguard's addition to SPEC: after consecutive failures the directory is
// not asked for a while, so checks fail at once instead of each waiting for a timeout).

/// A status that refuses one lookup (`400`, `414` for a huge `sub`) makes that lookup
/// `directory_unavailable` but does not count towards the breaker: otherwise a tenant whose
/// identity provider mints such subs could open the breaker for every tenant sharing the
/// directory. Statuses that say the directory cannot serve anyone (`401`, `429`, `503`) count.
#[tokio::test]
async fn statuses_that_refuse_one_lookup_never_open_the_breaker() {
    let directory = DirectoryServer::start();
    directory.set_default(Answer::user(json!({"id": "someone"})));
    let sg = over_http_with_breaker(
        &directory,
        "    failure_threshold: 3\n    cooldown_ms: 60000",
        &["acme", "globex"],
    );
    let mut client = sg.client().await;
    for status in [400, 414, 422] {
        for i in 1..=4 {
            let sub = format!("refused-{status}-{i}");
            directory.set(&sub, Answer::status(status));
            assert_unavailable(&ask_with(&mut client, "acme", &sub).await);
        }
    }
    assert_eq!(breaker_state(&sg), Some(0.0), "12 refused lookups left the breaker closed");
    let out = ask_with(&mut client, "globex", "fine").await;
    assert!(out.allowed, "another tenant's lookups still reach the directory: {out:#?}");
    // subguard's own credentials refused (401), overload (429), a server error (503): each says
    // the directory cannot serve anyone now, and three in a row open the breaker.
    for (i, status) in [401, 429, 503].into_iter().enumerate() {
        let sub = format!("failing-{status}");
        directory.set(&sub, Answer::status(status));
        assert_unavailable(&ask_with(&mut client, "acme", &sub).await);
        let expected = if i == 2 { 1.0 } else { 0.0 };
        assert_eq!(breaker_state(&sg), Some(expected), "after {status}");
    }
}

/// In an outage every uncached lookup fails: warning about each would flood the platform's logs
/// at full traffic. Failed lookups are warned about at most once a second per directory, and the
/// next warning says how many were held back (they are all counted in the lookup metric).
#[tokio::test]
async fn failed_lookups_are_warned_about_at_most_once_a_second() {
    let directory = DirectoryServer::start();
    directory.set_default(Answer::status(500));
    let sg = over_http_with_breaker(&directory, "    failure_threshold: 0", &["acme"]);
    let mut client = sg.client().await;
    let warnings = |sg: &Subguard| -> Vec<serde_json::Value> {
        sg.log_events()
            .into_iter()
            .filter(|e| e["level"] == "WARN" && e["fields"]["message"] == "directory lookup")
            .collect()
    };
    let started = Instant::now();
    for i in 0..40 {
        assert_unavailable(&ask_with(&mut client, "acme", &format!("down-{i}")).await);
    }
    assert_eq!(directory.total_requests(), 40, "every lookup reached the directory");
    let seconds = started.elapsed().as_secs() as usize + 1;
    let first = warnings(&sg);
    assert!(
        !first.is_empty() && first.len() <= seconds,
        "{} warnings for 40 failed lookups in {seconds} s",
        first.len()
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_unavailable(&ask_with(&mut client, "acme", "down-after").await);
    let last = warnings(&sg).pop().unwrap();
    assert_eq!(last["fields"]["sub"], "down-after", "{last}");
    let held_back: u64 = warnings(&sg).iter().map(|w| w["fields"]["held_back"].as_u64().unwrap()).sum();
    assert_eq!(held_back as usize + warnings(&sg).len(), 41, "every failed lookup warned or counted");
}

#[tokio::test]
async fn the_breaker_opens_after_consecutive_failures_and_one_probe_closes_it() {
    let directory = DirectoryServer::start();
    directory.set_default(Answer::status(500));
    let sg = over_http_with_breaker(&directory, "    failure_threshold: 3\n    cooldown_ms: 500", &["acme"]);
    let mut client = sg.client().await;

    // Three failed lookups of three different users: each reached the directory.
    for i in 1..=3 {
        assert_unavailable(&ask_with(&mut client, "acme", &format!("down-{i}")).await);
        assert_eq!(directory.total_requests(), i, "lookup {i} reached the directory");
    }
    // The breaker is open: lookups fail at once, and the directory is left alone.
    assert_eq!(breaker_state(&sg), Some(1.0), "open");
    for i in 1..=3 {
        assert_unavailable(&ask_with(&mut client, "acme", &format!("while-open-{i}")).await);
    }
    assert_eq!(directory.total_requests(), 3, "no request reaches the directory while the breaker is open");
    // A sub the directory is never asked about keeps its answer while the breaker is open: `.`
    // and `..` are no user (SPEC §2), not a retryable outage.
    for sub in [".", ".."] {
        assert_reason(&ask_with(&mut client, "acme", sub).await, "user_not_found", 403);
    }
    assert_eq!(directory.total_requests(), 3);

    // Past the cool-down, still failing: one probe goes out, fails, and the breaker opens again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while directory.total_requests() == 3 {
        assert!(Instant::now() < deadline, "no probe was ever sent after the cool-down");
        assert_unavailable(&ask_with(&mut client, "acme", "probe-while-down").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(directory.total_requests(), 4, "exactly one probe");
    assert_unavailable(&ask_with(&mut client, "acme", "after-failed-probe").await);
    assert_eq!(directory.total_requests(), 4, "the failed probe re-opened the breaker");
    assert_eq!(breaker_state(&sg), Some(1.0));

    // The directory recovers: after the cool-down one probe succeeds and closes the breaker.
    directory.set_default(Answer::user(json!({"id": "u-back"})));
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = ask_with(&mut client, "acme", "recovered").await;
        if out.allowed || Instant::now() > deadline {
            break out;
        }
        assert_unavailable(&out);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(out.allowed, "the breaker never closed after the directory recovered: {out:#?}");
    assert_eq!(out.header("x-user-id"), Some("u-back"));
    assert_eq!(breaker_state(&sg), Some(0.0), "closed");
    assert_eq!(directory.requests("acme", "recovered"), 1, "one successful probe");

    // Closed: lookups reach the directory again.
    let before = directory.total_requests();
    assert!(ask_with(&mut client, "acme", "next-user").await.allowed);
    assert_eq!(directory.total_requests(), before + 1);
}

// ---------------------------------------------------------------------------------------------
// Request headers.

#[tokio::test]
async fn a_header_from_an_environment_variable_reaches_the_directory_and_never_the_logs() {
    const SECRET: &str = "env-api-key-93c1f0e8b2";
    let directory = DirectoryServer::start();
    directory.set("env-user", Answer::user(json!({"id": "u-env"})));
    let config = format!(
        r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
directory:
  kind: http
  url: "{url}"
  headers:
    x-api-key:
      from_env: SUBGUARD_TEST_DIRECTORY_KEY
    x-caller:
      value: subguard-tests
tenants:{acme}
"#,
        url = directory.url_template(),
        acme = tenant_yaml("acme", ""),
    );
    let dir = ConfigDir::with(&config, "");
    let sg = Subguard::launch(dir, &[("SUBGUARD_TEST_DIRECTORY_KEY", SECRET)]);
    sg.wait_ready(Duration::from_secs(30));
    let mut client = sg.client().await;

    let out = ask_with(&mut client, "acme", "env-user").await;
    assert!(out.allowed, "{out:#?}");
    assert_reason(&ask_with(&mut client, "acme", "env-ghost").await, "user_not_found", 403);

    let received = directory.received();
    assert_eq!(received.len(), 2, "{received:#?}");
    for r in &received {
        assert_eq!(r.header("x-api-key"), Some(SECRET), "{r:?}");
        assert_eq!(r.header("x-caller"), Some("subguard-tests"), "{r:?}");
    }

    let deadline = Instant::now() + Duration::from_secs(5);
    while !sg.logs().iter().any(|l| l.contains("env-ghost") && l.contains("user_not_found")) {
        assert!(Instant::now() < deadline, "the denial was never logged:\n{}", sg.logs().join("\n"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for line in sg.logs().iter().chain(sg.stderr().iter()) {
        assert!(!line.contains(SECRET), "a log line holds the directory credential: {line}");
    }
}
