//! Each plugin's own configuration (stdin, including runtimeConfig): bridge,
//! portmap and bandwidth. Never a panic; whatever loads is consistent.
#![no_main]

use ferry_bandwidth::config::Shaping;
use ferry_cni::{CmdArgs, CniArgs, Command, NetConf, SpecVersion};
use ferry_portmap::config::PortmapConf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first line is CNI_ARGS, the rest the configuration.
    let (args_line, conf) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b""[..], data),
    };
    let Ok(conf) = NetConf::parse(conf) else {
        return;
    };
    let args = CniArgs::parse(std::str::from_utf8(args_line).unwrap_or_default())
        .unwrap_or_default();
    let cmd = CmdArgs {
        command: Command::Add,
        container_id: "fuzz".into(),
        netns: None,
        ifname: "eth0".into(),
        args,
        raw_args: String::new(),
        path: Vec::new(),
        version: SpecVersion::negotiate("1.1.0").expect("a version ferry speaks"),
    };
    if let Ok(b) = ferry_bridge::config::BridgeConf::load(&conf, &cmd) {
        assert!(!b.bridge.is_empty() && b.bridge.len() <= 15, "{:?}", b.bridge);
    }
    if let Ok(p) = PortmapConf::load(&conf) {
        assert!(p.mark_bit < 32);
        assert!(p.mappings.iter().all(|m| m.host_port > 0 && m.container_port > 0));
    }
    if let Ok(Some(s)) = Shaping::load(&conf) {
        for tbf in [s.ingress, s.egress].into_iter().flatten() {
            assert!(tbf.rate > 0 && tbf.burst > 0 && tbf.limit >= tbf.burst);
        }
    }
});
