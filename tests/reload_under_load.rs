//! Fifty reloads under a steady stream of checks (issue: "hot reload without a failed check").
//!
//! The config folder is laid out the way Kubernetes mounts a ConfigMap: `config.yaml` and
//! `users.yaml` are symlinks through `..data`, which each update re-points at a new timestamped
//! folder. Versions alternate valid / invalid, half of them delivered by symlink swap and half by
//! rewriting the files in place. While that happens, four clients keep asking for a user who is in
//! every version (must always be allowed) and for one who never is (must always be
//! `user_not_found`): any other answer is a failed or wrong decision. Each valid version adds a new
//! user, who must be allowed once it is in; each invalid one must be refused and counted.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::check::CheckCall;
use common::{Algorithm, CheckClient, ConfigDir, Subguard, TokenBuilder};

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
        jwks_file: keys/issuer-a.jwks.json
"#;

const VERSIONS: usize = 50;

fn token(sub: &str) -> String {
    TokenBuilder::new("rsa-1", Algorithm::RS256).iss("https://idp.acme.test/").aud("orders").sub(sub).build()
}

fn users(version: usize) -> String {
    format!("acme:\n  - sub: steady\n  - sub: added-{version}\n")
}

/// Writes version `n` into a new `..<n>` folder and re-points `..data` at it atomically.
fn swap_configmap(root: &Path, n: usize, config: &str, users: &str) {
    let dir = root.join(format!("..v{n}"));
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("config.yaml"), config).unwrap();
    std::fs::write(dir.join("users.yaml"), users).unwrap();
    let tmp = root.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..v{n}"), &tmp).unwrap();
    std::fs::rename(&tmp, root.join("..data")).unwrap();
}

/// Rewrites the files `..data` points at, in place (write to a temp file, rename over).
fn rewrite_in_place(root: &Path, config: &str, users: &str) {
    let data = std::fs::canonicalize(root.join("..data")).unwrap();
    for (name, text) in [("config.yaml", config), ("users.yaml", users)] {
        let tmp = data.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, data.join(name)).unwrap();
    }
}

fn reloads(sg: &Subguard, outcome: &str) -> f64 {
    common::metrics::value(&sg.metrics(), "subguard_config_reloads_total", &[("outcome", outcome)])
}

async fn reason(client: &mut CheckClient, sub: &str) -> String {
    let out = client.call(&CheckCall::new().tenant("acme").bearer(&token(sub))).await;
    if out.allowed { "allow".into() } else { out.reason().unwrap_or("none").to_string() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_reloads_valid_and_invalid_without_a_failed_or_wrong_check() {
    let dir = ConfigDir::new();
    let root = dir.path().to_path_buf();
    std::fs::create_dir(root.join("..v0")).unwrap();
    std::fs::write(root.join("..v0/config.yaml"), CONFIG).unwrap();
    std::fs::write(root.join("..v0/users.yaml"), users(0)).unwrap();
    std::os::unix::fs::symlink("..v0", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/config.yaml", root.join("config.yaml")).unwrap();
    std::os::unix::fs::symlink("..data/users.yaml", root.join("users.yaml")).unwrap();
    let sg = Subguard::start_in(dir);

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let mut client = sg.client().await;
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let (mut checks, mut wrong) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                for (sub, expected) in [("steady", "allow"), ("ghost", "user_not_found")] {
                    let got = reason(&mut client, sub).await;
                    checks += 1;
                    if got != expected {
                        wrong.push(format!("{sub}: expected {expected}, got {got}"));
                    }
                }
            }
            (checks, wrong)
        }));
    }

    let mut probe = sg.client().await;
    for n in 1..=VERSIONS {
        let valid = n % 2 == 0;
        let config =
            if valid { format!("{CONFIG}# version {n}\n") } else { format!("{CONFIG}bogus_key: {n}\n") };
        let errors_before = reloads(&sg, "error");
        if n % 4 < 2 {
            swap_configmap(&root, n, &config, &users(n));
        } else {
            rewrite_in_place(&root, &config, &users(n));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let done = if valid {
                // The new version's user is in: the swap happened.
                reason(&mut probe, &format!("added-{n}")).await == "allow"
            } else {
                reloads(&sg, "error") > errors_before
            };
            if done {
                break;
            }
            assert!(Instant::now() < deadline, "version {n} (valid: {valid}) was never picked up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !valid {
            // Refused: the user of the invalid version is not in; the previous version serves.
            assert_eq!(reason(&mut probe, &format!("added-{n}")).await, "user_not_found");
            assert_eq!(reason(&mut probe, &format!("added-{}", n - 1)).await, "allow");
        }
    }
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    for w in workers {
        let (checks, wrong) = w.await.unwrap();
        total += checks;
        assert!(
            wrong.is_empty(),
            "{} wrong decisions during reloads, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
    assert!(total > 200, "the load was too light to mean anything: {total} checks");
    assert!(reloads(&sg, "ok") >= (VERSIONS / 2) as f64);
    assert!(reloads(&sg, "error") >= (VERSIONS / 2) as f64);
    // Each refused version is logged with the YAML path of its error.
    assert!(sg.logs().iter().any(|l| l.contains("config reload refused") && l.contains("bogus_key")));
}
