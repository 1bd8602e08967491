//! A multi-node cluster inside namespaces one test creates: an underlay
//! namespace with a bridge and a real etcd, "nodes" (namespaces with an
//! `eth0` on the underlay) each running `ferryd`, and pods ADDed through the
//! conflist ferryd wrote, by `cnirun` (plugins chained as libcni does).
//!
//! The underlay carries IPv4 (192.168.77.0/24) and, with [`Underlay::V6`],
//! IPv6 too (fd77::/64): the nodes' only default route is then the IPv6 one,
//! so ferryd takes the IPv6 address as its underlay, while etcd stays on the
//! IPv4 address.
//!
//! Every namespace is anonymous ([`TestNetns`]), so two labs in parallel can
//! use the same addresses, and everything vanishes when the [`Lab`] drops:
//! processes are killed, namespaces closed, the directory removed.

use crate::{TestDir, TestNetns, bin, in_netns_cmd, wait_until};
use ferry_netops::{BridgeSpec, NsHandle, VethPair, block_on};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The underlay's addresses: .1 is the underlay namespace (etcd), nodes
/// start at .11.
pub const UNDERLAY: [u8; 3] = [192, 168, 77];
pub const ETCD_PORT: u16 = 2379;
pub const METRICS_PORT: u16 = 9946;

pub fn underlay_ip(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(UNDERLAY[0], UNDERLAY[1], UNDERLAY[2], host)
}

/// `fd77::<host>` (the host number written as the last group: fd77::11 for
/// the first node, as its IPv4 address ends in .11).
pub fn underlay_ip6(host: u8) -> Ipv6Addr {
    format!("fd77::{host}").parse().expect("valid IPv6")
}

/// The family the nodes' ferryd takes its underlay address from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Underlay {
    /// IPv4 only, an IPv4 default route.
    #[default]
    V4,
    /// IPv4 and IPv6 on every node (nodad), an IPv6 default route only.
    V6,
}

pub fn etcd_endpoint() -> String {
    format!("http://{}:{ETCD_PORT}", underlay_ip(1))
}

pub struct Lab {
    pub dir: TestDir,
    pub underlay: TestNetns,
    pub family: Underlay,
    etcd: Option<Child>,
    pub nodes: Vec<LabNode>,
    /// Extra ferryd arguments for every node (e.g. a short resync).
    pub ferryd_args: Vec<String>,
}

pub struct LabNode {
    pub name: String,
    pub ns: TestNetns,
    /// The node's IPv4 address on the underlay (it always has one).
    pub ip: Ipv4Addr,
    /// The address ferryd takes as its underlay: `ip`, or the IPv6 one.
    pub public_ip: IpAddr,
    pub dir: PathBuf,
    ferryd: Option<Child>,
    /// Pods set up in this node, in order.
    pub pods: Vec<LabPod>,
}

impl LabNode {
    /// `ferryd` with this node's flags (etcd, name, its own files, its own
    /// CNI call log, never the host's /run/ferry; the metrics port), run in
    /// the node's namespace: the daemon with more flags, or a subcommand.
    pub fn ferryd_command(&self) -> Command {
        let mut cmd = Command::new(bin("ferryd"));
        cmd.args([
            "--etcd-endpoints",
            &etcd_endpoint(),
            "--node-name",
            &self.name,
        ])
        .arg("--cni-conf-dir")
        .arg(self.dir.join("net.d"))
        .arg("--subnet-file")
        .arg(self.dir.join("subnet.env"))
        .arg("--ipam-data-dir")
        .arg(self.dir.join("ipam"))
        .arg("--cni-log")
        .arg(self.dir.join("cni.log"))
        .args(["--listen", &format!("127.0.0.1:{METRICS_PORT}")]);
        in_netns_cmd(&mut cmd, self.ns.netns());
        cmd
    }
}

pub struct LabPod {
    pub id: String,
    pub ns: TestNetns,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, in a dual-stack network (`ipv6Network`).
    pub ip6: Option<Ipv6Addr>,
}

impl Lab {
    /// The underlay with etcd running and `network_json` stored as the
    /// cluster network config. No nodes yet.
    pub fn new(network_json: &str) -> Lab {
        Lab::new_with(network_json, Underlay::V4)
    }

    /// [`Self::new`] with the nodes' underlay of `family`.
    pub fn new_with(network_json: &str, family: Underlay) -> Lab {
        let dir = TestDir::new("lab");
        let underlay = TestNetns::new();
        underlay.exec("ip", &["link", "set", "lo", "up"]);
        block_on(async {
            let h = NsHandle::new(underlay.netns())?;
            h.ensure_bridge(&BridgeSpec {
                name: "ul0",
                mtu: 1500,
                mac: [0x02, 0x77, 0, 0, 0, 1],
                promisc: false,
            })
            .await
        })
        .expect("create the underlay bridge");
        underlay.exec(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", underlay_ip(1)),
                "dev",
                "ul0",
            ],
        );
        if family == Underlay::V6 {
            underlay.exec(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("{}/64", underlay_ip6(1)),
                    "dev",
                    "ul0",
                    "nodad",
                ],
            );
        }
        let mut lab = Lab {
            dir,
            underlay,
            family,
            etcd: None,
            nodes: Vec::new(),
            ferryd_args: vec!["--resync-interval".into(), "1".into()],
        };
        lab.start_etcd();
        let out = lab.ferryd_cli(&["set-network", network_json]);
        assert!(
            out.status.success(),
            "ferryd set-network: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    fn etcd_dir(&self) -> PathBuf {
        self.dir.path().join("etcd")
    }

    /// Starts (or restarts, same data) etcd in the underlay namespace.
    pub fn start_etcd(&mut self) {
        assert!(self.etcd.is_none(), "etcd already runs");
        let ul = underlay_ip(1);
        let client = format!("http://{ul}:{ETCD_PORT}");
        let peer = format!("http://{ul}:2380");
        std::fs::create_dir_all(self.etcd_dir()).expect("etcd dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.etcd_dir().join("log"))
            .expect("etcd log");
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "lab", "--data-dir"])
            .arg(self.etcd_dir().join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("lab={peer}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        in_netns_cmd(&mut cmd, self.underlay.netns());
        die_with_parent(&mut cmd);
        self.etcd = Some(cmd.spawn().expect("spawn etcd (is etcd-server installed?)"));
        let ns = &self.underlay;
        let up = wait_until(Duration::from_secs(20), || {
            http_get(ns, SocketAddr::from((ul, ETCD_PORT)), "/health")
                .is_some_and(|(code, body)| code == 200 && body.contains("true"))
        });
        assert!(up, "etcd did not become healthy:\n{}", self.etcd_log());
    }

    /// Stops etcd (SIGKILL: an etcd that vanishes, as in a crash or a
    /// partition); the data stays for [`Self::start_etcd`].
    pub fn stop_etcd(&mut self) {
        if let Some(mut c) = self.etcd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn etcd_log(&self) -> String {
        std::fs::read_to_string(self.etcd_dir().join("log")).unwrap_or_default()
    }

    /// `ferryd <args>` run in the underlay namespace against the lab's etcd.
    pub fn ferryd_cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(bin("ferryd"));
        cmd.args(["--etcd-endpoints", &etcd_endpoint()]).args(args);
        cmd.stdin(Stdio::null());
        in_netns_cmd(&mut cmd, self.underlay.netns());
        cmd.output().expect("run ferryd")
    }

    /// Adds a node namespace on the underlay (address .11, .12, …, and
    /// fd77::11, … with [`Underlay::V6`]) and starts its ferryd. Returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.add_idle_node();
        self.start_ferryd(i);
        i
    }

    /// Adds a node without starting its ferryd (to start many at once).
    pub fn add_idle_node(&mut self) -> usize {
        let i = self.nodes.len();
        let name = format!("n{}", i + 1);
        let ns = TestNetns::new();
        ns.exec("ip", &["link", "set", "lo", "up"]);
        let ip = underlay_ip(11 + i as u8);
        block_on(async {
            let h = NsHandle::new(self.underlay.netns())?;
            let ul0 = h.require_link("ul0").await?;
            h.create_veth(&VethPair {
                host_name: &name,
                pod_name: "eth0",
                pod_ns: ns.netns(),
                mtu: 1500,
                pod_mac: None,
                controller: ul0.index,
            })
            .await
        })
        .expect("link the node to the underlay");
        ns.exec("ip", &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.exec("ip", &["link", "set", "eth0", "up"]);
        let public_ip = match self.family {
            Underlay::V4 => {
                ns.exec(
                    "ip",
                    &[
                        "route",
                        "add",
                        "default",
                        "via",
                        &underlay_ip(1).to_string(),
                    ],
                );
                IpAddr::V4(ip)
            }
            Underlay::V6 => {
                let ip6 = underlay_ip6(11 + i as u8);
                ns.exec(
                    "ip",
                    &["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"],
                );
                ns.exec(
                    "ip",
                    &[
                        "-6",
                        "route",
                        "add",
                        "default",
                        "via",
                        &underlay_ip6(1).to_string(),
                    ],
                );
                IpAddr::V6(ip6)
            }
        };
        let dir = self.dir.path().join(&name);
        std::fs::create_dir_all(&dir).expect("node dir");
        self.nodes.push(LabNode {
            name,
            ns,
            ip,
            public_ip,
            dir,
            ferryd: None,
            pods: Vec::new(),
        });
        i
    }

    /// Starts node `i`'s ferryd (logs appended to `<node dir>/ferryd.log`).
    pub fn start_ferryd(&mut self, i: usize) {
        let extra = self.ferryd_args.clone();
        let node = &mut self.nodes[i];
        assert!(
            node.ferryd.is_none(),
            "ferryd of {} already runs",
            node.name
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("ferryd.log"))
            .expect("ferryd log");
        let mut cmd = node.ferryd_command();
        cmd.args(&extra)
            .env("FERRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        die_with_parent(&mut cmd);
        node.ferryd = Some(cmd.spawn().expect("spawn ferryd"));
    }

    /// Kills node `i`'s ferryd with `signal` and waits for it.
    pub fn stop_ferryd(&mut self, i: usize, signal: nix::sys::signal::Signal) -> Option<i32> {
        let mut child = self.nodes[i].ferryd.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
        child.wait().ok().and_then(|s| s.code())
    }

    /// The pid of node `i`'s ferryd, while it runs.
    pub fn ferryd_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].ferryd.as_ref().map(Child::id)
    }

    pub fn ferryd_running(&mut self, i: usize) -> bool {
        self.nodes[i]
            .ferryd
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// GET `path` from node `i`'s ferryd.
    pub fn http(&self, i: usize, path: &str) -> Option<(u16, String)> {
        http_get(
            &self.nodes[i].ns,
            SocketAddr::from((Ipv4Addr::LOCALHOST, METRICS_PORT)),
            path,
        )
    }

    /// A metric's value from node `i`'s /metrics.
    pub fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let (_, body) = self.http(i, "/metrics")?;
        body.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse().ok()).flatten()
        })
    }

    pub fn wait_ready(&self, i: usize, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.http(i, "/readyz").is_some_and(|(code, _)| code == 200)
        })
    }

    /// Asserts every node is ready within `timeout`, with the logs otherwise.
    pub fn assert_all_ready(&self, timeout: Duration) {
        for i in 0..self.nodes.len() {
            assert!(
                self.wait_ready(i, timeout),
                "ferryd of {} not ready:\n{}",
                self.nodes[i].name,
                self.ferryd_log(i)
            );
        }
    }

    pub fn ferryd_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].dir.join("ferryd.log")).unwrap_or_default()
    }

    pub fn conflist(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("net.d").join("10-ferry.conflist")
    }

    /// The node subnet ferryd recorded in subnet.env (`FERRY_SUBNET`).
    pub fn node_subnet(&self, i: usize) -> Option<String> {
        let text = std::fs::read_to_string(self.nodes[i].dir.join("subnet.env")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("FERRY_SUBNET="))
            .map(str::to_string)
    }

    fn cnirun(&self, i: usize, verb: &str, netns: &str, id: &str) -> std::process::Output {
        let node = &self.nodes[i];
        let bin_dir = bin("ferry-bridge").parent().expect("bin dir").to_path_buf();
        let mut cmd = Command::new(bin("cnirun"));
        cmd.arg(verb)
            .arg(self.conflist(i))
            .args([netns, id, "eth0"])
            .env("CNI_PATH", &bin_dir)
            .env("CNI_CACHE_DIR", node.dir.join("cache"))
            .stdin(Stdio::null());
        in_netns_cmd(&mut cmd, node.ns.netns());
        cmd.output().expect("run cnirun")
    }

    /// ADDs a pod on node `i` through its conflist; returns the pod index.
    pub fn add_pod(&mut self, i: usize) -> usize {
        assert!(
            wait_until(Duration::from_secs(10), || self.conflist(i).exists()),
            "no conflist on {}:\n{}",
            self.nodes[i].name,
            self.ferryd_log(i)
        );
        let ns = TestNetns::new();
        // The runtime's own step (containerd and CRI-O bring up lo themselves).
        ns.exec("ip", &["link", "set", "lo", "up"]);
        let id = format!("{}-p{}", self.nodes[i].name, self.nodes[i].pods.len() + 1);
        let out = self.cnirun(i, "add", &ns.path_str(), &id);
        assert!(
            out.status.success(),
            "ADD {id}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let result: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("ADD prints a result");
        let ip: Ipv4Addr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no IPv4 in {result}"));
        let ip6: Option<Ipv6Addr> = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["address"].as_str()?.split('/').next()?.parse().ok())
            .next();
        let node = &mut self.nodes[i];
        node.pods.push(LabPod { id, ns, ip, ip6 });
        node.pods.len() - 1
    }

    /// DELs pod `p` of node `i` (the namespace stays until the lab drops).
    pub fn del_pod(&self, i: usize, p: usize) -> std::process::Output {
        let pod = &self.nodes[i].pods[p];
        self.cnirun(i, "del", &pod.ns.path_str(), &pod.id)
    }

    /// Every pod of the lab, as (node index, pod index).
    pub fn all_pods(&self) -> Vec<(usize, usize)> {
        self.nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| (0..n.pods.len()).map(move |p| (i, p)))
            .collect()
    }

    pub fn pod(&self, (i, p): (usize, usize)) -> &LabPod {
        &self.nodes[i].pods[p]
    }

    /// Pings every pod from every pod; returns the failed pairs by pod id.
    pub fn ping_matrix(&self, tries: u32) -> Vec<(String, String)> {
        let pods = self.all_pods();
        let mut failed = Vec::new();
        for &a in &pods {
            for &b in &pods {
                let (pa, pb) = (self.pod(a), self.pod(b));
                if !pa.ns.ping(pb.ip.into(), tries) {
                    failed.push((pa.id.clone(), pb.id.clone()));
                }
            }
        }
        failed
    }

    /// [`Self::ping_matrix`] over IPv6 (dual stack): every pod must have an
    /// IPv6 address; returns the failed pairs by pod id.
    pub fn ping_matrix6(&self, tries: u32) -> Vec<(String, String)> {
        let pods = self.all_pods();
        let mut failed = Vec::new();
        for &a in &pods {
            for &b in &pods {
                let (pa, pb) = (self.pod(a), self.pod(b));
                let ip6 = pb
                    .ip6
                    .unwrap_or_else(|| panic!("pod {} has no IPv6 address", pb.id));
                if !pa.ns.ping(ip6.into(), tries) {
                    failed.push((pa.id.clone(), pb.id.clone()));
                }
            }
        }
        failed
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut c) = node.ferryd.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.stop_etcd();
    }
}

/// A daemon of the lab dies with the test (even a killed one): SIGKILL when
/// the thread that spawned it exits.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
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

/// `GET path` over HTTP/1.0 to `addr` from inside `ns`: the socket is made
/// on a short-lived thread in `ns`, so it stays in `ns` afterwards.
pub fn http_get(ns: &TestNetns, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let stream = ferry_netops::in_netns(ns.netns(), || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1))
    })
    .ok()?;
    request(stream, path)
}

fn request(mut stream: TcpStream, path: &str) -> Option<(u16, String)> {
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: lab\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}
