//! STATUS that knows about the node: ferryd publishes whether it holds the
//! node's lease and is ready in a small file (`readinessFile` in the
//! conflist it writes, /run/ferry/ready by default), and STATUS reads it.
//!
//! The file is an outside input to the plugin (issue 9 rules): it is opened
//! without following a symlink and without blocking (a FIFO is refused, not
//! waited on), must be a regular file of at most [`MAX_SIZE`] bytes owned by
//! root (or this process's user) and writable by nobody else, and its JSON
//! is validated. Anything else is "not available" (code 50) with a message
//! that says what is wrong, so the runtime waits and the operator knows why.
//!
//! A ferryd that died without cleaning up must not look ready forever: the
//! file says until when it is valid, in CLOCK_BOOTTIME milliseconds of the
//! boot named by `bootId` (a clock no one can set, shared by every process
//! of one boot); ferryd refreshes it long before that moment.
//!
//! Format (version 1), one JSON object:
//! `{"version":1,"ready":true,"subnet":"10.244.3.0/24","bootId":"…",
//!   "validUntilBoottimeMs":123456,"reason":"","updatedUnix":1700000000}`

use ferry_cni::{CniError, ErrorCode};
use serde::Deserialize;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The readiness file is ~250 bytes; anything much larger is not ferryd's.
pub const MAX_SIZE: u64 = 4096;

/// The longest `reason` quoted back in STATUS's message.
const MAX_REASON: usize = 300;

/// The file's content, as ferryd writes it. Unknown keys are ignored (a
/// newer ferryd may add some); the `version` says whether the meaning of
/// the known ones changed.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    version: u32,
    ready: bool,
    #[serde(default)]
    subnet: Option<ipnetwork::IpNetwork>,
    boot_id: String,
    valid_until_boottime_ms: u64,
    #[serde(default)]
    reason: String,
}

fn not_available(path: &Path, what: impl std::fmt::Display) -> CniError {
    CniError::new(
        ErrorCode::CannotServiceAdd,
        format!("node not ready: {} {what}", path.display()),
    )
}

pub use ferry_netops::boot::{boot_id, boottime_ms};

/// Reads the readiness file at `path` and says whether the node can take
/// pods: `Ok` when ferryd published "ready" in this boot and the file has
/// not expired; else code 50 with the reason. `ipam_subnets` are the
/// subnets the config's IPAM hands out: when ferryd's current subnet is not
/// among them, this config is stale (the node's lease changed).
pub fn check(path: &Path, ipam_subnets: &[ipnetwork::IpNetwork]) -> Result<(), CniError> {
    let text = read(path)?;
    judge(
        path,
        &text,
        ipam_subnets,
        boot_id().as_deref(),
        boottime_ms(),
    )
}

/// What the file's `text` says, for this boot (`boot`) at `now`
/// ([`boottime_ms`]): the part of [`check`] that reads no file or clock.
pub fn judge(
    path: &Path,
    text: &str,
    ipam_subnets: &[ipnetwork::IpNetwork],
    boot: Option<&str>,
    now: u64,
) -> Result<(), CniError> {
    let w: Wire = serde_json::from_str(text)
        .map_err(|e| not_available(path, format_args!("is not ferryd's readiness file: {e}")))?;
    if w.version != 1 {
        return Err(not_available(
            path,
            format_args!("has version {}; this plugin reads version 1", w.version),
        ));
    }
    if let Some(mine) = boot
        && w.boot_id != mine
    {
        return Err(not_available(
            path,
            format_args!(
                "was written in another boot ({:?}, this one is {mine}): ferryd has not published its readiness since the node started",
                truncate(&w.boot_id)
            ),
        ));
    }
    if !w.ready {
        return Err(not_available(
            path,
            format_args!("says ferryd is not ready: {}", truncate(&w.reason)),
        ));
    }
    if now >= w.valid_until_boottime_ms {
        return Err(not_available(
            path,
            format_args!(
                "expired {}s ago: ferryd is not running, or stopped renewing the node's lease",
                (now - w.valid_until_boottime_ms) / 1000
            ),
        ));
    }
    let subnet = w.subnet.ok_or_else(|| {
        not_available(
            path,
            "says ready but names no subnet: not ferryd's readiness file",
        )
    })?;
    if !ipam_subnets.is_empty() && !ipam_subnets.contains(&subnet) {
        return Err(not_available(
            path,
            format_args!(
                "says the node's subnet is {subnet}, but this network config hands out {}: the config is stale (the node's lease changed)",
                ipam_subnets
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(())
}

/// `s` cut to [`MAX_REASON`] characters (it is quoted in an error message).
fn truncate(s: &str) -> String {
    match s.char_indices().nth(MAX_REASON) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The file's text: a regular file, not a symlink, opened without blocking,
/// owned by root or us and writable by no one else, at most [`MAX_SIZE`].
fn read(path: &Path) -> Result<String, CniError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => not_available(
                path,
                "does not exist: ferryd has not published the node's readiness (not started, or no subnet lease yet)",
            ),
            Some(libc::ELOOP) => not_available(path, "is a symbolic link: refused, never followed"),
            _ => not_available(path, format_args!("cannot be opened: {e}")),
        })?;
    let meta = f
        .metadata()
        .map_err(|e| not_available(path, format_args!("cannot be examined: {e}")))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(not_available(path, format_args!("is {what}: refused")));
    }
    // SAFETY: geteuid never fails.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return Err(not_available(
            path,
            format_args!(
                "is owned by uid {}, not root: refused (anyone could say the node is ready)",
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(not_available(
            path,
            format_args!(
                "is writable by group or others (mode {:o}): refused",
                meta.mode() & 0o7777
            ),
        ));
    }
    if meta.len() > MAX_SIZE {
        return Err(not_available(
            path,
            format_args!(
                "is {} bytes, more than {MAX_SIZE}: not ferryd's readiness file",
                meta.len()
            ),
        ));
    }
    let mut bytes = Vec::new();
    f.take(MAX_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| not_available(path, format_args!("cannot be read: {e}")))?;
    if bytes.len() as u64 > MAX_SIZE {
        return Err(not_available(
            path,
            format_args!("grew past {MAX_SIZE} bytes while read: not ferryd's readiness file"),
        ));
    }
    String::from_utf8(bytes).map_err(|_| not_available(path, "is not UTF-8 text: refused"))
}

/// The subnets the IPAM section of a config hands out: host-local's
/// `ranges[][].subnet` and its older top-level `subnet`. Unparseable
/// entries are left to the IPAM plugin to refuse.
pub fn ipam_subnets(
    ipam: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Vec<ipnetwork::IpNetwork> {
    let Some(ipam) = ipam else {
        return Vec::new();
    };
    let ranges = ipam
        .get("ranges")
        .and_then(|r| r.as_array())
        .into_iter()
        .flatten()
        .filter_map(|set| set.as_array())
        .flatten()
        .filter_map(|r| r.get("subnet"));
    ranges
        .chain(ipam.get("subnet"))
        .filter_map(|s| s.as_str()?.parse::<ipnetwork::IpNetwork>().ok())
        .map(|n| ipnetwork::IpNetwork::new(n.network(), n.prefix()).expect("same prefix"))
        .collect()
}

/// A path for `readinessFile`: absolute (the runtime's working directory is
/// no one's business), at most PATH_MAX, no NUL.
pub fn validate_path(p: &str) -> Result<PathBuf, CniError> {
    if p.is_empty() || !p.starts_with('/') || p.len() >= 4096 || p.contains('\0') {
        return Err(CniError::invalid_config(format!(
            "readinessFile {:?} must be an absolute path",
            truncate(p)
        )));
    }
    Ok(PathBuf::from(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ipam_subnets_of_a_config() {
        let ipam = json!({"type": "ferry-ipam",
            "ranges": [[{"subnet": "10.244.3.0/24"}], [{"subnet": "fd00:244:0:3::/64"}, {"subnet": "bad"}]]});
        let got = ipam_subnets(ipam.as_object());
        assert_eq!(
            got,
            vec![
                "10.244.3.0/24".parse().unwrap(),
                "fd00:244:0:3::/64".parse().unwrap()
            ]
        );
        let legacy = json!({"type": "host-local", "subnet": "10.1.0.7/16"});
        assert_eq!(
            ipam_subnets(legacy.as_object()),
            vec!["10.1.0.0/16".parse().unwrap()]
        );
        assert!(ipam_subnets(None).is_empty());
    }

    #[test]
    fn readiness_paths() {
        validate_path("/run/ferry/ready").unwrap();
        for bad in ["", "run/ferry/ready", "./ready", "/a\0b"] {
            assert_eq!(validate_path(bad).unwrap_err().code.as_u32(), 7, "{bad:?}");
        }
        assert!(validate_path(&format!("/{}", "a".repeat(5000))).is_err());
    }

    #[test]
    fn boottime_moves_forward() {
        let a = boottime_ms();
        assert!(a > 0);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(boottime_ms() > a);
    }
}
