//! The crate's errors, and their one mapping to CNI error codes.
//!
//! | error | CNI code |
//! |---|---|
//! | invalid `ipam` section, malformed requested IP | 7 (invalid configuration) |
//! | CHECK: the container holds no reservation | 3 (unknown container) |
//! | store I/O failure | 5 (I/O failure) |
//! | store path that is a symlink, not a directory, or owned by another user | 5 (I/O failure) |
//! | a range set has no free address, even after reclaiming stale reservations | 50 (cannot service ADD; same code STATUS reports) |
//! | requested IP outside every range set / the gateway / two in one set | 100 |
//! | requested IP held by another container | 101 |

use ferry_cni::{CniError, ErrorCode};
use std::net::IpAddr;
use std::path::PathBuf;

/// Plugin code: a requested address cannot be used with this configuration.
pub const CODE_BAD_REQUESTED_IP: u32 = 100;
/// Plugin code: a requested address is held by another container.
pub const CODE_REQUESTED_IP_TAKEN: u32 = 101;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("invalid ipam configuration: {0}")]
    Config(String),
    #[error("requested IP {ip} cannot be used: {why}")]
    BadRequestedIp { ip: IpAddr, why: String },
    #[error("requested IP {ip} is already allocated to {holder}")]
    RequestedIpTaken { ip: IpAddr, holder: String },
    #[error("no free address in range set {set} ({ranges}); {held} held, none provably stale")]
    Exhausted {
        set: usize,
        ranges: String,
        held: u128,
    },
    #[error("{owner} holds no address in range set {set}")]
    NotHeld { owner: String, set: usize },
    /// Something in the store that ferry refuses to use: a symlink or a
    /// file where a directory belongs, a directory owned by another user.
    #[error("ipam store: {}: {why}", path.display())]
    UnsafeStore { path: PathBuf, why: String },
    #[error("ipam store: {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl IpamError {
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IpamError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> CniError {
        let code = match &e {
            IpamError::Config(_) => ErrorCode::InvalidConfig,
            IpamError::BadRequestedIp { .. } => ErrorCode::Plugin(CODE_BAD_REQUESTED_IP),
            IpamError::RequestedIpTaken { .. } => ErrorCode::Plugin(CODE_REQUESTED_IP_TAKEN),
            IpamError::Exhausted { .. } => ErrorCode::CannotServiceAdd,
            IpamError::NotHeld { .. } => ErrorCode::UnknownContainer,
            IpamError::Io { .. } | IpamError::UnsafeStore { .. } => ErrorCode::Io,
        };
        let msg = match &e {
            IpamError::Io { op, path, .. } => format!("ipam store: {op} {}", path.display()),
            other => other.to_string(),
        };
        let err = CniError::new(code, msg);
        match e {
            IpamError::Io { source, .. } => err.with_details(source),
            _ => err,
        }
    }
}
