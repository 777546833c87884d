//! The command line of SPEC §1: `--version`, `validate`, and `serve`'s signals and shutdown.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::check::CheckCall;
use common::directory_server::{Answer, DirectoryServer};
use common::{Algorithm, ConfigDir, Subguard, TokenBuilder};
use serde_json::json;

const GOOD: &str = r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
directory:
  kind: file
  path: users.yaml
tenants:
  acme:
    issuers:
      - issuer: "https://idp.acme.test/"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-a.jwks.json
"#;

const USERS: &str = "acme:\n  - sub: u-1\n";

fn subguard(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_subguard"));
    cmd.args(args).env_remove("SUBGUARD_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running subguard")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn version() {
    let out = subguard(&["--version"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(env!("CARGO_PKG_VERSION")), "{}", text(&out));
}

#[test]
fn validate_a_good_config_prints_ok() {
    let dir = ConfigDir::with(GOOD, USERS);
    let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn validate_takes_the_path_from_subguard_config() {
    let dir = ConfigDir::with(GOOD, USERS);
    let out = subguard(&["validate"], &[("SUBGUARD_CONFIG", dir.config_path().to_str().unwrap())]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn validate_names_the_yaml_path_of_each_error() {
    let bad = GOOD.replace("keys/issuer-a.jwks.json", "keys/missing.json");
    let dir = ConfigDir::with(&bad, USERS);
    let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with("tenants.acme.issuers[0].jwks_file: ")),
        "expected a line `tenants.acme.issuers[0].jwks_file: ...`, got:\n{}",
        text(&out)
    );
    assert!(!stdout.lines().any(|l| l.trim() == "ok"));
}

#[test]
fn validate_reports_every_error_one_per_line() {
    let bad = GOOD
        .replace("keys/issuer-a.jwks.json", "keys/missing.json")
        .replace(r#"algorithms: ["RS256"]"#, r#"algorithms: ["RS256", "XX999"]"#)
        .replace("path: users.yaml", "path: no-such-users.yaml");
    let dir = ConfigDir::with(&bad, USERS);
    let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for path in ["tenants.acme.issuers[0].jwks_file", "tenants.acme.issuers[0].algorithms", "directory.path"]
    {
        assert!(stdout.lines().any(|l| l.starts_with(path)), "no error line for {path}:\n{}", text(&out));
    }
}

/// A file the config names is shown as resolved against the config's folder, for every kind of
/// file alike: `no such file: missing.json` would send the reader to their own current folder.
#[test]
fn file_errors_name_the_file_where_subguard_looked_for_it() {
    let dir = ConfigDir::new();
    std::fs::create_dir_all(dir.path().join("conf")).unwrap();
    let config = GOOD.replace("jwks_file: keys/issuer-a.jwks.json", "jwks_file: missing.json")
        + "  globex:\n    issuers:\n      - issuer: \"https://idp.globex.test/\"\n        audiences: [\"orders\"]\n        \
           jwks_file: keys/issuer-b.jwks.json\n    directory:\n      kind: http\n      url: \"https://u.test/{sub}\"\n      \
           ca_file: nope.pem\n";
    std::fs::write(dir.path().join("conf/config.yaml"), config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_subguard"))
        .args(["validate", "--config", "conf/config.yaml"])
        .current_dir(dir.path())
        .env_remove("SUBGUARD_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "tenants.acme.issuers[0].jwks_file: no such file: conf/missing.json",
        "tenants.globex.issuers[0].jwks_file: no such file: conf/keys/issuer-b.jwks.json",
        "tenants.globex.directory.ca_file: no such file: conf/nope.pem",
        "directory.path: no such file: conf/users.yaml",
    ] {
        assert!(stdout.lines().any(|l| l == expected), "no line {expected:?}:\n{}", text(&out));
    }
}

/// A users file with nothing in it (blank, a comment, a document marker, null) is an error that
/// says how to write "no users"; two documents are an error addressed to a person, not advice to
/// call another parser function.
#[test]
fn an_empty_or_two_document_users_file_is_explained() {
    for (users, expected) in [
        ("", "directory.path: the file is empty (nothing but whitespace, comments, `---` or null): "),
        ("# exported by sync-users\n", "directory.path: the file is empty"),
        ("---\n---\n", "directory.path: invalid YAML: line 2 column 4: multiple YAML documents detected"),
    ] {
        let dir = ConfigDir::with(GOOD, users);
        let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(1), "{users:?}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.lines().any(|l| l.starts_with(expected)), "{users:?}: {stdout}");
        assert!(!stdout.contains("from_str_multiple"), "{stdout}");
    }
    let out =
        subguard(&["validate", "--config", ConfigDir::with(GOOD, "{}").config_path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "`{{}}` is a file with no users: {}", text(&out));
}

#[test]
fn unknown_keys_are_errors() {
    // A typo must not silently weaken security.
    for (typo, path) in [
        (
            GOOD.replace("  header: x-tenant-id", "  header: x-tenant-id\n  hots: \"{tenant}.x.test\""),
            "tenant",
        ),
        (
            GOOD.replace("        audiences:", "        audience: [\"x\"]\n        audiences:"),
            "tenants.acme.issuers[0]",
        ),
        (format!("{GOOD}\nforward:\n  strip_authorisation: true\n"), "forward"),
    ] {
        let dir = ConfigDir::with(&typo, USERS);
        let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(path), "the error names {path}:\n{}", text(&out));
    }
}

#[test]
fn key_urls_must_be_https_except_on_loopback() {
    let with_uri =
        |uri: &str| GOOD.replace("jwks_file: keys/issuer-a.jwks.json", &format!("jwks_uri: \"{uri}\""));
    for uri in ["http://idp.example.com/jwks", "http://10.0.0.7/jwks", "ftp://idp.example.com/jwks"] {
        let dir = ConfigDir::with(&with_uri(uri), USERS);
        let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(1), "{uri} must be refused: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with("tenants.acme.issuers[0].jwks_uri")),
            "{}",
            text(&out)
        );
    }
    for uri in [
        "https://idp.example.com/jwks",
        "http://127.0.0.1:1/jwks",
        "http://127.3.4.5/jwks",
        "http://localhost:1/jwks",
        "http://[::1]:1/jwks",
    ] {
        let dir = ConfigDir::with(&with_uri(uri), USERS);
        let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(0), "{uri} is allowed: {}", text(&out));
    }
}

#[test]
fn directory_urls_that_would_send_every_lookup_to_one_url_are_refused() {
    // A fragment is never sent, and a SCIM lookup appends `/Users...` to its base: after a `#` or a
    // query, every sub would be the same request, and every user would resolve to one answer.
    for (directory, path) in [
        (r#"{kind: http, url: "http://127.0.0.1:1/users#{sub}"}"#, "directory.url"),
        (r#"{kind: http, url: "http://127.0.0.1:1/users/{sub}#frag"}"#, "directory.url"),
        (r#"{kind: scim, url: "http://127.0.0.1:1/scim/v2#"}"#, "directory.url"),
        (r#"{kind: scim, url: "http://127.0.0.1:1/scim/v2?tenant=acme"}"#, "directory.url"),
        // A placeholder that does not exist would be sent as it is, the same for every tenant.
        (
            r#"{kind: scim, url: "http://127.0.0.1:1/{tennant}/scim/v2"}"#,
            "directory.url: `http://127.0.0.1:1/{tennant}/scim/v2`: unknown placeholder",
        ),
        (
            r#"{kind: http, url: "http://127.0.0.1:1/{tennant}/{sub}"}"#,
            "directory.url: `http://127.0.0.1:1/{tennant}/{sub}`: unknown placeholder",
        ),
    ] {
        let config =
            GOOD.replace("directory:\n  kind: file\n  path: users.yaml", &format!("directory: {directory}"));
        let dir = ConfigDir::with(&config, USERS);
        let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(1), "{directory} must be refused: {}", text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with(path)), "{}", text(&out));
    }
}

#[test]
fn users_that_can_never_match_or_never_be_forwarded_are_warned_about() {
    let config = GOOD.replace("  path: users.yaml", "  path: users.yaml\n  normalize: [lowercase]");
    assert_ne!(config, GOOD);
    let users = "acme:\n  - sub: u-1\n  - sub: Alice\n  - sub: \"bob \"\n";
    let dir = ConfigDir::with(&config, users);
    let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("acme: 1 user(s) can never match (\"Alice\"): the directory's normalize lowercases"),
        "{}",
        text(&out)
    );
    assert!(
        stderr.contains("acme: 1 user(s) without an `id` have a sub that starts or ends with a space"),
        "{}",
        text(&out)
    );
    let dir = ConfigDir::with(GOOD, "acme:\n  - sub: u-1\n  - sub: Alice\n");
    let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
    assert!(!text(&out).contains("never match"), "without normalize, Alice is Alice: {}", text(&out));
}

#[test]
fn a_tenant_without_users_in_its_file_is_warned_about() {
    // Absent, an empty list and a null list all leave every check of the tenant user_not_found.
    for users in ["globex:\n  - sub: u-1\n", "acme: []\n", "acme:\n", "acme: []\nglobex: []\n"] {
        let dir = ConfigDir::with(GOOD, users);
        let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(0), "a warning, not an error: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.lines().any(|l| l.starts_with("warning: tenants.acme: ") && l.contains("lists no users")),
            "users file {users:?}: {}",
            text(&out)
        );
    }
    let out = subguard(
        &["validate", "--config", ConfigDir::with(GOOD, USERS).config_path().to_str().unwrap()],
        &[],
    );
    assert!(!text(&out).contains("lists no users"), "{}", text(&out));
}

/// A remote top-level directory without `{tenant}` in its URL answers every tenant that shares
/// it from the same users; `validate` says so once two tenants share it, and not otherwise.
#[test]
fn a_shared_remote_directory_without_the_tenant_in_its_url_is_warned_about() {
    let acme = GOOD.split("tenants:\n").nth(1).unwrap();
    let two_tenants = format!("{GOOD}{}", acme.replace("  acme:", "  globex:"));
    let warned = |config: &str| {
        let dir = ConfigDir::with(config, USERS);
        let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(0), "a warning, not an error: {}", text(&out));
        String::from_utf8_lossy(&out.stderr).lines().any(|l| {
            l.starts_with("warning: directory.url: has no {tenant} placeholder but serves 2 tenants")
        })
    };
    let http = |url: &str| format!("kind: http\n  url: \"{url}\"");
    let scim = |url: &str| format!("kind: scim\n  url: \"{url}\"");
    let shared = |config: &str, kind: String| config.replace("kind: file\n  path: users.yaml", &kind);
    assert!(warned(&shared(&two_tenants, http("http://127.0.0.1:1/users/{sub}"))));
    assert!(warned(&shared(&two_tenants, scim("http://127.0.0.1:1/scim/v2"))));
    assert!(!warned(&shared(&two_tenants, http("http://127.0.0.1:1/t/{tenant}/users/{sub}"))));
    assert!(!warned(&shared(&two_tenants, scim("http://127.0.0.1:1/{tenant}/scim/v2"))));
    assert!(!warned(&shared(GOOD, http("http://127.0.0.1:1/users/{sub}"))), "one tenant, nothing to mix");
    assert!(!warned(&two_tenants), "a users file has a section per tenant");
}

/// A tenant may be called `default`; with a directory of its own it shares that name with the
/// top-level directory in logs and metrics, and `validate` says so.
#[test]
fn a_tenant_named_default_with_its_own_directory_is_warned_about() {
    let acme = GOOD.split("tenants:\n").nth(1).unwrap();
    let own = format!(
        "{}    directory:\n      kind: file\n      path: own.yaml\n",
        acme.replace("  acme:", "  default:")
    );
    let dir = ConfigDir::with(&format!("{GOOD}{own}"), USERS);
    dir.write("own.yaml", "default:\n  - sub: root\n");
    let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "a warning, not an error: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).lines().any(|l| l.starts_with(
            "warning: tenants.default.directory: logs and metrics name this directory `default`"
        )),
        "{}",
        text(&out)
    );
}

#[test]
fn a_broken_default_directory_is_reported_once_not_again_for_each_tenant() {
    let two_tenants = format!(
        "{GOOD}  globex:\n    issuers:\n      - issuer: \"https://idp.globex.test/\"\n        audiences: [\"orders\"]\n        \
         jwks_file: keys/issuer-a.jwks.json\n"
    );
    for (from, to) in [
        ("  path: users.yaml", "  pth: users.yaml"),
        ("  kind: file", "  kind: [file]"),
        ("  path: users.yaml", "  path: users.yaml\n  cache: {ttl_seconds: \"60\"}"),
    ] {
        let broken = two_tenants.replacen(from, to, 1);
        assert_ne!(broken, two_tenants);
        let dir = ConfigDir::with(&broken, "acme:\n  - sub: u-1\nglobex:\n  - sub: u-2\n");
        let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.lines().any(|l| l.starts_with("directory")),
            "the error names directory:\n{}",
            text(&out)
        );
        assert!(!stdout.contains("no directory"), "the directory is set, only broken:\n{}", text(&out));
        assert_eq!(stdout.lines().count(), 1, "one error:\n{}", text(&out));
    }
    // A tenant with no directory at all, and no default, still gets its error.
    let none = GOOD.replace("directory:\n  kind: file\n  path: users.yaml\n", "");
    assert_ne!(none, GOOD);
    let out = subguard(
        &["validate", "--config", ConfigDir::with(&none, USERS).config_path().to_str().unwrap()],
        &[],
    );
    assert!(text(&out).contains("tenants.acme.directory: no directory"), "{}", text(&out));
}

#[test]
fn the_admin_listener_is_off_however_yaml_spells_off() {
    let dir = ConfigDir::with(GOOD, USERS);
    let admin = |value: &str| {
        let text = GOOD.replace("  admin: \"127.0.0.1:0\"", &format!("  admin: {value}"));
        assert_ne!(text, GOOD);
        subguard::config::from_yaml(&text, &dir.config_path(), dir.path())
            .map(|c| c.listen.admin)
            .map_err(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>())
    };
    // Unquoted, YAML reads `off` (and `no`, `false`) as the boolean false.
    for off in ["off", "\"off\"", "false", "no", "\"\""] {
        assert_eq!(admin(off), Ok(None), "admin: {off}");
    }
    assert_eq!(admin("\"127.0.0.1:9300\"").unwrap().map(|a| a.port()), Some(9300));
    assert_eq!(admin("").unwrap().map(|a| a.port()), Some(9192), "absent: the default");
    assert_eq!(
        admin("true"),
        Err(vec![
            r#"listen.admin: invalid value: boolean `true`, expected an ip:port address, or "off""#
                .to_string()
        ])
    );
    assert_eq!(
        admin("5"),
        Err(vec![
            r#"listen.admin: invalid type: integer `5`, expected an ip:port address, or "off""#.to_string()
        ])
    );
}

#[test]
fn a_leeway_of_hours_is_refused_and_one_of_minutes_warned_about() {
    let with_leeway = |s: u64| format!("{GOOD}token:\n  leeway_seconds: {s}\n");
    let dir = ConfigDir::with(&with_leeway(86_400), USERS);
    let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("token.leeway_seconds")));

    let dir = ConfigDir::with(&with_leeway(900), USERS);
    let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).lines().any(|l| l.starts_with("warning: token.leeway_seconds")),
        "{}",
        text(&out)
    );

    let dir = ConfigDir::with(&with_leeway(60), USERS);
    let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("leeway"), "{}", text(&out));
}

#[test]
fn validate_warns_when_no_key_fits_the_issuers_algorithms() {
    // A JWKS of RSA keys only: an ES256-only issuer could never verify a token.
    let es_only = GOOD
        .replace(r#"algorithms: ["RS256"]"#, r#"algorithms: ["ES256"]"#)
        .replace("keys/issuer-a.jwks.json", "keys/rsa-only.json");
    let dir = ConfigDir::with(&es_only, USERS);
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("keys/issuer-a.jwks.json")).unwrap())
            .unwrap();
    let rsa: Vec<_> = all["keys"].as_array().unwrap().iter().filter(|k| k["kty"] == "RSA").cloned().collect();
    dir.write("keys/rsa-only.json", &json!({ "keys": rsa }).to_string());
    let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "a warning, not an error: {}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|l| l
            .starts_with("warning: tenants.acme.issuers[0].jwks_file: no key in the file can verify")
            && l.contains("ES256")),
        "{}",
        text(&out)
    );
    let dir = ConfigDir::with(GOOD, USERS);
    let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
    assert!(!text(&out).contains("no key in the file"), "{}", text(&out));
}

#[test]
fn validate_catches_what_serve_would_trip_on() {
    let listen = |grpc: &str, admin: &str| {
        GOOD.replace(
            "  grpc: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"",
            &format!("  grpc: \"{grpc}\"\n  admin: \"{admin}\""),
        )
    };
    for (config, path) in [
        // serve could not bind the second listener.
        (listen("127.0.0.1:9391", "127.0.0.1:9391"), "listen.admin"),
        (listen("0.0.0.0:9391", "127.0.0.1:9391"), "listen.admin"),
        // An identity in a header that frames or routes the request.
        (format!("{GOOD}forward:\n  roles_header: content-length\n"), "forward.roles_header"),
        (format!("{GOOD}forward:\n  user_header: x-envoy-original-path\n"), "forward.user_header"),
        (format!("{GOOD}forward:\n  tenant_header: x-subguard-reason\n"), "forward.tenant_header"),
        (GOOD.replace("path: users.yaml", "path: \"\""), "directory.path"),
    ] {
        let dir = ConfigDir::with(&config, USERS);
        let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(1), "{config}\n{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with(path)),
            "{path}: {}",
            text(&out)
        );
    }
    // Different ports, or port 0 (any free one), are fine.
    for config in [listen("127.0.0.1:9391", "127.0.0.1:9392"), listen("127.0.0.1:0", "127.0.0.1:0")] {
        let dir = ConfigDir::with(&config, USERS);
        let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(0), "{config}\n{}", text(&out));
    }
}

/// Runs subguard, failing the test if it has not exited within `limit` (a read that blocks).
fn subguard_within(args: &[&str], limit: Duration) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_subguard"))
        .args(args)
        .env_remove("SUBGUARD_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running subguard");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("subguard's output"),
        Err(_) => {
            common::send_signal(pid, "KILL");
            panic!("subguard {args:?} still running after {limit:?}");
        }
    }
}

#[test]
fn files_a_config_names_must_be_regular_files_within_a_limit() {
    let dir = ConfigDir::with(GOOD, USERS);
    let config = dir.config_path();
    let fifo = dir.path().join("pipe.yaml");
    common::mkfifo(&fifo);
    for (yaml, expected) in [
        // A device would be read until memory ran out, a pipe would block validate (and a reload)
        // for good: both are refused by what they are, before they are opened.
        (
            GOOD.replace("path: users.yaml", "path: /dev/zero"),
            "directory.path: not a regular file but a character device: /dev/zero",
        ),
        (
            GOOD.replace("path: users.yaml", "path: pipe.yaml"),
            &*format!("directory.path: not a regular file but a named pipe: {}", fifo.display()),
        ),
        (GOOD.replace("path: users.yaml", "path: ."), "directory.path: not a regular file but a directory: "),
        // An empty path would name the config's folder.
        (
            GOOD.replace("jwks_file: keys/issuer-a.jwks.json", "jwks_file: \" \""),
            "tenants.acme.issuers[0].jwks_file: must name a file, not be empty",
        ),
        (
            GOOD.replace(
                "kind: file\n  path: users.yaml",
                "kind: http\n  url: https://dir.test/{sub}\n  ca_file: \"\"",
            ),
            "directory.ca_file: must name a file, not be empty",
        ),
        (
            GOOD.replace("jwks_file: keys/issuer-a.jwks.json", "jwks_file: /dev/urandom"),
            "tenants.acme.issuers[0].jwks_file: not a regular file but a character device: /dev/urandom",
        ),
        (
            GOOD.replace("path: users.yaml", "path: users.yaml\n  max_file_bytes: 10"),
            &*format!(
                "directory.path: larger than the limit of 10 bytes (raise `max_file_bytes`): {}",
                dir.users_path().display()
            ),
        ),
        (
            GOOD.replace("path: users.yaml", "path: users.yaml\n  max_file_bytes: 0"),
            "directory.max_file_bytes: must be greater than 0",
        ),
        (
            GOOD.replace("directory:\n", "keys:\n  check_wait_ms: 0\ndirectory:\n"),
            "keys.check_wait_ms: must be greater than 0",
        ),
        (
            GOOD.replace(r#"grpc: "127.0.0.1:0""#, &format!(r#"grpc: "unix:///{}/a.sock""#, "d".repeat(110))),
            "listen.grpc: the socket path is 118 bytes; a Unix socket path can have at most 107",
        ),
        (
            GOOD.replace(
                "kind: file\n  path: users.yaml",
                "kind: http\n  url: http://127.0.0.1:1/{sub}\n  max_file_bytes: 10",
            ),
            "directory.max_file_bytes: not used by `kind: http`",
        ),
    ] {
        dir.write_config(&yaml);
        let out =
            subguard_within(&["validate", "--config", config.to_str().unwrap()], Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(1), "{yaml}\n{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with(expected)),
            "expected a line starting {expected:?}:\n{}",
            text(&out)
        );
    }
    // A users file exactly at its limit is read.
    let users_len = std::fs::metadata(dir.users_path()).unwrap().len();
    dir.write_config(
        &GOOD.replace("path: users.yaml", &format!("path: users.yaml\n  max_file_bytes: {users_len}")),
    );
    let out = subguard_within(&["validate", "--config", config.to_str().unwrap()], Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // The config itself may be a pipe (`--config <(...)`) or anything else that can be read, but
    // only up to its own limit: /dev/zero is refused once 64 MiB are read.
    let out = subguard_within(&["validate", "--config", "/dev/zero"], Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("cannot read config file /dev/zero: larger than the limit of 64 MiB"),
        "{}",
        text(&out)
    );
}

#[test]
fn validate_prints_one_line_per_error_whatever_the_yaml_holds() {
    // A YAML error is its position and what is wrong, without the parser's source excerpt.
    let dir = ConfigDir::with(&format!("{GOOD}tenant:\n  header: x-other\n"), USERS);
    let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with("invalid YAML: line ") && stdout.contains("duplicate mapping key"),
        "{stdout}"
    );
    assert!(!stdout.contains("DuplicateKeyPolicy"), "{stdout}");

    // A key with a newline in it is shown escaped: it cannot start a line of its own.
    let dir = ConfigDir::with(&format!("{GOOD}\"bogus\\nok\": 1\n"), USERS);
    let out = subguard(&["validate", "--config", dir.config_path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().all(|l| l.trim() != "ok" && !l.starts_with("ok")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with(r"bogus\nok: unknown key")), "{stdout}");

    // What was expected is named in YAML's words, not by the Rust type behind it.
    for (config, line) in [
        (format!("{GOOD}  globex:\n"), "tenants.globex: invalid type: null, expected a mapping"),
        (
            GOOD.replace("      - issuer:", "      - 7\n      - issuer:"),
            "tenants.acme.issuers[0]: invalid type: integer `7`, expected a mapping",
        ),
        (format!("{GOOD}token: 5\n"), "token: invalid type: integer `5`, expected a mapping"),
        // serde alone would read these by position: strip_authorization true, an issuer.
        (
            format!("{GOOD}forward: [x-t, x-u, x-r, true]\n"),
            "forward: invalid type: sequence, expected a mapping",
        ),
        (
            GOOD.replace("      - issuer:", "      - [\"https://idp.b.test/\", [orders]]\n      - issuer:"),
            "tenants.acme.issuers[0]: invalid type: sequence, expected a mapping",
        ),
    ] {
        let out = subguard(
            &["validate", "--config", ConfigDir::with(&config, USERS).config_path().to_str().unwrap()],
            &[],
        );
        assert_eq!(out.status.code(), Some(1));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.lines().any(|l| l == line), "expected {line:?}:\n{}", text(&out));
        assert!(!stdout.contains("struct"), "{stdout}");
    }
}

#[test]
fn serve_refuses_an_invalid_config() {
    let dir = ConfigDir::with(&GOOD.replace("keys/issuer-a.jwks.json", "keys/missing.json"), USERS);
    let started = Instant::now();
    let out = subguard(&["serve", "--config", dir.config_path().to_str().unwrap()], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(10));
    // On stderr for a person, and as a JSON log line for the log pipeline.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tenants.acme.issuers[0].jwks_file"),
        "{}",
        text(&out)
    );
    let logged = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|v| {
            v["level"] == "ERROR"
                && v["fields"]["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("tenants.acme.issuers[0].jwks_file"))
        });
    assert!(logged, "{}", text(&out));
}

/// A signal that arrives while a large users file is still being read: SIGHUP no longer kills
/// the process (a config reloader that signals right after a change), and SIGTERM still means
/// "stop, exit 0" (SPEC §1), not death by the signal's default action.
#[test]
fn signals_during_start_up_are_handled() {
    let users: String = std::iter::once("acme:\n".to_string())
        .chain((0..300_000).map(|i| format!("  - sub: u-{i}\n")))
        .collect();
    let dir = ConfigDir::with(GOOD, &users);
    let start = || {
        Command::new(env!("CARGO_BIN_EXE_subguard"))
            .args(["serve", "--config", dir.config_path().to_str().unwrap()])
            .env_remove("SUBGUARD_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let exits_within = |child: &mut std::process::Child, limit: Duration| {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    };
    // Early: the users file takes far longer than this to read.
    let early = Duration::from_millis(30);

    let mut child = start();
    std::thread::sleep(early);
    common::send_signal(child.id(), "HUP");
    let died = exits_within(&mut child, Duration::from_secs(3));
    assert!(died.is_none(), "SIGHUP during start-up ended the process: {died:?}");
    common::send_signal(child.id(), "TERM");
    let status = exits_within(&mut child, Duration::from_secs(20)).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}");

    let mut child = start();
    std::thread::sleep(early);
    common::send_signal(child.id(), "TERM");
    let status = exits_within(&mut child, Duration::from_secs(20)).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "SIGTERM during start-up: {status:?}");
}

#[test]
fn sigterm_and_sigint_exit_zero() {
    for signal in ["TERM", "INT"] {
        let mut sg = Subguard::start(GOOD, USERS);
        sg.signal(signal);
        let code = sg.wait_exit(Duration::from_secs(10));
        assert_eq!(code, Some(0), "SIG{signal}: exit code; stdout:\n{}", sg.logs().join("\n"));
    }
}

#[tokio::test]
async fn sigterm_lets_in_flight_checks_finish() {
    // A directory that takes 700 ms to answer keeps a check in flight across the signal.
    let directory = DirectoryServer::start();
    directory.set("u-slow", Answer::user(json!({"id": "slow-user"})).delayed(Duration::from_millis(700)));
    let config = GOOD.replace(
        "directory:\n  kind: file\n  path: users.yaml",
        &format!(
            "shutdown_grace_seconds: 5\ndirectory:\n  kind: http\n  url: \"{}\"\n  timeout_ms: 3000",
            directory.url_template()
        ),
    );
    let mut sg = Subguard::start(&config, USERS);
    let mut client = sg.client().await;
    let token = TokenBuilder::new("rsa-1", Algorithm::RS256)
        .iss("https://idp.acme.test/")
        .aud("orders")
        .sub("u-slow")
        .build();
    let call = CheckCall::new().tenant("acme").bearer(&token);
    let in_flight = tokio::spawn(async move { client.call(&call).await });
    // Let the check reach the directory, then ask subguard to stop.
    let deadline = Instant::now() + Duration::from_secs(5);
    while directory.requests("acme", "u-slow") == 0 {
        assert!(Instant::now() < deadline, "the check never reached the directory");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sg.signal("TERM");
    // A second signal during the drain changes nothing, and says so.
    tokio::time::sleep(Duration::from_millis(100)).await;
    sg.signal("INT");
    let out = in_flight.await.unwrap();
    assert!(out.allowed, "the in-flight check finished normally: {out:#?}");
    assert_eq!(sg.logged("signal received again; still draining").len(), 1, "{}", sg.logs().join("\n"));
    assert_eq!(out.header("x-user-id"), Some("slow-user"));
    assert_eq!(sg.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn a_health_watch_does_not_hold_shutdown() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    // A mesh health checker keeps a Watch open for the life of the pod. At SIGTERM it is told
    // NOT_SERVING, and the call ends: the drain waits for checks, not for watchers.
    let sg = Subguard::start(&format!("shutdown_grace_seconds: 30\n{GOOD}"), USERS);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", sg.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest { service: "envoy.service.auth.v3.Authorization".into() })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let signalled = Instant::now();
    sg.signal("TERM");
    let next = watch.message().await.unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    let end = tokio::time::timeout(Duration::from_secs(10), watch.message()).await;
    assert!(matches!(end, Ok(Ok(None))), "the Watch ends after NOT_SERVING: {end:?}");
    // Waited for off the runtime: the client's connection (still open, as a checker's would be)
    // must keep answering the server's GOAWAY handshake meanwhile.
    let (code, sg) = tokio::task::spawn_blocking(move || {
        let mut sg = sg;
        (sg.wait_exit(Duration::from_secs(20)), sg)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{}", sg.logs().join("\n"));
    assert!(signalled.elapsed() < Duration::from_secs(20), "exited well inside the 30 s grace");
    let logs = sg.logs().join("\n");
    assert!(!logs.contains("grace period over"), "no check was in flight:\n{logs}");
}

#[test]
fn idle_or_half_open_connections_do_not_hold_shutdown() {
    // Clients that never finish their HTTP/2 preface, or ignore the GOAWAY, keep their
    // connections open; with no check in flight, subguard exits without waiting for them.
    let mut sg = Subguard::start(&format!("shutdown_grace_seconds: 30\n{GOOD}"), USERS);
    let idle = std::net::TcpStream::connect(sg.grpc_addr()).unwrap();
    let mut half = std::net::TcpStream::connect(sg.grpc_addr()).unwrap();
    std::io::Write::write_all(&mut half, b"PRI * HTTP/2.0\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let signalled = Instant::now();
    sg.signal("TERM");
    let code = sg.wait_exit(Duration::from_secs(40));
    assert_eq!(code, Some(0), "{}", sg.logs().join("\n"));
    assert!(
        signalled.elapsed() < Duration::from_secs(20),
        "held for {:?} of the 30 s grace",
        signalled.elapsed()
    );
    let logs = sg.logs().join("\n");
    assert!(!logs.contains("grace period over"), "no check was in flight:\n{logs}");
    assert!(logs.contains("no check in flight; closing connections still open"), "{logs}");
    drop((idle, half));
}

#[test]
fn the_admin_listener_caps_connections_and_closes_silent_ones() {
    use std::io::Read;
    use std::net::TcpStream;
    // Closed by the server: end of stream or a reset, not our read timeout.
    let closed_within = |c: &mut TcpStream, wait: Duration| {
        c.set_read_timeout(Some(wait)).unwrap();
        match c.read(&mut [0u8; 16]) {
            Ok(0) => true,
            Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            Ok(_) => false,
        }
    };
    let sg = Subguard::start(GOOD, USERS);
    let addr = sg.admin_addr();
    // 64 connections that never send a request hold every place; one more connection, a probe,
    // still gets its answer: it takes the place of the silent connection that waited longest.
    let mut silent: Vec<TcpStream> = (0..64)
        .map(|_| {
            let c = TcpStream::connect(addr).unwrap();
            std::thread::sleep(Duration::from_millis(5));
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    for probe in 0..3 {
        if probe > 0 {
            // The last probe's connection has closed: fill its place again.
            silent.push(TcpStream::connect(addr).unwrap());
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(sg.admin_get("/healthz").0, 200, "probe {probe} with every place held");
        assert!(
            closed_within(&mut silent[probe], Duration::from_secs(2)),
            "the oldest silent connection {probe} stays open"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited for the header timeout: {:?}",
        started.elapsed()
    );
    // The others are closed once they have sent no request headers for 10 s.
    for c in &mut silent[3..] {
        assert!(closed_within(c, Duration::from_secs(30)), "a silent connection stays open");
    }
    assert!(started.elapsed() >= Duration::from_secs(5), "closed before the header timeout");
    assert_eq!(sg.admin_get("/healthz").0, 200);
    let logs = sg.logs().join("\n");
    assert!(
        logs.contains("admin listener: connection limit reached; closing the connection idle the longest"),
        "{logs}"
    );
}

#[tokio::test]
async fn a_grpc_connection_without_a_preface_is_closed_and_a_greeted_one_is_kept() {
    use std::io::Read;
    let sg = Subguard::start(GOOD, USERS);
    let mut silent = std::net::TcpStream::connect(sg.grpc_addr()).unwrap();
    let mut half = std::net::TcpStream::connect(sg.grpc_addr()).unwrap();
    std::io::Write::write_all(&mut half, b"PRI * HTTP/2.0\r\n").unwrap();
    // A real client, idle after its first call, is not a silent connection.
    let mut client = sg.client().await;
    let ok = client.call(&CheckCall::new().tenant("acme").bearer("x")).await;
    assert!(!ok.allowed);
    let started = Instant::now();
    let (silent_closed, half_closed) = tokio::task::spawn_blocking(move || {
        // The server speaks first (its SETTINGS); closed is the end of the stream, or a reset.
        let closed = |c: &mut std::net::TcpStream| {
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            loop {
                match c.read(&mut [0u8; 64]) {
                    Ok(0) => return true,
                    Ok(_) => {}
                    Err(e) => {
                        return !matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        );
                    }
                }
            }
        };
        (closed(&mut silent), closed(&mut half))
    })
    .await
    .unwrap();
    assert!(silent_closed && half_closed, "connections without a preface are closed");
    assert!(started.elapsed() >= Duration::from_secs(5), "closed before the preface timeout");
    let again = client.call(&CheckCall::new().tenant("acme").bearer("x")).await;
    assert_eq!(
        again.header("x-subguard-reason"),
        Some("malformed_token"),
        "the idle client's connection still works"
    );
}

#[test]
fn a_port_in_use_fails_the_start_with_that_error_alone() {
    let first = Subguard::start(GOOD, USERS);
    let taken = first.grpc_addr().to_string();
    let dir = ConfigDir::with(&GOOD.replacen("127.0.0.1:0", &taken, 1), USERS);
    let out = subguard(&["serve", "--config", dir.config_path().to_str().unwrap()], &[]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains(&format!("listen.grpc {taken}")), "{all}");
    assert!(!all.contains("reload"), "nothing about reloads: {all}");
}

#[test]
fn logs_are_json_lines_by_default_and_text_on_request() {
    let sg = Subguard::start(GOOD, USERS);
    let logs = sg.logs();
    assert!(!logs.is_empty());
    for line in &logs {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
    }
    drop(sg);

    // `--log-format text` is for people: the same events, not JSON.
    let dir = ConfigDir::with(GOOD, USERS);
    let mut child = common::subguard::watched(std::path::Path::new(env!("CARGO_BIN_EXE_subguard")))
        .args(["--log-format", "text", "serve", "--config"])
        .arg(dir.config_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let watchdog = child.stdin.take();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(10)).expect("a log line in text format");
    drop(watchdog);
    let _ = child.wait();
    assert!(serde_json::from_str::<serde_json::Value>(&first).is_err(), "text format printed JSON: {first}");
}
