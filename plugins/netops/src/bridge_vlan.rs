//! Bridge VLANs (`bridge vlan`): VLAN filtering on a bridge and the VLANs of
//! its ports.
//!
//! Filtering is a bridge option (IFLA_BR_VLAN_FILTERING, sent as RTM_NEWLINK
//! on the existing bridge); a port's VLANs are AF_BRIDGE RTM_SETLINK /
//! RTM_DELLINK messages carrying IFLA_AF_SPEC / IFLA_BRIDGE_VLAN_INFO, and
//! are read back from an AF_BRIDGE link dump with RTEXT_FILTER_BRVLAN.

use crate::{NsHandle, Result};
use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::link::{
    AfSpecBridge, BridgeFlag, BridgeVlanInfoFlags, InfoBridge, InfoData, InfoKind, InfoVeth,
    LinkAttribute, LinkExtentMask, LinkInfo,
};
use rtnetlink::{LinkBridge, LinkBridgeVlan, LinkMessageBuilder, LinkUnspec, LinkVeth};

/// One VLAN of a bridge port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortVlan {
    pub vid: u16,
    /// Untagged frames entering the port are classified into this VLAN.
    pub pvid: bool,
    /// Frames of this VLAN leave the port without a tag.
    pub untagged: bool,
}

impl PortVlan {
    /// An access VLAN: PVID and egress untagged (`bridge vlan add vid N pvid untagged`).
    pub fn access(vid: u16) -> PortVlan {
        PortVlan {
            vid,
            pvid: true,
            untagged: true,
        }
    }

    /// A trunk VLAN: tagged both ways.
    pub fn tagged(vid: u16) -> PortVlan {
        PortVlan {
            vid,
            pvid: false,
            untagged: false,
        }
    }

    fn flags(&self) -> BridgeVlanInfoFlags {
        let mut f = BridgeVlanInfoFlags::empty();
        if self.pvid {
            f |= BridgeVlanInfoFlags::Pvid;
        }
        if self.untagged {
            f |= BridgeVlanInfoFlags::Untagged;
        }
        f
    }
}

/// Runs of consecutive VIDs with the same flags, as (first, last, flags):
/// a trunk of 4094 VLANs is two attributes, not 4094.
fn runs(vlans: &[PortVlan]) -> Vec<(u16, u16, BridgeVlanInfoFlags)> {
    let mut sorted = vlans.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut out: Vec<(u16, u16, BridgeVlanInfoFlags)> = Vec::new();
    for v in sorted {
        let f = v.flags();
        match out.last_mut() {
            // A PVID is a single VLAN: never part of a range.
            Some((_, last, lf)) if *last + 1 == v.vid && *lf == f && !v.pvid => *last = v.vid,
            _ => out.push((v.vid, v.vid, f)),
        }
    }
    out
}

fn vlan_message(port: u32, vlans: &[PortVlan]) -> netlink_packet_route::link::LinkMessage {
    // BRIDGE_FLAGS_MASTER: the bridge's view of the port, as `bridge vlan
    // ... master` sends it (the kernel's default too).
    let mut msg =
        LinkBridgeVlan::new(port).append_af_spec(AfSpecBridge::Flags(BridgeFlag::Controller));
    for (first, last, flags) in runs(vlans) {
        msg = if first == last {
            msg.vlan(first, flags)
        } else {
            msg.vlan_range_start(first, flags)
                .vlan_range_end(last, flags)
        };
    }
    msg.build()
}

impl NsHandle {
    /// Whether bridge `index` filters by VLAN (`ip -d link`'s `vlan_filtering 1`).
    pub async fn bridge_vlan_filtering(&self, index: u32) -> Result<bool> {
        let mut stream = self.handle.link().get().match_index(index).execute();
        let msg = stream
            .try_next()
            .await
            .map_err(|e| self.err("read bridge options of", format!("#{index}"), e))?;
        let Some(msg) = msg else { return Ok(false) };
        for attr in msg.attributes {
            if let LinkAttribute::LinkInfo(infos) = attr {
                for info in infos {
                    if let LinkInfo::Data(InfoData::Bridge(opts)) = info {
                        return Ok(opts
                            .iter()
                            .any(|o| matches!(o, InfoBridge::VlanFiltering(true))));
                    }
                }
            }
        }
        Ok(false)
    }

    /// Turns VLAN filtering of bridge `index` on or off (RTM_NEWLINK on the
    /// existing bridge: `ip link set <br> type bridge vlan_filtering 1`).
    pub async fn set_bridge_vlan_filtering(&self, index: u32, on: bool) -> Result<()> {
        let msg = LinkMessageBuilder::<LinkBridge>::new_with_info_kind(InfoKind::Bridge)
            .index(index)
            .vlan_filtering(on)
            .build();
        self.handle
            .link()
            .change(msg)
            .execute()
            .await
            .map_err(|e| self.err("set vlan_filtering on bridge", format!("#{index}"), e))
    }

    /// The VLANs of bridge port `port`, sorted by VID (empty when the port
    /// has none or the bridge does not filter).
    pub async fn port_vlans(&self, port: u32) -> Result<Vec<PortVlan>> {
        // The kernel serves AF_BRIDGE link info only as a dump of every
        // port; the one asked for is picked out here.
        let mut stream = self
            .handle
            .link()
            .get()
            .set_filter_mask(AddressFamily::Bridge, vec![LinkExtentMask::Brvlan])
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|e| self.err("dump bridge vlans of", format!("#{port}"), e))?
        {
            if msg.header.index != port {
                continue;
            }
            for attr in msg.attributes {
                if let LinkAttribute::AfSpecBridge(specs) = attr {
                    for s in specs {
                        if let AfSpecBridge::VlanInfo(v) = s {
                            out.push(PortVlan {
                                vid: v.vid,
                                pvid: v.flags.contains(BridgeVlanInfoFlags::Pvid),
                                untagged: v.flags.contains(BridgeVlanInfoFlags::Untagged),
                            });
                        }
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Adds (or updates the flags of) VLANs on bridge port `port`, in one
    /// request. Adding a PVID moves the PVID flag away from the previous one.
    pub async fn add_port_vlans(&self, port: u32, vlans: &[PortVlan]) -> Result<()> {
        if vlans.is_empty() {
            return Ok(());
        }
        match self
            .handle
            .link()
            .set(vlan_message(port, vlans))
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => Err(self.err("add bridge vlans to port", self.name_of_port(port).await, e)),
        }
    }

    /// Removes VLANs `vids` from bridge port `port`, in one request.
    pub async fn del_port_vlans(&self, port: u32, vids: &[u16]) -> Result<()> {
        if vids.is_empty() {
            return Ok(());
        }
        let vlans: Vec<PortVlan> = vids.iter().map(|v| PortVlan::tagged(*v)).collect();
        self.handle
            .link()
            .del_with_message(vlan_message(port, &vlans))
            .execute()
            .await
            .map_err(|e| {
                self.err(
                    "remove bridge vlans from port",
                    format!("#{port} ({vids:?})"),
                    e,
                )
            })
    }

    /// A veth pair with both ends in this namespace: `port` enslaved to
    /// `bridge`, both up. The reference bridge plugin's `<bridge>.<vlan>`
    /// gateway interface is the `name` end of such a pair.
    pub async fn create_local_veth(
        &self,
        name: &str,
        port: &str,
        mtu: u32,
        bridge: u32,
    ) -> Result<()> {
        let peer = LinkUnspec::new_with_name(name).mtu(mtu).up().build();
        let msg = LinkVeth::new(port, name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .mtu(mtu)
            .controller(bridge)
            .up()
            .build();
        self.add_link(msg, "create veth pair", format!("{port}/{name}"))
            .await
    }

    async fn name_of_port(&self, port: u32) -> String {
        match self.link_by_index(port).await {
            Ok(Some(l)) => l.name,
            _ => format!("#{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(msg: &netlink_packet_route::link::LinkMessage) -> Vec<u8> {
        use rtnetlink::packet_core::Emitable;
        let mut b = vec![0u8; msg.buffer_len()];
        msg.emit(&mut b);
        b
    }

    /// The body iproute2 sends for `bridge vlan add dev <#4> vid 100 pvid
    /// untagged master` (captured with strace on this machine; the kernel
    /// here lacks CONFIG_BRIDGE_VLAN_FILTERING, so the bytes are the proof
    /// that is possible): ifinfomsg (AF_BRIDGE, index 4), IFLA_AF_SPEC {
    /// IFLA_BRIDGE_FLAGS MASTER, IFLA_BRIDGE_VLAN_INFO {PVID|UNTAGGED, 100} }.
    #[test]
    #[cfg(target_endian = "little")] // netlink is host-endian; the literals are little-endian
    fn vlan_message_matches_iproute2() {
        let mut want = vec![7u8, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(&[20, 0, 26, 0]); // IFLA_AF_SPEC
        want.extend_from_slice(&[6, 0, 0, 0, 1, 0, 0, 0]); // FLAGS = MASTER, padded
        want.extend_from_slice(&[8, 0, 2, 0, 6, 0, 100, 0]); // VLAN_INFO
        assert_eq!(bytes(&vlan_message(4, &[PortVlan::access(100)])), want);
        // `bridge vlan del dev <#4> vid 1 master`: same shape, flags 0.
        let del = vlan_message(4, &[PortVlan::tagged(1)]);
        let mut want_del = want.clone();
        let n = want_del.len();
        want_del[n - 4..].copy_from_slice(&[0, 0, 1, 0]);
        assert_eq!(bytes(&del), want_del);
    }

    #[test]
    fn runs_compress_trunks_and_keep_pvid_alone() {
        let mut v: Vec<PortVlan> = (10..=20).map(PortVlan::tagged).collect();
        v.push(PortVlan::tagged(30));
        v.push(PortVlan::tagged(12)); // duplicate
        let r = runs(&v);
        assert_eq!(
            r,
            vec![
                (10, 20, BridgeVlanInfoFlags::empty()),
                (30, 30, BridgeVlanInfoFlags::empty())
            ]
        );
        let r = runs(&[PortVlan::access(100), PortVlan::tagged(101)]);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, 100);
        assert!(r[0].2.contains(BridgeVlanInfoFlags::Pvid));
    }
}
