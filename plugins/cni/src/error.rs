//! The one error type every ferry plugin returns, carrying the spec's codes.
//!
//! A plugin never prints anything but its result or this error on stdout, so
//! every failure path ends here: code, a short message, and details with the
//! underlying cause (errno text, the offending value).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Error codes reserved by the CNI specification (SPEC.md §Error, and
/// `pkg/types/types.go` of libcni for 8 and 999). Values of 100 and above are
/// free for plugin-specific errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    IncompatibleVersion,
    UnsupportedField,
    UnknownContainer,
    InvalidEnv,
    Io,
    Decoding,
    InvalidConfig,
    InvalidNetns,
    TryAgainLater,
    /// STATUS / ADD: the plugin cannot service ADD requests now (e.g. no free address).
    CannotServiceAdd,
    /// STATUS: the plugin has limited connectivity (e.g. no node lease yet).
    LimitedConnectivity,
    Internal,
    /// Plugin-specific, ≥ 100.
    Plugin(u32),
}

impl ErrorCode {
    pub fn as_u32(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnv => 4,
            ErrorCode::Io => 5,
            ErrorCode::Decoding => 6,
            ErrorCode::InvalidConfig => 7,
            ErrorCode::InvalidNetns => 8,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::CannotServiceAdd => 50,
            ErrorCode::LimitedConnectivity => 51,
            ErrorCode::Internal => 999,
            ErrorCode::Plugin(c) => c,
        }
    }

    pub fn from_u32(code: u32) -> ErrorCode {
        match code {
            1 => ErrorCode::IncompatibleVersion,
            2 => ErrorCode::UnsupportedField,
            3 => ErrorCode::UnknownContainer,
            4 => ErrorCode::InvalidEnv,
            5 => ErrorCode::Io,
            6 => ErrorCode::Decoding,
            7 => ErrorCode::InvalidConfig,
            8 => ErrorCode::InvalidNetns,
            11 => ErrorCode::TryAgainLater,
            50 => ErrorCode::CannotServiceAdd,
            51 => ErrorCode::LimitedConnectivity,
            999 => ErrorCode::Internal,
            c => ErrorCode::Plugin(c),
        }
    }
}

/// A CNI error: what the runtime receives as `{"cniVersion","code","msg","details"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    pub fn incompatible_version(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::IncompatibleVersion, msg)
    }
    pub fn invalid_env(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidEnv, msg)
    }
    pub fn decoding(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::Decoding, msg)
    }
    pub fn invalid_config(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidConfig, msg)
    }
    pub fn io(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::Io, msg)
    }
    pub fn try_again_later(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::TryAgainLater, msg)
    }

    /// The JSON object printed on stdout.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        serde_json::to_value(ErrorReply {
            cni_version: cni_version.to_string(),
            code: self.code.as_u32(),
            msg: self.msg.clone(),
            details: self.details.clone(),
        })
        .expect("error reply serializes")
    }

    /// Parses the error another plugin (e.g. a delegated IPAM plugin) printed.
    pub fn from_reply(bytes: &[u8]) -> Option<CniError> {
        let reply: ErrorReply = serde_json::from_slice(bytes).ok()?;
        Some(CniError {
            code: ErrorCode::from_u32(reply.code),
            msg: reply.msg,
            details: reply.details,
        })
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

impl From<serde_json::Error> for CniError {
    fn from(e: serde_json::Error) -> Self {
        CniError::decoding("failed to decode JSON").with_details(e)
    }
}

/// Wire form of an error (the field order matches libcni's `types.Error`).
#[derive(Debug, Serialize, Deserialize)]
struct ErrorReply {
    #[serde(rename = "cniVersion", default)]
    cni_version: String,
    code: u32,
    #[serde(default)]
    msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    details: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in [1, 2, 3, 4, 5, 6, 7, 8, 11, 50, 51, 999, 100, 142] {
            assert_eq!(ErrorCode::from_u32(code).as_u32(), code);
        }
    }

    #[test]
    fn json_shape() {
        let e = CniError::invalid_env("required env variables [CNI_IFNAME] missing");
        assert_eq!(
            serde_json::to_string(&e.to_json("1.1.0")).unwrap(),
            r#"{"cniVersion":"1.1.0","code":4,"msg":"required env variables [CNI_IFNAME] missing"}"#
        );
        let e = CniError::decoding("bad").with_details("line 1");
        assert_eq!(e.to_json("1.0.0")["details"], "line 1");
    }

    #[test]
    fn parses_foreign_error() {
        let e =
            CniError::from_reply(br#"{"cniVersion":"1.0.0","code":11,"msg":"busy","details":"x"}"#)
                .unwrap();
        assert_eq!(e.code, ErrorCode::TryAgainLater);
        assert_eq!(e.to_string(), "busy: x");
        assert!(CniError::from_reply(b"not json").is_none());
    }
}
