//! Delegation executes a real IPAM plugin as a separate process: the
//! reference `host-local` from Debian's containernetworking-plugins, with a
//! data directory inside the test's own temp dir.

use ferry_cni::delegate::{exec_ipam, find_plugin};
use ferry_cni::skel::{CmdArgs, Command};
use ferry_cni::{CniArgs, NetConf, SpecVersion};
use std::path::{Path, PathBuf};

const REFERENCE: &str = "/usr/lib/cni";

fn reference_available() -> bool {
    if Path::new(REFERENCE).join("host-local").exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{REFERENCE}/host-local missing: scripts/test.sh installs containernetworking-plugins"
        );
    }
    eprintln!(
        "SKIPPED: {REFERENCE}/host-local not installed (apt-get install containernetworking-plugins)"
    );
    false
}

fn args(command: Command, id: &str, path: Vec<PathBuf>) -> CmdArgs {
    CmdArgs {
        command,
        container_id: id.into(),
        netns: Some("/proc/self/ns/net".into()),
        ifname: "eth0".into(),
        args: CniArgs::default(),
        raw_args: String::new(),
        path,
        version: SpecVersion::V1_0_0,
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-cni-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn ipam_add_del_and_error_codes_pass_through() {
    if !reference_available() {
        return;
    }
    let dir = temp_dir("delegate");
    let conf = |subnet: &str| {
        NetConf::parse(
            format!(
                r#"{{"cniVersion":"1.0.0","name":"deleg","type":"bridge",
                    "ipam":{{"type":"host-local","dataDir":"{}","subnet":"{subnet}"}}}}"#,
                dir.display()
            )
            .as_bytes(),
        )
        .unwrap()
    };
    let path = vec![PathBuf::from("/nonexistent"), PathBuf::from(REFERENCE)];

    let good = conf("10.99.0.0/29");
    let r = exec_ipam(Command::Add, &args(Command::Add, "c1", path.clone()), &good)
        .unwrap()
        .expect("ADD returns a result");
    assert_eq!(r.ips.len(), 1);
    assert_eq!(r.ips[0].address.to_string(), "10.99.0.2/29");
    assert!(dir.join("deleg").join("10.99.0.2").exists());

    assert!(
        exec_ipam(Command::Del, &args(Command::Del, "c1", path.clone()), &good)
            .unwrap()
            .is_none()
    );
    assert!(!dir.join("deleg").join("10.99.0.2").exists());

    // host-local's own error comes back with its code, untouched.
    let bad = conf("not-a-subnet");
    let e = exec_ipam(Command::Add, &args(Command::Add, "c2", path.clone()), &bad).unwrap_err();
    assert!(!e.msg.is_empty());
    assert_ne!(e.code.as_u32(), 0);

    // A plugin not in CNI_PATH is a config error naming it.
    let e = find_plugin("no-such-ipam", &path).unwrap_err();
    assert_eq!(e.code.as_u32(), 7);
    assert!(e.msg.contains("no-such-ipam"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refuses_types_that_are_paths() {
    let e = find_plugin("../../bin/sh", &[PathBuf::from("/usr/lib/cni")]).unwrap_err();
    assert_eq!(e.code.as_u32(), 7);
}
