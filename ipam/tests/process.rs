//! The built `ferry-ipam` executed as a runtime does: CNI env + stdin.

mod common;
use common::*;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

#[test]
fn round_trip_every_version() {
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let d = TempDir::new("rt");
        let resolv = d.path().join("resolv.conf");
        std::fs::write(
            &resolv,
            "nameserver 10.96.0.10\nsearch svc.cluster.local\noptions ndots:5\n",
        )
        .unwrap();
        let c = conf(
            &d,
            v,
            "ferry-ipam",
            json!({
                "ranges": [[{"subnet": "10.22.0.0/24"}], [{"subnet": "fd22::/64", "gateway": "fd22::fe"}]],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd22::fe"}],
                "resolvConf": resolv,
            }),
        );
        let r = run(BIN, "ADD", "ctr1", "eth0", &d, &c);
        assert!(r.ok, "{v}: {:?} {}", r.json, r.stderr);
        let j = r.json.clone().unwrap();
        assert_eq!(j["cniVersion"], v);
        assert_eq!(r.addresses(), vec!["10.22.0.2/24", "fd22::1/64"], "{v}");
        assert_eq!(j["ips"][0]["gateway"], "10.22.0.1");
        assert_eq!(j["ips"][1]["gateway"], "fd22::fe");
        assert!(
            j["ips"][0].get("interface").is_none(),
            "{v}: IPAM results name no interface"
        );
        assert_eq!(
            j["ips"][0].get("version").is_some(),
            v.starts_with('0'),
            "{v}"
        );
        assert_eq!(j["routes"][1], json!({"dst": "::/0", "gw": "fd22::fe"}));
        assert_eq!(
            j["dns"],
            json!({"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"], "options": ["ndots:5"]})
        );
        // Idempotent retry.
        assert_eq!(
            run(BIN, "ADD", "ctr1", "eth0", &d, &c).addresses(),
            r.addresses()
        );
        assert_eq!(
            run(BIN, "ADD", "ctr2", "eth0", &d, &c).addresses(),
            vec!["10.22.0.3/24", "fd22::2/64"]
        );
        let has_check = v >= "0.4.0";
        if has_check {
            assert!(run(BIN, "CHECK", "ctr1", "eth0", &d, &c).ok, "{v}");
            let r = run(BIN, "CHECK", "ctr1", "eth9", &d, &c);
            assert_eq!(r.code(), Some(3), "{v}: CHECK of an unknown attachment");
        }
        assert!(run(BIN, "DEL", "ctr1", "eth0", &d, &c).ok);
        assert!(
            run(BIN, "DEL", "ctr1", "eth0", &d, &c).ok,
            "DEL is idempotent"
        );
        if has_check {
            assert_eq!(run(BIN, "CHECK", "ctr1", "eth0", &d, &c).code(), Some(3));
        }
        assert_eq!(held_files(&d.net_dir()), vec!["10.22.0.3", "fd22::2"]);
        if v == "1.1.0" {
            assert!(run(BIN, "STATUS", "", "", &d, &c).ok);
            let mut g = c.clone();
            g["cni.dev/valid-attachments"] = json!([]);
            assert!(run(BIN, "GC", "", "", &d, &g).ok);
            assert!(held_files(&d.net_dir()).is_empty());
        } else {
            assert!(run(BIN, "DEL", "ctr2", "eth0", &d, &c).ok);
            assert!(held_files(&d.net_dir()).is_empty());
        }
    }
}

#[test]
fn del_without_store_and_bad_config() {
    let d = TempDir::new("del");
    let c = conf(&d, "1.0.0", "ferry-ipam", json!({"subnet": "10.22.0.0/24"}));
    assert!(run(BIN, "DEL", "x", "eth0", &d, &c).ok);
    assert!(
        !d.path().join("data").exists(),
        "DEL does not create the store"
    );
    let bad = conf(
        &d,
        "1.0.0",
        "ferry-ipam",
        json!({"subnet": "10.22.0.0/24", "gateway": "10.23.0.1"}),
    );
    let r = run(BIN, "ADD", "x", "eth0", &d, &bad);
    assert_eq!(r.code(), Some(7));
    assert!(
        r.json.unwrap()["msg"]
            .as_str()
            .unwrap()
            .contains("gateway 10.23.0.1 not in network")
    );
}

#[test]
fn status_and_exhaustion() {
    let d = TempDir::new("status");
    // /29: .1 gateway, .2-.6 allocatable.
    let c = conf(&d, "1.1.0", "ferry-ipam", json!({"subnet": "10.22.0.0/29"}));
    assert!(run(BIN, "STATUS", "", "", &d, &c).ok, "no store yet: free");
    for i in 0..5 {
        assert!(run(BIN, "ADD", &format!("c{i}"), "eth0", &d, &c).ok);
    }
    let r = run(BIN, "STATUS", "", "", &d, &c);
    assert_eq!(r.code(), Some(50), "{:?}", r.json);
    let r = run(BIN, "ADD", "c9", "eth0", &d, &c);
    assert_eq!(r.code(), Some(50), "{:?}", r.json);
    assert!(run(BIN, "DEL", "c0", "eth0", &d, &c).ok);
    assert!(run(BIN, "STATUS", "", "", &d, &c).ok);
    // A requested address held by someone else: plugin error 101.
    let mut req = c.clone();
    req["args"] = json!({"cni": {"ips": ["10.22.0.3"]}});
    assert_eq!(run(BIN, "ADD", "c8", "eth0", &d, &req).code(), Some(101));
    let mut req = c.clone();
    req["runtimeConfig"] = json!({"ips": ["10.22.0.2/29"]});
    assert_eq!(
        run(BIN, "ADD", "c8", "eth0", &d, &req).addresses(),
        vec!["10.22.0.2/29"]
    );
}

#[test]
fn concurrent_adds_get_distinct_addresses() {
    let d = TempDir::new("conc");
    let c = conf(&d, "1.0.0", "ferry-ipam", json!({"subnet": "10.30.0.0/24"}));
    let netns = d.netns();
    let mut pending: Vec<(usize, std::process::Child)> = Vec::new();
    let mut addrs = Vec::new();
    let mut next = 0;
    while next < 100 || !pending.is_empty() {
        while next < 100 && pending.len() < 16 {
            pending.push((
                next,
                spawn(
                    command(BIN, "ADD", &format!("ctr{next}"), "eth0", &netns),
                    &c,
                ),
            ));
            next += 1;
        }
        let (i, child) = pending.remove(0);
        let r = Reply::from(child.wait_with_output().unwrap());
        assert!(r.ok, "ADD {i}: {:?} {}", r.json, r.stderr);
        addrs.extend(r.addresses());
    }
    let distinct: HashSet<_> = addrs.iter().collect();
    assert_eq!((addrs.len(), distinct.len()), (100, 100));
    assert_eq!(held_files(&d.net_dir()).len(), 100);
    let mut dels: Vec<_> = (0..100)
        .map(|i| spawn(command(BIN, "DEL", &format!("ctr{i}"), "eth0", &netns), &c))
        .collect();
    for ch in dels.drain(..) {
        assert!(ch.wait_with_output().unwrap().status.success());
    }
    assert!(held_files(&d.net_dir()).is_empty());
}

/// Tiny deterministic PRNG (no dev-dependency needed).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn kill_9_mid_flight_never_double_allocates_or_leaks() {
    let d = TempDir::new("kill");
    let c = conf(
        &d,
        "1.1.0",
        "ferry-ipam",
        json!({"ranges": [[{"subnet": "10.40.0.0/24"}], [{"subnet": "fd40::/120"}]]}),
    );
    let netns = d.netns();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = Lcg(seed);
    let mut survivors: Vec<(String, Vec<String>)> = Vec::new();
    let mut killed = 0;
    for round in 0..8 {
        let kids: Vec<(String, std::process::Child)> = (0..12)
            .map(|i| {
                let id = format!("r{round}c{i}");
                let ch = spawn(command(BIN, "ADD", &id, "eth0", &netns), &c);
                (id, ch)
            })
            .collect();
        std::thread::sleep(Duration::from_micros(rng.next() % 3000));
        for (id, mut ch) in kids {
            if rng.next() % 2 == 0 {
                let _ = ch.kill(); // SIGKILL
                let _ = ch.wait();
                killed += 1;
                continue;
            }
            let r = Reply::from(ch.wait_with_output().unwrap());
            assert!(r.ok, "{id}: {:?} {}", r.json, r.stderr);
            survivors.push((id, r.addresses()));
        }
    }
    eprintln!("{} succeeded, {killed} SIGKILLed", survivors.len());
    let all: Vec<&String> = survivors.iter().flat_map(|(_, a)| a).collect();
    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), distinct.len(), "an address was handed out twice");
    let mut g = c.clone();
    g["cni.dev/valid-attachments"] = json!(
        survivors
            .iter()
            .map(|(id, _)| json!({"containerID": id, "ifname": "eth0"}))
            .collect::<Vec<_>>()
    );
    let r = run(BIN, "GC", "", "", &d, &g);
    assert!(r.ok, "{:?} {}", r.json, r.stderr);
    let mut want: Vec<String> = all
        .iter()
        .map(|a| a.split('/').next().unwrap().to_string())
        .collect();
    want.sort();
    assert_eq!(
        held_files(&d.net_dir()),
        want,
        "after GC exactly the survivors' addresses are held"
    );
    // Every record parses and belongs to its survivor; nothing torn.
    for (id, addrs) in &survivors {
        for a in addrs {
            let f = d.net_dir().join(a.split('/').next().unwrap());
            assert_eq!(std::fs::read_to_string(f).unwrap(), format!("{id}\r\neth0"));
        }
        assert!(run(BIN, "CHECK", id, "eth0", &d, &c).ok);
    }
    // The store is usable and still hands out only free addresses.
    let r = run(BIN, "ADD", "after", "eth0", &d, &c);
    assert!(r.ok);
    for a in r.addresses() {
        assert!(!all.contains(&&a), "{a} reused");
    }
}

#[test]
fn switching_from_host_local_and_back() {
    if !have_host_local("switching_from_host_local_and_back") {
        return;
    }
    let d = TempDir::new("switch");
    let ipam = json!({"ranges": [[{"subnet": "10.50.0.0/29"}], [{"subnet": "fd50::/125"}]]});
    let hl = conf(&d, "1.0.0", "host-local", ipam.clone());
    let fy = conf(&d, "1.1.0", "ferry-ipam", ipam);
    let mut theirs = Vec::new();
    for id in ["hl1", "hl2"] {
        let r = run(HOST_LOCAL, "ADD", id, "eth0", &d, &hl);
        assert!(r.ok, "host-local ADD: {:?} {}", r.json, r.stderr);
        theirs.extend(r.addresses());
    }
    // ferry never hands out theirs, and round-robins on from their last_reserved_ip.
    let r = run(BIN, "ADD", "f1", "eth0", &d, &fy);
    assert_eq!(r.addresses(), vec!["10.50.0.4/29", "fd50::4/125"]);
    let r = run(BIN, "ADD", "f2", "eth0", &d, &fy);
    assert!(r.ok);
    for a in r.addresses() {
        assert!(!theirs.contains(&a));
    }
    assert!(
        run(BIN, "CHECK", "hl1", "eth0", &d, &fy).ok,
        "host-local's records are honoured"
    );
    // ferry DEL releases a host-local reservation.
    assert!(run(BIN, "DEL", "hl1", "eth0", &d, &fy).ok);
    // Back to host-local: it reads ferry's records (same content format).
    assert!(
        run(HOST_LOCAL, "CHECK", "f1", "eth0", &d, &hl).ok,
        "host-local sees ferry's reservation"
    );
    assert!(run(HOST_LOCAL, "DEL", "f1", "eth0", &d, &hl).ok);
    let held = held_files(&d.net_dir());
    assert!(
        !held.iter().any(|h| h.starts_with("10.50.0.4")),
        "host-local released ferry's record: {held:?}"
    );
    // ferry notices host-local's change (directory stamp) and GC releases
    // everything not valid, host-local's included.
    let mut g = fy.clone();
    g["cni.dev/valid-attachments"] = json!([{"containerID": "f2", "ifname": "eth0"}]);
    assert!(run(BIN, "GC", "", "", &d, &g).ok);
    assert_eq!(
        held_files(&d.net_dir()).len(),
        2,
        "only f2's two addresses remain"
    );
    assert_eq!(run(BIN, "CHECK", "hl2", "eth0", &d, &fy).code(), Some(3));
}

#[test]
fn stale_reservations_are_reclaimed_when_full() {
    let d = TempDir::new("stale");
    let c = conf(&d, "1.1.0", "ferry-ipam", json!({"subnet": "10.60.0.0/29"}));
    // Fill .2-.6; c0 and c1 sit in netns files that then disappear.
    let gone = d.path().join("gone-netns");
    for i in 0..5 {
        let ns = if i < 2 { gone.clone() } else { d.netns() };
        std::fs::write(&ns, "").unwrap();
        let r = Reply::from(
            spawn(command(BIN, "ADD", &format!("c{i}"), "eth0", &ns), &c)
                .wait_with_output()
                .unwrap(),
        );
        assert!(r.ok);
    }
    std::fs::remove_file(&gone).unwrap();
    // c2's record is rewritten as if from a previous boot (ferry's JSON form).
    let f = d.net_dir().join("10.60.0.4");
    std::fs::remove_file(&f).unwrap();
    std::fs::write(&f, r#"{"containerID":"c2","ifname":"eth0","netns":"/","bootID":"00000000-0000-0000-0000-000000000000"}"#).unwrap();
    assert!(
        run(BIN, "STATUS", "", "", &d, &c).ok,
        "stale reservations count as free"
    );
    let mut got = Vec::new();
    for id in ["n1", "n2", "n3"] {
        let r = run(BIN, "ADD", id, "eth0", &d, &c);
        assert!(r.ok, "{id}: {:?}", r.json);
        assert!(
            r.stderr.is_empty() || r.stderr.contains("reclaiming"),
            "{}",
            r.stderr
        );
        got.extend(r.addresses());
    }
    got.sort();
    assert_eq!(got, vec!["10.60.0.2/29", "10.60.0.3/29", "10.60.0.4/29"]);
    assert_eq!(run(BIN, "ADD", "n4", "eth0", &d, &c).code(), Some(50));
    assert_eq!(run(BIN, "STATUS", "", "", &d, &c).code(), Some(50));
    assert!(
        run(BIN, "CHECK", "c3", "eth0", &d, &c).ok,
        "live reservations untouched"
    );
}
