//! Root tests of the overlay's kernel operations (VXLAN device, neighbours,
//! fdb, protocol-tagged routes, notifications), each in its own anonymous
//! namespace with a veth pair as the underlay (this kernel has no `dummy`).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::Duration;

use ferry_netops::{
    FERRY_ROUTE_PROTO, Ipv4Route, KernelEvent, Monitor, NeighState, NetNs, NsHandle, RouteFilter,
    VxlanChange, VxlanSpec, block_on, in_netns,
};

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("these tests need root and CI is set: refusing to skip");
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED: {}: needs root ***",
        std::thread::current().name().unwrap_or("?")
    );
    false
}

/// Runs `ip args…` inside `ns` (tests may exec; product code may not).
fn ip(ns: &NetNs, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = in_netns(ns, move || Command::new("ip").args(&args).output()).expect("run ip");
    assert!(
        out.status.success(),
        "ip failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A namespace with `under0` (192.0.2.1/24, up; its peer `under1` up too).
fn underlay_ns() -> NetNs {
    let ns = NetNs::new_anonymous().unwrap();
    ip(
        &ns,
        &[
            "link", "add", "under0", "type", "veth", "peer", "name", "under1",
        ],
    );
    ip(&ns, &["addr", "add", "192.0.2.1/24", "dev", "under0"]);
    ip(&ns, &["link", "set", "under0", "up"]);
    ip(&ns, &["link", "set", "under1", "up"]);
    ns
}

/// `fut`, or `Err(())` after `limit` (netops' tokio has no timer: a
/// sleeping thread fires a oneshot instead).
async fn timeout<T>(limit: Duration, fut: impl std::future::Future<Output = T>) -> Result<T, ()> {
    let (tx, rx) = futures::channel::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        let _ = tx.send(());
    });
    let fut = std::pin::pin!(fut);
    match futures::future::select(fut, rx).await {
        futures::future::Either::Left((v, _)) => Ok(v),
        futures::future::Either::Right(_) => Err(()),
    }
}

fn spec(underlay: u32) -> VxlanSpec {
    VxlanSpec {
        name: "ferry.7".into(),
        vni: 7,
        underlay,
        local: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        port: 4789,
        mtu: 1450,
        mac: [0x02, 0x42, 0xaa, 0, 0, 1],
    }
}

#[test]
fn vxlan_created_read_back_adjusted_and_recreated() {
    if !root() {
        return;
    }
    let ns = underlay_ns();
    block_on(async {
        let h = NsHandle::new(&ns)?;
        let under = h.require_link("under0").await?.index;
        let s = spec(under);
        let (idx, change) = h.ensure_vxlan(&s).await?;
        assert_eq!(change, VxlanChange::Created);
        let v = h.vxlan_by_name("ferry.7").await?.expect("created");
        assert_eq!(v.index, idx);
        assert_eq!(v.kind.as_deref(), Some("vxlan"));
        assert_eq!(v.vni, Some(7));
        assert_eq!(v.underlay, Some(under));
        assert_eq!(v.local, Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))));
        assert_eq!(v.port, Some(4789));
        assert_eq!(v.learning, Some(false));
        assert_eq!(v.mtu, 1450);
        assert_eq!(v.mac, s.mac);
        assert!(v.is_up);
        let d = ip(&ns, &["-d", "link", "show", "ferry.7"]);
        assert!(d.contains("vxlan id 7"), "{d}");
        assert!(d.contains("nolearning"), "{d}");
        assert!(d.contains("dstport 4789"), "{d}");

        assert_eq!(h.ensure_vxlan(&s).await?, (idx, VxlanChange::Unchanged));

        // MTU, MAC, down: fixed in place, same index.
        ip(&ns, &["link", "set", "ferry.7", "down", "mtu", "1400"]);
        assert_eq!(h.ensure_vxlan(&s).await?, (idx, VxlanChange::Adjusted));
        let v = h.vxlan_by_name("ferry.7").await?.unwrap();
        assert!(v.is_up && v.mtu == 1450);

        // Another port cannot be set in place: a new device.
        let s2 = VxlanSpec {
            port: 8472,
            ..s.clone()
        };
        let (idx2, change) = h.ensure_vxlan(&s2).await?;
        assert_eq!(change, VxlanChange::Recreated);
        assert_ne!(idx2, idx);
        assert_eq!(h.vxlan_by_name("ferry.7").await?.unwrap().port, Some(8472));

        // A link of another kind holding the name is not ferry's: refused
        // (EEXIST), never deleted.
        h.delete_link(idx2).await?;
        ip(&ns, &["link", "add", "ferry.7", "type", "bridge"]);
        let bridge = h.vxlan_by_name("ferry.7").await?.unwrap();
        let e = h.ensure_vxlan(&s).await.unwrap_err();
        assert!(e.is_errno(libc::EEXIST), "{e}");
        assert!(e.to_string().contains("not ferry's VXLAN device"), "{e}");
        let still = h.vxlan_by_name("ferry.7").await?.unwrap();
        assert_eq!(
            (still.index, still.kind.as_deref()),
            (bridge.index, Some("bridge"))
        );
        Ok(())
    })
    .unwrap();
}

#[test]
fn neighbours_and_fdb_replace_dump_delete() {
    if !root() {
        return;
    }
    let ns = underlay_ns();
    block_on(async {
        let h = NsHandle::new(&ns)?;
        let under = h.require_link("under0").await?.index;
        let (vx, _) = h.ensure_vxlan(&spec(under)).await?;
        let peer = Ipv4Addr::new(10, 244, 2, 0);
        let mac_a = [0x02, 0x42, 0xbb, 0, 0, 2];
        let mac_b = [0x02, 0x42, 0xbb, 0, 0, 3];

        h.replace_neighbour(vx, peer, mac_a).await?;
        h.replace_neighbour(vx, peer, mac_a).await?;
        let n = h.neighbours::<Ipv4Addr>(vx).await?;
        assert_eq!(n.len(), 1, "{n:?}");
        assert_eq!(
            (n[0].ip, n[0].mac, n[0].state),
            (peer, Some(mac_a), NeighState::Permanent)
        );
        // Replace in place: still one entry, the new MAC.
        h.replace_neighbour(vx, peer, mac_b).await?;
        let n = h.neighbours::<Ipv4Addr>(vx).await?;
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].mac, Some(mac_b));
        let shown = ip(&ns, &["neigh", "show", "dev", "ferry.7"]);
        assert!(
            shown.contains("10.244.2.0 lladdr 02:42:bb:00:00:03 PERMANENT"),
            "{shown}"
        );
        // The underlay's neighbours are not listed.
        ip(
            &ns,
            &[
                "neigh",
                "replace",
                "192.0.2.9",
                "lladdr",
                "02:00:00:00:00:09",
                "dev",
                "under0",
            ],
        );
        assert_eq!(h.neighbours::<Ipv4Addr>(vx).await?.len(), 1);
        assert!(h.delete_neighbour(vx, peer).await?);
        assert!(!h.delete_neighbour(vx, peer).await?);
        assert!(h.neighbours::<Ipv4Addr>(vx).await?.is_empty());

        let dst1 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20));
        let dst2 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 21));
        h.replace_fdb(vx, mac_a, dst1).await?;
        h.replace_fdb(vx, mac_a, dst1).await?;
        h.replace_fdb(vx, mac_b, dst1).await?;
        // Replace moves the remote of an existing MAC.
        h.replace_fdb(vx, mac_a, dst2).await?;
        let mut f = h.fdb_entries(vx).await?;
        f.sort_by_key(|e| e.mac);
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(
            (f[0].mac, f[0].dst, f[0].permanent, f[0].is_self),
            (mac_a, Some(dst2), true, true)
        );
        assert_eq!((f[1].mac, f[1].dst), (mac_b, Some(dst1)));
        assert!(h.delete_fdb(&f[0]).await?);
        assert!(!h.delete_fdb(&f[0]).await?);
        let f = h.fdb_entries(vx).await?;
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].mac, mac_b);
        Ok(())
    })
    .unwrap();
}

/// `underlay_ns` plus 2001:db8::1/64 (nodad) on `under0`.
fn underlay6_ns() -> NetNs {
    let ns = underlay_ns();
    ip(
        &ns,
        &["addr", "add", "2001:db8::1/64", "dev", "under0", "nodad"],
    );
    ns
}

#[test]
fn vxlan_over_an_ipv6_underlay_with_ipv6_fdb_remotes() {
    if !root() {
        return;
    }
    let ns = underlay6_ns();
    block_on(async {
        let h = NsHandle::new(&ns)?;
        let under = h.require_link("under0").await?.index;
        let local6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let s6 = VxlanSpec {
            local: IpAddr::V6(local6),
            mtu: 1430,
            ..spec(under)
        };
        let (vx, change) = h.ensure_vxlan(&s6).await?;
        assert_eq!(change, VxlanChange::Created);
        let v = h.vxlan_by_name("ferry.7").await?.expect("created");
        assert_eq!(v.local, Some(IpAddr::V6(local6)));
        assert_eq!((v.mtu, v.learning), (1430, Some(false)));
        let d = ip(&ns, &["-d", "link", "show", "ferry.7"]);
        assert!(d.contains("local 2001:db8::1"), "{d}");
        assert_eq!(h.ensure_vxlan(&s6).await?, (vx, VxlanChange::Unchanged));

        // IPv6 remotes: replace, move, dump, delete.
        let mac_a = [0x02, 0x42, 0xbb, 0, 0, 2];
        let mac_b = [0x02, 0x42, 0xbb, 0, 0, 3];
        let dst1: IpAddr = "2001:db8::20".parse().unwrap();
        let dst2: IpAddr = "2001:db8::21".parse().unwrap();
        h.replace_fdb(vx, mac_a, dst1).await?;
        h.replace_fdb(vx, mac_a, dst1).await?;
        h.replace_fdb(vx, mac_b, dst1).await?;
        h.replace_fdb(vx, mac_a, dst2).await?;
        let mut f = h.fdb_entries(vx).await?;
        f.sort_by_key(|e| e.mac);
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(
            (f[0].mac, f[0].dst, f[0].permanent, f[0].is_self),
            (mac_a, Some(dst2), true, true)
        );
        assert_eq!((f[1].mac, f[1].dst), (mac_b, Some(dst1)));
        let shown = ip(&ns, &["-d", "link", "show", "ferry.7"]);
        let fdb = in_netns(&ns, || {
            Command::new("bridge")
                .args(["fdb", "show", "dev", "ferry.7"])
                .output()
        })
        .expect("bridge fdb");
        let fdb = String::from_utf8_lossy(&fdb.stdout).to_string();
        assert!(
            fdb.contains("02:42:bb:00:00:02 dst 2001:db8::21 self permanent"),
            "{fdb}\n{shown}"
        );
        assert!(h.delete_fdb(&f[0]).await?);
        assert!(!h.delete_fdb(&f[0]).await?);
        let f = h.fdb_entries(vx).await?;
        assert_eq!((f.len(), f[0].mac), (1, mac_b), "{f:?}");

        // IPv4 neighbours on the device are unchanged by the underlay's family.
        h.replace_neighbour(vx, Ipv4Addr::new(10, 244, 2, 0), mac_b)
            .await?;
        assert_eq!(h.neighbours::<Ipv4Addr>(vx).await?.len(), 1);

        // The family of the local address cannot change in place.
        let (vx4, change) = h.ensure_vxlan(&spec(under)).await?;
        assert_eq!(change, VxlanChange::Recreated);
        assert_ne!(vx4, vx);
        assert_eq!(
            h.vxlan_by_name("ferry.7").await?.unwrap().local,
            Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)))
        );
        let (vx6, change) = h.ensure_vxlan(&s6).await?;
        assert_eq!(change, VxlanChange::Recreated);
        assert_eq!(
            h.vxlan_by_name("ferry.7").await?.unwrap().local,
            Some(IpAddr::V6(local6))
        );
        assert!(h.fdb_entries(vx6).await?.iter().all(|e| e.dst.is_none()));

        // IPv6 lookups: the holder of an address, the default route.
        assert_eq!(h.link_holding(IpAddr::V6(local6)).await?, Some(under));
        assert_eq!(
            h.link_holding("2001:db8::2".parse::<Ipv6Addr>().unwrap())
                .await?,
            None
        );
        assert_eq!(h.default_ipv6_route().await?, None);
        ip(
            &ns,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                "2001:db8::fe",
                "dev",
                "under0",
            ],
        );
        let def = h.default_ipv6_route().await?.unwrap();
        assert_eq!(
            (def.oif, def.gw),
            (under, Some("2001:db8::fe".parse().unwrap()))
        );
        assert_eq!(h.default_ipv4_route().await?, None);
        Ok(())
    })
    .unwrap();
}

#[test]
fn routes_tagged_with_ferry_protocol_leave_foreign_routes_alone() {
    if !root() {
        return;
    }
    let ns = underlay_ns();
    block_on(async {
        let h = NsHandle::new(&ns)?;
        let under = h.require_link("under0").await?.index;
        let (vx, _) = h.ensure_vxlan(&spec(under)).await?;
        let ours = Ipv4Route::ferry(
            "10.244.2.0/24".parse().unwrap(),
            Ipv4Addr::new(10, 244, 2, 0),
            vx,
            true,
        );
        h.replace_ip_route(&ours).await?;
        h.replace_ip_route(&ours).await?;
        ip(
            &ns,
            &[
                "route",
                "add",
                "10.99.0.0/16",
                "via",
                "192.0.2.254",
                "dev",
                "under0",
            ],
        );
        let shown = ip(&ns, &["route", "show", "10.244.2.0/24"]);
        assert!(
            shown.contains("via 10.244.2.0 dev ferry.7 proto 70 onlink"),
            "{shown}"
        );
        let mine = h
            .ip_routes::<Ipv4Addr>(RouteFilter {
                protocol: Some(FERRY_ROUTE_PROTO),
                oif: None,
            })
            .await?;
        assert_eq!(mine, vec![ours.clone()]);
        let on_under = h
            .ip_routes::<Ipv4Addr>(RouteFilter {
                protocol: None,
                oif: Some(under),
            })
            .await?;
        assert!(
            on_under
                .iter()
                .any(|r| r.dst.to_string() == "10.99.0.0/16" && r.protocol != FERRY_ROUTE_PROTO)
        );

        // Deleting "our" route to the foreign prefix touches nothing.
        let fake = Ipv4Route::ferry(
            "10.99.0.0/16".parse().unwrap(),
            Ipv4Addr::new(192, 0, 2, 254),
            under,
            false,
        );
        assert!(!h.delete_ip_route(&fake).await?);
        assert!(ip(&ns, &["route", "show", "10.99.0.0/16"]).contains("via 192.0.2.254"));
        assert!(h.delete_ip_route(&ours).await?);
        assert!(!h.delete_ip_route(&ours).await?);
        assert!(
            h.ip_routes::<Ipv4Addr>(RouteFilter {
                protocol: Some(FERRY_ROUTE_PROTO),
                oif: None
            })
            .await?
            .is_empty()
        );

        // Lookups: a connected peer has no gateway; the default route; who holds an address.
        let got = h.route_get(Ipv4Addr::new(192, 0, 2, 20)).await?.unwrap();
        assert_eq!((got.gw, got.oif), (None, under));
        let via = h.route_get(Ipv4Addr::new(10, 99, 1, 1)).await?.unwrap();
        assert_eq!(via.gw, Some(Ipv4Addr::new(192, 0, 2, 254)));
        assert_eq!(h.route_get(Ipv4Addr::new(198, 51, 100, 1)).await?, None);
        assert_eq!(h.default_ipv4_route().await?, None);
        ip(
            &ns,
            &[
                "route",
                "add",
                "default",
                "via",
                "192.0.2.254",
                "dev",
                "under0",
            ],
        );
        let def = h.default_ipv4_route().await?.unwrap();
        assert_eq!(
            (def.oif, def.gw),
            (under, Some(Ipv4Addr::new(192, 0, 2, 254)))
        );
        assert_eq!(
            h.link_holding(Ipv4Addr::new(192, 0, 2, 1)).await?,
            Some(under)
        );
        assert_eq!(h.link_holding(Ipv4Addr::new(192, 0, 2, 2)).await?, None);
        Ok(())
    })
    .unwrap();
}

#[test]
fn monitor_sees_a_route_deletion() {
    if !root() {
        return;
    }
    let ns = underlay_ns();
    block_on(async {
        let h = NsHandle::new(&ns)?;
        let under = h.require_link("under0").await?.index;
        let route = Ipv4Route::ferry(
            "10.244.5.0/24".parse().unwrap(),
            Ipv4Addr::new(192, 0, 2, 5),
            under,
            false,
        );
        h.replace_ip_route(&route).await?;
        let mut mon = Monitor::new(Some(&ns))?;
        // Deleted by someone else (an operator's `ip route del`).
        ip(&ns, &["route", "del", "10.244.5.0/24"]);
        let seen = timeout(Duration::from_secs(5), async {
            while let Some(ev) = mon.next().await {
                if let KernelEvent::Ipv4Route {
                    route: Some(r),
                    deleted: true,
                    ..
                } = ev
                    && r.dst == route.dst
                {
                    return Some(r);
                }
            }
            None
        })
        .await
        .expect("the deletion is notified within 5 s")
        .expect("monitor stream open");
        assert_eq!(seen, route);
        // Link events too.
        ip(&ns, &["link", "set", "under1", "down"]);
        let link = timeout(Duration::from_secs(5), mon.next())
            .await
            .expect("link event");
        assert!(
            matches!(
                link,
                Some(KernelEvent::Link { .. })
                    | Some(KernelEvent::Ipv4Route { .. })
                    | Some(KernelEvent::Neighbour { .. })
            ),
            "{link:?}"
        );
        Ok(())
    })
    .unwrap();
}
