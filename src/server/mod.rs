//! The running sidecar: the gRPC listener (ext_authz `Check` and `grpc.health.v1`), the admin HTTP
//! listener (`/healthz`, `/readyz`), readiness, and graceful shutdown.
//!
//! Shutdown order: readiness goes down (health NOT_SERVING, `/readyz` 503), the listeners stop
//! accepting, in-flight checks finish within `shutdown_grace_seconds`, then `serve` returns.

pub mod admin;
pub mod answer;
pub mod cache_metrics;
pub mod grpc;
pub mod health;
pub mod key_metrics;
pub mod listen;
pub mod place;
pub mod reload;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::check::Policy;
use crate::config::{Config, ListenAddr};
use crate::telemetry::Metrics;
use prometheus_client::registry::Registry;

/// State shared by the listeners. The policy is swapped whole on reload; readers never block.
pub struct State {
    pub policy: ArcSwap<Policy>,
    /// Checks being decided, or decided and their answer not yet written (for load shedding).
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Request bytes received and not yet decoded (`grpc::PENDING_REQUEST_BYTES` bounds them).
    pub pending_request_bytes: std::sync::atomic::AtomicUsize,
    /// Requests being received (`grpc::RECEIVING_REQUESTS` bounds them).
    pub receiving_requests: Arc<std::sync::atomic::AtomicUsize>,
    pub metrics: Arc<Metrics>,
    pub registry: Registry,
    shutting_down: AtomicBool,
    /// Told when shutdown begins, for what waits rather than looks (requests still arriving).
    shutdown_begun: watch::Sender<bool>,
}

impl State {
    pub fn new(policy: Policy, metrics: Arc<Metrics>, mut registry: Registry) -> Arc<State> {
        Arc::new_cyclic(|state| {
            // The issuer-key and cache metrics are read from the serving policy at each scrape.
            let subguard = registry.sub_registry_with_prefix("subguard");
            subguard.register_collector(Box::new(key_metrics::KeyMetrics(state.clone())));
            subguard.register_collector(Box::new(cache_metrics::CacheMetrics(state.clone())));
            State {
                policy: ArcSwap::from_pointee(policy),
                in_flight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
                pending_request_bytes: std::sync::atomic::AtomicUsize::new(0),
                receiving_requests: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
                metrics,
                registry,
                shutting_down: AtomicBool::new(false),
                shutdown_begun: watch::Sender::new(false),
            }
        })
    }

    /// Ready: config loaded, every issuer has usable keys, not shutting down.
    pub fn is_ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Acquire) && self.policy.load().is_ready()
    }

    /// Resolves once shutdown has begun (at once if it has).
    pub fn shutdown_begun(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut begun = self.shutdown_begun.subscribe();
        async move {
            let _ = begun.wait_for(|b| *b).await;
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Starts the revocation subscriber of the serving policy, if it has one not started yet (at
    /// start and after a reload that changed the `revocation` settings).
    pub fn start_revocation(self: &Arc<Self>) {
        if let Some(r) = &self.policy.load().revocation {
            let state = Arc::downgrade(self);
            r.start_subscriber(Arc::new(move || state.upgrade().map(|s| s.policy.load_full())));
        }
    }
}

/// Addresses the listeners actually bound (port 0 resolved).
#[derive(Debug, Clone)]
pub struct Bound {
    pub grpc: ListenAddr,
    pub admin: Option<std::net::SocketAddr>,
}

const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";

/// The runtime `subguard serve` runs on: tokio's multi-thread scheduler with **one** worker,
/// unless `TOKIO_WORKER_THREADS` asks for more (tokio reads it when no count is set here).
///
/// Why one: Envoy multiplexes a worker's checks over one HTTP/2 connection, and a warm check is a
/// few microseconds of work. With a worker per core, every stream the connection spawns is a task
/// the idle worker is woken to steal, and that cross-thread hand-off (futex wake, context switch)
/// cost more than the check itself: measured with `make bench` on 2 cores, subguard's CPU per check
/// fell from about 120 µs to 65 µs with one worker, and its throughput went from 0.9× to above the
/// do-nothing floor server's (docs/benchmarks.md). One core verifies 10 000 to 30 000 fresh
/// signatures a second, more than a sidecar's Envoy sends; a deployment that needs more sets
/// `TOKIO_WORKER_THREADS`.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    builder.enable_all().build()
}

/// Resolves once no check has been in flight for `QUIET` in a row: long enough for a check whose
/// request arrived just before to start (and be counted), and for the last answers to be written.
async fn no_checks_in_flight(state: &State) {
    const QUIET: Duration = Duration::from_millis(500);
    let mut quiet_since: Option<tokio::time::Instant> = None;
    loop {
        let now = tokio::time::Instant::now();
        if state.in_flight.load(Ordering::Acquire) == 0 {
            let since = *quiet_since.get_or_insert(now);
            if now.duration_since(since) >= QUIET {
                return;
            }
        } else {
            quiet_since = None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the sidecar until `shutdown` resolves, then drains. Returns an error only if a listener
/// cannot be bound.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let listen = config.listen.clone();
    let config_path = config.path.clone();
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    // Fingerprinted before anything is built from them: see reload::Baseline.
    let baseline = reload::Baseline::take(&config);
    let policy = Policy::build(config, metrics.clone()).map_err(|e| anyhow::anyhow!(e))?;
    let version = metrics.config_serving(baseline.fingerprint());
    tracing::info!(config_version = %version, "config loaded");
    policy.start_key_refresh();
    let state = State::new(policy, metrics, registry);
    state.start_revocation();

    // Before any listener: its watches and SIGHUP handler are in place before anything can
    // report ready, so no change made after that is missed.
    // Stopped however serve ends: a listener that cannot bind must not leave it reloading (and
    // logging its cancelled reload as refused) while the process exits with the bind error.
    let reloader = AbortOnDrop(reload::spawn(state.clone(), config_path, baseline));

    let (health, health_service) = health::HealthState::new();

    let (stop_tx, stop_rx) = watch::channel(false);
    // The admin listener stops only after the gRPC drain, so probes keep seeing "not ready" (503)
    // rather than a refused connection while checks finish.
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // The two services are routed by grpc::Routes, not tonic's (axum) router: see there.
    let routes = grpc::Routes::new(grpc::AuthorizationService::new(state.clone()), health_service);

    let mut bound = Bound { grpc: listen.grpc.clone(), admin: None };
    // Removes the socket file (if it is still this process's) however serve returns.
    let socket_file: Option<SocketFile>;
    let grpc_task = match &listen.grpc {
        ListenAddr::Tcp(addr) => {
            let listener =
                TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("listen.grpc {addr}: {e}"))?;
            let local = listener.local_addr()?;
            bound.grpc = ListenAddr::Tcp(local);
            socket_file = None;
            tokio::spawn(listen::serve(listener, routes, stopped(stop_rx.clone())))
        }
        ListenAddr::Unix(path) => {
            let lock = lock_socket(path)?;
            clear_stale_socket(path).await?;
            let listener = UnixListener::bind(path)
                .map_err(|e| anyhow::anyhow!("listen.grpc unix://{}: {e}", path.display()))?;
            socket_file = SocketFile::bound(path, lock);
            tokio::spawn(listen::serve(listener, routes, stopped(stop_rx.clone())))
        }
    };
    tracing::info!(listener = "grpc", addr = %bound.grpc, "listening");

    let admin_task = match listen.admin {
        Some(addr) => {
            let listener =
                TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("listen.admin {addr}: {e}"))?;
            let local = listener.local_addr()?;
            bound.admin = Some(local);
            tracing::info!(listener = "admin", addr = %local, "listening");
            let app = admin::router(state.clone());
            let rx = admin_stop_rx.clone();
            Some(tokio::spawn(admin::serve(listener, app, stopped(rx))))
        }
        None => None,
    };

    // Readiness: flip gRPC health to SERVING once every issuer has keys (and back if ever lost).
    let watcher = {
        let state = state.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut serving = false;
            loop {
                let ready = state.is_ready();
                if ready != serving {
                    health.set_ready(ready);
                    tracing::info!(ready, "readiness changed");
                    serving = ready;
                }
                tokio::time::sleep(Duration::from_millis(if ready { 1000 } else { 50 })).await;
            }
        })
    };

    shutdown.await;
    drop(reloader);
    // The grace period of the config serving now (a reload may have changed it).
    let grace = state.policy.load().config.shutdown_grace;
    tracing::info!(
        grace_seconds = grace.as_secs(),
        "shutting down: readiness down, draining in-flight checks"
    );
    state.shutting_down.store(true, Ordering::Release);
    state.shutdown_begun.send_replace(true);
    watcher.abort();
    // NOT_SERVING, and every health Watch ends: the drain waits for checks, not for watchers.
    health.stop();
    let _ = stop_tx.send(true);

    // The drain ends when every connection has closed after its GOAWAY, or, since a client that
    // ignores the GOAWAY (or never finished its HTTP/2 preface) would otherwise hold the process
    // for the whole grace period, once no check has been in flight for a moment.
    let drained = tokio::time::timeout(grace, async {
        tokio::select! {
            result = grpc_task => Some(result),
            () = no_checks_in_flight(&state) => None,
        }
    })
    .await;
    let _ = admin_stop_tx.send(true);
    if let Some(a) = admin_task {
        let _ = tokio::time::timeout(Duration::from_secs(1), a).await;
    }
    match drained {
        Ok(Some(Ok(()))) => tracing::info!("stopped"),
        Ok(Some(Err(e))) => tracing::error!(error = %e, "grpc server task failed"),
        Ok(None) => tracing::info!("stopped: no check in flight; closing connections still open"),
        Err(_) => tracing::warn!(
            in_flight = state.in_flight.load(Ordering::Acquire),
            "grace period over with checks still in flight; exiting"
        ),
    }
    drop(socket_file);
    Ok(())
}

/// The lock of the socket at `path`: `<path>.lock`, held (flock) while this process lives. Two
/// subguards starting at once on a stale socket would otherwise both find it unserved, and the
/// second would remove the first one's new socket. The file stays behind; the lock does not.
fn lock_socket(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = std::path::PathBuf::from(name);
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(
            |e| anyhow::anyhow!("listen.grpc unix://{}: {e}: {}", path.display(), lock_path.display()),
        )?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "listen.grpc unix://{}: another process is serving on this socket (it holds {}); \
             refusing to take it over",
            path.display(),
            lock_path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            anyhow::bail!("listen.grpc unix://{}: cannot lock {}: {e}", path.display(), lock_path.display())
        }
    }
}

/// Makes way for the gRPC socket at `path`: a socket file left by a process that has ended is
/// removed; one that a live process still serves is refused, never taken over (a second subguard
/// on the same path, a debugging run inside the container), since whichever stopped first would
/// then delete the other's socket and leave it unreachable while it still reports ready. Anything
/// else at the path is not ours to delete.
async fn clear_stale_socket(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(_) => {
            anyhow::bail!("listen.grpc unix://{}: a file that is not a socket is in the way", path.display())
        }
        Err(_) => return Ok(()),
    }
    let connected = tokio::time::timeout(Duration::from_secs(1), tokio::net::UnixStream::connect(path)).await;
    match connected {
        // Nobody listens: left by a process that has ended.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            let _ = std::fs::remove_file(path);
            Ok(())
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Ok(Err(e)) => {
            anyhow::bail!("listen.grpc unix://{}: the socket file is in the way ({e})", path.display())
        }
        Ok(Ok(_)) | Err(_) => anyhow::bail!(
            "listen.grpc unix://{}: another process is serving on this socket (a second subguard?); \
             refusing to take it over",
            path.display()
        ),
    }
}

/// The gRPC socket file this process bound, removed when dropped, but only while it is still the
/// same file: one that another process has put in its place since is left alone.
struct SocketFile {
    path: std::path::PathBuf,
    id: (u64, u64),
    /// The socket's lock ([`lock_socket`]), released after the file is removed.
    _lock: std::fs::File,
}

impl SocketFile {
    fn bound(path: &std::path::Path, lock: std::fs::File) -> Option<SocketFile> {
        let id = socket_id(path)?;
        Some(SocketFile { path: path.to_path_buf(), id, _lock: lock })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if socket_id(&self.path) == Some(self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The device and inode of the file at `path` (not following a symlink).
fn socket_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}
