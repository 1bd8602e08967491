//! A subnet lease as etcd returns it (key and value), which any node or
//! anyone with write access to the prefix may have written: never a panic.
#![no_main]

use ferryd::lease::{SubnetLease, parse_subnet_key_segment};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first line is the key, the rest the value.
    let (key, value) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let key = String::from_utf8_lossy(key);
    let _ = parse_subnet_key_segment(&key);
    if let Ok(lease) = SubnetLease::from_kv(&key, value) {
        let subnet = lease.subnet.expect("a parsed lease has its key's subnet");
        assert_eq!(subnet.network(), subnet.ip(), "no host bits in {key}");
    }
});
