//! Network namespaces as owned file descriptors.
//!
//! A [`NetNs`] is only an fd: holding it keeps the namespace alive, and
//! nothing here ever switches the calling thread. Work that must happen
//! *inside* a namespace runs on a throwaway thread ([`in_netns`]), because
//! `setns` is per thread and a thread that stays behind in a pod's namespace
//! (or a tokio worker moved there) silently acts on the wrong namespace later.

use crate::{NetopsError, Result};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

/// An open network namespace. Dropping it closes the fd; the namespace itself
/// lives on while anything else (a process, a bind mount) still holds it.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens a namespace by path (CNI_NETNS, `/run/netns/x`, `/proc/<pid>/ns/net`).
    /// A missing path is [`NetopsError::NetnsNotFound`] (DEL treats it as "already
    /// gone"); a path that is not an nsfs file is [`NetopsError::NotANetns`].
    pub fn open(path: impl AsRef<Path>) -> Result<NetNs> {
        let path = path.as_ref().to_path_buf();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(NetopsError::NetnsNotFound { path });
            }
            Err(source) => return Err(NetopsError::OpenNetns { path, source }),
        };
        match fstatfs(&file) {
            Ok(st) if st.filesystem_type() == NSFS_MAGIC => {}
            Ok(_) => return Err(NetopsError::NotANetns { path }),
            Err(e) => {
                return Err(NetopsError::OpenNetns {
                    path,
                    source: e.into(),
                });
            }
        }
        // nsfs also holds mount, pid, user… namespaces: ask which one it is.
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
        let nstype = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if nstype >= 0 && nstype != libc::CLONE_NEWNET {
            return Err(NetopsError::NotANetns { path });
        }
        Ok(NetNs { file, path })
    }

    /// The namespace of the calling *thread* (`/proc/self/ns/net` would be the
    /// main thread's, which is not the same thing once anyone has called setns).
    pub fn current() -> Result<NetNs> {
        NetNs::open("/proc/thread-self/ns/net")
    }

    /// Creates a new, empty namespace that nothing is mounted for: it lives
    /// exactly as long as this value (and its clones). Its [`path`](Self::path)
    /// is `/proc/<pid>/fd/<fd>`, usable as CNI_NETNS by child processes.
    pub fn new_anonymous() -> Result<NetNs> {
        let file = std::thread::spawn(|| -> io::Result<File> {
            unshare(CloneFlags::CLONE_NEWNET)?;
            File::open("/proc/thread-self/ns/net")
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
        .map_err(|e| NetopsError::io("unshare(CLONE_NEWNET)", "<new>", e))?;
        let path = PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            file.as_raw_fd()
        ));
        Ok(NetNs { file, path })
    }

    /// The path this namespace was opened from, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn try_clone(&self) -> Result<NetNs> {
        let file = self
            .file
            .try_clone()
            .map_err(|e| NetopsError::io("dup netns fd", &self.path.to_string_lossy(), e))?;
        Ok(NetNs {
            file,
            path: self.path.clone(),
        })
    }

    /// Whether both refer to the same namespace (same nsfs inode).
    pub fn same_as(&self, other: &NetNs) -> bool {
        match (self.file.metadata(), other.file.metadata()) {
            (Ok(a), Ok(b)) => {
                use std::os::unix::fs::MetadataExt;
                a.dev() == b.dev() && a.ino() == b.ino()
            }
            _ => false,
        }
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// `_IO(0xb7, 0x3)` from <linux/nsfs.h>; libc does not export it.
const NS_GET_NSTYPE: u64 = 0xb703;

/// Runs blocking work (a sysctl, a `bind`, spawning `ip`) on a fresh thread
/// that has entered `ns` and exits afterwards, so no long-lived thread is ever
/// left in another namespace. A panic in `f` is propagated to the caller.
pub fn in_netns<T: Send>(ns: &NetNs, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)?;
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
