//! A node's subnet lease, as stored in etcd at
//! `<prefix>/network/subnets/<a.b.c.d-len>` (attached to an etcd lease with a
//! TTL that the owning daemon keeps alive).

use crate::network::{BackendType, NetworkConfig, is_unicast};
use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A MAC address, written `02:42:ac:11:00:02` in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(|| format!("bad MAC {s:?}"))?;
            if p.len() != 2 {
                return Err(format!("bad MAC {s:?}"));
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC {s:?}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("bad MAC {s:?}"));
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Mac {
    /// True for a MAC a VTEP can have: not all zeros, not broadcast, not
    /// multicast (the I/G bit of the first byte clear).
    pub fn is_unicast(&self) -> bool {
        self.0 != [0; 6] && self.0[0] & 0x01 == 0
    }

    /// A stable, locally administered unicast MAC derived from `seed` (the
    /// node name), so a restarted daemon recreates its VTEP with the same
    /// MAC and no peer's neighbour or fdb entry has to change.
    pub fn derived(seed: &str) -> Mac {
        // FNV-1a, 64 bit: tiny, stable across releases (std's hasher is not).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // FNV's high bytes barely change between names like n1 and n2: mix
        // (splitmix64's finalizer) so every byte depends on every input bit.
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
        let b = h.to_be_bytes();
        Mac([(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }
}

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubnetLease {
    /// Not stored in the value: it is the key.
    #[serde(skip)]
    pub subnet: Option<Ipv4Network>,
    pub node: String,
    /// The node's underlay address (VXLAN remote / host-gw next hop), IPv4
    /// or IPv6 (`"192.0.2.10"` or `"2001:db8::10"`).
    pub public_ip: IpAddr,
    pub backend: BackendType,
    /// The MAC of the node's VXLAN device (vxlan backend only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<Mac>,
    /// Unix seconds of the last (re)acquisition, for operators.
    #[serde(default)]
    pub renewed_at: u64,
    /// The node's IPv6 pod subnet (dual-stack networks): always the one
    /// [`NetworkConfig::ipv6_subnet_for`](crate::network::NetworkConfig::ipv6_subnet_for)
    /// maps the key's IPv4 subnet to. Absent in IPv4-only networks and in
    /// leases of nodes that predate dual stack (they get no IPv6 routes).
    #[serde(
        rename = "ipv6Subnet",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv6_subnet: Option<Ipv6Network>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseKeyError {
    #[error("lease key {0:?} is not <prefix>/network/subnets/<a.b.c.d-len>")]
    BadKey(String),
    #[error("lease {key:?} has an unreadable value: {msg}")]
    BadValue { key: String, msg: String },
}

/// Why a lease read from etcd is not used: anyone who can write the
/// subnets prefix writes these values, and none of them may make this node
/// route to itself, to loopback or multicast, or outside the cluster network.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum InvalidLease {
    #[error(
        "subnet {subnet} is not one of the /{subnet_len} node subnets of the cluster network {network}"
    )]
    SubnetOutside {
        subnet: Ipv4Network,
        network: Ipv4Network,
        subnet_len: u8,
    },
    #[error("ipv6Subnet {subnet6} is not inside the cluster's ipv6Network {network6}")]
    Ipv6SubnetOutside {
        subnet6: Ipv6Network,
        network6: Ipv6Network,
    },
    #[error("publicIp {0} is not a unicast address")]
    PublicIpNotUnicast(IpAddr),
    #[error(
        "publicIp {public_ip} is not of the family of this node's underlay address {local}: it cannot be reached"
    )]
    PublicIpFamily { public_ip: IpAddr, local: IpAddr },
    #[error("publicIp {0} is an address of this node")]
    PublicIpIsLocal(IpAddr),
    #[error(
        "publicIp {0} is inside the cluster network: a node's underlay address is never a pod address"
    )]
    PublicIpInClusterNetwork(IpAddr),
    #[error("vtepMac {0} is not a unicast MAC (zero, broadcast or multicast)")]
    VtepMac(Mac),
    #[error("it has no vtepMac: it cannot be reached over VXLAN")]
    NoVtepMac,
}

/// What a lease is checked against: the cluster network (when known) and
/// this node's addresses.
pub struct LeaseRules<'a> {
    /// The cluster network config; `None` skips the subnet checks.
    pub network: Option<&'a NetworkConfig>,
    /// This node's underlay address: a peer's must be of its family.
    pub underlay: IpAddr,
    /// True for an address this node holds (any interface).
    pub is_local: &'a dyn Fn(IpAddr) -> bool,
}

/// The checks of [`SubnetLease::validate`] on the values a peer is built
/// from (the dataplane's [`Peer`](crate::dataplane::Peer) has the same).
pub fn validate_lease_values(
    subnet: Ipv4Network,
    subnet6: Option<Ipv6Network>,
    public_ip: IpAddr,
    vtep_mac: Option<Mac>,
    rules: &LeaseRules<'_>,
) -> Result<(), InvalidLease> {
    if let Some(cfg) = rules.network {
        if !cfg.holds(subnet) {
            return Err(InvalidLease::SubnetOutside {
                subnet,
                network: cfg.network,
                subnet_len: cfg.subnet_len,
            });
        }
        if let (Some(subnet6), Some(network6)) = (subnet6, cfg.ipv6()) {
            if subnet6.prefix() < network6.prefix()
                || !network6.contains(subnet6.network())
                || subnet6.ip() != subnet6.network()
            {
                return Err(InvalidLease::Ipv6SubnetOutside { subnet6, network6 });
            }
        }
    }
    if !is_unicast(public_ip) {
        return Err(InvalidLease::PublicIpNotUnicast(public_ip));
    }
    if public_ip.is_ipv6() != rules.underlay.is_ipv6() {
        return Err(InvalidLease::PublicIpFamily {
            public_ip,
            local: rules.underlay,
        });
    }
    if public_ip == rules.underlay || (rules.is_local)(public_ip) {
        return Err(InvalidLease::PublicIpIsLocal(public_ip));
    }
    if rules.network.is_some_and(|cfg| cfg.contains_ip(public_ip)) {
        return Err(InvalidLease::PublicIpInClusterNetwork(public_ip));
    }
    if let Some(mac) = vtep_mac
        && !mac.is_unicast()
    {
        return Err(InvalidLease::VtepMac(mac));
    }
    Ok(())
}

/// `10.244.1.0/24` ↔ `10.244.1.0-24` (a `/` cannot be part of a key segment).
pub fn subnet_key_segment(subnet: Ipv4Network) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix())
}

pub fn parse_subnet_key_segment(seg: &str) -> Option<Ipv4Network> {
    let (ip, len) = seg.split_once('-')?;
    let net = Ipv4Network::new(ip.parse().ok()?, len.parse().ok()?).ok()?;
    (net.network() == net.ip()).then_some(net)
}

impl SubnetLease {
    /// The subnet, which every lease read from or written to etcd has.
    pub fn subnet(&self) -> Ipv4Network {
        self.subnet.expect("lease without subnet")
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("lease serializes")
    }

    /// Whether another node's lease may be programmed on this node
    /// ([`validate_lease_values`]).
    pub fn validate(&self, rules: &LeaseRules<'_>) -> Result<(), InvalidLease> {
        validate_lease_values(
            self.subnet(),
            self.ipv6_subnet,
            self.public_ip,
            self.vtep_mac,
            rules,
        )
    }

    /// Parses the lease stored under `key`, whose last segment is the subnet.
    pub fn from_kv(key: &str, value: &[u8]) -> Result<SubnetLease, LeaseKeyError> {
        let seg = key.rsplit('/').next().unwrap_or_default();
        let subnet =
            parse_subnet_key_segment(seg).ok_or_else(|| LeaseKeyError::BadKey(key.to_string()))?;
        let mut lease: SubnetLease =
            serde_json::from_slice(value).map_err(|e| LeaseKeyError::BadValue {
                key: key.to_string(),
                msg: e.to_string(),
            })?;
        lease.subnet = Some(subnet);
        Ok(lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_and_derives_stably() {
        let m: Mac = "02:42:ac:11:00:02".parse().unwrap();
        assert_eq!(m.to_string(), "02:42:ac:11:00:02");
        for bad in [
            "",
            "02:42",
            "02:42:ac:11:00:02:03",
            "zz:42:ac:11:00:02",
            "2:42:ac:11:00:002",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        let a = Mac::derived("node-a");
        assert_eq!(a, Mac::derived("node-a"));
        assert_ne!(a, Mac::derived("node-b"));
        assert_eq!(a.0[0] & 0x03, 0x02, "locally administered unicast");
        // Names that differ in one character differ in most bytes.
        let macs: std::collections::BTreeSet<[u8; 5]> = (0..5000)
            .map(|i| {
                let m = Mac::derived(&format!("node-{i}")).0;
                [m[1], m[2], m[3], m[4], m[5]]
            })
            .collect();
        assert_eq!(macs.len(), 5000, "no two of 5000 node names share a MAC");
    }

    #[test]
    fn lease_round_trips_through_key_and_value() {
        let lease = SubnetLease {
            subnet: Some("10.244.3.0/24".parse().unwrap()),
            node: "node-a".into(),
            public_ip: "192.0.2.10".parse().unwrap(),
            backend: BackendType::Vxlan,
            vtep_mac: Some(Mac::derived("node-a")),
            renewed_at: 17,
            ipv6_subnet: None,
        };
        let key = format!(
            "/ferry/network/subnets/{}",
            subnet_key_segment(lease.subnet())
        );
        assert_eq!(key, "/ferry/network/subnets/10.244.3.0-24");
        let back = SubnetLease::from_kv(&key, lease.to_json().as_bytes()).unwrap();
        assert_eq!(back, lease);
        assert!(!lease.to_json().contains("ipv6Subnet"));
        let dual = SubnetLease {
            ipv6_subnet: Some("fd00:244:0:3::/64".parse().unwrap()),
            ..lease
        };
        assert!(
            dual.to_json()
                .contains(r#""ipv6Subnet":"fd00:244:0:3::/64""#)
        );
        let back = SubnetLease::from_kv(&key, dual.to_json().as_bytes()).unwrap();
        assert_eq!(back, dual);
    }

    #[test]
    fn public_ip_of_either_family() {
        let key = "/ferry/network/subnets/10.244.3.0-24";
        // A lease written before IPv6 underlays still parses.
        let old = br#"{"node":"n1","publicIp":"192.0.2.10","backend":"vxlan","vtepMac":"02:42:ac:11:00:02","renewedAt":5}"#;
        let l = SubnetLease::from_kv(key, old).unwrap();
        assert_eq!(l.public_ip, "192.0.2.10".parse::<IpAddr>().unwrap());
        assert!(l.to_json().contains(r#""publicIp":"192.0.2.10""#));
        let v6 = br#"{"node":"n1","publicIp":"2001:db8::10","backend":"vxlan","vtepMac":"02:42:ac:11:00:02"}"#;
        let l = SubnetLease::from_kv(key, v6).unwrap();
        assert_eq!(l.public_ip, "2001:db8::10".parse::<IpAddr>().unwrap());
        assert!(l.to_json().contains(r#""publicIp":"2001:db8::10""#));
        assert_eq!(
            SubnetLease::from_kv(key, l.to_json().as_bytes()).unwrap(),
            l
        );
        let bad = br#"{"node":"n1","publicIp":"2001:db8::zz","backend":"vxlan"}"#;
        assert!(SubnetLease::from_kv(key, bad).is_err());
    }

    #[test]
    fn hostile_lease_values_are_invalid() {
        let cfg = NetworkConfig::from_json(
            r#"{"network":"10.244.0.0/16","ipv6Network":"fd00:244::/56"}"#,
        )
        .unwrap();
        let node_ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other_local: IpAddr = "198.51.100.1".parse().unwrap();
        let is_local = |ip: IpAddr| ip == other_local;
        let rules = LeaseRules {
            network: Some(&cfg),
            underlay: node_ip,
            is_local: &is_local,
        };
        let good = SubnetLease {
            subnet: Some("10.244.3.0/24".parse().unwrap()),
            node: "n3".into(),
            public_ip: "192.0.2.13".parse().unwrap(),
            backend: BackendType::Vxlan,
            vtep_mac: Some(Mac::derived("n3")),
            renewed_at: 1,
            ipv6_subnet: Some("fd00:244:0:3::/64".parse().unwrap()),
        };
        good.validate(&rules).unwrap();
        let with_ip = |ip: &str| SubnetLease {
            public_ip: ip.parse().unwrap(),
            ..good.clone()
        };
        let cases: Vec<(SubnetLease, &str)> = vec![
            (
                with_ip("0.0.0.0"),
                "publicIp 0.0.0.0 is not a unicast address",
            ),
            (with_ip("127.0.0.1"), "publicIp 127.0.0.1 is not a unicast"),
            (with_ip("224.0.0.1"), "publicIp 224.0.0.1 is not a unicast"),
            (with_ip("255.255.255.255"), "not a unicast"),
            (
                with_ip("192.0.2.1"),
                "publicIp 192.0.2.1 is an address of this node",
            ),
            (with_ip("198.51.100.1"), "is an address of this node"),
            (with_ip("2001:db8::13"), "not of the family"),
            (with_ip("10.244.7.1"), "inside the cluster network"),
            (
                SubnetLease {
                    subnet: Some("10.245.3.0/24".parse().unwrap()),
                    ..good.clone()
                },
                "subnet 10.245.3.0/24 is not one of the /24 node subnets",
            ),
            (
                SubnetLease {
                    subnet: Some("10.244.0.0/23".parse().unwrap()),
                    ..good.clone()
                },
                "is not one of the /24",
            ),
            (
                SubnetLease {
                    ipv6_subnet: Some("fd00:9::/64".parse().unwrap()),
                    ..good.clone()
                },
                "ipv6Subnet fd00:9::/64 is not inside",
            ),
            (
                SubnetLease {
                    ipv6_subnet: Some("fd00:244::/48".parse().unwrap()),
                    ..good.clone()
                },
                "is not inside",
            ),
            (
                SubnetLease {
                    vtep_mac: Some("ff:ff:ff:ff:ff:ff".parse().unwrap()),
                    ..good.clone()
                },
                "vtepMac ff:ff:ff:ff:ff:ff is not a unicast MAC",
            ),
            (
                SubnetLease {
                    vtep_mac: Some("00:00:00:00:00:00".parse().unwrap()),
                    ..good.clone()
                },
                "not a unicast MAC",
            ),
            (
                SubnetLease {
                    vtep_mac: Some("01:00:5e:00:00:01".parse().unwrap()),
                    ..good.clone()
                },
                "not a unicast MAC",
            ),
        ];
        for (lease, want) in cases {
            let err = lease.validate(&rules).expect_err(want).to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        // Without a network config only the address checks apply.
        let loose = LeaseRules {
            network: None,
            ..rules
        };
        SubnetLease {
            subnet: Some("10.245.3.0/24".parse().unwrap()),
            ..good.clone()
        }
        .validate(&loose)
        .unwrap();
        assert!(with_ip("127.0.0.1").validate(&loose).is_err());
        assert!(Mac::derived("x").is_unicast());
    }

    #[test]
    fn bad_keys_and_values_are_errors() {
        assert!(SubnetLease::from_kv("/ferry/network/subnets/10.244.3.1-24", b"{}").is_err());
        assert!(SubnetLease::from_kv("/ferry/network/subnets/nonsense", b"{}").is_err());
        let err = SubnetLease::from_kv("/ferry/network/subnets/10.244.3.0-24", b"{").unwrap_err();
        assert!(matches!(err, LeaseKeyError::BadValue { .. }));
    }
}
