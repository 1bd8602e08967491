//! ferry-portmap under hostile or careless input (issue 9): more mappings
//! than one netlink attribute can carry, a hostIP the node does not own,
//! raw packets from a pod to the node's 127.0.0.1, two containers whose
//! tags collide, and container IDs longer than nft's comments.
//!
//! As in portmap.rs, every test builds its own fake host, pods and outside
//! in namespaces it creates; all of it vanishes on drop.

use ferry_tests::portmap::{bridge_add, bridge_del, pod_ip, portmap, ruleset, sa, serve, tcp_from};
use ferry_tests::{BridgeNet, Outside, TestNetns, TestPod, require_root};
use serde_json::{Value, json};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Every element of ferry's hostports sets and maps, one per line, with its
/// comment (`nft -j` would be exact too, but the text is what people read).
/// The portmap config of the chain, without extra keys.
fn pm_conf(net: &BridgeNet, mappings: Value, prev: Option<&Value>) -> Value {
    ferry_tests::portmap::pm_conf(net, mappings, prev, json!({}))
}

fn hostport_elements(ns: &TestNetns) -> Vec<String> {
    let out = ns
        .try_exec("nft", &["-j", "list", "table", "inet", "ferry"])
        .stdout;
    let Ok(v) = serde_json::from_slice::<Value>(&out) else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let set = item.get("set").or_else(|| item.get("map"));
        let Some(set) = set else { continue };
        let name = set["name"].as_str().unwrap_or_default();
        if !name.starts_with("hostports-") {
            continue;
        }
        for e in set["elem"].as_array().into_iter().flatten() {
            lines.push(format!("{name} {e}"));
        }
    }
    lines
}

/// `n` TCP mappings from hostPorts `first..first+n` to container port 8080.
fn many_mappings(first: u16, n: u16) -> Value {
    Value::Array(
        (0..n)
            .map(|i| json!({"hostPort": first + i, "containerPort": 8080, "protocol": "tcp"}))
            .collect(),
    )
}

/// ADD of `n` mappings for a pod either works completely (every element
/// installed, CHECK passes, the first, a middle and the last hostPort
/// answer over real TCP in each family) or is refused with a clear CNI
/// error that leaves nothing behind. Then DEL leaves nothing.
/// `dual_stack_snat`: both families and masquerade (5 elements a mapping);
/// else IPv4 only without snat (1 element a mapping: the batch fits in the
/// socket, so a wrapped attribute length would go unnoticed by send).
fn many_mappings_all_work_or_nothing(n: u16, dual_stack_snat: bool) {
    let net = BridgeNet::new(true);
    let out = Outside::new(&net);
    let pod = TestPod::new();
    let mut prev = bridge_add(&net, &pod);
    if !dual_stack_snat {
        out.route_back_to(&net);
        let ips = prev["ips"].as_array().unwrap().clone();
        prev["ips"] = Value::Array(
            ips.into_iter()
                .filter(|ip| !ip["address"].as_str().unwrap().contains(':'))
                .collect(),
        );
    }
    serve(&pod.ns, 8080, "pod");
    let first = 10000;
    let mappings = many_mappings(first, n);
    let mut conf = pm_conf(&net, mappings.clone(), Some(&prev));
    if !dual_stack_snat {
        conf["snat"] = json!(false);
    }
    let families: &[bool] = if dual_stack_snat {
        &[true, false]
    } else {
        &[true]
    };
    let add = portmap(&net, "ADD", &pod.id, Some(&pod.ns.path_str()), &conf);
    if add.code == 0 {
        assert_eq!(add.ok_json(), prev);
        let els = hostport_elements(&net.host);
        for map in families
            .iter()
            .map(|v4| if *v4 { "hostports-v4" } else { "hostports-v6" })
        {
            let dnat = els
                .iter()
                .filter(|l| l.starts_with(&format!("{map} ")))
                .count();
            assert_eq!(dnat, usize::from(n), "{map}: {dnat} of {n} elements");
        }
        portmap(&net, "CHECK", &pod.id, Some(&pod.ns.path_str()), &conf).ok_empty();
        for hp in [first, first + n / 2, first + n - 1] {
            let pairs = [(out.host_v4, out.out_v4), (out.host_v6, out.out_v6)];
            for (host, client) in pairs.into_iter().take(families.len()) {
                assert_eq!(
                    tcp_from(&out.ns, sa(host, hp)),
                    Some(format!("pod {client}")),
                    "hostPort {host}:{hp} of {n}"
                );
            }
        }
    } else {
        let e = add.err_json();
        let code = e["code"].as_u64().unwrap();
        assert!(code == 7 || (100..999).contains(&code), "unclear error {e}");
        assert!(!add.stderr.contains("panicked"), "{add:?}");
        assert!(
            hostport_elements(&net.host).is_empty(),
            "a refused ADD left elements"
        );
    }
    portmap(&net, "DEL", &pod.id, Some(&pod.ns.path_str()), &conf).ok_empty();
    assert!(hostport_elements(&net.host).is_empty(), "DEL left elements");
    bridge_del(&net, &pod);
    assert!(
        net.reservations().is_empty(),
        "the address is still reserved"
    );
    assert!(
        net.host.bridge_ports(&net.bridge).is_empty(),
        "a veth is left"
    );
}

#[test]
fn mappings_870_all_work_or_nothing() {
    if !require_root() {
        return;
    }
    many_mappings_all_work_or_nothing(870, true);
}

/// The case: 870 mappings of an IPv4 pod without snat made ADD
/// "succeed" with 7 elements installed (a u16 attribute length wrapped).
#[test]
fn mappings_870_ipv4_without_snat_all_work_or_nothing() {
    if !require_root() {
        return;
    }
    many_mappings_all_work_or_nothing(870, false);
}

#[test]
fn mappings_2000_all_work_or_nothing() {
    if !require_root() {
        return;
    }
    many_mappings_all_work_or_nothing(2000, true);
}

/// More mappings than ferry-portmap accepts for one pod: a clear CNI error
/// before any kernel work, nothing installed.
#[test]
fn too_many_mappings_refused_cleanly() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let pod = TestPod::new();
    let prev = bridge_add(&net, &pod);
    // ferry_portmap::MAX_MAPPINGS + 1 (a duplicate does not count).
    let mut mappings = many_mappings(1, 4097);
    let dup = mappings[0].clone();
    mappings.as_array_mut().unwrap().push(dup);
    let conf = pm_conf(&net, mappings, Some(&prev));
    let add = portmap(&net, "ADD", &pod.id, Some(&pod.ns.path_str()), &conf);
    let e = add.err_json();
    assert_eq!(e["code"], 7, "{e}");
    assert!(e["msg"].as_str().unwrap().contains("portMappings"), "{e}");
    assert!(e["msg"].as_str().unwrap().contains("4097"), "{e}");
    assert!(hostport_elements(&net.host).is_empty());
    let e = portmap(&net, "CHECK", &pod.id, Some(&pod.ns.path_str()), &conf).err_json();
    assert_eq!(e["code"], 7, "{e}");
    // The runtime's DEL of the failed chain leaves nothing either.
    portmap(&net, "DEL", &pod.id, None, &conf).ok_empty();
    bridge_del(&net, &pod);
    assert!(hostport_elements(&net.host).is_empty());
    assert!(
        net.reservations().is_empty(),
        "the address is still reserved"
    );
    assert!(
        net.host.bridge_ports(&net.bridge).is_empty(),
        "a veth is left"
    );
}

/// A hostIP the node does not own: another pod's (and the host's own)
/// connection to that address reaches the real owner of the address, never
/// the mapping pod. IPv4 and IPv6. A local hostIP keeps working.
#[test]
fn non_local_host_ip_is_not_hijacked() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(true);
    let out = Outside::new(&net);
    out.route_back_to(&net);
    // Addresses of the outside namespace, not of the (fake) node.
    let foreign4: IpAddr = "203.0.113.7".parse().unwrap();
    let foreign6: IpAddr = "2001:db8:ffff::7".parse().unwrap();
    out.ns.exec(
        "ip",
        &["addr", "add", &format!("{foreign4}/32"), "dev", "lo"],
    );
    out.ns.exec(
        "ip",
        &["addr", "add", &format!("{foreign6}/128"), "dev", "lo"],
    );
    net.host.exec(
        "ip",
        &[
            "route",
            "add",
            &format!("{foreign4}/32"),
            "via",
            &out.out_v4.to_string(),
        ],
    );
    net.host.exec(
        "ip",
        &[
            "-6",
            "route",
            "add",
            &format!("{foreign6}/128"),
            "via",
            &out.out_v6.to_string(),
        ],
    );
    let (a, b) = (TestPod::new(), TestPod::new());
    let hp = 8443;
    let mappings = json!([
        {"hostPort": hp, "containerPort": 8080, "hostIP": foreign4.to_string()},
        {"hostPort": hp, "containerPort": 8080, "hostIP": foreign6.to_string()},
        {"hostPort": hp + 1, "containerPort": 8080, "hostIP": out.host_v4.to_string()},
        {"hostPort": hp + 1, "containerPort": 8080, "hostIP": out.host_v6.to_string()},
    ]);
    let ra = bridge_add(&net, &a);
    let conf = pm_conf(&net, mappings.clone(), Some(&ra));
    // Accepted (the address may become the node's later, as with the
    // reference plugin), but only applied to local destinations.
    portmap(&net, "ADD", &a.id, Some(&a.ns.path_str()), &conf).ok_json();
    let rb = bridge_add(&net, &b);
    serve(&a.ns, 8080, "pod-a");
    serve(&out.ns, hp, "owner");
    for foreign in [foreign4, foreign6] {
        let got = tcp_from(&b.ns, sa(foreign, hp));
        assert!(
            got.as_deref().is_some_and(|g| g.starts_with("owner ")),
            "pod → {foreign}:{hp} reached {got:?}, not the address's owner"
        );
        let got = tcp_from(&net.host, sa(foreign, hp));
        assert!(
            got.as_deref().is_some_and(|g| g.starts_with("owner ")),
            "host → {foreign}:{hp} reached {got:?}, not the address's owner"
        );
    }
    // Local hostIPs still work, from outside and from the other pod.
    let (gw4, gw6) = net.gateways();
    for (host, client, gw) in [
        (out.host_v4, out.out_v4, gw4),
        (out.host_v6, out.out_v6, gw6),
    ] {
        assert_eq!(
            tcp_from(&out.ns, sa(host, hp + 1)),
            Some(format!("pod-a {client}"))
        );
        assert_eq!(
            tcp_from(&b.ns, sa(host, hp + 1)),
            Some(format!("pod-a {gw}"))
        );
    }
    let _ = (pod_ip(&rb, true), pod_ip(&rb, false));
    portmap(&net, "CHECK", &a.id, Some(&a.ns.path_str()), &conf).ok_empty();
    portmap(&net, "DEL", &a.id, Some(&a.ns.path_str()), &conf).ok_empty();
    assert!(hostport_elements(&net.host).is_empty());
    bridge_del(&net, &a);
    bridge_del(&net, &b);
}

// --- Raw frames from a pod (what a pod with CAP_NET_RAW can send). ---

fn mac_of(ns: &TestNetns, ifname: &str) -> [u8; 6] {
    let v = ns.ip_json(&["link", "show", ifname]);
    let text = v[0]["address"].as_str().expect("a MAC address");
    let mut mac = [0u8; 6];
    for (m, part) in mac.iter_mut().zip(text.split(':')) {
        *m = u8::from_str_radix(part, 16).expect("hex");
    }
    mac
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for c in chunks {
        for pair in c.chunks(2) {
            let w = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(w);
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame with an IPv4 TCP SYN.
fn syn_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend(sport.to_be_bytes());
    tcp.extend(dport.to_be_bytes());
    tcp.extend(0x1234_5678u32.to_be_bytes()); // seq
    tcp.extend(0u32.to_be_bytes()); // ack
    tcp.extend([0x50, 0x02]); // 20-byte header, SYN
    tcp.extend(64240u16.to_be_bytes()); // window
    tcp.extend([0, 0, 0, 0]); // checksum, urgent
    let mut pseudo = Vec::new();
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend([0, 6]);
    pseudo.extend((tcp.len() as u16).to_be_bytes());
    let c = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = Vec::new();
    frame.extend(dst_mac);
    frame.extend(src_mac);
    frame.extend(0x0800u16.to_be_bytes());
    frame.extend(ip);
    frame.extend(tcp);
    frame
}

/// Sends a raw SYN from `pod`'s eth0 (bypassing its routing: straight to
/// the bridge's MAC) and reports whether a SYN-ACK from `dst:dport` comes
/// back within 2 s.
fn raw_syn_answered(
    pod: &TestNetns,
    bridge_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
) -> bool {
    let pod_mac = mac_of(pod, "eth0");
    let sport = 40000 + (std::process::id() % 20000) as u16;
    let frame = syn_frame(pod_mac, bridge_mac, src, dst, sport, dport);
    ferry_netops::in_netns(pod.netns(), || {
        // SAFETY: plain socket calls on buffers owned by this function.
        unsafe {
            let proto = (libc::ETH_P_IP as u16).to_be();
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let ifindex = libc::if_nametoindex(c"eth0".as_ptr());
            let mut ll: libc::sockaddr_ll = std::mem::zeroed();
            ll.sll_family = libc::AF_PACKET as u16;
            ll.sll_protocol = proto;
            ll.sll_ifindex = ifindex as i32;
            ll.sll_halen = 6;
            ll.sll_addr[..6].copy_from_slice(&bridge_mac);
            let llp = &ll as *const libc::sockaddr_ll as *const libc::sockaddr;
            let lllen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            if libc::bind(fd.raw(), llp, lllen) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd.raw(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut next_send = Instant::now();
            let mut buf = [0u8; 2048];
            while Instant::now() < deadline {
                if Instant::now() >= next_send {
                    let n = libc::sendto(
                        fd.raw(),
                        frame.as_ptr() as *const libc::c_void,
                        frame.len(),
                        0,
                        llp,
                        lllen,
                    );
                    if n < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    next_send = Instant::now() + Duration::from_millis(500);
                }
                let n = libc::recv(
                    fd.raw(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                );
                if n < 54 {
                    continue;
                }
                let f = &buf[..n as usize];
                let ip = &f[14..];
                let ihl = usize::from(ip[0] & 0xf) * 4;
                if f[12..14] != [8, 0] || ip[9] != 6 || ip.len() < ihl + 14 {
                    continue;
                }
                let tcp = &ip[ihl..];
                let from_dst = ip[12..16] == dst.octets()
                    && tcp[0..2] == dport.to_be_bytes()
                    && tcp[2..4] == sport.to_be_bytes();
                if from_dst && tcp[13] & 0x12 == 0x12 {
                    return Ok(true);
                }
            }
            Ok(false)
        }
    })
    .expect("raw socket in the pod")
}

/// The raw descriptor of an owned fd.
trait RawFdExt {
    fn raw(&self) -> i32;
}
impl RawFdExt for OwnedFd {
    fn raw(&self) -> i32 {
        self.as_raw_fd()
    }
}

fn route_localnet(ns: &TestNetns, ifname: &str) -> String {
    let key = format!("/proc/sys/net/ipv4/conf/{ifname}/route_localnet");
    ferry_netops::in_netns(ns.netns(), || std::fs::read_to_string(&key))
        .expect("read route_localnet")
        .trim()
        .to_string()
}

fn set_route_localnet(ns: &TestNetns, ifname: &str, value: &str) {
    let key = format!("/proc/sys/net/ipv4/conf/{ifname}/route_localnet");
    ferry_netops::in_netns(ns.netns(), || std::fs::write(&key, value))
        .expect("write route_localnet");
}

/// CVE-2020-8558 class: with hostPorts (and so route_localnet on the
/// bridge), a raw SYN from a pod to the node's 127.0.0.1 gets no SYN-ACK
/// from a service bound there, while the same SYN to the node's bridge
/// address does (the sender works). localhost hostPorts keep working, and
/// route_localnet goes back to 0 when the last pod that needed it goes.
#[test]
fn raw_syn_from_a_pod_to_node_localhost_is_dropped() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let (a, b) = (TestPod::new(), TestPod::new());
    net.host.exec("ip", &["link", "set", "lo", "up"]);
    let ra = bridge_add(&net, &a);
    let rb = bridge_add(&net, &b);
    assert_eq!(route_localnet(&net.host, &net.bridge), "0");
    let hp = 8081;
    let ma = json!([{"hostPort": hp, "containerPort": 8080}]);
    let conf_a = pm_conf(&net, ma.clone(), Some(&ra));
    portmap(&net, "ADD", &a.id, Some(&a.ns.path_str()), &conf_a).ok_json();
    let mb = json!([{"hostPort": hp + 1, "containerPort": 8080}]);
    let conf_b = pm_conf(&net, mb.clone(), Some(&rb));
    portmap(&net, "ADD", &b.id, Some(&b.ns.path_str()), &conf_b).ok_json();
    assert_eq!(route_localnet(&net.host, &net.bridge), "1");
    serve(&a.ns, 8080, "pod-a");

    // Services of the node: one on localhost only, one on every address.
    let (local_port, any_port) = (9100, 9101);
    let (local, any) = ferry_netops::in_netns(net.host.netns(), || {
        Ok((
            TcpListener::bind("127.0.0.1:9100")?,
            TcpListener::bind("0.0.0.0:9101")?,
        ))
    })
    .unwrap();
    let (gw4, _) = net.gateways();
    let IpAddr::V4(gw4) = gw4 else { unreachable!() };
    let IpAddr::V4(src) = pod_ip(&rb, true) else {
        unreachable!()
    };
    let bridge_mac = mac_of(&net.host, &net.bridge);
    assert!(
        raw_syn_answered(&b.ns, bridge_mac, src, gw4, any_port),
        "control: a raw SYN to the bridge address must be answered"
    );
    assert!(
        !raw_syn_answered(&b.ns, bridge_mac, src, Ipv4Addr::LOCALHOST, local_port),
        "a pod reached the node's 127.0.0.1:{local_port}"
    );
    // The localhost hostPort (route_localnet's reason) still works.
    let (gw, _) = net.gateways();
    assert_eq!(
        tcp_from(&net.host, sa("127.0.0.1".parse().unwrap(), hp)),
        Some(format!("pod-a {gw}"))
    );
    drop((local, any));

    // route_localnet stays while a pod needs it, and goes back after.
    portmap(&net, "DEL", &a.id, None, &conf_a).ok_empty();
    assert_eq!(route_localnet(&net.host, &net.bridge), "1");
    portmap(&net, "DEL", &b.id, None, &conf_b).ok_empty();
    assert_eq!(route_localnet(&net.host, &net.bridge), "0");
    // Set by someone else before ferry: left as it was.
    set_route_localnet(&net.host, &net.bridge, "1");
    portmap(&net, "ADD", &a.id, Some(&a.ns.path_str()), &conf_a).ok_json();
    portmap(&net, "DEL", &a.id, None, &conf_a).ok_empty();
    assert_eq!(route_localnet(&net.host, &net.bridge), "1");
    assert!(hostport_elements(&net.host).is_empty());
    bridge_del(&net, &a);
    bridge_del(&net, &b);
}

/// The tag of a container's elements (the first word of their comments).
fn tag_of(ns: &TestNetns, hp: u16) -> String {
    let rs = ruleset(ns);
    let line = rs
        .lines()
        .find(|l| l.contains(&format!("tcp . {hp} comment \"hp-")))
        .unwrap_or_else(|| panic!("no element for {hp}:\n{rs}"));
    let start = line.find("comment \"").unwrap() + 9;
    line[start..].split(' ').next().unwrap().to_string()
}

/// Two containers whose tags collide (the test writes the second one's
/// element with the first one's tag, as a colliding container ID would get
/// it): the first one's ADD, repeated ADD and DEL never remove or take over
/// the other's element, and a hostPort it holds is a conflict.
#[test]
fn colliding_tags_never_touch_the_other_container() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let a = TestPod::new();
    let ra = bridge_add(&net, &a);
    let hp = 8090;
    let ma = json!([{"hostPort": hp, "containerPort": 80}]);
    let conf = pm_conf(&net, ma.clone(), Some(&ra));
    portmap(&net, "ADD", &a.id, Some(&a.ns.path_str()), &conf).ok_json();
    let tag = tag_of(&net.host, hp);
    let other = format!("{tag} {}/{}-colliding/eth0", net.name, a.id);
    net.host.exec(
        "nft",
        &[
            "add",
            "element",
            "inet",
            "ferry",
            "hostports-v4",
            &format!(
                "{{ tcp . {} comment \"{other}\" : 10.99.0.9 . 80 }}",
                hp + 1
            ),
        ],
    );
    let others = |ns: &TestNetns| -> usize {
        hostport_elements(ns)
            .iter()
            .filter(|l| l.contains("-colliding/eth0"))
            .count()
    };
    assert_eq!(others(&net.host), 1);
    // A repeated ADD replaces only the container's own elements.
    portmap(&net, "ADD", &a.id, Some(&a.ns.path_str()), &conf).ok_json();
    assert_eq!(
        others(&net.host),
        1,
        "a repeated ADD removed the other's element"
    );
    // The other's hostPort is a conflict, not "already ours".
    let both =
        json!([{"hostPort": hp, "containerPort": 80}, {"hostPort": hp + 1, "containerPort": 80}]);
    let e = portmap(
        &net,
        "ADD",
        &a.id,
        Some(&a.ns.path_str()),
        &pm_conf(&net, both, Some(&ra)),
    )
    .err_json();
    assert_eq!(e["code"], 120, "{e}");
    assert_eq!(others(&net.host), 1, "ADD took over the other's element");
    portmap(&net, "CHECK", &a.id, Some(&a.ns.path_str()), &conf).ok_empty();
    portmap(&net, "DEL", &a.id, None, &conf).ok_empty();
    assert_eq!(others(&net.host), 1, "DEL removed the other's element");
    let left = hostport_elements(&net.host);
    assert_eq!(left.len(), 1, "{left:#?}");
    bridge_del(&net, &a);
}

/// Container IDs longer than an nft comment (the spec sets no limit): ADD,
/// CHECK and DEL work, the comments stay within nft's limit, and two long
/// IDs that differ only after the first 300 characters are two owners.
#[test]
fn long_container_ids_work_and_stay_apart() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    // The pods' addresses are on a dummy link of the fake host (portmap
    // needs a route to them, not a pod).
    for args in [
        &[
            "link", "add", "pods77", "type", "veth", "peer", "name", "pods77p",
        ][..],
        &["addr", "add", "10.77.0.1/24", "dev", "pods77"],
        &["addr", "add", "fd00:77::1/64", "dev", "pods77", "nodad"],
        &["link", "set", "pods77", "up"],
    ] {
        net.host.exec("ip", args);
    }
    let pod = TestNetns::new();
    let netns = pod.path_str();
    let netns = Some(netns.as_str());
    let prefix = "a".repeat(300);
    let ids = [format!("{prefix}1"), format!("{prefix}2"), "b".repeat(5000)];
    let prev = |last: u8| {
        json!({"cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/x"}],
            "ips": [{"interface": 0, "address": format!("10.77.0.{last}/24")},
                    {"interface": 0, "address": format!("fd00:77::{last}/64")}]})
    };
    let confs: Vec<Value> = (0..3u16)
        .map(|i| {
            let m = json!([{"hostPort": 7000 + i, "containerPort": 80},
                           {"hostPort": 7000 + i, "containerPort": 80, "hostIP": "10.77.0.1"}]);
            pm_conf(&net, m, Some(&prev(10 + i as u8)))
        })
        .collect();
    for (id, conf) in ids.iter().zip(&confs) {
        portmap(&net, "ADD", id, netns, conf).ok_json();
    }
    for (id, conf) in ids.iter().zip(&confs) {
        portmap(&net, "CHECK", id, netns, conf).ok_empty();
    }
    let json = net
        .host
        .exec("nft", &["-j", "list", "table", "inet", "ferry"]);
    let v: Value = serde_json::from_str(&json).unwrap();
    let mut comments = 0;
    for item in v["nftables"].as_array().unwrap() {
        let Some(set) = item.get("set").or_else(|| item.get("map")) else {
            continue;
        };
        for e in set["elem"].as_array().into_iter().flatten() {
            // A map's element is [key, value].
            let key = if e.is_array() { &e[0] } else { e };
            let c = key["elem"]["comment"].as_str().unwrap_or_default();
            assert!(!c.is_empty() && c.len() < 128, "comment {c:?}");
            comments += 1;
        }
    }
    assert!(comments >= 3 * 4, "{json}");
    let before = hostport_elements(&net.host);
    portmap(&net, "DEL", &ids[0], None, &confs[0]).ok_empty();
    let after = hostport_elements(&net.host);
    assert!(after.len() < before.len());
    for (id, conf) in ids[1..].iter().zip(&confs[1..]) {
        portmap(&net, "CHECK", id, netns, conf).ok_empty();
    }
    let e = portmap(&net, "CHECK", &ids[0], netns, &confs[0]).err_json();
    assert_eq!(e["code"], 121, "{e}");
    for (id, conf) in ids[1..].iter().zip(&confs[1..]) {
        portmap(&net, "DEL", id, None, conf).ok_empty();
    }
    assert!(hostport_elements(&net.host).is_empty());
}

/// The tag an older ferry-portmap (and this one) gives (network, container
/// ID, ifname): "hp-" + FNV-1a 64 over the three, NUL-separated. Restated
/// here on purpose: DEL finds the elements of pods added before an upgrade
/// only if it never changes.
fn legacy_tag(network: &str, id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in network
        .bytes()
        .chain([0])
        .chain(id.bytes())
        .chain([0])
        .chain(ifname.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("hp-{h:016x}")
}

/// After an upgrade: DEL removes the elements an older ferry-portmap wrote
/// for the container (comment `hp-<tag> <container ID>/<ifname>`), and not
/// those of a container whose old-style comment shares the tag.
#[test]
fn del_removes_elements_of_an_older_ferry_but_not_a_colliding_one() {
    if !require_root() {
        return;
    }
    let net = BridgeNet::new(false);
    let a = TestPod::new();
    let ra = bridge_add(&net, &a);
    let ma = json!([{"hostPort": 7200, "containerPort": 80}]);
    let conf = pm_conf(&net, ma, Some(&ra));
    portmap(&net, "ADD", &a.id, Some(&a.ns.path_str()), &conf).ok_json();
    let mine = hostport_elements(&net.host);
    let old_id = format!("{}-old", a.id);
    let tag = legacy_tag(&net.name, &old_id, "eth0");
    for (port, comment) in [
        (7201, format!("{tag} {old_id}/eth0")),
        (7202, format!("{tag} {old_id}-colliding/eth0")),
    ] {
        net.host.exec(
            "nft",
            &[
                "add",
                "element",
                "inet",
                "ferry",
                "hostports-v4",
                &format!("{{ tcp . {port} comment \"{comment}\" : 10.99.0.9 . 80 }}"),
            ],
        );
    }
    let bare = json!({"cniVersion": "1.0.0", "name": net.name, "type": "ferry-portmap"});
    portmap(&net, "DEL", &old_id, None, &bare).ok_empty();
    let left = hostport_elements(&net.host);
    assert!(!left.iter().any(|l| l.contains("7201")), "{left:#?}");
    assert!(
        left.iter().any(|l| l.contains("-colliding/eth0")),
        "{left:#?}"
    );
    assert_eq!(left.len(), mine.len() + 1, "{left:#?}");
    portmap(&net, "DEL", &a.id, None, &conf).ok_empty();
    bridge_del(&net, &a);
}
