//! The nftables state of hostPorts, in ferry's table `inet ferry`.
//!
//! Everything per pod is a set or map element; every chain and rule is
//! static, created once (one `nft -f -` transaction) and shared by all pods:
//!
//! ```text
//! table inet ferry {
//!   # DNAT targets. (protocol, hostPort) → pod address . containerPort, per family;
//!   # (hostIP, protocol, hostPort) for mappings restricted to one host address.
//!   map hostports-v4        { type inet_proto . inet_service : ipv4_addr . inet_service }
//!   map hostports-v6        { type inet_proto . inet_service : ipv6_addr . inet_service }
//!   map hostports-hostip-v4 { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service }
//!   map hostports-hostip-v6 { type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service }
//!   chain hostports-dnat {                                   # hostIP mappings first
//!     dnat ip to ip daddr . meta l4proto . th dport map @hostports-hostip-v4
//!     dnat ip6 to ip6 daddr . meta l4proto . th dport map @hostports-hostip-v6
//!     meta nfproto ipv4 dnat ip to meta l4proto . th dport map @hostports-v4
//!     meta nfproto ipv6 dnat ip6 to meta l4proto . th dport map @hostports-v6
//!   }
//!   # Only destinations the node owns, as the reference's `--dst-type LOCAL`:
//!   # a hostIP that is not (yet) the node's captures nobody's traffic.
//!   chain hostports-prerouting { type nat hook prerouting priority dstnat; fib daddr type local jump hostports-dnat }
//!   chain hostports-output     { type nat hook output priority -100; fib daddr type local jump hostports-dnat }
//!
//!   # route_localnet (for 127.0.0.1 hostPorts) makes 127.0.0.0/8 routable
//!   # from the pods' interface: drop what arrives for it from anywhere but
//!   # lo, unless it belongs to a DNATed connection (CVE-2020-8558).
//!   chain hostports-localnet { type filter hook prerouting priority dstnat + 1;
//!     iifname != "lo" ip daddr 127.0.0.0/8 ct status dnat accept
//!     iifname != "lo" ip daddr 127.0.0.0/8 drop }
//!   # Who needs route_localnet where: (interface . 128 bits of the SHA-256 of
//!   # the pod's comment) per pod, (interface . ::) when ferry switched it on
//!   # (and so puts it back).
//!   set hostports-localnet { type ifname . ipv6_addr }
//!
//!   # Masquerade, per markMasqBit: the sources to masquerade for each key
//!   # (127.0.0.0/8 and the pod's subnet, or everything with masqAll).
//!   set hostports-masq-<bit>-v4        { type ipv4_addr . inet_proto . inet_service; flags interval }
//!   set hostports-masq-<bit>-v6        { type ipv6_addr . inet_proto . inet_service; flags interval }
//!   set hostports-masq-<bit>-hostip-v4 { type ipv4_addr . ipv4_addr . inet_proto . inet_service; flags interval }
//!   set hostports-masq-<bit>-hostip-v6 { type ipv6_addr . ipv6_addr . inet_proto . inet_service; flags interval }
//!   chain hostports-mark-<bit>-pre { type nat hook prerouting priority -101;   # before the DNAT
//!     fib daddr type != local return
//!     ip daddr . meta l4proto . th dport @hostports-hostip-v4
//!       ip saddr . ip daddr . meta l4proto . th dport @hostports-masq-<bit>-hostip-v4 meta mark set meta mark | <mask>
//!     ip daddr . meta l4proto . th dport @hostports-hostip-v4 accept        # the hostIP mapping wins
//!     (the same for IPv6)
//!     ip saddr . meta l4proto . th dport @hostports-masq-<bit>-v4 meta mark set meta mark | <mask>
//!     ip6 saddr . meta l4proto . th dport @hostports-masq-<bit>-v6 meta mark set meta mark | <mask>
//!   }
//!   chain hostports-mark-<bit>-out { type nat hook output priority -101; (the same rules) }
//!   chain hostports-snat-<bit> { type nat hook postrouting priority srcnat;
//!                                ct status dnat meta mark & <mask> == <mask> masquerade }
//! }
//! ```
//!
//! Every element carries the pod's comment ([`pod_comment`]): `hp-<64-bit
//! hash> <owner>`, the owner being `<network>/<container ID>/<ifname>` or,
//! when that does not fit in nft's 127 bytes, `sha256:<digest of the
//! three>`. An element is the pod's only when its whole comment is equal
//! (never by the hash alone, which two container IDs can share): DEL finds
//! the pod's elements by it (one dump per set) without the pod's address or
//! runtimeConfig. A DNAT key can only be taken once: the elements are added
//! with NLM_F_EXCL, so a key held by another pod fails the whole transaction
//! (EEXIST), which is the hostPort conflict check, atomic and race-free.

use crate::config::{PortmapConf, Proto};
use ferry_netops::nft::{MAX_COMMENT, SetElement};
use ipnetwork::IpNetwork;
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TABLE: &str = "ferry";
pub const MAP_V4: &str = "hostports-v4";
pub const MAP_V6: &str = "hostports-v6";
pub const MAP_HOSTIP_V4: &str = "hostports-hostip-v4";
pub const MAP_HOSTIP_V6: &str = "hostports-hostip-v6";
/// The DNAT maps, hostIP ones first (the order of the lookups).
pub const DNAT_MAPS: [&str; 4] = [MAP_HOSTIP_V4, MAP_HOSTIP_V6, MAP_V4, MAP_V6];
pub const DNAT_CHAIN: &str = "hostports-dnat";
pub const PREROUTING_CHAIN: &str = "hostports-prerouting";
pub const OUTPUT_CHAIN: &str = "hostports-output";
/// Every set and map of ferry-portmap starts with this.
pub const PREFIX: &str = "hostports-";
/// The martian drop for 127.0.0.0/8 (see the module doc).
pub const LOCALNET_CHAIN: &str = "hostports-localnet";
/// Who needs route_localnet on which interface.
pub const LOCALNET_SET: &str = "hostports-localnet";
/// The comment of the element saying ferry switched route_localnet on.
pub const LOCALNET_SWITCHED_ON: &str = "route_localnet set to 1 by ferry-portmap";
/// The version of the shared rules: part of the marker chain's name, so a
/// table made by an older ferry-portmap is brought up to date by the next ADD.
const BASE_VERSION: u32 = 2;

/// The base chain that masquerades connections carrying mark bit `bit`.
pub fn snat_chain(bit: u8) -> String {
    format!("hostports-snat-{bit}")
}

/// The base chains that set mark bit `bit`, in prerouting and in output.
pub fn mark_chains(bit: u8) -> [String; 2] {
    [
        format!("hostports-mark-{bit}-pre"),
        format!("hostports-mark-{bit}-out"),
    ]
}

/// The masquerade set of bit `bit` for a DNAT map: the map's key with the
/// source range in front.
pub fn masq_set(bit: u8, map: &str) -> String {
    format!(
        "hostports-masq-{bit}-{}",
        map.strip_prefix(PREFIX).unwrap_or(map)
    )
}

/// The pod's tag: FNV-1a over (network, container ID, ifname), what every
/// DEL carries. The first word of each of its elements' comments.
pub fn pod_tag(network: &str, container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in network
        .bytes()
        .chain([0])
        .chain(container_id.bytes())
        .chain([0])
        .chain(ifname.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("hp-{h:016x}")
}

/// The comment of the pod's elements: its tag, then its owner, the whole
/// of which says whose an element is. The owner is `<network>/<container
/// ID>/<ifname>` verbatim when the comment fits in nft's limit (a 64-digit
/// container ID does, with room for the network name), else `sha256:` and
/// the SHA-256 of the three (NUL-separated): bounded, and two owners cannot
/// share it (no '/' in it, so it is never a verbatim owner either).
pub fn pod_comment(network: &str, container_id: &str, ifname: &str) -> String {
    let tag = pod_tag(network, container_id, ifname);
    let verbatim = format!("{tag} {network}/{container_id}/{ifname}");
    if verbatim.len() <= MAX_COMMENT && !verbatim.contains('\0') {
        return verbatim;
    }
    let mut input = Vec::with_capacity(network.len() + container_id.len() + ifname.len() + 2);
    for (i, part) in [network, container_id, ifname].iter().enumerate() {
        if i > 0 {
            input.push(0);
        }
        input.extend_from_slice(part.as_bytes());
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    let mut hex = String::with_capacity(64);
    for b in digest.as_ref() {
        let _ = write!(hex, "{b:02x}");
    }
    format!("{tag} sha256:{hex}")
}

/// Whether an element is the pod's: its comment is the pod's comment,
/// entirely (a shared tag is not enough).
pub fn owned_by(e: &SetElement, comment: &str) -> bool {
    e.comment.as_deref() == Some(comment)
}

/// The comment an older ferry-portmap (before issue 9) gave the pod's
/// elements: the tag, then `<container ID>/<ifname>`, cut to nft's limit.
pub fn legacy_comment(network: &str, container_id: &str, ifname: &str) -> String {
    let tag = pod_tag(network, container_id, ifname);
    let mut c = format!("{tag} {container_id}/{ifname}");
    let mut end = c.len().min(MAX_COMMENT);
    while !c.is_char_boundary(end) {
        end -= 1;
    }
    c.truncate(end);
    c
}

/// Whose elements are whose: the pod's comment (what ADD writes), and the
/// one an older ferry-portmap wrote, so that DEL and CHECK after an upgrade
/// still find (only) the pod's elements. Both are compared whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub comment: String,
    legacy: String,
}

impl Owner {
    pub fn new(network: &str, container_id: &str, ifname: &str) -> Owner {
        Owner {
            comment: pod_comment(network, container_id, ifname),
            legacy: legacy_comment(network, container_id, ifname),
        }
    }

    /// Whether `e` is this pod's element.
    pub fn owns(&self, e: &SetElement) -> bool {
        owned_by(e, &self.comment) || owned_by(e, &self.legacy)
    }
}

/// What a `hostports-localnet` element says about its interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalnetEntry {
    /// A pod needs route_localnet there: 128 bits of the SHA-256 of its
    /// comment, so every pod has a key of its own (an exclusive add never
    /// meets another pod's element, and DEL removes exactly its own).
    User([u8; 16]),
    /// ferry-portmap switched route_localnet on (all zero).
    SwitchedOn,
}

/// The key of a `hostports-localnet` element (`ifname . ipv6_addr`): the
/// interface, zero-padded to 16 bytes, then the entry.
pub fn localnet_key(ifname: &str, entry: &LocalnetEntry) -> Vec<u8> {
    let mut key = vec![0u8; 16];
    let name = ifname.as_bytes();
    let n = name.len().min(15);
    key[..n].copy_from_slice(&name[..n]);
    match entry {
        LocalnetEntry::User(id) => key.extend_from_slice(id),
        LocalnetEntry::SwitchedOn => key.extend_from_slice(&[0; 16]),
    }
    key
}

/// The user entry of the pod with this comment.
pub fn localnet_user(comment: &str) -> LocalnetEntry {
    let digest = ring::digest::digest(&ring::digest::SHA256, comment.as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest.as_ref()[..16]);
    LocalnetEntry::User(id)
}

/// The interface and entry of a `hostports-localnet` key.
pub fn parse_localnet_key(key: &[u8]) -> Option<(String, LocalnetEntry)> {
    let (name, rest) = (key.get(..16)?, key.get(16..32)?);
    let name = name.split(|b| *b == 0).next().unwrap_or_default();
    let id = <[u8; 16]>::try_from(rest).ok()?;
    let entry = if id == [0; 16] {
        LocalnetEntry::SwitchedOn
    } else {
        LocalnetEntry::User(id)
    };
    Some((String::from_utf8_lossy(name).into_owned(), entry))
}

/// The pod's addresses from prevResult: at most one per family, with its
/// subnet (for masquerading traffic from the pod's neighbours).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodAddrs {
    pub v4: Option<IpNetwork>,
    pub v6: Option<IpNetwork>,
}

impl PodAddrs {
    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }
}

/// One element of a pod, in one set or map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodElement {
    pub set: String,
    pub elem: SetElement,
    /// The hostPort it belongs to, for messages: `8080/tcp`, `10.0.0.1:8080/tcp`.
    pub what: String,
}

impl PodElement {
    /// A DNAT map element (a key only one pod may hold), not a masquerade one.
    pub fn is_dnat(&self) -> bool {
        DNAT_MAPS.contains(&self.set.as_str())
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// `inet_proto . inet_service`, each field padded to 4 bytes.
fn proto_port(proto: Proto, port: u16) -> [u8; 8] {
    let p = port.to_be_bytes();
    [proto.number(), 0, 0, 0, p[0], p[1], 0, 0]
}

/// The first and last address of a network.
fn range(net: IpNetwork) -> (IpAddr, IpAddr) {
    match net {
        IpNetwork::V4(n) => {
            let first = u32::from(n.network());
            let last = first | (u32::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0));
            (Ipv4Addr::from(first).into(), Ipv4Addr::from(last).into())
        }
        IpNetwork::V6(n) => {
            let first = u128::from(n.network());
            let last = first | (u128::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0));
            (Ipv6Addr::from(first).into(), Ipv6Addr::from(last).into())
        }
    }
}

/// The source ranges whose DNATed connections to the pod are masqueraded:
/// everything (masqAll), or 127.0.0.0/8 (IPv4, for `route_localnet`) and the
/// pod's own subnet (hairpin and the pod's neighbours).
fn masq_sources(conf: &PortmapConf, addr: IpNetwork) -> Vec<IpNetwork> {
    let any = |v4: bool| -> IpNetwork {
        if v4 { "0.0.0.0/0" } else { "::/0" }
            .parse()
            .expect("valid network")
    };
    if conf.masq_all {
        return vec![any(addr.is_ipv4())];
    }
    if !conf.snat {
        return Vec::new();
    }
    let subnet = IpNetwork::new(addr.network(), addr.prefix()).expect("prefix of a valid network");
    let mut out = Vec::new();
    if addr.is_ipv4() {
        out.push("127.0.0.0/8".parse().expect("valid network"));
    }
    // A pod subnet inside 127/8 (nonsense, but valid input) would overlap.
    if !out.iter().any(|o: &IpNetwork| o.contains(subnet.network())) {
        out.push(subnet);
    }
    out
}

/// Every element the pod's mappings need (only those for an address family
/// the pod has), DNAT elements first, each commented with `comment`.
pub fn elements(conf: &PortmapConf, pod: &PodAddrs, comment: &str) -> Vec<PodElement> {
    let mut dnat = Vec::new();
    let mut masq = Vec::new();
    for m in &conf.mappings {
        for addr in [pod.v4, pod.v6].into_iter().flatten() {
            let v4 = addr.is_ipv4();
            if !m.applies_to(v4) {
                continue;
            }
            let map = match (m.host_ip, v4) {
                (Some(_), true) => MAP_HOSTIP_V4,
                (Some(_), false) => MAP_HOSTIP_V6,
                (None, true) => MAP_V4,
                (None, false) => MAP_V6,
            };
            let mut key = m.host_ip.map(ip_bytes).unwrap_or_default();
            key.extend_from_slice(&proto_port(m.proto, m.host_port));
            let mut data = ip_bytes(addr.ip());
            data.extend_from_slice(&proto_port(m.proto, m.container_port)[4..]);
            let what = m.describe();
            dnat.push(PodElement {
                set: map.to_string(),
                elem: SetElement {
                    key: key.clone(),
                    key_end: None,
                    data: Some(data),
                    comment: Some(comment.to_string()),
                },
                what: what.clone(),
            });
            for src in masq_sources(conf, addr) {
                let (first, last) = range(src);
                let (mut k, mut k_end) = (ip_bytes(first), ip_bytes(last));
                k.extend_from_slice(&key);
                k_end.extend_from_slice(&key);
                masq.push(PodElement {
                    set: masq_set(conf.mark_bit, map),
                    elem: SetElement {
                        key: k,
                        key_end: Some(k_end),
                        data: None,
                        comment: Some(comment.to_string()),
                    },
                    what: what.clone(),
                });
            }
        }
    }
    dnat.extend(masq);
    dnat
}

/// An element's key back in nft syntax (protocol by number), for messages:
/// the fields are told apart by the length of the key.
pub fn key_text(set: &str, key: &[u8]) -> String {
    let tail = |k: &[u8]| -> Option<String> {
        let proto = *k.first()?;
        let port = u16::from_be_bytes([*k.get(4)?, *k.get(5)?]);
        Some(format!("{proto} . {port}"))
    };
    let ip = |k: &[u8]| -> Option<IpAddr> {
        match k.len() {
            4 => Some(Ipv4Addr::from(<[u8; 4]>::try_from(k).ok()?).into()),
            16 => Some(Ipv6Addr::from(<[u8; 16]>::try_from(k).ok()?).into()),
            _ => None,
        }
    };
    let v6 = set.ends_with("-v6");
    let w = if v6 { 16 } else { 4 };
    let text = match key.len() {
        8 => tail(key),
        n if n == w + 8 => ip(&key[..w])
            .zip(tail(&key[w..]))
            .map(|(a, t)| format!("{a} . {t}")),
        n if n == 2 * w + 8 => ip(&key[..w])
            .zip(ip(&key[w..2 * w]))
            .zip(tail(&key[2 * w..]))
            .map(|((a, b), t)| format!("{a} . {b} . {t}")),
        _ => None,
    };
    text.unwrap_or_else(|| format!("{key:02x?}"))
}

/// Tables, maps, sets and chains; the masquerade part for the config's mark
/// bit when it masquerades. Idempotent: chains are flushed and refilled in
/// the same transaction, sets and maps are only declared.
pub fn base_script(conf: &PortmapConf) -> String {
    let mut s = format!(
        "add table inet {TABLE}\n\
         add map inet {TABLE} {MAP_V4} {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}\n\
         add map inet {TABLE} {MAP_V6} {{ type inet_proto . inet_service : ipv6_addr . inet_service; }}\n\
         add map inet {TABLE} {MAP_HOSTIP_V4} {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }}\n\
         add map inet {TABLE} {MAP_HOSTIP_V6} {{ type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service; }}\n\
         add chain inet {TABLE} {DNAT_CHAIN}\n\
         flush chain inet {TABLE} {DNAT_CHAIN}\n\
         add rule inet {TABLE} {DNAT_CHAIN} dnat ip to ip daddr . meta l4proto . th dport map @{MAP_HOSTIP_V4}\n\
         add rule inet {TABLE} {DNAT_CHAIN} dnat ip6 to ip6 daddr . meta l4proto . th dport map @{MAP_HOSTIP_V6}\n\
         add rule inet {TABLE} {DNAT_CHAIN} meta nfproto ipv4 dnat ip to meta l4proto . th dport map @{MAP_V4}\n\
         add rule inet {TABLE} {DNAT_CHAIN} meta nfproto ipv6 dnat ip6 to meta l4proto . th dport map @{MAP_V6}\n\
         add chain inet {TABLE} {PREROUTING_CHAIN} {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         flush chain inet {TABLE} {PREROUTING_CHAIN}\n\
         add rule inet {TABLE} {PREROUTING_CHAIN} fib daddr type local jump {DNAT_CHAIN}\n\
         add chain inet {TABLE} {OUTPUT_CHAIN} {{ type nat hook output priority -100; policy accept; }}\n\
         flush chain inet {TABLE} {OUTPUT_CHAIN}\n\
         add rule inet {TABLE} {OUTPUT_CHAIN} fib daddr type local jump {DNAT_CHAIN}\n\
         add set inet {TABLE} {LOCALNET_SET} {{ type ifname . ipv6_addr; }}\n\
         add chain inet {TABLE} {LOCALNET_CHAIN} {{ type filter hook prerouting priority dstnat + 1; policy accept; }}\n\
         flush chain inet {TABLE} {LOCALNET_CHAIN}\n\
         add rule inet {TABLE} {LOCALNET_CHAIN} iifname != \"lo\" ip daddr 127.0.0.0/8 ct status dnat accept\n\
         add rule inet {TABLE} {LOCALNET_CHAIN} iifname != \"lo\" ip daddr 127.0.0.0/8 drop\n"
    );
    if conf.snat || conf.masq_all {
        let bit = conf.mark_bit;
        let mask = conf.mark();
        let set = |map: &str| masq_set(bit, map);
        let _ = write!(
            s,
            "add set inet {TABLE} {} {{ type ipv4_addr . inet_proto . inet_service; flags interval; }}\n\
             add set inet {TABLE} {} {{ type ipv6_addr . inet_proto . inet_service; flags interval; }}\n\
             add set inet {TABLE} {} {{ type ipv4_addr . ipv4_addr . inet_proto . inet_service; flags interval; }}\n\
             add set inet {TABLE} {} {{ type ipv6_addr . ipv6_addr . inet_proto . inet_service; flags interval; }}\n",
            set(MAP_V4),
            set(MAP_V6),
            set(MAP_HOSTIP_V4),
            set(MAP_HOSTIP_V6),
        );
        let mark = format!("meta mark set meta mark | {mask:#010x}");
        let rules = [
            // Only what the DNAT chain will see (local destinations).
            "fib daddr type != local return".to_string(),
            format!(
                "ip daddr . meta l4proto . th dport @{MAP_HOSTIP_V4} ip saddr . ip daddr . meta l4proto . th dport @{} {mark}",
                set(MAP_HOSTIP_V4)
            ),
            format!("ip daddr . meta l4proto . th dport @{MAP_HOSTIP_V4} accept"),
            format!(
                "ip6 daddr . meta l4proto . th dport @{MAP_HOSTIP_V6} ip6 saddr . ip6 daddr . meta l4proto . th dport @{} {mark}",
                set(MAP_HOSTIP_V6)
            ),
            format!("ip6 daddr . meta l4proto . th dport @{MAP_HOSTIP_V6} accept"),
            format!("ip saddr . meta l4proto . th dport @{} {mark}", set(MAP_V4)),
            format!(
                "ip6 saddr . meta l4proto . th dport @{} {mark}",
                set(MAP_V6)
            ),
        ];
        let [pre, out] = mark_chains(bit);
        for (chain, hook) in [(&pre, "prerouting"), (&out, "output")] {
            let _ = writeln!(
                s,
                "add chain inet {TABLE} {chain} {{ type nat hook {hook} priority -101; policy accept; }}\n\
                 flush chain inet {TABLE} {chain}"
            );
            for r in &rules {
                let _ = writeln!(s, "add rule inet {TABLE} {chain} {r}");
            }
        }
        let chain = snat_chain(bit);
        let _ = write!(
            s,
            "add chain inet {TABLE} {chain} {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             flush chain inet {TABLE} {chain}\n\
             add rule inet {TABLE} {chain} ct status dnat meta mark & {mask:#010x} == {mask:#010x} masquerade\n"
        );
    }
    // Last: the marker (no hook, no rules) saying all of the above is there.
    let _ = writeln!(s, "add chain inet {TABLE} {}", base_marker(conf));
    s
}

/// The chain whose presence says the base of `conf`, at this version of
/// the rules, exists: the last one [`base_script`] creates (one transaction:
/// all of it or none). An older base lacks it, so the next ADD refreshes
/// the shared chains (flushed and refilled) without touching any element.
pub fn base_marker(conf: &PortmapConf) -> String {
    if conf.snat || conf.masq_all {
        format!("hostports-base-{BASE_VERSION}-masq-{}", conf.mark_bit)
    } else {
        format!("hostports-base-{BASE_VERSION}")
    }
}

/// The base chains CHECK expects for `conf`.
pub fn base_chains(conf: &PortmapConf) -> Vec<String> {
    let mut out = vec![
        DNAT_CHAIN.to_string(),
        PREROUTING_CHAIN.to_string(),
        OUTPUT_CHAIN.to_string(),
        LOCALNET_CHAIN.to_string(),
    ];
    if conf.snat || conf.masq_all {
        out.extend(mark_chains(conf.mark_bit));
        out.push(snat_chain(conf.mark_bit));
    }
    out.push(base_marker(conf));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_cni::NetConf;
    use serde_json::json;

    fn conf(extra: serde_json::Value) -> PortmapConf {
        let mut c = json!({"cniVersion": "1.0.0", "name": "n", "type": "ferry-portmap",
        "runtimeConfig": {"portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
            {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "192.0.2.1"},
            {"hostPort": 9999, "containerPort": 99, "protocol": "sctp", "hostIP": "2001:db8::1"},
        ]}});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        PortmapConf::load(&NetConf::from_value(c).unwrap()).unwrap()
    }

    fn pod() -> PodAddrs {
        PodAddrs {
            v4: Some("10.88.0.5/24".parse().unwrap()),
            v6: Some("fd00:88::5/64".parse().unwrap()),
        }
    }

    fn texts(els: &[PodElement]) -> Vec<String> {
        els.iter()
            .map(|e| {
                let mut t = format!("{} {}", e.set, key_text(&e.set, &e.elem.key));
                if let Some(end) = &e.elem.key_end {
                    let _ = write!(t, " - {}", key_text(&e.set, end));
                }
                if let Some(d) = &e.elem.data {
                    let _ = write!(t, " : {d:?}");
                }
                t
            })
            .collect()
    }

    #[test]
    fn elements_layout() {
        let c = conf(json!({}));
        let els = elements(&c, &pod(), "hp-00 c/eth0");
        let t = texts(&els);
        for want in [
            "hostports-v4 6 . 8080 : [10, 88, 0, 5, 0, 80, 0, 0]",
            "hostports-v6 6 . 8080 : [253, 0, 0, 136, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 80, 0, 0]",
            "hostports-hostip-v4 192.0.2.1 . 17 . 5353 : [10, 88, 0, 5, 0, 53, 0, 0]",
            "hostports-masq-13-v4 127.0.0.0 . 6 . 8080 - 127.255.255.255 . 6 . 8080",
            "hostports-masq-13-v4 10.88.0.0 . 6 . 8080 - 10.88.0.255 . 6 . 8080",
            "hostports-masq-13-v6 fd00:88:: . 6 . 8080 - fd00:88::ffff:ffff:ffff:ffff . 6 . 8080",
            "hostports-masq-13-hostip-v4 127.0.0.0 . 192.0.2.1 . 17 . 5353 - 127.255.255.255 . 192.0.2.1 . 17 . 5353",
            "hostports-masq-13-hostip-v4 10.88.0.0 . 192.0.2.1 . 17 . 5353 - 10.88.0.255 . 192.0.2.1 . 17 . 5353",
            "hostports-masq-13-hostip-v6 fd00:88:: . 2001:db8::1 . 132 . 9999 - fd00:88::ffff:ffff:ffff:ffff . 2001:db8::1 . 132 . 9999",
        ] {
            assert!(t.iter().any(|l| l == want), "missing {want:?} in {t:#?}");
        }
        // 4 DNAT elements (tcp 8080 in both families, one per hostIP), then
        // their masquerade ranges (127/8 only for IPv4).
        assert_eq!(els.iter().filter(|e| e.is_dnat()).count(), 4);
        assert!(els[..4].iter().all(PodElement::is_dnat));
        assert_eq!(els.len(), 4 + 2 + 1 + 2 + 1);
        assert!(els.iter().all(|e| owned_by(&e.elem, "hp-00 c/eth0")));
        // The whole comment, not the tag or a prefix.
        assert!(!owned_by(&els[0].elem, "hp-00"));
        assert!(!owned_by(&els[0].elem, "hp-00 c/eth"));

        // IPv4-only pod: no IPv6 elements.
        let v4 = PodAddrs { v6: None, ..pod() };
        assert!(
            elements(&c, &v4, "x")
                .iter()
                .all(|e| !e.set.ends_with("v6"))
        );
        // No snat: DNAT only; masqAll: every source, the config's bit.
        let els = elements(&conf(json!({"snat": false})), &pod(), "x");
        assert!(els.iter().all(PodElement::is_dnat) && els.len() == 4);
        let els = elements(
            &conf(json!({"masqAll": true, "markMasqBit": 4})),
            &pod(),
            "x",
        );
        let t = texts(&els);
        assert!(
            t.contains(
                &"hostports-masq-4-v4 0.0.0.0 . 6 . 8080 - 255.255.255.255 . 6 . 8080".into()
            ),
            "{t:#?}"
        );
        assert_eq!(els.len(), 8);
    }

    #[test]
    fn base_script_layout() {
        let s = base_script(&conf(json!({})));
        for line in [
            "add rule inet ferry hostports-dnat dnat ip to ip daddr . meta l4proto . th dport map @hostports-hostip-v4",
            "add rule inet ferry hostports-dnat meta nfproto ipv6 dnat ip6 to meta l4proto . th dport map @hostports-v6",
            "add rule inet ferry hostports-mark-13-out ip saddr . meta l4proto . th dport @hostports-masq-13-v4 meta mark set meta mark | 0x00002000",
            "add rule inet ferry hostports-mark-13-pre fib daddr type != local return",
            "add rule inet ferry hostports-prerouting fib daddr type local jump hostports-dnat",
            "add rule inet ferry hostports-output fib daddr type local jump hostports-dnat",
            "add rule inet ferry hostports-localnet iifname != \"lo\" ip daddr 127.0.0.0/8 ct status dnat accept",
            "add rule inet ferry hostports-localnet iifname != \"lo\" ip daddr 127.0.0.0/8 drop",
            "add rule inet ferry hostports-mark-13-pre ip daddr . meta l4proto . th dport @hostports-hostip-v4 accept",
            "ct status dnat meta mark & 0x00002000 == 0x00002000 masquerade",
        ] {
            assert!(s.contains(line), "missing {line:?} in\n{s}");
        }
        // hostIP lookups before the catch-all ones.
        assert!(s.find("@hostports-hostip-v4").unwrap() < s.find("@hostports-v4").unwrap());
        // The marker is created last.
        let marker = base_marker(&conf(json!({})));
        assert_eq!(marker, "hostports-base-2-masq-13");
        assert!(
            s.trim_end()
                .ends_with(&format!("add chain inet ferry {marker}"))
        );
        // The fib check is on every way into the DNAT and the marking: the
        // hostIP maps are not reachable for a non-local destination.
        assert!(!s.lines().any(|l| l.ends_with(" jump hostports-dnat") && !l.contains("fib daddr type local")));
        let s = base_script(&conf(json!({"snat": false})));
        assert!(!s.contains("mark") && !s.contains("masquerade"), "{s}");
        assert!(s.contains("hostports-localnet"), "{s}");
        assert!(s.trim_end().ends_with(&format!(
            "add chain inet ferry {}",
            base_marker(&conf(json!({"snat": false})))
        )));
        assert_eq!(base_chains(&conf(json!({}))).len(), 8);
    }

    #[test]
    fn key_texts() {
        assert_eq!(
            key_text(MAP_V4, &[6, 0, 0, 0, 0x1f, 0x90, 0, 0]),
            "6 . 8080"
        );
        assert_eq!(
            key_text(MAP_HOSTIP_V4, &[1, 2, 3, 4, 17, 0, 0, 0, 0, 53, 0, 0]),
            "1.2.3.4 . 17 . 53"
        );
        assert_eq!(key_text(MAP_HOSTIP_V4, &[1, 2, 3]), "[01, 02, 03]");
    }

    #[test]
    fn pod_tags() {
        let a = pod_tag("net", "c1", "eth0");
        assert_eq!(a.len(), 19);
        assert!(a.starts_with("hp-") && a[3..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, pod_tag("net", "c1", "eth1"));
        assert_ne!(a, pod_tag("net2", "c1", "eth0"));
        assert_eq!(a, pod_tag("net", "c1", "eth0"));
        assert_eq!(pod_comment("net", "c1", "eth0"), format!("{a} net/c1/eth0"));
    }

    /// Two owners whose tags collide are still two owners: ownership is the
    /// whole comment. The collision is forced by giving the second owner's
    /// element the first one's tag (what a colliding container ID gets).
    #[test]
    fn colliding_tags_are_different_owners() {
        let mine = pod_comment("net", "c1", "eth0");
        let tag = pod_tag("net", "c1", "eth0");
        let collider = SetElement {
            comment: Some(format!("{tag} net/c2/eth0")),
            ..Default::default()
        };
        assert!(!owned_by(&collider, &mine));
        let own = SetElement {
            comment: Some(mine.clone()),
            ..Default::default()
        };
        assert!(owned_by(&own, &mine));
    }

    /// IDs of any length give a comment nft takes, and distinct owners
    /// distinct comments: verbatim while it fits, a SHA-256 after.
    #[test]
    fn long_ids_give_bounded_distinct_comments() {
        let long = "a".repeat(300);
        let (x, y) = (format!("{long}1"), format!("{long}2"));
        let cx = pod_comment("net", &x, "eth0");
        let cy = pod_comment("net", &y, "eth0");
        assert!(cx.len() <= MAX_COMMENT && cy.len() <= MAX_COMMENT);
        assert_ne!(cx, cy);
        assert!(cx.contains(" sha256:") && !cx.contains('/'), "{cx}");
        assert_eq!(cx, pod_comment("net", &x, "eth0"));
        assert_ne!(cx, pod_comment("net2", &x, "eth0"));
        assert_ne!(cx, pod_comment("net", &x, "eth1"));
        // A 64-digit container ID stays readable.
        let id = "f".repeat(64);
        assert!(pod_comment("cbr0-network", &id, "eth0").ends_with(&format!("/{id}/eth0")));
        // The boundary: the longest verbatim comment is MAX_COMMENT bytes.
        let fits = "b".repeat(MAX_COMMENT - 19 - 1 - "n//eth0".len());
        assert_eq!(pod_comment("n", &fits, "eth0").len(), MAX_COMMENT);
        assert!(pod_comment("n", &format!("{fits}b"), "eth0").contains("sha256:"));
        // The SHA-256 of "net\0" + x + "\0eth0", as any implementation has it.
        let want =
            ring::digest::digest(&ring::digest::SHA256, format!("net\0{x}\0eth0").as_bytes());
        let hex: String = want.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert!(cx.ends_with(&hex));
    }

    /// Elements an older ferry-portmap wrote are the pod's too (whole
    /// comment), a colliding container's are not.
    #[test]
    fn legacy_comments() {
        let owner = Owner::new("net", "c1", "eth0");
        let tag = pod_tag("net", "c1", "eth0");
        let el = |c: String| SetElement {
            comment: Some(c),
            ..Default::default()
        };
        assert!(owner.owns(&el(format!("{tag} c1/eth0"))));
        assert!(owner.owns(&el(owner.comment.clone())));
        assert!(!owner.owns(&el(format!("{tag} c2/eth0"))));
        assert!(!owner.owns(&el(tag.clone())));
        let long = "é".repeat(100);
        let legacy = legacy_comment("net", &long, "eth0");
        assert!(legacy.len() <= MAX_COMMENT && legacy.starts_with("hp-"));
    }

    #[test]
    fn localnet_keys() {
        let user = localnet_user("hp-00 n/c/eth0");
        let k = localnet_key("cni0", &user);
        assert_eq!(k.len(), 32);
        assert_eq!(&k[..5], b"cni0\0");
        assert_eq!(
            parse_localnet_key(&k),
            Some(("cni0".to_string(), user.clone()))
        );
        assert_ne!(user, localnet_user("hp-00 n/c/eth1"));
        assert_ne!(user, LocalnetEntry::SwitchedOn);
        let on = localnet_key("cni0", &LocalnetEntry::SwitchedOn);
        assert_eq!(
            parse_localnet_key(&on),
            Some(("cni0".to_string(), LocalnetEntry::SwitchedOn))
        );
        assert_eq!(parse_localnet_key(&k[..31]), None);
    }
}
