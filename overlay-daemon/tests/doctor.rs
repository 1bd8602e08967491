//! `ferryd doctor` against a lab of real nodes (namespaces, real etcd,
//! ferryd per node): a healthy node is all OK; each operator's mistake,
//! made by hand with ip/bridge/nft/sysctl, is named and exits 1; restored,
//! the node is OK again.
//!
//! ferryd repairs drift within milliseconds, so the breaks are made while
//! node n1's ferryd is stopped (doctor must then say so and still check
//! everything else), which keeps each assertion deterministic. Restores
//! that ferryd owns (routes, device, files, lease) are done by starting it,
//! waiting until doctor finds the node healthy, and stopping it again.

use ferry_tests::etcd::require_etcd;
use ferry_tests::lab::{Lab, etcd_endpoint};
use ferry_tests::{bin, in_netns_cmd, require_root, wait_until};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VXLAN: &str =
    r#"{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan","vni":1}}"#;
const READY: Duration = Duration::from_secs(30);

fn can_run() -> bool {
    require_root() && require_etcd()
}

struct Doctor {
    code: i32,
    checks: BTreeMap<String, (String, String)>,
    raw: String,
}

impl Doctor {
    fn status(&self, name: &str) -> &str {
        self.checks
            .get(name)
            .map(|(s, _)| s.as_str())
            .unwrap_or_else(|| panic!("no check {name} in\n{}", self.raw))
    }
    fn detail(&self, name: &str) -> &str {
        &self.checks[name].1
    }
    /// Checks that are not OK, other than those listed.
    fn not_ok_except(&self, except: &[&str]) -> Vec<String> {
        self.checks
            .iter()
            .filter(|(n, (s, _))| s != "OK" && !except.contains(&n.as_str()))
            .map(|(n, (s, d))| format!("{n} {s}: {d}"))
            .collect()
    }
}

/// `ferryd <node flags> doctor --json [extra]` inside node `i`.
fn doctor(lab: &Lab, i: usize, extra: &[&str]) -> Doctor {
    let mut cmd = lab.nodes[i].ferryd_command();
    cmd.args(["doctor", "--json"])
        .args(extra)
        .stdin(Stdio::null());
    let started = Instant::now();
    let out = cmd.output().expect("run ferryd doctor");
    let took = started.elapsed();
    let raw = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}):\n{raw}"));
    let checks = v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            for k in ["name", "status", "detail", "hint"] {
                assert!(c[k].is_string(), "field {k} in {c}");
            }
            (
                c["name"].as_str().unwrap().to_string(),
                (
                    c["status"].as_str().unwrap().to_string(),
                    c["detail"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect();
    // Not a performance assertion: a hung check would show here first.
    assert!(took < Duration::from_secs(10), "doctor took {took:?}");
    Doctor {
        code: out.status.code().unwrap_or(-1),
        checks,
        raw,
    }
}

fn subnet_of(lab: &Lab, i: usize) -> String {
    let gw = lab.node_subnet(i).expect("subnet.env written");
    let (ip, len) = gw.split_once('/').unwrap();
    let mut octets: Vec<&str> = ip.split('.').collect();
    octets[3] = "0";
    format!("{}/{len}", octets.join("."))
}

/// The lab node n1 with its ferryd stopped: every check but `ferryd` OK.
fn assert_healthy_but_stopped(lab: &Lab, what: &str) {
    let d = doctor(lab, 0, &[]);
    let bad = d.not_ok_except(&["ferryd"]);
    assert!(bad.is_empty(), "after restoring {what}: {bad:?}\n{}", d.raw);
    assert_eq!(d.status("ferryd"), "FAIL", "{}", d.raw);
    assert_eq!(d.code, 1, "ferryd is down: a FAIL");
}

/// Starts n1's ferryd, waits until doctor finds every check OK, stops it.
fn repair_with_ferryd(lab: &mut Lab, what: &str) {
    lab.start_ferryd(0);
    let healthy = wait_until(READY, || {
        let d = doctor(lab, 0, &[]);
        d.code == 0 && d.not_ok_except(&[]).is_empty()
    });
    assert!(
        healthy,
        "ferryd did not repair {what}:\n{}\n{}",
        doctor(lab, 0, &[]).raw,
        lab.ferryd_log(0)
    );
    lab.stop_ferryd(0, Signal::SIGTERM);
}

/// Asserts doctor names `check` as FAIL (with `needle` in its detail) and exits 1.
fn assert_names(lab: &Lab, what: &str, check: &str, needle: &str) {
    let d = doctor(lab, 0, &[]);
    assert_eq!(d.code, 1, "{what}: exit 1\n{}", d.raw);
    assert_eq!(d.status(check), "FAIL", "{what}: {check} FAIL\n{}", d.raw);
    assert!(
        d.detail(check).contains(needle),
        "{what}: {check} detail should name {needle:?}: {}",
        d.detail(check)
    );
}

/// Waits until node `i` has a ferry route to each of its `peers`: a node
/// that has not yet seen the others' leases is "ready" with fewer peers.
fn wait_peers_programmed(lab: &Lab, i: usize, peers: usize) {
    assert!(
        wait_until(READY, || {
            lab.nodes[i]
                .ns
                .exec("ip", &["-4", "route", "show", "proto", "70"])
                .lines()
                .count()
                == peers
        }),
        "node {i} never programmed its {peers} peers"
    );
}

fn sh(lab: &Lab, program: &str, args: &[&str]) -> String {
    lab.nodes[0].ns.exec(program, args)
}

#[test]
fn doctor_is_all_ok_on_a_healthy_node_and_names_each_break() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new(VXLAN);
    lab.ferryd_args = vec!["--resync-interval".into(), "1".into()];
    for _ in 0..3 {
        lab.add_node();
    }
    lab.assert_all_ready(READY);
    for i in 0..3 {
        lab.add_pod(i);
    }
    wait_peers_programmed(&lab, 0, 2);

    // Healthy: all OK, exit 0, --json with the stable fields.
    let d = doctor(&lab, 0, &[]);
    assert!(d.not_ok_except(&[]).is_empty(), "{}", d.raw);
    assert_eq!(d.code, 0, "{}", d.raw);
    for name in [
        "etcd",
        "lease",
        "files.subnet_env",
        "files.conflist",
        "ferryd",
        "overlay.device",
        "peers.routes",
        "peers.neighbours",
        "peers.fdb",
        "routes.stale",
        "routes.foreign",
        "sysctl.ip_forward",
        "sysctl.rp_filter",
        "sysctl.br_netfilter",
        "bridge",
        "pods",
        "nft.masquerade",
        "nft.hostports",
        "pitfall.underlay_mtu",
        "pitfall.vxlan_csum",
        "cni.log",
    ] {
        assert_eq!(d.status(name), "OK", "{name}\n{}", d.raw);
    }
    assert!(d.detail("peers.routes").contains("2 of 2"), "{}", d.raw);
    // The checksum offload setting is read from the kernel (on by default).
    assert!(
        d.detail("pitfall.vxlan_csum")
            .contains("offloads TX checksums"),
        "{}",
        d.raw
    );

    // br_netfilter loaded (a host module: only then): a pod port without
    // hairpin is named, as a WARN (exit 0).
    if std::path::Path::new("/proc/sys/net/bridge").exists() {
        let ports = lab.nodes[0].ns.ip_json(&["link", "show", "master", "cni0"]);
        let veth = ports[0]["ifname"]
            .as_str()
            .expect("the pod's veth")
            .to_string();
        sh(
            &lab,
            "ip",
            &[
                "link",
                "set",
                &veth,
                "type",
                "bridge_slave",
                "hairpin",
                "off",
            ],
        );
        let d = doctor(&lab, 0, &[]);
        assert_eq!(d.status("sysctl.br_netfilter"), "WARN", "{}", d.raw);
        assert!(d.detail("sysctl.br_netfilter").contains(&veth), "{}", d.raw);
        assert_eq!(d.code, 0, "a WARN is not a FAIL");
        sh(
            &lab,
            "ip",
            &[
                "link",
                "set",
                &veth,
                "type",
                "bridge_slave",
                "hairpin",
                "on",
            ],
        );
        assert_eq!(doctor(&lab, 0, &[]).status("sysctl.br_netfilter"), "OK");
    }

    // ferryd stopped: doctor says so, and checks everything else.
    lab.stop_ferryd(0, Signal::SIGTERM);
    assert_names(&lab, "ferryd stopped", "ferryd", "not running");
    assert_healthy_but_stopped(&lab, "nothing");

    let peer = subnet_of(&lab, 1);
    let peer_gw0 = peer.split('/').next().unwrap().to_string();
    let peer_ip = lab.nodes[1].ip.to_string();

    // 1. A peer route deleted.
    sh(&lab, "ip", &["route", "del", &peer]);
    assert_names(&lab, "route deleted", "peers.routes", &peer);
    sh(
        &lab,
        "ip",
        &[
            "route", "add", &peer, "via", &peer_gw0, "dev", "ferry.1", "onlink", "proto", "70",
        ],
    );
    assert_healthy_but_stopped(&lab, "the route");

    // 2. An fdb entry deleted.
    let fdb = sh(&lab, "bridge", &["-j", "fdb", "show", "dev", "ferry.1"]);
    let fdb: Value = serde_json::from_str(&fdb).unwrap();
    let mac = fdb
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["dst"] == peer_ip.as_str())
        .and_then(|e| e["mac"].as_str())
        .expect("fdb entry of n2")
        .to_string();
    sh(
        &lab,
        "bridge",
        &["fdb", "del", &mac, "dev", "ferry.1", "dst", &peer_ip],
    );
    assert_names(&lab, "fdb deleted", "peers.fdb", &peer_ip);
    sh(
        &lab,
        "bridge",
        &[
            "fdb",
            "append",
            &mac,
            "dev",
            "ferry.1",
            "dst",
            &peer_ip,
            "self",
            "permanent",
        ],
    );
    assert_healthy_but_stopped(&lab, "the fdb entry");

    // 3. A neighbour entry changed.
    sh(
        &lab,
        "ip",
        &[
            "neigh",
            "replace",
            &peer_gw0,
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "ferry.1",
            "nud",
            "permanent",
        ],
    );
    assert_names(
        &lab,
        "neighbour changed",
        "peers.neighbours",
        "02:00:00:00:00:99",
    );
    sh(
        &lab,
        "ip",
        &[
            "neigh",
            "replace",
            &peer_gw0,
            "lladdr",
            &mac,
            "dev",
            "ferry.1",
            "nud",
            "permanent",
        ],
    );
    assert_healthy_but_stopped(&lab, "the neighbour");

    // 4. The VXLAN device down (its routes go with it: ferryd restores).
    sh(&lab, "ip", &["link", "set", "ferry.1", "down"]);
    assert_names(&lab, "device down", "overlay.device", "is down");
    repair_with_ferryd(&mut lab, "the device");
    assert_healthy_but_stopped(&lab, "the device");

    // 5. A wrong MTU on the device.
    sh(&lab, "ip", &["link", "set", "ferry.1", "mtu", "1400"]);
    assert_names(&lab, "device MTU", "overlay.device", "MTU 1400");
    sh(&lab, "ip", &["link", "set", "ferry.1", "mtu", "1450"]);
    assert_healthy_but_stopped(&lab, "the MTU");

    // 6. ip_forward off.
    sh(&lab, "sysctl", &["-qw", "net.ipv4.ip_forward=0"]);
    assert_names(&lab, "ip_forward", "sysctl.ip_forward", "= 0");
    sh(&lab, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    assert_healthy_but_stopped(&lab, "ip_forward");

    // 7. rp_filter strict on the underlay.
    let before = sh(&lab, "sysctl", &["-n", "net.ipv4.conf.eth0.rp_filter"]);
    sh(&lab, "sysctl", &["-qw", "net.ipv4.conf.eth0.rp_filter=1"]);
    assert_names(&lab, "rp_filter", "sysctl.rp_filter", "eth0");
    sh(
        &lab,
        "sysctl",
        &[
            "-qw",
            &format!("net.ipv4.conf.eth0.rp_filter={}", before.trim()),
        ],
    );
    assert_healthy_but_stopped(&lab, "rp_filter");

    // 8. The conflist deleted.
    let conflist = lab.conflist(0);
    let text = std::fs::read_to_string(&conflist).unwrap();
    std::fs::remove_file(&conflist).unwrap();
    assert_names(&lab, "conflist deleted", "files.conflist", "missing");
    repair_with_ferryd(&mut lab, "the conflist");

    // 9. A conflist with a subnet that is not the lease's.
    let own = subnet_of(&lab, 0);
    std::fs::write(&conflist, text.replace(&own, "10.244.250.0/24")).unwrap();
    assert_names(&lab, "conflist subnet", "files.conflist", "10.244.250.0/24");
    repair_with_ferryd(&mut lab, "the conflist's subnet");

    // 10. etcd stopped.
    lab.stop_etcd();
    assert_names(&lab, "etcd stopped", "etcd", "");
    lab.start_etcd();
    assert_healthy_but_stopped(&lab, "etcd");

    // 11. The lease deleted.
    let out = lab.ferryd_cli(&["remove-node", "n1"]);
    assert!(out.status.success(), "{out:?}");
    assert_names(&lab, "lease deleted", "lease", "no lease");
    repair_with_ferryd(&mut lab, "the lease");

    // 12. A stale reservation: the pod's netns removed without DEL.
    let p = lab.add_pod(0);
    let pod = lab.nodes[0].pods.remove(p);
    let pod_ip = pod.ip.to_string();
    drop(pod);
    assert_names(&lab, "stale reservation", "pods", &pod_ip);
    std::fs::remove_file(lab.nodes[0].dir.join("ipam").join("ferry").join(&pod_ip)).unwrap();
    assert_healthy_but_stopped(&lab, "the reservation");

    // 13. An orphan host veth on the bridge.
    sh(
        &lab,
        "ip",
        &[
            "link", "add", "dorph0", "type", "veth", "peer", "name", "dorph1",
        ],
    );
    sh(&lab, "ip", &["link", "set", "dorph0", "master", "cni0"]);
    assert_names(&lab, "orphan veth", "pods", "dorph0");
    sh(&lab, "ip", &["link", "del", "dorph0"]);
    assert_healthy_but_stopped(&lab, "the orphan veth");

    // 14. The masquerade chain deleted (its map element first: nft refuses
    // to delete a chain something jumps to).
    let table = sh(&lab, "nft", &["list", "table", "inet", "ferry"]);
    let chain = table
        .lines()
        .find_map(|l| l.trim().strip_prefix("chain net-"))
        .map(|c| format!("net-{}", c.trim_end_matches(" {").trim()))
        .expect("the masquerade chain");
    sh(
        &lab,
        "nft",
        &[
            "delete",
            "element",
            "inet",
            "ferry",
            "masq-v4",
            &format!("{{ {own} }}"),
        ],
    );
    sh(&lab, "nft", &["delete", "chain", "inet", "ferry", &chain]);
    assert_names(&lab, "masquerade deleted", "nft.masquerade", &own);
    // The next ADD puts it back.
    lab.add_pod(0);
    assert_healthy_but_stopped(&lab, "the masquerade");

    // 15. A foreign route over a peer subnet.
    let half = format!("{}/25", peer_gw0);
    sh(&lab, "ip", &["route", "add", &half, "dev", "eth0"]);
    assert_names(&lab, "foreign route", "routes.foreign", &half);
    sh(&lab, "ip", &["route", "del", &half, "dev", "eth0"]);
    assert_healthy_but_stopped(&lab, "the foreign route");

    // Doctor that cannot run (no such underlay interface) exits 2.
    let mut cmd = Command::new(bin("ferryd"));
    cmd.args([
        "--etcd-endpoints",
        &etcd_endpoint(),
        "--iface",
        "nosuchdev0",
        "doctor",
    ])
    .stdin(Stdio::null());
    in_netns_cmd(&mut cmd, lab.nodes[0].ns.netns());
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nosuchdev0"),
        "{out:?}"
    );

    // And all OK again with ferryd running.
    lab.start_ferryd(0);
    assert!(lab.wait_ready(0, READY));
    let d = doctor(&lab, 0, &[]);
    assert!(d.not_ok_except(&[]).is_empty(), "{}", d.raw);
    assert_eq!(d.code, 0);
}

/// Names of the links of node `i`.
fn link_names(lab: &Lab, i: usize) -> Vec<String> {
    let v = lab.nodes[i].ns.ip_json(&["link", "show"]);
    let mut names: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn probe_pinpoints_a_peer_without_its_fdb_entry_and_leaves_nothing() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new(VXLAN);
    for _ in 0..3 {
        lab.add_node();
    }
    lab.assert_all_ready(READY);
    for i in 0..3 {
        lab.add_pod(i);
    }
    wait_peers_programmed(&lab, 0, 2);
    let links_before = link_names(&lab, 0);
    let routes_before = lab.nodes[0]
        .ns
        .exec("ip", &["-4", "route", "show", "table", "all"]);
    let d = doctor(&lab, 0, &["--probe"]);
    assert_eq!(d.status("probe"), "OK", "{}", d.raw);
    assert!(d.detail("probe").contains("2 of 2"), "{}", d.raw);

    lab.stop_ferryd(0, Signal::SIGTERM);
    let peer_ip = lab.nodes[1].ip.to_string();
    let fdb = lab.nodes[0]
        .ns
        .exec("bridge", &["-j", "fdb", "show", "dev", "ferry.1"]);
    let fdb: Value = serde_json::from_str(&fdb).unwrap();
    let mac = fdb
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["dst"] == peer_ip.as_str())
        .and_then(|e| e["mac"].as_str())
        .expect("fdb entry of n2")
        .to_string();
    lab.nodes[0].ns.exec(
        "bridge",
        &["fdb", "del", &mac, "dev", "ferry.1", "dst", &peer_ip],
    );
    let d = doctor(&lab, 0, &["--probe"]);
    assert_eq!(d.code, 1, "{}", d.raw);
    assert_eq!(d.status("probe"), "FAIL", "{}", d.raw);
    let detail = d.detail("probe");
    assert!(
        detail.contains("1 of 2"),
        "only n2 is unreachable: {detail}"
    );
    assert!(
        detail.contains("n2") && detail.contains("fdb entry"),
        "names n2 and the fdb entry: {detail}"
    );
    assert!(!detail.contains("n3"), "n3 answers: {detail}");
    // Nothing left behind: the same links and routes as before.
    assert_eq!(link_names(&lab, 0), links_before);
    let routes_after = lab.nodes[0]
        .ns
        .exec("ip", &["-4", "route", "show", "table", "all"]);
    assert_eq!(routes_after, routes_before);

    // Killed mid-probe (SIGKILL: no cleanup code runs), it still leaves
    // nothing: the namespace dies with the process, the veth with it.
    let mut cmd = lab.nodes[0].ferryd_command();
    cmd.args(["doctor", "--probe"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    // n2 does not answer, so the probe waits: catch its veth in the act.
    let seen = wait_until(Duration::from_secs(5), || {
        link_names(&lab, 0).iter().any(|n| n.starts_with("fdprobe"))
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen, "the probe's veth was never seen");
    let gone = wait_until(Duration::from_secs(10), || {
        link_names(&lab, 0) == links_before
    });
    assert!(gone, "left behind: {:?}", link_names(&lab, 0));
}

/// `cargo test -p ferryd --test doctor -- --ignored --nocapture
/// doctor_with_1000_peers`: how long doctor takes on a node with 1000 peers
/// programmed (printed, not asserted: the machine's load decides it).
#[test]
#[ignore]
fn doctor_with_1000_peers() {
    if !can_run() {
        return;
    }
    const PEERS: u32 = 1000;
    let mut lab =
        Lab::new(r#"{"network":"10.128.0.0/9","subnetLen":24,"backend":{"type":"vxlan","vni":1}}"#);
    lab.add_node();
    lab.assert_all_ready(READY);
    ferry_netops::in_netns(lab.underlay.netns(), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut c = etcd_client::Client::connect([etcd_endpoint()], None)
                .await
                .expect("connect to the lab's etcd");
            for i in 0..PEERS {
                let (a, b) = (i / 200, i % 200);
                let node = format!("peer{i}");
                let v = serde_json::json!({
                    "node": node,
                    "publicIp": format!("172.16.{a}.{}", b + 1),
                    "backend": "vxlan",
                    "vtepMac": ferryd::lease::Mac::derived(&node).to_string(),
                });
                // 10.200.0.0/24 … 10.203.231.0/24: inside 10.128.0.0/9, away from n1's.
                let key = format!(
                    "/ferry/network/subnets/10.{}.{}.0-24",
                    200 + i / 250,
                    i % 250
                );
                c.put(key, v.to_string(), None).await.expect("put lease");
            }
        });
        Ok(())
    })
    .unwrap();
    let programmed = wait_until(Duration::from_secs(120), || {
        lab.metric(0, "ferry_peers_programmed") == Some(f64::from(PEERS))
    });
    assert!(programmed, "{}", lab.ferryd_log(0));
    for _ in 0..5 {
        let t = Instant::now();
        let d = doctor(&lab, 0, &[]);
        let took = t.elapsed();
        assert!(d.not_ok_except(&[]).is_empty(), "{}", d.raw);
        assert!(
            d.detail("peers.routes").contains("1000 of 1000"),
            "{}",
            d.raw
        );
        eprintln!("ferry: doctor with {PEERS} peers took {took:?}");
    }
}

/// A dual-stack network: the IPv6 half of every peer (route, neighbour) is
/// checked too, and a break there is named as such.
#[test]
fn doctor_checks_the_ipv6_half_of_a_dual_stack_network() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new(
        r#"{"network":"10.244.0.0/16","subnetLen":24,"ipv6Network":"fd00:244::/56","backend":{"type":"vxlan","vni":1}}"#,
    );
    for _ in 0..2 {
        lab.add_node();
    }
    lab.assert_all_ready(READY);
    wait_peers_programmed(&lab, 0, 1);
    let d = doctor(&lab, 0, &[]);
    assert!(d.not_ok_except(&[]).is_empty(), "{}", d.raw);
    for name in ["peers.routes6", "peers.neighbours6"] {
        assert_eq!(d.status(name), "OK", "{}", d.raw);
        assert!(d.detail(name).contains('1'), "one peer counted: {}", d.raw);
    }
    lab.stop_ferryd(0, Signal::SIGTERM);

    // The peer's IPv6 route, deleted by hand.
    let route = sh(&lab, "ip", &["-6", "route", "show", "proto", "70"]);
    let dst = route
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no ferry IPv6 route on n1: {route:?}"))
        .to_string();
    sh(&lab, "ip", &["-6", "route", "del", &dst, "proto", "70"]);
    assert_names(&lab, "an IPv6 peer route deleted", "peers.routes6", &dst);
    assert_eq!(
        doctor(&lab, 0, &[]).status("peers.routes"),
        "OK",
        "the IPv4 half is intact"
    );
    repair_with_ferryd(&mut lab, "the IPv6 route");

    // The peer's IPv6 neighbour, pointed at another MAC.
    let gw6 = dst.split('/').next().unwrap().to_string();
    sh(
        &lab,
        "ip",
        &[
            "-6",
            "neigh",
            "replace",
            &gw6,
            "lladdr",
            "02:00:00:00:00:01",
            "dev",
            "ferry.1",
            "nud",
            "permanent",
        ],
    );
    assert_names(&lab, "an IPv6 neighbour changed", "peers.neighbours6", &gw6);
    repair_with_ferryd(&mut lab, "the IPv6 neighbour");
    assert_healthy_but_stopped(&lab, "the IPv6 neighbour");
}
