//! sysctls under /proc/sys. `/proc/sys/net` shows the namespace of the
//! *calling thread*, so for another namespace call these inside [`in_netns`].
//!
//! Keys are slash paths only (`net/ipv6/conf/flannel.1/accept_ra`): interface
//! names may contain dots, so a dotted key cannot be converted safely.
//!
//! [`in_netns`]: crate::in_netns

use std::io;
use std::path::Path;

/// Reads a sysctl, trimmed (`net/ipv6/conf/lo/disable_ipv6` → `"0"`).
pub fn read(key: &str) -> io::Result<String> {
    Ok(std::fs::read_to_string(Path::new("/proc/sys").join(key))?
        .trim()
        .to_string())
}

/// Writes a sysctl unless it already has that value (no needless writes on a
/// read-only /proc/sys when nothing would change).
pub fn write(key: &str, value: &str) -> io::Result<()> {
    if read(key).is_ok_and(|v| v == value) {
        return Ok(());
    }
    std::fs::write(Path::new("/proc/sys").join(key), value)
}
