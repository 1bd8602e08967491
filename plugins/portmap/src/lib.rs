//! `ferry-portmap`: the hostPort plugin of a Kubernetes CNI chain.
//!
//! Chained after ferry-bridge (or any plugin whose result names the pod's
//! addresses): for every `portMappings` entry of `runtimeConfig` it DNATs
//! traffic to the host's addresses (all of them, or the given `hostIP` when
//! the host owns it) and from the host itself (also `127.0.0.1`, with
//! `route_localnet` on the interface towards the pod, a drop of 127.0.0.0/8
//! arriving from anywhere else, and `route_localnet` put back by the DEL of
//! its last user) to the pod, and masquerades what would otherwise come back
//! the wrong way: the pod reaching its own hostPort (hairpin), its
//! neighbours on the bridge, and localhost. The result is the previous
//! result, unchanged.
//!
//! The per-pod state is set and map elements only, in ferry's nftables table
//! ([`rules`]): added in one nf_tables netlink batch (no `nft` exec; the
//! shared maps and chains are created once by one `nft -f -` transaction)
//! and removed in one. A pod without mappings costs nothing, not even a
//! lookup on ADD; DEL of a pod without state costs one dump of the table's
//! sets and one per hostports set.
//!
//! UDP mappings also clean conntrack ([`flush_stale_flows`]): a UDP client
//! that keeps sending keeps its entry, and the DNAT the entry recorded, for
//! ever. After ADD the entries of flows to the hostPort that are not yet the
//! new mapping's (made before it existed, or DNATed to a pod gone without a
//! flush) are deleted, and after DEL those DNATed to the pod: through
//! ctnetlink, only UDP entries whose original destination is the hostPort
//! on an address the mapping captures. A pod without UDP mappings costs no
//! conntrack work at all.

pub mod config;
pub mod rules;

use config::PortmapConf;
use ferry_cni::{CmdArgs, CniError, CniResult, ErrorCode, NetConf, Plugin};
use ferry_netops::conntrack::{self, FlowFilter};
use ferry_netops::nft::{self, NftFamily, SetElement};
use ferry_netops::{NetopsError, RouteKind, to_cni};
use ipnetwork::IpNetwork;
use rules::{PodAddrs, TABLE};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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

/// At most this many (distinct) portMappings per pod. Far more than a pod
/// exposes, and it bounds what one ADD sends the kernel: at most 5 elements
/// per mapping (DNAT per family, masquerade ranges), about 4 MB in one
/// transaction, split over messages of 64 KiB.
pub const MAX_MAPPINGS: usize = 4096;

/// The configuration, with at most [`MAX_MAPPINGS`] mappings (code 7).
fn load(conf: &NetConf) -> Result<PortmapConf, CniError> {
    let pm = PortmapConf::load(conf)?;
    if pm.mappings.len() > MAX_MAPPINGS {
        return Err(CniError::invalid_config(format!(
            "runtimeConfig.portMappings has {} distinct entries; ferry-portmap accepts at most \
             {MAX_MAPPINGS} per pod",
            pm.mappings.len()
        )));
    }
    Ok(pm)
}

/// Locally generated traffic from 127.0.0.1 may only leave through an
/// interface with `route_localnet` (else the kernel drops it as martian),
/// and its answers only come back through one: the interface the host
/// routes the pod's IPv4 address through.
fn localnet_iface(pod: Ipv4Addr) -> Result<String, CniError> {
    let name = ferry_netops::block_on(async {
        let h = ferry_netops::NsHandle::host()?;
        let Some(route) = h.route_get(pod).await? else {
            return Ok(None);
        };
        Ok(h.link_by_index(route.oif).await?.map(|l| l.name))
    })
    .map_err(to_cni)?;
    name.ok_or_else(|| {
        CniError::new(
            ErrorCode::Internal,
            format!("no route to the pod address {pod} on the host"),
        )
    })
}

fn route_localnet_key(iface: &str) -> String {
    format!("net/ipv4/conf/{iface}/route_localnet")
}

/// Sets `route_localnet` of `iface` to `value`; an interface that is gone
/// (ENOENT) needs nothing.
fn set_route_localnet(iface: &str, value: &str) -> Result<(), CniError> {
    // Names come back from a dump too: only a kernel interface name is a
    // path component under /proc/sys.
    if !valid_ifname(iface) {
        return Err(CniError::new(
            ErrorCode::Internal,
            format!("not an interface name: {iface:?}"),
        ));
    }
    let key = route_localnet_key(iface);
    match ferry_netops::sysctl::write(&key, value) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            Err(CniError::new(ErrorCode::Internal, format!("set {key} = {value}")).with_details(e))
        }
    }
}

fn valid_ifname(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// The pod's elements in a dump: set name → its elements.
type Owned = Vec<(String, Vec<SetElement>)>;

/// Every element of ferry-portmap's sets and maps whose comment is the
/// pod's (one dump of the table's sets, one per set), and every element of
/// the route_localnet set (whoever holds it).
fn owned_elements(owner: &rules::Owner) -> Result<(Owned, Vec<SetElement>), CniError> {
    let mut out = Vec::new();
    let mut localnet = Vec::new();
    for set in nft::set_names(NftFamily::Inet, TABLE).map_err(to_cni)? {
        if !set.starts_with(rules::PREFIX) {
            continue;
        }
        let all = nft::set_elements(NftFamily::Inet, TABLE, &set).map_err(to_cni)?;
        let mine: Vec<_> = all.iter().filter(|e| owner.owns(e)).cloned().collect();
        if set == rules::LOCALNET_SET {
            localnet = all;
        }
        if !mine.is_empty() {
            out.push((set, mine));
        }
    }
    Ok((out, localnet))
}

/// The batch adding `wanted` (exclusively: a key held by anyone fails it)
/// and `localnet` (route_localnet bookkeeping: the pod's own entry
/// exclusively, "switched on" records not, as several ADDs may add one),
/// after deleting `old` (the pod's elements from an earlier ADD).
fn add_batch(
    wanted: &[rules::PodElement],
    localnet: &[(SetElement, bool)],
    old: &Owned,
) -> nft::Batch {
    let mut b = nft::Batch::new();
    for (set, elems) in old {
        b.del_elements(NftFamily::Inet, TABLE, set, elems);
    }
    // One message per set (more for very long lists), in the order of first
    // use (DNAT maps first).
    let mut sets: Vec<&str> = Vec::new();
    for e in wanted {
        if !sets.contains(&e.set.as_str()) {
            sets.push(&e.set);
        }
    }
    for set in sets {
        let elems: Vec<SetElement> = wanted
            .iter()
            .filter(|e| e.set == set)
            .map(|e| e.elem.clone())
            .collect();
        b.add_elements(NftFamily::Inet, TABLE, set, &elems, true);
    }
    for (elem, exclusive) in localnet {
        b.add_elements(
            NftFamily::Inet,
            TABLE,
            rules::LOCALNET_SET,
            std::slice::from_ref(elem),
            *exclusive,
        );
    }
    b
}

/// After a refused ADD: the DNAT keys another pod holds, with the holder.
fn conflicts(wanted: &[rules::PodElement], owner: &rules::Owner) -> Result<Vec<String>, CniError> {
    let mut out = Vec::new();
    for map in rules::DNAT_MAPS {
        let mine: Vec<_> = wanted.iter().filter(|e| e.set == map).collect();
        if mine.is_empty() {
            continue;
        }
        let dump = nft::set_elements(NftFamily::Inet, TABLE, map).map_err(to_cni)?;
        let by_key: HashMap<&[u8], &SetElement> =
            dump.iter().map(|d| (d.key.as_slice(), d)).collect();
        for e in mine {
            if let Some(other) = by_key.get(e.elem.key.as_slice())
                && !owner.owns(other)
            {
                let holder = other
                    .comment
                    .as_deref()
                    .unwrap_or("an element without comment");
                out.push(format!("{} (held by {holder})", e.what));
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// After the pod's DEL batch: put `route_localnet` of `iface` back to 0
/// (ferry switched it on, and the pod was its last user), then look again:
/// an ADD that registered a user meanwhile gets it (and the record) back.
/// An ADD writes 1 only after its element is in, so one of the two writes
/// last with the right value.
fn switch_localnet_off(iface: &str) -> Result<(), CniError> {
    set_route_localnet(iface, "0")?;
    let users = nft::set_elements(NftFamily::Inet, TABLE, rules::LOCALNET_SET)
        .map_err(to_cni)?
        .iter()
        .filter_map(|e| rules::parse_localnet_key(&e.key))
        .any(|(name, entry)| name == iface && entry != rules::LocalnetEntry::SwitchedOn);
    if users {
        let mut b = nft::Batch::new();
        b.add_elements(
            NftFamily::Inet,
            TABLE,
            rules::LOCALNET_SET,
            &[switched_on(iface)],
            false,
        );
        b.commit().map_err(to_cni)?;
        set_route_localnet(iface, "1")?;
    }
    Ok(())
}

/// The record "ferry set route_localnet of `iface` to 1".
fn switched_on(iface: &str) -> SetElement {
    SetElement {
        key: rules::localnet_key(iface, &rules::LocalnetEntry::SwitchedOn),
        comment: Some(rules::LOCALNET_SWITCHED_ON.to_string()),
        ..Default::default()
    }
}

/// A UDP hostPort DNAT, as one of the DNAT map elements says it: which
/// conntrack entries are its flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDnat {
    /// The hostIP; `None`: every address of the node.
    pub host_ip: Option<IpAddr>,
    pub v4: bool,
    pub host_port: u16,
    /// The pod's address and containerPort.
    pub target: SocketAddr,
}

/// The UDP DNAT among a pod's elements, read back from the element itself
/// (key `[hostIP .] proto . port`, data `address . port`); anything else
/// (TCP, SCTP, masquerade sets, a malformed element) is `None`.
pub fn udp_dnat(set: &str, e: &SetElement) -> Option<UdpDnat> {
    let (with_ip, v4) = match set {
        rules::MAP_V4 => (false, true),
        rules::MAP_V6 => (false, false),
        rules::MAP_HOSTIP_V4 => (true, true),
        rules::MAP_HOSTIP_V6 => (true, false),
        _ => return None,
    };
    let ip = |b: &[u8]| -> Option<IpAddr> {
        match b.len() {
            4 => Some(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?).into()),
            16 => Some(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?).into()),
            _ => None,
        }
    };
    let w = if v4 { 4 } else { 16 };
    let (host_ip, rest) = if with_ip {
        (Some(ip(e.key.get(..w)?)?), e.key.get(w..)?)
    } else {
        (None, e.key.as_slice())
    };
    if rest.len() != 8 || rest[0] != conntrack::UDP {
        return None;
    }
    let data = e.data.as_deref()?;
    if data.len() != w + 4 {
        return None;
    }
    Some(UdpDnat {
        host_ip,
        v4,
        host_port: u16::from_be_bytes([rest[4], rest[5]]),
        target: SocketAddr::new(ip(&data[..w])?, u16::from_be_bytes([data[w], data[w + 1]])),
    })
}

/// When the flush runs, which decides what is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// After ADD: every flow to the hostPort is now the pod's, except those
    /// to a hostIP another pod holds the same port on (its mapping wins).
    Add,
    /// After DEL: the flows DNATed to the pod.
    Del,
}

/// The node's own addresses as the kernel's `local` routes say them, the
/// destinations `fib daddr type local` (the hostPort chains' condition)
/// matches, for the families asked.
fn local_prefixes(v4: bool, v6: bool) -> Result<Vec<IpNetwork>, NetopsError> {
    ferry_netops::block_on(async {
        let h = ferry_netops::NsHandle::host()?;
        let mut out = Vec::new();
        if v4 {
            for e in h.route_entries::<Ipv4Addr>().await? {
                if e.kind == RouteKind::Local {
                    out.push(IpNetwork::V4(e.route.dst));
                }
            }
        }
        if v6 {
            for e in h.route_entries::<Ipv6Addr>().await? {
                if e.kind == RouteKind::Local {
                    out.push(IpNetwork::V6(e.route.dst));
                }
            }
        }
        Ok(out)
    })
}

/// The hostIPs other pods hold a UDP `port` on (their hostIP mapping wins
/// over a mapping on every address, so those flows are theirs).
fn held_host_ips(dnats: &[UdpDnat], owner: &rules::Owner) -> Result<Vec<(IpAddr, u16)>, CniError> {
    let mut out = Vec::new();
    for (map, v4) in [(rules::MAP_HOSTIP_V4, true), (rules::MAP_HOSTIP_V6, false)] {
        if !dnats.iter().any(|d| d.host_ip.is_none() && d.v4 == v4) {
            continue;
        }
        for e in nft::set_elements(NftFamily::Inet, TABLE, map).map_err(to_cni)? {
            if let Some(d) = udp_dnat(map, &e)
                && !owner.owns(&e)
                && let Some(ip) = d.host_ip
            {
                out.push((ip, d.host_port));
            }
        }
    }
    Ok(out)
}

/// The conntrack filters of `dnats` at `phase`.
fn flow_filters(
    dnats: &[UdpDnat],
    phase: Phase,
    local: &[IpNetwork],
    held: &[(IpAddr, u16)],
) -> Vec<FlowFilter> {
    dnats
        .iter()
        .map(|d| FlowFilter {
            proto: conntrack::UDP,
            dst_port: d.host_port,
            dst: match d.host_ip {
                Some(ip) => vec![IpNetwork::from(ip)],
                None => local
                    .iter()
                    .filter(|n| n.is_ipv4() == d.v4)
                    .copied()
                    .collect(),
            },
            dst_except: match (phase, d.host_ip) {
                (Phase::Add, None) => held
                    .iter()
                    .filter(|(ip, port)| *port == d.host_port && ip.is_ipv4() == d.v4)
                    .map(|(ip, _)| *ip)
                    .collect(),
                _ => Vec::new(),
            },
            translated_to: match phase {
                Phase::Add => None,
                Phase::Del => Some(d.target),
            },
        })
        .collect()
}

/// Deletes the conntrack entries of the flows `dnats` are (ADD) or were
/// (DEL) responsible for, in the node's namespace (where the plugin runs).
/// The mapping is in place (or gone) whatever happens here, so a failure
/// is a warning on stderr, as the reference portmap's: the pod starts, and
/// the runtime's log says why an old UDP flow may still go elsewhere.
fn flush_stale_flows(dnats: &[UdpDnat], owner: &rules::Owner, phase: Phase) {
    if dnats.is_empty() {
        return;
    }
    let run = || -> Result<usize, CniError> {
        let any = |v4: bool| dnats.iter().any(|d| d.host_ip.is_none() && d.v4 == v4);
        let local = if any(true) || any(false) {
            local_prefixes(any(true), any(false)).map_err(to_cni)?
        } else {
            Vec::new()
        };
        let held = match phase {
            Phase::Add => held_host_ips(dnats, owner)?,
            Phase::Del => Vec::new(),
        };
        conntrack::delete_flows(&flow_filters(dnats, phase, &local, &held)).map_err(to_cni)
    };
    if let Err(e) = run() {
        let ports: Vec<String> = dnats.iter().map(|d| d.host_port.to_string()).collect();
        eprintln!(
            "ferry-portmap: warning: could not delete stale conntrack entries of UDP hostPort(s) \
             {}: {}",
            ports.join(", "),
            e.msg
        );
    }
}

impl Plugin for Portmap {
    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
        let result = prev_result(conf)?;
        let pm = load(conf)?;
        if pm.mappings.is_empty() {
            return Ok(result);
        }
        let pod = pod_addrs(&result, &args.ifname);
        let owner = rules::Owner::new(&conf.name, &args.container_id, &args.ifname);
        let comment = &owner.comment;
        let wanted = rules::elements(&pm, &pod, comment);
        if wanted.is_empty() {
            // No address of a family any mapping applies to.
            return Ok(result);
        }
        // 127.0.0.1:hostPort from the host needs route_localnet towards the
        // pod; the pod is recorded as its user, and ferry as the one that
        // switched it on when it was off.
        let mut localnet_elems = Vec::new();
        let mut localnet = None;
        if (pm.snat || pm.masq_all)
            && let Some(v4) = pod.v4
            && let IpAddr::V4(ip) = v4.ip()
            && pm.mappings.iter().any(|m| m.applies_to(true))
        {
            let iface = localnet_iface(ip)?;
            let on =
                ferry_netops::sysctl::read(&route_localnet_key(&iface)).is_ok_and(|v| v == "1");
            localnet_elems.push((
                SetElement {
                    key: rules::localnet_key(&iface, &rules::localnet_user(comment)),
                    comment: Some(comment.clone()),
                    ..Default::default()
                },
                true,
            ));
            if !on {
                localnet_elems.push((switched_on(&iface), false));
            }
            localnet = Some(iface);
        }
        // The shared part, once: its last chain says all of it is there.
        if !nft::chain_exists(NftFamily::Inet, TABLE, &rules::base_marker(&pm)).map_err(to_cni)? {
            nft::apply_script(&rules::base_script(&pm)).map_err(to_cni)?;
        }
        // Parsed from the elements: no kernel work for a pod without UDP.
        let udp: Vec<UdpDnat> = wanted
            .iter()
            .filter_map(|e| udp_dnat(&e.set, &e.elem))
            .collect();
        // The common case: one batch of new elements.
        let mut old = Vec::new();
        let mut last = None;
        for _ in 0..3 {
            let e = match add_batch(&wanted, &localnet_elems, &old).commit() {
                Ok(()) => {
                    if let Some(iface) = &localnet {
                        set_route_localnet(iface, "1")?;
                    }
                    // After the elements are in, so that the packets that
                    // follow the flush meet the new DNAT.
                    flush_stale_flows(&udp, &owner, Phase::Add);
                    return Ok(result);
                }
                Err(e) => e,
            };
            // A key already held (EEXIST; also the pod's own route_localnet
            // entry on a repeated ADD), a range overlapping another
            // (ENOTEMPTY), or an element of ours gone meanwhile (ENOENT):
            // who holds what?
            if ![libc::EEXIST, libc::ENOTEMPTY, libc::ENOENT].contains(&e.errno().unwrap_or(0)) {
                return Err(to_cni(e));
            }
            let taken = conflicts(&wanted, &owner)?;
            if !taken.is_empty() {
                return Err(plugin_error(
                    codes::CONFLICT,
                    format!(
                        "hostPort already mapped to another container: {}",
                        taken.join(", ")
                    ),
                ));
            }
            // Only the pod's own elements are in the way (a repeated ADD):
            // replace them, in the same transaction.
            old = owned_elements(&owner)?.0;
            last = Some(e);
        }
        Err(to_cni(last.expect("the loop ran")))
    }

    fn del(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        // Neither the mappings nor the address are needed: the pod's
        // elements carry its comment, made of (network, container ID, ifname).
        let owner = rules::Owner::new(&conf.name, &args.container_id, &args.ifname);
        let mut last = None;
        for _ in 0..3 {
            let (owned, localnet) = owned_elements(&owner)?;
            if owned.is_empty() {
                return Ok(());
            }
            let mut b = nft::Batch::new();
            for (set, elems) in &owned {
                b.del_elements(NftFamily::Inet, TABLE, set, elems);
            }
            // The interfaces this pod was the last route_localnet user of,
            // where ferry switched it on: the record goes in the same batch.
            let mut off = Vec::new();
            let parsed: Vec<_> = localnet
                .iter()
                .filter_map(|e| Some((rules::parse_localnet_key(&e.key)?, e)))
                .collect();
            let mine = owned
                .iter()
                .filter(|(set, _)| set == rules::LOCALNET_SET)
                .flat_map(|(_, elems)| elems)
                .filter_map(|e| rules::parse_localnet_key(&e.key));
            for (iface, _) in mine {
                let on = rules::LocalnetEntry::SwitchedOn;
                let others = parsed
                    .iter()
                    .any(|((name, entry), e)| *name == iface && *entry != on && !owner.owns(e));
                let record = parsed
                    .iter()
                    .find(|((name, entry), _)| *name == iface && *entry == on);
                if !others && let Some((_, record)) = record {
                    b.del_elements(
                        NftFamily::Inet,
                        TABLE,
                        rules::LOCALNET_SET,
                        std::slice::from_ref(*record),
                    );
                    off.push(iface);
                }
            }
            let udp: Vec<UdpDnat> = owned
                .iter()
                .flat_map(|(set, elems)| elems.iter().filter_map(|e| udp_dnat(set, e)))
                .collect();
            // A racing DEL may remove some of them between the dump and the
            // batch (ENOENT, nothing applied): look again.
            match b.commit() {
                Ok(()) => {
                    for iface in off {
                        switch_localnet_off(&iface)?;
                    }
                    // After the elements are gone: a flushed flow's next
                    // packet no longer meets the pod's DNAT.
                    flush_stale_flows(&udp, &owner, Phase::Del);
                    return Ok(());
                }
                Err(e) if e.is_errno(libc::ENOENT) => last = Some(e),
                Err(e) => return Err(to_cni(e)),
            }
        }
        Err(to_cni(last.expect("the loop ran")))
    }

    fn check(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let result = prev_result(conf)?;
        let pm = load(conf)?;
        let pod = pod_addrs(&result, &args.ifname);
        let owner = rules::Owner::new(&conf.name, &args.container_id, &args.ifname);
        let wanted = rules::elements(&pm, &pod, &owner.comment);
        if wanted.is_empty() {
            return Ok(());
        }
        let fail = |msg: String| plugin_error(codes::CHECK, msg);
        for chain in rules::base_chains(&pm) {
            if !nft::chain_exists(NftFamily::Inet, TABLE, &chain).map_err(to_cni)? {
                return Err(fail(format!(
                    "chain {chain} missing from table inet {TABLE}"
                )));
            }
        }
        let mut sets: Vec<&str> = wanted.iter().map(|e| e.set.as_str()).collect();
        sets.sort();
        sets.dedup();
        for set in sets {
            let dump = nft::set_elements(NftFamily::Inet, TABLE, set).map_err(to_cni)?;
            let by_key: HashMap<(&[u8], Option<&[u8]>), &SetElement> = dump
                .iter()
                .map(|d| ((d.key.as_slice(), d.key_end.as_deref()), d))
                .collect();
            for e in wanted.iter().filter(|e| e.set == set) {
                let key = rules::key_text(set, &e.elem.key);
                match by_key.get(&(e.elem.key.as_slice(), e.elem.key_end.as_deref())) {
                    Some(d) if !owner.owns(d) => {
                        return Err(fail(format!(
                            "{key} in {set} of table inet {TABLE} ({}) belongs to {}, not to this container",
                            e.what,
                            d.comment.as_deref().unwrap_or("an element without comment")
                        )));
                    }
                    Some(d) if d.data != e.elem.data => {
                        return Err(fail(format!(
                            "{key} in {set} of table inet {TABLE} ({}) does not DNAT to the pod's address and port",
                            e.what
                        )));
                    }
                    Some(_) => {}
                    None => {
                        return Err(fail(format!(
                            "{key} ({}) missing from {set} of table inet {TABLE}",
                            e.what
                        )));
                    }
                }
            }
        }
        Ok(())
    }
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

    /// The UDP DNATs are read back from the very elements ADD writes (and
    /// DEL finds): TCP ones and masquerade ranges are not conntrack's
    /// business here.
    #[test]
    fn udp_dnats_from_the_pods_elements() {
        let conf = json!({"cniVersion": "1.0.0", "name": "n", "type": "ferry-portmap",
            "runtimeConfig": {"portMappings": [
                {"hostPort": 5353, "containerPort": 53, "protocol": "udp"},
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                {"hostPort": 5000, "containerPort": 50, "protocol": "udp", "hostIP": "192.0.2.7"}]}});
        let pm = PortmapConf::load(&NetConf::from_value(conf).unwrap()).unwrap();
        let pod = PodAddrs {
            v4: Some("10.88.0.5/24".parse().unwrap()),
            v6: Some("fd00::5/64".parse().unwrap()),
        };
        let mut got: Vec<UdpDnat> = rules::elements(&pm, &pod, "hp-x n/c/eth0")
            .iter()
            .filter_map(|e| udp_dnat(&e.set, &e.elem))
            .collect();
        got.sort_by_key(|d| (d.host_port, d.v4));
        assert_eq!(
            got,
            vec![
                UdpDnat {
                    host_ip: Some("192.0.2.7".parse().unwrap()),
                    v4: true,
                    host_port: 5000,
                    target: "10.88.0.5:50".parse().unwrap(),
                },
                UdpDnat {
                    host_ip: None,
                    v4: false,
                    host_port: 5353,
                    target: "[fd00::5]:53".parse().unwrap(),
                },
                UdpDnat {
                    host_ip: None,
                    v4: true,
                    host_port: 5353,
                    target: "10.88.0.5:53".parse().unwrap(),
                },
            ]
        );
        // A malformed element is not a DNAT.
        let bad = SetElement {
            key: vec![17, 0, 0, 0, 0x13],
            data: Some(vec![10, 88, 0, 5, 0, 53, 0, 0]),
            ..Default::default()
        };
        assert_eq!(udp_dnat(rules::MAP_V4, &bad), None);
    }

    /// What each phase deletes: ADD every flow to the hostPort on the
    /// node's addresses of the family but a hostIP another pod holds the
    /// port on; DEL only the flows DNATed to the pod.
    #[test]
    fn flow_filters_per_phase() {
        let wildcard = UdpDnat {
            host_ip: None,
            v4: true,
            host_port: 5353,
            target: "10.88.0.5:53".parse().unwrap(),
        };
        let pinned = UdpDnat {
            host_ip: Some("192.0.2.7".parse().unwrap()),
            v4: true,
            host_port: 5000,
            target: "10.88.0.5:50".parse().unwrap(),
        };
        let local: Vec<IpNetwork> = ["127.0.0.0/8", "192.0.2.7/32", "198.18.0.1/32", "::1/128"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let held = vec![
            ("192.0.2.7".parse().unwrap(), 5353),
            ("192.0.2.7".parse().unwrap(), 9999),
        ];
        let add = flow_filters(
            &[wildcard.clone(), pinned.clone()],
            Phase::Add,
            &local,
            &held,
        );
        assert_eq!(add[0].dst, local[..3].to_vec());
        assert_eq!(add[0].dst_except, vec![held[0].0]);
        assert_eq!(add[0].translated_to, None);
        assert_eq!(
            add[1].dst,
            vec!["192.0.2.7/32".parse::<IpNetwork>().unwrap()]
        );
        assert!(add[1].dst_except.is_empty());
        let del = flow_filters(&[wildcard, pinned], Phase::Del, &local, &held);
        assert!(del.iter().all(|f| f.dst_except.is_empty()));
        assert_eq!(del[0].translated_to, Some("10.88.0.5:53".parse().unwrap()));
        assert_eq!(del[1].translated_to, Some("10.88.0.5:50".parse().unwrap()));
        assert!(del.iter().all(|f| f.proto == conntrack::UDP));
    }
}
