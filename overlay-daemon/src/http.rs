//! `/healthz`, `/readyz` and `/metrics`.
//!
//! healthz: the daemon's loop is alive (it answers at all). readyz: 200 once
//! the node holds its lease, has renewed it within its TTL, and every known
//! peer is programmed; 503 before, and 503 with the reason when the lease
//! has not been renewed within its TTL. Peers ferry skips (a route that
//! would collide with one that is not ferry's, an invalid lease) do not hold
//! readiness back, or one forged lease would keep every node unready; each
//! is named on a line of its own after `ready` / `not ready`.
//!
//! The port may be reachable by clients ferry does not trust (anything that
//! can reach the node's address when `--listen` is 0.0.0.0), so no client
//! may hold the daemon's resources for long: 3000 half-sent requests once
//! took every file descriptor, and the loop could no longer rewrite the
//! conflist. Hence:
//! - at most [`HttpLimits::max_connections`] connections; a new one beyond
//!   that closes the oldest (a slow client cannot lock out the probes: a
//!   prober's connection is the newest and is answered at once);
//! - a request's head must arrive within [`HttpLimits::header_timeout`] of
//!   the connection (or of the previous answer on a kept-alive connection);
//! - a connection on which no byte moves either way for
//!   [`HttpLimits::idle_timeout`] is closed;
//! - no connection lives longer than [`MAX_CONNECTION_AGE`];
//! - accept errors (EMFILE included) never stop the server.
//!
//! [`raise_nofile_limit`] and [`HttpLimits::fit_to_nofile`] keep the cap far
//! below the process's file limit, so the control loop always has
//! descriptors for etcd, netlink and the files it writes.

use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, warn};

/// The longest any connection is kept, whatever it does.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// Bounds on what HTTP clients can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

impl HttpLimits {
    /// The limits with the connection cap lowered, if need be, to an eighth
    /// of `nofile` (the process's file limit): the rest is the loop's.
    pub fn fit_to_nofile(mut self, nofile: u64) -> HttpLimits {
        let most = usize::try_from(nofile / 8).unwrap_or(usize::MAX).max(1);
        if self.max_connections > most {
            warn!(
                asked = self.max_connections,
                allowed = most,
                nofile,
                "HTTP connection cap lowered to an eighth of the file limit"
            );
            self.max_connections = most;
        }
        self
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard one (many peers mean many
/// netlink and etcd descriptors; the HTTP cap is sized from it). Returns the
/// soft limit in effect.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: a valid pointer to an rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(raised.rlim_cur);
        }
        warn!(
            soft = lim.rlim_cur,
            hard = lim.rlim_max,
            error = %io::Error::last_os_error(),
            "cannot raise the file limit"
        );
    }
    Ok(lim.rlim_cur)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(m): State<Metrics>) -> impl IntoResponse {
    let (code, mut body) = if let Some(why) = m.lease_overdue() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
    } else if m.is_ready() {
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
    limits: HttpLimits,
) -> io::Result<(impl Future<Output = ()>, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(m);
    Ok((serve(listener, app, limits), local))
}

/// The open connections, oldest first; dropping a sender closes its connection.
type Open = Arc<Mutex<BTreeMap<u64, oneshot::Sender<()>>>>;

async fn serve(listener: TcpListener, app: Router, limits: HttpLimits) {
    let open: Open = Arc::default();
    let max = limits.max_connections.max(1);
    let mut next_id: u64 = 0;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS or an aborted handshake: the
                // listener stays; a short pause keeps a full table from
                // spinning the loop.
                warn!("http accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        next_id += 1;
        let id = next_id;
        let (close, closed) = oneshot::channel();
        let evicted = {
            let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
            let mut evicted = 0;
            while open.len() >= max {
                // Dropping the sender ends that connection's task.
                open.pop_first();
                evicted += 1;
            }
            open.insert(id, close);
            evicted
        };
        if evicted > 0 {
            debug!(%peer, evicted, "http connection cap reached: closed the oldest");
            // Let the evicted connections' tasks run and close their sockets
            // before more are accepted.
            tokio::task::yield_now().await;
        }
        let app = app.clone();
        let open = open.clone();
        tokio::spawn(async move {
            connection(stream, app, limits, closed).await;
            open.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
    }
}

/// Serves one connection until it ends, is evicted (`closed` fires), idles
/// too long or grows too old.
async fn connection(
    stream: TcpStream,
    app: Router,
    limits: HttpLimits,
    closed: oneshot::Receiver<()>,
) {
    let born = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Tracked {
        inner: stream,
        born,
        activity: activity.clone(),
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    let conn = http.serve_connection(io, TowerToHyperService::new(app));
    let idle = async {
        loop {
            let last = born + Duration::from_millis(activity.load(Ordering::Relaxed));
            let due = last + limits.idle_timeout;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    };
    tokio::select! {
        r = conn => if let Err(e) = r { debug!("http connection: {e}") },
        _ = closed => {}
        _ = idle => debug!("http connection idle: closed"),
        _ = tokio::time::sleep_until(born + MAX_CONNECTION_AGE) => debug!("http connection too old: closed"),
    }
}

/// A TCP stream that records when a byte last moved (milliseconds since
/// `born`), for the idle timeout.
struct Tracked {
    inner: TcpStream,
    born: Instant,
    activity: Arc<AtomicU64>,
}

impl Tracked {
    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity.store(ms, Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stays_far_below_the_file_limit() {
        let l = HttpLimits::default();
        assert_eq!(l.fit_to_nofile(1 << 20).max_connections, 64);
        assert_eq!(l.fit_to_nofile(256).max_connections, 32);
        assert_eq!(l.fit_to_nofile(3).max_connections, 1);
    }
}
