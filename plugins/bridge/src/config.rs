//! The bridge configuration: the reference `bridge` plugin's keys, so an
//! existing conflist works by changing only `type`.

use ferry_cni::{CmdArgs, CniError, ErrorCode, NetConf};
use serde::Deserialize;
use std::net::IpAddr;

/// Keys of the reference plugin, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    #[serde(default = "default_bridge")]
    bridge: String,
    #[serde(default)]
    is_gateway: bool,
    #[serde(default)]
    is_default_gateway: bool,
    #[serde(default)]
    force_address: bool,
    #[serde(default)]
    ip_masq: bool,
    /// ferry extension: destinations never masqueraded besides the pod
    /// subnet itself (ferryd sets the cluster network, so pod-to-pod traffic
    /// across nodes keeps its source).
    #[serde(default)]
    ip_masq_exclude: Vec<ipnetwork::IpNetwork>,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    hairpin_mode: bool,
    #[serde(default)]
    promisc_mode: bool,
    /// Signed so that a negative VLAN gets the same clear refusal as 4095.
    #[serde(default)]
    vlan: i64,
    #[serde(default)]
    vlan_trunk: Option<Vec<TrunkWire>>,
    #[serde(default = "yes")]
    preserve_default_vlan: bool,
    #[serde(default)]
    macspoofchk: bool,
    #[serde(default)]
    enabledad: bool,
}

/// One `vlanTrunk` item: a single `id`, or a `minID`..=`maxID` range, or both.
#[derive(Debug, Clone, Deserialize)]
struct TrunkWire {
    #[serde(rename = "minID")]
    min_id: Option<i64>,
    #[serde(rename = "maxID")]
    max_id: Option<i64>,
    id: Option<i64>,
}

fn yes() -> bool {
    true
}

fn default_bridge() -> String {
    "cni0".to_string()
}

/// The effective configuration of one invocation (config + runtimeConfig + CNI_ARGS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConf {
    pub network: String,
    pub bridge: String,
    /// Also true when `isDefaultGateway` is.
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    pub force_address: bool,
    pub ip_masq: bool,
    /// Destinations not masqueraded (`ipMasqExclude`), network addresses.
    pub ip_masq_exclude: Vec<ipnetwork::IpNetwork>,
    pub mtu: u32,
    pub hairpin_mode: bool,
    pub promisc_mode: bool,
    pub enable_dad: bool,
    /// The access VLAN of the pod's port (PVID, untagged); 0 = none.
    pub vlan: u16,
    /// Tagged VLANs of the pod's port (`vlanTrunk`), sorted, no duplicates.
    pub vlan_trunk: Vec<u16>,
    /// Keep the bridge's default VLAN (1) on the pod's port when `vlan` or
    /// `vlanTrunk` is set (the reference default); false removes it.
    pub preserve_default_vlan: bool,
    /// Drop frames from the pod whose source MAC is not the pod's.
    pub macspoofchk: bool,
    /// The pod interface's MAC from runtimeConfig `mac` or `MAC=` in CNI_ARGS.
    pub mac: Option<[u8; 6]>,
}

pub const DEFAULT_MTU: u32 = 1500;

impl BridgeConf {
    pub fn load(conf: &NetConf, args: &CmdArgs) -> Result<BridgeConf, CniError> {
        let w: Wire = conf.plugin_config()?;
        ferry_cni::args::validate_ifname(&w.bridge)
            .map_err(|e| CniError::invalid_config(format!("invalid bridge name: {}", e.msg)))?;
        let vlan = vlan_id("vlan", w.vlan, true)?;
        let vlan_trunk = trunk_vlans(w.vlan_trunk.as_deref().unwrap_or_default())?;
        // The reference's rule: a port is either an access port or a trunk.
        if vlan != 0 && !vlan_trunk.is_empty() {
            return Err(CniError::invalid_config(
                "cannot set vlan and vlanTrunk at the same time",
            ));
        }
        let is_gateway = w.is_gateway || w.is_default_gateway;
        if vlan != 0 && is_gateway {
            // The gateway of a VLAN lives on "<bridge>.<vlan>" (reference
            // behaviour), which must be a valid interface name too.
            ferry_cni::args::validate_ifname(&vlan_gateway_name(&w.bridge, vlan)).map_err(|e| {
                CniError::invalid_config(format!(
                    "bridge {:?} is too long for the VLAN gateway interface {:?}: {}",
                    w.bridge,
                    vlan_gateway_name(&w.bridge, vlan),
                    e.msg
                ))
            })?;
        }
        if w.mtu != 0 && !(68..=65535).contains(&w.mtu) {
            return Err(CniError::invalid_config(format!("invalid mtu {}", w.mtu)));
        }
        args.args.check_known(&[
            "IP",
            "MAC",
            "K8S_POD_NAMESPACE",
            "K8S_POD_NAME",
            "K8S_POD_INFRA_CONTAINER_ID",
            "K8S_POD_UID",
        ])?;
        // "ips" is the IPAM plugin's, which gets this configuration whole.
        conf.warn_unknown_runtime_config(&["mac", "ips"]);
        let mac_text = conf
            .runtime("mac")
            .filter(|_| conf.has_capability("mac") || !conf.capabilities.contains_key("mac"))
            .and_then(|v| v.as_str().map(str::to_string))
            .or_else(|| args.args.get("MAC").map(str::to_string));
        let mac = match mac_text {
            Some(t) => Some(parse_mac(&t)?),
            None => None,
        };
        Ok(BridgeConf {
            network: conf.name.clone(),
            bridge: w.bridge,
            is_gateway,
            is_default_gateway: w.is_default_gateway,
            force_address: w.force_address,
            ip_masq: w.ip_masq,
            ip_masq_exclude: w
                .ip_masq_exclude
                .iter()
                .map(|n| ipnetwork::IpNetwork::new(n.network(), n.prefix()).expect("same prefix"))
                .collect(),
            mtu: if w.mtu == 0 { DEFAULT_MTU } else { w.mtu },
            hairpin_mode: w.hairpin_mode,
            promisc_mode: w.promisc_mode,
            enable_dad: w.enabledad,
            vlan,
            vlan_trunk,
            preserve_default_vlan: w.preserve_default_vlan,
            macspoofchk: w.macspoofchk,
            mac,
        })
    }
}

/// `readinessFile`: where ferryd publishes whether the node is ready (the
/// conflist ferryd writes names it). STATUS reads it; a config without it
/// (written by hand, no ferryd) keeps STATUS as it was. Only this key is
/// parsed for STATUS, so a STATUS never fails on the rest of the config.
pub fn readiness_file(conf: &NetConf) -> Result<Option<std::path::PathBuf>, CniError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct StatusWire {
        #[serde(default)]
        readiness_file: Option<String>,
    }
    let w: StatusWire = conf.plugin_config()?;
    w.readiness_file
        .as_deref()
        .map(crate::readiness::validate_path)
        .transpose()
}

/// The interface carrying the gateway address of VLAN `vlan` on `bridge`.
pub fn vlan_gateway_name(bridge: &str, vlan: u16) -> String {
    format!("{bridge}.{vlan}")
}

/// A VLAN ID of key `key`: 1..=4094, or 0 (none) when `zero_ok`. Anything
/// else is the spec's code 2 (a value of a field this plugin cannot use),
/// with the key and the value in the message.
fn vlan_id(key: &str, v: i64, zero_ok: bool) -> Result<u16, CniError> {
    match v {
        0 if zero_ok => Ok(0),
        1..=4094 => Ok(v as u16),
        _ => Err(CniError::new(
            ErrorCode::UnsupportedField,
            format!(
                "invalid {key} {v}: VLAN IDs are 1 to 4094{}",
                if zero_ok { " (0 = no VLAN)" } else { "" }
            ),
        )),
    }
}

/// The reference's `vlanTrunk` semantics: each item adds `minID..=maxID`
/// (both or neither) and/or `id`.
fn trunk_vlans(items: &[TrunkWire]) -> Result<Vec<u16>, CniError> {
    let mut out = std::collections::BTreeSet::new();
    for item in items {
        match (item.min_id, item.max_id) {
            (Some(lo), Some(hi)) => {
                let (lo, hi) = (
                    vlan_id("vlanTrunk minID", lo, false)?,
                    vlan_id("vlanTrunk maxID", hi, false)?,
                );
                if hi < lo {
                    return Err(CniError::invalid_config(format!(
                        "vlanTrunk minID {lo} is greater than maxID {hi}"
                    )));
                }
                out.extend(lo..=hi);
            }
            (None, None) => {}
            _ => {
                return Err(CniError::invalid_config(
                    "vlanTrunk minID and maxID must be set together",
                ));
            }
        }
        if let Some(id) = item.id {
            out.insert(vlan_id("vlanTrunk id", id, false)?);
        }
    }
    Ok(out.into_iter().collect())
}

/// `aa:bb:cc:dd:ee:ff`; a multicast address is refused (the kernel would too).
pub fn parse_mac(s: &str) -> Result<[u8; 6], CniError> {
    let bad = || CniError::invalid_config(format!("invalid MAC address {s:?}"));
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || out[0] & 1 == 1 {
        return Err(bad());
    }
    Ok(out)
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The gateway for a pod address when IPAM gave none: the subnet's first host.
pub fn first_host(net: ipnetwork::IpNetwork) -> IpAddr {
    match net.network() {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_cni::{CniArgs, Command, SpecVersion};
    use serde_json::{Value, json};

    fn args(cni_args: &str) -> CmdArgs {
        CmdArgs {
            command: Command::Add,
            container_id: "c1".into(),
            netns: None,
            ifname: "eth0".into(),
            args: CniArgs::parse(cni_args).unwrap(),
            raw_args: cni_args.into(),
            path: vec![],
            version: SpecVersion::V1_1_0,
        }
    }

    fn load(extra: Value, cni_args: &str) -> Result<BridgeConf, CniError> {
        let mut v = json!({"cniVersion": "1.1.0", "name": "pods", "type": "ferry-bridge", "ipam": {"type": "ferry-ipam"}});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        BridgeConf::load(&NetConf::from_value(v).unwrap(), &args(cni_args))
    }

    #[test]
    fn defaults_like_the_reference() {
        let c = load(json!({}), "").unwrap();
        assert_eq!(c.bridge, "cni0");
        assert_eq!(c.mtu, 1500);
        assert!(!c.is_gateway && !c.ip_masq && !c.hairpin_mode && !c.enable_dad);
        assert_eq!(c.mac, None);
        assert_eq!((c.vlan, c.vlan_trunk.len()), (0, 0));
        assert!(c.preserve_default_vlan && !c.macspoofchk);
    }

    #[test]
    fn vlan_options() {
        let c = load(
            json!({"vlan": 100, "preserveDefaultVlan": false, "macspoofchk": true}),
            "",
        )
        .unwrap();
        assert_eq!(c.vlan, 100);
        assert!(!c.preserve_default_vlan && c.macspoofchk);
        let c = load(
            json!({"vlanTrunk": [{"minID": 10, "maxID": 12}, {"id": 11}, {"id": 4094}]}),
            "",
        )
        .unwrap();
        assert_eq!(c.vlan_trunk, vec![10, 11, 12, 4094]);
        assert_eq!(c.vlan, 0);
        // 15 characters: "br-pods12.4094" fits, a longer bridge does not.
        load(
            json!({"bridge": "br-pods12", "vlan": 4094, "isGateway": true}),
            "",
        )
        .unwrap();
        load(json!({"bridge": "br-pods1234", "vlan": 4094}), "").unwrap();
    }

    #[test]
    fn options_table() {
        let c = load(
            json!({"bridge": "br-pods", "isDefaultGateway": true, "ipMasq": true, "mtu": 1450,
                   "hairpinMode": true, "promiscMode": true, "forceAddress": true, "enabledad": true}),
            "",
        )
        .unwrap();
        assert_eq!(c.bridge, "br-pods");
        assert!(
            c.is_gateway && c.is_default_gateway && c.ip_masq && c.hairpin_mode && c.promisc_mode
        );
        assert!(c.force_address && c.enable_dad);
        assert_eq!(c.mtu, 1450);
    }

    #[test]
    fn mac_sources() {
        let c = load(
            json!({"capabilities": {"mac": true}, "runtimeConfig": {"mac": "0a:58:0a:01:00:05"}}),
            "",
        )
        .unwrap();
        assert_eq!(c.mac, Some([0x0a, 0x58, 0x0a, 0x01, 0x00, 0x05]));
        let c = load(json!({}), "MAC=02:00:00:00:00:09").unwrap();
        assert_eq!(c.mac.unwrap()[5], 9);
    }

    #[test]
    fn refusals() {
        let cases = [
            (json!({"vlan": 4095}), "", 2),
            (json!({"vlan": -1}), "", 2),
            (json!({"vlan": "100"}), "", 7),
            (json!({"vlanTrunk": [{"id": 0}]}), "", 2),
            (json!({"vlanTrunk": [{"minID": 5, "maxID": 5000}]}), "", 2),
            (json!({"vlanTrunk": [{"minID": 9, "maxID": 5}]}), "", 7),
            (json!({"vlanTrunk": [{"minID": 9}]}), "", 7),
            (json!({"vlan": 5, "vlanTrunk": [{"id": 6}]}), "", 7),
            (
                json!({"bridge": "br-pods1234", "vlan": 4094, "isGateway": true}),
                "",
                7,
            ),
            (json!({"mtu": 20}), "", 7),
            (json!({"bridge": "way-too-long-bridge-name"}), "", 7),
            (json!({"bridge": 5}), "", 7),
            (json!({}), "MAC=01:00:00:00:00:01", 7),
            (json!({}), "MAC=zz", 7),
            (json!({}), "BOGUS=1", 2),
        ];
        for (extra, a, code) in cases {
            let e = load(extra.clone(), a).unwrap_err();
            assert_eq!(e.code.as_u32(), code, "{extra} {a}: {e}");
        }
        load(json!({}), "IgnoreUnknown=1;BOGUS=1").unwrap();
    }

    #[test]
    fn helpers() {
        assert_eq!(format_mac(&[0x0a, 0, 0xff, 1, 2, 3]), "0a:00:ff:01:02:03");
        assert_eq!(
            first_host("10.1.2.7/24".parse().unwrap()).to_string(),
            "10.1.2.1"
        );
        assert_eq!(
            first_host("fd00::7/64".parse().unwrap()).to_string(),
            "fd00::1"
        );
    }
}
