//! Links: lookup and up/down.

use crate::{NsHandle, Result};
use futures::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage, State};
use rtnetlink::LinkUnspec;

/// What ferry needs to know about a link, without netlink types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// Hardware address; all zeros for `lo`, empty for links without one.
    pub mac: Vec<u8>,
    /// IFF_UP: administratively up (`ip link set up`).
    pub is_up: bool,
    /// IFF_LOWER_UP: the carrier is there.
    pub lower_up: bool,
    /// IFF_PROMISC.
    pub promisc: bool,
    pub oper_state: OperState,
    /// The bridge (or bond) this link is enslaved to.
    pub controller: Option<u32>,
    /// `veth`, `bridge`, `vxlan`, …; `None` for links without a kind (`lo`, physical).
    pub kind: Option<String>,
    /// IFLA_IFALIAS (`ip link set … alias`): where ferry records a link's
    /// owner ([`LinkOwner`]); `None` when unset.
    pub alias: Option<String>,
}

/// The attachment a link ferry names after a pod belongs to, recorded in
/// the link's alias. Names derived from a hash of the container ID can be
/// shared by two pods (a 44-bit hash collides after a brute force of
/// seconds), so before deleting, reusing or checking such a link ferry
/// compares the alias with this, and a link without it is somebody else's.
///
/// The kernel ignores an alias in the request that creates a link, so it is
/// set by a second one; a plugin killed in between leaves a link without an
/// alias. Such a link is recognised by its MAC, which ferry sets at creation
/// to one derived from the owner ([`LinkOwner::mac`], 46 bits of SHA-256): a
/// link without an alias is this owner's only if it has that MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkOwner {
    alias: String,
    mac: [u8; 6],
}

/// The kernel refuses longer aliases (IFALIASZ - 1, without the NUL).
pub const MAX_ALIAS: usize = 255;

impl LinkOwner {
    /// `<role>:<network>/<ifname>/<container ID>` when that fits in an
    /// alias, else `<role>:sha256:<hex>` of the three (container IDs have no
    /// length limit). None of the parts can contain `/`, and the digest form
    /// has none, so two owners never share an alias unless SHA-256 collides.
    pub fn new(role: &str, network: &str, container_id: &str, ifname: &str) -> LinkOwner {
        let mut input =
            Vec::with_capacity(role.len() + network.len() + ifname.len() + container_id.len() + 3);
        for (i, part) in [role, network, ifname, container_id]
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                input.push(0);
            }
            input.extend_from_slice(part.as_bytes());
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &input);
        let d = digest.as_ref();
        // Locally administered unicast.
        let mac = [(d[0] & 0xfc) | 0x02, d[1], d[2], d[3], d[4], d[5]];
        let plain = format!("{role}:{network}/{ifname}/{container_id}");
        let alias = if plain.len() <= MAX_ALIAS {
            plain
        } else {
            let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
            format!("{role}:sha256:{hex}")
        };
        LinkOwner { alias, mac }
    }

    /// The alias that marks a link as this owner's.
    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// The MAC ferry gives a link of this owner when it creates it.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether `link` is this owner's: it carries the owner's alias, or no
    /// alias and the owner's MAC (its creator was stopped before setting
    /// the alias).
    pub fn owns(&self, link: &Link) -> bool {
        match &link.alias {
            Some(a) => *a == self.alias,
            None => link.mac == self.mac,
        }
    }

    /// For error messages: who `link` belongs to, as far as its alias says.
    pub fn describe_other(link: &Link) -> String {
        match &link.alias {
            Some(a) => format!("{} (alias {a:?})", link.name),
            None => format!(
                "{} (no owner alias: not made by ferry for a pod)",
                link.name
            ),
        }
    }
}

/// RFC 2863 operational state (`ip link`'s `state`). `lo` reports `Unknown`
/// even when up, so "is it up" questions should use [`Link::is_up`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperState {
    Unknown,
    NotPresent,
    Down,
    LowerLayerDown,
    Testing,
    Dormant,
    Up,
    Other(u8),
}

impl Link {
    /// The MAC as `aa:bb:cc:dd:ee:ff` (the CNI result's form).
    pub fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    fn from_message(msg: LinkMessage) -> Link {
        let flags = msg.header.flags;
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mtu: 0,
            mac: Vec::new(),
            is_up: flags.contains(LinkFlags::Up),
            lower_up: flags.contains(LinkFlags::LowerUp),
            promisc: flags.contains(LinkFlags::Promisc),
            oper_state: OperState::Unknown,
            controller: None,
            kind: None,
            alias: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::Mtu(m) => link.mtu = m,
                LinkAttribute::Address(a) => link.mac = a,
                LinkAttribute::Controller(c) => link.controller = Some(c),
                LinkAttribute::IfAlias(a) if !a.is_empty() => link.alias = Some(a),
                LinkAttribute::OperState(s) => link.oper_state = OperState::from(s),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            link.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

impl From<State> for OperState {
    fn from(s: State) -> Self {
        match s {
            State::Unknown => OperState::Unknown,
            State::NotPresent => OperState::NotPresent,
            State::Down => OperState::Down,
            State::LowerLayerDown => OperState::LowerLayerDown,
            State::Testing => OperState::Testing,
            State::Dormant => OperState::Dormant,
            State::Up => OperState::Up,
            State::Other(n) => OperState::Other(n),
            _ => OperState::Other(u8::MAX),
        }
    }
}

impl NsHandle {
    /// The link called `name`, or `None` when there is none (the kernel
    /// answers a lookup of a missing name with ENODEV, not an empty dump).
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        let req = self.handle.link().get().match_name(name.to_string());
        self.lookup(req.execute(), name.to_string()).await
    }

    /// Like [`link_by_name`](Self::link_by_name), but absence is an error
    /// ([`NetopsError::LinkNotFound`](crate::NetopsError::LinkNotFound)).
    pub async fn require_link(&self, name: &str) -> Result<Link> {
        self.link_by_name(name)
            .await?
            .ok_or_else(|| crate::NetopsError::LinkNotFound {
                ifname: name.to_string(),
                netns: self.netns.clone(),
            })
    }

    /// Every link of the namespace (one dump).
    pub async fn links(&self) -> Result<Vec<Link>> {
        let mut stream = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|e| self.err("list links", "all", e))?
        {
            out.push(Link::from_message(msg));
        }
        Ok(out)
    }

    /// Each bridge port's hairpin flag (`IFLA_BRPORT_MODE` in the
    /// AF_BRIDGE link dump), by ifindex: one dump for every port of every
    /// bridge. Ports whose message carries no flag are left out.
    pub async fn bridge_port_hairpin(&self) -> Result<std::collections::HashMap<u32, bool>> {
        use netlink_packet_core::Nla;
        use netlink_packet_route::AddressFamily;
        use netlink_packet_route::link::LinkProtoInfoBridge;
        const IFLA_BRPORT_MODE: u16 = 4;
        let mut req = self.handle.link().get();
        req.message_mut().header.interface_family = AddressFamily::Bridge;
        let mut stream = req.execute();
        let mut out = std::collections::HashMap::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|e| self.err("list bridge ports", "all", e))?
        {
            for attr in &msg.attributes {
                let LinkAttribute::ProtoInfoBridge(infos) = attr else {
                    continue;
                };
                for info in infos {
                    if let LinkProtoInfoBridge::Other(nla) = info
                        && nla.kind() & 0x3fff == IFLA_BRPORT_MODE
                        && nla.value_len() >= 1
                    {
                        let mut v = vec![0u8; nla.value_len()];
                        nla.emit_value(&mut v);
                        out.insert(msg.header.index, v[0] != 0);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The link with ifindex `index`, or `None`.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let req = self.handle.link().get().match_index(index);
        self.lookup(req.execute(), format!("#{index}")).await
    }

    async fn lookup(
        &self,
        mut stream: impl futures::Stream<Item = Result<LinkMessage, rtnetlink::Error>> + Unpin,
        what: String,
    ) -> Result<Option<Link>> {
        match stream.try_next().await {
            Ok(msg) => Ok(msg.map(Link::from_message)),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(self.err("look up link", what, e)),
        }
    }

    /// `ip link add` of `msg` (RTM_NEWLINK, create exclusively); `op` and
    /// `name` name it in the error.
    pub(crate) async fn add_link(
        &self,
        msg: LinkMessage,
        op: &'static str,
        name: impl Into<String>,
    ) -> Result<()> {
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| self.err(op, name, e))
    }

    /// `ip link set <index> up`.
    pub async fn set_up(&self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        match self.handle.link().set(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.err("set up link", self.name_of(index).await, e)),
        }
    }

    /// `ip link set <index> down`.
    pub async fn set_down(&self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).down().build();
        match self.handle.link().set(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.err("set down link", self.name_of(index).await, e)),
        }
    }

    /// `ip link set <index> alias <alias>` (the kernel ignores an alias in
    /// the RTM_NEWLINK that creates a link, so it is set afterwards).
    pub async fn set_alias(&self, index: u32, alias: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).alias(alias).build();
        match self.handle.link().set(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.err("set alias of link", self.name_of(index).await, e)),
        }
    }

    /// The name of link `index` for an error message (best effort: only on
    /// failure paths, so the happy path stays one round trip).
    async fn name_of(&self, index: u32) -> String {
        match self.link_by_index(index).await {
            Ok(Some(l)) => l.name,
            _ => format!("#{index}"),
        }
    }
}

pub(crate) fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    // raw_code() is the negative errno the kernel put in NLMSG_ERROR.
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_aliases_fit_and_differ() {
        let a = LinkOwner::new("ferry-bridge", "pods", "c1", "eth0");
        assert_eq!(a.alias(), "ferry-bridge:pods/eth0/c1");
        assert_ne!(a, LinkOwner::new("ferry-bridge", "pods", "c1", "eth1"));
        assert_ne!(a, LinkOwner::new("ferry-bandwidth", "pods", "c1", "eth0"));
        let long_id = "a".repeat(1000);
        let l = LinkOwner::new("ferry-bridge", "pods", &long_id, "eth0");
        assert!(l.alias().len() <= MAX_ALIAS, "{}", l.alias());
        assert_ne!(l.mac(), a.mac());
        assert_eq!(a.mac()[0] & 0b11, 0b10, "local unicast");
        assert!(l.alias().starts_with("ferry-bridge:sha256:"));
        let mut other = long_id.clone();
        other.replace_range(999.., "b");
        assert_ne!(l, LinkOwner::new("ferry-bridge", "pods", &other, "eth0"));
        // The longest plain form that fits stays plain.
        let id = "x".repeat(MAX_ALIAS - "ferry-bridge:pods/eth0/".len());
        assert_eq!(
            LinkOwner::new("ferry-bridge", "pods", &id, "eth0")
                .alias()
                .len(),
            MAX_ALIAS
        );
    }

    #[test]
    fn ownership_by_alias_or_by_mac_without_one() {
        let owner = LinkOwner::new("ferry-bandwidth", "pods", "c1", "eth0");
        let mut link = Link {
            index: 7,
            name: "bwp0".into(),
            mtu: 1500,
            mac: owner.mac().to_vec(),
            is_up: true,
            lower_up: true,
            promisc: false,
            oper_state: OperState::Up,
            controller: None,
            kind: Some("ifb".into()),
            alias: None,
        };
        assert!(owner.owns(&link), "no alias yet, our MAC");
        link.alias = Some("someone else".into());
        assert!(!owner.owns(&link), "an alias that is not ours wins");
        link.alias = Some(owner.alias().into());
        link.mac = vec![2, 0, 0, 0, 0, 1];
        assert!(owner.owns(&link));
        link.alias = None;
        assert!(!owner.owns(&link), "no alias, another MAC");
    }
}
