//! ferry-portmap chained after ferry-bridge (+ ferry-ipam), executed as a
//! runtime executes them, with real TCP and UDP traffic.
//!
//! Every test builds its own world in namespaces it creates: a fake host
//! (both plugins run inside it, so the bridge, the veths and `table inet
//! ferry` never reach the real host), pods, and an "outside" namespace linked
//! to the fake host by a veth (the host's uplink address is what hostPorts
//! are reached on). All of it vanishes on drop, also when a test panics.

use ferry_tests::portmap::{
    bridge_add, bridge_conf, pm_conf, pod_ip, portmap, ruleset, sa, serve, tcp_from, udp_from,
};
use ferry_tests::{
    BridgeNet, Outside, TestNetns, TestPod, bin, require_root, run_plugin, unique_index,
};
use serde_json::{Value, json};
use std::net::IpAddr;

/// bridge ADD then portmap ADD (the chain); returns the bridge's result and
/// asserts portmap passed it through unchanged.
fn chain_add(net: &BridgeNet, pod: &TestPod, mappings: Value) -> Value {
    let prev = bridge_add(net, pod);
    let conf = pm_conf(net, mappings, Some(&prev), json!({}));
    let out = portmap(net, "ADD", &pod.id, Some(&pod.ns.path_str()), &conf);
    assert_eq!(out.ok_json(), prev, "portmap must pass prevResult through");
    prev
}

/// portmap DEL then bridge DEL (reverse order), with everything a runtime knows.
fn chain_del(net: &BridgeNet, pod: &TestPod, mappings: Value, prev: &Value) {
    let conf = pm_conf(net, mappings, Some(prev), json!({}));
    portmap(net, "DEL", &pod.id, Some(&pod.ns.path_str()), &conf).ok_empty();
    net.call(
        "DEL",
        &pod.id,
        Some(&pod.ns.path_str()),
        "eth0",
        &bridge_conf(net),
    )
    .ok_empty();
}

fn port() -> u16 {
    20000 + (std::process::id() % 20000) as u16 + (unique_index() % 1000) as u16
}

/// The spec's reach matrix: a hostPort is reached from outside (both
/// families, TCP and UDP, the client's address kept), from the host itself
/// via its own address and via 127.0.0.1, from another pod and from the pod
/// itself (both masqueraded to the gateway). DEL removes every trace and the
/// port stops answering.
#[test]
fn host_port_reaches_the_pod_from_everywhere() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(true);
    let out = Outside::new(&net);
    let (a, b) = (TestPod::new(), TestPod::new());
    let hp = port();
    let mappings = json!([
        {"hostPort": hp, "containerPort": 8080, "protocol": "tcp"},
        {"hostPort": hp, "containerPort": 8080, "protocol": "udp"},
    ]);
    let ra = chain_add(&net, &a, mappings.clone());
    let rb = bridge_add(&net, &b); // a pod without mappings
    net.host.exec("ip", &["link", "set", "lo", "up"]);
    serve(&a.ns, 8080, "pod-a");
    let (gw4, gw6) = net.gateways();

    let expect = |what: &str, got: Option<String>, peer: IpAddr| {
        assert_eq!(got, Some(format!("pod-a {peer}")), "{what}");
    };
    expect(
        "outside → host v4",
        tcp_from(&out.ns, sa(out.host_v4, hp)),
        out.out_v4,
    );
    expect(
        "outside → host v6",
        tcp_from(&out.ns, sa(out.host_v6, hp)),
        out.out_v6,
    );
    expect(
        "outside → host v4, UDP",
        udp_from(&out.ns, sa(out.host_v4, hp)),
        out.out_v4,
    );
    expect(
        "outside → host v6, UDP",
        udp_from(&out.ns, sa(out.host_v6, hp)),
        out.out_v6,
    );
    expect(
        "host → 127.0.0.1 (route_localnet + masquerade)",
        tcp_from(&net.host, sa("127.0.0.1".parse().unwrap(), hp)),
        gw4,
    );
    expect(
        "host → its own address",
        tcp_from(&net.host, sa(out.host_v4, hp)),
        out.host_v4,
    );
    expect(
        "other pod → host v4 (masqueraded)",
        tcp_from(&b.ns, sa(out.host_v4, hp)),
        gw4,
    );
    expect(
        "other pod → host v6 (masqueraded)",
        tcp_from(&b.ns, sa(out.host_v6, hp)),
        gw6,
    );
    expect("hairpin v4", tcp_from(&a.ns, sa(out.host_v4, hp)), gw4);
    expect("hairpin v6", tcp_from(&a.ns, sa(out.host_v6, hp)), gw6);
    expect("hairpin UDP", udp_from(&a.ns, sa(out.host_v4, hp)), gw4);
    // Another port of the host is not forwarded.
    assert_eq!(tcp_from(&out.ns, sa(out.host_v4, hp + 1)), None);
    // The pod itself still answers directly, unNATed.
    expect(
        "pod address, direct",
        tcp_from(&b.ns, sa(pod_ip(&ra, true), 8080)),
        pod_ip(&rb, true),
    );

    let conf = pm_conf(&net, mappings.clone(), Some(&ra), json!({}));
    portmap(&net, "CHECK", &a.id, Some(&a.ns.path_str()), &conf).ok_empty();
    chain_del(&net, &a, mappings, &ra);
    let rs = ruleset(&net.host);
    assert!(!rs.contains("hp-"), "DEL left pod state:\n{rs}");
    assert_eq!(tcp_from(&out.ns, sa(out.host_v4, hp)), None);
    net.call(
        "DEL",
        &b.id,
        Some(&b.ns.path_str()),
        "eth0",
        &bridge_conf(&net),
    )
    .ok_empty();
}

/// hostIP: only that destination is forwarded; another address of the host
/// (and 127.0.0.1) is not.
#[test]
fn host_ip_restricts_the_destination() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(true);
    let out = Outside::new(&net);
    let other = match out.host_v4 {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 2).into()),
        _ => unreachable!(),
    };
    net.host.exec(
        "ip",
        &["addr", "add", &format!("{other}/24"), "dev", "uplink"],
    );
    let a = TestPod::new();
    let hp = port();
    let mappings = json!([
        {"hostPort": hp, "containerPort": 8080, "protocol": "tcp", "hostIP": out.host_v4.to_string()},
        {"hostPort": hp, "containerPort": 8080, "protocol": "tcp", "hostIP": out.host_v6.to_string()},
    ]);
    let ra = chain_add(&net, &a, mappings.clone());
    serve(&a.ns, 8080, "pod-a");
    assert_eq!(
        tcp_from(&out.ns, sa(out.host_v4, hp)),
        Some(format!("pod-a {}", out.out_v4))
    );
    assert_eq!(
        tcp_from(&out.ns, sa(out.host_v6, hp)),
        Some(format!("pod-a {}", out.out_v6))
    );
    assert_eq!(tcp_from(&out.ns, sa(other, hp)), None, "other host address");
    // One element per hostIP in the hostIP maps, tagged with the pod, DNATing
    // to the pod's address and the container port.
    let rs = ruleset(&net.host);
    for (host, pod) in [
        (out.host_v4, pod_ip(&ra, true)),
        (out.host_v6, pod_ip(&ra, false)),
    ] {
        let line = rs
            .lines()
            .find(|l| l.contains(&format!("{host} . tcp . {hp} comment \"hp-")))
            .unwrap_or_else(|| panic!("no element for {host}:{hp} in\n{rs}"));
        assert!(
            line.contains(&format!("{}/eth0\" : {pod} . 8080", a.id)),
            "{line}"
        );
    }
    chain_del(&net, &a, mappings, &ra);
    assert!(!ruleset(&net.host).contains("hp-"));
}

/// Two pods, one hostPort: the second ADD is a clear CNI error and adds
/// nothing; another protocol on the same port is no conflict; once the first
/// pod is gone the port is free again.
#[test]
fn conflicting_host_port_is_refused_atomically() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let (a, b) = (TestPod::new(), TestPod::new());
    let hp = port();
    let tcp = json!([{"hostPort": hp, "containerPort": 80, "protocol": "tcp"}]);
    let both = json!([
        {"hostPort": hp + 1, "containerPort": 81, "protocol": "tcp"},
        {"hostPort": hp, "containerPort": 80, "protocol": "tcp"},
    ]);
    let ra = chain_add(&net, &a, tcp.clone());
    let rb = bridge_add(&net, &b);
    let before = ruleset(&net.host);
    let e = portmap(
        &net,
        "ADD",
        &b.id,
        Some(&b.ns.path_str()),
        &pm_conf(&net, both.clone(), Some(&rb), json!({})),
    )
    .err_json();
    assert_eq!(e["code"], 120, "{e}");
    let msg = e["msg"].as_str().unwrap();
    assert!(msg.contains(&format!("{hp}/tcp")), "{e}");
    assert_eq!(
        ruleset(&net.host),
        before,
        "a refused ADD changed the ruleset"
    );

    // UDP on the same port is another key.
    let udp = json!([{"hostPort": hp, "containerPort": 80, "protocol": "udp"}]);
    let conf_b = pm_conf(&net, udp.clone(), Some(&rb), json!({}));
    portmap(&net, "ADD", &b.id, Some(&b.ns.path_str()), &conf_b).ok_json();
    // After a's DEL, b may take the TCP port too (a retried ADD with more).
    chain_del(&net, &a, tcp, &ra);
    let conf_b2 = pm_conf(&net, both.clone(), Some(&rb), json!({}));
    portmap(&net, "ADD", &b.id, Some(&b.ns.path_str()), &conf_b2).ok_json();
    chain_del(&net, &b, both, &rb);
    assert!(!ruleset(&net.host).contains("hp-"));
}

/// DEL knows only (container ID, ifname, config): no netns, no prevResult,
/// no runtimeConfig. It removes exactly that pod's state, and is idempotent.
#[test]
fn del_without_netns_or_prev_result_removes_only_that_pod() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let (a, b) = (TestPod::new(), TestPod::new());
    let (hp_a, hp_b) = (port(), port() + 2000);
    chain_add(
        &net,
        &a,
        json!([{"hostPort": hp_a, "containerPort": 80}, {"hostPort": hp_a, "containerPort": 80, "protocol": "sctp"}]),
    );
    let mb = json!([{"hostPort": hp_b, "containerPort": 80}]);
    let rb = chain_add(&net, &b, mb.clone());
    let id_a = a.id.clone();
    drop(a);
    let bare = json!({"cniVersion": "1.0.0", "name": net.name, "type": "ferry-portmap"});
    portmap(&net, "DEL", &id_a, None, &bare).ok_empty();
    let rs = ruleset(&net.host);
    assert!(
        !rs.contains(&format!(". {hp_a}")),
        "a's state is left:\n{rs}"
    );
    assert!(
        !rs.contains(&format!("{id_a}/")),
        "a's state is left:\n{rs}"
    );
    assert!(
        rs.contains(&format!("tcp . {hp_b} comment \"hp-")),
        "b's state went too:\n{rs}"
    );
    portmap(&net, "DEL", &id_a, None, &bare).ok_empty();
    let conf = pm_conf(&net, mb.clone(), Some(&rb), json!({}));
    portmap(&net, "CHECK", &b.id, Some(&b.ns.path_str()), &conf).ok_empty();
    chain_del(&net, &b, mb, &rb);
    assert!(!ruleset(&net.host).contains("hp-"));
}

/// The nft elements tagged with a container's ID (each printed on its own
/// line, with its comment), sorted.
fn elements_of(ns: &TestNetns, id: &str) -> Vec<String> {
    let tag = format!("/{id}/eth0\"");
    let mut out: Vec<String> = ruleset(ns)
        .lines()
        .filter(|l| l.contains(&tag))
        .map(|l| {
            l.trim()
                .trim_start_matches("elements = { ")
                .trim_end_matches([',', '}', ' '])
                .to_string()
        })
        .collect();
    out.sort();
    out
}

/// A pod's ADD and DEL, and a refused ADD, change only that pod's elements:
/// every element of another pod (DNAT maps and masquerade sets, catch-all and
/// hostIP) stays byte for byte, and that pod keeps passing CHECK and answering.
#[test]
fn add_and_del_leave_other_pods_elements_untouched() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let out = Outside::new(&net);
    let (a, b, c) = (TestPod::new(), TestPod::new(), TestPod::new());
    let hp = port();
    let mb = json!([
        {"hostPort": hp, "containerPort": 8080, "protocol": "tcp"},
        {"hostPort": hp, "containerPort": 8080, "protocol": "udp", "hostIP": out.host_v4.to_string()},
    ]);
    let rb = chain_add(&net, &b, mb.clone());
    serve(&b.ns, 8080, "pod-b");
    let before = elements_of(&net.host, &b.id);
    // DNAT v4 + v6, hostIP v4; masquerade 127/8 + subnet v4, subnet v6, hostIP 127/8 + subnet;
    // the pod as a route_localnet user of the bridge.
    assert_eq!(before.len(), 3 + 5 + 1, "{before:#?}");

    // Neighbours come and go, on other ports and on the same ones elsewhere.
    let ma = json!([
        {"hostPort": hp + 1, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": hp, "containerPort": 80, "protocol": "tcp", "hostIP": out.host_v4.to_string()},
    ]);
    let ra = chain_add(&net, &a, ma.clone());
    assert_eq!(elements_of(&net.host, &b.id), before, "a's ADD");
    assert!(!elements_of(&net.host, &a.id).is_empty());
    let rc = bridge_add(&net, &c);
    let taken = pm_conf(
        &net,
        json!([{"hostPort": hp, "containerPort": 1, "protocol": "udp", "hostIP": out.host_v4.to_string()}]),
        Some(&rc),
        json!({}),
    );
    let e = portmap(&net, "ADD", &c.id, Some(&c.ns.path_str()), &taken).err_json();
    assert_eq!(e["code"], 120, "{e}");
    assert!(
        e["msg"].as_str().unwrap().contains(&b.id),
        "the holder is named: {e}"
    );
    assert_eq!(elements_of(&net.host, &b.id), before, "c's refused ADD");
    assert!(elements_of(&net.host, &c.id).is_empty());
    chain_del(&net, &a, ma, &ra);
    assert_eq!(elements_of(&net.host, &b.id), before, "a's DEL");
    assert!(elements_of(&net.host, &a.id).is_empty());
    // A DEL of a pod that never had state, and a repeated one.
    let bare = json!({"cniVersion": "1.0.0", "name": net.name, "type": "ferry-portmap"});
    portmap(&net, "DEL", &c.id, None, &bare).ok_empty();
    portmap(&net, "DEL", &a.id, None, &bare).ok_empty();
    assert_eq!(elements_of(&net.host, &b.id), before, "DELs without state");

    let conf = pm_conf(&net, mb.clone(), Some(&rb), json!({}));
    portmap(&net, "CHECK", &b.id, Some(&b.ns.path_str()), &conf).ok_empty();
    assert_eq!(
        tcp_from(&out.ns, sa(out.host_v4, hp)),
        Some(format!("pod-b {}", out.out_v4))
    );
    chain_del(&net, &b, mb, &rb);
    net.call(
        "DEL",
        &c.id,
        Some(&c.ns.path_str()),
        "eth0",
        &bridge_conf(&net),
    )
    .ok_empty();
    assert!(!ruleset(&net.host).contains("hp-"));
}

/// CHECK passes after ADD and fails once the pod's map element is deleted by
/// hand; DEL still cleans up.
#[test]
fn check_fails_after_the_element_is_deleted() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let a = TestPod::new();
    let hp = port();
    let m = json!([{"hostPort": hp, "containerPort": 80, "protocol": "udp"}]);
    let ra = chain_add(&net, &a, m.clone());
    let conf = pm_conf(&net, m.clone(), Some(&ra), json!({}));
    portmap(&net, "CHECK", &a.id, Some(&a.ns.path_str()), &conf).ok_empty();
    net.host.exec(
        "nft",
        &[
            "delete",
            "element",
            "inet",
            "ferry",
            "hostports-v4",
            &format!("{{ udp . {hp} }}"),
        ],
    );
    let e = portmap(&net, "CHECK", &a.id, Some(&a.ns.path_str()), &conf).err_json();
    assert_eq!(e["code"], 121, "{e}");
    assert!(e["msg"].as_str().unwrap().contains("hostports"), "{e}");
    chain_del(&net, &a, m, &ra);
    assert!(!ruleset(&net.host).contains("hp-"));
}

/// No portMappings: ADD returns prevResult and writes nothing; DEL writes
/// nothing either (without ipMasq there is no ferry table at all).
#[test]
fn no_port_mappings_no_nft_state() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let a = TestPod::new();
    let ra = chain_add(&net, &a, json!([]));
    let rs = ruleset(&net.host);
    assert!(!rs.contains("inet ferry"), "{rs}");
    let conf = pm_conf(&net, json!([]), Some(&ra), json!({}));
    portmap(&net, "CHECK", &a.id, Some(&a.ns.path_str()), &conf).ok_empty();
    chain_del(&net, &a, json!([]), &ra);
    assert!(!ruleset(&net.host).contains("inet ferry"));
}

/// Bad configurations are refused before any kernel work, with the spec's
/// codes and no panic (no namespace needed).
#[test]
fn config_refusals() {
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}],
        "ips": [{"interface": 0, "address": "10.9.0.2/24"}]});
    let m = |v: Value| json!({"runtimeConfig": {"portMappings": [v]}, "prevResult": prev});
    let ok = json!([{"hostPort": 1, "containerPort": 1}]);
    let cases = [
        (
            "no prevResult",
            json!({"runtimeConfig": {"portMappings": ok}}),
            7,
        ),
        (
            "hostPort 0",
            m(json!({"hostPort": 0, "containerPort": 1})),
            7,
        ),
        (
            "hostPort too big",
            m(json!({"hostPort": 70000, "containerPort": 1})),
            7,
        ),
        (
            "bad protocol",
            m(json!({"hostPort": 1, "containerPort": 1, "protocol": "icmp"})),
            7,
        ),
        (
            "bad hostIP",
            m(json!({"hostPort": 1, "containerPort": 1, "hostIP": "300.1.1.1"})),
            7,
        ),
        (
            "markMasqBit 40",
            json!({"markMasqBit": 40, "runtimeConfig": {"portMappings": ok}, "prevResult": prev}),
            7,
        ),
        (
            "externalSetMarkChain",
            json!({"externalSetMarkChain": "KUBE-MARK-MASQ", "runtimeConfig": {"portMappings": ok}, "prevResult": prev}),
            2,
        ),
        (
            "conditionsV4",
            json!({"conditionsV4": ["-s", "1.1.1.1"], "runtimeConfig": {"portMappings": ok}, "prevResult": prev}),
            2,
        ),
        (
            "portMappings not a list",
            json!({"runtimeConfig": {"portMappings": 5}, "prevResult": prev}),
            7,
        ),
        (
            "prevResult garbage",
            json!({"runtimeConfig": {"portMappings": ok}, "prevResult": {"ips": 3}}),
            6,
        ),
    ];
    for (name, extra, code) in cases {
        let mut conf = json!({"cniVersion": "1.0.0", "name": "pm", "type": "ferry-portmap"});
        for (k, v) in extra.as_object().unwrap() {
            conf[k] = v.clone();
        }
        let out = run_plugin(
            &bin("ferry-portmap"),
            "ADD",
            &[("CNI_NETNS", Some("/run/netns/ferry-test-unused"))],
            &conf.to_string(),
        );
        let e = out.err_json();
        assert_eq!(e["code"], code, "{name}: {out:?}");
        assert!(!out.stderr.contains("panicked"), "{name}: {out:?}");
    }
}
