//! The etcd store against a real etcd (Debian's etcd-server), one etcd per
//! test, so the tests run in parallel and may stop and restart theirs.

use etcd_client::{Client, CompactionOptions, GetOptions};
use ferry_tests::etcd::{EtcdCluster, EtcdSecurity, EtcdServer, require_etcd};
use ferryd::lease::{Mac, SubnetLease};
use ferryd::network::{BackendType, NetworkConfig};
use ferryd::store::{
    Credentials, HeldLease, LeaseEvent, LeaseState, LeaseWatch, Password, Store, StoreError,
    StoreOptions, TlsFiles,
};
use ipnetwork::Ipv4Network;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const PREFIX: &str = "/ferry-test";
const TTL: Duration = Duration::from_secs(30);
/// How long a watch may take to deliver one event (reconnects included).
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

fn etcd() -> Option<EtcdServer> {
    require_etcd().then(EtcdServer::start)
}

fn opts(etcd: &EtcdServer) -> StoreOptions {
    StoreOptions {
        endpoints: vec![etcd.endpoint()],
        prefix: PREFIX.to_string(),
        tls: None,
        auth: None,
        timeout: Duration::from_secs(5),
    }
}

async fn store(etcd: &EtcdServer) -> Store {
    Store::connect(&opts(etcd))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

fn cfg(json: &str) -> NetworkConfig {
    NetworkConfig::from_json(json).unwrap()
}

fn cluster() -> NetworkConfig {
    cfg(r#"{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan"}}"#)
}

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

fn node(name: &str, i: u8) -> SubnetLease {
    SubnetLease {
        subnet: None,
        node: name.to_string(),
        public_ip: [192, 0, 2, i].into(),
        backend: BackendType::Vxlan,
        vtep_mac: Some(Mac::derived(name)),
        renewed_at: 0,
        ipv6_subnet: None,
    }
}

async fn acquire(
    s: &Store,
    c: &NetworkConfig,
    me: &SubnetLease,
    pref: Option<Ipv4Network>,
) -> HeldLease {
    s.acquire(c, me, pref, TTL)
        .await
        .unwrap_or_else(|e| panic!("acquire for {}: {e}", me.node))
}

async fn raw_get(client: &Client, key: &str) -> Option<(Vec<u8>, i64)> {
    let mut c = client.clone();
    let resp = c.get(key, None).await.unwrap();
    resp.kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.lease()))
}

/// The next event, skipping (and printing) errors of reconnect attempts.
async fn next_event(w: &mut LeaseWatch) -> LeaseEvent {
    let end = Instant::now() + EVENT_TIMEOUT;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, w.next()).await {
            Ok(Ok(ev)) => return ev,
            Ok(Err(e)) => eprintln!("watch error (retrying): {e}"),
            Err(_) => panic!("no watch event within {EVENT_TIMEOUT:?}"),
        }
    }
}

#[tokio::test]
async fn config_round_trip_and_missing_config() {
    let Some(etcd) = etcd() else { return };
    let s = store(&etcd).await;
    let err = s.network_config().await.unwrap_err();
    assert!(matches!(err, StoreError::MissingConfig { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/ferry-test/network/config"),
        "{err}"
    );

    let c = cfg(r#"{"network":"10.10.0.0/16","subnetLen":26,"backend":{"type":"host-gw"}}"#);
    s.put_network_config(&c).await.unwrap();
    assert_eq!(s.network_config().await.unwrap(), c);

    // An operator's flannel-style JSON is read too; garbage is a clear error.
    let mut client = s.client();
    client
        .put(
            s.config_key(),
            r#"{"Network":"10.20.0.0/16","Backend":{"Type":"vxlan"}}"#,
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        s.network_config().await.unwrap().network,
        net("10.20.0.0/16")
    );
    client.put(s.config_key(), "{nope", None).await.unwrap();
    let err = s.network_config().await.unwrap_err();
    assert!(matches!(err, StoreError::BadConfig { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/ferry-test/network/config"),
        "{err}"
    );
}

#[tokio::test]
async fn connect_to_nothing_fails_within_the_timeout() {
    // A port that was free a moment ago: nobody listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = StoreOptions {
        endpoints: vec![format!("http://127.0.0.1:{port}")],
        prefix: PREFIX.into(),
        tls: None,
        auth: None,
        timeout: Duration::from_secs(1),
    };
    let t = Instant::now();
    let err = match Store::connect(&o).await {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => e,
    };
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}

#[tokio::test]
async fn acquire_gives_a_valid_subnet_stored_with_an_etcd_lease() {
    let Some(etcd) = etcd() else { return };
    let s = store(&etcd).await;
    let c = cluster();
    let me = node("node-a", 1);
    let held = acquire(&s, &c, &me, None).await;
    let subnet = held.lease.subnet.expect("subnet");
    assert!(c.holds(subnet), "{subnet}");
    assert_eq!(
        subnet,
        net("10.244.1.0/24"),
        "the first candidate of an empty network"
    );
    assert_eq!(held.key, "/ferry-test/network/subnets/10.244.1.0-24");
    assert_eq!(held.lease.node, "node-a");
    assert_eq!(held.lease.vtep_mac, me.vtep_mac);
    assert!(held.lease.renewed_at > 0);

    let (value, lease_id) = raw_get(&s.client(), &held.key).await.expect("key written");
    assert_eq!(lease_id, held.lease_id, "key attached to the etcd lease");
    assert_eq!(SubnetLease::from_kv(&held.key, &value).unwrap(), held.lease);
    let (leases, rev) = s.list_leases().await.unwrap();
    assert_eq!(leases, vec![held.lease.clone()]);
    assert!(rev > 0);
}

#[tokio::test]
async fn dual_stack_leases_carry_the_ipv6_subnet_of_the_same_index() {
    let Some(etcd) = etcd() else { return };
    let s = store(&etcd).await;
    let c = cfg(
        r#"{"network":"10.244.0.0/16","subnetLen":24,"ipv6Network":"fd00:244::/56","backend":{"type":"vxlan"}}"#,
    );
    s.put_network_config(&c).await.unwrap();
    assert_eq!(s.network_config().await.unwrap(), c);
    let a = acquire(&s, &c, &node("node-a", 1), None).await;
    let b = acquire(&s, &c, &node("node-b", 2), net("10.244.7.0/24").into()).await;
    assert_eq!(a.lease.subnet, Some(net("10.244.1.0/24")));
    assert_eq!(
        a.lease.ipv6_subnet,
        Some("fd00:244:0:1::/64".parse().unwrap())
    );
    assert_eq!(b.lease.subnet, Some(net("10.244.7.0/24")));
    assert_eq!(
        b.lease.ipv6_subnet,
        Some("fd00:244:0:7::/64".parse().unwrap())
    );
    // Stored in the value, under the unchanged IPv4 key.
    assert_eq!(a.key, "/ferry-test/network/subnets/10.244.1.0-24");
    let (value, _) = raw_get(&s.client(), &a.key).await.unwrap();
    assert!(
        String::from_utf8_lossy(&value).contains(r#""ipv6Subnet":"fd00:244:0:1::/64""#),
        "{}",
        String::from_utf8_lossy(&value)
    );
    // A restart takes its lease over with the same IPv6 subnet.
    let again = acquire(&s, &c, &node("node-a", 9), None).await;
    assert_eq!(again.lease.ipv6_subnet, a.lease.ipv6_subnet);
    let (leases, _) = s.list_leases().await.unwrap();
    let v6: BTreeSet<_> = leases.iter().map(|l| l.ipv6_subnet).collect();
    assert_eq!(v6.len(), 2);
    // An IPv4-only network: no IPv6 subnet, nothing in the value.
    let c4 = cluster();
    let d = acquire(&s, &c4, &node("node-d", 4), None).await;
    assert_eq!(d.lease.ipv6_subnet, None);
    let (value, _) = raw_get(&s.client(), &d.key).await.unwrap();
    assert!(!String::from_utf8_lossy(&value).contains("ipv6"));
}

#[tokio::test]
async fn same_node_gets_its_subnet_back_other_nodes_never_do() {
    let Some(etcd) = etcd() else { return };
    let c = cluster();
    let first = {
        // Another daemon process: its own connection, gone without release.
        let s = store(&etcd).await;
        acquire(&s, &c, &node("node-a", 1), None).await
    };
    let s = store(&etcd).await;
    let b = acquire(&s, &c, &node("node-b", 2), first.lease.subnet).await;
    assert_ne!(
        b.lease.subnet, first.lease.subnet,
        "preferred subnet of another node"
    );

    // node-a restarted with a new address: same subnet, new lease, new value.
    let again = acquire(&s, &c, &node("node-a", 9), None).await;
    assert_eq!(again.lease.subnet, first.lease.subnet);
    assert_eq!(again.key, first.key);
    assert_ne!(again.lease_id, first.lease_id);
    assert_eq!(
        again.lease.public_ip,
        std::net::IpAddr::from([192, 0, 2, 9])
    );
    let (_, lease_id) = raw_get(&s.client(), &again.key).await.unwrap();
    assert_eq!(lease_id, again.lease_id, "key moved to the new etcd lease");
    // The old process's hold is fenced off.
    assert_eq!(s.renew(&first).await.unwrap(), LeaseState::Lost);
    assert_eq!(s.renew(&again).await.unwrap(), LeaseState::Alive);
    // Releasing the stale hold must not delete the new owner's key.
    s.release(&first).await.unwrap();
    assert!(raw_get(&s.client(), &again.key).await.is_some());

    // Even preferring node-a's subnet, node-c gets another one.
    let cc = acquire(&s, &c, &node("node-c", 3), again.lease.subnet).await;
    let subnets: BTreeSet<_> = [&again, &b, &cc].iter().map(|h| h.lease.subnet).collect();
    assert_eq!(subnets.len(), 3);
}

#[tokio::test]
async fn preferred_subnet_is_honoured_when_free_and_ignored_when_taken() {
    let Some(etcd) = etcd() else { return };
    let s = store(&etcd).await;
    let c = cluster();
    let seven = net("10.244.7.0/24");
    let a = acquire(&s, &c, &node("node-a", 1), Some(seven)).await;
    assert_eq!(a.lease.subnet, Some(seven));
    let b = acquire(&s, &c, &node("node-b", 2), Some(seven)).await;
    assert_eq!(b.lease.subnet, Some(net("10.244.1.0/24")));
    // Outside the network, or of the wrong length: ignored.
    let x = acquire(&s, &c, &node("node-x", 3), Some(net("10.99.7.0/24"))).await;
    assert_eq!(x.lease.subnet, Some(net("10.244.2.0/24")));
    let y = acquire(&s, &c, &node("node-y", 4), Some(net("10.244.8.0/25"))).await;
    assert_eq!(y.lease.subnet, Some(net("10.244.3.0/24")));
}

#[tokio::test]
async fn twenty_daemons_racing_get_twenty_distinct_subnets() {
    let Some(etcd) = etcd() else { return };
    let c = cluster();
    let mut stores = Vec::new();
    for _ in 0..20 {
        stores.push(store(&etcd).await);
    }
    let mes: Vec<SubnetLease> = (0..20u8)
        .map(|i| node(&format!("node-{i}"), i + 1))
        .collect();
    let t = Instant::now();
    let results = futures::future::join_all(
        stores
            .iter()
            .zip(&mes)
            .map(|(s, me)| s.acquire(&c, me, None, TTL)),
    )
    .await;
    eprintln!("20 racing acquires: {:?}", t.elapsed());
    let mut subnets = BTreeSet::new();
    for (r, me) in results.into_iter().zip(&mes) {
        let held = r.unwrap_or_else(|e| panic!("acquire for {}: {e}", me.node));
        assert_eq!(held.lease.node, me.node);
        assert!(c.holds(held.lease.subnet.unwrap()));
        subnets.insert(held.lease.subnet);
    }
    assert_eq!(subnets.len(), 20, "{subnets:?}");
    let (leases, _) = stores[0].list_leases().await.unwrap();
    assert_eq!(leases.len(), 20);
}

#[tokio::test]
async fn a_full_network_is_exhausted_and_leaks_no_etcd_lease() {
    let Some(etcd) = etcd() else { return };
    let s = store(&etcd).await;
    let c = cfg(r#"{"network":"10.9.0.0/22","subnetLen":24}"#);
    let mut got = BTreeSet::new();
    for i in 0..3 {
        got.insert(
            acquire(&s, &c, &node(&format!("n{i}"), i + 1), None)
                .await
                .lease
                .subnet,
        );
    }
    assert_eq!(got.len(), 3);
    let err = s.acquire(&c, &node("n3", 4), None, TTL).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Exhausted { taken: 3, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("10.9.0.0/22"), "{err}");
    let mut client = s.client();
    let leases = client.leases().await.unwrap();
    assert_eq!(
        leases.leases().len(),
        3,
        "the failed attempt's etcd lease is revoked"
    );
}

#[tokio::test]
async fn renew_is_alive_then_lost_after_an_operator_deletes_the_key() {
    let Some(etcd) = etcd() else { return };
    let s = store(&etcd).await;
    let held = acquire(&s, &cluster(), &node("node-a", 1), None).await;
    assert_eq!(s.renew(&held).await.unwrap(), LeaseState::Alive);
    assert_eq!(s.renew(&held).await.unwrap(), LeaseState::Alive);
    s.client()
        .clone()
        .delete(held.key.clone(), None)
        .await
        .unwrap();
    assert_eq!(s.renew(&held).await.unwrap(), LeaseState::Lost);
}

#[tokio::test]
async fn release_deletes_the_key_and_revokes_the_lease() {
    let Some(etcd) = etcd() else { return };
    let s = store(&etcd).await;
    let held = acquire(&s, &cluster(), &node("node-a", 1), None).await;
    s.release(&held).await.unwrap();
    assert!(raw_get(&s.client(), &held.key).await.is_none());
    let mut client = s.client();
    let ttl = client
        .lease_time_to_live(held.lease_id, None)
        .await
        .unwrap();
    assert!(ttl.ttl() <= 0, "lease still alive: ttl {}", ttl.ttl());
    assert_eq!(s.renew(&held).await.unwrap(), LeaseState::Lost);
    // Twice is fine.
    s.release(&held).await.unwrap();
    assert!(s.list_leases().await.unwrap().0.is_empty());
}

#[tokio::test]
async fn an_unrenewed_lease_expires_and_its_key_is_deleted() {
    let Some(etcd) = etcd() else { return };
    let s = store(&etcd).await;
    let held = s
        .acquire(&cluster(), &node("node-a", 1), None, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(raw_get(&s.client(), &held.key).await.is_some());
    // etcd raises TTLs below its minimum (about 2 s with default timings).
    let t = Instant::now();
    while raw_get(&s.client(), &held.key).await.is_some() {
        assert!(t.elapsed() < Duration::from_secs(15), "key still there");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(s.renew(&held).await.unwrap(), LeaseState::Lost);
}

#[tokio::test]
async fn unreadable_values_are_skipped_and_never_taken() {
    let Some(etcd) = etcd() else { return };
    let s = store(&etcd).await;
    let c = cluster();
    let mut client = s.client();
    client
        .put(s.lease_key(net("10.244.1.0/24")), "{garbage", None)
        .await
        .unwrap();
    client
        .put(format!("{}not-a-subnet", s.subnets_prefix()), "{}", None)
        .await
        .unwrap();
    let (leases, rev) = s.list_leases().await.unwrap();
    assert!(leases.is_empty(), "{leases:?}");
    let mut w = s.watch_leases(rev);
    client
        .put(s.lease_key(net("10.244.2.0/24")), "[1]", None)
        .await
        .unwrap();
    let held = acquire(&s, &c, &node("node-a", 1), None).await;
    assert_eq!(
        held.lease.subnet,
        Some(net("10.244.3.0/24")),
        "garbage keys hold their subnet"
    );
    // The bad puts are skipped by the watch, the good one arrives.
    assert_eq!(
        next_event(&mut w).await,
        LeaseEvent::Put(held.lease.clone())
    );
    assert_eq!(s.list_leases().await.unwrap().0, vec![held.lease]);
}

#[tokio::test]
async fn watch_reports_puts_and_deletes_in_order() {
    let Some(etcd) = etcd() else { return };
    let s = store(&etcd).await;
    let c = cluster();
    let (_, rev) = s.list_leases().await.unwrap();
    let mut w = s.watch_leases(rev);
    assert_eq!(w.revision(), rev);
    let a = acquire(&s, &c, &node("node-a", 1), None).await;
    let b = acquire(&s, &c, &node("node-b", 2), None).await;
    s.release(&a).await.unwrap();
    // Written before the watch connected (it is lazy): still delivered.
    assert_eq!(next_event(&mut w).await, LeaseEvent::Put(a.lease.clone()));
    assert_eq!(next_event(&mut w).await, LeaseEvent::Put(b.lease.clone()));
    assert_eq!(
        next_event(&mut w).await,
        LeaseEvent::Delete(a.lease.subnet.unwrap())
    );
    let after_delete = w.revision();
    assert!(after_delete > rev);
    // Expiry arrives as a Delete too.
    s.client().lease_revoke(b.lease_id).await.unwrap();
    assert_eq!(
        next_event(&mut w).await,
        LeaseEvent::Delete(b.lease.subnet.unwrap())
    );
    assert!(w.revision() > after_delete);

    // Nothing else is pending.
    let quiet = tokio::time::timeout(Duration::from_millis(300), w.next()).await;
    assert!(quiet.is_err(), "unexpected {quiet:?}");
}

#[tokio::test]
async fn watch_resumes_after_an_etcd_restart_without_missing_events() {
    let Some(mut etcd) = etcd() else { return };
    let s = store(&etcd).await;
    let c = cluster();
    let (_, rev) = s.list_leases().await.unwrap();
    let mut w = s.watch_leases(rev);
    let a = acquire(&s, &c, &node("node-a", 1), None).await;
    assert_eq!(next_event(&mut w).await, LeaseEvent::Put(a.lease.clone()));

    etcd.stop();
    // The broken stream is reported, once per failed attempt.
    let r = tokio::time::timeout(Duration::from_secs(15), w.next())
        .await
        .expect("watch did not notice etcd stopping");
    let err = r.expect_err("an event while etcd is down");
    eprintln!("while etcd is down: {err}");
    assert!(s.list_leases().await.is_err());

    etcd.start_again();
    // Written while the watch is still disconnected (it reconnects only on
    // the next call), so only resuming from its revision can deliver it.
    let b = acquire(&s, &c, &node("node-b", 2), None).await;
    assert_eq!(next_event(&mut w).await, LeaseEvent::Put(b.lease.clone()));
    let cc = acquire(&s, &c, &node("node-c", 3), None).await;
    assert_eq!(next_event(&mut w).await, LeaseEvent::Put(cc.lease.clone()));
    // And a's lease survived the restart.
    assert_eq!(s.renew(&a).await.unwrap(), LeaseState::Alive);
}

#[tokio::test]
async fn watch_resyncs_when_its_revision_was_compacted() {
    let Some(mut etcd) = etcd() else { return };
    let s = store(&etcd).await;
    let c = cluster();
    let (_, rev) = s.list_leases().await.unwrap();
    let mut w = s.watch_leases(rev);
    let a = acquire(&s, &c, &node("node-a", 1), None).await;
    assert_eq!(next_event(&mut w).await, LeaseEvent::Put(a.lease.clone()));

    etcd.stop();
    let r = tokio::time::timeout(Duration::from_secs(15), w.next())
        .await
        .expect("watch did not notice etcd stopping");
    assert!(r.is_err(), "{r:?}");
    etcd.start_again();

    // While disconnected: b arrives, a leaves, and history is compacted.
    let b = acquire(&s, &c, &node("node-b", 2), None).await;
    s.release(&a).await.unwrap();
    let mut client = s.client();
    let head = client
        .get("/", Some(GetOptions::new().with_count_only()))
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client
        .compact(head, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();

    match next_event(&mut w).await {
        LeaseEvent::Resync { leases, revision } => {
            assert_eq!(leases, vec![b.lease.clone()]);
            assert!(revision >= head, "{revision} < {head}");
            assert_eq!(w.revision(), revision);
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    // The watch goes on after the resync.
    let cc = acquire(&s, &c, &node("node-c", 3), None).await;
    assert_eq!(next_event(&mut w).await, LeaseEvent::Put(cc.lease.clone()));
}

#[tokio::test]
async fn watch_is_cancel_safe_in_select() {
    let Some(etcd) = etcd() else { return };
    let s = store(&etcd).await;
    let c = cluster();
    let (_, rev) = s.list_leases().await.unwrap();
    let mut w = s.watch_leases(rev);
    let mut want = Vec::new();
    let mut got = Vec::new();
    for i in 0..10u8 {
        want.push(LeaseEvent::Put(
            acquire(&s, &c, &node(&format!("n{i}"), i + 1), None)
                .await
                .lease,
        ));
        // Race the watch against a tick that often wins: nothing may be lost.
        for _ in 0..3 {
            tokio::select! {
                ev = w.next() => got.push(ev.unwrap()),
                _ = tokio::time::sleep(Duration::from_micros(200)) => {}
            }
        }
    }
    while got.len() < want.len() {
        got.push(next_event(&mut w).await);
    }
    assert_eq!(got, want);
}

/// etcd with client-certificate authentication: ferry's TLS options are what
/// gets it in; plain HTTP, a wrong CA or no client certificate do not.
#[tokio::test]
async fn tls_with_client_certificates() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_tls();
    let certs = etcd.tls().expect("a TLS server has certificates").clone();
    let tls = ferryd::store::TlsFiles {
        ca: certs.ca.clone(),
        cert: Some(certs.client_cert.clone()),
        key: Some(certs.client_key.clone()),
    };
    let with = |tls: Option<ferryd::store::TlsFiles>, endpoint: String| StoreOptions {
        endpoints: vec![endpoint],
        prefix: PREFIX.to_string(),
        tls,
        auth: None,
        timeout: Duration::from_secs(3),
    };
    let store = Store::connect(&with(Some(tls.clone()), etcd.endpoint()))
        .await
        .unwrap_or_else(|e| panic!("TLS connect: {e}\n{}", etcd.log()));
    store.put_network_config(&cluster()).await.unwrap();
    assert_eq!(store.network_config().await.unwrap(), cluster());
    let held = acquire(&store, &cluster(), &node("tls-node", 1), None).await;
    assert!(cluster().holds(held.lease.subnet()));

    // Plain HTTP to the TLS port.
    let plain = etcd.endpoint().replace("https://", "http://");
    assert!(Store::connect(&with(None, plain)).await.is_err());
    // A CA that did not sign the server's certificate.
    let other = ferry_tests::etcd::TlsCerts::generate(
        &std::env::temp_dir().join(format!("ferry-tls-other-{}", std::process::id())),
    );
    let wrong_ca = ferryd::store::TlsFiles {
        ca: other.ca.clone(),
        ..tls.clone()
    };
    assert!(
        Store::connect(&with(Some(wrong_ca), etcd.endpoint()))
            .await
            .is_err()
    );
    // A client certificate from another CA: etcd refuses it.
    let foreign_client = ferryd::store::TlsFiles {
        ca: certs.ca.clone(),
        cert: Some(other.client_cert.clone()),
        key: Some(other.client_key.clone()),
    };
    assert!(
        Store::connect(&with(Some(foreign_client), etcd.endpoint()))
            .await
            .is_err()
    );
    // No client certificate at all (server-only TLS options): refused too.
    let server_only = ferryd::store::TlsFiles {
        ca: certs.ca.clone(),
        cert: None,
        key: None,
    };
    assert!(
        Store::connect(&with(Some(server_only), etcd.endpoint()))
            .await
            .is_err()
    );
    let _ = std::fs::remove_dir_all(other.ca.parent().unwrap());
    // Missing files are a clear error naming the file.
    let missing = ferryd::store::TlsFiles {
        ca: "/nonexistent/ca.pem".into(),
        ..tls
    };
    let err = Store::connect(&with(Some(missing), etcd.endpoint()))
        .await
        .err()
        .expect("missing CA file fails")
        .to_string();
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}

/// etcd with server-only TLS (no client certificates): the CA alone gets in
/// and verifies the server; a wrong CA or plain HTTP do not.
#[tokio::test]
async fn tls_with_a_ca_and_no_client_certificate() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_secured(EtcdSecurity::ServerTls);
    let certs = etcd.tls().expect("a TLS server has certificates").clone();
    let with = |ca: &std::path::Path, endpoint: String| StoreOptions {
        endpoints: vec![endpoint],
        prefix: PREFIX.to_string(),
        tls: Some(TlsFiles {
            ca: ca.to_path_buf(),
            cert: None,
            key: None,
        }),
        auth: None,
        timeout: Duration::from_secs(3),
    };
    let store = Store::connect(&with(&certs.ca, etcd.endpoint()))
        .await
        .unwrap_or_else(|e| panic!("server-only TLS connect: {e}\n{}", etcd.log()));
    store.put_network_config(&cluster()).await.unwrap();
    let held = acquire(&store, &cluster(), &node("tls-ca-only", 1), None).await;
    assert_eq!(store.renew(&held).await.unwrap(), LeaseState::Alive);

    let other = ferry_tests::etcd::TlsCerts::generate(
        &std::env::temp_dir().join(format!("ferry-tls-ca-only-{}", std::process::id())),
    );
    let err = Store::connect(&with(&other.ca, etcd.endpoint()))
        .await
        .err();
    let _ = std::fs::remove_dir_all(other.ca.parent().unwrap());
    assert!(
        err.is_some(),
        "a CA that did not sign etcd's certificate must fail"
    );
    // An https endpoint without any CA is refused before connecting.
    let no_ca = StoreOptions {
        tls: None,
        ..with(&certs.ca, etcd.endpoint())
    };
    let err = Store::connect(&no_ca)
        .await
        .err()
        .expect("no CA")
        .to_string();
    assert!(err.contains("no CA file"), "{err}");
}

const ROOT_PASSWORD: &str = "s3cret-Pa55word";

/// Turns on etcd's authentication with a `root` user (what `etcdctl user add
/// root` + `etcdctl auth enable` do).
async fn enable_auth(mut client: Client) {
    client.role_add("root").await.unwrap();
    client.user_add("root", ROOT_PASSWORD, None).await.unwrap();
    client.user_grant_role("root", "root").await.unwrap();
    client.auth_enable().await.unwrap();
}

fn credentials(password: &str) -> Option<Credentials> {
    Some(Credentials {
        user: "root".into(),
        password: Password::new(password),
    })
}

/// Username/password authentication, over plain HTTP and over server-only
/// TLS: the right password works for every operation (a lease, its renewal,
/// a watch); no credentials or a wrong password are refused with an error
/// that does not contain the password.
#[tokio::test]
async fn user_and_password_authentication() {
    if !require_etcd() {
        return;
    }
    for security in [EtcdSecurity::Plain, EtcdSecurity::ServerTls] {
        let etcd = EtcdServer::start_secured(security);
        let tls = etcd.tls().map(|c| TlsFiles {
            ca: c.ca.clone(),
            cert: None,
            key: None,
        });
        let with = |auth: Option<Credentials>| StoreOptions {
            endpoints: vec![etcd.endpoint()],
            prefix: PREFIX.to_string(),
            tls: tls.clone(),
            auth,
            timeout: Duration::from_secs(3),
        };
        let admin = Store::connect(&with(None)).await.unwrap();
        admin.put_network_config(&cluster()).await.unwrap();
        enable_auth(admin.client()).await;

        let store = Store::connect(&with(credentials(ROOT_PASSWORD)))
            .await
            .unwrap_or_else(|e| panic!("{security:?}: connect with the password: {e}"));
        assert_eq!(store.network_config().await.unwrap(), cluster());
        let mut watch = store.watch_leases(store.list_leases().await.unwrap().1);
        let held = acquire(&store, &cluster(), &node("auth-node", 1), None).await;
        assert_eq!(store.renew(&held).await.unwrap(), LeaseState::Alive);
        match next_event(&mut watch).await {
            LeaseEvent::Put(l) => assert_eq!(l.node, "auth-node"),
            other => panic!("{security:?}: {other:?}"),
        }

        // Without credentials etcd refuses the reads.
        let err = match Store::connect(&with(None)).await {
            Ok(s) => s.network_config().await.expect_err("refused"),
            Err(e) => e,
        };
        assert!(
            matches!(err, StoreError::Etcd { .. }),
            "{security:?}: {err:?}"
        );
        // A wrong password: a clear error, and no password in it.
        let wrong = "wrong-Pa55word";
        let err = Store::connect(&with(credentials(wrong)))
            .await
            .err()
            .expect("a wrong password fails");
        let text = format!("{err} {err:?}");
        assert!(
            text.contains("authentication failed"),
            "{security:?}: {text}"
        );
        assert!(!text.contains(wrong), "the password leaked: {text}");
        let opts = format!("{:?}", with(credentials(ROOT_PASSWORD)));
        assert!(!opts.contains(ROOT_PASSWORD), "the password leaked: {opts}");

        // The daemon's flags: the password from a file (its newline
        // ignored), the CA alone for server-only TLS.
        let dir =
            std::env::temp_dir().join(format!("ferry-auth-{}-{security:?}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ferryd_show = |password: &str| {
            let file = dir.join("password");
            std::fs::write(&file, format!("{password}\n")).unwrap();
            let mut cmd = std::process::Command::new(ferry_tests::bin("ferryd"));
            cmd.args(["--etcd-endpoints", &etcd.endpoint()])
                .args(["--etcd-prefix", PREFIX, "--etcd-username", "root"])
                .arg("--etcd-password-file")
                .arg(&file)
                .env_remove("FERRY_ETCD_PASSWORD")
                .env("FERRY_LOG", "debug");
            if let Some(t) = &tls {
                cmd.arg("--etcd-cafile").arg(&t.ca);
            }
            cmd.arg("show").output().expect("run ferryd")
        };
        let out = ferryd_show(ROOT_PASSWORD);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{security:?}: {stderr}");
        assert!(stdout.contains("auth-node"), "{stdout}");
        assert!(
            !stderr.contains(ROOT_PASSWORD),
            "the password leaked: {stderr}"
        );
        let out = ferryd_show(wrong);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a wrong password got in");
        assert!(stderr.contains("authentication failed"), "{stderr}");
        assert!(!stderr.contains(wrong), "the password leaked: {stderr}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Mutual TLS and a password together (etcd checks both).
#[tokio::test]
async fn client_certificates_with_a_password() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_tls();
    let c = etcd.tls().unwrap().clone();
    let with = |auth: Option<Credentials>| StoreOptions {
        endpoints: vec![etcd.endpoint()],
        prefix: PREFIX.to_string(),
        tls: Some(TlsFiles {
            ca: c.ca.clone(),
            cert: Some(c.client_cert.clone()),
            key: Some(c.client_key.clone()),
        }),
        auth,
        timeout: Duration::from_secs(3),
    };
    let admin = Store::connect(&with(None)).await.unwrap();
    admin.put_network_config(&cluster()).await.unwrap();
    enable_auth(admin.client()).await;
    let store = Store::connect(&with(credentials(ROOT_PASSWORD)))
        .await
        .unwrap_or_else(|e| panic!("mTLS + password: {e}"));
    let held = acquire(&store, &cluster(), &node("mtls-auth", 1), None).await;
    assert_eq!(store.renew(&held).await.unwrap(), LeaseState::Alive);
    assert!(
        Store::connect(&with(credentials("wrong-Pa55word")))
            .await
            .is_err()
    );
}

/// One fresh start as ferryd makes it (each step retried after 100 ms,
/// doubling up to 5 s): connect, read the config, acquire a lease.
async fn time_to_lease(endpoints: &[String], name: &str) -> Duration {
    async fn retry<T, F, Fut>(mut op: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut delay = Duration::from_millis(100);
        loop {
            match op().await {
                Ok(v) => return v,
                Err(e) => {
                    eprintln!("retrying: {e}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
    let t = Instant::now();
    let o = StoreOptions {
        endpoints: endpoints.to_vec(),
        prefix: PREFIX.to_string(),
        ..StoreOptions::default()
    };
    let s = retry(|| Store::connect(&o)).await;
    let c = retry(|| s.network_config()).await;
    let me = node(name, 1);
    let held = retry(|| s.acquire(&c, &me, None, TTL)).await;
    let took = t.elapsed();
    s.release(&held).await.unwrap();
    took
}

/// A 3-member etcd with one member down: fresh starts get their lease without
/// waiting on the dead member (a correctness check with a generous bound,
/// not a benchmark: examples/etcd_failover_bench.rs measures). Before, about
/// one request in three went to the dead member and each failure restarted
/// the step with backoff: 10 starts took up to 30 s each.
#[tokio::test]
async fn one_etcd_member_down_does_not_delay_a_lease() {
    if !require_etcd() {
        return;
    }
    let mut cluster3 = EtcdCluster::start(3);
    let endpoints = cluster3.endpoints();
    let s = Store::connect(&StoreOptions {
        endpoints: endpoints.clone(),
        ..opts(&cluster3.members[0])
    })
    .await
    .unwrap();
    s.put_network_config(&cluster()).await.unwrap();
    drop(s);
    for down in 0..3 {
        cluster3.members[down].stop();
        wait_for_a_leader(&cluster3);
        for i in 0..4 {
            let took = time_to_lease(&endpoints, &format!("n{down}-{i}")).await;
            assert!(
                took < Duration::from_secs(3),
                "member {down} down: start {i} took {took:?}"
            );
        }
        cluster3.members[down].start_again();
    }
    // A store keeps working when the member it uses dies under it.
    let s = Store::connect(&StoreOptions {
        endpoints: endpoints.clone(),
        ..opts(&cluster3.members[0])
    })
    .await
    .unwrap();
    let held = acquire(&s, &cluster(), &node("survivor", 1), None).await;
    for m in 0..3 {
        cluster3.members[m].stop();
        // Stopping the leader means an election (about a second), during
        // which every member refuses; the renewal must succeed right after.
        let t = Instant::now();
        loop {
            match s.renew(&held).await {
                Ok(LeaseState::Alive) => break,
                Ok(LeaseState::Lost) => panic!("lease lost"),
                Err(e) if t.elapsed() < Duration::from_secs(5) => {
                    eprintln!("member {m} down: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("member {m} down: no renewal within 5 s: {e}"),
            }
        }
        cluster3.members[m].start_again();
        wait_for_a_leader(&cluster3);
    }
}

/// Waits until every running member answers /health (which needs a leader).
fn wait_for_a_leader(c: &EtcdCluster) {
    let end = Instant::now() + Duration::from_secs(20);
    while !c
        .members
        .iter()
        .filter(|m| m.running())
        .all(EtcdServer::healthy)
    {
        assert!(Instant::now() < end, "no etcd leader within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}
