//! CNI_ARGS and the names the runtime sets (CNI_IFNAME, CNI_CONTAINERID):
//! never a panic, and a name that passes the rules is one the kernel and a
//! file path can take.
#![no_main]

use ferry_cni::CniArgs;
use ferry_cni::args::{validate_container_id, validate_ifname};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(args) = CniArgs::parse(text) {
        let _ = args.ignore_unknown();
        let _ = args.check_known(&["IP", "MAC", "K8S_POD_NAME", "K8S_POD_NAMESPACE"]);
        for (k, v) in args.pairs() {
            assert_eq!(args.get(k).is_some(), true, "a parsed key is found: {k:?} {v:?}");
        }
    }
    if validate_ifname(text).is_ok() {
        assert!((1..=15).contains(&text.len()), "{text:?}");
        assert!(!text.contains('/') && !text.contains(':') && !text.contains('\0'));
        assert!(text != "." && text != "..");
    }
    let _ = validate_container_id(text);
});
