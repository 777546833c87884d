//! A real `redis-server` (Debian's package) for the revocation tests: one private instance per
//! test file on a free loopback port, no persistence, under the same watchdog as subguard (it
//! never outlives `cargo test`). It can be killed and started again on the same port to play an
//! outage.
//!
//! `redis-server` comes from `$SUBGUARD_REDIS_SERVER`, else `PATH`. `make test` installs it
//! (`make redis-server`); without it the tests fail with a message saying how to get it.

use std::path::PathBuf;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::free_port;
use super::subguard::watched;

/// A file of `tests/fixtures/tls/` (see its `generate.sh`).
pub fn tls_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(name)
}

pub fn redis_server_binary() -> PathBuf {
    if let Ok(p) = std::env::var("SUBGUARD_REDIS_SERVER") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("redis-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "redis-server not found: the revocation tests need a real Redis. Run `make redis-server` \
         (installs Debian's redis-server package) or set SUBGUARD_REDIS_SERVER to its path."
    )
}

struct Running {
    child: Child,
    _watchdog: ChildStdin,
}

pub struct Redis {
    port: u16,
    /// With TLS: the CA that signed the server certificate (`tests/fixtures/tls/`).
    tls_ca: Option<Vec<u8>>,
    dir: tempfile::TempDir,
    running: Mutex<Option<Running>>,
}

impl Redis {
    /// Starts a private redis-server and waits until it answers PING.
    pub fn start() -> Redis {
        let dir = tempfile::Builder::new()
            .prefix("redis-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("temp dir for redis");
        let redis = Redis { port: free_port(), tls_ca: None, dir, running: Mutex::new(None) };
        redis.start_again();
        redis
    }

    /// Starts a redis-server that speaks only TLS, with the certificate of `tests/fixtures/tls/`
    /// (for 127.0.0.1 and localhost, signed by `ca.pem`).
    pub fn start_tls() -> Redis {
        let dir = tempfile::Builder::new()
            .prefix("redis-tls-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("temp dir for redis");
        let ca = std::fs::read(tls_fixture("ca.pem")).expect("tests/fixtures/tls/ca.pem");
        let redis = Redis { port: free_port(), tls_ca: Some(ca), dir, running: Mutex::new(None) };
        redis.start_again();
        redis
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Starts redis-server (again) on the same port.
    pub fn start_again(&self) {
        let mut running = self.running.lock().unwrap();
        assert!(running.is_none(), "redis-server is already running");
        let mut cmd = watched(&redis_server_binary());
        let port = self.port.to_string();
        if self.tls_ca.is_some() {
            cmd.args(["--port", "0", "--tls-port", &port, "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(tls_fixture("server.pem"))
                .arg("--tls-key-file")
                .arg(tls_fixture("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(tls_fixture("ca.pem"));
        } else {
            cmd.args(["--port", &port]);
        }
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawning redis-server");
        let watchdog = child.stdin.take().expect("watchdog pipe");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.try_cmd::<String>(&["PING"]).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("redis-server on port {} exited at start ({status})", self.port);
            }
            assert!(Instant::now() < deadline, "redis-server on port {} did not answer PING", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
        *running = Some(Running { child, _watchdog: watchdog });
    }

    /// Kills redis-server (SIGKILL: an outage, not a clean shutdown) and waits for its exit.
    pub fn kill(&self) {
        if let Some(mut r) = self.running.lock().unwrap().take() {
            drop(r._watchdog); // the watchdog SIGKILLs redis-server at EOF
            let _ = r.child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.try_cmd::<String>(&["PING"]).is_ok() {
            assert!(Instant::now() < deadline, "redis-server still answers after kill");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops redis-server (SIGSTOP) without closing anything: connections stay open and commands
    /// sent meanwhile wait in the socket, as with a stalled primary or a partition. Returns its
    /// pid for [`Redis::resume`].
    pub fn pause(&self) -> u32 {
        // Its own pid: the child is the watchdog's shell.
        let info: String = self.cmd(&["INFO", "server"]);
        let pid = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok())
            .expect("INFO server: process_id");
        super::send_signal(pid, "STOP");
        pid
    }

    /// Lets a paused redis-server go on (SIGCONT); it then runs what it was sent meanwhile.
    pub fn resume(&self, pid: u32) {
        super::send_signal(pid, "CONT");
    }

    /// How many times Redis ran `command` since start or `CONFIG RESETSTAT` (INFO commandstats).
    pub fn calls(&self, command: &str) -> u64 {
        let info: String = self.cmd(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{}:calls=", command.to_ascii_lowercase());
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |rest| rest.split(',').next().unwrap_or("0").parse().expect("calls=<number>"))
    }

    /// Runs one command; panics on failure.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        self.try_cmd(args).unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    pub fn try_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let client = match &self.tls_ca {
            None => redis::Client::open(self.url())?,
            Some(ca) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates { client_tls: None, root_cert: Some(ca.clone()) },
            )?,
        };
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn)
    }

    /// Publishes a raw message; returns how many subscribers received it.
    pub fn publish(&self, channel: &str, message: &str) -> usize {
        self.cmd(&["PUBLISH", channel, message])
    }

    /// Subscribers of `channel` right now (PUBSUB NUMSUB).
    pub fn subscribers(&self, channel: &str) -> usize {
        let reply: (String, usize) = self.cmd(&["PUBSUB", "NUMSUB", channel]);
        reply.1
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
