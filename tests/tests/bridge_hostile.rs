//! ferry-bridge and ferry-bandwidth against a hostile or careless world
//! (issue 9): a network whose subnet or `ipMasqExclude` changes under
//! running pods, links whose hash-derived name another attachment holds, and
//! container IDs far longer than runtimes usually make.
//!
//! As in bridge.rs, every test builds its own fake host namespace (the
//! plugins run inside it), pod namespaces, unique names and subnets, and an
//! IPAM data dir; all of it goes away on drop, also when a test panics.

use ferry_tests::{
    BridgeNet, Outside, PluginOutput, TestPod, bin, host_veth_name, require_root, run_plugin_in,
    source_seen, store_leftovers, unique_index,
};
use serde_json::{Value, json};
use std::net::IpAddr;

const VERSION: &str = "1.1.0";

fn add(net: &BridgeNet, pod: &TestPod, conf: &Value) -> Value {
    let out = net.call("ADD", &pod.id, Some(&pod.path()), "eth0", conf);
    assert!(!out.stderr.contains("panicked"), "plugin panicked: {out:?}");
    out.ok_json()
}

fn check(net: &BridgeNet, pod: &TestPod, conf: &Value, prev: &Value) -> PluginOutput {
    let mut c = conf.clone();
    c["prevResult"] = prev.clone();
    net.call("CHECK", &pod.id, Some(&pod.path()), "eth0", &c)
}

fn del(net: &BridgeNet, pod: &TestPod, conf: &Value) {
    net.call("DEL", &pod.id, Some(&pod.path()), "eth0", conf)
        .ok_empty();
}

/// The pod's addresses in an ADD result, IPv4 first.
fn addresses(result: &Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .map(|ip| {
            let a = ip["address"].as_str().expect("address");
            a.split('/').next().unwrap().parse().expect("an address")
        })
        .collect()
}

/// Moves `net` to fresh subnets (what ferryd writes after re-leasing the
/// node's subnet), unique like BridgeNet's own.
fn move_to_new_subnets(net: &mut BridgeNet) {
    let i = unique_index();
    let a = 100 + std::process::id() % 100;
    // The second octet differs from BridgeNet's (100..199) so the two
    // never meet.
    let a2 = a + 50;
    net.subnet4 = format!("10.{a2}.{}.0/24", i % 256);
    net.subnet6 = format!("fd00:{a2:x}:{:x}::/64", i % 256);
}

/// A second address on the outside's uplink, in the uplink's /24: a
/// destination that no `ipMasqExclude` of these tests covers.
fn far_v4(out: &Outside) -> IpAddr {
    let IpAddr::V4(o) = out.out_v4 else {
        unreachable!()
    };
    let far: IpAddr = std::net::Ipv4Addr::from(u32::from(o) + 1).into();
    out.ns.exec(
        "ip",
        &["addr", "add", &format!("{far}/24"), "dev", "uplink"],
    );
    far
}

/// Item 4: the node's subnet is re-leased (subnet A -> B) and
/// `ipMasqExclude` changes. A pod on the new subnet must leave with the
/// node's address, except towards the newly excluded destination, and the
/// pod still on the old subnet must keep its masquerade. Before the fix the
/// network's chain existed, so nothing was programmed for subnet B: the
/// outside saw the pod's own address.
#[test]
fn masquerade_follows_a_subnet_and_exclude_change() {
    if !require_root() {
        return;
    }
    let mut net = BridgeNet::new(true);
    let out = Outside::new(&net);
    let far = far_v4(&out);

    let old_pod = TestPod::new();
    let old_conf = net.conf(VERSION);
    let old_ips = addresses(&add(&net, &old_pod, &old_conf));
    assert_eq!(source_seen(&old_pod.ns, &out.ns, far), out.host_v4);

    move_to_new_subnets(&mut net);
    // Routes back from the outside to the new subnet: without masquerade
    // the outside would see (and could answer) the pod's own address.
    out.route_back_to(&net);
    let mut new_conf = net.conf(VERSION);
    new_conf["ipMasqExclude"] = json!([format!("{}/32", out.out_v4)]);
    let new_pod = TestPod::new();
    let r = add(&net, &new_pod, &new_conf);
    let new_ips = addresses(&r);
    assert!(
        new_ips[0].to_string().starts_with(&net.subnet4[..6]),
        "{new_ips:?} in {}",
        net.subnet4
    );
    assert_eq!(
        source_seen(&new_pod.ns, &out.ns, far),
        out.host_v4,
        "IPv4 of a pod on the new subnet ({}) is masqueraded",
        new_ips[0]
    );
    assert_eq!(
        source_seen(&new_pod.ns, &out.ns, out.out_v6),
        out.host_v6,
        "IPv6 of a pod on the new subnet ({}) is masqueraded",
        new_ips[1]
    );
    assert_eq!(
        source_seen(&new_pod.ns, &out.ns, out.out_v4),
        new_ips[0],
        "the newly excluded destination sees the pod"
    );
    check(&net, &new_pod, &new_conf, &r).ok_empty();
    // The pod on the old subnet keeps its masquerade.
    assert_eq!(
        source_seen(&old_pod.ns, &out.ns, far),
        out.host_v4,
        "old pod ({}) still masqueraded",
        old_ips[0]
    );

    // Only the exclusion changes back: the next ADD reprograms the subnet.
    let third = TestPod::new();
    let r3 = add(&net, &third, &net.conf(VERSION));
    let ips3 = addresses(&r3);
    assert_eq!(
        source_seen(&third.ns, &out.ns, out.out_v4),
        out.host_v4,
        "no exclusion any more: {} masqueraded",
        ips3[0]
    );
    check(&net, &third, &net.conf(VERSION), &r3).ok_empty();
    // The state that served the second configuration is gone, not leaked.
    let table = net.host.exec("nft", &["list", "table", "inet", "ferry"]);
    assert!(!table.contains(&out.out_v4.to_string()), "{table}");

    del(&net, &third, &net.conf(VERSION));
    del(&net, &new_pod, &new_conf);
    del(&net, &old_pod, &old_conf);
    assert!(net.reservations().is_empty());
}

/// Item 4: CHECK fails when the pod's subnet is not masqueraded although
/// the network's chain exists (before the fix CHECK only looked the chain
/// up), and names the subnet.
#[test]
fn check_fails_when_the_pod_subnet_is_not_masqueraded() {
    if !require_root() {
        return;
    }
    for family in [4, 6] {
        let net = BridgeNet::new(true);
        let conf = net.conf(VERSION);
        let pod = TestPod::new();
        let r = add(&net, &pod, &conf);
        check(&net, &pod, &conf, &r).ok_empty();
        let (map, subnet) = if family == 4 {
            ("masq-v4", &net.subnet4)
        } else {
            ("masq-v6", &net.subnet6)
        };
        let element = format!("{{ {subnet} }}");
        net.host.exec(
            "nft",
            &["delete", "element", "inet", "ferry", map, &element],
        );
        let e = check(&net, &pod, &conf, &r).err_json();
        assert_eq!(e["code"], 110, "{e}");
        assert!(
            e["msg"].as_str().unwrap().contains(subnet.as_str()),
            "names {subnet}: {e}"
        );
        del(&net, &pod, &conf);
    }
}

/// Item 4: CHECK of a pod under a changed `ipMasqExclude` says the pod's
/// subnet is masqueraded by another configuration's chain.
#[test]
fn check_fails_when_the_exclusions_changed_since_add() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(true);
    let conf = net.conf(VERSION);
    let pod = TestPod::new();
    let r = add(&net, &pod, &conf);
    let mut changed = conf.clone();
    changed["ipMasqExclude"] = json!(["198.51.100.0/24"]);
    let e = check(&net, &pod, &changed, &r).err_json();
    assert_eq!(e["code"], 110, "{e}");
    // An ADD under the new configuration moves the subnet; then the pod's
    // CHECK under it passes.
    let other = TestPod::new();
    add(&net, &other, &changed);
    check(&net, &pod, &changed, &r).ok_empty();
    del(&net, &other, &changed);
    del(&net, &pod, &conf);
}

/// ferry-bandwidth's ifb name: "bwp" + 12 hex digits of FNV-1a over
/// `network \0 container ID \0 ifname` (restated, like host_veth_name).
fn ifb_name(network: &str, container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    let bytes = network
        .bytes()
        .chain([0])
        .chain(container_id.bytes())
        .chain([0])
        .chain(ifname.bytes());
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("bwp{:012x}", h & 0xffff_ffff_ffff)
}

/// The ifindex and alias of link `name` in the fake host.
fn index_and_alias(net: &BridgeNet, name: &str) -> Option<(u32, Option<String>)> {
    net.host.link(name).map(|l| (l.index, l.alias))
}

/// Item 5: a link that holds the name the attacker container's host veth
/// would get, but belongs to somebody else (here made by hand, once with
/// another pod's owner alias and once with none): ADD of the attacker fails
/// with a clear error and undoes itself, DEL of the attacker succeeds, and
/// the victim link is untouched throughout. Before the fix ADD deleted it.
#[test]
fn veth_name_collision_never_touches_the_other_link() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(true);
    let conf = net.conf(VERSION);
    for victim_alias in [Some("ferry-bridge:pods/eth0/victim"), None] {
        let attacker = TestPod::new();
        let name = host_veth_name(&attacker.id, "eth0");
        let peer = format!("vp{}", unique_index());
        net.host.exec(
            "ip",
            &["link", "add", &name, "type", "veth", "peer", "name", &peer],
        );
        if let Some(a) = victim_alias {
            net.host.exec("ip", &["link", "set", &name, "alias", a]);
        }
        let before = index_and_alias(&net, &name).expect("victim link");

        let out = net.call("ADD", &attacker.id, Some(&attacker.path()), "eth0", &conf);
        let e = out.err_json();
        assert_eq!(e["code"], 113, "{e}");
        assert!(e["msg"].as_str().unwrap().contains(&name), "{e}");
        assert_eq!(index_and_alias(&net, &name), Some(before.clone()));
        assert!(attacker.ns.link("eth0").is_none(), "ADD undone in the pod");
        assert!(net.reservations().is_empty(), "ADD released its address");

        del(&net, &attacker, &conf);
        assert_eq!(
            index_and_alias(&net, &name),
            Some(before),
            "DEL left the victim alone"
        );
        net.host.exec("ip", &["link", "del", &name]);
    }
}

/// Item 5 with real pods: the same container ID and ifname in a second
/// network on the same bridge draw the same host veth name as the first
/// network's pod. ADD in the second network must not take the first pod's
/// veth, DEL there must not delete it, CHECK there must not accept it; the
/// first pod keeps working.
#[test]
fn same_veth_name_in_another_network_is_left_alone() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(true);
    let conf = net.conf(VERSION);
    let victim = TestPod::new();
    let r = add(&net, &victim, &conf);
    let veth = host_veth_name(&victim.id, "eth0");
    let before = index_and_alias(&net, &veth).expect("victim veth");
    assert_eq!(
        before.1.as_deref(),
        Some(format!("ferry-bridge:{}/eth0/{}", net.name, victim.id).as_str()),
        "ADD records the owner"
    );

    let mut other = conf.clone();
    other["name"] = json!(format!("{}-other", net.name));
    let intruder = TestPod {
        ns: ferry_tests::TestNetns::new(),
        id: victim.id.clone(),
    };
    let e = net
        .call("ADD", &intruder.id, Some(&intruder.path()), "eth0", &other)
        .err_json();
    assert_eq!(e["code"], 113, "{e}");
    let e = check(&net, &victim, &other, &r).err_json();
    assert!(
        e["msg"].as_str().unwrap().contains("not this attachment"),
        "{e}"
    );
    net.call("DEL", &intruder.id, Some(&intruder.path()), "eth0", &other)
        .ok_empty();
    assert_eq!(index_and_alias(&net, &veth), Some(before));
    check(&net, &victim, &conf, &r).ok_empty();
    let (gw4, _) = net.gateways();
    assert!(victim.ns.ping(gw4, 5), "victim still reaches its gateway");
    del(&net, &victim, &conf);
    assert!(net.host.link(&veth).is_none());
}

/// Item 5: CHECK fails on a host veth whose owner alias is not the pod's.
#[test]
fn check_fails_when_the_host_veth_has_another_owner() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let conf = net.conf(VERSION);
    let pod = TestPod::new();
    let r = add(&net, &pod, &conf);
    check(&net, &pod, &conf, &r).ok_empty();
    let veth = host_veth_name(&pod.id, "eth0");
    net.host
        .exec("ip", &["link", "set", &veth, "alias", "someone-else"]);
    let e = check(&net, &pod, &conf, &r).err_json();
    assert_eq!(e["code"], 112, "{e}");
    assert!(e["msg"].as_str().unwrap().contains(&veth), "{e}");
    // DEL leaves a link it does not own: the pod's end goes with the netns.
    del(&net, &pod, &conf);
    assert!(net.host.link(&veth).is_some());
    net.host.exec("ip", &["link", "del", &veth]);
}

fn bw_conf(net: &BridgeNet, prev: Option<&Value>) -> Value {
    let mut c = json!({
        "cniVersion": VERSION, "name": net.name, "type": "ferry-bandwidth",
        "runtimeConfig": {"bandwidth": {
            "ingressRate": 10_000_000, "ingressBurst": 100_000,
            "egressRate": 10_000_000, "egressBurst": 100_000,
        }},
    });
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    c
}

fn bw(net: &BridgeNet, cmd: &str, pod: &TestPod, conf: &Value) -> PluginOutput {
    let path = pod.path();
    run_plugin_in(
        &net.host,
        &bin("ferry-bandwidth"),
        cmd,
        &[
            ("CNI_CONTAINERID", Some(&pod.id)),
            ("CNI_NETNS", Some(&path)),
            ("CNI_IFNAME", Some("eth0")),
        ],
        &conf.to_string(),
    )
}

/// Item 5 for ferry-bandwidth: an ifb with the attacker's ifb name but
/// another owner (made by hand, with a qdisc of its own). The attacker's
/// ADD fails with code 102 and undoes its veth qdiscs, DEL succeeds, and
/// the victim ifb keeps its index and its qdisc. Before the fix ADD reused
/// it (and its undo or the DEL deleted it).
#[test]
fn ifb_name_collision_never_touches_the_other_ifb() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let conf = net.conf(VERSION);
    let attacker = TestPod::new();
    let prev = add(&net, &attacker, &conf);
    let ifb = ifb_name(&net.name, &attacker.id, "eth0");
    net.host.exec("ip", &["link", "add", &ifb, "type", "ifb"]);
    net.host.exec(
        "ip",
        &[
            "link",
            "set",
            &ifb,
            "alias",
            "ferry-bandwidth:x/eth0/victim",
        ],
    );
    net.host.exec(
        "tc",
        &[
            "qdisc", "add", "dev", &ifb, "root", "handle", "7:", "tbf", "rate", "1mbit", "burst",
            "10kb", "latency", "50ms",
        ],
    );
    let before = index_and_alias(&net, &ifb).expect("victim ifb");
    let qdisc = net.host.exec("tc", &["qdisc", "show", "dev", &ifb]);

    let e = bw(&net, "ADD", &attacker, &bw_conf(&net, Some(&prev))).err_json();
    assert_eq!(e["code"], 102, "{e}");
    assert!(e["msg"].as_str().unwrap().contains(&ifb), "{e}");
    assert_eq!(index_and_alias(&net, &ifb), Some(before.clone()));
    assert_eq!(net.host.exec("tc", &["qdisc", "show", "dev", &ifb]), qdisc);
    let veth = host_veth_name(&attacker.id, "eth0");
    let veth_qdiscs = net.host.exec("tc", &["qdisc", "show", "dev", &veth]);
    assert!(
        !veth_qdiscs.contains("tbf") && !veth_qdiscs.contains("ingress"),
        "ADD undone on the veth: {veth_qdiscs}"
    );

    let e = bw(&net, "CHECK", &attacker, &bw_conf(&net, Some(&prev))).err_json();
    assert_eq!(e["code"], 101, "{e}");
    bw(&net, "DEL", &attacker, &bw_conf(&net, None)).ok_empty();
    assert_eq!(index_and_alias(&net, &ifb), Some(before));
    assert_eq!(net.host.exec("tc", &["qdisc", "show", "dev", &ifb]), qdisc);
    del(&net, &attacker, &conf);
    net.host.exec("ip", &["link", "del", &ifb]);
}

/// A container ID of `len` characters, unique to this test process.
fn long_id(len: usize) -> String {
    let mut id = ferry_tests::container_id();
    while id.len() < len {
        id.push_str("-0123456789abcdef");
    }
    id.truncate(len);
    id
}

/// Item 15 (bridge and bandwidth): 300- and 1000-character container IDs
/// work through ADD, CHECK, DEL and GC of ferry-bridge and ADD, CHECK, DEL
/// of ferry-bandwidth, and leave nothing behind. `ipam` is the IPAM plugin
/// under the bridge; GC is CNI 1.1.0, which Debian's host-local lacks.
fn long_container_ids(ipam: &str, version: &str) {
    let mut net = BridgeNet::new(true);
    net.ipam_type = ipam.to_string();
    let conf = net.conf(version);
    let with_gc = version >= "1.1.0";
    for len in [300, 1000] {
        let pod = TestPod {
            ns: ferry_tests::TestNetns::new(),
            id: long_id(len),
        };
        let r = add(&net, &pod, &conf);
        let veth = host_veth_name(&pod.id, "eth0");
        let alias = net.host.link(&veth).and_then(|l| l.alias).expect("alias");
        assert!(
            alias.len() <= 255 && alias.starts_with("ferry-bridge:sha256:"),
            "{alias}"
        );
        check(&net, &pod, &conf, &r).ok_empty();
        let mut bwc = bw_conf(&net, Some(&r));
        bwc["cniVersion"] = json!(version);
        bw(&net, "ADD", &pod, &bwc).ok_json();
        bw(&net, "CHECK", &pod, &bwc).ok_empty();
        let ifb = ifb_name(&net.name, &pod.id, "eth0");
        assert!(net.host.link(&ifb).is_some());

        // GC keeps a valid attachment with a long ID…
        let mut gc = conf.clone();
        gc["cni.dev/valid-attachments"] = json!([{"containerID": pod.id, "ifname": "eth0"}]);
        let gc_call = |gc: &Value| {
            run_plugin_in(
                &net.host,
                &net.plugin,
                "GC",
                &[
                    ("CNI_CONTAINERID", None),
                    ("CNI_NETNS", None),
                    ("CNI_IFNAME", None),
                ],
                &gc.to_string(),
            )
        };
        if with_gc {
            gc_call(&gc).ok_empty();
            assert_eq!(net.reservations().len(), 2, "GC kept the valid attachment");
            check(&net, &pod, &conf, &r).ok_empty();
        }

        bwc.as_object_mut().unwrap().remove("prevResult");
        bw(&net, "DEL", &pod, &bwc).ok_empty();
        assert!(net.host.link(&ifb).is_none());
        del(&net, &pod, &conf);
        assert!(net.host.link(&veth).is_none());
        assert!(net.reservations().is_empty());
        // …and a GC after it is a no-op.
        if with_gc {
            gc["cni.dev/valid-attachments"] = json!([]);
            gc_call(&gc).ok_empty();
        }
    }
    assert_eq!(store_leftovers(&net.store_dir()), Vec::<String>::new());
}

/// Item 15 for ferry-bridge and ferry-bandwidth themselves, on the
/// reference host-local IPAM (which keeps IDs in file contents): ADD,
/// CHECK, DEL (host-local has no GC).
#[test]
fn long_container_ids_work_through_every_command() {
    if !require_root() {
        return;
    }
    long_container_ids("host-local", "1.0.0");
}

/// The same on ferry-ipam, with GC (its store once failed with ENAMETOOLONG
/// for a file named after the container ID).
#[test]
fn long_container_ids_work_through_every_command_on_ferry_ipam() {
    if !require_root() {
        return;
    }
    long_container_ids("ferry-ipam", "1.1.0");
}

/// The MAC ferry gives a link of `owner` parts (role, network, ifname,
/// container ID) at creation: 46 bits of their SHA-256, locally
/// administered unicast (computed with coreutils' sha256sum).
fn owner_mac(parts: [&str; 4]) -> String {
    let mut cmd = std::process::Command::new("sha256sum");
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("sha256sum");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(parts.join("\0").as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let hex = String::from_utf8(out.stdout).unwrap();
    let b: Vec<u8> = (0..6)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let first = (b[0] & 0xfc) | 0x02;
    format!(
        "{first:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[1], b[2], b[3], b[4], b[5]
    )
}

/// An ADD stopped between creating the ifb and setting its alias leaves an
/// ifb without an alias but with the owner's MAC: the retried ADD takes it
/// over, and DEL removes it (an ifb would otherwise outlive the pod). One
/// with another MAC and no alias is somebody else's and refused.
#[test]
fn ifb_left_by_an_interrupted_add_is_recognised_by_its_mac() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let conf = net.conf(VERSION);
    let pod = TestPod::new();
    let prev = add(&net, &pod, &conf);
    let ifb = ifb_name(&net.name, &pod.id, "eth0");

    net.host.exec(
        "ip",
        &[
            "link",
            "add",
            &ifb,
            "address",
            "02:00:00:00:00:01",
            "type",
            "ifb",
        ],
    );
    let e = bw(&net, "ADD", &pod, &bw_conf(&net, Some(&prev))).err_json();
    assert_eq!(e["code"], 102, "{e}");
    assert!(net.host.link(&ifb).is_some(), "the foreign ifb stays");
    bw(&net, "DEL", &pod, &bw_conf(&net, None)).ok_empty();
    assert!(net.host.link(&ifb).is_some(), "the foreign ifb stays");
    net.host.exec("ip", &["link", "del", &ifb]);

    let mac = owner_mac(["ferry-bandwidth", &net.name, "eth0", &pod.id]);
    net.host
        .exec("ip", &["link", "add", &ifb, "address", &mac, "type", "ifb"]);
    bw(&net, "ADD", &pod, &bw_conf(&net, Some(&prev))).ok_json();
    let link = net.host.link(&ifb).expect("ifb");
    assert_eq!(
        link.alias.as_deref(),
        Some(format!("ferry-bandwidth:{}/eth0/{}", net.name, pod.id).as_str())
    );
    bw(&net, "CHECK", &pod, &bw_conf(&net, Some(&prev))).ok_empty();
    bw(&net, "DEL", &pod, &bw_conf(&net, None)).ok_empty();
    assert!(net.host.link(&ifb).is_none(), "DEL removed it");
    del(&net, &pod, &conf);
}

/// ferry-bandwidth given another pod's ADD result as prevResult (a stale or
/// wrong one) refuses to shape that pod's veth, which ferry-bridge's owner
/// alias names as another attachment's.
#[test]
fn bandwidth_never_shapes_another_attachments_veth() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let conf = net.conf(VERSION);
    let victim = TestPod::new();
    let victim_result = add(&net, &victim, &conf);
    let other = TestPod::new();
    let e = bw(&net, "ADD", &other, &bw_conf(&net, Some(&victim_result))).err_json();
    assert_eq!(e["code"], 100, "{e}");
    let veth = host_veth_name(&victim.id, "eth0");
    let qdiscs = net.host.exec("tc", &["qdisc", "show", "dev", &veth]);
    assert!(
        !qdiscs.contains("tbf") && !qdiscs.contains("ingress"),
        "{qdiscs}"
    );
    assert!(net.host.links_of_kind("ifb").is_empty());
    bw(&net, "DEL", &other, &bw_conf(&net, None)).ok_empty();
    del(&net, &victim, &conf);
}

/// CHECK fails when the masquerade rules are gone although every chain and
/// element is there: the network's chain flushed, or the base chain.
#[test]
fn check_fails_when_the_masquerade_rules_are_flushed() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(true);
    let conf = net.conf(VERSION);
    let pod = TestPod::new();
    let r = add(&net, &pod, &conf);
    check(&net, &pod, &conf, &r).ok_empty();
    let table = net.host.exec("nft", &["list", "table", "inet", "ferry"]);
    let prefix = format!("chain net-{}-", net.name);
    let chain = table
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&prefix))
        .map(|l| l["chain ".len()..].trim_end_matches(" {").to_string())
        .unwrap_or_else(|| panic!("no {prefix}… in {table}"));
    for flushed in [chain.as_str(), "postrouting"] {
        net.host
            .exec("nft", &["flush", "chain", "inet", "ferry", flushed]);
        let e = check(&net, &pod, &conf, &r).err_json();
        assert_eq!(e["code"], 110, "{flushed}: {e}");
        assert!(e["msg"].as_str().unwrap().contains(flushed), "{e}");
        // Put it back the way ferry does: remove the table, ADD again.
        net.host.exec("nft", &["delete", "table", "inet", "ferry"]);
        let again = TestPod::new();
        add(&net, &again, &conf);
        check(&net, &pod, &conf, &r).ok_empty();
        del(&net, &again, &conf);
    }
    del(&net, &pod, &conf);
}

/// `promiscMode` turned on for a network whose bridge already exists
/// reaches the bridge (the reference sets it on every ADD; ferry applied it
/// only when creating the bridge).
#[test]
fn promisc_mode_reaches_an_existing_bridge() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let conf = net.conf(VERSION);
    let first = TestPod::new();
    add(&net, &first, &conf);
    assert!(!net.host.link(&net.bridge).expect("bridge").promisc);
    let mut promisc = conf.clone();
    promisc["promiscMode"] = json!(true);
    let second = TestPod::new();
    add(&net, &second, &promisc);
    assert!(net.host.link(&net.bridge).expect("bridge").promisc);
    del(&net, &second, &promisc);
    del(&net, &first, &conf);
}

/// A chain that loses one of its subnets to another configuration but still
/// serves the other (here: a v4-only configuration of a dual-stack network)
/// is retired, not deleted: the dual-stack pod's IPv6 stays masqueraded, and
/// the next dual-stack ADD rebuilds its configuration's chain and cleans up
/// both the retired chain and the v4-only one.
#[test]
fn a_chain_still_serving_another_subnet_is_retired_not_deleted() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(true);
    let out = Outside::new(&net);
    let dual = net.conf(VERSION);
    let mut v4_only = dual.clone();
    v4_only["ipam"]["ranges"] = json!([[{"subnet": net.subnet4}]]);
    v4_only["ipam"]["routes"] = json!([{"dst": "0.0.0.0/0"}]);

    let first = TestPod::new();
    add(&net, &first, &dual);
    let second = TestPod::new();
    add(&net, &second, &v4_only);
    let table = net.host.exec("nft", &["list", "table", "inet", "ferry"]);
    assert!(table.contains("chain net-retired-"), "{table}");
    assert_eq!(source_seen(&first.ns, &out.ns, out.out_v6), out.host_v6);
    assert_eq!(source_seen(&first.ns, &out.ns, out.out_v4), out.host_v4);
    assert_eq!(source_seen(&second.ns, &out.ns, out.out_v4), out.host_v4);

    let third = TestPod::new();
    let r3 = add(&net, &third, &dual);
    check(&net, &third, &dual, &r3).ok_empty();
    let table = net.host.exec("nft", &["list", "table", "inet", "ferry"]);
    let chains: Vec<&str> = table
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("chain net-"))
        .collect();
    assert_eq!(
        chains.len(),
        1,
        "only the dual-stack chain is left: {table}"
    );
    assert_eq!(source_seen(&first.ns, &out.ns, out.out_v6), out.host_v6);
    assert_eq!(source_seen(&second.ns, &out.ns, out.out_v4), out.host_v4);
    del(&net, &third, &dual);
    del(&net, &second, &v4_only);
    del(&net, &first, &dual);
}

/// `ipMasq` turned off for a network that had it: the next ADD takes the
/// subnet out of the masquerade (before, the element stayed and every pod of
/// the subnet kept leaving with the node's address).
#[test]
fn masquerade_turned_off_is_applied() {
    if !require_root() {
        return;
    }
    let mut net = BridgeNet::new(true);
    let out = Outside::new(&net);
    out.route_back_to(&net);
    let on = net.conf(VERSION);
    let first = TestPod::new();
    add(&net, &first, &on);
    assert_eq!(source_seen(&first.ns, &out.ns, out.out_v4), out.host_v4);

    net.ip_masq = false;
    let off = net.conf(VERSION);
    let second = TestPod::new();
    let ips = addresses(&add(&net, &second, &off));
    assert_eq!(source_seen(&second.ns, &out.ns, out.out_v4), ips[0]);
    assert_eq!(source_seen(&second.ns, &out.ns, out.out_v6), ips[1]);
    let table = net.host.exec("nft", &["list", "table", "inet", "ferry"]);
    assert!(!table.contains("chain net-"), "{table}");
    del(&net, &second, &off);
    del(&net, &first, &on);
}

/// An ADD stopped between creating the veth pair and setting the host end's
/// alias leaves a veth without an alias but with the owner's MAC: DEL
/// removes it, and a retried ADD replaces it.
#[test]
fn veth_left_by_an_interrupted_add_is_recognised_by_its_mac() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let conf = net.conf(VERSION);
    for then_add in [false, true] {
        let pod = TestPod::new();
        let name = host_veth_name(&pod.id, "eth0");
        let mac = owner_mac(["ferry-bridge", &net.name, "eth0", &pod.id]);
        net.host.exec(
            "ip",
            &[
                "link",
                "add",
                &name,
                "address",
                &mac,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &pod.path(),
            ],
        );
        if then_add {
            let r = add(&net, &pod, &conf);
            check(&net, &pod, &conf, &r).ok_empty();
            let l = net.host.link(&name).expect("the new veth");
            assert!(l.alias.is_some(), "{l:?}");
        }
        del(&net, &pod, &conf);
        assert!(net.host.link(&name).is_none(), "DEL removed the veth");
        assert!(pod.ns.link("eth0").is_none());
    }
}
