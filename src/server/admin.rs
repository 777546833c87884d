//! The admin HTTP listener: `/healthz` (the process runs) and `/readyz` (config loaded, every
//! issuer has keys, not shutting down). Metrics come here too.

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;

use super::State;

pub fn router(state: Arc<State>) -> Router {
    Router::new().route("/healthz", get(|| async { (StatusCode::OK, "ok\n") })).route(
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
