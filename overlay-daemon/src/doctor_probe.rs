//! `ferryd doctor --probe`: a short-lived namespace on this node sends a few
//! ICMP echoes to each peer's pod gateway (the `.1` of its subnet, held by
//! its bridge) and says which peers do not answer and where the path breaks.
//!
//! What it creates, and why nothing outlives it:
//! - an anonymous network namespace (nothing mounted): it exists only while
//!   this process holds its descriptor, so it vanishes when doctor exits,
//!   however it exits (SIGKILL included);
//! - a veth pair whose other end is inside that namespace: the kernel
//!   deletes both ends when the namespace goes, and with the host end its
//!   /32 route and its proxy_arp setting;
//! - the probe's source address is a free address of this node's subnet
//!   (the highest one no reservation holds), on the namespace's end only:
//!   peers route the answers to this node through the overlay, and the /32
//!   route hands them to the probe.
//!
//! Doctor still deletes the veth itself when it is done.

use crate::doctor::{Report, Status};
use crate::lease::SubnetLease;
use ferry_netops::{NetNs, NsHandle, RouteSpec, VethPair};
use ipnetwork::{IpNetwork, Ipv4Network};
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Echo requests per peer.
const TRIES: usize = 3;
/// How long the probe waits for answers, for all peers together.
const WAIT: Duration = Duration::from_millis(800);

/// What the probe needs from the static checks.
pub struct ProbeInput<'a> {
    pub local: Option<Ipv4Network>,
    pub peers: &'a [SubnetLease],
    /// Addresses of the local subnet that reservations hold.
    pub taken: HashSet<Ipv4Addr>,
    /// Peers whose kernel entries the static checks found wrong, and which
    /// kind ("routing", "fdb/neighbour entries").
    pub broken: HashMap<Ipv4Network, &'static str>,
}

/// The highest host address of `subnet` that no reservation holds (the
/// allocator hands out the lowest first).
fn free_address(subnet: Ipv4Network, taken: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let first = u32::from(subnet.network()) + 2;
    let last = u32::from(subnet.broadcast()).checked_sub(1)?;
    (first..=last)
        .rev()
        .map(Ipv4Addr::from)
        .find(|a| !taken.contains(a))
}

pub async fn probe(h: &NsHandle, input: ProbeInput<'_>, rep: &mut Report) {
    let name = "probe";
    let Some(local) = input.local else {
        rep.push(
            name,
            Status::Warn,
            "not run: the node subnet is unknown",
            "fix etcd and the lease first",
        );
        return;
    };
    if input.peers.is_empty() {
        rep.ok(name, "no peers to probe");
        return;
    }
    let Some(src) = free_address(local, &input.taken) else {
        rep.push(
            name,
            Status::Warn,
            format!("not run: no free address in {local}"),
            "free an address",
        );
        return;
    };
    match run_probe(h, src, input.peers).await {
        Err(e) => rep.push(
            name,
            Status::Warn,
            format!("could not run: {e}"),
            "doctor --probe needs root (CAP_NET_ADMIN, CAP_NET_RAW)",
        ),
        Ok(answered) => {
            let mut down = Vec::new();
            for p in input.peers {
                if answered.contains(&gateway(p.subnet())) {
                    continue;
                }
                let at = match input.broken.get(&p.subnet()) {
                    Some(kind) => format!("this node's {kind}"),
                    None => format!(
                        "beyond this node (its entries are right): the underlay to {} (UDP to the VXLAN port) or the peer node itself",
                        p.public_ip
                    ),
                };
                down.push(format!(
                    "{} ({}) at {}: {at}",
                    p.node,
                    p.subnet(),
                    gateway(p.subnet())
                ));
            }
            if down.is_empty() {
                rep.ok(
                    name,
                    format!(
                        "{} of {} peers' pod gateways answered from {src}",
                        input.peers.len(),
                        input.peers.len()
                    ),
                );
            } else {
                rep.push(
                    name,
                    Status::Fail,
                    format!("{} of {} peers unreachable: {}", down.len(), input.peers.len(), down.join("; ")),
                    "fix the entries named above (ferryd repairs them when it runs), else check the underlay and the peer's `ferryd doctor`",
                );
            }
        }
    }
}

fn gateway(subnet: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// Sets up the namespace, pings, cleans up. Returns the gateways that
/// answered.
async fn run_probe(
    h: &NsHandle,
    src: Ipv4Addr,
    peers: &[SubnetLease],
) -> Result<HashSet<Ipv4Addr>, String> {
    let ns = NetNs::new_anonymous().map_err(|e| format!("create a namespace: {e}"))?;
    let host_name = format!("fdprobe{}", std::process::id() % 100_000);
    let host_end = h
        .create_veth(&VethPair {
            host_name: &host_name,
            pod_name: "eth0",
            pod_ns: &ns,
            mtu: 1280,
            pod_mac: None,
            controller: 0,
        })
        .await
        .map_err(|e| format!("create the probe's veth: {e}"))?;
    let result = async {
        // The host end answers ARP for everything (the namespace's default
        // route has no gateway) and takes the probe's answers.
        ferry_netops::sysctl::write(&format!("net/ipv4/conf/{host_name}/proxy_arp"), "1")
            .map_err(|e| format!("proxy_arp on {host_name}: {e}"))?;
        h.replace_route(&RouteSpec {
            dst: IpNetwork::V4(Ipv4Network::new(src, 32).expect("/32")),
            gw: None,
            oif: host_end.index,
            onlink: false,
        })
        .await
        .map_err(|e| format!("route to the probe: {e}"))?;
        let inner = NsHandle::new(&ns).map_err(|e| e.to_string())?;
        let eth0 = inner
            .require_link("eth0")
            .await
            .map_err(|e| e.to_string())?;
        inner
            .replace_address_nodad(
                eth0.index,
                IpNetwork::V4(Ipv4Network::new(src, 32).expect("/32")),
            )
            .await
            .map_err(|e| e.to_string())?;
        inner.set_up(eth0.index).await.map_err(|e| e.to_string())?;
        inner
            .replace_route(&RouteSpec {
                dst: "0.0.0.0/0".parse().expect("default"),
                gw: None,
                oif: eth0.index,
                onlink: false,
            })
            .await
            .map_err(|e| format!("default route in the probe: {e}"))?;
        let targets: Vec<Ipv4Addr> = peers.iter().map(|p| gateway(p.subnet())).collect();
        ferry_netops::in_netns(&ns, move || ping_all(&targets)).map_err(|e| format!("ping: {e}"))
    }
    .await;
    let _ = h.delete_link(host_end.index).await;
    drop(ns);
    result
}

/// Sends [`TRIES`] echo requests to each target from one raw socket and
/// collects the sources of echo replies for [`WAIT`].
fn ping_all(targets: &[Ipv4Addr]) -> std::io::Result<HashSet<Ipv4Addr>> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    let ident = (std::process::id() & 0xffff) as u16;
    let want: HashSet<Ipv4Addr> = targets.iter().copied().collect();
    let mut answered = HashSet::new();
    let send = |seq: u16, dst: Ipv4Addr| {
        let mut pkt = [0u8; 16];
        pkt[0] = 8; // echo request
        pkt[4..6].copy_from_slice(&ident.to_be_bytes());
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        pkt[8..16].copy_from_slice(b"ferrydoc");
        let sum = checksum(&pkt);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid buffer and address of the stated lengths.
        unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                libc::MSG_DONTWAIT,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
    };
    let deadline = Instant::now() + WAIT;
    let mut round = 0;
    let mut next_round = Instant::now();
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline && answered.len() < want.len() {
        if round < TRIES && Instant::now() >= next_round {
            for (i, t) in targets
                .iter()
                .enumerate()
                .filter(|(_, t)| !answered.contains(*t))
            {
                send((round * targets.len() + i) as u16, *t);
            }
            round += 1;
            next_round = Instant::now() + WAIT / (TRIES as u32 + 1);
        }
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 20) };
        if n <= 0 {
            continue;
        }
        // SAFETY: valid buffer of the stated length.
        let len = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if len < 28 {
            continue;
        }
        let pkt = &buf[..len as usize];
        let ihl = usize::from(pkt[0] & 0x0f) * 4;
        if pkt.len() < ihl + 8 {
            continue;
        }
        let icmp = &pkt[ihl..];
        let from = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
        if icmp[0] == 0 && icmp[4..6] == ident.to_be_bytes() && want.contains(&from) {
            answered.insert(from);
        }
    }
    Ok(answered)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let word = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_takes_the_highest_free_address() {
        let s: Ipv4Network = "10.244.3.0/24".parse().unwrap();
        let mut taken = HashSet::new();
        assert_eq!(
            free_address(s, &taken),
            Some(Ipv4Addr::new(10, 244, 3, 254))
        );
        taken.insert(Ipv4Addr::new(10, 244, 3, 254));
        assert_eq!(
            free_address(s, &taken),
            Some(Ipv4Addr::new(10, 244, 3, 253))
        );
        let tiny: Ipv4Network = "10.244.3.0/30".parse().unwrap();
        assert_eq!(
            free_address(tiny, &HashSet::new()),
            Some(Ipv4Addr::new(10, 244, 3, 2))
        );
    }

    #[test]
    fn icmp_checksum() {
        // An echo request with id 1 seq 1 and no payload: 0xf7fd.
        assert_eq!(checksum(&[8, 0, 0, 0, 0, 1, 0, 1]), 0xf7fd);
    }
}
