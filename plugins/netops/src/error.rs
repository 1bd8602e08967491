//! Errors that say what was being done, to which interface, in which
//! namespace, and keep the kernel's errno matchable ([`NetopsError::errno`]).

use ferry_cni::{CniError, ErrorCode};
use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NetopsError {
    /// The path does not exist: for DEL this means "already gone".
    #[error("network namespace {} does not exist", path.display())]
    NetnsNotFound { path: PathBuf },

    /// The path exists but is not an nsfs file (a typo'd bind mount, a regular file).
    #[error("{} is not a network namespace", path.display())]
    NotANetns { path: PathBuf },

    /// Opening or inspecting the namespace failed for another reason (EACCES, …).
    #[error("open network namespace {}: {source}", path.display())]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A netlink request the kernel (or the socket) refused.
    #[error("{op} {ifname} in netns {netns}: {}", describe(source))]
    Netlink {
        op: &'static str,
        ifname: String,
        netns: String,
        /// Boxed: rtnetlink's error is large and this travels in every `Result`.
        #[source]
        source: Box<rtnetlink::Error>,
    },

    /// A link that must exist does not.
    #[error("link {ifname} not found in netns {netns}")]
    LinkNotFound { ifname: String, netns: String },

    /// Any other system call: creating the socket, the runtime, a sysctl.
    #[error("{op} in netns {netns}: {source}")]
    Io {
        op: String,
        netns: String,
        #[source]
        source: io::Error,
    },
}

/// rtnetlink's own Display for a kernel error is a Debug dump of the message;
/// the errno text is what an operator needs.
fn describe(e: &rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => m.to_io().to_string(),
        other => other.to_string(),
    }
}

impl NetopsError {
    /// The errno behind this error, if the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetopsError::Netlink { source, .. } => match source.as_ref() {
                rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()).filter(|c| *c != 0),
                _ => None,
            },
            NetopsError::OpenNetns { source, .. } | NetopsError::Io { source, .. } => {
                source.raw_os_error()
            }
            NetopsError::NetnsNotFound { .. } => Some(libc::ENOENT),
            NetopsError::LinkNotFound { .. } => Some(libc::ENODEV),
            _ => None,
        }
    }

    /// Whether this is the kernel's `errno` (e.g. `libc::EEXIST`).
    pub fn is_errno(&self, errno: i32) -> bool {
        self.errno() == Some(errno)
    }

    pub(crate) fn io(op: impl Into<String>, netns: &str, source: io::Error) -> Self {
        NetopsError::Io {
            op: op.into(),
            netns: netns.to_string(),
            source,
        }
    }
}

/// The one place where kernel errors become CNI errors, for every plugin: a
/// namespace that cannot be used is the spec's code 8 (invalid netns),
/// anything else is 999 (internal), as the reference skeleton reports plain
/// errors.
pub fn to_cni(e: NetopsError) -> CniError {
    let code = match e {
        NetopsError::NetnsNotFound { .. }
        | NetopsError::NotANetns { .. }
        | NetopsError::OpenNetns { .. } => ErrorCode::InvalidNetns,
        NetopsError::Netlink { .. } | NetopsError::LinkNotFound { .. } | NetopsError::Io { .. } => {
            ErrorCode::Internal
        }
    };
    // The message already reads "<op> <ifname> in netns <path>: <errno text>";
    // the details keep the raw errno for tools that match on it.
    let details = e.errno().map(|n| format!("errno {n}")).unwrap_or_default();
    CniError::new(code, e.to_string()).with_details(details)
}

impl From<NetopsError> for io::Error {
    fn from(e: NetopsError) -> Self {
        let kind = match e.errno() {
            Some(errno) => io::Error::from_raw_os_error(errno).kind(),
            None => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}
