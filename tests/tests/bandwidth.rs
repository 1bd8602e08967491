//! ferry-bandwidth chained after ferry-bridge (+ ferry-ipam), as a runtime
//! chains them: bridge ADD, then bandwidth ADD with the bridge's result as
//! prevResult and the rates in `runtimeConfig.bandwidth`; DEL in reverse.
//!
//! Each test has its own fake host namespace (bridge, host veths and the
//! ifb devices live there and vanish with it), pod namespaces, and its own
//! iperf3 server, killed on drop.

use ferry_tests::iperf::{Iperf3Server, iperf3_for};
use ferry_tests::{
    BridgeNet, PluginOutput, TestNetns, TestPod, bin, host_veth_name, require_root, run_plugin_in,
};
use serde_json::{Value, json};
use std::net::IpAddr;

const VERSION: &str = "1.0.0";

/// ferry-bridge ADD; the result (the bandwidth plugin's prevResult).
fn bridge_add(net: &BridgeNet, pod: &TestPod) -> Value {
    let path = pod.ns.path_str();
    net.call("ADD", &pod.id, Some(&path), "eth0", &net.conf(VERSION))
        .ok_json()
}

fn bw_conf(net: &BridgeNet, bandwidth: Option<Value>, prev: Option<&Value>) -> Value {
    let mut c = json!({"cniVersion": VERSION, "name": net.name, "type": "ferry-bandwidth"});
    if let Some(bw) = bandwidth {
        c["runtimeConfig"] = json!({"bandwidth": bw});
    }
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    c
}

/// ferry-bandwidth `cmd` in the fake host namespace.
fn bw(
    net: &BridgeNet,
    cmd: &str,
    pod: &TestPod,
    netns: Option<&str>,
    conf: &Value,
) -> PluginOutput {
    run_plugin_in(
        &net.host,
        &bin("ferry-bandwidth"),
        cmd,
        &[
            ("CNI_CONTAINERID", Some(&pod.id)),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", Some("eth0")),
        ],
        &conf.to_string(),
    )
}

fn rates(ingress_bps: u64, egress_bps: u64) -> Value {
    // Bursts of 10 ms of traffic (well above the MTU): the average over a
    // few seconds is the rate.
    json!({
        "ingressRate": ingress_bps, "ingressBurst": ingress_bps / 100,
        "egressRate": egress_bps, "egressBurst": egress_bps / 100,
    })
}

/// ferry-bandwidth ADD; asserts it passed prevResult on unchanged.
fn bw_add(net: &BridgeNet, pod: &TestPod, bandwidth: Value, prev: &Value) {
    let path = pod.ns.path_str();
    let out = bw(
        net,
        "ADD",
        pod,
        Some(&path),
        &bw_conf(net, Some(bandwidth), Some(prev)),
    );
    assert_eq!(&out.ok_json(), prev, "prevResult passed through");
}

fn ifbs(net: &BridgeNet) -> Vec<String> {
    net.host.links_of_kind("ifb")
}

fn pod_ipv4(result: &Value) -> String {
    result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .find(|a| a.contains('.'))
        .expect("an IPv4 address")
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

/// Bits per second received in an iperf3 run from `client` to `server`
/// (`reverse`: the server sends). 4 s, the first one omitted (slow start and
/// the bucket's initial burst).
fn iperf3(client: &TestNetns, server: &str, reverse: bool) -> f64 {
    iperf3_for(client, server, reverse, "4", "1")
}

fn assert_near(what: &str, got: f64, want: f64) {
    let ratio = got / want;
    eprintln!(
        "{what}: {:.2} Mbit/s, configured {:.2} ({ratio:.3})",
        got / 1e6,
        want / 1e6
    );
    assert!(
        (0.8..=1.2).contains(&ratio),
        "{what}: measured {got:.0} bit/s, configured {want:.0} (±20 %)"
    );
}

#[test]
fn rates_are_enforced_both_ways_and_an_unshaped_pod_is_faster() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let (shaped, free) = (TestPod::new(), TestPod::new());
    let prev = bridge_add(&net, &shaped);
    let free_prev = bridge_add(&net, &free);
    let (ingress, egress) = (10_000_000u64, 20_000_000u64);
    bw_add(&net, &shaped, rates(ingress, egress), &prev);
    // The unshaped pod goes through the plugin too, with no bandwidth.
    let path = free.ns.path_str();
    let out = bw(
        &net,
        "ADD",
        &free,
        Some(&path),
        &bw_conf(&net, None, Some(&free_prev)),
    );
    assert_eq!(out.ok_json(), free_prev);
    assert_eq!(ifbs(&net).len(), 1, "one ifb, for the shaped pod only");

    let gw = match net.gateways().0 {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(_) => unreachable!("gateways().0 is IPv4"),
    };
    let _server = Iperf3Server::start(&net.host, &gw);
    let from_pod = iperf3(&shaped.ns, &gw, false);
    let to_pod = iperf3(&shaped.ns, &gw, true);
    let unshaped = iperf3(&free.ns, &gw, false);
    eprintln!("unshaped pod: {:.1} Mbit/s", unshaped / 1e6);
    assert_near("egress (pod -> host)", from_pod, egress as f64);
    assert_near("ingress (host -> pod)", to_pod, ingress as f64);
    assert!(
        unshaped > 5.0 * from_pod,
        "the unshaped pod ({unshaped:.0} bit/s) should be far faster than the shaped one ({from_pod:.0})"
    );

    // Pod to pod: the shaped pod's egress limit holds there too.
    let _pod_server = Iperf3Server::start(&free.ns, &pod_ipv4(&free_prev));
    let pod_to_pod = iperf3(&shaped.ns, &pod_ipv4(&free_prev), false);
    assert_near("egress (pod -> pod)", pod_to_pod, egress as f64);

    for (pod, p) in [(&shaped, &prev), (&free, &free_prev)] {
        let path = pod.ns.path_str();
        bw(
            &net,
            "DEL",
            pod,
            Some(&path),
            &bw_conf(&net, Some(rates(ingress, egress)), Some(p)),
        )
        .ok_empty();
        net.call("DEL", &pod.id, Some(&path), "eth0", &net.conf(VERSION))
            .ok_empty();
    }
    assert_eq!(ifbs(&net), Vec::<String>::new());
}

#[test]
fn check_passes_after_add_and_fails_when_a_piece_is_removed() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let pod = TestPod::new();
    let prev = bridge_add(&net, &pod);
    let bandwidth = rates(8_000_000, 16_000_000);
    bw_add(&net, &pod, bandwidth.clone(), &prev);
    let path = pod.ns.path_str();
    let conf = bw_conf(&net, Some(bandwidth.clone()), Some(&prev));
    let check = || bw(&net, "CHECK", &pod, Some(&path), &conf);
    check().ok_empty();

    let veth = host_veth_name(&pod.id, "eth0");
    let ifb = ifbs(&net);
    assert_eq!(ifb.len(), 1);
    let qdiscs = net.host.exec("tc", &["qdisc", "show", "dev", &veth]);
    assert!(
        qdiscs.contains("tbf 1: root") && qdiscs.contains("rate 8Mbit"),
        "{qdiscs}"
    );
    let on_ifb = net.host.exec("tc", &["qdisc", "show", "dev", &ifb[0]]);
    assert!(on_ifb.contains("rate 16Mbit"), "{on_ifb}");
    let filters = net
        .host
        .exec("tc", &["filter", "show", "dev", &veth, "ingress"]);
    assert!(
        filters.contains(&format!("Egress Redirect to device {}", ifb[0])),
        "{filters}"
    );

    // Other rates than the kernel's: CHECK says so.
    let other = bw_conf(&net, Some(rates(8_000_000, 32_000_000)), Some(&prev));
    let e = bw(&net, "CHECK", &pod, Some(&path), &other).err_json();
    assert_eq!(e["code"], 101, "{e}");

    // The veth's TBF removed by hand.
    net.host.exec("tc", &["qdisc", "del", "dev", &veth, "root"]);
    let e = check().err_json();
    assert_eq!(e["code"], 101, "{e}");
    assert!(e["msg"].as_str().unwrap().contains(&veth), "{e}");

    // A repeated ADD repairs it.
    bw_add(&net, &pod, bandwidth.clone(), &prev);
    check().ok_empty();

    // The redirect removed by hand (with the ingress qdisc).
    net.host
        .exec("tc", &["qdisc", "del", "dev", &veth, "ingress"]);
    assert_eq!(check().err_json()["code"], 101);
    bw_add(&net, &pod, bandwidth.clone(), &prev);
    check().ok_empty();

    // The ifb removed by hand.
    net.host.exec("ip", &["link", "del", &ifb[0]]);
    let e = check().err_json();
    assert_eq!(e["code"], 101, "{e}");
    assert!(e["msg"].as_str().unwrap().contains(&ifb[0]), "{e}");

    // DEL twice: both succeed, no ifb left.
    bw_add(&net, &pod, bandwidth.clone(), &prev);
    assert_eq!(ifbs(&net).len(), 1);
    bw(&net, "DEL", &pod, Some(&path), &conf).ok_empty();
    assert_eq!(ifbs(&net), Vec::<String>::new());
    bw(&net, "DEL", &pod, Some(&path), &conf).ok_empty();
    net.call("DEL", &pod.id, Some(&path), "eth0", &net.conf(VERSION))
        .ok_empty();
}

#[test]
fn del_without_the_netns_removes_the_ifb() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let pod = TestPod::new();
    let prev = bridge_add(&net, &pod);
    bw_add(&net, &pod, rates(5_000_000, 5_000_000), &prev);
    assert_eq!(ifbs(&net).len(), 1);
    let TestPod { ns, id } = pod;
    let path = ns.path_str();
    drop(ns); // the pod's namespace is gone
    let gone = TestPod {
        ns: TestNetns::new(),
        id,
    };
    let conf = bw_conf(&net, Some(rates(5_000_000, 5_000_000)), Some(&prev));
    // Once with the dead path, once without CNI_NETNS at all.
    bw(&net, "DEL", &gone, Some(&path), &conf).ok_empty();
    assert_eq!(ifbs(&net), Vec::<String>::new());
    bw(&net, "DEL", &gone, None, &conf).ok_empty();
    net.call("DEL", &gone.id, None, "eth0", &net.conf(VERSION))
        .ok_empty();
}

#[test]
fn no_bandwidth_passes_prev_result_through_and_touches_nothing() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let pod = TestPod::new();
    let prev = bridge_add(&net, &pod);
    let veth = host_veth_name(&pod.id, "eth0");
    let before = net.host.exec("tc", &["qdisc", "show"]);
    let path = pod.ns.path_str();
    for bandwidth in [
        None,
        Some(json!({})),
        Some(json!({"ingressRate": 0, "ingressBurst": 0, "egressRate": 0, "egressBurst": 0})),
    ] {
        let conf = bw_conf(&net, bandwidth.clone(), Some(&prev));
        assert_eq!(bw(&net, "ADD", &pod, Some(&path), &conf).ok_json(), prev);
        bw(&net, "CHECK", &pod, Some(&path), &conf).ok_empty();
    }
    assert_eq!(net.host.exec("tc", &["qdisc", "show"]), before);
    assert!(!before.contains(&format!("tbf 1: dev {veth}")));
    assert_eq!(ifbs(&net), Vec::<String>::new());
    bw(
        &net,
        "DEL",
        &pod,
        Some(&path),
        &bw_conf(&net, None, Some(&prev)),
    )
    .ok_empty();
    net.call("DEL", &pod.id, Some(&path), "eth0", &net.conf(VERSION))
        .ok_empty();
}

#[test]
fn bad_configurations_are_clean_cni_errors_and_create_nothing() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let pod = TestPod::new();
    let prev = bridge_add(&net, &pod);
    let path = pod.ns.path_str();
    let cases: Vec<(Value, u64, &str)> = vec![
        (
            json!({"ingressRate": -1, "ingressBurst": 1000}),
            7,
            "non-negative",
        ),
        (
            json!({"egressRate": 0, "egressBurst": 1000}),
            7,
            "rate must also be set",
        ),
        (
            json!({"egressRate": 1000, "egressBurst": 0}),
            7,
            "burst must also be set",
        ),
        (json!({"ingressRate": 1000}), 7, "burst must also be set"),
        (
            json!({"ingressRate": 1e7, "ingressBurst": 1000}),
            7,
            "non-negative",
        ),
        (
            json!({"ingressRate": 4, "ingressBurst": 1000}),
            7,
            "below 8 bits",
        ),
        (
            json!({"ingressRate": 8000, "ingressBurst": 40_000_000_000u64}),
            7,
            "4GB",
        ),
        (
            json!({"egressRate": 8000, "egressBurst": 8000, "unshapedSubnets": ["10.0.0.0/8"]}),
            2,
            "not supported",
        ),
    ];
    for (bandwidth, code, text) in cases {
        for cmd in ["ADD", "CHECK"] {
            let conf = bw_conf(&net, Some(bandwidth.clone()), Some(&prev));
            let out = bw(&net, cmd, &pod, Some(&path), &conf);
            let e = out.err_json();
            assert_eq!(e["code"], code, "{cmd} {bandwidth}: {e}");
            assert!(
                e["msg"].as_str().unwrap().contains(text),
                "{cmd} {bandwidth}: {e}"
            );
            assert!(!out.stderr.contains("panicked"), "{out:?}");
        }
    }
    // Shaping asked for without a chain.
    let e = bw(
        &net,
        "ADD",
        &pod,
        Some(&path),
        &bw_conf(&net, Some(rates(8000, 8000)), None),
    )
    .err_json();
    assert_eq!(e["code"], 7, "{e}");
    // A prevResult without a host veth.
    let no_veth = json!({"cniVersion": VERSION, "interfaces": [{"name": "eth0", "sandbox": path}], "ips": []});
    let e = bw(
        &net,
        "ADD",
        &pod,
        Some(&path),
        &bw_conf(&net, Some(rates(8000, 8000)), Some(&no_veth)),
    )
    .err_json();
    assert_eq!(e["code"], 100, "{e}");
    assert_eq!(ifbs(&net), Vec::<String>::new());
    let veth = host_veth_name(&pod.id, "eth0");
    let q = net.host.exec("tc", &["qdisc", "show", "dev", &veth]);
    assert!(!q.contains("tbf") && !q.contains("ingress"), "{q}");
    net.call("DEL", &pod.id, Some(&path), "eth0", &net.conf(VERSION))
        .ok_empty();
}

/// containerd's CRI plugin sends the `kubernetes.io/*-bandwidth` annotations
/// with capitalised keys and a burst of 4294967295 bits ("none given").
/// Both directions are shaped, and from the very first second: the burst is
/// not a 512 MiB bucket that passes the first half gigabyte at line rate.
#[test]
fn containerd_annotations_shape_from_the_first_second() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let pod = TestPod::new();
    let prev = bridge_add(&net, &pod);
    let rate = 10_000_000u64;
    let containerd = json!({"IngressRate": rate, "IngressBurst": 4294967295u64,
                            "EgressRate": rate, "EgressBurst": 4294967295u64});
    bw_add(&net, &pod, containerd.clone(), &prev);
    assert_eq!(ifbs(&net).len(), 1, "egress is shaped through an ifb");

    let gw = match net.gateways().0 {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(_) => unreachable!("gateways().0 is IPv4"),
    };
    let _server = Iperf3Server::start(&net.host, &gw);
    // 2 s from a fresh (full) bucket, nothing omitted: a 512 MiB bucket
    // would show gigabits here; 100 ms of burst adds at most 5 % over 2 s.
    for (what, reverse) in [
        ("egress (pod -> host)", false),
        ("ingress (host -> pod)", true),
    ] {
        let got = iperf3_for(&pod.ns, &gw, reverse, "2", "0");
        eprintln!("{what}: first 2 s {:.2} Mbit/s at 10 Mbit/s", got / 1e6);
        assert!(
            got <= 1.25 * rate as f64,
            "{what}: {got:.0} bit/s in the first 2 s against a rate of {rate}: the burst passed unshaped"
        );
        assert!(
            got >= 0.5 * rate as f64,
            "{what}: {got:.0} bit/s, far below the rate"
        );
    }

    let path = pod.ns.path_str();
    bw(
        &net,
        "DEL",
        &pod,
        Some(&path),
        &bw_conf(&net, Some(containerd), Some(&prev)),
    )
    .ok_empty();
    net.call("DEL", &pod.id, Some(&path), "eth0", &net.conf(VERSION))
        .ok_empty();
    assert_eq!(ifbs(&net), Vec::<String>::new());
}
