//! ferry under real container runtimes (issue 5's acceptance): containerd
//! with `ctr run --cni`, and podman with its CNI backend, each started by the
//! test on a node of its own (see `ferry_tests::runtime`), with ferry's
//! binaries as the only CNI plugins and an image built offline from
//! busybox-static.
//!
//! What the runtimes do, as seen here (Debian 12: containerd 1.6.20, podman
//! 4.3.1): both refuse cniVersion 1.1.0 results, so the conflists say 1.0.0;
//! `ctr run --cni` adds the loopback network by type `loopback`, sends no
//! capability args, and sends DEL only after the task is gone (empty
//! CNI_NETNS), and only when not detached; podman sends DEL while the netns
//! still exists.

use ferry_tests::runtime::{
    Containerd, HTTP_MARKER, IMAGE, Node, Podman, busybox_eth0_ipv4, busybox_rootfs, conflist,
    docker_archive, note, ok, parse_call, require_runtime, tar_dir,
};
use ferry_tests::{unique_index, wait_until};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

fn bridge_name(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        unique_index()
    )
}

/// Everything a removed container may leave behind, checked on the node:
/// reservations in ferry-ipam's store, veths, nftables state naming a
/// container address, libcni's cached results.
fn assert_clean(node: &Node, network: &str, ips: &[Ipv4Addr]) {
    let left = node.reservations(network);
    assert!(left.is_empty(), "ferry-ipam store not empty: {left:?}");
    let veths: Vec<String> = node.veths().into_iter().filter(|v| v != "eth0").collect();
    assert!(veths.is_empty(), "veths left on the node: {veths:?}");
    let rules = node.nft_ruleset();
    for ip in ips {
        assert!(
            !rules.contains(&ip.to_string()),
            "nftables still names {ip}:\n{rules}"
        );
    }
    let cache = node.cni_cache().join("results");
    let cached: Vec<_> = std::fs::read_dir(&cache)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(cached.is_empty(), "libcni results still cached: {cached:?}");
}

/// Pings `to` from the node's namespace (the gateway side).
fn node_pings(node: &Node, to: Ipv4Addr) -> bool {
    node.ns.ping(to.into(), 3)
}

/// The DEL lines of the call log for container `id` (CNI_CONTAINERID
/// contains it), as (command, netns).
fn calls_for(node: &Node, id: &str) -> Vec<(String, String)> {
    node.call_log()
        .iter()
        .map(|l| parse_call(l))
        .filter(|(_, cid, _)| cid.contains(id))
        .map(|(c, _, n)| (c, n))
        .collect()
}

#[test]
fn containerd_ctr_run_cni() {
    if !require_runtime(
        "containerd",
        &["containerd", "ctr", "runc", "nsenter", "unshare", "nft"],
    ) {
        return;
    }
    let t0 = Instant::now();
    let mut node = Node::new("ctrd");
    let network = "ferryctr";
    let bridge = bridge_name("fc");
    let conf = conflist(&node, network, &bridge, "10.88.0.0/24");
    node.write_conf("10-ferry.conflist", &conf);
    let gateway = Ipv4Addr::new(10, 88, 0, 1);

    let ctrd = Containerd::start(&mut node);
    let rootfs = busybox_rootfs(node.dir.path());
    let archive = docker_archive(&rootfs, IMAGE, node.dir.path());
    ok(
        ctrd.ctr(&node, &["image", "import", &archive.display().to_string()]),
        "ctr image import",
    );

    let ids = ["c1", "c2"];
    let mut runs: Vec<_> = ids
        .iter()
        .map(|id| ctrd.run_cni(&node, id, &["sleep", "600"]))
        .collect();
    let mut ips = Vec::new();
    for id in ids {
        assert!(
            ctrd.wait_running(&node, id),
            "task {id} not running:\n{}\n{}",
            node.log(&format!("ctr-{id}")),
            node.log("containerd")
        );
        // The task runs before ctr has finished the CNI ADD: wait for eth0.
        let mut ip = None;
        wait_until(Duration::from_secs(20), || {
            let out = ctrd.exec(&node, id, &["ip", "-4", "addr", "show", "dev", "eth0"]);
            ip = busybox_eth0_ipv4(&String::from_utf8_lossy(&out.stdout));
            ip.is_some()
        });
        let ip = ip.unwrap_or_else(|| {
            panic!(
                "{id} got no address:\n{}\n{:?}",
                node.log(&format!("ctr-{id}")),
                node.call_log()
            )
        });
        assert_eq!(&ip.octets()[..3], &[10, 88, 0], "{id}: {ip}");
        // lo is up: ctr added its loopback network, executed as `loopback`.
        let lo = ok(
            ctrd.exec(&node, id, &["ip", "link", "show", "lo"]),
            "ip link",
        );
        assert!(lo.contains("UP"), "{id}: lo not up: {lo}");
        ips.push(ip);
    }
    assert_ne!(ips[0], ips[1]);
    let store: Vec<String> = node.reservations(network);
    for ip in &ips {
        assert!(
            store.contains(&ip.to_string()),
            "{ip} not reserved: {store:?}"
        );
    }

    for (i, id) in ids.iter().enumerate() {
        for to in [ips[1 - i], gateway] {
            let out = ctrd.exec(&node, id, &["ping", "-c", "1", "-W", "2", &to.to_string()]);
            assert!(
                out.status.success(),
                "{id} cannot ping {to}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        assert!(node_pings(&node, ips[i]), "node cannot ping {id}");
    }

    // Stop the tasks: each `ctr run` then removes the network (DEL) and,
    // with --rm, the container.
    for id in ids {
        ok(
            ctrd.ctr(&node, &["task", "kill", "-s", "KILL", id]),
            "ctr task kill",
        );
    }
    for (id, run) in ids.iter().zip(runs.iter_mut()) {
        let done = wait_until(Duration::from_secs(30), || {
            run.try_wait().ok().flatten().is_some()
        });
        assert!(done, "ctr run {id} did not return after the kill");
    }
    let left = ok(
        ctrd.ctr(&node, &["container", "ls", "-q"]),
        "ctr container ls",
    );
    assert_eq!(left.trim(), "", "containers left");
    for id in ids {
        let calls = calls_for(&node, id);
        let adds: Vec<_> = calls.iter().filter(|(c, _)| c == "ADD").collect();
        let dels: Vec<_> = calls.iter().filter(|(c, _)| c == "DEL").collect();
        assert_eq!(adds.len(), 1, "{id}: {calls:?}");
        assert!(!adds[0].1.is_empty(), "{id}: ADD without a netns");
        assert_eq!(dels.len(), 1, "{id}: one DEL expected: {calls:?}");
        note(&format!(
            "containerd: DEL of {id} had CNI_NETNS={:?}",
            dels[0].1
        ));
    }
    assert_clean(&node, network, &ips);
    note(&format!(
        "containerd_ctr_run_cni: {:.1}s",
        t0.elapsed().as_secs_f64()
    ));
}

/// podman with the image imported from the busybox rootfs.
fn podman_node(tag: &str, network: &str, subnet: &str) -> (Node, Podman) {
    let node = Node::new(tag);
    let bridge = bridge_name("fp");
    node.write_conf(
        &format!("{network}.conflist"),
        &conflist(&node, network, &bridge, subnet),
    );
    let podman = Podman::new(&node);
    let rootfs = busybox_rootfs(node.dir.path());
    let tar = node.path("rootfs.tar");
    tar_dir(&rootfs, &tar);
    ok(
        podman.podman(&node, &["import", &tar.display().to_string(), IMAGE]),
        "podman import",
    );
    (node, podman)
}

fn podman_ip(node: &Node, podman: &Podman, name: &str) -> Ipv4Addr {
    let out = ok(
        podman.podman(
            node,
            &["exec", name, "ip", "-4", "addr", "show", "dev", "eth0"],
        ),
        "podman exec ip",
    );
    busybox_eth0_ipv4(&out).unwrap_or_else(|| panic!("{name}: no IPv4 on eth0: {out}"))
}

#[test]
fn podman_cni_backend() {
    if !require_runtime(
        "podman",
        &["podman", "conmon", "runc", "nsenter", "unshare", "nft"],
    ) {
        return;
    }
    let t0 = Instant::now();
    let network = "ferrypod";
    let (node, podman) = podman_node("podman", network, "10.89.0.0/24");
    let gateway = Ipv4Addr::new(10, 89, 0, 1);
    let names = ["p1", "p2"];
    for n in names {
        podman.run(&node, n, network, &[], &["sleep", "600"]);
    }
    let ips: Vec<Ipv4Addr> = names.iter().map(|n| podman_ip(&node, &podman, n)).collect();
    assert_ne!(ips[0], ips[1]);
    let store = node.reservations(network);
    for ip in &ips {
        assert_eq!(&ip.octets()[..3], &[10, 89, 0]);
        assert!(
            store.contains(&ip.to_string()),
            "{ip} not reserved: {store:?}"
        );
    }
    for (i, n) in names.iter().enumerate() {
        for to in [ips[1 - i], gateway] {
            let out = podman.podman(
                &node,
                &["exec", n, "ping", "-c", "1", "-W", "2", &to.to_string()],
            );
            assert!(
                out.status.success(),
                "{n} cannot ping {to}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(node_pings(&node, ips[i]), "node cannot ping {n}");
    }
    ok(
        podman.podman(&node, &["rm", "-f", "-t", "0", "p1", "p2"]),
        "podman rm",
    );
    let left = ok(podman.podman(&node, &["ps", "-aq"]), "podman ps");
    assert_eq!(left.trim(), "", "containers left");
    let ids: Vec<String> = node
        .call_log()
        .iter()
        .map(|l| parse_call(l))
        .filter(|(c, _, _)| c == "ADD")
        .map(|(_, id, _)| id)
        .collect();
    assert_eq!(ids.len(), 2, "{:?}", node.call_log());
    for id in &ids {
        let dels: Vec<_> = calls_for(&node, id)
            .into_iter()
            .filter(|(c, _)| c == "DEL")
            .collect();
        assert_eq!(dels.len(), 1, "{id}: {:?}", node.call_log());
        note(&format!(
            "podman: DEL of {id} had CNI_NETNS={:?}",
            dels[0].1
        ));
    }
    assert_clean(&node, network, &ips);
    note(&format!(
        "podman_cni_backend: {:.1}s",
        t0.elapsed().as_secs_f64()
    ));
}

/// `curl -s http://<addr>/` from inside `ns`: the body, or `None`.
fn curl(ns: &ferry_tests::TestNetns, url: &str) -> Option<String> {
    let out = ns.try_exec("curl", &["-s", "--max-time", "3", url]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn podman_host_port() {
    if !require_runtime(
        "podman",
        &[
            "podman", "conmon", "runc", "nsenter", "unshare", "nft", "curl",
        ],
    ) {
        return;
    }
    let t0 = Instant::now();
    let network = "ferryhp";
    let (node, podman) = podman_node("hostport", network, "10.90.0.0/24");
    let (node_ip, client_ip) = ("192.168.151.1", "192.168.151.2");
    let client = node.add_uplink(node_ip, client_ip);
    podman.run(
        &node,
        "web",
        network,
        &["-p", "8080:80"],
        &["httpd", "-f", "-p", "80", "-h", "/www"],
    );
    let ip = podman_ip(&node, &podman, "web");
    // httpd listens inside before the first request is answered.
    let direct = format!("http://{ip}:80/");
    assert!(
        wait_until(Duration::from_secs(10), || curl(&node.ns, &direct)
            .is_some_and(|b| b.contains(HTTP_MARKER))),
        "the container's httpd does not answer on {direct}"
    );
    let via_node = format!("http://{node_ip}:8080/");
    let body = curl(&node.ns, &via_node);
    assert!(
        body.as_deref().is_some_and(|b| b.contains(HTTP_MARKER)),
        "hostPort from the node itself ({via_node}): {body:?}\n{}",
        node.nft_ruleset()
    );
    let body = curl(&client, &via_node);
    assert!(
        body.as_deref().is_some_and(|b| b.contains(HTTP_MARKER)),
        "hostPort from outside the node ({via_node}): {body:?}\n{}",
        node.nft_ruleset()
    );
    ok(
        podman.podman(&node, &["rm", "-f", "-t", "0", "web"]),
        "podman rm",
    );
    assert_clean(&node, network, &[ip]);
    assert!(
        curl(&client, &via_node).is_none(),
        "hostPort still answers after the container is gone"
    );
    let rules = node.nft_ruleset();
    assert!(
        !rules.contains("8080"),
        "port 8080 still in nftables:\n{rules}"
    );
    note(&format!(
        "podman_host_port: {:.1}s",
        t0.elapsed().as_secs_f64()
    ));
    drop(client);
}
