//! A reservation file in the IPAM store as the disk holds it (content and
//! extended attribute), which a crash, a full disk or another program may
//! have left in any state: never a panic.
#![no_main]

use ferry_ipam::record::Record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte says where the content ends and the xattr begins.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).min(rest.len());
    let (content, xattr) = rest.split_at(split);
    let _ = Record::parse(content, None);
    let _ = Record::parse(content, Some(xattr));
    let _ = Record::parse(rest, Some(rest));
});
