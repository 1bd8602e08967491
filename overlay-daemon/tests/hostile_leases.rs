//! ferryd against forged cluster data and kernel objects it does not own
//! (issue 9, items 6 and 7): leases written straight into the lab's etcd
//! the way anyone with write access to the subnets prefix could, networks
//! `set-network` must refuse, and routes, neighbours and links ferry must
//! never take over. Each lab is its own underlay namespace with a real etcd
//! and a ferryd per node (see ferry_tests::lab).

use ferry_netops::{NsHandle, in_netns};
use ferry_tests::etcd::require_etcd;
use ferry_tests::lab::{Lab, etcd_endpoint, underlay_ip};
use ferry_tests::{TestNetns, require_root, wait_until};
use ferryd::dataplane::{Dataplane, LocalNode, Peer, find_underlay};
use ferryd::lease::Mac;
use ferryd::network::{BackendConfig, BackendType};
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

const VXLAN: &str =
    r#"{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan","vni":1}}"#;
const READY: Duration = Duration::from_secs(30);
/// Long enough for a lease change to reach a node and a pass to run.
const SETTLE: Duration = Duration::from_secs(10);

fn can_run() -> bool {
    require_root() && require_etcd()
}

/// A lab of `nodes` ready nodes, a pass every second.
fn lab(network: &str, nodes: usize) -> Lab {
    let mut lab = Lab::new(network);
    for _ in 0..nodes {
        lab.add_node();
    }
    lab.assert_all_ready(READY);
    lab
}

/// Runs `f` with an etcd client connected from inside the lab's underlay
/// namespace (where etcd listens), on a thread of its own.
fn with_etcd<T: Send>(lab: &Lab, f: impl AsyncFnOnce(&mut etcd_client::Client) -> T + Send) -> T {
    in_netns(lab.underlay.netns(), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(async {
            let mut c = etcd_client::Client::connect([etcd_endpoint()], None)
                .await
                .expect("connect to the lab's etcd");
            f(&mut c).await
        }))
    })
    .expect("run in the underlay namespace")
}

fn lease_key(subnet: &str) -> String {
    format!("/ferry/network/subnets/{}", subnet.replace('/', "-"))
}

/// Writes a lease for `subnet` as a forger would: no etcd lease, any values.
fn forge(lab: &Lab, subnet: &str, value: Value) {
    let key = lease_key(subnet);
    with_etcd(lab, async move |c| {
        c.put(key, value.to_string(), None)
            .await
            .expect("put lease");
    });
}

fn unforge(lab: &Lab, subnet: &str) {
    let key = lease_key(subnet);
    with_etcd(lab, async move |c| {
        c.delete(key, None).await.expect("delete lease");
    });
}

/// A well-formed vxlan lease at `public_ip` (override fields in `extra`).
fn lease(node: &str, public_ip: &str, extra: Value) -> Value {
    let mut v = serde_json::json!({
        "node": node,
        "publicIp": public_ip,
        "backend": "vxlan",
        "vtepMac": Mac::derived(node).to_string(),
    });
    for (k, x) in extra.as_object().expect("object").clone() {
        v[k] = x;
    }
    v
}

/// The main-table routes of `ns` to exactly `dst`, as `ip -j` objects.
fn routes_to(ns: &TestNetns, dst: &str) -> Vec<Value> {
    ns.ip_json(&["route", "show", "table", "main", "exact", dst])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn metric(lab: &Lab, i: usize, name: &str) -> f64 {
    lab.metric(i, name).unwrap_or(-1.0)
}

fn readyz(lab: &Lab, i: usize) -> (u16, String) {
    lab.http(i, "/readyz").unwrap_or((0, String::new()))
}

/// The subnet node `i` holds (`10.244.3.0/24`).
fn subnet_of(lab: &Lab, i: usize) -> String {
    let gw = lab.node_subnet(i).expect("subnet.env written");
    let (ip, len) = gw.split_once('/').expect("a prefix");
    let ip: Ipv4Addr = ip.parse().expect("an IPv4 address");
    format!("{}/{len}", Ipv4Addr::from(u32::from(ip) & !0xff))
}

/// Item 6: a lease for a subnet the node already routes (a connected
/// subnet, a static route of another protocol) must not replace that route,
/// nor remove it when the lease goes; the peer is reported and the node
/// stays ready for the peers it can program.
#[test]
fn a_lease_colliding_with_a_node_route_never_takes_it_over() {
    if !can_run() {
        return;
    }
    let lab = lab(VXLAN, 2);
    let n1 = &lab.nodes[0].ns;
    // After ferryd started (the start check would refuse it before): a
    // second interface whose connected subnet lies in the cluster network,
    // and a static route into it.
    n1.exec(
        "ip",
        &["link", "add", "hl0", "type", "veth", "peer", "name", "hl1"],
    );
    n1.exec("ip", &["addr", "add", "10.244.200.1/24", "dev", "hl0"]);
    n1.exec("ip", &["link", "set", "hl1", "up"]);
    n1.exec("ip", &["link", "set", "hl0", "up"]);
    n1.exec(
        "ip",
        &[
            "route",
            "add",
            "10.244.201.0/24",
            "via",
            &underlay_ip(1).to_string(),
            "proto",
            "static",
        ],
    );
    let connected = routes_to(n1, "10.244.200.0/24");
    let static_route = routes_to(n1, "10.244.201.0/24");
    assert_eq!(connected.len(), 1, "{connected:?}");

    forge(
        &lab,
        "10.244.200.0/24",
        lease("intruder-a", "192.168.77.99", serde_json::json!({})),
    );
    forge(
        &lab,
        "10.244.201.0/24",
        lease("intruder-b", "192.168.77.98", serde_json::json!({})),
    );
    // The other node (without those routes) programs both forged peers: the
    // conflict is this node's alone. By then n1 has seen them too; a few
    // more passes (one a second) must leave its routes as they were.
    assert!(wait_until(SETTLE, || {
        metric(&lab, 1, "ferry_peers_programmed") == 3.0
    }));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(routes_to(n1, "10.244.200.0/24"), connected);
    assert_eq!(routes_to(n1, "10.244.201.0/24"), static_route);
    assert!(
        wait_until(SETTLE, || metric(&lab, 0, "ferry_peer_conflicts") == 2.0),
        "ferry_peer_conflicts not 2: {:?}\n{}",
        lab.metric(0, "ferry_peer_conflicts"),
        lab.ferryd_log(0)
    );
    assert!(
        !n1.exec("ip", &["neigh", "show", "dev", "ferry.1"])
            .contains("10.244.200.0"),
        "no neighbour for a skipped peer"
    );
    // Ready for the peer it can program, and the skipped ones are named.
    let (code, body) = readyz(&lab, 0);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("peer 10.244.200.0/24 skipped")
            && body.contains("dev hl0")
            && body.contains("peer 10.244.201.0/24 skipped"),
        "{body}"
    );
    assert_eq!(metric(&lab, 0, "ferry_peers_programmed"), 1.0);
    let peer = subnet_of(&lab, 1);
    assert_eq!(routes_to(n1, &peer).len(), 1, "the real peer is programmed");
    // Passes go on (every second) without touching them.
    let repairs = metric(&lab, 0, "ferry_reconcile_repairs_total");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(metric(&lab, 0, "ferry_reconcile_repairs_total"), repairs);

    // The leases go: the node's routes stay, the report clears.
    unforge(&lab, "10.244.200.0/24");
    unforge(&lab, "10.244.201.0/24");
    assert!(
        wait_until(SETTLE, || metric(&lab, 0, "ferry_peer_conflicts") == 0.0),
        "{}",
        lab.ferryd_log(0)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(routes_to(n1, "10.244.200.0/24"), connected);
    assert_eq!(routes_to(n1, "10.244.201.0/24"), static_route);
    let (code, body) = readyz(&lab, 0);
    assert_eq!((code, body.as_str()), (200, "ready\n"));
}

/// Item 7: leases whose public IP is unspecified, loopback, multicast or
/// this node's own address (and other forged values) are skipped and
/// counted; they never count as repairs or hold readiness back.
#[test]
fn leases_with_unusable_values_are_skipped_and_do_not_block_readiness() {
    if !can_run() {
        return;
    }
    let lab = lab(VXLAN, 2);
    let own = underlay_ip(11).to_string();
    let bad: Vec<(&str, Value)> = vec![
        (
            "10.244.201.0/24",
            lease("z1", "0.0.0.0", serde_json::json!({})),
        ),
        (
            "10.244.202.0/24",
            lease("z2", "127.0.0.1", serde_json::json!({})),
        ),
        (
            "10.244.203.0/24",
            lease("z3", "224.0.0.1", serde_json::json!({})),
        ),
        ("10.244.204.0/24", lease("z4", &own, serde_json::json!({}))),
        (
            "10.244.205.0/24",
            lease(
                "z5",
                "192.168.77.95",
                serde_json::json!({"vtepMac": "ff:ff:ff:ff:ff:ff"}),
            ),
        ),
        (
            "10.244.206.0/24",
            lease("z6", "10.244.1.7", serde_json::json!({})),
        ),
        // Not one of the network's /24s.
        (
            "10.99.0.0/24",
            lease("z7", "192.168.77.97", serde_json::json!({})),
        ),
        (
            "10.244.208.0/23",
            lease("z8", "192.168.77.96", serde_json::json!({})),
        ),
    ];
    for (subnet, value) in &bad {
        forge(&lab, subnet, value.clone());
    }
    // A few passes (one a second) later: still ready, nothing programmed
    // for them.
    let n1 = &lab.nodes[0].ns;
    std::thread::sleep(Duration::from_secs(3));
    let (code, body) = readyz(&lab, 0);
    assert_eq!(code, 200, "{body}\n{}", lab.ferryd_log(0));
    for (subnet, _) in &bad {
        assert!(routes_to(n1, subnet).is_empty(), "{subnet}");
    }
    let fdb = n1.exec("bridge", &["fdb", "show", "dev", "ferry.1"]);
    for ip in ["0.0.0.0", "127.0.0.1", "224.0.0.1", own.as_str()] {
        assert!(!fdb.contains(&format!("dst {ip} ")), "{ip}: {fdb}");
    }
    let n = bad.len() as f64;
    assert!(
        wait_until(SETTLE, || metric(&lab, 0, "ferry_invalid_leases") == n),
        "ferry_invalid_leases {:?}, want {n}\n{}",
        lab.metric(0, "ferry_invalid_leases"),
        lab.ferryd_log(0)
    );
    let (code, body) = readyz(&lab, 0);
    assert_eq!(code, 200, "{body}");
    for (want, subnet) in [
        (
            "publicIp 0.0.0.0 is not a unicast address",
            "10.244.201.0/24",
        ),
        (
            "publicIp 127.0.0.1 is not a unicast address",
            "10.244.202.0/24",
        ),
        (
            "publicIp 224.0.0.1 is not a unicast address",
            "10.244.203.0/24",
        ),
        (
            "publicIp 192.168.77.11 is an address of this node",
            "10.244.204.0/24",
        ),
        (
            "vtepMac ff:ff:ff:ff:ff:ff is not a unicast MAC",
            "10.244.205.0/24",
        ),
        (
            "publicIp 10.244.1.7 is inside the cluster network",
            "10.244.206.0/24",
        ),
        (
            "subnet 10.99.0.0/24 is not one of the /24 node subnets",
            "10.99.0.0/24",
        ),
        (
            "subnet 10.244.208.0/23 is not one of the /24 node subnets",
            "10.244.208.0/23",
        ),
    ] {
        assert!(
            body.contains(&format!("invalid lease {subnet} skipped: {want}")),
            "{want}: {body}"
        );
    }
    assert_eq!(metric(&lab, 0, "ferry_peers_programmed"), 1.0);
    // Passes every second: no repairs, still ready.
    let repairs = metric(&lab, 0, "ferry_reconcile_repairs_total");
    let changed = metric(&lab, 0, "ferry_entries_changed_total");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(metric(&lab, 0, "ferry_reconcile_repairs_total"), repairs);
    assert_eq!(metric(&lab, 0, "ferry_entries_changed_total"), changed);
    assert_eq!(readyz(&lab, 0).0, 200);
    assert_eq!(metric(&lab, 0, "ferry_invalid_leases"), n);

    // A forged lease fixed in place becomes a peer.
    forge(
        &lab,
        "10.244.201.0/24",
        lease("z1", "192.168.77.91", serde_json::json!({})),
    );
    assert!(wait_until(SETTLE, || {
        metric(&lab, 0, "ferry_invalid_leases") == n - 1.0
            && metric(&lab, 0, "ferry_peers_programmed") == 2.0
    }));
    assert_eq!(routes_to(n1, "10.244.201.0/24").len(), 1);
}

/// Item 7: `set-network` refuses networks that cannot be pod networks.
#[test]
fn set_network_refuses_unusable_networks() {
    if !can_run() {
        return;
    }
    let lab = Lab::new(VXLAN);
    for (network, want) in [
        (
            r#"{"network":"0.0.0.0/0"}"#,
            "network 0.0.0.0/0 is not a usable",
        ),
        (r#"{"network":"127.0.0.0/8"}"#, "loopback"),
        (r#"{"network":"224.0.0.0/4"}"#, "multicast"),
        (
            r#"{"network":"10.244.0.0/16","ipv6Network":"::/0"}"#,
            "ipv6Network ::/0 is not a usable",
        ),
        (
            r#"{"network":"10.0.0.1/8"}"#,
            "10.0.0.1/8 has host bits set",
        ),
    ] {
        let out = lab.ferryd_cli(&["set-network", network]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{network} accepted");
        assert!(stderr.contains(want), "{network}: {stderr}");
    }
    let out = lab.ferryd_cli(&["show"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(r#""network":"10.244.0.0/16""#),
        "config unchanged: {stdout}"
    );
}

/// Item 7: a cluster network that holds the node's own underlay subnet is
/// refused at start: its routes would take over the node's own traffic.
#[test]
fn ferryd_refuses_to_start_when_the_network_overlaps_the_node() {
    if !can_run() {
        return;
    }
    // The underlay is 192.168.77.0/24.
    let mut lab = Lab::new(
        r#"{"network":"192.168.0.0/16","subnetLen":24,"backend":{"type":"vxlan","vni":1}}"#,
    );
    let i = lab.add_node();
    assert!(
        wait_until(Duration::from_secs(15), || !lab.ferryd_running(i)),
        "ferryd runs on a network overlapping its underlay:\n{}",
        lab.ferryd_log(i)
    );
    let log = lab.ferryd_log(i);
    assert!(
        log.contains(
            "the cluster network overlaps this node's device route 192.168.77.0/24 dev eth0 proto kernel"
        ),
        "{log}"
    );
    assert!(
        lab.nodes[i].ns.link("ferry.1").is_none(),
        "nothing programmed"
    );
    assert!(
        routes_to(&lab.nodes[i].ns, "192.168.77.0/24")[0]["protocol"] == "kernel",
        "the connected route is untouched"
    );
}

/// The start check counts only what is not ferry's: a VXLAN device of an
/// earlier config (`ferry.7`) and the pod bridge hold cluster addresses and
/// do not stop the start; an interface of the operator's does.
#[test]
fn the_start_check_ignores_ferrys_own_links_only() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new(VXLAN);
    let i = lab.add_idle_node();
    let ns = &lab.nodes[i].ns;
    ns.exec(
        "ip",
        &[
            "link", "add", "ferry.7", "type", "vxlan", "id", "7", "dstport", "4789", "dev", "eth0",
        ],
    );
    ns.exec("ip", &["addr", "add", "10.244.50.0/32", "dev", "ferry.7"]);
    ns.exec(
        "ip",
        &[
            "link", "add", "cni0", "type", "veth", "peer", "name", "cni0p",
        ],
    );
    ns.exec("ip", &["addr", "add", "10.244.51.1/24", "dev", "cni0"]);
    ns.exec("ip", &["link", "set", "cni0p", "up"]);
    ns.exec("ip", &["link", "set", "cni0", "up"]);
    lab.start_ferryd(i);
    assert!(lab.wait_ready(i, READY), "{}", lab.ferryd_log(i));
    lab.stop_ferryd(i, nix::sys::signal::Signal::SIGTERM);

    let ns = &lab.nodes[i].ns;
    ns.exec(
        "ip",
        &["link", "add", "op0", "type", "veth", "peer", "name", "op1"],
    );
    ns.exec("ip", &["addr", "add", "10.244.52.9/32", "dev", "op0"]);
    lab.start_ferryd(i);
    assert!(
        wait_until(Duration::from_secs(15), || !lab.ferryd_running(i)),
        "{}",
        lab.ferryd_log(i)
    );
    assert!(
        lab.ferryd_log(i)
            .contains("the cluster network overlaps this node's address 10.244.52.9 on op0"),
        "{}",
        lab.ferryd_log(i)
    );
}

/// Item 7: a config written into etcd past `set-network` is refused when
/// the daemon reads it: no lease, no device, not ready, and the log says why.
#[test]
fn ferryd_refuses_a_bad_network_config_found_in_etcd() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new(VXLAN);
    with_etcd(&lab, async |c| {
        c.put(
            "/ferry/network/config",
            r#"{"network":"0.0.0.0/0","subnetLen":24,"backend":{"type":"vxlan","vni":1}}"#,
            None,
        )
        .await
        .expect("put config");
    });
    let i = lab.add_node();
    let want = "network 0.0.0.0/0 is not a usable unicast pod network";
    assert!(
        wait_until(SETTLE, || lab.ferryd_log(i).contains(want)),
        "{}",
        lab.ferryd_log(i)
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_ne!(readyz(&lab, i).0, 200);
    assert!(lab.node_subnet(i).is_none(), "no lease taken");
    assert!(lab.nodes[i].ns.link("ferry.1").is_none(), "no device");
    let leases = with_etcd(&lab, async |c| {
        c.get(
            "/ferry/network/subnets/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("get leases")
        .kvs()
        .len()
    });
    assert_eq!(leases, 0);
}

/// A link of another kind under the VXLAN device's name is not ferry's: the
/// pass fails, and the link is neither deleted nor changed.
#[test]
fn a_foreign_link_named_like_the_vxlan_device_is_left_alone() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    ns.exec(
        "ip",
        &["link", "add", "ul0", "type", "veth", "peer", "name", "ul1"],
    );
    ns.exec("ip", &["addr", "add", "192.0.0.1/16", "dev", "ul0"]);
    ns.exec("ip", &["link", "set", "ul0", "up"]);
    ns.exec(
        "ip",
        &[
            "link", "add", "ferry.1", "type", "veth", "peer", "name", "fx1",
        ],
    );
    let before = ns.link("ferry.1").expect("veth created");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt.block_on(async {
        let h = NsHandle::new(ns.netns()).unwrap();
        let underlay = find_underlay(&h, Some("ul0"), None).await.unwrap();
        let me = LocalNode {
            subnet: "10.244.1.0/24".parse().unwrap(),
            subnet6: None,
            underlay,
            vtep_mac: Mac::derived("local"),
        };
        let backend = BackendConfig {
            kind: BackendType::Vxlan,
            ..BackendConfig::default()
        };
        let mut dp = Dataplane::new(h, &backend, me);
        let peer = Peer {
            subnet: "10.244.2.0/24".parse().unwrap(),
            subnet6: None,
            public_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 0, 2)),
            vtep_mac: Some(Mac::derived("peer")),
        };
        dp.reconcile(&[peer]).await.unwrap_err()
    });
    assert!(
        err.to_string().contains("not ferry's VXLAN device"),
        "{err}"
    );
    let after = ns.link("ferry.1").expect("the veth is still there");
    assert_eq!(after.index, before.index);
    let d = ns.ip_json(&["-d", "link", "show", "ferry.1"]);
    assert_eq!(d[0]["linkinfo"]["info_kind"], "veth", "{d}");
}

/// Item 6 in the dataplane, both families: a peer whose IPv6 route would
/// collide with a foreign IPv6 route is skipped as a whole, and a peer that
/// was programmed steps back (its own entries go, the foreign route stays)
/// when a route of someone else's appears at its destination.
#[test]
fn dataplane_skips_peers_colliding_with_foreign_routes_of_either_family() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    ns.exec(
        "ip",
        &["link", "add", "ul0", "type", "veth", "peer", "name", "ul1"],
    );
    ns.exec("ip", &["addr", "add", "192.0.0.1/16", "dev", "ul0"]);
    ns.exec("ip", &["link", "set", "ul0", "up"]);
    ns.exec("ip", &["link", "set", "ul1", "up"]);
    let peer = |i: u8| Peer {
        subnet: format!("10.244.{i}.0/24").parse().unwrap(),
        subnet6: Some(format!("fd00:244:0:{i}::/64").parse().unwrap()),
        public_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 0, 10 + i)),
        vtep_mac: Some(Mac::derived(&format!("peer-{i}"))),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let h = NsHandle::new(ns.netns()).unwrap();
        let underlay = find_underlay(&h, Some("ul0"), None).await.unwrap();
        let me = LocalNode {
            subnet: "10.244.1.0/24".parse().unwrap(),
            subnet6: Some("fd00:244:0:1::/64".parse().unwrap()),
            underlay,
            vtep_mac: Mac::derived("local"),
        };
        let backend = BackendConfig {
            kind: BackendType::Vxlan,
            ..BackendConfig::default()
        };
        let cfg = ferryd::network::NetworkConfig::from_json(
            r#"{"network":"10.244.0.0/16","ipv6Network":"fd00:244::/56"}"#,
        )
        .unwrap();
        let mut dp = Dataplane::new(h, &backend, me).with_network(&cfg);
        // Someone else's routes: an IPv6 one to peer 3's IPv6 subnet, a
        // blackhole to peer 4's IPv4 subnet.
        ns.exec(
            "ip",
            &[
                "-6",
                "route",
                "add",
                "fd00:244:0:3::/64",
                "via",
                "fe80::1",
                "dev",
                "ul0",
            ],
        );
        ns.exec("ip", &["route", "add", "blackhole", "10.244.4.0/24"]);
        let peers: Vec<Peer> = (2..=5).map(peer).collect();
        let r = dp.reconcile(&peers).await.unwrap();
        assert_eq!(
            (r.peers_programmed, r.conflicts, r.failed),
            (2, 2, 0),
            "{r:?}"
        );
        let skipped: Vec<String> = dp.skipped().iter().map(|s| s.to_string()).collect();
        assert!(
            skipped[0].starts_with("peer 10.244.3.0/24 skipped")
                && skipped[0].contains("fd00:244:0:3::/64 via fe80::1 dev ul0"),
            "{skipped:?}"
        );
        assert!(
            skipped[1].starts_with("peer 10.244.4.0/24 skipped")
                && skipped[1].contains("10.244.4.0/24"),
            "{skipped:?}"
        );
        // Nothing of ferry's for them, the foreign routes as they were.
        assert!(
            !ns.exec("ip", &["route", "show", "10.244.3.0/24"])
                .contains("via")
        );
        let shown6 = ns.exec("ip", &["-6", "route", "show", "fd00:244:0:3::/64"]);
        assert!(shown6.contains("via fe80::1 dev ul0") && !shown6.contains("proto 70"));
        assert!(
            ns.exec("ip", &["route", "show", "10.244.4.0/24"])
                .contains("blackhole")
        );
        // Twice: nothing to do, still skipped.
        let r = dp.reconcile(&peers).await.unwrap();
        assert_eq!((r.added, r.removed, r.conflicts), (0, 0, 2), "{r:?}");

        // A foreign IPv4 route of another metric appears at peer 2's
        // destination: peer 2 steps back, its routes and neighbours go (by
        // protocol), the foreign route stays.
        ns.exec(
            "ip",
            &[
                "route",
                "add",
                "10.244.2.0/24",
                "via",
                "192.0.0.254",
                "metric",
                "50",
            ],
        );
        let r = dp.reconcile(&peers).await.unwrap();
        assert_eq!((r.peers_programmed, r.conflicts), (1, 3), "{r:?}");
        let shown = ns.exec("ip", &["route", "show", "10.244.2.0/24"]);
        assert!(
            shown.contains("via 192.0.0.254") && !shown.contains("proto 70"),
            "{shown}"
        );
        let neigh = ns.exec("ip", &["neigh", "show", "dev", "ferry.1"]);
        assert!(!neigh.contains("10.244.2.0 "), "{neigh}");
        assert!(neigh.contains("10.244.5.0 "), "{neigh}");

        // Entries on ferry's device: an untagged neighbour of the shape
        // ferry writes (an older ferryd's, for a peer now gone) goes with
        // its fdb entry; someone else's neighbours and a flood entry stay.
        let stray_mac = "02:00:00:00:00:77";
        for (ip, mac) in [
            ("10.244.9.0", stray_mac),
            ("10.244.9.5", "02:00:00:00:00:78"),
            ("10.250.0.0", "02:00:00:00:00:79"),
        ] {
            ns.exec(
                "ip",
                &[
                    "neigh",
                    "replace",
                    ip,
                    "lladdr",
                    mac,
                    "dev",
                    "ferry.1",
                    "nud",
                    "permanent",
                ],
            );
        }
        for (mac, dst) in [
            (stray_mac, "192.0.0.77"),
            ("00:00:00:00:00:00", "192.0.0.200"),
        ] {
            ns.exec(
                "bridge",
                &[
                    "fdb",
                    "append",
                    mac,
                    "dev",
                    "ferry.1",
                    "dst",
                    dst,
                    "self",
                    "permanent",
                ],
            );
        }
        let r = dp.reconcile(&peers).await.unwrap();
        assert_eq!((r.added, r.removed), (0, 2), "{r:?}");
        let neigh = ns.exec("ip", &["neigh", "show", "dev", "ferry.1"]);
        assert!(!neigh.contains("10.244.9.0 "), "{neigh}");
        assert!(
            neigh.contains("10.244.9.5 ") && neigh.contains("10.250.0.0 "),
            "{neigh}"
        );
        let fdb = ns.exec("bridge", &["fdb", "show", "dev", "ferry.1"]);
        assert!(!fdb.contains(stray_mac), "{fdb}");
        assert!(
            fdb.contains("00:00:00:00:00:00 dst 192.0.0.200 self permanent"),
            "{fdb}"
        );
    });
}
