//! Many netlink requests in one `sendmsg`, their acks read in bulk.
//!
//! The kernel handles rtnetlink requests synchronously inside `sendmsg`, one
//! message after the other in the order of the buffer, and queues one ack per
//! message (each request carries its own sequence number and `NLM_F_ACK`).
//! So a buffer of a few hundred requests costs one `sendmsg` and a
//! `recvmmsg` or two, where `ip -batch` spends a `sendmsg` and a `recvmsg`
//! per line and an rtnetlink [`NsHandle`] request several syscalls and a
//! future. Every request is answered: a failure is mapped back to its
//! request by sequence number, the others still run.
//!
//! The socket is born in the handle's namespace the way [`NsHandle::new`]
//! makes its own (on a short-lived thread that entered it). [`Batch::run`]
//! is async: the `sendmsg` takes as long as the kernel works on the requests
//! (which it would spend on them anyway; callers keep the batches small,
//! [`Batch::MAX_OPS`], and yield between them), and acks are read without
//! blocking. When acks are missing, the wait for them is an await on the
//! socket's readiness (tokio's `AsyncFd`) bounded by a tokio timer, never a
//! blocking `poll`: on ferryd's single-threaded runtime a blocking wait of up
//! to the ack timeout stalled every other task, HTTP included. So `run` needs
//! a tokio runtime with IO and time enabled.
//!
//! Lost acks: when the receive buffer overflows the kernel drops acks (the
//! requests themselves were carried out). Those requests are reported as
//! ENOBUFS, like a request the kernel had no memory for; every [`BatchOp`] is
//! idempotent (a replace, or a delete whose "not there" is `Ok(false)`), so
//! the caller retries them.

use crate::neigh::{fdb_key, mac_str, neighbour_key, permanent_fdb, permanent_neighbour};
use crate::{FdbEntry, Ipv4Route, Ipv6Route, NetNs, NetopsError, NsHandle, Result, in_netns};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;

/// One idempotent change of the overlay's kernel state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    /// `ip neigh replace <ip> lladdr <mac> dev <ifindex> nud permanent`.
    ReplaceNeighbour {
        ifindex: u32,
        ip: IpAddr,
        mac: [u8; 6],
    },
    /// `bridge fdb replace <mac> dev <ifindex> dst <dst> self permanent`.
    ReplaceFdb {
        ifindex: u32,
        mac: [u8; 6],
        dst: IpAddr,
    },
    /// `ip route replace <route>` with its protocol.
    ReplaceRoute(Ipv4Route),
    /// `ip route add <route>` with its protocol (NLM_F_EXCL): EEXIST rather
    /// than taking over someone else's route to the same destination.
    CreateRoute(Ipv4Route),
    /// `ip -6 route add <route>` with its protocol (NLM_F_EXCL).
    CreateRoute6(Ipv6Route),
    /// `ip route del <route>` (protocol included).
    DeleteRoute(Ipv4Route),
    /// `bridge fdb del <mac> dev <ifindex> [dst <dst>] self`.
    DeleteFdb(FdbEntry),
    /// `ip neigh del <ip> dev <ifindex>`.
    DeleteNeighbour { ifindex: u32, ip: IpAddr },
    /// `ip -6 route replace <route>` with its protocol.
    ReplaceRoute6(Ipv6Route),
    /// `ip -6 route del <route>` (protocol included).
    DeleteRoute6(Ipv6Route),
}

impl BatchOp {
    fn message(&self) -> NetlinkMessage<RouteNetlinkMessage> {
        let create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        let delete = NLM_F_REQUEST | NLM_F_ACK;
        let exclusive = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        let (inner, flags) = match self {
            BatchOp::ReplaceNeighbour { ifindex, ip, mac } => (
                RouteNetlinkMessage::NewNeighbour(permanent_neighbour(*ifindex, *ip, *mac)),
                create,
            ),
            BatchOp::ReplaceRoute6(r) => (RouteNetlinkMessage::NewRoute(r.message()), create),
            BatchOp::DeleteRoute6(r) => (RouteNetlinkMessage::DelRoute(r.message()), delete),
            BatchOp::ReplaceFdb { ifindex, mac, dst } => (
                RouteNetlinkMessage::NewNeighbour(permanent_fdb(*ifindex, *mac, *dst)),
                create,
            ),
            BatchOp::ReplaceRoute(r) => (RouteNetlinkMessage::NewRoute(r.message()), create),
            BatchOp::CreateRoute(r) => (RouteNetlinkMessage::NewRoute(r.message()), exclusive),
            BatchOp::CreateRoute6(r) => (RouteNetlinkMessage::NewRoute(r.message()), exclusive),
            BatchOp::DeleteRoute(r) => (RouteNetlinkMessage::DelRoute(r.message()), delete),
            BatchOp::DeleteFdb(e) => (RouteNetlinkMessage::DelNeighbour(fdb_key(e)), delete),
            BatchOp::DeleteNeighbour { ifindex, ip } => (
                RouteNetlinkMessage::DelNeighbour(neighbour_key(*ifindex, *ip)),
                delete,
            ),
        };
        let mut m = NetlinkMessage::from(inner);
        m.header.flags = flags;
        m
    }

    /// The errno that means "was not there" for a delete.
    fn absent(&self) -> Option<i32> {
        match self {
            BatchOp::DeleteRoute(_) | BatchOp::DeleteRoute6(_) => Some(libc::ESRCH),
            BatchOp::DeleteFdb(_) | BatchOp::DeleteNeighbour { .. } => Some(libc::ENOENT),
            _ => None,
        }
    }

    /// What it does, for error messages.
    pub fn describe(&self) -> String {
        match self {
            BatchOp::ReplaceNeighbour { ifindex, ip, mac } => {
                format!(
                    "replace neighbour {ip} lladdr {} dev #{ifindex}",
                    mac_str(mac)
                )
            }
            BatchOp::ReplaceFdb { ifindex, mac, dst } => {
                format!(
                    "replace fdb entry {} dst {dst} dev #{ifindex}",
                    mac_str(mac)
                )
            }
            BatchOp::ReplaceRoute(r) => format!("replace route {}", r.describe()),
            BatchOp::CreateRoute(r) => format!("add route {}", r.describe()),
            BatchOp::CreateRoute6(r) => format!("add route {}", r.describe()),
            BatchOp::DeleteRoute(r) => format!("delete route {}", r.describe()),
            BatchOp::DeleteFdb(e) => format!(
                "delete fdb entry {}{} dev #{}",
                mac_str(&e.mac),
                e.dst.map(|d| format!(" dst {d}")).unwrap_or_default(),
                e.ifindex
            ),
            BatchOp::DeleteNeighbour { ifindex, ip } => {
                format!("delete neighbour {ip} dev #{ifindex}")
            }
            BatchOp::ReplaceRoute6(r) => format!("replace route {}", r.describe()),
            BatchOp::DeleteRoute6(r) => format!("delete route {}", r.describe()),
        }
    }
}

/// `NLMSG_ERROR`: the type of an ack.
const NLMSG_ERROR: u16 = 2;

/// Receive slots per `recvmmsg`, each big enough for an ack's header and
/// errno (with NETLINK_CAP_ACK an error ack does not echo the request; a
/// longer datagram is truncated, which loses nothing needed here).
const SLOTS: usize = 128;
const SLOT_LEN: usize = 256;

/// Kernel receive buffer asked for (SO_RCVBUFFORCE, else SO_RCVBUF): each ack
/// is a small skb of about 1 KiB of truesize, so this holds the acks of a
/// whole batch with room to spare. It is a limit, not an allocation.
const RCVBUF: usize = 2 << 20;

/// Acks that do not show up in this long count as failed (ETIMEDOUT).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// A netlink socket for batches, acting in one namespace.
pub struct Batch {
    /// The socket registered with the runtime's reactor, made at the first
    /// wait (so a `Batch` can be made outside a runtime). Declared before
    /// `sock`: it is deregistered before the socket closes.
    readiness: Option<AsyncFd<SockFd>>,
    sock: Socket,
    netns: String,
    seq: u32,
    send: Vec<u8>,
    recv: Vec<u8>,
    /// Acks missing this long after the send count as failed.
    ack_timeout: Duration,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("netns", &self.netns)
            .finish_non_exhaustive()
    }
}

impl NsHandle {
    /// A [`Batch`] socket acting in this handle's namespace: for a handle of
    /// [`NsHandle::host`], the calling thread's (which, by the netns rule, is
    /// the runtime's); else the namespace at the handle's path, entered by a
    /// short-lived thread.
    pub fn batch(&self) -> Result<Batch> {
        let create = || -> io::Result<Socket> {
            let mut s = Socket::new(NETLINK_ROUTE)?;
            s.bind_auto()?;
            s.connect(&SocketAddr::new(0, 0))?;
            Ok(s)
        };
        let sock = if self.netns == "host" {
            create()
        } else {
            in_netns(&NetNs::open(&self.netns)?, create)
        }
        .map_err(|e| NetopsError::io("create netlink batch socket", &self.netns, e))?;
        // Error acks without the request echoed: smaller, and never truncated.
        let _ = sock.set_cap_ack(true);
        set_rcvbuf(&sock, RCVBUF);
        Ok(Batch {
            readiness: None,
            sock,
            netns: self.netns.clone(),
            seq: 0,
            send: Vec::new(),
            recv: vec![0; SLOTS * SLOT_LEN],
            ack_timeout: ACK_TIMEOUT,
        })
    }
}

/// The batch socket's descriptor, for [`AsyncFd`] (the socket itself stays
/// owned by the [`Batch`]).
struct SockFd(RawFd);

impl AsRawFd for SockFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

fn set_rcvbuf(sock: &Socket, bytes: usize) {
    let v = bytes as libc::c_int;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a valid fd, and a pointer to a c_int of the size given.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
}

impl Batch {
    /// The most requests [`Batch::run`] sends in one buffer.
    pub const MAX_OPS: usize = 512;

    /// The namespace it acts in ("host" or a path), for messages.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Sends `ops` (in buffers of at most [`Batch::MAX_OPS`] requests, in
    /// order) and returns one result per op, in order: `Ok(true)` done,
    /// `Ok(false)` a delete of something that was not there, `Err` the
    /// kernel's refusal (`errno()` matchable; ENOBUFS also for a lost ack).
    ///
    /// Cancel safety: dropping the future between two buffers loses nothing;
    /// dropped while waiting for acks, the requests were sent and their late
    /// acks are ignored by the next run (their sequence numbers are old).
    pub async fn run(&mut self, ops: &[BatchOp]) -> Vec<Result<bool>> {
        let mut out = Vec::with_capacity(ops.len());
        for chunk in ops.chunks(Self::MAX_OPS) {
            let codes = self.exchange(chunk).await;
            for (op, code) in chunk.iter().zip(codes) {
                out.push(match code {
                    Ok(0) => Ok(true),
                    Ok(errno) if op.absent() == Some(errno) => Ok(false),
                    Ok(errno) => Err(self.fail(op, io::Error::from_raw_os_error(errno))),
                    Err(e) => Err(self.fail(op, e)),
                });
            }
        }
        out
    }

    fn fail(&self, op: &BatchOp, source: io::Error) -> NetopsError {
        NetopsError::Io {
            op: op.describe(),
            netns: self.netns.clone(),
            source,
        }
    }

    /// One buffer out, its acks in: per op the errno of its ack (0 = done),
    /// or the error that kept it from being answered.
    async fn exchange(&mut self, ops: &[BatchOp]) -> Vec<io::Result<i32>> {
        let first = self.seq.wrapping_add(1);
        self.send.clear();
        for op in ops {
            self.seq = self.seq.wrapping_add(1);
            let mut m = op.message();
            m.header.sequence_number = self.seq;
            m.finalize();
            let at = self.send.len();
            self.send.resize(at + m.buffer_len(), 0);
            m.serialize(&mut self.send[at..]);
        }
        let mut codes: Vec<Option<io::Result<i32>>> = (0..ops.len()).map(|_| None).collect();
        let fail_all = |codes: &mut Vec<Option<io::Result<i32>>>, errno: i32| {
            for c in codes.iter_mut().filter(|c| c.is_none()) {
                *c = Some(Err(io::Error::from_raw_os_error(errno)));
            }
        };
        if let Err(e) = self.sock.send(&self.send, 0) {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            fail_all(&mut codes, errno);
            return codes.into_iter().map(|c| c.expect("set")).collect();
        }
        let mut missing = ops.len();
        let deadline = Instant::now() + self.ack_timeout;
        while missing > 0 {
            match self.recv_acks(first, &mut codes) {
                Ok(0) => {}
                Ok(n) => {
                    missing -= n;
                    continue;
                }
                Err(e) => {
                    // The socket overran (acks were dropped) or broke: the
                    // requests not answered are unknown, the caller retries.
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    fail_all(&mut codes, errno);
                    break;
                }
            }
            // Nothing queued. The kernel answers inside sendmsg, so this is a
            // dropped ack (reported as a pending ENOBUFS) or, in theory, a
            // late one: wait a little for it.
            if let Some(errno) = self.take_error() {
                fail_all(&mut codes, errno);
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                fail_all(&mut codes, libc::ETIMEDOUT);
                break;
            }
            if let Err(e) = self.wait_readable(deadline - now).await {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                fail_all(&mut codes, errno);
                break;
            }
        }
        codes.into_iter().map(|c| c.expect("set")).collect()
    }

    /// Reads every queued datagram (without blocking) and records the acks
    /// of this buffer's sequence numbers. Returns how many it recorded.
    fn recv_acks(
        &mut self,
        first: u32,
        codes: &mut [Option<io::Result<i32>>],
    ) -> io::Result<usize> {
        let mut recorded = 0;
        loop {
            let mut iov: Vec<libc::iovec> = self
                .recv
                .chunks_mut(SLOT_LEN)
                .map(|s| libc::iovec {
                    iov_base: s.as_mut_ptr().cast(),
                    iov_len: s.len(),
                })
                .collect();
            // SAFETY: all-zero mmsghdrs are valid; each then points at one iovec.
            let mut hdrs: Vec<libc::mmsghdr> = iov
                .iter_mut()
                .map(|v| {
                    let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    h.msg_hdr.msg_iov = v;
                    h.msg_hdr.msg_iovlen = 1;
                    h
                })
                .collect();
            // SAFETY: `hdrs` describes SLOTS buffers that live through the call.
            let n = unsafe {
                libc::recvmmsg(
                    self.sock.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    hdrs.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(recorded),
                    Some(libc::EINTR) => continue,
                    _ => Err(e),
                };
            }
            for (h, slot) in hdrs.iter().zip(self.recv.chunks(SLOT_LEN)).take(n as usize) {
                let len = (h.msg_len as usize).min(SLOT_LEN);
                if let Some((seq, errno)) = parse_ack(&slot[..len]) {
                    let i = seq.wrapping_sub(first) as usize;
                    if let Some(c) = codes.get_mut(i)
                        && c.is_none()
                    {
                        *c = Some(Ok(errno));
                        recorded += 1;
                    }
                }
            }
            if (n as usize) < SLOTS {
                return Ok(recorded);
            }
        }
    }

    /// Waits (without blocking the thread) until a datagram or an error is
    /// queued, or `at_most` passed; either way the caller looks again.
    async fn wait_readable(&mut self, at_most: Duration) -> io::Result<()> {
        let fd = self.sock.as_raw_fd();
        let readiness = match &mut self.readiness {
            Some(r) => r,
            none => {
                // SAFETY: `fd` is `self.sock`'s, which stays open and the
                // same until after `readiness` is dropped (field order).
                let r = unsafe {
                    AsyncFd::register_with_interest(SockFd(fd), tokio::io::Interest::READABLE)
                };
                none.insert(r.map_err(|e| e.into_parts().1)?)
            }
        };
        if let Ok(ready) = tokio::time::timeout(at_most, readiness.readable()).await {
            // Cleared before the caller reads: what arrives after that read
            // makes the socket ready again.
            ready?.clear_ready();
        }
        Ok(())
    }

    /// The socket's pending error (SO_ERROR, which clears it).
    fn take_error(&self) -> Option<i32> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid fd, and a c_int with its size.
        let r = unsafe {
            libc::getsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (r == 0 && v != 0).then_some(v)
    }
}

/// `(sequence number, errno)` of an ack (`NLMSG_ERROR`; 0 = success).
fn parse_ack(b: &[u8]) -> Option<(u32, i32)> {
    if b.len() < 20 {
        return None;
    }
    let kind = u16::from_ne_bytes([b[4], b[5]]);
    if kind != NLMSG_ERROR {
        return None;
    }
    let seq = u32::from_ne_bytes(b[8..12].try_into().ok()?);
    let code = i32::from_ne_bytes(b[16..20].try_into().ok()?);
    Some((seq, -code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A batch socket whose requests go to another user socket (`peer`),
    /// which never answers: every ack is missing, as when the kernel is late.
    fn unanswered_batch() -> Option<(Batch, Socket)> {
        if !nix::unistd::Uid::effective().is_root() {
            // Sending to a user port of NETLINK_ROUTE needs CAP_NET_ADMIN.
            assert!(std::env::var_os("CI").is_none(), "needs root");
            eprintln!("SKIPPED: needs root");
            return None;
        }
        let mut peer = Socket::new(NETLINK_ROUTE).expect("netlink socket");
        let peer_addr = peer.bind_auto().expect("bind");
        let mut sock = Socket::new(NETLINK_ROUTE).expect("netlink socket");
        sock.bind_auto().expect("bind");
        sock.connect(&SocketAddr::new(peer_addr.port_number(), 0))
            .expect("connect to the peer");
        let batch = Batch {
            readiness: None,
            sock,
            netns: "test".into(),
            seq: 0,
            send: Vec::new(),
            recv: vec![0; SLOTS * SLOT_LEN],
            ack_timeout: Duration::from_millis(600),
        };
        Some((batch, peer))
    }

    /// Waiting for acks must not hold the runtime's only thread: the other
    /// tasks (ferryd's HTTP server, its etcd client) keep running.
    #[test]
    fn waiting_for_acks_leaves_the_runtime_to_other_tasks() {
        let Some((mut batch, _peer)) = unanswered_batch() else {
            return;
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ticks = Arc::new(AtomicU32::new(0));
        let results = rt.block_on(async {
            let t = ticks.clone();
            let ticker = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    t.fetch_add(1, Ordering::Relaxed);
                }
            });
            tokio::task::yield_now().await;
            let op = BatchOp::DeleteNeighbour {
                ifindex: 1,
                ip: "192.0.2.1".parse().unwrap(),
            };
            let started = Instant::now();
            let results = batch.run(&[op]).await;
            let waited = started.elapsed();
            ticker.abort();
            assert!(waited >= Duration::from_millis(500), "{waited:?}");
            results
        });
        let err = results[0].as_ref().expect_err("no ack came");
        assert!(err.is_errno(libc::ETIMEDOUT), "{err}");
        let ticks = ticks.load(Ordering::Relaxed);
        // About 60 in 600 ms; none when the wait blocks the thread.
        assert!(
            ticks >= 20,
            "the runtime ran other tasks only {ticks} times"
        );
    }

    #[test]
    fn parses_an_ack() {
        let mut b = vec![0u8; 36];
        b[0..4].copy_from_slice(&36u32.to_ne_bytes());
        b[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b[8..12].copy_from_slice(&7u32.to_ne_bytes());
        b[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        assert_eq!(parse_ack(&b), Some((7, libc::EEXIST)));
        b[4..6].copy_from_slice(&3u16.to_ne_bytes());
        assert_eq!(parse_ack(&b), None);
        assert_eq!(parse_ack(&b[..10]), None);
    }
}
