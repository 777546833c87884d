//! The SCIM 2.0 directory (SPEC §2 "`kind: scim` speaks SCIM 2.0 (RFC 7643/7644) to the same
//! effect"), against a fixture SCIM service provider that answers like the RFC 7644 §3.4.2
//! examples: a `ListResponse` of `User` resources with `id`, `userName`, `externalId`, `active`,
//! `groups: [{value, display}]` and `roles: [{value}]`.
//!
//! | the provider answers | subguard concludes |
//! |---|---|
//! | one resource | the user exists: its `id` is forwarded, roles from `groups[].display` (or `roles[].value`) |
//! | `totalResults: 0`, or 404 for `GET /Users/{id}` | `user_not_found` |
//! | `active: false` | `user_disabled` |
//! | more than one resource | `directory_unavailable` (ambiguous data must never pick a user) |
//! | another status, or a body that is not a SCIM document | `directory_unavailable` |
//!
//! One subguard and one SCIM provider serve the file; the provider is rooted at
//! `/{tenant}/scim/v2`, so every request shows which tenant's directory made it. Tenants:
//! - `acme` uses the default directory (`match: userName`, roles from groups) which sends a bearer
//!   credential read from `token.txt`;
//! - `roles` has its own directory with `roles_from: roles`;
//! - `ext` matches `externalId`, `byid` matches `id` (`GET {base}/Users/{sub}`);
//! - `flaky` is where the provider fails on purpose; its circuit breaker is off so that every
//!   failing answer is really examined.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::check::CheckCall;
use common::directory_server::{Answer, ScimServer, percent_decode};
use common::{Algorithm, ConfigDir, Outcome, Subguard, TokenBuilder};
use serde_json::{Value, json};

/// The credential the default directory sends; it must never appear in a log line.
const SCIM_SECRET: &str = "scim-bearer-5e1f0c9a2d7b44e1";

const BJENSEN_ID: &str = "2819c223-7f76-453a-919d-413861904646";

struct Fixture {
    scim: ScimServer,
    subguard: Subguard,
}

fn issuer(tenant: &str) -> String {
    format!("https://idp.{tenant}.test/")
}

fn shared() -> &'static Fixture {
    static SHARED: OnceLock<Fixture> = OnceLock::new();
    SHARED.get_or_init(|| {
        let scim = ScimServer::start();
        seed(&scim);
        let base = scim.base_template();
        let tenant = |name: &str, directory: &str| {
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
        };
        let own = |extra: &str| {
            format!(
                r#"
    directory:
      kind: scim
      url: "{base}"
      timeout_ms: 1000{extra}"#
            )
        };
        let config = format!(
            r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
directory:
  kind: scim
  url: "{base}"
  timeout_ms: 1000
  headers:
    authorization:
      from_file: token.txt
      prefix: "Bearer "
  cache:
    ttl_seconds: 60
    negative_ttl_seconds: 1
tenants:{acme}{roles}{ext}{byid}{flaky}
"#,
            acme = tenant("acme", ""),
            roles = tenant("roles", &own("\n      roles_from: roles")),
            ext = tenant("ext", &own("\n      match: externalId")),
            byid = tenant("byid", &own("\n      match: id")),
            flaky = tenant("flaky", &own("\n      breaker:\n        failure_threshold: 0")),
        );
        let dir = ConfigDir::new();
        dir.write("token.txt", &format!("{SCIM_SECRET}\n"));
        dir.write_config(&config);
        dir.write_users("");
        let subguard = Subguard::start_in(dir);
        Fixture { scim, subguard }
    })
}

/// The provider's users, shaped like RFC 7644 §3.4.2 and RFC 7643 §8.2.
fn seed(scim: &ScimServer) {
    scim.add_user(
        "acme",
        json!({
            "id": BJENSEN_ID,
            "externalId": "bjensen",
            "userName": "bjensen@example.com",
            "name": {"familyName": "Jensen", "givenName": "Barbara"},
            "active": true,
            "groups": [
                {"value": "e9e30dba-f08f-4109-8486-d5c6a331660a", "display": "Tour Guides",
                 "$ref": "https://example.com/v2/Groups/e9e30dba-f08f-4109-8486-d5c6a331660a"},
                {"value": "fc348aa8-3835-40eb-a20b-c726e15c55b5", "display": "Employees"}
            ],
            "roles": [{"value": "guide", "primary": true}],
            "meta": {"resourceType": "User", "location": format!("https://example.com/v2/Users/{BJENSEN_ID}")}
        }),
    );
    scim.add_user(
        "acme",
        json!({"id": "c75ad752-64ae-4823-840d-ffa80929976c", "userName": "mjones@example.com", "active": false,
               "groups": [{"value": "g-1", "display": "Employees"}]}),
    );
    scim.add_user("acme", json!({"id": "u-nogroups", "userName": "nogroups@example.com", "active": true}));
    scim.add_user("acme", json!({"id": "u-cred", "userName": "cred@example.com", "active": true}));
    scim.add_user(
        "roles",
        json!({"id": "u-roles-1", "userName": "auditor@example.com", "active": true,
               "groups": [{"value": "g-1", "display": "Employees"}],
               "roles": [{"value": "billing-admin", "primary": true}, {"value": "auditor"}]}),
    );
    scim.add_user(
        "ext",
        json!({"id": "u-ext-1", "externalId": "701984", "userName": "ext-user@example.com", "active": true}),
    );
    scim.add_user(
        "byid",
        json!({"id": BJENSEN_ID, "userName": "bjensen@example.com", "active": true,
               "groups": [{"value": "g-2", "display": "Tour Guides"}]}),
    );
    // Ambiguous directory data: two users share a userName.
    for id in ["dup-1", "dup-2"] {
        scim.add_user("flaky", json!({"id": id, "userName": "dup@example.com", "active": true}));
    }
}

fn scim() -> &'static ScimServer {
    &shared().scim
}

async fn ask(tenant: &str, sub: &str) -> Outcome {
    let token =
        TokenBuilder::new("rsa-1", Algorithm::RS256).iss(&issuer(tenant)).aud("orders").sub(sub).build();
    shared().subguard.client().await.call(&CheckCall::new().tenant(tenant).bearer(&token)).await
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

/// Percent-escapes are case-insensitive (RFC 3986 §2.1): compare them uppercased.
fn upper_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '%' {
            out.extend(chars.by_ref().take(2).map(|h| h.to_ascii_uppercase()));
        }
    }
    out
}

/// The requests (`path?query`, as received) whose decoded form contains `needle`.
fn requests_mentioning(needle: &str) -> Vec<String> {
    scim().raw_requests().into_iter().filter(|r| percent_decode(r).contains(needle)).collect()
}

// ---------------------------------------------------------------------------------------------
// What the provider's answers mean.

#[tokio::test]
async fn a_found_user_forwards_its_scim_id_and_group_names_as_roles() {
    let out = ask("acme", "bjensen@example.com").await;
    assert!(out.allowed, "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some(BJENSEN_ID), "the SCIM id, not the sub");
    assert_eq!(out.header("x-user-roles"), Some("Tour Guides,Employees"), "groups[].display by default");
    assert_eq!(out.header("x-tenant-id"), Some("acme"));
    assert_eq!(
        requests_mentioning("bjensen@example.com").iter().map(|r| upper_escapes(r)).collect::<Vec<_>>(),
        [upper_escapes("/acme/scim/v2/Users?filter=userName%20eq%20%22bjensen%40example.com%22")],
        "one request, filtering on userName"
    );
}

#[tokio::test]
async fn a_found_user_without_groups_has_no_roles_header() {
    let out = ask("acme", "nogroups@example.com").await;
    assert!(out.allowed, "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some("u-nogroups"));
    assert_eq!(out.header("x-user-roles"), None, "{out:#?}");
    assert!(out.removes("x-user-roles"), "a client's own roles header is removed: {out:#?}");
}

#[tokio::test]
async fn roles_from_roles_takes_role_values_instead_of_groups() {
    let out = ask("roles", "auditor@example.com").await;
    assert!(out.allowed, "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some("u-roles-1"));
    assert_eq!(out.header("x-user-roles"), Some("billing-admin,auditor"), "roles[].value, not groups");
}

#[tokio::test]
async fn zero_results_is_user_not_found() {
    let out = ask("acme", "nobody@example.com").await;
    assert_reason(&out, "user_not_found", 403);
    assert_eq!(out.body["tenant"], "acme");
    assert_eq!(requests_mentioning("nobody@example.com").len(), 1);
}

#[tokio::test]
async fn an_inactive_user_is_user_disabled() {
    assert_reason(&ask("acme", "mjones@example.com").await, "user_disabled", 403);
}

#[tokio::test]
async fn two_matching_users_is_directory_unavailable_never_a_pick() {
    let out = ask("flaky", "dup@example.com").await;
    assert_reason(&out, "directory_unavailable", 503);
    assert_eq!(out.body["tenant"], "flaky");
    assert!(out.header("x-user-id").is_none(), "{out:#?}");

    // Operators learn why from a warning that names the ambiguity.
    let sg = &shared().subguard;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let warned = sg.logs().iter().any(|line| {
            let Ok(v) = serde_json::from_str::<Value>(line) else { return false };
            let text = line.to_ascii_lowercase();
            v["level"] == "WARN"
                && line.contains("dup@example.com")
                && (text.contains("more than one") || text.contains("ambiguous"))
        });
        if warned {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no WARN line about the ambiguous match:\n{}",
            sg.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn match_external_id_filters_on_external_id() {
    let out = ask("ext", "701984").await;
    assert!(out.allowed, "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some("u-ext-1"));
    let seen: Vec<String> = requests_mentioning("701984").iter().map(|r| upper_escapes(r)).collect();
    assert_eq!(seen, [upper_escapes("/ext/scim/v2/Users?filter=externalId%20eq%20%22701984%22")]);
}

#[tokio::test]
async fn match_id_gets_the_resource_and_a_404_is_user_not_found() {
    let out = ask("byid", BJENSEN_ID).await;
    assert!(out.allowed, "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some(BJENSEN_ID));
    assert_eq!(out.header("x-user-roles"), Some("Tour Guides"));
    assert!(
        scim().raw_requests().contains(&format!("/byid/scim/v2/Users/{BJENSEN_ID}")),
        "GET {{base}}/Users/{{sub}}, no filter: {:#?}",
        scim().raw_requests()
    );

    let out = ask("byid", "no-such-id").await;
    assert_reason(&out, "user_not_found", 403);
    assert!(scim().raw_requests().contains(&"/byid/scim/v2/Users/no-such-id".to_string()));
}

#[tokio::test]
async fn match_id_percent_encodes_the_sub_as_one_path_segment() {
    let out = ask("byid", "../Groups/x?y").await;
    assert_reason(&out, "user_not_found", 403);
    let seen: Vec<String> = requests_mentioning("Groups/x").iter().map(|r| upper_escapes(r)).collect();
    assert_eq!(seen, [upper_escapes("/byid/scim/v2/Users/..%2FGroups%2Fx%3Fy")]);
}

// ---------------------------------------------------------------------------------------------
// The filter: a sub is one string literal, never filter syntax (RFC 7644 §3.4.2.2).

#[tokio::test]
async fn a_hostile_sub_cannot_widen_the_filter() {
    // Unescaped, these would become `userName eq "x" or userName pr or ""` (every user), a second
    // query parameter, or a broken literal. Escaped and encoded, each is one literal that matches
    // no one. (marker: a piece of the sub that finds its request among the others.)
    let cases = [
        (
            r#"x" or userName pr or ""#,
            "userName pr or",
            "filter=userName%20eq%20%22x%5C%22%20or%20userName%20pr%20or%20%5C%22%22",
        ),
        (
            r#"back\slash" or "1"#,
            "slash",
            "filter=userName%20eq%20%22back%5C%5Cslash%5C%22%20or%20%5C%221%22",
        ),
        ("y&filter=userName pr", "y&filter", "filter=userName%20eq%20%22y%26filter%3DuserName%20pr%22"),
    ];
    for (sub, marker, query) in cases {
        let out = ask("acme", sub).await;
        assert_reason(&out, "user_not_found", 403);
        let seen: Vec<String> = requests_mentioning(marker).iter().map(|r| upper_escapes(r)).collect();
        assert_eq!(
            seen,
            [upper_escapes(&format!("/acme/scim/v2/Users?{query}"))],
            "sub {sub:?}: the exact request the provider received"
        );
        // Decoded, the filter is `userName eq <one JSON string literal holding the sub>`.
        let raw = &requests_mentioning(marker)[0];
        let filter = percent_decode(raw.split_once("?filter=").unwrap().1);
        let literal = filter.strip_prefix("userName eq ").unwrap_or_else(|| panic!("{filter}"));
        assert_eq!(serde_json::from_str::<String>(literal).ok().as_deref(), Some(sub), "{filter}");
    }
}

// ---------------------------------------------------------------------------------------------
// Failures are outages, never "not found".

#[tokio::test]
async fn a_server_error_or_garbage_is_directory_unavailable() {
    let answers = [
        ("boom@example.com", Answer::status(500)),
        ("busy@example.com", Answer::status(503)),
        ("html@example.com", Answer::garbage()),
        // JSON, but not a ListResponse.
        ("notalist@example.com", Answer::user(json!({"hello": "world"}))),
        ("badtypes@example.com", Answer::user(json!({"totalResults": "one", "Resources": {}}))),
        // A list, which serde alone would read as a ListResponse by position: totalResults 0.
        ("positional@example.com", Answer::user(json!([0, []]))),
    ];
    for (sub, answer) in answers {
        scim().force_filter("flaky", &format!(r#"userName eq "{sub}""#), answer);
        let out = ask("flaky", sub).await;
        assert_reason(&out, "directory_unavailable", 503);
        assert_eq!(out.body["tenant"], "flaky");
        assert_eq!(requests_mentioning(sub).len(), 1, "{sub}: asked once");
    }
}

#[tokio::test]
async fn an_answer_about_another_user_is_never_taken_for_the_sub() {
    // A provider (or a proxy) that drops the filter and answers with one user: taking it would
    // make every token of the tenant that user.
    let list = |user: serde_json::Value| json!({"totalResults": 1, "Resources": [user]});
    scim().force_filter(
        "flaky",
        r#"userName eq "stranger@example.com""#,
        Answer::user(list(json!({"id": "someone-else", "userName": "admin@example.com", "active": true}))),
    );
    let out = ask("flaky", "stranger@example.com").await;
    assert_reason(&out, "directory_unavailable", 503);
    // The same user named with other case is the user: userName is case-insensitive (RFC 7643).
    scim().force_filter(
        "flaky",
        r#"userName eq "Casey@Example.com""#,
        Answer::user(list(json!({"id": "u-casey", "userName": "casey@example.com", "active": true}))),
    );
    let out = ask("flaky", "Casey@Example.com").await;
    assert!(out.allowed, "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some("u-casey"));
}

#[tokio::test]
async fn null_groups_and_roles_are_no_roles() {
    // RFC 7643 §2.5: null, unassigned and empty are the same.
    scim().force_filter(
        "flaky",
        r#"userName eq "nulls@example.com""#,
        Answer::user(json!({"totalResults": 1, "Resources": [
            {"id": "u-nulls", "userName": "nulls@example.com", "active": null, "groups": null, "roles": null}
        ]})),
    );
    let out = ask("flaky", "nulls@example.com").await;
    assert!(out.allowed, "{out:#?}");
    assert_eq!(out.header("x-user-id"), Some("u-nulls"));
    assert_eq!(out.header("x-user-roles"), None);
}

// ---------------------------------------------------------------------------------------------
// The directory's credential.

#[tokio::test]
async fn the_bearer_credential_from_a_file_reaches_the_provider_and_never_the_logs() {
    let out = ask("acme", "cred@example.com").await;
    assert!(out.allowed, "{out:#?}");
    // A lookup that fails is logged with details: the credential must not be one of them.
    ask("acme", "ghost@example.com").await;

    let received = scim().received();
    let acme: Vec<_> = received.iter().filter(|r| r.path.starts_with("/acme/")).collect();
    assert!(!acme.is_empty());
    for r in &acme {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {SCIM_SECRET}").as_str()),
            "prefix + the file's content (trailing newline dropped): {r:?}"
        );
    }
    // Another directory (a tenant's own) never gets the default directory's credential.
    assert!(ask("ext", "701984").await.allowed);
    for r in scim().received().iter().filter(|r| r.path.starts_with("/ext/")) {
        assert_eq!(r.header("authorization"), None, "{r:?}");
    }

    // Wait until the denial of ghost@ is logged, so the lines of every lookup above are in.
    let sg = &shared().subguard;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sg.logs().iter().any(|l| l.contains("ghost@example.com") && l.contains("user_not_found")) {
        assert!(Instant::now() < deadline, "the denial was never logged:\n{}", sg.logs().join("\n"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for line in sg.logs().iter().chain(sg.stderr().iter()) {
        assert!(!line.contains(SCIM_SECRET), "a log line holds the directory credential: {line}");
    }
}
