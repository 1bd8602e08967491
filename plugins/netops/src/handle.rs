//! rtnetlink handles bound to one namespace, and the runtime that drives them.
//!
//! Plugins are one-shot processes: one current-thread runtime per process
//! ([`block_on`]) and one [`NsHandle`] per namespace they touch. The socket of
//! a handle is born on a short-lived thread inside the target namespace and
//! then driven from the runtime thread, which never leaves its own namespace.

use crate::{NetNs, NetopsError, Result, in_netns};
use rtnetlink::sys::{Socket, TokioSocket, protocols::NETLINK_ROUTE};
use std::future::Future;
use std::os::fd::{FromRawFd, IntoRawFd};

/// Runs `fut` to completion on a new current-thread runtime with IO enabled
/// (netlink sockets are IO resources; without `enable_io` every request hangs).
pub fn block_on<T>(fut: impl Future<Output = Result<T>>) -> Result<T> {
    Runtime::new()?.block_on(fut)
}

/// A current-thread runtime with IO enabled that can run several futures in
/// turn: handles created under one [`Runtime::block_on`] stay usable in the
/// next (their connection tasks live on the runtime), so a plugin can do
/// blocking work of its own (waiting for its IPAM plugin) between two steps.
pub struct Runtime(tokio::runtime::Runtime);

impl Runtime {
    pub fn new() -> Result<Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map(Runtime)
            .map_err(|e| NetopsError::io("build tokio runtime", "<current>", e))
    }

    /// Runs `fut` to completion on the calling thread.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.0.block_on(fut)
    }
}

/// A netlink route handle whose socket acts in one namespace.
#[derive(Clone)]
pub struct NsHandle {
    pub(crate) handle: rtnetlink::Handle,
    /// The namespace's path (or "host"), for error messages.
    pub(crate) netns: String,
}

impl std::fmt::Debug for NsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NsHandle")
            .field("netns", &self.netns)
            .finish()
    }
}

impl NsHandle {
    /// A handle acting in `ns`. Must be called inside a tokio runtime with IO
    /// enabled (e.g. under [`block_on`]): the connection task is spawned on it.
    pub fn new(ns: &NetNs) -> Result<NsHandle> {
        let name = ns.path().display().to_string();
        // The socket's namespace is fixed when it is created, so create it on
        // a thread that has entered `ns`; that thread exits right after.
        let sock = in_netns(ns, || Socket::new(NETLINK_ROUTE))
            .map_err(|e| NetopsError::io("create netlink socket", &name, e))?;
        Self::from_socket(sock, name)
    }

    /// [`NsHandle::new`], also running `f` inside `ns` on the same
    /// short-lived thread (a sysctl read, say): one thread instead of two.
    pub fn new_with<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> Result<(NsHandle, T)> {
        let name = ns.path().display().to_string();
        let (sock, out) = in_netns(ns, || Ok((Socket::new(NETLINK_ROUTE)?, f())))
            .map_err(|e| NetopsError::io("create netlink socket", &name, e))?;
        Ok((Self::from_socket(sock, name)?, out))
    }

    /// A handle acting in the calling thread's own namespace.
    pub fn host() -> Result<NsHandle> {
        let sock = Socket::new(NETLINK_ROUTE)
            .map_err(|e| NetopsError::io("create netlink socket", "host", e))?;
        Self::from_socket(sock, "host".to_string())
    }

    fn from_socket(sock: Socket, netns: String) -> Result<NsHandle> {
        let rt = tokio::runtime::Handle::try_current().map_err(|e| {
            NetopsError::io(
                "NsHandle needs a tokio runtime with IO enabled (use block_on)",
                &netns,
                std::io::Error::other(e),
            )
        })?;
        let _guard = rt.enter();
        // SAFETY: `sock` owned the fd and gives it up here; nothing else holds it.
        let sock = unsafe { TokioSocket::from_raw_fd(sock.into_raw_fd()) };
        let (conn, handle, _) = rtnetlink::from_socket(sock);
        // Without this task nothing reads the socket and every request hangs.
        rt.spawn(conn);
        Ok(NsHandle { handle, netns })
    }

    /// The namespace this handle acts in ("host" for [`NsHandle::host`]).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub(crate) fn err(
        &self,
        op: &'static str,
        ifname: impl Into<String>,
        source: rtnetlink::Error,
    ) -> NetopsError {
        NetopsError::Netlink {
            op,
            ifname: ifname.into(),
            netns: self.netns.clone(),
            source: Box::new(source),
        }
    }
}
