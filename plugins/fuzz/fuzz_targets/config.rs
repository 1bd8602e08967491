//! Everything a runtime or a previous plugin can put on our stdin: a network
//! config, a conflist, a prevResult. Parsing must never panic, and whatever
//! parses must survive printing in every version and parsing back.
#![no_main]

use ferry_cni::{CniResult, NetConf, NetConfList, SpecVersion, version::SUPPORTED};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(conf) = NetConf::parse(data) {
        let _ = conf.validate();
        let _ = SpecVersion::negotiate(&conf.cni_version);
        if let Some(prev) = &conf.prev_result {
            let _ = CniResult::from_json(prev);
        }
    }
    if let Ok(list) = NetConfList::parse(data) {
        if let Ok(v) = list.negotiated_version() {
            for i in 0..list.plugins.len() {
                let _ = NetConf::from_value(list.plugin_config(i, v, &Default::default(), None));
            }
        }
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data)
        && let Ok(result) = CniResult::from_json(&value)
    {
        for v in SUPPORTED {
            let printed = result.to_json(*v);
            let back = CniResult::from_json(&printed).expect("our own output parses");
            assert_eq!(back.ips, result.ips);
        }
    }
});
