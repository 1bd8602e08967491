//! ferry-ipam: node-local address management that accepts the reference
//! `host-local` configuration and store, without its leaks.
//!
//! * [`config`]: the `ipam` section, defaults and validation, requested IPs.
//! * [`store`]: the per-network reservation store (flock, atomic files,
//!   stale proofs, run index for O(log n) allocation).
//! * [`record`]: one reservation file, in host-local's and ferry's forms.
//! * [`error`]: typed errors and their CNI codes (the table is there).

pub mod config;
pub mod error;
pub mod key;
pub mod record;
pub mod store;

use config::IpamConfig;
use error::IpamError;
use ferry_cni::{CmdArgs, CniError, CniResult, Dns, IpConfig, NetConf, Plugin};
use ipnetwork::IpNetwork;
use record::Meta;
use std::path::Path;
use store::Store;

/// The plugin.
pub struct Ipam;

/// host-local's resolv.conf reading: nameserver, domain, search, options.
pub fn parse_resolv_conf(text: &str) -> Dns {
    let mut dns = Dns::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 2 {
            continue;
        }
        let rest = f[1..].iter().map(|s| s.to_string());
        match f[0] {
            "nameserver" => dns.nameservers.push(f[1].to_string()),
            "domain" => dns.domain = f[1].to_string(),
            "search" => dns.search.extend(rest),
            "options" => dns.options.extend(rest),
            _ => {}
        }
    }
    dns
}

fn read_dns(cfg: &IpamConfig) -> Result<Dns, IpamError> {
    match &cfg.resolv_conf {
        None => Ok(Dns::default()),
        Some(p) => fs_read(p).map(|t| parse_resolv_conf(&t)),
    }
}

/// Reads `resolvConf`: followed if it is a symlink (it is the operator's
/// path, and /etc/resolv.conf often is one), but opened without blocking and
/// read only when it is a regular file (a FIFO would hang ADD, a device
/// could be read forever).
fn fs_read(p: &Path) -> Result<String, IpamError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e| IpamError::io("read resolvConf", p, e);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)
        .map_err(err)?;
    if !f.metadata().map_err(err)?.file_type().is_file() {
        return Err(err(std::io::Error::other("not a regular file")));
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(err)?;
    Ok(text)
}

/// The staleness evidence and pod identity recorded with an ADD's
/// reservations: the netns path and what it holds now, the boot, and the
/// Kubernetes pod from CNI_ARGS (only values fit to record; see
/// [`record::valid_pod_arg`]).
pub fn add_meta(args: &CmdArgs, boot_id: Option<&str>) -> Meta {
    let netns = args.netns.as_deref();
    let (netns_dev, netns_ino) = netns.and_then(record::netns_identity).unwrap_or((0, 0));
    let pod_arg = |key: &str| match args.args.get(key) {
        Some(v) if record::valid_pod_arg(v) => v.to_string(),
        Some(v) => {
            eprintln!(
                "ferry-ipam: CNI_ARGS {key} not recorded: {} bytes, or control characters",
                v.len()
            );
            String::new()
        }
        None => String::new(),
    };
    Meta {
        netns: netns
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
        boot_id: boot_id.unwrap_or_default().to_string(),
        netns_dev,
        netns_ino,
        pod_namespace: pod_arg("K8S_POD_NAMESPACE"),
        pod_name: pod_arg("K8S_POD_NAME"),
        pod_infra_container_id: pod_arg("K8S_POD_INFRA_CONTAINER_ID"),
    }
}

impl Ipam {
    fn add_inner(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, IpamError> {
        let cfg = IpamConfig::from_netconf(conf)?;
        let requested = config::requested_ips(conf, &args.args)?;
        let dns = read_dns(&cfg)?;
        let mut store = Store::open(&cfg.data_dir, &conf.name)?;
        let meta = add_meta(args, store.boot_id());
        let ips = store.allocate(
            &cfg.ranges,
            &args.container_id,
            &args.ifname,
            &meta,
            &requested,
        )?;
        store.commit();
        let mut result = CniResult {
            routes: cfg.routes.clone(),
            dns,
            ..Default::default()
        };
        for (set, ip) in cfg.ranges.iter().zip(ips) {
            let range = set
                .iter()
                .find(|r| r.contains(ip))
                .expect("allocated inside");
            result.ips.push(IpConfig {
                interface: None,
                address: IpNetwork::new(ip, range.subnet.prefix()).expect("prefix of subnet"),
                gateway: Some(range.gateway),
            });
        }
        Ok(result)
    }

    fn del_inner(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), IpamError> {
        let cfg = IpamConfig::from_netconf(conf)?;
        if let Some(mut store) = Store::open_existing(&cfg.data_dir, &conf.name)? {
            store.release(&args.container_id, &args.ifname)?;
            store.commit();
        }
        Ok(())
    }

    fn check_inner(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), IpamError> {
        let cfg = IpamConfig::from_netconf(conf)?;
        let owner = record::Owner::new(&args.container_id, &args.ifname).to_string();
        let held = match Store::open_existing(&cfg.data_dir, &conf.name)? {
            Some(store) => store.held_by(&args.container_id, &args.ifname),
            None => vec![],
        };
        for (i, set) in cfg.ranges.iter().enumerate() {
            if !held.iter().any(|ip| set.iter().any(|r| r.contains(*ip))) {
                return Err(IpamError::NotHeld {
                    owner: owner.clone(),
                    set: i,
                });
            }
        }
        Ok(())
    }

    fn gc_inner(&self, conf: &NetConf) -> Result<(), IpamError> {
        let cfg = IpamConfig::from_netconf(conf)?;
        let valid: Vec<(String, String)> = conf
            .valid_attachments
            .iter()
            .flatten()
            .map(|a| (a.container_id.clone(), a.ifname.clone()))
            .collect();
        if let Some(mut store) = Store::open_existing(&cfg.data_dir, &conf.name)? {
            store.gc(&valid)?;
            store.commit();
        }
        Ok(())
    }

    fn status_inner(&self, conf: &NetConf) -> Result<(), IpamError> {
        let cfg = IpamConfig::from_netconf(conf)?;
        let Some(mut store) = Store::open_existing(&cfg.data_dir, &conf.name)? else {
            return Ok(());
        };
        let free = store.free_per_set(&cfg.ranges)?;
        if let Some(set) = free.iter().position(|f| *f == 0) {
            return Err(IpamError::Exhausted {
                set,
                ranges: cfg.ranges[set]
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                held: cfg.ranges[set].iter().map(|r| r.capacity()).sum(),
            });
        }
        Ok(())
    }
}

impl Plugin for Ipam {
    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
        Ok(self.add_inner(args, conf)?)
    }
    fn del(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        Ok(self.del_inner(args, conf)?)
    }
    fn check(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        Ok(self.check_inner(args, conf)?)
    }
    fn gc(&self, _args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        Ok(self.gc_inner(conf)?)
    }
    fn status(&self, _args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        Ok(self.status_inner(conf)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_like_host_local() {
        let d = parse_resolv_conf(
            "# comment\n; other\nnameserver 10.0.0.10\nnameserver fd00::10\n\
             domain example.com\nsearch a.svc b.svc\nsearch c\noptions ndots:5 edns0\nbogus\n",
        );
        assert_eq!(d.nameservers, vec!["10.0.0.10", "fd00::10"]);
        assert_eq!(d.domain, "example.com");
        assert_eq!(d.search, vec!["a.svc", "b.svc", "c"]);
        assert_eq!(d.options, vec!["ndots:5", "edns0"]);
        assert!(parse_resolv_conf("").is_empty());
    }
}
