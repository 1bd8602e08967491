//! `/healthz`, `/readyz` and `/metrics`.
//!
//! healthz: the daemon's loop is alive (it answers at all). readyz: 200 once
//! the node holds its lease and every known peer is programmed, 503 before.
//! Peers ferry skips (a route that would collide with one that is not
//! ferry's, an invalid lease) do not hold readiness back, or one forged
//! lease would keep every node unready; each is named on a line of its own
//! after `ready` / `not ready`.

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
    let (code, mut body) = if m.is_ready() {
        (StatusCode::OK, String::from("ready\n"))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, String::from("not ready\n"))
    };
    for line in m.skipped() {
        body.push_str(&line);
        body.push('\n');
    }
    (code, body)
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
