//! Micro benchmarks (no `cargo bench`): run with
//! `cargo test --release -p ferry-ipam --test bench -- --ignored --nocapture`.

mod common;
use common::*;
use ferry_ipam::config::IpamConfig;
use ferry_ipam::record::Meta;
use ferry_ipam::store::{Store, current_boot_id};
use serde_json::json;
use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

fn meta() -> Meta {
    Meta {
        netns: "/".into(),
        boot_id: current_boot_id().unwrap_or_default(),
        ..Default::default()
    }
}

/// The cost of an fsync on the ADD hot path on this filesystem.
#[test]
#[ignore]
fn fsync_cost() {
    let d = TempDir::new("fsync");
    let sets = IpamConfig::parse(&json!({"type": "t", "subnet": "10.0.0.0/16"}))
        .unwrap()
        .ranges;
    for fsync in [false, true, false, true] {
        let n = 300;
        let t = Instant::now();
        for i in 0..n {
            let mut st = Store::open(d.path(), "net").unwrap();
            st.fsync = fsync;
            st.allocate(
                &sets,
                &format!("f{fsync}{i}{}", t.elapsed().as_nanos()),
                "eth0",
                &meta(),
                &[],
            )
            .unwrap();
            st.commit();
        }
        println!(
            "ADD in-process, fsync={fsync}: {:.1} µs/ADD",
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
}

/// A /16 filled to 99.9 %: ferry's ADD vs a naive per-address scan and vs
/// the reference host-local binary on the same store.
#[test]
#[ignore]
fn nearly_full_slash16() {
    let d = TempDir::new("full16");
    let ipam = json!({"subnet": "10.7.0.0/16"});
    let sets = IpamConfig::parse(&json!({"type": "t", "subnet": "10.7.0.0/16"}))
        .unwrap()
        .ranges;
    let t = Instant::now();
    let mut st = Store::open(&d.path().join("data"), "net1").unwrap();
    let cap = 65533usize; // .0.2 - .255.254
    for i in 0..cap {
        st.allocate(&sets, &format!("fill{i}"), "eth0", &meta(), &[])
            .unwrap();
    }
    // Free 0.1 % at pseudo-random places.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut freed = 0;
    while freed < cap / 1000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        let i = (x >> 33) as usize % cap;
        if !st.release(&format!("fill{i}"), "eth0").unwrap().is_empty() {
            freed += 1;
        }
    }
    st.commit();
    println!(
        "filled {cap} and freed {freed} in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let n = 20;
    let t = Instant::now();
    for i in 0..n {
        let mut st = Store::open(&d.path().join("data"), "net1").unwrap();
        st.allocate(&sets, &format!("lib{i}"), "eth0", &meta(), &[])
            .unwrap();
        st.commit();
    }
    println!(
        "ferry ADD (in-process, index): {:.1} µs/ADD",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );

    let c = conf(&d, "1.0.0", "ferry-ipam", ipam.clone());
    let t = Instant::now();
    for i in 0..n {
        assert!(run(BIN, "ADD", &format!("bin{i}"), "eth0", &d, &c).ok);
    }
    println!(
        "ferry-ipam ADD (process): {:.2} ms/ADD",
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    );

    // Naive: probe every address from the cursor with O_EXCL create (the
    // host-local algorithm, without its read of every file).
    let dir = d.net_dir();
    let t = Instant::now();
    let mut probes = 0u64;
    let mut cursor: u32 = u32::from(Ipv4Addr::new(10, 7, 0, 2));
    for i in 0..n {
        loop {
            let ip = IpAddr::V4(Ipv4Addr::from(cursor));
            cursor = if cursor >= u32::from(Ipv4Addr::new(10, 7, 255, 254)) {
                u32::from(Ipv4Addr::new(10, 7, 0, 2))
            } else {
                cursor + 1
            };
            probes += 1;
            let p = dir.join(ip.to_string());
            if let Ok(mut f) = OpenOptions::new().write(true).create_new(true).open(&p) {
                use std::io::Write;
                f.write_all(format!("naive{i}\r\neth0").as_bytes()).unwrap();
                break;
            }
        }
    }
    println!(
        "naive scan ADD (in-process, O_EXCL probe per address): {:.1} µs/ADD ({} probes/ADD)",
        t.elapsed().as_secs_f64() * 1e6 / n as f64,
        probes / n as u64
    );

    if std::path::Path::new(HOST_LOCAL).exists() {
        let hl = conf(&d, "1.0.0", "host-local", ipam);
        let t = Instant::now();
        let m = 5;
        for i in 0..m {
            let r = run(HOST_LOCAL, "ADD", &format!("hl{i}"), "eth0", &d, &hl);
            assert!(r.ok, "{:?}", r.json);
        }
        println!(
            "host-local ADD (process, same store): {:.1} ms/ADD",
            t.elapsed().as_secs_f64() * 1e3 / m as f64
        );
    }
}
