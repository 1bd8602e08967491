//! Kubelet's path (issue 10, part 1): containerd 1.6's CRI plugin runs the
//! conflist a real ferryd wrote, driven by a CRI v1 client as kubelet drives
//! it. See `ferry_tests::cri` for the lab.
//!
//! What containerd 1.6.20's CRI was seen to do here: it runs its own
//! `loopback` network besides the conflist (a plugin named `loopback` must be
//! in its bin dir); it sends no CHECK and no VERSION; every StopPodSandbox
//! and RemovePodSandbox sends a DEL, the first with the namespace, the later
//! ones (a second Stop, Remove) with an empty CNI_NETNS; a restart sends
//! nothing.

use ferry_tests::cri::{
    CriLab, CriNode, CriPod, PodServers, bandwidth_annotations, host_port, pod_config, tcp_answer,
    udp_answer,
};
use ferry_tests::etcd::require_etcd;
use ferry_tests::iperf::{Iperf3Server, iperf3_for};
use ferry_tests::runtime::{note, require_runtime};
use ferry_tests::{host_veth_name, wait_until};
use k8s_cri::v1::{PodSandboxState, Protocol};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Root, etcd, containerd and the tools the tests run, or a loud skip.
fn can_run() -> bool {
    require_etcd()
        && require_runtime(
            "containerd's CRI",
            &[
                "containerd",
                "ctr",
                "runc",
                "nsenter",
                "unshare",
                "nft",
                "iperf3",
            ],
        )
}

/// A lab of `nodes` ready CRI nodes.
fn lab(nodes: usize) -> CriLab {
    let mut lab = CriLab::new();
    for _ in 0..nodes {
        lab.add_node();
    }
    lab
}

fn run(node: &CriNode, name: &str) -> CriPod {
    node.run_pod(pod_config(&node.node, name))
}

#[test]
fn network_ready_follows_the_conflist_ferryd_writes() {
    if !can_run() {
        return;
    }
    let mut lab = CriLab::new();
    let i = lab.add_idle_node();
    // No conflist yet: containerd must say the network is not ready (kubelet
    // keeps the node NotReady and schedules no pod there).
    let node = &lab.nodes[i];
    let (ready, why) = node.cri.network_ready().expect("CRI Status");
    assert!(!ready, "NetworkReady with an empty conf dir: {why}");
    note(&format!("NetworkReady=false before ferryd: {why}"));
    let took = lab.start_ferryd(i, Duration::from_secs(10));
    note(&format!(
        "NetworkReady=true {} ms after ferryd started",
        took.as_millis()
    ));
    // What containerd loaded is ferryd's chain (besides its own loopback).
    let loaded = lab.nodes[i].cri.cni_config().expect("verbose CRI Status");
    let text = loaded.to_string();
    for plugin in [
        "ferry-bridge",
        "ferry-ipam",
        "ferry-portmap",
        "ferry-bandwidth",
    ] {
        assert!(
            text.contains(plugin),
            "{plugin} not in the CNI config containerd loaded: {loaded:#}"
        );
    }
}

#[test]
fn run_pod_sandbox_two_pods_reach_each_other_and_the_gateway() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let lab = lab(1);
    let node = &lab.nodes[0];
    let (subnet, gateway) = lab.subnet(0);
    let pods = [run(node, "web-a"), run(node, "web-b")];
    let store = ferry_tests::reservations(&node.store);
    for p in &pods {
        assert!(
            subnet.contains(p.ip),
            "{}: {} not in {subnet}",
            p.name,
            p.ip
        );
        let r = store
            .get(&p.ip.into())
            .unwrap_or_else(|| panic!("{} not reserved: {store:?}", p.ip));
        assert_eq!(r.container_id, p.id, "reserved for the sandbox");
        assert_eq!(r.ifname.as_deref(), Some("eth0"));
        // containerd ran its loopback network: lo is up in the pod.
        assert!(p.netns.ip_link_is_up("lo"), "{}: lo is down", p.name);
    }
    assert_ne!(pods[0].ip, pods[1].ip);
    // ferry-ipam recorded the pod's CNI_ARGS with each reservation (what the
    // gc sweep's log lines and `ferryd doctor` name a pod by).
    let evidence = ferry_ipam::store::Store::open_existing(
        node.store.parent().expect("dataDir"),
        &node.store.file_name().expect("network").to_string_lossy(),
    )
    .expect("open the store")
    .expect("the store exists")
    .records()
    .expect("read the records");
    for p in &pods {
        let meta = evidence
            .iter()
            .find_map(|(ip, r)| match r {
                ferry_ipam::record::Record::Held { meta, .. } if *ip == IpAddr::from(p.ip) => {
                    meta.clone()
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("{}: no ferry evidence with {}", p.name, p.ip));
        assert_eq!(meta.pod_namespace, ferry_tests::cri::POD_NAMESPACE);
        assert_eq!(meta.pod_name, p.name);
        assert_eq!(meta.pod_infra_container_id, p.id);
        assert_ne!(
            (meta.netns_dev, meta.netns_ino),
            (0, 0),
            "the namespace's identity"
        );
    }
    let mtu = node.conflist()["plugins"][0]["mtu"]
        .as_u64()
        .expect("ferryd sets the MTU");
    for p in &pods {
        // containerd's view of the result ferry printed (go-cni's cniResult):
        // eth0 with the address and the gateway, ferry's host veth, and lo
        // from its own loopback network.
        let ifaces = &p.info["cniResult"]["Interfaces"];
        let eth0 = &ifaces["eth0"]["IPConfigs"][0];
        assert_eq!(eth0["IP"], p.ip.to_string(), "{}: {ifaces:#}", p.name);
        assert_eq!(
            eth0["Gateway"],
            gateway.to_string(),
            "{}: {ifaces:#}",
            p.name
        );
        let veth = host_veth_name(&p.id, "eth0");
        assert!(
            ifaces.get(&veth).is_some(),
            "{}: no {veth} in {ifaces:#}",
            p.name
        );
        assert!(
            ifaces.get("lo").is_some(),
            "{}: no lo in {ifaces:#}",
            p.name
        );
        let link = p.netns.link("eth0").expect("the pod's eth0");
        assert_eq!(u64::from(link.mtu), mtu, "{}: eth0's MTU", p.name);
    }
    for (a, b) in [(0, 1), (1, 0)] {
        for to in [pods[b].ip, gateway] {
            assert!(
                pods[a].netns.ping(to.into(), 3),
                "{} cannot ping {to}",
                pods[a].name
            );
        }
    }
    // What kubelet's runtime tells the plugins: one ADD with the namespace,
    // the K8S_POD_* arguments, nothing else yet (no CHECK, no VERSION).
    for p in &pods {
        let calls = node.bridge_calls(&p.id);
        assert_eq!(calls.len(), 1, "{}: {calls:?}", p.name);
        let (cmd, netns, args) = &calls[0];
        assert_eq!(cmd, "ADD");
        assert!(!netns.is_empty(), "ADD without a netns");
        for want in [
            format!("K8S_POD_NAMESPACE={}", ferry_tests::cri::POD_NAMESPACE),
            format!("K8S_POD_NAME={}", p.name),
            format!("K8S_POD_INFRA_CONTAINER_ID={}", p.id),
        ] {
            assert!(
                args.split(';').any(|a| a == want),
                "{}: {want} not in CNI_ARGS {args:?}",
                p.name
            );
        }
    }
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    for p in pods {
        node.stop_and_remove(p);
    }
    let left = node.store_leftovers();
    assert!(left.is_empty(), "ferry-ipam store not empty: {left:?}");
    note(&format!(
        "run_pod_sandbox: pods {ips:?}, {:.1}s",
        t0.elapsed().as_secs_f64()
    ));
}

/// Host veths of the node (the lab's uplink is its `eth0`).
fn pod_veths(node: &CriNode) -> Vec<String> {
    node.node
        .veths()
        .into_iter()
        .filter(|v| v != "eth0")
        .collect()
}

/// Everything of a pod that must be gone once it is stopped: its address
/// in ferry-ipam's store, its host veth, the node's ifbs (only shaped pods
/// have one), nftables elements naming its address or `host_ports`, and
/// libcni's cached result.
fn assert_released(node: &CriNode, id: &str, ip: Ipv4Addr, host_ports: &[u16]) {
    let left = node.store_leftovers();
    assert!(left.is_empty(), "ferry-ipam store not empty: {left:?}");
    let veth = host_veth_name(id, "eth0");
    assert!(node.node.ns.link(&veth).is_none(), "{veth} still there");
    let ifbs = node.node.ns.links_of_kind("ifb");
    assert!(ifbs.is_empty(), "ifbs left: {ifbs:?}");
    let rules = node.node.nft_ruleset();
    assert!(
        !rules.contains(&ip.to_string()),
        "nftables still names {ip}:\n{rules}"
    );
    for port in host_ports {
        assert!(
            !rules.contains(&port.to_string()),
            "nftables still names hostPort {port}:\n{rules}"
        );
    }
    let cached: Vec<_> = std::fs::read_dir(node.node.cni_cache().join("results"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(cached.is_empty(), "libcni results still cached: {cached:?}");
}

#[test]
fn host_ports_tcp_and_udp_answer_from_the_node_and_from_outside() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let lab = lab(1);
    let node = &lab.nodes[0];
    let (tcp_port, udp_port) = (38180, 38181);
    let mut config = pod_config(&node.node, "hostport");
    config.port_mappings = vec![
        host_port(Protocol::Tcp, 8080, tcp_port),
        host_port(Protocol::Udp, 8080, udp_port),
    ];
    // Before ferry-portmap read containerd's capitalised keys, this failed:
    // "missing field `hostPort`" (code 7), and the sandbox did not start.
    let pod = node.run_pod(config);
    let servers = PodServers::start(&pod.netns, 8080, "hostport");
    let node_ip = lab.lab.nodes[node.lab_index].ip;
    let (tcp, udp) = (
        SocketAddr::from((node_ip, tcp_port)),
        SocketAddr::from((node_ip, udp_port)),
    );
    let local = (
        SocketAddr::from((Ipv4Addr::LOCALHOST, tcp_port)),
        SocketAddr::from((Ipv4Addr::LOCALHOST, udp_port)),
    );
    for (from, ns, (tcp, udp)) in [
        ("the node", &node.node.ns, (tcp, udp)),
        ("the node's 127.0.0.1", &node.node.ns, local),
        ("outside (the underlay)", &lab.lab.underlay, (tcp, udp)),
    ] {
        let answer = tcp_answer(ns, tcp);
        assert_eq!(
            answer.as_deref(),
            Some("hostport tcp"),
            "TCP hostPort {tcp} from {from}\n{}",
            node.node.nft_ruleset()
        );
        let answer = udp_answer(ns, udp);
        assert_eq!(
            answer.as_deref(),
            Some("hostport udp"),
            "UDP hostPort {udp} from {from}\n{}",
            node.node.nft_ruleset()
        );
    }
    drop(servers);
    let (id, ip) = (pod.id.clone(), pod.ip);
    node.stop_and_remove(pod);
    assert_released(node, &id, ip, &[tcp_port, udp_port]);
    assert_eq!(
        tcp_answer(&lab.lab.underlay, tcp),
        None,
        "TCP hostPort left"
    );
    note(&format!("host_ports: {:.1}s", t0.elapsed().as_secs_f64()));
}

#[test]
fn bandwidth_annotations_shape_the_pod_from_the_first_second() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let lab = lab(1);
    let node = &lab.nodes[0];
    let (_, gateway) = lab.subnet(0);
    let rate = 10_000_000.0;
    let mut config = pod_config(&node.node, "shaped");
    config.annotations = bandwidth_annotations("10M", "10M");
    let shaped = node.run_pod(config);
    let free = run(node, "unshaped");
    // The iperf3 server on the node, at the pods' gateway (on the bridge
    // from the first ADD on).
    let gw = gateway.to_string();
    let _server = Iperf3Server::start(&node.node.ns, &gw);
    // containerd sends a burst of 4294967295 bits ("none given"): taken
    // literally, the first half gigabyte would pass at line rate and 3 s
    // would average far above the rate.
    let egress = iperf3_for(&shaped.netns, &gw, false, "3", "0");
    let ingress = iperf3_for(&shaped.netns, &gw, true, "3", "0");
    let unshaped = iperf3_for(&free.netns, &gw, false, "1", "0");
    note(&format!(
        "bandwidth 10M/10M: egress {:.2} Mbit/s, ingress {:.2} Mbit/s over the first 3 s; unshaped pod {:.0} Mbit/s",
        egress / 1e6,
        ingress / 1e6,
        unshaped / 1e6
    ));
    for (what, got) in [("egress", egress), ("ingress", ingress)] {
        assert!(
            (0.6 * rate..=1.25 * rate).contains(&got),
            "{what}: {got:.0} bit/s over the first 3 s, annotated {rate:.0}"
        );
    }
    assert!(
        unshaped > 5.0 * egress,
        "the unshaped pod ({unshaped:.0} bit/s) should be far faster"
    );
    for p in [shaped, free] {
        node.stop_and_remove(p);
    }
    let ifbs = node.node.ns.links_of_kind("ifb");
    assert!(ifbs.is_empty(), "ifbs left: {ifbs:?}");
    note(&format!("bandwidth: {:.1}s", t0.elapsed().as_secs_f64()));
}

#[test]
fn stop_twice_then_remove_releases_everything() {
    if !can_run() {
        return;
    }
    let lab = lab(1);
    let node = &lab.nodes[0];
    let port = 38280;
    let mut config = pod_config(&node.node, "released");
    config.port_mappings = vec![host_port(Protocol::Tcp, 80, port)];
    config.annotations = bandwidth_annotations("20M", "20M");
    let CriPod { id, ip, netns, .. } = node.run_pod(config);
    // kubelet holds no handle on the pod's namespace.
    drop(netns);
    let veth = host_veth_name(&id, "eth0");
    assert!(node.node.ns.link(&veth).is_some(), "no host veth {veth}");
    assert_eq!(node.node.ns.links_of_kind("ifb").len(), 1, "one ifb");
    let rules = node.node.nft_ruleset();
    assert!(
        rules.contains(&port.to_string()) && rules.contains(&ip.to_string()),
        "hostPort {port} -> {ip} not in nftables:\n{rules}"
    );

    let dels = || node.bridge_calls(&id).len() - 1;
    node.stop(&id);
    assert_released(node, &id, ip, &[port]);
    let after_stop = dels();
    // kubelet stops again when it is not sure the first one went through.
    node.stop(&id);
    let after_second_stop = dels();
    node.remove(&id);
    assert_released(node, &id, ip, &[port]);
    note(&format!(
        "containerd CRI DELs: {after_stop} at the first Stop, {} at the second, {} at Remove",
        after_second_stop - after_stop,
        dels() - after_second_stop
    ));
    let gone = node.cri.pod_sandbox_status(&id);
    assert!(gone.is_err(), "sandbox still known after removal");

    let calls = node.bridge_calls(&id);
    let commands: Vec<&str> = calls.iter().map(|(c, _, _)| c.as_str()).collect();
    assert_eq!(commands.first(), Some(&"ADD"), "{calls:?}");
    assert!(
        commands[1..].iter().all(|c| *c == "DEL") && commands.len() >= 2,
        "after the ADD only DELs (no CHECK, no VERSION): {calls:?}"
    );
    assert!(
        !calls[1].1.is_empty(),
        "the first DEL names the namespace: {calls:?}"
    );
    let netns_of_dels: Vec<&str> = calls[1..].iter().map(|(_, n, _)| n.as_str()).collect();
    note(&format!(
        "containerd CRI: {} DELs for one pod, CNI_NETNS {netns_of_dels:?}",
        netns_of_dels.len()
    ));
}

#[test]
fn containerd_restart_keeps_pod_addresses() {
    if !can_run() {
        return;
    }
    let mut lab = lab(1);
    let pods = [run(&lab.nodes[0], "stay-a"), run(&lab.nodes[0], "stay-b")];
    let calls_before = lab.nodes[0].node.call_log();
    lab.restart_containerd(0);
    let node = &lab.nodes[0];
    for p in &pods {
        let status = node
            .cri
            .pod_sandbox_status(&p.id)
            .unwrap_or_else(|e| panic!("{} after the restart: {e}", p.name))
            .status
            .expect("a status");
        assert_eq!(
            status.state,
            PodSandboxState::SandboxReady as i32,
            "{} not ready after the restart",
            p.name
        );
        assert_eq!(node.sandbox_ip(&p.id), Some(p.ip), "{}'s address", p.name);
    }
    assert!(pods[0].netns.ping(pods[1].ip.into(), 3), "a cannot ping b");
    assert!(pods[1].netns.ping(pods[0].ip.into(), 3), "b cannot ping a");
    assert_eq!(
        node.node.call_log(),
        calls_before,
        "containerd called the plugins at its restart"
    );
    let released: Vec<(String, Ipv4Addr)> = pods.iter().map(|p| (p.id.clone(), p.ip)).collect();
    for p in pods {
        node.stop_and_remove(p);
    }
    for (id, ip) in released {
        assert_released(node, &id, ip, &[]);
    }
    assert_eq!(pod_veths(node), Vec::<String>::new());
}

#[test]
fn pods_on_two_nodes_reach_each_other() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let lab = lab(2);
    let pods = [run(&lab.nodes[0], "left"), run(&lab.nodes[1], "right")];
    for (i, p) in pods.iter().enumerate() {
        let (subnet, _) = lab.subnet(i);
        assert!(
            subnet.contains(p.ip),
            "{}: {} not in {subnet}",
            p.name,
            p.ip
        );
    }
    for (a, b) in [(0, 1), (1, 0)] {
        assert!(
            wait_until(Duration::from_secs(10), || pods[a]
                .netns
                .ping(pods[b].ip.into(), 1)),
            "{} ({}) cannot reach {} ({}) on the other node\n{}",
            pods[a].name,
            pods[a].ip,
            pods[b].name,
            pods[b].ip,
            lab.lab.ferryd_log(a)
        );
    }
    let [left, right] = pods;
    lab.nodes[0].stop_and_remove(left);
    lab.nodes[1].stop_and_remove(right);
    for n in &lab.nodes {
        assert!(n.store_leftovers().is_empty());
        assert_eq!(pod_veths(n), Vec::<String>::new());
    }
    note(&format!("two nodes: {:.1}s", t0.elapsed().as_secs_f64()));
}
