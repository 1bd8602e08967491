//! The CNI call log, end to end: plugins executed as a runtime does write
//! one line per call (ADD, CHECK, DEL, a failed ADD with its code) to the
//! path ferryd put in the conflist; ferryd's /metrics counts exactly those
//! lines; `ferryd doctor` shows the failure; a storm of concurrent writers
//! keeps the log within its bound with no torn lines.

use ferry_cni::calllog::{self, Entry};
use ferry_tests::etcd::require_etcd;
use ferry_tests::lab::Lab;
use ferry_tests::{TestDir, TestNetns, bin, in_netns_cmd, require_root, run_plugin, wait_until};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

const VXLAN: &str =
    r#"{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan","vni":1}}"#;
const POD_ARGS: &str = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-x";

fn cnirun(lab: &Lab, verb: &str, netns: &str, id: &str) -> std::process::Output {
    let node = &lab.nodes[0];
    let bin_dir = bin("ferry-bridge").parent().unwrap().to_path_buf();
    let mut cmd = Command::new(bin("cnirun"));
    cmd.arg(verb)
        .arg(lab.conflist(0))
        .args([netns, id, "eth0"])
        .args(["--args", POD_ARGS])
        .env("CNI_PATH", &bin_dir)
        .env("CNI_CACHE_DIR", node.dir.join("cache"))
        .stdin(Stdio::null());
    in_netns_cmd(&mut cmd, node.ns.netns());
    cmd.output().expect("run cnirun")
}

#[test]
fn add_check_del_and_a_failed_add_are_logged_and_counted_on_metrics() {
    if !(require_root() && require_etcd()) {
        return;
    }
    let mut lab = Lab::new(VXLAN);
    lab.ferryd_args = vec!["--resync-interval".into(), "1".into()];
    lab.add_node();
    lab.assert_all_ready(Duration::from_secs(30));
    let log = lab.nodes[0].dir.join("cni.log");
    let conf = std::fs::read_to_string(lab.conflist(0)).unwrap();
    assert!(
        conf.contains(&format!("\"cniLog\": \"{}\"", log.display())),
        "ferryd writes the log's path into the conflist:\n{conf}"
    );

    let pod = TestNetns::new();
    pod.exec("ip", &["link", "set", "lo", "up"]);
    let id = "logpod1";
    for verb in ["add", "check", "del"] {
        let out = cnirun(&lab, verb, &pod.path_str(), id);
        assert!(out.status.success(), "{verb}: {out:?}");
    }
    // A failed ADD: the namespace is not there.
    let out = cnirun(&lab, "add", "/proc/self/fd/999999", "logpod2");
    assert!(!out.status.success(), "ADD into a missing netns fails");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let entries = calllog::read_all(&log);
    let of = |plugin: &str, verb: &str, container: &str| -> Vec<&Entry> {
        entries
            .iter()
            .filter(|e| e.plugin == plugin && e.verb == verb && e.container == container)
            .collect()
    };
    for verb in ["ADD", "CHECK", "DEL"] {
        let e = of("ferry-bridge", verb, id);
        assert_eq!(
            e.len(),
            1,
            "{verb} of ferry-bridge logged once: {entries:#?}"
        );
        assert!(e[0].is_ok(), "{:?}", e[0]);
        assert_eq!(e[0].who(), "kube-system/coredns-x");
        assert_eq!(e[0].ifname, "eth0");
        assert!(e[0].ms > 0.0);
    }
    assert_eq!(
        of("ferry-ipam", "ADD", id).len(),
        1,
        "the IPAM plugin logs its own call"
    );
    let failed = of("ferry-bridge", "ADD", "logpod2");
    assert_eq!(failed.len(), 1, "{entries:#?}");
    let code = failed[0].code.expect("a failed call has its code");
    assert!(!failed[0].is_ok());
    assert!(
        printed.contains(&format!("\"code\":{code}")) || printed.contains(&format!("code {code}")),
        "the logged code {code} is the one the runtime got: {printed}"
    );

    // /metrics counts every line, per plugin and verb, and errors per code.
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    for e in &entries {
        *counts
            .entry((e.plugin.clone(), e.verb.clone()))
            .or_default() += 1;
    }
    let all_counted = wait_until(Duration::from_secs(10), || {
        counts.iter().all(|((plugin, verb), n)| {
            lab.metric(
                0,
                &format!(
                    "ferry_cni_call_duration_seconds_count{{plugin=\"{plugin}\",verb=\"{verb}\"}}"
                ),
            ) == Some(*n as f64)
        })
    });
    assert!(
        all_counted,
        "histogram counts {counts:?} vs\n{}",
        lab.http(0, "/metrics").map(|(_, b)| b).unwrap_or_default()
    );
    assert_eq!(
        lab.metric(
            0,
            &format!("ferry_cni_call_errors_total{{plugin=\"ferry-bridge\",verb=\"ADD\",code=\"{code}\"}}")
        ),
        Some(1.0)
    );

    // doctor shows the failure.
    let node = &lab.nodes[0];
    let mut cmd = Command::new(bin("ferryd"));
    cmd.args(["--node-name", &node.name, "--cni-log"])
        .arg(&log)
        .args(["--etcd-endpoints", &ferry_tests::lab::etcd_endpoint()])
        .arg("--cni-conf-dir")
        .arg(node.dir.join("net.d"))
        .arg("--subnet-file")
        .arg(node.dir.join("subnet.env"))
        .arg("--ipam-data-dir")
        .arg(node.dir.join("ipam"))
        .args(["--listen", "127.0.0.1:9946", "doctor"]);
    in_netns_cmd(&mut cmd, node.ns.netns());
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "ADD for kube-system/coredns-x failed 1 time with code {code}"
        )),
        "{text}"
    );
}

#[test]
fn a_storm_of_concurrent_writers_stays_within_the_bound_without_torn_lines() {
    let dir = TestDir::new("cnilog-storm");
    let log = dir.path().join("cni.log");
    const BOUND: u64 = 16 * 1024;
    const CALLS: usize = 1000;
    const WRITERS: usize = 8;
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"storm","type":"ferry-loopback","cniLog":"{}","cniLogMaxBytes":{BOUND}}}"#,
        log.display()
    );
    let loopback = bin("ferry-loopback");
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let conf = &conf;
            let loopback = &loopback;
            s.spawn(move || {
                for i in 0..CALLS / WRITERS {
                    // Every tenth call fails (CHECK needs a netns it cannot
                    // find), the rest are DELs of a gone container.
                    let (verb, netns) = if i % 10 == 0 {
                        ("CHECK", Some("/proc/self/fd/999999"))
                    } else {
                        ("DEL", None)
                    };
                    let args = format!("K8S_POD_NAMESPACE=storm;K8S_POD_NAME=w{w}-{i}");
                    let out = run_plugin(
                        loopback,
                        verb,
                        &[("CNI_NETNS", netns), ("CNI_ARGS", Some(&args))],
                        conf,
                    );
                    let _ = out;
                }
            });
        }
    });
    let mut lines = 0;
    for p in [log.clone(), calllog::rotated_path(&log)] {
        let bytes = std::fs::read(&p).expect("both generations exist after the storm");
        assert!(
            bytes.len() as u64 <= BOUND,
            "{} is {} bytes, bound {BOUND}",
            p.display(),
            bytes.len()
        );
        assert!(bytes.ends_with(b"\n"), "ends with a whole line");
        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let e: Entry = serde_json::from_slice(line).unwrap_or_else(|err| {
                panic!("torn line ({err}): {}", String::from_utf8_lossy(line))
            });
            assert_eq!(e.plugin, "ferry-loopback");
            assert_eq!(e.namespace, "storm");
            lines += 1;
        }
    }
    assert!(lines > 0 && lines <= CALLS, "{lines}");
    let errors = calllog::read_all(&log)
        .iter()
        .filter(|e| !e.is_ok())
        .count();
    assert!(errors > 0, "the failed calls are logged too");
}
