//! `ferry-portmap`: the hostPort plugin of a Kubernetes CNI chain.
//!
//! Chained after ferry-bridge (or any plugin whose result names the pod's
//! addresses): for every `portMappings` entry of `runtimeConfig` it DNATs
//! traffic to the host's addresses (all of them, or the given `hostIP`) and
//! from the host itself (also `127.0.0.1`, with `route_localnet` on the
//! interface towards the pod) to the pod, and masquerades what would
//! otherwise come back the wrong way: the pod reaching its own hostPort
//! (hairpin), its neighbours on the bridge, and localhost. The result is the
//! previous result, unchanged.
//!
//! The state is per pod, in ferry's nftables table ([`rules`]): one chain and
//! one map element per mapping, added in one `nft -f -` transaction and
//! removed in one. A pod without mappings costs nothing, not even a lookup
//! on ADD; DEL of a pod without state costs one netlink lookup.

pub mod config;
pub mod rules;

use config::PortmapConf;
use ferry_cni::{CmdArgs, CniError, CniResult, ErrorCode, NetConf, Plugin};
use ferry_netops::nft::{self, NftFamily};
use ferry_netops::to_cni;
use rules::{PodAddrs, TABLE};
use std::net::IpAddr;

/// Plugin-specific error codes (≥ 100).
pub mod codes {
    /// A hostPort is already mapped to another pod.
    pub const CONFLICT: u32 = 120;
    /// CHECK found the pod's state missing or different.
    pub const CHECK: u32 = 121;
}

pub struct Portmap;

fn plugin_error(code: u32, msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::Plugin(code), msg)
}

/// The previous result, which a chained portmap needs.
fn prev_result(conf: &NetConf) -> Result<CniResult, CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::invalid_config("ferry-portmap must be called as a chained plugin (no prevResult)")
    })?;
    CniResult::from_json(prev)
}

/// The pod's addresses, as the reference picks them: the first of each
/// family that belongs to `ifname` in a sandbox (or names no interface).
pub fn pod_addrs(result: &CniResult, ifname: &str) -> PodAddrs {
    let mut out = PodAddrs::default();
    for ip in &result.ips {
        if let Some(i) = ip.interface
            && let Some(iface) = result.interfaces.get(i)
            && (iface.name != ifname || iface.sandbox.is_empty())
        {
            continue;
        }
        let slot = if ip.address.is_ipv4() {
            &mut out.v4
        } else {
            &mut out.v6
        };
        if slot.is_none() {
            *slot = Some(ip.address);
        }
    }
    out
}

/// Locally generated traffic from 127.0.0.1 may only leave through an
/// interface with `route_localnet` (else the kernel drops it as martian):
/// set it on the interface the host routes the pod's IPv4 address through.
fn enable_route_localnet(pod: std::net::Ipv4Addr) -> Result<(), CniError> {
    let name = ferry_netops::block_on(async {
        let h = ferry_netops::NsHandle::host()?;
        let Some(route) = h.route_get_ipv4(pod).await? else {
            return Ok(None);
        };
        Ok(h.link_by_index(route.oif).await?.map(|l| l.name))
    })
    .map_err(to_cni)?;
    let Some(name) = name else {
        return Err(CniError::new(
            ErrorCode::Internal,
            format!("no route to the pod address {pod} on the host"),
        ));
    };
    let key = format!("net/ipv4/conf/{name}/route_localnet");
    ferry_netops::sysctl::write(&key, "1")
        .map_err(|e| CniError::new(ErrorCode::Internal, format!("set {key} = 1")).with_details(e))
}

/// The dumps of the three maps.
fn dump_maps() -> Result<Vec<(&'static str, Vec<nft::MapElement>)>, CniError> {
    rules::MAPS
        .iter()
        .map(|m| {
            Ok((
                *m,
                nft::map_elements(NftFamily::Inet, TABLE, m).map_err(to_cni)?,
            ))
        })
        .collect()
}

/// After a failed ADD transaction: the keys another pod holds, if any.
fn conflicts(conf: &PortmapConf, pod: &PodAddrs, chain: &str) -> Result<Vec<String>, CniError> {
    let dumps = dump_maps()?;
    let mut out = Vec::new();
    for e in rules::elements(conf, pod) {
        let raw = e.raw_key();
        let holder = dumps
            .iter()
            .filter(|(m, _)| *m == e.map)
            .flat_map(|(_, d)| d)
            .find(|d| d.key == raw)
            .and_then(|d| d.chain.clone());
        if let Some(other) = holder.filter(|c| c != chain) {
            let what = match e.host_ip {
                Some(IpAddr::V6(ip)) => format!("[{ip}]:{}/{}", e.port, e.proto.name()),
                Some(ip) => format!("{ip}:{}/{}", e.port, e.proto.name()),
                None => format!("{}/{}", e.port, e.proto.name()),
            };
            out.push(format!("{what} (held by nft chain {other})"));
        }
    }
    Ok(out)
}

impl Plugin for Portmap {
    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
        let result = prev_result(conf)?;
        let pm = PortmapConf::load(conf)?;
        if pm.mappings.is_empty() {
            return Ok(result);
        }
        let pod = pod_addrs(&result, &args.ifname);
        if rules::elements(&pm, &pod).is_empty() {
            // No address of a family any mapping applies to.
            return Ok(result);
        }
        let chain = rules::pod_chain(&conf.name, &args.container_id, &args.ifname);
        if (pm.snat || pm.masq_all)
            && let Some(v4) = pod.v4
            && let IpAddr::V4(ip) = v4.ip()
            && pm.mappings.iter().any(|m| m.applies_to(true))
        {
            enable_route_localnet(ip)?;
        }
        let base = if pm.snat || pm.masq_all {
            rules::snat_chain(pm.mark_bit)
        } else {
            rules::PREROUTING_CHAIN.to_string()
        };
        let with_base = !nft::chain_exists(NftFamily::Inet, TABLE, &base).map_err(to_cni)?;
        let script = rules::add_script(&pm, &chain, &pod, with_base);
        if let Err(e) = nft::apply_script(&script) {
            let taken = conflicts(&pm, &pod, &chain)?;
            if !taken.is_empty() {
                return Err(plugin_error(
                    codes::CONFLICT,
                    format!(
                        "hostPort already mapped to another container: {}",
                        taken.join(", ")
                    ),
                ));
            }
            return Err(to_cni(e));
        }
        Ok(result)
    }

    fn del(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        // Neither the mappings nor the address are needed: the pod's chain
        // is named by (network, container ID, ifname), and its elements are
        // those that jump to it.
        let chain = rules::pod_chain(&conf.name, &args.container_id, &args.ifname);
        let mut last = None;
        for _ in 0..3 {
            if !nft::chain_exists(NftFamily::Inet, TABLE, &chain).map_err(to_cni)? {
                return Ok(());
            }
            let owned: Vec<_> = dump_maps()?
                .iter()
                .flat_map(|(m, d)| rules::owned_keys(m, d, &chain))
                .collect();
            // A racing DEL or ADD may change the maps between the dump and
            // the transaction: look again and retry.
            match nft::apply_script(&rules::del_script(&chain, &owned)) {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(to_cni(last.expect("the loop ran")))
    }

    fn check(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let result = prev_result(conf)?;
        let pm = PortmapConf::load(conf)?;
        let pod = pod_addrs(&result, &args.ifname);
        let wanted = rules::elements(&pm, &pod);
        if wanted.is_empty() {
            return Ok(());
        }
        let fail = |msg: String| plugin_error(codes::CHECK, msg);
        let chain = rules::pod_chain(&conf.name, &args.container_id, &args.ifname);
        for base in [rules::PREROUTING_CHAIN, rules::LOOKUP_CHAIN] {
            if !nft::chain_exists(NftFamily::Inet, TABLE, base).map_err(to_cni)? {
                return Err(fail(format!(
                    "chain {base} missing from table inet {TABLE}"
                )));
            }
        }
        if pm.snat || pm.masq_all {
            let snat = rules::snat_chain(pm.mark_bit);
            if !nft::chain_exists(NftFamily::Inet, TABLE, &snat).map_err(to_cni)? {
                return Err(fail(format!(
                    "chain {snat} missing from table inet {TABLE}"
                )));
            }
        }
        let rules_of_pod = nft::chain_rules(NftFamily::Inet, TABLE, &chain).map_err(to_cni)?;
        if rules_of_pod.is_empty() {
            return Err(fail(format!(
                "chain {chain} missing (or empty) in table inet {TABLE}"
            )));
        }
        for addr in [pod.v4, pod.v6].into_iter().flatten() {
            let bytes = match addr.ip() {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            if !rules_of_pod.iter().any(|r| carries_value(r, &bytes)) {
                return Err(fail(format!(
                    "chain {chain} in table inet {TABLE} does not DNAT to the pod address {}",
                    addr.ip()
                )));
            }
        }
        let dumps = dump_maps()?;
        for e in wanted {
            let raw = e.raw_key();
            let found = dumps
                .iter()
                .filter(|(m, _)| *m == e.map)
                .flat_map(|(_, d)| d)
                .find(|d| d.key == raw);
            match found.and_then(|d| d.chain.as_deref()) {
                Some(c) if c == chain => {}
                Some(other) => {
                    return Err(fail(format!(
                        "{} in map {} jumps to {other}, not to the pod's chain {chain}",
                        e.key(),
                        e.map
                    )));
                }
                None => {
                    return Err(fail(format!(
                        "{} missing from map {} of table inet {TABLE}",
                        e.key(),
                        e.map
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Whether a raw nf_tables rule message holds a constant (NFTA_DATA_VALUE
/// attribute, e.g. the DNAT address loaded by an `immediate`) equal to `value`.
fn carries_value(rule: &[u8], value: &[u8]) -> bool {
    let mut attr = Vec::with_capacity(4 + value.len());
    attr.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    attr.extend_from_slice(&1u16.to_ne_bytes()); // NFTA_DATA_VALUE
    attr.extend_from_slice(value);
    rule.windows(attr.len()).any(|w| w == attr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pod_addrs_from_a_bridge_result() {
        let r = CniResult::from_json(&json!({"cniVersion": "1.0.0",
            "interfaces": [{"name": "cni0", "mac": "02:00:00:00:00:01"},
                           {"name": "veth1", "mac": "02:00:00:00:00:02"},
                           {"name": "eth0", "mac": "02:00:00:00:00:03", "sandbox": "/run/netns/p"}],
            "ips": [{"interface": 0, "address": "10.0.0.1/24"},
                    {"interface": 2, "address": "10.88.0.5/24", "gateway": "10.88.0.1"},
                    {"interface": 2, "address": "10.88.0.6/24"},
                    {"address": "fd00::5/64"}]}))
        .unwrap();
        let p = pod_addrs(&r, "eth0");
        assert_eq!(p.v4.unwrap().to_string(), "10.88.0.5/24");
        assert_eq!(p.v6.unwrap().to_string(), "fd00::5/64");
        let p = pod_addrs(&r, "eth1");
        assert!(p.v4.is_none() && p.v6.is_some());
    }
}
