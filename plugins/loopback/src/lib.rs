//! The loopback plugin: `lo` up on ADD, checked on CHECK, down on DEL.
//!
//! Behaves like the reference `loopback` plugin (containernetworking/plugins
//! `plugins/main/loopback`): the result names `lo` with an all-zero MAC and
//! the loopback addresses, a chained `prevResult` is passed through
//! unchanged, and DEL succeeds when the namespace is already gone. Unlike the
//! reference, an unusable CNI_NETNS on ADD/CHECK is the spec's code 8.

use ferry_cni::skel::plugin_error;
use ferry_cni::{CmdArgs, CniError, CniResult, Interface, IpConfig, NetConf, Plugin};
use ferry_netops::{NetNs, NetopsError, NsHandle, block_on, sysctl, to_cni};
use std::io;
use std::path::Path;

/// CHECK found `lo` missing or down.
pub const ERR_LO_DOWN: u32 = 100;

pub struct Loopback;

impl Plugin for Loopback {
    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
        let ns = open_netns(args)?;
        let ipv6 = block_on(async {
            // One thread in the pod namespace makes the socket and reads the
            // sysctl; `lo` is always ifindex 1 (the kernel's LOOPBACK_IFINDEX),
            // so no lookup is needed.
            let (h, ipv6) = NsHandle::new_with(&ns, ipv6_enabled_here)?;
            h.set_up(LOOPBACK_IFINDEX).await?;
            Ok(ipv6)
        })
        .map_err(to_cni)?;

        // In a chain, loopback adds nothing of its own (as the reference does).
        if let Some(prev) = &conf.prev_result {
            return CniResult::from_json(prev);
        }
        let ipv6 = ipv6.map_err(|e| {
            to_cni(NetopsError::Io {
                op: "read net/ipv6/conf/lo/disable_ipv6".into(),
                netns: ns.path().display().to_string(),
                source: e,
            })
        })?;
        let mut ips = vec![IpConfig {
            interface: Some(0),
            address: "127.0.0.1/8".parse().expect("valid literal"),
            gateway: None,
        }];
        if ipv6 {
            ips.push(IpConfig {
                interface: Some(0),
                address: "::1/128".parse().expect("valid literal"),
                gateway: None,
            });
        }
        Ok(CniResult {
            interfaces: vec![Interface {
                name: "lo".into(),
                mac: "00:00:00:00:00:00".into(),
                sandbox: ns.path().display().to_string(),
                ..Default::default()
            }],
            ips,
            ..Default::default()
        })
    }

    fn check(&self, args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        let ns = open_netns(args)?;
        let lo =
            block_on(async { NsHandle::new(&ns)?.link_by_name("lo").await }).map_err(to_cni)?;
        match lo {
            Some(lo) if lo.is_up => Ok(()),
            _ => Err(plugin_error(
                ERR_LO_DOWN,
                format!("lo is down in {}", ns.path().display()),
            )),
        }
    }

    fn del(&self, args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        // DEL must succeed when the container (and its namespace) is gone.
        let Some(path) = args.netns.as_deref() else {
            return Ok(());
        };
        let ns = match NetNs::open(path) {
            Ok(ns) => ns,
            Err(NetopsError::NetnsNotFound { .. }) => return Ok(()),
            Err(e) => return Err(to_cni(e)),
        };
        refuse_callers_own(&ns)?;
        block_on(async {
            let h = NsHandle::new(&ns)?;
            match h.link_by_name("lo").await? {
                Some(lo) => h.set_down(lo.index).await,
                None => Ok(()),
            }
        })
        .map_err(to_cni)
    }
}

/// CNI_NETNS for ADD and CHECK (the skeleton has already made sure it is set).
fn open_netns(args: &CmdArgs) -> Result<NetNs, CniError> {
    let path = args.netns.as_deref().unwrap_or(Path::new(""));
    let ns = NetNs::open(path).map_err(to_cni)?;
    refuse_callers_own(&ns)?;
    Ok(ns)
}

/// The skeleton already refused the plugin's own namespace by path; this is
/// the same check on the namespace actually opened (the path could have been
/// re-pointed in between), because taking `lo` down there is the node's `lo`.
fn refuse_callers_own(ns: &NetNs) -> Result<(), CniError> {
    if ns.is_callers_own().map_err(to_cni)? {
        return Err(CniError::invalid_env(format!(
            "CNI_NETNS {} is the plugin's own network namespace, not a container's",
            ns.path().display()
        )));
    }
    Ok(())
}

/// `lo`'s index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Whether IPv6 is on for `lo` in the calling thread's namespace (whether
/// `::1` exists): IPv6 can be disabled per namespace, or the whole
/// `net/ipv6` tree absent when the kernel runs with `ipv6.disable=1`.
fn ipv6_enabled_here() -> io::Result<bool> {
    match sysctl::read("net/ipv6/conf/lo/disable_ipv6") {
        Ok(v) => Ok(v == "0"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}
