//! The admin HTTP listener: `/healthz` (the process runs) and `/readyz` (config loaded, every
//! issuer has keys, not shutting down), and `/metrics` (Prometheus text).

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;

use super::State;

pub fn router(state: Arc<State>) -> Router {
    let metrics_state = state.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let state = metrics_state.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        crate::telemetry::encode(&state.registry),
                    )
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
