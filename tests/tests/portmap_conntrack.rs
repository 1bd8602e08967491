//! UDP hostPorts and conntrack: when a hostPort moves from one pod to
//! another, the flow of a client that never stops sending must follow it.
//!
//! A UDP conntrack entry lives as long as packets keep coming, and it keeps
//! the DNAT it was created with: without a flush, a client sending every
//! 50 ms from a fixed source port talks to the old pod's address forever.
//! ferry-portmap deletes the entries its mapping is responsible for (UDP,
//! the hostPort as original destination port, to an address of the node or
//! the hostIP) at ADD and at DEL, through ctnetlink, and nothing else.
//!
//! Same world as tests/tests/portmap.rs: a fake host namespace where the
//! plugins run (and whose conntrack table is the one flushed), pods, and an
//! "outside" namespace. `conntrack` (Debian's conntrack package) is used to
//! inspect and create entries only.

use ferry_tests::portmap::{bridge_add, bridge_del};
use ferry_tests::{
    BridgeNet, Outside, PluginOutput, TestNetns, TestPod, in_netns_cmd, kill_child, require_root,
    unique_index, wait_until,
};
use serde_json::{Value, json};
use std::io::BufRead;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A UDP server on `port` (both families) in `ns` answering every datagram
/// with `tag`; it lives as long as the test process (a detached thread).
/// The portmap config of the chain for `mappings`, after `prev`.
fn pm_conf(net: &BridgeNet, mappings: &Value, prev: &Value) -> Value {
    ferry_tests::portmap::pm_conf(net, mappings.clone(), Some(prev), json!({}))
}

/// ferry-portmap `cmd` for `pod`, with its namespace.
fn portmap(net: &BridgeNet, cmd: &str, pod: &TestPod, conf: &Value) -> PluginOutput {
    ferry_tests::portmap::portmap(net, cmd, &pod.id, Some(&pod.ns.path_str()), conf)
}

fn serve_udp(ns: &TestNetns, port: u16, tag: &'static str) {
    let sock = ferry_netops::in_netns(ns.netns(), || {
        UdpSocket::bind(SocketAddr::new("::".parse().unwrap(), port))
    })
    .expect("bind the pod's UDP server");
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(tag.as_bytes(), from);
        }
    });
}

/// A client in `ns` sending a datagram to `dst` every 50 ms from one fixed
/// source port (so conntrack sees one flow), recording every answer with
/// the time it came. Stops on drop.
struct Client {
    answers: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Client {
    fn start(ns: &TestNetns, src: SocketAddr, dst: SocketAddr) -> Client {
        let sock = ferry_netops::in_netns(ns.netns(), || UdpSocket::bind(src))
            .expect("bind the client socket");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let answers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let (sock, stop) = (sock.try_clone().unwrap(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = sock.send_to(b"hi", dst);
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let receiver = {
            let (answers, stop) = (answers.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = sock.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        answers.lock().unwrap().push((Instant::now(), text));
                    }
                }
            })
        };
        Client {
            answers,
            stop,
            threads: vec![sender, receiver],
        }
    }

    /// When `tag` first answered at or after `since`, waiting up to `wait`.
    fn first_answer_from(&self, tag: &str, since: Instant, wait: Duration) -> Option<Instant> {
        let deadline = Instant::now() + wait;
        loop {
            let hit = self
                .answers
                .lock()
                .unwrap()
                .iter()
                .find(|(t, s)| *t >= since && s == tag)
                .map(|(t, _)| *t);
            if hit.is_some() || Instant::now() > deadline {
                return hit;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A child process killed (and reaped) when the test ends, also by a panic.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill_child(&self.0);
        let _ = self.0.wait();
    }
}

/// `conntrack -E -e DESTROY` in a test's host namespace: every IPv4 entry
/// deleted while it runs, as the kernel reports it. Events are switched on
/// (the test's own namespace: its sysctl is the test's to set), and it must
/// run before the flows start: an entry created while nobody listened may
/// never report its end.
struct DestroyEvents {
    child: KillOnDrop,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// The marker entry's destination (TEST-NET-2, used by nothing else here).
const MARKER: &str = "dst=198.51.100.2 ";

impl DestroyEvents {
    fn start(ns: &TestNetns) -> DestroyEvents {
        ns.exec("sysctl", &["-qw", "net.netfilter.nf_conntrack_events=1"]);
        let mut cmd = Command::new("conntrack");
        cmd.args(["-E", "-e", "DESTROY", "-f", "ipv4"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        in_netns_cmd(&mut cmd, ns.netns());
        let mut child = KillOnDrop(cmd.spawn().expect("run conntrack -E"));
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let reader = {
            let (stdout, lines) = (child.0.stdout.take().unwrap(), lines.clone());
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap().push(line);
                }
            })
        };
        // Subscribed once it reports the deletion of a marker entry.
        let listening = wait_until(Duration::from_secs(10), || {
            let _ = ns.try_exec(
                "conntrack",
                &[
                    "-I",
                    "-p",
                    "udp",
                    "-s",
                    "198.51.100.1",
                    "-d",
                    "198.51.100.2",
                    "--sport",
                    "9",
                    "--dport",
                    "9",
                    "-t",
                    "30",
                ],
            );
            let _ = ns.try_exec("conntrack", &["-D", "-d", "198.51.100.2"]);
            std::thread::sleep(Duration::from_millis(100));
            lines.lock().unwrap().iter().any(|l| l.contains(MARKER))
        });
        assert!(listening, "conntrack -E never reported the marker entry");
        DestroyEvents {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// Stops listening; the deletions reported (markers left out).
    fn stop(mut self) -> Vec<String> {
        kill_child(&self.child.0);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| !l.contains(MARKER))
            .cloned()
            .collect()
    }
}

fn port() -> u16 {
    21000 + (std::process::id() % 20000) as u16 + (unique_index() % 1000) as u16
}

/// `conntrack -L` of one protocol and original destination port in `ns`:
/// one line per entry.
fn ct_list(ns: &TestNetns, proto: &str, dport: u16) -> Vec<String> {
    ns.exec(
        "conntrack",
        &[
            "-L",
            "-f",
            "ipv4",
            "-p",
            proto,
            "--orig-port-dst",
            &dport.to_string(),
            "-o",
            "id",
        ],
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// The `id=` of the entry in `lines` from `src` to `dst`, if there is one.
fn ct_id(lines: &[String], src: IpAddr, dst: IpAddr) -> Option<String> {
    let needle = format!("src={src} dst={dst} ");
    lines
        .iter()
        .find(|l| l.contains(&needle))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("id=")))
        .map(str::to_string)
}

/// The scenario: a client keeps sending to a UDP hostPort; pod A
/// (which holds it) is deleted and pod B is added with the same hostPort;
/// B answers within 1 s, over IPv4 and IPv6. Without the flush the entry
/// made for A keeps DNATing the flow to A's old address, and B never hears
/// from the client.
#[test]
fn udp_host_port_follows_the_pod_that_takes_it_over() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(true);
    let out = Outside::new(&net);
    let (a, b) = (TestPod::new(), TestPod::new());
    let hp = port();
    let mappings = json!([{"hostPort": hp, "containerPort": 8080, "protocol": "udp"}]);
    let ra = bridge_add(&net, &a);
    portmap(&net, "ADD", &a, &pm_conf(&net, &mappings, &ra)).ok_json();
    let rb = bridge_add(&net, &b);
    serve_udp(&a.ns, 8080, "pod-a");
    serve_udp(&b.ns, 8080, "pod-b");

    let start = Instant::now();
    let sport = hp.wrapping_add(1000).max(1024);
    let c4 = Client::start(
        &out.ns,
        SocketAddr::new(out.out_v4, sport),
        SocketAddr::new(out.host_v4, hp),
    );
    let c6 = Client::start(
        &out.ns,
        SocketAddr::new(out.out_v6, sport),
        SocketAddr::new(out.host_v6, hp),
    );
    for (c, fam) in [(&c4, "v4"), (&c6, "v6")] {
        assert!(
            c.first_answer_from("pod-a", start, Duration::from_secs(5))
                .is_some(),
            "{fam}: pod A never answered on its hostPort"
        );
    }

    // A goes (portmap DEL, bridge DEL), B takes the hostPort over.
    portmap(&net, "DEL", &a, &pm_conf(&net, &mappings, &ra)).ok_empty();
    bridge_del(&net, &a);
    // Let the client's packets meet the host without a mapping for a while:
    // the entry they create (to the host itself) must not stick either.
    std::thread::sleep(Duration::from_millis(300));
    portmap(&net, "ADD", &b, &pm_conf(&net, &mappings, &rb)).ok_json();
    let added = Instant::now();
    for (c, fam) in [(&c4, "v4"), (&c6, "v6")] {
        let got = c.first_answer_from("pod-b", added, Duration::from_secs(3));
        let entries = net.host.exec("conntrack", &["-L", "-p", "udp"]);
        let at = got.unwrap_or_else(|| {
            panic!("{fam}: pod B never answered within 3 s of its ADD; conntrack:\n{entries}")
        });
        eprintln!("{fam}: pod B answered {:?} after its ADD", at - added);
        assert!(
            at - added < Duration::from_secs(1),
            "{fam}: pod B answered only {:?} after its ADD",
            at - added
        );
    }
    drop((c4, c6));
    portmap(&net, "DEL", &b, &pm_conf(&net, &mappings, &rb)).ok_empty();
    bridge_del(&net, &b);
}

/// The flush is only the mapping's: flows to another port of the node, TCP
/// to the hostPort, and UDP to the hostPort that is routed through the node
/// (to a pod's own address, not to the node) keep their entries through the
/// DEL of one pod and the ADD of another on that hostPort: the kernel
/// reports no DESTROY for them (`conntrack -E`). The flow to the hostPort
/// itself is flushed by both, and ends up DNATed to the new pod.
#[test]
fn unrelated_flows_keep_their_conntrack_entries() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(true);
    let out = Outside::new(&net);
    out.route_back_to(&net);
    let (a, b) = (TestPod::new(), TestPod::new());
    let hp = port();
    let mappings = json!([{"hostPort": hp, "containerPort": 8080, "protocol": "udp"}]);
    let ra = bridge_add(&net, &a);
    portmap(&net, "ADD", &a, &pm_conf(&net, &mappings, &ra)).ok_json();
    let rb = bridge_add(&net, &b);
    let b_v4: IpAddr = rb["ips"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .find(|ip: &IpAddr| ip.is_ipv4())
        .expect("an IPv4 address for pod B");

    // Listening before any flow starts (see DestroyEvents).
    let events = DestroyEvents::start(&net.host);

    // Three clients, each from its own source port: the hostPort (the
    // mapping's flow), another port of the node, and the hostPort number on
    // pod B's own address (routed through the node, not to it).
    let sport = hp.wrapping_add(2000).max(1024);
    let mapped = Client::start(
        &out.ns,
        SocketAddr::new(out.out_v4, sport),
        SocketAddr::new(out.host_v4, hp),
    );
    let other_port = Client::start(
        &out.ns,
        SocketAddr::new(out.out_v4, sport + 1),
        SocketAddr::new(out.host_v4, hp + 1),
    );
    let routed = Client::start(
        &out.ns,
        SocketAddr::new(out.out_v4, sport + 2),
        SocketAddr::new(b_v4, hp),
    );
    // And a TCP entry to the hostPort (made with the conntrack tool).
    net.host.exec(
        "conntrack",
        &[
            "-I",
            "-p",
            "tcp",
            "-s",
            &out.out_v4.to_string(),
            "-d",
            &out.host_v4.to_string(),
            "--sport",
            "40000",
            "--dport",
            &hp.to_string(),
            "--state",
            "ESTABLISHED",
            "-u",
            "SEEN_REPLY",
            "-t",
            "600",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    let ids = || {
        let udp_hp = ct_list(&net.host, "udp", hp);
        (
            ct_id(&udp_hp, out.out_v4, out.host_v4),
            ct_id(&ct_list(&net.host, "udp", hp + 1), out.out_v4, out.host_v4),
            ct_id(&udp_hp, out.out_v4, b_v4),
            ct_id(&ct_list(&net.host, "tcp", hp), out.out_v4, out.host_v4),
        )
    };
    let before = ids();
    let (Some(_), Some(_), Some(_), Some(_)) = &before else {
        panic!("every flow has an entry before: {before:?}");
    };

    portmap(&net, "DEL", &a, &pm_conf(&net, &mappings, &ra)).ok_empty();
    bridge_del(&net, &a);
    std::thread::sleep(Duration::from_millis(200));
    portmap(&net, "ADD", &b, &pm_conf(&net, &mappings, &rb)).ok_json();
    std::thread::sleep(Duration::from_millis(300));
    let destroyed = events.stop().join("\n");

    let after = ids();
    assert_eq!(after.1, before.1, "the flow to another port lost its entry");
    assert_eq!(
        after.2, before.2,
        "the routed flow to a pod address lost its entry"
    );
    assert_eq!(after.3, before.3, "the TCP entry to the hostPort is gone");
    let mapped_flow = format!(
        "src={} dst={} sport={sport} dport={hp} ",
        out.out_v4, out.host_v4
    );
    let lines: Vec<&str> = destroyed.lines().collect();
    // DEL deletes the entry DNATed to A; ADD the one made in between (to
    // the node itself, unNATed).
    let a_v4 = ra["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&mapped_flow) && l.contains(&format!("src={a_v4} "))),
        "DEL did not delete the flow's entry DNATed to pod A:\n{destroyed}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&mapped_flow) && !l.contains(&format!("src={a_v4} "))),
        "ADD did not delete the flow's entry made while no pod held the port:\n{destroyed}"
    );
    assert!(
        lines.iter().all(|l| l.contains(&mapped_flow)),
        "an unrelated entry was deleted:\n{destroyed}"
    );
    // And the flow is now B's.
    let now = ct_list(&net.host, "udp", hp);
    assert!(
        now.iter().any(|l| l.contains(&mapped_flow)
            && l.contains(&format!("src={b_v4} dst={} sport=8080 ", out.out_v4))),
        "the flow is not DNATed to pod B: {now:?}"
    );
    drop((mapped, other_port, routed));
    portmap(&net, "DEL", &b, &pm_conf(&net, &mappings, &rb)).ok_empty();
    bridge_del(&net, &b);
}

/// A hostIP mapping wins over a mapping on every address: when pod B takes
/// the port on every address, the flows pod X's hostIP mapping holds keep
/// their entries (and X keeps answering them), while a flow to another of
/// the node's addresses, made before B's mapping existed, is flushed and
/// reaches B within 1 s.
#[test]
fn a_host_ip_mapping_keeps_its_flows_when_another_pod_maps_the_port_everywhere() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(true);
    let out = Outside::new(&net);
    // A second address of the node on the uplink.
    let second: IpAddr = match out.host_v4 {
        IpAddr::V4(a) => std::net::Ipv4Addr::from(u32::from(a) + 2).into(),
        IpAddr::V6(_) => unreachable!(),
    };
    net.host.exec(
        "ip",
        &["addr", "add", &format!("{second}/24"), "dev", "uplink"],
    );
    let (x, b) = (TestPod::new(), TestPod::new());
    let hp = port();
    let pinned = json!([{"hostPort": hp, "containerPort": 8080, "protocol": "udp",
                         "hostIP": out.host_v4.to_string()}]);
    let everywhere = json!([{"hostPort": hp, "containerPort": 8080, "protocol": "udp"}]);
    let rx = bridge_add(&net, &x);
    portmap(&net, "ADD", &x, &pm_conf(&net, &pinned, &rx)).ok_json();
    let rb = bridge_add(&net, &b);
    serve_udp(&x.ns, 8080, "pod-x");
    serve_udp(&b.ns, 8080, "pod-b");
    let events = DestroyEvents::start(&net.host);

    let start = Instant::now();
    let sport = hp.wrapping_add(3000).max(1024);
    let to_x = Client::start(
        &out.ns,
        SocketAddr::new(out.out_v4, sport),
        SocketAddr::new(out.host_v4, hp),
    );
    let to_second = Client::start(
        &out.ns,
        SocketAddr::new(out.out_v4, sport + 1),
        SocketAddr::new(second, hp),
    );
    assert!(
        to_x.first_answer_from("pod-x", start, Duration::from_secs(5))
            .is_some(),
        "pod X never answered on its hostIP"
    );
    std::thread::sleep(Duration::from_millis(300));

    portmap(&net, "ADD", &b, &pm_conf(&net, &everywhere, &rb)).ok_json();
    let added = Instant::now();
    let got = to_second.first_answer_from("pod-b", added, Duration::from_secs(3));
    let at = got.expect("pod B never answered on the node's other address");
    assert!(
        at - added < Duration::from_secs(1),
        "pod B answered only {:?} after its ADD",
        at - added
    );
    assert!(
        to_x.first_answer_from("pod-x", Instant::now(), Duration::from_secs(2))
            .is_some(),
        "pod X stopped answering on its hostIP"
    );
    let destroyed = events.stop().join("\n");
    let flow_x = format!("src={} dst={} sport={sport} ", out.out_v4, out.host_v4);
    assert!(
        !destroyed.contains(&flow_x),
        "the hostIP mapping's flow lost its entry:\n{destroyed}"
    );
    assert!(
        destroyed.contains(&format!("dst={second} sport={} dport={hp} ", sport + 1)),
        "the flow to the other address was not flushed:\n{destroyed}"
    );
    drop((to_x, to_second));
    portmap(&net, "DEL", &b, &pm_conf(&net, &everywhere, &rb)).ok_empty();
    portmap(&net, "DEL", &x, &pm_conf(&net, &pinned, &rx)).ok_empty();
    bridge_del(&net, &b);
    bridge_del(&net, &x);
}
