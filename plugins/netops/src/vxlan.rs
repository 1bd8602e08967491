//! The overlay's VXLAN device: created, read back, and kept equal to its
//! spec (flannel's `ensureLink`, with the attributes compared explicitly).
//!
//! Attributes the kernel cannot change on a live VXLAN device (VNI, local
//! address and its family, underlay, port, learning) mean delete and create
//! again; MTU, MAC and up are set in place. The underlay may be IPv4 (`local`)
//! or IPv6 (`local6`); the fdb remotes of the device must be of its family.

use crate::link::is_errno;
use crate::neigh::mac_str;
use crate::{NsHandle, Result};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{LinkUnspec, LinkVxlan};
use std::net::IpAddr;

/// What the overlay's VXLAN device must look like
/// (`ip link add <name> type vxlan id <vni> dev <underlay> local <local>
/// dstport <port> nolearning mtu <mtu> address <mac> up`; an IPv6 `local` is
/// sent as `IFLA_VXLAN_LOCAL6`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    /// Ifindex of the underlay link.
    pub underlay: u32,
    /// The local underlay address: IPv4 or IPv6.
    pub local: IpAddr,
    /// UDP destination port.
    pub port: u16,
    pub mtu: u32,
    /// The VTEP MAC, pinned (peers have it in their neighbour and fdb entries).
    pub mac: [u8; 6],
}

/// A VXLAN device as the kernel reports it (fields the kernel did not
/// report are `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vxlan {
    pub index: u32,
    pub name: String,
    /// `Some("vxlan")` for a VXLAN device; a link of another kind with the
    /// same name is reported too, so the caller can replace it.
    pub kind: Option<String>,
    pub vni: Option<u32>,
    pub underlay: Option<u32>,
    /// `IFLA_VXLAN_LOCAL` or `IFLA_VXLAN_LOCAL6`.
    pub local: Option<IpAddr>,
    pub port: Option<u16>,
    pub learning: Option<bool>,
    pub mtu: u32,
    pub mac: Vec<u8>,
    pub is_up: bool,
}

impl Vxlan {
    /// True when only in-place changes (MTU, MAC, up) separate it from `spec`.
    pub fn compatible_with(&self, spec: &VxlanSpec) -> bool {
        self.kind.as_deref() == Some("vxlan")
            && self.vni == Some(spec.vni)
            && self.underlay == Some(spec.underlay)
            && self.local == Some(spec.local)
            && self.port == Some(spec.port)
            && self.learning == Some(false)
    }

    /// True when nothing separates it from `spec`.
    pub fn matches(&self, spec: &VxlanSpec) -> bool {
        self.compatible_with(spec)
            && self.mtu == spec.mtu
            && self.mac == spec.mac
            && self.is_up
            && self.name == spec.name
    }

    fn from_message(msg: LinkMessage) -> Vxlan {
        let mut v = Vxlan {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            vni: None,
            underlay: None,
            local: None,
            port: None,
            learning: None,
            mtu: 0,
            mac: Vec::new(),
            is_up: msg.header.flags.contains(LinkFlags::Up),
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => v.name = n,
                LinkAttribute::Mtu(m) => v.mtu = m,
                LinkAttribute::Address(a) => v.mac = a,
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => v.kind = Some(k.to_string()),
                            LinkInfo::Data(InfoData::Vxlan(attrs)) => {
                                for a in attrs {
                                    match a {
                                        InfoVxlan::Id(id) => v.vni = Some(id),
                                        InfoVxlan::Link(l) => v.underlay = Some(l),
                                        InfoVxlan::Local(ip) => v.local = Some(IpAddr::V4(ip)),
                                        InfoVxlan::Local6(ip) => v.local = Some(IpAddr::V6(ip)),
                                        InfoVxlan::Port(p) => v.port = Some(p),
                                        InfoVxlan::Learning(l) => v.learning = Some(l),
                                        _ => {}
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        v
    }
}

/// What [`NsHandle::ensure_vxlan`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VxlanChange {
    /// It was there and right.
    Unchanged,
    /// It was missing.
    Created,
    /// It had the wrong VNI, port, local address (or its family), underlay
    /// or kind.
    Recreated,
    /// MTU, MAC or up were set in place.
    Adjusted,
}

impl NsHandle {
    /// The link called `name` with its VXLAN attributes, or `None`.
    pub async fn vxlan_by_name(&self, name: &str) -> Result<Option<Vxlan>> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(m) => Ok(m.map(Vxlan::from_message)),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(self.err("look up link", name, e)),
        }
    }

    /// Creates the device, up (EEXIST when the name is taken). Returns its index.
    pub async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<u32> {
        let b = LinkVxlan::new(&spec.name, spec.vni)
            // The underlay is `dev` (IFLA_VXLAN_LINK), not the generic `link`.
            .dev(spec.underlay);
        // LOCAL6 alone makes an IPv6 device (the kernel takes the remote's
        // family from the local address's).
        let b = match spec.local {
            IpAddr::V4(v4) => b.local(v4),
            IpAddr::V6(v6) => b.local6(v6),
        };
        let msg = b
            .port(spec.port)
            .learning(false)
            .mtu(spec.mtu)
            .address(spec.mac.to_vec())
            .up()
            .build();
        self.add_link(msg, "create vxlan", spec.name.clone())
            .await?;
        match self.vxlan_by_name(&spec.name).await? {
            Some(v) => Ok(v.index),
            None => Err(crate::NetopsError::LinkNotFound {
                ifname: spec.name.clone(),
                netns: self.netns.clone(),
            }),
        }
    }

    /// Makes the device equal to `spec`: creates it, recreates it when an
    /// attribute that cannot change in place differs, or sets MTU, MAC and up.
    /// A link of another kind with the name is refused (EEXIST), not deleted.
    /// Recreating it drops every neighbour, fdb entry and route through it.
    pub async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<(u32, VxlanChange)> {
        let Some(cur) = self.vxlan_by_name(&spec.name).await? else {
            return Ok((self.create_vxlan(spec).await?, VxlanChange::Created));
        };
        if cur.kind.as_deref() != Some("vxlan") {
            // A link of another kind under the device's name is not ferry's:
            // refused, never deleted.
            return Err(crate::NetopsError::Io {
                op: format!(
                    "create vxlan {}: a {} link of that name exists and is not ferry's VXLAN device (ferry deletes only links it made; rename or remove it)",
                    spec.name,
                    cur.kind.as_deref().unwrap_or("non-vxlan")
                ),
                netns: self.netns.clone(),
                source: std::io::Error::from_raw_os_error(libc::EEXIST),
            });
        }
        if !cur.compatible_with(spec) {
            self.delete_link(cur.index).await?;
            return Ok((self.create_vxlan(spec).await?, VxlanChange::Recreated));
        }
        if cur.matches(spec) {
            return Ok((cur.index, VxlanChange::Unchanged));
        }
        let mut b = LinkUnspec::new_with_index(cur.index).up();
        if cur.mtu != spec.mtu {
            b = b.mtu(spec.mtu);
        }
        if cur.mac != spec.mac {
            b = b.address(spec.mac.to_vec());
        }
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(|e| {
                self.err(
                    "set mtu/mac/up of vxlan",
                    format!(
                        "{} (mtu {} mac {})",
                        spec.name,
                        spec.mtu,
                        mac_str(&spec.mac)
                    ),
                    e,
                )
            })?;
        Ok((cur.index, VxlanChange::Adjusted))
    }
}
