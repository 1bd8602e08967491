//! The node's garbage collector: what runtimes leave behind.
//!
//! A runtime that crashes, restarts, or runs a container detached (`ctr run
//! -d`) may never send DEL, and containerd never calls CNI GC. Every pass:
//!
//! 1. Under the ferry-ipam store lock (the lock every ADD holds while it
//!    reserves), read the reservations of this node's network, the host
//!    links ferry's plugins made (owner in the alias) and ferry-portmap's
//!    nftables elements (owner in the comment). Then release the lock.
//! 2. A reservation is stale when its recorded netns no longer exists or now
//!    holds another namespace (device/inode recorded at ADD differ), it was
//!    written more than the grace period ago, and the pod's host veth is
//!    gone too (a veth pair dies with its namespace: a pod whose veth is
//!    there is alive, whatever its path looks like from ferryd's mounts).
//! 3. An orphan is a host veth on ferry's bridge (alias `ferry-bridge:`), an
//!    ifb (alias `ferry-bandwidth:`) or a hostPort element (comment `hp-<tag>
//!    <network>/<container>/<ifname>`) of this network whose attachment has
//!    no reservation, seen by consecutive passes for longer than the grace
//!    period (the kernel records no creation time; an ADD in flight makes
//!    its veth before its reservation is visible, and never takes that long).
//! 4. For each, the node conflist's DEL chain runs for that container ID and
//!    ifname, in reverse plugin order with an empty CNI_NETNS and no
//!    prevResult, as a runtime's second DEL does (each plugin with a clean
//!    environment and a timeout): every plugin's own DEL
//!    removes its state (address, veth, macspoofchk chain, ifb, hostPort
//!    elements), checking ownership as it always does. The sweep itself
//!    never deletes a kernel object.
//!
//! A live pod is never touched: its netns is there with the identity ADD
//! recorded, so it is not stale, and it has a reservation, so none of its
//! objects is an orphan. Links and elements whose owner ferry cannot name
//! (no alias, another role's alias, a digest-form owner) are left alone.

use crate::metrics::Metrics;
use ferry_cni::config::NetConfList;
use ferry_cni::delegate::find_plugin;
use ferry_cni::skel::{CmdArgs, Command};
use ferry_cni::{CniArgs, CniError};
use ferry_ipam::record::{Meta, Record};
use ferry_ipam::store::Store as IpamStore;
use ferry_netops::nft::{self, NftFamily};
use ferry_netops::{Link, LinkOwner, NsHandle, block_on};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use tracing::{info, warn};

/// ferry-ipam's dataDir when the conflist names none.
pub const DEFAULT_IPAM_DATA_DIR: &str = "/var/lib/cni/networks";
/// ferry-portmap's table (`inet ferry`) and the prefix of its sets and maps.
const PORTMAP_TABLE: &str = "ferry";
const PORTMAP_PREFIX: &str = "hostports-";
/// The most of a conflist the sweep reads.
const MAX_CONFLIST: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct GcOptions {
    /// The conflist ferryd writes: its DEL chain, network, bridge and store.
    pub conflist: PathBuf,
    /// CNI_PATH for the DEL chain's plugins.
    pub cni_bin_dir: PathBuf,
    pub grace: Duration,
    /// Log what would be released, change nothing.
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("read the conflist {path}: {why}")]
    Conflist { path: PathBuf, why: String },
    #[error("ferry-ipam store {dir}/{network}: {source}")]
    Store {
        dir: PathBuf,
        network: String,
        source: ferry_ipam::error::IpamError,
    },
    #[error(transparent)]
    Netops(#[from] ferry_netops::NetopsError),
}

/// What kind of leftover a release was for (the `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A reservation whose namespace is gone.
    Reservation,
    /// Orphans no reservation explains.
    Veth,
    Ifb,
    Nft,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Reservation => "reservation",
            Kind::Veth => "veth",
            Kind::Ifb => "ifb",
            Kind::Nft => "nft",
        }
    }
}

/// An attachment: (container ID, ifname).
type Attachment = (String, String);

/// What one pass found and did.
#[derive(Debug, Default, Clone)]
pub struct PassReport {
    pub reservations: usize,
    /// Attachments whose DEL chain ran (or would have, in dry-run), by kind.
    pub released: Vec<(Kind, String, String)>,
    pub errors: usize,
    /// Orphans seen but still inside the grace period.
    pub waiting: usize,
}

/// The node conflist, as far as the sweep needs it.
struct NodeConf {
    list: NetConfList,
    network: String,
    bridge: Option<String>,
    data_dir: PathBuf,
}

fn read_conflist(path: &Path) -> Result<Option<NodeConf>, GcError> {
    let err = |why: String| GcError::Conflist {
        path: path.to_path_buf(),
        why,
    };
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    };
    let meta = f.metadata().map_err(|e| err(e.to_string()))?;
    if !meta.file_type().is_file() || meta.len() > MAX_CONFLIST {
        return Err(err("not a regular file of at most 1 MiB".into()));
    }
    let mut bytes = Vec::new();
    f.take(MAX_CONFLIST)
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    let list = NetConfList::parse(&bytes).map_err(|e| err(e.to_string()))?;
    let network = list.name.clone();
    let mut bridge = None;
    let mut data_dir = None;
    for p in &list.plugins {
        if let Some(ipam) = p.get("ipam")
            && ipam.get("type").and_then(Value::as_str) == Some("ferry-ipam")
        {
            data_dir = Some(
                ipam.get("dataDir")
                    .and_then(Value::as_str)
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_IPAM_DATA_DIR)),
            );
            bridge = p.get("bridge").and_then(Value::as_str).map(str::to_string);
        }
    }
    let Some(data_dir) = data_dir else {
        return Err(err("no plugin delegates to ferry-ipam".into()));
    };
    Ok(Some(NodeConf {
        list,
        network,
        bridge,
        data_dir,
    }))
}

/// `<role>:<network>/<ifname>/<container ID>` (a ferry link alias) for this
/// network: the attachment, when the parts are valid names.
fn owner_from_alias(alias: &str, role: &str, network: &str) -> Option<Attachment> {
    let rest = alias.strip_prefix(role)?.strip_prefix(':')?;
    let rest = rest.strip_prefix(network)?.strip_prefix('/')?;
    let (ifname, id) = rest.split_once('/')?;
    valid_attachment(id, ifname)
}

/// `hp-<hash> <network>/<container ID>/<ifname>` (ferry-portmap's element
/// comment) for this network.
fn owner_from_comment(comment: &str, network: &str) -> Option<Attachment> {
    let (tag, owner) = comment.split_once(' ')?;
    tag.strip_prefix("hp-")?;
    let rest = owner.strip_prefix(network)?.strip_prefix('/')?;
    let (id, ifname) = rest.split_once('/')?;
    valid_attachment(id, ifname)
}

fn valid_attachment(id: &str, ifname: &str) -> Option<Attachment> {
    (ferry_cni::args::is_valid_container_id(id) && ferry_cni::args::is_valid_ifname(ifname))
        .then(|| (id.to_string(), ifname.to_string()))
}

/// A stale reservation: its attachment, pod, and why.
struct Stale {
    attachment: Attachment,
    meta: Meta,
    why: String,
}

/// What the sweep saw under the store lock.
struct Snapshot {
    held: BTreeSet<Attachment>,
    /// Host-local's id-only records hold every ifname of the container.
    held_ids: BTreeSet<String>,
    stale: Vec<Stale>,
    reservations: usize,
    orphans: BTreeMap<(Kind, Attachment), ()>,
}

pub struct Sweeper {
    opts: GcOptions,
    metrics: Metrics,
    /// When each orphan was first seen by a pass (dropped once not seen).
    first_seen: HashMap<(Kind, Attachment), Instant>,
}

impl Sweeper {
    pub fn new(opts: GcOptions, metrics: Metrics) -> Sweeper {
        Sweeper {
            opts,
            metrics,
            first_seen: HashMap::new(),
        }
    }

    /// One pass (blocking: run it off the async runtime).
    pub fn pass(&mut self) -> Result<PassReport, GcError> {
        let Some(conf) = read_conflist(&self.opts.conflist)? else {
            return Ok(PassReport::default());
        };
        let snap = self.snapshot(&conf)?;
        let mut report = PassReport {
            reservations: snap.reservations,
            ..Default::default()
        };
        let now = Instant::now();
        self.first_seen.retain(|k, _| snap.orphans.contains_key(k));
        let mut todo: Vec<(Kind, Attachment, Option<Meta>, String)> = snap
            .stale
            .into_iter()
            .map(|s| (Kind::Reservation, s.attachment, Some(s.meta), s.why))
            .collect();
        let mut queued: BTreeSet<Attachment> = todo.iter().map(|t| t.1.clone()).collect();
        for (kind, att) in snap.orphans.into_keys() {
            let seen = *self.first_seen.entry((kind, att.clone())).or_insert(now);
            if now.duration_since(seen) < self.opts.grace {
                report.waiting += 1;
                continue;
            }
            if queued.insert(att.clone()) {
                let why = format!("{} without a reservation", kind.as_str());
                todo.push((kind, att, None, why));
            }
        }
        for (kind, (id, ifname), meta, why) in todo {
            let pod = meta.as_ref().and_then(Meta::pod).unwrap_or_default();
            if self.opts.dry_run {
                info!(kind = kind.as_str(), container = %id, ifname = %ifname, pod = %pod, %why, "gc (dry run): would release");
                report.released.push((kind, id, ifname));
                continue;
            }
            match self.del_chain(&conf, &id, &ifname, meta.as_ref()) {
                Ok(()) => {
                    // Counted before the log line: whoever reads the line sees the count.
                    self.metrics.gc_released(kind.as_str());
                    info!(kind = kind.as_str(), container = %id, ifname = %ifname, pod = %pod, %why, "gc: released");
                    self.first_seen
                        .retain(|(_, a), _| *a != (id.clone(), ifname.clone()));
                    report.released.push((kind, id, ifname));
                }
                Err(e) => {
                    warn!(kind = kind.as_str(), container = %id, ifname = %ifname, pod = %pod, "gc: DEL failed (retried next pass): {e}");
                    self.metrics.gc_error();
                    report.errors += 1;
                }
            }
        }
        Ok(report)
    }

    /// Reads the store, links and elements while holding the store lock, so
    /// an ADD is either wholly before (its reservation is seen) or after.
    fn snapshot(&self, conf: &NodeConf) -> Result<Snapshot, GcError> {
        let store_err = |source| GcError::Store {
            dir: conf.data_dir.clone(),
            network: conf.network.clone(),
            source,
        };
        let mut snap = Snapshot {
            held: BTreeSet::new(),
            held_ids: BTreeSet::new(),
            stale: Vec::new(),
            reservations: 0,
            orphans: BTreeMap::new(),
        };
        let store = IpamStore::open_existing(&conf.data_dir, &conf.network).map_err(store_err)?;
        let links = block_on(async {
            let host = NsHandle::host()?;
            host.links().await
        })?;
        // The host ends of pod veths, by alias: a pod whose veth is there
        // has a live namespace (the pair dies with it), however its netns
        // path looks from here (a ferryd that does not see the runtime's
        // mounts or PIDs must never take every pod for dead).
        let veth_aliases: BTreeSet<&str> = links
            .iter()
            .filter(|l| l.kind.as_deref() == Some("veth"))
            .filter_map(|l| l.alias.as_deref())
            .collect();
        let veth_alive = |(id, ifname): &Attachment| {
            veth_aliases.contains(LinkOwner::new("ferry-bridge", &conf.network, id, ifname).alias())
        };
        let now = SystemTime::now();
        if let Some(store) = &store {
            let mut stale: BTreeMap<Attachment, Stale> = BTreeMap::new();
            for (ip, rec) in store.records().map_err(store_err)? {
                snap.reservations += 1;
                let Record::Held { owner, meta } = rec else {
                    continue;
                };
                let Some(ifname) = owner.ifname.clone() else {
                    snap.held_ids.insert(owner.id.clone());
                    continue;
                };
                let att = (owner.id.clone(), ifname);
                let why = meta.as_ref().and_then(Meta::netns_gone);
                let old = store
                    .record_written(ip)
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age >= self.opts.grace);
                match (why, meta) {
                    (Some(why), Some(meta)) if old && !veth_alive(&att) => {
                        stale.entry(att.clone()).or_insert(Stale {
                            attachment: att.clone(),
                            meta,
                            why: format!("{ip}: {why}"),
                        });
                    }
                    _ => {
                        // Any live or young address keeps the attachment.
                        snap.held.insert(att.clone());
                    }
                }
            }
            stale.retain(|att, _| !snap.held.contains(att));
            snap.stale = stale.into_values().collect();
        }
        if store.is_some() {
            self.find_orphans(conf, &links, &mut snap)?;
        } else {
            // No store at all (a new or moved dataDir): nothing proves that
            // a pod's objects have lost their reservation.
            tracing::debug!(
                "gc: no ferry-ipam store at {}/{}: orphans not looked for",
                conf.data_dir.display(),
                conf.network
            );
        }
        drop(store);
        Ok(snap)
    }

    fn find_orphans(
        &self,
        conf: &NodeConf,
        links: &[Link],
        snap: &mut Snapshot,
    ) -> Result<(), GcError> {
        let explained = |att: &Attachment, snap: &Snapshot| {
            snap.held.contains(att)
                || snap.held_ids.contains(&att.0)
                || snap.stale.iter().any(|s| s.attachment == *att)
        };
        let bridge = conf
            .bridge
            .as_deref()
            .and_then(|b| links.iter().find(|l| l.name == b))
            .map(|l| l.index);
        let mut found = Vec::new();
        for l in links {
            let Some(alias) = &l.alias else { continue };
            let kind = l.kind.as_deref();
            if kind == Some("veth") && bridge.is_some() && l.controller == bridge {
                if let Some(att) = owner_from_alias(alias, "ferry-bridge", &conf.network) {
                    found.push((Kind::Veth, att));
                }
            } else if kind == Some("ifb")
                && let Some(att) = owner_from_alias(alias, "ferry-bandwidth", &conf.network)
            {
                found.push((Kind::Ifb, att));
            }
        }
        // A node without nf_tables (or without the table) has no elements.
        if let Ok(sets) = nft::set_names(NftFamily::Inet, PORTMAP_TABLE) {
            for set in sets.iter().filter(|s| s.starts_with(PORTMAP_PREFIX)) {
                for e in nft::set_elements(NftFamily::Inet, PORTMAP_TABLE, set)? {
                    if let Some(att) = e
                        .comment
                        .as_deref()
                        .and_then(|c| owner_from_comment(c, &conf.network))
                    {
                        found.push((Kind::Nft, att));
                    }
                }
            }
        }
        for (kind, att) in found {
            if !explained(&att, snap) {
                snap.orphans.insert((kind, att), ());
            }
        }
        Ok(())
    }

    /// The conflist's DEL chain for (id, ifname), as a runtime runs it
    /// after the namespace is gone: plugins in reverse order, CNI_NETNS
    /// empty, no prevResult, no runtimeConfig; the first error stops it
    /// (libcni's behaviour; the next pass retries).
    fn del_chain(
        &self,
        conf: &NodeConf,
        id: &str,
        ifname: &str,
        meta: Option<&Meta>,
    ) -> Result<(), CniError> {
        let version = conf.list.negotiated_version()?;
        let mut raw_args = String::from("IgnoreUnknown=1");
        if let Some(m) = meta {
            for (k, v) in [
                ("K8S_POD_NAMESPACE", &m.pod_namespace),
                ("K8S_POD_NAME", &m.pod_name),
                ("K8S_POD_INFRA_CONTAINER_ID", &m.pod_infra_container_id),
            ] {
                // Recorded values were validated at ADD; ';' and '=' would
                // break CNI_ARGS itself.
                if !v.is_empty() && !v.contains([';', '=']) {
                    raw_args.push_str(&format!(";{k}={v}"));
                }
            }
        }
        let args = CmdArgs {
            command: Command::Del,
            container_id: id.to_string(),
            netns: None,
            ifname: ifname.to_string(),
            args: CniArgs::parse(&raw_args)?,
            raw_args,
            path: vec![self.opts.cni_bin_dir.clone()],
            version,
        };
        let runtime_config = Map::new();
        for i in (0..conf.list.plugins.len()).rev() {
            let plugin_type = conf.list.plugins[i]
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let stdin = conf.list.plugin_config(i, version, &runtime_config, None);
            run_del(&plugin_type, &args, &stdin)?;
        }
        Ok(())
    }
}

/// How long one plugin's DEL may take before the sweep kills it.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one plugin's DEL as libcni does (the CNI_* variables, the config on
/// stdin, an error as JSON on stdout), but with a clean environment: the
/// plugin gets PATH and the CNI variables, never ferryd's own (an etcd
/// password may be among them); and with a timeout, so a plugin that hangs
/// cannot stop the sweep.
fn run_del(plugin_type: &str, args: &CmdArgs, stdin: &Value) -> Result<(), CniError> {
    use std::io::Write;
    use std::process::Stdio;
    let bin = find_plugin(plugin_type, &args.path)?;
    let input = serde_json::to_vec(stdin)?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("CNI_COMMAND", Command::Del.as_str())
        .env("CNI_CONTAINERID", &args.container_id)
        .env("CNI_IFNAME", &args.ifname)
        .env("CNI_ARGS", &args.raw_args)
        .env("CNI_PATH", args.path_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let failed = |what: &str, e: std::io::Error| {
        CniError::io(format!("{what} plugin {}", bin.display())).with_details(e)
    };
    let mut child = cmd.spawn().map_err(|e| failed("failed to execute", e))?;
    let mut child_stdin = child.stdin.take().expect("stdin is piped");
    let mut child_stdout = child.stdout.take().expect("stdout is piped");
    // From threads, so a plugin that answers before reading, or writes
    // much, cannot deadlock the sweep.
    let writer = std::thread::spawn(move || child_stdin.write_all(&input));
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = child_stdout.read_to_end(&mut out);
        out
    });
    let deadline = Instant::now() + PLUGIN_TIMEOUT;
    let status = loop {
        match child
            .try_wait()
            .map_err(|e| failed("failed to wait for", e))?
        {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CniError::try_again_later(format!(
                    "plugin {plugin_type} did not finish DEL within {PLUGIN_TIMEOUT:?}: killed"
                )));
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let _ = writer.join();
    let stdout = reader.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    Err(CniError::from_reply(&stdout).unwrap_or_else(|| {
        CniError::new(
            ferry_cni::error::ErrorCode::Internal,
            format!("plugin {plugin_type} failed ({status})"),
        )
        .with_details(String::from_utf8_lossy(&stdout).trim())
    }))
}

/// The sweep, every `interval`, each pass on a blocking thread so HTTP and
/// the reconcile loop never wait for it.
pub async fn run(opts: GcOptions, interval: Duration, metrics: Metrics) {
    info!(
        interval = ?interval,
        grace = ?opts.grace,
        dry_run = opts.dry_run,
        cni_bin_dir = %opts.cni_bin_dir.display(),
        "gc sweep enabled"
    );
    let mut sweeper = Some(Sweeper::new(opts, metrics.clone()));
    loop {
        tokio::time::sleep(interval).await;
        let Some(mut s) = sweeper.take() else { return };
        let joined = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let r = s.pass();
            (s, r, started.elapsed())
        })
        .await;
        match joined {
            Ok((s, r, took)) => {
                match r {
                    Ok(rep) if !rep.released.is_empty() || rep.errors > 0 => info!(
                        reservations = rep.reservations,
                        released = rep.released.len(),
                        errors = rep.errors,
                        waiting = rep.waiting,
                        ?took,
                        "gc pass"
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        metrics.gc_error();
                        warn!("gc pass: {e}");
                    }
                }
                sweeper = Some(s);
            }
            Err(e) => {
                // A panic in a pass: keep serving, without the sweep.
                metrics.gc_error();
                warn!("gc pass panicked, sweep stopped: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_from_aliases_and_comments() {
        assert_eq!(
            owner_from_alias("ferry-bridge:ferry/eth0/c1", "ferry-bridge", "ferry"),
            Some(("c1".into(), "eth0".into()))
        );
        assert_eq!(
            owner_from_alias("ferry-bandwidth:ferry/eth0/c1", "ferry-bridge", "ferry"),
            None
        );
        assert_eq!(
            owner_from_alias("ferry-bridge:other/eth0/c1", "ferry-bridge", "ferry"),
            None
        );
        assert_eq!(
            owner_from_alias("ferry-bridge:sha256:ab12", "ferry-bridge", "ferry"),
            None
        );
        assert_eq!(
            owner_from_alias("ferry-bridge:ferry/eth0/../x", "ferry-bridge", "ferry"),
            None
        );
        assert_eq!(owner_from_alias("my veth", "ferry-bridge", "ferry"), None);
        assert_eq!(
            owner_from_comment("hp-0123456789abcdef ferry/c1/eth0", "ferry"),
            Some(("c1".into(), "eth0".into()))
        );
        assert_eq!(owner_from_comment("hp-01 sha256:abcd", "ferry"), None);
        assert_eq!(owner_from_comment("kube ferry/c1/eth0", "ferry"), None);
        assert_eq!(owner_from_comment("hp-01 ferry2/c1/eth0", "ferry"), None);
    }
}
