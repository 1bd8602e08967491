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
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    hairpin_mode: bool,
    #[serde(default)]
    promisc_mode: bool,
    #[serde(default)]
    vlan: u32,
    #[serde(default)]
    macspoofchk: bool,
    #[serde(default)]
    enabledad: bool,
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
    pub mtu: u32,
    pub hairpin_mode: bool,
    pub promisc_mode: bool,
    pub enable_dad: bool,
    /// The pod interface's MAC from runtimeConfig `mac` or `MAC=` in CNI_ARGS.
    pub mac: Option<[u8; 6]>,
}

pub const DEFAULT_MTU: u32 = 1500;

impl BridgeConf {
    pub fn load(conf: &NetConf, args: &CmdArgs) -> Result<BridgeConf, CniError> {
        let w: Wire = conf.plugin_config()?;
        ferry_cni::args::validate_ifname(&w.bridge)
            .map_err(|e| CniError::invalid_config(format!("invalid bridge name: {}", e.msg)))?;
        // Refused rather than ignored: silently skipping a VLAN or an
        // anti-spoofing rule would leave pods less isolated than configured.
        if w.vlan != 0 {
            return Err(CniError::new(
                ErrorCode::UnsupportedField,
                "\"vlan\" is not supported yet by ferry-bridge",
            ));
        }
        if w.macspoofchk {
            return Err(CniError::new(
                ErrorCode::UnsupportedField,
                "\"macspoofchk\" is not supported yet by ferry-bridge",
            ));
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
        let mac_text = conf
            .runtime_config
            .get("mac")
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
            is_gateway: w.is_gateway || w.is_default_gateway,
            is_default_gateway: w.is_default_gateway,
            force_address: w.force_address,
            ip_masq: w.ip_masq,
            mtu: if w.mtu == 0 { DEFAULT_MTU } else { w.mtu },
            hairpin_mode: w.hairpin_mode,
            promisc_mode: w.promisc_mode,
            enable_dad: w.enabledad,
            mac,
        })
    }
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
            (json!({"vlan": 100}), "", 2),
            (json!({"macspoofchk": true}), "", 2),
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
