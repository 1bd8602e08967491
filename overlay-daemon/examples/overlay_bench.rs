//! The overlay benchmark (run by scripts/bench-overlay.sh, which builds the
//! release binaries and points FERRY_BIN_DIR at them):
//!
//! 1. Route programming for N simulated remote nodes: leases written straight
//!    into a real etcd, a real ferryd programming its node, next to
//!    `ip -batch` (neighbours, routes) + `bridge -batch` (fdb) programming the
//!    same entries in a fresh namespace, in the same run, alternating.
//!    Two ferryd figures: "live" (ferryd running, time from the first lease
//!    write to every peer programmed) and "cold" (leases exist, time from
//!    ferryd's start to every peer programmed).
//! 2. ferryd's RSS with N peers (VmRSS and VmHWM).
//! 3. How long a new node's pod takes to become reachable from an existing
//!    node's pod, counted from the new node's ferryd start.
//!
//! Output: a markdown report on stdout.

use etcd_client::{Txn, TxnOp};
use ferry_tests::TestNetns;
use ferry_tests::lab::{Lab, etcd_endpoint, underlay_ip};
use ferryd::lease::{Mac, SubnetLease, subnet_key_segment};
use ferryd::network::{BackendType, NetworkConfig};
use ferryd::store::{Store, StoreOptions};
use ipnetwork::Ipv4Network;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const NET: &str = r#"{"network":"10.0.0.0/8","subnetLen":24,"backend":{"type":"vxlan","vni":1}}"#;

struct Fake {
    subnet: Ipv4Network,
    public_ip: Ipv4Addr,
    mac: Mac,
}

/// `n` fake remote nodes, avoiding `taken` (the real node's subnet).
fn fakes(cfg: &NetworkConfig, n: usize, taken: &[Ipv4Network]) -> Vec<Fake> {
    cfg.candidates()
        .filter(|s| !taken.contains(s))
        .take(n)
        .enumerate()
        .map(|(i, subnet)| Fake {
            subnet,
            public_ip: Ipv4Addr::new(
                172,
                16 + (i / 65536) as u8,
                (i / 256 % 256) as u8,
                (i % 256) as u8,
            ),
            mac: Mac::derived(&format!("fake-{i}")),
        })
        .collect()
}

/// Writes the fakes' leases into the lab's etcd (128 puts per transaction,
/// etcd's default limit). The client runs on a thread inside the underlay
/// namespace, where etcd listens.
fn write_leases(lab: &Lab, fakes: &[Fake]) -> Duration {
    let values: Vec<(String, String)> = fakes
        .iter()
        .map(|f| {
            let lease = SubnetLease {
                subnet: Some(f.subnet),
                node: format!("fake-{}", f.public_ip),
                public_ip: f.public_ip.into(),
                backend: BackendType::Vxlan,
                vtep_mac: Some(f.mac),
                renewed_at: 0,
                ipv6_subnet: None,
            };
            (
                format!("/ferry/network/subnets/{}", subnet_key_segment(f.subnet)),
                lease.to_json(),
            )
        })
        .collect();
    ferry_netops::in_netns(lab.underlay.netns(), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let opts = StoreOptions {
                endpoints: vec![etcd_endpoint()],
                ..Default::default()
            };
            let store = Store::connect(&opts).await.map_err(std::io::Error::other)?;
            let mut kv = store.client().kv_client();
            let t = Instant::now();
            for chunk in values.chunks(128) {
                let ops: Vec<TxnOp> = chunk
                    .iter()
                    .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
                    .collect();
                kv.txn(Txn::new().and_then(ops))
                    .await
                    .map_err(std::io::Error::other)?;
            }
            Ok(t.elapsed())
        })
    })
    .expect("write leases into etcd")
}

/// Polls ferryd's metrics until `n` peers are programmed.
fn wait_programmed(lab: &Lab, node: usize, n: usize, timeout: Duration) -> Instant {
    let want = n as f64;
    let end = Instant::now() + timeout;
    loop {
        if lab.metric(node, "ferry_peers_programmed") == Some(want) {
            return Instant::now();
        }
        assert!(
            Instant::now() < end,
            "ferryd did not program {n} peers in {timeout:?}:\n{}",
            lab.ferryd_log(node)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn count_lines(ns: &TestNetns, program: &str, args: &[&str]) -> usize {
    ns.exec(program, args).lines().count()
}

/// Checks the kernel of node `i` really holds `n` peers' entries.
fn assert_kernel_has(lab: &Lab, i: usize, n: usize) {
    let ns = &lab.nodes[i].ns;
    let routes = count_lines(ns, "ip", &["route", "show", "proto", "70"]);
    let neigh = count_lines(
        ns,
        "ip",
        &["neigh", "show", "dev", "ferry.1", "nud", "permanent"],
    );
    let fdb = ns
        .exec("bridge", &["fdb", "show", "dev", "ferry.1"])
        .lines()
        .filter(|l| l.contains(" dst "))
        .count();
    assert_eq!(
        (routes, neigh, fdb),
        (n, n, n),
        "kernel entries on node {i}"
    );
}

/// RSS and peak RSS of `pid` in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The same entries as ferryd programs, with iproute2's batch mode, in a
/// fresh namespace with the same VXLAN device. Returns the total time of
/// `ip -batch` (neighbours), `bridge -batch` (fdb) and `ip -batch` (routes).
fn ip_batch(fakes: &[Fake]) -> Duration {
    let ns = TestNetns::new();
    for cmd in [
        "link add eth0 type veth peer name eth0p",
        "link set eth0 up",
        "link set eth0p up",
        "addr add 192.168.77.11/24 dev eth0",
        "link add ferry.1 type vxlan id 1 local 192.168.77.11 dev eth0 dstport 4789 nolearning",
        "link set ferry.1 mtu 1450 up",
        "addr add 10.0.1.0/32 dev ferry.1",
    ] {
        ns.exec("ip", &cmd.split(' ').collect::<Vec<_>>());
    }
    let dir = ferry_tests::TestDir::new("ipbatch");
    let (mut neigh, mut fdb, mut route) = (String::new(), String::new(), String::new());
    for f in fakes {
        let gw = f.subnet.network();
        let _ = writeln!(
            neigh,
            "neigh replace {gw} lladdr {} dev ferry.1 nud permanent",
            f.mac
        );
        let _ = writeln!(
            fdb,
            "fdb replace {} dev ferry.1 dst {} self permanent",
            f.mac, f.public_ip
        );
        let _ = writeln!(
            route,
            "route replace {} via {gw} dev ferry.1 onlink proto 70",
            f.subnet
        );
    }
    let files: Vec<(&str, std::path::PathBuf)> = [
        ("ip", "neigh", &neigh),
        ("bridge", "fdb", &fdb),
        ("ip", "route", &route),
    ]
    .into_iter()
    .map(|(prog, name, text)| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write batch file");
        (prog, p)
    })
    .collect();
    let t = Instant::now();
    for (prog, path) in &files {
        ns.exec(prog, &["-batch", &path.display().to_string()]);
    }
    let took = t.elapsed();
    assert_eq!(
        count_lines(&ns, "ip", &["route", "show", "proto", "70"]),
        fakes.len()
    );
    took
}

struct Run {
    live: Duration,
    /// The etcd transactions writing the leases (part of `live`).
    write: Duration,
    cold: Duration,
    batch: Duration,
    rss: (u64, u64),
}

fn one_run(n: usize) -> Run {
    let cfg = NetworkConfig::from_json(NET).unwrap();
    let mut lab = Lab::new(NET);
    lab.ferryd_args = vec!["--resync-interval".into(), "30".into()];
    let node = lab.add_node();
    lab.assert_all_ready(Duration::from_secs(30));
    let mine: Ipv4Network = {
        let gw = lab.node_subnet(node).unwrap();
        let net: Ipv4Network = gw.parse().unwrap();
        Ipv4Network::new(net.network(), net.prefix()).unwrap()
    };
    let fakes = fakes(&cfg, n, &[mine]);

    // Live: ferryd is running when the leases appear.
    let t0 = Instant::now();
    let write = write_leases(&lab, &fakes);
    let live = wait_programmed(&lab, node, n, Duration::from_secs(120)) - t0;
    assert_kernel_has(&lab, node, n);
    let rss = rss_kib(lab.ferryd_pid(node).unwrap());

    // Cold: a restarted ferryd finds the leases already there; wipe the
    // kernel state first so it programs everything again.
    lab.stop_ferryd(node, nix::sys::signal::Signal::SIGKILL);
    lab.nodes[node].ns.exec("ip", &["link", "del", "ferry.1"]);
    let t0 = Instant::now();
    lab.start_ferryd(node);
    let cold = wait_programmed(&lab, node, n, Duration::from_secs(120)) - t0;
    assert_kernel_has(&lab, node, n);

    let batch = ip_batch(&fakes);
    Run {
        live,
        write,
        cold,
        batch,
        rss,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A 2-node lab with a pod each; a third node's ferryd starts at t0, a pod is
/// ADDed on it as soon as its conflist exists, and n1's pod pings it until
/// it answers. Returns (t0 → reachable, pod ADDed → reachable).
fn new_node_reachable() -> (Duration, Duration) {
    let mut lab = Lab::new(
        r#"{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan","vni":1}}"#,
    );
    lab.add_node();
    lab.add_node();
    lab.assert_all_ready(Duration::from_secs(30));
    lab.add_pod(0);
    let n3 = lab.add_idle_node();
    let t0 = Instant::now();
    lab.start_ferryd(n3);
    lab.add_pod(n3);
    let t_pod = Instant::now();
    let target = lab.pod((n3, 0)).ip.to_string();
    let from = &lab.pod((0, 0)).ns;
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = from
            .try_exec("ping", &["-n", "-c", "1", "-W", "0.1", &target])
            .status
            .success();
        if ok {
            let now = Instant::now();
            return (now - t0, now - t_pod);
        }
        assert!(Instant::now() < end, "new node never reachable");
    }
}

fn main() {
    if !ferry_tests::require_root() || !ferry_tests::etcd::require_etcd() {
        std::process::exit(1);
    }
    let sizes: Vec<usize> = std::env::var("FERRY_BENCH_SIZES")
        .unwrap_or_else(|_| "100,1000,5000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let runs: usize = std::env::var("FERRY_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let _ = underlay_ip(1);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "| peers | ferryd live (of which etcd writes) | ferryd cold start | ip -batch + bridge -batch | live / batch | cold / batch | ferryd RSS (peak) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for &n in &sizes {
        let mut all = Vec::new();
        for r in 0..runs {
            eprintln!("n={n} run {}/{runs}", r + 1);
            all.push(one_run(n));
        }
        let live = median(all.iter().map(|r| r.live).collect());
        let write = median(all.iter().map(|r| r.write).collect());
        let cold = median(all.iter().map(|r| r.cold).collect());
        let batch = median(all.iter().map(|r| r.batch).collect());
        let rss = all.iter().map(|r| r.rss).max_by_key(|r| r.1).unwrap();
        let _ = writeln!(
            out,
            "| {n} | {} ({}) | {} | {} | {:.2}x | {:.2}x | {:.1} MiB ({:.1} MiB) |",
            ms(live),
            ms(write),
            ms(cold),
            ms(batch),
            live.as_secs_f64() / batch.as_secs_f64(),
            cold.as_secs_f64() / batch.as_secs_f64(),
            rss.0 as f64 / 1024.0,
            rss.1 as f64 / 1024.0,
        );
    }
    let mut reach = Vec::new();
    let mut reach_pod = Vec::new();
    for r in 0..runs {
        eprintln!("new node reachable, run {}/{runs}", r + 1);
        let (a, b) = new_node_reachable();
        reach.push(a);
        reach_pod.push(b);
    }
    let _ = writeln!(
        out,
        "\nNew node's pod reachable from an existing node's pod: {} after the new node's ferryd starts ({} after its pod's ADD returned); median of {runs}.",
        ms(median(reach)),
        ms(median(reach_pod)),
    );
    print!("{out}");
}
