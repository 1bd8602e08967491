//! The cluster network config, stored once in etcd at `<prefix>/network/config`,
//! and the subnet arithmetic every node shares.
//!
//! The JSON uses ferry's camelCase keys; flannel's capitalised keys
//! (`Network`, `SubnetLen`, `Backend.Type`, `VNI`, `Port`, `DirectRouting`)
//! are accepted too, so an operator can copy a flannel net-conf.json.

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

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
}

fn default_subnet_len() -> u8 {
    24
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
}

impl NetworkConfig {
    pub fn from_json(text: &str) -> Result<NetworkConfig, NetworkConfigError> {
        let cfg: NetworkConfig =
            serde_json::from_str(text).map_err(|e| NetworkConfigError::Json(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serializes")
    }

    pub fn validate(&self) -> Result<(), NetworkConfigError> {
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
        Ok(())
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
        ];
        for (text, want) in cases {
            let err = NetworkConfig::from_json(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
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
}
