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
//! Crash safety: every file appears complete or not at all (temp + link or
//! rename); a crash between steps leaves the directory stamp different from
//! the cache's, so the next invocation rebuilds.

use crate::config::{Range, RangeSet};
use crate::error::IpamError;
use crate::key::{Key, RunSet, from_key, key};
use crate::record::{JsonRecord, Meta, Owner, Record};
use nix::fcntl::{Flock, FlockArg};
use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const LAST_RESERVED: &str = "last_reserved_ip.";
/// The index's last line; an index without it was torn by a crash.
const INDEX_END: &str = "end";
const XATTR: &std::ffi::CStr = c"user.ferry";
const INDEX_MAGIC: &str = "ferry-ipam-index v1";

type Result<T> = std::result::Result<T, IpamError>;

/// The boot ID of the running kernel, if readable.
pub fn current_boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The network directory, locked for the lifetime of the value.
pub struct Store {
    dir: PathBuf,
    meta_dir: PathBuf,
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

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> IpamError + 'a {
    move |e| IpamError::io(op, path, e)
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
        let dir = data_dir.join(network);
        if !create && !dir.is_dir() {
            return Ok(None);
        }
        let meta_dir = dir.join(".ferry");
        for d in [&dir, &meta_dir.join("tmp"), &meta_dir.join("owners")] {
            fs::create_dir_all(d).map_err(io("create directory", d))?;
        }
        let lock_path = dir.join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o644)
            .open(&lock_path)
            .map_err(io("open", &lock_path))?;
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| IpamError::io("flock", &lock_path, e.into()))?;
        let mut store = Store {
            dir,
            meta_dir,
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
        &self.dir
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
        let mut text = format!("{INDEX_MAGIC}\n{stamp}\n");
        for (a, b) in self.index.runs() {
            text.push_str(&format!("{a:x} {b:x}\n"));
        }
        text.push_str(INDEX_END);
        text.push('\n');
        if self
            .write_in_place(&self.meta_dir.join("index"), text.as_bytes())
            .is_ok()
        {
            self.dirty = false;
        }
    }

    fn stamp(&self) -> Result<String> {
        let m = fs::metadata(&self.dir).map_err(io("stat", &self.dir))?;
        Ok(format!(
            "{} {}.{:09} {}.{:09}",
            m.ino(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        ))
    }

    /// Loads the index if its stamp still matches the directory.
    fn load_index(&mut self) -> Result<bool> {
        let Ok(text) = fs::read_to_string(self.meta_dir.join("index")) else {
            return Ok(false);
        };
        let mut lines = text.lines();
        if lines.next() != Some(INDEX_MAGIC) || lines.next() != Some(self.stamp()?.as_str()) {
            return Ok(false);
        }
        let mut runs = Vec::new();
        let mut complete = false;
        for l in lines {
            if l == INDEX_END {
                complete = true;
                break;
            }
            let Some((a, b)) = l.split_once(' ') else {
                return Ok(false);
            };
            match (Key::from_str_radix(a, 16), Key::from_str_radix(b, 16)) {
                (Ok(a), Ok(b)) => runs.push((a, b)),
                _ => return Ok(false),
            }
        }
        if !complete {
            // Torn by a crash mid-write: rebuild from the per-address files.
            return Ok(false);
        }
        match RunSet::from_runs(runs) {
            Some(set) => {
                self.index = set;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Every per-address file: names that are an address in canonical form.
    pub fn scan(&self) -> Result<Vec<IpAddr>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io("read directory", &self.dir))? {
            let e = e.map_err(io("read directory", &self.dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Ok(ip) = name.parse::<IpAddr>()
                && ip.to_string() == name
                && e.file_type().is_ok_and(|t| t.is_file())
            {
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
            if let Some(Record::Held { owner, .. }) = self.read_record(ip) {
                owners.entry(owner_file(&owner)).or_default().push(ip);
            }
        }
        let odir = self.meta_dir.join("owners");
        for e in fs::read_dir(&odir).map_err(io("read directory", &odir))? {
            let e = e.map_err(io("read directory", &odir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !owners.contains_key(&name) {
                let _ = fs::remove_file(e.path());
            }
        }
        for (name, mut ips) in owners {
            ips.sort();
            let text = owner_text(&ips);
            let path = odir.join(&name);
            if fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                self.write_atomic(&path, text.as_bytes())?;
            }
        }
        // Nobody else writes while we hold the lock: leftovers are from crashes.
        let tmp = self.meta_dir.join("tmp");
        if let Ok(rd) = fs::read_dir(&tmp) {
            for e in rd.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        self.index = index;
        self.fresh = true;
        self.dirty = true;
        Ok(())
    }

    fn tmp_path(&self) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        self.meta_dir.join("tmp").join(format!(
            "{}.{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn new_tmp(&self) -> Result<(PathBuf, File)> {
        let p = self.tmp_path();
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&p)
            .map_err(io("create", &p))?;
        Ok((p, f))
    }

    /// Writes `path` atomically: a temp file renamed over it.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let (tmp, mut f) = self.new_tmp()?;
        let res = f
            .write_all(bytes)
            .and_then(|_| if self.fsync { f.sync_data() } else { Ok(()) })
            .map_err(io("write", &tmp))
            .and_then(|_| fs::rename(&tmp, path).map_err(io("rename", path)));
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Overwrites a cache or hint file in place. Not atomic on purpose:
    /// replacing a file by rename (or truncating it to zero) makes ext4 flush
    /// it (auto_da_alloc), ~0.3 ms per file on every ADD. Readers validate:
    /// the index needs its end marker and stamp, a torn last_reserved_ip is
    /// only a different starting point for the round robin.
    fn write_in_place(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(io("open", path))?;
        f.write_all(bytes)
            .and_then(|_| f.set_len(bytes.len() as u64))
            .map_err(io("write", path))
    }

    fn ip_path(&self, ip: IpAddr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    /// The record of `ip`; `None` when no file holds it.
    pub fn read_record(&self, ip: IpAddr) -> Option<Record> {
        let path = self.ip_path(ip);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return None,
            Err(_) => return Some(Record::Garbage),
        };
        let content = match std::io::read_to_string(&f) {
            Ok(c) => c.into_bytes(),
            Err(_) => return Some(Record::Garbage),
        };
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
            f.write_all(content.as_bytes()).map_err(io("write", &tmp))?;
            if self.fsync {
                f.sync_data().map_err(io("fsync", &tmp))?;
            }
            let dst = self.ip_path(ip);
            match fs::hard_link(&tmp, &dst) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(IpamError::io("link", dst, e)),
            }
        })();
        let _ = fs::remove_file(&tmp);
        res
    }

    /// Removes the reservation file of `ip`.
    fn remove_record(&mut self, ip: IpAddr) -> Result<()> {
        let p = self.ip_path(ip);
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(IpamError::io("remove", p, e)),
        }
        self.index.remove(key(ip));
        self.dirty = true;
        Ok(())
    }

    /// The addresses (id, ifname) holds, verified against their records.
    pub fn held_by(&self, id: &str, ifname: &str) -> Vec<IpAddr> {
        let mut out = Vec::new();
        let odir = self.meta_dir.join("owners");
        for name in [format!("{id}:{ifname}"), format!("{id}:")] {
            let Ok(text) = fs::read_to_string(odir.join(name)) else {
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

    fn write_owner(&mut self, owner: &Owner, ips: &[IpAddr]) -> Result<()> {
        let path = self.meta_dir.join("owners").join(owner_file(owner));
        if ips.is_empty() {
            let _ = fs::remove_file(&path);
            return Ok(());
        }
        let mut ips = ips.to_vec();
        ips.sort();
        self.write_atomic(&path, owner_text(&ips).as_bytes())
    }

    fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("{LAST_RESERVED}{set}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn set_last_reserved(&mut self, set: usize, ip: IpAddr) -> Result<()> {
        self.dirty = true;
        let path = self.dir.join(format!("{LAST_RESERVED}{set}"));
        self.write_in_place(&path, ip.to_string().as_bytes())
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
        let odir = self.meta_dir.join("owners");
        let exact = odir.join(format!("{id}:{ifname}"));
        if exact.exists() {
            self.dirty = true;
            let _ = fs::remove_file(exact);
        }
        // host-local's id-only records match any ifname: the whole file went.
        let legacy = odir.join(format!("{id}:"));
        if legacy.exists() {
            let left: Vec<IpAddr> = fs::read_to_string(&legacy)
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
                Some(Record::Garbage) => false,
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

fn owner_file(o: &Owner) -> String {
    format!("{}:{}", o.id, o.ifname.as_deref().unwrap_or(""))
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
