//! `ferryd doctor`: read-only checks of this node's pod network, each OK /
//! WARN / FAIL with what was seen and a one-line hint.
//!
//! Nothing here writes: etcd is read (config, leases), the kernel is dumped
//! once per kind (links, routes, neighbours, fdb, nftables elements), files
//! are opened without following symlinks or blocking. Checks that need
//! something another check could not get (etcd down: no peer list) say so
//! as a WARN instead of guessing.

use crate::cniconf;
use crate::daemon::{EtcdArgs, RunArgs, cni_log_path, store_options};
use crate::dataplane::{self, Underlay, vxlan_overhead};
use crate::lease::SubnetLease;
use crate::network::{BackendType, NetworkConfig, overlaps};
use crate::store::Store;
use ferry_cni::calllog;
use ferry_netops::{FERRY_ROUTE_PROTO, IpRoute, Link, NeighState, NsHandle, RouteEntry, RouteKind};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How many wrong entries a check names one by one.
const FIRST_FEW: usize = 5;
/// The longest doctor waits for etcd (it must answer in under 2 s in all).
const ETCD_TIMEOUT: Duration = Duration::from_millis(1200);
/// The longest doctor waits for ferryd's HTTP answers.
const HTTP_TIMEOUT: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Status {
    #[serde(rename = "OK")]
    Ok,
    #[serde(rename = "WARN")]
    Warn,
    #[serde(rename = "FAIL")]
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    pub hint: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub(crate) fn push(
        &mut self,
        name: &str,
        status: Status,
        detail: impl Into<String>,
        hint: &str,
    ) {
        self.checks.push(Check {
            name: name.into(),
            status,
            detail: detail.into(),
            hint: if status == Status::Ok {
                String::new()
            } else {
                hint.into()
            },
        });
    }
    pub(crate) fn ok(&mut self, name: &str, detail: impl Into<String>) {
        self.push(name, Status::Ok, detail, "");
    }
    fn worst(&self) -> Status {
        self.checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Ok)
    }

    /// The readable report.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for c in &self.checks {
            s.push_str(&format!(
                "{:<4}  {:<22} {}\n",
                c.status.as_str(),
                c.name,
                c.detail
            ));
            if !c.hint.is_empty() {
                s.push_str(&format!("      {:<22} hint: {}\n", "", c.hint));
            }
        }
        let count = |st| self.checks.iter().filter(|c| c.status == st).count();
        s.push_str(&format!(
            "\n{} OK, {} WARN, {} FAIL\n",
            count(Status::Ok),
            count(Status::Warn),
            count(Status::Fail)
        ));
        s
    }
}

/// Entry point of the subcommand; returns the exit code: 0 all OK (WARNs
/// included), 1 a FAIL, 2 doctor could not run.
pub async fn main(a: &EtcdArgs, r: &RunArgs, json: bool, probe: bool) -> i32 {
    let report = match run(a, r, probe).await {
        Ok(report) => report,
        Err(e) => {
            eprintln!("ferryd doctor could not run: {e}");
            return 2;
        }
    };
    let out = if json {
        let mut s = serde_json::to_string_pretty(&report).expect("report serializes");
        s.push('\n');
        s
    } else {
        report.text()
    };
    let _ = std::io::stdout().write_all(out.as_bytes());
    match report.worst() {
        Status::Fail => 1,
        _ => 0,
    }
}

/// What doctor learned from etcd.
struct Cluster {
    cfg: NetworkConfig,
    leases: Vec<SubnetLease>,
}

/// Runs every check. An error means doctor itself could not run (no
/// netlink socket, no underlay interface).
pub async fn run(a: &EtcdArgs, r: &RunArgs, probe: bool) -> Result<Report, String> {
    let mut rep = Report::default();
    let node_name = r.node_name.clone().unwrap_or_else(hostname);
    let h = NsHandle::host().map_err(|e| format!("open a netlink socket: {e}"))?;

    // etcd: reachable, config valid, leases.
    let cluster = check_etcd(a, &mut rep).await;

    // The underlay, as ferryd finds it.
    let underlay = dataplane::find_underlay(&h, r.iface.as_deref(), r.public_ip)
        .await
        .map_err(|e| format!("find the underlay interface: {e}"))?;

    // The lease.
    let own = check_lease(&cluster, &node_name, &underlay, &mut rep);

    // Files.
    let env_subnet = cniconf::read_subnet_env(&r.subnet_file);
    let local_subnet = own.as_ref().map(|l| l.subnet()).or(env_subnet);
    let conflist = check_files(r, &cluster, own.as_ref(), env_subnet, &underlay, &mut rep);

    // ferryd itself.
    check_ferryd(r, &mut rep);

    // The kernel, one dump per kind.
    let links = h.links().await.map_err(|e| format!("list links: {e}"))?;
    let routes = h
        .route_entries::<Ipv4Addr>()
        .await
        .map_err(|e| format!("list routes: {e}"))?;
    let by_name: HashMap<&str, &Link> = links.iter().map(|l| (l.name.as_str(), l)).collect();
    let by_index: HashMap<u32, &Link> = links.iter().map(|l| (l.index, l)).collect();

    let pod_mtu = cluster.as_ref().map(|c| match c.cfg.backend.kind {
        BackendType::Vxlan => underlay.mtu.saturating_sub(vxlan_overhead(underlay.ip)),
        BackendType::HostGw => underlay.mtu,
    });
    let vx = check_device(&h, &cluster, &underlay, pod_mtu, &mut rep).await;
    let broken = check_peers(
        &h,
        &cluster,
        local_subnet,
        &underlay,
        vx,
        &routes,
        &by_index,
        &mut rep,
    )
    .await;
    check_peers6(&h, &cluster, local_subnet, &underlay, vx, &mut rep).await;
    // The bridge's pod ports (veths) whose hairpin flag is off.
    let no_hairpin: Vec<String> = match by_name.get(r.bridge.as_str()) {
        Some(br) => {
            let hairpin = h.bridge_port_hairpin().await.unwrap_or_default();
            links
                .iter()
                .filter(|l| l.controller == Some(br.index) && l.kind.as_deref() == Some("veth"))
                .filter(|l| hairpin.get(&l.index) == Some(&false))
                .map(|l| l.name.clone())
                .collect()
        }
        None => Vec::new(),
    };
    check_sysctls(
        r,
        vx,
        &underlay,
        &by_name,
        conflist.as_ref(),
        &no_hairpin,
        &mut rep,
    );
    let bridge = check_bridge(&h, r, local_subnet, pod_mtu, &links, &by_name, &mut rep).await;
    let live = check_pods(r, &links, bridge, &mut rep);
    check_nft(r, bridge, local_subnet, conflist.as_ref(), &live, &mut rep);
    check_pitfalls(&underlay, conflist.as_ref(), &cluster, &mut rep);
    check_csum_offload(&cluster, vx, &by_index, &mut rep);
    check_cni_log(r, &mut rep);
    if probe {
        let taken = read_reservations(&ipam_dir(r))
            .iter()
            .filter_map(|res| match res.ip {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .collect();
        let peers = cluster_peers(&cluster, local_subnet);
        let input = crate::doctor_probe::ProbeInput {
            local: local_subnet,
            peers: &peers,
            taken,
            broken,
        };
        crate::doctor_probe::probe(&h, input, &mut rep).await;
    }
    Ok(rep)
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

async fn check_etcd(a: &EtcdArgs, rep: &mut Report) -> Option<Cluster> {
    let endpoints = a.etcd_endpoints.join(",");
    let hint = "start etcd or fix --etcd-endpoints / the TLS and auth flags";
    let opts = match store_options(a) {
        Ok(o) => o,
        Err(e) => {
            rep.push("etcd", Status::Fail, format!("{e}"), hint);
            return None;
        }
    };
    let work = async {
        let store = Store::connect(&opts).await.map_err(|e| e.to_string())?;
        let cfg = store.network_config().await;
        let leases = store.list_leases().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((cfg, leases.0))
    };
    match tokio::time::timeout(ETCD_TIMEOUT, work).await {
        Err(_) => {
            rep.push(
                "etcd",
                Status::Fail,
                format!("no answer from {endpoints} within {ETCD_TIMEOUT:?}"),
                hint,
            );
            None
        }
        Ok(Err(e)) => {
            rep.push("etcd", Status::Fail, format!("{endpoints}: {e}"), hint);
            None
        }
        Ok(Ok((Err(e), _))) => {
            rep.push(
                "etcd",
                Status::Fail,
                format!("{endpoints} answers, but the network config is missing or invalid: {e}"),
                "store it with `ferryd set-network '<json>'`",
            );
            None
        }
        Ok(Ok((Ok(cfg), leases))) => {
            rep.ok(
                "etcd",
                format!(
                    "{endpoints} reachable; network {} (backend {:?}, subnets /{}), {} leases",
                    cfg.network,
                    cfg.backend.kind,
                    cfg.subnet_len,
                    leases.len()
                ),
            );
            Some(Cluster { cfg, leases })
        }
    }
}

fn check_lease(
    cluster: &Option<Cluster>,
    node: &str,
    underlay: &Underlay,
    rep: &mut Report,
) -> Option<SubnetLease> {
    let Some(c) = cluster else {
        rep.push(
            "lease",
            Status::Warn,
            "not checked: etcd unreachable",
            "fix etcd first",
        );
        return None;
    };
    let mine: Vec<&SubnetLease> = c.leases.iter().filter(|l| l.node == node).collect();
    let hint = "start (or restart) ferryd on this node: it acquires a lease; check --node-name";
    match mine.as_slice() {
        [] => {
            rep.push(
                "lease",
                Status::Fail,
                format!("node {node:?} holds no lease in etcd"),
                hint,
            );
            None
        }
        [l, rest @ ..] => {
            if l.public_ip != underlay.ip {
                rep.push(
                    "lease",
                    Status::Fail,
                    format!(
                        "lease {} of {node:?} says public IP {}, this node's underlay is {} ({})",
                        l.subnet(),
                        l.public_ip,
                        underlay.ip,
                        underlay.name
                    ),
                    "another machine uses this node name, or --public-ip/--iface differ from ferryd's",
                );
            } else if !rest.is_empty() {
                rep.push(
                    "lease",
                    Status::Warn,
                    format!("node {node:?} holds {} leases", mine.len()),
                    "remove the extra ones with `ferryd remove-node` after checking which is live",
                );
            } else {
                rep.ok(
                    "lease",
                    format!("{} held by {node:?} at {}", l.subnet(), l.public_ip),
                );
            }
            Some((*l).clone())
        }
    }
}

/// What the conflist says, as doctor needs it.
struct Conflist {
    subnet: Option<Ipv4Network>,
    mtu: Option<u64>,
    masq_exclude: Vec<IpNetwork>,
    ip_masq: bool,
    hairpin: bool,
    network_name: String,
}

fn read_conflist(path: &Path) -> Result<Conflist, String> {
    let text = calllog::read_regular(path, 1 << 20)
        .ok_or_else(|| format!("{} is missing (or not a regular file)", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let bridge = v["plugins"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["type"] == "ferry-bridge"))
        .ok_or_else(|| format!("{}: no ferry-bridge plugin", path.display()))?;
    Ok(Conflist {
        subnet: bridge["ipam"]["ranges"][0][0]["subnet"]
            .as_str()
            .and_then(|s| s.parse().ok()),
        mtu: bridge["mtu"].as_u64(),
        masq_exclude: bridge["ipMasqExclude"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str()?.parse().ok())
            .collect(),
        ip_masq: bridge["ipMasq"].as_bool().unwrap_or(false),
        hairpin: bridge["hairpinMode"].as_bool().unwrap_or(false),
        network_name: v["name"].as_str().unwrap_or_default().to_string(),
    })
}

fn check_files(
    r: &RunArgs,
    cluster: &Option<Cluster>,
    own: Option<&SubnetLease>,
    env_subnet: Option<Ipv4Network>,
    underlay: &Underlay,
    rep: &mut Report,
) -> Option<Conflist> {
    let hint = "ferryd rewrites it on its next pass: check that ferryd runs and its --cni-conf-dir / --subnet-file";
    let want = own.map(|l| l.subnet());
    // FERRY_NETWORK and FERRY_MTU against the config (the subnet below).
    let env_text = calllog::read_regular(&r.subnet_file, 1 << 20).unwrap_or_default();
    let env_value = |key: &str| {
        env_text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::trim)
    };
    let mut env_wrong = Vec::new();
    if let Some(c) = cluster {
        if env_value("FERRY_NETWORK").and_then(|v| v.parse::<Ipv4Network>().ok())
            != Some(c.cfg.network)
        {
            env_wrong.push(format!(
                "FERRY_NETWORK={} (network {})",
                env_value("FERRY_NETWORK").unwrap_or("none"),
                c.cfg.network
            ));
        }
        let pod_mtu = match c.cfg.backend.kind {
            BackendType::Vxlan => underlay.mtu.saturating_sub(vxlan_overhead(underlay.ip)),
            BackendType::HostGw => underlay.mtu,
        };
        if env_value("FERRY_MTU").and_then(|v| v.parse::<u32>().ok()) != Some(pod_mtu) {
            env_wrong.push(format!(
                "FERRY_MTU={} (want {pod_mtu})",
                env_value("FERRY_MTU").unwrap_or("none")
            ));
        }
    }
    match (env_subnet, want) {
        (None, _) => rep.push(
            "files.subnet_env",
            Status::Fail,
            format!("{} missing or unreadable", r.subnet_file.display()),
            hint,
        ),
        (Some(s), Some(w)) if s != w => rep.push(
            "files.subnet_env",
            Status::Fail,
            format!("{} says {s}, the lease is {w}", r.subnet_file.display()),
            hint,
        ),
        (Some(s), _) if !env_wrong.is_empty() => rep.push(
            "files.subnet_env",
            Status::Fail,
            format!(
                "{}: {s}, but {}",
                r.subnet_file.display(),
                env_wrong.join(", ")
            ),
            hint,
        ),
        (Some(s), _) => rep.ok(
            "files.subnet_env",
            format!("{}: {s}", r.subnet_file.display()),
        ),
    }
    let path = r.cni_conf_dir.join(&r.cni_conf_name);
    let conf = match read_conflist(&path) {
        Ok(c) => c,
        Err(e) => {
            rep.push("files.conflist", Status::Fail, e, hint);
            return None;
        }
    };
    let mut wrong = Vec::new();
    if let Some(w) = want
        && conf.subnet != Some(w)
    {
        wrong.push(format!(
            "subnet {} (lease: {w})",
            conf.subnet.map(|s| s.to_string()).unwrap_or("none".into())
        ));
    }
    if let Some(c) = cluster {
        let pod_mtu = match c.cfg.backend.kind {
            BackendType::Vxlan => underlay.mtu.saturating_sub(vxlan_overhead(underlay.ip)),
            BackendType::HostGw => underlay.mtu,
        };
        if conf.mtu != Some(u64::from(pod_mtu)) {
            wrong.push(format!("mtu {:?} (expected {pod_mtu})", conf.mtu));
        }
        if !conf.masq_exclude.contains(&IpNetwork::V4(c.cfg.network)) {
            wrong.push(format!(
                "ipMasqExclude [{}] lacks the network {}",
                nets(&conf.masq_exclude),
                c.cfg.network
            ));
        }
    }
    if wrong.is_empty() {
        rep.ok(
            "files.conflist",
            format!(
                "{}: subnet {}, mtu {}",
                path.display(),
                conf.subnet.map(|s| s.to_string()).unwrap_or_default(),
                conf.mtu.unwrap_or_default()
            ),
        );
    } else {
        rep.push(
            "files.conflist",
            Status::Fail,
            format!("{}: {}", path.display(), wrong.join("; ")),
            hint,
        );
    }
    Some(conf)
}

/// GET `path` from ferryd's listener; `None` when nothing answers.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).ok()?;
    s.set_read_timeout(Some(HTTP_TIMEOUT)).ok()?;
    s.set_write_timeout(Some(HTTP_TIMEOUT)).ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: ferryd\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut buf = Vec::new();
    let _ = s.take(1 << 20).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

fn check_ferryd(r: &RunArgs, rep: &mut Report) {
    let mut addr = r.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            SocketAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        });
    }
    let hint_down = "start ferryd (the DaemonSet pod); its log says why it stopped";
    match http_get(addr, "/readyz") {
        None => rep.push(
            "ferryd",
            Status::Fail,
            format!("not running: nothing answers on {addr} (the data path stays as it was, but nothing repairs drift)"),
            hint_down,
        ),
        Some((200, _)) => {
            let metrics = http_get(addr, "/metrics").map(|(_, b)| b).unwrap_or_default();
            let value = |name: &str| {
                metrics.lines().find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == name).then(|| v.trim().to_string())
                })
            };
            rep.ok(
                "ferryd",
                format!(
                    "ready on {addr}; peers {} programmed {}, repairs {}",
                    value("ferry_peers").unwrap_or("?".into()),
                    value("ferry_peers_programmed").unwrap_or("?".into()),
                    value("ferry_reconcile_repairs_total").unwrap_or("?".into())
                ),
            );
        }
        Some((code, body)) => rep.push(
            "ferryd",
            Status::Fail,
            format!(
                "running but not ready ({code}): {}",
                calllog::bounded(body.trim(), 400)
            ),
            "see ferryd's log and the reasons above",
        ),
    }
}

async fn check_device(
    h: &NsHandle,
    cluster: &Option<Cluster>,
    underlay: &Underlay,
    pod_mtu: Option<u32>,
    rep: &mut Report,
) -> Option<u32> {
    let Some(c) = cluster else {
        rep.push(
            "overlay.device",
            Status::Warn,
            "not checked: the network config is unknown (etcd)",
            "fix etcd first",
        );
        return None;
    };
    if c.cfg.backend.kind == BackendType::HostGw {
        rep.ok("overlay.device", "backend host-gw: no VXLAN device");
        return None;
    }
    let name = format!("ferry.{}", c.cfg.backend.vni);
    let hint = format!(
        "ferryd recreates it; by hand: ip link set {name} up / mtu {}",
        pod_mtu.unwrap_or_default()
    );
    let vx = match h.vxlan_by_name(&name).await {
        Ok(Some(v)) => v,
        Ok(None) => {
            rep.push(
                "overlay.device",
                Status::Fail,
                format!("{name} does not exist"),
                &hint,
            );
            return None;
        }
        Err(e) => {
            rep.push(
                "overlay.device",
                Status::Fail,
                format!("{name}: {e}"),
                &hint,
            );
            return None;
        }
    };
    let mut wrong = Vec::new();
    if vx.kind.as_deref() != Some("vxlan") {
        wrong.push(format!("is a {:?} link, not vxlan", vx.kind));
    }
    if !vx.is_up {
        wrong.push("is down".to_string());
    }
    if vx.vni != Some(c.cfg.backend.vni) {
        wrong.push(format!("VNI {:?} (want {})", vx.vni, c.cfg.backend.vni));
    }
    if vx.port != Some(c.cfg.backend.port) {
        wrong.push(format!("port {:?} (want {})", vx.port, c.cfg.backend.port));
    }
    if vx.local != Some(underlay.ip) {
        wrong.push(format!("local {:?} (want {})", vx.local, underlay.ip));
    }
    if let Some(m) = pod_mtu
        && vx.mtu != m
    {
        wrong.push(format!(
            "MTU {} (want {m} = {} − overhead)",
            vx.mtu, underlay.mtu
        ));
    }
    if vx.learning != Some(false) {
        wrong.push("learning is on".to_string());
    }
    if wrong.is_empty() {
        rep.ok(
            "overlay.device",
            format!(
                "{name} up, VNI {}, port {}, local {}, MTU {}, nolearning",
                c.cfg.backend.vni, c.cfg.backend.port, underlay.ip, vx.mtu
            ),
        );
    } else {
        rep.push(
            "overlay.device",
            Status::Fail,
            format!("{name} {}", wrong.join(", ")),
            &hint,
        );
    }
    Some(vx.index)
}

/// The peers the leases describe (IPv4 part), without this node.
fn cluster_peers(cluster: &Option<Cluster>, local: Option<Ipv4Network>) -> Vec<SubnetLease> {
    cluster
        .as_ref()
        .map(|c| {
            c.leases
                .iter()
                .filter(|l| Some(l.subnet()) != local)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Reports a per-peer kind of entry: OK with a count, or FAIL with the
/// first few wrong ones.
fn report_entries(rep: &mut Report, name: &str, total: usize, wrong: &[String], hint: &str) {
    if wrong.is_empty() {
        rep.ok(name, format!("{total} of {total} peers correct"));
    } else {
        let mut d = format!(
            "{} of {total} peers wrong: {}",
            wrong.len(),
            wrong[..wrong.len().min(FIRST_FEW)].join("; ")
        );
        if wrong.len() > FIRST_FEW {
            d.push_str(&format!("; … {} more", wrong.len() - FIRST_FEW));
        }
        rep.push(name, Status::Fail, d, hint);
    }
}

/// `10.244.0.0/16, fd00::/56` (or `nothing`), for details.
fn nets(list: &[IpNetwork]) -> String {
    if list.is_empty() {
        return "nothing".into();
    }
    list.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn mac_str(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[allow(clippy::too_many_arguments)]
async fn check_peers(
    h: &NsHandle,
    cluster: &Option<Cluster>,
    local: Option<Ipv4Network>,
    underlay: &Underlay,
    vx: Option<u32>,
    routes: &[RouteEntry<Ipv4Addr>],
    by_index: &HashMap<u32, &Link>,
    rep: &mut Report,
) -> HashMap<Ipv4Network, &'static str> {
    let mut broken = HashMap::new();
    let Some(c) = cluster else {
        for name in [
            "peers.routes",
            "peers.neighbours",
            "peers.fdb",
            "routes.stale",
        ] {
            rep.push(
                name,
                Status::Warn,
                "not checked: the peers are in etcd, which is unreachable",
                "fix etcd first",
            );
        }
        check_foreign(routes, None, local, by_index, rep);
        return broken;
    };
    let peers = cluster_peers(cluster, local);
    if c.cfg.backend.kind == BackendType::Vxlan && vx.is_none() {
        // Every tunnel entry hangs off the device: it is the one to fix.
        for name in ["peers.routes", "peers.neighbours", "peers.fdb"] {
            rep.push(
                name,
                Status::Fail,
                format!(
                    "{} peers: not programmable, the VXLAN device is missing",
                    peers.len()
                ),
                "see overlay.device; ferryd recreates the device and every entry",
            );
        }
        rep.push(
            "routes.stale",
            Status::Warn,
            "not checked: the VXLAN device is missing",
            "see overlay.device",
        );
        check_foreign(routes, Some(c.cfg.network), local, by_index, rep);
        return broken;
    }
    let ferry: HashMap<Ipv4Network, &IpRoute<Ipv4Addr>> = routes
        .iter()
        .filter(|e| e.kind == RouteKind::MainUnicast && e.route.protocol == FERRY_ROUTE_PROTO)
        .map(|e| (e.route.dst, &e.route))
        .collect();
    let (neighs, fdb) = match vx {
        Some(vx) => match (h.neighbours::<Ipv4Addr>(vx).await, h.fdb_entries(vx).await) {
            (Ok(n), Ok(f)) => (n, f),
            (n, f) => {
                // Without the dumps every entry would look missing: say why instead.
                let why = [n.err(), f.err()]
                    .into_iter()
                    .flatten()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ");
                for name in [
                    "peers.routes",
                    "peers.neighbours",
                    "peers.fdb",
                    "routes.stale",
                ] {
                    rep.push(
                        name,
                        Status::Warn,
                        format!("not checked: {why}"),
                        "run doctor as root in the node's network namespace",
                    );
                }
                check_foreign(routes, Some(c.cfg.network), local, by_index, rep);
                return broken;
            }
        },
        None => (Vec::new(), Vec::new()),
    };
    let have_neigh: HashMap<Ipv4Addr, Option<[u8; 6]>> = neighs
        .iter()
        .filter(|n| n.state == NeighState::Permanent)
        .map(|n| (n.ip, n.mac))
        .collect();
    let have_fdb: HashSet<([u8; 6], IpAddr)> = fdb
        .iter()
        .filter(|e| e.is_self && e.permanent)
        .filter_map(|e| e.dst.map(|d| (e.mac, d)))
        .collect();
    let (mut bad_route, mut bad_neigh, mut bad_fdb) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tunnelled, mut total) = (0, 0);
    for p in &peers {
        let IpAddr::V4(public) = p.public_ip else {
            // IPv6 underlay: IPv4 routes via the tunnel only.
            if vx.is_none() {
                continue;
            }
            total += 1;
            tunnel_checks(
                p,
                vx,
                &ferry,
                &have_neigh,
                &have_fdb,
                &mut bad_route,
                &mut bad_neigh,
                &mut bad_fdb,
                &mut tunnelled,
                &mut broken,
            );
            continue;
        };
        total += 1;
        let who = format!("{} ({})", p.subnet(), p.node);
        let have = ferry.get(&p.subnet());
        let direct = have.is_some_and(|r| r.gw == Some(public) && r.oif == underlay.index);
        if vx.is_none() || direct {
            // host-gw or directRouting: via the node's address on the underlay.
            match have {
                Some(r) if r.gw == Some(public) && r.oif == underlay.index => {}
                Some(r) => {
                    broken.insert(p.subnet(), "route");
                    bad_route.push(format!(
                        "{who}: route {} (want via {public} dev {})",
                        r.describe(),
                        underlay.name
                    ))
                }
                None => {
                    broken.insert(p.subnet(), "route");
                    bad_route.push(format!("{who}: no route"))
                }
            }
            continue;
        }
        tunnel_checks(
            p,
            vx,
            &ferry,
            &have_neigh,
            &have_fdb,
            &mut bad_route,
            &mut bad_neigh,
            &mut bad_fdb,
            &mut tunnelled,
            &mut broken,
        );
    }
    let hint_route = "ferryd puts it back within a pass; if it keeps vanishing, find who deletes it (ip monitor route)";
    report_entries(rep, "peers.routes", total, &bad_route, hint_route);
    if vx.is_some() {
        report_entries(
            rep,
            "peers.neighbours",
            tunnelled,
            &bad_neigh,
            "ferryd rewrites it (permanent, the peer's VTEP MAC); check ferryd runs",
        );
        report_entries(
            rep,
            "peers.fdb",
            tunnelled,
            &bad_fdb,
            "ferryd rewrites it (bridge fdb … dst <peer node IP>); check ferryd runs",
        );
    } else {
        rep.ok("peers.neighbours", "backend host-gw: none needed");
        rep.ok("peers.fdb", "backend host-gw: none needed");
    }
    // ferry's routes of nodes no longer in etcd.
    let wanted: HashSet<Ipv4Network> = peers.iter().map(|p| p.subnet()).collect();
    let stale: Vec<String> = ferry
        .keys()
        .filter(|d| !wanted.contains(d) && Some(**d) != local)
        .map(|d| d.to_string())
        .collect();
    if stale.is_empty() {
        rep.ok("routes.stale", "no ferry routes of nodes missing from etcd");
    } else {
        rep.push(
            "routes.stale",
            Status::Warn,
            format!("ferry routes to subnets no node leases: {}", stale[..stale.len().min(FIRST_FEW)].join(", ")),
            "ferryd removes them on its next pass; if ferryd is down: ip route del <subnet> proto 70",
        );
    }
    check_foreign(routes, Some(c.cfg.network), local, by_index, rep);
    broken
}

/// The IPv6 half of a dual-stack network: each peer's IPv6 route (via the
/// first address of its IPv6 subnet, onlink on the VXLAN device, or via its
/// IPv6 underlay address where directRouting routes IPv6 directly) and, over
/// the tunnel, its permanent IPv6 neighbour. The fdb entry is the one
/// [`check_peers`] checked (shared by both families).
async fn check_peers6(
    h: &NsHandle,
    cluster: &Option<Cluster>,
    local: Option<Ipv4Network>,
    underlay: &Underlay,
    vx: Option<u32>,
    rep: &mut Report,
) {
    let Some(c) = cluster else { return };
    if c.cfg.ipv6_network.is_none() {
        return;
    }
    const NAMES: [&str; 2] = ["peers.routes6", "peers.neighbours6"];
    if c.cfg.backend.kind != BackendType::Vxlan {
        for name in NAMES {
            rep.ok(
                name,
                "backend host-gw routes IPv4 only: no IPv6 peer entries",
            );
        }
        return;
    }
    let Some(vx) = vx else {
        for name in NAMES {
            rep.push(
                name,
                Status::Fail,
                "not programmable: the VXLAN device is missing",
                "see overlay.device",
            );
        }
        return;
    };
    let (routes, neighs) = match (
        h.route_entries::<Ipv6Addr>().await,
        h.neighbours::<Ipv6Addr>(vx).await,
    ) {
        (Ok(r), Ok(n)) => (r, n),
        (r, n) => {
            let why = [r.err(), n.err()]
                .into_iter()
                .flatten()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            for name in NAMES {
                rep.push(
                    name,
                    Status::Warn,
                    format!("not checked: {why}"),
                    "run doctor as root in the node's network namespace",
                );
            }
            return;
        }
    };
    let ferry: HashMap<Ipv6Network, &IpRoute<Ipv6Addr>> = routes
        .iter()
        .filter(|e| e.kind == RouteKind::MainUnicast && e.route.protocol == FERRY_ROUTE_PROTO)
        .map(|e| (e.route.dst, &e.route))
        .collect();
    let have_neigh: HashMap<Ipv6Addr, Option<[u8; 6]>> = neighs
        .iter()
        .filter(|n| n.state == NeighState::Permanent)
        .map(|n| (n.ip, n.mac))
        .collect();
    let (mut bad_route, mut bad_neigh) = (Vec::new(), Vec::new());
    let (mut total, mut tunnelled) = (0, 0);
    for p in cluster_peers(cluster, local) {
        // Leases of nodes that predate dual stack carry no IPv6 subnet.
        let Some(subnet6) = p.ipv6_subnet else {
            continue;
        };
        total += 1;
        let who = format!("{subnet6} ({})", p.node);
        let gw6 = subnet6.network();
        let direct = |r: &IpRoute<Ipv6Addr>| matches!(p.public_ip, IpAddr::V6(pub6) if r.gw == Some(pub6) && r.oif == underlay.index);
        match ferry.get(&subnet6) {
            Some(r) if direct(r) => continue,
            Some(r) if r.gw == Some(gw6) && r.oif == vx && r.onlink => {}
            Some(r) => bad_route.push(format!(
                "{who}: route {} (want via {gw6} onlink dev #{vx})",
                r.describe()
            )),
            None => bad_route.push(format!("{who}: no route")),
        }
        tunnelled += 1;
        let Some(mac) = p.vtep_mac.map(|m| m.0) else {
            bad_neigh.push(format!("{who}: the lease has no VTEP MAC"));
            continue;
        };
        match have_neigh.get(&gw6) {
            Some(Some(m)) if *m == mac => {}
            Some(m) => bad_neigh.push(format!(
                "{who}: neighbour {gw6} is {} (want {})",
                m.map(|m| mac_str(&m)).unwrap_or("incomplete".into()),
                mac_str(&mac)
            )),
            None => bad_neigh.push(format!("{who}: no permanent neighbour {gw6}")),
        }
    }
    report_entries(
        rep,
        "peers.routes6",
        total,
        &bad_route,
        "ferryd puts it back within a pass; if it keeps vanishing, find who deletes it (ip -6 monitor route)",
    );
    report_entries(
        rep,
        "peers.neighbours6",
        tunnelled,
        &bad_neigh,
        "ferryd rewrites it (permanent, the peer's VTEP MAC); check ferryd runs",
    );
}

#[allow(clippy::too_many_arguments)]
fn tunnel_checks(
    p: &SubnetLease,
    vx: Option<u32>,
    ferry: &HashMap<Ipv4Network, &IpRoute<Ipv4Addr>>,
    have_neigh: &HashMap<Ipv4Addr, Option<[u8; 6]>>,
    have_fdb: &HashSet<([u8; 6], IpAddr)>,
    bad_route: &mut Vec<String>,
    bad_neigh: &mut Vec<String>,
    bad_fdb: &mut Vec<String>,
    tunnelled: &mut usize,
    broken: &mut HashMap<Ipv4Network, &'static str>,
) {
    let Some(vx) = vx else { return };
    *tunnelled += 1;
    let who = format!("{} ({})", p.subnet(), p.node);
    let gw0 = p.subnet().network();
    match ferry.get(&p.subnet()) {
        Some(r) if r.gw == Some(gw0) && r.oif == vx && r.onlink => {}
        Some(r) => {
            broken.insert(p.subnet(), "route");
            bad_route.push(format!(
                "{who}: route {} (want via {gw0} onlink dev #{vx})",
                r.describe()
            ))
        }
        None => {
            broken.insert(p.subnet(), "route");
            bad_route.push(format!("{who}: no route"))
        }
    }
    let Some(mac) = p.vtep_mac.map(|m| m.0) else {
        bad_neigh.push(format!("{who}: the lease has no VTEP MAC"));
        return;
    };
    match have_neigh.get(&gw0) {
        Some(Some(m)) if *m == mac => {}
        Some(m) => {
            broken.entry(p.subnet()).or_insert("neighbour entry");
            bad_neigh.push(format!(
                "{who}: neighbour {gw0} is {} (want {})",
                m.map(|m| mac_str(&m)).unwrap_or("incomplete".into()),
                mac_str(&mac)
            ))
        }
        None => {
            broken.entry(p.subnet()).or_insert("neighbour entry");
            bad_neigh.push(format!("{who}: no permanent neighbour {gw0}"))
        }
    }
    if !have_fdb.contains(&(mac, p.public_ip)) {
        broken.entry(p.subnet()).or_insert("fdb entry");
        bad_fdb.push(format!(
            "{who}: no fdb entry {} dst {}",
            mac_str(&mac),
            p.public_ip
        ));
    }
}

/// Routes that are not ferry's over the cluster network (other than this
/// node's own subnet on its bridge): they steal pod traffic.
fn check_foreign(
    routes: &[RouteEntry<Ipv4Addr>],
    network: Option<Ipv4Network>,
    local: Option<Ipv4Network>,
    by_index: &HashMap<u32, &Link>,
    rep: &mut Report,
) {
    let Some(network) = network else {
        rep.push(
            "routes.foreign",
            Status::Warn,
            "not checked: the network is unknown (etcd)",
            "fix etcd first",
        );
        return;
    };
    let foreign: Vec<String> = routes
        .iter()
        .filter(|e| e.kind != RouteKind::Local && e.route.protocol != FERRY_ROUTE_PROTO)
        .filter(|e| e.route.dst.prefix() > 0)
        .filter(|e| overlaps(IpNetwork::V4(e.route.dst), IpNetwork::V4(network)))
        .filter(|e| Some(e.route.dst) != local)
        .map(|e| {
            let dev = by_index
                .get(&e.route.oif)
                .map(|l| l.name.clone())
                .unwrap_or(format!("#{}", e.route.oif));
            e.route
                .describe()
                .replace(&format!("dev #{}", e.route.oif), &format!("dev {dev}"))
        })
        .collect();
    if foreign.is_empty() {
        rep.ok(
            "routes.foreign",
            format!("no foreign routes inside {network}"),
        );
    } else {
        rep.push(
            "routes.foreign",
            Status::Fail,
            format!(
                "routes that are not ferry's inside {network}: {}",
                foreign[..foreign.len().min(FIRST_FEW)].join("; ")
            ),
            "delete them (ip route del …) or move the cluster network; ferryd never replaces them",
        );
    }
}

fn sysctl(key: &str) -> Option<String> {
    ferry_netops::sysctl::read(key)
        .ok()
        .map(|v| v.trim().to_string())
}

fn check_sysctls(
    r: &RunArgs,
    vx: Option<u32>,
    underlay: &Underlay,
    by_name: &HashMap<&str, &Link>,
    conflist: Option<&Conflist>,
    no_hairpin: &[String],
    rep: &mut Report,
) {
    let no_pod_yet = !by_name.contains_key(r.bridge.as_str());
    match sysctl("net/ipv4/ip_forward").as_deref() {
        Some("1") => rep.ok("sysctl.ip_forward", "net.ipv4.ip_forward = 1"),
        // ferry-bridge turns it on at the first pod's ADD (isGateway).
        Some(v) if no_pod_yet => rep.ok(
            "sysctl.ip_forward",
            format!(
                "net.ipv4.ip_forward = {v}; no pod yet (no {}): the first ADD turns it on",
                r.bridge
            ),
        ),
        v => rep.push(
            "sysctl.ip_forward",
            Status::Fail,
            format!(
                "net.ipv4.ip_forward = {}: the node does not route pod traffic",
                v.unwrap_or("unreadable")
            ),
            "sysctl -w net.ipv4.ip_forward=1 (and persist it in /etc/sysctl.d)",
        ),
    }
    // The effective rp_filter of a device is the larger of `all` and its own.
    let all: u8 = sysctl("net/ipv4/conf/all/rp_filter")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut devices = vec![underlay.name.clone(), r.bridge.clone()];
    if let Some(vx) = vx
        && let Some(l) = by_name.values().find(|l| l.index == vx)
    {
        devices.push(l.name.clone());
    }
    let mut strict = Vec::new();
    for d in devices.iter().filter(|d| by_name.contains_key(d.as_str())) {
        let own: u8 = sysctl(&format!("net/ipv4/conf/{d}/rp_filter"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if all.max(own) == 1 {
            strict.push(format!("{d} (all={all}, {d}={own})"));
        }
    }
    if strict.is_empty() {
        rep.ok(
            "sysctl.rp_filter",
            format!("not strict on {}", devices.join(", ")),
        );
    } else {
        rep.push(
            "sysctl.rp_filter",
            Status::Fail,
            format!(
                "strict reverse-path filtering on {}: asymmetric pod traffic is dropped",
                strict.join(", ")
            ),
            "sysctl -w net.ipv4.conf.all.rp_filter=2 and net.ipv4.conf.<dev>.rp_filter=2 (loose)",
        );
    }
    match sysctl("net/bridge/bridge-nf-call-iptables") {
        None => rep.ok(
            "sysctl.br_netfilter",
            "br_netfilter not loaded: bridged pod traffic skips iptables (kube-proxy in iptables mode needs it)",
        ),
        Some(v) => {
            let v6 = sysctl("net/bridge/bridge-nf-call-ip6tables").unwrap_or_default();
            let conf_hairpin = conflist.map(|c| c.hairpin).unwrap_or(false);
            if !no_hairpin.is_empty() || !conf_hairpin {
                let which = if no_hairpin.is_empty() {
                    "the conflist asks for no hairpin (hairpinMode false)".to_string()
                } else {
                    format!(
                        "bridge ports without hairpin: {}",
                        no_hairpin[..no_hairpin.len().min(FIRST_FEW)].join(", ")
                    )
                };
                rep.push(
                    "sysctl.br_netfilter",
                    Status::Warn,
                    format!("br_netfilter loaded (bridge-nf-call-iptables={v}, ip6tables={v6}) and {which}: a pod reaching itself through a Service VIP gets no answer (the DNATed packet must leave by the port it came in)"),
                    "set hairpinMode true in the conflist (ferryd writes it so) and recreate those pods, or: ip link set <veth> type bridge_slave hairpin on",
                );
            } else {
                rep.ok(
                    "sysctl.br_netfilter",
                    format!("br_netfilter loaded (bridge-nf-call-iptables={v}, ip6tables={v6}), hairpin on"),
                );
            }
        }
    }
}

/// The bridge; returns its ifindex.
async fn check_bridge(
    h: &NsHandle,
    r: &RunArgs,
    local: Option<Ipv4Network>,
    pod_mtu: Option<u32>,
    links: &[Link],
    by_name: &HashMap<&str, &Link>,
    rep: &mut Report,
) -> Option<u32> {
    let name = r.bridge.as_str();
    let Some(br) = by_name.get(name) else {
        rep.ok(
            "bridge",
            format!("{name} does not exist yet (created by the first pod's ADD)"),
        );
        return None;
    };
    let mut wrong = Vec::new();
    if br.kind.as_deref() != Some("bridge") {
        wrong.push(format!("is a {:?} link, not a bridge", br.kind));
    }
    if !br.is_up {
        wrong.push("is down".into());
    }
    if let Some(subnet) = local {
        let gw = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        let addrs = h.addresses(br.index).await.unwrap_or_default();
        if !addrs
            .iter()
            .any(|a| a.ip() == IpAddr::V4(gw) && a.prefix() == subnet.prefix())
        {
            wrong.push(format!(
                "does not hold the gateway {gw}/{}",
                subnet.prefix()
            ));
        }
    }
    let ports: Vec<&Link> = links
        .iter()
        .filter(|l| l.controller == Some(br.index))
        .collect();
    if let Some(m) = pod_mtu {
        let off: Vec<String> = ports
            .iter()
            .filter(|p| p.mtu != m)
            .map(|p| format!("{} mtu {}", p.name, p.mtu))
            .collect();
        if !off.is_empty() {
            wrong.push(format!(
                "ports with an MTU other than the pods' {m}: {}",
                off.join(", ")
            ));
        }
        if br.mtu > m {
            wrong.push(format!("MTU {} above the pods' {m}", br.mtu));
        }
    }
    if wrong.is_empty() {
        rep.ok(
            "bridge",
            format!("{name} up, MTU {}, {} ports", br.mtu, ports.len()),
        );
    } else {
        rep.push(
            "bridge",
            Status::Fail,
            format!("{name} {}", wrong.join("; ")),
            "the next pod ADD repairs the bridge; by hand: ip link set <bridge> up / ip addr add <gateway> dev <bridge>",
        );
    }
    Some(br.index)
}

/// A reservation in ferry-ipam's store.
struct Reservation {
    ip: IpAddr,
    container: String,
    ifname: String,
    netns: String,
}

fn read_reservations(dir: &Path) -> Vec<Reservation> {
    use ferry_ipam::record::Record;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(ip) = name.parse::<IpAddr>() else {
            continue;
        };
        if ip.to_string() != name {
            continue;
        }
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(e.path())
        else {
            continue;
        };
        if !f.metadata().is_ok_and(|m| m.file_type().is_file()) {
            continue;
        }
        let mut content = Vec::new();
        if (&f).take(64 << 10).read_to_end(&mut content).is_err() {
            continue;
        }
        let xattr = get_xattr(&f);
        if let Record::Held { owner, meta } = Record::parse(&content, xattr.as_deref()) {
            out.push(Reservation {
                ip,
                container: owner.id,
                ifname: owner.ifname.unwrap_or_default(),
                netns: meta.map(|m| m.netns).unwrap_or_default(),
            });
        }
    }
    out.sort_by_key(|r| r.ip);
    out
}

fn get_xattr(f: &std::fs::File) -> Option<Vec<u8>> {
    use std::os::unix::io::AsRawFd;
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid fd, NUL-terminated name, writable buffer of that length.
    let n = unsafe {
        libc::fgetxattr(
            f.as_raw_fd(),
            c"user.ferry".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

/// The reservations whose pods look alive (namespace there, veth there):
/// (container ID, ifname).
type LivePods = HashSet<(String, String)>;

/// ferry-ipam's store of this network, as the conflist ferryd writes names it.
fn ipam_dir(r: &RunArgs) -> PathBuf {
    r.ipam_data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(ferry_ipam::config::DEFAULT_DATA_DIR))
        .join(&r.network_name)
}

fn check_pods(r: &RunArgs, links: &[Link], bridge: Option<u32>, rep: &mut Report) -> LivePods {
    let dir = ipam_dir(r);
    let reservations = read_reservations(&dir);
    let veth_aliases: HashSet<&str> = links
        .iter()
        .filter(|l| l.kind.as_deref() == Some("veth"))
        .filter_map(|l| l.alias.as_deref())
        .collect();
    let mut stale = Vec::new();
    let mut no_veth = Vec::new();
    let mut live = LivePods::new();
    let mut explained: HashSet<String> = HashSet::new();
    for res in &reservations {
        let owner = ferry_netops::LinkOwner::new(
            "ferry-bridge",
            &r.network_name,
            &res.container,
            &res.ifname,
        );
        explained.insert(owner.alias().to_string());
        explained.insert(
            ferry_netops::LinkOwner::new(
                "ferry-bandwidth",
                &r.network_name,
                &res.container,
                &res.ifname,
            )
            .alias()
            .to_string(),
        );
        let ns_ok = res.netns.is_empty() || ferry_netops::NetNs::open(&res.netns).is_ok();
        if !ns_ok {
            stale.push(format!(
                "{} held by {}/{}: netns {} is gone",
                res.ip, res.container, res.ifname, res.netns
            ));
            continue;
        }
        if !veth_aliases.contains(owner.alias()) {
            no_veth.push(format!(
                "{} held by {}/{}: no host veth",
                res.ip, res.container, res.ifname
            ));
            continue;
        }
        live.insert((res.container.clone(), res.ifname.clone()));
    }
    let mut problems: Vec<String> = stale.iter().chain(&no_veth).cloned().collect();
    // Host veths on the bridge and ifbs that no reservation explains.
    let orphans: Vec<String> = links
        .iter()
        .filter(|l| {
            (l.kind.as_deref() == Some("veth") && bridge.is_some() && l.controller == bridge)
                || (l.kind.as_deref() == Some("ifb")
                    && l.alias
                        .as_deref()
                        .is_some_and(|a| a.starts_with("ferry-bandwidth:")))
        })
        .filter(|l| !l.alias.as_deref().is_some_and(|a| explained.contains(a)))
        .map(|l| {
            format!(
                "orphan {} {} ({})",
                l.kind.as_deref().unwrap_or("link"),
                l.name,
                l.alias
                    .as_deref()
                    .map(|a| format!("alias {}", calllog::bounded(a, 80)))
                    .unwrap_or("no owner alias".into())
            )
        })
        .collect();
    problems.extend(orphans.iter().cloned());
    if problems.is_empty() {
        rep.ok(
            "pods",
            format!(
                "{} reservations in {}, each with a live netns and a host veth; no orphans",
                reservations.len(),
                dir.display()
            ),
        );
    } else {
        let mut d = format!(
            "{} stale reservations, {} without a host veth, {} orphan links: {}",
            stale.len(),
            no_veth.len(),
            orphans.len(),
            problems[..problems.len().min(FIRST_FEW)].join("; ")
        );
        if problems.len() > FIRST_FEW {
            d.push_str(&format!("; … {} more", problems.len() - FIRST_FEW));
        }
        rep.push(
            "pods",
            Status::Fail,
            d,
            "ferryd's GC sweep releases stale reservations (the conflist's DEL); delete orphan links ferry did not make by hand",
        );
    }
    live
}

fn check_nft(
    r: &RunArgs,
    bridge: Option<u32>,
    local: Option<Ipv4Network>,
    conflist: Option<&Conflist>,
    live: &LivePods,
    rep: &mut Report,
) {
    use ferry_netops::nft::{self, NftFamily};
    let table = ferry_bridge::masq::TABLE;
    match (local, conflist) {
        (_, Some(c)) if c.ip_masq && bridge.is_none() => rep.ok(
            "nft.masquerade",
            format!(
                "no pod yet (no {}): the first ADD creates the masquerade",
                r.bridge
            ),
        ),
        (Some(subnet), Some(c)) if c.ip_masq => {
            let elements = nft::map_elements(NftFamily::Inet, table, "masq-v4").unwrap_or_default();
            let key = subnet.network().octets().to_vec();
            let want = ferry_bridge::masq::chain_name(
                if c.network_name.is_empty() {
                    &r.network_name
                } else {
                    &c.network_name
                },
                &[IpNetwork::V4(subnet)],
                &c.masq_exclude,
            );
            let hint = "the next pod ADD on this node recreates it (ferry-bridge); never edit table inet ferry by hand";
            match elements.iter().find(|e| e.key == key) {
                None => rep.push(
                    "nft.masquerade",
                    Status::Fail,
                    format!("no masquerade for {subnet} in table inet {table} (map masq-v4): pods cannot reach outside the cluster"),
                    hint,
                ),
                Some(e) if e.chain.as_deref() != Some(&want) => rep.push(
                    "nft.masquerade",
                    Status::Fail,
                    format!("{subnet} jumps to {}, not to the chain of this config ({want}: excluding {})", e.chain.as_deref().unwrap_or("nothing"), nets(&c.masq_exclude)),
                    hint,
                ),
                Some(_) => match nft::chain_exists(NftFamily::Inet, table, &want) {
                    Ok(true) => rep.ok(
                        "nft.masquerade",
                        format!("{subnet} masqueraded by chain {want}, excluding {}", nets(&c.masq_exclude)),
                    ),
                    _ => rep.push("nft.masquerade", Status::Fail, format!("chain {want} is missing"), hint),
                },
            }
        }
        (_, Some(c)) if !c.ip_masq => rep.ok("nft.masquerade", "ipMasq is off in the conflist"),
        _ => rep.push(
            "nft.masquerade",
            Status::Warn,
            "not checked: the node subnet or the conflist is unknown",
            "fix the checks above first",
        ),
    }
    // hostPort elements: each must carry the comment of a live pod.
    let mut foreign = Vec::new();
    let mut count = 0;
    for map in [ferry_portmap::rules::MAP_V4, ferry_portmap::rules::MAP_V6] {
        for e in nft::set_elements(NftFamily::Inet, table, map).unwrap_or_default() {
            count += 1;
            let owner_ok = e.comment.as_deref().is_some_and(|comment| {
                live.iter().any(|(id, ifname)| {
                    comment == ferry_portmap::rules::pod_comment(&r.network_name, id, ifname)
                })
            });
            if !owner_ok {
                foreign.push(format!(
                    "{map}: {}",
                    e.comment
                        .as_deref()
                        .map(|c| calllog::bounded(c, 100))
                        .unwrap_or("no comment".into())
                ));
            }
        }
    }
    if foreign.is_empty() {
        rep.ok(
            "nft.hostports",
            format!("{count} hostPort elements, each of a live pod"),
        );
    } else {
        rep.push(
            "nft.hostports",
            Status::Warn,
            format!("{} of {count} hostPort elements belong to no live pod: {}", foreign.len(), foreign[..foreign.len().min(FIRST_FEW)].join("; ")),
            "they forward a node port to a dead address; the pod's DEL (or ferryd's GC sweep) removes them",
        );
    }
}

fn check_pitfalls(
    underlay: &Underlay,
    conflist: Option<&Conflist>,
    cluster: &Option<Cluster>,
    rep: &mut Report,
) {
    let overhead = match cluster.as_ref().map(|c| c.cfg.backend.kind) {
        Some(BackendType::HostGw) => 0,
        _ => vxlan_overhead(underlay.ip),
    };
    match conflist.and_then(|c| c.mtu) {
        Some(mtu) if mtu + u64::from(overhead) > u64::from(underlay.mtu) => rep.push(
            "pitfall.underlay_mtu",
            Status::Fail,
            format!("pod MTU {mtu} + {overhead} bytes of encapsulation > underlay {} MTU {}: large packets are dropped", underlay.name, underlay.mtu),
            "raise the underlay MTU or let ferryd derive the pod MTU (restart it after an MTU change)",
        ),
        Some(mtu) => rep.ok(
            "pitfall.underlay_mtu",
            format!("pod MTU {mtu} + {overhead} ≤ underlay {} MTU {}", underlay.name, underlay.mtu),
        ),
        None => rep.push(
            "pitfall.underlay_mtu",
            Status::Warn,
            "not checked: no conflist MTU",
            "fix the conflist first",
        ),
    }
}

/// `ETHTOOL_GTXCSUM` through `SIOCETHTOOL`: whether `ifname` offloads TX
/// checksums (any of NETIF_F_IP_CSUM / IPV6_CSUM / HW_CSUM, which is what
/// `tx-checksum-ip-generic` toggles on a VXLAN device). `None` when the
/// kernel does not say.
fn tx_checksum_on(ifname: &str) -> Option<bool> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GTXCSUM: u32 = 0x16;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    if ifname.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_GTXCSUM,
        data: 0,
    };
    // SAFETY: a zeroed ifreq is valid; the name fits (checked above).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: plain socket(2), closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCETHTOOL reads the ifreq and writes `value`, both live here.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    (rc == 0).then_some(value.data != 0)
}

/// The VXLAN UDP checksum offload problem (flannel's known issue: some
/// kernels and NICs send tunnelled packets with bad checksums while the
/// device offloads them; ping works, TCP stalls). Whether a driver is hit
/// cannot be read from the kernel, so doctor reports the setting and the fix.
fn check_csum_offload(
    cluster: &Option<Cluster>,
    vx: Option<u32>,
    by_index: &HashMap<u32, &Link>,
    rep: &mut Report,
) {
    let name = "pitfall.vxlan_csum";
    let Some(dev) = vx.and_then(|i| by_index.get(&i)).map(|l| l.name.clone()) else {
        let detail = match cluster.as_ref().map(|c| c.cfg.backend.kind) {
            Some(BackendType::HostGw) => "backend host-gw: no VXLAN device",
            _ => "no VXLAN device to check",
        };
        rep.ok(name, detail);
        return;
    };
    match tx_checksum_on(&dev) {
        Some(true) => rep.ok(
            name,
            format!(
                "{dev} offloads TX checksums (the kernel default). If ping crosses nodes but TCP stalls, the NIC or kernel mangles VXLAN UDP checksums: `ethtool -K {dev} tx-checksum-ip-generic off`"
            ),
        ),
        Some(false) => rep.ok(
            name,
            format!("{dev} TX checksum offload is off (the VXLAN checksum workaround is in place)"),
        ),
        None => rep.ok(
            name,
            format!("{dev}: the kernel does not report its TX checksum offload (ethtool ioctl)"),
        ),
    }
}

fn check_cni_log(r: &RunArgs, rep: &mut Report) {
    let Some(path) = cni_log_path(r) else {
        rep.ok("cni.log", "the CNI call log is off (--cni-log \"\")");
        return;
    };
    let entries = calllog::read_all(&path);
    // Failures of the last hour, grouped by verb, pod and code. RFC 3339
    // UTC times of one format compare as strings.
    let since = calllog::rfc3339_millis(SystemTime::now() - Duration::from_secs(3600));
    let mut groups: Vec<((String, String, u32), usize, String)> = Vec::new();
    for e in entries.iter().filter(|e| !e.is_ok() && e.time >= since) {
        let key = (e.verb.clone(), e.who(), e.code.unwrap_or_default());
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => {
                g.1 += 1;
                g.2 = e.msg.clone();
            }
            None => groups.push((key, 1, e.msg.clone())),
        }
    }
    if groups.is_empty() {
        rep.ok(
            "cni.log",
            format!(
                "{}: {} calls logged, no failures in the last hour",
                path.display(),
                entries.len()
            ),
        );
    } else {
        groups.sort_by_key(|g| std::cmp::Reverse(g.1));
        let lines: Vec<String> = groups
            .iter()
            .take(FIRST_FEW)
            .map(|((verb, who, code), n, msg)| {
                format!(
                    "{verb} for {who} failed {n} time{} with code {code}: {msg}",
                    if *n == 1 { "" } else { "s" }
                )
            })
            .collect();
        rep.push(
            "cni.log",
            Status::Warn,
            format!("{}: {}", path.display(), lines.join("; ")),
            "the messages say what the plugin refused; the runtime retries ADD",
        );
    }
}
