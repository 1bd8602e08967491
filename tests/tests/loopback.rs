//! ferry-loopback, executed as a runtime executes it, against namespaces the
//! tests create (see `ferry_tests::TestNetns`).

use ferry_cni::CniResult;
use ferry_tests::{CNI_VERSIONS, PluginOutput, TestNetns, bin, require_root, run_plugin, skip};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

fn plugin() -> PathBuf {
    bin("ferry-loopback")
}

fn conf(version: &str) -> String {
    json!({"cniVersion": version, "name": "lo-test", "type": "ferry-loopback"}).to_string()
}

fn call(bin: &Path, cmd: &str, netns: &str, stdin: &str) -> PluginOutput {
    run_plugin(
        bin,
        cmd,
        &[("CNI_NETNS", Some(netns)), ("CNI_IFNAME", Some("lo"))],
        stdin,
    )
}

#[test]
fn add_check_del_every_version() {
    if !require_root() {
        return;
    }
    for &v in CNI_VERSIONS {
        let ns = TestNetns::new();
        let path = ns.path_str();
        assert!(!ns.ip_link_is_up("lo"), "{v}: lo starts down");

        let out = call(&plugin(), "ADD", &path, &conf(v));
        let json = out.ok_json();
        assert_eq!(json["cniVersion"], v, "{out:?}");
        let result = CniResult::from_json(&json).expect("result parses");
        assert_eq!(result.interfaces.len(), 1);
        assert_eq!(result.interfaces[0].name, "lo");
        assert_eq!(result.interfaces[0].mac, "00:00:00:00:00:00");
        assert_eq!(result.interfaces[0].sandbox, path);
        assert_eq!(result.ips[0].address.to_string(), "127.0.0.1/8");
        assert!(result.ips.iter().all(|ip| ip.interface == Some(0)));
        // Pre-1.0 results carry the IP version, later ones must not.
        assert_eq!(
            json["ips"][0].get("version").is_some(),
            v < "1.0.0",
            "{json}"
        );
        assert!(ns.ip_link_is_up("lo"), "{v}: lo up after ADD");
        assert!(ns.link("lo").unwrap().is_up);

        if v >= "0.4.0" {
            call(&plugin(), "CHECK", &path, &conf(v)).ok_empty();
        } else {
            // CHECK does not exist before 0.4.0: the skeleton refuses it.
            let e = call(&plugin(), "CHECK", &path, &conf(v)).err_json();
            assert_eq!(e["code"], 1, "{v}");
        }
        assert!(ns.ip_link_is_up("lo"), "{v}: CHECK changes nothing");

        call(&plugin(), "DEL", &path, &conf(v)).ok_empty();
        assert!(!ns.ip_link_is_up("lo"), "{v}: lo down after DEL");
        // DEL is idempotent.
        call(&plugin(), "DEL", &path, &conf(v)).ok_empty();
    }
}

#[test]
fn ipv6_address_only_when_enabled() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let v6 = ferry_netops::in_netns(ns.netns(), || {
        ferry_netops::sysctl::read("net/ipv6/conf/lo/disable_ipv6")
    });
    let out = call(&plugin(), "ADD", &ns.path_str(), &conf("1.0.0")).ok_json();
    let ips: Vec<&str> = out["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ip| ip["address"].as_str().unwrap())
        .collect();
    match v6.as_deref() {
        Ok("0") => assert_eq!(ips, ["127.0.0.1/8", "::1/128"]),
        _ => assert_eq!(ips, ["127.0.0.1/8"]),
    }

    // Disabled in the namespace: no ::1 in the result.
    let ns = TestNetns::new();
    if ferry_netops::in_netns(ns.netns(), || {
        ferry_netops::sysctl::write("net/ipv6/conf/lo/disable_ipv6", "1")
    })
    .is_err()
    {
        skip("IPv6 sysctls not available in this kernel");
        return;
    }
    let out = call(&plugin(), "ADD", &ns.path_str(), &conf("1.0.0")).ok_json();
    assert_eq!(
        out["ips"],
        json!([{"interface": 0, "address": "127.0.0.1/8"}])
    );
}

#[test]
fn prev_result_is_passed_through() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": ns.path_str()}],
        "ips": [{"interface": 0, "address": "10.244.1.5/24", "gateway": "10.244.1.1"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
        "dns": {"nameservers": ["10.96.0.10"]}
    });
    let stdin = json!({"cniVersion": "1.0.0", "name": "chain", "type": "ferry-loopback",
        "prevResult": prev})
    .to_string();
    let out = call(&plugin(), "ADD", &ns.path_str(), &stdin).ok_json();
    assert_eq!(
        CniResult::from_json(&out).unwrap(),
        CniResult::from_json(&prev).unwrap()
    );
    assert!(ns.ip_link_is_up("lo"), "lo is still brought up in a chain");
}

#[test]
fn version_lists_all_supported() {
    let out = run_plugin(&plugin(), "VERSION", &[], "");
    let v = out.ok_json();
    assert_eq!(v["supportedVersions"], json!(CNI_VERSIONS));
}

/// Protocol errors need no namespace: they are refused before any kernel work.
#[test]
fn protocol_errors() {
    type Env = Vec<(&'static str, Option<&'static str>)>;
    // (name, env edits, stdin, expected code, text in msg or details)
    let cases: Vec<(&str, Env, String, u64, &str)> = vec![
        (
            "malformed JSON",
            vec![("CNI_NETNS", Some("/proc/self/ns/net"))],
            "{\"cniVersion\":".into(),
            6,
            "",
        ),
        (
            "unknown cniVersion",
            vec![("CNI_NETNS", Some("/proc/self/ns/net"))],
            conf("7.7.7"),
            1,
            "7.7.7",
        ),
        (
            "missing CNI_IFNAME on ADD",
            vec![
                ("CNI_NETNS", Some("/proc/self/ns/net")),
                ("CNI_IFNAME", None),
            ],
            conf("1.0.0"),
            4,
            "CNI_IFNAME",
        ),
    ];
    for (name, env, stdin, code, needle) in cases {
        let out = run_plugin(&plugin(), "ADD", &env, &stdin);
        let e = out.err_json();
        assert_eq!(out.code, 1, "{name}");
        assert_eq!(e["code"], code, "{name}: {out:?}");
        let text = format!("{} {}", e["msg"], e["details"]);
        assert!(text.contains(needle), "{name}: {e} lacks {needle:?}");
    }
}

#[test]
fn del_after_netns_is_gone_succeeds() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let path = ns.path_str();
    call(&plugin(), "ADD", &path, &conf("1.1.0")).ok_json();
    drop(ns);
    call(&plugin(), "DEL", &path, &conf("1.1.0")).ok_empty();
}

#[test]
fn del_without_netns_succeeds() {
    for netns in [Some(""), None] {
        let out = run_plugin(&plugin(), "DEL", &[("CNI_NETNS", netns)], &conf("1.1.0"));
        out.ok_empty();
    }
}

#[test]
fn add_into_missing_netns_is_a_cni_error() {
    let missing = format!("/run/netns/ferry-test-missing-{}", std::process::id());
    let out = call(&plugin(), "ADD", &missing, &conf("1.1.0"));
    let e = out.err_json();
    assert_eq!(e["code"], 8, "{out:?}");
    assert!(e["msg"].as_str().unwrap().contains(&missing), "{e}");
    assert!(!out.stderr.contains("panicked"), "{out:?}");

    // A path that exists but is no namespace.
    let out = call(&plugin(), "ADD", "/etc/hostname", &conf("1.1.0"));
    assert_eq!(out.err_json()["code"], 8, "{out:?}");
}

#[test]
fn check_fails_after_lo_set_down_by_hand() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let path = ns.path_str();
    call(&plugin(), "ADD", &path, &conf("1.0.0")).ok_json();
    call(&plugin(), "CHECK", &path, &conf("1.0.0")).ok_empty();
    ns.exec("ip", &["link", "set", "lo", "down"]);
    let out = call(&plugin(), "CHECK", &path, &conf("1.0.0"));
    let e = out.err_json();
    assert_eq!(e["code"], 100, "{out:?}");
    assert_eq!(e["msg"], format!("lo is down in {path}"));
}

/// Our result and the reference plugin's, on the same config in two fresh
/// namespaces, must say the same (the sandbox path aside).
#[test]
fn same_result_as_reference_plugin() {
    if !require_root() {
        return;
    }
    let reference = Path::new("/usr/lib/cni/loopback");
    if !reference.is_file() {
        skip(
            "reference plugin /usr/lib/cni/loopback missing (apt-get install containernetworking-plugins)",
        );
        return;
    }
    let normalized = |bin: &Path| -> (Value, CniResult) {
        let ns = TestNetns::new();
        let out = call(bin, "ADD", &ns.path_str(), &conf("1.0.0")).ok_json();
        assert!(ns.ip_link_is_up("lo"), "{}", bin.display());
        let mut r = CniResult::from_json(&out).unwrap();
        for i in &mut r.interfaces {
            assert_eq!(i.sandbox, ns.path_str());
            i.sandbox = "<netns>".into();
        }
        call(bin, "DEL", &ns.path_str(), &conf("1.0.0")).ok_empty();
        assert!(!ns.ip_link_is_up("lo"), "{}", bin.display());
        (out["cniVersion"].clone(), r)
    };
    let ours = normalized(&plugin());
    let theirs = normalized(reference);
    assert_eq!(ours.0, theirs.0);
    assert_eq!(ours.1.interfaces, theirs.1.interfaces);
    assert_eq!(ours.1.ips, theirs.1.ips);
    assert_eq!(ours.1, theirs.1);
}

/// The harness can run a plugin from inside a fake host namespace (what the
/// bridge tests need); the plugin still reaches the pod by its CNI_NETNS path
/// and leaves the fake host's own lo alone.
#[test]
fn runs_from_a_fake_host_namespace() {
    if !require_root() {
        return;
    }
    let host = TestNetns::new();
    let pod = TestNetns::new();
    let path = pod.path_str();
    let env = [
        ("CNI_NETNS", Some(path.as_str())),
        ("CNI_IFNAME", Some("lo")),
    ];
    ferry_tests::run_plugin_in(&host, &plugin(), "ADD", &env, &conf("1.1.0")).ok_json();
    assert!(pod.ip_link_is_up("lo"));
    assert!(!host.ip_link_is_up("lo"));
}
