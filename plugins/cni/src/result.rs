//! ADD results: one model (the 1.1.0 superset) printed for whichever version
//! the runtime asked for, and parsed from any version a delegated plugin or a
//! `prevResult` hands us.
//!
//! Field names, order and omission follow libcni's Go types (`types/040`,
//! `types/100`), so a Go runtime decodes our output exactly like the reference
//! plugins' output; the fixture tests compare against their captured output.

use crate::error::CniError;
use crate::version::SpecVersion;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// The result of ADD (and the `prevResult` of a chained plugin).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    /// Empty when unknown.
    pub mac: String,
    /// 1.1.0 and later.
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the container; empty on the host.
    pub sandbox: String,
    /// 1.1.0 and later.
    pub socket_path: String,
    /// 1.1.0 and later.
    pub pci_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// Index into `interfaces`.
    pub interface: Option<usize>,
    /// Address with its prefix length, e.g. `10.88.0.2/24`.
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
    /// The following are 1.1.0 and later.
    pub mtu: Option<u32>,
    pub advmss: Option<u32>,
    pub priority: Option<u32>,
    pub table: Option<u32>,
    pub scope: Option<u8>,
}

impl Route {
    pub fn new(dst: IpNetwork, gw: Option<IpAddr>) -> Self {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        *self == Dns::default()
    }
}

impl CniResult {
    /// The result as JSON for `version`: fields that version does not know are
    /// dropped, and before 1.0.0 every IP carries `"version": "4"|"6"`.
    pub fn to_json(&self, version: SpecVersion) -> serde_json::Value {
        let v11 = version >= SpecVersion::V1_1_0;
        let wire = WireResult {
            cni_version: version.as_str().to_string(),
            interfaces: self
                .interfaces
                .iter()
                .map(|i| WireInterface {
                    name: i.name.clone(),
                    mac: i.mac.clone(),
                    mtu: if v11 { i.mtu.filter(|m| *m != 0) } else { None },
                    sandbox: i.sandbox.clone(),
                    socket_path: if v11 {
                        i.socket_path.clone()
                    } else {
                        String::new()
                    },
                    pci_id: if v11 { i.pci_id.clone() } else { String::new() },
                })
                .collect(),
            ips: self
                .ips
                .iter()
                .map(|ip| WireIp {
                    version: version
                        .ip_has_version_field()
                        .then(|| if ip.address.is_ipv4() { "4" } else { "6" }.to_string()),
                    interface: ip.interface,
                    address: ip.address.to_string(),
                    gateway: ip.gateway.map(|g| g.to_string()),
                })
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|r| WireRoute {
                    dst: r.dst.to_string(),
                    gw: r.gw.map(|g| g.to_string()),
                    mtu: r.mtu.filter(|_| v11),
                    advmss: r.advmss.filter(|_| v11),
                    priority: r.priority.filter(|_| v11),
                    table: r.table.filter(|_| v11),
                    scope: r.scope.filter(|_| v11),
                })
                .collect(),
            dns: self.dns.clone(),
        };
        serde_json::to_value(wire).expect("result serializes")
    }

    /// Parses a result of any supported version (the `version` field of
    /// pre-1.0 IPs is implied by the address and ignored).
    pub fn from_json(value: &serde_json::Value) -> Result<CniResult, CniError> {
        let wire: WireResult = serde_json::from_value(value.clone())
            .map_err(|e| CniError::decoding("failed to decode CNI result").with_details(e))?;
        if !wire.cni_version.is_empty() {
            SpecVersion::negotiate(&wire.cni_version)?;
        }
        let mut out = CniResult {
            dns: wire.dns,
            ..Default::default()
        };
        for i in wire.interfaces {
            out.interfaces.push(Interface {
                name: i.name,
                mac: i.mac,
                mtu: i.mtu,
                sandbox: i.sandbox,
                socket_path: i.socket_path,
                pci_id: i.pci_id,
            });
        }
        for ip in wire.ips {
            let address: IpNetwork = ip.address.parse().map_err(|e| {
                CniError::decoding(format!("invalid IP address {:?} in result", ip.address))
                    .with_details(e)
            })?;
            if let Some(v) = &ip.version {
                let want = if address.is_ipv4() { "4" } else { "6" };
                if v != want {
                    return Err(CniError::decoding(format!(
                        "IP {address} in result has version {v:?}"
                    )));
                }
            }
            if let Some(idx) = ip.interface
                && idx >= out.interfaces.len()
            {
                return Err(CniError::decoding(format!(
                    "IP {address} refers to interface {idx}, result has {}",
                    out.interfaces.len()
                )));
            }
            out.ips.push(IpConfig {
                interface: ip.interface,
                address,
                gateway: parse_opt_ip(ip.gateway.as_deref(), "gateway")?,
            });
        }
        for r in wire.routes {
            let dst: IpNetwork = r.dst.parse().map_err(|e| {
                CniError::decoding(format!("invalid route destination {:?}", r.dst)).with_details(e)
            })?;
            out.routes.push(Route {
                // A destination is a network: libcni masks "10.1.2.3/24" to "10.1.2.0/24".
                dst: IpNetwork::new(dst.network(), dst.prefix()).expect("same prefix is valid"),
                gw: parse_opt_ip(r.gw.as_deref(), "route gateway")?,
                mtu: r.mtu,
                advmss: r.advmss,
                priority: r.priority,
                table: r.table,
                scope: r.scope,
            });
        }
        Ok(out)
    }
}

fn parse_opt_ip(s: Option<&str>, what: &str) -> Result<Option<IpAddr>, CniError> {
    match s {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|e| CniError::decoding(format!("invalid {what} {s:?}")).with_details(e)),
    }
}

#[derive(Serialize, Deserialize)]
struct WireResult {
    #[serde(rename = "cniVersion", default)]
    cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    interfaces: Vec<WireInterface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ips: Vec<WireIp>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    routes: Vec<WireRoute>,
    #[serde(default)]
    dns: Dns,
}

#[derive(Serialize, Deserialize)]
struct WireInterface {
    name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    sandbox: String,
    #[serde(
        rename = "socketPath",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    socket_path: String,
    #[serde(rename = "pciID", default, skip_serializing_if = "String::is_empty")]
    pci_id: String,
}

#[derive(Serialize, Deserialize)]
struct WireIp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interface: Option<usize>,
    address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gateway: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct WireRoute {
    dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gw: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn full_result() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: "02:00:00:00:00:01".into(),
                    mtu: Some(1450),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:02".into(),
                    mtu: Some(1450),
                    sandbox: "/run/netns/p".into(),
                    socket_path: "/run/s.sock".into(),
                    pci_id: "0000:00:01.0".into(),
                },
            ],
            ips: vec![
                IpConfig {
                    interface: Some(1),
                    address: "10.1.0.5/24".parse().unwrap(),
                    gateway: Some("10.1.0.1".parse().unwrap()),
                },
                IpConfig {
                    interface: Some(1),
                    address: "fd00::5/64".parse().unwrap(),
                    gateway: None,
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.1.0.1".parse().unwrap()),
                mtu: Some(1400),
                advmss: Some(1360),
                priority: Some(10),
                table: Some(100),
                scope: Some(0),
            }],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                ..Default::default()
            },
        }
    }

    #[test]
    fn per_version_shape() {
        let r = full_result();
        let cases = [
            (SpecVersion::V0_3_0, true, false),
            (SpecVersion::V0_3_1, true, false),
            (SpecVersion::V0_4_0, true, false),
            (SpecVersion::V1_0_0, false, false),
            (SpecVersion::V1_1_0, false, true),
        ];
        for (v, has_ip_version, has_11_fields) in cases {
            let j = r.to_json(v);
            assert_eq!(j["cniVersion"], v.as_str());
            assert_eq!(j["ips"][0].get("version").is_some(), has_ip_version, "{v}");
            if has_ip_version {
                assert_eq!(j["ips"][0]["version"], "4");
                assert_eq!(j["ips"][1]["version"], "6");
            }
            assert_eq!(
                j["interfaces"][1].get("mtu").is_some(),
                has_11_fields,
                "{v}"
            );
            assert_eq!(
                j["interfaces"][1].get("socketPath").is_some(),
                has_11_fields
            );
            assert_eq!(j["interfaces"][1].get("pciID").is_some(), has_11_fields);
            for k in ["mtu", "advmss", "priority", "table", "scope"] {
                assert_eq!(j["routes"][0].get(k).is_some(), has_11_fields, "{v} {k}");
            }
            assert_eq!(j["ips"][1].get("gateway"), None);
            assert_eq!(j["dns"]["nameservers"][0], "10.96.0.10");
        }
    }

    #[test]
    fn round_trip_latest() {
        let r = full_result();
        let back = CniResult::from_json(&r.to_json(SpecVersion::V1_1_0)).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn route_destination_is_masked() {
        let r = CniResult::from_json(
            &json!({"cniVersion": "1.0.0", "routes": [{"dst": "10.1.2.3/24"}]}),
        )
        .unwrap();
        assert_eq!(r.routes[0].dst.to_string(), "10.1.2.0/24");
    }

    #[test]
    fn empty_lists_are_omitted_dns_is_not() {
        let j = CniResult::default().to_json(SpecVersion::V1_0_0);
        assert_eq!(j, json!({"cniVersion": "1.0.0", "dns": {}}));
    }

    #[test]
    fn rejects_bad_results() {
        let cases = [
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.300/24"}]}),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.3/24", "interface": 0}]}),
            json!({"cniVersion": "0.4.0", "ips": [{"version": "6", "address": "10.0.0.3/24"}]}),
            json!({"cniVersion": "1.0.0", "routes": [{"dst": "nope"}]}),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.3/24", "gateway": "x"}]}),
            json!({"cniVersion": "7.0.0"}),
            json!({"cniVersion": "1.0.0", "ips": "nope"}),
        ];
        for c in cases {
            let err = CniResult::from_json(&c).unwrap_err();
            assert!(matches!(err.code.as_u32(), 1 | 6), "{c}: {err:?}");
        }
    }
}
