//! The admin HTTP listener: `/healthz` (the process runs) and `/readyz` (config loaded, every
//! issuer has keys, not shutting down), and `/metrics` (OpenMetrics when the scraper asks for it,
//! as Prometheus does; the Prometheus text format 0.0.4 otherwise).

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::get;

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

pub fn router(state: Arc<State>) -> Router {
    let metrics_state = state.clone();
    Router::new()
        .route(
            "/metrics",
            get(move |headers: HeaderMap| {
                let state = metrics_state.clone();
                async move {
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
