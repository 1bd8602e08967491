//! Kernel change notifications (`ip monitor link route neigh`): the netlink
//! multicast groups for links, IPv4 routes and neighbours of one namespace.
//!
//! The daemon does not trust events to carry state: it uses them only as
//! "something changed, reconcile soon", so a lost event (receive buffer
//! overrun) is reported as [`KernelEvent::Overrun`] and means the same thing.

use crate::route::Ipv4Route;
use crate::{NetNs, NetopsError, Result, in_netns};
use futures::StreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::neighbour::{NeighbourFlags, NeighbourState};
use rtnetlink::packet_route::{AddressFamily, route::RouteAttribute, route::RouteMessage};
use rtnetlink::sys::{Socket, SocketAddr, TokioSocket, protocols::NETLINK_ROUTE};
use std::os::fd::{FromRawFd, IntoRawFd};

// RTNLGRP_* numbers; group n is bit n-1 of the bind mask.
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

/// Receive buffer asked for: a reconcile of thousands of entries makes as
/// many notifications at once. (The kernel caps it at `net.core.rmem_max`;
/// an overrun is not fatal, see [`KernelEvent::Overrun`].)
const RCVBUF: usize = 4 << 20;

/// One notification, reduced to what a reconciler needs to decide whether
/// to look again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    /// RTM_NEWLINK / RTM_DELLINK.
    Link { index: u32, deleted: bool },
    /// RTM_NEWROUTE / RTM_DELROUTE of an IPv4 unicast route (`route` is
    /// `None` for other kinds: local, broadcast, multipath, …).
    Ipv4Route {
        route: Option<Ipv4Route>,
        table: u32,
        deleted: bool,
    },
    /// RTM_NEWROUTE / RTM_DELROUTE of an IPv6 route (dual-stack pod subnets).
    Ipv6Route { table: u32, deleted: bool },
    /// RTM_NEWNEIGH / RTM_DELNEIGH. `fdb` for bridge-family (fdb) entries,
    /// `own` for NTF_SELF ones (a VXLAN device's own fdb, not a bridge's
    /// learned MACs), `ipv4` for ARP entries. A deleted entry is reported
    /// with the state it was moved to first (FAILED for `ip neigh del`).
    Neighbour {
        ifindex: u32,
        fdb: bool,
        own: bool,
        ipv4: bool,
        /// An NDP entry.
        ipv6: bool,
        permanent: bool,
        deleted: bool,
    },
    /// Notifications were lost: resynchronise from dumps.
    Overrun,
}

/// A subscription to link, IPv4 route and neighbour notifications.
pub struct Monitor {
    rx: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").finish_non_exhaustive()
    }
}

impl Monitor {
    /// Subscribes in `ns`, or in the calling thread's namespace for `None`.
    /// Must be called inside a tokio runtime with IO enabled.
    pub fn new(ns: Option<&NetNs>) -> Result<Monitor> {
        let name = ns.map_or("host".to_string(), |n| n.path().display().to_string());
        let open = || -> std::io::Result<Socket> {
            let mut s = Socket::new(NETLINK_ROUTE)?;
            let groups = [
                RTNLGRP_LINK,
                RTNLGRP_NEIGH,
                RTNLGRP_IPV4_ROUTE,
                RTNLGRP_IPV6_ROUTE,
            ]
            .iter()
            .fold(0u32, |m, g| m | (1 << (g - 1)));
            s.bind(&SocketAddr::new(0, groups))?;
            // Best effort: the default (~200 KiB) still works, with overruns.
            let _ = s.set_rx_buf_sz(RCVBUF);
            Ok(s)
        };
        let sock = match ns {
            Some(ns) => in_netns(ns, open),
            None => open(),
        }
        .map_err(|e| NetopsError::io("open netlink monitor socket", &name, e))?;
        let rt = tokio::runtime::Handle::try_current().map_err(|e| {
            NetopsError::io(
                "Monitor needs a tokio runtime with IO enabled",
                &name,
                std::io::Error::other(e),
            )
        })?;
        let _guard = rt.enter();
        // SAFETY: `sock` owned the fd and gives it up here.
        let sock = unsafe { TokioSocket::from_raw_fd(sock.into_raw_fd()) };
        let (conn, _handle, rx) = rtnetlink::from_socket(sock);
        // The connection task ends when `rx` (and the handle, dropped here)
        // are gone.
        rt.spawn(conn);
        Ok(Monitor { rx })
    }

    /// The next notification; `None` when the socket is gone.
    pub async fn next(&mut self) -> Option<KernelEvent> {
        loop {
            let (msg, _) = self.rx.next().await?;
            if let Some(ev) = event_of(msg) {
                return Some(ev);
            }
        }
    }
}

fn event_of(msg: NetlinkMessage<RouteNetlinkMessage>) -> Option<KernelEvent> {
    let inner = match msg.payload {
        NetlinkPayload::Overrun(_) => return Some(KernelEvent::Overrun),
        NetlinkPayload::InnerMessage(m) => m,
        _ => return None,
    };
    Some(match inner {
        RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => {
            let deleted = matches!(msg_kind(&msg.header), Kind::Del);
            KernelEvent::Link {
                index: l.header.index,
                deleted,
            }
        }
        RouteNetlinkMessage::NewRoute(r) => route_event(&r, false)?,
        RouteNetlinkMessage::DelRoute(r) => route_event(&r, true)?,
        RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
            KernelEvent::Neighbour {
                ifindex: n.header.ifindex,
                fdb: n.header.family == AddressFamily::Bridge,
                own: n.header.flags.contains(NeighbourFlags::Own),
                ipv4: n.header.family == AddressFamily::Inet,
                ipv6: n.header.family == AddressFamily::Inet6,
                permanent: n.header.state == NeighbourState::Permanent,
                deleted: matches!(msg_kind(&msg.header), Kind::Del),
            }
        }
        _ => return None,
    })
}

enum Kind {
    New,
    Del,
}

fn msg_kind(h: &rtnetlink::packet_core::NetlinkHeader) -> Kind {
    // RTM_DELLINK = 17, RTM_DELROUTE = 25, RTM_DELNEIGH = 29.
    match h.message_type {
        17 | 25 | 29 => Kind::Del,
        _ => Kind::New,
    }
}

fn route_event(r: &RouteMessage, deleted: bool) -> Option<KernelEvent> {
    if r.header.address_family == AddressFamily::Inet6 {
        let table = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(r.header.table));
        return Some(KernelEvent::Ipv6Route { table, deleted });
    }
    if r.header.address_family != AddressFamily::Inet {
        return None;
    }
    let parsed = Ipv4Route::from_message(r);
    let table = parsed
        .as_ref()
        .map(|(_, t)| *t)
        .unwrap_or(u32::from(r.header.table));
    Some(KernelEvent::Ipv4Route {
        route: parsed.map(|(r, _)| r),
        table,
        deleted,
    })
}
