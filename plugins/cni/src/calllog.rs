//! The CNI call log: one JSON line per plugin invocation, appended to a
//! bounded file on the node, so an operator (and `ferryd doctor`, and
//! ferryd's /metrics) can see every ADD/CHECK/DEL with its pod, duration and
//! result.
//!
//! The path comes from the plugin's config (`cniLog`, written by ferryd into
//! every plugin of the conflist); no key, no log. The log is the file itself
//! and one rotated generation (`<path>.1`), each at most `cniLogMaxBytes`
//! (default [`DEFAULT_MAX_BYTES`]).
//!
//! Rules, because the log sits on the ADD path of every pod:
//! - A failure to log never fails the call: [`append`] returns an error the
//!   skeleton ignores.
//! - Nothing is followed or waited on: every open is `O_NOFOLLOW |
//!   O_NONBLOCK` and must be a regular file; the lock is polled with a short
//!   deadline ([`LOCK_DEADLINE`]) and the line dropped when it passes.
//! - One `write(2)` per line on an `O_APPEND` descriptor, under an exclusive
//!   `flock` on `<path>.lock` that also covers the size check and rotation:
//!   concurrent writers never tear or interleave lines, and the file never
//!   exceeds its bound.
//! - Every value from outside (container ID, ifname, pod names, error text)
//!   is JSON-escaped by serde and cut to a bounded length.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Size of the log, and of its one rotated generation, unless the config
/// says otherwise.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 20;
/// The smallest bound accepted (a few lines).
pub const MIN_MAX_BYTES: u64 = 4096;
/// The longest line written; longer messages are cut to fit.
pub const MAX_LINE: usize = 2048;
/// The longest value of one field (container ID, pod name, message).
const MAX_FIELD: usize = 256;
/// How long a writer waits for the rotation lock before dropping its line.
pub const LOCK_DEADLINE: Duration = Duration::from_millis(50);

/// The config keys a plugin reads its log settings from.
pub const PATH_KEY: &str = "cniLog";
pub const MAX_BYTES_KEY: &str = "cniLogMaxBytes";

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// UTC, RFC 3339 with milliseconds.
    pub time: String,
    /// The executable's name (ferry-bridge, ferry-ipam, ...).
    pub plugin: String,
    pub verb: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ifname: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,
    /// Wall time of the call in milliseconds.
    pub ms: f64,
    /// "ok" or "error".
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub msg: String,
}

impl Entry {
    pub fn is_ok(&self) -> bool {
        self.result == "ok"
    }

    /// `namespace/pod`, or the container ID when the runtime sent no pod.
    pub fn who(&self) -> String {
        if !self.pod.is_empty() {
            format!("{}/{}", self.namespace, self.pod)
        } else if !self.container.is_empty() {
            format!("container {}", self.container)
        } else {
            "no container".into()
        }
    }
}

/// Where to log, from the plugin's config; `None` when the key is absent or
/// not an absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogTarget {
    pub path: PathBuf,
    pub max_bytes: u64,
}

impl LogTarget {
    /// Reads `cniLog` / `cniLogMaxBytes` from a config document.
    pub fn from_config(v: &serde_json::Value) -> Option<LogTarget> {
        let path = v.get(PATH_KEY)?.as_str()?;
        if !path.starts_with('/') || path.contains('\0') || path.len() > 4096 {
            return None;
        }
        let max_bytes = v
            .get(MAX_BYTES_KEY)
            .and_then(|m| m.as_u64())
            .unwrap_or(DEFAULT_MAX_BYTES)
            .max(MIN_MAX_BYTES);
        Some(LogTarget {
            path: PathBuf::from(path),
            max_bytes,
        })
    }

    pub fn rotated(&self) -> PathBuf {
        rotated_path(&self.path)
    }
}

/// `<path>.1`: the previous generation.
pub fn rotated_path(path: &Path) -> PathBuf {
    suffixed(path, ".1")
}

fn lock_path(path: &Path) -> PathBuf {
    suffixed(path, ".lock")
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Cuts `s` to at most `max` bytes on a character boundary, replacing
/// control characters (they are escaped by JSON anyway, but a reader's
/// terminal should not see them raw in doctor's report).
pub fn bounded(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let c = if c.is_control() { '?' } else { c };
        if out.len() + c.len_utf8() > max {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
}

/// What the skeleton knows about one call.
#[derive(Debug, Clone, Default)]
pub struct Call<'a> {
    pub plugin: &'a str,
    pub verb: &'a str,
    pub container: &'a str,
    pub ifname: &'a str,
    /// CNI_ARGS as received (the pod's namespace and name are read from it).
    pub cni_args: &'a str,
}

/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from a raw CNI_ARGS string,
/// leniently (a malformed CNI_ARGS still gets its call logged).
fn pod_of(cni_args: &str) -> (String, String) {
    let mut ns = "";
    let mut pod = "";
    for pair in cni_args.split(';') {
        match pair.split_once('=') {
            Some(("K8S_POD_NAMESPACE", v)) => ns = v,
            Some(("K8S_POD_NAME", v)) => pod = v,
            _ => {}
        }
    }
    (bounded(ns, MAX_FIELD), bounded(pod, MAX_FIELD))
}

/// The log line (with its newline) for a finished call.
pub fn line(call: &Call<'_>, took: Duration, outcome: Result<(), (u32, &str)>) -> String {
    let (namespace, pod) = pod_of(call.cni_args);
    let (result, code, msg) = match outcome {
        Ok(()) => ("ok", None, String::new()),
        Err((code, msg)) => ("error", Some(code), bounded(msg, MAX_FIELD * 2)),
    };
    let entry = Entry {
        time: rfc3339_millis(SystemTime::now()),
        plugin: bounded(call.plugin, 64),
        verb: bounded(call.verb, 16),
        container: bounded(call.container, MAX_FIELD),
        ifname: bounded(call.ifname, 32),
        namespace,
        pod,
        ms: (took.as_secs_f64() * 1e6).round() / 1e3,
        result: result.into(),
        code,
        msg,
    };
    let mut text = serde_json::to_string(&entry).expect("entry serializes");
    if text.len() >= MAX_LINE {
        // Every field is bounded, so this cannot happen; stay safe anyway.
        text = serde_json::to_string(&Entry {
            msg: String::new(),
            container: String::new(),
            ..entry
        })
        .expect("entry serializes");
    }
    text.push('\n');
    text
}

/// Why a line was not written (the call goes on regardless).
#[derive(Debug)]
pub enum LogError {
    Io(std::io::Error),
    NotRegular(PathBuf),
    LockBusy,
    TooLong,
    ShortWrite,
}

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogError::Io(e) => write!(f, "{e}"),
            LogError::NotRegular(p) => write!(f, "{} is not a regular file", p.display()),
            LogError::LockBusy => write!(f, "the log's lock stayed busy"),
            LogError::TooLong => write!(f, "line longer than the log's bound"),
            LogError::ShortWrite => write!(f, "short write"),
        }
    }
}

impl From<std::io::Error> for LogError {
    fn from(e: std::io::Error) -> Self {
        LogError::Io(e)
    }
}

/// Opens `path` for appending (created 0640 when absent), refusing symlinks,
/// FIFOs and devices without blocking on them.
fn open_regular(path: &Path, append: bool) -> Result<std::fs::File, LogError> {
    let mut o = std::fs::OpenOptions::new();
    if append {
        o.append(true);
    } else {
        o.read(true).write(true);
    }
    let f = o
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    if !f.metadata()?.file_type().is_file() {
        return Err(LogError::NotRegular(path.to_path_buf()));
    }
    Ok(f)
}

/// Takes an exclusive flock on `f`, polling until [`LOCK_DEADLINE`].
fn lock(f: &std::fs::File) -> Result<(), LogError> {
    let deadline = Instant::now() + LOCK_DEADLINE;
    let mut pause = Duration::from_micros(50);
    loop {
        // SAFETY: flock on a descriptor we own; no memory involved.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) && e.raw_os_error() != Some(libc::EINTR) {
            return Err(e.into());
        }
        if Instant::now() >= deadline {
            return Err(LogError::LockBusy);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(2));
    }
}

/// Appends one line, rotating first when it would push the file past its
/// bound. The lock is released when its descriptor closes.
pub fn append(target: &LogTarget, line: &str) -> Result<(), LogError> {
    if line.len() as u64 > target.max_bytes || line.len() > MAX_LINE {
        return Err(LogError::TooLong);
    }
    let guard = open_regular(&lock_path(&target.path), false)?;
    lock(&guard)?;
    let mut file = open_regular(&target.path, true)?;
    if file.metadata()?.len() + line.len() as u64 > target.max_bytes {
        // Under the lock no other writer appends: the rename moves a
        // complete file, and the next open creates the new generation.
        std::fs::rename(&target.path, target.rotated())?;
        file = open_regular(&target.path, true)?;
    }
    let n = file.write(line.as_bytes())?;
    if n != line.len() {
        return Err(LogError::ShortWrite);
    }
    drop(file);
    drop(guard);
    Ok(())
}

/// The log's entries, oldest first: the rotated generation, then the
/// current file. Lines that do not parse are skipped.
pub fn read_all(path: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    for p in [rotated_path(path), path.to_path_buf()] {
        if let Some(text) = read_regular(&p, 64 << 20) {
            out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
    }
    out
}

/// A regular file's contents (at most `max` bytes), never following a
/// symlink or blocking.
pub fn read_regular(path: &Path, max: u64) -> Option<String> {
    use std::io::Read;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let meta = f.metadata().ok()?;
    if !meta.file_type().is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    f.take(max).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// RFC 3339 UTC with milliseconds, from the civil-from-days algorithm
/// (no date crate in the plugins).
pub fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-calllog-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn dates_are_rfc3339() {
        let t = UNIX_EPOCH + Duration::from_millis(1_764_903_109_123);
        assert_eq!(rfc3339_millis(t), "2025-12-05T02:51:49.123Z");
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339_millis(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn lines_escape_and_bound_outside_values() {
        let evil = format!("a\"b\n{}", "x".repeat(10_000));
        let call = Call {
            plugin: "ferry-bridge",
            verb: "ADD",
            container: &evil,
            ifname: "eth0",
            cni_args: &format!("K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME={evil}"),
        };
        let l = line(&call, Duration::from_micros(1500), Err((7, &evil)));
        assert!(l.len() < MAX_LINE, "{}", l.len());
        assert_eq!(l.matches('\n').count(), 1, "one line");
        let e: Entry = serde_json::from_str(&l).unwrap();
        assert_eq!(e.code, Some(7));
        assert_eq!(e.namespace, "kube-system");
        assert!(e.pod.starts_with("a\"b?x"), "{}", e.pod);
        assert_eq!(e.ms, 1.5);
        assert!(!e.is_ok());
    }

    #[test]
    fn symlinks_and_fifos_are_refused_without_blocking() {
        let dir = tmp("special");
        let victim = dir.join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let path = dir.join("cni.log");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let t = LogTarget {
            path: path.clone(),
            max_bytes: DEFAULT_MAX_BYTES,
        };
        assert!(append(&t, "{}\n").is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        std::fs::remove_file(&path).unwrap();
        let fifo = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        // O_NONBLOCK: a FIFO without a reader fails at once (ENXIO) instead
        // of hanging the ADD.
        assert!(append(&t, "{}\n").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_keeps_both_generations_within_the_bound() {
        let dir = tmp("rotate");
        let t = LogTarget {
            path: dir.join("cni.log"),
            max_bytes: MIN_MAX_BYTES,
        };
        let l = format!("{}\n", "y".repeat(99));
        for _ in 0..200 {
            append(&t, &l).unwrap();
        }
        for p in [&t.path, &t.rotated()] {
            let len = std::fs::metadata(p).unwrap().len();
            assert!(len <= MIN_MAX_BYTES && len > 0, "{} {len}", p.display());
            assert_eq!(len % 100, 0, "whole lines only");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
