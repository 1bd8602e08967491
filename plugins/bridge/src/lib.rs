//! `ferry-bridge`: every pod gets a veth pair whose host end sits on the node
//! bridge, and addresses and routes from the IPAM plugin.
//!
//! An ADD is a handful of netlink round trips: look up (or create) the
//! bridge, one RTM_NEWLINK for the whole veth pair (pod end born inside the
//! pod namespace, host end enslaved and up), the pod's addresses and routes,
//! and, only for the first pod of a network, the gateway address and the
//! masquerade state. Anything that fails after a step succeeded is undone
//! before the error is returned.
//!
//! The host veth's name is derived from (container ID, ifname), so DEL finds
//! it without the pod's namespace, and a retried ADD finds its leftover. The
//! name is a hash and two pods can share it: the veth's alias records its
//! owner ([`veth_owner`]; without an alias, an ADD stopped before setting it,
//! the owner's MAC given at creation says it), and ADD, CHECK and DEL act
//! only on a veth that is their attachment's. ADD of a pod whose name is
//! taken by another attachment fails with code [`NAME_TAKEN`] and undoes
//! itself. It never picks another name: DEL must find the veth by name
//! without the netns, and a collision of real (random, 64-hex-digit) IDs is
//! about one in 35 million for 1000 pods on a node, so a clear, rare failure is
//! better than a search on every DEL.

pub mod config;
pub mod masq;
pub mod readiness;
pub mod spoofchk;

use config::{BridgeConf, first_host, format_mac, vlan_gateway_name};
use ferry_cni::delegate::exec_ipam;
use ferry_cni::{
    CmdArgs, CniError, CniResult, Command, ErrorCode, Interface, NetConf, Plugin, Route,
};
use ferry_netops::{
    BridgeSpec, Link, LinkOwner, NetNs, NetopsError, NsHandle, PortVlan, RouteSpec, Runtime,
    VethPair, block_on, in_netns, join, join_all, join3, sysctl, to_cni,
};
use ipnetwork::IpNetwork;
use std::net::IpAddr;

pub struct Bridge;

/// ADD: the host veth's name belongs to a link of another attachment (or to
/// a link ferry did not make).
pub const NAME_TAKEN: u32 = 113;

/// The owner recorded in a pod's host veth's alias.
pub fn veth_owner(network: &str, container_id: &str, ifname: &str) -> LinkOwner {
    LinkOwner::new("ferry-bridge", network, container_id, ifname)
}

/// Host-side veth name: "veth" + 11 hex digits of a hash of (container ID,
/// ifname). 44 bits: rare by chance, but a colliding pair of IDs is found
/// by brute force in seconds, so the name alone never proves ownership
/// ([`veth_owner`]).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    // FNV-1a: stable across releases and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("veth{:011x}", h & 0xfff_ffff_ffff)
}

/// A locally administered unicast MAC derived from the bridge name, so the
/// bridge keeps one MAC for its life and across re-creations.
pub fn bridge_mac(bridge: &str) -> [u8; 6] {
    let name = host_veth_name(bridge, "bridge");
    let h = u64::from_str_radix(&name[4..], 16).expect("hex");
    let b = h.to_be_bytes();
    [0x02, b[3], b[4], b[5], b[6], b[7]]
}

fn plugin_error(code: u32, msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::Plugin(code), msg)
}

/// ADD found the host veth's name on a link that is not this attachment's.
fn name_taken(link: &Link, owner: &LinkOwner) -> CniError {
    plugin_error(
        NAME_TAKEN,
        format!(
            "host interface name {} is taken by {}; this attachment is {:?}: refusing to delete or reuse it",
            link.name,
            LinkOwner::describe_other(link),
            owner.alias()
        ),
    )
}

/// What a failed ADD has to undo.
#[derive(Default)]
struct Progress {
    ipam_done: bool,
    host_veth: Option<u32>,
    /// The host veth whose macspoofchk state was added.
    spoofchk: Option<String>,
}

impl Plugin for Bridge {
    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
        let bc = BridgeConf::load(conf, args)?;
        let netns_path = args
            .netns
            .clone()
            .expect("the skeleton requires CNI_NETNS for ADD");
        let pod_ns = open_pod_netns(&netns_path)?;
        let mut progress = Progress::default();
        let outcome = add(&pod_ns, args, conf, &bc, &mut progress);
        if let Err(e) = &outcome {
            undo(args, conf, &progress, e);
        }
        outcome
    }

    fn del(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let bc = BridgeConf::load(conf, args)?;
        // The IPAM plugin is a process of its own: it releases the address
        // while this thread removes the link (the two do not depend on each
        // other, and the address is released whatever happens to the link).
        let host_name = host_veth_name(&args.container_id, &args.ifname);
        let owner = veth_owner(&bc.network, &args.container_id, &args.ifname);
        let (link_result, spoof_result, ipam_result) = std::thread::scope(|s| {
            let ipam = s.spawn(|| exec_ipam(Command::Del, args, conf).map(|_| ()));
            // The link first: with the namespace gone it is gone too;
            // otherwise deleting the host end removes the pod end with it.
            // A link of that name with another owner is another pod's (or
            // not ferry's): left alone, and so is the macspoofchk state
            // keyed by its name.
            let link_result = block_on(async {
                let host = NsHandle::host()?;
                match host.link_by_name(&host_name).await? {
                    Some(l) if owner.owns(&l) => {
                        host.delete_link(l.index).await?;
                        Ok(true)
                    }
                    Some(l) => {
                        eprintln!(
                            "ferry-bridge: DEL: {} is not this attachment's ({}), left alone",
                            LinkOwner::describe_other(&l),
                            owner.alias()
                        );
                        Ok(false)
                    }
                    None => Ok(true),
                }
            })
            .map_err(to_cni);
            // Whether or not this config asks for macspoofchk (it may have
            // been turned off since the ADD): one netlink lookup when there
            // is none. Without the option, a failure (no nf_tables on this
            // node) is only logged.
            let spoof_result = match &link_result {
                Ok(false) => Ok(()),
                _ => match spoofchk::remove(&host_name) {
                    Err(e) if !bc.macspoofchk => {
                        eprintln!("ferry-bridge: DEL: macspoofchk cleanup skipped: {e}");
                        Ok(())
                    }
                    r => r.map_err(to_cni),
                },
            };
            let link_result = link_result.map(drop);
            let ipam_result = join_thread(ipam);
            (link_result, spoof_result, ipam_result)
        });
        link_result.and(spoof_result).and(ipam_result)
    }

    fn check(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let bc = BridgeConf::load(conf, args)?;
        let prev = conf
            .prev_result
            .as_ref()
            .ok_or_else(|| CniError::invalid_config("CHECK needs prevResult"))?;
        let prev = CniResult::from_json(prev)?;
        let netns_path = args
            .netns
            .clone()
            .expect("the skeleton requires CNI_NETNS for CHECK");
        let pod_ns = open_pod_netns(&netns_path)?;
        block_on(async { Ok(check(&pod_ns, args, &bc, &prev).await) })
            .map_err(to_cni)
            .and_then(|r| r)?;
        exec_ipam(Command::Check, args, conf)?;
        if bc.ip_masq {
            let subnets: Vec<IpNetwork> = prev.ips.iter().map(|ip| ip.address).collect();
            if let Some(p) =
                masq::problem(&bc.network, &subnets, &bc.ip_masq_exclude).map_err(to_cni)?
            {
                return Err(plugin_error(110, p));
            }
        }
        Ok(())
    }

    fn gc(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        exec_ipam(Command::Gc, args, conf).map(|_| ())
    }

    fn status(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        // The node first (ferryd's lease and readiness, when the config
        // names where ferryd publishes it), then the addresses left.
        if let Some(path) = config::readiness_file(conf)? {
            readiness::check(&path, &readiness::ipam_subnets(conf.ipam.as_ref()))?;
        }
        exec_ipam(Command::Status, args, conf).map(|_| ())
    }
}

/// The result of a scoped thread; a panic there is a panic here.
fn join_thread<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// ADD in two steps on one runtime. The IPAM plugin (a process of its own,
/// on a thread that waits for it) is started first; meanwhile this thread
/// sets up everything that needs no address: the bridge, the veth pair, the
/// pod's netlink socket. Then the addresses, routes, gateway and masquerade.
/// A step failing before the allocation finished still waits for it, so the
/// undo knows whether there is an address to release.
fn add(
    pod_ns: &NetNs,
    args: &CmdArgs,
    conf: &NetConf,
    bc: &BridgeConf,
    progress: &mut Progress,
) -> Result<CniResult, CniError> {
    let (ipam, links) = std::thread::scope(|s| {
        let ipam = s.spawn(|| exec_ipam(Command::Add, args, conf));
        let links = Runtime::new()
            .map_err(to_cni)
            .and_then(|rt| Ok((rt.block_on(attach(pod_ns, args, bc, progress))?, rt)));
        (join_thread(ipam), links)
    });
    // The IPAM error first when both failed: it used to run first.
    progress.ipam_done = ipam.is_ok();
    let ipam = ipam?.ok_or_else(|| CniError::decoding("IPAM returned no result"))?;
    let (links, rt) = links?;
    if ipam.ips.is_empty() {
        return Err(CniError::invalid_config(
            "IPAM plugin returned no IP addresses",
        ));
    }
    rt.block_on(configure(pod_ns, args, bc, links, ipam))
}

/// The pod's links, before it has addresses.
struct Attached {
    host: NsHandle,
    br: Link,
    host_veth: Link,
    pod: NsHandle,
    eth: Link,
}

/// The bridge, the veth pair on it (pod end inside the pod), its VLANs,
/// hairpin and macspoofchk: all that needs no address.
async fn attach(
    pod_ns: &NetNs,
    args: &CmdArgs,
    bc: &BridgeConf,
    progress: &mut Progress,
) -> Result<Attached, CniError> {
    let host = NsHandle::host().map_err(to_cni)?;
    let br = host
        .ensure_bridge(&BridgeSpec {
            name: &bc.bridge,
            mtu: bc.mtu,
            mac: bridge_mac(&bc.bridge),
            promisc: bc.promisc_mode,
        })
        .await
        .map_err(to_cni)?;
    if bc.vlan != 0 || !bc.vlan_trunk.is_empty() {
        ensure_vlan_filtering(&host, &br).await?;
    }
    // A leftover of an earlier, interrupted ADD of the same pod would make
    // the create fail with EEXIST: remove it first. Only if it is this
    // attachment's: the name is a hash, and a link of another pod (or one
    // ferry did not make) that has it is never deleted or reused.
    let host_name = host_veth_name(&args.container_id, &args.ifname);
    let owner = veth_owner(&bc.network, &args.container_id, &args.ifname);
    if let Some(old) = host.link_by_name(&host_name).await.map_err(to_cni)? {
        if !owner.owns(&old) {
            return Err(name_taken(&old, &owner));
        }
        host.delete_link(old.index).await.map_err(to_cni)?;
    }
    let host_veth = host
        .create_owned_veth(
            &VethPair {
                host_name: &host_name,
                pod_name: &args.ifname,
                pod_ns,
                mtu: bc.mtu,
                pod_mac: bc.mac,
                controller: br.index,
            },
            &owner,
        )
        .await;
    let host_veth = match host_veth {
        Ok(l) => l,
        Err(e) if e.errno() == Some(libc::EEXIST) => {
            // The host name, taken since the lookup above (another ADD of a
            // pod with the same name), or the pod's interface.
            if let Ok(Some(l)) = host.link_by_name(&host_name).await
                && !owner.owns(&l)
            {
                return Err(name_taken(&l, &owner));
            }
            return Err(CniError::new(
                ErrorCode::Internal,
                format!(
                    "interface {} already exists in {}",
                    args.ifname,
                    pod_ns.path().display()
                ),
            ));
        }
        Err(e) => return Err(to_cni(e)),
    };
    progress.host_veth = Some(host_veth.index);
    setup_port_vlans(&host, host_veth.index, bc).await?;

    let pod = NsHandle::new(pod_ns).map_err(to_cni)?;
    let eth = pod
        .link_by_name(&args.ifname)
        .await
        .map_err(to_cni)?
        .ok_or_else(|| {
            CniError::new(
                ErrorCode::Internal,
                format!("{} missing in pod after creation", args.ifname),
            )
        })?;
    if bc.macspoofchk {
        // Set before the pod's interface is up: its first frame is checked.
        progress.spoofchk = Some(host_name.clone());
        spoofchk::add(&host_name, &format_mac(&eth.mac)).map_err(to_cni)?;
    }
    if bc.hairpin_mode {
        host.set_hairpin(host_veth.index, true)
            .await
            .map_err(to_cni)?;
    }
    Ok(Attached {
        host,
        br,
        host_veth,
        pod,
        eth,
    })
}

/// The pod's addresses and routes, the gateway on the bridge, forwarding and
/// masquerade, and the result.
async fn configure(
    pod_ns: &NetNs,
    args: &CmdArgs,
    bc: &BridgeConf,
    links: Attached,
    ipam: CniResult,
) -> Result<CniResult, CniError> {
    let Attached {
        host,
        br,
        host_veth,
        pod,
        eth,
    } = links;
    let host = &host;
    // Gateways: from IPAM, or the subnet's first host when we are the gateway.
    let ips: Vec<(IpNetwork, Option<IpAddr>)> = ipam
        .ips
        .iter()
        .map(|ip| {
            (
                ip.address,
                ip.gateway
                    .or_else(|| bc.is_gateway.then(|| first_host(ip.address))),
            )
        })
        .collect();
    let has_v6 = ips.iter().any(|(a, _)| a.is_ipv6());

    if has_v6 && !bc.enable_dad {
        // Without DAD the address is usable at once instead of after ~1 s.
        let key = format!("net/ipv6/conf/{}/accept_dad", args.ifname);
        in_netns(pod_ns, move || ignore_missing(sysctl::write(&key, "0"))).map_err(|e| {
            to_cni(NetopsError::Io {
                op: "disable DAD".into(),
                netns: pod_ns.path().display().to_string(),
                source: e,
            })
        })?;
    }
    let mut routes: Vec<Route> = ipam.routes.clone();
    if bc.is_default_gateway {
        for (addr, gw) in &ips {
            let default: IpNetwork = if addr.is_ipv4() { "0.0.0.0/0" } else { "::/0" }
                .parse()
                .expect("valid");
            if gw.is_some() && !routes.iter().any(|r| r.dst == default) {
                routes.push(Route::new(default, *gw));
            }
        }
    }
    let route_specs: Vec<RouteSpec> = routes
        .iter()
        .map(|r| RouteSpec {
            dst: r.dst,
            gw: r.gw.or_else(|| {
                ips.iter()
                    .find(|(a, _)| a.is_ipv4() == r.dst.is_ipv4())
                    .and_then(|(_, g)| *g)
            }),
            oif: eth.index,
            onlink: false,
        })
        .collect();
    // The pod's addresses, link up and routes go out back to back on the
    // pod's socket (the kernel handles them in order, so each route finds
    // its address), while the host's socket sets the gateway: one wait for
    // all instead of one per request. The first error in that order wins.
    let pod_side = async {
        let (addrs, up, routes) = join3(
            join_all(
                ips.iter()
                    .map(|(addr, _)| pod.replace_address(eth.index, *addr)),
            ),
            pod.set_up(eth.index),
            join_all(route_specs.iter().map(|r| pod.replace_route(r))),
        )
        .await;
        addrs
            .into_iter()
            .chain([up])
            .chain(routes)
            .collect::<Result<Vec<()>, _>>()
            .map_err(to_cni)
    };
    let (pod_result, gateway) = join(pod_side, gateway(host, &br, bc, &ips)).await;
    pod_result?;
    let vlan_gateway = gateway?;

    if bc.is_gateway {
        let families = (ips.iter().any(|(a, _)| a.is_ipv4()), has_v6);
        enable_forwarding(families)?;
    }

    let subnets: Vec<IpNetwork> = ips
        .iter()
        .map(|(a, _)| IpNetwork::new(a.network(), a.prefix()).expect("same prefix"))
        .collect();
    if bc.ip_masq {
        masq::ensure(&bc.network, &subnets, &bc.ip_masq_exclude).map_err(to_cni)?;
    } else {
        masq::ensure_absent(&subnets).map_err(to_cni)?;
    }

    // A bridge whose MAC was set (ours is pinned at creation) keeps it; one
    // with a kernel-chosen MAC may just have taken the new port's: re-read.
    let br_now = if br.mac == bridge_mac(&bc.bridge) {
        br
    } else {
        host.link_by_index(br.index)
            .await
            .map_err(to_cni)?
            .unwrap_or(br)
    };
    let mut result = CniResult {
        interfaces: vec![
            Interface {
                name: br_now.name.clone(),
                mac: format_mac(&br_now.mac),
                ..Default::default()
            },
            Interface {
                name: host_veth.name.clone(),
                mac: format_mac(&host_veth.mac),
                ..Default::default()
            },
            Interface {
                name: args.ifname.clone(),
                mac: format_mac(&eth.mac),
                mtu: Some(bc.mtu),
                sandbox: pod_ns.path().display().to_string(),
                ..Default::default()
            },
        ],
        ips: ipam.ips.clone(),
        routes,
        dns: ipam.dns.clone(),
    };
    if let Some(gw) = vlan_gateway {
        result.interfaces.push(Interface {
            name: gw.name.clone(),
            mac: format_mac(&gw.mac),
            ..Default::default()
        });
    }
    for (ip, (_, gw)) in result.ips.iter_mut().zip(&ips) {
        ip.interface = Some(2);
        ip.gateway = *gw;
    }
    Ok(result)
}

/// The gateway addresses when we are the gateway: on the bridge, or with a
/// VLAN on "<bridge>.<vlan>" (the bridge itself, VLAN 1, cannot reach the
/// pods there), the end of a veth pair whose other end is a port of that
/// VLAN (the reference's layout); that link is returned for the result.
async fn gateway(
    host: &NsHandle,
    br: &Link,
    bc: &BridgeConf,
    ips: &[(IpNetwork, Option<IpAddr>)],
) -> Result<Option<Link>, CniError> {
    if !bc.is_gateway {
        return Ok(None);
    }
    let (gw_index, gw_name, vlan_gateway) = if bc.vlan != 0 {
        let gw = ensure_vlan_gateway(host, br.index, bc).await?;
        (gw.index, gw.name.clone(), Some(gw))
    } else {
        (br.index, bc.bridge.clone(), None)
    };
    ensure_gateways(host, gw_index, &gw_name, bc.force_address, ips).await?;
    Ok(vlan_gateway)
}

/// The gateway address of each pod subnet on the bridge. Another address of
/// the same subnet there is an error unless `forceAddress` says to replace it.
async fn ensure_gateways(
    host: &NsHandle,
    br: u32,
    br_name: &str,
    force: bool,
    ips: &[(IpNetwork, Option<IpAddr>)],
) -> Result<(), CniError> {
    let present = host.addresses(br).await.map_err(to_cni)?;
    for (addr, gw) in ips {
        let Some(gw) = gw else { continue };
        let want = IpNetwork::new(*gw, addr.prefix())
            .map_err(|e| CniError::invalid_config(e.to_string()))?;
        if present.contains(&want) {
            continue;
        }
        for other in present
            .iter()
            .filter(|p| p.is_ipv4() == want.is_ipv4() && p.contains(want.ip()))
        {
            if !force {
                return Err(plugin_error(
                    111,
                    format!(
                        "bridge {br_name} already has address {other}, not {want} (set forceAddress to replace it)"
                    ),
                ));
            }
            host.delete_address(br, *other).await.map_err(to_cni)?;
        }
        host.replace_address_nodad(br, want).await.map_err(to_cni)?;
    }
    Ok(())
}

/// VLAN filtering on the bridge; an existing bridge is switched over (its
/// ports keep the default VLAN 1, so pods without a VLAN keep working).
async fn ensure_vlan_filtering(host: &NsHandle, br: &Link) -> Result<(), CniError> {
    if !host.bridge_vlan_filtering(br.index).await.map_err(to_cni)? {
        host.set_bridge_vlan_filtering(br.index, true)
            .await
            .map_err(|e| vlan_error(e, &br.name))?;
    }
    Ok(())
}

/// EOPNOTSUPP here means a kernel built without bridge VLAN filtering
/// (CONFIG_BRIDGE_VLAN_FILTERING): the configured isolation cannot be had on
/// this node, which is the spec's code 2 rather than an internal error.
fn vlan_error(e: NetopsError, bridge: &str) -> CniError {
    if e.is_errno(libc::EOPNOTSUPP) {
        CniError::new(
            ErrorCode::UnsupportedField,
            format!(
                "\"vlan\"/\"vlanTrunk\" cannot be honoured on this node: the kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING) for bridge {bridge}"
            ),
        )
        .with_details(e)
    } else {
        to_cni(e)
    }
}

/// The VLANs a pod's port (or the VLAN gateway's port) should carry.
fn wanted_vlans(bc: &BridgeConf) -> Vec<PortVlan> {
    if bc.vlan != 0 {
        vec![PortVlan::access(bc.vlan)]
    } else {
        bc.vlan_trunk.iter().map(|v| PortVlan::tagged(*v)).collect()
    }
}

/// An access port (PVID + untagged `vlan`) or a trunk port (tagged
/// `vlanTrunk`); without `preserveDefaultVlan` the port's other VLANs (the
/// bridge's default VLAN 1) are removed first, as the reference does.
async fn setup_port_vlans(host: &NsHandle, port: u32, bc: &BridgeConf) -> Result<(), CniError> {
    let want = wanted_vlans(bc);
    if want.is_empty() {
        return Ok(());
    }
    if !bc.preserve_default_vlan {
        let have: Vec<u16> = host
            .port_vlans(port)
            .await
            .map_err(to_cni)?
            .iter()
            .map(|v| v.vid)
            .collect();
        host.del_port_vlans(port, &have).await.map_err(to_cni)?;
    }
    host.add_port_vlans(port, &want)
        .await
        .map_err(|e| vlan_error(e, &bc.bridge))
}

/// `<bridge>.<vlan>`: created once per bridge and VLAN (one end of a veth
/// pair whose other end, named by [`host_veth_name`] of it, is an access
/// port of the VLAN), then reused. Safe when ADDs race (EEXIST is success),
/// and the port's VLAN is re-applied each time so an ADD interrupted after
/// creating the pair is repaired by the next one.
async fn ensure_vlan_gateway(host: &NsHandle, br: u32, bc: &BridgeConf) -> Result<Link, CniError> {
    let name = vlan_gateway_name(&bc.bridge, bc.vlan);
    let port_name = host_veth_name(&name, "gateway");
    let created = if host.link_by_name(&name).await.map_err(to_cni)?.is_none() {
        match host.create_local_veth(&name, &port_name, bc.mtu, br).await {
            Ok(()) => true,
            Err(e) if e.is_errno(libc::EEXIST) => false,
            Err(e) => return Err(to_cni(e)),
        }
    } else {
        false
    };
    // An interface of that name made by someone else (a VLAN device on the
    // bridge, say) is used as it is, like the reference does. Its port's
    // name is a hash like a pod's host veth: a port carrying another owner
    // (a pod's veth that drew the same name) is refused, never changed.
    let owner = LinkOwner::new(
        "ferry-bridge-vlan-gateway",
        &bc.bridge,
        &bc.vlan.to_string(),
        "gateway",
    );
    if let Some(port) = host.link_by_name(&port_name).await.map_err(to_cni)? {
        if port.alias.is_some() && !owner.owns(&port) {
            return Err(name_taken(&port, &owner));
        }
        if created {
            host.set_alias(port.index, owner.alias())
                .await
                .map_err(to_cni)?;
            setup_port_vlans(host, port.index, bc).await?;
        } else {
            host.add_port_vlans(port.index, &wanted_vlans(bc))
                .await
                .map_err(to_cni)?;
        }
    }
    let gw = host.require_link(&name).await.map_err(to_cni)?;
    if !gw.is_up {
        host.set_up(gw.index).await.map_err(to_cni)?;
    }
    Ok(gw)
}

fn enable_forwarding((v4, v6): (bool, bool)) -> Result<(), CniError> {
    let io = |e: std::io::Error| CniError::io("enable IP forwarding").with_details(e);
    if v4 {
        sysctl::write("net/ipv4/ip_forward", "1").map_err(io)?;
    }
    if v6 {
        ignore_missing(sysctl::write("net/ipv6/conf/all/forwarding", "1")).map_err(io)?;
    }
    Ok(())
}

/// IPv6 may be disabled: its sysctls are then missing, which is fine.
fn ignore_missing(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Undo after a failed ADD: the veth (which takes the pod end with it), then
/// the address. Failures here are logged, the original error is returned.
fn undo(args: &CmdArgs, conf: &NetConf, progress: &Progress, cause: &CniError) {
    if let Some(host_veth) = &progress.spoofchk
        && let Err(e) = spoofchk::remove(host_veth)
    {
        eprintln!("ferry-bridge: undo after \"{cause}\": remove macspoofchk state: {e}");
    }
    if let Some(index) = progress.host_veth {
        let r = block_on(async { NsHandle::host()?.delete_link(index).await });
        if let Err(e) = r {
            eprintln!("ferry-bridge: undo after \"{cause}\": delete veth: {e}");
        }
    }
    if progress.ipam_done
        && let Err(e) = exec_ipam(Command::Del, args, conf)
    {
        eprintln!("ferry-bridge: undo after \"{cause}\": release address: {e}");
    }
}

async fn check(
    pod_ns: &NetNs,
    args: &CmdArgs,
    bc: &BridgeConf,
    prev: &CniResult,
) -> Result<(), CniError> {
    let fail = |msg: String| plugin_error(112, msg);
    let nsname = pod_ns.path().display().to_string();
    let host = NsHandle::host().map_err(to_cni)?;
    let pod = NsHandle::new(pod_ns).map_err(to_cni)?;

    let eth = pod
        .link_by_name(&args.ifname)
        .await
        .map_err(to_cni)?
        .ok_or_else(|| fail(format!("interface {} missing in {nsname}", args.ifname)))?;
    if !eth.is_up {
        return Err(fail(format!(
            "interface {} is down in {nsname}",
            args.ifname
        )));
    }
    let have = pod.addresses(eth.index).await.map_err(to_cni)?;
    for ip in &prev.ips {
        if !have.contains(&ip.address) {
            return Err(fail(format!(
                "address {} missing on {} in {nsname}",
                ip.address, args.ifname
            )));
        }
    }
    let routes = pod.routes_via(eth.index).await.map_err(to_cni)?;
    for r in &prev.routes {
        if !routes
            .iter()
            .any(|have| have.dst == r.dst && (r.gw.is_none() || have.gw == r.gw))
        {
            return Err(fail(format!("route to {} missing in {nsname}", r.dst)));
        }
    }

    let br = host
        .link_by_name(&bc.bridge)
        .await
        .map_err(to_cni)?
        .ok_or_else(|| fail(format!("bridge {} missing", bc.bridge)))?;
    let host_name = host_veth_name(&args.container_id, &args.ifname);
    let veth = host
        .link_by_name(&host_name)
        .await
        .map_err(to_cni)?
        .ok_or_else(|| fail(format!("host veth {host_name} missing")))?;
    let owner = veth_owner(&bc.network, &args.container_id, &args.ifname);
    if !owner.owns(&veth) {
        return Err(fail(format!(
            "host veth {} is not this attachment's ({})",
            LinkOwner::describe_other(&veth),
            owner.alias()
        )));
    }
    if veth.controller != Some(br.index) {
        return Err(fail(format!(
            "host veth {host_name} is not attached to bridge {}",
            bc.bridge
        )));
    }
    if !veth.is_up {
        return Err(fail(format!("host veth {host_name} is down")));
    }

    let want = wanted_vlans(bc);
    if !want.is_empty() {
        if !host.bridge_vlan_filtering(br.index).await.map_err(to_cni)? {
            return Err(fail(format!(
                "bridge {} does not filter VLANs (vlan_filtering 0)",
                bc.bridge
            )));
        }
        let have = host.port_vlans(veth.index).await.map_err(to_cni)?;
        for w in &want {
            if !have.contains(w) {
                return Err(fail(format!(
                    "host veth {host_name} lacks VLAN {} ({}); it has {}",
                    w.vid,
                    if w.pvid { "PVID untagged" } else { "tagged" },
                    describe_vlans(&have)
                )));
            }
        }
        if !bc.preserve_default_vlan && have.len() != want.len() {
            return Err(fail(format!(
                "host veth {host_name} has VLANs beyond the configured ones: {}",
                describe_vlans(&have)
            )));
        }
        if bc.vlan != 0 && bc.is_gateway {
            let gw_name = vlan_gateway_name(&bc.bridge, bc.vlan);
            match host.link_by_name(&gw_name).await.map_err(to_cni)? {
                Some(gw) if gw.is_up => {}
                Some(_) => return Err(fail(format!("VLAN gateway {gw_name} is down"))),
                None => return Err(fail(format!("VLAN gateway {gw_name} missing"))),
            }
        }
    }

    if bc.macspoofchk {
        let mac: [u8; 6] = eth.mac.as_slice().try_into().map_err(|_| {
            fail(format!(
                "interface {} in {nsname} has no Ethernet address",
                args.ifname
            ))
        })?;
        if let Some(p) = spoofchk::problem(&host_name, &mac).map_err(to_cni)? {
            return Err(fail(format!("macspoofchk: {p}")));
        }
    }
    Ok(())
}

fn describe_vlans(vlans: &[PortVlan]) -> String {
    if vlans.is_empty() {
        return "none".to_string();
    }
    vlans
        .iter()
        .map(|v| {
            let mut s = v.vid.to_string();
            if v.pvid {
                s.push_str(" PVID");
            }
            if v.untagged {
                s.push_str(" untagged");
            }
            s
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The pod's namespace, refused when it is this process's own (the node's):
/// the skeleton checked the path, this checks what was opened, in case the
/// path was pointed elsewhere in between.
fn open_pod_netns(path: &std::path::Path) -> Result<NetNs, CniError> {
    let ns = NetNs::open(path).map_err(to_cni)?;
    if ns.is_callers_own().map_err(to_cni)? {
        return Err(CniError::invalid_env(format!(
            "CNI_NETNS {} is the plugin's own network namespace, not a pod's",
            path.display()
        )));
    }
    Ok(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_are_stable_and_valid() {
        let a = host_veth_name("0123456789abcdef", "eth0");
        assert_eq!(a, host_veth_name("0123456789abcdef", "eth0"));
        assert_ne!(a, host_veth_name("0123456789abcdef", "eth1"));
        assert_ne!(a, host_veth_name("0123456789abcdee", "eth0"));
        assert!(a.starts_with("veth") && a.len() == 15, "{a}");
        ferry_cni::args::validate_ifname(&a).unwrap();
    }

    #[test]
    fn bridge_mac_is_local_unicast() {
        let m = bridge_mac("cni0");
        assert_eq!(m[0] & 0b11, 0b10);
        assert_eq!(m, bridge_mac("cni0"));
        assert_ne!(m, bridge_mac("cni1"));
    }
}
