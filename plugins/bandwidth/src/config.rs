//! The bandwidth configuration: the reference plugin's keys, from
//! `runtimeConfig.bandwidth` (the runtime's capability, which wins) or from
//! the plugin configuration itself; rates in bits/s, bursts in bits.
//!
//! The token bucket follows the reference's arithmetic: bytes = bits / 8,
//! and the queue limit is what the rate sends in 25 ms plus the burst.
//!
//! Keys are matched ignoring case (containerd's CRI plugin sends
//! `IngressRate`, `IngressBurst`, …, see [`ferry_cni::keys`]); in
//! `runtimeConfig.bandwidth` a key that names nothing here is refused.
//!
//! A burst of exactly 4294967295 bits is containerd's "no burst given" (it
//! sets it for every `kubernetes.io/*-bandwidth` annotation, which has no
//! burst). Taken literally it is a 512 MiB bucket: the first half gigabyte
//! of every idle period would pass at line rate. It gets [`default_burst`]
//! instead.

use crate::errors;
use ferry_cni::{CniError, NetConf, keys};
use ferry_netops::Tbf;
use ipnetwork::IpNetwork;
use serde_json::{Map, Value};

/// The latency a full queue may add (the reference's `latencyInMillis`).
const LATENCY_MS: u64 = 25;

/// The burst containerd sends when the pod gave none (`math.MaxUint32`).
pub const UNSET_BURST: u64 = u32::MAX as u64;

const KEYS: [&str; 6] = [
    "ingressRate",
    "ingressBurst",
    "egressRate",
    "egressBurst",
    "shapedSubnets",
    "unshapedSubnets",
];

/// What to shape. `None` for a direction means unlimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shaping {
    /// Traffic towards the pod: TBF on the host veth.
    pub ingress: Option<Tbf>,
    /// Traffic from the pod: TBF on the ifb the host veth's ingress is
    /// redirected to.
    pub egress: Option<Tbf>,
}

impl Shaping {
    /// The shaping `conf` asks for; `Ok(None)` when it asks for none (no
    /// bandwidth keys at all, or every rate and burst 0).
    pub fn load(conf: &NetConf) -> Result<Option<Shaping>, CniError> {
        conf.warn_unknown_runtime_config(&["bandwidth"]);
        let entry = match conf.runtime("bandwidth") {
            Some(Value::Object(bw)) => keys::fold_keys(bw, &KEYS, "runtimeConfig.bandwidth")?,
            Some(Value::Null) | None => plugin_keys(&conf.plugin)?,
            Some(other) => {
                return Err(errors::invalid(format!(
                    "runtimeConfig.bandwidth must be an object, got {other}"
                )));
            }
        };
        if entry.is_empty() {
            return Ok(None);
        }
        let ingress = direction(&entry, "ingress")?;
        let egress = direction(&entry, "egress")?;
        subnets(&entry)?;
        if ingress.is_none() && egress.is_none() {
            return Ok(None);
        }
        Ok(Some(Shaping { ingress, egress }))
    }
}

/// The bandwidth keys among the plugin's own configuration keys, spelled as
/// in [`KEYS`] (the other keys are the plugin's business, not shaping).
fn plugin_keys(plugin: &Map<String, Value>) -> Result<Map<String, Value>, CniError> {
    let ours: Map<String, Value> = plugin
        .iter()
        .filter(|(k, _)| KEYS.iter().any(|n| n.eq_ignore_ascii_case(k)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    keys::fold_keys(&ours, &KEYS, "bandwidth configuration")
}

/// The burst given for containerd's [`UNSET_BURST`]: what `rate` (bits/s)
/// sends in 100 ms, and at least 64 KiB, one full-size GSO packet (smaller,
/// TBF would have to split or drop what the veth hands it).
pub fn default_burst(rate: u64) -> u64 {
    (rate / 10).max(8 * 64 * 1024)
}

/// `<dir>Rate` and `<dir>Burst` as a bucket, `None` when both are 0.
fn direction(entry: &Map<String, Value>, dir: &str) -> Result<Option<Tbf>, CniError> {
    let rate_key = format!("{dir}Rate");
    let burst_key = format!("{dir}Burst");
    let rate = bits(entry, &rate_key)?;
    let mut burst = bits(entry, &burst_key)?;
    if burst == UNSET_BURST && rate != 0 {
        burst = default_burst(rate);
    }
    match (rate, burst) {
        (0, 0) => return Ok(None),
        (_, 0) => {
            return Err(errors::invalid(format!(
                "if rate is set, burst must also be set ({rate_key} {rate}, {burst_key} 0)"
            )));
        }
        (0, _) => {
            return Err(errors::invalid(format!(
                "if burst is set, rate must also be set ({burst_key} {burst}, {rate_key} 0)"
            )));
        }
        _ => {}
    }
    if burst / 8 >= u64::from(u32::MAX) {
        return Err(errors::invalid(format!(
            "burst cannot be more than 4GB ({burst_key} {burst} bits)"
        )));
    }
    // The kernel counts bytes: less than one byte per second (or a bucket
    // smaller than one byte) would be a rate of 0 or a bucket the kernel refuses.
    if rate < 8 {
        return Err(errors::invalid(format!(
            "{rate_key} {rate} is below 8 bits per second (one byte)"
        )));
    }
    if burst < 8 {
        return Err(errors::invalid(format!(
            "{burst_key} {burst} is below 8 bits (one byte)"
        )));
    }
    Ok(Some(bucket(rate, burst)))
}

/// The TBF for `rate` bits/s and `burst` bits (both ≥ 8, burst < 32 Gbit).
pub fn bucket(rate: u64, burst: u64) -> Tbf {
    let rate = rate / 8;
    let burst = (burst / 8) as u32;
    let limit = rate.saturating_mul(LATENCY_MS) / 1000 + u64::from(burst);
    Tbf {
        rate,
        burst,
        limit: limit.min(u64::from(u32::MAX)) as u32,
    }
}

/// A non-negative integer, 0 when absent or null.
fn bits(entry: &Map<String, Value>, key: &str) -> Result<u64, CniError> {
    match entry.get(key) {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v.as_u64().ok_or_else(|| {
            errors::invalid(format!("{key} must be a non-negative integer, got {v}"))
        }),
    }
}

/// `shapedSubnets` / `unshapedSubnets`: checked as the reference checks
/// them, then refused when non-empty, because one TBF per device cannot
/// exempt destinations (the reference switched to HTB classes for that).
fn subnets(entry: &Map<String, Value>) -> Result<(), CniError> {
    let list = |key: &str| -> Result<Vec<IpNetwork>, CniError> {
        match entry.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|s| {
                    let text = s.as_str().unwrap_or_default();
                    text.parse::<IpNetwork>().map_err(|e| {
                        errors::invalid(format!("bad subnet {s} provided, details {e}"))
                    })
                })
                .collect(),
            Some(other) => Err(errors::invalid(format!(
                "{key} must be a list of CIDRs, got {other}"
            ))),
        }
    };
    let shaped = list("shapedSubnets")?;
    let unshaped = list("unshapedSubnets")?;
    if !shaped.is_empty() && !unshaped.is_empty() {
        return Err(errors::invalid(
            "unshapedSubnets and shapedSubnets cannot be both specified, one of them should be discarded",
        ));
    }
    if !shaped.is_empty() || !unshaped.is_empty() {
        return Err(errors::unsupported(
            "shapedSubnets/unshapedSubnets are not supported by ferry-bandwidth: it shapes all of a pod's traffic",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(v: Value) -> NetConf {
        let mut base = json!({"cniVersion": "1.0.0", "name": "n", "type": "ferry-bandwidth"});
        base.as_object_mut()
            .unwrap()
            .extend(v.as_object().unwrap().clone());
        NetConf::from_value(base).unwrap()
    }

    #[test]
    fn no_keys_no_shaping() {
        assert_eq!(Shaping::load(&conf(json!({}))).unwrap(), None);
        let zero = json!({"ingressRate": 0, "ingressBurst": 0, "egressRate": 0, "egressBurst": 0});
        assert_eq!(Shaping::load(&conf(zero)).unwrap(), None);
    }

    #[test]
    fn runtime_config_wins() {
        let c = conf(json!({
            "ingressRate": 8000, "ingressBurst": 8000,
            "runtimeConfig": {"bandwidth": {"egressRate": 80000, "egressBurst": 16000}}
        }));
        let s = Shaping::load(&c).unwrap().unwrap();
        assert_eq!(s.ingress, None);
        assert_eq!(
            s.egress,
            Some(Tbf {
                rate: 10_000,
                burst: 2000,
                limit: 2250
            })
        );
    }

    #[test]
    fn plugin_keys_without_runtime_config() {
        let s = Shaping::load(&conf(
            json!({"ingressRate": 10_000_000, "ingressBurst": 100_000}),
        ))
        .unwrap()
        .unwrap();
        // 1.25 MB/s; 25 ms of it is 31250 bytes, plus the 12500-byte burst.
        assert_eq!(
            s.ingress,
            Some(Tbf {
                rate: 1_250_000,
                burst: 12_500,
                limit: 43_750
            })
        );
        assert_eq!(s.egress, None);
    }

    /// What containerd's CRI plugin (go-cni) sends for the annotations
    /// `kubernetes.io/ingress-bandwidth: 10M`, `egress-bandwidth: 10M`.
    #[test]
    fn containerd_cri_payload() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"ferry-bandwidth",
                "capabilities":{"bandwidth":true},
                "runtimeConfig":{"bandwidth":{"IngressRate":10000000,"IngressBurst":4294967295,
                                              "EgressRate":10000000,"EgressBurst":4294967295}}}"#,
        )
        .unwrap();
        let s = Shaping::load(&c).unwrap().expect("shaped");
        // 1.25 MB/s; the burst is 100 ms of that (125000 bytes), not 512 MiB.
        let want = Tbf {
            rate: 1_250_000,
            burst: 125_000,
            limit: 31_250 + 125_000,
        };
        assert_eq!(s.ingress, Some(want));
        assert_eq!(s.egress, Some(want));
        // A slow rate still gets a bucket of one GSO packet.
        assert_eq!(bucket(80_000, default_burst(80_000)).burst, 64 * 1024);
        // Any other burst is taken as given.
        let c = conf(json!({"runtimeConfig": {"bandwidth":
            {"IngressRate": 10_000_000, "IngressBurst": 4_294_967_294u64}}}));
        assert_eq!(
            Shaping::load(&c).unwrap().unwrap().ingress.unwrap().burst,
            536_870_911
        );
    }

    #[test]
    fn folded_keys_stay_strict() {
        // The plugin's own keys fold too, as the reference's Go decoder does.
        let s = Shaping::load(&conf(json!({"IngressRate": 8000, "ingressburst": 8000})))
            .unwrap()
            .unwrap();
        assert_eq!(s.ingress.unwrap().rate, 1000);
        for (input, text) in [
            // An unknown key in the capability: refused, never a silent "unshaped".
            (
                json!({"runtimeConfig": {"bandwidth": {"IngressRateBits": 8000}}}),
                "unknown key",
            ),
            (
                json!({"runtimeConfig": {"bandwidth": {"ingressRate": 8000, "IngressRate": 9000}}}),
                "twice",
            ),
            (
                json!({"runtimeConfig": {"bandwidth": {"IngressRate": "10M", "IngressBurst": 8000}}}),
                "non-negative",
            ),
            (json!({"IngressRate": 8000, "ingressRate": 8000}), "twice"),
        ] {
            let e = Shaping::load(&conf(input.clone())).expect_err(&input.to_string());
            assert_eq!(e.code.as_u32(), 7, "{input}: {e}");
            assert!(e.msg.contains(text), "{input}: {e}");
        }
    }

    #[test]
    fn refusals() {
        let cases = [
            (
                json!({"ingressRate": -1, "ingressBurst": 8}),
                7,
                "non-negative",
            ),
            (
                json!({"ingressRate": 1.5, "ingressBurst": 8}),
                7,
                "non-negative",
            ),
            (
                json!({"ingressRate": "10M", "ingressBurst": 8}),
                7,
                "non-negative",
            ),
            (json!({"ingressRate": 1000}), 7, "burst must also be set"),
            (json!({"egressBurst": 1000}), 7, "rate must also be set"),
            (
                json!({"egressRate": 0, "egressBurst": 1000}),
                7,
                "rate must also be set",
            ),
            (
                json!({"egressRate": 7, "egressBurst": 1000}),
                7,
                "below 8 bits",
            ),
            (
                json!({"egressRate": 8000, "egressBurst": 7}),
                7,
                "below 8 bits",
            ),
            (
                json!({"egressRate": 8000, "egressBurst": 40_000_000_000u64}),
                7,
                "4GB",
            ),
            (
                json!({"egressRate": 8000, "egressBurst": 8000, "shapedSubnets": ["10.0.0.0/8"], "unshapedSubnets": ["10.1.0.0/16"]}),
                7,
                "cannot be both",
            ),
            (
                json!({"egressRate": 8000, "egressBurst": 8000, "shapedSubnets": ["nope"]}),
                7,
                "bad subnet",
            ),
            (
                json!({"egressRate": 8000, "egressBurst": 8000, "unshapedSubnets": ["10.0.0.0/8"]}),
                2,
                "not supported",
            ),
            (
                json!({"runtimeConfig": {"bandwidth": 5}}),
                7,
                "must be an object",
            ),
        ];
        for (input, code, text) in cases {
            let e = Shaping::load(&conf(input.clone())).expect_err(&input.to_string());
            let j = e.to_json("1.0.0");
            assert_eq!(j["code"], code, "{input}: {j}");
            assert!(j["msg"].as_str().unwrap().contains(text), "{input}: {j}");
        }
    }

    #[test]
    fn huge_values_saturate_not_overflow() {
        let t = bucket(u64::MAX, 8 * u64::from(u32::MAX - 1));
        assert_eq!(t.limit, u32::MAX);
        assert_eq!(t.rate, u64::MAX / 8);
    }
}
