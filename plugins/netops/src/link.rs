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
    pub oper_state: OperState,
    /// The bridge (or bond) this link is enslaved to.
    pub controller: Option<u32>,
    /// `veth`, `bridge`, `vxlan`, …; `None` for links without a kind (`lo`, physical).
    pub kind: Option<String>,
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
            oper_state: OperState::Unknown,
            controller: None,
            kind: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::Mtu(m) => link.mtu = m,
                LinkAttribute::Address(a) => link.mac = a,
                LinkAttribute::Controller(c) => link.controller = Some(c),
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
