//! The cluster network config, stored once in etcd at `<prefix>/network/config`,
//! and the subnet arithmetic every node shares.
//!
//! The JSON uses ferry's camelCase keys; flannel's capitalised keys
//! (`Network`, `SubnetLen`, `Backend.Type`, `VNI`, `Port`, `DirectRouting`)
//! are accepted too, so an operator can copy a flannel net-conf.json.
//!
//! Dual stack: `ipv6Network` (flannel's `IPv6Network`, with `EnableIPv6`)
//! adds an IPv6 pod subnet of `ipv6SubnetLen` (default 64) per node beside
//! the IPv4 one. The IPv4 `network` stays required: IPv6-only cluster
//! networks are not supported. The i-th IPv4 subnet always goes with the
//! i-th IPv6 subnet ([`NetworkConfig::ipv6_subnet_for`]), so leasing the IPv4
//! subnet leases the IPv6 one too.

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IANA's VXLAN port. (flannel's default is the Linux default 8472; set
/// `port` to keep it.)
pub const DEFAULT_VXLAN_PORT: u16 = 4789;
pub const DEFAULT_VNI: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    /// The cluster's pod network, e.g. 10.244.0.0/16.
    #[serde(alias = "Network")]
    pub network: Ipv4Network,
    /// Prefix length of each node's subnet (default 24).
    #[serde(alias = "SubnetLen", default = "default_subnet_len")]
    pub subnet_len: u8,
    #[serde(alias = "Backend", default)]
    pub backend: BackendConfig,
    /// flannel's `EnableIPv6`: `false` ignores `ipv6Network`; `true` requires
    /// it. Absent: dual stack exactly when `ipv6Network` is set.
    #[serde(
        rename = "enableIPv6",
        alias = "EnableIPv6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub enable_ipv6: Option<bool>,
    /// The cluster's IPv6 pod network, e.g. fd00:244::/56 (dual stack).
    #[serde(
        rename = "ipv6Network",
        alias = "IPv6Network",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv6_network: Option<Ipv6Network>,
    /// Prefix length of each node's IPv6 subnet (default 64).
    #[serde(
        rename = "ipv6SubnetLen",
        alias = "IPv6SubnetLen",
        default = "default_ipv6_subnet_len"
    )]
    pub ipv6_subnet_len: u8,
}

fn default_subnet_len() -> u8 {
    24
}

fn default_ipv6_subnet_len() -> u8 {
    64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendType {
    #[serde(alias = "VXLAN")]
    Vxlan,
    HostGw,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendConfig {
    #[serde(rename = "type", alias = "Type")]
    pub kind: BackendType,
    #[serde(alias = "VNI", default = "default_vni")]
    pub vni: u32,
    #[serde(alias = "Port", default = "default_port")]
    pub port: u16,
    /// VXLAN only: peers on the same L2 segment get a plain route via their
    /// underlay address instead of going through the tunnel.
    #[serde(alias = "DirectRouting", default)]
    pub direct_routing: bool,
}

fn default_vni() -> u32 {
    DEFAULT_VNI
}
fn default_port() -> u16 {
    DEFAULT_VXLAN_PORT
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            kind: BackendType::Vxlan,
            vni: DEFAULT_VNI,
            port: DEFAULT_VXLAN_PORT,
            direct_routing: false,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetworkConfigError {
    #[error("network config is not valid JSON: {0}")]
    Json(String),
    #[error(
        "subnetLen {subnet_len} must be longer than the network's /{network_len} and at most /30"
    )]
    SubnetLen { subnet_len: u8, network_len: u8 },
    #[error("vni {0} is outside 1..=16777215")]
    Vni(u32),
    #[error("port must not be 0")]
    Port,
    #[error(
        "ipv6SubnetLen {subnet_len} must be longer than the IPv6 network's /{network_len} and at most /120"
    )]
    Ipv6SubnetLen { subnet_len: u8, network_len: u8 },
    #[error(
        "ipv6Network {network} holds {v6} /{subnet_len} subnets, fewer than the {v4} IPv4 subnets of network {v4_network}: every node's IPv4 subnet needs an IPv6 one (a shorter ipv6Network or a longer ipv6SubnetLen)"
    )]
    Ipv6TooSmall {
        network: Ipv6Network,
        subnet_len: u8,
        v6: u128,
        v4: u64,
        v4_network: Ipv4Network,
    },
    #[error("EnableIPv6 is true but no ipv6Network (IPv6Network) is given")]
    Ipv6NetworkMissing,
    #[error(
        "the IPv4 network is required: IPv6-only cluster networks are not supported (give network beside ipv6Network for dual stack)"
    )]
    Ipv6Only,
    #[error(
        "{key} {network} has host bits set: a network is written with its first address (e.g. {expected})"
    )]
    HostBits {
        key: &'static str,
        network: IpNetwork,
        expected: IpNetwork,
    },
    #[error(
        "{key} {network} is not a usable unicast pod network: it overlaps {reserved} ({what}); pick a private range such as 10.244.0.0/16 or fd00:244::/56"
    )]
    NotUnicast {
        key: &'static str,
        network: IpNetwork,
        reserved: IpNetwork,
        what: &'static str,
    },
}

/// Address ranges a pod network must not overlap: packets to them are never
/// routed to a pod (or to anyone), whatever the node's routes say.
const RESERVED_V4: [(&str, &str); 6] = [
    ("0.0.0.0/8", "\"this network\", including 0.0.0.0"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, including the broadcast address"),
    ("255.255.255.255/32", "broadcast"),
];
const RESERVED_V6: [(&str, &str); 5] = [
    ("::/128", "the unspecified address"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped addresses"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
];

/// [`RESERVED_V4`] and [`RESERVED_V6`], parsed once (every lease of every
/// pass is checked against them).
static RESERVED: std::sync::LazyLock<Vec<(IpNetwork, &'static str)>> =
    std::sync::LazyLock::new(|| {
        RESERVED_V4
            .iter()
            .chain(RESERVED_V6.iter())
            .map(|(net, what)| (net.parse().expect("valid reserved range"), *what))
            .collect()
    });

fn reserved() -> impl Iterator<Item = (IpNetwork, &'static str)> {
    RESERVED.iter().copied()
}

/// True when the networks share an address (one contains the other).
pub fn overlaps(a: IpNetwork, b: IpNetwork) -> bool {
    match (a, b) {
        (IpNetwork::V4(a), IpNetwork::V4(b)) => a.contains(b.network()) || b.contains(a.network()),
        (IpNetwork::V6(a), IpNetwork::V6(b)) => a.contains(b.network()) || b.contains(a.network()),
        _ => false,
    }
}

/// True when `ip` is an address a node can be reached at: not unspecified,
/// loopback, multicast, broadcast, link-local (IPv6: it needs a scope a lease
/// cannot carry), IPv4-mapped or otherwise reserved.
pub fn is_unicast(ip: IpAddr) -> bool {
    let host = IpNetwork::from(ip);
    match ip {
        // 169.254/16 is a usable (if odd) IPv4 underlay; only the ranges no
        // packet can be sent to count here.
        IpAddr::V4(_) => !reserved().any(|(r, what)| what != "link-local" && overlaps(r, host)),
        IpAddr::V6(_) => !reserved().any(|(r, _)| overlaps(r, host)),
    }
}

/// A prefix usable as a pod network: written without host bits, and clear
/// of every reserved range.
fn check_prefix(key: &'static str, network: IpNetwork) -> Result<(), NetworkConfigError> {
    let expected = IpNetwork::new(network.network(), network.prefix()).expect("same prefix");
    if network.ip() != network.network() {
        return Err(NetworkConfigError::HostBits {
            key,
            network,
            expected,
        });
    }
    if let Some((reserved, what)) = reserved().find(|(r, _)| overlaps(*r, network)) {
        return Err(NetworkConfigError::NotUnicast {
            key,
            network,
            reserved,
            what,
        });
    }
    Ok(())
}

impl NetworkConfig {
    pub fn from_json(text: &str) -> Result<NetworkConfig, NetworkConfigError> {
        if let Ok(serde_json::Value::Object(o)) = serde_json::from_str(text)
            && !o.contains_key("network")
            && !o.contains_key("Network")
            && (o.contains_key("ipv6Network") || o.contains_key("IPv6Network"))
        {
            return Err(NetworkConfigError::Ipv6Only);
        }
        let cfg: NetworkConfig =
            serde_json::from_str(text).map_err(|e| NetworkConfigError::Json(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serializes")
    }

    pub fn validate(&self) -> Result<(), NetworkConfigError> {
        check_prefix("network", IpNetwork::V4(self.network))?;
        if let Some(net6) = self.ipv6_network {
            check_prefix("ipv6Network", IpNetwork::V6(net6))?;
        }
        let network_len = self.network.prefix();
        if self.subnet_len <= network_len || self.subnet_len > 30 {
            return Err(NetworkConfigError::SubnetLen {
                subnet_len: self.subnet_len,
                network_len,
            });
        }
        if self.backend.vni == 0 || self.backend.vni > 0x00ff_ffff {
            return Err(NetworkConfigError::Vni(self.backend.vni));
        }
        if self.backend.port == 0 {
            return Err(NetworkConfigError::Port);
        }
        if self.enable_ipv6 == Some(true) && self.ipv6_network.is_none() {
            return Err(NetworkConfigError::Ipv6NetworkMissing);
        }
        if let Some(net6) = self.ipv6() {
            let network_len = net6.prefix();
            if self.ipv6_subnet_len <= network_len || self.ipv6_subnet_len > 120 {
                return Err(NetworkConfigError::Ipv6SubnetLen {
                    subnet_len: self.ipv6_subnet_len,
                    network_len,
                });
            }
            let v6 = self.ipv6_subnet_count();
            if v6 < u128::from(self.subnet_count()) {
                return Err(NetworkConfigError::Ipv6TooSmall {
                    network: net6,
                    subnet_len: self.ipv6_subnet_len,
                    v6,
                    v4: self.subnet_count(),
                    v4_network: self.network,
                });
            }
        }
        Ok(())
    }

    /// The IPv6 pod network when the config is dual-stack.
    pub fn ipv6(&self) -> Option<Ipv6Network> {
        if self.enable_ipv6 == Some(false) {
            return None;
        }
        self.ipv6_network
    }

    /// How many IPv6 node subnets the IPv6 network holds (saturating).
    fn ipv6_subnet_count(&self) -> u128 {
        let Some(net6) = self.ipv6() else { return 0 };
        let bits = u32::from(self.ipv6_subnet_len.saturating_sub(net6.prefix()));
        1u128.checked_shl(bits).unwrap_or(u128::MAX)
    }

    /// The `i`-th IPv6 node subnet.
    pub fn ipv6_subnet(&self, i: u64) -> Option<Ipv6Network> {
        let net6 = self.ipv6()?;
        if u128::from(i) >= self.ipv6_subnet_count() {
            return None;
        }
        let base = u128::from(net6.network());
        let step = 1u128 << (128 - u32::from(self.ipv6_subnet_len));
        let addr = base.checked_add(u128::from(i).checked_mul(step)?)?;
        Ipv6Network::new(Ipv6Addr::from(addr), self.ipv6_subnet_len).ok()
    }

    /// The IPv6 subnet that goes with the IPv4 node subnet `v4` (the same
    /// index in both networks); `None` without dual stack or when `v4` is not
    /// one of this network's subnets.
    pub fn ipv6_subnet_for(&self, v4: Ipv4Network) -> Option<Ipv6Network> {
        if !self.holds(v4) {
            return None;
        }
        let offset = u32::from(v4.network()) - u32::from(self.network.network());
        let i = u64::from(offset >> (32 - u32::from(self.subnet_len)));
        self.ipv6_subnet(i)
    }

    /// How many node subnets the network holds.
    pub fn subnet_count(&self) -> u64 {
        1u64 << (self.subnet_len - self.network.prefix())
    }

    /// The `i`-th node subnet. Subnet 0 (the one holding the network
    /// address) is skipped by [`Self::candidates`], as flannel does.
    pub fn subnet(&self, i: u64) -> Option<Ipv4Network> {
        if i >= self.subnet_count() {
            return None;
        }
        let base = u32::from(self.network.network());
        let step = 1u64 << (32 - self.subnet_len);
        let addr = base as u64 + i * step;
        Ipv4Network::new(Ipv4Addr::from(addr as u32), self.subnet_len).ok()
    }

    /// Every subnet a node may lease, in order, starting after subnet 0.
    pub fn candidates(&self) -> impl Iterator<Item = Ipv4Network> + '_ {
        (1..self.subnet_count()).filter_map(|i| self.subnet(i))
    }

    /// True when `net` shares an address with the IPv4 network or the IPv6
    /// one (dual stack).
    pub fn overlaps(&self, net: IpNetwork) -> bool {
        overlaps(IpNetwork::V4(self.network), net)
            || self
                .ipv6()
                .is_some_and(|n6| overlaps(IpNetwork::V6(n6), net))
    }

    /// The cluster network of `ip`'s family holds `ip`.
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        self.overlaps(IpNetwork::from(ip))
    }

    /// True when `subnet` is one of this network's node subnets.
    pub fn holds(&self, subnet: Ipv4Network) -> bool {
        subnet.prefix() == self.subnet_len
            && self.network.contains(subnet.network())
            && subnet.network() == subnet.ip()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ferry_and_flannel_spellings() {
        let ferry = NetworkConfig::from_json(
            r#"{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan","vni":7,"port":8472,"directRouting":true}}"#,
        )
        .unwrap();
        let flannel = NetworkConfig::from_json(
            r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":7,"Port":8472,"DirectRouting":true}}"#,
        )
        .unwrap();
        assert_eq!(ferry, flannel);
        let hostgw =
            NetworkConfig::from_json(r#"{"network":"10.1.0.0/16","backend":{"type":"host-gw"}}"#)
                .unwrap();
        assert_eq!(hostgw.backend.kind, BackendType::HostGw);
        assert_eq!(hostgw.subnet_len, 24);
        assert_eq!(NetworkConfig::from_json(&hostgw.to_json()).unwrap(), hostgw);
    }

    #[test]
    fn refuses_bad_configs() {
        let cases = [
            (
                r#"{"network":"10.244.0.0/16","subnetLen":16}"#,
                "subnetLen 16",
            ),
            (
                r#"{"network":"10.244.0.0/16","subnetLen":31}"#,
                "subnetLen 31",
            ),
            (
                r#"{"network":"10.244.0.0/16","backend":{"type":"vxlan","vni":0}}"#,
                "vni 0",
            ),
            (
                r#"{"network":"10.244.0.0/16","backend":{"type":"udp"}}"#,
                "JSON",
            ),
            (r#"{"network":"10.244.0.0/33"}"#, "JSON"),
            (r#"{"subnetLen":24}"#, "JSON"),
            (
                r#"{"ipv6Network":"fd00:244::/56"}"#,
                "IPv6-only cluster networks are not supported",
            ),
            (
                r#"{"network":"10.244.0.0/16","ipv6Network":"fd00:244::/56","ipv6SubnetLen":56}"#,
                "ipv6SubnetLen 56",
            ),
            (
                r#"{"network":"10.244.0.0/16","ipv6Network":"fd00:244::/56","ipv6SubnetLen":121}"#,
                "ipv6SubnetLen 121",
            ),
            (
                r#"{"network":"10.244.0.0/16","ipv6Network":"fd00:244::/60"}"#,
                "holds 16 /64 subnets, fewer than the 256",
            ),
            (
                r#"{"network":"10.244.0.0/16","EnableIPv6":true}"#,
                "no ipv6Network",
            ),
        ];
        for (text, want) in cases {
            let err = NetworkConfig::from_json(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn refuses_networks_that_are_not_usable_unicast_prefixes() {
        let cases = [
            (r#"{"network":"0.0.0.0/0"}"#, "overlaps 0.0.0.0/8"),
            (r#"{"network":"0.0.0.0/0","subnetLen":24}"#, "not a usable"),
            (r#"{"network":"127.0.0.0/8"}"#, "loopback"),
            (r#"{"network":"127.1.0.0/16"}"#, "loopback"),
            (r#"{"network":"224.0.0.0/4"}"#, "multicast"),
            (r#"{"network":"239.1.0.0/16"}"#, "multicast"),
            (r#"{"network":"240.0.0.0/8"}"#, "reserved"),
            (r#"{"network":"169.254.0.0/16"}"#, "link-local"),
            (r#"{"network":"0.0.0.0/8","subnetLen":24}"#, "this network"),
            (
                r#"{"network":"10.0.0.1/8"}"#,
                "10.0.0.1/8 has host bits set: a network is written with its first address (e.g. 10.0.0.0/8)",
            ),
            (
                r#"{"network":"10.244.0.0/16","ipv6Network":"::/0"}"#,
                "ipv6Network ::/0 is not a usable unicast pod network",
            ),
            (
                r#"{"network":"10.244.0.0/16","ipv6Network":"ff00::/8","ipv6SubnetLen":64}"#,
                "multicast",
            ),
            (
                r#"{"network":"10.244.0.0/16","ipv6Network":"fe80::/56"}"#,
                "link-local",
            ),
            (
                r#"{"network":"10.244.0.0/16","ipv6Network":"::ffff:0:0/96","ipv6SubnetLen":120}"#,
                "IPv4-mapped",
            ),
            (
                r#"{"network":"10.244.0.0/16","ipv6Network":"fd00:244::1/56"}"#,
                "has host bits set",
            ),
        ];
        for (text, want) in cases {
            let err = NetworkConfig::from_json(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        // Usable ranges still pass, the public ones included.
        for ok in [
            r#"{"network":"10.244.0.0/16"}"#,
            r#"{"network":"100.64.0.0/10","subnetLen":24}"#,
            r#"{"network":"192.0.2.0/24","subnetLen":28}"#,
            r#"{"network":"10.244.0.0/16","ipv6Network":"2001:db8::/56"}"#,
        ] {
            NetworkConfig::from_json(ok).expect(ok);
        }
    }

    #[test]
    fn unicast_addresses_and_overlaps() {
        for bad in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
            "::ffff:192.0.2.1",
        ] {
            assert!(!is_unicast(bad.parse().unwrap()), "{bad}");
        }
        for good in [
            "192.0.2.10",
            "10.1.2.3",
            "169.254.10.1",
            "2001:db8::10",
            "fd00::1",
        ] {
            assert!(is_unicast(good.parse().unwrap()), "{good}");
        }
        let n = |s: &str| s.parse::<IpNetwork>().unwrap();
        assert!(overlaps(n("10.0.0.0/8"), n("10.244.1.0/24")));
        assert!(overlaps(n("10.244.1.0/24"), n("10.0.0.0/8")));
        assert!(!overlaps(n("10.244.1.0/24"), n("10.244.2.0/24")));
        assert!(!overlaps(n("10.244.1.0/24"), n("fd00::/8")));
        let cfg = NetworkConfig::from_json(
            r#"{"network":"10.244.0.0/16","ipv6Network":"fd00:244::/56"}"#,
        )
        .unwrap();
        assert!(cfg.overlaps(n("10.244.9.0/24")));
        assert!(cfg.overlaps(n("fd00:244:0:9::/64")));
        assert!(!cfg.overlaps(n("192.168.77.0/24")));
        assert!(cfg.contains_ip("10.244.3.7".parse().unwrap()));
        assert!(!cfg.contains_ip("fd00:245::1".parse().unwrap()));
    }

    #[test]
    fn subnets_skip_the_first_and_stay_inside() {
        let cfg =
            NetworkConfig::from_json(r#"{"network":"10.244.0.0/22","subnetLen":24}"#).unwrap();
        let all: Vec<String> = cfg.candidates().map(|s| s.to_string()).collect();
        assert_eq!(all, ["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"]);
        assert!(cfg.holds("10.244.3.0/24".parse().unwrap()));
        assert!(!cfg.holds("10.244.3.0/25".parse().unwrap()));
        assert!(!cfg.holds("10.245.0.0/24".parse().unwrap()));
        assert_eq!(cfg.subnet(4), None);
    }

    #[test]
    fn dual_stack_parses_in_both_spellings_and_maps_subnets_by_index() {
        let ferry = NetworkConfig::from_json(
            r#"{"network":"10.244.0.0/16","ipv6Network":"fd00:244::/56","backend":{"type":"vxlan"}}"#,
        )
        .unwrap();
        let flannel = NetworkConfig::from_json(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/56","IPv6SubnetLen":64,"Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(ferry.ipv6(), flannel.ipv6());
        assert_eq!(ferry.ipv6_subnet_len, 64);
        assert_eq!(
            NetworkConfig::from_json(&flannel.to_json()).unwrap(),
            flannel
        );
        assert_eq!(NetworkConfig::from_json(&ferry.to_json()).unwrap(), ferry);
        let v6 = |s: &str| s.parse::<Ipv6Network>().unwrap();
        let v4 = |s: &str| s.parse::<Ipv4Network>().unwrap();
        assert_eq!(
            ferry.ipv6_subnet_for(v4("10.244.1.0/24")),
            Some(v6("fd00:244:0:1::/64"))
        );
        assert_eq!(
            ferry.ipv6_subnet_for(v4("10.244.255.0/24")),
            Some(v6("fd00:244:0:ff::/64"))
        );
        assert_eq!(ferry.ipv6_subnet_for(v4("10.245.1.0/24")), None);
        assert_eq!(ferry.ipv6_subnet_for(v4("10.244.1.0/25")), None);
        // Distinct IPv4 subnets get distinct IPv6 subnets.
        let all: std::collections::HashSet<Ipv6Network> = ferry
            .candidates()
            .map(|s| ferry.ipv6_subnet_for(s).unwrap())
            .collect();
        assert_eq!(all.len() as u64, ferry.subnet_count() - 1);
        // A /16 of /24s fits exactly into a /56 of /64s, not into a /57.
        assert!(
            NetworkConfig::from_json(
                r#"{"network":"10.244.0.0/16","ipv6Network":"fd00:244::/57"}"#
            )
            .is_err()
        );
        // Big IPv6 networks and long subnets do not overflow.
        let wide = NetworkConfig::from_json(
            r#"{"network":"10.0.0.0/8","subnetLen":30,"ipv6Network":"fd00::/8","ipv6SubnetLen":120}"#,
        )
        .unwrap();
        assert_eq!(
            wide.ipv6_subnet_for(v4("10.0.0.4/30")),
            Some(v6("fd00::100/120"))
        );
        // EnableIPv6 false turns dual stack off; no ipv6Network: IPv4 only.
        let off = NetworkConfig::from_json(
            r#"{"network":"10.244.0.0/16","EnableIPv6":false,"IPv6Network":"fd00:244::/56"}"#,
        )
        .unwrap();
        assert_eq!(off.ipv6(), None);
        assert_eq!(off.ipv6_subnet_for(v4("10.244.1.0/24")), None);
        let v4only = NetworkConfig::from_json(r#"{"network":"10.244.0.0/16"}"#).unwrap();
        assert_eq!(v4only.ipv6(), None);
        assert!(!v4only.to_json().contains("ipv6Network"));
    }
}
