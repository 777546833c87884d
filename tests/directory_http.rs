//! The HTTP user directory (SPEC §2 "HTTP directory", §3 directory reasons, §5 directory cache),
//! against a fixture directory server on loopback.
//!
//! | directory answers | subguard concludes |
//! |---|---|
//! | 200 with a user document | the user exists |
//! | 404 or 410 | `user_not_found` |
//! | anything else (status, timeout, refused, bad JSON or field types) | `directory_unavailable`, never `user_not_found` |
//!
//! One subguard and one directory server serve the file; every test uses its own subs. The cache
//! TTLs are 1 s (found and not-found) so that expiry can be observed quickly.
//!
//! Tenants: `acme` uses the default directory with default settings. `flaky` has its own
//! directory on the same server for the scenarios where the directory fails on purpose; its
//! circuit breaker (subguard's addition to SPEC: after consecutive failures the directory is not
//! asked for a while) is off there, so that every failing answer is really examined and the
//! failures never open acme's breaker. `globex` has its own directory, which is down.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::check::CheckCall;
use common::directory_server::{Answer, DirectoryServer};
use common::metrics::value;
use common::{Algorithm, Outcome, Subguard, TokenBuilder, free_port, now};
use serde_json::json;

const ISS_ACME: &str = "https://idp.acme.test/";
const ISS_GLOBEX: &str = "https://idp.globex.test/";
const ISS_FLAKY: &str = "https://idp.flaky.test/";
const TTL: Duration = Duration::from_secs(1);

struct Fixture {
    directory: DirectoryServer,
    subguard: Subguard,
}

fn shared() -> &'static Fixture {
    static SHARED: OnceLock<Fixture> = OnceLock::new();
    SHARED.get_or_init(|| {
        let directory = DirectoryServer::start();
        // globex has its own directory, which is down (nothing listens on the port).
        let down = format!("http://127.0.0.1:{}/tenants/{{tenant}}/users/{{sub}}", free_port());
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
  timeout_ms: 500
  cache:
    ttl_seconds: 1
    negative_ttl_seconds: 1
    stale_if_error_seconds: 60
    max_entries: 1000
tenants:
  acme:
    issuers:
      - issuer: "{ISS_ACME}"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-a.jwks.json
  globex:
    issuers:
      - issuer: "{ISS_GLOBEX}"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-b.jwks.json
    directory:
      kind: http
      url: "{down}"
      timeout_ms: 500
  flaky:
    issuers:
      - issuer: "{ISS_FLAKY}"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-a.jwks.json
    directory:
      kind: http
      url: "{url}"
      timeout_ms: 500
      breaker:
        failure_threshold: 0
"#,
            url = directory.url_template()
        );
        let subguard = Subguard::start(&config, "");
        Fixture { directory, subguard }
    })
}

fn dir() -> &'static DirectoryServer {
    &shared().directory
}

fn token(sub: &str) -> TokenBuilder {
    TokenBuilder::new("rsa-1", Algorithm::RS256).iss(ISS_ACME).aud("orders").sub(sub)
}

async fn ask_sub(sub: &str) -> Outcome {
    ask_token(&token(sub).build()).await
}

async fn ask_token(token: &str) -> Outcome {
    shared().subguard.client().await.call(&CheckCall::new().tenant("acme").bearer(token)).await
}

#[track_caller]
fn assert_reason(out: &Outcome, code: &str, status: u16) {
    assert!(!out.allowed, "expected {code}, got {out:#?}");
    assert_eq!(out.status, Some(status), "{out:#?}");
    assert_eq!(out.header("x-subguard-reason"), Some(code), "{out:#?}");
    assert_eq!(out.meta("reason"), Some(code), "{out:#?}");
    if status == 503 {
        assert!(out.header("retry-after").is_some_and(|s| s.parse::<u32>().is_ok()), "{out:#?}");
    }
}

#[track_caller]
fn assert_unavailable(out: &Outcome, tenant: &str) {
    assert_reason(out, "directory_unavailable", 503);
    assert_eq!(out.body["tenant"], tenant);
}

/// Asks as tenant `flaky` (its own directory on the same server, breaker off).
async fn ask_flaky(sub: &str) -> Outcome {
    let token = TokenBuilder::new("rsa-1", Algorithm::RS256).iss(ISS_FLAKY).aud("orders").sub(sub).build();
    shared().subguard.client().await.call(&CheckCall::new().tenant("flaky").bearer(&token)).await
}

fn sleep_past_ttl() {
    std::thread::sleep(TTL + Duration::from_millis(300));
}

// ---------------------------------------------------------------------------------------------
// What the directory's answers mean.

#[tokio::test]
async fn found_user_is_forwarded_with_the_directorys_id_and_roles() {
    dir().set("alice", Answer::user(json!({"id": "u-a", "roles": ["r1", "r2"]})));
    let out = ask_sub("alice").await;
    assert!(out.allowed, "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some("u-a"));
    assert_eq!(out.header("x-user-roles"), Some("r1,r2"));
    assert!(dir().raw_paths().iter().any(|p| p == "/tenants/acme/users/alice"), "{:?}", dir().raw_paths());
}

#[tokio::test]
async fn found_user_without_id_or_roles() {
    dir().set("bare", Answer::user(json!({})));
    let out = ask_sub("bare").await;
    assert!(out.allowed, "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some("bare"));
    assert_eq!(out.header("x-user-roles"), None);
    assert!(out.removes("x-user-roles"));
}

#[tokio::test]
async fn user_not_found_on_404_and_410() {
    assert_reason(&ask_sub("nobody-404").await, "user_not_found", 403);
    dir().set("gone-410", Answer::status(410));
    assert_reason(&ask_sub("gone-410").await, "user_not_found", 403);
}

#[tokio::test]
async fn directory_unavailable_on_any_other_status() {
    for status in [500u16, 502, 503, 400, 401, 403, 429] {
        let sub = format!("status-{status}");
        dir().set(&sub, Answer::status(status));
        let out = ask_flaky(&sub).await;
        assert!(!out.allowed);
        assert_unavailable(&out, "flaky");
        assert_eq!(dir().requests("flaky", &sub), 1);
    }
}

#[tokio::test]
async fn directory_unavailable_on_invalid_json_or_field_types() {
    let answers = [
        ("garbage", Answer::garbage()),
        ("array-body", Answer::user(json!([]))),
        // Arrays serde alone would read by position as {id, roles, disabled, tokens_valid_after}.
        ("array-of-fields", Answer::user(json!([null, null, null, null]))),
        ("array-with-id", Answer::user(json!(["u-9", ["admin"], false, null]))),
        ("roles-string", Answer::user(json!({"roles": "admin"}))),
        ("roles-numbers", Answer::user(json!({"roles": [1, 2]}))),
        ("id-number", Answer::user(json!({"id": 5}))),
        ("disabled-string", Answer::user(json!({"disabled": "yes"}))),
        ("tva-string", Answer::user(json!({"tokens_valid_after": "soon"}))),
        // An id the upstream would read as another user: HTTP drops the spaces around a header.
        ("id-spaced", Answer::user(json!({"id": "u-1 "}))),
        ("role-spaced", Answer::user(json!({"roles": [" admin"]}))),
        // No id, so the sub is forwarded, and this sub ends with a space.
        ("spaced-sub ", Answer::user(json!({}))),
    ];
    for (sub, answer) in answers {
        dir().set(sub, answer);
        let out = ask_flaky(sub).await;
        assert!(!out.allowed, "{sub}: {out:#?}");
        assert_unavailable(&out, "flaky");
        assert_eq!(dir().requests("flaky", sub), 1);
    }
}

#[tokio::test]
async fn directory_unavailable_on_timeout_within_timeout_ms() {
    dir().set("slow", Answer::user(json!({})).delayed(Duration::from_secs(3)));
    let started = Instant::now();
    let out = ask_flaky("slow").await;
    assert_unavailable(&out, "flaky");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "timeout_ms 500, answered after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn directory_unavailable_when_refused_and_a_tenant_has_its_own_directory() {
    let token =
        TokenBuilder::new("other-rsa", Algorithm::RS256).iss(ISS_GLOBEX).aud("orders").sub("u-77").build();
    let out = shared().subguard.client().await.call(&CheckCall::new().tenant("globex").bearer(&token)).await;
    assert_reason(&out, "directory_unavailable", 503);
    assert_eq!(out.body["tenant"], "globex");
    assert_eq!(dir().requests("globex", "u-77"), 0, "globex never uses the default directory");
}

#[tokio::test]
async fn disabled_and_revoked_users() {
    dir().set("dis", Answer::user(json!({"disabled": true})));
    assert_reason(&ask_sub("dis").await, "user_disabled", 403);
    dir().set("rev", Answer::user(json!({"id": "u-rev", "tokens_valid_after": now() - 1000})));
    assert_reason(&ask_token(&token("rev").iat_ago(2000).build()).await, "token_revoked", 401);
    assert_reason(&ask_token(&token("rev").without("iat").build()).await, "token_revoked", 401);
    let out = ask_token(&token("rev").iat_ago(10).build()).await;
    assert!(out.allowed, "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some("u-rev"));
}

// ---------------------------------------------------------------------------------------------
// The request URL: a sub can never change the path or query.

#[tokio::test]
async fn tenant_and_sub_are_percent_encoded_outside_unreserved() {
    let cases = [
        ("a b/c?d#e%f+g", "/tenants/acme/users/a%20b%2Fc%3Fd%23e%25f%2Bg"),
        ("enc@acme.test", "/tenants/acme/users/enc%40acme.test"),
        ("ü-user", "/tenants/acme/users/%C3%BC-user"),
        ("semi;colon&amp=1", "/tenants/acme/users/semi%3Bcolon%26amp%3D1"),
        ("Unreserved-._~9", "/tenants/acme/users/Unreserved-._~9"),
    ];
    for (sub, expected_path) in cases {
        let out = ask_sub(sub).await;
        assert_reason(&out, "user_not_found", 403);
        assert_eq!(dir().requests("acme", sub), 1, "sub {sub:?} reached the directory as itself");
        let paths = dir().raw_paths();
        assert!(
            paths.iter().any(|p| p.eq_ignore_ascii_case(expected_path)),
            "sub {sub:?}: expected request path {expected_path}, saw {paths:#?}"
        );
    }
}

#[tokio::test]
async fn dot_and_dotdot_subs_are_not_found_without_asking() {
    for sub in [".", ".."] {
        assert_reason(&ask_sub(sub).await, "user_not_found", 403);
        assert_eq!(dir().requests("acme", sub), 0);
        // The deny's detail says so, rather than name a GET that was never made.
        let needle = format!("not asked: a sub of `{sub}` would be a step in the URL's path");
        assert!(!shared().subguard.logged(&needle).is_empty(), "no deny logged with {needle:?}");
    }
    assert!(shared().subguard.logged("no such user: not asked").len() >= 2);
    for path in dir().raw_paths() {
        let in_collection = ["/tenants/acme/users/", "/tenants/flaky/users/"]
            .iter()
            .any(|prefix| path.starts_with(prefix) && path.len() > prefix.len());
        assert!(in_collection, "a request left the users collection: {path}");
        assert!(!path.ends_with("/.") && !path.ends_with("/.."), "{path}");
    }
}

// ---------------------------------------------------------------------------------------------
// The cache in front of the directory.

#[tokio::test]
async fn found_users_are_cached_for_ttl_seconds() {
    dir().set("cached", Answer::user(json!({"id": "u-c"})));
    for _ in 0..3 {
        assert!(ask_sub("cached").await.allowed);
    }
    assert_eq!(dir().requests("acme", "cached"), 1, "answers within the TTL come from the cache");
    sleep_past_ttl();
    assert!(ask_sub("cached").await.allowed);
    assert_eq!(dir().requests("acme", "cached"), 2, "past the TTL the directory is asked again");
}

#[tokio::test]
async fn not_found_is_cached_briefly_so_a_new_user_works_soon() {
    assert_reason(&ask_sub("newcomer").await, "user_not_found", 403);
    assert_reason(&ask_sub("newcomer").await, "user_not_found", 403);
    assert_eq!(dir().requests("acme", "newcomer"), 1, "not-found is cached for negative_ttl_seconds");
    // The user is created a moment later.
    dir().set("newcomer", Answer::user(json!({"id": "u-new"})));
    sleep_past_ttl();
    let out = ask_sub("newcomer").await;
    assert!(out.allowed, "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some("u-new"));
}

#[tokio::test]
async fn a_cached_user_is_served_stale_while_the_directory_fails() {
    dir().set("stale", Answer::user(json!({"id": "u-s", "roles": ["r"]})));
    assert!(ask_sub("stale").await.allowed);
    dir().set("stale", Answer::status(500));
    sleep_past_ttl();
    let out = ask_sub("stale").await;
    assert!(out.allowed, "within stale_if_error_seconds the cached user is served: {out:#?}");
    assert_eq!(out.header("x-user-id"), Some("u-s"));
    assert!(dir().requests("acme", "stale") >= 2, "the directory was asked again past the TTL");
    let metrics = shared().subguard.metrics();
    let stale =
        value(&metrics, "subguard_directory_lookups_total", &[("tenant", "acme"), ("outcome", "stale")]);
    assert!(stale >= 1.0, "{metrics}");
}

#[tokio::test]
async fn a_cached_not_found_is_never_served_past_its_ttl() {
    assert_reason(&ask_sub("nf-then-down").await, "user_not_found", 403);
    dir().set("nf-then-down", Answer::status(500));
    sleep_past_ttl();
    assert_unavailable(&ask_sub("nf-then-down").await, "acme");
}

#[tokio::test]
async fn concurrent_lookups_of_one_user_make_one_request() {
    dir().set("popular", Answer::user(json!({"id": "u-p"})).delayed(Duration::from_millis(300)));
    let client = shared().subguard.client().await;
    let token = token("popular").build();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let mut client = client.clone();
        let call = CheckCall::new().tenant("acme").bearer(&token);
        tasks.push(tokio::spawn(async move { client.call(&call).await }));
    }
    for task in tasks {
        assert!(task.await.unwrap().allowed);
    }
    assert_eq!(dir().requests("acme", "popular"), 1);
}

#[tokio::test]
async fn metrics_count_directory_outcomes() {
    dir().set("m-found", Answer::user(json!({})));
    dir().set("m-error", Answer::status(500));
    ask_sub("m-found").await;
    ask_sub("m-found").await;
    ask_sub("m-missing").await;
    ask_sub("m-error").await;
    let metrics = shared().subguard.metrics();
    for outcome in ["found", "not_found", "error", "cache_hit"] {
        assert!(
            value(&metrics, "subguard_directory_lookups_total", &[("tenant", "acme"), ("outcome", outcome)])
                >= 1.0,
            "no {outcome} lookups counted:\n{metrics}"
        );
    }
}

/// Each remote directory's cache shows how many answers it holds, by directory; a subguard of
/// its own, so the other tests' lookups do not count.
#[tokio::test(flavor = "multi_thread")]
async fn each_directory_cache_shows_how_many_answers_it_holds() {
    let directory = DirectoryServer::start();
    directory.set_default(Answer::status(404));
    for sub in ["ann", "ben", "cat"] {
        directory.set(sub, Answer::user(json!({"id": sub})));
    }
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
  cache:
    ttl_seconds: 300
    negative_ttl_seconds: 300
tenants:
  acme:
    issuers:
      - issuer: "{ISS_ACME}"
        audiences: ["orders"]
        jwks_file: keys/issuer-a.jwks.json
  globex:
    issuers:
      - issuer: "{ISS_GLOBEX}"
        audiences: ["orders"]
        jwks_file: keys/issuer-b.jwks.json
    directory:
      kind: http
      url: "{url}"
"#,
        url = directory.url_template()
    );
    let sg = Subguard::start(&config, "");
    let mut client = sg.client().await;
    let cached = |directory: &str| {
        common::metrics::required(
            &sg.metrics(),
            "subguard_directory_cache_entries",
            &[("directory", directory)],
        )
    };
    assert_eq!(cached("default"), 0.0);
    assert_eq!(cached("globex"), 0.0);

    // acme: three users found and one not found (a cached answer too); globex: one found.
    for sub in ["ann", "ben", "cat", "nobody"] {
        client.call(&CheckCall::new().tenant("acme").bearer(&token(sub).build())).await;
    }
    let globex = TokenBuilder::new("other-rsa", Algorithm::RS256).iss(ISS_GLOBEX).aud("orders").sub("ann");
    assert!(client.call(&CheckCall::new().tenant("globex").bearer(&globex.build())).await.allowed);

    // The cache counts as it does its housekeeping, which follows the inserts by a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (cached("default"), cached("globex")) != (4.0, 1.0) {
        assert!(
            Instant::now() < deadline,
            "default {} (4 expected), globex {} (1 expected)",
            cached("default"),
            cached("globex")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // No tenant reads a users file here.
    assert!(common::metrics::samples(&sg.metrics(), "subguard_directory_file_users").is_empty());
}
