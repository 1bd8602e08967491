//! The links of a pod network: the node bridge and the veth pair per pod.

use crate::link::is_errno;
use crate::{Link, LinkOwner, NetNs, NetopsError, NsHandle, Result};
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{LinkBridge, LinkBridgePort, LinkIfb, LinkUnspec, LinkVeth};
use std::os::fd::{AsFd, AsRawFd};

/// What a bridge should look like.
#[derive(Debug, Clone)]
pub struct BridgeSpec<'a> {
    pub name: &'a str,
    pub mtu: u32,
    /// Pinned at creation: otherwise the kernel gives the bridge the lowest
    /// MAC of its ports, and it changes as pods come and go (stale ARP caches
    /// in every pod for up to minutes).
    pub mac: [u8; 6],
    pub promisc: bool,
}

/// A veth pair whose pod end is created directly inside the pod namespace.
#[derive(Debug, Clone)]
pub struct VethPair<'a> {
    pub host_name: &'a str,
    pub pod_name: &'a str,
    pub pod_ns: &'a NetNs,
    pub mtu: u32,
    pub pod_mac: Option<[u8; 6]>,
    /// The bridge the host end is enslaved to, in the same request.
    pub controller: u32,
}

impl NsHandle {
    /// Returns the bridge `spec.name`, creating it (up, with its MAC) when
    /// missing. Safe when many plugins race: EEXIST means another one won,
    /// and its bridge is used. A link of that name that is not a bridge is an
    /// error, never reused.
    pub async fn ensure_bridge(&self, spec: &BridgeSpec<'_>) -> Result<Link> {
        let link = match self.link_by_name(spec.name).await? {
            Some(l) => l,
            None => {
                let msg = LinkBridge::new(spec.name)
                    .mtu(spec.mtu)
                    .address(spec.mac.to_vec())
                    .promiscuous(spec.promisc)
                    .build();
                match self.handle.link().add(msg).execute().await {
                    Ok(()) => {}
                    Err(e) if is_errno(&e, libc::EEXIST) => {}
                    Err(e) => return Err(self.err("create bridge", spec.name, e)),
                }
                self.link_by_name(spec.name).await?.ok_or_else(|| {
                    NetopsError::io(
                        format!("bridge {} vanished right after creation", spec.name),
                        &self.netns,
                        std::io::Error::from_raw_os_error(libc::ENODEV),
                    )
                })?
            }
        };
        if link.kind.as_deref() != Some("bridge") {
            return Err(NetopsError::io(
                format!(
                    "{} exists and is not a bridge (kind {:?})",
                    spec.name, link.kind
                ),
                &self.netns,
                std::io::Error::from_raw_os_error(libc::EEXIST),
            ));
        }
        // A changed network MTU (or promiscMode turned on, which the
        // reference applies to an existing bridge too) must reach a bridge
        // created before the change.
        if link.mtu != spec.mtu || !link.is_up || (spec.promisc && !link.promisc) {
            let mut msg = LinkUnspec::new_with_index(link.index).mtu(spec.mtu).up();
            if spec.promisc {
                msg = msg.promiscuous(true);
            }
            let msg = msg.build();
            self.handle
                .link()
                .set(msg)
                .execute()
                .await
                .map_err(|e| self.err("set bridge mtu/up", spec.name, e))?;
        }
        Ok(link)
    }

    /// Creates the pair in one RTM_NEWLINK: host end enslaved and up, pod end
    /// born inside the pod namespace (never visible on the host). Returns the
    /// host end.
    pub async fn create_veth(&self, pair: &VethPair<'_>) -> Result<Link> {
        self.create_veth_with(pair, None).await
    }

    /// [`create_veth`](Self::create_veth) for a host end named after a pod:
    /// it is born with `owner`'s MAC, then gets `owner`'s alias, so that
    /// whatever happens afterwards it can be told from another pod's link of
    /// the same name ([`LinkOwner`]).
    pub async fn create_owned_veth(&self, pair: &VethPair<'_>, owner: &LinkOwner) -> Result<Link> {
        let link = self.create_veth_with(pair, Some(owner.mac())).await?;
        if let Err(e) = self.set_alias(link.index, owner.alias()).await {
            // The caller knows nothing of the pair yet: it goes here.
            let _ = self.delete_link(link.index).await;
            return Err(e);
        }
        Ok(Link {
            alias: Some(owner.alias().to_string()),
            ..link
        })
    }

    /// An ifb named after a pod (up, `mtu`), `owner`'s: created with the
    /// owner's MAC and alias, or the one of that name left by an earlier,
    /// interrupted ADD of the same owner. `Ok(Err(link))`: a link of that
    /// name belongs to somebody else; it is left as it is.
    pub async fn ensure_owned_ifb(
        &self,
        name: &str,
        mtu: u32,
        owner: &LinkOwner,
    ) -> Result<std::result::Result<Link, Link>> {
        let msg = LinkIfb::new(name)
            .mtu(mtu)
            .address(owner.mac().to_vec())
            .up()
            .build();
        match self.handle.link().add(msg).execute().await {
            Ok(()) => {}
            // Left by an earlier ADD, or somebody else's: decided below.
            Err(e) if is_errno(&e, libc::EEXIST) => {}
            Err(e) => return Err(self.err("create ifb", name, e)),
        }
        let link = self.require_link(name).await?;
        if !owner.owns(&link) {
            return Ok(Err(link));
        }
        if link.alias.is_none() {
            self.set_alias(link.index, owner.alias()).await?;
        }
        Ok(Ok(Link {
            alias: Some(owner.alias().to_string()),
            ..link
        }))
    }

    async fn create_veth_with(
        &self,
        pair: &VethPair<'_>,
        host_mac: Option<[u8; 6]>,
    ) -> Result<Link> {
        let mut peer = LinkUnspec::new_with_name(pair.pod_name)
            .setns_by_fd(pair.pod_ns.as_fd().as_raw_fd())
            .mtu(pair.mtu);
        if let Some(mac) = pair.pod_mac {
            peer = peer.address(mac.to_vec());
        }
        let mut host = LinkVeth::new(pair.host_name, pair.pod_name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
            .mtu(pair.mtu)
            .controller(pair.controller)
            .up();
        if let Some(mac) = host_mac {
            host = host.address(mac.to_vec());
        }
        let msg = host.build();
        self.add_link(
            msg,
            "create veth pair",
            format!("{}/{}", pair.host_name, pair.pod_name),
        )
        .await?;
        self.link_by_name(pair.host_name).await?.ok_or_else(|| {
            NetopsError::io(
                format!("veth {} vanished right after creation", pair.host_name),
                &self.netns,
                std::io::Error::from_raw_os_error(libc::ENODEV),
            )
        })
    }

    /// Deletes a link; `Ok(false)` when it was already gone.
    pub async fn delete_link(&self, index: u32) -> Result<bool> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(false),
            Err(e) => Err(self.err("delete link", format!("#{index}"), e)),
        }
    }

    /// Bridge port hairpin mode (a pod reaching itself through a service IP).
    pub async fn set_hairpin(&self, index: u32, on: bool) -> Result<()> {
        self.handle
            .link()
            .set_port(LinkBridgePort::new(index).hairpin(on).build())
            .execute()
            .await
            .map_err(|e| self.err("set hairpin", format!("#{index}"), e))
    }
}
