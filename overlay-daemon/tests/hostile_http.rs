//! ferryd's HTTP port against hostile clients: a real ferryd in a lab node
//! (its own network namespace, a real etcd), clients on the node's loopback.

use ferry_tests::etcd::require_etcd;
use ferry_tests::lab::{Lab, METRICS_PORT};
use ferry_tests::{require_root, wait_until};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const VXLAN: &str =
    r#"{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan","vni":1}}"#;
const READY: Duration = Duration::from_secs(30);
/// Half-sent requests opened at once.
const FLOOD: usize = 3000;
/// The file limit (soft and hard) ferryd gets in the flood test: a systemd
/// unit's default soft limit, far below FLOOD.
const FERRYD_NOFILE: u64 = 1024;

fn can_run() -> bool {
    require_root() && require_etcd()
}

fn one_node(args: &[&str]) -> Lab {
    let mut lab = Lab::new(VXLAN);
    lab.ferryd_args = args.iter().map(|a| a.to_string()).collect();
    lab.add_node();
    lab.assert_all_ready(READY);
    lab
}

fn addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, METRICS_PORT))
}

/// Connects `count` clients to node 0's ferryd from inside the node and
/// sends each an unfinished request head; stops early after a run of failed
/// connects (a full backlog drops SYNs). Returns the open connections.
fn half_sent(lab: &Lab, count: usize) -> Vec<TcpStream> {
    ferry_netops::in_netns(lab.nodes[0].ns.netns(), || {
        let mut open = Vec::with_capacity(count);
        let mut failed_in_a_row = 0;
        for _ in 0..count {
            match TcpStream::connect_timeout(&addr(), Duration::from_millis(100)) {
                Ok(mut s) => {
                    failed_in_a_row = 0;
                    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
                    open.push(s);
                }
                Err(_) => {
                    failed_in_a_row += 1;
                    if failed_in_a_row >= 20 {
                        break;
                    }
                }
            }
        }
        Ok::<_, std::io::Error>(open)
    })
    .expect("open connections in the node")
}

/// Whether the server closed `s` (FIN or RST), waiting at most `wait`.
fn closed_by_server(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).expect("read timeout");
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // A response (to a complete request): keep reading.
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Sets the soft and hard RLIMIT_NOFILE of process `pid`.
fn set_nofile(pid: u32, limit: u64) {
    let lim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: a valid rlimit pointer; a null old-limit pointer is allowed.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// This process's file limit raised to its hard limit; returns it.
fn raise_own_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit pointers.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// 3000 half-sent requests against a ferryd limited to 1024 files: the
/// control loop still rewrites a deleted conflist, /healthz still answers at
/// once, and ferryd keeps running. (Before: the connections took every
/// descriptor, the conflist stayed deleted and /healthz timed out.)
#[test]
fn thousands_of_half_sent_requests_starve_neither_the_loop_nor_the_probes() {
    if !can_run() {
        return;
    }
    let own = raise_own_nofile();
    let flood = FLOOD.min(own.saturating_sub(256) as usize);
    assert!(
        flood > 2 * FERRYD_NOFILE as usize,
        "this process may open only {own} files"
    );
    let mut lab = one_node(&["--resync-interval", "1"]);
    let pid = lab.ferryd_pid(0).expect("ferryd runs");
    set_nofile(pid, FERRYD_NOFILE);

    let t = Instant::now();
    let conns = half_sent(&lab, flood);
    eprintln!("{} half-sent connections in {:?}", conns.len(), t.elapsed());
    assert!(
        conns.len() > FERRYD_NOFILE as usize,
        "only {} connections",
        conns.len()
    );

    let conflist = lab.conflist(0);
    std::fs::remove_file(&conflist).expect("delete the conflist");
    assert!(
        wait_until(Duration::from_secs(5), || conflist.exists()),
        "the deleted conflist was not restored while {} connections were open:\n{}",
        conns.len(),
        lab.ferryd_log(0)
    );
    let t = Instant::now();
    let answer = lab.http(0, "/healthz");
    let took = t.elapsed();
    assert_eq!(
        answer.as_ref().map(|(code, _)| *code),
        Some(200),
        "/healthz: {answer:?} after {took:?}\n{}",
        lab.ferryd_log(0)
    );
    assert!(took < Duration::from_secs(2), "/healthz took {took:?}");
    assert!(lab.ferryd_running(0), "{}", lab.ferryd_log(0));
    drop(conns);
    assert!(lab.wait_ready(0, Duration::from_secs(10)));
}

/// A silent connection is closed after the idle timeout; one that trickles
/// a request head byte by byte (never idle) after the header timeout.
#[test]
fn idle_and_slow_connections_are_closed_after_their_timeouts() {
    if !can_run() {
        return;
    }
    let lab = one_node(&[
        "--resync-interval",
        "1",
        "--http-idle-timeout",
        "1",
        "--http-header-timeout",
        "3",
    ]);
    let connect = |n: usize| {
        ferry_netops::in_netns(lab.nodes[0].ns.netns(), || {
            (0..n)
                .map(|_| TcpStream::connect_timeout(&addr(), Duration::from_secs(1)))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .expect("connect")
    };
    let mut conns = connect(3);
    let start = Instant::now();
    for s in &mut conns {
        assert!(
            closed_by_server(s, Duration::from_secs(3)),
            "a silent connection is still open after {:?}",
            start.elapsed()
        );
    }

    let mut trickle = connect(1).pop().expect("one connection");
    let start = Instant::now();
    let head =
        b"GET /healthz HTTP/1.1\r\nHost: a-very-slow-client\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaa";
    let mut sent = 0;
    let mut closed_after = None;
    while start.elapsed() < Duration::from_secs(8) {
        if trickle.write_all(&head[sent % head.len()..][..1]).is_err()
            || closed_by_server(&mut trickle, Duration::from_millis(300))
        {
            closed_after = Some(start.elapsed());
            break;
        }
        sent += 1;
    }
    let closed_after = closed_after.expect("a trickling request head was never cut off");
    assert!(
        closed_after >= Duration::from_millis(1500),
        "closed after {closed_after:?}: a client that keeps sending is not idle"
    );
    assert!(
        closed_after <= Duration::from_secs(5),
        "closed only after {closed_after:?} (header timeout 3 s)"
    );
    // The server itself is fine.
    assert_eq!(lab.http(0, "/healthz").map(|(c, _)| c), Some(200));
}
