//! The overlay's kernel state: desired entries computed from the leases, and
//! reconciling the kernel to them.
//!
//! What ferry owns on a node, and so may change or remove:
//! - the VXLAN device `ferry.<vni>` (a link of another kind with that name
//!   is refused, not deleted) and its addresses;
//! - on that device, the neighbours with protocol [`FERRY_ROUTE_PROTO`]
//!   (ferry writes its neighbours with it; an untagged permanent one counts
//!   when its address is the first of a node subnet of the cluster network,
//!   as a ferryd before the tag or a kernel before 5.2 left them), and the
//!   permanent fdb entries whose MAC is one of those neighbours' or a
//!   peer's VTEP MAC (VXLAN fdb entries carry no protocol). Entries someone
//!   else put on the device (flood entries, other MACs, other neighbours)
//!   are left alone;
//! - every main-table route with protocol [`FERRY_ROUTE_PROTO`] (70).
//!   Nothing else is ever deleted or replaced: a route is created with
//!   NLM_F_EXCL and replaced only where ferry's own is the one there.
//!
//! Leases are data anyone with write access to etcd can forge. Each peer is
//! checked before anything is programmed for it ([`validate_lease_values`]:
//! its subnet is a node subnet of the cluster network, its public IP a
//! unicast address of the underlay's family that is not this node's, its
//! VTEP MAC unicast) and skipped as *invalid* when it is not. A valid peer
//! whose route would collide with a route that is not ferry's (the same
//! destination in the main table with another protocol, or any overlap with
//! the node's own device routes and addresses) is skipped as a *conflict*.
//! Both are logged once, counted ([`ReconcileReport::invalid`],
//! [`ReconcileReport::conflicts`]) and listed ([`Dataplane::skipped`]);
//! neither is retried as a failure, so they never hold readiness back.
//!
//! The model is flannel's vxlan and host-gw backends:
//! - vxlan, per peer, in this order: a permanent neighbour `<subnet>.0 lladdr
//!   <vtep mac>` on the device, an fdb entry `<vtep mac> dst <public ip> self
//!   permanent`, and the route `<subnet> via <subnet>.0 dev ferry.<vni>
//!   onlink`. The local node's `<subnet>.0/32` sits on the device so traffic
//!   the node itself sends to remote pods has a cluster source address.
//! - vxlan with direct routing, for peers on the underlay's own segment
//!   (`ip route get <public ip>` gives no gateway, same link): `<subnet> via
//!   <public ip> dev <underlay>` and nothing on the device.
//! - host-gw: that plain route for every peer.
//!
//! Dual stack (the network config has `ipv6Network`): the same device also
//! carries the local `<v6 subnet>::/128` and, per peer with an IPv6 subnet
//! in its lease, a permanent neighbour `<peer v6 subnet>::` lladdr <vtep mac>
//! and the route `<peer v6 subnet> via <peer v6 subnet>:: dev ferry.<vni>
//! onlink` (the fdb entry is shared: same VNI, same VTEP MAC). Direct routing
//! routes IPv6 pod subnets via the peer's public IP only over an IPv6
//! underlay (else IPv6 goes through the tunnel); host-gw does not route IPv6
//! pod subnets (logged once). Main-table IPv6 routes with protocol 70 and the
//! device's IPv6 neighbours are ferry's too.
//!
//! The underlay may be IPv4 or IPv6; the pod network is IPv4 either way, so
//! only the device's `local`/`local6`, the fdb remotes and the MTU (underlay
//! − 50, or − 70 over IPv6) depend on it. An IPv4 route needs an IPv4 next
//! hop: over an IPv6 underlay host-gw is refused ([`check_underlay`]) and
//! direct routing is off (every peer goes through the tunnel). A peer whose
//! underlay address is of the other family cannot be reached: it is reported
//! and counted in `failed`, the others are programmed all the same.
//!
//! A pass ([`Dataplane::reconcile`]) reads the kernel with one dump per kind
//! (routes, neighbours, fdb), diffs it against the desired state and sends
//! only the differences. Correct entries are never touched, so a pass over an
//! unchanged kernel sends nothing and causes no events.
//!
//! The differences go out in netlink batches ([`Batch`]: hundreds of
//! requests in one `sendmsg`, the acks read back in bulk and mapped to their
//! peer and step), [`PEERS_PER_ROUND`] peers per round. A round sends the
//! neighbours and fdb entries of its peers in one buffer, then the routes of
//! the peers whose neighbour and fdb entry are both in place in a second:
//! a route never points at an entry that failed (the old one-peer-at-a-time
//! rule). A peer whose neighbour failed may keep a new fdb entry (harmless
//! without the route; it is wanted anyway); the peer is counted in `failed`,
//! logged, and the next pass (a kernel event, the resync) tries it again.
//! ENOBUFS (the kernel short of memory, or acks lost to a full socket
//! buffer) is retried with doubling delays; every request is idempotent.

use crate::lease::{InvalidLease, LeaseRules, Mac, SubnetLease, validate_lease_values};
use crate::network::{BackendConfig, BackendType, NetworkConfig, overlaps};
use ferry_netops::{
    Batch, BatchOp, FERRY_ROUTE_PROTO, FdbEntry, IpRoute, Ipv4Route, Ipv6Route, KernelEvent,
    Monitor, NeighState, Neighbour, Neighbour6, NetNs, NetopsError, NsHandle, RouteEntry,
    RouteFamily, RouteKind, VxlanChange, VxlanSpec,
};
use futures::StreamExt;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;
use tracing::{debug, warn};

/// VXLAN encapsulation over IPv4: outer IPv4 (20) + UDP (8) + VXLAN (8) +
/// inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// VXLAN encapsulation over IPv6: the outer header is 40 bytes, not 20.
pub const VXLAN6_OVERHEAD: u32 = 70;

/// The VXLAN overhead over an underlay whose local address is `ip`.
pub fn vxlan_overhead(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(_) => VXLAN_OVERHEAD,
        IpAddr::V6(_) => VXLAN6_OVERHEAD,
    }
}

/// Concurrent requests on the rtnetlink handle (route lookups for direct
/// routing). Bounded so their acks always fit the socket's receive buffer.
pub const IN_FLIGHT: usize = 64;

/// Peers per programming round: one buffer of their neighbours and fdb
/// entries, one of their routes (at most [`Batch::MAX_OPS`] requests each).
/// Between rounds the runtime gets the thread back.
pub const PEERS_PER_ROUND: usize = Batch::MAX_OPS / 2;

/// One netlink request may take this long before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// ENOBUFS retries (the kernel's answer when it is short of memory or the
/// socket's buffer is full), with doubling delays from 2 ms.
const ENOBUFS_RETRIES: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("underlay interface {name}: no such link in netns {netns}")]
    NoSuchInterface { name: String, netns: String },
    #[error("no link holds the public IP {0} (pass --iface, or an address of this node)")]
    NoLinkHolds(IpAddr),
    #[error(
        "no IPv4 or IPv6 default route to take the underlay from (pass --iface or --public-ip)"
    )]
    NoDefaultRoute,
    #[error("underlay interface {iface} has no global IPv4 or IPv6 address (pass --public-ip)")]
    NoAddress { iface: String },
    #[error(
        "backend host-gw needs an IPv4 underlay (a route to an IPv4 pod subnet needs an IPv4 next hop), and the underlay address is {0}: use the vxlan backend, or an IPv4 --public-ip / --iface"
    )]
    HostGwNeedsIpv4(IpAddr),
    /// A kernel operation that is not about one peer (device, dumps).
    #[error("{what}: {source}")]
    Kernel {
        what: String,
        #[source]
        source: NetopsError,
    },
    /// One peer's entries could not be programmed (reported per peer in the
    /// log; the others are programmed all the same).
    #[error("peer {subnet} at {public_ip}: {step}: {source}")]
    Peer {
        subnet: Ipv4Network,
        public_ip: IpAddr,
        step: &'static str,
        #[source]
        source: NetopsError,
    },
    #[error(
        "the cluster network overlaps this node's {what}: pod routes would take over the node's own traffic (choose a cluster network clear of the node's addresses and device routes)"
    )]
    NetworkOverlapsNode { what: String },
    #[error("kernel notifications: {0}")]
    Monitor(#[source] NetopsError),
}

fn kernel(what: impl Into<String>) -> impl FnOnce(NetopsError) -> DataplaneError {
    let what = what.into();
    move |source| DataplaneError::Kernel { what, source }
}

/// The interface other nodes reach this one through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// IPv4 or IPv6.
    pub ip: IpAddr,
}

/// `iface` by name, else the interface holding `public_ip`, else the IPv4
/// default route's interface, else the IPv6 default route's. `ip` is
/// `public_ip`, else the interface's first global address of the family
/// preferred: the default route's, IPv4 for `iface` (the other family when
/// the interface has none).
pub async fn find_underlay(
    h: &NsHandle,
    iface: Option<&str>,
    public_ip: Option<IpAddr>,
) -> Result<Underlay, DataplaneError> {
    let mut prefer_v6 = false;
    let link = if let Some(name) = iface {
        h.link_by_name(name)
            .await
            .map_err(kernel(format!("look up underlay {name}")))?
            .ok_or_else(|| DataplaneError::NoSuchInterface {
                name: name.to_string(),
                netns: h.netns().to_string(),
            })?
    } else {
        let index = if let Some(ip) = public_ip {
            h.link_holding(ip)
                .await
                .map_err(kernel(format!("find the link holding {ip}")))?
                .ok_or(DataplaneError::NoLinkHolds(ip))?
        } else if let Some(r) = h
            .default_ipv4_route()
            .await
            .map_err(kernel("find the IPv4 default route"))?
        {
            r.oif
        } else {
            prefer_v6 = true;
            h.default_ipv6_route()
                .await
                .map_err(kernel("find the IPv6 default route"))?
                .ok_or(DataplaneError::NoDefaultRoute)?
                .oif
        };
        h.link_by_index(index)
            .await
            .map_err(kernel(format!("look up link #{index}")))?
            .ok_or_else(|| DataplaneError::NoSuchInterface {
                name: format!("#{index}"),
                netns: h.netns().to_string(),
            })?
    };
    let ip = match public_ip {
        Some(ip) => ip,
        None => {
            let addrs = h
                .addresses(link.index)
                .await
                .map_err(kernel(format!("list addresses of {}", link.name)))?;
            let of = |v6: bool| addrs.iter().map(|a| a.ip()).find(|ip| ip.is_ipv6() == v6);
            of(prefer_v6)
                .or_else(|| of(!prefer_v6))
                .ok_or_else(|| DataplaneError::NoAddress {
                    iface: link.name.clone(),
                })?
        }
    };
    Ok(Underlay {
        name: link.name,
        index: link.index,
        mtu: link.mtu,
        ip,
    })
}

/// Refuses a backend that cannot work over `underlay`: host-gw over an IPv6
/// underlay (an IPv4 pod subnet cannot be routed via an IPv6 next hop).
/// The daemon calls it at startup, before it leases a subnet.
pub fn check_underlay(backend: &BackendConfig, underlay: &Underlay) -> Result<(), DataplaneError> {
    match (backend.kind, underlay.ip) {
        (BackendType::HostGw, ip @ IpAddr::V6(_)) => Err(DataplaneError::HostGwNeedsIpv4(ip)),
        _ => Ok(()),
    }
}

/// This node, as the dataplane needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    pub subnet: Ipv4Network,
    /// The node's IPv6 pod subnet (dual stack), else `None`.
    pub subnet6: Option<Ipv6Network>,
    pub underlay: Underlay,
    pub vtep_mac: Mac,
}

/// Another node: where its pod subnet lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub subnet: Ipv4Network,
    /// Its IPv6 pod subnet (dual stack; `None` for IPv4-only nodes).
    pub subnet6: Option<Ipv6Network>,
    /// Its underlay address; must be of the family of ours.
    pub public_ip: IpAddr,
    pub vtep_mac: Option<Mac>,
}

impl From<&SubnetLease> for Peer {
    fn from(l: &SubnetLease) -> Peer {
        Peer {
            subnet: l.subnet(),
            subnet6: l.ipv6_subnet,
            public_ip: l.public_ip,
            vtep_mac: l.vtep_mac,
        }
    }
}

/// What a pass changed. `added`/`removed` count kernel entries (device,
/// address, neighbours, fdb entries, routes); a pass over a kernel already
/// right reports 0 and 0.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileReport {
    pub added: usize,
    pub removed: usize,
    /// Peers whose entries are all in place after the pass (a gauge: equal
    /// to the number of peers when everything is programmed).
    pub peers_programmed: usize,
    /// Peers that could not be programmed (each one logged); the next pass
    /// tries them again.
    pub failed: usize,
    /// Peers skipped because their lease is invalid ([`InvalidLease`]).
    pub invalid: usize,
    /// Peers skipped because their route would collide with a route or an
    /// address that is not ferry's.
    pub conflicts: usize,
}

impl ReconcileReport {
    /// Every peer that can be programmed is: `peers` known peers, less the
    /// invalid and conflicting ones, all programmed.
    pub fn all_programmed(&self, peers: usize) -> bool {
        self.failed == 0 && self.peers_programmed + self.invalid + self.conflicts >= peers
    }
}

/// Why a peer was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipKind {
    /// Its lease holds values ferry does not program.
    Invalid,
    /// Its route would collide with a route or address that is not ferry's.
    Conflict,
}

/// A peer left out of the kernel, and why (for logs and /readyz).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Skipped {
    pub subnet: Ipv4Network,
    pub kind: SkipKind,
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            SkipKind::Invalid => {
                write!(f, "invalid lease {} skipped: {}", self.subnet, self.reason)
            }
            SkipKind::Conflict => write!(
                f,
                "peer {} skipped: its route would collide with {}",
                self.subnet, self.reason
            ),
        }
    }
}

/// How one peer is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Over the VXLAN device (this index), to this VTEP MAC.
    Tunnel(u32, [u8; 6]),
    /// A plain route via its (IPv4) public IP on the underlay.
    Direct(Ipv4Addr),
}

/// How one peer's IPv6 pod subnet is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via6 {
    /// Over the VXLAN device (this index), to this VTEP MAC.
    Tunnel(u32, [u8; 6]),
    /// A plain route via its (IPv6) public IP on the underlay.
    Direct(Ipv6Addr),
}

/// One peer's desired entries and which of them are missing or wrong.
/// A route goes out as a replace only where ferry's own route to its
/// destination is there already, else as an exclusive create.
struct PeerJob {
    peer: Peer,
    neigh: Option<(u32, Ipv4Addr, [u8; 6])>,
    neigh6: Option<(u32, Ipv6Addr, [u8; 6])>,
    fdb: Option<(u32, [u8; 6], IpAddr)>,
    route: Option<RouteOp<Ipv4Addr>>,
    route6: Option<RouteOp<Ipv6Addr>>,
}

/// A route to program: replacing ferry's own, or created exclusively.
struct RouteOp<A: RouteFamily> {
    route: IpRoute<A>,
    replace: bool,
}

/// The network's prefix as an [`IpNetwork`].
fn ipnet<A: RouteFamily>(n: &A::Net) -> IpNetwork {
    let (addr, prefix) = A::net_parts(n);
    IpNetwork::new(addr.into(), prefix).expect("a route's prefix fits its family")
}

/// One family's routes as ferry's ownership rules see them.
struct Tables<A: RouteFamily> {
    /// ferry's routes (main table, protocol 70).
    ferry: Vec<IpRoute<A>>,
    /// Main-table routes of any type that are not ferry's, by destination.
    foreign: HashMap<A::Net, IpRoute<A>>,
    /// Main-table device routes (no gateway; connected subnets, `dev`
    /// routes) that are not ferry's, the default route excepted.
    connected: Vec<IpRoute<A>>,
    /// The node's own addresses (`local` routes).
    local: Vec<A>,
}

impl<A: RouteFamily> Tables<A> {
    fn new(entries: Vec<RouteEntry<A>>) -> Tables<A> {
        let mut t = Tables {
            ferry: Vec::new(),
            foreign: HashMap::new(),
            connected: Vec::new(),
            local: Vec::new(),
        };
        for e in entries {
            let r = e.route;
            match e.kind {
                RouteKind::Local => t.local.push(A::net_parts(&r.dst).0),
                RouteKind::MainUnicast if r.protocol == FERRY_ROUTE_PROTO => t.ferry.push(r),
                RouteKind::MainUnicast | RouteKind::MainOther => {
                    if e.kind == RouteKind::MainUnicast
                        && r.gw.is_none()
                        && r.oif != 0
                        && A::net_parts(&r.dst).1 != 0
                    {
                        t.connected.push(r.clone());
                    }
                    t.foreign.entry(r.dst).or_insert(r);
                }
            }
        }
        t
    }

    /// What a route of ferry's to `dst` would collide with, if anything,
    /// and the link of that route.
    fn conflict(&self, dst: &A::Net) -> Option<(String, Option<u32>)> {
        if let Some(r) = self.foreign.get(dst) {
            return Some((
                format!("the route {} that is not ferry's", r.describe()),
                Some(r.oif),
            ));
        }
        let net = ipnet::<A>(dst);
        if let Some(r) = self
            .connected
            .iter()
            .find(|r| overlaps(ipnet::<A>(&r.dst), net))
        {
            return Some((
                format!("this node's device route {}", r.describe()),
                Some(r.oif),
            ));
        }
        self.local
            .iter()
            .find(|a| net.contains((**a).into()))
            .map(|a| (format!("this node's address {a}"), None))
    }
}

/// The node's addresses and device routes (not ferry's) that the cluster
/// network overlaps, with their links.
fn overlaps_with_node<A: RouteFamily>(
    entries: &[RouteEntry<A>],
    cfg: &NetworkConfig,
) -> Vec<(String, u32)> {
    entries
        .iter()
        .filter_map(|e| {
            let r = &e.route;
            if r.protocol == FERRY_ROUTE_PROTO {
                return None;
            }
            let (addr, prefix) = A::net_parts(&r.dst);
            match e.kind {
                RouteKind::Local if cfg.contains_ip(addr.into()) => {
                    Some((format!("address {addr}"), r.oif))
                }
                RouteKind::MainUnicast
                    if r.gw.is_none()
                        && r.oif != 0
                        && prefix != 0
                        && cfg.overlaps(ipnet::<A>(&r.dst)) =>
                {
                    Some((format!("device route {}", r.describe()), r.oif))
                }
                _ => None,
            }
        })
        .collect()
}

/// Refuses a cluster network that overlaps the node's own addresses or
/// device routes (connected subnets): pod routes to it would take over the
/// node's own traffic. ferry's own state is not counted: routes with
/// protocol 70, and everything on its links (`bridge`, the pod bridge, and
/// every `ferry.<vni>` VXLAN device, this config's or an earlier one's),
/// which hold addresses of the node's pod subnet. The daemon calls it at
/// start, before it leases a subnet.
pub async fn check_network(
    h: &NsHandle,
    cfg: &NetworkConfig,
    bridge: &str,
) -> Result<(), DataplaneError> {
    let v4 = h
        .route_entries::<Ipv4Addr>()
        .await
        .map_err(kernel("list routes"))?;
    let v6 = h
        .route_entries::<Ipv6Addr>()
        .await
        .map_err(kernel("list IPv6 routes"))?;
    let mut names: HashMap<u32, Option<String>> = HashMap::new();
    for (mut what, oif) in overlaps_with_node(&v4, cfg)
        .into_iter()
        .chain(overlaps_with_node(&v6, cfg))
    {
        if let std::collections::hash_map::Entry::Vacant(slot) = names.entry(oif) {
            let link = h
                .link_by_index(oif)
                .await
                .map_err(kernel(format!("look up link #{oif}")))?;
            slot.insert(link.map(|l| l.name));
        }
        let name = names[&oif].as_deref();
        if name.is_some_and(|n| n == bridge || is_ferry_device(n)) {
            continue;
        }
        if let Some(name) = name {
            what = what.replace(&format!(" dev #{oif}"), &format!(" dev {name}"));
            if what.starts_with("address") {
                what.push_str(&format!(" on {name}"));
            }
        }
        return Err(DataplaneError::NetworkOverlapsNode { what });
    }
    Ok(())
}

/// An untagged permanent neighbour ferry made all the same: one written by
/// a ferryd before neighbours carried protocol 70, or on a kernel that
/// keeps no protocol (before 5.2). Its address is the first of a node
/// subnet of the cluster network, the only shape ferry writes.
fn ferry_shaped_v4(network: Option<&NetworkConfig>, n: &Neighbour) -> bool {
    n.state == NeighState::Permanent
        && network.is_some_and(|cfg| {
            Ipv4Network::new(n.ip, cfg.subnet_len)
                .is_ok_and(|s| s.network() == n.ip && cfg.holds(s))
        })
}

/// [`ferry_shaped_v4`] for the IPv6 node subnets.
fn ferry_shaped_v6(network: Option<&NetworkConfig>, n: &Neighbour6) -> bool {
    n.state == NeighState::Permanent
        && network.is_some_and(|cfg| {
            cfg.ipv6().is_some_and(|net6| net6.contains(n.ip))
                && Ipv6Network::new(n.ip, cfg.ipv6_subnet_len).is_ok_and(|s| s.network() == n.ip)
        })
}

/// `ferry.<vni>`: a name only ferryd gives its VXLAN devices.
fn is_ferry_device(name: &str) -> bool {
    name.strip_prefix("ferry.")
        .is_some_and(|vni| !vni.is_empty() && vni.bytes().all(|b| b.is_ascii_digit()))
}

pub struct Dataplane {
    h: NsHandle,
    kind: BackendType,
    vni: u32,
    port: u16,
    /// `directRouting`, and an IPv4 underlay to route over.
    direct_routing: bool,
    /// `directRouting`, and an IPv6 underlay to route IPv6 pod subnets over.
    direct_routing6: bool,
    /// host-gw in a dual-stack network: said once that IPv6 is not routed.
    told_no_v6: bool,
    local: LocalNode,
    device: Option<String>,
    /// The cluster network leases are checked against (`None`: only the
    /// address checks, for callers that have no config).
    network: Option<NetworkConfig>,
    /// Peers the last pass skipped (invalid or conflicting), each logged at
    /// warn level once, when it first appears.
    skipped: Vec<Skipped>,
    /// The netlink batch socket, opened at the first pass that needs it.
    batch: Option<Batch>,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("kind", &self.kind)
            .field("device", &self.device)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Dataplane {
    pub fn new(h: NsHandle, backend: &BackendConfig, local: LocalNode) -> Dataplane {
        let device = (backend.kind == BackendType::Vxlan).then(|| format!("ferry.{}", backend.vni));
        let mut direct_routing = backend.direct_routing;
        let direct_routing6 =
            backend.direct_routing && device.is_some() && local.underlay.ip.is_ipv6();
        if direct_routing && device.is_some() && local.underlay.ip.is_ipv6() {
            warn!(
                underlay = %local.underlay.ip,
                "directRouting is off: the underlay is IPv6 and a route to an IPv4 pod subnet needs an IPv4 next hop; every peer goes through the tunnel"
            );
            direct_routing = false;
        }
        Dataplane {
            h,
            kind: backend.kind,
            vni: backend.vni,
            port: backend.port,
            direct_routing,
            direct_routing6,
            told_no_v6: false,
            local,
            device,
            network: None,
            skipped: Vec::new(),
            batch: None,
        }
    }

    /// Checks every lease's subnets against the cluster network `cfg` too.
    pub fn with_network(mut self, cfg: &NetworkConfig) -> Dataplane {
        self.network = Some(cfg.clone());
        self
    }

    /// The peers the last pass skipped, and why (sorted by subnet).
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// Records this pass's skipped peers; a peer newly skipped (or skipped
    /// for a new reason) is logged as a warning, the rest at debug level.
    fn note_skipped(&mut self, mut now: Vec<Skipped>) {
        now.sort_by(|a, b| a.subnet.cmp(&b.subnet).then(a.reason.cmp(&b.reason)));
        for s in &now {
            if self.skipped.contains(s) {
                debug!("{s}");
            } else {
                warn!("{s}");
            }
        }
        self.skipped = now;
    }

    /// Pod MTU for the conflist: the underlay's, less the VXLAN overhead
    /// (50 over IPv4, 70 over IPv6).
    pub fn pod_mtu(&self) -> u32 {
        match self.kind {
            BackendType::Vxlan => self
                .local
                .underlay
                .mtu
                .saturating_sub(vxlan_overhead(self.local.underlay.ip)),
            BackendType::HostGw => self.local.underlay.mtu,
        }
    }

    /// `ferry.<vni>` for vxlan, `None` for host-gw.
    pub fn device_name(&self) -> Option<&str> {
        self.device.as_deref()
    }

    fn vxlan_spec(&self, name: &str) -> VxlanSpec {
        VxlanSpec {
            name: name.to_string(),
            vni: self.vni,
            underlay: self.local.underlay.index,
            local: self.local.underlay.ip,
            port: self.port,
            mtu: self.pod_mtu(),
            mac: self.local.vtep_mac.0,
        }
    }

    /// Makes the kernel equal to the desired state for `peers` (the local
    /// node's own subnet is skipped): device, then per peer neighbour → fdb →
    /// route, then the removal of every ferry-owned entry nobody wants.
    /// Errors are for what makes the whole pass impossible (device, dumps);
    /// a peer that cannot be programmed is logged and counted in `failed`.
    pub async fn reconcile(&mut self, peers: &[Peer]) -> Result<ReconcileReport, DataplaneError> {
        let mut report = ReconcileReport::default();
        let underlay = self.local.underlay.index;

        // The desired peers, one per subnet (the last one given wins).
        let mut wanted: HashMap<Ipv4Network, &Peer> = HashMap::with_capacity(peers.len());
        for p in peers {
            if p.subnet != self.local.subnet {
                wanted.insert(p.subnet, p);
            }
        }

        let vx = match self.device.clone() {
            Some(name) => Some(self.ensure_device(&name, &mut report).await?),
            None => None,
        };

        // The kernel's routes, ferry's and everyone else's, and the node's
        // addresses: one dump per family.
        let t4 = Tables::<Ipv4Addr>::new(
            self.h
                .route_entries::<Ipv4Addr>()
                .await
                .map_err(kernel("list routes"))?,
        );
        let t6 = Tables::<Ipv6Addr>::new(
            self.h
                .route_entries::<Ipv6Addr>()
                .await
                .map_err(kernel("list IPv6 routes"))?,
        );

        // Leases are checked before anything is done for them.
        let mut skipped: Vec<Skipped> = Vec::new();
        let local_ips: HashSet<IpAddr> = t4
            .local
            .iter()
            .map(|a| IpAddr::from(*a))
            .chain(t6.local.iter().map(|a| IpAddr::from(*a)))
            .collect();
        let is_local = |ip: IpAddr| local_ips.contains(&ip);
        let rules = LeaseRules {
            network: self.network.as_ref(),
            underlay: self.local.underlay.ip,
            is_local: &is_local,
        };
        let mut invalid = |subnet: Ipv4Network, e: InvalidLease| {
            skipped.push(Skipped {
                subnet,
                kind: SkipKind::Invalid,
                reason: e.to_string(),
            })
        };
        wanted.retain(|_, p| {
            match validate_lease_values(p.subnet, p.subnet6, p.public_ip, p.vtep_mac, &rules) {
                Ok(()) => true,
                Err(e) => {
                    invalid(p.subnet, e);
                    false
                }
            }
        });

        // How each peer is reached.
        let direct: HashSet<Ipv4Addr> = if vx.is_some() && self.direct_routing {
            self.directly_reachable(wanted.values().filter_map(|p| match p.public_ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            }))
            .await?
        } else {
            HashSet::new()
        };
        let v6_on = self.local.subnet6.is_some();
        let direct6: HashSet<Ipv6Addr> = if vx.is_some() && self.direct_routing6 && v6_on {
            self.directly_reachable(wanted.values().filter(|p| p.subnet6.is_some()).filter_map(
                |p| match p.public_ip {
                    IpAddr::V6(v6) => Some(v6),
                    IpAddr::V4(_) => None,
                },
            ))
            .await?
        } else {
            HashSet::new()
        };
        if vx.is_none() && v6_on && !self.told_no_v6 {
            self.told_no_v6 = true;
            warn!(
                "backend host-gw routes only the IPv4 pod subnets: IPv6 pod traffic to other nodes is not routed (use the vxlan backend for dual stack)"
            );
        }
        // How a peer's IPv6 subnet is reached (dual stack, vxlan only).
        let via6 = |p: &Peer| -> Option<Via6> {
            let (vx, _) = (vx?, p.subnet6?);
            if !v6_on {
                return None;
            }
            match p.public_ip {
                IpAddr::V6(ip) if direct6.contains(&ip) => Some(Via6::Direct(ip)),
                _ => p.vtep_mac.map(|m| Via6::Tunnel(vx, m.0)),
            }
        };
        let mut plan: Vec<(&Peer, Via, Option<Via6>)> = Vec::with_capacity(wanted.len());
        for p in wanted.values() {
            match (vx, p.public_ip) {
                (None, IpAddr::V4(v4)) => plan.push((p, Via::Direct(v4), None)),
                (Some(_), IpAddr::V4(v4)) if direct.contains(&v4) => {
                    plan.push((p, Via::Direct(v4), via6(p)))
                }
                (None, ip @ IpAddr::V6(_)) => {
                    // check_underlay refuses this at startup; never a crash.
                    report.failed += 1;
                    warn!("peer {}: {}", p.subnet, DataplaneError::HostGwNeedsIpv4(ip));
                }
                (Some(vx), _) => match p.vtep_mac {
                    Some(mac) => plan.push((p, Via::Tunnel(vx, mac.0), via6(p))),
                    None => invalid(p.subnet, InvalidLease::NoVtepMac),
                },
            }
        }

        // A route of ferry's must never take over someone else's: a peer
        // whose route would collide is left out entirely.
        let mut conflicts: Vec<(Ipv4Network, String, Option<u32>)> = Vec::new();
        plan.retain(|(p, _, via6)| {
            let hit = t4.conflict(&p.subnet).or_else(|| {
                via6.and(p.subnet6)
                    .and_then(|subnet6| t6.conflict(&subnet6))
            });
            match hit {
                None => true,
                Some((reason, oif)) => {
                    conflicts.push((p.subnet, reason, oif));
                    false
                }
            }
        });
        for (subnet, mut reason, oif) in conflicts {
            // The link's name for the operator, where it still has one.
            if let Some(oif) = oif
                && let Ok(Some(link)) = self.h.link_by_index(oif).await
            {
                reason = reason.replace(&format!(" dev #{oif}"), &format!(" dev {}", link.name));
            }
            skipped.push(Skipped {
                subnet,
                kind: SkipKind::Conflict,
                reason,
            });
        }
        for s in &skipped {
            match s.kind {
                SkipKind::Invalid => report.invalid += 1,
                SkipKind::Conflict => report.conflicts += 1,
            }
        }

        // The kernel as it is: one dump per kind.
        let routes = &t4.ferry;
        let routes6 = &t6.ferry;
        let (neighs, neighs6, fdb) = match vx {
            Some(vx) => {
                let n = self
                    .h
                    .neighbours::<Ipv4Addr>(vx)
                    .await
                    .map_err(kernel(format!(
                        "list neighbours of {}",
                        self.device.as_deref().unwrap_or("?")
                    )))?;
                let n6 = self
                    .h
                    .neighbours::<Ipv6Addr>(vx)
                    .await
                    .map_err(kernel(format!(
                        "list IPv6 neighbours of {}",
                        self.device.as_deref().unwrap_or("?")
                    )))?;
                let f = self.h.fdb_entries(vx).await.map_err(kernel(format!(
                    "list fdb entries of {}",
                    self.device.as_deref().unwrap_or("?")
                )))?;
                (n, n6, f)
            }
            None => (Vec::new(), Vec::new(), Vec::new()),
        };
        let have_route: HashMap<Ipv4Network, &Ipv4Route> =
            routes.iter().map(|r| (r.dst, r)).collect();
        // The tag is not compared: a kernel without NDA_PROTOCOL (before
        // 5.2) would otherwise have every neighbour rewritten on every pass.
        let have_neigh: HashMap<Ipv4Addr, Option<[u8; 6]>> = neighs
            .iter()
            .filter(|n| n.state == NeighState::Permanent)
            .map(|n| (n.ip, n.mac))
            .collect();
        let have_route6: HashMap<Ipv6Network, &Ipv6Route> =
            routes6.iter().map(|r| (r.dst, r)).collect();
        let have_neigh6: HashMap<Ipv6Addr, Option<[u8; 6]>> = neighs6
            .iter()
            .filter(|n| n.state == NeighState::Permanent)
            .map(|n| (n.ip, n.mac))
            .collect();
        let have_fdb: HashSet<([u8; 6], IpAddr)> = fdb
            .iter()
            .filter(|e| e.is_self && e.permanent)
            .filter_map(|e| e.dst.map(|d| (e.mac, d)))
            .collect();

        // The diff.
        let mut want_routes: HashSet<Ipv4Network> = HashSet::with_capacity(plan.len());
        let mut want_neigh: HashSet<Ipv4Addr> = HashSet::new();
        let mut want_fdb: HashSet<([u8; 6], IpAddr)> = HashSet::new();
        let mut want_routes6: HashSet<Ipv6Network> = HashSet::new();
        let mut want_neigh6: HashSet<Ipv6Addr> = HashSet::new();
        let mut jobs = Vec::new();
        for (p, via, via6) in &plan {
            let gw0 = p.subnet.network();
            let route = match via {
                Via::Tunnel(vx, _) => Ipv4Route::ferry(p.subnet, gw0, *vx, true),
                Via::Direct(next_hop) => Ipv4Route::ferry(p.subnet, *next_hop, underlay, false),
            };
            want_routes.insert(p.subnet);
            let mut job = PeerJob {
                peer: (*p).clone(),
                neigh: None,
                neigh6: None,
                fdb: None,
                route: None,
                route6: None,
            };
            let mut fdb_for = None;
            if let Via::Tunnel(vx, mac) = *via {
                want_neigh.insert(gw0);
                fdb_for = Some((vx, mac));
                if have_neigh.get(&gw0) != Some(&Some(mac)) {
                    job.neigh = Some((vx, gw0, mac));
                }
            }
            if let (Some(via6), Some(subnet6)) = (*via6, p.subnet6) {
                let gw6 = subnet6.network();
                let route6 = match via6 {
                    Via6::Tunnel(vx, mac) => {
                        want_neigh6.insert(gw6);
                        fdb_for = Some((vx, mac));
                        if have_neigh6.get(&gw6) != Some(&Some(mac)) {
                            job.neigh6 = Some((vx, gw6, mac));
                        }
                        Ipv6Route::ferry(subnet6, gw6, vx, true)
                    }
                    Via6::Direct(next_hop) => Ipv6Route::ferry(subnet6, next_hop, underlay, false),
                };
                want_routes6.insert(subnet6);
                let have = have_route6.get(&subnet6);
                if have != Some(&&route6) {
                    job.route6 = Some(RouteOp {
                        route: route6,
                        replace: have.is_some(),
                    });
                }
            }
            if let Some((vx, mac)) = fdb_for {
                want_fdb.insert((mac, p.public_ip));
                if !have_fdb.contains(&(mac, p.public_ip)) {
                    job.fdb = Some((vx, mac, p.public_ip));
                }
            }
            let have = have_route.get(&p.subnet);
            if have != Some(&&route) {
                job.route = Some(RouteOp {
                    route,
                    replace: have.is_some(),
                });
            }
            if job.neigh.is_none()
                && job.neigh6.is_none()
                && job.fdb.is_none()
                && job.route.is_none()
                && job.route6.is_none()
            {
                report.peers_programmed += 1;
            } else {
                jobs.push(job);
            }
        }
        let stale_routes: Vec<&Ipv4Route> = routes
            .iter()
            .filter(|r| !want_routes.contains(&r.dst))
            .collect();
        let stale_routes6: Vec<&Ipv6Route> = routes6
            .iter()
            .filter(|r| !want_routes6.contains(&r.dst))
            .collect();
        // Only ferry's own entries go: its neighbours (tagged, or of the
        // one shape ferry writes), and fdb entries for the MACs of those
        // neighbours or of wanted peers (with a remote). Flood
        // entries (all-zero MAC), entries someone else added for other MACs
        // and the kernel's NOARP neighbours stay.
        let network = self.network.as_ref();
        let ours4 = |n: &&Neighbour| n.is_ferrys() || ferry_shaped_v4(network, n);
        let ours6 = |n: &&Neighbour6| n.is_ferrys() || ferry_shaped_v6(network, n);
        let stale_neigh6: Vec<Ipv6Addr> = neighs6
            .iter()
            .filter(ours6)
            .filter(|n| !want_neigh6.contains(&n.ip))
            .map(|n| n.ip)
            .collect();
        let ferry_macs: HashSet<[u8; 6]> = neighs
            .iter()
            .filter(ours4)
            .filter_map(|n| n.mac)
            .chain(neighs6.iter().filter(ours6).filter_map(|n| n.mac))
            .chain(want_fdb.iter().map(|(mac, _)| *mac))
            .filter(|m| Mac(*m).is_unicast())
            .collect();
        let stale_fdb: Vec<&FdbEntry> = fdb
            .iter()
            .filter(|e| e.is_self && ferry_macs.contains(&e.mac))
            .filter(|e| e.dst.is_some_and(|d| !want_fdb.contains(&(e.mac, d))))
            .collect();
        let stale_neigh: Vec<Ipv4Addr> = neighs
            .iter()
            .filter(ours4)
            .filter(|n| !want_neigh.contains(&n.ip))
            .map(|n| n.ip)
            .collect();
        drop(plan);

        let stale_routes: Vec<BatchOp> = stale_routes
            .into_iter()
            .map(|r| BatchOp::DeleteRoute(r.clone()))
            .chain(
                stale_routes6
                    .into_iter()
                    .map(|r| BatchOp::DeleteRoute6(r.clone())),
            )
            .collect();
        let stale_fdb: Vec<BatchOp> = stale_fdb
            .into_iter()
            .map(|e| BatchOp::DeleteFdb(e.clone()))
            .collect();
        let stale_neigh: Vec<BatchOp> = match vx {
            Some(vx) => stale_neigh
                .into_iter()
                .map(|ip| BatchOp::DeleteNeighbour {
                    ifindex: vx,
                    ip: ip.into(),
                })
                .chain(stale_neigh6.into_iter().map(|ip| BatchOp::DeleteNeighbour {
                    ifindex: vx,
                    ip: ip.into(),
                }))
                .collect(),
            None => Vec::new(),
        };
        self.note_skipped(skipped);
        if jobs.is_empty()
            && stale_routes.is_empty()
            && stale_fdb.is_empty()
            && stale_neigh.is_empty()
        {
            debug!(?report, "reconcile pass");
            return Ok(report);
        }
        if self.batch.is_none() {
            self.batch = Some(
                self.h
                    .batch()
                    .map_err(kernel("open the netlink batch socket"))?,
            );
        }
        let batch = self.batch.as_mut().expect("opened above");

        // Routes of departed peers first, so nothing points at entries about
        // to go.
        let results = run_ops(batch, &stale_routes).await;
        tally_removed(&mut report, results, "delete stale route");

        // Each peer: neighbour and fdb entry, then the route, many peers per
        // round.
        for round in jobs.chunks(PEERS_PER_ROUND) {
            program_round(batch, round, &mut report).await;
        }

        let results = run_ops(batch, &stale_fdb).await;
        tally_removed(&mut report, results, "delete stale fdb entry");
        let results = run_ops(batch, &stale_neigh).await;
        tally_removed(&mut report, results, "delete stale neighbour");
        debug!(?report, "reconcile pass");
        Ok(report)
    }

    /// The VXLAN device right and up, with exactly the local `<subnet>.0/32`
    /// as IPv4 address. Returns its index.
    async fn ensure_device(
        &self,
        name: &str,
        report: &mut ReconcileReport,
    ) -> Result<u32, DataplaneError> {
        let spec = self.vxlan_spec(name);
        let (index, change) = self
            .h
            .ensure_vxlan(&spec)
            .await
            .map_err(kernel(format!("ensure vxlan device {name}")))?;
        match change {
            VxlanChange::Unchanged => {}
            VxlanChange::Created | VxlanChange::Recreated | VxlanChange::Adjusted => {
                debug!(device = name, ?change, "vxlan device");
                report.added += 1;
            }
        }
        let want =
            IpNetwork::V4(Ipv4Network::new(self.local.subnet.network(), 32).expect("/32 is valid"));
        let want6 = self
            .local
            .subnet6
            .map(|s| IpNetwork::V6(Ipv6Network::new(s.network(), 128).expect("/128 is valid")));
        let addrs = self
            .h
            .addresses(index)
            .await
            .map_err(kernel(format!("list addresses of {name}")))?;
        // Global addresses only (link-local ones are the kernel's).
        for a in addrs.iter().filter(|a| {
            if a.is_ipv4() {
                **a != want
            } else {
                Some(**a) != want6
            }
        }) {
            if self
                .h
                .delete_address(index, *a)
                .await
                .map_err(kernel(format!("delete address {a} of {name}")))?
            {
                report.removed += 1;
            }
        }
        if !addrs.contains(&want) {
            self.h
                .replace_address(index, want)
                .await
                .map_err(kernel(format!("add address {want} to {name}")))?;
            report.added += 1;
        }
        if let Some(want6) = want6
            && !addrs.contains(&want6)
        {
            self.h
                .replace_address_nodad(index, want6)
                .await
                .map_err(kernel(format!("add address {want6} to {name}")))?;
            report.added += 1;
        }
        Ok(index)
    }

    /// The public IPs (of either family) the kernel reaches on the underlay
    /// without a gateway (flannel's `DirectRouting` test: `ip route get` has
    /// no gateway).
    async fn directly_reachable<A: RouteFamily>(
        &self,
        ips: impl Iterator<Item = A>,
    ) -> Result<HashSet<A>, DataplaneError> {
        let unique: HashSet<A> = ips.collect();
        let underlay = self.local.underlay.index;
        let h = &self.h;
        let found: Vec<Result<Option<A>, NetopsError>> = futures::stream::iter(unique)
            .map(|ip| async move {
                let r = request(|| h.route_get(ip)).await?;
                Ok(r.filter(|r| r.gw.is_none() && r.oif == underlay)
                    .map(|_| ip))
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        let mut out = HashSet::new();
        for r in found {
            if let Some(ip) = r.map_err(kernel("look up the route to a peer"))? {
                out.insert(ip);
            }
        }
        Ok(out)
    }
}

/// The missing entries of a round of peers: their neighbours and fdb
/// entries in one batch, then the routes of the peers whose neighbour and fdb
/// entry are in place in another. A peer with a failed step gets no route
/// (a route must never point at a neighbour or fdb entry that is not there);
/// it is logged and counted in `failed`.
async fn program_round(batch: &mut Batch, round: &[PeerJob], report: &mut ReconcileReport) {
    let mut failed: Vec<Option<DataplaneError>> = round.iter().map(|_| None).collect();
    let fail = |job: &PeerJob, step: &'static str, source: NetopsError| DataplaneError::Peer {
        subnet: job.peer.subnet,
        public_ip: job.peer.public_ip,
        step,
        source,
    };

    let mut ops = Vec::with_capacity(2 * round.len());
    let mut owner: Vec<(usize, &'static str)> = Vec::with_capacity(2 * round.len());
    for (i, job) in round.iter().enumerate() {
        if let Some((ifindex, ip, mac)) = job.neigh {
            ops.push(BatchOp::ReplaceNeighbour {
                ifindex,
                ip: ip.into(),
                mac,
            });
            owner.push((i, "neighbour"));
        }
        if let Some((ifindex, ip, mac)) = job.neigh6 {
            ops.push(BatchOp::ReplaceNeighbour {
                ifindex,
                ip: ip.into(),
                mac,
            });
            owner.push((i, "IPv6 neighbour"));
        }
        if let Some((ifindex, mac, dst)) = job.fdb {
            ops.push(BatchOp::ReplaceFdb { ifindex, mac, dst });
            owner.push((i, "fdb entry"));
        }
    }
    for ((i, step), r) in owner.into_iter().zip(run_ops(batch, &ops).await) {
        match r {
            Ok(_) => report.added += 1,
            Err(e) => {
                if failed[i].is_none() {
                    failed[i] = Some(fail(&round[i], step, e));
                }
            }
        }
    }

    ops.clear();
    let mut owner: Vec<(usize, &'static str)> = Vec::with_capacity(round.len());
    for (i, job) in round.iter().enumerate() {
        if failed[i].is_some() {
            continue;
        }
        if let Some(op) = &job.route {
            ops.push(if op.replace {
                BatchOp::ReplaceRoute(op.route.clone())
            } else {
                BatchOp::CreateRoute(op.route.clone())
            });
            owner.push((i, "route"));
        }
        if let Some(op) = &job.route6 {
            ops.push(if op.replace {
                BatchOp::ReplaceRoute6(op.route.clone())
            } else {
                BatchOp::CreateRoute6(op.route.clone())
            });
            owner.push((i, "IPv6 route"));
        }
    }
    for ((i, step), r) in owner.into_iter().zip(run_ops(batch, &ops).await) {
        match r {
            Ok(_) => report.added += 1,
            Err(e) => {
                if failed[i].is_none() {
                    failed[i] = Some(fail(&round[i], step, e));
                }
            }
        }
    }

    for f in failed {
        match f {
            None => report.peers_programmed += 1,
            Some(e) => {
                report.failed += 1;
                warn!("{e}");
            }
        }
    }
}

/// `ops` in batches of at most [`Batch::MAX_OPS`] (the runtime gets the
/// thread back between them), the ones refused with ENOBUFS sent again with
/// doubling delays from 2 ms, up to [`ENOBUFS_RETRIES`] times. One result per
/// op, in order.
async fn run_ops(batch: &mut Batch, ops: &[BatchOp]) -> Vec<Result<bool, NetopsError>> {
    let mut results = Vec::with_capacity(ops.len());
    for chunk in ops.chunks(Batch::MAX_OPS) {
        results.extend(batch.run(chunk).await);
        tokio::task::yield_now().await;
    }
    let mut delay = Duration::from_millis(2);
    for _ in 0..ENOBUFS_RETRIES {
        let again: Vec<usize> = (0..ops.len())
            .filter(|&i| matches!(&results[i], Err(e) if e.is_errno(libc::ENOBUFS)))
            .collect();
        if again.is_empty() {
            break;
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
        let retry: Vec<BatchOp> = again.iter().map(|&i| ops[i].clone()).collect();
        let mut redone = Vec::with_capacity(retry.len());
        for chunk in retry.chunks(Batch::MAX_OPS) {
            redone.extend(batch.run(chunk).await);
            tokio::task::yield_now().await;
        }
        for (i, r) in again.into_iter().zip(redone) {
            results[i] = r;
        }
    }
    results
}

fn tally_removed(
    report: &mut ReconcileReport,
    results: Vec<Result<bool, NetopsError>>,
    what: &str,
) {
    for r in results {
        match r {
            Ok(true) => report.removed += 1,
            Ok(false) => {}
            Err(e) => warn!("{what}: {e}"),
        }
    }
}

/// One netlink request with a time limit, retried on ENOBUFS. (So the
/// dataplane needs a tokio runtime with time enabled, as the daemon's is.)
async fn request<T, F, Fut>(mut f: F) -> Result<T, NetopsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, NetopsError>>,
{
    let mut delay = Duration::from_millis(2);
    let mut attempt = 0;
    loop {
        match tokio::time::timeout(REQUEST_TIMEOUT, f()).await {
            Ok(Err(e)) if e.is_errno(libc::ENOBUFS) && attempt < ENOBUFS_RETRIES => {
                attempt += 1;
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Ok(r) => return r,
            Err(_) => {
                return Err(NetopsError::Io {
                    op: format!("netlink request (no answer in {REQUEST_TIMEOUT:?})"),
                    netns: String::new(),
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
        }
    }
}

/// Kernel change notifications that may mean drift (links, main-table IPv4
/// routes, ARP entries, VXLAN fdb entries). Noise is dropped here: IPv6
/// neighbours, MACs a bridge learns, neighbours the kernel resolves.
pub struct KernelEvents {
    monitor: Monitor,
}

impl std::fmt::Debug for KernelEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelEvents").finish_non_exhaustive()
    }
}

impl KernelEvents {
    /// Subscribes in the calling thread's namespace (inside a tokio runtime).
    pub fn open() -> Result<KernelEvents, DataplaneError> {
        Ok(KernelEvents {
            monitor: Monitor::new(None).map_err(DataplaneError::Monitor)?,
        })
    }

    /// Subscribes in `ns` (tests).
    pub fn open_in(ns: &NetNs) -> Result<KernelEvents, DataplaneError> {
        Ok(KernelEvents {
            monitor: Monitor::new(Some(ns)).map_err(DataplaneError::Monitor)?,
        })
    }

    /// Waits for the next relevant change; `None` when the socket is gone.
    pub async fn next(&mut self) -> Option<()> {
        loop {
            let ev = self.monitor.next().await?;
            if relevant(&ev) {
                return Some(());
            }
        }
    }
}

fn relevant(ev: &KernelEvent) -> bool {
    const MAIN_TABLE: u32 = 254;
    match ev {
        KernelEvent::Link { .. } | KernelEvent::Overrun => true,
        KernelEvent::Ipv4Route { table, .. } | KernelEvent::Ipv6Route { table, .. } => {
            *table == MAIN_TABLE
        }
        KernelEvent::Neighbour {
            fdb,
            own,
            ipv4,
            ipv6,
            permanent,
            deleted,
            ..
        } => {
            if *fdb {
                *own
            } else {
                (*ipv4 || *ipv6) && (*permanent || *deleted)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ferry_device_names() {
        for name in ["ferry.1", "ferry.16777215"] {
            assert!(is_ferry_device(name), "{name}");
        }
        for name in ["ferry.", "ferry.x", "ferry.1a", "ferry1", "eth0", "cni0"] {
            assert!(!is_ferry_device(name), "{name}");
        }
    }
}
