//! This boot's identity and clock, as the kernel gives them: what ferry's
//! time-limited records (the readiness file, IPAM evidence) are stamped with.

/// CLOCK_BOOTTIME now, in milliseconds: monotonic, counts suspend, shared
/// by every process of a boot and settable by no one.
pub fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on
    // every kernel ferry supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// This boot's ID (`/proc/sys/kernel/random/boot_id`), when readable.
pub fn boot_id() -> Option<String> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = text.trim();
    (!id.is_empty()).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn boot_clock_and_id() {
        let a = super::boottime_ms();
        assert!(a > 0);
        assert!(super::boottime_ms() >= a);
        assert_eq!(super::boot_id().map(|id| id.len()), Some(36));
    }
}
