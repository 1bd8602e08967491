//! Delegation: executing another plugin (the IPAM plugin named by
//! `ipam.type`) from CNI_PATH with the same environment and the whole
//! configuration on stdin, exactly as the spec describes.

use crate::args::validate_plugin_type;
use crate::config::NetConf;
use crate::error::{CniError, ErrorCode};
use crate::result::CniResult;
use crate::skel::{CmdArgs, Command};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Finds `plugin_type` in the CNI_PATH directories.
pub fn find_plugin(plugin_type: &str, path: &[PathBuf]) -> Result<PathBuf, CniError> {
    validate_plugin_type(plugin_type)?;
    for dir in path {
        let candidate = dir.join(plugin_type);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(CniError::invalid_config(format!(
        "failed to find plugin {plugin_type:?} in path {:?}",
        path.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
    )))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs the IPAM plugin of `conf` for `command`. ADD returns its parsed
/// result; the other verbs return `None`. A plugin error comes back with its
/// code, message and details unchanged.
pub fn exec_ipam(
    command: Command,
    args: &CmdArgs,
    conf: &NetConf,
) -> Result<Option<CniResult>, CniError> {
    let ipam_type = conf
        .ipam_type()
        .ok_or_else(|| CniError::invalid_config("network config has no \"ipam\" section"))?;
    exec_plugin(ipam_type, command, args, conf.raw())
}

/// Runs plugin `plugin_type` with `stdin` as its configuration.
pub fn exec_plugin(
    plugin_type: &str,
    command: Command,
    args: &CmdArgs,
    stdin: &serde_json::Value,
) -> Result<Option<CniResult>, CniError> {
    let bin = find_plugin(plugin_type, &args.path)?;
    let input = serde_json::to_vec(stdin)?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.env("CNI_COMMAND", command.as_str())
        .env("CNI_CONTAINERID", &args.container_id)
        .env("CNI_IFNAME", &args.ifname)
        .env("CNI_ARGS", &args.raw_args)
        .env("CNI_PATH", args.path_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    match &args.netns {
        Some(ns) => cmd.env("CNI_NETNS", ns),
        None => cmd.env_remove("CNI_NETNS"),
    };
    let mut child = cmd.spawn().map_err(|e| {
        CniError::io(format!("failed to execute plugin {}", bin.display())).with_details(e)
    })?;
    let mut child_stdin = child.stdin.take().expect("stdin is piped");
    // Written from a thread so a plugin that answers before reading all of
    // stdin cannot deadlock us.
    let writer = std::thread::spawn(move || child_stdin.write_all(&input));
    let output = child.wait_with_output().map_err(|e| {
        CniError::io(format!("failed to wait for plugin {}", bin.display())).with_details(e)
    })?;
    let _ = writer.join();

    if !output.status.success() {
        if let Some(e) = CniError::from_reply(&output.stdout) {
            return Err(e);
        }
        return Err(CniError::new(
            ErrorCode::Internal,
            format!("plugin {plugin_type} failed ({})", output.status),
        )
        .with_details(String::from_utf8_lossy(&output.stdout).trim()));
    }
    if command != Command::Add {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).map_err(|e| {
        CniError::decoding(format!("plugin {plugin_type} printed an invalid result"))
            .with_details(e)
    })?;
    CniResult::from_json(&value).map(Some)
}
