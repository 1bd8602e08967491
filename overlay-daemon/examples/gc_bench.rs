//! The gc sweep's cost on a node with 1000 pods: time per pass and its
//! share of one CPU at the default interval (60 s).
//!
//! In a namespace of its own: a bridge `cni0` with 1000 veths aliased as
//! ferry-bridge makes them, `inet ferry`'s `hostports-v4` map with 1000
//! commented elements, and a ferry-ipam store with 1000 reservations whose
//! namespace (this benchmark's) is alive, so a pass reads and checks
//! everything and releases nothing (dry run besides).
//!
//! ```text
//! cargo run --release -p ferryd --example gc_bench [pods] [passes]
//! ```

use ferry_ipam::config::IpamConfig;
use ferry_ipam::store::Store as IpamStore;
use ferry_netops::in_netns;
use ferry_tests::{TestDir, TestNetns};
use ferryd::gc::{GcOptions, Sweeper};
use ferryd::metrics::Metrics;
use serde_json::json;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn piped(ns: &TestNetns, program: &str, args: &[&str], input: &str) {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::piped());
    ferry_tests::in_netns_cmd(&mut cmd, ns.netns());
    let mut child = cmd.spawn().expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    assert!(child.wait().expect("wait").success(), "{program} {args:?}");
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() {
    let mut argv = std::env::args().skip(1);
    let pods: u32 = argv.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let passes: u32 = argv.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let dir = TestDir::new("gc-bench");
    let ns = TestNetns::new();
    let t = Instant::now();
    let mut batch = String::from("link add cni0 type bridge\nlink set cni0 up\n");
    for i in 0..pods {
        batch.push_str(&format!(
            "link add gcb{i} type veth peer name gcp{i}\nlink set gcb{i} master cni0 alias ferry-bridge:ferry/eth0/pod{i}\n"
        ));
    }
    piped(&ns, "ip", &["-batch", "-"], &batch);
    let mut nft = String::from(
        "add table inet ferry\nadd map inet ferry hostports-v4 { type inet_proto . inet_service : ipv4_addr . inet_service; }\n",
    );
    for i in 0..pods {
        nft.push_str(&format!(
            "add element inet ferry hostports-v4 {{ tcp . {} comment \"hp-{i:016x} ferry/pod{i}/eth0\" : 10.1.{}.{} . 80 }}\n",
            20000 + i,
            i / 250,
            i % 250 + 2
        ));
    }
    piped(&ns, "nft", &["-f", "-"], &nft);
    let data_dir = dir.path().join("ipam");
    let cfg = IpamConfig::parse(&json!({"type": "ferry-ipam", "subnet": "10.1.0.0/16"}))
        .expect("ipam config");
    let (dev, ino) =
        ferry_ipam::record::netns_identity(ns.path()).expect("stat the bench namespace");
    {
        let mut store = IpamStore::open(&data_dir, "ferry").expect("store");
        for i in 0..pods {
            let meta = ferry_ipam::record::Meta {
                netns: ns.path_str(),
                boot_id: store.boot_id().unwrap_or_default().to_string(),
                netns_dev: dev,
                netns_ino: ino,
                pod_namespace: "bench".into(),
                pod_name: format!("pod{i}"),
                pod_infra_container_id: format!("pod{i}"),
            };
            store
                .allocate(&cfg.ranges, &format!("pod{i}"), "eth0", &meta, &[])
                .expect("allocate");
        }
        store.commit();
    }
    let conflist = dir.path().join("10-ferry.conflist");
    std::fs::write(
        &conflist,
        json!({
            "cniVersion": "1.0.0", "name": "ferry",
            "plugins": [{"type": "ferry-bridge", "bridge": "cni0",
                         "ipam": {"type": "ferry-ipam", "subnet": "10.1.0.0/16",
                                  "dataDir": data_dir}}]
        })
        .to_string(),
    )
    .expect("write conflist");
    eprintln!("setup: {pods} pods in {:?}", t.elapsed());

    let mut sweeper = Sweeper::new(
        GcOptions {
            conflist,
            cni_bin_dir: "/nonexistent".into(),
            grace: Duration::from_secs(3600),
            dry_run: true,
        },
        Metrics::new(),
    );
    let mut times = in_netns(ns.netns(), || {
        let mut times = Vec::new();
        for _ in 0..passes {
            let (wall, cpu) = (Instant::now(), cpu_time());
            let report = sweeper.pass().map_err(std::io::Error::other)?;
            times.push((wall.elapsed(), cpu_time() - cpu));
            assert_eq!(report.reservations, pods as usize);
            assert!(report.released.is_empty() && report.errors == 0);
        }
        Ok(times)
    })
    .expect("passes");
    times.sort();
    let median = times[times.len() / 2];
    let max = times.last().expect("passes").0;
    let interval = 60.0;
    println!(
        "| pods | passes | wall per pass (median) | max | CPU per pass (median pass) | share of one CPU at 60 s |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {pods} | {passes} | {:.1} ms | {:.1} ms | {:.1} ms | {:.3} % |",
        median.0.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        median.1.as_secs_f64() * 1e3,
        median.1.as_secs_f64() / interval * 100.0
    );
}
