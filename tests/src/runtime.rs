//! Real container runtimes (containerd + `ctr`, containerd's CRI plugin as
//! [`crate::cri`] drives it, podman) running ferry's plugins on a "node" the
//! test creates, without touching the host's runtime state.
//!
//! A [`Node`] is a network namespace plus a private mount namespace held open
//! by a small holder process (`unshare -m --propagation private … sleep`).
//! Inside it the fixed paths runtimes read are replaced by the test's own
//! directories: a tmpfs on `/run` (containerd's sockets, runc state,
//! `/run/netns`), and bind mounts over `/etc/cni`, `/var/lib/cni` (libcni's
//! result cache), `/var/lib/containers` (podman's blob cache) and
//! `/opt/cni/bin` (`/opt` itself is shadowed by a tmpfs
//! that keeps its entries, since `/opt/cni` does not exist on the host).
//! `/sys` is remounted for the node's netns (as `ip netns exec` does) with the
//! host's cgroup mounts put back, because runc needs them. Every runtime
//! process is started with `nsenter` into both namespaces, so bridges, veths
//! and nftables tables exist only in the node.
//!
//! Dropping the node kills every process of its mount namespace and their
//! descendants (containerd, shims, conmon, the containers), removes the
//! cgroups named after the node and then the directory.

use crate::{TestDir, TestNetns, bin, in_netns_cmd, unique_index, wait_until};
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long one runtime command (`ctr …`, `podman …`) may take.
pub const RUNTIME_TIMEOUT: Duration = Duration::from_secs(60);

/// The applets the test image links to busybox.
const APPLETS: &[&str] = &["sh", "sleep", "ping", "ip", "httpd", "cat", "ls", "true"];

/// What the test image's httpd serves at `/`.
pub const HTTP_MARKER: &str = "ferry-hostport-ok";

/// Whether `program` is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Root and the runtime binaries `what` needs (and /bin/busybox for the
/// test image), or a loud skip.
pub fn require_runtime(what: &str, programs: &[&str]) -> bool {
    if !crate::require_root() {
        return false;
    }
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !have(p)).collect();
    if !missing.is_empty() {
        return crate::skip(&format!(
            "{what}: {} not installed (scripts/test.sh installs them)",
            missing.join(", ")
        ));
    }
    if !Path::new("/bin/busybox").is_file() {
        return crate::skip("/bin/busybox missing (Debian's busybox-static)");
    }
    true
}

/// Runs `cmd` with a time limit; returns its output (killed after `limit`:
/// a test failure naming `cmd`).
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap_or_else(|e| panic!("wait for {what}: {e}")),
        Err(_) => {
            // SAFETY: our own child, not reaped yet (its waiter is stuck).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{what} did not finish within {limit:?}");
        }
    }
}

/// Asserts success and returns stdout.
pub fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes the holder's private mount namespace: see the module doc. `$1` is
/// the node's directory.
const HOLDER_SCRIPT: &str = r#"
set -eu
D=$1
mount -t tmpfs -o mode=755 ferry-run /run
mkdir -p "$D/stage/cgroup"
mount --rbind /sys/fs/cgroup "$D/stage/cgroup"
mount -t sysfs ferry-sys /sys
mount --rbind "$D/stage/cgroup" /sys/fs/cgroup
umount -l "$D/stage/cgroup"
# Replace directory $1 by a tmpfs holding the same entries (bind mounts,
# symlinks copied), so that new entries can be made in it privately.
shadow() {
  s=$D/stage/$(echo "$1" | tr / _)
  mkdir -p "$s"
  mount --bind "$1" "$s"
  mount -t tmpfs -o mode=755 ferry-shadow "$1"
  for e in "$s"/* "$s"/.[!.]*; do
    [ -e "$e" ] || [ -L "$e" ] || continue
    n=$1/${e##*/}
    if [ -L "$e" ]; then cp -P "$e" "$n"
    elif [ -d "$e" ]; then mkdir "$n"; mount --rbind "$e" "$n"
    else touch "$n"; mount --bind "$e" "$n"; fi
  done
}
# Bind $2 over path $1, making $1 privately when it does not exist.
over() {
  if [ ! -d "$1" ]; then
    p=$(dirname "$1")
    while [ ! -d "$p" ]; do p=$(dirname "$p"); done
    shadow "$p"
    mkdir -p "$1"
  fi
  mount --bind "$2" "$1"
}
over /etc/cni "$D/etc-cni"
over /var/lib/cni "$D/var-lib-cni"
over /opt/cni/bin "$D/bin"
# podman's blob info cache (/var/lib/containers/cache) ignores graphroot.
mkdir -p "$D/var-lib-containers"
over /var/lib/containers "$D/var-lib-containers"
ip link set lo up
echo ready
exec sleep 1000000
"#;

/// The test's node: see the module doc.
pub struct Node {
    /// The node's network namespace (bridges, veths, nft tables live here).
    pub ns: TestNetns,
    pub dir: TestDir,
    /// Unique per node: containerd namespace, cgroup parent, names.
    pub name: String,
    holder: Option<Child>,
    /// Long-running processes by their log name.
    daemons: Vec<(String, Child)>,
}

impl TestNetns {
    /// Another handle on this namespace, with a path of its own: the
    /// namespace lives while either handle does (a [`Node`] made on a lab
    /// node's namespace, see [`Node::with_netns`]).
    pub fn share(&self) -> TestNetns {
        TestNetns::open(self.path())
    }

    /// A handle on the network namespace at `path` (e.g. a pod's
    /// `/proc/<pid>/ns/net`), under a path of its own that stays valid
    /// while the handle lives.
    pub fn open(path: &Path) -> TestNetns {
        let ns = ferry_netops::NetNs::open(path)
            .unwrap_or_else(|e| panic!("open the netns {}: {e}", path.display()));
        let named = crate::unique_fd(&ns);
        let own = format!("/proc/{}/fd/{}", std::process::id(), named.as_raw_fd());
        let ns = ferry_netops::NetNs::open(&own).expect("reopen the netns by its /proc path");
        TestNetns { ns, _named: named }
    }
}

impl Node {
    pub fn new(tag: &str) -> Node {
        Node::with_netns(tag, TestNetns::new())
    }

    /// A node on an existing network namespace (a lab node's, whose ferryd
    /// and underlay link the lab made).
    pub fn with_netns(tag: &str, ns: TestNetns) -> Node {
        let dir = TestDir::new(tag);
        let name = format!("ft{}x{}", std::process::id(), unique_index());
        for d in [
            "etc-cni/net.d",
            "bin",
            "var-lib-cni",
            "stage",
            "ipam",
            "log",
        ] {
            std::fs::create_dir_all(dir.path().join(d)).expect("node dirs");
        }
        let mut node = Node {
            ns,
            dir,
            name,
            holder: None,
            daemons: Vec::new(),
        };
        node.install_plugins();
        node.start_holder();
        node
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// CNI config dir the runtimes read (seen as /etc/cni/net.d inside).
    pub fn conf_dir(&self) -> PathBuf {
        self.path("etc-cni/net.d")
    }

    /// CNI plugin dir (seen as /opt/cni/bin inside).
    pub fn bin_dir(&self) -> PathBuf {
        self.path("bin")
    }

    /// ferry-ipam's dataDir for the conflists of this node.
    pub fn ipam_dir(&self) -> PathBuf {
        self.path("ipam")
    }

    /// libcni's cache (/var/lib/cni inside).
    pub fn cni_cache(&self) -> PathBuf {
        self.path("var-lib-cni")
    }

    /// Every plugin call of the runtime, one line each:
    /// `<COMMAND> <CNI_CONTAINERID> netns=<CNI_NETNS> args=<CNI_ARGS>`.
    pub fn call_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("log/calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Copies ferry's plugins into the bin dir (copies: a rebuild of
    /// target/debug during the test must not change them). ferry-bridge is
    /// wrapped by a script that logs each call, then execs it. `loopback` is
    /// ferry-loopback, for runtimes that add the loopback network by type.
    fn install_plugins(&self) {
        let bin_dir = self.bin_dir();
        let copy = |name: &str, src: &Path, to: &str| {
            std::fs::copy(src, bin_dir.join(to))
                .unwrap_or_else(|e| panic!("copy {name} to {}: {e}", bin_dir.display()));
        };
        for name in [
            "ferry-loopback",
            "ferry-ipam",
            "ferry-portmap",
            "ferry-bandwidth",
        ] {
            copy(name, &bin(name), name);
        }
        copy("ferry-bridge", &bin("ferry-bridge"), "ferry-bridge.real");
        let wrapper = format!(
            "#!/bin/sh\necho \"$CNI_COMMAND $CNI_CONTAINERID netns=$CNI_NETNS args=$CNI_ARGS\" >> {log}\nexec {real} \"$@\"\n",
            log = self.path("log/calls").display(),
            real = bin_dir.join("ferry-bridge.real").display(),
        );
        let w = bin_dir.join("ferry-bridge");
        std::fs::write(&w, wrapper).expect("write the ferry-bridge wrapper");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::os::unix::fs::symlink("ferry-loopback", bin_dir.join("loopback"))
            .expect("loopback -> ferry-loopback");
    }

    fn start_holder(&mut self) {
        let mut cmd = Command::new("unshare");
        cmd.args([
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            HOLDER_SCRIPT,
            "sh",
        ])
        .arg(self.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        in_netns_cmd(&mut cmd, self.ns.netns());
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .expect("spawn the node's mount namespace holder");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let ready = rx.recv_timeout(Duration::from_secs(20));
        if ready.as_deref().map(str::trim) != Ok("ready") {
            let _ = child.kill();
            let out = child.wait_with_output().expect("holder output");
            panic!(
                "the node's mount namespace did not come up: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.holder = Some(child);
    }

    fn holder_pid(&self) -> u32 {
        self.holder.as_ref().expect("holder runs").id()
    }

    /// `program args…` inside the node (both namespaces), not yet spawned.
    /// Paths given to it must be absolute (entering a mount namespace moves
    /// the working directory to its root).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.holder_pid().to_string(), "-m", "-n", "--"])
            .arg(program);
        cmd
    }

    /// Runs `program args` in the node and returns its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut cmd = self.command(program);
        cmd.args(args);
        output_within(&mut cmd, RUNTIME_TIMEOUT)
    }

    /// Starts a long-running process in the node (stdout and stderr to
    /// `log/<log>`); it is killed when the node drops.
    pub fn spawn_daemon(&mut self, program: &str, args: &[&str], log: &str) {
        // Appended: a restarted daemon's log keeps its first run.
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("log").join(log))
            .expect("daemon log");
        let mut cmd = self.command(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup log"))
            .stderr(f);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        self.daemons.push((log.to_string(), child));
    }

    /// Stops the daemon started with log name `log` by `signal` and waits
    /// for it (SIGKILL after 20 s). What it started (shims) keeps running.
    pub fn stop_daemon(&mut self, log: &str, signal: libc::c_int) {
        let Some(at) = self.daemons.iter().position(|(l, _)| l == log) else {
            panic!("no daemon {log} runs");
        };
        let (_, mut child) = self.daemons.remove(at);
        // SAFETY: plain syscall on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
        let exited = wait_until(Duration::from_secs(20), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path("log").join(name)).unwrap_or_default()
    }

    /// Writes `<conf dir>/<file>`.
    pub fn write_conf(&self, file: &str, conf: &Value) {
        std::fs::write(
            self.conf_dir().join(file),
            serde_json::to_string_pretty(conf).expect("json"),
        )
        .expect("write the conflist");
    }

    /// The reservations left in ferry-ipam's store of `network`.
    pub fn reservations(&self, network: &str) -> Vec<String> {
        crate::store_leftovers(&self.ipam_dir().join(network))
    }

    /// Host-side veths in the node.
    pub fn veths(&self) -> Vec<String> {
        self.ns.links_of_kind("veth")
    }

    /// The node's whole nftables ruleset, as text.
    pub fn nft_ruleset(&self) -> String {
        self.ns.exec("nft", &["list", "ruleset"])
    }

    /// Gives the node an uplink: a veth `eth0` with `node_ip`/24, whose peer
    /// is `eth0` with `peer_ip`/24 in a new namespace (an "outside" client).
    pub fn add_uplink(&self, node_ip: &str, peer_ip: &str) -> TestNetns {
        let client = TestNetns::new();
        client.exec("ip", &["link", "set", "lo", "up"]);
        let peer = format!("up{}", unique_index());
        self.ns.exec(
            "ip",
            &["link", "add", "eth0", "type", "veth", "peer", "name", &peer],
        );
        let client_pid_ns = client.path_str();
        self.ns
            .exec("ip", &["link", "set", &peer, "netns", &client_pid_ns]);
        client.exec("ip", &["link", "set", &peer, "name", "eth0"]);
        for (ns, ip) in [(&self.ns, node_ip), (&client, peer_ip)] {
            ns.exec("ip", &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            ns.exec("ip", &["link", "set", "eth0", "up"]);
        }
        client
    }

    /// Kills every process of the node's mount namespace and everything they
    /// started (containers live in their own namespaces but descend from a
    /// shim or conmon in this one), then the holder.
    fn kill_all(&mut self) {
        for (_, d) in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
        let Some(holder) = self.holder.as_ref() else {
            return;
        };
        let mnt = std::fs::read_link(format!("/proc/{}/ns/mnt", holder.id())).ok();
        let own = std::process::id();
        for _ in 0..50 {
            let victims = mnt
                .as_ref()
                .map(|m| tree_of_mount_ns(m, holder.id(), own))
                .unwrap_or_default();
            if victims.is_empty() {
                break;
            }
            for pid in victims {
                // SAFETY: plain syscall; the pids were just read from /proc.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(mut h) = self.holder.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
    }

    /// Removes the cgroups named after this node (runtimes create
    /// `/<name>/…` in every hierarchy), deepest first.
    fn remove_cgroups(&self) {
        let Ok(hier) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for h in hier.flatten() {
            let root = h.path().join(&self.name);
            if root.is_dir() {
                rmdir_tree(&root);
            }
        }
    }
}

fn rmdir_tree(d: &Path) {
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = wait_until(Duration::from_secs(2), || {
        std::fs::remove_dir(d).is_ok() || !d.exists()
    });
}

/// Pids (other than `holder` and `own`) in mount namespace `mnt`, plus all
/// their descendants.
fn tree_of_mount_ns(mnt: &Path, holder: u32, own: u32) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    let mut roots = BTreeSet::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.first() == Some(&"Z") {
            continue;
        }
        if let Some(pp) = f.get(1).and_then(|s| s.parse().ok()) {
            parent.insert(pid, pp);
        }
        if std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .ok()
            .as_deref()
            == Some(mnt)
        {
            roots.insert(pid);
        }
    }
    roots.remove(&holder);
    roots.remove(&own);
    let mut all = roots.clone();
    loop {
        let more: Vec<u32> = parent
            .iter()
            .filter(|(p, pp)| all.contains(pp) && !all.contains(p))
            .map(|(p, _)| *p)
            .collect();
        if more.is_empty() {
            break;
        }
        all.extend(more);
    }
    all.remove(&own);
    all.into_iter().collect()
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_all();
        self.remove_cgroups();
    }
}

/// The test image: /bin/busybox (Debian's busybox-static) with applet
/// symlinks and /www/index.html for httpd. Returns the rootfs directory.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "www", "etc", "proc", "sys", "dev", "tmp", "run"] {
        std::fs::create_dir_all(root.join(d)).expect("rootfs dirs");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("copy /bin/busybox (is busybox-static installed?)");
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).expect("applet link");
    }
    std::fs::write(root.join("www/index.html"), format!("{HTTP_MARKER}\n")).expect("index");
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
    root
}

/// `tar -C rootfs -cf <out> .`
pub fn tar_dir(rootfs: &Path, out: &Path) {
    let mut cmd = Command::new("tar");
    cmd.arg("-C")
        .arg(rootfs)
        .args(["--owner=0", "--group=0", "--numeric-owner", "-cf"])
        .arg(out)
        .arg(".");
    ok(output_within(&mut cmd, RUNTIME_TIMEOUT), "tar");
}

/// A docker-archive image (what `docker save` writes, and `ctr image
/// import` reads) of `rootfs` tagged `reference`, built offline: one layer,
/// its sha256 as the diff ID, a minimal config.
pub fn docker_archive(rootfs: &Path, reference: &str, work: &Path) -> PathBuf {
    docker_archive_of(rootfs, &[reference], &["/bin/sh"], work)
}

/// [`docker_archive`] with several tags and the image's command `cmd`.
pub fn docker_archive_of(rootfs: &Path, tags: &[&str], cmd: &[&str], work: &Path) -> PathBuf {
    let stage = work.join("image");
    std::fs::create_dir_all(&stage).expect("image dir");
    let layer = stage.join("layer.tar");
    tar_dir(rootfs, &layer);
    let mut sum = Command::new("sha256sum");
    sum.arg(&layer);
    let digest = ok(output_within(&mut sum, RUNTIME_TIMEOUT), "sha256sum")
        .split_whitespace()
        .next()
        .expect("sha256sum prints the digest")
        .to_string();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{digest}")]},
        "history": [{"created_by": "ferry tests: busybox-static"}],
    });
    std::fs::write(stage.join("config.json"), config.to_string()).expect("config.json");
    let manifest = json!([{
        "Config": "config.json",
        "RepoTags": tags,
        "Layers": ["layer.tar"],
    }]);
    std::fs::write(stage.join("manifest.json"), manifest.to_string()).expect("manifest.json");
    let out = work.join("image.tar");
    let mut cmd = Command::new("tar");
    cmd.arg("-C").arg(&stage).arg("-cf").arg(&out).args([
        "manifest.json",
        "config.json",
        "layer.tar",
    ]);
    ok(output_within(&mut cmd, RUNTIME_TIMEOUT), "tar the image");
    out
}

/// The IPv4 address of `eth0` in `ip -j -4 addr show dev eth0` output.
pub fn eth0_ipv4(ip_json: &str) -> Option<std::net::Ipv4Addr> {
    let v: Value = serde_json::from_str(ip_json).ok()?;
    v.get(0)?["addr_info"]
        .as_array()?
        .iter()
        .find(|a| a["family"] == "inet")?["local"]
        .as_str()?
        .parse()
        .ok()
}

/// busybox `ip -4 addr show dev eth0` (no JSON): the first `inet a.b.c.d/n`.
pub fn busybox_eth0_ipv4(text: &str) -> Option<std::net::Ipv4Addr> {
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// containerd started by the test in a [`Node`], driven with `ctr`.
pub struct Containerd {
    pub sock: PathBuf,
    /// containerd namespace (also the cgroup parent: `/<namespace>/<id>`).
    pub namespace: String,
}

/// The image reference the tests import.
pub const IMAGE: &str = "ferry.test/busybox:latest";

impl Containerd {
    /// Writes its config (own root, state, socket; the CRI plugin's CNI dirs
    /// are the node's) and starts it; waits until `ctr version` answers.
    pub fn start(node: &mut Node) -> Containerd {
        let cri = format!(
            "[plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = {bin:?}\n  conf_dir = {conf:?}\n",
            bin = node.bin_dir().display().to_string(),
            conf = node.conf_dir().display().to_string(),
        );
        let namespace = node.name.clone();
        Containerd::start_with(node, namespace, &cri)
    }

    /// containerd as a Kubernetes node runs it, for kubelet's path: its CRI
    /// plugin with the node's CNI bin dir, `conf_dir` and `sandbox_image`
    /// (imported later into the `k8s.io` namespace, which `ctr` then uses).
    /// What this sandbox needs: no SELinux or AppArmor, and
    /// `restrict_oom_score_adj` (root here lacks CAP_SYS_RESOURCE, so the
    /// sandbox's oom_score_adj may not go below containerd's own).
    pub fn start_cri(node: &mut Node, conf_dir: &Path, sandbox_image: &str) -> Containerd {
        let cri = format!(
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n\
             \x20 sandbox_image = {sandbox_image:?}\n\
             \x20 enable_selinux = false\n\
             \x20 disable_apparmor = true\n\
             \x20 restrict_oom_score_adj = true\n\
             \x20 enable_unprivileged_ports = true\n\
             \x20 enable_unprivileged_icmp = true\n\
             \x20 stream_server_address = \"127.0.0.1\"\n\
             \x20 stream_server_port = \"0\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
             \x20 snapshotter = \"overlayfs\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
             \x20 bin_dir = {bin:?}\n\
             \x20 conf_dir = {conf:?}\n\
             \x20 max_conf_num = 1\n",
            bin = node.bin_dir().display().to_string(),
            conf = conf_dir.display().to_string(),
        );
        Containerd::start_with(node, "k8s.io".into(), &cri)
    }

    /// Writes the config, `plugins` being its CRI tables, and starts it.
    fn start_with(node: &mut Node, namespace: String, plugins: &str) -> Containerd {
        let sock = node.path("containerd.sock");
        let config = format!(
            "version = 2\nroot = {root:?}\nstate = {state:?}\n\
             [grpc]\n  address = {sock:?}\n\
             [ttrpc]\n  address = {ttrpc:?}\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt:?}\n{plugins}",
            // Not /opt/containerd: the host's /opt is shadowed only when
            // /opt/cni does not exist there.
            opt = node.path("containerd-opt").display().to_string(),
            root = node.path("containerd-root").display().to_string(),
            state = node.path("containerd-state").display().to_string(),
            sock = sock.display().to_string(),
            ttrpc = node.path("containerd-ttrpc.sock").display().to_string(),
        );
        std::fs::write(node.path("containerd.toml"), config).expect("containerd.toml");
        let c = Containerd { sock, namespace };
        c.spawn(node);
        c
    }

    /// Starts containerd with the config written before; waits until `ctr
    /// version` answers.
    fn spawn(&self, node: &mut Node) {
        let cfg = node.path("containerd.toml").display().to_string();
        node.spawn_daemon("containerd", &["--config", &cfg], "containerd");
        let up = wait_until(Duration::from_secs(30), || {
            self.sock.exists() && self.ctr(node, &["version"]).status.success()
        });
        assert!(
            up,
            "containerd did not come up:\n{}",
            node.log("containerd")
        );
    }

    /// Restarts containerd as `systemctl restart` does: SIGTERM to
    /// containerd alone (the shims and their containers keep running), then
    /// the same config again.
    pub fn restart(&self, node: &mut Node) {
        node.stop_daemon("containerd", libc::SIGTERM);
        self.spawn(node);
    }

    /// Imports the test image (see [`busybox_rootfs`]) under `tags`, its
    /// command being `cmd`.
    pub fn import_busybox(&self, node: &Node, tags: &[&str], cmd: &[&str]) {
        let work = node.path("image-build");
        std::fs::create_dir_all(&work).expect("image dir");
        let rootfs = busybox_rootfs(&work);
        let archive = docker_archive_of(&rootfs, tags, cmd, &work);
        ok(
            self.ctr(node, &["image", "import", &archive.display().to_string()]),
            "ctr image import",
        );
    }

    fn ctr_command(&self, node: &Node, args: &[&str]) -> Command {
        let mut cmd = node.command("ctr");
        cmd.args(["--address", &self.sock.display().to_string()])
            .args(["--namespace", &self.namespace])
            .args(args);
        cmd
    }

    /// `ctr <args>` in the node.
    pub fn ctr(&self, node: &Node, args: &[&str]) -> Output {
        output_within(&mut self.ctr_command(node, args), RUNTIME_TIMEOUT)
    }

    /// `ctr run --rm --cni <image> <id> <args…>` in the background, as a
    /// user would run it (not detached: only then does ctr remove the
    /// network when the task exits). Its output goes to `log/ctr-<id>`.
    pub fn run_cni(&self, node: &Node, id: &str, args: &[&str]) -> Child {
        let f = std::fs::File::create(node.path("log").join(format!("ctr-{id}"))).expect("log");
        let mut all = vec!["run", "--rm", "--cni", IMAGE, id];
        all.extend_from_slice(args);
        let mut cmd = self.ctr_command(node, &all);
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f);
        die_with_parent(&mut cmd);
        cmd.spawn().expect("spawn ctr run")
    }

    /// Waits until task `id` is RUNNING (per `ctr task ls`).
    pub fn wait_running(&self, node: &Node, id: &str) -> bool {
        wait_until(Duration::from_secs(30), || {
            let out = self.ctr(node, &["task", "ls"]);
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.split_whitespace().next() == Some(id) && l.contains("RUNNING"))
        })
    }

    /// `ctr task exec` of `args` in task `id`.
    pub fn exec(&self, node: &Node, id: &str, args: &[&str]) -> Output {
        let exec_id = format!("e{}", unique_index());
        let mut all = vec!["task", "exec", "--exec-id", &exec_id, id];
        all.extend_from_slice(args);
        self.ctr(node, &all)
    }
}

/// podman with the CNI backend, its own storage, run root, network config
/// dir (ferry's conflists) and plugin dir (ferry's binaries), in a [`Node`].
pub struct Podman {
    conf: PathBuf,
    storage: PathBuf,
    /// The node's name: the cgroup parent of every container.
    cgroup_parent: String,
}

impl Podman {
    pub fn new(node: &Node) -> Podman {
        let d = |rel: &str| {
            let p = node.path(rel);
            std::fs::create_dir_all(&p).expect("podman dirs");
            p.display().to_string()
        };
        let conf = node.path("containers.conf");
        // The default rlimits (1048576) are refused in this sandbox
        // ("error setting rlimit type 7").
        let text = format!(
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n\
             [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [{bin:?}]\nnetwork_config_dir = {net:?}\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nevents_logfile_path = {ev:?}\n\
             runtime = \"runc\"\ntmp_dir = {tmp:?}\nimage_copy_tmp_dir = {tmp:?}\nvolume_path = {vol:?}\nstatic_dir = {stat:?}\n",
            bin = node.bin_dir().display().to_string(),
            net = node.conf_dir().display().to_string(),
            ev = node.path("log/podman-events").display().to_string(),
            tmp = d("podman-tmp"),
            vol = d("podman-volumes"),
            stat = d("podman-static"),
        );
        std::fs::write(&conf, text).expect("containers.conf");
        let storage = node.path("storage.conf");
        let text = format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = {g:?}\nrunroot = {r:?}\n",
            g = d("podman-root"),
            r = d("podman-runroot"),
        );
        std::fs::write(&storage, text).expect("storage.conf");
        Podman {
            conf,
            storage,
            cgroup_parent: format!("/{}", node.name),
        }
    }

    /// `podman <args>` in the node.
    pub fn podman(&self, node: &Node, args: &[&str]) -> Output {
        let mut cmd = node.command("env");
        cmd.arg(format!("CONTAINERS_CONF={}", self.conf.display()))
            .arg(format!(
                "CONTAINERS_STORAGE_CONF={}",
                self.storage.display()
            ))
            .arg("CONTAINERS_REGISTRIES_CONF=/dev/null")
            .arg("podman")
            .args(args);
        output_within(&mut cmd, RUNTIME_TIMEOUT)
    }

    /// `podman run -d --name <name> --network <network> <extra…> IMAGE <args…>`
    /// (with NET_RAW for busybox ping); returns the container ID.
    pub fn run(
        &self,
        node: &Node,
        name: &str,
        network: &str,
        extra: &[&str],
        args: &[&str],
    ) -> String {
        let mut all = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            network,
            "--cap-add",
            "NET_RAW",
            "--cgroup-parent",
            &self.cgroup_parent,
        ];
        all.extend_from_slice(extra);
        all.push(IMAGE);
        all.extend_from_slice(args);
        ok(self.podman(node, &all), "podman run").trim().to_string()
    }
}

/// The conflist the runtime tests use, the Kubernetes chain ferryd writes:
/// ferry-bridge + ferry-ipam on `subnet` (a /24) with the node's dataDir,
/// then ferry-portmap (`portMappings` capability, so podman's `-p` reaches
/// it) and ferry-bandwidth (`bandwidth` capability). cniVersion 1.0.0: the
/// Debian 12 runtimes' libcni refuses 1.1.0 results ("unsupported CNI
/// result version").
pub fn conflist(node: &Node, network: &str, bridge: &str, subnet: &str) -> Value {
    let plugins = vec![
        json!({
            "type": "ferry-bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": true,
            "hairpinMode": true,
            "ipam": {
                "type": "ferry-ipam",
                "dataDir": node.ipam_dir(),
                "ranges": [[{"subnet": subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }),
        json!({
            "type": "ferry-portmap",
            "capabilities": {"portMappings": true},
            "snat": true,
        }),
        json!({
            "type": "ferry-bandwidth",
            "capabilities": {"bandwidth": true},
        }),
    ];
    json!({"cniVersion": "1.0.0", "name": network, "plugins": plugins})
}

/// One line of [`Node::call_log`] as (command, container ID, netns).
pub fn parse_call(line: &str) -> (String, String, String) {
    let mut w = line.split(' ');
    let cmd = w.next().unwrap_or("").to_string();
    let id = w.next().unwrap_or("").to_string();
    let netns = w
        .next()
        .and_then(|s| s.strip_prefix("netns="))
        .unwrap_or("")
        .to_string();
    (cmd, id, netns)
}

/// Flushes stderr output that must be seen even for passing tests.
pub fn note(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}
