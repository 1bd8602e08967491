//! `cnirun`: executes a CNI conflist the way a runtime (libcni) does, for the
//! lab and for debugging a node by hand. ADD runs the plugins in order, each
//! getting the previous one's result as `prevResult`; the final result is
//! cached so CHECK and DEL get it too; DEL runs the plugins in reverse order.
//!
//! STATUS runs every plugin in order, as libcni's GetStatusNetworkList does
//! (the container arguments are ignored; pass "" "").
//!
//! ```text
//! CNI_PATH=/opt/cni/bin cnirun add /etc/cni/net.d/10-ferry.conflist /run/netns/pod1 pod1 [eth0]
//! CNI_PATH=/opt/cni/bin cnirun status /etc/cni/net.d/10-ferry.conflist "" ""
//! ```

use clap::{Parser, ValueEnum};
use ferry_cni::config::NetConfList;
use ferry_cni::delegate::exec_plugin;
use ferry_cni::skel::{CmdArgs, Command};
use ferry_cni::{CniArgs, CniError};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Verb {
    Add,
    Check,
    Del,
    Status,
}

#[derive(Debug, Parser)]
#[command(about = "Run a CNI conflist for one container, as a runtime does")]
struct Cli {
    verb: Verb,
    conflist: PathBuf,
    /// The container's netns path; "" for DEL after the netns is gone.
    netns: String,
    container_id: String,
    #[arg(default_value = "eth0")]
    ifname: String,
    /// Plugin directories, ':'-separated.
    #[arg(long, env = "CNI_PATH", default_value = "/opt/cni/bin")]
    cni_path: String,
    /// Where ADD results are cached for CHECK and DEL.
    #[arg(long, env = "CNI_CACHE_DIR", default_value = "/var/lib/cni/results")]
    cache_dir: PathBuf,
    /// runtimeConfig as JSON (only the capabilities a plugin declares reach it).
    #[arg(long, default_value = "{}")]
    runtime_config: String,
    /// CNI_ARGS.
    #[arg(long, default_value = "")]
    args: String,
}

fn main() {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(Some(result)) => println!("{result}"),
        Ok(None) => {}
        Err(e) => {
            println!("{}", e.to_json("1.1.0"));
            std::process::exit(1);
        }
    }
}

fn cache_file(cli: &Cli, network: &str) -> PathBuf {
    cli.cache_dir
        .join(format!("{network}-{}-{}", cli.container_id, cli.ifname))
}

fn read_cache(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn run(cli: &Cli) -> Result<Option<Value>, CniError> {
    let bytes = std::fs::read(&cli.conflist)
        .map_err(|e| CniError::io(format!("read {}", cli.conflist.display())).with_details(e))?;
    let list = NetConfList::parse(&bytes)?;
    let version = list.negotiated_version()?;
    let runtime_config: Map<String, Value> = serde_json::from_str(&cli.runtime_config)
        .map_err(|e| CniError::decoding("--runtime-config is not a JSON object").with_details(e))?;
    let command = match cli.verb {
        Verb::Add => Command::Add,
        Verb::Check => Command::Check,
        Verb::Del => Command::Del,
        Verb::Status => Command::Status,
    };
    let args = CmdArgs {
        command,
        container_id: cli.container_id.clone(),
        netns: (!cli.netns.is_empty()).then(|| PathBuf::from(&cli.netns)),
        ifname: cli.ifname.clone(),
        args: CniArgs::parse(&cli.args)?,
        raw_args: cli.args.clone(),
        path: std::env::split_paths(&cli.cni_path).collect(),
        version,
    };
    let cache = cache_file(cli, &list.name);
    let plugin_type = |i: usize| {
        list.plugins[i]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    match cli.verb {
        Verb::Add => {
            let mut prev: Option<Value> = None;
            for i in 0..list.plugins.len() {
                let conf = list.plugin_config(i, version, &runtime_config, prev.as_ref());
                let result = exec_plugin(&plugin_type(i), command, &args, &conf)?
                    .ok_or_else(|| CniError::decoding("ADD printed no result"))?;
                prev = Some(result.to_json(version));
            }
            let result = prev.expect("a conflist has at least one plugin");
            std::fs::create_dir_all(&cli.cache_dir)
                .and_then(|()| std::fs::write(&cache, result.to_string()))
                .map_err(|e| CniError::io(format!("write {}", cache.display())).with_details(e))?;
            Ok(Some(result))
        }
        Verb::Check => {
            let prev = read_cache(&cache)
                .ok_or_else(|| CniError::io(format!("no cached result at {}", cache.display())))?;
            for i in 0..list.plugins.len() {
                let conf = list.plugin_config(i, version, &runtime_config, Some(&prev));
                exec_plugin(&plugin_type(i), command, &args, &conf)?;
            }
            Ok(None)
        }
        Verb::Del => {
            let prev = read_cache(&cache);
            for i in (0..list.plugins.len()).rev() {
                let conf = list.plugin_config(i, version, &runtime_config, prev.as_ref());
                exec_plugin(&plugin_type(i), command, &args, &conf)?;
            }
            let _ = std::fs::remove_file(&cache);
            Ok(None)
        }
        Verb::Status => {
            // No container: STATUS is about the network, not a pod.
            let args = CmdArgs {
                container_id: String::new(),
                netns: None,
                ifname: String::new(),
                ..args
            };
            for i in 0..list.plugins.len() {
                let conf = list.plugin_config(i, version, &runtime_config, None);
                exec_plugin(&plugin_type(i), command, &args, &conf)?;
            }
            Ok(None)
        }
    }
}
