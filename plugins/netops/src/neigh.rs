//! Neighbours (ARP entries) and bridge fdb entries of one link, as the
//! overlay needs them: permanent, replaced in place, dumped per link.
//!
//! On a VXLAN device the two together say where a remote pod subnet lives:
//! the neighbour maps the remote subnet's `.0` to the remote VTEP MAC, the
//! fdb entry maps that MAC to the remote node's underlay IP
//! (`ip neigh replace … nud permanent`, `bridge fdb replace … self permanent`).
//!
//! Ownership: the neighbours ferry writes carry [`FERRY_ROUTE_PROTO`] as
//! their protocol (`NDA_PROTOCOL`, `ip neigh … protocol 70`), so the daemon
//! tells them from entries someone else put on its device. VXLAN fdb entries
//! have no protocol; the daemon recognises its own by their MAC (see
//! ferryd's dataplane).

use crate::link::is_errno;
use crate::{FERRY_ROUTE_PROTO, NsHandle, Result, RouteFamily};
use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::RouteProtocol;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A neighbour entry of a link (`ip -4|-6 neigh show dev <link>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpNeighbour<A: RouteFamily> {
    pub ifindex: u32,
    pub ip: A,
    /// Absent for unresolved entries (INCOMPLETE, FAILED).
    pub mac: Option<[u8; 6]>,
    pub state: NeighState,
    /// `NDA_PROTOCOL` (0 when the entry has none): [`FERRY_ROUTE_PROTO`] on
    /// the entries ferry wrote.
    pub protocol: u8,
}

impl<A: RouteFamily> IpNeighbour<A> {
    /// True when ferry wrote it (its protocol is [`FERRY_ROUTE_PROTO`]).
    pub fn is_ferrys(&self) -> bool {
        self.protocol == FERRY_ROUTE_PROTO
    }
}

/// An ARP entry.
pub type Neighbour = IpNeighbour<Ipv4Addr>;
/// An NDP entry.
pub type Neighbour6 = IpNeighbour<Ipv6Addr>;

/// The NUD states ferry distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NeighState {
    Permanent,
    /// NOARP: multicast/broadcast entries the kernel makes and remakes by itself.
    NoArp,
    /// Anything the kernel learned or is resolving (REACHABLE, STALE, FAILED, …).
    Dynamic,
}

/// A bridge fdb entry of a link (`bridge fdb show dev <link>`). A VXLAN fdb
/// entry with several remotes is dumped as one entry per remote.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FdbEntry {
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// The remote (VXLAN `dst`).
    pub dst: Option<IpAddr>,
    pub permanent: bool,
    /// NTF_SELF: the entry belongs to the device itself (VXLAN), not to a
    /// bridge it is a port of.
    pub is_self: bool,
}

fn mac6(v: &[u8]) -> Option<[u8; 6]> {
    <[u8; 6]>::try_from(v).ok()
}

pub(crate) fn mac_str(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The message of `ip neigh replace <ip> lladdr <mac> dev <ifindex> nud
/// permanent protocol 70` (what [`NsHandle::replace_neighbour`] sends;
/// batches send it too).
pub(crate) fn permanent_neighbour(ifindex: u32, ip: IpAddr, mac: [u8; 6]) -> NeighbourMessage {
    let mut msg = neighbour_key(ifindex, ip);
    msg.header.state = NeighbourState::Permanent;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    msg.attributes
        .push(NeighbourAttribute::Protocol(RouteProtocol::from(
            FERRY_ROUTE_PROTO,
        )));
    msg
}

/// The message naming neighbour `<ip> dev <ifindex>` (for a delete).
pub(crate) fn neighbour_key(ifindex: u32, ip: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    msg.header.ifindex = ifindex;
    msg.attributes
        .push(NeighbourAttribute::Destination(neigh_addr(ip)));
    msg
}

/// The message of `bridge fdb replace <mac> dev <ifindex> dst <dst> self
/// permanent`.
pub(crate) fn permanent_fdb(ifindex: u32, mac: [u8; 6], dst: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = ifindex;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    msg.attributes
        .push(NeighbourAttribute::Destination(neigh_addr(dst)));
    msg
}

/// The message naming fdb entry `entry` (for a delete): with its `dst`, only
/// that remote.
pub(crate) fn fdb_key(entry: &FdbEntry) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = entry.ifindex;
    msg.header.flags = if entry.is_self {
        NeighbourFlags::Own
    } else {
        NeighbourFlags::Controller
    };
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(entry.mac.to_vec()));
    if let Some(dst) = entry.dst {
        msg.attributes
            .push(NeighbourAttribute::Destination(neigh_addr(dst)));
    }
    msg
}

fn neigh_state(s: NeighbourState) -> NeighState {
    match s {
        NeighbourState::Permanent => NeighState::Permanent,
        NeighbourState::Noarp => NeighState::NoArp,
        _ => NeighState::Dynamic,
    }
}

fn neigh_ip(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn neigh_addr(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

impl NsHandle {
    /// `ip neigh replace <ip> lladdr <mac> dev <ifindex> nud permanent
    /// protocol 70`.
    pub async fn replace_neighbour<A: RouteFamily>(
        &self,
        ifindex: u32,
        ip: A,
        mac: [u8; 6],
    ) -> Result<()> {
        let mut req = self
            .handle
            .neighbours()
            .add(ifindex, ip.into())
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace();
        req.message_mut()
            .attributes
            .push(NeighbourAttribute::Protocol(RouteProtocol::from(
                FERRY_ROUTE_PROTO,
            )));
        req.execute().await.map_err(|e| {
            self.err(
                "replace neighbour",
                format!("{ip} lladdr {} dev #{ifindex}", mac_str(&mac)),
                e,
            )
        })
    }

    /// `ip neigh del <ip> dev <ifindex>`; `Ok(false)` when it was not there.
    pub async fn delete_neighbour<A: RouteFamily>(&self, ifindex: u32, ip: A) -> Result<bool> {
        let msg = neighbour_key(ifindex, ip.into());
        match self.handle.neighbours().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(false),
            Err(e) => Err(self.err("delete neighbour", format!("{ip} dev #{ifindex}"), e)),
        }
    }

    /// The neighbours of family `A` on link `ifindex`, from one dump (the
    /// kernel filters by NDA_IFINDEX; the filter is applied here too).
    pub async fn neighbours<A: RouteFamily>(&self, ifindex: u32) -> Result<Vec<IpNeighbour<A>>> {
        let mut req = self.handle.neighbours().get().set_address_family(A::FAMILY);
        req.message_mut()
            .attributes
            .push(NeighbourAttribute::IfIndex(ifindex));
        let mut stream = req.execute();
        let mut out = Vec::new();
        while let Some(m) = stream
            .try_next()
            .await
            .map_err(|e| self.err("list neighbours", format!("#{ifindex}"), e))?
        {
            if m.header.ifindex != ifindex || m.header.family != A::FAMILY {
                continue;
            }
            let mut ip = None;
            let mut mac = None;
            let mut protocol = 0;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(d) => ip = A::from_ip(neigh_ip(d)),
                    NeighbourAttribute::LinkLayerAddress(l) => mac = mac6(l),
                    NeighbourAttribute::Protocol(p) => protocol = u8::from(*p),
                    _ => {}
                }
            }
            if let Some(ip) = ip {
                out.push(IpNeighbour {
                    ifindex,
                    ip,
                    mac,
                    state: neigh_state(m.header.state),
                    protocol,
                });
            }
        }
        Ok(out)
    }

    /// `bridge fdb replace <mac> dev <ifindex> dst <dst> self permanent`.
    pub async fn replace_fdb(&self, ifindex: u32, mac: [u8; 6], dst: IpAddr) -> Result<()> {
        self.handle
            .neighbours()
            .add_bridge(ifindex, &mac)
            .destination(dst)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                self.err(
                    "replace fdb entry",
                    format!("{} dst {dst} dev #{ifindex}", mac_str(&mac)),
                    e,
                )
            })
    }

    /// `bridge fdb del <mac> dev <ifindex> [dst <dst>] self`: with `dst`, only
    /// that remote of the entry goes. `Ok(false)` when it was not there.
    pub async fn delete_fdb(&self, entry: &FdbEntry) -> Result<bool> {
        let msg = fdb_key(entry);
        match self.handle.neighbours().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(false),
            Err(e) => Err(self.err(
                "delete fdb entry",
                format!("{} dev #{}", mac_str(&entry.mac), entry.ifindex),
                e,
            )),
        }
    }

    /// The fdb entries of link `ifindex`. The kernel's legacy fdb dump cannot
    /// filter by port, so this is one dump of the namespace, filtered while
    /// it streams.
    pub async fn fdb_entries(&self, ifindex: u32) -> Result<Vec<FdbEntry>> {
        let mut stream = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute();
        let mut out = Vec::new();
        while let Some(m) = stream
            .try_next()
            .await
            .map_err(|e| self.err("list fdb entries", format!("#{ifindex}"), e))?
        {
            if m.header.ifindex != ifindex {
                continue;
            }
            let mut mac = None;
            let mut dst = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::LinkLayerAddress(l) => mac = mac6(l),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                        dst = Some(IpAddr::V4(*v4))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                        dst = Some(IpAddr::V6(*v6))
                    }
                    // Bridge-family messages carry the remote as raw bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        dst = match b.len() {
                            4 => <[u8; 4]>::try_from(&b[..]).ok().map(IpAddr::from),
                            16 => <[u8; 16]>::try_from(&b[..]).ok().map(IpAddr::from),
                            _ => None,
                        }
                    }
                    _ => {}
                }
            }
            if let Some(mac) = mac {
                out.push(FdbEntry {
                    ifindex,
                    mac,
                    dst,
                    // A bit, not equality: iproute2's `bridge fdb add … permanent`
                    // also sets NUD_NOARP (state 0xc0), still a permanent entry.
                    permanent: u16::from(m.header.state) & u16::from(NeighbourState::Permanent)
                        != 0,
                    is_self: m.header.flags.contains(NeighbourFlags::Own),
                });
            }
        }
        Ok(out)
    }
}
