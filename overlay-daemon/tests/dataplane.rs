//! The dataplane against a real kernel: each test builds "nodes" out of
//! namespaces it creates (a veth pair as the underlay), runs reconcile
//! passes and reads the result back through netops dumps and `ip -j`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ferry_netops::{FERRY_ROUTE_PROTO, NeighState, NsHandle, RouteFilter};
use ferry_tests::{TestNetns, require_root};
use ferryd::dataplane::{
    Dataplane, KernelEvents, LocalNode, Peer, ReconcileReport, Underlay, check_underlay,
    find_underlay,
};
use ferryd::lease::Mac;
use ferryd::network::{BackendConfig, BackendType};
use ipnetwork::Ipv4Network;

fn vxlan(direct_routing: bool) -> BackendConfig {
    BackendConfig {
        kind: BackendType::Vxlan,
        vni: 1,
        port: 4789,
        direct_routing,
    }
}

fn host_gw() -> BackendConfig {
    BackendConfig {
        kind: BackendType::HostGw,
        ..BackendConfig::default()
    }
}

/// The dataplane needs IO and timers (request time limits, ENOBUFS backoff),
/// as the daemon's runtime has.
fn block_on<T>(
    fut: impl std::future::Future<Output = Result<T, ferry_netops::NetopsError>>,
) -> Result<T, ferry_netops::NetopsError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(fut)
}

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

/// Peer `i`: subnet 10.244.<i>.0/24 (i < 256; beyond, the next /16s) at
/// 192.0.0.10 + i (on the underlay's /16 segment), MAC derived from `i`.
fn peer(i: u32) -> Peer {
    Peer {
        subnet: Ipv4Network::new(
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + (i << 8)),
            24,
        )
        .unwrap(),
        subnet6: None,
        public_ip: IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(192, 0, 0, 10)) + i)),
        vtep_mac: Some(Mac::derived(&format!("node-{i}"))),
    }
}

/// Peer `i` over an IPv6 underlay: the same subnet and MAC as [`peer`], at
/// fd00::10 + i (on the underlay's /64 segment).
fn peer6(i: u32) -> Peer {
    Peer {
        public_ip: IpAddr::V6(Ipv6Addr::from(
            u128::from("fd00::10".parse::<Ipv6Addr>().unwrap()) + u128::from(i),
        )),
        ..peer(i)
    }
}

/// `ip addr add <addr> dev <dev>`, IPv6 without duplicate address detection
/// (usable at once).
fn add_addr(ns: &TestNetns, addr: &str, dev: &str) {
    let mut args = vec!["addr", "add", addr, "dev", dev];
    if addr.contains(':') {
        args.push("nodad");
    }
    ns.exec("ip", &args);
}

/// A node namespace with underlay `ul0` (`addr`, IPv4 or IPv6, up; its veth
/// peer `ul1` up in the same namespace).
fn node_ns(addr: &str) -> TestNetns {
    let ns = TestNetns::new();
    ns.exec(
        "ip",
        &["link", "add", "ul0", "type", "veth", "peer", "name", "ul1"],
    );
    add_addr(&ns, addr, "ul0");
    ns.exec("ip", &["link", "set", "ul0", "up"]);
    ns.exec("ip", &["link", "set", "ul1", "up"]);
    ns.exec("ip", &["link", "set", "lo", "up"]);
    ns
}

async fn local(h: &NsHandle, subnet: &str) -> LocalNode {
    let underlay = find_underlay(h, Some("ul0"), None).await.unwrap();
    LocalNode {
        subnet: net(subnet),
        subnet6: None,
        underlay,
        vtep_mac: Mac::derived("local"),
    }
}

/// (neighbours, fdb entries, ferry routes) on `dev`, sorted, as strings.
async fn kernel_state(h: &NsHandle, dev: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut neigh = Vec::new();
    let mut fdb = Vec::new();
    if let Some(l) = h.link_by_name(dev).await.unwrap() {
        for n in h.neighbours::<Ipv4Addr>(l.index).await.unwrap() {
            assert_eq!(n.state, NeighState::Permanent, "{n:?}");
            neigh.push(format!("{} {}", n.ip, Mac(n.mac.unwrap())));
        }
        for e in h.fdb_entries(l.index).await.unwrap() {
            assert!(e.permanent && e.is_self, "{e:?}");
            fdb.push(format!("{} {}", Mac(e.mac), e.dst.unwrap()));
        }
    }
    let mut routes: Vec<String> = h
        .ip_routes::<Ipv4Addr>(RouteFilter {
            protocol: Some(FERRY_ROUTE_PROTO),
            oif: None,
        })
        .await
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} via {} dev #{}{}",
                r.dst,
                r.gw.unwrap(),
                r.oif,
                if r.onlink { " onlink" } else { "" }
            )
        })
        .collect();
    neigh.sort();
    fdb.sort();
    routes.sort();
    (neigh, fdb, routes)
}

/// What the vxlan backend must program for `peers` on device index `vx`.
fn expected_vxlan(peers: &[Peer], vx: u32) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut neigh: Vec<String> = peers
        .iter()
        .map(|p| format!("{} {}", p.subnet.network(), p.vtep_mac.unwrap()))
        .collect();
    let mut fdb: Vec<String> = peers
        .iter()
        .map(|p| format!("{} {}", p.vtep_mac.unwrap(), p.public_ip))
        .collect();
    let mut routes: Vec<String> = peers
        .iter()
        .map(|p| format!("{} via {} dev #{vx} onlink", p.subnet, p.subnet.network()))
        .collect();
    neigh.sort();
    fdb.sort();
    routes.sort();
    (neigh, fdb, routes)
}

fn expected_plain(peers: &[Peer], oif: u32) -> Vec<String> {
    let mut routes: Vec<String> = peers
        .iter()
        .map(|p| format!("{} via {} dev #{oif}", p.subnet, p.public_ip))
        .collect();
    routes.sort();
    routes
}

#[test]
fn vxlan_programs_exactly_the_peers_and_is_idempotent() {
    if !require_root() {
        return;
    }
    let ns = node_ns("192.0.0.1/16");
    block_on(async {
        let h = NsHandle::new(ns.netns())?;
        let me = local(&h, "10.244.1.0/24").await;
        let underlay_mtu = me.underlay.mtu;
        let mut dp = Dataplane::new(h.clone(), &vxlan(false), me.clone());
        assert_eq!(dp.device_name(), Some("ferry.1"));
        assert_eq!(dp.pod_mtu(), underlay_mtu - 50);

        let mut peers: Vec<Peer> = (2..=41).map(peer).collect();
        // The local node's own lease is in the list too, and skipped.
        let own = Peer {
            subnet: me.subnet,
            subnet6: None,
            public_ip: me.underlay.ip,
            vtep_mac: Some(me.vtep_mac),
        };
        let mut with_own = peers.clone();
        with_own.push(own);
        let r = dp.reconcile(&with_own).await.unwrap();
        assert_eq!(r.peers_programmed, 40);
        assert_eq!(r.failed, 0);
        assert_eq!(r.removed, 0);
        // device + address + 3 entries per peer
        assert_eq!(r.added, 2 + 3 * 40, "{r:?}");

        let vx = h.link_by_name("ferry.1").await?.unwrap();
        assert_eq!(vx.mtu, underlay_mtu - 50);
        assert_eq!(vx.mac, me.vtep_mac.0.to_vec());
        assert_eq!(
            h.addresses(vx.index).await?,
            vec!["10.244.1.0/32".parse().unwrap()]
        );
        assert_eq!(
            kernel_state(&h, "ferry.1").await,
            expected_vxlan(&peers, vx.index)
        );
        let d = ns.ip_json(&["-d", "link", "show", "ferry.1"]);
        let info = &d[0]["linkinfo"]["info_data"];
        assert_eq!(info["id"], 1);
        assert_eq!(info["port"], 4789);
        assert_eq!(info["local"], "192.0.0.1");
        assert_eq!(info["learning"], false);
        let shown = ns.exec("ip", &["route", "show", "10.244.2.0/24"]);
        assert!(
            shown.contains("via 10.244.2.0 dev ferry.1 proto 70 onlink"),
            "{shown}"
        );
        let fdb = ns.exec("bridge", &["fdb", "show", "dev", "ferry.1"]);
        assert!(
            fdb.contains(&format!(
                "{} dst 192.0.0.12 self permanent",
                peers[0].vtep_mac.unwrap()
            )),
            "{fdb}"
        );

        // Twice: nothing to do.
        let r = dp.reconcile(&with_own).await.unwrap();
        assert_eq!(
            r,
            ReconcileReport {
                added: 0,
                removed: 0,
                peers_programmed: 40,
                failed: 0,
                invalid: 0,
                conflicts: 0,
            }
        );

        // A foreign route (another protocol) survives every pass.
        ns.exec(
            "ip",
            &[
                "route",
                "add",
                "10.99.0.0/16",
                "via",
                "192.0.0.254",
                "dev",
                "ul0",
            ],
        );
        // A peer leaves, another changes its public IP and MAC.
        let gone = peers.remove(5);
        peers[0].public_ip = Ipv4Addr::new(192, 0, 1, 200).into();
        peers[0].vtep_mac = Some(Mac::derived("node-2-reborn"));
        let r = dp.reconcile(&peers).await.unwrap();
        assert_eq!(r.peers_programmed, 39);
        // gone: 3 removed; changed: neigh + fdb + (route unchanged) added, old fdb removed
        assert_eq!((r.added, r.removed), (2, 3 + 1), "{r:?}");
        assert_eq!(
            kernel_state(&h, "ferry.1").await,
            expected_vxlan(&peers, vx.index)
        );
        assert!(
            !ns.exec("ip", &["route", "show", &gone.subnet.to_string()])
                .contains("via")
        );
        assert!(
            ns.exec("ip", &["route", "show", "10.99.0.0/16"])
                .contains("via 192.0.0.254")
        );

        // Drift: a route and a neighbour deleted by hand, a stray fdb entry
        // and neighbour added; one pass repairs exactly the deletions, and
        // leaves the strays (not ferry's: another MAC, no protocol 70) alone.
        ns.exec("ip", &["route", "del", &peers[3].subnet.to_string()]);
        ns.exec(
            "ip",
            &[
                "neigh",
                "del",
                &peers[4].subnet.network().to_string(),
                "dev",
                "ferry.1",
            ],
        );
        ns.exec(
            "bridge",
            &[
                "fdb",
                "append",
                "02:00:00:00:00:99",
                "dev",
                "ferry.1",
                "dst",
                "192.0.0.99",
                "self",
                "permanent",
            ],
        );
        ns.exec(
            "ip",
            &[
                "neigh",
                "replace",
                "10.250.0.0",
                "lladdr",
                "02:00:00:00:00:98",
                "dev",
                "ferry.1",
                "nud",
                "permanent",
            ],
        );
        let r = dp.reconcile(&peers).await.unwrap();
        assert_eq!((r.added, r.removed), (2, 0), "{r:?}");
        assert!(
            ns.exec("bridge", &["fdb", "show", "dev", "ferry.1"])
                .contains("02:00:00:00:00:99 dst 192.0.0.99 self permanent")
        );
        assert!(
            ns.exec("ip", &["neigh", "show", "dev", "ferry.1"])
                .contains("10.250.0.0 lladdr 02:00:00:00:00:98 PERMANENT")
        );
        ns.exec(
            "bridge",
            &[
                "fdb",
                "del",
                "02:00:00:00:00:99",
                "dev",
                "ferry.1",
                "dst",
                "192.0.0.99",
                "self",
            ],
        );
        ns.exec("ip", &["neigh", "del", "10.250.0.0", "dev", "ferry.1"]);
        assert_eq!(
            kernel_state(&h, "ferry.1").await,
            expected_vxlan(&peers, vx.index)
        );

        // The device deleted by hand: recreated with everything on it.
        ns.exec("ip", &["link", "del", "ferry.1"]);
        let r = dp.reconcile(&peers).await.unwrap();
        assert_eq!(r.peers_programmed, 39);
        let vx2 = h.link_by_name("ferry.1").await?.unwrap();
        assert_eq!(
            kernel_state(&h, "ferry.1").await,
            expected_vxlan(&peers, vx2.index)
        );
        assert_eq!(
            h.addresses(vx2.index).await?,
            vec!["10.244.1.0/32".parse().unwrap()]
        );

        // A wrong port: recreated. A wrong MTU: set in place.
        ns.exec("ip", &["link", "set", "ferry.1", "mtu", "1300"]);
        let r = dp.reconcile(&peers).await.unwrap();
        assert_eq!((r.added, r.removed), (1, 0), "{r:?}");
        assert_eq!(h.link_by_name("ferry.1").await?.unwrap().index, vx2.index);
        let mut dp8472 = Dataplane::new(
            h.clone(),
            &BackendConfig {
                port: 8472,
                ..vxlan(false)
            },
            me.clone(),
        );
        dp8472.reconcile(&peers).await.unwrap();
        let vx3 = h.link_by_name("ferry.1").await?.unwrap();
        assert_ne!(vx3.index, vx2.index);
        assert_eq!(
            kernel_state(&h, "ferry.1").await,
            expected_vxlan(&peers, vx3.index)
        );

        // No peers left: everything of ferry's goes, the foreign route stays.
        let r = dp8472.reconcile(&[]).await.unwrap();
        assert_eq!(r.removed, 3 * 39);
        assert_eq!(kernel_state(&h, "ferry.1").await, (vec![], vec![], vec![]));
        assert!(
            ns.exec("ip", &["route", "show", "10.99.0.0/16"])
                .contains("via 192.0.0.254")
        );
        Ok(())
    })
    .unwrap();
}

#[test]
fn direct_routing_and_host_gw_program_plain_routes() {
    if !require_root() {
        return;
    }
    let ns = node_ns("192.0.0.1/16");
    block_on(async {
        let h = NsHandle::new(ns.netns())?;
        let me = local(&h, "10.244.1.0/24").await;
        let ul = me.underlay.index;
        // 2..=6 on the segment; 7 behind a gateway (must go through the tunnel).
        ns.exec(
            "ip",
            &[
                "route",
                "add",
                "198.51.100.0/24",
                "via",
                "192.0.0.254",
                "dev",
                "ul0",
            ],
        );
        let mut peers: Vec<Peer> = (2..=6).map(peer).collect();
        let far = Peer {
            subnet: net("10.244.7.0/24"),
            subnet6: None,
            public_ip: Ipv4Addr::new(198, 51, 100, 7).into(),
            vtep_mac: Some(Mac::derived("far")),
        };
        peers.push(far.clone());

        let mut dp = Dataplane::new(h.clone(), &vxlan(true), me.clone());
        let r = dp.reconcile(&peers).await.unwrap();
        assert_eq!(r.peers_programmed, 6);
        let vx = h.link_by_name("ferry.1").await?.unwrap().index;
        let (neigh, fdb, routes) = kernel_state(&h, "ferry.1").await;
        let (en, ef, er) = expected_vxlan(std::slice::from_ref(&far), vx);
        assert_eq!((neigh, fdb), (en, ef));
        let mut want = expected_plain(&peers[..5], ul);
        want.extend(er);
        want.sort();
        assert_eq!(routes, want);
        assert_eq!(dp.reconcile(&peers).await.unwrap().added, 0);

        // Switching the same node to host-gw: plain routes for the reachable
        // peers; the unreachable one is an error for it alone.
        let mut hg = Dataplane::new(h.clone(), &host_gw(), me.clone());
        assert_eq!(hg.device_name(), None);
        assert_eq!(hg.pod_mtu(), me.underlay.mtu);
        let r = hg.reconcile(&peers).await.unwrap();
        assert_eq!((r.peers_programmed, r.failed), (5, 1), "{r:?}");
        // A peer that fails keeps what it had (its tunnel route): a failed
        // pass never tears a working path down.
        let (_, _, routes) = kernel_state(&h, "no-such-device").await;
        let mut want = expected_plain(&peers[..5], ul);
        want.push(format!("10.244.7.0/24 via 10.244.7.0 dev #{vx} onlink"));
        assert_eq!(routes, want);
        let again = hg.reconcile(&peers).await.unwrap();
        assert_eq!((again.added, again.removed, again.failed), (0, 0, 1));
        Ok(())
    })
    .unwrap();
}

#[test]
fn find_underlay_by_name_ip_or_default_route() {
    if !require_root() {
        return;
    }
    let ns = node_ns("192.0.0.1/16");
    block_on(async {
        let h = NsHandle::new(ns.netns())?;
        let by_name = find_underlay(&h, Some("ul0"), None).await.unwrap();
        assert_eq!(
            (by_name.name.as_str(), by_name.ip),
            ("ul0", IpAddr::V4(Ipv4Addr::new(192, 0, 0, 1)))
        );
        let by_ip = find_underlay(&h, None, Some(Ipv4Addr::new(192, 0, 0, 1).into()))
            .await
            .unwrap();
        assert_eq!(by_ip, by_name);
        assert!(
            find_underlay(&h, None, None).await.is_err(),
            "no default route yet"
        );
        ns.exec(
            "ip",
            &[
                "route",
                "add",
                "default",
                "via",
                "192.0.0.254",
                "dev",
                "ul0",
            ],
        );
        let by_default: Underlay = find_underlay(&h, None, None).await.unwrap();
        assert_eq!(by_default, by_name);
        let e = find_underlay(&h, Some("nope0"), None).await.unwrap_err();
        assert!(e.to_string().contains("nope0"), "{e}");
        Ok(())
    })
    .unwrap();
}

#[test]
fn find_underlay_over_ipv6() {
    if !require_root() {
        return;
    }
    let ns = node_ns("fd00::1/64");
    block_on(async {
        let h = NsHandle::new(ns.netns())?;
        let v6: IpAddr = "fd00::1".parse().unwrap();
        // The interface's only global address is IPv6 (fe80:: is not global).
        let by_name = find_underlay(&h, Some("ul0"), None).await.unwrap();
        assert_eq!((by_name.name.as_str(), by_name.ip), ("ul0", v6));
        assert_eq!(find_underlay(&h, None, Some(v6)).await.unwrap(), by_name);
        let e = find_underlay(&h, None, None).await.unwrap_err();
        assert!(e.to_string().contains("IPv6 default route"), "{e}");
        ns.exec(
            "ip",
            &[
                "-6", "route", "add", "default", "via", "fd00::fe", "dev", "ul0",
            ],
        );
        assert_eq!(find_underlay(&h, None, None).await.unwrap(), by_name);
        // Both families on the link: --iface prefers IPv4, the IPv6 default
        // route its own family; an IPv4 default route wins over the IPv6 one.
        add_addr(&ns, "192.0.0.1/16", "ul0");
        let v4: IpAddr = "192.0.0.1".parse().unwrap();
        assert_eq!(find_underlay(&h, Some("ul0"), None).await.unwrap().ip, v4);
        assert_eq!(find_underlay(&h, None, None).await.unwrap().ip, v6);
        assert_eq!(
            find_underlay(&h, Some("ul0"), Some(v6)).await.unwrap().ip,
            v6
        );
        ns.exec(
            "ip",
            &[
                "route",
                "add",
                "default",
                "via",
                "192.0.0.254",
                "dev",
                "ul0",
            ],
        );
        assert_eq!(find_underlay(&h, None, None).await.unwrap().ip, v4);
        Ok(())
    })
    .unwrap();
}

#[test]
fn vxlan_over_an_ipv6_underlay() {
    if !require_root() {
        return;
    }
    let ns = node_ns("fd00::1/64");
    block_on(async {
        let h = NsHandle::new(ns.netns())?;
        let me = local(&h, "10.244.1.0/24").await;
        assert_eq!(me.underlay.ip, "fd00::1".parse::<IpAddr>().unwrap());
        let underlay_mtu = me.underlay.mtu;
        check_underlay(&vxlan(false), &me.underlay).unwrap();
        let mut dp = Dataplane::new(h.clone(), &vxlan(false), me.clone());
        assert_eq!(dp.pod_mtu(), underlay_mtu - 70);

        let peers: Vec<Peer> = (2..=11).map(peer6).collect();
        // A peer with an IPv4 underlay address cannot be reached from here:
        // an invalid lease, skipped, the others programmed.
        let mut with_v4 = peers.clone();
        with_v4.push(peer(12));
        let r = dp.reconcile(&with_v4).await.unwrap();
        assert_eq!(
            (r.peers_programmed, r.failed, r.invalid),
            (10, 0, 1),
            "{r:?}"
        );
        assert!(
            dp.skipped()[0].to_string().contains("not of the family"),
            "{:?}",
            dp.skipped()
        );
        assert_eq!((r.added, r.removed), (2 + 3 * 10, 0), "{r:?}");

        let v = h.vxlan_by_name("ferry.1").await?.unwrap();
        assert_eq!(v.local, Some(me.underlay.ip));
        assert_eq!(v.mtu, underlay_mtu - 70);
        assert_eq!(v.learning, Some(false));
        assert_eq!(
            h.addresses(v.index).await?,
            vec!["10.244.1.0/32".parse().unwrap()]
        );
        assert_eq!(
            kernel_state(&h, "ferry.1").await,
            expected_vxlan(&peers, v.index)
        );
        let d = ns.ip_json(&["-d", "link", "show", "ferry.1"]);
        let info = &d[0]["linkinfo"]["info_data"];
        assert_eq!(info["local6"], "fd00::1", "{d}");
        let fdb = ns.exec("bridge", &["fdb", "show", "dev", "ferry.1"]);
        assert!(
            fdb.contains(&format!(
                "{} dst fd00::12 self permanent",
                peers[0].vtep_mac.unwrap()
            )),
            "{fdb}"
        );
        let shown = ns.exec("ip", &["route", "show", "10.244.2.0/24"]);
        assert!(
            shown.contains("via 10.244.2.0 dev ferry.1 proto 70 onlink"),
            "{shown}"
        );
        let again = dp.reconcile(&with_v4).await.unwrap();
        assert_eq!(
            (again.added, again.removed, again.failed, again.invalid),
            (0, 0, 0, 1),
            "{again:?}"
        );

        // directRouting needs an IPv4 next hop: over IPv6 every peer stays
        // on the tunnel.
        let mut direct = Dataplane::new(h.clone(), &vxlan(true), me.clone());
        let r = direct.reconcile(&peers).await.unwrap();
        assert_eq!(
            (r.added, r.removed, r.peers_programmed),
            (0, 0, 10),
            "{r:?}"
        );

        // host-gw is refused at startup, and a pass fails every peer
        // without crashing.
        let e = check_underlay(&host_gw(), &me.underlay).unwrap_err();
        assert!(
            e.to_string().contains("host-gw needs an IPv4 underlay"),
            "{e}"
        );
        let mut hg = Dataplane::new(h.clone(), &host_gw(), me.clone());
        let r = hg.reconcile(&peers).await.unwrap();
        assert_eq!((r.peers_programmed, r.failed), (0, 10), "{r:?}");

        // The node's underlay turns IPv4: the device is recreated with
        // `local`, the IPv4 MTU and IPv4 remotes.
        add_addr(&ns, "192.0.0.1/16", "ul0");
        let me4 = local(&h, "10.244.1.0/24").await;
        assert!(me4.underlay.ip.is_ipv4());
        let peers4: Vec<Peer> = (2..=11).map(peer).collect();
        let mut dp4 = Dataplane::new(h.clone(), &vxlan(false), me4.clone());
        let r = dp4.reconcile(&peers4).await.unwrap();
        assert_eq!((r.peers_programmed, r.failed), (10, 0), "{r:?}");
        let v4 = h.vxlan_by_name("ferry.1").await?.unwrap();
        assert_ne!(v4.index, v.index, "recreated");
        assert_eq!(v4.local, Some(me4.underlay.ip));
        assert_eq!(v4.mtu, underlay_mtu - 50);
        assert_eq!(
            kernel_state(&h, "ferry.1").await,
            expected_vxlan(&peers4, v4.index)
        );
        Ok(())
    })
    .unwrap();
}

#[test]
fn kernel_events_report_a_deleted_route() {
    if !require_root() {
        return;
    }
    let ns = node_ns("192.0.0.1/16");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let h = NsHandle::new(ns.netns()).unwrap();
        let me = local(&h, "10.244.1.0/24").await;
        let mut dp = Dataplane::new(h.clone(), &vxlan(false), me);
        dp.reconcile(&[peer(2)]).await.unwrap();
        let mut ev = KernelEvents::open_in(ns.netns()).unwrap();
        ns.exec("ip", &["route", "del", "10.244.2.0/24"]);
        tokio::time::timeout(Duration::from_secs(5), ev.next())
            .await
            .expect("an event within 5 s")
            .expect("socket open");
        // The repair pass puts it back.
        let r = dp.reconcile(&[peer(2)]).await.unwrap();
        assert_eq!(r.added, 1);
    });
}

/// Two nodes joined by a veth underlay (IPv4, or IPv6 when `v6`), each with
/// a pod namespace behind a veth; pods ping each other across the overlay.
fn two_node_ping(backend: BackendConfig, v6: bool) {
    let a = TestNetns::new();
    let b = TestNetns::new();
    // Underlay: a:ul0 192.0.0.1/16 <-> b:ul0 192.0.0.2/16 (or fd00::1/64,
    // fd00::2/64).
    a.exec(
        "ip",
        &["link", "add", "ul0", "type", "veth", "peer", "name", "ulb"],
    );
    let b_path = b.path_str();
    a.exec("ip", &["link", "set", "ulb", "netns", &b_path]);
    b.exec("ip", &["link", "set", "ulb", "name", "ul0"]);
    let addrs = if v6 {
        ["fd00::1/64", "fd00::2/64"]
    } else {
        ["192.0.0.1/16", "192.0.0.2/16"]
    };
    for (ns, addr) in [(&a, addrs[0]), (&b, addrs[1])] {
        add_addr(ns, addr, "ul0");
        ns.exec("ip", &["link", "set", "ul0", "up"]);
        ns.exec("ip", &["link", "set", "lo", "up"]);
        ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    }
    // Pods: veth node-side "pod0" 10.244.N.1/24, pod-side eth0 10.244.N.2/24.
    let pa = TestNetns::new();
    let pb = TestNetns::new();
    for (node, pod, n) in [(&a, &pa, 1), (&b, &pb, 2)] {
        node.exec(
            "ip",
            &[
                "link", "add", "pod0", "type", "veth", "peer", "name", "eth0",
            ],
        );
        node.exec("ip", &["link", "set", "eth0", "netns", &pod.path_str()]);
        node.exec(
            "ip",
            &["addr", "add", &format!("10.244.{n}.1/24"), "dev", "pod0"],
        );
        node.exec("ip", &["link", "set", "pod0", "up"]);
        pod.exec(
            "ip",
            &["addr", "add", &format!("10.244.{n}.2/24"), "dev", "eth0"],
        );
        pod.exec("ip", &["link", "set", "eth0", "up"]);
        pod.exec("ip", &["link", "set", "lo", "up"]);
        pod.exec(
            "ip",
            &["route", "add", "default", "via", &format!("10.244.{n}.1")],
        );
    }
    block_on(async {
        let ha = NsHandle::new(a.netns())?;
        let hb = NsHandle::new(b.netns())?;
        let la = LocalNode {
            vtep_mac: Mac::derived("a"),
            ..local(&ha, "10.244.1.0/24").await
        };
        let lb = LocalNode {
            vtep_mac: Mac::derived("b"),
            ..local(&hb, "10.244.2.0/24").await
        };
        let pa_ = Peer {
            subnet: la.subnet,
            subnet6: None,
            public_ip: la.underlay.ip,
            vtep_mac: Some(la.vtep_mac),
        };
        let pb_ = Peer {
            subnet: lb.subnet,
            subnet6: None,
            public_ip: lb.underlay.ip,
            vtep_mac: Some(lb.vtep_mac),
        };
        assert_eq!(la.underlay.ip.is_ipv6(), v6);
        let all = [pa_, pb_];
        let mut da = Dataplane::new(ha, &backend, la);
        let mut db = Dataplane::new(hb, &backend, lb);
        assert_eq!(da.reconcile(&all).await.unwrap().peers_programmed, 1);
        assert_eq!(db.reconcile(&all).await.unwrap().peers_programmed, 1);
        Ok(())
    })
    .unwrap();
    assert!(
        pa.ping(IpAddr::V4(Ipv4Addr::new(10, 244, 2, 2)), 3),
        "pod a -> pod b"
    );
    assert!(
        pb.ping(IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2)), 3),
        "pod b -> pod a"
    );
    // The node itself reaches the remote pod too (source: its <subnet>.0 on
    // the vxlan device, or its underlay address with host-gw).
    assert!(
        a.ping(IpAddr::V4(Ipv4Addr::new(10, 244, 2, 2)), 3),
        "node a -> pod b"
    );
}

#[test]
fn pods_ping_across_the_vxlan_overlay() {
    if !require_root() {
        return;
    }
    two_node_ping(vxlan(false), false);
}

#[test]
fn pods_ping_across_the_vxlan_overlay_over_an_ipv6_underlay() {
    if !require_root() {
        return;
    }
    two_node_ping(vxlan(false), true);
}

#[test]
fn pods_ping_across_host_gw() {
    if !require_root() {
        return;
    }
    two_node_ping(host_gw(), false);
}

/// `cargo test -p ferryd --release --test dataplane -- --ignored --nocapture
/// program_many_peers` (FERRY_BENCH_PEERS, default 1000): first pass, no-op
/// pass, and the same entries through `ip -batch` in a fresh namespace.
#[test]
#[ignore]
fn program_many_peers() {
    if !require_root() {
        return;
    }
    let n: u32 = std::env::var("FERRY_BENCH_PEERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let peers: Vec<Peer> = (2..n + 2).map(peer).collect();
    let ns = node_ns("192.0.0.1/16");
    block_on(async {
        let h = NsHandle::new(ns.netns())?;
        let me = local(&h, "10.244.1.0/24").await;
        let mut dp = Dataplane::new(h.clone(), &vxlan(false), me);
        let t = std::time::Instant::now();
        let r = dp.reconcile(&peers).await.unwrap();
        let first = t.elapsed();
        assert_eq!(r.peers_programmed, n as usize);
        let t = std::time::Instant::now();
        let r = dp.reconcile(&peers).await.unwrap();
        let noop = t.elapsed();
        assert_eq!((r.added, r.removed), (0, 0));
        eprintln!("ferry: {n} peers: first pass {first:?}, no-op pass {noop:?}");
        Ok(())
    })
    .unwrap();

    // The same entries with `ip -batch` (device created first, not timed).
    let ns2 = node_ns("192.0.0.1/16");
    ns2.exec(
        "ip",
        &[
            "link",
            "add",
            "ferry.1",
            "type",
            "vxlan",
            "id",
            "1",
            "dev",
            "ul0",
            "local",
            "192.0.0.1",
            "dstport",
            "4789",
            "nolearning",
        ],
    );
    ns2.exec("ip", &["link", "set", "ferry.1", "up"]);
    let dir = std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mut ipb, mut brb) = (String::new(), String::new());
    for p in &peers {
        let mac = p.vtep_mac.unwrap();
        let gw = p.subnet.network();
        ipb.push_str(&format!(
            "neigh replace {gw} lladdr {mac} dev ferry.1 nud permanent\n"
        ));
        brb.push_str(&format!(
            "fdb replace {mac} dev ferry.1 dst {} self permanent\n",
            p.public_ip
        ));
    }
    let mut rb = String::new();
    for p in &peers {
        rb.push_str(&format!(
            "route replace {} via {} dev ferry.1 onlink proto 70\n",
            p.subnet,
            p.subnet.network()
        ));
    }
    for (name, text) in [("neigh", &ipb), ("fdb", &brb), ("route", &rb)] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let t = std::time::Instant::now();
    ns2.exec("ip", &["-batch", dir.join("neigh").to_str().unwrap()]);
    ns2.exec("bridge", &["-batch", dir.join("fdb").to_str().unwrap()]);
    ns2.exec("ip", &["-batch", dir.join("route").to_str().unwrap()]);
    eprintln!("ip -batch + bridge -batch: {n} peers: {:?}", t.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Peer `i` of a dual-stack network: [`peer`] plus fd00:244:0:<i>::/64.
fn dual(i: u32) -> Peer {
    Peer {
        subnet6: Some(format!("fd00:244:0:{i:x}::/64").parse().unwrap()),
        ..peer(i)
    }
}

/// (IPv6 neighbours of `dev`, ferry's IPv6 routes), sorted, as strings.
async fn kernel_state6(h: &NsHandle, dev: &str) -> (Vec<String>, Vec<String>) {
    let mut neigh = Vec::new();
    if let Some(l) = h.link_by_name(dev).await.unwrap() {
        for n in h.neighbours::<Ipv6Addr>(l.index).await.unwrap() {
            if n.state == NeighState::NoArp {
                continue;
            }
            assert_eq!(n.state, NeighState::Permanent, "{n:?}");
            neigh.push(format!("{} {}", n.ip, Mac(n.mac.unwrap())));
        }
    }
    let mut routes: Vec<String> = h
        .ip_routes::<Ipv6Addr>(RouteFilter {
            protocol: Some(FERRY_ROUTE_PROTO),
            oif: None,
        })
        .await
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} via {} dev #{}{}",
                r.dst,
                r.gw.unwrap(),
                r.oif,
                if r.onlink { " onlink" } else { "" }
            )
        })
        .collect();
    neigh.sort();
    routes.sort();
    (neigh, routes)
}

#[test]
fn vxlan_dual_stack_programs_and_cleans_ipv6_entries() {
    if !require_root() {
        return;
    }
    let ns = node_ns("192.0.0.1/16");
    block_on(async {
        let h = NsHandle::new(ns.netns())?;
        let me = LocalNode {
            subnet6: Some("fd00:244:0:1::/64".parse().unwrap()),
            ..local(&h, "10.244.1.0/24").await
        };
        for (backend, direct) in [(vxlan(false), false), (vxlan(true), true)] {
            let mut dp = Dataplane::new(h.clone(), &backend, me.clone());
            // Peers 2..=6 dual-stack, 7 an old node without an IPv6 subnet.
            let mut peers: Vec<Peer> = (2..=6).map(dual).collect();
            peers.push(peer(7));
            let r = dp.reconcile(&peers).await.unwrap();
            assert_eq!(r.peers_programmed, 6, "{r:?}");
            assert_eq!(r.failed, 0);
            let vx = h.link_by_name("ferry.1").await?.unwrap();
            let mut addrs = h.addresses(vx.index).await?;
            addrs.sort();
            assert_eq!(
                addrs,
                vec![
                    "10.244.1.0/32".parse().unwrap(),
                    "fd00:244:0:1::/128".parse().unwrap()
                ]
            );
            // IPv4 as before (directRouting: peers on the segment go direct).
            let (neigh, fdb, routes) = kernel_state(&h, "ferry.1").await;
            if direct {
                assert!(neigh.is_empty(), "{neigh:?}");
                assert_eq!(routes, expected_plain(&peers, me.underlay.index));
                // The fdb entries stay: IPv6 goes through the tunnel.
                assert_eq!(fdb, expected_vxlan(&peers[..5], vx.index).1);
            } else {
                assert_eq!((neigh, fdb, routes), expected_vxlan(&peers, vx.index));
            }
            // IPv6: a neighbour and an onlink route per dual-stack peer.
            let mut want_neigh: Vec<String> = peers[..5]
                .iter()
                .map(|p| format!("{} {}", p.subnet6.unwrap().network(), p.vtep_mac.unwrap()))
                .collect();
            want_neigh.sort();
            let mut want_routes: Vec<String> = peers[..5]
                .iter()
                .map(|p| {
                    let s6 = p.subnet6.unwrap();
                    format!("{s6} via {} dev #{} onlink", s6.network(), vx.index)
                })
                .collect();
            want_routes.sort();
            assert_eq!(
                kernel_state6(&h, "ferry.1").await,
                (want_neigh, want_routes)
            );
            let shown = ns.exec("ip", &["-6", "route", "show", "fd00:244:0:2::/64"]);
            assert!(
                shown.contains("via fd00:244:0:2:: dev ferry.1 proto 70")
                    && shown.contains("onlink"),
                "{shown}"
            );

            // Twice: nothing to do.
            let r = dp.reconcile(&peers).await.unwrap();
            assert_eq!((r.added, r.removed, r.peers_programmed), (0, 0, 6), "{r:?}");

            // Drift: a deleted IPv6 route and neighbour come back.
            ns.exec("ip", &["-6", "route", "del", "fd00:244:0:3::/64"]);
            ns.exec(
                "ip",
                &["-6", "neigh", "del", "fd00:244:0:4::", "dev", "ferry.1"],
            );
            let r = dp.reconcile(&peers).await.unwrap();
            assert_eq!((r.added, r.removed), (2, 0), "{r:?}");

            // A peer leaves: its IPv6 entries go; all leave: nothing is left.
            let r = dp.reconcile(&peers[1..]).await.unwrap();
            assert_eq!(r.peers_programmed, 5);
            let (n6, r6) = kernel_state6(&h, "ferry.1").await;
            assert_eq!((n6.len(), r6.len()), (4, 4));
            assert!(!r6.iter().any(|r| r.starts_with("fd00:244:0:2::/64")));
            dp.reconcile(&[]).await.unwrap();
            assert_eq!(kernel_state6(&h, "ferry.1").await, (vec![], vec![]));
            assert_eq!(kernel_state(&h, "ferry.1").await, (vec![], vec![], vec![]));
            // A foreign IPv6 route is never touched.
            ns.exec("ip", &["-6", "route", "add", "fd99::/64", "dev", "ul0"]);
            dp.reconcile(&peers).await.unwrap();
            dp.reconcile(&[]).await.unwrap();
            let shown = ns.exec("ip", &["-6", "route", "show", "fd99::/64"]);
            assert!(shown.contains("fd99::/64"), "{shown}");
            ns.exec("ip", &["-6", "route", "del", "fd99::/64"]);
        }

        // A local node without an IPv6 subnet (IPv4-only network) drops the
        // device's IPv6 address and programs no IPv6 entries.
        let v4 = local(&h, "10.244.1.0/24").await;
        let mut dp = Dataplane::new(h.clone(), &vxlan(false), v4);
        let peers: Vec<Peer> = (2..=4).map(dual).collect();
        dp.reconcile(&peers).await.unwrap();
        let vx = h.link_by_name("ferry.1").await?.unwrap();
        assert_eq!(
            h.addresses(vx.index).await?,
            vec!["10.244.1.0/32".parse().unwrap()]
        );
        assert_eq!(kernel_state6(&h, "ferry.1").await, (vec![], vec![]));

        // host-gw routes IPv4 only (over an IPv4 underlay).
        let mut dp = Dataplane::new(h.clone(), &host_gw(), me.clone());
        let r = dp.reconcile(&peers).await.unwrap();
        assert_eq!((r.peers_programmed, r.failed), (3, 0));
        assert_eq!(kernel_state6(&h, "ferry.1").await.1, Vec::<String>::new());
        Ok(())
    })
    .unwrap();
}
