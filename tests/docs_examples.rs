//! The YAML examples of the documentation (README.md, docs/*.md, examples/quickstart/README.md):
//! users copy them, so every subguard example must be accepted by `subguard validate`, and the one
//! shown being refused must be refused with exactly the output shown.
//!
//! `EXAMPLES` classifies every ```yaml block by its page, nearest heading and first line that is
//! not a comment; a block it does not list, or a listed block that is gone, fails the test, so a
//! new example can't go untested. Every block must parse as YAML, Envoy's and Kubernetes' too.
//!
//! The metrics the pages name must be ones subguard exports, and every exported family must have
//! its row in docs/operations.md's table. Complete configs and users files are validated exactly as
//! written; fragments are placed into a small valid config first. The files a config names
//! (`from_file` secrets, CA bundles, JWKS files) are created beside it, and its `from_env`
//! variables set to placeholders.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::ConfigDir;
use serde_json::Value;

/// A block, by the heading it sits under and its first line that is not a comment.
type Key = (&'static str, &'static str);

enum Kind {
    /// A whole config, validated as written, beside the page's `UsersOf` block for it.
    Config,
    /// The `users.yaml` of the config block `Key` of the same page (validated with it, so its
    /// tenants must be that config's: a users file naming another tenant makes a warning).
    UsersOf(Key),
    /// A config shown being refused: `validate` must print the output block that follows it.
    Refused,
    /// Part of a config, placed into `BASE` at `Place` after the textual replacements listed.
    Fragment(Place, &'static [(&'static str, &'static str)]),
    /// Not subguard's config, only classified: Envoy config, Kubernetes manifests and kustomizations,
    /// Prometheus rules.
    Envoy,
    Kubernetes,
    Prometheus,
}

enum Place {
    /// Its keys replace `BASE`'s keys of the same name.
    TopLevel,
    /// Its keys go into the default directory, made a remote one (`REMOTE_DIRECTORY`).
    InRemoteDirectory,
}

use Kind::*;
use Place::*;

/// Placeholders the docs leave for the reader, filled in the way the reader would.
const ANY_ISSUERS: (&str, &str) = (
    "[...]",
    r#"[{issuer: "https://idp.acme.test/", audiences: [orders], jwks_file: keys/issuer-a.jwks.json}]"#,
);
const ANY_URL: (&str, &str) = (r#""...""#, r#""https://users.internal/users/{sub}""#);

const EXAMPLES: &[(&str, &str, &str, Kind)] = &[
    ("README.md", "Wiring Envoy", "http_filters:", Envoy),
    ("README.md", "Wiring Envoy", "- match: { path: /healthz }", Envoy),
    ("README.md", "Configuration", "listen:", Config),
    ("README.md", "Configuration", "acme:", UsersOf(("Configuration", "listen:"))),
    ("docs/configuration.md", "A complete example", "listen:", Config),
    ("docs/configuration.md", "The users file", "acme:", UsersOf(("A complete example", "listen:"))),
    ("docs/configuration.md", "`subguard validate`", "tenant:", Refused),
    ("docs/configuration.md", "`subguard validate`", "acme:", UsersOf(("`subguard validate`", "tenant:"))),
    ("docs/deploy.md", "Adding subguard to your Deployment", "resources:", Kubernetes),
    ("docs/deploy.md", "Adding subguard to your Deployment", "volumeMounts:", Kubernetes),
    ("docs/deploy.md", "Hardening", "securityContext:", Kubernetes),
    ("docs/directories.md", "One directory per tenant", "directory:", Fragment(TopLevel, &[ANY_ISSUERS])),
    ("docs/directories.md", "The HTTP directory", "directory:", Fragment(TopLevel, &[])),
    ("docs/directories.md", "The SCIM directory", "directory:", Fragment(TopLevel, &[])),
    ("docs/directories.md", "Credentials, TLS and timeouts", "headers:", Fragment(InRemoteDirectory, &[])),
    ("docs/directories.md", "Normalising the `sub`", "directory:", Fragment(TopLevel, &[ANY_URL])),
    ("docs/directories.md", "The circuit breaker", "directory:", Fragment(TopLevel, &[ANY_URL])),
    ("docs/operations.md", "Kubernetes", "spec:", Kubernetes),
    ("docs/operations.md", "Queries and alerts", "groups:", Prometheus),
    ("docs/operations.md", "Envoy's access log", "log_format:", Envoy),
    ("docs/operations.md", "Tracing", "tracing:", Fragment(TopLevel, &[])),
    (
        "docs/revocation.md",
        "Configuration",
        "revocation:",
        // Absolute paths of a pod's mounts, moved into the test's folder.
        Fragment(
            TopLevel,
            &[
                ("/run/secrets/redis-password", "secrets/redis-password"),
                ("/etc/subguard/redis-ca.pem", "redis-ca.pem"),
            ],
        ),
    ),
];

/// The config a fragment is placed into: about the smallest one `validate` accepts.
const BASE: &str = r#"
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
        jwks_file: keys/issuer-a.jwks.json
"#;
const BASE_USERS: &str = "acme:\n  - sub: alice\n";
const REMOTE_DIRECTORY: &str = r#"{kind: http, url: "https://users.internal/users/{sub}"}"#;

#[derive(Default)]
struct Block {
    file: String,
    line: usize,
    lang: String,
    heading: String,
    first_line: String,
    text: String,
}

impl std::fmt::Display for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{} (under `{}`, starting `{}`)", self.file, self.line, self.heading, self.first_line)
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `others` and every page of docs/, sorted.
fn pages(others: &[&str]) -> Vec<String> {
    let mut pages: Vec<String> = others.iter().map(|p| p.to_string()).collect();
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".md") {
            pages.push(format!("docs/{name}"));
        }
    }
    pages.sort();
    pages
}

/// Every fenced block of every page in scope, in order, dedented to its fence.
fn blocks() -> Vec<Block> {
    let mut out = Vec::new();
    for file in pages(&["README.md", "examples/quickstart/README.md"]) {
        let page = std::fs::read_to_string(root().join(&file)).unwrap();
        let mut heading = String::new();
        let mut open: Option<Block> = None;
        let mut indent = 0;
        for (i, line) in page.lines().enumerate() {
            let fence = line.trim_start().strip_prefix("```");
            match (&mut open, fence) {
                (None, Some(info)) => {
                    indent = line.len() - line.trim_start().len();
                    let lang = info.split_whitespace().next().unwrap_or("").to_string();
                    open = Some(Block {
                        file: file.clone(),
                        line: i + 1,
                        lang,
                        heading: heading.clone(),
                        ..Default::default()
                    });
                }
                (None, None) if line.starts_with('#') => heading = line.trim_start_matches('#').trim().into(),
                (None, None) => {}
                (Some(_), Some(_)) => out.push(open.take().unwrap()),
                (Some(block), None) => {
                    let line = &line[indent.min(line.len() - line.trim_start().len())..];
                    let content = line.split(" #").next().unwrap().trim();
                    if block.first_line.is_empty() && !content.is_empty() && !content.starts_with('#') {
                        block.first_line = content.to_string();
                    }
                    block.text += line;
                    block.text += "\n";
                }
            }
        }
    }
    out
}

fn is_yaml(block: &Block) -> bool {
    matches!(block.lang.as_str(), "yaml" | "yml")
}

fn find<'a>(blocks: &'a [Block], file: &str, (heading, first_line): Key) -> &'a Block {
    blocks
        .iter()
        .find(|b| is_yaml(b) && b.file == file && b.heading == heading && b.first_line == first_line)
        .unwrap_or_else(|| panic!("{file}: no yaml block under `{heading}` starting `{first_line}`"))
}

fn parse(yaml: &str, what: &dyn std::fmt::Display) -> Value {
    serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("{what}: not YAML: {e}\n{yaml}"))
}

/// Creates every file `config` names in `dir` and collects the variables it reads from the
/// environment, set to placeholders.
fn provide(dir: &ConfigDir, config: &Value, env: &mut Vec<(String, String)>) {
    let ca_bundle = || std::fs::read_to_string(common::redis_server::tls_fixture("ca.pem")).unwrap();
    match config {
        Value::Object(map) => {
            for (key, value) in map {
                let file = match (key.as_str(), value.as_str()) {
                    ("from_env", Some(name)) => {
                        env.push((name.to_string(), "placeholder".to_string()));
                        continue;
                    }
                    ("from_file", Some(path)) => (path, "placeholder-secret\n".to_string()),
                    ("ca_file", Some(path)) => (path, ca_bundle()),
                    // issuer-a's JWKS has RSA, EC and Ed25519 keys: one fits any algorithm list.
                    ("jwks_file", Some(path)) => (path, common::jwks_text("issuer-a.jwks.json")),
                    _ => {
                        provide(dir, value, env);
                        continue;
                    }
                };
                assert!(Path::new(file.0).is_relative(), "{key}: {} is outside the test's folder", file.0);
                dir.write(file.0, &file.1);
            }
        }
        Value::Array(items) => items.iter().for_each(|item| provide(dir, item, env)),
        _ => {}
    }
}

/// `subguard validate --config <dir>/config.yaml`.
fn validate(dir: &ConfigDir, env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_subguard"));
    // As the pages run it: from the config's folder, so the paths it prints are the pages' too.
    cmd.arg("validate")
        .arg("--config")
        .arg("config.yaml")
        .current_dir(dir.path())
        .env_remove("SUBGUARD_CONFIG");
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.output().expect("running subguard validate")
}

/// What a failure shows: the files as validated and everything validate printed.
fn report(what: &str, dir: &ConfigDir, out: &Output, expected: &str) -> String {
    let users = std::fs::read_to_string(dir.users_path()).unwrap_or_default();
    format!(
        "{what}: expected {expected}, got exit {:?}\n--- config.yaml ---\n{}--- users.yaml ---\n{users}\
         --- stdout ---\n{}--- stderr ---\n{}",
        out.status.code(),
        std::fs::read_to_string(dir.config_path()).unwrap(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    )
}

/// `ok`, exit 0, and no warning: what a user who copies the example should see.
fn check_clean(what: &str, dir: &ConfigDir, env: &[(String, String)], failures: &mut Vec<String>) {
    let out = validate(dir, env);
    let clean = out.status.success()
        && String::from_utf8_lossy(&out.stdout).trim() == "ok"
        && !String::from_utf8_lossy(&out.stderr).contains("warning:");
    if !clean {
        failures.push(report(what, dir, &out, "`ok` and no warning"));
    }
}

/// Writes the users file of the config block `config` of `file` as `users.yaml`, and says which
/// blocks were validated.
fn write_users_of(blocks: &[Block], file: &str, config: &Block, dir: &ConfigDir) -> String {
    for (users_file, heading, first_line, kind) in EXAMPLES {
        if let UsersOf(of) = kind
            && *users_file == file
            && *of == (config.heading.as_str(), config.first_line.as_str())
        {
            let users = find(blocks, file, (heading, first_line));
            dir.write_users(&users.text);
            return format!("{config} with users.yaml {users}");
        }
    }
    config.to_string()
}

#[test]
fn every_yaml_block_in_the_docs_is_classified() {
    let blocks = blocks();
    let yaml: Vec<&Block> = blocks.iter().filter(|b| is_yaml(b)).collect();
    let mut problems = Vec::new();
    for block in &yaml {
        let same = |f: &str, h: &str, l: &str| block.file == f && block.heading == h && block.first_line == l;
        if !EXAMPLES.iter().any(|(f, h, l, _)| same(f, h, l)) {
            problems.push(format!("{block}: not classified in EXAMPLES (tests/docs_examples.rs)"));
        }
        if yaml.iter().filter(|b| same(&b.file, &b.heading, &b.first_line)).count() > 1 {
            problems.push(format!("{block}: shares its heading and first line with another block"));
        }
        // Envoy's, Kubernetes' and Prometheus' blocks too: at least they must parse.
        if let Err(e) = serde_saphyr::from_str::<Value>(&block.text) {
            problems.push(format!("{block}: not YAML: {e}"));
        }
    }
    for (file, heading, first_line, _) in EXAMPLES {
        if !yaml.iter().any(|b| b.file == *file && b.heading == *heading && b.first_line == *first_line) {
            problems
                .push(format!("{file}: no yaml block under `{heading}` starting `{first_line}` any more"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn complete_configs_validate_as_written_with_their_users_files() {
    let blocks = blocks();
    let mut failures = Vec::new();
    for (file, heading, first_line, kind) in EXAMPLES {
        if let Config = kind {
            let block = find(&blocks, file, (heading, first_line));
            let dir = ConfigDir::new();
            dir.write_config(&block.text);
            let what = write_users_of(&blocks, file, block, &dir);
            let mut env = Vec::new();
            provide(&dir, &parse(&block.text, block), &mut env);
            check_clean(&what, &dir, &env, &mut failures);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn fragments_validate_in_place() {
    let blocks = blocks();
    let mut failures = Vec::new();
    for (file, heading, first_line, kind) in EXAMPLES {
        let Fragment(place, replacements) = kind else { continue };
        let block = find(&blocks, file, (heading, first_line));
        let text = replacements.iter().fold(block.text.clone(), |text, (from, to)| {
            assert!(text.contains(from), "{block}: no `{from}` to replace");
            text.replace(from, to)
        });
        let mut config = parse(BASE, &"BASE");
        let fragment = parse(&text, block);
        let into = match place {
            TopLevel => &mut config,
            InRemoteDirectory => {
                config["directory"] = parse(REMOTE_DIRECTORY, &"REMOTE_DIRECTORY");
                &mut config["directory"]
            }
        };
        into.as_object_mut().unwrap().extend(fragment.as_object().unwrap().clone());
        // JSON is YAML: written as JSON, the YAML paths validate reports are the same.
        let dir = ConfigDir::with(&serde_json::to_string_pretty(&config).unwrap(), BASE_USERS);
        let mut env = Vec::new();
        provide(&dir, &config, &mut env);
        if config.get("tracing").is_some() && !cfg!(feature = "otel") {
            // configuration.md#tracing: a build without the `otel` feature refuses the section.
            let out = validate(&dir, &env);
            let refusal =
                "tracing: this build has no OpenTelemetry export (build with the cargo feature `otel`)";
            if out.status.code() != Some(1) || String::from_utf8_lossy(&out.stdout).trim() != refusal {
                failures.push(report(&block.to_string(), &dir, &out, &format!("exit 1 and `{refusal}`")));
            }
        } else {
            check_clean(&block.to_string(), &dir, &env, &mut failures);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_refused_example_prints_the_documented_output() {
    let blocks = blocks();
    for (file, heading, first_line, kind) in EXAMPLES {
        let Refused = kind else { continue };
        let block = find(&blocks, file, (heading, first_line));
        // Exactly as the page has it, users file included, and none of the files it names.
        let dir = ConfigDir::new();
        dir.write_config(&block.text);
        let what = write_users_of(&blocks, file, block, &dir);
        let out = validate(&dir, &[]);

        let shown = blocks
            .iter()
            .find(|b| {
                b.file == block.file && b.line > block.line && b.text.starts_with("$ subguard validate")
            })
            .unwrap_or_else(|| panic!("{block}: no `$ subguard validate` output block after it"));
        let (stdout, exit) = shown.text.split_once("$ echo $?\n").expect("`$ echo $?` in the output block");
        let stdout = stdout.split_once('\n').unwrap().1;
        let exit = exit.trim().parse::<i32>().expect("an exit code after `$ echo $?`");
        assert!(
            out.status.code() == Some(exit) && String::from_utf8_lossy(&out.stdout) == stdout,
            "{}\n--- the page shows (line {}) ---\n{stdout}",
            report(&what, &dir, &out, "the output the page shows"),
            shown.line
        );
    }
}

/// Every `subguard_*` metric a page names (in prose, queries and alert rules) is one subguard
/// exports, and every family it exports has its row in docs/operations.md's table: a renamed
/// metric cannot leave a dashboard query or an alert in the docs silently matching nothing.
#[test]
fn the_metrics_the_docs_name_are_the_ones_exported() {
    use std::sync::Arc;
    use subguard::decision::{Decision, Reason};
    use subguard::directory::breaker::BreakerState;

    // The registry `serve` exports, with a series in every family (a family without one is not
    // written out at all).
    let mut registry = prometheus_client::registry::Registry::default();
    let m = subguard::telemetry::Metrics::register(&mut registry);
    let (tenant, issuer): (Arc<str>, Arc<str>) = ("acme".into(), "https://idp.acme.test/".into());
    m.check_finished(&Decision::deny(Reason::UserNotFound), None, std::time::Duration::from_micros(30));
    drop(m.check_started());
    m.check_shed();
    m.token_cache_lookup(true);
    m.declare_tenant(&tenant, [&issuer].into_iter());
    m.directory_lookup(&tenant, "found");
    m.jwks_fetch(&issuer, true);
    m.breaker_changed(&tenant, BreakerState::Open);
    m.config_reloaded(true);
    m.config_serving(&[0; 32]);
    m.revocation_lookup("revoked");
    m.revocation_event("user_deleted", "applied");
    m.revocation_connected(true);
    m.revocation_reconnect();
    // And what a running sidecar adds at scrape time (the issuer-key gauges).
    let sg = common::Subguard::start(BASE, BASE_USERS);
    let metrics = format!("{}{}", subguard::telemetry::encode(&registry), sg.admin_get("/metrics").1);

    // Family name -> the sample names it exports.
    let mut families: Vec<(String, Vec<String>)> = Vec::new();
    for line in metrics.lines() {
        let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|l| l.split_once(' ')) else {
            continue;
        };
        let samples = match kind {
            "counter" => vec![format!("{}_total", name.strip_suffix("_total").unwrap_or(name))],
            "histogram" => ["", "_bucket", "_sum", "_count"].iter().map(|s| format!("{name}{s}")).collect(),
            "info" => vec![format!("{name}_info")],
            _ => vec![name.to_string()],
        };
        if !families.iter().any(|(f, _)| f == name) {
            families.push((name.to_string(), samples));
        }
    }
    let exported = |name: &str| families.iter().any(|(_, samples)| samples.iter().any(|s| s == name));

    let mut problems = Vec::new();
    let word = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    for page in &pages(&["README.md", "SECURITY.md"]) {
        let text = std::fs::read_to_string(root().join(page)).unwrap();
        for (at, _) in text.match_indices("subguard_") {
            let name: String = text[at..].chars().take_while(|&c| word(c)).collect();
            let before = text[..at].chars().next_back();
            // Part of a longer identifier (a test's name), a family prefix
            // (`subguard_revocation_*`) or a recording rule's name
            // (`tenant:subguard_user_not_found:ratio_rate10m`): not a metric.
            if before.is_some_and(|c| word(c) || c == ':') || name.ends_with('_') {
                continue;
            }
            if !exported(&name) {
                let line = text[..at].lines().count();
                problems.push(format!("{page}:{line}: `{name}` is not a metric subguard exports"));
            }
        }
    }
    let table = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    for (family, samples) in &families {
        let row = |s: &String| table.lines().any(|l| l.starts_with(&format!("| `{s}` |")));
        if !samples.iter().any(row) {
            problems.push(format!("`{family}` has no row in docs/operations.md's metrics table"));
        }
    }
    assert!(families.len() > 15, "too few families:\n{metrics}");
    assert!(problems.is_empty(), "{}\n\nexported:\n{families:#?}", problems.join("\n"));
}
