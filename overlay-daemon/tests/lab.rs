//! ferryd end to end: labs of node namespaces on an underlay bridge, a real
//! etcd in the underlay, ferryd in every node, pods ADDed through the
//! conflist each ferryd wrote. See ferry_tests::lab.

use ferry_tests::etcd::require_etcd;
use ferry_tests::lab::{Lab, Underlay, underlay_ip, underlay_ip6};
use ferry_tests::{TestNetns, require_root, wait_until};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VXLAN: &str =
    r#"{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan","vni":1}}"#;
const VXLAN_DIRECT: &str = r#"{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan","vni":1,"directRouting":true}}"#;
const HOST_GW: &str = r#"{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"host-gw"}}"#;
const READY: Duration = Duration::from_secs(30);

fn can_run() -> bool {
    require_root() && require_etcd()
}

/// `nodes` nodes, each ready, with `pods` pods each.
fn lab(network: &str, nodes: usize, pods: usize) -> Lab {
    lab_over(network, Underlay::V4, nodes, pods)
}

/// [`lab`] with the nodes' underlay of `family`.
fn lab_over(network: &str, family: Underlay, nodes: usize, pods: usize) -> Lab {
    lab_with(network, family, nodes, pods, &["--resync-interval", "1"])
}

/// [`lab_over`] with these ferryd arguments on every node.
fn lab_with(network: &str, family: Underlay, nodes: usize, pods: usize, args: &[&str]) -> Lab {
    let mut lab = Lab::new_with(network, family);
    lab.ferryd_args = args.iter().map(|a| a.to_string()).collect();
    for _ in 0..nodes {
        lab.add_node();
    }
    lab.assert_all_ready(READY);
    for i in 0..nodes {
        for _ in 0..pods {
            lab.add_pod(i);
        }
    }
    lab
}

fn assert_full_matrix(lab: &Lab) {
    let failed = lab.ping_matrix(3);
    assert!(
        failed.is_empty(),
        "unreachable pod pairs {failed:?}\nn1 log:\n{}",
        lab.ferryd_log(0)
    );
}

/// Routes of `ns` in the main table, as `ip -j route` objects.
fn routes(ns: &TestNetns) -> Vec<Value> {
    ns.ip_json(&["route", "show", "table", "main"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn route_to<'a>(routes: &'a [Value], dst: &str) -> Option<&'a Value> {
    routes.iter().find(|r| r["dst"] == dst)
}

/// `10.244.3.1/24` (subnet.env's gateway form) → `10.244.3.0/24`.
fn subnet_of(lab: &Lab, i: usize) -> String {
    let gw = lab.node_subnet(i).expect("subnet.env written");
    let (ip, len) = gw.split_once('/').unwrap();
    let mut octets: Vec<&str> = ip.split('.').collect();
    octets[3] = "0";
    format!("{}/{len}", octets.join("."))
}

fn subnet_base(subnet: &str) -> String {
    subnet.split('/').next().unwrap().to_string()
}

#[test]
fn vxlan_every_pod_reaches_every_pod() {
    if !can_run() {
        return;
    }
    let lab = lab(VXLAN, 3, 2);
    assert_full_matrix(&lab);

    // The kernel objects are the documented ones.
    let n1 = &lab.nodes[0].ns;
    let dev = n1.ip_json(&["-d", "link", "show", "ferry.1"]);
    let info = &dev[0]["linkinfo"]["info_data"];
    assert_eq!(info["id"], 1, "{dev}");
    assert_eq!(info["learning"], false, "{dev}");
    assert_eq!(info["local"], underlay_ip(11).to_string(), "{dev}");
    assert_eq!(dev[0]["mtu"], 1450, "underlay 1500 - 50: {dev}");
    let conflist: Value =
        serde_json::from_str(&std::fs::read_to_string(lab.conflist(0)).unwrap()).unwrap();
    assert_eq!(conflist["plugins"][0]["mtu"], 1450, "{conflist}");
    let r = routes(n1);
    for peer in [1, 2] {
        let subnet = subnet_of(&lab, peer);
        let route = route_to(&r, &subnet).unwrap_or_else(|| panic!("no route to {subnet}: {r:?}"));
        assert_eq!(route["dev"], "ferry.1", "{route}");
        assert_eq!(route["gateway"], subnet_base(&subnet), "{route}");
        assert!(
            route["flags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "onlink"),
            "{route}"
        );
    }
    let fdb = n1.exec("bridge", &["fdb", "show", "dev", "ferry.1"]);
    for peer in [12, 13] {
        assert!(fdb.contains(&format!("dst {}", underlay_ip(peer))), "{fdb}");
    }
    // Masquerade only for traffic leaving the cluster network: a pod on n2
    // sees n1's pod address, the underlay (outside) sees n1's node address.
    let (p1, p2) = (lab.pod((0, 0)), lab.pod((1, 0)));
    assert_eq!(
        ferry_tests::source_seen(&p1.ns, &p2.ns, p2.ip.into()),
        std::net::IpAddr::from(p1.ip),
        "pod-to-pod across nodes keeps the pod source"
    );
    assert_eq!(
        ferry_tests::source_seen(&p1.ns, &lab.underlay, underlay_ip(1).into()),
        std::net::IpAddr::from(underlay_ip(11)),
        "traffic leaving the cluster network is masqueraded to the node address"
    );
    let metrics = lab.http(0, "/metrics").unwrap().1;
    assert!(metrics.contains("ferry_peers_programmed 2"), "{metrics}");
    assert!(metrics.contains("ferry_lease_held 1"), "{metrics}");
}

#[test]
fn vxlan_over_an_ipv6_underlay_every_pod_reaches_every_pod() {
    if !can_run() {
        return;
    }
    let lab = lab_over(VXLAN, Underlay::V6, 3, 2);
    assert_full_matrix(&lab);

    let n1 = &lab.nodes[0].ns;
    assert_eq!(lab.nodes[0].public_ip, underlay_ip6(11));
    let dev = n1.ip_json(&["-d", "link", "show", "ferry.1"]);
    let info = &dev[0]["linkinfo"]["info_data"];
    assert_eq!(info["local6"], underlay_ip6(11).to_string(), "{dev}");
    assert_eq!(info["learning"], false, "{dev}");
    assert_eq!(dev[0]["mtu"], 1430, "underlay 1500 - 70: {dev}");
    let conflist: Value =
        serde_json::from_str(&std::fs::read_to_string(lab.conflist(0)).unwrap()).unwrap();
    assert_eq!(conflist["plugins"][0]["mtu"], 1430, "{conflist}");
    let fdb = n1.exec("bridge", &["fdb", "show", "dev", "ferry.1"]);
    for peer in [12, 13] {
        assert!(
            fdb.contains(&format!("dst {} ", underlay_ip6(peer))),
            "{fdb}"
        );
    }
    // Pod routes stay IPv4, through the device.
    let r = routes(n1);
    for peer in [1, 2] {
        let subnet = subnet_of(&lab, peer);
        let route = route_to(&r, &subnet).unwrap_or_else(|| panic!("no route to {subnet}: {r:?}"));
        assert_eq!(route["dev"], "ferry.1", "{route}");
        assert_eq!(route["gateway"], subnet_base(&subnet), "{route}");
    }
    // Each lease publishes the IPv6 address.
    let show = lab.ferryd_cli(&["show"]);
    let text = String::from_utf8_lossy(&show.stdout);
    for host in [11, 12, 13] {
        assert!(
            text.contains(&format!("\"publicIp\":\"{}\"", underlay_ip6(host))),
            "{text}"
        );
    }
}

#[test]
fn host_gw_over_an_ipv6_underlay_is_a_startup_error() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new_with(HOST_GW, Underlay::V6);
    let n1 = lab.add_node();
    assert!(
        wait_until(Duration::from_secs(10), || !lab.ferryd_running(n1)),
        "ferryd kept running:\n{}",
        lab.ferryd_log(n1)
    );
    let log = lab.ferryd_log(n1);
    assert!(log.contains("host-gw needs an IPv4 underlay"), "{log}");
    let show = lab.ferryd_cli(&["show"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("leases at revision") && !text.contains("\"node\":"),
        "no lease taken: {text}"
    );
}

#[test]
fn host_gw_every_pod_reaches_every_pod() {
    if !can_run() {
        return;
    }
    let lab = lab(HOST_GW, 3, 2);
    assert_full_matrix(&lab);
    let n1 = &lab.nodes[0].ns;
    assert!(
        n1.links_of_kind("vxlan").is_empty(),
        "host-gw makes no vxlan device"
    );
    let r = routes(n1);
    for (peer, host) in [(1, 12), (2, 13)] {
        let subnet = subnet_of(&lab, peer);
        let route = route_to(&r, &subnet).unwrap_or_else(|| panic!("no route to {subnet}: {r:?}"));
        assert_eq!(route["gateway"], underlay_ip(host).to_string(), "{route}");
        assert_eq!(route["dev"], "eth0", "{route}");
    }
}

#[test]
fn vxlan_direct_routing_uses_plain_routes_on_one_segment() {
    if !can_run() {
        return;
    }
    let lab = lab(VXLAN_DIRECT, 3, 2);
    assert_full_matrix(&lab);
    let n1 = &lab.nodes[0].ns;
    let r = routes(n1);
    for (peer, host) in [(1, 12), (2, 13)] {
        let subnet = subnet_of(&lab, peer);
        let route = route_to(&r, &subnet).unwrap_or_else(|| panic!("no route to {subnet}: {r:?}"));
        assert_eq!(route["gateway"], underlay_ip(host).to_string(), "{route}");
        assert_eq!(route["dev"], "eth0", "{route}");
    }
    let fdb = n1.exec("bridge", &["fdb", "show", "dev", "ferry.1"]);
    assert!(
        !fdb.contains("dst 192.168.77"),
        "no tunnel entries needed: {fdb}"
    );
}

/// Whether node `i` still has any entry for `subnet` (route, neighbour) or
/// an fdb entry towards `peer_ip`.
fn has_entries_for(lab: &Lab, i: usize, subnet: &str, peer_ip: &str) -> bool {
    let ns = &lab.nodes[i].ns;
    let r = routes(ns);
    let neigh = ns.exec("ip", &["neigh", "show", "dev", "ferry.1"]);
    let fdb = ns.exec("bridge", &["fdb", "show", "dev", "ferry.1"]);
    route_to(&r, subnet).is_some()
        || neigh.contains(&format!("{} ", subnet_base(subnet)))
        || fdb.contains(&format!("dst {peer_ip} "))
}

#[test]
fn a_removed_node_disappears_from_every_other_node() {
    if !can_run() {
        return;
    }
    let mut lab = lab(VXLAN, 3, 1);
    assert_full_matrix(&lab);
    let gone = subnet_of(&lab, 2);
    let gone_ip = underlay_ip(13).to_string();
    assert!(has_entries_for(&lab, 0, &gone, &gone_ip));
    // SIGTERM: a clean exit that leaves the data path as it is.
    assert_eq!(
        lab.stop_ferryd(2, Signal::SIGTERM),
        Some(0),
        "{}",
        lab.ferryd_log(2)
    );
    let n1_subnet = subnet_of(&lab, 0);
    assert!(
        route_to(&routes(&lab.nodes[2].ns), &n1_subnet).is_some(),
        "n3 kept its route to n1 after SIGTERM"
    );
    assert!(lab.nodes[2].ns.link("ferry.1").is_some());
    let out = lab.ferryd_cli(&["remove-node", "n3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in [0, 1] {
        assert!(
            wait_until(Duration::from_secs(5), || !has_entries_for(
                &lab, i, &gone, &gone_ip
            )),
            "n{} still has entries for the removed n3",
            i + 1
        );
    }
    // The others still reach each other.
    let (a, b) = (lab.pod((0, 0)), lab.pod((1, 0)));
    assert!(a.ns.ping(b.ip.into(), 3));
}

/// `ip monitor route neigh` in `ns`, running until [`Monitor::stop`].
struct Monitor(std::process::Child);

impl Monitor {
    fn start(ns: &TestNetns) -> Monitor {
        let mut cmd = Command::new("ip");
        cmd.args(["monitor", "route", "neigh"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        ferry_tests::in_netns_cmd(&mut cmd, ns.netns());
        let m = Monitor(cmd.spawn().expect("ip monitor"));
        std::thread::sleep(Duration::from_millis(200));
        m
    }

    fn stop(mut self) -> String {
        let _ = self.0.kill();
        let mut out = String::new();
        if let Some(mut s) = self.0.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        let _ = self.0.wait();
        out
    }
}

#[test]
fn a_restarted_daemon_keeps_its_subnet_and_nothing_flaps() {
    if !can_run() {
        return;
    }
    let mut lab = lab(VXLAN, 3, 1);
    assert_full_matrix(&lab);
    let before = subnet_of(&lab, 0);
    let watch_self = Monitor::start(&lab.nodes[0].ns);
    let watch_peer = Monitor::start(&lab.nodes[1].ns);

    lab.stop_ferryd(0, Signal::SIGKILL);
    lab.start_ferryd(0);
    assert!(lab.wait_ready(0, READY), "{}", lab.ferryd_log(0));
    assert_eq!(subnet_of(&lab, 0), before, "same subnet after a restart");
    std::thread::sleep(Duration::from_millis(500));
    assert_full_matrix(&lab);

    for (who, out) in [("n1", watch_self.stop()), ("n2", watch_peer.stop())] {
        let deleted: Vec<&str> = out.lines().filter(|l| l.starts_with("Deleted")).collect();
        assert!(
            deleted.is_empty(),
            "entries flapped on {who} during n1's restart: {deleted:?}"
        );
    }
    let show = lab.ferryd_cli(&["show"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert_eq!(text.matches("\"node\":\"n1\"").count(), 1, "{text}");
}

#[test]
fn an_etcd_outage_keeps_the_data_path_and_the_cluster_reconverges() {
    if !can_run() {
        return;
    }
    let mut lab = lab(VXLAN, 2, 1);
    assert_full_matrix(&lab);
    lab.stop_etcd();
    // A node joins while etcd is away: it must wait, not fail.
    let n3 = lab.add_node();
    let end = Instant::now() + Duration::from_secs(30);
    let (a, b) = (lab.pod((0, 0)).ip, lab.pod((1, 0)).ip);
    while Instant::now() < end {
        assert!(
            lab.pod((0, 0)).ns.ping(b.into(), 2),
            "n1→n2 broke during the outage"
        );
        assert!(
            lab.pod((1, 0)).ns.ping(a.into(), 2),
            "n2→n1 broke during the outage"
        );
        assert!(lab.ferryd_running(0) && lab.ferryd_running(1) && lab.ferryd_running(n3));
        std::thread::sleep(Duration::from_secs(3));
    }
    assert!(lab.metric(0, "ferry_etcd_errors_total").unwrap_or(0.0) > 0.0);
    lab.start_etcd();
    assert!(lab.wait_ready(n3, READY), "{}", lab.ferryd_log(n3));
    lab.add_pod(n3);
    let new_pod = lab.pod((n3, 0)).ip;
    assert!(
        wait_until(Duration::from_secs(10), || lab
            .pod((0, 0))
            .ns
            .ping(new_pod.into(), 1)),
        "the node added during the outage is not reachable:\n{}",
        lab.ferryd_log(0)
    );
    assert_full_matrix(&lab);
}

#[test]
fn drift_is_repaired_within_two_seconds() {
    if !can_run() {
        return;
    }
    let lab = lab(VXLAN, 2, 1);
    assert_full_matrix(&lab);
    let n1 = &lab.nodes[0].ns;
    let peer = subnet_of(&lab, 1);

    n1.exec("ip", &["route", "del", &peer]);
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(2), || route_to(&routes(n1), &peer)
            .is_some()),
        "deleted route not back within 2 s"
    );
    eprintln!("route repaired in {:?}", t.elapsed());

    n1.exec("ip", &["link", "del", "ferry.1"]);
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(2), || {
            n1.link("ferry.1").is_some() && route_to(&routes(n1), &peer).is_some()
        }),
        "deleted vxlan device not back within 2 s:\n{}",
        lab.ferryd_log(0)
    );
    eprintln!("device and routes repaired in {:?}", t.elapsed());
    assert_full_matrix(&lab);
    assert!(
        lab.metric(0, "ferry_reconcile_repairs_total")
            .unwrap_or(0.0)
            >= 2.0
    );
}

#[test]
fn twenty_daemons_started_at_once_get_twenty_subnets() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new(VXLAN);
    for _ in 0..20 {
        lab.add_idle_node();
    }
    for i in 0..20 {
        lab.start_ferryd(i);
    }
    lab.assert_all_ready(Duration::from_secs(60));
    let mut subnets: Vec<String> = (0..20).map(|i| subnet_of(&lab, i)).collect();
    subnets.sort();
    subnets.dedup();
    assert_eq!(subnets.len(), 20, "{subnets:?}");
    let show = lab.ferryd_cli(&["show"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("leases at revision"), "{text}");
    assert_eq!(text.matches("\"node\":").count(), 20, "{text}");
}

const VXLAN_DUAL: &str = r#"{"network":"10.244.0.0/16","subnetLen":24,"ipv6Network":"fd00:244::/56","backend":{"type":"vxlan","vni":1}}"#;

/// `FERRY_IPV6_SUBNET` of node `i`'s subnet.env (`fd00:244:0:3::1/64`).
fn ipv6_subnet_env(lab: &Lab, i: usize) -> String {
    let text = std::fs::read_to_string(lab.nodes[i].dir.join("subnet.env")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("FERRY_IPV6_SUBNET="))
        .unwrap_or_else(|| panic!("no FERRY_IPV6_SUBNET in {text}"))
        .to_string()
}

#[test]
fn dual_stack_vxlan_every_pod_reaches_every_pod_over_both_families() {
    if !can_run() {
        return;
    }
    // A long periodic pass: the IPv6 drift below must be seen from netlink.
    let lab = lab_with(VXLAN_DUAL, Underlay::V4, 3, 2, &["--resync-interval", "60"]);
    assert_full_matrix(&lab);
    let failed = lab.ping_matrix6(3);
    assert!(
        failed.is_empty(),
        "unreachable pod pairs over IPv6 {failed:?}\nn1 log:\n{}",
        lab.ferryd_log(0)
    );

    // Each node's IPv6 subnet is the one of its IPv4 subnet's index, and its
    // pods' addresses come from it.
    for i in 0..3 {
        let v4 = subnet_of(&lab, i);
        let third: u32 = v4.split('.').nth(2).unwrap().parse().unwrap();
        assert_eq!(
            ipv6_subnet_env(&lab, i),
            format!("fd00:244:0:{third:x}::1/64")
        );
        for p in &lab.nodes[i].pods {
            let ip6 = p.ip6.expect("dual-stack pod");
            assert!(
                ip6.to_string()
                    .starts_with(&format!("fd00:244:0:{third:x}::")),
                "{ip6} in node {i} with {v4}"
            );
        }
    }
    let conflist: Value =
        serde_json::from_str(&std::fs::read_to_string(lab.conflist(0)).unwrap()).unwrap();
    assert_eq!(
        conflist["plugins"][0]["ipMasqExclude"],
        serde_json::json!(["10.244.0.0/16", "fd00:244::/56"]),
        "{conflist}"
    );

    // n1: its own /128 on the device, per peer an IPv6 neighbour and an
    // onlink route through ferry.1 with protocol 70.
    let n1 = &lab.nodes[0].ns;
    let addrs = n1.exec("ip", &["-6", "addr", "show", "dev", "ferry.1"]);
    let own = ipv6_subnet_env(&lab, 0).replace("::1/64", "::/128");
    assert!(addrs.contains(&own), "{own}: {addrs}");
    let r6 = n1.exec("ip", &["-6", "route", "show", "proto", "70"]);
    let neigh6 = n1.exec("ip", &["-6", "neigh", "show", "dev", "ferry.1"]);
    for peer in [1, 2] {
        let gw = ipv6_subnet_env(&lab, peer).replace("::1/64", "::");
        let subnet = ipv6_subnet_env(&lab, peer).replace("::1/64", "::/64");
        assert!(
            r6.contains(&format!("{subnet} via {gw} dev ferry.1")),
            "{subnet}: {r6}"
        );
        assert!(neigh6.contains(&format!("{gw} lladdr")), "{gw}: {neigh6}");
        assert!(neigh6.contains("PERMANENT"), "{neigh6}");
    }

    // IPv6 drift is repaired from netlink events, not only by the periodic
    // pass (60 s here).
    let peer6 = ipv6_subnet_env(&lab, 1).replace("::1/64", "::/64");
    n1.exec("ip", &["-6", "route", "del", &peer6]);
    let t = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(2), || n1
            .exec("ip", &["-6", "route", "show", "proto", "70"])
            .contains(&peer6)),
        "deleted IPv6 route {peer6} not back within 2 s"
    );
    eprintln!("IPv6 route repaired in {:?}", t.elapsed());

    // A node leaving takes its IPv6 routes along.
    let out = lab.ferryd_cli(&["remove-node", "n3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = ipv6_subnet_env(&lab, 2).replace("::1/64", "::/64");
    assert!(
        wait_until(Duration::from_secs(10), || !n1
            .exec("ip", &["-6", "route", "show", "proto", "70"])
            .contains(&gone)),
        "{gone} still routed on n1"
    );
}

#[test]
fn dual_stack_direct_routing_over_an_ipv6_underlay_routes_ipv6_pods_directly() {
    if !can_run() {
        return;
    }
    let network = r#"{"network":"10.244.0.0/16","ipv6Network":"fd00:244::/56","backend":{"type":"vxlan","directRouting":true}}"#;
    let lab = lab_over(network, Underlay::V6, 3, 1);
    assert_full_matrix(&lab);
    let failed = lab.ping_matrix6(3);
    assert!(
        failed.is_empty(),
        "unreachable pod pairs over IPv6 {failed:?}\nn1 log:\n{}",
        lab.ferryd_log(0)
    );
    // IPv6 pod subnets via the peer's underlay address; IPv4 through the tunnel.
    let n1 = &lab.nodes[0].ns;
    let r6 = n1.exec("ip", &["-6", "route", "show", "proto", "70"]);
    for peer in [1, 2] {
        let subnet = ipv6_subnet_env(&lab, peer).replace("::1/64", "::/64");
        let via = format!(
            "{subnet} via {} dev eth0",
            underlay_ip6(12 + peer as u8 - 1)
        );
        assert!(r6.contains(&via), "{via}: {r6}");
        let route = route_to(&routes(n1), &subnet_of(&lab, peer))
            .cloned()
            .unwrap();
        assert_eq!(route["dev"], "ferry.1", "{route}");
    }
}
