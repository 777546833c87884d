//! Reload (SPEC §5): the config file and the users file are watched (including a Kubernetes
//! ConfigMap's symlink swap) and re-read on SIGHUP. A valid new version replaces the old one
//! atomically; an invalid one is refused, logged and counted, and the old one keeps serving. No
//! check fails because of a reload.

mod common;

use std::time::{Duration, Instant};

use common::check::CheckCall;
use common::directory_server::{Answer, DirectoryServer};
use common::jwks_server::JwksServer;
use common::metrics::{required, samples, value};
use common::{Algorithm, CheckClient, ConfigDir, Outcome, Subguard, TokenBuilder};
use serde_json::json;

const CONFIG: &str = r#"
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

const GLOBEX: &str = r#"
  globex:
    issuers:
      - issuer: "https://idp.globex.test/"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-b.jwks.json
"#;

const USERS: &str = "acme:\n  - sub: u-1\nglobex:\n  - sub: g-1\n";

fn acme(sub: &str) -> String {
    TokenBuilder::new("rsa-1", Algorithm::RS256).iss("https://idp.acme.test/").aud("orders").sub(sub).build()
}

fn globex(sub: &str) -> String {
    TokenBuilder::new("other-rsa", Algorithm::RS256)
        .iss("https://idp.globex.test/")
        .aud("orders")
        .sub(sub)
        .build()
}

async fn ask(client: &mut CheckClient, tenant: &str, token: &str) -> Outcome {
    client.call(&CheckCall::new().tenant(tenant).bearer(token)).await
}

/// Asks until `done(outcome)` or `timeout`; returns the last outcome.
async fn eventually(
    client: &mut CheckClient,
    tenant: &str,
    token: &str,
    timeout: Duration,
    done: impl Fn(&Outcome) -> bool,
) -> Outcome {
    let deadline = Instant::now() + timeout;
    loop {
        let out = ask(client, tenant, token).await;
        if done(&out) || Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// A deadline, not a timing claim: generous so a loaded CI machine never flakes.
const WAIT: Duration = Duration::from_secs(15);

fn reason(out: &Outcome) -> Option<&str> {
    out.header("x-subguard-reason")
}

/// Sum of every `subguard_config_reloads_total` sample.
fn reloads_counted(sg: &Subguard) -> f64 {
    samples(&sg.metrics(), "subguard_config_reloads_total").iter().map(|s| s.value).sum()
}

#[tokio::test]
async fn users_file_changes_are_picked_up_without_a_signal() {
    let sg = Subguard::start(CONFIG, USERS);
    let mut client = sg.client().await;
    assert_eq!(reason(&ask(&mut client, "acme", &acme("u-2")).await), Some("user_not_found"));

    // u-2 is added, u-1 deleted.
    sg.dir.write_users("acme:\n  - sub: u-2\n    id: user-two\n");
    let out = eventually(&mut client, "acme", &acme("u-2"), WAIT, |o| o.allowed).await;
    assert!(out.allowed, "the new user works after the users file changed: {out:#?}");
    assert_eq!(out.header("x-user-id"), Some("user-two"));
    let out = ask(&mut client, "acme", &acme("u-1")).await;
    assert_eq!(reason(&out), Some("user_not_found"), "a deleted user is gone: {out:#?}");
}

#[tokio::test]
async fn an_identity_provider_down_since_start_does_not_hold_back_other_changes() {
    // globex's keys come from an IdP that has answered 500 since start: the sidecar is not
    // ready, and acme serves. Removing an acme user must still take effect: the new version
    // has no fewer keys than the serving one.
    let jwks = std::fs::read_to_string("tests/fixtures/keys/issuer-b.jwks.json").unwrap();
    let idp = JwksServer::start(&jwks);
    idp.set_status(500);
    let down =
        GLOBEX.replace("jwks_file: keys/issuer-b.jwks.json", &format!("jwks_uri: \"{}\"", idp.jwks_uri()));
    let sg = Subguard::start_unready(ConfigDir::with(&format!("{CONFIG}{down}"), USERS));
    let mut client = sg.client().await;
    assert!(ask(&mut client, "acme", &acme("u-1")).await.allowed);
    assert_eq!(reason(&ask(&mut client, "globex", &globex("g-1")).await), Some("keys_unavailable"));

    sg.dir.write_users("acme:\n  - sub: u-2\nglobex:\n  - sub: g-1\n");
    let out = eventually(&mut client, "acme", &acme("u-1"), WAIT, |o| !o.allowed).await;
    assert_eq!(reason(&out), Some("user_not_found"), "the removed user is gone: {out:#?}");
    assert!(ask(&mut client, "acme", &acme("u-2")).await.allowed);

    // The IdP comes back: its issuer's own refresh loads the keys (the reload did not drop it).
    idp.set_jwks(&jwks);
    let out = eventually(&mut client, "globex", &globex("g-1"), Duration::from_secs(40), |o| o.allowed).await;
    assert!(out.allowed, "globex works once its IdP answers: {out:#?}");
}

#[tokio::test]
async fn a_rebuilt_directory_keeps_serving_the_users_its_predecessor_cached() {
    // A changed timeout (or a rotated credential) rebuilds the directory. During a directory
    // outage, a user served stale from the cache must stay served: no check fails because of a
    // reload.
    let directory = DirectoryServer::start();
    directory.set("d-1", Answer::user(json!({"id": "user-d1"})));
    let config = |timeout_ms: u64| {
        CONFIG.replace(
            "directory:\n  kind: file\n  path: users.yaml",
            &format!(
                "directory:\n  kind: http\n  url: \"{}\"\n  timeout_ms: {timeout_ms}\n  cache:\n    ttl_seconds: 1\n    stale_if_error_seconds: 300",
                directory.url_template()
            ),
        )
    };
    let sg = Subguard::start(&config(1000), "");
    let mut client = sg.client().await;
    let out = ask(&mut client, "acme", &acme("d-1")).await;
    assert_eq!(out.header("x-user-id"), Some("user-d1"), "{out:#?}");

    directory.set("d-1", Answer::status(500));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let out = ask(&mut client, "acme", &acme("d-1")).await;
    assert!(out.allowed, "served stale while the directory fails: {out:#?}");

    let before = reloads_counted(&sg);
    sg.dir.write_config(&config(900));
    let deadline = Instant::now() + WAIT;
    while reloads_counted(&sg) == before {
        assert!(Instant::now() < deadline, "the config change was never reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = ask(&mut client, "acme", &acme("d-1")).await;
    assert!(out.allowed, "the rebuilt directory still serves the cached user: {out:#?}");
    assert_eq!(out.header("x-user-id"), Some("user-d1"));
}

#[tokio::test]
async fn a_version_refused_for_unreachable_keys_is_tried_again_by_itself() {
    // A new tenant whose IdP is down at the reload: the version is refused for that tenant (it
    // stays out), the rest of it applies, and once the IdP answers the whole version is applied
    // without anyone touching the files again.
    let jwks = std::fs::read_to_string("tests/fixtures/keys/issuer-b.jwks.json").unwrap();
    let idp = JwksServer::start(&jwks);
    idp.set_status(500);
    let sg = Subguard::start(CONFIG, USERS);
    let mut client = sg.client().await;
    let errors = || value(&sg.metrics(), "subguard_config_reloads_total", &[("outcome", "error")]);
    let with_globex =
        GLOBEX.replace("jwks_file: keys/issuer-b.jwks.json", &format!("jwks_uri: \"{}\"", idp.jwks_uri()));
    sg.dir.write_config(&format!("{CONFIG}{with_globex}"));
    let deadline = Instant::now() + WAIT;
    while errors() < 1.0 {
        assert!(Instant::now() < deadline, "the version was never refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        reason(&ask(&mut client, "globex", &globex("g-1")).await),
        Some("unknown_tenant"),
        "the old version serves"
    );
    assert!(ask(&mut client, "acme", &acme("u-1")).await.allowed);
    // Meanwhile a user is removed from the users file: that applies at once. It used to wait for
    // globex's identity provider, and the removed user stayed allowed all that time.
    sg.dir.write_users("acme:\n  - sub: u-2\nglobex:\n  - sub: g-1\n");
    let out =
        eventually(&mut client, "acme", &acme("u-1"), WAIT, |o| reason(o) == Some("user_not_found")).await;
    assert_eq!(reason(&out), Some("user_not_found"), "the removal applied: {out:#?}");
    assert!(ask(&mut client, "acme", &acme("u-2")).await.allowed);
    assert_eq!(reason(&ask(&mut client, "globex", &globex("g-1")).await), Some("unknown_tenant"));
    assert!(!sg.logged("config reload applied except these tenants").is_empty(), "{}", sg.logs().join("\n"));

    // Down past the first retry (2 s), so the one that succeeds waits longer (4 s) than the
    // reloader's other timers: those must not keep pushing it back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    idp.set_jwks(&jwks);
    let out = eventually(&mut client, "globex", &globex("g-1"), Duration::from_secs(30), |o| o.allowed).await;
    assert!(out.allowed, "the refused version was applied once its keys could be fetched: {out:#?}");
    assert_eq!(errors(), 2.0, "each version refused once, counted once, however many retries");
}

#[tokio::test]
async fn config_is_reread_on_sighup() {
    let sg = Subguard::start(CONFIG, USERS);
    let mut client = sg.client().await;
    assert_eq!(reason(&ask(&mut client, "globex", &globex("g-1")).await), Some("unknown_tenant"));

    sg.dir.write_config(&format!("{CONFIG}{GLOBEX}"));
    sg.signal("HUP");
    let out = eventually(&mut client, "globex", &globex("g-1"), WAIT, |o| o.allowed).await;
    assert!(out.allowed, "the new tenant works after SIGHUP: {out:#?}");
    assert!(ask(&mut client, "acme", &acme("u-1")).await.allowed);
}

#[tokio::test]
async fn config_file_changes_are_picked_up_without_a_signal() {
    let sg = Subguard::start(CONFIG, USERS);
    let mut client = sg.client().await;
    sg.dir.write_config(&format!("{CONFIG}{GLOBEX}"));
    let out = eventually(&mut client, "globex", &globex("g-1"), WAIT, |o| o.allowed).await;
    assert!(out.allowed, "the watched config was re-read: {out:#?}");
}

#[tokio::test]
async fn an_invalid_config_is_refused_logged_counted_and_the_old_one_keeps_serving() {
    let sg = Subguard::start(CONFIG, USERS);
    let mut client = sg.client().await;
    let before = reloads_counted(&sg);
    let logged_before = sg.logs().len();

    // A typo (unknown key) and a tenant that would be new: neither may take effect.
    let invalid =
        format!("{CONFIG}{GLOBEX}").replace("  header: x-tenant-id", "  header: x-tenant-id\n  hots: x");
    sg.dir.write_config(&invalid);
    sg.signal("HUP");

    let deadline = Instant::now() + WAIT;
    while reloads_counted(&sg) <= before {
        assert!(
            Instant::now() < deadline,
            "the refused reload was never counted in subguard_config_reloads_total"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = ask(&mut client, "acme", &acme("u-1")).await;
    assert!(out.allowed, "the old config keeps serving: {out:#?}");
    assert_eq!(reason(&ask(&mut client, "globex", &globex("g-1")).await), Some("unknown_tenant"));
    assert_eq!(sg.admin_get("/readyz").0, 200);
    let new_lines = sg.logs()[logged_before..].join("\n");
    assert!(new_lines.contains("hots"), "the refusal is logged with its cause:\n{new_lines}");
}

/// `subguard_config_last_reload_successful`, `subguard_config_last_reload_success_timestamp_seconds`
/// and the fingerprints of `subguard_config_info`'s series.
fn config_gauges(sg: &Subguard) -> (f64, f64, Vec<String>) {
    let metrics = sg.metrics();
    let value = |name: &str| required(&metrics, name, &[]);
    let fingerprints = samples(&metrics, "subguard_config_info")
        .into_iter()
        .filter_map(|s| s.labels.get("fingerprint").cloned())
        .collect();
    (
        value("subguard_config_last_reload_successful"),
        value("subguard_config_last_reload_success_timestamp_seconds"),
        fingerprints,
    )
}

/// Waits until `subguard_config_last_reload_successful` is `want`.
fn wait_reload_successful(sg: &Subguard, want: f64, what: &str) -> (f64, f64, Vec<String>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let gauges = config_gauges(sg);
        if gauges.0 == want {
            return gauges;
        }
        assert!(Instant::now() < deadline, "{what}: config_last_reload_successful stayed {}", gauges.0);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn the_config_metrics_say_whether_the_last_version_was_applied_and_which_one_serves() {
    let sg = Subguard::start(CONFIG, USERS);
    let unix_now =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let (ok, started, first) = config_gauges(&sg);
    assert_eq!(ok, 1.0, "the version started with counts as applied");
    assert!((unix_now() - 60.0..=unix_now()).contains(&started), "applied at start: {started}");
    assert_eq!(first.len(), 1, "one series, the version serving: {first:?}");
    assert_eq!(first[0].len(), 16, "{first:?}");

    // A refused version: the alert condition holds until a valid version is applied, and the
    // version serving (and when it was applied) is still the first.
    let invalid =
        format!("{CONFIG}{GLOBEX}").replace("  header: x-tenant-id", "  header: x-tenant-id\n  hots: x");
    sg.dir.write_config(&invalid);
    sg.signal("HUP");
    let (_, at, serving) = wait_reload_successful(&sg, 0.0, "a refused version");
    assert_eq!((at, &serving), (started, &first), "the refused version does not serve");
    // It stays 0: a refusal is not a passing event (the files are still invalid).
    sg.signal("HUP");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(config_gauges(&sg).0, 0.0, "still refused after another look");

    // A valid new version.
    sg.dir.write_config(&format!("{CONFIG}{GLOBEX}"));
    sg.signal("HUP");
    let (_, applied, second) = wait_reload_successful(&sg, 1.0, "a valid version");
    assert_eq!(second.len(), 1, "the old version's series is gone: {second:?}");
    assert_ne!(second, first, "another version, another fingerprint");
    assert!(applied >= started, "applied at its reload: {applied} < {started}");
    // The log names the versions as the metric does.
    let logged = |message: &str| -> Vec<String> {
        let events = sg.log_events();
        let named = events.iter().filter(|e| e["fields"]["message"] == message);
        named.filter_map(|e| e["fields"]["config_version"].as_str().map(str::to_owned)).collect()
    };
    assert_eq!(logged("config loaded"), first, "the version started with");
    assert_eq!(logged("config reloaded").last(), second.first(), "the version applied");

    // Back to the first files: the same fingerprint as at start, as another sidecar reading the
    // same files at the same paths would show.
    sg.dir.write_config(CONFIG);
    sg.signal("HUP");
    let deadline = Instant::now() + WAIT;
    while config_gauges(&sg).2 != first {
        assert!(Instant::now() < deadline, "the first version's fingerprint never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn a_users_path_turned_to_a_device_or_a_pipe_is_refused_and_reloads_go_on() {
    let sg = Subguard::start(CONFIG, USERS);
    let mut client = sg.client().await;
    common::mkfifo(&sg.dir.path().join("pipe.yaml"));
    // Read whole, /dev/zero took the sidecar to gigabytes within seconds; the pipe, which nothing
    // writes, blocked the reloader's open for good, so no later change was ever applied.
    for (path, what) in [("/dev/zero", "a character device"), ("pipe.yaml", "a named pipe")] {
        let before = reloads_counted(&sg);
        let logged_before = sg.logs().len();
        sg.dir.write_config(&CONFIG.replace("path: users.yaml", &format!("path: {path}")));
        let deadline = Instant::now() + WAIT;
        while reloads_counted(&sg) <= before {
            assert!(Instant::now() < deadline, "the reload of a config naming {path} never ended");
            std::thread::sleep(Duration::from_millis(50));
        }
        let new_lines = sg.logs()[logged_before..].join("\n");
        assert!(new_lines.contains(&format!("not a regular file but {what}")), "{new_lines}");
        assert!(ask(&mut client, "acme", &acme("u-1")).await.allowed, "the old users keep serving");
    }
    sg.dir.write_config(&format!("{CONFIG}{GLOBEX}"));
    let out = eventually(&mut client, "globex", &globex("g-1"), WAIT, |o| o.allowed).await;
    assert!(out.allowed, "a valid change after the refused ones is applied: {out:#?}");
}

/// A users file emptied (a failed export, a full disk after `cat > users.yaml` truncated it) is
/// refused like any broken edit: the users serving stay, the refusal is counted and the gauge the
/// reload alert watches goes to 0. `{}` still means "no users".
#[tokio::test]
async fn an_emptied_users_file_is_refused_and_the_users_serving_stay() {
    let sg = Subguard::start(CONFIG, USERS);
    let mut client = sg.client().await;
    for empty in ["", "\n  \n", "---\n", "# exported by sync-users\n", "~\n", "null"] {
        let before = reloads_counted(&sg);
        let logged_before = sg.logs().len();
        sg.dir.write_users(empty);
        let deadline = Instant::now() + WAIT;
        while reloads_counted(&sg) <= before {
            assert!(Instant::now() < deadline, "the emptied users file was never counted as refused");
            std::thread::sleep(Duration::from_millis(50));
        }
        wait_reload_successful(&sg, 0.0, "an emptied users file");
        let new_lines = sg.logs()[logged_before..].join("\n");
        assert!(new_lines.contains("the file is empty"), "{new_lines}");
        assert!(ask(&mut client, "acme", &acme("u-1")).await.allowed, "the old users keep serving");
    }
    sg.dir.write_users("{}");
    let out =
        eventually(&mut client, "acme", &acme("u-1"), WAIT, |o| reason(o) == Some("user_not_found")).await;
    assert_eq!(reason(&out), Some("user_not_found"), "`{{}}` is a file with no users: {out:#?}");
}

/// A tenant removed by a reload disappears from `/metrics` (its checks, its directory lookups,
/// the key fetches of an issuer no tenant trusts any more): dashboards do not go on listing it.
/// The tenants that stay keep their counts.
#[tokio::test]
async fn a_tenant_removed_by_a_reload_leaves_no_series_behind() {
    let sg = Subguard::start(&format!("{CONFIG}{GLOBEX}"), USERS);
    let mut client = sg.client().await;
    assert!(ask(&mut client, "globex", &globex("g-1")).await.allowed);
    assert!(ask(&mut client, "acme", &acme("u-1")).await.allowed);
    let mentions = |metrics: &str, needle: &str| metrics.lines().filter(|l| l.contains(needle)).count();
    let before = sg.metrics();
    assert!(mentions(&before, r#"tenant="globex""#) > 0, "{before}");
    assert!(mentions(&before, r#"issuer="https://idp.globex.test/""#) > 0, "{before}");

    sg.dir.write_config(CONFIG);
    let out =
        eventually(&mut client, "globex", &globex("g-1"), WAIT, |o| reason(o) == Some("unknown_tenant"))
            .await;
    assert_eq!(reason(&out), Some("unknown_tenant"));
    let after = sg.metrics();
    assert_eq!(mentions(&after, r#"tenant="globex""#), 0, "{after}");
    assert_eq!(mentions(&after, r#"issuer="https://idp.globex.test/""#), 0, "{after}");
    let kept = required(
        &after,
        "subguard_checks_total",
        &[("decision", "allow"), ("reason", "ok"), ("tenant", "acme")],
    );
    assert_eq!(kept, 1.0, "acme's count stays");
}

/// How many times a file event made subguard look for changes and it found none (a debug line
/// each; the look it takes once at start has its own trigger).
fn unchanged_checks(sg: &Subguard) -> usize {
    sg.log_events()
        .iter()
        .filter(|e| e["fields"]["message"] == "watched files unchanged; nothing to reload")
        .filter(|e| e["fields"]["trigger"] == "file change")
        .count()
}

#[tokio::test]
async fn reading_the_watched_files_is_not_a_change_and_one_check_does_not_start_the_next() {
    let sg = Subguard::start(CONFIG, USERS);
    let mut client = sg.client().await;
    let dir = sg.dir.path();
    // Others read the files (a backup, `cat`, a sidecar), and write a file beside them.
    for _ in 0..5 {
        for f in ["config.yaml", "users.yaml", "keys/issuer-a.jwks.json"] {
            std::fs::read(dir.join(f)).unwrap();
        }
        std::fs::write(dir.join("notes.txt"), "not watched\n").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(unchanged_checks(&sg), 0, "reads and unrelated files made subguard look for changes");
    let start_up_looks = sg
        .log_events()
        .iter()
        .filter(|e| e["fields"]["message"] == "watched files unchanged; nothing to reload")
        .filter(|e| e["fields"]["trigger"] == "change during start-up")
        .count();
    assert_eq!(start_up_looks, 1, "one look at start, which found nothing changed");

    // The users file is written again with the same contents: one look, which finds nothing.
    // Its own reads of the files must not make it look again (they once did, every 200 ms).
    sg.dir.write_users(USERS);
    let deadline = Instant::now() + WAIT;
    while unchanged_checks(&sg) == 0 {
        assert!(Instant::now() < deadline, "the rewrite of the users file was never looked at");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let looks = unchanged_checks(&sg);
    // One write raises a few events; a slow machine may see them in two bursts, never ten.
    assert!(looks <= 2, "subguard kept looking at unchanged files: {looks} times in 2 s");
    assert_eq!(reloads_counted(&sg), 0.0, "nothing changed, so nothing was reloaded");
    assert!(ask(&mut client, "acme", &acme("u-1")).await.allowed);
}

#[tokio::test]
async fn a_kubernetes_configmap_symlink_swap_is_picked_up() {
    // A ConfigMap volume: config.yaml -> ..data/config.yaml, ..data -> ..<timestamp>/, and an
    // update swaps ..data atomically to a new timestamped folder.
    use std::os::unix::fs::symlink;
    let dir = ConfigDir::new();
    let root = dir.path();
    let write_version = |name: &str, users: &str| {
        let v = root.join(name);
        std::fs::create_dir(&v).unwrap();
        std::fs::write(v.join("config.yaml"), CONFIG).unwrap();
        std::fs::write(v.join("users.yaml"), users).unwrap();
    };
    write_version("..2026_01_01_00_00_00.1", USERS);
    symlink("..2026_01_01_00_00_00.1", root.join("..data")).unwrap();
    symlink("..data/config.yaml", root.join("config.yaml")).unwrap();
    symlink("..data/users.yaml", root.join("users.yaml")).unwrap();
    let sg = Subguard::start_in(dir);
    let mut client = sg.client().await;
    assert!(ask(&mut client, "acme", &acme("u-1")).await.allowed);
    assert_eq!(reason(&ask(&mut client, "acme", &acme("u-3")).await), Some("user_not_found"));

    let root = sg.dir.path();
    let v2 = root.join("..2026_01_01_00_05_00.2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("config.yaml"), CONFIG).unwrap();
    std::fs::write(v2.join("users.yaml"), "acme:\n  - sub: u-3\n").unwrap();
    symlink("..2026_01_01_00_05_00.2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_01_01_00_00_00.1")).unwrap();

    let out = eventually(&mut client, "acme", &acme("u-3"), WAIT, |o| o.allowed).await;
    assert!(out.allowed, "the swapped users file was read: {out:#?}");
    assert_eq!(reason(&ask(&mut client, "acme", &acme("u-1")).await), Some("user_not_found"));
}

/// A watch follows the folder it was put on: a config folder deleted and made again, or replaced
/// by another (a deploy tool's `rm -rf conf && cp -r new conf`), must be watched again, or every
/// later change, a removed user included, would go unseen.
#[tokio::test]
async fn a_replaced_config_folder_is_watched_again() {
    let sg = Subguard::start(CONFIG, USERS);
    let mut client = sg.client().await;
    assert!(ask(&mut client, "acme", &acme("u-1")).await.allowed);
    let root = sg.dir.path().to_path_buf();
    let old = root.with_extension("replaced");
    std::fs::rename(&root, &old).unwrap();
    let copied = std::process::Command::new("cp").arg("-a").arg(&old).arg(&root).status().unwrap();
    assert!(copied.success());
    std::fs::remove_dir_all(&old).unwrap();
    // The new folder's users file adds u-3.
    std::fs::write(root.join("users.yaml"), "acme:\n  - sub: u-1\n  - sub: u-3\n").unwrap();
    let out = eventually(&mut client, "acme", &acme("u-3"), WAIT, |o| o.allowed).await;
    assert!(out.allowed, "the replaced folder's users file was read: {out:#?}");
    // And it is watched: a later edit, removing u-1, is seen too.
    sg.dir.write_users("acme:\n  - sub: u-3\n");
    let out = eventually(&mut client, "acme", &acme("u-1"), WAIT, |o| !o.allowed).await;
    assert_eq!(reason(&out), Some("user_not_found"), "a user removed after the swap is gone: {out:#?}");
}

/// `cat new > users.yaml` truncates the file and then writes it: for a moment it is empty, then
/// half written. Rewritten in place over and over, the users file must never be read in such a
/// moment: a user in every version is allowed throughout, and the last version is applied.
#[tokio::test]
async fn a_users_file_rewritten_in_place_is_never_read_half_written() {
    let sg = Subguard::start(CONFIG, USERS);
    let mut client = sg.client().await;
    assert!(ask(&mut client, "acme", &acme("u-1")).await.allowed);
    let path = sg.dir.users_path();
    let full = "acme:\n  - sub: u-1\n  - sub: u-filler-0\n".to_string();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        for i in 0..120 {
            let text = format!("{full}# v{i}\n");
            let mut f = std::fs::File::create(&path).unwrap();
            let (a, b) = text.split_at(text.len() / 2);
            f.write_all(a.as_bytes()).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(2));
            f.write_all(b.as_bytes()).unwrap();
            drop(f);
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::write(&path, "acme:\n  - sub: u-1\n  - sub: u-9\n").unwrap();
    });
    let mut denied = Vec::new();
    while !writer.is_finished() {
        let out = ask(&mut client, "acme", &acme("u-1")).await;
        if !out.allowed {
            denied.push(reason(&out).unwrap_or("?").to_string());
        }
    }
    writer.join().unwrap();
    let reloads: Vec<String> =
        sg.logs().into_iter().filter(|l| l.contains("reload") || l.contains("watched")).collect();
    assert!(
        denied.is_empty(),
        "u-1 is in every version, yet was denied {} times; reloads:\n{}",
        denied.len(),
        reloads.join("\n")
    );
    let out = eventually(&mut client, "acme", &acme("u-9"), WAIT, |o| o.allowed).await;
    assert!(out.allowed, "the last version was applied: {out:#?}");
}

#[tokio::test]
async fn no_check_fails_because_of_a_reload() {
    let sg = Subguard::start(CONFIG, USERS);
    let client = sg.client().await;
    let token = acme("u-1");
    let mut workers = Vec::new();
    for _ in 0..4 {
        let mut client = client.clone();
        let token = token.clone();
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..150 {
                let out = ask(&mut client, "acme", &token).await;
                if !out.allowed {
                    failures.push(format!("{:?}", reason(&out)));
                }
            }
            failures
        }));
    }
    // Meanwhile: equivalent configs and users files, replaced and signalled several times.
    for i in 0..6 {
        sg.dir.replace("config.yaml", &format!("{CONFIG}# revision {i}\n"));
        sg.dir.replace("users.yaml", &format!("{USERS}# revision {i}\n"));
        sg.signal("HUP");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    for worker in workers {
        let failures = worker.await.unwrap();
        assert!(failures.is_empty(), "checks failed during reloads: {failures:?}");
    }
}
