//! The CNI call log as ferryd reads it into /metrics: lines that plugins
//! wrote with values from pods (names, messages), or that anything else
//! with root put there. Never a panic, and whatever is counted keeps its
//! labels bounded.
#![no_main]

use ferry_cni::calllog::Entry;
use ferryd::metrics::Metrics;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let m = Metrics::new();
    for line in data.split(|&b| b == b'\n') {
        if let Ok(e) = serde_json::from_slice::<Entry>(line) {
            let _ = e.who();
            let _ = e.is_ok();
            m.cni_call(&e);
        }
    }
    let _ = m.render();
});
