//! `/healthz`, `/readyz` and `/metrics`.
//!
//! healthz: the daemon's loop is alive (it answers at all). readyz: 200 once
//! the node holds its lease and every known peer is programmed, 503 before.

use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(m): State<Metrics>) -> impl IntoResponse {
    if m.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(m): State<Metrics>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}

/// Binds `addr` (so a busy port fails the start, not later) and returns the
/// server future and the bound address.
pub async fn bind(
    addr: SocketAddr,
    m: Metrics,
) -> std::io::Result<(impl Future<Output = std::io::Result<()>>, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(m);
    Ok((async move { axum::serve(listener, app).await }, local))
}
