//! The IPAM store's index (`.ferry/index`), which a crash or another program
//! may have left in any state: never a panic, and whatever parses is a set
//! of runs that the writer prints back the same.
#![no_main]

use ferry_ipam::store::{index_text, parse_index};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The stamp the index must carry: its own second line, so both the
    // matching and the stale case are reached.
    let stamp = text.lines().nth(1).unwrap_or_default();
    if let Some(set) = parse_index(text, stamp) {
        assert_eq!(parse_index(&index_text(&set, stamp), stamp), Some(set));
    }
});
