//! Network configuration (what a plugin reads on stdin) and network
//! configuration lists (the conflist files a runtime reads from
//! /etc/cni/net.d and turns into one configuration per plugin).

use crate::error::CniError;
use crate::result::Dns;
use crate::version::{SpecVersion, compare_versions};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Keys the spec defines; everything else belongs to the plugin.
const SPEC_KEYS: &[&str] = &[
    "cniVersion",
    "cniVersions",
    "name",
    "type",
    "ipam",
    "dns",
    "capabilities",
    "runtimeConfig",
    "args",
    "prevResult",
    "disableCheck",
    "disableGC",
    "cni.dev/valid-attachments",
    "cni.dev/attachments",
];

/// One plugin's network configuration, as received on stdin.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    /// The `ipam` object, kept whole for the IPAM plugin; `None` when absent.
    pub ipam: Option<Map<String, Value>>,
    pub dns: Dns,
    /// Capabilities the plugin declared in the conflist (`{"portMappings": true}`).
    pub capabilities: Map<String, Value>,
    /// What the runtime passes for those capabilities.
    pub runtime_config: Map<String, Value>,
    /// The conventional `args` object (e.g. `{"cni": {"ips": [...]}}`).
    pub args: Map<String, Value>,
    /// The previous plugin's result in a chain, in this config's version.
    pub prev_result: Option<Value>,
    pub disable_check: bool,
    pub disable_gc: bool,
    /// GC only: the attachments the runtime still considers valid.
    pub valid_attachments: Option<Vec<Attachment>>,
    /// Plugin-specific keys, in input order.
    pub plugin: Map<String, Value>,
    /// The configuration exactly as received, for delegation.
    raw: Value,
}

/// A container attachment named by GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    /// Parses stdin. Malformed JSON and wrongly typed spec fields are code 6;
    /// a missing `name` or `type` is code 7. `cniVersion` is not checked here
    /// (the skeleton negotiates it, and VERSION must work without it).
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        Self::from_parsed(serde_json::from_slice(bytes))
    }

    /// [`NetConf::parse`] for stdin the caller has already decoded (the
    /// skeleton reads the call log's target from the same value).
    pub fn from_parsed(parsed: serde_json::Result<Value>) -> Result<NetConf, CniError> {
        let raw = parsed.map_err(|e| {
            CniError::decoding("error unmarshalling network config").with_details(e)
        })?;
        Self::from_value(raw)
    }

    pub fn from_value(raw: Value) -> Result<NetConf, CniError> {
        let Value::Object(obj) = &raw else {
            return Err(CniError::decoding("network config is not a JSON object"));
        };
        let valid_attachments = match obj.get("cni.dev/valid-attachments") {
            Some(v) => Some(field::<Vec<Attachment>>(v, "cni.dev/valid-attachments")?),
            None => match obj.get("cni.dev/attachments") {
                Some(v) => Some(field::<Vec<Attachment>>(v, "cni.dev/attachments")?),
                None => None,
            },
        };
        let conf = NetConf {
            cni_version: opt_field(obj, "cniVersion")?.unwrap_or_default(),
            name: opt_field(obj, "name")?.unwrap_or_default(),
            plugin_type: opt_field(obj, "type")?.unwrap_or_default(),
            ipam: opt_field(obj, "ipam")?,
            dns: opt_field(obj, "dns")?.unwrap_or_default(),
            capabilities: opt_field(obj, "capabilities")?.unwrap_or_default(),
            runtime_config: opt_field(obj, "runtimeConfig")?.unwrap_or_default(),
            args: opt_field(obj, "args")?.unwrap_or_default(),
            prev_result: obj.get("prevResult").filter(|v| !v.is_null()).cloned(),
            disable_check: opt_field(obj, "disableCheck")?.unwrap_or(false),
            disable_gc: opt_field(obj, "disableGC")?.unwrap_or(false),
            valid_attachments,
            plugin: obj
                .iter()
                .filter(|(k, _)| !SPEC_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            raw: raw.clone(),
        };
        if let Some(ipam) = &conf.ipam {
            match ipam.get("type") {
                Some(Value::String(t)) if !t.is_empty() => crate::args::validate_plugin_type(t)?,
                _ => return Err(CniError::invalid_config("ipam is missing its \"type\"")),
            }
        }
        Ok(conf)
    }

    /// Checks what every plugin needs beyond well-formed JSON.
    pub fn validate(&self) -> Result<(), CniError> {
        if self.name.is_empty() {
            return Err(CniError::invalid_config("network config has no \"name\""));
        }
        if self.plugin_type.is_empty() {
            return Err(CniError::invalid_config("network config has no \"type\""));
        }
        crate::args::validate_network_name(&self.name)?;
        Ok(())
    }

    /// The configuration as received (the stdin of a delegated plugin).
    pub fn raw(&self) -> &Value {
        &self.raw
    }

    /// Decodes the whole configuration into a plugin's own type (unknown keys
    /// are ignored by serde unless the type forbids them).
    pub fn plugin_config<T: DeserializeOwned>(&self) -> Result<T, CniError> {
        serde_json::from_value(self.raw.clone()).map_err(|e| {
            CniError::invalid_config(format!("invalid {} configuration", self.plugin_type))
                .with_details(e)
        })
    }

    /// The `ipam.type`, when there is an `ipam` section.
    pub fn ipam_type(&self) -> Option<&str> {
        self.ipam.as_ref()?.get("type")?.as_str()
    }

    /// What the runtime passes in `runtimeConfig` for capability `name`, its
    /// key matched as libcni's Go callers match it (see [`crate::keys`]).
    pub fn runtime(&self, name: &str) -> Option<&Value> {
        crate::keys::get_folded(&self.runtime_config, name)
    }

    /// A line on stderr (which runtimes log) for each `runtimeConfig` key
    /// outside `known`: a capability the conflist declares for `plugin` that
    /// it does not implement is never dropped without a word.
    pub fn warn_unknown_runtime_config(&self, known: &[&str]) {
        for key in crate::keys::unknown_keys(&self.runtime_config, known) {
            eprintln!(
                "{}: warning: runtimeConfig.{key} is ignored (the plugin does not implement \
                 that capability; it implements: {})",
                self.plugin_type,
                known.join(", ")
            );
        }
    }

    /// Whether a capability declared in the conflist is on.
    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities.get(name).and_then(Value::as_bool) == Some(true)
    }
}

fn field<T: DeserializeOwned>(v: &Value, key: &str) -> Result<T, CniError> {
    serde_json::from_value(v.clone()).map_err(|e| {
        CniError::decoding(format!("invalid \"{key}\" in network config")).with_details(e)
    })
}

fn opt_field<T: DeserializeOwned>(
    obj: &Map<String, Value>,
    key: &str,
) -> Result<Option<T>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => field(v, key).map(Some),
    }
}

/// A network configuration list (`.conflist`).
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfList {
    pub cni_version: String,
    pub cni_versions: Vec<String>,
    pub name: String,
    pub disable_check: bool,
    pub disable_gc: bool,
    pub plugins: Vec<Map<String, Value>>,
}

impl NetConfList {
    pub fn parse(bytes: &[u8]) -> Result<NetConfList, CniError> {
        let raw: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::decoding("error unmarshalling network config list").with_details(e)
        })?;
        let Value::Object(obj) = &raw else {
            return Err(CniError::decoding(
                "network config list is not a JSON object",
            ));
        };
        let list = NetConfList {
            cni_version: opt_field(obj, "cniVersion")?.unwrap_or_default(),
            cni_versions: opt_field(obj, "cniVersions")?.unwrap_or_default(),
            name: opt_field(obj, "name")?.unwrap_or_default(),
            disable_check: opt_field(obj, "disableCheck")?.unwrap_or(false),
            disable_gc: opt_field(obj, "disableGC")?.unwrap_or(false),
            plugins: opt_field(obj, "plugins")?.unwrap_or_default(),
        };
        if list.name.is_empty() {
            return Err(CniError::invalid_config(
                "network config list has no \"name\"",
            ));
        }
        crate::args::validate_network_name(&list.name)?;
        if list.plugins.is_empty() {
            return Err(CniError::invalid_config(format!(
                "network config list {:?} has no plugins",
                list.name
            )));
        }
        for (i, p) in list.plugins.iter().enumerate() {
            match p.get("type") {
                Some(Value::String(t)) if !t.is_empty() => crate::args::validate_plugin_type(t)?,
                _ => {
                    return Err(CniError::invalid_config(format!(
                        "plugin {i} of network {:?} has no \"type\"",
                        list.name
                    )));
                }
            }
        }
        Ok(list)
    }

    /// The version a runtime uses with this list: the highest entry of
    /// `cniVersions` that ferry speaks, else `cniVersion`.
    pub fn negotiated_version(&self) -> Result<SpecVersion, CniError> {
        let best = self
            .cni_versions
            .iter()
            .filter(|v| SpecVersion::parse(v).is_some())
            .max_by(|a, b| compare_versions(a, b).unwrap_or(std::cmp::Ordering::Equal));
        SpecVersion::negotiate(best.unwrap_or(&self.cni_version))
    }

    /// The stdin for plugin `index` of the chain, as a runtime builds it:
    /// the list's name and version injected, `runtimeConfig` holding only the
    /// capabilities the plugin declared, and the previous result (ADD, CHECK, DEL).
    pub fn plugin_config(
        &self,
        index: usize,
        version: SpecVersion,
        runtime_config: &Map<String, Value>,
        prev_result: Option<&Value>,
    ) -> Value {
        let mut conf = self.plugins[index].clone();
        conf.insert("cniVersion".into(), Value::String(version.as_str().into()));
        conf.insert("name".into(), Value::String(self.name.clone()));
        let caps: Vec<&String> = conf
            .get("capabilities")
            .and_then(Value::as_object)
            .map(|c| {
                c.iter()
                    .filter(|(_, on)| on.as_bool() == Some(true))
                    .map(|(k, _)| k)
                    .collect()
            })
            .unwrap_or_default();
        let rc: Map<String, Value> = runtime_config
            .iter()
            .filter(|(k, _)| caps.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        if let Some(prev) = prev_result {
            conf.insert("prevResult".into(), prev.clone());
        }
        Value::Object(conf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NetConf, CniError> {
        NetConf::parse(v.to_string().as_bytes())
    }

    #[test]
    fn full_config_parses() {
        let c = parse(json!({
            "cniVersion": "1.1.0",
            "name": "pods",
            "type": "ferry-bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipam": {"type": "ferry-ipam", "subnet": "10.1.0.0/24"},
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
            "capabilities": {"portMappings": true, "ips": false},
            "runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 8080}]},
            "args": {"cni": {"ips": ["10.1.0.9"]}},
            "prevResult": {"cniVersion": "1.1.0", "ips": []},
            "disableCheck": true,
            "disableGC": false,
            "cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0"}],
        }))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.cni_version, "1.1.0");
        assert_eq!(c.plugin_type, "ferry-bridge");
        assert_eq!(c.ipam_type(), Some("ferry-ipam"));
        assert_eq!(c.dns.search, vec!["svc.cluster.local"]);
        assert!(c.has_capability("portMappings"));
        assert!(!c.has_capability("ips"));
        assert!(c.runtime_config.contains_key("portMappings"));
        assert!(c.prev_result.is_some());
        assert!(c.disable_check);
        assert_eq!(
            c.valid_attachments.unwrap(),
            vec![Attachment {
                container_id: "abc".into(),
                ifname: "eth0".into()
            }]
        );
        assert_eq!(
            c.plugin.keys().collect::<Vec<_>>(),
            vec!["bridge", "isGateway"]
        );
    }

    #[test]
    fn older_attachments_key() {
        let c = parse(json!({"cniVersion": "1.1.0", "name": "n", "type": "t",
            "cni.dev/attachments": [{"containerID": "a", "ifname": "eth1"}]}))
        .unwrap();
        assert_eq!(c.valid_attachments.unwrap()[0].ifname, "eth1");
    }

    #[test]
    fn error_table() {
        // (input, expected code)
        let cases: Vec<(&[u8], u32)> =
            vec![
            (b"", 6),
            (b"{", 6),
            (b"[]", 6),
            (b"\"x\"", 6),
            (br#"{"name": 5}"#, 6),
            (br#"{"cniVersion": ["1.0.0"]}"#, 6),
            (br#"{"name": "n", "type": "t", "dns": "x"}"#, 6),
            (br#"{"name": "n", "type": "t", "capabilities": []}"#, 6),
            (br#"{"name": "n", "type": "t", "disableCheck": "yes"}"#, 6),
            (br#"{"name": "n", "type": "t", "ipam": {}}"#, 7),
            (br#"{"name": "n", "type": "t", "ipam": {"type": "../../bin/sh"}}"#, 7),
            (br#"{"name": "n", "type": "t", "cni.dev/valid-attachments": [{"ifname": "x"}]}"#, 6),
        ];
        for (input, code) in cases {
            let err = NetConf::parse(input).unwrap_err();
            assert_eq!(
                err.code.as_u32(),
                code,
                "{}: {err}",
                String::from_utf8_lossy(input)
            );
        }
        let validate_cases = [
            (json!({"type": "t"}), 7),
            (json!({"name": "n"}), 7),
            (json!({"name": "a/b", "type": "t"}), 7),
        ];
        for (input, code) in validate_cases {
            let err = parse(input.clone()).unwrap().validate().unwrap_err();
            assert_eq!(err.code.as_u32(), code, "{input}");
        }
    }

    #[test]
    fn plugin_config_typed() {
        #[derive(Deserialize)]
        struct Bridge {
            bridge: String,
            #[serde(rename = "isGateway", default)]
            is_gateway: bool,
        }
        let c = parse(json!({"cniVersion": "1.0.0", "name": "n", "type": "t", "bridge": "br9", "isGateway": true})).unwrap();
        let b: Bridge = c.plugin_config().unwrap();
        assert_eq!(b.bridge, "br9");
        assert!(b.is_gateway);
        let c =
            parse(json!({"cniVersion": "1.0.0", "name": "n", "type": "t", "bridge": 1})).unwrap();
        assert_eq!(c.plugin_config::<Bridge>().err().unwrap().code.as_u32(), 7);
    }

    #[test]
    fn conflist_chain() {
        let l = NetConfList::parse(
            json!({
                "cniVersion": "1.0.0",
                "cniVersions": ["0.4.0", "1.1.0", "2.0.0"],
                "name": "k8s-pod-network",
                "plugins": [
                    {"type": "ferry-bridge", "ipam": {"type": "ferry-ipam"}},
                    {"type": "ferry-portmap", "capabilities": {"portMappings": true}},
                ]
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let v = l.negotiated_version().unwrap();
        assert_eq!(v, SpecVersion::V1_1_0);
        let rc: Map<String, Value> = json!({"portMappings": [{"hostPort": 8080}], "bandwidth": {}})
            .as_object()
            .unwrap()
            .clone();
        let first = l.plugin_config(0, v, &rc, None);
        assert_eq!(first["name"], "k8s-pod-network");
        assert_eq!(first["cniVersion"], "1.1.0");
        assert!(first.get("runtimeConfig").is_none());
        let prev = json!({"cniVersion": "1.1.0"});
        let second = l.plugin_config(1, v, &rc, Some(&prev));
        assert_eq!(
            second["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 8080}]})
        );
        assert_eq!(second["prevResult"], prev);
        let conf = NetConf::from_value(second).unwrap();
        conf.validate().unwrap();
    }

    #[test]
    fn conflist_errors() {
        let cases: Vec<(Value, u32)> = vec![
            (
                json!({"cniVersion": "1.0.0", "plugins": [{"type": "a"}]}),
                7,
            ),
            (json!({"cniVersion": "1.0.0", "name": "n"}), 7),
            (
                json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{}]}),
                7,
            ),
            (
                json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "x/y"}]}),
                7,
            ),
            (
                json!({"cniVersion": "1.0.0", "name": "n", "plugins": {}}),
                6,
            ),
        ];
        for (input, code) in cases {
            let err = NetConfList::parse(input.to_string().as_bytes()).unwrap_err();
            assert_eq!(err.code.as_u32(), code, "{input}");
        }
        let l =
            NetConfList::parse(br#"{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"a"}]}"#)
                .unwrap();
        assert_eq!(l.negotiated_version().unwrap_err().code.as_u32(), 1);
    }
}
