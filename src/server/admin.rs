//! The admin HTTP listener: `/healthz` (the process runs) and `/readyz` (config loaded, every
//! issuer has keys, not shutting down), and `/metrics` (OpenMetrics when the scraper asks for it,
//! as Prometheus does; the Prometheus text format 0.0.4 otherwise).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

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

/// At most this many admin connections are open at once; more are closed as soon as they are
/// accepted. Probes and a scraper need a handful. The listener is often bound to every address
/// (kubelet probes, Prometheus), so without a cap anyone in the cluster could take every file
/// descriptor the process has, and with them the gRPC listener and the key and directory fetches.
pub const MAX_CONNECTIONS: usize = 64;

/// A client must send a request's headers within this long, on a new connection and on an idle
/// kept-alive one alike; a connection that does not is closed (slowloris, forgotten sockets).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin routes until `shutdown` resolves: HTTP/1.1, at most [`MAX_CONNECTIONS`] at
/// once, each closed when it sends no request headers for [`HEADER_READ_TIMEOUT`]. Then stops
/// accepting and lets each connection finish the request it is on.
pub async fn serve(listener: TcpListener, app: Router, shutdown: impl Future<Output = ()>) {
    let mut places = super::listen::Places::new("admin", MAX_CONNECTIONS);
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
        let Some(place) = places.take() else { continue };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(app.clone()));
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let _place = place;
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
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
