//! ferry-bridge's STATUS and ferryd's readiness file (`readinessFile`), with
//! files the test writes: every state the file can be in, and everything
//! that is not ferryd's file (symlink, FIFO, garbage, wrong owner or mode)
//! is "not available" (code 50) with a clear message, never a hang.
//! tests/status.rs of overlay-daemon runs the same through a real ferryd.
//!
//! STATUS touches no kernel object, so these run without root.

use ferry_tests::{TestDir, bin, run_plugin, unique_index};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const SUBNET: &str = "10.123.7.0/24";

/// A network whose bridge names `ready` as its readiness file (`None`:
/// no key, a conflist written by hand).
struct Net {
    dir: TestDir,
    name: String,
}

impl Net {
    fn new() -> Net {
        Net {
            dir: TestDir::new("status"),
            name: format!("st{}-{}", std::process::id(), unique_index()),
        }
    }

    fn ready_path(&self) -> PathBuf {
        self.dir.path().join("ready")
    }

    fn conf(&self, readiness_file: Option<Value>) -> Value {
        let mut c = json!({
            "cniVersion": "1.1.0",
            "name": self.name,
            "type": "ferry-bridge",
            "bridge": "ferrystatus0",
            "ipam": {
                "type": "ferry-ipam",
                "ranges": [[{"subnet": SUBNET}]],
                "dataDir": self.dir.path().join("ipam"),
            },
        });
        if let Some(f) = readiness_file {
            c["readinessFile"] = f;
        }
        c
    }

    /// STATUS as a runtime calls it: (exit code, the error JSON if any).
    fn status_with(&self, conf: &Value) -> (i32, Value) {
        let out = run_plugin(
            &bin("ferry-bridge"),
            "STATUS",
            &[("CNI_CONTAINERID", None), ("CNI_IFNAME", None)],
            &conf.to_string(),
        );
        if out.code == 0 {
            out.ok_empty();
            (0, Value::Null)
        } else {
            (out.code, out.err_json())
        }
    }

    /// STATUS with `readinessFile` = [`Self::ready_path`].
    fn status(&self) -> (i32, Value) {
        self.status_with(&self.conf(Some(json!(self.ready_path()))))
    }

    /// Asserts STATUS answers code 50 with a message containing `needle`.
    fn assert_unavailable(&self, needle: &str) {
        let (exit, e) = self.status();
        assert_ne!(exit, 0);
        assert_eq!(e["code"], 50, "{e}");
        let msg = e["msg"].as_str().unwrap();
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
        assert!(
            msg.contains(&self.ready_path().display().to_string()),
            "the message names the file: {msg}"
        );
    }

    fn assert_available(&self) {
        let (exit, e) = self.status();
        assert_eq!(exit, 0, "{e}");
    }
}

use ferry_netops::boot::boottime_ms;

fn boot_id() -> String {
    ferry_netops::boot::boot_id().expect("the kernel's boot_id")
}

/// What ferryd writes (overlay-daemon/src/cniconf.rs `readiness_json`).
fn ready_doc(ready: bool, subnet: &str, valid_for_ms: i64) -> Value {
    json!({
        "version": 1,
        "ready": ready,
        "subnet": subnet,
        "bootId": boot_id(),
        "validUntilBoottimeMs": (boottime_ms() as i64 + valid_for_ms).max(0),
        "reason": if ready { "" } else { "the lease of 10.123.7.0/24 was lost; acquiring one again" },
        "updatedUnix": 1_700_000_000u64,
    })
}

/// Writes `text` at `path` as ferryd would: a regular file, mode 0644.
fn write_file(path: &Path, text: &[u8]) {
    let _ = std::fs::remove_file(path);
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn write_doc(path: &Path, doc: &Value) {
    write_file(path, doc.to_string().as_bytes());
}

/// A conflist written by hand (no `readinessFile`) keeps today's STATUS:
/// success while ferry-ipam has addresses, whatever is at /run/ferry.
#[test]
fn without_the_key_status_is_as_before() {
    let net = Net::new();
    let (exit, e) = net.status_with(&net.conf(None));
    assert_eq!(exit, 0, "{e}");
}

/// Node boot: ferryd has not written the file yet.
#[test]
fn no_file_yet_is_not_available() {
    let net = Net::new();
    net.assert_unavailable("does not exist");
}

/// Ready, not ready (with ferryd's reason), expired, another boot's, a
/// stale conflist: each says so, and a fresh "ready" is success again.
#[test]
fn status_follows_what_the_file_says() {
    let net = Net::new();
    let path = net.ready_path();
    write_doc(&path, &ready_doc(true, SUBNET, 60_000));
    net.assert_available();

    write_doc(&path, &ready_doc(false, SUBNET, 60_000));
    net.assert_unavailable("was lost; acquiring one again");

    // ferryd died (or stopped renewing) 5 s after its last statement expired.
    write_doc(&path, &ready_doc(true, SUBNET, -5_000));
    net.assert_unavailable("expired 5s ago");

    let mut other_boot = ready_doc(true, SUBNET, 60_000);
    other_boot["bootId"] = json!("00000000-1111-2222-3333-444444444444");
    write_doc(&path, &other_boot);
    net.assert_unavailable("another boot");

    // The node's lease changed: this config hands out the old subnet.
    write_doc(&path, &ready_doc(true, "10.123.8.0/24", 60_000));
    net.assert_unavailable("stale");

    write_doc(&path, &ready_doc(true, SUBNET, 60_000));
    net.assert_available();
}

/// Whatever sits at the path that is not ferryd's file is refused with a
/// message saying what it is: never followed, never waited on (a FIFO with
/// no writer would block a plain open or read forever; `run_plugin` fails
/// the test after its timeout).
#[test]
fn what_is_not_ferryds_file_is_refused_without_hanging() {
    let net = Net::new();
    let path = net.ready_path();
    let good = net.dir.path().join("good");
    write_doc(&good, &ready_doc(true, SUBNET, 60_000));

    std::os::unix::fs::symlink(&good, &path).unwrap();
    net.assert_unavailable("symbolic link");
    std::fs::remove_file(&path).unwrap();

    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    net.assert_unavailable("FIFO");
    std::fs::remove_file(&path).unwrap();

    std::fs::create_dir(&path).unwrap();
    net.assert_unavailable("directory");
    std::fs::remove_dir(&path).unwrap();

    write_file(&path, b"FERRY_SUBNET=10.123.7.1/24\n");
    net.assert_unavailable("not ferryd's readiness file");

    write_file(&path, b"{\"version\":1,\"ready\":\"yes\"}");
    net.assert_unavailable("not ferryd's readiness file");

    write_file(&path, &[0xff, 0xfe, b'{', b'}']);
    net.assert_unavailable("not UTF-8");

    let mut huge = ready_doc(true, SUBNET, 60_000);
    huge["padding"] = json!("x".repeat(8000));
    write_doc(&path, &huge);
    net.assert_unavailable("more than 4096");

    let mut future = ready_doc(true, SUBNET, 60_000);
    future["version"] = json!(2);
    write_doc(&path, &future);
    net.assert_unavailable("version 2");

    let mut no_subnet = ready_doc(true, SUBNET, 60_000);
    no_subnet["subnet"] = Value::Null;
    write_doc(&path, &no_subnet);
    net.assert_unavailable("names no subnet");

    let mut bad_subnet = ready_doc(true, SUBNET, 60_000);
    bad_subnet["subnet"] = json!("10.123.7.0/99");
    write_doc(&path, &bad_subnet);
    net.assert_unavailable("not ferryd's readiness file");

    // Anyone in the group could write "ready".
    write_doc(&path, &ready_doc(true, SUBNET, 60_000));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o664)).unwrap();
    net.assert_unavailable("writable by group or others");

    // And the same file, as ferryd writes it, is fine.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    net.assert_available();
}

/// A `readinessFile` that cannot be a path ferryd writes is a config error
/// (code 7), not "not ready": the runtime would wait forever.
#[test]
fn a_bad_readiness_file_key_is_invalid_config() {
    let net = Net::new();
    for bad in [
        json!("run/ferry/ready"),
        json!(""),
        json!(5),
        json!(["/run/ferry/ready"]),
    ] {
        let (exit, e) = net.status_with(&net.conf(Some(bad.clone())));
        assert_ne!(exit, 0, "{bad}");
        assert_eq!(e["code"], 7, "{bad}: {e}");
    }
}
