//! ferry-bridge's STATUS through the conflist a real ferryd wrote (run by
//! `cnirun status` as libcni's GetStatusNetworkList does), against a real
//! etcd: ready while ferryd holds and renews the node's lease; "not
//! available" (code 50) when the lease is overdue (etcd gone past the TTL),
//! when ferryd is killed (after its statement expires) or stopped; ready
//! again when they come back.

use ferry_tests::etcd::require_etcd;
use ferry_tests::lab::Lab;
use ferry_tests::{bin, in_netns_cmd, require_root, wait_until};
use std::process::{Command, Stdio};
use std::time::Duration;

const VXLAN: &str =
    r#"{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan","vni":1}}"#;
const READY: Duration = Duration::from_secs(30);
/// A short lease, so an outage outlives it quickly; ferryd's readiness
/// statements then hold for at most this long.
const TTL: &str = "4";

fn can_run() -> bool {
    require_root() && require_etcd()
}

fn one_node() -> Lab {
    let mut lab = Lab::new(VXLAN);
    lab.ferryd_args = ["--resync-interval", "1", "--lease-ttl", TTL]
        .iter()
        .map(|a| a.to_string())
        .collect();
    lab.add_node();
    lab.assert_all_ready(READY);
    lab
}

/// `cnirun status` on node `i`'s conflist: `None` when every plugin said
/// yes, else the CNI error.
fn status(lab: &Lab, i: usize) -> Option<serde_json::Value> {
    let bin_dir = bin("ferry-bridge").parent().unwrap().to_path_buf();
    let mut cmd = Command::new(bin("cnirun"));
    cmd.arg("status")
        .arg(lab.conflist(i))
        .args(["", ""])
        .env("CNI_PATH", &bin_dir)
        .env("CNI_CACHE_DIR", lab.nodes[i].dir.join("cache"))
        .stdin(Stdio::null());
    in_netns_cmd(&mut cmd, lab.nodes[i].ns.netns());
    let out = cmd.output().expect("run cnirun");
    if out.status.success() {
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "cnirun status printed no CNI error ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }))
}

/// Waits for STATUS to answer code 50 with a message containing `needle`;
/// fails with the last answer and ferryd's log.
fn wait_unavailable(lab: &Lab, i: usize, needle: &str, within: Duration) {
    let mut last = None;
    let ok = wait_until(within, || {
        last = status(lab, i);
        last.as_ref().is_some_and(|e| {
            e["code"] == 50 && e["msg"].as_str().is_some_and(|m| m.contains(needle))
        })
    });
    assert!(
        ok,
        "STATUS did not become 50 ({needle:?}) within {within:?}; last answer {last:?}\n{}",
        lab.ferryd_log(i)
    );
}

fn wait_available(lab: &Lab, i: usize, within: Duration) {
    let mut last = None;
    let ok = wait_until(within, || {
        last = status(lab, i);
        last.is_none()
    });
    assert!(
        ok,
        "STATUS did not succeed within {within:?}; last answer {last:?}\n{}",
        lab.ferryd_log(i)
    );
}

/// Ready with a live ferryd, through the conflist it wrote (which names the
/// file); a pod still comes up through that conflist. etcd gone longer
/// than the lease TTL: 50 naming the overdue lease (as /readyz does); etcd
/// back: ready again.
#[test]
fn status_follows_the_lease_through_an_etcd_outage() {
    if !can_run() {
        return;
    }
    let mut lab = one_node();
    let conflist: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lab.conflist(0)).unwrap()).unwrap();
    let ready_file = lab.nodes[0].dir.join("ready");
    assert_eq!(
        conflist["plugins"][0]["readinessFile"],
        ready_file.to_str().unwrap(),
        "beside --subnet-file by default"
    );
    wait_available(&lab, 0, Duration::from_secs(10));
    let text = std::fs::read_to_string(&ready_file).unwrap();
    let subnet = lab.node_subnet(0).unwrap();
    let subnet = subnet.replace(".1/", ".0/");
    assert!(text.contains(&format!("\"subnet\":\"{subnet}\"")), "{text}");
    let pod = lab.add_pod(0);
    let gateway: std::net::IpAddr = subnet.replace(".0/24", ".1").parse().unwrap();
    assert!(
        lab.nodes[0].pods[pod].ns.ping(gateway, 3),
        "the pod reaches its gateway"
    );

    lab.stop_etcd();
    wait_unavailable(&lab, 0, "last renewed", Duration::from_secs(30));
    let (code, _) = lab.http(0, "/readyz").expect("/readyz answers");
    assert_eq!(code, 503, "/readyz and STATUS agree");

    lab.start_etcd();
    wait_available(&lab, 0, Duration::from_secs(30));
}

/// ferryd killed (no chance to clean up): its last "ready" expires by itself
/// and STATUS says so; a new ferryd makes the node ready again; a stopped
/// ferryd (SIGTERM) says "stopped" at once.
#[test]
fn status_is_not_ready_once_ferryd_is_gone() {
    if !can_run() {
        return;
    }
    let mut lab = one_node();
    wait_available(&lab, 0, Duration::from_secs(10));

    lab.stop_ferryd(0, nix::sys::signal::Signal::SIGKILL);
    wait_unavailable(&lab, 0, "expired", Duration::from_secs(20));

    lab.start_ferryd(0);
    wait_available(&lab, 0, READY);

    lab.stop_ferryd(0, nix::sys::signal::Signal::SIGTERM);
    let e = status(&lab, 0).expect("not ready once ferryd stopped");
    assert_eq!(e["code"], 50, "{e}");
    assert!(e["msg"].as_str().unwrap().contains("ferryd stopped"), "{e}");
}
