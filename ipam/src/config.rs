//! The `ipam` section, exactly as the reference `host-local` plugin reads it,
//! with its defaults and validation, plus the addresses a runtime requests.

use crate::error::IpamError;
use crate::key::{Key, from_key, key};
use ferry_cni::{CniArgs, NetConf};
use ipnetwork::IpNetwork;
use serde::Deserialize;
use serde_json::Value;
use std::net::IpAddr;
use std::path::PathBuf;

/// host-local's default store.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

/// One range of a range set, after defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNetwork,
    /// First allocatable address, inclusive.
    pub start: IpAddr,
    /// Last allocatable address, inclusive.
    pub end: IpAddr,
    /// Never handed out; returned as the gateway of every address of this range.
    pub gateway: IpAddr,
}

impl Range {
    pub fn start_key(&self) -> Key {
        key(self.start)
    }
    pub fn end_key(&self) -> Key {
        key(self.end)
    }
    pub fn gateway_key(&self) -> Key {
        key(self.gateway)
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.start.is_ipv4()
            && (self.start_key()..=self.end_key()).contains(&key(ip))
    }
    /// Allocatable addresses (the gateway excluded when inside), saturating.
    pub fn capacity(&self) -> u128 {
        let n = (self.end_key() - self.start_key()).saturating_add(1);
        if self.contains(self.gateway) {
            n - 1
        } else {
            n
        }
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}-{})", self.subnet, self.start, self.end)
    }
}

/// Ranges of one family; an ADD gets one address per range set.
pub type RangeSet = Vec<Range>;

#[derive(Debug, Clone, PartialEq)]
pub struct IpamConfig {
    pub ranges: Vec<RangeSet>,
    pub routes: Vec<ferry_cni::Route>,
    pub data_dir: PathBuf,
    pub resolv_conf: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawRange {
    subnet: Option<String>,
    range_start: Option<String>,
    range_end: Option<String>,
    gateway: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    #[serde(flatten)]
    shorthand: RawRange,
    #[serde(default)]
    ranges: Vec<Vec<RawRange>>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    data_dir: Option<String>,
    resolv_conf: Option<String>,
}

#[derive(Deserialize)]
struct RawRoute {
    dst: String,
    gw: Option<String>,
}

fn bad(msg: impl Into<String>) -> IpamError {
    IpamError::Config(msg.into())
}

fn parse_ip(s: &str, what: &str) -> Result<IpAddr, IpamError> {
    s.trim()
        .parse()
        .map_err(|_| bad(format!("{what} {s:?} is not an IP address")))
}

impl IpamConfig {
    /// Parses and validates `conf.ipam`.
    pub fn from_netconf(conf: &NetConf) -> Result<IpamConfig, IpamError> {
        let ipam = conf
            .ipam
            .as_ref()
            .ok_or_else(|| bad("network configuration has no \"ipam\" section"))?;
        Self::parse(&Value::Object(ipam.clone()))
    }

    pub fn parse(ipam: &Value) -> Result<IpamConfig, IpamError> {
        let raw: RawIpam =
            serde_json::from_value(ipam.clone()).map_err(|e| bad(format!("ipam: {e}")))?;
        let mut raw_sets = Vec::new();
        // host-local: the shorthand becomes the first range set.
        if raw.shorthand.subnet.is_some() {
            raw_sets.push(vec![raw.shorthand]);
        } else if raw.shorthand.range_start.is_some()
            || raw.shorthand.range_end.is_some()
            || raw.shorthand.gateway.is_some()
        {
            return Err(bad(
                "ipam: rangeStart/rangeEnd/gateway given without subnet",
            ));
        }
        raw_sets.extend(raw.ranges);
        if raw_sets.is_empty() {
            return Err(bad(
                "ipam: no IP ranges specified (\"ranges\" or \"subnet\")",
            ));
        }
        let mut ranges = Vec::new();
        for (i, set) in raw_sets.iter().enumerate() {
            if set.is_empty() {
                return Err(bad(format!("ipam: range set {i} is empty")));
            }
            let mut out: RangeSet = Vec::new();
            for (j, r) in set.iter().enumerate() {
                let r = canonicalize(r).map_err(|e| bad(format!("range set {i}: {e}")))?;
                if let Some(first) = out.first()
                    && first.subnet.is_ipv4() != r.subnet.is_ipv4()
                {
                    return Err(bad(format!(
                        "range set {i}: range {j} ({r}) mixes IP families with {first}"
                    )));
                }
                if let Some(o) = out.iter().find(|o| overlaps(o, &r)) {
                    return Err(bad(format!(
                        "range set {i}: range {r} overlaps with range {o}"
                    )));
                }
                out.push(r);
            }
            for (k, other) in ranges.iter().enumerate() {
                let other: &RangeSet = other;
                for a in &out {
                    if let Some(b) = other.iter().find(|b| overlaps(a, b)) {
                        return Err(bad(format!(
                            "range set {i} overlaps with range set {k}: {a} and {b}"
                        )));
                    }
                }
            }
            ranges.push(out);
        }
        let mut routes = Vec::new();
        for r in &raw.routes {
            let dst: IpNetwork = r
                .dst
                .parse()
                .map_err(|_| bad(format!("route dst {:?} is not a CIDR", r.dst)))?;
            let dst = IpNetwork::new(dst.network(), dst.prefix()).expect("same prefix");
            let gw =
                r.gw.as_deref()
                    .filter(|g| !g.is_empty())
                    .map(|g| parse_ip(g, "route gw"))
                    .transpose()?;
            routes.push(ferry_cni::Route::new(dst, gw));
        }
        Ok(IpamConfig {
            ranges,
            routes,
            data_dir: PathBuf::from(
                raw.data_dir
                    .filter(|d| !d.is_empty())
                    .unwrap_or_else(|| DEFAULT_DATA_DIR.to_string()),
            ),
            resolv_conf: raw.resolv_conf.filter(|r| !r.is_empty()).map(PathBuf::from),
        })
    }

    /// The range set containing `ip`.
    pub fn set_of(&self, ip: IpAddr) -> Option<usize> {
        self.ranges
            .iter()
            .position(|set| set.iter().any(|r| r.contains(ip)))
    }
}

fn overlaps(a: &Range, b: &Range) -> bool {
    a.subnet.is_ipv4() == b.subnet.is_ipv4()
        && a.start_key() <= b.end_key()
        && b.start_key() <= a.end_key()
}

/// host-local's `Range.Canonicalize`.
fn canonicalize(r: &RawRange) -> Result<Range, String> {
    let s = r.subnet.as_deref().unwrap_or_default();
    if s.is_empty() {
        return Err("range has no subnet".into());
    }
    let subnet: IpNetwork = s
        .trim()
        .parse()
        .map_err(|_| format!("subnet {s:?} is not a CIDR"))?;
    if subnet.ip() != subnet.network() {
        return Err(format!(
            "network {s} has host bits set; for a prefix of {} the network address is {}",
            subnet.prefix(),
            subnet.network()
        ));
    }
    let bits = if subnet.is_ipv4() { 32 } else { 128 };
    if subnet.prefix() > bits - 2 {
        return Err(format!("network {subnet} too small to allocate from"));
    }
    if let IpNetwork::V6(n) = subnet
        && key(IpAddr::V6(n.ip())) >> 32 == 0xffff
    {
        return Err(format!("IPv4-mapped IPv6 network {subnet} not supported"));
    }
    let net = key(subnet.network());
    let host_mask: u128 = if bits == 32 {
        (1u128 << (32 - subnet.prefix())) - 1
    } else if subnet.prefix() == 0 {
        u128::MAX
    } else {
        (1u128 << (128 - subnet.prefix())) - 1
    };
    let v4 = subnet.is_ipv4();
    let last = net | host_mask;
    let inside = |ip: IpAddr| ip.is_ipv4() == v4 && subnet.contains(ip);
    let field = |v: &Option<String>, what: &str| -> Result<Option<IpAddr>, String> {
        match v.as_deref().filter(|x| !x.is_empty()) {
            None => Ok(None),
            Some(x) => {
                let ip: IpAddr = x
                    .trim()
                    .parse()
                    .map_err(|_| format!("{what} {x:?} is not an IP address"))?;
                if !inside(ip) {
                    return Err(format!("{what} {ip} not in network {subnet}"));
                }
                Ok(Some(ip))
            }
        }
    };
    let start = field(&r.range_start, "rangeStart")?.unwrap_or(from_key(net + 1, v4));
    // host-local: the last address for IPv6, the one before broadcast for IPv4.
    let end =
        field(&r.range_end, "rangeEnd")?.unwrap_or(from_key(if v4 { last - 1 } else { last }, v4));
    let gateway = field(&r.gateway, "gateway")?.unwrap_or(from_key(net + 1, v4));
    if key(start) > key(end) {
        return Err(format!("rangeStart {start} is after rangeEnd {end}"));
    }
    Ok(Range {
        subnet,
        start,
        end,
        gateway,
    })
}

/// Addresses the runtime asked for: `IP=` in CNI_ARGS (comma-separated),
/// `args.cni.ips`, then `runtimeConfig.ips` (capability `ips`, optionally
/// with a prefix length). Duplicates are dropped.
pub fn requested_ips(conf: &NetConf, args: &CniArgs) -> Result<Vec<IpAddr>, IpamError> {
    let mut raw: Vec<String> = Vec::new();
    if let Some(v) = args.get("IP") {
        raw.extend(
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
    }
    let strings = |v: Option<&Value>, what: &str| -> Result<Vec<String>, IpamError> {
        match v {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(String::from)
                        .ok_or_else(|| bad(format!("{what}: {x} is not a string")))
                })
                .collect(),
            Some(other) => Err(bad(format!("{what}: {other} is not a list"))),
        }
    };
    raw.extend(strings(
        conf.args.get("cni").and_then(|c| c.get("ips")),
        "args.cni.ips",
    )?);
    raw.extend(strings(conf.runtime("ips"), "runtimeConfig.ips")?);
    let mut out: Vec<IpAddr> = Vec::new();
    for s in raw {
        let addr = s.split_once('/').map(|(a, _)| a).unwrap_or(&s);
        let ip = parse_ip(addr, "requested IP")?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_table() {
        // (ipam range, start, end, gateway)
        let cases = [
            (
                json!({"subnet": "10.88.0.0/16"}),
                "10.88.0.1",
                "10.88.255.254",
                "10.88.0.1",
            ),
            (
                json!({"subnet": "10.1.2.0/29"}),
                "10.1.2.1",
                "10.1.2.6",
                "10.1.2.1",
            ),
            (
                json!({"subnet": "10.1.2.0/24", "rangeStart": "10.1.2.100", "rangeEnd": "10.1.2.200", "gateway": "10.1.2.254"}),
                "10.1.2.100",
                "10.1.2.200",
                "10.1.2.254",
            ),
            (
                json!({"subnet": "fd00:1::/64"}),
                "fd00:1::1",
                "fd00:1::ffff:ffff:ffff:ffff",
                "fd00:1::1",
            ),
            (
                json!({"subnet": "fd00::/120", "gateway": "fd00::fe"}),
                "fd00::1",
                "fd00::ff",
                "fd00::fe",
            ),
        ];
        for (r, start, end, gw) in cases {
            let c =
                IpamConfig::parse(&json!({"type": "ferry-ipam", "ranges": [[r.clone()]]})).unwrap();
            let got = &c.ranges[0][0];
            assert_eq!(
                (got.start, got.end, got.gateway),
                (ip(start), ip(end), ip(gw)),
                "{r}"
            );
            assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        }
    }

    #[test]
    fn shorthand_is_first_set_and_everything_parses() {
        let c = IpamConfig::parse(&json!({
            "type": "host-local",
            "subnet": "10.0.0.0/24", "gateway": "10.0.0.254",
            "ranges": [[{"subnet": "fd00::/64"}], [{"subnet": "10.1.0.0/24"}, {"subnet": "10.2.0.0/24"}]],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.1.5/24", "gw": "10.0.0.254"}],
            "dataDir": "/run/x", "resolvConf": "/etc/r.conf"
        }))
        .unwrap();
        assert_eq!(c.ranges.len(), 3);
        assert_eq!(c.ranges[0][0].gateway, ip("10.0.0.254"));
        assert_eq!(c.ranges[2].len(), 2);
        assert_eq!(c.routes[1].dst.to_string(), "192.168.1.0/24");
        assert_eq!(c.routes[1].gw, Some(ip("10.0.0.254")));
        assert_eq!(c.routes[0].gw, None);
        assert_eq!(c.data_dir, PathBuf::from("/run/x"));
        assert_eq!(c.resolv_conf, Some(PathBuf::from("/etc/r.conf")));
        assert_eq!(c.set_of(ip("10.2.0.9")), Some(2));
        assert_eq!(c.set_of(ip("10.3.0.9")), None);
    }

    #[test]
    fn validation_table() {
        let cases = [
            (json!({"type": "t"}), "no IP ranges"),
            (json!({"type": "t", "ranges": [[]]}), "range set 0 is empty"),
            (json!({"type": "t", "subnet": "10.0.0.0/33"}), "not a CIDR"),
            (json!({"type": "t", "subnet": "bogus"}), "not a CIDR"),
            (json!({"type": "t", "subnet": "10.0.0.1/24"}), "host bits"),
            (json!({"type": "t", "subnet": "10.0.0.0/31"}), "too small"),
            (
                json!({"type": "t", "subnet": "10.0.0.0/24", "rangeStart": "10.0.1.1"}),
                "rangeStart 10.0.1.1 not in network",
            ),
            (
                json!({"type": "t", "subnet": "10.0.0.0/24", "rangeEnd": "10.0.1.1"}),
                "rangeEnd 10.0.1.1 not in network",
            ),
            (
                json!({"type": "t", "subnet": "10.0.0.0/24", "gateway": "10.9.0.1"}),
                "gateway 10.9.0.1 not in network",
            ),
            (
                json!({"type": "t", "subnet": "10.0.0.0/24", "gateway": "fd00::1"}),
                "not in network",
            ),
            (
                json!({"type": "t", "subnet": "10.0.0.0/24", "rangeStart": "10.0.0.9", "rangeEnd": "10.0.0.3"}),
                "after rangeEnd",
            ),
            (
                json!({"type": "t", "subnet": "10.0.0.0/24", "rangeStart": "x"}),
                "not an IP",
            ),
            (
                json!({"type": "t", "gateway": "10.0.0.1"}),
                "without subnet",
            ),
            (
                json!({"type": "t", "ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "10.0.0.0/25"}]]}),
                "range set 1 overlaps with range set 0",
            ),
            (
                json!({"type": "t", "ranges": [[{"subnet": "10.0.0.0/24"}, {"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.200"}]]}),
                "overlaps",
            ),
            (
                json!({"type": "t", "ranges": [[{"subnet": "10.0.0.0/24"}, {"subnet": "fd00::/64"}]]}),
                "mixes IP families",
            ),
            (
                json!({"type": "t", "subnet": "10.0.0.0/24", "routes": [{"dst": "nope"}]}),
                "route dst",
            ),
            (
                json!({"type": "t", "subnet": "10.0.0.0/24", "routes": [{"dst": "0.0.0.0/0", "gw": "x"}]}),
                "route gw",
            ),
            (json!({"type": "t", "ranges": "10.0.0.0/24"}), "ipam:"),
        ];
        for (conf, needle) in cases {
            let e = IpamConfig::parse(&conf).expect_err(&conf.to_string());
            assert!(matches!(e, IpamError::Config(_)));
            assert!(e.to_string().contains(needle), "{conf}: {e}");
            assert_eq!(ferry_cni::CniError::from(e).code.as_u32(), 7);
        }
        // Disjoint ranges in one set are fine.
        IpamConfig::parse(&json!({"type": "t", "ranges": [[
            {"subnet": "10.0.0.0/24", "rangeEnd": "10.0.0.99"},
            {"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.100"}]]}))
        .unwrap();
    }

    #[test]
    fn requested_ips_from_all_sources() {
        let conf = NetConf::parse(
            json!({"cniVersion": "1.1.0", "name": "n", "type": "t",
                "ipam": {"type": "ferry-ipam", "subnet": "10.0.0.0/24"},
                "args": {"cni": {"ips": ["10.0.0.7", "fd00::7"]}},
                "runtimeConfig": {"ips": ["10.0.0.8/24", "10.0.0.7"]}})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let args = CniArgs::parse("IgnoreUnknown=1;IP=10.0.0.5,10.0.0.6").unwrap();
        let got = requested_ips(&conf, &args).unwrap();
        let want: Vec<IpAddr> = ["10.0.0.5", "10.0.0.6", "10.0.0.7", "fd00::7", "10.0.0.8"]
            .iter()
            .map(|s| ip(s))
            .collect();
        assert_eq!(got, want);
        // Keys as a Go runtime may spell them (matched ignoring case).
        let folded = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"t","runtimeConfig":{"IPs":["10.0.0.9"]}}"#,
        )
        .unwrap();
        let args = CniArgs::parse("ip=10.0.0.4").unwrap();
        assert_eq!(
            requested_ips(&folded, &args).unwrap(),
            vec![ip("10.0.0.4"), ip("10.0.0.9")]
        );
        let bad_args = CniArgs::parse("IP=10.0.0.300").unwrap();
        assert!(matches!(
            requested_ips(&conf, &bad_args),
            Err(IpamError::Config(_))
        ));
    }
}
