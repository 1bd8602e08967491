//! ferry-bridge's `vlan` (with `preserveDefaultVlan` and the VLAN gateway)
//! and `macspoofchk`, executed as a runtime executes the plugin, in fake host
//! namespaces each test creates (see tests/bridge.rs for the layout).
//!
//! VLAN data-path tests need a kernel with bridge VLAN filtering
//! (CONFIG_BRIDGE_VLAN_FILTERING). Where it is missing they skip loudly, and
//! `vlan_without_kernel_support_fails_cleanly` checks the refusal and the
//! rollback instead: on every kernel exactly one side of the pair runs, so
//! the skip does not fail CI (whose machines share this kernel).

use ferry_tests::{BridgeNet, TestNetns, TestPod, host_veth_name, require_root};
use serde_json::{Value, json};
use std::io::Write;
use std::net::IpAddr;

/// A network whose bridge name leaves room for "<bridge>.<vlan>" (≤ 15).
fn short_net() -> BridgeNet {
    let mut net = BridgeNet::new(false);
    let n = ferry_tests::unique_index();
    net.bridge = format!("fo{}x{n}", std::process::id() % 10_000);
    net
}

fn conf_with(net: &BridgeNet, extra: Value) -> Value {
    let mut c = net.conf("1.1.0");
    for (k, v) in extra.as_object().expect("object") {
        c[k] = v.clone();
    }
    c
}

fn call(net: &BridgeNet, cmd: &str, pod: &TestPod, conf: &Value) -> ferry_tests::PluginOutput {
    net.call(cmd, &pod.id, Some(&pod.ns.path_str()), "eth0", conf)
}

fn add(net: &BridgeNet, pod: &TestPod, conf: &Value) -> Value {
    let out = call(net, "ADD", pod, conf);
    assert!(!out.stderr.contains("panicked"), "plugin panicked: {out:?}");
    out.ok_json()
}

fn check(
    net: &BridgeNet,
    pod: &TestPod,
    conf: &Value,
    result: &Value,
) -> ferry_tests::PluginOutput {
    let mut c = conf.clone();
    c["prevResult"] = result.clone();
    call(net, "CHECK", pod, &c)
}

fn ipv4(result: &Value) -> IpAddr {
    result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .find(|a: &IpAddr| a.is_ipv4())
        .expect("an IPv4 address")
}

/// `bridge -j vlan show dev <dev>` in `ns`: (vid, pvid, untagged), sorted.
fn port_vlans(ns: &TestNetns, dev: &str) -> Vec<(u64, bool, bool)> {
    let v: Value = serde_json::from_str(&ns.exec("bridge", &["-j", "vlan", "show", "dev", dev]))
        .expect("bridge -j prints JSON");
    let mut out = Vec::new();
    for port in v.as_array().into_iter().flatten() {
        for vl in port["vlans"].as_array().into_iter().flatten() {
            let flags: Vec<&str> = vl["flags"]
                .as_array()
                .map(|f| f.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            out.push((
                vl["vlan"].as_u64().expect("vlan id"),
                flags.contains(&"PVID"),
                flags.contains(&"Egress Untagged"),
            ));
        }
    }
    out.sort();
    out
}

/// Whether this kernel can filter VLANs on a bridge (tried in a scratch
/// namespace of the test's own).
fn vlan_filtering_supported() -> bool {
    let ns = TestNetns::new();
    ns.try_exec(
        "ip",
        &[
            "link",
            "add",
            "vfprobe",
            "type",
            "bridge",
            "vlan_filtering",
            "1",
        ],
    )
    .status
    .success()
}

/// A loud skip for a kernel feature this machine lacks. Unlike
/// `ferry_tests::skip` it does not fail under CI: the counterpart test checks
/// the behaviour on such a kernel.
fn kernel_lacks(why: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED: {} (kernel: {why}; its counterpart test runs instead) ***",
        std::thread::current().name().unwrap_or("?")
    );
}

fn nft_table(ns: &TestNetns) -> String {
    let out = ns.try_exec("nft", &["list", "table", "bridge", "ferry"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------- vlan

#[test]
fn vlan_isolates_pods_of_different_vlans() {
    if !require_root() {
        return;
    }
    if !vlan_filtering_supported() {
        kernel_lacks("no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)");
        return;
    }
    let net = short_net();
    let v100 = conf_with(&net, json!({"isGateway": false, "vlan": 100}));
    let v200 = conf_with(
        &net,
        json!({"isGateway": false, "vlan": 200, "preserveDefaultVlan": false}),
    );
    let (a, b, c) = (TestPod::new(), TestPod::new(), TestPod::new());
    let ra = add(&net, &a, &v100);
    let rb = add(&net, &b, &v100);
    let rc = add(&net, &c, &v200);

    let details = net
        .host
        .ip_json(&["-d", "link", "show", "dev", &net.bridge]);
    assert_eq!(
        details[0]["linkinfo"]["info_data"]["vlan_filtering"], 1,
        "{details}"
    );
    let (va, vc) = (host_veth_name(&a.id, "eth0"), host_veth_name(&c.id, "eth0"));
    // preserveDefaultVlan (default true) keeps VLAN 1, no longer the PVID.
    assert_eq!(
        port_vlans(&net.host, &va),
        vec![(1, false, true), (100, true, true)]
    );
    assert_eq!(port_vlans(&net.host, &vc), vec![(200, true, true)]);

    assert!(a.ns.ping(ipv4(&rb), 3), "vlan 100 -> vlan 100 must work");
    assert!(b.ns.ping(ipv4(&ra), 3), "vlan 100 -> vlan 100 must work");
    assert!(!a.ns.ping(ipv4(&rc), 2), "vlan 100 -> vlan 200 must not");
    assert!(!c.ns.ping(ipv4(&rb), 2), "vlan 200 -> vlan 100 must not");

    check(&net, &a, &v100, &ra).ok_empty();
    check(&net, &c, &v200, &rc).ok_empty();
    // CHECK sees a port that lost its VLAN.
    net.host
        .exec("bridge", &["vlan", "del", "dev", &va, "vid", "100"]);
    let e = check(&net, &a, &v100, &ra).err_json();
    assert_eq!(e["code"], 112, "{e}");
    assert!(e["msg"].as_str().unwrap().contains("VLAN 100"), "{e}");

    for (p, conf) in [(&a, &v100), (&b, &v100), (&c, &v200)] {
        call(&net, "DEL", p, conf).ok_empty();
    }
    assert!(net.host.bridge_ports(&net.bridge).is_empty());
}

#[test]
fn vlan_gateway_lives_on_bridge_dot_vlan() {
    if !require_root() {
        return;
    }
    if !vlan_filtering_supported() {
        kernel_lacks("no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)");
        return;
    }
    let net = short_net();
    let conf = conf_with(&net, json!({"vlan": 300}));
    let (a, b) = (TestPod::new(), TestPod::new());
    let ra = add(&net, &a, &conf);
    let rb = add(&net, &b, &conf);
    let gw_if = format!("{}.300", net.bridge);
    for r in [&ra, &rb] {
        let ifs = r["interfaces"].as_array().expect("interfaces");
        assert_eq!(ifs.len(), 4, "{r}");
        assert_eq!(ifs[3]["name"], gw_if.as_str(), "{r}");
    }
    let (gw4, gw6) = net.gateways();
    let on_gw = net
        .host
        .ip_json(&["addr", "show", "dev", &gw_if])
        .to_string();
    assert!(on_gw.contains(&gw4.to_string()), "{on_gw}");
    let on_br = net
        .host
        .ip_json(&["addr", "show", "dev", &net.bridge])
        .to_string();
    assert!(!on_br.contains(&gw4.to_string()), "{on_br}");
    // One gateway pair for the VLAN, its port an access port of VLAN 300.
    let gw_port = host_veth_name(&gw_if, "gateway");
    assert!(port_vlans(&net.host, &gw_port).contains(&(300, true, true)));
    assert!(a.ns.ping(gw4, 3) && b.ns.ping(gw6, 5));
    check(&net, &a, &conf, &ra).ok_empty();
    for p in [&a, &b] {
        call(&net, "DEL", p, &conf).ok_empty();
    }
}

#[test]
fn vlan_without_kernel_support_fails_cleanly() {
    if !require_root() {
        return;
    }
    if vlan_filtering_supported() {
        kernel_lacks("has bridge VLAN filtering, so the refusal path cannot be reached");
        return;
    }
    let net = short_net();
    let conf = conf_with(&net, json!({"vlan": 100}));
    let p = TestPod::new();
    let out = call(&net, "ADD", &p, &conf);
    let e = out.err_json();
    assert_eq!(e["code"], 2, "{e}");
    assert!(e["msg"].as_str().unwrap().contains("VLAN filtering"), "{e}");
    // Nothing of the pod stays: no veth, no reservation.
    assert!(p.ns.link("eth0").is_none());
    assert!(net.host.links_of_kind("veth").is_empty());
    assert!(net.reservations().is_empty(), "{:?}", net.reservations());
}

#[test]
fn vlan_config_refusals() {
    if !require_root() {
        return;
    }
    let net = short_net();
    let p = TestPod::new();
    for (extra, code) in [
        (json!({"vlan": 4095}), 2),
        (json!({"vlan": -3}), 2),
        (json!({"vlan": 5, "vlanTrunk": [{"id": 6}]}), 7),
    ] {
        let e = call(&net, "ADD", &p, &conf_with(&net, extra.clone())).err_json();
        assert_eq!(e["code"], code, "{extra}: {e}");
    }
    assert!(net.host.links_of_kind("bridge").is_empty());
}

// ---------------------------------------------------------- macspoofchk

#[test]
fn macspoofchk_drops_frames_from_a_changed_mac() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let on = conf_with(&net, json!({"macspoofchk": true}));
    let off = net.conf("1.1.0");
    let (a, b, c) = (TestPod::new(), TestPod::new(), TestPod::new());
    let ra = add(&net, &a, &on);
    let rb = add(&net, &b, &on);
    let rc = add(&net, &c, &off); // control: same bridge, no check
    let (ia, ib) = (ipv4(&ra), ipv4(&rb));
    assert!(a.ns.ping(ib, 3) && b.ns.ping(ia, 3) && c.ns.ping(ib, 3));

    let va = host_veth_name(&a.id, "eth0");
    let table = nft_table(&net.host);
    let mac_a = ra["interfaces"][2]["mac"].as_str().unwrap().to_string();
    assert!(
        table.contains(&format!("\"{va}\" : jump mac-{va}")),
        "{table}"
    );
    assert!(
        table.contains(&format!("ether saddr {mac_a} return")),
        "{table}"
    );
    check(&net, &a, &on, &ra).ok_empty();

    // Spoof: a and c change their MACs; neighbours forget the old ones.
    for p in [&a, &c] {
        p.ns.exec(
            "ip",
            &["link", "set", "dev", "eth0", "address", "02:fe:00:00:00:01"],
        );
        p.ns.exec("ip", &["neigh", "flush", "all"]);
    }
    b.ns.exec("ip", &["neigh", "flush", "all"]);
    assert!(!a.ns.ping(ib, 2), "a spoofed MAC must be dropped");
    assert!(c.ns.ping(ib, 3), "without macspoofchk a changed MAC works");
    // CHECK of a sees its interface no longer has the allowed MAC.
    let e = check(&net, &a, &on, &ra).err_json();
    assert_eq!(e["code"], 112, "{e}");

    // Back to its own MAC: through again (the rule, not a broken pod).
    a.ns.exec("ip", &["link", "set", "dev", "eth0", "address", &mac_a]);
    for p in [&a, &b] {
        p.ns.exec("ip", &["neigh", "flush", "all"]);
    }
    assert!(a.ns.ping(ib, 3));
    let _ = rc;
    for (p, conf) in [(&a, &on), (&b, &on), (&c, &off)] {
        call(&net, "DEL", p, conf).ok_empty();
    }
    let table = nft_table(&net.host);
    assert!(
        !table.contains("mac-veth") && !table.contains(": jump"),
        "{table}"
    );
}

#[test]
fn macspoofchk_del_leaves_nothing_also_without_netns() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let on = conf_with(&net, json!({"macspoofchk": true}));
    let (a, b) = (TestPod::new(), TestPod::new());
    let ra = add(&net, &a, &on);
    add(&net, &b, &on);
    let (va, vb) = (host_veth_name(&a.id, "eth0"), host_veth_name(&b.id, "eth0"));

    // CHECK notices the element removed behind its back.
    net.host.exec(
        "nft",
        &[
            "delete",
            "element",
            "bridge",
            "ferry",
            "spoofchk",
            &format!("{{ \"{va}\" }}"),
        ],
    );
    let e = check(&net, &a, &on, &ra).err_json();
    assert_eq!(e["code"], 112, "{e}");
    assert!(e["msg"].as_str().unwrap().contains("spoofchk"), "{e}");

    // DEL with the netns: a's chain (its element is already gone) goes.
    call(&net, "DEL", &a, &on).ok_empty();
    let t = nft_table(&net.host);
    assert!(!t.contains(&va) && t.contains(&vb), "{t}");

    // DEL after the netns is gone, knowing only (container ID, ifname).
    let id_b = b.id.clone();
    let path_b = b.ns.path_str();
    drop(b);
    net.call("DEL", &id_b, Some(&path_b), "eth0", &on)
        .ok_empty();
    let t = nft_table(&net.host);
    assert!(!t.contains(&vb), "{t}");
    assert!(!t.contains("mac-veth") && !t.contains(": jump"), "{t}");
    // Idempotent.
    net.call("DEL", &id_b, Some(&path_b), "eth0", &on)
        .ok_empty();
    call(&net, "DEL", &a, &on).ok_empty();
}

#[test]
fn macspoofchk_undone_when_add_fails_later() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let on = conf_with(&net, json!({"macspoofchk": true}));
    // A bridge holding another address of the subnet makes the gateway step
    // (after the macspoofchk step) fail without forceAddress.
    net.host
        .exec("ip", &["link", "add", &net.bridge, "type", "bridge"]);
    let other = net.subnet4.replace(".0/24", ".99/24");
    net.host
        .exec("ip", &["addr", "add", &other, "dev", &net.bridge]);
    let p = TestPod::new();
    let e = call(&net, "ADD", &p, &on).err_json();
    assert_eq!(e["code"], 111, "{e}");
    let t = nft_table(&net.host);
    let v = host_veth_name(&p.id, "eth0");
    assert!(!t.contains(&v), "undo left macspoofchk state: {t}");
    assert!(net.reservations().is_empty());
}
