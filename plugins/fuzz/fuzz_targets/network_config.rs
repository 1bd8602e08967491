//! The cluster network configuration in etcd (`<prefix>/network/config`,
//! flannel's net-conf.json keys too): never a panic.
#![no_main]

use ferryd::network::NetworkConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = NetworkConfig::from_json(text) {
        assert_eq!(config.network.network(), config.network.ip(), "no host bits");
    }
});
