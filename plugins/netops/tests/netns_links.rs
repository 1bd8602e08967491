//! Root tests: each one works in its own anonymous namespace (kept alive by
//! its fd, nothing mounted), so nothing is left behind even on panic.

use std::io::Write;

use ferry_netops::{NetNs, NetopsError, NsHandle, block_on, in_netns, sysctl};

/// Loud skip when not root; under CI (env `CI` set) a skip is a failure.
fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("these tests need root and CI is set: refusing to skip");
    }
    // The real stderr: libtest captures `eprintln!` of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED: {}: needs root ***",
        std::thread::current().name().unwrap_or("?")
    );
    false
}

#[test]
fn lookup_missing_link_is_none() {
    if !root() {
        return;
    }
    let ns = NetNs::new_anonymous().unwrap();
    block_on(async {
        let h = NsHandle::new(&ns)?;
        assert_eq!(h.link_by_name("ferry-nope0").await?, None);
        assert_eq!(h.link_by_index(4242).await?, None);
        let lo = h.link_by_name("lo").await?.expect("every netns has lo");
        assert_eq!(lo.index, 1);
        assert_eq!(lo.mac_string(), "00:00:00:00:00:00");
        assert_eq!(h.link_by_index(lo.index).await?.unwrap().name, "lo");
        Ok(())
    })
    .unwrap();
}

#[test]
fn lo_up_and_down() {
    if !root() {
        return;
    }
    let ns = NetNs::new_anonymous().unwrap();
    block_on(async {
        let h = NsHandle::new(&ns)?;
        let lo = h.link_by_name("lo").await?.unwrap();
        assert!(!lo.is_up, "lo starts down in a new netns");
        h.set_up(lo.index).await?;
        assert!(h.link_by_name("lo").await?.unwrap().is_up);
        // Idempotent, as DEL and a retried ADD need.
        h.set_up(lo.index).await?;
        h.set_down(lo.index).await?;
        h.set_down(lo.index).await?;
        assert!(!h.link_by_name("lo").await?.unwrap().is_up);
        Ok(())
    })
    .unwrap();
}

#[test]
fn handle_acts_in_its_own_namespace_only() {
    if !root() {
        return;
    }
    let a = NetNs::new_anonymous().unwrap();
    let b = NetNs::new_anonymous().unwrap();
    assert!(!a.same_as(&b));
    assert!(
        NetNs::current()
            .unwrap()
            .same_as(&NetNs::current().unwrap())
    );
    block_on(async {
        let ha = NsHandle::new(&a)?;
        let hb = NsHandle::new(&b)?;
        ha.set_up(1).await?;
        assert!(ha.link_by_index(1).await?.unwrap().is_up);
        assert!(!hb.link_by_index(1).await?.unwrap().is_up);
        Ok(())
    })
    .unwrap();
    // The test thread never left its namespace.
    assert!(!NetNs::current().unwrap().same_as(&a));
}

#[test]
fn set_up_of_missing_index_names_op_and_netns() {
    if !root() {
        return;
    }
    let ns = NetNs::new_anonymous().unwrap();
    let err = block_on(async { NsHandle::new(&ns)?.set_up(4242).await }).unwrap_err();
    assert!(err.is_errno(libc::ENODEV), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("set up link #4242"), "{text}");
    assert!(text.contains(&ns.path().display().to_string()), "{text}");
    let cni = ferry_netops::to_cni(err);
    assert_eq!(cni.code.as_u32(), 999);
}

#[test]
fn open_missing_path_is_not_found() {
    let err = NetNs::open("/run/netns/ferry-test-does-not-exist").unwrap_err();
    assert!(
        matches!(&err, NetopsError::NetnsNotFound { path } if path.ends_with("ferry-test-does-not-exist")),
        "{err:?}"
    );
    assert_eq!(ferry_netops::to_cni(err).code.as_u32(), 8);
}

#[test]
fn open_regular_file_is_not_a_netns() {
    let path = std::env::temp_dir().join(format!("ferry-netops-notns-{}", std::process::id()));
    std::fs::write(&path, b"x").unwrap();
    let err = NetNs::open(&path).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(err, NetopsError::NotANetns { .. }), "{err:?}");
}

#[test]
fn open_other_namespace_type_is_not_a_netns() {
    // nsfs, but a UTS namespace: must not be mistaken for a netns.
    let err = NetNs::open("/proc/self/ns/uts").unwrap_err();
    assert!(matches!(err, NetopsError::NotANetns { .. }), "{err:?}");
}

#[test]
fn anonymous_netns_path_opens_and_vanishes_with_the_fd() {
    if !root() {
        return;
    }
    let ns = NetNs::new_anonymous().unwrap();
    let again = NetNs::open(ns.path()).unwrap();
    assert!(again.same_as(&ns));
    let path = ns.path().to_path_buf();
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
    drop(ns);
    drop(again);
    // The fd number may already be reused by a parallel test, but never for
    // this namespace: it is gone with its last fd.
    match NetNs::open(&path) {
        Err(NetopsError::NetnsNotFound { .. }) | Err(NetopsError::NotANetns { .. }) => {}
        Err(e) => panic!("unexpected {e:?}"),
        Ok(_) => {
            let now = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
            assert_ne!(now, inode, "namespace outlived its fd");
        }
    }
}

#[test]
fn sysctl_reads_inside_the_namespace() {
    if !root() {
        return;
    }
    // No assumption about any namespace's starting value (a new namespace may
    // inherit the host's, which may be 0 or 1): set one namespace to the
    // opposite of another's and see that only the one written changed.
    let flip = |v: &str| if v == "1" { "0" } else { "1" };
    let host_before = sysctl::read("net/ipv4/ip_forward").unwrap();
    let other = NetNs::new_anonymous().unwrap();
    let other_value = in_netns(&other, || sysctl::read("net/ipv4/ip_forward")).unwrap();
    let ns = NetNs::new_anonymous().unwrap();
    let want = flip(&other_value);
    in_netns(&ns, || sysctl::write("net/ipv4/ip_forward", want)).unwrap();
    let inside = in_netns(&ns, || sysctl::read("net/ipv4/ip_forward")).unwrap();
    assert_eq!(inside, want);
    assert_eq!(
        in_netns(&other, || sysctl::read("net/ipv4/ip_forward")).unwrap(),
        other_value,
        "another namespace keeps its own value"
    );
    assert_eq!(
        sysctl::read("net/ipv4/ip_forward").unwrap(),
        host_before,
        "the test's own namespace is untouched"
    );
}

#[test]
fn sysctl_keys_stay_under_proc_sys() {
    for bad in [
        "/etc/hostname",
        "../../etc/hostname",
        "net/ipv4/../../../etc/hostname",
        "net/ipv6/conf//accept_ra",
        "net/ipv6/conf/./accept_ra",
        "",
    ] {
        let e = sysctl::read(bad).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{bad:?}");
        let e = sysctl::write(bad, "1").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{bad:?}");
    }
}

/// Runs `f` on a thread and fails the test if it does not finish in 10 s
/// (a blocking open must fail the test, not hang it).
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what} did not return within 10 s"))
}

#[test]
fn open_fifo_is_not_a_netns_and_does_not_block() {
    let path = std::env::temp_dir().join(format!("ferry-netops-fifo-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    /// Removes the FIFO also when the test fails.
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(path.clone());
    let p = path.clone();
    let res = bounded("NetNs::open(FIFO)", move || NetNs::open(&p).map(|_| ()));
    assert!(matches!(res, Err(NetopsError::NotANetns { .. })), "{res:?}");
}

#[test]
fn open_device_or_directory_is_not_a_netns() {
    for path in ["/dev/null", "/dev/zero", "/", "/proc/self/ns"] {
        let p = path.to_string();
        let res = bounded(path, move || NetNs::open(&p).map(|_| ()));
        assert!(
            matches!(res, Err(NetopsError::NotANetns { .. })),
            "{path}: {res:?}"
        );
    }
}

#[test]
fn callers_own_namespace_is_recognised() {
    let own = NetNs::open("/proc/self/ns/net").unwrap();
    assert!(own.is_callers_own().unwrap());
    if !root() {
        return;
    }
    let other = NetNs::new_anonymous().unwrap();
    assert!(!other.is_callers_own().unwrap());
    assert!(!NetNs::open(other.path()).unwrap().is_callers_own().unwrap());
}

#[test]
fn in_netns_propagates_errors_and_panics() {
    if !root() {
        return;
    }
    let ns = NetNs::new_anonymous().unwrap();
    let e = in_netns(&ns, || sysctl::read("net/ipv4/no_such_key")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    let caught =
        std::panic::catch_unwind(|| in_netns(&ns, || -> std::io::Result<()> { panic!("boom") }));
    assert!(caught.is_err());
}
