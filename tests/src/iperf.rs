//! iperf3 runs for the shaping tests: a server in a namespace, killed on
//! drop, and the rate one client run measured.

use crate::{TestNetns, in_netns_cmd, kill_child};
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An iperf3 server in a namespace, killed on drop (also when a test fails).
pub struct Iperf3Server(Child);

impl Iperf3Server {
    pub fn start(ns: &TestNetns, bind: &str) -> Iperf3Server {
        let mut cmd = Command::new("iperf3");
        cmd.args(["-s", "-B", bind])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        in_netns_cmd(&mut cmd, ns.netns());
        Iperf3Server(cmd.spawn().expect("iperf3 (scripts/test.sh installs it)"))
    }
}

impl Drop for Iperf3Server {
    fn drop(&mut self) {
        kill_child(&self.0);
        let _ = self.0.wait();
    }
}

/// Bits per second received in an iperf3 run from `client` to the server
/// at `server` (`reverse`: the server sends), `secs` seconds long, the first
/// `omit` not counted (with "0", a bucket that lets the first seconds pass
/// unshaped shows in the rate).
pub fn iperf3_for(client: &TestNetns, server: &str, reverse: bool, secs: &str, omit: &str) -> f64 {
    let mut args = vec!["-c", server, "-J", "-t", secs, "-O", omit];
    if reverse {
        args.push("-R");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = client.try_exec("iperf3", &args);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        // iperf3 3.12 with -J exits 0 even when it could not connect (the
        // server not listening yet): the report's "error" says so.
        if out.status.success() && report["error"].is_null() {
            return report["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or_else(|| panic!("iperf3 report without sum_received: {report}"));
        }
        // The server may not listen yet.
        assert!(
            Instant::now() < deadline,
            "iperf3 {args:?} failed: {report} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
