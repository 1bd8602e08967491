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

fn run(
    host: Option<&NetNs>,
    bin: &Path,
    cmd: &str,
    env: &[(&str, Option<&str>)],
    stdin: &str,
) -> PluginOutput {
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
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let pid = child.id() as i32;
    let mut child_stdin = child.stdin.take().expect("piped stdin");
    let input = stdin.to_string();
    // Feed stdin and collect the output on other threads, so neither a full
    // pipe nor a hung plugin can block the test beyond the timeout.
    std::thread::spawn(move || {
        let _ = child_stdin.write_all(input.as_bytes());
    });
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
            panic!("{} {cmd} timed out after {PLUGIN_TIMEOUT:?}", bin.display());
        }
    }
}
