//! Time from a fresh start to a held lease with one etcd member down.
//!
//! Starts a real 3-member etcd cluster on loopback (Debian's etcd-server),
//! stores the network config, stops one member (SIGTERM, so its port
//! refuses connections, as for a crashed etcd), then runs N fresh starts
//! one after another. A start does what ferryd does before it holds its
//! lease, with ferryd's retry policy (each step retried after 100 ms,
//! doubling to 5 s): connect with all three endpoints, read the network
//! config, acquire a lease. Every start has a new `Store` (new connections)
//! and its own node name. Prints the distribution as markdown.
//!
//! With `--hung` the member is not stopped but frozen (SIGSTOP): its port
//! still accepts connections, which never get an answer.
//!
//! `cargo run -p ferryd --release --example etcd_failover_bench -- [N] [--hung]`
//! (N defaults to 100; scripts/bench-etcd-failover.sh runs it).

use ferry_tests::etcd::EtcdCluster;
use ferryd::lease::{Mac, SubnetLease};
use ferryd::network::{BackendType, NetworkConfig};
use ferryd::store::{Store, StoreOptions};
use std::time::{Duration, Instant};

const NET: &str = r#"{"network":"10.0.0.0/8","subnetLen":24,"backend":{"type":"vxlan","vni":1}}"#;

/// ferryd's `retry`: the step again after 100 ms, doubling up to 5 s.
async fn retry<T, E: std::fmt::Display, F, Fut>(failures: &mut u32, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(v) => return v,
            Err(_) => {
                *failures += 1;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// One fresh start: (time to the lease, failed steps on the way).
async fn start(endpoints: &[String], node: &str) -> (Duration, u32) {
    let t = Instant::now();
    let mut failures = 0;
    let opts = StoreOptions {
        endpoints: endpoints.to_vec(),
        prefix: "/ferry-bench".into(),
        ..StoreOptions::default()
    };
    let store = retry(&mut failures, || Store::connect(&opts)).await;
    let cfg = retry(&mut failures, || store.network_config()).await;
    let me = SubnetLease {
        subnet: None,
        node: node.to_string(),
        public_ip: [192, 0, 2, 1].into(),
        backend: BackendType::Vxlan,
        vtep_mac: Some(Mac::derived(node)),
        renewed_at: 0,
        ipv6_subnet: None,
    };
    let held = retry(&mut failures, || {
        store.acquire(&cfg, &me, None, Duration::from_secs(60))
    })
    .await;
    let took = t.elapsed();
    // Give the subnet back so the network never fills up.
    let _ = store.release(&held).await;
    (took, failures)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let hung = args.iter().any(|a| a == "--hung");
    let n: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(100);
    let mut cluster = EtcdCluster::start(3);
    let endpoints = cluster.endpoints();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let opts = StoreOptions {
            endpoints: endpoints.clone(),
            prefix: "/ferry-bench".into(),
            ..StoreOptions::default()
        };
        let store = Store::connect(&opts).await.expect("connect");
        store
            .put_network_config(&NetworkConfig::from_json(NET).expect("valid"))
            .await
            .expect("put the network config");
    });
    // The member a start may well try first: every position is tried first
    // by some starts, so which one is down does not matter.
    let how = if hung {
        cluster.members[0].pause();
        "frozen (SIGSTOP)"
    } else {
        cluster.members[0].stop();
        "stopped"
    };
    eprintln!("member 0 ({}) {how}; {n} starts", endpoints[0]);

    let mut times = Vec::with_capacity(n);
    let mut failed_steps = 0;
    let mut starts_with_failures = 0;
    for i in 0..n {
        let (took, failures) = rt.block_on(start(&endpoints, &format!("bench-{i}")));
        eprintln!("start {i}: {took:?} ({failures} failed steps)");
        failed_steps += failures;
        starts_with_failures += u32::from(failures > 0);
        times.push(took);
    }
    times.sort();
    let ms = |d: Duration| format!("{:.3}", d.as_secs_f64());
    println!("member 0 of 3: {how}\n");
    println!(
        "| starts | min s | median s | p90 s | p99 s | max s | starts with a failed step | failed steps |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {n} | {} | {} | {} | {} | {} | {starts_with_failures} | {failed_steps} |",
        ms(times[0]),
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.9)),
        ms(percentile(&times, 0.99)),
        ms(times[n - 1]),
    );
}
