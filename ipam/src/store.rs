//! The reservation store of one network: `<dataDir>/<network>/`.
//!
//! Layout (host-local's, so either plugin can take over the directory):
//!
//! ```text
//! lock                    flock'd by every invocation (host-local locks the same file)
//! 10.88.0.5               one file per held address: "<containerID>\r\n<ifname>",
//! fd00::5                   ferry's evidence in xattr user.ferry (see record.rs)
//! last_reserved_ip.<N>    the last address handed out in range set N (round robin)
//! .ferry/index            cache: the held addresses as runs + the directory stamp
//! .ferry/owners/<id>:<if> cache: the addresses an attachment holds
//! .ferry/tmp/             temp files, linked or renamed into place
//! ```
//!
//! The per-address files are the only truth. The caches let ADD and DEL run
//! in time independent of how many addresses are held; they are trusted only
//! while the network directory's inode/mtime/ctime equal the stamp written
//! with them after ferry's last change (anything else changing the directory,
//! host-local included, changes that stamp; the kernel gives a changed
//! directory a fine-grained timestamp after it was stat'ed), and are rebuilt
//! from the per-address files otherwise. A stale cache can never cause a
//! double allocation: a reservation is made by `link(2)`ing a complete temp
//! file to the address's name, which fails if the name exists.
//!
//! An attachment whose owner-cache name would not fit in one file name
//! (NAME_MAX, 255 bytes: container IDs have no length limit) has no owner
//! cache: its addresses are found by reading the records, as host-local does.
//!
//! Crash safety: every file appears complete or not at all (temp + link or
//! rename); a crash between steps leaves the directory stamp different from
//! the cache's, so the next invocation rebuilds.
//!
//! Hostile contents: every name in the store is opened relative to its
//! directory's fd (`openat`, `linkat`, `renameat`, `unlinkat`), never
//! following a symlink, and without blocking (`O_NONBLOCK`: a FIFO named like
//! a record must not hang an invocation that holds the lock); only regular
//! files are read. The store's directories must be real directories owned by
//! the plugin's user and are kept writable by that user only (created 0755,
//! group/other write removed if found). A symlink or file where one of
//! ferry's own cache directories (`.ferry`, `.ferry/tmp`, `.ferry/owners`)
//! belongs is removed (the name only, never what it points to) and the
//! directory made again; anywhere else it is refused with an error.

use crate::config::{Range, RangeSet};
use crate::error::IpamError;
use crate::key::{Key, RunSet, from_key, key};
use crate::record::{JsonRecord, Meta, Owner, Record};
use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, Flock, FlockArg, OFlag, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, linkat, unlinkat};
use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const LAST_RESERVED: &str = "last_reserved_ip.";
/// The index's last line; an index without it was torn by a crash.
const INDEX_END: &str = "end";
const XATTR: &std::ffi::CStr = c"user.ferry";
const INDEX_MAGIC: &str = "ferry-ipam-index v1";
/// Directories: writable by their owner only.
const DIR_MODE: u32 = 0o755;
/// Files: host-local's mode.
const FILE_MODE: u32 = 0o644;
/// The lock: flock(2) needs only an open fd, so a lock file anyone can open
/// lets anyone hold it forever and stall every ADD. host-local makes it
/// 0644 and still opens it as root, so 0600 keeps both working.
const LOCK_MODE: u32 = 0o600;
/// The longest file name (NAME_MAX).
const MAX_NAME: usize = 255;

type Result<T> = std::result::Result<T, IpamError>;

/// The boot ID of the running kernel, if readable.
pub fn current_boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// A directory of the store, held open: every name in it is reached through
/// this fd, so nothing can re-point the path in between.
struct DirFd {
    fd: OwnedFd,
    /// For messages only.
    path: PathBuf,
}

impl DirFd {
    fn path_of(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

fn errno_io(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// The file type bits of `st` (`S_IFREG`, `S_IFDIR`, …).
fn kind_of(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

fn is_regular(st: &FileStat) -> bool {
    kind_of(st) == SFlag::S_IFREG
}

/// What a name in a store directory turned out to be, when it is not a
/// regular file ferry may read.
fn not_regular(st: &FileStat) -> &'static str {
    match kind_of(st) {
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR | SFlag::S_IFBLK => "a device",
        _ => "not a regular file",
    }
}

/// Opens `name` in `dir` for reading: `None` when it does not exist; an
/// error when it is a symlink (never followed) or anything but a regular
/// file (a FIFO is opened without blocking, then refused).
fn open_regular(dir: &DirFd, name: &str) -> std::io::Result<Option<File>> {
    let flags = OFlag::O_RDONLY
        | OFlag::O_NOFOLLOW
        | OFlag::O_NONBLOCK
        | OFlag::O_NOCTTY
        | OFlag::O_CLOEXEC;
    let fd = match openat(&dir.fd, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(None),
        Err(Errno::ELOOP) => return Err(std::io::Error::other("is a symbolic link")),
        Err(e) => return Err(errno_io(e)),
    };
    let st = fstat(&fd).map_err(errno_io)?;
    if !is_regular(&st) {
        return Err(std::io::Error::other(format!("is {}", not_regular(&st))));
    }
    Ok(Some(File::from(fd)))
}

/// The content of the regular file `name` in `dir`, if there is one.
fn read_text(dir: &DirFd, name: &str) -> Option<String> {
    let mut f = open_regular(dir, name).ok()??;
    let mut text = String::new();
    f.read_to_string(&mut text).ok()?;
    Some(text)
}

/// Whether `name` exists in `dir` (whatever it is; links not followed).
fn exists_at(dir: &DirFd, name: &str) -> bool {
    fstatat(&dir.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok()
}

/// Removes the name `name` from `dir` (a symlink itself, never its target).
fn unlink_at(dir: &DirFd, name: &str) -> std::io::Result<()> {
    match unlinkat(&dir.fd, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(errno_io(e)),
    }
}

/// The names in `dir` (no `.`/`..`) with their type when the filesystem
/// says it (`None`: unknown).
fn list(dir: &DirFd) -> Result<Vec<(String, Option<Type>)>> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    // A fresh open of "." (not a dup): a directory stream of its own offset.
    let mut d = Dir::openat(&dir.fd, ".", flags, Mode::empty())
        .map_err(|e| IpamError::io("read directory", &dir.path, errno_io(e)))?;
    let mut out = Vec::new();
    for e in d.iter() {
        let e = e.map_err(|e| IpamError::io("read directory", &dir.path, errno_io(e)))?;
        let Ok(name) = e.file_name().to_str() else {
            continue;
        };
        if name == "." || name == ".." {
            continue;
        }
        out.push((name.to_string(), e.file_type()));
    }
    Ok(out)
}

/// Opens the directory `name` in `parent` without following a symlink,
/// creating it (0755) when `create`; `None` when it is missing and not
/// created. `own_cache`: the name is one of ferry's cache directories, where
/// a symlink or file is removed and the directory made again instead of
/// being refused. The directory must be owned by the plugin's user; group or
/// other write permission is removed.
fn open_dir_at(parent: &DirFd, name: &str, create: bool, own_cache: bool) -> Result<Option<DirFd>> {
    let path = parent.path_of(name);
    let mkdir = || match mkdirat(&parent.fd, name, Mode::from_bits_truncate(DIR_MODE)) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(IpamError::io("create directory", &path, errno_io(e))),
    };
    if create {
        mkdir()?;
    }
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = match openat(&parent.fd, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) if !create => return Ok(None),
        Err(Errno::ELOOP | Errno::ENOTDIR) if own_cache => {
            // Not ferry's: remove the name (a symlink's target is untouched).
            eprintln!(
                "ferry-ipam: {} is not a directory (symlink or file): removing it",
                path.display()
            );
            unlink_at(parent, name).map_err(|e| IpamError::io("remove", &path, e))?;
            mkdir()?;
            openat(&parent.fd, name, flags, Mode::empty())
                .map_err(|e| IpamError::io("open directory", &path, errno_io(e)))?
        }
        Err(Errno::ELOOP | Errno::ENOTDIR) => {
            return Err(IpamError::UnsafeStore {
                path,
                why: "not a directory (a symlink or a file; symlinks are never followed)".into(),
            });
        }
        Err(e) => return Err(IpamError::io("open directory", &path, errno_io(e))),
    };
    let st = fstat(&fd).map_err(|e| IpamError::io("stat", &path, errno_io(e)))?;
    let me = nix::unistd::geteuid().as_raw();
    if st.st_uid != me {
        return Err(IpamError::UnsafeStore {
            path,
            why: format!(
                "owned by uid {}, not by the plugin's user (uid {me})",
                st.st_uid
            ),
        });
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        fchmod(&fd, Mode::from_bits_truncate(mode & !0o022))
            .map_err(|e| IpamError::io("chmod go-w", &path, errno_io(e)))?;
    }
    Ok(Some(DirFd { fd, path }))
}

/// The network directory, locked for the lifetime of the value.
pub struct Store {
    dir: DirFd,
    meta: DirFd,
    tmp: DirFd,
    owners: DirFd,
    _lock: Flock<File>,
    boot_id: Option<String>,
    index: RunSet,
    /// The index was rebuilt from the per-address files in this invocation.
    fresh: bool,
    /// The index must be written back before the lock is released.
    dirty: bool,
    /// fsync records before linking them (off: see README / report).
    pub fsync: bool,
}

impl Store {
    /// Opens (creating it) and locks the store of `network`.
    pub fn open(data_dir: &Path, network: &str) -> Result<Store> {
        Self::open_inner(data_dir, network, true).map(|s| s.expect("created"))
    }

    /// Like `open`, but `None` when the store does not exist (DEL, GC, STATUS
    /// and CHECK never create it).
    pub fn open_existing(data_dir: &Path, network: &str) -> Result<Option<Store>> {
        Self::open_inner(data_dir, network, false)
    }

    fn open_inner(data_dir: &Path, network: &str, create: bool) -> Result<Option<Store>> {
        ferry_cni::args::validate_network_name(network).map_err(|e| IpamError::Config(e.msg))?;
        // The data dir is the operator's (it may sit behind a symlink such as
        // /var/run); only what is below it is the store.
        if create {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(data_dir)
                .map_err(|e| IpamError::io("create directory", data_dir, e))?;
        }
        let data = match nix::fcntl::open(
            data_dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => DirFd {
                fd,
                path: data_dir.to_path_buf(),
            },
            Err(Errno::ENOENT) if !create => return Ok(None),
            Err(e) => return Err(IpamError::io("open directory", data_dir, errno_io(e))),
        };
        let Some(dir) = open_dir_at(&data, network, create, false)? else {
            return Ok(None);
        };
        let lock_path = dir.path_of("lock");
        let fd = openat(
            &dir.fd,
            "lock",
            OFlag::O_WRONLY
                | OFlag::O_CREAT
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(LOCK_MODE),
        )
        .map_err(|e| match e {
            Errno::ELOOP => IpamError::UnsafeStore {
                path: lock_path.clone(),
                why: "is a symbolic link".into(),
            },
            e => IpamError::io("open", &lock_path, errno_io(e)),
        })?;
        let st = fstat(&fd).map_err(|e| IpamError::io("stat", &lock_path, errno_io(e)))?;
        if !is_regular(&st) {
            return Err(IpamError::UnsafeStore {
                path: lock_path,
                why: format!("is {}", not_regular(&st)),
            });
        }
        if st.st_mode & 0o077 != 0 && st.st_uid == nix::unistd::geteuid().as_raw() {
            fchmod(&fd, Mode::from_bits_truncate(LOCK_MODE))
                .map_err(|e| IpamError::io("chmod", &lock_path, errno_io(e)))?;
        }
        let lock = Flock::lock(File::from(fd), FlockArg::LockExclusive)
            .map_err(|(_, e)| IpamError::io("flock", &lock_path, errno_io(e)))?;
        // Under the lock: repairing a cache directory races with nobody.
        let meta = open_dir_at(&dir, ".ferry", true, true)?.expect("created");
        let tmp = open_dir_at(&meta, "tmp", true, true)?.expect("created");
        let owners = open_dir_at(&meta, "owners", true, true)?.expect("created");
        let mut store = Store {
            dir,
            meta,
            tmp,
            owners,
            _lock: lock,
            boot_id: current_boot_id(),
            index: RunSet::default(),
            fresh: false,
            dirty: false,
            fsync: false,
        };
        if !store.load_index()? {
            store.rebuild()?;
        }
        Ok(Some(store))
    }

    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    pub fn boot_id(&self) -> Option<&str> {
        self.boot_id.as_deref()
    }

    /// Writes the caches back (best effort: they are only caches, and a
    /// missing write leaves a stamp mismatch that forces a rebuild).
    pub fn commit(mut self) {
        self.write_index();
    }

    fn write_index(&mut self) {
        if !self.dirty {
            return;
        }
        let Ok(stamp) = self.stamp() else { return };
        let text = index_text(&self.index, &stamp);
        if self
            .write_in_place(&self.meta, "index", text.as_bytes())
            .is_ok()
        {
            self.dirty = false;
        }
    }

    fn stamp(&self) -> Result<String> {
        let m =
            fstat(&self.dir.fd).map_err(|e| IpamError::io("stat", &self.dir.path, errno_io(e)))?;
        Ok(format!(
            "{} {}.{:09} {}.{:09}",
            m.st_ino, m.st_mtime, m.st_mtime_nsec, m.st_ctime, m.st_ctime_nsec
        ))
    }

    /// Loads the index if its stamp still matches the directory.
    fn load_index(&mut self) -> Result<bool> {
        let Some(text) = read_text(&self.meta, "index") else {
            return Ok(false);
        };
        match parse_index(&text, &self.stamp()?) {
            Some(set) => {
                self.index = set;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Every name in the store that is an address in canonical form, except
    /// directories: the name is taken whatever it is (a FIFO or a symlink
    /// there blocks `link(2)` as a record does), and reading it tells
    /// whether it is a record.
    pub fn scan(&self) -> Result<Vec<IpAddr>> {
        let mut out = Vec::new();
        for (name, kind) in list(&self.dir)? {
            let Ok(ip) = name.parse::<IpAddr>() else {
                continue;
            };
            if ip.to_string() != name {
                continue;
            }
            let is_dir = match kind {
                Some(t) => t == Type::Directory,
                // The filesystem did not say (DT_UNKNOWN): ask, not following.
                None => fstatat(&self.dir.fd, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| kind_of(&st) == SFlag::S_IFDIR),
            };
            if !is_dir {
                out.push(ip);
            }
        }
        Ok(out)
    }

    /// Rebuilds the index and the owner files from the per-address files.
    pub fn rebuild(&mut self) -> Result<()> {
        let mut index = RunSet::default();
        let mut owners: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for ip in self.scan()? {
            index.insert(key(ip));
            if let Some(Record::Held { owner, .. }) = self.read_record(ip)
                && let Some(name) = owner_file(&owner)
            {
                owners.entry(name).or_default().push(ip);
            }
        }
        for (name, _) in list(&self.owners)? {
            if !owners.contains_key(&name) {
                let _ = unlink_at(&self.owners, &name);
            }
        }
        for (name, mut ips) in owners {
            ips.sort();
            let text = owner_text(&ips);
            if read_text(&self.owners, &name).as_deref() != Some(text.as_str()) {
                self.write_atomic(&self.owners, &name, text.as_bytes())?;
            }
        }
        // Nobody else writes while we hold the lock: leftovers are from
        // crashes. Only names in the tmp directory itself go (never through
        // a link: the directory was opened without following one).
        for (name, _) in list(&self.tmp)? {
            let _ = unlink_at(&self.tmp, &name);
        }
        self.index = index;
        self.fresh = true;
        self.dirty = true;
        Ok(())
    }

    fn tmp_name() -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        format!(
            "{}.{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A new, empty temp file in `.ferry/tmp`: its name and the open file.
    fn new_tmp(&self) -> Result<(String, File)> {
        let name = Self::tmp_name();
        let fd = openat(
            &self.tmp.fd,
            name.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(FILE_MODE),
        )
        .map_err(|e| IpamError::io("create", self.tmp.path_of(&name), errno_io(e)))?;
        Ok((name, File::from(fd)))
    }

    /// Writes `name` in `dir` atomically: a temp file renamed over it
    /// (`rename(2)` replaces the name, whatever it was, a symlink included,
    /// and never writes through it).
    fn write_atomic(&self, dir: &DirFd, name: &str, bytes: &[u8]) -> Result<()> {
        let (tmp, mut f) = self.new_tmp()?;
        let res = f
            .write_all(bytes)
            .and_then(|_| if self.fsync { f.sync_data() } else { Ok(()) })
            .map_err(|e| IpamError::io("write", self.tmp.path_of(&tmp), e))
            .and_then(|_| {
                renameat(&self.tmp.fd, tmp.as_str(), &dir.fd, name)
                    .map_err(|e| IpamError::io("rename", dir.path_of(name), errno_io(e)))
            });
        if res.is_err() {
            let _ = unlink_at(&self.tmp, &tmp);
        }
        res
    }

    /// Overwrites a cache or hint file in place. Not atomic on purpose:
    /// replacing a file by rename (or truncating it to zero) makes ext4 flush
    /// it (auto_da_alloc), ~0.3 ms per file on every ADD. Readers validate:
    /// the index needs its end marker and stamp, a torn last_reserved_ip is
    /// only a different starting point for the round robin.
    ///
    /// Only a plain file of ours is written in place: a symlink, a FIFO, a
    /// hard link to some other file (link count > 1) or anything else is
    /// replaced by an atomic write instead, never written through.
    fn write_in_place(&self, dir: &DirFd, name: &str, bytes: &[u8]) -> Result<()> {
        let flags = OFlag::O_WRONLY
            | OFlag::O_CREAT
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC;
        let plain = openat(&dir.fd, name, flags, Mode::from_bits_truncate(FILE_MODE))
            .ok()
            .filter(|fd| {
                fstat(fd).is_ok_and(|st| {
                    is_regular(&st)
                        && st.st_nlink == 1
                        && st.st_uid == nix::unistd::geteuid().as_raw()
                })
            });
        let Some(fd) = plain else {
            return self.write_atomic(dir, name, bytes);
        };
        let mut f = File::from(fd);
        f.write_all(bytes)
            .and_then(|_| f.set_len(bytes.len() as u64))
            .map_err(|e| IpamError::io("write", dir.path_of(name), e))
    }

    /// The record of `ip`; `None` when no file holds it. Anything there that
    /// is not a readable regular file (a symlink, a FIFO, …) is `Garbage`.
    pub fn read_record(&self, ip: IpAddr) -> Option<Record> {
        let name = ip.to_string();
        let mut f = match open_regular(&self.dir, &name) {
            Ok(None) => return None,
            Ok(Some(f)) => f,
            Err(_) => return Some(Record::Garbage),
        };
        let mut content = Vec::new();
        if f.read_to_end(&mut content).is_err() {
            return Some(Record::Garbage);
        }
        let x = get_xattr(&f);
        Some(Record::parse(&content, x.as_deref()))
    }

    /// Creates the reservation file of `ip`; false when `ip` is already held.
    pub fn create_record(&self, ip: IpAddr, owner: &Owner, meta: &Meta) -> Result<bool> {
        let (tmp, mut f) = self.new_tmp()?;
        let res = (|| {
            let xattr = serde_json::to_vec(meta).expect("meta serializes");
            let content = if set_xattr(&f, &xattr).is_ok() {
                owner.content()
            } else {
                // No user xattrs on this filesystem: the whole record as JSON.
                serde_json::to_string(&JsonRecord {
                    container_id: owner.id.clone(),
                    ifname: owner.ifname.clone().unwrap_or_default(),
                    meta: meta.clone(),
                })
                .expect("record serializes")
            };
            f.write_all(content.as_bytes())
                .map_err(|e| IpamError::io("write", self.tmp.path_of(&tmp), e))?;
            if self.fsync {
                f.sync_data()
                    .map_err(|e| IpamError::io("fsync", self.tmp.path_of(&tmp), e))?;
            }
            let dst = ip.to_string();
            // linkat without AT_SYMLINK_FOLLOW: fails on any existing name.
            match linkat(
                &self.tmp.fd,
                tmp.as_str(),
                &self.dir.fd,
                dst.as_str(),
                AtFlags::empty(),
            ) {
                Ok(()) => Ok(true),
                Err(Errno::EEXIST) => Ok(false),
                Err(e) => Err(IpamError::io("link", self.dir.path_of(&dst), errno_io(e))),
            }
        })();
        let _ = unlink_at(&self.tmp, &tmp);
        res
    }

    /// Removes the reservation file of `ip`.
    fn remove_record(&mut self, ip: IpAddr) -> Result<()> {
        let name = ip.to_string();
        unlink_at(&self.dir, &name)
            .map_err(|e| IpamError::io("remove", self.dir.path_of(&name), e))?;
        self.index.remove(key(ip));
        self.dirty = true;
        Ok(())
    }

    /// The addresses (id, ifname) holds, verified against their records.
    pub fn held_by(&self, id: &str, ifname: &str) -> Vec<IpAddr> {
        let exact = owner_file_name(id, Some(ifname));
        let legacy = owner_file_name(id, None);
        let (Some(exact), Some(legacy)) = (exact, legacy) else {
            // No owner cache for this attachment (a name too long for one):
            // the records themselves say.
            return self.held_by_scan(id, ifname);
        };
        let mut out = Vec::new();
        for name in [exact, legacy] {
            let Some(text) = read_text(&self.owners, &name) else {
                continue;
            };
            for ip in text.lines().filter_map(|l| l.parse::<IpAddr>().ok()) {
                if !out.contains(&ip)
                    && let Some(Record::Held { owner, .. }) = self.read_record(ip)
                    && owner.matches(id, ifname)
                {
                    out.push(ip);
                }
            }
        }
        out
    }

    /// [`held_by`](Self::held_by) by reading every record.
    fn held_by_scan(&self, id: &str, ifname: &str) -> Vec<IpAddr> {
        let Ok(all) = self.scan() else {
            return vec![];
        };
        let mut out: Vec<IpAddr> = all
            .into_iter()
            .filter(|ip| {
                matches!(self.read_record(*ip),
                    Some(Record::Held { owner, .. }) if owner.matches(id, ifname))
            })
            .collect();
        out.sort();
        out
    }

    fn write_owner(&mut self, owner: &Owner, ips: &[IpAddr]) -> Result<()> {
        let Some(name) = owner_file(owner) else {
            // Too long for a file name: this owner is found by a scan.
            return Ok(());
        };
        if ips.is_empty() {
            let _ = unlink_at(&self.owners, &name);
            return Ok(());
        }
        let mut ips = ips.to_vec();
        ips.sort();
        self.write_atomic(&self.owners, &name, owner_text(&ips).as_bytes())
    }

    fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        read_text(&self.dir, &format!("{LAST_RESERVED}{set}"))?
            .trim()
            .parse()
            .ok()
    }

    fn set_last_reserved(&mut self, set: usize, ip: IpAddr) -> Result<()> {
        self.dirty = true;
        let name = format!("{LAST_RESERVED}{set}");
        self.write_in_place(&self.dir, &name, ip.to_string().as_bytes())
    }
    /// Reserves one address per range set for (id, ifname), in set order.
    /// Idempotent: what the attachment already holds is returned again.
    pub fn allocate(
        &mut self,
        sets: &[RangeSet],
        id: &str,
        ifname: &str,
        meta: &Meta,
        requested: &[IpAddr],
    ) -> Result<Vec<IpAddr>> {
        let owner = Owner::new(id, ifname);
        let set_of = |ip: IpAddr| sets.iter().position(|s| s.iter().any(|r| r.contains(ip)));
        let mut want: Vec<Option<IpAddr>> = vec![None; sets.len()];
        for &ip in requested {
            let Some(i) = set_of(ip) else {
                return Err(IpamError::BadRequestedIp {
                    ip,
                    why: "not inside any range".into(),
                });
            };
            if let Some(other) = want[i] {
                return Err(IpamError::BadRequestedIp {
                    ip,
                    why: format!("{other} is also requested from range set {i}"),
                });
            }
            if sets[i].iter().any(|r| r.gateway == ip) {
                return Err(IpamError::BadRequestedIp {
                    ip,
                    why: "it is the gateway".into(),
                });
            }
            want[i] = Some(ip);
        }
        let already = self.held_by(id, ifname);
        let mut result: Vec<Option<IpAddr>> = vec![None; sets.len()];
        for &ip in &already {
            if let Some(i) = set_of(ip) {
                result[i] = Some(ip);
            }
        }
        let mut created = Vec::new();
        let outcome = (|| {
            for (i, set) in sets.iter().enumerate() {
                match (result[i], want[i]) {
                    (Some(h), Some(w)) if h != w => {
                        return Err(IpamError::BadRequestedIp {
                            ip: w,
                            why: format!("{owner} already holds {h} in range set {i}"),
                        });
                    }
                    (Some(_), _) => continue,
                    (None, Some(w)) => self.reserve_requested(w, &owner, meta)?,
                    (None, None) => {
                        let ip = self.reserve_next(i, set, &owner, meta)?;
                        result[i] = Some(ip);
                    }
                }
                let ip = result[i].or(want[i]).expect("set above");
                result[i] = Some(ip);
                created.push(ip);
                self.set_last_reserved(i, ip)?;
            }
            let mut all = already.clone();
            all.extend(created.iter().copied());
            self.write_owner(&owner, &all)
        })();
        if let Err(e) = outcome {
            for ip in created {
                let _ = self.remove_record(ip);
            }
            return Err(e);
        }
        Ok(result.into_iter().map(|r| r.expect("every set")).collect())
    }

    fn reserve_requested(&mut self, ip: IpAddr, owner: &Owner, meta: &Meta) -> Result<()> {
        for _ in 0..2 {
            self.dirty = true;
            if self.create_record(ip, owner, meta)? {
                self.index.insert(key(ip));
                return Ok(());
            }
            self.index.insert(key(ip));
            match self.read_record(ip) {
                // Raced with our own removal: retry.
                None => continue,
                Some(r) => {
                    if r.stale_reason(self.boot_id()).is_some() {
                        self.remove_record(ip)?;
                        continue;
                    }
                    let holder = r
                        .owner()
                        .map(|o| o.to_string())
                        .unwrap_or_else(|| "an unknown holder".into());
                    return Err(IpamError::RequestedIpTaken { ip, holder });
                }
            }
        }
        Err(IpamError::RequestedIpTaken {
            ip,
            holder: "a concurrent writer".into(),
        })
    }

    /// Round robin from `last_reserved_ip.<set>` + 1 over the ranges of the
    /// set, skipping held runs via the index; then a rebuild of the index;
    /// then reclaiming provably stale reservations; then exhaustion.
    fn reserve_next(
        &mut self,
        set_idx: usize,
        set: &RangeSet,
        owner: &Owner,
        meta: &Meta,
    ) -> Result<IpAddr> {
        let mut reclaimed = false;
        loop {
            if let Some(ip) = self.search(set_idx, set, owner, meta)? {
                return Ok(ip);
            }
            if !self.fresh {
                self.rebuild()?;
                continue;
            }
            if !reclaimed {
                reclaimed = true;
                if self.reclaim_stale(set)? > 0 {
                    continue;
                }
            }
            return Err(IpamError::Exhausted {
                set: set_idx,
                ranges: describe(set),
                held: held_in(&self.index, set),
            });
        }
    }

    fn search(
        &mut self,
        set_idx: usize,
        set: &RangeSet,
        owner: &Owner,
        meta: &Meta,
    ) -> Result<Option<IpAddr>> {
        let (first, pos) = match self.last_reserved(set_idx) {
            Some(last) => match set.iter().position(|r| r.contains(last)) {
                Some(ri) => (ri, key(last).checked_add(1)),
                None => (0, None),
            },
            None => (0, None),
        };
        let n = set.len();
        let mut segments: Vec<(usize, Key, Key)> = Vec::new();
        let r0 = &set[first];
        let start_pos = pos.unwrap_or(r0.start_key());
        if start_pos <= r0.end_key() {
            segments.push((first, start_pos, r0.end_key()));
        }
        for step in 1..n {
            let ri = (first + step) % n;
            segments.push((ri, set[ri].start_key(), set[ri].end_key()));
        }
        if start_pos > r0.start_key() {
            segments.push((
                first,
                r0.start_key(),
                start_pos.min(r0.end_key().saturating_add(1)) - 1,
            ));
        }
        for (ri, lo, hi) in segments {
            let r: &Range = &set[ri];
            let v4 = r.start.is_ipv4();
            let mut k = lo;
            while let Some(free) = self.index.next_free(k, hi) {
                if free != r.gateway_key() {
                    let ip = from_key(free, v4);
                    self.dirty = true;
                    let created = self.create_record(ip, owner, meta)?;
                    // Held either way now (by us, or by a writer the index missed).
                    self.index.insert(free);
                    if created {
                        return Ok(Some(ip));
                    }
                }
                match free.checked_add(1) {
                    Some(next) if next <= hi => k = next,
                    _ => break,
                }
            }
        }
        Ok(None)
    }

    /// Removes the provably stale reservations of a range set; how many.
    pub fn reclaim_stale(&mut self, set: &RangeSet) -> Result<usize> {
        let mut n = 0;
        for ip in self.scan()? {
            if !set.iter().any(|r| r.contains(ip)) {
                continue;
            }
            let Some(rec) = self.read_record(ip) else {
                continue;
            };
            if let Some(why) = rec.stale_reason(self.boot_id()) {
                eprintln!("ferry-ipam: reclaiming {ip}: {why}");
                self.remove_record(ip)?;
                n += 1;
            }
        }
        if n > 0 {
            self.rebuild()?;
        }
        Ok(n)
    }

    /// Releases everything (id, ifname) holds. Returns what was released.
    pub fn release(&mut self, id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        let ips = self.held_by(id, ifname);
        for &ip in &ips {
            self.remove_record(ip)?;
        }
        if let Some(exact) = owner_file_name(id, Some(ifname))
            && exists_at(&self.owners, &exact)
        {
            self.dirty = true;
            let _ = unlink_at(&self.owners, &exact);
        }
        // host-local's id-only records match any ifname: the whole file went.
        if let Some(legacy) = owner_file_name(id, None)
            && exists_at(&self.owners, &legacy)
        {
            let left: Vec<IpAddr> = read_text(&self.owners, &legacy)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.parse().ok())
                .filter(|ip| !ips.contains(ip))
                .collect();
            let owner = Owner {
                id: id.into(),
                ifname: None,
            };
            self.write_owner(&owner, &left)?;
        }
        Ok(ips)
    }

    /// CNI GC: releases every reservation (ferry's, host-local's, unreadable
    /// ones) whose attachment is not in `valid`. Returns what was released.
    pub fn gc(&mut self, valid: &[(String, String)]) -> Result<Vec<IpAddr>> {
        let valid: HashSet<(&str, &str)> = valid
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let ids: HashSet<&str> = valid.iter().map(|(a, _)| *a).collect();
        let mut released = Vec::new();
        for ip in self.scan()? {
            let keep = match self.read_record(ip) {
                None => continue,
                Some(Record::Held { owner, .. }) => match &owner.ifname {
                    Some(i) => valid.contains(&(owner.id.as_str(), i.as_str())),
                    None => ids.contains(owner.id.as_str()),
                },
                Some(Record::Unnamed | Record::Garbage) => false,
            };
            if !keep {
                self.remove_record(ip)?;
                released.push(ip);
            }
        }
        self.rebuild()?;
        Ok(released)
    }

    /// Free addresses per range set (stale reservations counted as free when
    /// the index says the set is full).
    pub fn free_per_set(&mut self, sets: &[RangeSet]) -> Result<Vec<u128>> {
        let mut out = Vec::new();
        for set in sets {
            let mut free = free_in(&self.index, set);
            if free == 0 && !self.fresh {
                self.rebuild()?;
                free = free_in(&self.index, set);
            }
            if free == 0 {
                for ip in self.scan()? {
                    if set.iter().any(|r| r.contains(ip))
                        && self
                            .read_record(ip)
                            .is_some_and(|r| r.stale_reason(self.boot_id()).is_some())
                    {
                        free += 1;
                    }
                }
            }
            out.push(free);
        }
        Ok(out)
    }

    /// When the reservation file of `ip` was written (its mtime; a record is
    /// never rewritten, only replaced), without following a symlink.
    pub fn record_written(&self, ip: IpAddr) -> Option<std::time::SystemTime> {
        let st = fstatat(
            &self.dir.fd,
            ip.to_string().as_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .ok()?;
        let secs = u64::try_from(st.st_mtime).ok()?;
        let nanos = u32::try_from(st.st_mtime_nsec).ok()?;
        Some(std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos))
    }

    /// Every reservation, for inspection and tests.
    pub fn records(&self) -> Result<Vec<(IpAddr, Record)>> {
        Ok(self
            .scan()?
            .into_iter()
            .filter_map(|ip| self.read_record(ip).map(|r| (ip, r)))
            .collect())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.write_index();
    }
}

/// The owner cache's file name of (id, ifname) (`<id>:` for host-local's
/// id-only records); `None` when it would not fit in one file name, or when
/// the names break the spec's rules (then no path is ever made of them).
fn owner_file_name(id: &str, ifname: Option<&str>) -> Option<String> {
    if !ferry_cni::args::is_valid_container_id(id)
        || ifname.is_some_and(|i| !ferry_cni::args::is_valid_ifname(i))
    {
        return None;
    }
    let name = format!("{id}:{}", ifname.unwrap_or(""));
    (name.len() <= MAX_NAME).then_some(name)
}

fn owner_file(o: &Owner) -> Option<String> {
    owner_file_name(&o.id, o.ifname.as_deref())
}

fn owner_text(ips: &[IpAddr]) -> String {
    ips.iter().map(|ip| format!("{ip}\n")).collect()
}

fn describe(set: &RangeSet) -> String {
    set.iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn held_in(index: &RunSet, set: &RangeSet) -> u128 {
    set.iter()
        .map(|r| {
            let n = index.count_in(r.start_key(), r.end_key());
            if r.contains(r.gateway) && index.contains(r.gateway_key()) {
                n - 1
            } else {
                n
            }
        })
        .fold(0u128, |a, b| a.saturating_add(b))
}

fn free_in(index: &RunSet, set: &RangeSet) -> u128 {
    let cap = set
        .iter()
        .map(Range::capacity)
        .fold(0u128, |a, b| a.saturating_add(b));
    cap.saturating_sub(held_in(index, set))
}

fn set_xattr(f: &File, value: &[u8]) -> std::io::Result<()> {
    // SAFETY: valid fd, NUL-terminated name, pointer and length of a live slice.
    let rc = unsafe {
        libc::fsetxattr(
            f.as_raw_fd(),
            XATTR.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn get_xattr(f: &File) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid fd, NUL-terminated name, writable buffer of the given length.
    let n = unsafe {
        libc::fgetxattr(
            f.as_raw_fd(),
            XATTR.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

/// The index file's text: the magic, the directory stamp it is valid for,
/// one `start end` line (hex keys) per run of held addresses, the end marker.
pub fn index_text(index: &RunSet, stamp: &str) -> String {
    let mut text = format!("{INDEX_MAGIC}\n{stamp}\n");
    for (a, b) in index.runs() {
        text.push_str(&format!("{a:x} {b:x}\n"));
    }
    text.push_str(INDEX_END);
    text.push('\n');
    text
}

/// The held runs an index file records, if it is whole, well formed and
/// written for the directory `stamp` describes; `None` means "rebuild from
/// the per-address files" (a torn write, a stale stamp, or anything else
/// that was put there).
pub fn parse_index(text: &str, stamp: &str) -> Option<RunSet> {
    let mut lines = text.lines();
    if lines.next() != Some(INDEX_MAGIC) || lines.next() != Some(stamp) {
        return None;
    }
    let mut runs = Vec::new();
    for l in lines {
        if l == INDEX_END {
            return RunSet::from_runs(runs);
        }
        let (a, b) = l.split_once(' ')?;
        runs.push((
            Key::from_str_radix(a, 16).ok()?,
            Key::from_str_radix(b, 16).ok()?,
        ));
    }
    // Torn by a crash mid-write.
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IpamConfig;
    use serde_json::json;

    /// A temp data dir removed on drop, even when the test panics.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "ferry-ipam-unit-{}-{}-{tag}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sets(ipam: serde_json::Value) -> Vec<RangeSet> {
        IpamConfig::parse(&ipam).unwrap().ranges
    }

    fn meta() -> Meta {
        Meta {
            netns: "/".into(),
            boot_id: current_boot_id().unwrap_or_default(),
            ..Default::default()
        }
    }

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn add(d: &TempDir, s: &[RangeSet], id: &str, req: &[IpAddr]) -> Result<Vec<IpAddr>> {
        let mut st = Store::open(&d.0, "net")?;
        let r = st.allocate(s, id, "eth0", &meta(), req);
        st.commit();
        r
    }

    #[test]
    fn index_text_round_trips_and_anything_else_means_rebuild() {
        let set = RunSet::from_runs([(1, 3), (10, 10), (u128::MAX - 1, u128::MAX)]).unwrap();
        let text = index_text(&set, "7 1.000000001 2.000000002");
        assert_eq!(parse_index(&text, "7 1.000000001 2.000000002"), Some(set));
        assert_eq!(
            parse_index(&text, "8 1.000000001 2.000000002"),
            None,
            "stale stamp"
        );
        let torn = &text[..text.len() - "end\n".len()];
        assert_eq!(parse_index(torn, "7 1.000000001 2.000000002"), None, "torn");
        for bad in ["3 1", "1 x", "5", "1 3 4"] {
            let t = text.replace("a a", bad);
            assert_eq!(parse_index(&t, "7 1.000000001 2.000000002"), None, "{bad}");
        }
    }

    #[test]
    fn allocation_order_round_robin_skips_gateway() {
        let d = TempDir::new("order");
        let s = sets(json!({"type": "t", "ranges": [
            [{"subnet": "10.0.0.0/29", "gateway": "10.0.0.3"}],
            [{"subnet": "fd00::/125"}]]}));
        let got: Vec<Vec<IpAddr>> = ["a", "b", "c"]
            .iter()
            .map(|id| add(&d, &s, id, &[]).unwrap())
            .collect();
        assert_eq!(
            got,
            vec![
                ips(&["10.0.0.1", "fd00::2"]),
                ips(&["10.0.0.2", "fd00::3"]),
                ips(&["10.0.0.4", "fd00::4"]),
            ]
        );
        // Idempotent retry: same addresses, nothing new reserved.
        assert_eq!(
            add(&d, &s, "b", &[]).unwrap(),
            ips(&["10.0.0.2", "fd00::3"])
        );
        // Round robin: a released address is not reused before the range wraps.
        Store::open(&d.0, "net")
            .unwrap()
            .release("a", "eth0")
            .unwrap();
        assert_eq!(
            add(&d, &s, "d", &[]).unwrap(),
            ips(&["10.0.0.5", "fd00::5"])
        );
        assert_eq!(
            add(&d, &s, "e", &[]).unwrap(),
            ips(&["10.0.0.6", "fd00::6"])
        );
        // Wraps to the start and finds the released .1.
        assert_eq!(
            add(&d, &s, "f", &[]).unwrap(),
            ips(&["10.0.0.1", "fd00::7"])
        );
        let last = fs::read_to_string(d.0.join("net/last_reserved_ip.0")).unwrap();
        assert_eq!(last, "10.0.0.1");
        // Exhausted: the v4 set (.1 .2 .4 .5 .6) is full; nothing leaks from set 1.
        let e = add(&d, &s, "g", &[]).unwrap_err();
        assert!(matches!(e, IpamError::Exhausted { set: 0, .. }), "{e}");
        assert_eq!(ferry_cni::CniError::from(e).code.as_u32(), 50);
        let st = Store::open(&d.0, "net").unwrap();
        assert_eq!(
            st.records().unwrap().len(),
            10,
            "g's v6 address was rolled back"
        );
        assert!(st.held_by("g", "eth0").is_empty());
    }

    #[test]
    fn multi_range_sets_continue_into_next_range() {
        let d = TempDir::new("multi");
        let s = sets(json!({"type": "t", "ranges": [[
            {"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.10", "rangeEnd": "10.0.0.11"},
            {"subnet": "10.0.1.0/24", "rangeStart": "10.0.1.20", "rangeEnd": "10.0.1.20"}]]}));
        let got: Vec<IpAddr> = ["a", "b", "c"]
            .iter()
            .map(|id| add(&d, &s, id, &[]).unwrap()[0])
            .collect();
        assert_eq!(got, ips(&["10.0.0.10", "10.0.0.11", "10.0.1.20"]));
        assert!(add(&d, &s, "d", &[]).is_err());
    }

    #[test]
    fn requested_ips_table() {
        let d = TempDir::new("req");
        let s = sets(json!({"type": "t", "ranges": [
            [{"subnet": "10.0.0.0/24"}], [{"subnet": "fd00::/64"}]]}));
        add(&d, &s, "holder", &ips(&["10.0.0.50"])).unwrap();
        // (requested, Ok(result) or Err(code))
        type Case = (
            &'static str,
            Vec<IpAddr>,
            std::result::Result<Vec<IpAddr>, u32>,
        );
        let cases: Vec<Case> = vec![
            (
                "one v4",
                ips(&["10.0.0.7"]),
                Ok(ips(&["10.0.0.7", "fd00::3"])),
            ),
            (
                "both",
                ips(&["10.0.0.8", "fd00::8"]),
                Ok(ips(&["10.0.0.8", "fd00::8"])),
            ),
            ("outside", ips(&["10.9.0.1"]), Err(100)),
            ("two per set", ips(&["10.0.0.9", "10.0.0.10"]), Err(100)),
            ("gateway", ips(&["10.0.0.1"]), Err(100)),
            ("broadcast", ips(&["10.0.0.255"]), Err(100)),
            ("taken", ips(&["10.0.0.50"]), Err(101)),
        ];
        for (i, (name, req, want)) in cases.into_iter().enumerate() {
            let id = format!("c{i}");
            let got =
                add(&d, &s, &id, &req).map_err(|e| ferry_cni::CniError::from(e).code.as_u32());
            assert_eq!(got, want, "{name}");
            if got.is_err() {
                assert!(
                    Store::open(&d.0, "net")
                        .unwrap()
                        .held_by(&id, "eth0")
                        .is_empty(),
                    "{name}: rolled back"
                );
            }
        }
        // Retrying with the same request is idempotent; another address for
        // the same attachment is refused.
        assert_eq!(
            add(&d, &s, "c0", &ips(&["10.0.0.7"])).unwrap(),
            ips(&["10.0.0.7", "fd00::3"])
        );
        assert_eq!(
            add(&d, &s, "c0", &ips(&["10.0.0.70"]))
                .map_err(|e| ferry_cni::CniError::from(e).code.as_u32()),
            Err(100)
        );
    }

    fn write_foreign(d: &TempDir, ip: &str, content: &[u8], xattr: Option<&[u8]>) {
        let p = d.0.join("net").join(ip);
        fs::write(&p, content).unwrap();
        if let Some(x) = xattr {
            set_xattr(&File::options().write(true).open(&p).unwrap(), x).unwrap();
        }
    }

    #[test]
    fn stale_reclaim_only_with_proof() {
        let d = TempDir::new("stale");
        let s = sets(json!({"type": "t", "subnet": "10.0.0.0/29"}));
        // .2-.6 allocatable (.1 gateway): fill with five kinds of record.
        Store::open(&d.0, "net").unwrap().commit();
        let boot = current_boot_id().unwrap_or_default();
        let cur = format!(r#"{{"netns":"/","bootID":"{boot}"}}"#);
        write_foreign(&d, "10.0.0.2", b"hl\r\neth0", None); // host-local: no proof
        write_foreign(
            &d,
            "10.0.0.3",
            b"old\r\neth0",
            Some(br#"{"netns":"/","bootID":"previous-boot"}"#),
        );
        write_foreign(&d, "10.0.0.4", b"live\r\neth0", Some(cur.as_bytes())); // live
        write_foreign(&d, "10.0.0.5", b"", None); // torn / empty
        write_foreign(
            &d,
            "10.0.0.6",
            b"gone\r\neth0",
            Some(format!(r#"{{"netns":"/nonexistent/ns","bootID":"{boot}"}}"#).as_bytes()),
        );
        let mut st = Store::open(&d.0, "net").unwrap();
        assert_eq!(
            st.free_per_set(&s).unwrap(),
            vec![3],
            "stale counted as free"
        );
        drop(st);
        let mut got: Vec<IpAddr> = ["n1", "n2", "n3"]
            .iter()
            .map(|id| add(&d, &s, id, &[]).unwrap()[0])
            .collect();
        got.sort();
        assert_eq!(got, ips(&["10.0.0.3", "10.0.0.5", "10.0.0.6"]));
        assert!(matches!(
            add(&d, &s, "n4", &[]),
            Err(IpamError::Exhausted { .. })
        ));
        let st = Store::open(&d.0, "net").unwrap();
        assert_eq!(
            st.held_by("hl", "eth0"),
            ips(&["10.0.0.2"]),
            "host-local record honoured"
        );
        assert_eq!(st.held_by("live", "eth0"), ips(&["10.0.0.4"]));
        assert!(st.held_by("old", "eth0").is_empty());
    }

    #[test]
    fn index_follows_foreign_changes_and_crashes() {
        let d = TempDir::new("index");
        let s = sets(json!({"type": "t", "subnet": "10.0.0.0/24"}));
        add(&d, &s, "a", &[]).unwrap();
        // A foreign writer (host-local) reserves the next address: the
        // directory stamp changes, the index is rebuilt, nothing is reused.
        write_foreign(&d, "10.0.0.3", b"hl\r\neth1", None);
        assert_eq!(add(&d, &s, "b", &[]).unwrap(), ips(&["10.0.0.4"]));
        // Garbage index: rebuilt, still correct.
        fs::write(d.0.join("net/.ferry/index"), "junk").unwrap();
        assert_eq!(add(&d, &s, "c", &[]).unwrap(), ips(&["10.0.0.5"]));
        // Index that claims a stale stamp but wrong content is never trusted
        // over the link(2) arbiter: an index saying "all free" still cannot
        // cause a double allocation.
        let st = Store::open(&d.0, "net").unwrap();
        let stamp = st.stamp().unwrap();
        drop(st);
        fs::write(
            d.0.join("net/.ferry/index"),
            format!("{INDEX_MAGIC}\n{stamp}\n"),
        )
        .unwrap();
        fs::write(d.0.join("net/last_reserved_ip.0"), "10.0.0.1").unwrap();
        let st = Store::open(&d.0, "net").unwrap();
        let stamp = st.stamp().unwrap();
        drop(st);
        fs::write(
            d.0.join("net/.ferry/index"),
            format!("{INDEX_MAGIC}\n{stamp}\n"),
        )
        .unwrap();
        assert_eq!(add(&d, &s, "d", &[]).unwrap(), ips(&["10.0.0.6"]));
        let st = Store::open(&d.0, "net").unwrap();
        assert_eq!(st.held_by("hl", "eth1"), ips(&["10.0.0.3"]));
        assert_eq!(st.records().unwrap().len(), 5);
    }

    #[test]
    fn torn_index_is_not_trusted() {
        let d = TempDir::new("torn");
        let s = sets(json!({"type": "t", "subnet": "10.0.0.0/24"}));
        add(&d, &s, "a", &[]).unwrap();
        add(&d, &s, "b", &[]).unwrap();
        let path = d.0.join("net/.ferry/index");
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("\nend\n"), "{text:?}");
        let mut st = Store::open(&d.0, "net").unwrap();
        assert!(st.load_index().unwrap());
        // A crash mid-write leaves a prefix: no end marker, so not loaded.
        fs::write(&path, &text[..text.len() - 4]).unwrap();
        assert!(!st.load_index().unwrap());
        drop(st);
        assert_eq!(add(&d, &s, "c", &[]).unwrap(), ips(&["10.0.0.4"]));
    }

    #[test]
    fn gc_and_release() {
        let d = TempDir::new("gc");
        let s = sets(json!({"type": "t", "subnet": "10.0.0.0/24"}));
        for id in ["a", "b", "c"] {
            add(&d, &s, id, &[]).unwrap();
        }
        write_foreign(&d, "10.0.0.100", b"hl\r\neth0", None);
        write_foreign(&d, "10.0.0.101", b"hlold", None);
        write_foreign(&d, "10.0.0.102", b"\x00garbage", None);
        let mut st = Store::open(&d.0, "net").unwrap();
        let valid = vec![
            ("b".to_string(), "eth0".to_string()),
            ("hlold".to_string(), "eth3".to_string()),
        ];
        let mut rel = st.gc(&valid).unwrap();
        rel.sort();
        assert_eq!(
            rel,
            ips(&["10.0.0.2", "10.0.0.4", "10.0.0.100", "10.0.0.102"])
        );
        assert_eq!(st.records().unwrap().len(), 2);
        // Release is idempotent, also for host-local's id-only record.
        assert_eq!(st.release("hlold", "eth9").unwrap(), ips(&["10.0.0.101"]));
        assert!(st.release("hlold", "eth9").unwrap().is_empty());
        assert_eq!(st.release("b", "eth0").unwrap(), ips(&["10.0.0.3"]));
        assert!(st.records().unwrap().is_empty());
        st.commit();
        assert!(Store::open_existing(&d.0, "nope").unwrap().is_none());
        assert!(!d.0.join("nope").exists());
        assert!(matches!(Store::open(&d.0, ".."), Err(IpamError::Config(_))));
    }
}
