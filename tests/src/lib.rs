//! Harness for black-box tests: ferry's binaries run as separate processes
//! with the CNI environment exactly as a runtime sets it, against network
//! namespaces each test creates for itself.
//!
//! Namespaces are anonymous (see [`TestNetns`]): nothing is mounted under
//! /run/netns, so nothing can leak onto the host, even when a test panics or
//! the test process is killed.

use ferry_netops::{Link, NetNs, NsHandle, block_on};
use serde_json::Value;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Once, mpsc};
use std::time::Duration;

pub mod cri;
pub mod etcd;
pub mod iperf;
pub mod lab;
pub mod portmap;
pub mod runtime;

/// How long one plugin invocation may take before the test fails.
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Every CNI version ferry speaks, oldest first.
pub const CNI_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// `true` when the test may go on. Not root: a loud skip message and `false`,
/// or a panic when `CI` is set (a skipped test must never pass in CI).
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    skip("needs root")
}

/// Reports a test that cannot run here: loud on stderr, fatal under CI.
pub fn skip(why: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("test cannot run ({why}) and CI is set: refusing to skip");
    }
    // Written to the real stderr: libtest captures `eprintln!` of passing
    // tests, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED: {} ({why}) ***",
        std::thread::current().name().unwrap_or("?")
    );
    false
}

/// A fresh network namespace owned by the test.
///
/// It is created by `unshare(CLONE_NEWNET)` on a throwaway thread and kept
/// alive only by its fd, so dropping it deletes the namespace (that is how a
/// test says "the pod's netns is gone"). A plugin reaches it through
/// [`path`](Self::path), `/proc/<test pid>/fd/<fd>`: unique, nothing mounted,
/// and it vanishes with the test process even on SIGKILL.
///
/// The fd is moved to a high number that no other namespace of this process
/// ever gets, so a path kept after drop can never name another test's
/// namespace (tests run in parallel threads of one process).
pub struct TestNetns {
    /// Opened from the path below: what in-process queries use.
    ns: NetNs,
    /// The high fd that `/proc/<pid>/fd/<n>` names; closing it (with `ns`)
    /// deletes the namespace.
    _named: OwnedFd,
}

static NEXT_FD: AtomicU32 = AtomicU32::new(0);
const FD_BASE: i32 = 1000;

impl TestNetns {
    pub fn new() -> TestNetns {
        let anon = NetNs::new_anonymous().expect("create an anonymous netns (root?)");
        let named = unique_fd(&anon);
        let path = format!("/proc/{}/fd/{}", std::process::id(), named.as_raw_fd());
        let ns = NetNs::open(&path).expect("reopen the test netns by its /proc path");
        TestNetns { ns, _named: named }
    }

    /// CNI_NETNS for this namespace.
    pub fn path(&self) -> &Path {
        self.ns.path()
    }

    pub fn path_str(&self) -> String {
        self.path().display().to_string()
    }

    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    /// The link called `name` in this namespace, read through netlink.
    pub fn link(&self, name: &str) -> Option<Link> {
        block_on(async { NsHandle::new(&self.ns)?.link_by_name(name).await })
            .expect("query the test netns")
    }

    /// Runs `program args…` inside this namespace and returns its stdout
    /// (panics with stderr on failure). For `ip`, `bridge`, `nft` assertions.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut cmd = Command::new(program);
        cmd.args(args);
        in_netns_cmd(&mut cmd, &self.ns);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} in {}: {}",
            self.path_str(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// `ip -j <args>` inside this namespace, parsed.
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.exec("ip", &all)).expect("ip -j prints JSON")
    }

    /// Whether `ifname` has IFF_UP according to `ip -j link show`.
    pub fn ip_link_is_up(&self, ifname: &str) -> bool {
        let v = self.ip_json(&["link", "show", "dev", ifname]);
        v[0]["flags"]
            .as_array()
            .expect("ip -j link has flags")
            .iter()
            .any(|f| f == "UP")
    }
}

impl Default for TestNetns {
    fn default() -> Self {
        Self::new()
    }
}

/// Dups the namespace fd to a number above [`FD_BASE`] never used before in
/// this process (falls back to the original fd if the limit is too low).
fn unique_fd(ns: &NetNs) -> OwnedFd {
    static RAISE: Once = Once::new();
    RAISE.call_once(|| {
        // Allow high fd numbers: soft limit up to the hard limit.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain syscalls on a stack struct.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    });
    let min = FD_BASE + NEXT_FD.fetch_add(1, Ordering::Relaxed) as i32;
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd we then own, or -1.
    let fd = unsafe { libc::fcntl(ns.as_fd().as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if fd >= 0 {
        // SAFETY: fresh fd from fcntl, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    } else {
        ns.as_fd().try_clone_to_owned().expect("dup netns fd")
    }
}

/// Makes `cmd` run inside `ns`: the child calls setns between fork and exec,
/// so neither the test thread nor any other thread changes namespace.
pub fn in_netns_cmd(cmd: &mut Command, ns: &NetNs) {
    let fd = ns.as_fd().as_raw_fd();
    // SAFETY: setns is async-signal-safe; the fd is inherited across fork
    // (CLOEXEC only closes it at exec, after we are done with it).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The workspace root, from this crate's manifest dir.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

/// A built ferry binary: `$FERRY_BIN_DIR/<name>` or `<workspace>/target/debug/<name>`.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("FERRY_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target").join("debug"));
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "{} is missing: build first: cargo build --workspace (or set FERRY_BIN_DIR)",
            path.display()
        );
    }
    path
}

/// What a plugin invocation produced.
#[derive(Debug, Clone)]
pub struct PluginOutput {
    /// Exit code; -1 when killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl PluginOutput {
    /// Every JSON document on stdout (a plugin must print at most one).
    pub fn documents(&self) -> Vec<Value> {
        serde_json::Deserializer::from_str(&self.stdout)
            .into_iter::<Value>()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// The single JSON document on stdout.
    pub fn json(&self) -> Value {
        let mut docs = self.documents();
        assert_eq!(docs.len(), 1, "exactly one JSON document: {self:?}");
        docs.remove(0)
    }

    /// Asserts success and returns stdout's JSON (ADD, VERSION).
    pub fn ok_json(&self) -> Value {
        assert_eq!(self.code, 0, "plugin failed: {self:?}");
        self.json()
    }

    /// Asserts success with empty stdout (DEL, CHECK).
    pub fn ok_empty(&self) {
        assert_eq!(self.code, 0, "plugin failed: {self:?}");
        assert_eq!(self.stdout.trim(), "", "no output expected: {self:?}");
    }

    /// Asserts a CNI error (non-zero exit, one JSON error) and returns it.
    pub fn err_json(&self) -> Value {
        assert_ne!(self.code, 0, "plugin should have failed: {self:?}");
        let e = self.json();
        assert!(
            e["code"].is_u64() && e["msg"].is_string(),
            "not a CNI error: {self:?}"
        );
        e
    }
}

/// A unique container ID for this test process.
pub fn container_id() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "ferry-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `bin` as a runtime does: a clean environment with CNI_COMMAND,
/// CNI_CONTAINERID (unique), CNI_IFNAME=eth0 and CNI_PATH (the binary's dir
/// and /usr/lib/cni), then `env` applied on top (`Some` sets, `None` unsets;
/// pass CNI_NETNS here), `stdin` piped in. Fails the test after
/// [`PLUGIN_TIMEOUT`].
pub fn run_plugin(
    bin: &Path,
    cmd: &str,
    env: &[(&str, Option<&str>)],
    stdin: &str,
) -> PluginOutput {
    run(None, bin, cmd, env, stdin)
}

/// [`run_plugin`], with the plugin process itself inside `host` (a fake host
/// namespace, so host-side objects such as bridges stay out of the real host).
pub fn run_plugin_in(
    host: &TestNetns,
    bin: &Path,
    cmd: &str,
    env: &[(&str, Option<&str>)],
    stdin: &str,
) -> PluginOutput {
    run(Some(host.netns()), bin, cmd, env, stdin)
}

/// The process [`run_plugin`] / [`run_plugin_in`] would start, not yet
/// spawned (stdin/stdout/stderr piped): for tests that need the child itself,
/// e.g. to kill it mid-flight.
pub fn plugin_command(
    host: Option<&TestNetns>,
    bin: &Path,
    cmd: &str,
    env: &[(&str, Option<&str>)],
) -> Command {
    command(host.map(TestNetns::netns), bin, cmd, env)
}

fn command(host: Option<&NetNs>, bin: &Path, cmd: &str, env: &[(&str, Option<&str>)]) -> Command {
    let mut c = Command::new(bin);
    let bin_dir = bin.parent().unwrap_or(Path::new("."));
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", container_id())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", format!("{}:/usr/lib/cni", bin_dir.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(ns) = host {
        in_netns_cmd(&mut c, ns);
    }
    c
}

fn run(
    host: Option<&NetNs>,
    bin: &Path,
    cmd: &str,
    env: &[(&str, Option<&str>)],
    stdin: &str,
) -> PluginOutput {
    let child = spawn_plugin(&mut command(host, bin, cmd, env), stdin);
    wait_plugin(child, &format!("{} {cmd}", bin.display()))
}

/// Spawns a [`plugin_command`] and feeds `stdin` to it from another thread
/// (so neither a full pipe nor a plugin killed before reading can block).
pub fn spawn_plugin(cmd: &mut Command, stdin: &str) -> std::process::Child {
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
    let mut child_stdin = child.stdin.take().expect("piped stdin");
    let input = stdin.to_string();
    std::thread::spawn(move || {
        let _ = child_stdin.write_all(input.as_bytes());
    });
    child
}

/// Waits for a child of [`spawn_plugin`] and collects its output; kills it
/// and fails the test after [`PLUGIN_TIMEOUT`] (`what` names it then).
pub fn wait_plugin(child: std::process::Child, what: &str) -> PluginOutput {
    let pid = child.id() as i32;
    // Collect the output on another thread, so a hung plugin cannot block
    // the test beyond the timeout.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(PLUGIN_TIMEOUT) {
        Ok(out) => {
            let out = out.expect("wait for plugin");
            PluginOutput {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        Err(_) => {
            // SAFETY: `pid` is our own child, not yet reaped (the waiter is stuck).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{what} timed out after {PLUGIN_TIMEOUT:?}");
        }
    }
}

/// Whether any process of process group `pgid` is still running (zombies
/// waiting for a reaper do not count). For children spawned with
/// `process_group(0)`: their own children (an IPAM plugin orphaned by a
/// killed parent) keep the group, so this tells when all of them are done.
pub fn process_group_alive(pgid: i32) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return false;
    };
    rd.flatten().any(|e| {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            return false;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // "pid (comm) state ppid pgrp ...": comm may contain spaces and ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return false;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        f.len() > 3 && f[0] != "Z" && f[2].parse::<i32>().ok() == Some(pgid)
    })
}

/// A process-wide counter for unique object names and subnets (each call
/// returns a new value).
pub fn unique_index() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A temp directory owned by the test, removed on drop (also on panic).
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        let p = std::env::temp_dir().join(format!(
            "ferry-test-{}-{}-{tag}",
            std::process::id(),
            unique_index()
        ));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        TestDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `f` every 20 ms until it is true or `timeout` passed; returns the
/// last answer.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl TestNetns {
    /// `ping -c 1 -W 2 <addr>` from inside this namespace, up to `tries`
    /// times (the first packets after an ADD may meet a tentative IPv6
    /// address or a neighbour still being resolved).
    pub fn ping(&self, addr: std::net::IpAddr, tries: u32) -> bool {
        let a = addr.to_string();
        (0..tries.max(1)).any(|_| {
            let mut cmd = Command::new("ping");
            cmd.args(["-n", "-c", "1", "-W", "2", &a])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            in_netns_cmd(&mut cmd, &self.ns);
            cmd.status().map(|s| s.success()).unwrap_or(false)
        })
    }

    /// Like [`exec`](Self::exec) but returns the exit status and output
    /// instead of panicking on failure.
    pub fn try_exec(&self, program: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(program);
        cmd.args(args);
        in_netns_cmd(&mut cmd, &self.ns);
        cmd.output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    }

    /// Names of the links of `kind` (`veth`, `bridge`, …) in this namespace.
    pub fn links_of_kind(&self, kind: &str) -> Vec<String> {
        self.link_names(&["-d", "link", "show", "type", kind])
    }

    /// Names of the links enslaved to `bridge` in this namespace.
    pub fn bridge_ports(&self, bridge: &str) -> Vec<String> {
        self.link_names(&["link", "show", "master", bridge])
    }

    /// Sorted `ifname`s of an `ip -j … link show …` listing.
    fn link_names(&self, args: &[&str]) -> Vec<String> {
        let v = self.ip_json(args);
        let mut names: Vec<String> = v
            .as_array()
            .expect("ip -j prints an array")
            .iter()
            .map(|l| l["ifname"].as_str().expect("ifname").to_string())
            .collect();
        names.sort();
        names
    }
}

/// One reservation of an IPAM store (host-local's layout, which ferry-ipam
/// keeps): the file named by the address, "<containerID>\r\n<ifname>".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub container_id: String,
    /// `None` for host-local's oldest format (container ID only).
    pub ifname: Option<String>,
}

/// The reservations in the store directory `dir` (`<dataDir>/<network>`):
/// every file whose name is an IP address. A file that does not parse as a
/// record panics (a consistent store has none). Missing dir: empty.
pub fn reservations(dir: &Path) -> std::collections::BTreeMap<std::net::IpAddr, Reservation> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(ip) = name.parse::<std::net::IpAddr>() else {
            continue;
        };
        let text = std::fs::read_to_string(e.path())
            .unwrap_or_else(|err| panic!("read reservation {}: {err}", e.path().display()));
        let r = if let Ok(j) = serde_json::from_str::<Value>(&text) {
            // ferry-ipam's JSON form (filesystems without user xattrs).
            Reservation {
                container_id: j["containerID"]
                    .as_str()
                    .unwrap_or_else(|| panic!("reservation {name}: no containerID: {text:?}"))
                    .to_string(),
                ifname: j["ifname"].as_str().map(str::to_string),
            }
        } else {
            let mut lines = text.lines();
            let id = lines.next().unwrap_or("").trim().to_string();
            let ifname = lines.next().map(|l| l.trim().to_string());
            assert!(
                !id.is_empty() && lines.next().is_none(),
                "reservation {name} does not parse: {text:?}"
            );
            Reservation {
                container_id: id,
                ifname,
            }
        };
        out.insert(ip, r);
    }
    out
}

/// Sends `SIGKILL` to a child we spawned (no-op if already reaped).
pub fn kill_child(child: &std::process::Child) {
    // SAFETY: plain syscall on the pid of our own, not yet waited-for child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
}

/// A small xorshift64* generator: reproducible from its printed seed,
/// without a dependency.
pub struct XorShift {
    state: u64,
    /// The seed it started from.
    pub seed: u64,
}

impl XorShift {
    /// Seeded from `FERRY_TEST_SEED` if set, else from time and pid; the
    /// seed is printed (to the real stderr) so a failure can be replayed.
    pub fn from_env_or_time(what: &str) -> XorShift {
        let seed = std::env::var("FERRY_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                t ^ (u64::from(std::process::id()) << 32)
            });
        let _ = writeln!(
            std::io::stderr(),
            "{what}: FERRY_TEST_SEED={seed} (set it to replay)"
        );
        XorShift::new(seed)
    }

    pub fn new(seed: u64) -> XorShift {
        XorShift {
            state: seed.max(1),
            seed,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// One ferry-bridge network of a test, in a fake host namespace of its own:
/// unique network name, bridge name (≤ 15 chars), IPv4 /24 and IPv6 /64
/// subnets, and an IPAM `dataDir` removed on drop. Everything the plugin
/// creates on the "host" (bridge, veths, nft table) lives in [`host`](Self::host)
/// and vanishes with it.
pub struct BridgeNet {
    pub host: TestNetns,
    pub data: TestDir,
    /// The network name (`name` in the config; the nft chain is `net-<name>`).
    pub name: String,
    pub bridge: String,
    /// e.g. `10.123.7.0/24`
    pub subnet4: String,
    /// e.g. `fd00:7b:7::/64`
    pub subnet6: String,
    pub ip_masq: bool,
    /// Binary called for the plugin (`ferry-bridge` unless changed).
    pub plugin: PathBuf,
    /// `type` of the plugin and of `ipam`.
    pub plugin_type: String,
    pub ipam_type: String,
}

impl BridgeNet {
    /// ferry-bridge + ferry-ipam, dual stack.
    pub fn new(ip_masq: bool) -> BridgeNet {
        let i = unique_index();
        let pid = std::process::id();
        // The second octet from the pid, the third from the counter: unique
        // among the tests of one process, unlikely to repeat across processes.
        let (a, b) = (100 + pid % 100, i % 256);
        BridgeNet {
            host: TestNetns::new(),
            data: TestDir::new("ipam"),
            name: format!("ft{pid}-{i}"),
            bridge: format!("fbr{}x{i}", pid % 100_000),
            subnet4: format!("10.{a}.{b}.0/24"),
            subnet6: format!("fd00:{a:x}:{b:x}::/64"),
            ip_masq,
            plugin: bin("ferry-bridge"),
            plugin_type: "ferry-bridge".into(),
            ipam_type: "ferry-ipam".into(),
        }
    }

    /// The network configuration for `version`.
    pub fn conf(&self, version: &str) -> Value {
        serde_json::json!({
            "cniVersion": version,
            "name": self.name,
            "type": self.plugin_type,
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": self.ip_masq,
            "ipam": {
                "type": self.ipam_type,
                "dataDir": self.data.path(),
                "ranges": [[{"subnet": self.subnet4}], [{"subnet": self.subnet6}]],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
            }
        })
    }

    /// Runs the plugin in the fake host namespace for one attachment.
    pub fn call(
        &self,
        cmd: &str,
        container_id: &str,
        netns: Option<&str>,
        ifname: &str,
        conf: &Value,
    ) -> PluginOutput {
        run_plugin_in(
            &self.host,
            &self.plugin,
            cmd,
            &[
                ("CNI_CONTAINERID", Some(container_id)),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", Some(ifname)),
            ],
            &conf.to_string(),
        )
    }

    /// The IPAM store of this network: `<dataDir>/<name>`.
    pub fn store_dir(&self) -> PathBuf {
        self.data.path().join(&self.name)
    }

    pub fn reservations(&self) -> std::collections::BTreeMap<std::net::IpAddr, Reservation> {
        reservations(&self.store_dir())
    }

    /// The gateway addresses (first host of each subnet).
    pub fn gateways(&self) -> (std::net::IpAddr, std::net::IpAddr) {
        let first = |net: &str| -> std::net::IpAddr {
            let base: std::net::IpAddr = net.split('/').next().unwrap().parse().expect("subnet");
            match base {
                std::net::IpAddr::V4(a) => std::net::Ipv4Addr::from(u32::from(a) + 1).into(),
                std::net::IpAddr::V6(a) => std::net::Ipv6Addr::from(u128::from(a) + 1).into(),
            }
        };
        (first(&self.subnet4), first(&self.subnet6))
    }
}

/// A pod: its namespace and container ID.
pub struct TestPod {
    pub ns: TestNetns,
    pub id: String,
}

impl TestPod {
    pub fn new() -> TestPod {
        TestPod {
            ns: TestNetns::new(),
            id: container_id(),
        }
    }

    /// CNI_NETNS of the pod.
    pub fn path(&self) -> String {
        self.ns.path_str()
    }
}

impl Default for TestPod {
    fn default() -> Self {
        Self::new()
    }
}

/// The world outside a fake host ([`BridgeNet::host`]): a namespace linked to
/// it by the veth "uplink", with test-only addresses (198.18.0.0/15,
/// 2001:db8::/32) on both ends, the host's being what hostPorts are reached
/// on. Loopback is up on both sides.
pub struct Outside {
    pub ns: TestNetns,
    pub host_v4: std::net::IpAddr,
    pub out_v4: std::net::IpAddr,
    pub host_v6: std::net::IpAddr,
    pub out_v6: std::net::IpAddr,
}

impl Outside {
    pub fn new(net: &BridgeNet) -> Outside {
        let ns = TestNetns::new();
        let i = unique_index();
        let (o2, o3) = (18 + (i / 256) % 2, i % 256);
        let host_v4: std::net::IpAddr = format!("198.{o2}.{o3}.1").parse().unwrap();
        let out_v4: std::net::IpAddr = format!("198.{o2}.{o3}.2").parse().unwrap();
        let host_v6: std::net::IpAddr = format!("2001:db8:{i:x}::1").parse().unwrap();
        let out_v6: std::net::IpAddr = format!("2001:db8:{i:x}::2").parse().unwrap();
        let h = &net.host;
        h.exec(
            "ip",
            &[
                "link",
                "add",
                "uplink",
                "type",
                "veth",
                "peer",
                "name",
                "uplink",
                "netns",
                &ns.path_str(),
            ],
        );
        for (side, a4, a6) in [(h, host_v4, host_v6), (&ns, out_v4, out_v6)] {
            side.exec("ip", &["addr", "add", &format!("{a4}/24"), "dev", "uplink"]);
            side.exec(
                "ip",
                &["addr", "add", &format!("{a6}/64"), "dev", "uplink", "nodad"],
            );
            side.exec("ip", &["link", "set", "uplink", "up"]);
            side.exec("ip", &["link", "set", "lo", "up"]);
        }
        Outside {
            ns,
            host_v4,
            out_v4,
            host_v6,
            out_v6,
        }
    }

    /// Routes from the outside back to the pods of `net` through the host:
    /// what lets it answer pod addresses that are not masqueraded.
    pub fn route_back_to(&self, net: &BridgeNet) {
        let h4 = self.host_v4.to_string();
        let h6 = self.host_v6.to_string();
        self.ns
            .exec("ip", &["route", "add", &net.subnet4, "via", &h4]);
        self.ns
            .exec("ip", &["-6", "route", "add", &net.subnet6, "via", &h6]);
    }
}

/// ferry-bridge's host-side veth name for (container ID, ifname): "veth" +
/// 11 hex digits of FNV-1a over `id \0 ifname`. Restated here on purpose:
/// DEL finds the veth of a pod added by an older ferry only if this never
/// changes, so a change must break a test.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("veth{:011x}", h & 0xfff_ffff_ffff)
}

/// Files of an IPAM store directory that are neither host-local's
/// bookkeeping (`lock`, `last_reserved_ip.<N>`) nor ferry-ipam's index
/// (`.ferry/index`) — after every attachment is gone there must be none: no
/// reservation, no per-owner cache entry, no temp file. Paths are relative.
pub fn store_leftovers(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(d) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            if p.is_dir() {
                walk(root, &p, out);
            } else if !(rel == "lock"
                || rel.starts_with("last_reserved_ip.")
                || rel == ".ferry/index")
            {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Sends UDP datagrams from `pod` to a listener bound in `outside` (any
/// namespace) at `dst` and returns the source address the listener saw.
pub fn source_seen(
    pod: &TestNetns,
    outside: &TestNetns,
    dst: std::net::IpAddr,
) -> std::net::IpAddr {
    // Sockets belong to the namespace they were created in: create each on
    // a thread inside its namespace, use them from here.
    let listener = ferry_netops::in_netns(outside.netns(), || {
        std::net::UdpSocket::bind(std::net::SocketAddr::new(dst, 0))
    })
    .expect("bind the outside listener");
    listener
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let target = listener.local_addr().unwrap();
    let unspecified: std::net::IpAddr = if dst.is_ipv4() {
        "0.0.0.0".parse().unwrap()
    } else {
        "::".parse().unwrap()
    };
    let sender = ferry_netops::in_netns(pod.netns(), || {
        std::net::UdpSocket::bind(std::net::SocketAddr::new(unspecified, 0))
    })
    .expect("bind the pod socket");
    let mut buf = [0u8; 64];
    // The first datagrams may meet a tentative gateway address (IPv6 DAD on
    // the bridge) or an unresolved neighbour: retry for a while.
    for _ in 0..20 {
        let _ = sender.send_to(b"ferry", target);
        if let Ok((n, from)) = listener.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"ferry");
            return from.ip();
        }
    }
    panic!("no datagram from the pod reached {target}");
}
