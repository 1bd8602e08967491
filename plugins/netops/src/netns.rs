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
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
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
    /// gone"); a path that is not a network namespace (a regular file, a FIFO,
    /// a device, another kind of namespace) is [`NetopsError::NotANetns`].
    ///
    /// Never blocks and never opens anything but a namespace: the path is
    /// first opened `O_PATH` (no open(2) of a FIFO, which would wait for a
    /// writer, or of a device, whose driver would run), checked to be an nsfs
    /// file, and only then reopened for real through `/proc/self/fd`, which
    /// names that same inode.
    pub fn open(path: impl AsRef<Path>) -> Result<NetNs> {
        let path = path.as_ref().to_path_buf();
        let open_err = |source: io::Error| NetopsError::OpenNetns {
            path: path.clone(),
            source,
        };
        let handle = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(NetopsError::NetnsNotFound { path });
            }
            Err(e) => return Err(open_err(e)),
        };
        // nsfs inodes are regular files on a filesystem of their own.
        let meta = handle.metadata().map_err(open_err)?;
        if !meta.file_type().is_file() {
            return Err(NetopsError::NotANetns { path });
        }
        match fstatfs(&handle) {
            Ok(st) if st.filesystem_type() == NSFS_MAGIC => {}
            Ok(_) => return Err(NetopsError::NotANetns { path }),
            Err(e) => return Err(open_err(e.into())),
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
            .map_err(open_err)?;
        // nsfs also holds mount, pid, user… namespaces: ask which one it is.
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
        let nstype = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if nstype >= 0 && nstype != libc::CLONE_NEWNET {
            return Err(NetopsError::NotANetns { path });
        }
        Ok(NetNs { file, path })
    }

    /// Whether this is the network namespace of the calling process (its main
    /// thread: `/proc/self/ns/net`), i.e. the node's for a plugin the runtime
    /// started there. The CNI skeleton refuses such a CNI_NETNS for every
    /// plugin; this is the same check for code that opens a namespace itself.
    pub fn is_callers_own(&self) -> Result<bool> {
        let own = std::fs::metadata("/proc/self/ns/net")
            .map_err(|e| NetopsError::io("stat /proc/self/ns/net", "<own>", e))?;
        let this = self
            .file
            .metadata()
            .map_err(|e| NetopsError::io("fstat", &self.path.to_string_lossy(), e))?;
        use std::os::unix::fs::MetadataExt;
        Ok((this.dev(), this.ino()) == (own.dev(), own.ino()))
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
