//! ferryd's loop when things around it fail: a real ferryd in a lab node
//! (its own network namespace, a real etcd).

use ferry_tests::etcd::require_etcd;
use ferry_tests::lab::Lab;
use ferry_tests::{require_root, wait_until};
use std::time::Duration;

const VXLAN: &str =
    r#"{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan","vni":1}}"#;
const READY: Duration = Duration::from_secs(30);

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

/// The lease is lost and taken again while the conflist cannot be written
/// (its directory is a plain file, which fails even for root): ferryd keeps
/// running and writes the conflist once it can. (Before: the write error
/// right after the re-acquisition ended the daemon.)
#[test]
fn a_write_error_after_reacquiring_the_lease_is_retried() {
    if !can_run() {
        return;
    }
    let mut lab = one_node(&["--resync-interval", "1", "--lease-ttl", "3"]);
    let conf_dir = lab.conflist(0).parent().unwrap().to_path_buf();
    let aside = conf_dir.with_extension("aside");
    std::fs::rename(&conf_dir, &aside).unwrap();
    std::fs::write(&conf_dir, "not a directory").unwrap();

    // An operator removes the node's lease: the next renewal finds it lost.
    let out = lab.ferryd_cli(&["remove-node", "n1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            lab.metric(0, "ferry_lease_acquisitions_total")
                .is_some_and(|n| n >= 2.0)
        }),
        "the lease was not taken again:\n{}",
        lab.ferryd_log(0)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        lab.ferryd_running(0),
        "ferryd exited:\n{}",
        lab.ferryd_log(0)
    );

    std::fs::remove_file(&conf_dir).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || lab.conflist(0).exists()),
        "the conflist was not written once its directory was back:\n{}",
        lab.ferryd_log(0)
    );
    assert!(lab.ferryd_running(0));
    assert!(lab.wait_ready(0, Duration::from_secs(10)));
    let _ = std::fs::remove_dir_all(&aside);
}

/// etcd goes away: once the lease has gone unrenewed for longer than its
/// TTL, /readyz is 503 and says so (with the renewal error); when etcd is
/// back the lease is renewed or taken again and /readyz is 200. (Before:
/// /readyz stayed 200 while the lease expired.)
#[test]
fn readyz_reports_a_lease_not_renewed_within_its_ttl() {
    if !can_run() {
        return;
    }
    let mut lab = one_node(&["--resync-interval", "1", "--lease-ttl", "3"]);
    lab.stop_etcd();
    let mut last = None;
    let overdue = wait_until(Duration::from_secs(15), || {
        last = lab.http(0, "/readyz");
        last.as_ref()
            .is_some_and(|(code, body)| *code == 503 && body.contains("TTL"))
    });
    assert!(
        overdue,
        "/readyz did not report the overdue lease: {last:?}\n{}",
        lab.ferryd_log(0)
    );
    let (_, body) = last.unwrap();
    assert!(body.contains("last renewed"), "{body}");
    assert!(body.contains("renewal error"), "{body}");
    assert!(lab.ferryd_running(0));

    lab.start_etcd();
    assert!(
        lab.wait_ready(0, Duration::from_secs(20)),
        "not ready after etcd came back: {:?}\n{}",
        lab.http(0, "/readyz"),
        lab.ferryd_log(0)
    );
}
