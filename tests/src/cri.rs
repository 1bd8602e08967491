//! Kubelet's path to ferry: containerd's CRI plugin (Debian's containerd
//! 1.6), driven by a CRI v1 client over its Unix socket as kubelet drives it,
//! running the conflist a real ferryd wrote.
//!
//! A [`CriLab`] is a [`Lab`] (underlay namespace, one real etcd, ferryd per
//! node) whose nodes are also runtime [`Node`]s: a private mount namespace on
//! the lab node's network namespace, in which containerd runs with its own
//! root, state and socket, the CNI bin dir of the node (ferry's plugins, and
//! `loopback`: containerd always adds its own loopback network by type) and
//! the conf dir ferryd writes into. The sandbox ("pause") image is the
//! busybox-static test image, built offline and imported into containerd's
//! `k8s.io` namespace; its command sleeps.
//!
//! Tests reach a pod's network namespace through its sandbox process
//! (`/proc/<pid>/ns/net`, the pid from the verbose PodSandboxStatus), and run
//! the host's tools there.
//!
//! Dropping the lab kills containerd, the shims and the sandboxes (with the
//! node's mount namespace, and their cgroups), then ferryd and etcd.

use crate::lab::Lab;
use crate::runtime::{Containerd, IMAGE, Node};
use crate::{TestNetns, wait_until};
use hyper_util::rt::TokioIo;
use ipnetwork::Ipv4Network;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest,
    PodSandboxStatusResponse, PortMapping, Protocol, RemovePodSandboxRequest, RunPodSandboxRequest,
    StatusRequest, StopPodSandboxRequest,
};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint, Uri};

/// The sandbox image containerd's CRI plugin is configured with.
pub const PAUSE_IMAGE: &str = "ferry.test/pause:latest";

/// How long one CRI call may take (RunPodSandbox runs the whole CNI chain).
pub const CRI_TIMEOUT: Duration = Duration::from_secs(60);

/// The cluster network of a [`CriLab`]: VXLAN, a /24 per node.
pub const NETWORK: &str =
    r#"{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan","vni":1}}"#;

/// The CNI network name ferryd writes into its conflist (its default).
pub const CNI_NETWORK: &str = "ferry";

/// The Kubernetes namespace of the test pods (K8S_POD_NAMESPACE).
pub const POD_NAMESPACE: &str = "ferry-test";

/// A CRI v1 runtime-service client on a Unix socket. Calls block the test
/// thread (a current-thread tokio runtime of its own).
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
}

impl CriClient {
    /// Connects to `sock` (tonic's Unix-socket connector: the URI is unused).
    pub fn connect(sock: &Path) -> CriClient {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let path = sock.to_path_buf();
        let channel = rt
            .block_on(async move {
                Endpoint::try_from("http://[::]:50051")?
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }))
                    .await
            })
            .unwrap_or_else(|e| panic!("connect to the CRI at {}: {e}", sock.display()));
        CriClient {
            rt,
            client: RuntimeServiceClient::new(channel),
        }
    }

    /// One call; a call that takes longer than [`CRI_TIMEOUT`] fails the test.
    fn call<T, F>(
        &self,
        what: &str,
        f: impl FnOnce(RuntimeServiceClient<Channel>) -> F,
    ) -> Result<T, tonic::Status>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let fut = f(self.client.clone());
        self.rt
            .block_on(async { tokio::time::timeout(CRI_TIMEOUT, fut).await })
            .unwrap_or_else(|_| panic!("CRI {what} did not answer within {CRI_TIMEOUT:?}"))
            .map(tonic::Response::into_inner)
    }

    /// The runtime's `NetworkReady` condition: (status, "reason: message").
    pub fn network_ready(&self) -> Result<(bool, String), tonic::Status> {
        let status = self.call("Status", |mut c| async move {
            c.status(StatusRequest { verbose: false }).await
        })?;
        let cond = status
            .status
            .into_iter()
            .flat_map(|s| s.conditions)
            .find(|c| c.r#type == "NetworkReady")
            .ok_or_else(|| tonic::Status::not_found("no NetworkReady condition"))?;
        Ok((cond.status, format!("{}: {}", cond.reason, cond.message)))
    }

    /// The CNI config containerd loaded, from the verbose Status
    /// (`cniconfig`, go-cni's view: its networks and their plugins).
    pub fn cni_config(&self) -> Result<Value, tonic::Status> {
        let status = self.call("Status", |mut c| async move {
            c.status(StatusRequest { verbose: true }).await
        })?;
        let text = status.info.get("cniconfig").cloned().unwrap_or_default();
        serde_json::from_str(&text)
            .map_err(|e| tonic::Status::internal(format!("cniconfig {text:?}: {e}")))
    }

    pub fn run_pod_sandbox(&self, config: PodSandboxConfig) -> Result<String, tonic::Status> {
        self.call("RunPodSandbox", |mut c| async move {
            c.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
        })
        .map(|r| r.pod_sandbox_id)
    }

    pub fn stop_pod_sandbox(&self, id: &str) -> Result<(), tonic::Status> {
        let pod_sandbox_id = id.to_string();
        self.call("StopPodSandbox", |mut c| async move {
            c.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id })
                .await
        })
        .map(drop)
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), tonic::Status> {
        let pod_sandbox_id = id.to_string();
        self.call("RemovePodSandbox", |mut c| async move {
            c.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id })
                .await
        })
        .map(drop)
    }

    /// The verbose status (containerd's `info` has the sandbox pid and the
    /// CNI result).
    pub fn pod_sandbox_status(&self, id: &str) -> Result<PodSandboxStatusResponse, tonic::Status> {
        let pod_sandbox_id = id.to_string();
        self.call("PodSandboxStatus", |mut c| async move {
            c.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id,
                verbose: true,
            })
            .await
        })
    }
}

/// A pod as kubelet describes it: metadata (name, uid, namespace), a cgroup
/// parent under the node's cgroups (removed with the node), hostPorts and
/// annotations.
pub fn pod_config(node: &Node, name: &str) -> PodSandboxConfig {
    let uid = format!("uid-{name}-{}", crate::unique_index());
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: uid.clone(),
            namespace: POD_NAMESPACE.to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: format!("/{}/{uid}", node.name),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A hostPort mapping as kubelet sends it.
pub fn host_port(protocol: Protocol, container_port: u16, host_port: u16) -> PortMapping {
    PortMapping {
        protocol: protocol as i32,
        container_port: container_port.into(),
        host_port: host_port.into(),
        host_ip: String::new(),
    }
}

/// A running pod sandbox.
pub struct CriPod {
    pub id: String,
    pub name: String,
    /// The address containerd reports (PodSandboxStatus.network.ip).
    pub ip: Ipv4Addr,
    /// The sandbox process, in the host's pid namespace.
    pub pid: u32,
    /// The pod's network namespace (a handle: drop it before checking that
    /// the pod's network was released, as kubelet holds none).
    pub netns: TestNetns,
    /// containerd's verbose info: its CNI result, the runtime spec…
    pub info: Value,
}

/// One node of a [`CriLab`].
pub struct CriNode {
    pub node: Node,
    pub containerd: Containerd,
    pub cri: CriClient,
    /// The lab node this is (its ferryd, its network namespace).
    pub lab_index: usize,
    /// ferryd's `--cni-conf-dir`, containerd's CNI `conf_dir`.
    pub conf_dir: PathBuf,
    /// ferry-ipam's store for the node's network.
    pub store: PathBuf,
}

impl CriNode {
    /// The conflist ferryd wrote into the conf dir, parsed.
    pub fn conflist(&self) -> Value {
        let path = self.conf_dir.join("10-ferry.conflist");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The verbose `info` containerd gives about a sandbox, parsed.
    pub fn sandbox_info(&self, id: &str) -> Value {
        let status = self
            .cri
            .pod_sandbox_status(id)
            .unwrap_or_else(|e| panic!("PodSandboxStatus {id}: {e}"));
        let info = status.info.get("info").map(String::as_str).unwrap_or("{}");
        serde_json::from_str(info).unwrap_or_else(|e| panic!("sandbox info of {id}: {e}: {info}"))
    }

    /// The address containerd reports for a sandbox.
    pub fn sandbox_ip(&self, id: &str) -> Option<Ipv4Addr> {
        let status = self.cri.pod_sandbox_status(id).ok()?;
        status.status?.network?.ip.parse().ok()
    }

    /// RunPodSandbox, then what the test needs to reach the pod.
    pub fn run_pod(&self, config: PodSandboxConfig) -> CriPod {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = self.cri.run_pod_sandbox(config).unwrap_or_else(|e| {
            panic!(
                "RunPodSandbox {name}: {e}\ncalls: {:#?}\ncontainerd:\n{}",
                self.node.call_log(),
                self.tail_log()
            )
        });
        let ip = self
            .sandbox_ip(&id)
            .unwrap_or_else(|| panic!("{name}: containerd reports no IPv4 address"));
        let info = self.sandbox_info(&id);
        let pid = info["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: no sandbox pid in {info}")) as u32;
        let netns = TestNetns::open(Path::new(&format!("/proc/{pid}/ns/net")));
        CriPod {
            id,
            name,
            ip,
            pid,
            netns,
            info,
        }
    }

    /// StopPodSandbox, asserting it succeeds.
    pub fn stop(&self, id: &str) {
        self.cri
            .stop_pod_sandbox(id)
            .unwrap_or_else(|e| panic!("StopPodSandbox {id}: {e}\n{}", self.tail_log()));
    }

    /// RemovePodSandbox, asserting it succeeds.
    pub fn remove(&self, id: &str) {
        self.cri
            .remove_pod_sandbox(id)
            .unwrap_or_else(|e| panic!("RemovePodSandbox {id}: {e}\n{}", self.tail_log()));
    }

    /// Stops and removes a pod as kubelet does once it is gone (its
    /// namespace handle dropped first).
    pub fn stop_and_remove(&self, pod: CriPod) {
        let id = pod.id.clone();
        drop(pod);
        self.stop(&id);
        self.remove(&id);
    }

    /// The reservations in ferry-ipam's store (addresses, and anything else
    /// that is not the store's own bookkeeping).
    pub fn store_leftovers(&self) -> Vec<String> {
        crate::store_leftovers(&self.store)
    }

    /// The last lines of containerd's log, for failure messages.
    pub fn tail_log(&self) -> String {
        let log = self.node.log("containerd");
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The ferry-bridge calls of the runtime for a sandbox (CNI_CONTAINERID
    /// is the sandbox ID), as (command, CNI_NETNS, CNI_ARGS).
    pub fn bridge_calls(&self, id: &str) -> Vec<(String, String, String)> {
        self.node
            .call_log()
            .iter()
            .filter_map(|l| {
                let (cmd, cid, netns) = crate::runtime::parse_call(l);
                let args = l.split_once(" args=").map(|(_, a)| a.to_string());
                (cid == id).then(|| (cmd, netns, args.unwrap_or_default()))
            })
            .collect()
    }
}

/// A [`Lab`] whose nodes run containerd with its CRI plugin.
pub struct CriLab {
    /// Dropped first: containerd, shims and sandboxes go before ferryd.
    pub nodes: Vec<CriNode>,
    pub lab: Lab,
}

impl Default for CriLab {
    fn default() -> Self {
        Self::new()
    }
}

impl CriLab {
    /// The underlay with etcd and the [`NETWORK`] config; no nodes yet.
    pub fn new() -> CriLab {
        CriLab {
            nodes: Vec::new(),
            lab: Lab::new(NETWORK),
        }
    }

    /// A node with containerd running and the images imported, but no
    /// ferryd yet: its conf dir is empty. Returns its index.
    pub fn add_idle_node(&mut self) -> usize {
        let lab_index = self.lab.add_idle_node();
        let lab_node = &self.lab.nodes[lab_index];
        let conf_dir = self
            .lab
            .conflist(lab_index)
            .parent()
            .expect("the conflist has a dir")
            .to_path_buf();
        std::fs::create_dir_all(&conf_dir).expect("the CNI conf dir");
        let store = lab_node.dir.join("ipam").join(CNI_NETWORK);
        let mut node = Node::with_netns(&format!("cri-{}", lab_node.name), lab_node.ns.share());
        let containerd = Containerd::start_cri(&mut node, &conf_dir, PAUSE_IMAGE);
        containerd.import_busybox(&node, &[IMAGE, PAUSE_IMAGE], &["/bin/sleep", "2147483647"]);
        let cri = CriClient::connect(&containerd.sock);
        self.nodes.push(CriNode {
            node,
            containerd,
            cri,
            lab_index,
            conf_dir,
            store,
        });
        self.nodes.len() - 1
    }

    /// Starts node `i`'s ferryd; returns how long containerd took from then
    /// to report NetworkReady (fails the test after `limit`).
    pub fn start_ferryd(&mut self, i: usize, limit: Duration) -> Duration {
        let t0 = Instant::now();
        self.lab.start_ferryd(self.nodes[i].lab_index);
        let node = &self.nodes[i];
        let mut last = None;
        let ready = wait_until(limit, || {
            let r = node.cri.network_ready();
            let up = matches!(r, Ok((true, _)));
            last = Some(r);
            up
        });
        assert!(
            ready,
            "NetworkReady not true within {limit:?} of ferryd's start: {last:?}\nconf dir: {:?}\nferryd:\n{}\ncontainerd:\n{}",
            std::fs::read_dir(&node.conf_dir)
                .map(|rd| rd.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
                .unwrap_or_default(),
            self.lab.ferryd_log(node.lab_index),
            node.tail_log()
        );
        t0.elapsed()
    }

    /// A ready node: containerd, then ferryd, NetworkReady within 30 s.
    pub fn add_node(&mut self) -> usize {
        let i = self.add_idle_node();
        self.start_ferryd(i, Duration::from_secs(30));
        i
    }

    /// Node `i`'s pod subnet and gateway, from the conflist ferryd wrote
    /// (what containerd runs; subnet.env may come a moment later).
    pub fn subnet(&self, i: usize) -> (Ipv4Network, Ipv4Addr) {
        let conflist = self.nodes[i].conflist();
        let subnet: Ipv4Network = conflist["plugins"][0]["ipam"]["ranges"][0][0]["subnet"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no IPv4 subnet in the conflist: {conflist:#}"));
        let gateway = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        (subnet, gateway)
    }

    /// Restarts node `i`'s containerd (SIGTERM, as `systemctl restart`;
    /// shims and sandboxes keep running) and reconnects, waiting until its
    /// CRI reports NetworkReady again.
    pub fn restart_containerd(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.containerd.restart(&mut node.node);
        node.cri = CriClient::connect(&node.containerd.sock);
        let up = wait_until(Duration::from_secs(30), || {
            matches!(node.cri.network_ready(), Ok((true, _)))
        });
        assert!(up, "CRI not ready after the restart:\n{}", node.tail_log());
    }
}

/// Annotations of a pod shaped by the `kubernetes.io/*-bandwidth`
/// annotations (quantities as kubelet reads them, e.g. "10M").
pub fn bandwidth_annotations(ingress: &str, egress: &str) -> HashMap<String, String> {
    HashMap::from([
        ("kubernetes.io/ingress-bandwidth".into(), ingress.into()),
        ("kubernetes.io/egress-bandwidth".into(), egress.into()),
    ])
}

/// A TCP and a UDP server on `port` in a pod's namespace, standing for the
/// pod's container: TCP answers `<marker> tcp` and closes, UDP answers each
/// datagram with `<marker> udp`. Stopped on drop.
pub struct PodServers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl PodServers {
    pub fn start(ns: &TestNetns, port: u16, marker: &str) -> PodServers {
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        // Sockets stay in the namespace they were made in.
        let tcp = ferry_netops::in_netns(ns.netns(), || TcpListener::bind(any))
            .unwrap_or_else(|e| panic!("bind TCP {any} in the pod: {e}"));
        let udp = ferry_netops::in_netns(ns.netns(), || UdpSocket::bind(any))
            .unwrap_or_else(|e| panic!("bind UDP {any} in the pod: {e}"));
        tcp.set_nonblocking(true).expect("nonblocking listener");
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("UDP timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let (tcp_reply, udp_reply) = (format!("{marker} tcp"), format!("{marker} udp"));
        let tcp_stop = stop.clone();
        let tcp_thread = std::thread::spawn(move || {
            while !tcp_stop.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.write_all(tcp_reply.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        let udp_stop = stop.clone();
        let udp_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !udp_stop.load(Ordering::Relaxed) {
                if let Ok((_, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(udp_reply.as_bytes(), from);
                }
            }
        });
        PodServers {
            stop,
            threads: vec![tcp_thread, udp_thread],
        }
    }
}

impl Drop for PodServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What a TCP server at `to` says, connecting from `ns` (`None`: nothing
/// answered within 2 s).
pub fn tcp_answer(ns: &TestNetns, to: SocketAddr) -> Option<String> {
    let mut conn = ferry_netops::in_netns(ns.netns(), || {
        TcpStream::connect_timeout(&to, Duration::from_secs(2))
    })
    .ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    Some(text)
}

/// The answer of a UDP server at `to` to a datagram sent from `ns`, trying
/// a few times (`None`: no answer).
pub fn udp_answer(ns: &TestNetns, to: SocketAddr) -> Option<String> {
    let sock = ferry_netops::in_netns(ns.netns(), || {
        UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
    })
    .ok()?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let mut buf = [0u8; 1500];
    (0..4).find_map(|_| {
        sock.send_to(b"ferry", to).ok()?;
        let (n, from) = sock.recv_from(&mut buf).ok()?;
        // The answer comes back from the address asked (conntrack undoes the DNAT).
        (from == to).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}
