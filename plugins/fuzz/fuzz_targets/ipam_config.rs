//! ferry-ipam's configuration (the `ipam` section, args.cni.ips,
//! runtimeConfig.ips, CNI_ARGS IP=): never a panic, and ranges that load are
//! well formed.
#![no_main]

use ferry_cni::{CniArgs, NetConf};
use ferry_ipam::config::{IpamConfig, requested_ips};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (args_line, conf) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b""[..], data),
    };
    let Ok(conf) = NetConf::parse(conf) else {
        return;
    };
    if let Ok(ipam) = IpamConfig::from_netconf(&conf) {
        for set in &ipam.ranges {
            for r in set {
                assert!(r.start_key() <= r.end_key(), "{r}");
                assert!(r.capacity() > 0 || r.start_key() == r.end_key(), "{r}");
            }
        }
    }
    if let Ok(args) = CniArgs::parse(std::str::from_utf8(args_line).unwrap_or_default()) {
        let _ = requested_ips(&conf, &args);
    }
});
