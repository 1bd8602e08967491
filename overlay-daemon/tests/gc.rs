//! ferryd's gc sweep end to end: a real ferryd against a real etcd (see
//! ferry_tests::lab), pods ADDed through the node's conflist by `cnirun`
//! (the plugins chained as a runtime does), then their namespaces removed
//! without a DEL, as a crashed runtime leaves them.

use ferry_netops::NetNs;
use ferry_tests::etcd::require_etcd;
use ferry_tests::lab::Lab;
use ferry_tests::{TestNetns, bin, in_netns_cmd, require_root, wait_until};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HOST_GW: &str = r#"{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"host-gw"}}"#;
const READY: Duration = Duration::from_secs(30);

fn can_run() -> bool {
    require_root() && require_etcd()
}

fn bin_dir() -> PathBuf {
    bin("ferry-bridge").parent().expect("bin dir").to_path_buf()
}

/// One node, ready, its conflist written, ferryd sweeping every `interval`
/// seconds with `grace`, plus `extra` arguments.
fn node(interval: u64, grace: u64, extra: &[&str]) -> Lab {
    let mut lab = Lab::new(HOST_GW);
    lab.ferryd_args = vec![
        "--resync-interval".into(),
        "1".into(),
        "--gc-interval".into(),
        interval.to_string(),
        "--gc-grace".into(),
        grace.to_string(),
        "--cni-bin-dir".into(),
        bin_dir().display().to_string(),
    ];
    lab.ferryd_args.extend(extra.iter().map(|a| a.to_string()));
    lab.add_node();
    lab.assert_all_ready(READY);
    assert!(
        wait_until(Duration::from_secs(10), || lab.conflist(0).exists()),
        "no conflist:\n{}",
        lab.ferryd_log(0)
    );
    lab
}

/// A copy of the node's conflist (outside the conf dir) with macspoofchk
/// on: what the pods are ADDed with. The sweep's DEL runs the node's own
/// conflist, without it, as after an operator turned the option off; the
/// bridge's DEL removes the pod's chain either way.
fn spoofchk_conflist(lab: &Lab) -> PathBuf {
    let mut v: Value =
        serde_json::from_slice(&std::fs::read(lab.conflist(0)).expect("conflist")).unwrap();
    v["plugins"][0]["macspoofchk"] = json!(true);
    let p = lab.nodes[0].dir.join("spoofchk.conflist");
    std::fs::write(&p, v.to_string()).unwrap();
    p
}

/// `cnirun <verb>` on node 0, as its runtime would run it.
fn cnirun(
    lab: &Lab,
    conflist: &PathBuf,
    verb: &str,
    netns: &str,
    id: &str,
    runtime_config: &Value,
    cni_args: &str,
) -> Output {
    let node = &lab.nodes[0];
    let mut cmd = Command::new(bin("cnirun"));
    cmd.arg(verb)
        .arg(conflist)
        .args([netns, id, "eth0"])
        .args(["--runtime-config", &runtime_config.to_string()])
        .args(["--args", cni_args])
        .env("CNI_PATH", bin_dir())
        .env("CNI_CACHE_DIR", node.dir.join("cache"))
        .stdin(Stdio::null());
    in_netns_cmd(&mut cmd, node.ns.netns());
    cmd.output().expect("run cnirun")
}

static PORT: AtomicU32 = AtomicU32::new(30000);

/// A pod with a hostPort, bandwidth limits and (by the conflist) macspoofchk.
fn full_runtime_config() -> Value {
    let port = PORT.fetch_add(1, Ordering::Relaxed);
    json!({
        "portMappings": [{"hostPort": port, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 10_000_000, "ingressBurst": 100_000,
                      "egressRate": 10_000_000, "egressBurst": 100_000},
    })
}

fn pod_args(name: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=gc-test;K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={name}"
    )
}

/// ADDs a pod; its IPv4 address.
fn add(lab: &Lab, conflist: &PathBuf, ns: &str, id: &str, rc: &Value) -> Ipv4Addr {
    let out = cnirun(lab, conflist, "add", ns, id, rc, &pod_args(id));
    assert!(
        out.status.success(),
        "ADD {id}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("ADD result");
    v["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no IPv4 in {v}"))
}

/// The pod's gateway: .1 of its node's /24.
fn gateway_of(ip: Ipv4Addr) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from((u32::from(ip) & !0xff) | 1))
}

/// Everything of pods ferry keeps on the node, by owner where it says one.
#[derive(Debug, Default, PartialEq, Eq)]
struct NodeState {
    /// address -> container ID.
    reservations: BTreeMap<IpAddr, String>,
    /// (kind, alias) of the links with a ferry owner alias.
    links: BTreeSet<(String, String)>,
    /// Comments of ferry-portmap's elements.
    nft_comments: BTreeSet<String>,
    /// macspoofchk's per-pod chains.
    spoof_chains: BTreeSet<String>,
}

impl NodeState {
    fn mentions(&self, id: &str) -> bool {
        self.reservations.values().any(|c| c == id)
            || self
                .links
                .iter()
                .any(|(_, a)| a.ends_with(&format!("/{id}")))
            || self
                .nft_comments
                .iter()
                .any(|c| c.contains(&format!("/{id}/")))
    }
}

fn node_state(lab: &Lab) -> NodeState {
    let ns = &lab.nodes[0].ns;
    // Read under the store's lock (a plain directory read races with the
    // sweep's releases).
    let reservations =
        ferry_ipam::store::Store::open_existing(&lab.nodes[0].dir.join("ipam"), "ferry")
            .expect("open the store")
            .map(|store| {
                store
                    .records()
                    .expect("records")
                    .into_iter()
                    .filter_map(|(ip, r)| Some((ip, r.owner()?.id.clone())))
                    .collect()
            })
            .unwrap_or_default();
    let mut links = BTreeSet::new();
    for l in ns.ip_json(&["-d", "link", "show"]).as_array().unwrap() {
        let kind = l["linkinfo"]["info_kind"].as_str().unwrap_or("");
        if let Some(alias) = l["ifalias"].as_str()
            && alias.starts_with("ferry-")
        {
            links.insert((kind.to_string(), alias.to_string()));
        }
    }
    let text =
        |args: &[&str]| String::from_utf8_lossy(&ns.try_exec("nft", args).stdout).into_owned();
    let nft_comments = text(&["list", "table", "inet", "ferry"])
        .split("comment \"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .filter(|c| c.starts_with("hp-"))
        .map(str::to_string)
        .collect();
    let spoof_chains = text(&["list", "table", "bridge", "ferry"])
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chain mac-"))
        .map(|l| l.trim_end_matches(" {").to_string())
        .collect();
    NodeState {
        reservations,
        links,
        nft_comments,
        spoof_chains,
    }
}

/// The container IDs ferryd's log says the sweep released.
fn released_in_log(lab: &Lab) -> Vec<String> {
    lab.ferryd_log(0)
        .lines()
        .filter(|l| l.contains("gc: released"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("container="))
                .map(str::to_string)
        })
        .collect()
}

/// [`released_in_log`] once it names at least `n` releases (or after 10 s):
/// the sweep logs a release after the objects are gone, so the log may
/// trail the state a test waited for.
fn released_in_log_at_least(lab: &Lab, n: usize) -> Vec<String> {
    wait_until(Duration::from_secs(10), || released_in_log(lab).len() >= n);
    released_in_log(lab)
}

fn metric_sum(lab: &Lab, prefix: &str) -> f64 {
    let Some((_, body)) = lab.http(0, "/metrics") else {
        return 0.0;
    };
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn pods_left_without_del_are_fully_cleaned() {
    if !can_run() {
        return;
    }
    let (interval, grace) = (2, 3);
    let lab = node(interval, grace, &[]);
    let conflist = spoofchk_conflist(&lab);
    let live = TestNetns::new();
    live.exec("ip", &["link", "set", "lo", "up"]);
    let live_id = format!("gclive{}", std::process::id());
    let live_ip = add(
        &lab,
        &conflist,
        &live.path_str(),
        &live_id,
        &full_runtime_config(),
    );
    let mut gone = Vec::new();
    for n in 0..3 {
        let ns = TestNetns::new();
        let id = format!("gcgone{n}x{}", std::process::id());
        add(&lab, &conflist, &ns.path_str(), &id, &full_runtime_config());
        gone.push((id, ns));
    }
    let before = node_state(&lab);
    for (id, _) in &gone {
        assert!(before.mentions(id), "{id} not set up: {before:#?}");
    }
    assert_eq!(before.spoof_chains.len(), 4, "{before:#?}");
    assert_eq!(
        before.links.iter().filter(|(k, _)| k == "ifb").count(),
        4,
        "{before:#?}"
    );
    // The runtime crashes: the namespaces go, no DEL comes.
    let ids: Vec<String> = gone.iter().map(|(id, _)| id.clone()).collect();
    drop(gone);
    let t0 = Instant::now();
    let clean = wait_until(Duration::from_secs(interval + grace + 20), || {
        let s = node_state(&lab);
        !ids.iter().any(|id| s.mentions(id)) && s.spoof_chains.len() == 1
    });
    let took = t0.elapsed();
    let after = node_state(&lab);
    assert!(
        clean,
        "not cleaned after {took:?}: {after:#?}\n{}",
        lab.ferryd_log(0)
    );
    println!(
        "GC: 3 pods (hostPort, bandwidth, macspoofchk) without DEL fully cleaned {:.2} s after their namespaces went (interval {interval} s + grace {grace} s)",
        took.as_secs_f64()
    );
    eprintln!(
        "GC: cleaned in {:.2} s (interval {interval} s, grace {grace} s)",
        took.as_secs_f64()
    );
    assert!(
        took <= Duration::from_secs(interval + grace + 10),
        "took {took:?}"
    );
    // The live pod: untouched, and it still reaches its gateway.
    assert!(after.mentions(&live_id), "{after:#?}");
    assert_eq!(after.reservations.get(&IpAddr::V4(live_ip)), Some(&live_id));
    assert!(
        live.ping(gateway_of(live_ip), 3),
        "live pod lost connectivity"
    );
    let mut released = released_in_log_at_least(&lab, ids.len());
    released.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(released, want, "every release a real orphan, each once");
    assert!(
        lab.ferryd_log(0).contains("pod=gc-test/gcgone0"),
        "release logged with the pod name"
    );
    assert_eq!(metric_sum(&lab, "ferry_gc_released_total"), 3.0);
    assert_eq!(metric_sum(&lab, "ferry_gc_errors_total"), 0.0);
}

#[test]
fn dry_run_changes_nothing() {
    if !can_run() {
        return;
    }
    let lab = node(1, 1, &["--gc-dry-run"]);
    let conflist = spoofchk_conflist(&lab);
    let ns = TestNetns::new();
    let id = format!("gcdry{}", std::process::id());
    add(&lab, &conflist, &ns.path_str(), &id, &full_runtime_config());
    drop(ns);
    // The kernel removes the veth with its namespace (asynchronously).
    assert!(
        wait_until(Duration::from_secs(20), || lab
            .ferryd_log(0)
            .contains("would release")
            && !node_state(&lab).links.iter().any(|(k, _)| k == "veth")),
        "{}",
        lab.ferryd_log(0)
    );
    let before = node_state(&lab);
    assert!(before.mentions(&id), "{before:#?}");
    // A few more passes.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(node_state(&lab), before);
    assert!(released_in_log(&lab).is_empty());
    assert_eq!(metric_sum(&lab, "ferry_gc_released_total"), 0.0);
}

/// A path that now names another namespace: `/proc/<pid>/fd/<n>` whose fd
/// was replaced (dup2) by another namespace's, as a reused pid's
/// `/proc/<pid>/ns/net` or a re-created bind mount would.
#[test]
fn a_path_that_now_holds_another_namespace_is_released() {
    if !can_run() {
        return;
    }
    let lab = node(1, 2, &[]);
    let conflist = lab.conflist(0);
    let first = NetNs::new_anonymous().expect("netns");
    let second = NetNs::new_anonymous().expect("netns");
    // A high fd of its own, named by the path the runtime passes.
    let high = 3000 + std::process::id() as i32 % 1000;
    assert!(unsafe { libc::dup2(first.as_fd().as_raw_fd(), high) } == high);
    let _high = unsafe { OwnedFd::from_raw_fd(high) };
    let path = format!("/proc/{}/fd/{high}", std::process::id());
    let id = format!("gcreused{}", std::process::id());
    let ip = add(&lab, &conflist, &path, &id, &json!({}));
    // The path now holds the second namespace (the path exists, so only
    // the identity tells), and the first one is gone, its veth with it.
    assert!(unsafe { libc::dup2(second.as_fd().as_raw_fd(), high) } == high);
    drop(first);
    assert!(
        wait_until(Duration::from_secs(20), || !node_state(&lab).mentions(&id)),
        "{:#?}\n{}",
        node_state(&lab),
        lab.ferryd_log(0)
    );
    assert!(
        lab.ferryd_log(0).contains("now holds another namespace"),
        "{}",
        lab.ferryd_log(0)
    );
    assert!(!node_state(&lab).reservations.contains_key(&IpAddr::V4(ip)));
    drop(second);
}

/// Links and elements with no ferry owner (no alias, another alias, a
/// comment ferry does not write) are never touched, however old.
#[test]
fn objects_of_other_owners_are_never_touched() {
    if !can_run() {
        return;
    }
    let lab = node(1, 1, &[]);
    let conflist = lab.conflist(0);
    // A pod first, so the bridge and ferry's nft table exist.
    let live = TestNetns::new();
    let live_id = format!("gcown{}", std::process::id());
    add(
        &lab,
        &conflist,
        &live.path_str(),
        &live_id,
        &full_runtime_config(),
    );
    let ns = &lab.nodes[0].ns;
    ns.exec(
        "ip",
        &[
            "link",
            "add",
            "gcforeign0",
            "type",
            "veth",
            "peer",
            "name",
            "p0",
        ],
    );
    ns.exec("ip", &["link", "set", "gcforeign0", "master", "cni0"]);
    ns.exec(
        "ip",
        &[
            "link",
            "add",
            "gcforeign1",
            "type",
            "veth",
            "peer",
            "name",
            "p1",
        ],
    );
    ns.exec(
        "ip",
        &[
            "link",
            "set",
            "gcforeign1",
            "master",
            "cni0",
            "alias",
            "someone-else:ferry/eth0/x",
        ],
    );
    ns.exec("ip", &["link", "add", "gcifb0", "type", "ifb"]);
    ns.exec(
        "ip",
        &["link", "set", "gcifb0", "alias", "ferry-bandwidthish:x"],
    );
    ns.exec("ip", &["link", "add", "gcifb1", "type", "ifb"]);
    ns.exec(
        "nft",
        &["add element inet ferry hostports-v4 { tcp . 9 comment \"not ferry's\" : 10.9.9.9 . 80 }"],
    );
    ns.exec(
        "nft",
        &["add element inet ferry hostports-v4 { tcp . 10 comment \"hp-01 sha256:ab\" : 10.9.9.10 . 80 }"],
    );
    std::thread::sleep(Duration::from_secs(5));
    let links = ns.ip_json(&["link", "show"]);
    let names: BTreeSet<&str> = links
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .collect();
    for n in ["gcforeign0", "gcforeign1", "gcifb0", "gcifb1", "p0", "p1"] {
        assert!(names.contains(n), "{n} removed: {names:?}");
    }
    let table = String::from_utf8_lossy(
        &ns.try_exec("nft", &["list", "table", "inet", "ferry"])
            .stdout,
    )
    .into_owned();
    assert!(
        table.contains("not ferry's") && table.contains("hp-01 sha256:ab"),
        "{table}"
    );
    assert!(node_state(&lab).mentions(&live_id));
    assert!(released_in_log(&lab).is_empty(), "{}", lab.ferryd_log(0));
    assert_eq!(metric_sum(&lab, "ferry_gc_errors_total"), 0.0);
}

/// 100 pods churn, 16 ADDs in flight, the sweep every second: half the
/// pods are abandoned right after their ADD (namespace gone, no DEL), half
/// stay. No live pod loses its address or connectivity, every release is an
/// abandoned pod, and at the end, once every pod is gone, nothing is left.
#[test]
fn churn_with_adds_in_flight() {
    if !can_run() {
        return;
    }
    let lab = Arc::new(node(1, 3, &[]));
    let conflist = lab.conflist(0);
    const PODS: u32 = 100;
    const IN_FLIGHT: usize = 16;
    let next = Arc::new(AtomicU32::new(0));
    let live: Arc<Mutex<Vec<(String, Ipv4Addr, TestNetns)>>> = Arc::default();
    let abandoned: Arc<Mutex<Vec<String>>> = Arc::default();
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (lab, conflist, next, live, abandoned) = (
                lab.clone(),
                conflist.clone(),
                next.clone(),
                live.clone(),
                abandoned.clone(),
            );
            std::thread::spawn(move || {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= PODS {
                        return;
                    }
                    let ns = TestNetns::new();
                    ns.exec("ip", &["link", "set", "lo", "up"]);
                    let id = format!("gcchurn{n}x{}", std::process::id());
                    let rc = if n % 4 == 0 {
                        full_runtime_config()
                    } else {
                        json!({})
                    };
                    let ip = add(&lab, &conflist, &ns.path_str(), &id, &rc);
                    if n % 2 == 0 {
                        abandoned.lock().unwrap().push(id);
                        drop(ns);
                    } else {
                        live.lock().unwrap().push((id, ip, ns));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let abandoned: BTreeSet<String> = abandoned.lock().unwrap().iter().cloned().collect();
    let check_live = |what: &str| {
        let s = node_state(&lab);
        for (id, ip, ns) in live.lock().unwrap().iter() {
            assert_eq!(
                s.reservations.get(&IpAddr::V4(*ip)),
                Some(id),
                "{what}: live pod {id} lost {ip}"
            );
            assert!(
                ns.ping(gateway_of(*ip), 3),
                "{what}: live pod {id} cannot reach its gateway"
            );
        }
    };
    check_live("after the churn");
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let s = node_state(&lab);
            !abandoned.iter().any(|id| s.mentions(id))
        }),
        "abandoned pods not cleaned: {:#?}",
        node_state(&lab)
    );
    println!(
        "GC churn: {} abandoned pods cleaned {:.2} s after the last ADD",
        abandoned.len(),
        t0.elapsed().as_secs_f64()
    );
    check_live("after the sweep");
    let released: BTreeSet<String> = released_in_log(&lab).into_iter().collect();
    assert!(
        released.is_subset(&abandoned),
        "released live pods: {:?}",
        released.difference(&abandoned).collect::<Vec<_>>()
    );
    // Every pod gone now: nothing may be left.
    live.lock().unwrap().clear();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let s = node_state(&lab);
            s.reservations.is_empty()
                && s.links.is_empty()
                && s.nft_comments.is_empty()
                && s.spoof_chains.is_empty()
        }),
        "left over: {:#?}\n{}",
        node_state(&lab),
        lab.ferryd_log(0)
    );
    assert_eq!(
        released_in_log_at_least(&lab, PODS as usize).len(),
        PODS as usize,
        "each pod released once"
    );
    assert_eq!(metric_sum(&lab, "ferry_gc_errors_total"), 0.0);
}

/// State no reservation explains: the pod's address was released by
/// something else (ferry-ipam reclaims a gone namespace's address by
/// itself when its range is full; an operator may delete a record) while
/// its ifb, hostPort elements and macspoofchk chain stayed. They are
/// removed once the sweep has seen them for the grace period.
#[test]
fn orphans_without_a_reservation_are_removed() {
    if !can_run() {
        return;
    }
    let lab = node(1, 2, &[]);
    let conflist = spoofchk_conflist(&lab);
    let ns = TestNetns::new();
    let id = format!("gcorphan{}", std::process::id());
    let ip = add(&lab, &conflist, &ns.path_str(), &id, &full_runtime_config());
    drop(ns);
    let store = lab.nodes[0].dir.join("ipam").join("ferry");
    std::fs::remove_file(store.join(ip.to_string())).expect("remove the record");
    let s = node_state(&lab);
    assert!(!s.reservations.contains_key(&IpAddr::V4(ip)));
    assert!(s.links.iter().any(|(k, _)| k == "ifb") && !s.nft_comments.is_empty());
    assert!(
        wait_until(Duration::from_secs(20), || {
            let s = node_state(&lab);
            !s.mentions(&id) && s.spoof_chains.is_empty()
        }),
        "{:#?}\n{}",
        node_state(&lab),
        lab.ferryd_log(0)
    );
    // The sweep logs a release after its last object is gone: the line may
    // trail the state the wait above saw.
    let logged = || {
        lab.ferryd_log(0).lines().any(|l| {
            l.contains("gc: released") && l.contains(&id) && !l.contains("kind=reservation")
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), logged),
        "{}",
        lab.ferryd_log(0)
    );
    assert!(metric_sum(&lab, "ferry_gc_released_total") >= 1.0);
}

/// A pod whose netns path ferryd cannot see (another mount or PID
/// namespace; here: the path's fd closed while the namespace lives on) but
/// whose veth is there is alive: its reservation is kept, however old.
#[test]
fn a_pod_whose_path_is_gone_but_whose_veth_lives_is_kept() {
    if !can_run() {
        return;
    }
    let lab = node(1, 1, &[]);
    let conflist = lab.conflist(0);
    let pod = NetNs::new_anonymous().expect("netns");
    let high = 5000 + std::process::id() as i32 % 1000;
    assert!(unsafe { libc::dup2(pod.as_fd().as_raw_fd(), high) } == high);
    let path = format!("/proc/{}/fd/{high}", std::process::id());
    let id = format!("gchidden{}", std::process::id());
    let ip = add(&lab, &conflist, &path, &id, &json!({}));
    // The path goes; the namespace (held by `pod`) and its veth stay.
    drop(unsafe { OwnedFd::from_raw_fd(high) });
    assert!(!std::path::Path::new(&path).exists());
    std::thread::sleep(Duration::from_secs(5));
    let s = node_state(&lab);
    assert_eq!(s.reservations.get(&IpAddr::V4(ip)), Some(&id), "{s:#?}");
    assert!(released_in_log(&lab).is_empty(), "{}", lab.ferryd_log(0));
    drop(pod);
}
