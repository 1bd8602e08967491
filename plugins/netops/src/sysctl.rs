//! sysctls under /proc/sys. `/proc/sys/net` shows the namespace of the
//! *calling thread*, so for another namespace call these inside [`in_netns`].
//!
//! Keys are slash paths only (`net/ipv6/conf/flannel.1/accept_ra`): interface
//! names may contain dots, so a dotted key cannot be converted safely.
//!
//! [`in_netns`]: crate::in_netns

use std::io;
use std::path::{Path, PathBuf};

/// `/proc/sys/<key>`, for a key that stays below /proc/sys: relative, and
/// only plain components (an absolute key would replace the base in
/// `Path::join`, `..` would climb out, an empty component means a name
/// was missing; `.` is refused too, as `Path` would silently drop it).
fn path_of(key: &str) -> io::Result<PathBuf> {
    let plain = !key.is_empty()
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if !plain {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("sysctl key {key:?} is not a plain path below /proc/sys"),
        ));
    }
    Ok(Path::new("/proc/sys").join(key))
}

/// Reads a sysctl, trimmed (`net/ipv6/conf/lo/disable_ipv6` → `"0"`).
pub fn read(key: &str) -> io::Result<String> {
    Ok(std::fs::read_to_string(path_of(key)?)?.trim().to_string())
}

/// Writes a sysctl unless it already has that value (no needless writes on a
/// read-only /proc/sys when nothing would change).
pub fn write(key: &str, value: &str) -> io::Result<()> {
    let path = path_of(key)?;
    if read(key).is_ok_and(|v| v == value) {
        return Ok(());
    }
    std::fs::write(path, value)
}
