//! `ferry-bandwidth`: shapes a pod's traffic, chained after ferry-bridge.
//!
//! Traffic towards the pod leaves the host through the pod's host veth, so a
//! TBF as that veth's root qdisc limits it. Traffic from the pod *arrives*
//! on the host veth, where nothing can queue it; so the veth's ingress is
//! redirected (ingress qdisc + u32 match-all filter with a mirred egress
//! redirect) to an ifb device whose root qdisc is the second TBF. That is
//! the reference plugin's design (containernetworking/plugins
//! `plugins/meta/bandwidth`, TBF version), with its keys and arithmetic.
//!
//! The host veth is the veth among prevResult's interfaces without a
//! sandbox. The ifb's name is derived from (network, container ID, ifname),
//! so DEL finds it without the pod's namespace; the veth's own qdiscs go
//! away with the veth. The name is a 48-bit hash that two pods can share, so
//! the ifb's alias records its owner ([`ifb_owner`]): ADD never shapes
//! through, and DEL never deletes, an ifb with another owner (ADD fails with
//! code [`errors::NAME_TAKEN`] instead and undoes itself). Without any
//! bandwidth setting ADD only passes prevResult on, without touching the
//! kernel.

pub mod config;

use config::Shaping;
use ferry_cni::{CmdArgs, CniError, CniResult, NetConf, Plugin};
use ferry_netops::{
    Link, LinkOwner, NetopsError, NsHandle, Tbf, block_on, join, join_all, join3, to_cni,
};

pub struct Bandwidth;

/// The plugin's CNI error codes, all in one place. Kernel errors are mapped
/// by [`ferry_netops::to_cni`].
pub mod errors {
    use ferry_cni::{CniError, ErrorCode};

    /// prevResult names no host veth for the pod (or several).
    pub const NO_HOST_VETH: u32 = 100;
    /// CHECK: the shaping in the kernel is not what the configuration says.
    pub const CHECK_MISMATCH: u32 = 101;
    /// ADD: the ifb's name belongs to a link of another attachment (or to a
    /// link ferry did not make).
    pub const NAME_TAKEN: u32 = 102;

    pub fn invalid(msg: impl Into<String>) -> CniError {
        CniError::new(ErrorCode::InvalidConfig, msg)
    }

    pub fn unsupported(msg: impl Into<String>) -> CniError {
        CniError::new(ErrorCode::UnsupportedField, msg)
    }

    pub fn not_chained() -> CniError {
        invalid("must be called as chained plugin (no prevResult)")
    }

    pub fn no_host_veth(msg: impl Into<String>) -> CniError {
        CniError::new(ErrorCode::Plugin(NO_HOST_VETH), msg)
    }

    pub fn mismatch(msg: impl Into<String>) -> CniError {
        CniError::new(ErrorCode::Plugin(CHECK_MISMATCH), msg)
    }

    pub fn name_taken(msg: impl Into<String>) -> CniError {
        CniError::new(ErrorCode::Plugin(NAME_TAKEN), msg)
    }
}

/// The ifb of one attachment: "bwp" + 12 hex digits of FNV-1a over
/// `network \0 container ID \0 ifname` (15 characters, IFNAMSIZ - 1).
/// Stable across releases: DEL of a pod added by an older ferry needs it.
pub fn ifb_name(network: &str, container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    let bytes = network
        .bytes()
        .chain([0])
        .chain(container_id.bytes())
        .chain([0])
        .chain(ifname.bytes());
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("bwp{:012x}", h & 0xffff_ffff_ffff)
}

/// The owner recorded in the ifb's alias.
pub fn ifb_owner(network: &str, container_id: &str, ifname: &str) -> LinkOwner {
    LinkOwner::new("ferry-bandwidth", network, container_id, ifname)
}

/// The ifb of one attachment: its name and its owner.
struct Ifb {
    name: String,
    owner: LinkOwner,
}

impl Ifb {
    fn of(conf: &NetConf, args: &CmdArgs) -> Ifb {
        Ifb {
            name: ifb_name(&conf.name, &args.container_id, &args.ifname),
            owner: ifb_owner(&conf.name, &args.container_id, &args.ifname),
        }
    }

    /// The ifb, if there is one of that name and it is this attachment's;
    /// `Err` names the link that holds the name otherwise.
    async fn lookup(&self, h: &NsHandle) -> Result<Result<Option<Link>, String>, NetopsError> {
        Ok(match h.link_by_name(&self.name).await? {
            Some(l) if self.owner.owns(&l) => Ok(Some(l)),
            Some(l) => Err(format!(
                "ifb name {} is taken by {}, not this attachment's ({})",
                self.name,
                LinkOwner::describe_other(&l),
                self.owner.alias()
            )),
            None => Ok(None),
        })
    }
}

impl Plugin for Bandwidth {
    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
        let shaping = Shaping::load(conf)?;
        let prev = match &conf.prev_result {
            Some(p) => CniResult::from_json(p)?,
            None if shaping.is_none() => return Ok(CniResult::default()),
            None => return Err(errors::not_chained()),
        };
        let Some(shaping) = shaping else {
            // The hot path: nothing to shape, nothing to touch.
            return Ok(prev);
        };
        let ifb = Ifb::of(conf, args);
        block_on(async {
            let h = NsHandle::host()?;
            let veth = match host_veth(&h, &prev, conf, args).await? {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
            let outcome = shape(&h, &veth, &ifb, &shaping).await;
            if !matches!(outcome, Ok(Ok(()))) {
                undo(&h, &veth, &ifb, &shaping).await;
            }
            outcome
        })
        .map_err(to_cni)??;
        Ok(prev)
    }

    fn del(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        // Always, whatever the configuration says now: an ifb left behind
        // would outlive the pod. The veth's qdiscs go with the veth. An ifb
        // of that name with another owner is another pod's: left alone.
        let ifb = Ifb::of(conf, args);
        block_on(async {
            let h = NsHandle::host()?;
            match ifb.lookup(&h).await? {
                Ok(Some(l)) => h.delete_link(l.index).await.map(drop),
                Ok(None) => Ok(()),
                Err(other) => {
                    eprintln!("ferry-bandwidth: DEL: {other}; left alone");
                    Ok(())
                }
            }
        })
        .map_err(to_cni)
    }

    fn check(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let Some(shaping) = Shaping::load(conf)? else {
            return Ok(());
        };
        let Some(prev) = &conf.prev_result else {
            return Err(errors::not_chained());
        };
        let prev = CniResult::from_json(prev)?;
        let ifb = Ifb::of(conf, args);
        block_on(async {
            let h = NsHandle::host()?;
            let veth = match host_veth(&h, &prev, conf, args).await? {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
            check(&h, &veth, &ifb, &shaping).await
        })
        .map_err(to_cni)?
    }
}

/// The pod's host veth: among prevResult's interfaces without a sandbox
/// (ferry-bridge lists the bridge there too), the one that is a veth. One
/// that ferry-bridge made for another attachment (its owner alias says so;
/// a stale or wrong prevResult) is refused, never shaped.
async fn host_veth(
    h: &NsHandle,
    prev: &CniResult,
    conf: &NetConf,
    args: &CmdArgs,
) -> Result<Result<Link, CniError>, NetopsError> {
    let names: Vec<&str> = prev
        .interfaces
        .iter()
        .filter(|i| i.sandbox.is_empty())
        // prevResult is another plugin's output: a name the kernel could not
        // have given a link names none.
        .filter(|i| ferry_cni::args::is_valid_ifname(&i.name))
        .map(|i| i.name.as_str())
        .collect();
    let links = join_all(names.iter().map(|n| h.link_by_name(n))).await;
    let mut veths = Vec::new();
    for link in links {
        if let Some(l) = link?
            && l.kind.as_deref() == Some("veth")
        {
            veths.push(l);
        }
    }
    Ok(match veths.len() {
        1 => {
            let veth = veths.remove(0);
            // ferry-bridge's `veth_owner`.
            let bridge_owner =
                LinkOwner::new("ferry-bridge", &conf.name, &args.container_id, &args.ifname);
            match &veth.alias {
                Some(a) if a.starts_with("ferry-bridge:") && !bridge_owner.owns(&veth) => {
                    Err(errors::no_host_veth(format!(
                        "host veth {} belongs to another attachment, not {:?}",
                        LinkOwner::describe_other(&veth),
                        bridge_owner.alias()
                    )))
                }
                _ => Ok(veth),
            }
        }
        0 => Err(errors::no_host_veth(format!(
            "no host veth among prevResult's host interfaces {names:?}"
        ))),
        _ => Err(errors::no_host_veth(format!(
            "several veths among prevResult's host interfaces {names:?}: cannot tell the pod's"
        ))),
    })
}

/// Programs the shaping: four round trips for both directions (the
/// requests of one step go out together on the one socket). The inner
/// `Err`: the ifb's name is another attachment's.
async fn shape(
    h: &NsHandle,
    veth: &Link,
    ifb: &Ifb,
    s: &Shaping,
) -> Result<Result<(), CniError>, NetopsError> {
    let ingress = async {
        match &s.ingress {
            Some(t) => h.set_root_tbf(veth.index, t).await,
            None => Ok(()),
        }
    };
    let Some(egress) = &s.egress else {
        return ingress.await.map(Ok);
    };
    let ingress_qdisc = async {
        match h.add_ingress_qdisc(veth.index).await {
            // Left by an interrupted ADD: start over, filters included.
            Err(e) if e.is_errno(libc::EEXIST) => {
                h.delete_ingress_qdisc(veth.index).await?;
                h.add_ingress_qdisc(veth.index).await
            }
            other => other,
        }
    };
    let (r1, r2, r3) = join3(
        ingress,
        ingress_qdisc,
        h.ensure_owned_ifb(&ifb.name, veth.mtu, &ifb.owner),
    )
    .await;
    r1?;
    r2?;
    let ifb_link = match r3? {
        Ok(l) => l,
        // Not this attachment's (nor left by an interrupted ADD of it):
        // never reused.
        Err(other) => {
            return Ok(Err(errors::name_taken(format!(
                "ifb name {} is taken by {}; this attachment is {:?}: refusing to delete or reuse it",
                ifb.name,
                LinkOwner::describe_other(&other),
                ifb.owner.alias()
            ))));
        }
    };
    let (r1, r2) = join(
        h.set_root_tbf(ifb_link.index, egress),
        h.redirect_ingress(veth.index, ifb_link.index),
    )
    .await;
    r1?;
    r2.map(Ok)
}

/// Best effort after a failed ADD: what [`shape`] may have created (the
/// ifb only when it is this attachment's).
async fn undo(h: &NsHandle, veth: &Link, ifb: &Ifb, s: &Shaping) {
    if s.egress.is_some() {
        let _ = h.delete_ingress_qdisc(veth.index).await;
        if let Ok(Ok(Some(l))) = ifb.lookup(h).await {
            let _ = h.delete_link(l.index).await;
        }
    }
    if s.ingress.is_some() {
        let _ = h.delete_root_qdisc(veth.index).await;
    }
}

/// CHECK: every object ADD creates, with the rate and bucket asked for.
async fn check(
    h: &NsHandle,
    veth: &Link,
    ifb: &Ifb,
    s: &Shaping,
) -> Result<Result<(), CniError>, NetopsError> {
    if let Some(want) = &s.ingress {
        let root = h.root_qdisc(veth.index).await?;
        if let Err(e) = compare_tbf(&veth.name, root, want) {
            return Ok(Err(e));
        }
    }
    if let Some(want) = &s.egress {
        let ifb_link = match ifb.lookup(h).await? {
            Ok(Some(l)) => l,
            Ok(None) => {
                return Ok(Err(errors::mismatch(format!(
                    "ifb {} for {}'s egress shaping not found",
                    ifb.name, veth.name
                ))));
            }
            Err(other) => return Ok(Err(errors::mismatch(other))),
        };
        let ifb = ifb.name.as_str();
        let (root, ingress, redirects) = join3(
            h.root_qdisc(ifb_link.index),
            h.ingress_qdisc(veth.index),
            h.ingress_redirects(veth.index),
        )
        .await;
        if let Err(e) = compare_tbf(ifb, root?, want) {
            return Ok(Err(e));
        }
        if ingress?.is_none_or(|q| q.kind != "ingress") {
            return Ok(Err(errors::mismatch(format!(
                "{} has no ingress qdisc (egress shaping through {ifb})",
                veth.name
            ))));
        }
        if !redirects?.contains(&ifb_link.index) {
            return Ok(Err(errors::mismatch(format!(
                "{}'s ingress is not redirected to {ifb}",
                veth.name
            ))));
        }
    }
    Ok(Ok(()))
}

fn compare_tbf(dev: &str, got: Option<ferry_netops::Qdisc>, want: &Tbf) -> Result<(), CniError> {
    let Some(q) = got else {
        return Err(errors::mismatch(format!(
            "{dev} has no root qdisc (want tbf)"
        )));
    };
    let Some(t) = q.tbf.filter(|_| q.kind == "tbf") else {
        return Err(errors::mismatch(format!(
            "{dev}'s root qdisc is {}, want tbf",
            q.kind
        )));
    };
    if t.rate != want.rate {
        return Err(errors::mismatch(format!(
            "{dev}: tbf rate {} bytes/s, want {}",
            t.rate, want.rate
        )));
    }
    if t.buffer != want.kernel_buffer_ticks() {
        return Err(errors::mismatch(format!(
            "{dev}: tbf buffer {} ticks, want {} ({} bytes of burst)",
            t.buffer,
            want.kernel_buffer_ticks(),
            want.burst
        )));
    }
    if t.limit != want.limit {
        return Err(errors::mismatch(format!(
            "{dev}: tbf limit {} bytes, want {}",
            t.limit, want.limit
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifb_names_fit_and_differ() {
        let a = ifb_name("net", "c1", "eth0");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("bwp"));
        assert_ne!(a, ifb_name("net", "c1", "eth1"));
        assert_ne!(a, ifb_name("net", "c2", "eth0"));
        assert_ne!(a, ifb_name("ne", "tc1", "eth0"));
        // Pinned: DEL must find ifbs made by earlier releases.
        assert_eq!(a, ifb_name("net", "c1", "eth0"));
    }
}
