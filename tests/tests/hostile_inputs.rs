//! Hostile and careless inputs to the plugins and the IPAM store (issue 9,
//! items 11 to 15): the caller's own namespace as CNI_NETNS, FIFOs where a
//! namespace or a record is expected, symlinks planted in the store,
//! interface names with control characters, and very long container IDs.
//!
//! Every plugin call is bounded by [`ferry_tests::PLUGIN_TIMEOUT`], so a
//! plugin that hangs (a blocking open) fails the test instead of hanging it.
//! Kernel objects live in namespaces the tests create; files in temp dirs
//! the tests create (victims included), removed on drop.

use ferry_tests::{
    BridgeNet, PluginOutput, TestDir, TestNetns, bin, container_id, plugin_command, require_root,
    reservations, run_plugin, run_plugin_in, spawn_plugin, unique_index, wait_plugin,
};
use serde_json::{Value, json};
use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
}

fn lo_conf() -> String {
    json!({"cniVersion": "1.1.0", "name": "lo-hostile", "type": "ferry-loopback"}).to_string()
}

/// A ferry-ipam store of its own (no kernel objects: ferry-ipam is called
/// directly, as a main plugin would delegate to it).
struct IpamStore {
    dir: TestDir,
    name: String,
}

const SUBNET: &str = "10.250.0.0/24";

impl IpamStore {
    fn new() -> IpamStore {
        IpamStore {
            dir: TestDir::new("hostile-ipam"),
            name: format!("hi{}-{}", std::process::id(), unique_index()),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `<dataDir>/<network>`.
    fn store(&self) -> PathBuf {
        self.data_dir().join(&self.name)
    }

    fn conf_with(&self, ipam_type: &str) -> Value {
        json!({"cniVersion": "1.1.0", "name": self.name, "type": "ferry-bridge",
            "ipam": {"type": ipam_type, "dataDir": self.data_dir(),
                "ranges": [[{"subnet": SUBNET}]]}})
    }

    fn conf(&self) -> Value {
        self.conf_with("ferry-ipam")
    }

    /// An existing regular file standing in for the pod's netns path (ferry
    /// records it; a missing one would make the reservation provably stale).
    fn netns(&self) -> String {
        let p = self.dir.path().join("netns");
        if !p.exists() {
            fs::write(&p, "").unwrap();
        }
        p.display().to_string()
    }

    fn call_bin(
        &self,
        plugin: &Path,
        cmd: &str,
        id: &str,
        ifname: &str,
        cni_args: Option<&str>,
        conf: &Value,
    ) -> PluginOutput {
        let netns = self.netns();
        run_plugin(
            plugin,
            cmd,
            &[
                ("CNI_CONTAINERID", Some(id)),
                ("CNI_IFNAME", Some(ifname)),
                ("CNI_NETNS", Some(netns.as_str())),
                ("CNI_ARGS", cni_args),
            ],
            &conf.to_string(),
        )
    }

    fn call(&self, cmd: &str, id: &str, cni_args: Option<&str>) -> PluginOutput {
        self.call_bin(&bin("ferry-ipam"), cmd, id, "eth0", cni_args, &self.conf())
    }

    /// GC keeping only `valid` (container ID, ifname) attachments.
    fn gc(&self, valid: &[(&str, &str)]) -> PluginOutput {
        let mut conf = self.conf();
        conf["cni.dev/valid-attachments"] = valid
            .iter()
            .map(|(id, ifname)| json!({"containerID": id, "ifname": ifname}))
            .collect();
        run_plugin(
            &bin("ferry-ipam"),
            "GC",
            &[
                ("CNI_CONTAINERID", None),
                ("CNI_IFNAME", None),
                ("CNI_NETNS", None),
            ],
            &conf.to_string(),
        )
    }

    /// The addresses of an ADD result.
    fn addresses(out: &PluginOutput) -> Vec<String> {
        out.ok_json()["ips"]
            .as_array()
            .expect("ips")
            .iter()
            .map(|ip| ip["address"].as_str().unwrap().to_string())
            .collect()
    }

    /// Names in the store directory that parse as addresses (without opening
    /// them: some tests plant FIFOs).
    fn address_names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.store())
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
}

/// A directory with files whose content must survive whatever the plugin
/// does through a link planted towards them.
struct Victim {
    dir: TestDir,
}

impl Victim {
    fn new() -> Victim {
        let dir = TestDir::new("victim");
        for (name, text) in [
            ("a", "precious a\n"),
            ("b", "precious b\n"),
            ("c", "c9\r\neth0"),
        ] {
            fs::write(dir.path().join(name), text).unwrap();
        }
        Victim { dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Every file as it was created, and nothing added.
    fn assert_untouched(&self, what: &str) {
        let mut names: Vec<String> = fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b", "c"], "{what}: victim directory changed");
        assert_eq!(
            fs::read_to_string(self.file("a")).unwrap(),
            "precious a\n",
            "{what}"
        );
        assert_eq!(
            fs::read_to_string(self.file("b")).unwrap(),
            "precious b\n",
            "{what}"
        );
        assert_eq!(
            fs::read_to_string(self.file("c")).unwrap(),
            "c9\r\neth0",
            "{what}"
        );
    }
}

fn replace_with_symlink(path: &Path, target: &Path) {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).unwrap(),
        Ok(_) => fs::remove_file(path).unwrap(),
        Err(_) => {}
    }
    symlink(target, path).unwrap();
}

fn replace_with_fifo(path: &Path) {
    let _ = fs::remove_file(path);
    mkfifo(path);
}

// ---------------------------------------------------------------- item 11

/// loopback run inside a "node" namespace with CNI_NETNS naming that same
/// namespace: refused with code 4 on every verb, and the node's lo stays up.
#[test]
fn own_netns_is_refused_and_node_lo_stays_up() {
    if !require_root() {
        return;
    }
    let node = TestNetns::new();
    node.exec("ip", &["link", "set", "lo", "up"]);
    let by_fd = node.path_str();
    // The node's namespace by its /proc/<test pid>/fd path, and as the
    // plugin sees itself.
    for path in [
        by_fd.as_str(),
        "/proc/self/ns/net",
        "/proc/thread-self/ns/net",
    ] {
        for cmd in ["ADD", "CHECK", "DEL"] {
            let out = run_plugin_in(
                &node,
                &bin("ferry-loopback"),
                cmd,
                &[("CNI_NETNS", Some(path)), ("CNI_IFNAME", Some("lo"))],
                &lo_conf(),
            );
            let e = out.err_json();
            assert_eq!(e["code"], 4, "{cmd} {path}: {out:?}");
            assert!(
                e["msg"].as_str().unwrap().contains("own network namespace"),
                "{e}"
            );
            assert!(
                node.ip_link_is_up("lo"),
                "{cmd} {path} took the node's lo down"
            );
        }
    }
    // DEL without a netns still works.
    run_plugin_in(
        &node,
        &bin("ferry-loopback"),
        "DEL",
        &[("CNI_NETNS", Some("")), ("CNI_IFNAME", Some("lo"))],
        &lo_conf(),
    )
    .ok_empty();
    assert!(node.ip_link_is_up("lo"));
}

/// bridge with isDefaultGateway, run in a fake node whose own namespace is
/// named as the pod's: refused (code 4) before any kernel or IPAM work, and
/// the node's default route is neither replaced nor removed.
#[test]
fn own_netns_is_refused_and_node_default_route_stays() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let i = unique_index() % 10_000;
    let (up_a, up_b) = (format!("hiup{i}a"), format!("hiup{i}b"));
    let host = &net.host;
    host.exec(
        "ip",
        &["link", "add", &up_a, "type", "veth", "peer", "name", &up_b],
    );
    host.exec("ip", &["addr", "add", "198.18.77.1/24", "dev", &up_a]);
    for l in [up_a.as_str(), up_b.as_str(), "lo"] {
        host.exec("ip", &["link", "set", l, "up"]);
    }
    host.exec(
        "ip",
        &[
            "route",
            "add",
            "default",
            "via",
            "198.18.77.2",
            "dev",
            &up_a,
        ],
    );
    let before = host.ip_json(&["route", "show", "default"]);
    assert_eq!(before[0]["gateway"], "198.18.77.2", "{before}");

    let mut conf = net.conf("1.1.0");
    conf["isDefaultGateway"] = json!(true);
    let id = container_id();
    let own = host.path_str();
    for cmd in ["ADD", "CHECK", "DEL"] {
        let out = net.call(cmd, &id, Some(&own), "eth0", &conf);
        assert_eq!(out.err_json()["code"], 4, "{cmd}: {out:?}");
        assert_eq!(
            host.ip_json(&["route", "show", "default"]),
            before,
            "{cmd} changed the node's default route"
        );
    }
    assert!(net.reservations().is_empty(), "nothing reserved");
    assert!(host.link(&net.bridge).is_none(), "no bridge created");
    assert!(host.link("eth0").is_none(), "no pod interface in the node");
}

/// The chained plugins and IPAM receive CNI_NETNS too: the same refusal,
/// while DEL without a netns keeps working.
#[test]
fn own_netns_is_refused_by_every_plugin() {
    if !require_root() {
        return;
    }
    let node = TestNetns::new();
    let own = node.path_str();
    let store = IpamStore::new();
    let prev = json!({"cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:03", "sandbox": own}],
        "ips": [{"interface": 0, "address": "10.250.0.3/24", "gateway": "10.250.0.1"}]});
    let cases = [
        (
            "ferry-portmap",
            json!({"cniVersion": "1.1.0", "name": "pm", "type": "ferry-portmap",
                "runtimeConfig": {"portMappings": [
                    {"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]},
                "prevResult": prev}),
        ),
        (
            "ferry-bandwidth",
            json!({"cniVersion": "1.1.0", "name": "bw", "type": "ferry-bandwidth",
                "ingressRate": 1000000, "ingressBurst": 100000, "prevResult": prev}),
        ),
        ("ferry-ipam", store.conf()),
    ];
    for (plugin, conf) in cases {
        let out = run_plugin_in(
            &node,
            &bin(plugin),
            "ADD",
            &[("CNI_NETNS", Some(own.as_str()))],
            &conf.to_string(),
        );
        assert_eq!(out.err_json()["code"], 4, "{plugin}: {out:?}");
    }
    assert!(store.address_names().is_empty(), "ipam reserved nothing");
    run_plugin_in(
        &node,
        &bin("ferry-ipam"),
        "DEL",
        &[("CNI_NETNS", None)],
        &store.conf().to_string(),
    )
    .ok_empty();
}

// ---------------------------------------------------------------- item 12

/// A FIFO as CNI_NETNS: a clean "not a network namespace" (code 8) within
/// the timeout, never a hang in open(2).
#[test]
fn fifo_as_netns_is_refused_without_hanging() {
    let dir = TestDir::new("fifo-netns");
    let fifo = dir.path().join("netns");
    mkfifo(&fifo);
    let path = fifo.display().to_string();
    for cmd in ["ADD", "CHECK", "DEL"] {
        let out = run_plugin(
            &bin("ferry-loopback"),
            cmd,
            &[("CNI_NETNS", Some(&path)), ("CNI_IFNAME", Some("lo"))],
            &lo_conf(),
        );
        let e = out.err_json();
        assert_eq!(e["code"], 8, "{cmd}: {out:?}");
        assert!(
            e["msg"]
                .as_str()
                .unwrap()
                .contains("not a network namespace"),
            "{e}"
        );
    }
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let id = container_id();
    let out = net.call("ADD", &id, Some(&path), "eth0", &net.conf("1.1.0"));
    assert_eq!(out.err_json()["code"], 8, "{out:?}");
    assert!(net.reservations().is_empty(), "nothing reserved");
    net.call("DEL", &id, Some(&path), "eth0", &net.conf("1.1.0"));
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
}

/// FIFOs where the store expects a record, the index, last_reserved_ip and
/// an owner cache: every verb finishes within the timeout (no open(2) that
/// waits for a writer while the store lock is held) and the store stays
/// correct.
#[test]
fn fifos_in_the_ipam_store_do_not_hang_it() {
    let s = IpamStore::new();
    assert_eq!(
        IpamStore::addresses(&s.call("ADD", "c0", None)),
        ["10.250.0.2/24"]
    );
    let store = s.store();
    mkfifo(&store.join("10.250.0.9"));
    mkfifo(&store.join("10.250.0.3"));
    replace_with_fifo(&store.join("last_reserved_ip.0"));
    replace_with_fifo(&store.join(".ferry/index"));
    mkfifo(&store.join(".ferry/owners/c1:eth0"));

    // The next free address skips the FIFO at .3 (its name is taken).
    assert_eq!(
        IpamStore::addresses(&s.call("ADD", "c1", None)),
        ["10.250.0.4/24"]
    );
    s.call("CHECK", "c1", None).ok_empty();
    // A FIFO is no record: asking for its address reclaims the name.
    assert_eq!(
        IpamStore::addresses(&s.call("ADD", "c2", Some("IP=10.250.0.9"))),
        ["10.250.0.9/24"]
    );
    s.call("CHECK", "c2", None).ok_empty();
    s.call("DEL", "c1", None).ok_empty();
    s.gc(&[("c0", "eth0"), ("c2", "eth0")]).ok_empty();
    s.call("CHECK", "c0", None).ok_empty();
    s.call("CHECK", "c2", None).ok_empty();
    let held = reservations(&store);
    assert_eq!(
        held.keys().map(|ip| ip.to_string()).collect::<Vec<_>>(),
        ["10.250.0.2", "10.250.0.9"],
        "{held:?}"
    );
}

/// `resolvConf` naming a FIFO (or a device): a clean I/O error, no hang.
#[test]
fn fifo_as_resolv_conf_does_not_hang_ipam() {
    let s = IpamStore::new();
    let fifo = s.dir.path().join("resolv.conf");
    mkfifo(&fifo);
    for path in [fifo.as_path(), Path::new("/dev/zero")] {
        let mut conf = s.conf();
        conf["ipam"]["resolvConf"] = json!(path);
        let out = s.call_bin(&bin("ferry-ipam"), "ADD", "c0", "eth0", None, &conf);
        let e = out.err_json();
        assert_eq!(e["code"], 5, "{}: {out:?}", path.display());
        assert!(
            e["details"]
                .as_str()
                .unwrap_or("")
                .contains("not a regular file"),
            "{e}"
        );
    }
    assert!(s.address_names().is_empty());
}

// ---------------------------------------------------------------- item 13

/// `.ferry/tmp` replaced by a symlink to a victim directory, then a rebuild
/// (a junk index forces one): the victim keeps every file.
#[test]
fn symlinked_store_tmp_dir_is_not_followed() {
    let s = IpamStore::new();
    s.call("ADD", "c0", None).ok_json();
    let victim = Victim::new();
    replace_with_symlink(&s.store().join(".ferry/tmp"), victim.dir.path());
    fs::write(s.store().join(".ferry/index"), "junk").unwrap();
    let out = s.call("ADD", "c1", None);
    victim.assert_untouched("rebuild with .ferry/tmp -> victim");
    assert_eq!(IpamStore::addresses(&out), ["10.250.0.3/24"]);
    s.call("DEL", "c0", None).ok_empty();
    s.gc(&[("c1", "eth0")]).ok_empty();
    victim.assert_untouched("DEL and GC");
    s.call("CHECK", "c1", None).ok_empty();
}

/// The index, last_reserved_ip and an owner cache replaced by symlinks to
/// victim files: nothing is written through them.
#[test]
fn symlinked_store_files_are_not_written_through() {
    let s = IpamStore::new();
    s.call("ADD", "c0", None).ok_json();
    let victim = Victim::new();
    let store = s.store();
    replace_with_symlink(&store.join(".ferry/index"), &victim.file("a"));
    replace_with_symlink(&store.join("last_reserved_ip.0"), &victim.file("b"));
    replace_with_symlink(&store.join(".ferry/owners/c1:eth0"), &victim.file("c"));
    replace_with_symlink(&store.join(".ferry/owners/c0:eth0"), &victim.file("c"));
    assert_eq!(
        IpamStore::addresses(&s.call("ADD", "c1", None)),
        ["10.250.0.3/24"]
    );
    victim.assert_untouched("ADD");
    s.call("CHECK", "c0", None).ok_empty();
    s.call("DEL", "c0", None).ok_empty();
    s.call("CHECK", "c1", None).ok_empty();
    s.gc(&[("c1", "eth0")]).ok_empty();
    victim.assert_untouched("CHECK, DEL and GC");
    s.call("CHECK", "c1", None).ok_empty();
    assert_eq!(s.address_names(), ["10.250.0.3"]);
}

/// A record that is a symlink to a file outside the store: never read
/// through (its content would name a holder), and removing it removes only
/// the link.
#[test]
fn symlinked_record_is_not_followed() {
    let s = IpamStore::new();
    s.call("ADD", "c0", None).ok_json();
    let victim = Victim::new();
    let secret = victim.dir.path().join("secret");
    fs::write(&secret, "secretholder").unwrap();
    symlink(&secret, s.store().join("10.250.0.7")).unwrap();
    let out = s.call("ADD", "c1", Some("IP=10.250.0.7"));
    assert!(
        !out.stdout.contains("secretholder"),
        "read through the link: {out:?}"
    );
    assert_eq!(IpamStore::addresses(&out), ["10.250.0.7/24"]);
    assert_eq!(fs::read_to_string(&secret).unwrap(), "secretholder");
    s.call("DEL", "c1", None).ok_empty();
    assert_eq!(fs::read_to_string(&secret).unwrap(), "secretholder");
    fs::remove_file(&secret).unwrap();
    victim.assert_untouched("record link");
}

/// The network directory itself a symlink to a victim directory: a clear
/// error, and nothing created in the victim.
#[test]
fn symlinked_store_directory_is_refused() {
    let s = IpamStore::new();
    let victim = Victim::new();
    fs::create_dir_all(s.data_dir()).unwrap();
    symlink(victim.dir.path(), s.store()).unwrap();
    for cmd in ["ADD", "CHECK", "DEL"] {
        let out = s.call(cmd, "c0", None);
        let e = out.err_json();
        assert_eq!(e["code"], 5, "{cmd}: {out:?}");
        assert!(e["msg"].as_str().unwrap().contains(&s.name), "{e}");
        victim.assert_untouched(cmd);
    }
    s.gc(&[]).err_json();
    victim.assert_untouched("GC");
}

/// Store directories are created writable by their owner only, whatever the
/// caller's umask, and the lock file is the owner's alone (anyone who can
/// open it can flock it and stall every ADD).
#[test]
fn store_directories_are_not_group_or_world_writable() {
    let s = IpamStore::new();
    let netns = s.netns();
    let mut cmd = plugin_command(
        None,
        &bin("ferry-ipam"),
        "ADD",
        &[("CNI_NETNS", Some(netns.as_str()))],
    );
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let out = wait_plugin(spawn_plugin(&mut cmd, &s.conf().to_string()), "ipam ADD");
    out.ok_json();
    let store = s.store();
    for d in [
        s.data_dir(),
        store.clone(),
        store.join(".ferry"),
        store.join(".ferry/tmp"),
        store.join(".ferry/owners"),
    ] {
        let m = fs::symlink_metadata(&d).unwrap();
        assert!(m.is_dir(), "{}", d.display());
        assert_eq!(
            m.permissions().mode() & 0o022,
            0,
            "{} is {:o}",
            d.display(),
            m.permissions().mode()
        );
    }
    let lock = fs::symlink_metadata(store.join("lock")).unwrap();
    assert_eq!(
        lock.permissions().mode() & 0o077,
        0,
        "lock is {:o}",
        lock.permissions().mode()
    );
    // An existing lock open to others (host-local makes it 0644) is closed.
    fs::set_permissions(store.join("lock"), fs::Permissions::from_mode(0o666)).unwrap();
    // Any verb opens and locks the store (c0 holds nothing: CHECK fails).
    let _ = s.call("CHECK", "c0", None);
    let lock = fs::symlink_metadata(store.join("lock")).unwrap();
    assert_eq!(
        lock.permissions().mode() & 0o077,
        0,
        "lock is {:o}",
        lock.permissions().mode()
    );
}
// ---------------------------------------------------------------- item 14

/// Interface names the kernel's rule (or any reader) refuses: code 4 before
/// anything is reserved or created.
#[test]
fn control_characters_in_ifname_are_refused() {
    let bad = [
        "e\x01",
        "eth0\x7f",
        "\x1b[31m",
        "eth\u{85}",
        "eth\u{a0}",
        "e\n",
        "e\t1",
        "e/1",
        "e:1",
    ];
    let s = IpamStore::new();
    for ifname in bad {
        let out = s.call_bin(&bin("ferry-ipam"), "ADD", "c0", ifname, None, &s.conf());
        assert_eq!(out.err_json()["code"], 4, "{ifname:?}: {out:?}");
        let out = run_plugin(
            &bin("ferry-loopback"),
            "ADD",
            &[
                ("CNI_NETNS", Some("/nonexistent")),
                ("CNI_IFNAME", Some(ifname)),
            ],
            &lo_conf(),
        );
        assert_eq!(out.err_json()["code"], 4, "loopback {ifname:?}: {out:?}");
    }
    assert!(s.address_names().is_empty(), "nothing reserved");
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let pod = TestNetns::new();
    for ifname in bad {
        let out = net.call(
            "ADD",
            &container_id(),
            Some(&pod.path_str()),
            ifname,
            &net.conf("1.1.0"),
        );
        assert_eq!(out.err_json()["code"], 4, "bridge {ifname:?}: {out:?}");
    }
    assert!(net.reservations().is_empty(), "nothing reserved");
    assert!(net.host.link(&net.bridge).is_none(), "nothing created");
    assert_eq!(pod.links_of_kind("veth"), Vec::<String>::new());
}

// ---------------------------------------------------------------- item 15

fn long_id(len: usize) -> String {
    let mut id = format!("long-{len}-");
    while id.len() < len {
        id.push_str("0123456789abcdef");
    }
    id.truncate(len);
    id
}

/// Container IDs of 300 and 4000 characters (the spec sets no limit) through
/// ADD, CHECK, DEL and GC of ferry-ipam.
#[test]
fn long_container_ids_work_in_ipam() {
    for len in [300, 4000] {
        let s = IpamStore::new();
        let id = long_id(len);
        let other = long_id(len - 1);
        assert_eq!(
            IpamStore::addresses(&s.call("ADD", &id, None)),
            ["10.250.0.2/24"]
        );
        s.call("CHECK", &id, None).ok_empty();
        // Idempotent: the same address again, nothing new.
        assert_eq!(
            IpamStore::addresses(&s.call("ADD", &id, None)),
            ["10.250.0.2/24"]
        );
        assert_eq!(
            IpamStore::addresses(&s.call("ADD", &other, None)),
            ["10.250.0.3/24"]
        );
        let out = s.call("CHECK", &long_id(len + 1), None);
        assert_eq!(out.err_json()["code"], 3, "{len}: {out:?}");
        s.gc(&[(id.as_str(), "eth0")]).ok_empty();
        s.call("CHECK", &id, None).ok_empty();
        assert_eq!(
            s.address_names(),
            ["10.250.0.2"],
            "{len}: GC released the other"
        );
        s.call("DEL", &id, None).ok_empty();
        assert!(s.address_names().is_empty(), "{len}: DEL released it");
        assert_eq!(s.call("CHECK", &id, None).err_json()["code"], 3);
        s.call("DEL", &id, None).ok_empty();
        // A rebuild of the caches (junk index) keeps working with them too.
        s.call("ADD", &id, None).ok_json();
        fs::write(s.store().join(".ferry/index"), "junk").unwrap();
        s.call("CHECK", &id, None).ok_empty();
        s.call("DEL", &id, None).ok_empty();
        assert!(s.address_names().is_empty(), "{len}");
    }
}

/// host-local keeps IDs in file contents and takes long IDs; ferry-ipam
/// honours such a reservation in the same dataDir (CHECK, no double
/// allocation, DEL releases it).
#[test]
fn long_container_id_reserved_by_host_local_is_honoured() {
    let host_local = Path::new("/usr/lib/cni/host-local");
    if !host_local.exists() {
        ferry_tests::skip("/usr/lib/cni/host-local missing (containernetworking-plugins)");
        return;
    }
    let s = IpamStore::new();
    let id = long_id(4000);
    let mut conf = s.conf_with("host-local");
    // Debian's host-local (1.1.1) speaks up to 1.0.0.
    conf["cniVersion"] = json!("1.0.0");
    let out = s.call_bin(host_local, "ADD", &id, "eth0", None, &conf);
    assert_eq!(IpamStore::addresses(&out), ["10.250.0.2/24"]);
    s.call("CHECK", &id, None).ok_empty();
    assert_eq!(
        IpamStore::addresses(&s.call("ADD", "c1", None)),
        ["10.250.0.3/24"]
    );
    s.call("DEL", &id, None).ok_empty();
    assert_eq!(s.address_names(), ["10.250.0.3"]);
}

/// loopback with long container IDs.
#[test]
fn long_container_ids_work_in_loopback() {
    if !require_root() {
        return;
    }
    for len in [300, 4000] {
        let ns = TestNetns::new();
        let id = long_id(len);
        let env = [
            ("CNI_CONTAINERID", Some(id.as_str())),
            ("CNI_NETNS", Some(ns.path().to_str().unwrap())),
            ("CNI_IFNAME", Some("lo")),
        ];
        run_plugin(&bin("ferry-loopback"), "ADD", &env, &lo_conf()).ok_json();
        run_plugin(&bin("ferry-loopback"), "CHECK", &env, &lo_conf()).ok_empty();
        run_plugin(&bin("ferry-loopback"), "DEL", &env, &lo_conf()).ok_empty();
        assert!(!ns.ip_link_is_up("lo"));
    }
}
