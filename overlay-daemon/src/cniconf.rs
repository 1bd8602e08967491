//! The node's CNI conflist and its `subnet.env`, both written atomically.
//!
//! The conflist is what the runtime executes for every pod on this node,
//! the Kubernetes chain: `ferry-bridge` with `ferry-ipam` handing out this
//! node's subnet, then `ferry-portmap` (hostPort) and `ferry-bandwidth`
//! (the bandwidth annotations), which do nothing for pods that ask for
//! neither. No loopback entry: runtimes bring up `lo` themselves. Masquerade applies only
//! to traffic leaving the cluster network (`ipMasqExclude`), so pod-to-pod
//! traffic across nodes keeps its pod source address.

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The most of a conflist or subnet.env ferryd reads back (both are a few
/// hundred bytes): a huge file there is not ours.
const MAX_READ: u64 = 1 << 20;

/// The contents of `path` when it is a regular file of at most [`MAX_READ`]
/// bytes, else `None`. Opened without blocking and checked before reading,
/// so a FIFO or a device put at the path cannot hang the daemon's loop.
fn read_regular(path: &Path) -> Option<String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    let meta = f.metadata().ok()?;
    if !meta.file_type().is_file() || meta.len() > MAX_READ {
        return None;
    }
    let mut text = String::new();
    f.take(MAX_READ).read_to_string(&mut text).ok()?;
    Some(text)
}

/// True when `path` is something other than a regular file or nothing (a
/// FIFO, socket or device): never read, replaced by the rename.
fn is_special(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| {
        let t = m.file_type();
        t.is_fifo() || t.is_socket() || t.is_block_device() || t.is_char_device()
    })
}

/// What the conflist and subnet.env say about this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNetwork {
    pub network: Ipv4Network,
    pub subnet: Ipv4Network,
    /// Dual stack: the cluster's IPv6 network and this node's IPv6 subnet.
    pub ipv6: Option<(Ipv6Network, Ipv6Network)>,
    pub mtu: u32,
    pub ip_masq: bool,
}

/// Where and under which names the files go.
#[derive(Debug, Clone)]
pub struct CniConfOptions {
    pub conf_dir: PathBuf,
    pub file_name: String,
    pub network_name: String,
    pub bridge: String,
    /// ferry-ipam's dataDir; `None` keeps its default (/var/lib/cni/networks).
    pub ipam_data_dir: Option<PathBuf>,
    /// Where ferryd publishes its readiness ([`readiness_json`]), named in
    /// ferry-bridge's `readinessFile` so STATUS reads it; `None`: no key.
    pub readiness_file: Option<PathBuf>,
    /// The CNI call log every plugin appends to (`cniLog` in each plugin's
    /// config); `None` writes no key, and the plugins log nothing.
    pub cni_log: Option<PathBuf>,
}

impl Default for CniConfOptions {
    fn default() -> Self {
        CniConfOptions {
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            file_name: "10-ferry.conflist".into(),
            network_name: "ferry".into(),
            bridge: "cni0".into(),
            ipam_data_dir: None,
            readiness_file: None,
            cni_log: None,
        }
    }
}

impl CniConfOptions {
    pub fn path(&self) -> PathBuf {
        self.conf_dir.join(&self.file_name)
    }
}

/// The conflist, pretty-printed (operators read it).
pub fn conflist(n: &NodeNetwork, o: &CniConfOptions) -> String {
    let mut ranges = vec![json!([{ "subnet": n.subnet.to_string() }])];
    let mut routes = vec![json!({ "dst": n.network.to_string() })];
    let mut masq_exclude = vec![json!(n.network.to_string())];
    if let Some((network6, subnet6)) = n.ipv6 {
        ranges.push(json!([{ "subnet": subnet6.to_string() }]));
        routes.push(json!({ "dst": network6.to_string() }));
        masq_exclude.push(json!(network6.to_string()));
    }
    let mut ipam = json!({
        "type": "ferry-ipam",
        "ranges": ranges,
        "routes": routes,
    });
    if let Some(dir) = &o.ipam_data_dir {
        ipam["dataDir"] = json!(dir);
    }
    // containerd 1.6 and podman 4 (Debian 12) refuse a 1.1.0 conflist;
    // newer runtimes pick 1.1.0 (GC, STATUS) from `cniVersions`.
    let doc = json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": o.network_name,
        "plugins": [{
            "type": "ferry-bridge",
            "bridge": o.bridge,
            "isGateway": true,
            "isDefaultGateway": true,
            "hairpinMode": true,
            "ipMasq": n.ip_masq,
            "ipMasqExclude": masq_exclude,
            "mtu": n.mtu,
            "ipam": ipam,
        }, {
            "type": "ferry-portmap",
            "capabilities": { "portMappings": true },
        }, {
            "type": "ferry-bandwidth",
            "capabilities": { "bandwidth": true },
        }],
    });
    let mut doc = doc;
    if let Some(ready) = &o.readiness_file {
        doc["plugins"][0]["readinessFile"] = json!(ready);
    }
    if let (Some(log), Some(plugins)) = (&o.cni_log, doc["plugins"].as_array_mut()) {
        for p in plugins {
            p[ferry_cni::calllog::PATH_KEY] = json!(log);
        }
    }
    let mut s = serde_json::to_string_pretty(&doc).expect("conflist serializes");
    s.push('\n');
    s
}

/// What ferryd publishes in its readiness file for ferry-bridge's STATUS
/// (plugins/bridge/src/readiness.rs reads it): ready or not and why, the
/// node's subnet, and until when the statement holds, in CLOCK_BOOTTIME
/// milliseconds of boot `boot_id`, so a ferryd that died without cleaning
/// up stops being "ready" by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub subnet: Option<Ipv4Network>,
    pub reason: String,
    pub boot_id: String,
    pub valid_until_boottime_ms: u64,
}

/// The readiness file's text (format version 1, one line of JSON).
pub fn readiness_json(r: &Readiness, updated_unix: u64) -> String {
    let mut s = json!({
        "version": 1,
        "ready": r.ready,
        "subnet": r.subnet.map(|s| s.to_string()),
        "bootId": r.boot_id,
        "validUntilBoottimeMs": r.valid_until_boottime_ms,
        "reason": r.reason,
        "updatedUnix": updated_unix,
    })
    .to_string();
    s.push('\n');
    s
}

pub use ferry_netops::boot::boottime_ms;

/// This boot's ID, or "" when /proc does not say.
pub fn boot_id() -> String {
    ferry_netops::boot::boot_id().unwrap_or_default()
}

/// flannel's subnet.env shape with FERRY_ names, for scripts and tools.
pub fn subnet_env(n: &NodeNetwork) -> String {
    let gateway = Ipv4Network::new(
        std::net::Ipv4Addr::from(u32::from(n.subnet.network()) + 1),
        n.subnet.prefix(),
    )
    .expect("prefix is valid");
    let mut s = format!(
        "FERRY_NETWORK={}\nFERRY_SUBNET={}\nFERRY_MTU={}\nFERRY_IPMASQ={}\n",
        n.network, gateway, n.mtu, n.ip_masq
    );
    if let Some((network6, subnet6)) = n.ipv6 {
        // flannel's FLANNEL_IPV6_SUBNET shape: the gateway (::1) and the length.
        let gateway6 = Ipv6Network::new(
            std::net::Ipv6Addr::from(u128::from(subnet6.network()) + 1),
            subnet6.prefix(),
        )
        .expect("prefix is valid");
        s.push_str(&format!(
            "FERRY_IPV6_NETWORK={network6}\nFERRY_IPV6_SUBNET={gateway6}\n"
        ));
    }
    s
}

/// The node subnet recorded in a subnet.env, if the file is there and sane:
/// the subnet a restarted daemon asks for first.
pub fn read_subnet_env(path: &Path) -> Option<Ipv4Network> {
    let text = read_regular(path)?;
    let value = text.lines().find_map(|l| l.strip_prefix("FERRY_SUBNET="))?;
    let gw: Ipv4Network = value.trim().parse().ok()?;
    Ipv4Network::new(gw.network(), gw.prefix()).ok()
}

/// Writes `contents` to `path` so that a reader sees the old file or the new
/// one, never a part: a hidden temp file in the same directory (runtimes
/// ignore dot files and other extensions), fsync, rename. Unchanged contents
/// are not rewritten, so runtimes watching the directory see no churn.
/// Returns whether the file changed.
///
/// Neither file is trusted: the old one is read only when it is a regular
/// file (a FIFO there would block the daemon), and the temp file is created
/// exclusively (O_EXCL never follows a symlink planted at its name).
pub fn write_atomic(path: &Path, contents: &str) -> std::io::Result<bool> {
    if !is_special(path) && read_regular(path).is_some_and(|old| old == contents) {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        // Once per lease change, not per pod: a torn conflist after a crash
        // would stop every pod on the node, so this one is synced.
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn node() -> NodeNetwork {
        NodeNetwork {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.3.0/24".parse().unwrap(),
            ipv6: None,
            mtu: 1450,
            ip_masq: true,
        }
    }

    #[test]
    fn conflist_is_a_valid_chain_for_this_node() {
        let o = CniConfOptions {
            ipam_data_dir: Some("/tmp/x".into()),
            ..Default::default()
        };
        let text = conflist(&node(), &o);
        let list = ferry_cni::config::NetConfList::parse(text.as_bytes()).unwrap();
        assert_eq!(list.name, "ferry");
        assert_eq!(
            list.cni_version, "1.0.0",
            "what Debian 12's runtimes accept"
        );
        assert_eq!(list.negotiated_version().unwrap().as_str(), "1.1.0");
        let v: Value = serde_json::from_str(&text).unwrap();
        let bridge = &v["plugins"][0];
        let types: Vec<&str> = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            ["ferry-bridge", "ferry-portmap", "ferry-bandwidth"],
            "the Kubernetes chain, no loopback entry"
        );
        assert_eq!(v["plugins"][1]["capabilities"]["portMappings"], true);
        assert_eq!(v["plugins"][2]["capabilities"]["bandwidth"], true);
        assert_eq!(bridge["type"], "ferry-bridge");
        assert_eq!(bridge["mtu"], 1450);
        assert_eq!(bridge["ipMasqExclude"][0], "10.244.0.0/16");
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.244.3.0/24");
        assert_eq!(bridge["ipam"]["dataDir"], "/tmp/x");
        assert!(bridge.get("cniLog").is_none(), "no log asked: no key");
        let logged = CniConfOptions {
            cni_log: Some("/run/ferry/cni.log".into()),
            ..o
        };
        let v: Value = serde_json::from_str(&conflist(&node(), &logged)).unwrap();
        for p in v["plugins"].as_array().unwrap() {
            assert_eq!(p["cniLog"], "/run/ferry/cni.log", "every plugin logs: {p}");
        }
    }

    #[test]
    fn subnet_env_round_trips_the_subnet() {
        let dir = std::env::temp_dir().join(format!("ferryd-env-{}", std::process::id()));
        let path = dir.join("subnet.env");
        let text = subnet_env(&node());
        assert!(text.contains("FERRY_SUBNET=10.244.3.1/24\n"), "{text}");
        assert!(write_atomic(&path, &text).unwrap());
        assert!(
            !write_atomic(&path, &text).unwrap(),
            "unchanged: not rewritten"
        );
        assert_eq!(
            read_subnet_env(&path),
            Some("10.244.3.0/24".parse().unwrap())
        );
        std::fs::write(&path, "FERRY_SUBNET=garbage\n").unwrap();
        assert_eq!(read_subnet_env(&path), None);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn special_files_and_symlinks_are_never_read_or_written_through() {
        let dir = std::env::temp_dir().join(format!("ferryd-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("subnet.env");
        // A FIFO at the path: reading it would block forever.
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(read_subnet_env(&path), None);
        let text = subnet_env(&node());
        assert!(write_atomic(&path, &text).unwrap(), "replaced by a file");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(
            read_subnet_env(&path),
            Some("10.244.3.0/24".parse().unwrap())
        );
        // A symlink planted at the temp file's name is not followed.
        let victim = dir.join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let tmp = dir.join(format!(".subnet.env.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let changed = NodeNetwork {
            mtu: 1400,
            ..node()
        };
        assert!(write_atomic(&path, &subnet_env(&changed)).unwrap());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("FERRY_MTU=1400")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn conflist_names_the_readiness_file_only_when_there_is_one() {
        let o = CniConfOptions {
            readiness_file: Some("/run/ferry/ready".into()),
            ..Default::default()
        };
        let v: Value = serde_json::from_str(&conflist(&node(), &o)).unwrap();
        assert_eq!(v["plugins"][0]["readinessFile"], "/run/ferry/ready");
        assert!(v["plugins"][1].get("readinessFile").is_none());
        let v: Value =
            serde_json::from_str(&conflist(&node(), &CniConfOptions::default())).unwrap();
        assert!(v["plugins"][0].get("readinessFile").is_none());
    }

    #[test]
    fn readiness_file_format() {
        let r = Readiness {
            ready: true,
            subnet: Some("10.244.3.0/24".parse().unwrap()),
            reason: String::new(),
            boot_id: boot_id(),
            valid_until_boottime_ms: boottime_ms() + 30_000,
        };
        let text = readiness_json(&r, 1_700_000_000);
        assert!(text.ends_with('\n') && text.len() < 512, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["ready"], true);
        assert_eq!(v["subnet"], "10.244.3.0/24");
        assert_eq!(v["bootId"].as_str().unwrap().len(), 36, "{text}");
        assert!(v["validUntilBoottimeMs"].as_u64().unwrap() > boottime_ms());
        assert_eq!(v["updatedUnix"], 1_700_000_000u64);
        let not_ready = readiness_json(
            &Readiness {
                ready: false,
                subnet: None,
                reason: "starting".into(),
                ..r
            },
            1,
        );
        let v: Value = serde_json::from_str(&not_ready).unwrap();
        assert_eq!(
            (v["ready"].as_bool(), v["subnet"].is_null()),
            (Some(false), true)
        );
        assert_eq!(v["reason"], "starting");
    }

    #[test]
    fn dual_stack_conflist_and_env() {
        let n = NodeNetwork {
            ipv6: Some((
                "fd00:244::/56".parse().unwrap(),
                "fd00:244:0:3::/64".parse().unwrap(),
            )),
            ..node()
        };
        let text = conflist(&n, &CniConfOptions::default());
        ferry_cni::config::NetConfList::parse(text.as_bytes()).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let bridge = &v["plugins"][0];
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.244.3.0/24");
        assert_eq!(
            bridge["ipam"]["ranges"][1][0]["subnet"],
            "fd00:244:0:3::/64"
        );
        assert_eq!(bridge["ipam"]["routes"][0]["dst"], "10.244.0.0/16");
        assert_eq!(bridge["ipam"]["routes"][1]["dst"], "fd00:244::/56");
        assert_eq!(
            bridge["ipMasqExclude"],
            serde_json::json!(["10.244.0.0/16", "fd00:244::/56"])
        );
        let env = subnet_env(&n);
        assert!(env.contains("FERRY_IPV6_NETWORK=fd00:244::/56\n"), "{env}");
        assert!(
            env.contains("FERRY_IPV6_SUBNET=fd00:244:0:3::1/64\n"),
            "{env}"
        );
        assert!(env.contains("FERRY_SUBNET=10.244.3.1/24\n"), "{env}");
        // IPv4 only: nothing about IPv6.
        let v4 = conflist(&node(), &CniConfOptions::default());
        assert!(!v4.contains("fd00"));
        assert!(!subnet_env(&node()).contains("IPV6"));
    }
}
