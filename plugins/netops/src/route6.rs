//! The daemon's IPv6 routes of the main table, tagged with ferry's protocol
//! ([`FERRY_ROUTE_PROTO`](crate::FERRY_ROUTE_PROTO)): the IPv6 twin of
//! [`Ipv4Route`](crate::Ipv4Route), for dual-stack pod networks.

use crate::link::is_errno;
use crate::{NsHandle, Result, RouteFilter};
use futures::TryStreamExt;
use ipnetwork::Ipv6Network;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteType,
};
use std::net::Ipv6Addr;

/// `RT_TABLE_MAIN`.
const MAIN_TABLE: u32 = 254;

/// An IPv6 route of the main table, with its protocol:
/// `dst [via gw] dev <oif> [onlink] proto <protocol>` (the kernel's default
/// metric, 1024).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ipv6Route {
    pub dst: Ipv6Network,
    pub gw: Option<Ipv6Addr>,
    pub oif: u32,
    pub onlink: bool,
    pub protocol: u8,
}

impl Ipv6Route {
    /// `dst via gw dev oif [onlink]`, tagged with ferry's protocol.
    pub fn ferry(dst: Ipv6Network, gw: Ipv6Addr, oif: u32, onlink: bool) -> Ipv6Route {
        Ipv6Route {
            dst,
            gw: Some(gw),
            oif,
            onlink,
            protocol: crate::FERRY_ROUTE_PROTO,
        }
    }

    pub(crate) fn message(&self) -> RouteMessage {
        let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(self.dst.network(), self.dst.prefix())
            .output_interface(self.oif)
            .protocol(RouteProtocol::from(self.protocol));
        if let Some(gw) = self.gw {
            b = b.gateway(gw);
        }
        if self.onlink {
            b = b.onlink();
        }
        b.build()
    }

    pub(crate) fn describe(&self) -> String {
        let mut s = format!("{}", self.dst);
        if let Some(gw) = self.gw {
            s.push_str(&format!(" via {gw}"));
        }
        s.push_str(&format!(" dev #{}", self.oif));
        if self.onlink {
            s.push_str(" onlink");
        }
        s.push_str(&format!(" proto {}", self.protocol));
        s
    }

    /// The route a dump message describes, if it is a plain IPv6 unicast
    /// route (multipath and non-unicast routes are `None`), and its table.
    pub(crate) fn from_message(m: &RouteMessage) -> Option<(Ipv6Route, u32)> {
        if m.header.address_family != AddressFamily::Inet6 || m.header.kind != RouteType::Unicast {
            return None;
        }
        let mut table = u32::from(m.header.table);
        let mut dst = Ipv6Addr::UNSPECIFIED;
        let mut gw = None;
        let mut oif = 0;
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet6(d)) => dst = *d,
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gw = Some(*g),
                RouteAttribute::Oif(i) => oif = *i,
                RouteAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        let dst = Ipv6Network::new(dst, m.header.destination_prefix_length).ok()?;
        let route = Ipv6Route {
            dst,
            gw,
            oif,
            onlink: m.header.flags.contains(RouteFlags::Onlink),
            protocol: u8::from(m.header.protocol),
        };
        Some((route, table))
    }
}

impl NsHandle {
    /// `ip -6 route replace <route>` with its protocol: idempotent.
    pub async fn replace_ipv6_route(&self, route: &Ipv6Route) -> Result<()> {
        self.handle
            .route()
            .add(route.message())
            .replace()
            .execute()
            .await
            .map_err(|e| self.err("replace route", route.describe(), e))
    }

    /// `ip -6 route del <route>`, matching its protocol too. `Ok(false)` when
    /// it was not there.
    pub async fn delete_ipv6_route(&self, route: &Ipv6Route) -> Result<bool> {
        match self.handle.route().del(route.message()).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ESRCH) => Ok(false),
            Err(e) => Err(self.err("delete route", route.describe(), e)),
        }
    }

    /// The unicast IPv6 routes of the main table matching `filter`, from one
    /// dump.
    pub async fn ipv6_routes(&self, filter: RouteFilter) -> Result<Vec<Ipv6Route>> {
        let mut req = RouteMessage::default();
        req.header.address_family = AddressFamily::Inet6;
        let mut stream = self.handle.route().get(req).execute();
        let mut out = Vec::new();
        while let Some(m) = stream
            .try_next()
            .await
            .map_err(|e| self.err("list routes", "<all IPv6>", e))?
        {
            let Some((r, table)) = Ipv6Route::from_message(&m) else {
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
}

impl NsHandle {
    /// `ip -6 route get <dst>`: the route the kernel would use, or `None`
    /// when the destination is unreachable.
    pub async fn route_get_ipv6(&self, dst: Ipv6Addr) -> Result<Option<Ipv6Route>> {
        let mut req = RouteMessage::default();
        req.header.address_family = AddressFamily::Inet6;
        req.header.destination_prefix_length = 128;
        req.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet6(dst)));
        let mut stream = self.handle.route().get(req).execute();
        match stream.try_next().await {
            Ok(Some(m)) => {
                let mut r = Ipv6Route {
                    dst: Ipv6Network::new(dst, 128).expect("/128 is valid"),
                    gw: None,
                    oif: 0,
                    onlink: m.header.flags.contains(RouteFlags::Onlink),
                    protocol: u8::from(m.header.protocol),
                };
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Gateway(RouteAddress::Inet6(g)) => r.gw = Some(*g),
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
}
