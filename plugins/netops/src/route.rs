//! Routes in the main table.

use crate::link::is_errno;
use crate::{NsHandle, Result};
use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use std::net::IpAddr;

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
