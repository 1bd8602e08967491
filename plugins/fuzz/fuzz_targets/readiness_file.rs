//! ferryd's readiness file as ferry-bridge's STATUS reads it (a file under
//! /run/ferry, which anything with root on the node could have replaced):
//! never a panic, and "ready" only for a file that says so for this boot,
//! before its expiry.
#![no_main]

use ferry_bridge::readiness::judge;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/run/ferry/ready");
    let subnets = ["10.244.1.0/24".parse().expect("a subnet")];
    if judge(path, text, &subnets, Some("boot-a"), 1_000).is_ok() {
        let v: serde_json::Value = serde_json::from_str(text).expect("a ready file is JSON");
        assert_eq!(v["ready"], true, "{text}");
        // One second past any expiry it names, the same file is not ready.
        assert!(judge(path, text, &subnets, Some("boot-a"), u64::MAX).is_err(), "{text}");
    }
});
