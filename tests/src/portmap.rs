//! The chain portmap tests run: ferry-bridge (hairpin on) then ferry-portmap
//! in a [`BridgeNet`]'s fake host, and the servers and clients that check a
//! hostPort with real traffic.

use crate::{BridgeNet, PluginOutput, TestNetns, TestPod, bin, run_plugin_in};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

/// The bridge config of the chain. `hairpinMode`, as in flannel's and the
/// reference's Kubernetes conflists: with br_netfilter loaded (as on this
/// kind of node) the DNAT of a pod's packet to itself is bridged back out of
/// the port it came in on, which the bridge allows only in hairpin mode.
pub fn bridge_conf(net: &BridgeNet) -> Value {
    let mut c = net.conf("1.0.0");
    c["hairpinMode"] = json!(true);
    c
}

/// ferry-bridge ADD for `pod`: its result.
pub fn bridge_add(net: &BridgeNet, pod: &TestPod) -> Value {
    net.call(
        "ADD",
        &pod.id,
        Some(&pod.ns.path_str()),
        "eth0",
        &bridge_conf(net),
    )
    .ok_json()
}

/// ferry-bridge DEL for `pod`.
pub fn bridge_del(net: &BridgeNet, pod: &TestPod) {
    net.call(
        "DEL",
        &pod.id,
        Some(&pod.ns.path_str()),
        "eth0",
        &bridge_conf(net),
    )
    .ok_empty();
}

/// The portmap config of the chain: `mappings` in runtimeConfig, `prev` as prevResult.
pub fn pm_conf(net: &BridgeNet, mappings: Value, prev: Option<&Value>, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": net.name,
        "type": "ferry-portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": mappings},
    });
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    for (k, v) in extra.as_object().expect("object") {
        c[k] = v.clone();
    }
    c
}

/// ferry-portmap `cmd` for container `id` in the fake host.
pub fn portmap(
    net: &BridgeNet,
    cmd: &str,
    id: &str,
    netns: Option<&str>,
    conf: &Value,
) -> PluginOutput {
    run_plugin_in(
        &net.host,
        &bin("ferry-portmap"),
        cmd,
        &[
            ("CNI_CONTAINERID", Some(id)),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", Some("eth0")),
        ],
        &conf.to_string(),
    )
}

/// The fake host's nftables ruleset.
pub fn ruleset(ns: &TestNetns) -> String {
    ns.exec("nft", &["list", "ruleset"])
}

/// The pod's first address of a family in a bridge result.
pub fn pod_ip(result: &Value, v4: bool) -> IpAddr {
    result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .find(|ip: &IpAddr| ip.is_ipv4() == v4)
        .expect("an address of the family")
}

/// A TCP and a UDP server on `port` (both families) inside `ns` that answer
/// every connection or datagram with "<tag> <peer address>". They live until
/// the namespace's process ends (detached threads).
pub fn serve(ns: &TestNetns, port: u16, tag: &'static str) {
    let (tcp, udp) = ferry_netops::in_netns(ns.netns(), || {
        Ok((
            TcpListener::bind(SocketAddr::new("::".parse().unwrap(), port))?,
            UdpSocket::bind(SocketAddr::new("::".parse().unwrap(), port))?,
        ))
    })
    .expect("bind the pod's servers");
    std::thread::spawn(move || {
        for mut s in tcp.incoming().flatten() {
            let peer = s.peer_addr().map(|p| p.ip().to_canonical());
            let _ = write!(
                s,
                "{tag} {}",
                peer.map(|p| p.to_string()).unwrap_or_default()
            );
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let reply = format!("{tag} {}", from.ip().to_canonical());
            let _ = udp.send_to(reply.as_bytes(), from);
        }
    });
}

/// Connects from `ns` to `dst` over TCP and returns the server's answer, or
/// `None` when nothing answers.
pub fn tcp_from(ns: &TestNetns, dst: SocketAddr) -> Option<String> {
    ferry_netops::in_netns(ns.netns(), || {
        // The first SYN may meet a tentative IPv6 address or an unresolved
        // neighbour: a few tries.
        let mut last = Err(std::io::Error::other("no try"));
        for _ in 0..4 {
            last = TcpStream::connect_timeout(&dst, Duration::from_millis(700));
            if last.is_ok() {
                break;
            }
        }
        let mut s = last?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .ok()
}

pub fn udp_from(ns: &TestNetns, dst: SocketAddr) -> Option<String> {
    ferry_netops::in_netns(ns.netns(), || {
        let any: IpAddr = if dst.is_ipv4() {
            "0.0.0.0".parse().unwrap()
        } else {
            "::".parse().unwrap()
        };
        let s = UdpSocket::bind(SocketAddr::new(any, 0))?;
        s.set_read_timeout(Some(Duration::from_millis(400)))?;
        let mut buf = [0u8; 64];
        for _ in 0..8 {
            s.send_to(b"hi", dst)?;
            if let Ok(n) = s.recv(&mut buf) {
                return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        Err(std::io::Error::other("no answer"))
    })
    .ok()
}

pub fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}
