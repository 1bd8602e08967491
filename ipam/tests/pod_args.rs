//! What ferry-ipam records with a reservation for ferryd's gc sweep and for
//! tools: the netns identity and the Kubernetes pod from CNI_ARGS.

mod common;
use common::*;
use ferry_ipam::record::{Record, netns_identity};
use ferry_ipam::store::Store;
use serde_json::json;

fn add(d: &TempDir, c: &serde_json::Value, id: &str, cni_args: &str) -> Reply {
    let mut cmd = command(BIN, "ADD", id, "eth0", &d.netns());
    cmd.env("CNI_ARGS", cni_args);
    Reply::from(spawn(cmd, c).wait_with_output().unwrap())
}

#[test]
fn pod_args_and_netns_identity_are_recorded() {
    let d = TempDir::new("podargs");
    let c = conf(&d, "1.0.0", "ferry-ipam", json!({"subnet": "10.61.0.0/24"}));
    let r = add(
        &d,
        &c,
        "c1",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-5d78c9869d-abcde;K8S_POD_INFRA_CONTAINER_ID=c1",
    );
    assert!(r.ok, "{:?} {}", r.json, r.stderr);
    // Values not fit to record (control characters, too long): not
    // recorded, and the ADD still succeeds.
    let long = "x".repeat(300);
    let r = add(
        &d,
        &c,
        "c2",
        &format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=a\u{1b}[31m;K8S_POD_NAME={long}"),
    );
    assert!(r.ok, "{:?} {}", r.json, r.stderr);
    let (dev, ino) = netns_identity(&d.netns()).unwrap();
    let store = Store::open_existing(&d.path().join("data"), "net1")
        .unwrap()
        .unwrap();
    let mut seen = 0;
    for (ip, rec) in store.records().unwrap() {
        let Record::Held { owner, meta } = rec else {
            panic!("{ip}: {rec:?}")
        };
        let meta = meta.expect("ferry's evidence");
        assert_eq!((meta.netns_dev, meta.netns_ino), (dev, ino));
        assert_eq!(meta.netns, d.netns().display().to_string());
        match owner.id.as_str() {
            "c1" => {
                assert_eq!(meta.pod_namespace, "kube-system");
                assert_eq!(meta.pod_name, "coredns-5d78c9869d-abcde");
                assert_eq!(meta.pod_infra_container_id, "c1");
                assert_eq!(
                    meta.pod().as_deref(),
                    Some("kube-system/coredns-5d78c9869d-abcde")
                );
            }
            "c2" => {
                assert_eq!(meta.pod_namespace, "");
                assert_eq!(meta.pod_name, "");
            }
            other => panic!("{other}"),
        }
        // host-local's content format is unchanged where xattrs work.
        let text = std::fs::read_to_string(d.net_dir().join(ip.to_string())).unwrap();
        assert!(
            text == format!("{}\r\neth0", owner.id) || text.starts_with('{'),
            "{text:?}"
        );
        seen += 1;
    }
    assert_eq!(seen, 2);
    assert!(r.stderr.contains("not recorded"), "{}", r.stderr);
    // The netns file replaced by another (a path that now holds something
    // else): provably stale.
    drop(store);
    // (Made before the old one goes, so the inode cannot be reused.)
    let other = d.path().join("other");
    std::fs::write(&other, "").unwrap();
    std::fs::rename(&other, d.netns()).unwrap();
    let store = Store::open_existing(&d.path().join("data"), "net1")
        .unwrap()
        .unwrap();
    for (_, rec) in store.records().unwrap() {
        let why = rec.stale_reason(None).unwrap_or_default();
        assert!(why.contains("another namespace"), "{why}");
    }
}
