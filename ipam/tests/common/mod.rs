//! Shared helpers of the process-level tests: a temp data dir removed on
//! drop (even when the test panics) and a runner for the built binary.
#![allow(dead_code)]

use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

pub const BIN: &str = env!("CARGO_BIN_EXE_ferry-ipam");
pub const HOST_LOCAL: &str = "/usr/lib/cni/host-local";

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "ferry-ipam-it-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// An existing path to pass as CNI_NETNS (ferry records it; a missing
    /// one would make the reservation provably stale).
    pub fn netns(&self) -> PathBuf {
        let p = self.0.join("netns");
        if !p.exists() {
            std::fs::write(&p, "").unwrap();
        }
        p
    }
    pub fn net_dir(&self) -> PathBuf {
        self.0.join("data").join("net1")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A network config with this ipam section and the data dir of `d`.
pub fn conf(d: &TempDir, version: &str, plugin_type: &str, mut ipam: Value) -> Value {
    ipam["type"] = json!(plugin_type);
    ipam["dataDir"] = json!(d.path().join("data"));
    json!({"cniVersion": version, "name": "net1", "type": "ferry-bridge", "ipam": ipam})
}

pub fn command(bin: &str, verb: &str, id: &str, ifname: &str, netns: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env_clear()
        .env("CNI_COMMAND", verb)
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !id.is_empty() {
        c.env("CNI_CONTAINERID", id)
            .env("CNI_IFNAME", ifname)
            .env("CNI_NETNS", netns);
    }
    c
}

pub fn spawn(mut c: Command, conf: &Value) -> Child {
    let mut child = c.spawn().expect("spawn plugin");
    let mut stdin = child.stdin.take().unwrap();
    // A killed child may close its stdin early.
    let _ = stdin.write_all(conf.to_string().as_bytes());
    drop(stdin);
    child
}

pub struct Reply {
    pub ok: bool,
    pub json: Option<Value>,
    pub stderr: String,
}

impl Reply {
    pub fn from(o: Output) -> Reply {
        Reply {
            ok: o.status.success(),
            json: serde_json::from_slice(&o.stdout).ok(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
    pub fn code(&self) -> Option<u64> {
        self.json.as_ref()?.get("code")?.as_u64()
    }
    pub fn addresses(&self) -> Vec<String> {
        self.json
            .as_ref()
            .and_then(|j| j["ips"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|ip| ip["address"].as_str().unwrap().to_string())
            .collect()
    }
}

pub fn run(bin: &str, verb: &str, id: &str, ifname: &str, d: &TempDir, conf: &Value) -> Reply {
    let child = spawn(command(bin, verb, id, ifname, &d.netns()), conf);
    Reply::from(child.wait_with_output().unwrap())
}

/// The per-address files of the store (names that parse as addresses).
pub fn held_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// host-local present? If not: loud skip, or panic under CI.
pub fn have_host_local(test: &str) -> bool {
    if Path::new(HOST_LOCAL).exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {HOST_LOCAL} is required when CI is set");
    }
    eprintln!(
        "\n!!! SKIPPED {test}: {HOST_LOCAL} not installed (containernetworking-plugins) !!!\n"
    );
    false
}
