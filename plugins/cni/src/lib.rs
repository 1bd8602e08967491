//! The Container Network Interface specification, 0.3.0 to 1.1.0, as ferry's
//! plugins speak it: configuration and conflist parsing, results and their
//! conversion between versions, the error type with the spec's codes, CNI_ARGS
//! and name validation, delegation to another plugin, and the plugin skeleton.
//!
//! No kernel code lives here (that is `ferry-netops`).

pub mod args;
pub mod calllog;
pub mod config;
pub mod delegate;
pub mod error;
pub mod keys;
pub mod result;
pub mod skel;
pub mod version;

pub use args::CniArgs;
pub use config::{Attachment, NetConf, NetConfList};
pub use error::{CniError, ErrorCode};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use skel::{CmdArgs, Command, Plugin};
pub use version::SpecVersion;
