//! A node's subnet lease, as stored in etcd at
//! `<prefix>/network/subnets/<a.b.c.d-len>` (attached to an etcd lease with a
//! TTL that the owning daemon keeps alive).

use crate::network::BackendType;
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
    fn bad_keys_and_values_are_errors() {
        assert!(SubnetLease::from_kv("/ferry/network/subnets/10.244.3.1-24", b"{}").is_err());
        assert!(SubnetLease::from_kv("/ferry/network/subnets/nonsense", b"{}").is_err());
        let err = SubnetLease::from_kv("/ferry/network/subnets/10.244.3.0-24", b"{").unwrap_err();
        assert!(matches!(err, LeaseKeyError::BadValue { .. }));
    }
}
