//! Routes in the main table: the plugins' [`RouteSpec`], and the daemon's
//! [`IpRoute`]s (IPv4 and IPv6 alike) tagged with ferry's own protocol
//! ([`FERRY_ROUTE_PROTO`]).

use crate::link::is_errno;
use crate::{NsHandle, Result};
use futures::{TryStream, TryStreamExt};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteType,
};
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A route as ferry programs it: `dst [via gw] dev <index> [onlink]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
    pub oif: u32,
    pub onlink: bool,
}

impl RouteSpec {
    fn message(&self) -> std::result::Result<RouteMessage, rtnetlink::Error> {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(self.dst.network(), self.dst.prefix())
            .map_err(|e| rtnetlink::Error::InvalidNla(e.to_string()))?
            .output_interface(self.oif);
        if let Some(gw) = self.gw {
            b = b
                .gateway(gw)
                .map_err(|e| rtnetlink::Error::InvalidNla(e.to_string()))?;
        }
        if self.onlink {
            b = b.onlink();
        }
        Ok(b.build())
    }
}

impl NsHandle {
    /// `ip route replace …`: idempotent.
    pub async fn replace_route(&self, route: &RouteSpec) -> Result<()> {
        let what = format!("{} via {:?} dev #{}", route.dst, route.gw, route.oif);
        let msg = route
            .message()
            .map_err(|e| self.err("build route", what.clone(), e))?;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| self.err("add route", what, e))
    }

    /// Deletes a route; `Ok(false)` when it was not there.
    pub async fn delete_route(&self, route: &RouteSpec) -> Result<bool> {
        let what = format!("{} via {:?} dev #{}", route.dst, route.gw, route.oif);
        let msg = route
            .message()
            .map_err(|e| self.err("build route", what.clone(), e))?;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ESRCH) => Ok(false),
            Err(e) => Err(self.err("delete route", what, e)),
        }
    }

    /// The main-table routes through link `oif`, both families.
    pub async fn routes_via(&self, oif: u32) -> Result<Vec<RouteSpec>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut filter = RouteMessage::default();
            filter.header.address_family = family;
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(filter)
                .execute()
                .try_collect()
                .await
                .map_err(|e| self.err("list routes", format!("#{oif}"), e))?;
            for m in msgs {
                let mut spec = RouteSpec {
                    dst: match family {
                        AddressFamily::Inet6 => "::/0".parse().expect("valid"),
                        _ => "0.0.0.0/0".parse().expect("valid"),
                    },
                    gw: None,
                    oif: 0,
                    onlink: false,
                };
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(d) => {
                            if let Some(ip) = route_ip(d)
                                && let Ok(n) =
                                    IpNetwork::new(ip, m.header.destination_prefix_length)
                            {
                                spec.dst = n;
                            }
                        }
                        RouteAttribute::Gateway(g) => spec.gw = route_ip(g),
                        RouteAttribute::Oif(i) => spec.oif = *i,
                        _ => {}
                    }
                }
                if spec.oif == oif {
                    out.push(spec);
                }
            }
        }
        Ok(out)
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The route protocol number ferry stamps on every route the daemon programs
/// (`ip route … proto 70`). Routes carry it, so ferry finds its own stale
/// routes after a restart without ever touching anyone else's (a foreign
/// route to the same prefix has another protocol and is left alone).
///
/// 70 is ASCII `F`. It is not in iproute2's `rt_protos` (0–18, 42, 99,
/// 186–192) nor, as far as we know, used by another CNI (Calico uses 80).
/// The kernel does not interpret protocols above `RTPROT_STATIC` (4).
pub const FERRY_ROUTE_PROTO: u8 = 70;

/// `RT_TABLE_MAIN`.
const MAIN_TABLE: u32 = 254;

/// An address family ferry routes pod subnets in: [`Ipv4Addr`] or
/// [`Ipv6Addr`]. What differs between the two is only how an address is
/// spelled in a route message.
pub trait RouteFamily:
    Copy + Eq + Hash + fmt::Debug + fmt::Display + Into<IpAddr> + Send + Sync + 'static
{
    /// The family's network type (`Ipv4Network`, `Ipv6Network`).
    type Net: Copy + Eq + Hash + fmt::Debug + fmt::Display + Send + Sync;
    const FAMILY: AddressFamily;
    const UNSPECIFIED: Self;
    /// 32 or 128.
    const HOST_PREFIX: u8;
    fn from_route_address(a: &RouteAddress) -> Option<Self>;
    fn to_route_address(self) -> RouteAddress;
    /// `Some` when `ip` is of this family.
    fn from_ip(ip: Option<IpAddr>) -> Option<Self>;
    fn net(addr: Self, prefix: u8) -> Option<Self::Net>;
    fn net_parts(net: &Self::Net) -> (Self, u8);
}

impl RouteFamily for Ipv4Addr {
    type Net = Ipv4Network;
    const FAMILY: AddressFamily = AddressFamily::Inet;
    const UNSPECIFIED: Self = Ipv4Addr::UNSPECIFIED;
    const HOST_PREFIX: u8 = 32;
    fn from_route_address(a: &RouteAddress) -> Option<Self> {
        match a {
            RouteAddress::Inet(v4) => Some(*v4),
            _ => None,
        }
    }
    fn to_route_address(self) -> RouteAddress {
        RouteAddress::Inet(self)
    }
    fn from_ip(ip: Option<IpAddr>) -> Option<Self> {
        match ip? {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        }
    }
    fn net(addr: Self, prefix: u8) -> Option<Ipv4Network> {
        Ipv4Network::new(addr, prefix).ok()
    }
    fn net_parts(net: &Ipv4Network) -> (Self, u8) {
        (net.network(), net.prefix())
    }
}

impl RouteFamily for Ipv6Addr {
    type Net = Ipv6Network;
    const FAMILY: AddressFamily = AddressFamily::Inet6;
    const UNSPECIFIED: Self = Ipv6Addr::UNSPECIFIED;
    const HOST_PREFIX: u8 = 128;
    fn from_route_address(a: &RouteAddress) -> Option<Self> {
        match a {
            RouteAddress::Inet6(v6) => Some(*v6),
            _ => None,
        }
    }
    fn to_route_address(self) -> RouteAddress {
        RouteAddress::Inet6(self)
    }
    fn from_ip(ip: Option<IpAddr>) -> Option<Self> {
        match ip? {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        }
    }
    fn net(addr: Self, prefix: u8) -> Option<Ipv6Network> {
        Ipv6Network::new(addr, prefix).ok()
    }
    fn net_parts(net: &Ipv6Network) -> (Self, u8) {
        (net.network(), net.prefix())
    }
}

/// A route of the main table, with its protocol:
/// `dst [via gw] dev <oif> [onlink] proto <protocol>` (the kernel's default
/// metric).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpRoute<A: RouteFamily> {
    pub dst: A::Net,
    pub gw: Option<A>,
    pub oif: u32,
    pub onlink: bool,
    pub protocol: u8,
}

pub type Ipv4Route = IpRoute<Ipv4Addr>;
pub type Ipv6Route = IpRoute<Ipv6Addr>;

impl<A: RouteFamily> IpRoute<A> {
    /// `dst via gw dev oif [onlink]`, tagged with [`FERRY_ROUTE_PROTO`].
    pub fn ferry(dst: A::Net, gw: A, oif: u32, onlink: bool) -> IpRoute<A> {
        IpRoute {
            dst,
            gw: Some(gw),
            oif,
            onlink,
            protocol: FERRY_ROUTE_PROTO,
        }
    }

    pub(crate) fn message(&self) -> RouteMessage {
        let (dst, prefix) = A::net_parts(&self.dst);
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.into(), prefix)
            .expect("a network's prefix fits its family")
            .output_interface(self.oif)
            .protocol(RouteProtocol::from(self.protocol));
        if let Some(gw) = self.gw {
            b = b
                .gateway(gw.into())
                .expect("gateway of the destination's family");
        }
        if self.onlink {
            b = b.onlink();
        }
        b.build()
    }

    /// `dst via gw dev #oif onlink proto N`, for messages.
    pub fn describe(&self) -> String {
        let mut s = format!("{}", self.dst);
        if let Some(gw) = self.gw {
            s.push_str(&format!(" via {gw}"));
        }
        s.push_str(&format!(" dev #{}", self.oif));
        if self.onlink {
            s.push_str(" onlink");
        }
        // iproute2's names for the protocols an operator meets most.
        match self.protocol {
            2 => s.push_str(" proto kernel"),
            3 => s.push_str(" proto boot"),
            4 => s.push_str(" proto static"),
            9 => s.push_str(" proto ra"),
            16 => s.push_str(" proto dhcp"),
            p => s.push_str(&format!(" proto {p}")),
        }
        s
    }

    /// The route a dump message describes, if it is a plain unicast route of
    /// this family (multipath and non-unicast routes are `None`), and its
    /// table.
    pub(crate) fn from_message(m: &RouteMessage) -> Option<(IpRoute<A>, u32)> {
        if m.header.address_family != A::FAMILY || m.header.kind != RouteType::Unicast {
            return None;
        }
        let mut table = u32::from(m.header.table);
        let mut dst = None;
        let mut gw = None;
        let mut oif = 0;
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(d) => dst = A::from_route_address(d),
                RouteAttribute::Gateway(g) => gw = A::from_route_address(g),
                RouteAttribute::Oif(i) => oif = *i,
                RouteAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        // No destination attribute: the default route.
        let dst = dst.unwrap_or(A::UNSPECIFIED);
        let route = IpRoute {
            dst: A::net(dst, m.header.destination_prefix_length)?,
            gw,
            oif,
            onlink: m.header.flags.contains(RouteFlags::Onlink),
            protocol: u8::from(m.header.protocol),
        };
        Some((route, table))
    }
}

/// What a route entry is, as far as ferry's ownership rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// A unicast route of the main table.
    MainUnicast,
    /// Any other route of the main table (blackhole, unreachable, prohibit,
    /// throw, multicast, …): never ferry's, and never replaced.
    MainOther,
    /// A `local` route (an address this node holds), any table.
    Local,
}

/// One entry of a route dump that ferry's ownership rules look at: the main
/// table's routes of every type and protocol, and the node's own addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteEntry<A: RouteFamily> {
    /// For [`RouteKind::Local`], `dst` is the address as a host prefix.
    pub route: IpRoute<A>,
    pub kind: RouteKind,
}

/// Which main-table routes [`NsHandle::ip_routes`] returns.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteFilter {
    pub protocol: Option<u8>,
    pub oif: Option<u32>,
}

impl NsHandle {
    /// A dump of every route of `family` (all tables), streamed.
    pub(crate) fn route_dump(
        &self,
        family: AddressFamily,
    ) -> impl TryStream<Ok = RouteMessage, Error = rtnetlink::Error> + Unpin {
        let mut req = RouteMessage::default();
        req.header.address_family = family;
        self.handle.route().get(req).execute()
    }

    /// `ip route replace <route>` with its protocol: idempotent, and takes
    /// over a route to the same prefix and metric whoever added it, so the
    /// daemon calls it only where a dump showed no foreign route to `dst`
    /// (new routes go out with [`NsHandle::create_ip_route`] or a batch's
    /// exclusive create).
    pub async fn replace_ip_route<A: RouteFamily>(&self, route: &IpRoute<A>) -> Result<()> {
        self.handle
            .route()
            .add(route.message())
            .replace()
            .execute()
            .await
            .map_err(|e| self.err("replace route", route.describe(), e))
    }

    /// `ip route add <route>` with its protocol (NLM_F_EXCL): fails with
    /// EEXIST instead of taking over a route someone else has to `dst`.
    pub async fn create_ip_route<A: RouteFamily>(&self, route: &IpRoute<A>) -> Result<()> {
        self.handle
            .route()
            .add(route.message())
            .execute()
            .await
            .map_err(|e| self.err("add route", route.describe(), e))
    }

    /// `ip route del <route>`, matching its protocol too, so a foreign route
    /// to the same prefix is never removed. `Ok(false)` when it was not there.
    pub async fn delete_ip_route<A: RouteFamily>(&self, route: &IpRoute<A>) -> Result<bool> {
        match self.handle.route().del(route.message()).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ESRCH) => Ok(false),
            Err(e) => Err(self.err("delete route", route.describe(), e)),
        }
    }

    /// The unicast routes of family `A` in the main table matching
    /// `filter`, from one dump (filtered while it streams, so only the
    /// matches are kept).
    pub async fn ip_routes<A: RouteFamily>(&self, filter: RouteFilter) -> Result<Vec<IpRoute<A>>> {
        let mut stream = self.route_dump(A::FAMILY);
        let mut out = Vec::new();
        while let Some(m) = stream
            .try_next()
            .await
            .map_err(|e| self.err("list routes", "<all>", e))?
        {
            let Some((r, table)) = IpRoute::<A>::from_message(&m) else {
                continue;
            };
            if table == MAIN_TABLE
                && filter.protocol.is_none_or(|p| p == r.protocol)
                && filter.oif.is_none_or(|o| o == r.oif)
            {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Every main-table route of family `A` (any type, any protocol) and
    /// every `local` route (the node's own addresses), from one dump: what
    /// ferry needs to tell its own routes from everyone else's.
    pub async fn route_entries<A: RouteFamily>(&self) -> Result<Vec<RouteEntry<A>>> {
        let mut stream = self.route_dump(A::FAMILY);
        let mut out = Vec::new();
        while let Some(m) = stream
            .try_next()
            .await
            .map_err(|e| self.err("list routes", "<all>", e))?
        {
            if m.header.address_family != A::FAMILY {
                continue;
            }
            let mut table = u32::from(m.header.table);
            let mut dst = None;
            let mut gw = None;
            let mut oif = 0;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = A::from_route_address(d),
                    RouteAttribute::Gateway(g) => gw = A::from_route_address(g),
                    RouteAttribute::Oif(i) => oif = *i,
                    RouteAttribute::Table(t) => table = *t,
                    _ => {}
                }
            }
            let kind = match m.header.kind {
                RouteType::Local => RouteKind::Local,
                RouteType::Unicast if table == MAIN_TABLE => RouteKind::MainUnicast,
                _ if table == MAIN_TABLE => RouteKind::MainOther,
                _ => continue,
            };
            let Some(dst) = A::net(
                dst.unwrap_or(A::UNSPECIFIED),
                m.header.destination_prefix_length,
            ) else {
                continue;
            };
            out.push(RouteEntry {
                route: IpRoute {
                    dst,
                    gw,
                    oif,
                    onlink: m.header.flags.contains(RouteFlags::Onlink),
                    protocol: u8::from(m.header.protocol),
                },
                kind,
            });
        }
        Ok(out)
    }

    /// `ip route get <dst>`: the route the kernel would use, or `None` when
    /// the destination is unreachable.
    pub async fn route_get<A: RouteFamily>(&self, dst: A) -> Result<Option<IpRoute<A>>> {
        let mut req = RouteMessage::default();
        req.header.address_family = A::FAMILY;
        req.header.destination_prefix_length = A::HOST_PREFIX;
        req.attributes
            .push(RouteAttribute::Destination(dst.to_route_address()));
        let mut stream = self.handle.route().get(req).execute();
        match stream.try_next().await {
            Ok(Some(m)) => {
                // The answer describes a cached host route; keep its gateway and oif.
                let mut r = IpRoute {
                    dst: A::net(dst, A::HOST_PREFIX).expect("a host prefix is valid"),
                    gw: None,
                    oif: 0,
                    onlink: m.header.flags.contains(RouteFlags::Onlink),
                    protocol: u8::from(m.header.protocol),
                };
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Gateway(g) => r.gw = A::from_route_address(g),
                        RouteAttribute::Oif(i) => r.oif = *i,
                        _ => {}
                    }
                }
                Ok(Some(r))
            }
            Ok(None) => Ok(None),
            Err(e)
                if is_errno(&e, libc::ENETUNREACH)
                    || is_errno(&e, libc::EHOSTUNREACH)
                    || is_errno(&e, libc::EINVAL) =>
            {
                Ok(None)
            }
            Err(e) => Err(self.err("look up route", dst.to_string(), e)),
        }
    }

    /// The IPv4 default route of the main table with the lowest metric.
    pub async fn default_ipv4_route(&self) -> Result<Option<Ipv4Route>> {
        let mut stream = self.route_dump(AddressFamily::Inet);
        let mut best: Option<(u32, Ipv4Route)> = None;
        while let Some(m) = stream
            .try_next()
            .await
            .map_err(|e| self.err("list routes", "<default>", e))?
        {
            let Some((r, table)) = Ipv4Route::from_message(&m) else {
                continue;
            };
            if table != MAIN_TABLE || r.dst.prefix() != 0 || r.oif == 0 {
                continue;
            }
            let metric = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Priority(p) => Some(*p),
                    _ => None,
                })
                .unwrap_or(0);
            if best.as_ref().is_none_or(|(b, _)| metric < *b) {
                best = Some((metric, r));
            }
        }
        Ok(best.map(|(_, r)| r))
    }

    /// The IPv6 default route of the main table with the lowest metric
    /// (single-path unicast routes only: a multipath default has no one
    /// output link).
    pub async fn default_ipv6_route(&self) -> Result<Option<RouteSpec>> {
        let mut stream = self.route_dump(AddressFamily::Inet6);
        let mut best: Option<(u32, RouteSpec)> = None;
        while let Some(m) = stream
            .try_next()
            .await
            .map_err(|e| self.err("list routes", "<default6>", e))?
        {
            if m.header.address_family != AddressFamily::Inet6
                || m.header.kind != RouteType::Unicast
                || m.header.destination_prefix_length != 0
            {
                continue;
            }
            let mut table = u32::from(m.header.table);
            let mut metric = 0;
            let mut spec = RouteSpec {
                dst: "::/0".parse().expect("valid"),
                gw: None,
                oif: 0,
                onlink: m.header.flags.contains(RouteFlags::Onlink),
            };
            for a in &m.attributes {
                match a {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Priority(p) => metric = *p,
                    RouteAttribute::Gateway(g) => spec.gw = route_ip(g),
                    RouteAttribute::Oif(i) => spec.oif = *i,
                    _ => {}
                }
            }
            if table != MAIN_TABLE || spec.oif == 0 {
                continue;
            }
            if best.as_ref().is_none_or(|(b, _)| metric < *b) {
                best = Some((metric, spec));
            }
        }
        Ok(best.map(|(_, r)| r))
    }

    /// The link holding the local address `ip`, IPv4 or IPv6 (from the
    /// kernel's `local` table), or `None` when no link has it.
    pub async fn link_holding(&self, ip: impl Into<IpAddr>) -> Result<Option<u32>> {
        let ip: IpAddr = ip.into();
        let (family, len) = match ip {
            IpAddr::V4(_) => (AddressFamily::Inet, 32),
            IpAddr::V6(_) => (AddressFamily::Inet6, 128),
        };
        let mut stream = self.route_dump(family);
        while let Some(m) = stream
            .try_next()
            .await
            .map_err(|e| self.err("list routes", "<local>", e))?
        {
            if m.header.kind != RouteType::Local || m.header.destination_prefix_length != len {
                continue;
            }
            let mut dst = None;
            let mut oif = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = route_ip(d),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if dst == Some(ip) && oif.is_some() {
                return Ok(oif);
            }
        }
        Ok(None)
    }
}
