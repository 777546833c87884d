//! The admin HTTP listener: `/healthz` (the process runs) and `/readyz` (config loaded, every
//! issuer has keys, not shutting down), and `/metrics` (OpenMetrics when the scraper asks for it,
//! as Prometheus does; the Prometheus text format 0.0.4 otherwise).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use super::State;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether the scraper lists OpenMetrics among what it accepts (Prometheus does, first); anyone
/// else gets the Prometheus text format 0.0.4, as Prometheus's own client libraries answer.
fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(
        |media| {
            let mut params = media.split(';').map(str::trim);
            let is_openmetrics =
                params.next().is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"));
            // `q=0` is "not acceptable".
            is_openmetrics && !params.any(|p| p.replace(' ', "").eq_ignore_ascii_case("q=0"))
        },
    )
}

/// At most this many admin connections are open at once. Probes and a scraper need a handful.
/// The listener is often bound to every address (kubelet probes, Prometheus), so without a cap
/// anyone in the cluster could take every file descriptor the process has, and with them the
/// gRPC listener and the key and directory fetches. At the cap, a new connection takes the place
/// of the one that has waited longest for a request (see [`serve`]); when every connection is
/// serving one, the new connection is closed.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a connection over the cap waits for the place of the connection it evicted.
const EVICTION_WAIT: Duration = Duration::from_millis(100);

/// A client must send a request's headers within this long, on a new connection and on an idle
/// kept-alive one alike; a connection that does not is closed (slowloris, forgotten sockets).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// An open admin connection, as the accept loop keeps track of it.
#[derive(Default)]
struct Connection {
    /// A request of it is being answered.
    serving: AtomicBool,
    /// Its task has ended.
    ended: AtomicBool,
    /// It has been told to close, to make room.
    evicted: AtomicBool,
    /// Tells its task to close it.
    evict: Notify,
}

/// Marks its connection ended when the connection's task ends, however it ends.
struct Ends(Arc<Connection>);

impl Drop for Ends {
    fn drop(&mut self) {
        self.0.ended.store(true, Ordering::Release);
    }
}

/// Serves the admin routes until `shutdown` resolves: HTTP/1.1, at most [`MAX_CONNECTIONS`] at
/// once, each closed when it sends no request headers for [`HEADER_READ_TIMEOUT`]. Then stops
/// accepting and lets each connection finish the request it is on.
///
/// At the cap, the connection that has waited longest for a request (new and silent, or kept
/// alive between requests) is closed to make room: whoever holds every place with connections
/// that send nothing (the cap alone let 64 of them shut out the kubelet's probes, renewed every
/// 10 s) only ever holds the newest ones, and a probe, which sends its request at once, gets
/// its answer.
pub async fn serve(listener: TcpListener, app: Router, shutdown: impl Future<Output = ()>) {
    let mut places =
        super::listen::Places::new("admin", MAX_CONNECTIONS, "closing the connection idle the longest");
    // Open connections, oldest first.
    let mut open: VecDeque<Arc<Connection>> = VecDeque::new();
    let (stop, stopped) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let io = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((io, _)) => io,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        open.retain(|c| !c.ended.load(Ordering::Acquire));
        let place = match places.take() {
            Some(place) => place,
            None => {
                // Not one told to close already: each connection over the cap makes room of its own.
                let idle = open
                    .iter()
                    .find(|c| !c.serving.load(Ordering::Acquire) && !c.evicted.load(Ordering::Acquire));
                let Some(idle) = idle else { continue };
                idle.evicted.store(true, Ordering::Release);
                idle.evict.notify_one();
                let Some(place) = places.take_within(EVICTION_WAIT).await else { continue };
                place
            }
        };
        let this = Arc::new(Connection::default());
        open.push_back(this.clone());
        let routes = TowerToHyperService::new(app.clone());
        let tracked = this.clone();
        let service = hyper::service::service_fn(move |req| {
            tracked.serving.store(true, Ordering::Release);
            let answer = hyper::service::Service::call(&routes, req);
            let tracked = tracked.clone();
            async move {
                let answered = answer.await;
                tracked.serving.store(false, Ordering::Release);
                answered
            }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(io), service);
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let _place = place;
            let _ends = Ends(this.clone());
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                // Dropped unanswered: it was waiting for a request (see `serve`).
                _ = this.evict.notified() => return,
                _ = stopped.wait_for(|s| *s) => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
        });
    }
    drop(listener);
    let _ = stop.send(true);
    drop(stopped);
    stop.closed().await;
}

pub fn router(state: Arc<State>) -> Router {
    let metrics_state = state.clone();
    Router::new()
        .route(
            "/metrics",
            get(move |headers: HeaderMap| {
                let state = metrics_state.clone();
                async move {
                    // The directory caches count their entries as they do their housekeeping;
                    // done first, the scrape shows what they hold even when no check came lately.
                    state.policy.load_full().settle_directory_caches().await;
                    let text = crate::telemetry::encode(&state.registry);
                    if wants_openmetrics(&headers) {
                        ([(header::CONTENT_TYPE, OPENMETRICS)], text)
                    } else {
                        (
                            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
                            crate::telemetry::to_prometheus_text(&text),
                        )
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route(
            "/readyz",
            get(move || {
                let state = state.clone();
                async move {
                    if state.is_ready() {
                        (StatusCode::OK, "ready\n")
                    } else if state.is_shutting_down() {
                        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "waiting for issuer keys\n")
                    }
                }
            }),
        )
}
