//! The daemon's Prometheus metrics and the readiness it reports.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Buckets of the CNI call histogram, in seconds: 1 ms to 30 s.
const CNI_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

type CniLabels = Vec<(String, String)>;

/// Reads the CNI call log incrementally: each [`CniLogTail::poll`] counts
/// the lines appended since the last one, following a rotation (the rest of
/// the old file is read from `<log>.1` first). Reads at most
/// [`CniLogTail::MAX_PER_POLL`] bytes per call.
#[derive(Debug)]
pub struct CniLogTail {
    path: std::path::PathBuf,
    /// Inode and offset of what has been read so far.
    at: Option<(u64, u64)>,
}

impl CniLogTail {
    pub const MAX_PER_POLL: u64 = 8 << 20;

    pub fn new(path: impl Into<std::path::PathBuf>) -> CniLogTail {
        CniLogTail {
            path: path.into(),
            at: None,
        }
    }

    /// Counts new lines into `m`; returns how many were counted.
    pub fn poll(&mut self, m: &Metrics) -> usize {
        use std::os::unix::fs::MetadataExt;
        let Some(current) = regular_meta(&self.path) else {
            return 0;
        };
        let mut counted = 0;
        let mut budget = Self::MAX_PER_POLL;
        let mut offset = match self.at {
            Some((ino, off)) if ino == current.ino() && off <= current.len() => off,
            Some((ino, off)) => {
                // Rotated since the last poll: finish the old file first.
                let rotated = ferry_cni::calllog::rotated_path(&self.path);
                if regular_meta(&rotated).is_some_and(|r| r.ino() == ino) {
                    let (n, _) = read_lines_from(&rotated, off, &mut budget, m);
                    counted += n;
                }
                0
            }
            None => 0,
        };
        let (n, end) = read_lines_from(&self.path, offset, &mut budget, m);
        counted += n;
        offset = end;
        self.at = Some((current.ino(), offset));
        counted
    }
}

fn regular_meta(path: &std::path::Path) -> Option<std::fs::Metadata> {
    std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_file())
}

/// Counts the complete lines of `path` from `offset`; returns the count and
/// the offset after the last complete line.
fn read_lines_from(
    path: &std::path::Path,
    offset: u64,
    budget: &mut u64,
    m: &Metrics,
) -> (usize, u64) {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    else {
        return (0, offset);
    };
    if !f.metadata().is_ok_and(|md| md.file_type().is_file())
        || f.seek(SeekFrom::Start(offset)).is_err()
    {
        return (0, offset);
    }
    let mut bytes = Vec::new();
    if (&mut f).take(*budget).read_to_end(&mut bytes).is_err() {
        return (0, offset);
    }
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    *budget -= complete as u64;
    let mut n = 0;
    for line in bytes[..complete].split(|&b| b == b'\n') {
        if let Ok(e) = serde_json::from_slice::<ferry_cni::calllog::Entry>(line) {
            m.cni_call(&e);
            n += 1;
        }
    }
    (n, offset + complete as u64)
}

/// The most skipped peers /readyz lists one by one.
pub const MAX_SKIPPED_LINES: usize = 100;

/// Shared between the daemon loop (which updates it) and the HTTP server
/// (which reads it). Cheap to clone.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    registry: Registry,
    pub lease_held: Gauge,
    pub peers: Gauge,
    pub peers_programmed: Gauge,
    pub reconciles: Counter,
    pub repairs: Counter,
    pub entries_changed: Counter,
    pub etcd_errors: Counter,
    pub lease_acquisitions: Counter,
    pub peer_conflicts: Gauge,
    pub invalid_leases: Gauge,
    /// The gc sweep's releases by kind, and its failures.
    pub gc_released: Family<Vec<(String, String)>, Counter>,
    pub gc_errors: Counter,
    /// CNI calls from the call log: duration per plugin and verb, errors
    /// per plugin, verb and code.
    cni_calls: Family<CniLabels, Histogram, fn() -> Histogram>,
    cni_errors: Family<CniLabels, Counter>,
    ready: AtomicBool,
    /// Peers left out of the kernel, one line each, for /readyz.
    skipped: Mutex<Vec<String>>,
    /// When the lease was last granted or renewed, for how long, and why
    /// the renewals since have failed.
    lease: Mutex<Option<LeaseRenewal>>,
}

struct LeaseRenewal {
    subnet: String,
    at: Instant,
    ttl: Duration,
    last_error: Option<String>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ferry");
        let lease_held = Gauge::default();
        let peers = Gauge::default();
        let peers_programmed = Gauge::default();
        let reconciles = Counter::default();
        let repairs = Counter::default();
        let entries_changed = Counter::default();
        let etcd_errors = Counter::default();
        let lease_acquisitions = Counter::default();
        let peer_conflicts = Gauge::default();
        let invalid_leases = Gauge::default();
        let gc_released = Family::<Vec<(String, String)>, Counter>::default();
        let gc_errors = Counter::default();
        registry.register(
            "gc_released",
            "Leftovers of pods whose runtime sent no DEL, released by the gc sweep (one DEL chain each), by kind: reservation (its netns is gone), veth, ifb, nft (orphans no reservation explains)",
            gc_released.clone(),
        );
        registry.register(
            "gc_errors",
            "gc sweep passes or DEL chains that failed (retried by the next pass)",
            gc_errors.clone(),
        );
        registry.register(
            "lease_held",
            "1 while this node holds its subnet lease in etcd",
            lease_held.clone(),
        );
        registry.register(
            "peers",
            "Other nodes' leases known from etcd",
            peers.clone(),
        );
        registry.register(
            "peers_programmed",
            "Other nodes whose overlay entries are in the kernel",
            peers_programmed.clone(),
        );
        registry.register("reconciles", "Reconcile passes run", reconciles.clone());
        registry.register(
            "reconcile_repairs",
            "Kernel entries put back or removed because the kernel drifted (not because a lease changed)",
            repairs.clone(),
        );
        registry.register(
            "entries_changed",
            "Kernel entries added or removed by reconcile passes, for any reason",
            entries_changed.clone(),
        );
        registry.register("etcd_errors", "Failed etcd operations", etcd_errors.clone());
        registry.register(
            "lease_acquisitions",
            "Times the node (re)acquired its subnet lease",
            lease_acquisitions.clone(),
        );
        registry.register(
            "peer_conflicts",
            "Peers skipped because their route would collide with a route or address that is not ferry's (a gauge: the peers skipped by the last pass)",
            peer_conflicts.clone(),
        );
        registry.register(
            "invalid_leases",
            "Other nodes' leases skipped because their values are invalid (a gauge: the leases skipped by the last pass)",
            invalid_leases.clone(),
        );
        let cni_calls: Family<CniLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(CNI_BUCKETS));
        let cni_errors = Family::<CniLabels, Counter>::default();
        registry.register(
            "cni_call_duration_seconds",
            "Duration of CNI plugin calls on this node, per plugin and verb (from the CNI call log)",
            cni_calls.clone(),
        );
        registry.register(
            "cni_call_errors",
            "Failed CNI plugin calls on this node, per plugin, verb and CNI error code (from the CNI call log)",
            cni_errors.clone(),
        );
        Metrics(Arc::new(Inner {
            registry,
            cni_calls,
            cni_errors,
            lease_held,
            peers,
            peers_programmed,
            reconciles,
            repairs,
            entries_changed,
            etcd_errors,
            lease_acquisitions,
            peer_conflicts,
            invalid_leases,
            gc_released,
            gc_errors,
            ready: AtomicBool::new(false),
            skipped: Mutex::new(Vec::new()),
            lease: Mutex::new(None),
        }))
    }

    pub fn set_lease_held(&self, held: bool) {
        self.0.lease_held.set(i64::from(held));
    }
    pub fn set_peers(&self, known: usize, programmed: usize) {
        self.0.peers.set(known as i64);
        self.0.peers_programmed.set(programmed as i64);
    }
    pub fn set_known_peers(&self, known: usize) {
        self.0.peers.set(known as i64);
    }
    pub fn reconciled(&self, changed: usize, drift: bool) {
        self.0.reconciles.inc();
        self.0.entries_changed.inc_by(changed as u64);
        if drift {
            self.0.repairs.inc_by(changed as u64);
        }
    }
    /// A drift repair outside the kernel (a rewritten conflist).
    pub fn repaired(&self, changed: usize) {
        self.0.entries_changed.inc_by(changed as u64);
        self.0.repairs.inc_by(changed as u64);
    }
    /// One attachment released by the gc sweep.
    pub fn gc_released(&self, kind: &str) {
        self.0
            .gc_released
            .get_or_create(&vec![("kind".to_string(), kind.to_string())])
            .inc();
    }
    pub fn gc_error(&self) {
        self.0.gc_errors.inc();
    }
    pub fn etcd_error(&self) {
        self.0.etcd_errors.inc();
    }
    pub fn lease_acquired(&self) {
        self.0.lease_acquisitions.inc();
    }
    /// The peers the last pass skipped: conflicting and invalid counts, and
    /// one line per peer for /readyz (at most [`MAX_SKIPPED_LINES`], then a
    /// count: forged leases must not make /readyz answers huge).
    pub fn set_skipped(&self, conflicts: usize, invalid: usize, mut lines: Vec<String>) {
        self.0.peer_conflicts.set(conflicts as i64);
        self.0.invalid_leases.set(invalid as i64);
        if lines.len() > MAX_SKIPPED_LINES {
            let more = lines.len() - MAX_SKIPPED_LINES;
            lines.truncate(MAX_SKIPPED_LINES);
            lines.push(format!("… and {more} more skipped peers (see the log)"));
        }
        *self.0.skipped.lock().unwrap_or_else(|e| e.into_inner()) = lines;
    }
    /// One line per peer the last pass skipped (conflict or invalid lease).
    pub fn skipped(&self) -> Vec<String> {
        self.0
            .skipped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    /// Ready: the lease is held and every known peer is programmed, the
    /// skipped ones (conflicts, invalid leases) excepted.
    pub fn set_ready(&self, ready: bool) {
        self.0.ready.store(ready, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Relaxed)
    }

    fn lease(&self) -> std::sync::MutexGuard<'_, Option<LeaseRenewal>> {
        self.0.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// etcd granted or renewed the lease of `subnet` just now, for `ttl`.
    pub fn lease_renewed(&self, subnet: impl ToString, ttl: Duration) {
        *self.lease() = Some(LeaseRenewal {
            subnet: subnet.to_string(),
            at: Instant::now(),
            ttl,
            last_error: None,
        });
    }

    /// A renewal (or re-acquisition) of the lease failed with `why`.
    pub fn lease_renewal_failed(&self, why: impl ToString) {
        if let Some(l) = self.lease().as_mut() {
            l.last_error = Some(why.to_string());
        }
    }

    /// Why the node is not ready because of its lease: it has not been
    /// renewed within its TTL, so etcd has (or soon will have) let it expire
    /// and other nodes may drop this node's routes. `None` while it is fresh.
    pub fn lease_overdue(&self) -> Option<String> {
        let lease = self.lease();
        let l = lease.as_ref()?;
        let age = l.at.elapsed();
        (age > l.ttl).then(|| {
            format!(
                "the lease of {} was last renewed {}s ago, longer than its TTL of {}s{}",
                l.subnet,
                age.as_secs(),
                l.ttl.as_secs(),
                l.last_error
                    .as_ref()
                    .map(|e| format!("; last renewal error: {e}"))
                    .unwrap_or_default()
            )
        })
    }

    /// Counts one CNI call read from the call log. Labels come from a file
    /// any plugin writes: only known verbs and plugin names of ferry's
    /// shape are kept as they are, the rest is "other", so a forged log
    /// cannot grow the label set without bound.
    pub fn cni_call(&self, e: &ferry_cni::calllog::Entry) {
        let plugin = if e.plugin.len() <= 32
            && e.plugin.starts_with("ferry-")
            && e.plugin
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'-')
        {
            e.plugin.clone()
        } else {
            "other".into()
        };
        let verb = match e.verb.as_str() {
            v @ ("ADD" | "DEL" | "CHECK" | "GC" | "STATUS") => v.to_string(),
            _ => "other".into(),
        };
        let mut labels = vec![("plugin".to_string(), plugin), ("verb".to_string(), verb)];
        self.0
            .cni_calls
            .get_or_create(&labels)
            .observe((e.ms / 1000.0).max(0.0));
        if let Some(code) = e.code.filter(|_| !e.is_ok()) {
            // Codes outside the spec's table and ferry's 100..=199 are "other".
            let code = if code < 200 || code == 999 {
                code.to_string()
            } else {
                "other".into()
            };
            labels.push(("code".to_string(), code));
            self.0.cni_errors.get_or_create(&labels).inc();
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.0.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_recorded() {
        let m = Metrics::new();
        m.set_lease_held(true);
        m.set_peers(5, 4);
        m.reconciled(3, false);
        m.reconciled(2, true);
        m.etcd_error();
        m.set_skipped(1, 2, vec!["peer 10.244.9.0/24 skipped".into()]);
        let text = m.render();
        for want in [
            "ferry_lease_held 1",
            "ferry_peers 5",
            "ferry_peers_programmed 4",
            "ferry_reconciles_total 2",
            "ferry_entries_changed_total 5",
            "ferry_reconcile_repairs_total 2",
            "ferry_etcd_errors_total 1",
            "ferry_peer_conflicts 1",
            "ferry_invalid_leases 2",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
        assert!(!m.is_ready());
        assert_eq!(m.skipped(), ["peer 10.244.9.0/24 skipped"]);
        m.set_skipped(0, 250, (0..250).map(|i| format!("lease {i}")).collect());
        let lines = m.skipped();
        assert_eq!(lines.len(), MAX_SKIPPED_LINES + 1);
        assert_eq!(
            lines[MAX_SKIPPED_LINES],
            "… and 150 more skipped peers (see the log)"
        );
    }

    #[test]
    fn the_cni_log_is_counted_once_across_rotations() {
        use ferry_cni::calllog::{Call, LogTarget, append, line};
        let dir = std::env::temp_dir().join(format!("ferryd-cnilog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let t = LogTarget {
            path: dir.join("cni.log"),
            max_bytes: 4096,
        };
        let m = Metrics::new();
        let mut tail = CniLogTail::new(&t.path);
        assert_eq!(tail.poll(&m), 0, "no log yet");
        let call = |verb: &'static str| Call {
            plugin: "ferry-bridge",
            verb,
            container: "c1",
            ifname: "eth0",
            cni_args: "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b",
        };
        let mut total = 0;
        for i in 0..60 {
            let outcome = if i % 10 == 0 { Err((7, "bad")) } else { Ok(()) };
            append(&t, &line(&call("ADD"), Duration::from_millis(3), outcome)).unwrap();
            if i % 7 == 0 {
                total += tail.poll(&m);
            }
        }
        total += tail.poll(&m);
        assert_eq!(total, 60, "each line once, across rotations");
        assert!(std::fs::metadata(t.rotated()).is_ok(), "the test rotated");
        let text = m.render();
        assert!(
            text.contains(
                r#"ferry_cni_call_duration_seconds_count{plugin="ferry-bridge",verb="ADD"} 60"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"ferry_cni_call_errors_total{plugin="ferry-bridge",verb="ADD",code="7"} 6"#
            ),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_lease_is_overdue_after_its_ttl_with_the_reason() {
        let m = Metrics::new();
        assert_eq!(m.lease_overdue(), None, "no lease yet: nothing overdue");
        m.lease_renewed("10.244.1.0/24", Duration::from_millis(50));
        assert_eq!(m.lease_overdue(), None);
        m.lease_renewal_failed("etcd at http://x: no answer");
        std::thread::sleep(Duration::from_millis(80));
        let why = m.lease_overdue().expect("overdue after the TTL");
        assert!(why.contains("10.244.1.0/24"), "{why}");
        assert!(why.contains("no answer"), "{why}");
        m.lease_renewed("10.244.1.0/24", Duration::from_secs(60));
        assert_eq!(m.lease_overdue(), None, "renewed: fresh again");
    }
}
