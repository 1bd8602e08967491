//! The nftables state of hostPorts, in ferry's table `inet ferry`.
//!
//! ```text
//! table inet ferry {
//!   # (protocol, hostPort) → the pod that owns it; IPv4 and IPv6 alike
//!   map hostports     { type inet_proto . inet_service : verdict }
//!   # (hostIP, protocol, hostPort) for mappings restricted to one host address
//!   map hostports-ip4 { type ipv4_addr . inet_proto . inet_service : verdict }
//!   map hostports-ip6 { type ipv6_addr . inet_proto . inet_service : verdict }
//!   chain hostports-lookup {
//!     ip daddr . meta l4proto . th dport vmap @hostports-ip4
//!     ip6 daddr . meta l4proto . th dport vmap @hostports-ip6
//!     fib daddr type local meta l4proto . th dport vmap @hostports
//!   }
//!   chain hostports-prerouting { type nat hook prerouting priority dstnat; jump hostports-lookup }
//!   chain hostports-output     { type nat hook output priority -100; jump hostports-lookup }
//!   chain hostports-snat-<bit> { type nat hook postrouting priority srcnat;
//!                                ct status dnat meta mark & <mask> == <mask> masquerade }
//!   # one per pod: (network, container ID, ifname) → hp-<16 hex digits>
//!   chain hp-<hash> {
//!     ip saddr { 127.0.0.0/8, <pod subnet> } meta mark set meta mark | <mask>   # hairpin, pods, localhost
//!     ip6 saddr <pod subnet> meta mark set meta mark | <mask>
//!     ip daddr <hostIP> tcp dport 8443 dnat ip to <pod>:443                      # hostIP mappings first
//!     meta nfproto ipv4 tcp dport 8080 dnat ip to <pod>:80
//!     meta nfproto ipv6 tcp dport 8080 dnat ip6 to [<pod>]:80
//!   }
//! }
//! ```
//!
//! A map element's key can only be taken once: a second pod's `add element`
//! with the same key and another chain fails the whole transaction (EEXIST),
//! which is the hostPort conflict check, atomic and race-free. DEL finds its
//! elements by the chain they jump to (a dump of the three maps), so it needs
//! neither the pod's address nor its runtimeConfig.

use crate::config::{Mapping, PortmapConf, Proto};
use ferry_netops::nft::MapElement;
use ipnetwork::IpNetwork;
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TABLE: &str = "ferry";
pub const MAP_ANY: &str = "hostports";
pub const MAP_IP4: &str = "hostports-ip4";
pub const MAP_IP6: &str = "hostports-ip6";
pub const MAPS: [&str; 3] = [MAP_ANY, MAP_IP4, MAP_IP6];
pub const LOOKUP_CHAIN: &str = "hostports-lookup";
pub const PREROUTING_CHAIN: &str = "hostports-prerouting";

/// The base chain that masquerades connections carrying mark bit `bit`.
pub fn snat_chain(bit: u8) -> String {
    format!("hostports-snat-{bit}")
}

/// The pod's chain: FNV-1a over (network, container ID, ifname). Lowercase
/// hex after a prefix: a valid unquoted nft identifier (nft 1.0.6 refuses
/// quoted chain names), and DEL derives it from what every DEL carries.
pub fn pod_chain(network: &str, container_id: &str, ifname: &str) -> String {
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

/// The pod's addresses from prevResult: at most one per family, with its
/// subnet (for marking traffic from the pod's neighbours).
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

/// One map element of a pod: which map, and its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Element {
    pub map: &'static str,
    pub host_ip: Option<IpAddr>,
    pub proto: Proto,
    pub port: u16,
}

impl Element {
    /// The key in nft syntax.
    pub fn key(&self) -> String {
        let (proto, port) = (self.proto.name(), self.port);
        match self.host_ip {
            None => format!("{proto} . {port}"),
            Some(ip) => format!("{ip} . {proto} . {port}"),
        }
    }

    /// The key as the kernel stores it (each field padded to 4 bytes), to
    /// compare with a dump.
    pub fn raw_key(&self) -> Vec<u8> {
        let mut out = match self.host_ip {
            None => Vec::new(),
            Some(IpAddr::V4(a)) => a.octets().to_vec(),
            Some(IpAddr::V6(a)) => a.octets().to_vec(),
        };
        out.extend_from_slice(&[self.proto.number(), 0, 0, 0]);
        out.extend_from_slice(&self.port.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out
    }
}

/// The map elements the pod's mappings need (only those that apply to an
/// address the pod has), sorted, without duplicates.
pub fn elements(conf: &PortmapConf, pod: &PodAddrs) -> Vec<Element> {
    let mut out: Vec<Element> = conf
        .mappings
        .iter()
        .filter(|m| {
            (pod.v4.is_some() && m.applies_to(true)) || (pod.v6.is_some() && m.applies_to(false))
        })
        .map(|m| Element {
            map: match m.host_ip {
                None => MAP_ANY,
                Some(IpAddr::V4(_)) => MAP_IP4,
                Some(IpAddr::V6(_)) => MAP_IP6,
            },
            host_ip: m.host_ip,
            proto: m.proto,
            port: m.host_port,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A dumped element of `map` back in nft syntax (protocol by number), or
/// `None` for a key of the wrong size.
pub fn key_from_raw(map: &str, key: &[u8]) -> Option<String> {
    let tail = |k: &[u8]| -> Option<String> {
        let proto = *k.first()?;
        let port = u16::from_be_bytes([*k.get(4)?, *k.get(5)?]);
        Some(format!("{proto} . {port}"))
    };
    match (map, key.len()) {
        (MAP_ANY, 8) => tail(key),
        (MAP_IP4, 12) => {
            let ip = Ipv4Addr::from(<[u8; 4]>::try_from(&key[..4]).ok()?);
            Some(format!("{ip} . {}", tail(&key[4..])?))
        }
        (MAP_IP6, 24) => {
            let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&key[..16]).ok()?);
            Some(format!("{ip} . {}", tail(&key[16..])?))
        }
        _ => None,
    }
}

/// Tables, maps, the lookup chain and the base chains. Idempotent: base
/// chains are flushed and refilled in the same transaction.
pub fn base_script(conf: &PortmapConf) -> String {
    let mut s = format!(
        "add table inet {TABLE}\n\
         add map inet {TABLE} {MAP_ANY} {{ type inet_proto . inet_service : verdict; }}\n\
         add map inet {TABLE} {MAP_IP4} {{ type ipv4_addr . inet_proto . inet_service : verdict; }}\n\
         add map inet {TABLE} {MAP_IP6} {{ type ipv6_addr . inet_proto . inet_service : verdict; }}\n\
         add chain inet {TABLE} {LOOKUP_CHAIN}\n\
         flush chain inet {TABLE} {LOOKUP_CHAIN}\n\
         add rule inet {TABLE} {LOOKUP_CHAIN} ip daddr . meta l4proto . th dport vmap @{MAP_IP4}\n\
         add rule inet {TABLE} {LOOKUP_CHAIN} ip6 daddr . meta l4proto . th dport vmap @{MAP_IP6}\n\
         add rule inet {TABLE} {LOOKUP_CHAIN} fib daddr type local meta l4proto . th dport vmap @{MAP_ANY}\n\
         add chain inet {TABLE} {PREROUTING_CHAIN} {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         flush chain inet {TABLE} {PREROUTING_CHAIN}\n\
         add rule inet {TABLE} {PREROUTING_CHAIN} jump {LOOKUP_CHAIN}\n\
         add chain inet {TABLE} hostports-output {{ type nat hook output priority -100; policy accept; }}\n\
         flush chain inet {TABLE} hostports-output\n\
         add rule inet {TABLE} hostports-output jump {LOOKUP_CHAIN}\n"
    );
    if conf.snat || conf.masq_all {
        let chain = snat_chain(conf.mark_bit);
        let mask = conf.mark();
        let _ = write!(
            s,
            "add chain inet {TABLE} {chain} {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             flush chain inet {TABLE} {chain}\n\
             add rule inet {TABLE} {chain} ct status dnat meta mark & {mask:#010x} == {mask:#010x} masquerade\n"
        );
    }
    s
}

/// The transaction of one pod's ADD: its chain (flushed and refilled) and
/// its map elements, plus the base when `with_base`. Idempotent for a
/// retried ADD; fails as a whole when another pod holds one of the keys.
pub fn add_script(conf: &PortmapConf, chain: &str, pod: &PodAddrs, with_base: bool) -> String {
    let mut s = if with_base {
        base_script(conf)
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        "add chain inet {TABLE} {chain}\nflush chain inet {TABLE} {chain}"
    );
    let mask = conf.mark();
    if conf.masq_all {
        let _ = writeln!(
            s,
            "add rule inet {TABLE} {chain} meta mark set meta mark | {mask:#010x}"
        );
    } else if conf.snat {
        if let Some(net) = pod.v4 {
            let sub =
                IpNetwork::new(net.network(), net.prefix()).expect("prefix of a valid network");
            let _ = writeln!(
                s,
                "add rule inet {TABLE} {chain} ip saddr {{ 127.0.0.0/8, {sub} }} meta mark set meta mark | {mask:#010x}"
            );
        }
        if let Some(net) = pod.v6 {
            let sub =
                IpNetwork::new(net.network(), net.prefix()).expect("prefix of a valid network");
            let _ = writeln!(
                s,
                "add rule inet {TABLE} {chain} ip6 saddr {sub} meta mark set meta mark | {mask:#010x}"
            );
        }
    }
    // Restricted mappings first: a pod may map one port of one address and
    // the same port of every other address elsewhere.
    let mut mappings: Vec<&Mapping> = conf.mappings.iter().collect();
    mappings.sort_by_key(|m| m.host_ip.is_none());
    for m in mappings {
        for (addr, v4) in [(pod.v4, true), (pod.v6, false)] {
            let Some(addr) = addr else { continue };
            if !m.applies_to(v4) {
                continue;
            }
            let (fam, ip) = if v4 { ("ip", "ip") } else { ("ip6", "ip6") };
            let target = if v4 {
                format!("{}:{}", addr.ip(), m.container_port)
            } else {
                format!("[{}]:{}", addr.ip(), m.container_port)
            };
            let matcher = match m.host_ip {
                Some(h) => format!("{fam} daddr {h}"),
                None => format!("meta nfproto {}", if v4 { "ipv4" } else { "ipv6" }),
            };
            let _ = writeln!(
                s,
                "add rule inet {TABLE} {chain} {matcher} {} dport {} dnat {ip} to {target}",
                m.proto.name(),
                m.host_port
            );
        }
    }
    for e in elements(conf, pod) {
        let _ = writeln!(
            s,
            "add element inet {TABLE} {} {{ {} : jump {chain} }}",
            e.map,
            e.key()
        );
    }
    s
}

/// The transaction of one pod's DEL: its elements (found in the dumps) and
/// its chain. nft 1.0.6 has no `destroy` and a `delete` of something missing
/// fails the transaction, so everything deleted is first added: it succeeds
/// whether or not a racing DEL removed part of it.
pub fn del_script(chain: &str, owned: &[(&'static str, String)]) -> String {
    let mut s = format!(
        "add table inet {TABLE}\n\
         add map inet {TABLE} {MAP_ANY} {{ type inet_proto . inet_service : verdict; }}\n\
         add map inet {TABLE} {MAP_IP4} {{ type ipv4_addr . inet_proto . inet_service : verdict; }}\n\
         add map inet {TABLE} {MAP_IP6} {{ type ipv6_addr . inet_proto . inet_service : verdict; }}\n\
         add chain inet {TABLE} {chain}\n"
    );
    for (map, key) in owned {
        let _ = writeln!(
            s,
            "add element inet {TABLE} {map} {{ {key} : jump {chain} }}\n\
             delete element inet {TABLE} {map} {{ {key} }}"
        );
    }
    let _ = writeln!(
        s,
        "flush chain inet {TABLE} {chain}\ndelete chain inet {TABLE} {chain}"
    );
    s
}

/// The elements of `dump` (of map `map`) that jump to `chain`, in nft syntax.
pub fn owned_keys(
    map: &'static str,
    dump: &[MapElement],
    chain: &str,
) -> Vec<(&'static str, String)> {
    dump.iter()
        .filter(|e| e.chain.as_deref() == Some(chain))
        .filter_map(|e| key_from_raw(map, &e.key).map(|k| (map, k)))
        .collect()
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

    #[test]
    fn add_script_layout() {
        let c = conf(json!({}));
        let s = add_script(&c, "hp-00", &pod(), true);
        for line in [
            "add rule inet ferry hp-00 ip saddr { 127.0.0.0/8, 10.88.0.0/24 } meta mark set meta mark | 0x00002000",
            "add rule inet ferry hp-00 ip6 saddr fd00:88::/64 meta mark set meta mark | 0x00002000",
            "add rule inet ferry hp-00 meta nfproto ipv4 tcp dport 8080 dnat ip to 10.88.0.5:80",
            "add rule inet ferry hp-00 meta nfproto ipv6 tcp dport 8080 dnat ip6 to [fd00:88::5]:80",
            "add rule inet ferry hp-00 ip daddr 192.0.2.1 udp dport 5353 dnat ip to 10.88.0.5:53",
            "add rule inet ferry hp-00 ip6 daddr 2001:db8::1 sctp dport 9999 dnat ip6 to [fd00:88::5]:99",
            "add element inet ferry hostports { tcp . 8080 : jump hp-00 }",
            "add element inet ferry hostports-ip4 { 192.0.2.1 . udp . 5353 : jump hp-00 }",
            "add element inet ferry hostports-ip6 { 2001:db8::1 . sctp . 9999 : jump hp-00 }",
            "ct status dnat meta mark & 0x00002000 == 0x00002000 masquerade",
        ] {
            assert!(s.contains(line), "missing {line:?} in\n{s}");
        }
        // Restricted mappings come before the catch-all ones.
        assert!(s.find("ip daddr 192.0.2.1").unwrap() < s.find("meta nfproto ipv4 tcp").unwrap());
        // Chains before the elements that jump to them.
        assert!(s.find("add chain inet ferry hp-00").unwrap() < s.find("add element").unwrap());
        let s = add_script(&c, "hp-00", &pod(), false);
        assert!(!s.contains("hostports-lookup") && !s.contains("add table"));

        // IPv4-only pod: no IPv6 rules or elements.
        let v4 = PodAddrs { v6: None, ..pod() };
        let s = add_script(&c, "hp-00", &v4, false);
        assert!(!s.contains("ip6") && !s.contains("hostports-ip6"), "{s}");

        let s = add_script(&conf(json!({"snat": false})), "hp-00", &pod(), true);
        assert!(!s.contains("mark") && !s.contains("masquerade"), "{s}");
        let s = add_script(
            &conf(json!({"masqAll": true, "markMasqBit": 4})),
            "hp-00",
            &pod(),
            true,
        );
        assert!(
            s.contains("add rule inet ferry hp-00 meta mark set meta mark | 0x00000010\n"),
            "{s}"
        );
        assert!(s.contains("add chain inet ferry hostports-snat-4 "), "{s}");
    }

    #[test]
    fn keys_round_trip() {
        let c = conf(json!({}));
        let els = elements(&c, &pod());
        assert_eq!(els.len(), 3);
        for e in &els {
            let back = key_from_raw(e.map, &e.raw_key()).unwrap();
            assert!(
                back.ends_with(&format!("{} . {}", e.proto.number(), e.port)),
                "{back}"
            );
            if let Some(ip) = e.host_ip {
                assert!(back.starts_with(&ip.to_string()), "{back}");
            }
        }
        assert_eq!(
            key_from_raw(MAP_ANY, &[6, 0, 0, 0, 0x1f, 0x90, 0, 0]).unwrap(),
            "6 . 8080"
        );
        assert_eq!(key_from_raw(MAP_IP4, &[1, 2, 3]), None);
        assert_eq!(key_from_raw("other", &[0; 8]), None);
    }

    #[test]
    fn del_script_and_ownership() {
        let dump = vec![
            MapElement {
                key: vec![6, 0, 0, 0, 0x1f, 0x90, 0, 0],
                chain: Some("hp-00".into()),
            },
            MapElement {
                key: vec![17, 0, 0, 0, 0, 53, 0, 0],
                chain: Some("hp-11".into()),
            },
        ];
        let owned = owned_keys(MAP_ANY, &dump, "hp-00");
        assert_eq!(owned, vec![(MAP_ANY, "6 . 8080".to_string())]);
        let d = del_script("hp-00", &owned);
        assert!(d.contains("add element inet ferry hostports { 6 . 8080 : jump hp-00 }\ndelete element inet ferry hostports { 6 . 8080 }\n"));
        assert!(d.ends_with("flush chain inet ferry hp-00\ndelete chain inet ferry hp-00\n"));
    }

    #[test]
    fn pod_chain_names() {
        let a = pod_chain("net", "c1", "eth0");
        assert_eq!(a.len(), 19);
        assert!(a.starts_with("hp-") && a[3..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, pod_chain("net", "c1", "eth1"));
        assert_ne!(a, pod_chain("net2", "c1", "eth0"));
        assert_eq!(a, pod_chain("net", "c1", "eth0"));
    }
}
