//! Runs the real `subguard` binary: `subguard serve --config <dir>/config.yaml`, listening on
//! `127.0.0.1:0` (or a Unix socket), with ports discovered from its JSON log lines.
//!
//! The child runs under a small `sh` watchdog that holds our end of a pipe on its stdin: when the
//! test process ends, even without running destructors (a `static` shared by a test file), the
//! pipe closes and the watchdog kills subguard. No sidecar outlives `cargo test`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::check::CheckClient;

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A temporary folder holding `config.yaml`, `users.yaml` and `keys/` (copies of the JWKS fixture
/// files: `keys/issuer-a.jwks.json`, `keys/issuer-a-rotated.jwks.json`, `keys/issuer-b.jwks.json`).
/// It lives under cargo's `CARGO_TARGET_TMPDIR`.
pub struct ConfigDir {
    dir: tempfile::TempDir,
}

impl ConfigDir {
    pub fn new() -> Self {
        let dir =
            tempfile::Builder::new().prefix("sg-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        for entry in std::fs::read_dir(super::keys_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                std::fs::copy(&path, keys.join(path.file_name().unwrap())).unwrap();
            }
        }
        ConfigDir { dir }
    }

    /// A folder with this `config.yaml` and `users.yaml`.
    pub fn with(config_yaml: &str, users_yaml: &str) -> Self {
        let dir = ConfigDir::new();
        dir.write_config(config_yaml);
        dir.write_users(users_yaml);
        dir
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("config.yaml")
    }

    pub fn users_path(&self) -> PathBuf {
        self.path().join("users.yaml")
    }

    /// A path for a Unix socket inside this folder (short enough for `sun_path`).
    pub fn socket_path(&self) -> PathBuf {
        self.path().join("authz.sock")
    }

    pub fn write_config(&self, yaml: &str) {
        self.write("config.yaml", yaml);
    }

    pub fn write_users(&self, yaml: &str) {
        self.write("users.yaml", yaml);
    }

    /// Replaces a file atomically (write a temporary file, then rename it over the old one), as
    /// careful tools do: a reader sees the old or the new content, never a half-written file.
    pub fn replace(&self, relative: &str, contents: &str) {
        let path = self.path().join(relative);
        let tmp = path.with_file_name(format!(".{}.tmp", path.file_name().unwrap().to_string_lossy()));
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    /// Writes a file relative to the folder (e.g. `keys/acme.json`).
    pub fn write(&self, relative: &str, contents: &str) {
        let path = self.path().join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, contents).unwrap();
    }
}

impl Default for ConfigDir {
    fn default() -> Self {
        Self::new()
    }
}

/// Where subguard's gRPC listener is.
#[derive(Clone, Debug)]
pub enum GrpcTarget {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Default)]
struct Captured {
    stdout: Vec<String>,
    stderr: Vec<String>,
    pid: Option<u32>,
    grpc: Option<String>,
    admin: Option<String>,
}

pub struct Subguard {
    child: Child,
    watchdog: Option<ChildStdin>,
    captured: Arc<Mutex<Captured>>,
    grpc: GrpcTarget,
    admin: SocketAddr,
    pub dir: ConfigDir,
}

impl Subguard {
    /// Writes the two files, starts subguard and waits for `/readyz` = 200.
    pub fn start(config_yaml: &str, users_yaml: &str) -> Self {
        Self::start_in(ConfigDir::with(config_yaml, users_yaml))
    }

    /// Starts subguard on a prepared folder and waits for `/readyz` = 200.
    pub fn start_in(dir: ConfigDir) -> Self {
        let sg = Self::launch(dir, &[]);
        sg.wait_ready(START_TIMEOUT);
        sg
    }

    /// Starts subguard and waits only for its listeners (for configs that can't become ready).
    pub fn start_unready(dir: ConfigDir) -> Self {
        Self::launch(dir, &[])
    }

    /// Starts `subguard serve --config <dir>/config.yaml` with extra environment and waits until
    /// both listeners are logged.
    pub fn launch(dir: ConfigDir, env: &[(&str, &str)]) -> Self {
        let bin = env!("CARGO_BIN_EXE_subguard");
        let mut cmd = watched(Path::new(bin));
        cmd.arg("serve")
            .arg("--config")
            .arg(dir.config_path())
            .env_remove("SUBGUARD_CONFIG")
            .env("SUBGUARD_LOG", "info,subguard=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning subguard");
        let watchdog = child.stdin.take();
        let captured = Arc::new(Mutex::new(Captured::default()));

        let stdout = child.stdout.take().unwrap();
        let c = captured.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut c = c.lock().unwrap();
                if let Some((listener, addr)) = listening(&line) {
                    match listener.as_str() {
                        "grpc" => c.grpc = Some(addr),
                        "admin" => c.admin = Some(addr),
                        _ => {}
                    }
                }
                c.stdout.push(line);
            }
        });
        let stderr = child.stderr.take().unwrap();
        let c = captured.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut c = c.lock().unwrap();
                match line.strip_prefix("watched-pid ").and_then(|p| p.trim().parse().ok()) {
                    Some(pid) if c.pid.is_none() => c.pid = Some(pid),
                    _ => c.stderr.push(line),
                }
            }
        });

        let deadline = Instant::now() + START_TIMEOUT;
        let (grpc, admin) = loop {
            {
                let c = captured.lock().unwrap();
                if let (Some(g), Some(a)) = (&c.grpc, &c.admin) {
                    break (g.clone(), a.clone());
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100)); // let the readers drain
                let c = captured.lock().unwrap();
                panic!(
                    "subguard exited ({status}) before logging both listeners\n--- config.yaml\n{}\n--- stdout\n{}\n--- stderr\n{}",
                    std::fs::read_to_string(dir.config_path()).unwrap_or_default(),
                    c.stdout.join("\n"),
                    c.stderr.join("\n")
                );
            }
            if Instant::now() > deadline {
                let c = captured.lock().unwrap();
                let _ = child.kill();
                panic!(
                    "subguard did not log `listening` for grpc and admin within {START_TIMEOUT:?} \
                     (expected JSON lines with fields.message=listening, fields.listener, fields.addr)\n--- stdout\n{}\n--- stderr\n{}",
                    c.stdout.join("\n"),
                    c.stderr.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let grpc = match grpc.parse::<SocketAddr>() {
            Ok(addr) => GrpcTarget::Tcp(addr),
            Err(_) => GrpcTarget::Unix(PathBuf::from(grpc.strip_prefix("unix://").unwrap_or(&grpc))),
        };
        let admin = admin.parse().unwrap_or_else(|e| panic!("admin addr {admin:?}: {e}"));
        Subguard { child, watchdog, captured, grpc, admin, dir }
    }

    /// Polls `/readyz` until 200; panics with the logs after `timeout`.
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            match self.try_admin_get("/readyz") {
                Ok((200, _)) => return,
                other => last = Some(other),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "subguard /readyz did not answer 200 within {timeout:?} (last: {last:?})\n--- stdout\n{}\n--- stderr\n{}",
            self.logs().join("\n"),
            self.stderr().join("\n")
        );
    }

    pub fn grpc(&self) -> &GrpcTarget {
        &self.grpc
    }

    /// The TCP gRPC address (panics for a Unix socket).
    pub fn grpc_addr(&self) -> SocketAddr {
        match &self.grpc {
            GrpcTarget::Tcp(addr) => *addr,
            GrpcTarget::Unix(p) => panic!("subguard listens on unix socket {}", p.display()),
        }
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// `http://ADMIN{path}`
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// A blocking `GET` on the admin listener: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        self.try_admin_get(path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    fn try_admin_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.admin, path)
    }

    /// A new gRPC client on this subguard (one per test: clients belong to a test's runtime).
    /// `GET /metrics` on the admin listener, which must answer 200.
    pub fn metrics(&self) -> String {
        let (status, text) = self.admin_get("/metrics");
        assert_eq!(status, 200, "/metrics answered {status}: {text}");
        text
    }

    pub async fn client(&self) -> CheckClient {
        match &self.grpc {
            GrpcTarget::Tcp(addr) => CheckClient::connect_tcp(*addr).await,
            GrpcTarget::Unix(path) => CheckClient::connect_unix(path).await,
        }
    }

    /// Every stdout line so far (JSON log lines).
    pub fn logs(&self) -> Vec<String> {
        self.captured.lock().unwrap().stdout.clone()
    }

    /// The stdout lines containing `needle`, waited for up to 5 s: a check's deny is logged after
    /// its answer is sent, and the lines are read from the pipe by another thread.
    pub fn logged(&self, needle: &str) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let found: Vec<String> = self.logs().into_iter().filter(|l| l.contains(needle)).collect();
            if !found.is_empty() || std::time::Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stdout lines parsed as JSON (lines that aren't JSON are skipped).
    pub fn log_events(&self) -> Vec<Value> {
        self.logs().iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    pub fn stderr(&self) -> Vec<String> {
        self.captured.lock().unwrap().stderr.clone()
    }

    /// subguard's own process id.
    pub fn pid(&self) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(pid) = self.captured.lock().unwrap().pid {
                return pid;
            }
            assert!(Instant::now() < deadline, "the watchdog never reported subguard's pid");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends a signal (`"TERM"`, `"INT"`, `"HUP"`) to subguard.
    pub fn signal(&self, signal: &str) {
        super::send_signal(self.pid(), signal);
    }

    /// Waits for subguard to exit by itself; its exit code, or `None` if it still runs after
    /// `timeout` (or died of a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops subguard now (SIGKILL through the watchdog) and waits for it.
    pub fn kill(&mut self) {
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

impl Drop for Subguard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A command that runs `program` (add its arguments to the returned command) under a `sh`
/// watchdog: the watchdog reads its stdin, a pipe to this process, and kills the program with
/// SIGKILL at EOF, i.e. when the test drops the pipe *or* the test process ends in any way.
/// Keep the `ChildStdin` alive for as long as the program should run. The child's exit status
/// is the program's. The first stderr line is `watched-pid <pid>`: the program's own pid.
pub fn watched(program: &Path) -> Command {
    // fd 3 keeps the pipe for the watchdog (a background list's stdin is /dev/null).
    let script = r#"exec 3<&0
"$0" "$@" 3<&- </dev/null &
child=$!
echo "watched-pid $child" >&2
( read -r _ <&3; kill -KILL "$child" 2>/dev/null ) &
watchdog=$!
exec 3<&-
wait "$child"
code=$?
kill "$watchdog" 2>/dev/null
exit "$code"
"#;
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).arg(program).stdin(Stdio::piped());
    cmd
}

/// (listener, addr) of a `listening` log line. The fields are expected under `fields`
/// (tracing-subscriber's JSON format); top-level fields are accepted too.
fn listening(line: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(line).ok()?;
    for scope in [&v["fields"], &v] {
        if scope["message"] == "listening" {
            let listener = scope["listener"].as_str()?.to_string();
            let addr = scope["addr"].as_str()?.to_string();
            return Some((listener, addr));
        }
    }
    None
}

/// A minimal blocking HTTP/1.1 GET (no runtime needed): (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {head:?}")))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}
