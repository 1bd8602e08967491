//! The portmap configuration: the reference `portmap` plugin's keys, and the
//! `portMappings` capability the runtime fills in `runtimeConfig`.

use ferry_cni::{CniError, ErrorCode, NetConf, keys};
use serde::Deserialize;
use serde_json::Value;
use std::net::IpAddr;

/// The reference's default mark bit (Kubernetes uses 14 and 15, Calico 20-31).
pub const DEFAULT_MARK_BIT: u8 = 13;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    #[serde(default)]
    snat: Option<bool>,
    #[serde(default)]
    masq_all: bool,
    /// Signed so that a negative bit gets the same clear refusal as 32.
    #[serde(default)]
    mark_masq_bit: Option<i64>,
    #[serde(default)]
    external_set_mark_chain: Option<String>,
    #[serde(default, rename = "conditionsV4")]
    conditions_v4: Option<Vec<String>>,
    #[serde(default, rename = "conditionsV6")]
    conditions_v6: Option<Vec<String>>,
    /// Newer reference plugins choose between "iptables" and "nftables".
    #[serde(default)]
    backend: Option<String>,
}

/// The keys of a `portMappings` entry, as the CNI conventions spell them;
/// containerd's go-cni sends `HostPort`, `ContainerPort`, `Protocol`,
/// `HostIP` (matched ignoring case, see [`ferry_cni::keys`]).
const MAPPING_KEYS: [&str; 4] = ["hostPort", "containerPort", "protocol", "hostIP"];

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MappingWire {
    host_port: i64,
    container_port: i64,
    #[serde(default)]
    protocol: String,
    #[serde(default, rename = "hostIP")]
    host_ip: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// The nft keyword (also the name in errors).
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }

    /// The IP protocol number (`inet_proto` set keys).
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }
}

/// One `portMappings` entry, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mapping {
    pub proto: Proto,
    pub host_port: u16,
    /// `None`: every address of the host (an empty, `0.0.0.0` or `::` hostIP).
    pub host_ip: Option<IpAddr>,
    /// For an unspecified hostIP (`0.0.0.0` / `::`): only that family.
    pub only_family_v4: Option<bool>,
    pub container_port: u16,
}

impl Mapping {
    /// Whether this mapping applies to a pod address of this family.
    pub fn applies_to(&self, v4: bool) -> bool {
        match (self.host_ip, self.only_family_v4) {
            (Some(ip), _) => ip.is_ipv4() == v4,
            (None, Some(f)) => f == v4,
            (None, None) => true,
        }
    }

    /// `8080/tcp` or `10.0.0.1:8080/tcp`, for messages.
    pub fn describe(&self) -> String {
        match self.host_ip {
            Some(IpAddr::V6(ip)) => format!("[{ip}]:{}/{}", self.host_port, self.proto.name()),
            Some(ip) => format!("{ip}:{}/{}", self.host_port, self.proto.name()),
            None => format!("{}/{}", self.host_port, self.proto.name()),
        }
    }
}

/// The effective configuration of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortmapConf {
    /// Masquerade hairpin, pod-to-pod-via-hostPort and localhost traffic.
    pub snat: bool,
    /// Masquerade every DNATed connection, whatever its source.
    pub masq_all: bool,
    pub mark_bit: u8,
    /// Sorted, without duplicates.
    pub mappings: Vec<Mapping>,
}

impl PortmapConf {
    pub fn load(conf: &NetConf) -> Result<PortmapConf, CniError> {
        let w: Wire = conf.plugin_config()?;
        let unsupported = |msg: String| CniError::new(ErrorCode::UnsupportedField, msg);
        if w.mark_masq_bit.is_some() && w.external_set_mark_chain.is_some() {
            return Err(CniError::invalid_config(
                "cannot specify externalSetMarkChain and markMasqBit",
            ));
        }
        if let Some(chain) = &w.external_set_mark_chain {
            return Err(unsupported(format!(
                "externalSetMarkChain ({chain:?}) names an iptables chain; ferry-portmap uses \
                 nftables only and sets its own mark (markMasqBit): remove the key"
            )));
        }
        for (key, c) in [
            ("conditionsV4", &w.conditions_v4),
            ("conditionsV6", &w.conditions_v6),
        ] {
            if c.as_ref().is_some_and(|c| !c.is_empty()) {
                return Err(unsupported(format!(
                    "{key} is not supported by ferry-portmap (the hostPort chains are shared by \
                     every pod of the node)"
                )));
            }
        }
        if let Some(b) = w.backend.as_deref()
            && b != "nftables"
        {
            return Err(unsupported(format!(
                "backend {b:?}: ferry-portmap only has the nftables backend"
            )));
        }
        let mark_bit = match w.mark_masq_bit {
            None => DEFAULT_MARK_BIT,
            Some(b @ 0..=31) => b as u8,
            Some(b) => {
                return Err(CniError::invalid_config(format!(
                    "markMasqBit must be between 0 and 31, not {b}"
                )));
            }
        };
        conf.warn_unknown_runtime_config(&["portMappings"]);
        let mut mappings = runtime_mappings(conf)?
            .iter()
            .map(mapping)
            .collect::<Result<Vec<_>, _>>()?;
        mappings.sort();
        mappings.dedup();
        // One key, two targets: the runtime contradicts itself.
        for pair in mappings.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if (a.proto, a.host_port, a.host_ip, a.only_family_v4)
                == (b.proto, b.host_port, b.host_ip, b.only_family_v4)
            {
                return Err(CniError::invalid_config(format!(
                    "hostPort {} is mapped twice (container ports {} and {})",
                    a.describe(),
                    a.container_port,
                    b.container_port
                )));
            }
        }
        Ok(PortmapConf {
            snat: w.snat.unwrap_or(true),
            masq_all: w.masq_all,
            mark_bit,
            mappings,
        })
    }

    pub fn mark(&self) -> u32 {
        1 << self.mark_bit
    }
}

/// `runtimeConfig.portMappings`, each entry's keys matched ignoring case.
fn runtime_mappings(conf: &NetConf) -> Result<Vec<MappingWire>, CniError> {
    let entries = match conf.runtime("portMappings") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(entries)) => entries,
        Some(other) => {
            return Err(CniError::invalid_config(format!(
                "runtimeConfig.portMappings must be a list, got {other}"
            )));
        }
    };
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let what = format!("runtimeConfig.portMappings[{i}]");
            let Value::Object(obj) = entry else {
                return Err(CniError::invalid_config(format!(
                    "{what} must be an object, got {entry}"
                )));
            };
            let obj = keys::fold_keys(obj, &MAPPING_KEYS, &what)?;
            serde_json::from_value(Value::Object(obj))
                .map_err(|e| CniError::invalid_config(format!("invalid {what}")).with_details(e))
        })
        .collect()
}

fn mapping(w: &MappingWire) -> Result<Mapping, CniError> {
    let port = |what: &str, p: i64| -> Result<u16, CniError> {
        match u16::try_from(p) {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(CniError::invalid_config(format!(
                "invalid {what} port number: {p}"
            ))),
        }
    };
    let proto = match w.protocol.to_ascii_lowercase().as_str() {
        "" | "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "sctp" => Proto::Sctp,
        other => {
            return Err(CniError::invalid_config(format!(
                "unknown protocol {other:?} in portMappings (tcp, udp or sctp)"
            )));
        }
    };
    let (host_ip, only_family_v4) = if w.host_ip.is_empty() {
        (None, None)
    } else {
        let ip: IpAddr = w.host_ip.parse().map_err(|_| {
            CniError::invalid_config(format!("invalid hostIP {:?} in portMappings", w.host_ip))
        })?;
        if ip.is_unspecified() {
            (None, Some(ip.is_ipv4()))
        } else {
            (Some(ip), None)
        }
    };
    Ok(Mapping {
        proto,
        host_port: port("host", w.host_port)?,
        host_ip,
        only_family_v4,
        container_port: port("container", w.container_port)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn load(extra: Value, mappings: Value) -> Result<PortmapConf, CniError> {
        let mut c = json!({"cniVersion": "1.0.0", "name": "n", "type": "ferry-portmap",
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": mappings}});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        PortmapConf::load(&NetConf::from_value(c).unwrap())
    }

    #[test]
    fn defaults_and_mappings() {
        let c = load(
            json!({}),
            json!([
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                {"hostPort": 8080, "containerPort": 80, "protocol": "TCP"},
                {"hostPort": 53, "containerPort": 5353, "protocol": "udp", "hostIP": "10.0.0.1"},
                {"hostPort": 9, "containerPort": 9, "hostIP": "::"},
            ]),
        )
        .unwrap();
        assert!(c.snat && !c.masq_all);
        assert_eq!(c.mark(), 0x2000);
        assert_eq!(c.mappings.len(), 3, "the duplicate is dropped: {c:?}");
        let udp = c.mappings.iter().find(|m| m.proto == Proto::Udp).unwrap();
        assert_eq!(udp.describe(), "10.0.0.1:53/udp");
        assert!(udp.applies_to(true) && !udp.applies_to(false));
        let any6 = c.mappings.iter().find(|m| m.host_port == 9).unwrap();
        assert_eq!((any6.host_ip, any6.proto), (None, Proto::Tcp));
        assert!(any6.applies_to(false) && !any6.applies_to(true));
        let c = load(json!({"snat": false, "markMasqBit": 5}), json!([])).unwrap();
        assert!(!c.snat && c.mappings.is_empty() && c.mark() == 32);
        assert!(
            load(
                json!({"conditionsV4": [], "backend": "nftables"}),
                json!(null)
            )
            .is_ok()
        );
    }

    /// What containerd's CRI plugin (go-cni) sends for a pod's hostPort.
    #[test]
    fn containerd_cri_payload() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"ferry-portmap",
                "capabilities":{"portMappings":true},
                "runtimeConfig":{"portMappings":[
                    {"HostPort":38180,"ContainerPort":80,"Protocol":"tcp","HostIP":""},
                    {"HostPort":5353,"ContainerPort":53,"Protocol":"UDP","HostIP":"10.0.0.1"}]}}"#,
        )
        .unwrap();
        let c = PortmapConf::load(&c).unwrap();
        assert_eq!(
            c.mappings.iter().map(Mapping::describe).collect::<Vec<_>>(),
            ["38180/tcp", "10.0.0.1:5353/udp"]
        );
        assert_eq!(c.mappings[0].container_port, 80);
        assert_eq!(c.mappings[1].container_port, 53);
        // The capability's own key as another runtime might spell it.
        let c = load_raw(json!({"PortMappings": [{"hostport": 1, "containerport": 2}]})).unwrap();
        assert_eq!(c.mappings.len(), 1);
    }

    /// A mapping key ferry does not know, or one given twice in two
    /// spellings, is refused rather than skipped; wrong types stay wrong.
    #[test]
    fn folded_keys_stay_strict() {
        for (mappings, want) in [
            (
                json!([{"HostPort": 80, "ContainerPort": 80, "Range": 10}]),
                "\"Range\"",
            ),
            (
                json!([{"HostPort": 80, "hostPort": 81, "ContainerPort": 80}]),
                "twice",
            ),
            (
                json!([{"HostPort": "80", "ContainerPort": 80}]),
                "portMappings[0]",
            ),
            (
                json!([{"HostPort": 80, "ContainerPort": 80, "Protocol": 6}]),
                "portMappings[0]",
            ),
            (json!([{"ContainerPort": 80}]), "hostPort"),
            (json!([7]), "must be an object"),
            (json!({"HostPort": 80}), "must be a list"),
        ] {
            let e = load(json!({}), mappings.clone()).unwrap_err();
            assert_eq!(e.code.as_u32(), 7, "{mappings}: {e}");
            assert!(
                format!("{} {}", e.msg, e.details).contains(want),
                "{mappings}: {e:?} should mention {want}"
            );
        }
    }

    fn load_raw(runtime_config: Value) -> Result<PortmapConf, CniError> {
        let c = json!({"cniVersion": "1.0.0", "name": "n", "type": "ferry-portmap",
            "capabilities": {"portMappings": true}, "runtimeConfig": runtime_config});
        PortmapConf::load(&NetConf::from_value(c).unwrap())
    }

    #[test]
    fn refusals() {
        let m = |v: Value| json!([v]);
        let ok = json!([{"hostPort": 1, "containerPort": 1}]);
        let cases = [
            (json!({}), m(json!({"hostPort": 0, "containerPort": 80})), 7),
            (
                json!({}),
                m(json!({"hostPort": 65536, "containerPort": 80})),
                7,
            ),
            (
                json!({}),
                m(json!({"hostPort": 80, "containerPort": -1})),
                7,
            ),
            (
                json!({}),
                m(json!({"hostPort": "80", "containerPort": 80})),
                7,
            ),
            (json!({}), m(json!({"containerPort": 80})), 7),
            (
                json!({}),
                m(json!({"hostPort": 80, "containerPort": 80, "protocol": "icmp"})),
                7,
            ),
            (
                json!({}),
                m(json!({"hostPort": 80, "containerPort": 80, "hostIP": "nope"})),
                7,
            ),
            (
                json!({}),
                json!([{"hostPort": 80, "containerPort": 80}, {"hostPort": 80, "containerPort": 81}]),
                7,
            ),
            (json!({}), json!({"hostPort": 80}), 7),
            (json!({"markMasqBit": 32}), ok.clone(), 7),
            (json!({"markMasqBit": -1}), ok.clone(), 7),
            (json!({"snat": "yes"}), ok.clone(), 7),
            (
                json!({"markMasqBit": 3, "externalSetMarkChain": "KUBE-MARK-MASQ"}),
                ok.clone(),
                7,
            ),
            (
                json!({"externalSetMarkChain": "KUBE-MARK-MASQ"}),
                ok.clone(),
                2,
            ),
            (json!({"conditionsV4": ["-s", "1.2.3.4"]}), ok.clone(), 2),
            (json!({"conditionsV6": ["ip6 saddr ::1"]}), ok.clone(), 2),
            (json!({"backend": "iptables"}), ok.clone(), 2),
        ];
        for (extra, mappings, code) in cases {
            let e = load(extra.clone(), mappings.clone()).unwrap_err();
            assert_eq!(e.code.as_u32(), code, "{extra} {mappings}: {e}");
        }
    }
}
