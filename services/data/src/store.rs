//! One local disk (a block device's file system, or a folder for tests and
//! the demo): its extent group files, free space, health, and group commit.
//!
//! Group commit: a writer appends under the group's lock, then waits for a
//! sync that covers its record. Whoever takes the sync lock first syncs
//! everything appended so far; writers that queued behind it find their
//! record already covered and return without another fdatasync.
//!
//! Fault injection for tests sits exactly at this disk-I/O boundary: a file
//! named `FAULT-EIO` in the disk's root makes every read and write of this
//! disk fail with EIO (checked at most once per 200 ms), as a dying device
//! would, without touching any other disk.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_api::data::v1::{ExtentGroupHeader, RecordKind};

use crate::checkpoint;
use crate::egroup::{ExtentGroupFile, Slot};
use crate::format::BLOCK_SIZE;
use crate::DataError;

/// Name of the fault-injection marker file (see the module doc).
pub const FAULT_EIO_FILE: &str = "FAULT-EIO";
/// Free bytes kept back on the file system: below this the disk is full for placement.
pub const DEFAULT_RESERVE: u64 = 32 << 20;
/// On a filesystem the disk shares (its folder is not a mount point: the
/// demo, tests, a one-disk node), appends stop with "no space" this far from
/// full: the node's metadata (RocksDB) usually lives there too, and when
/// data took the last bytes the node lost its metadata quorum.
pub const SHARED_FS_RESERVE: u64 = 128 << 20;

use cairn_util::sync::lock;

/// One extent group open on this disk.
#[derive(Debug)]
pub struct Group {
    file: Mutex<ExtentGroupFile>,
    sync_lock: Mutex<()>,
    synced: AtomicU64,
    /// Replaced when compaction swaps the file.
    fd: Mutex<Arc<File>>,
    /// A compaction is queued or running (one at a time per group).
    pub(crate) compacting: AtomicBool,
    /// Deleted or quarantined (set under `sync_lock`): a compaction queued
    /// before must not rename its copy over the path, which may hold a new
    /// replica of the same group by then.
    removed: AtomicBool,
    /// A sync of the file failed. The kernel reports a writeback error to
    /// a file once, so a later `fdatasync` that succeeds proves nothing
    /// about the pages that failed (a compaction's copies of acknowledged
    /// writes among them): no write to the group is called durable again;
    /// the replica fails its durable writes and is replaced.
    sync_failed: AtomicBool,
}

impl Group {
    fn new(file: ExtentGroupFile) -> Result<Self, DataError> {
        let fd = file.sync_handle()?;
        let synced = AtomicU64::new(file.synced_end());
        Ok(Self {
            file: Mutex::new(file),
            sync_lock: Mutex::new(()),
            synced,
            fd: Mutex::new(Arc::new(fd)),
            compacting: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            sync_failed: AtomicBool::new(false),
        })
    }
    /// Runs `f` on the open file.
    pub fn with<R>(&self, f: impl FnOnce(&ExtentGroupFile) -> R) -> R {
        f(&lock(&self.file))
    }
}

/// Threads opening a disk's group files at start: a cold open is one small
/// read after another (superblock, checkpoint, the records after it), so
/// more in flight than cores keeps a flash device busy.
const LOAD_THREADS: usize = 8;

/// Index checkpoints one pass of the syncer writes for groups with nothing
/// to sync (about 10 KiB each at most): after a start from whole scans
/// every group of 64 records or more wants one, and a million at once
/// would be ~10 GiB of writes in one second. The rest follow in the next
/// passes; a group a sync leaves clean writes its own on the spot.
const CATCH_UP_CHECKPOINTS: usize = 1024;

/// From this many dirty groups on, one `syncfs` replaces their `fdatasync`s.
const SYNCFS_FROM: usize = 8;

/// Superseded bytes a disk may hold unpunched before it asks for an early
/// sync ([`DiskStore::reclaim_due`]). A superseded record is punched only
/// once its successor is durable, so between two runs of the 1 s syncer a
/// pass of large overwrites kept a whole second of them (~600 MiB) in the
/// page cache, and every new record took fresh pages; on the test VM fresh
/// pages are ones the hypervisor reclaimed, and copying into them was 72 %
/// of the owner's CPU. Syncing every 64 MiB lets new records reuse the
/// pages just freed and bounds what superseded data holds.
pub const RECLAIM_AFTER: u64 = 64 << 20;

/// One record to append to a group: the record header's fields, the
/// data, and whether to wait until it is durable.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    pub kind: RecordKind,
    pub sequence: u64,
    pub epoch: u64,
    pub first_block: u32,
    pub block_count: u32,
    /// `block_count` uncompressed blocks (DATA records only).
    pub data: &'a [u8],
    /// Compress with zstd when it pays.
    pub compress: bool,
    pub durable: bool,
    /// The blocks' checksums, when already computed (else computed here).
    pub crcs: Option<&'a [u32]>,
    /// Keep a large payload out of the page cache: for a replica that
    /// serves no reads (see `egroup::DIRECT_WRITE_MIN`).
    pub direct: bool,
}

impl Append<'_> {
    /// A durable record that carries no blocks (a new epoch).
    pub fn epoch(epoch: u64) -> Append<'static> {
        Append {
            kind: RecordKind::RecordEpoch,
            sequence: 0,
            epoch,
            first_block: 0,
            block_count: 0,
            data: &[],
            compress: false,
            durable: true,
            crcs: None,
            direct: false,
        }
    }
}

/// Usage and health of one disk, as registered in metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskUsage {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub free_fs_bytes: u64,
    pub full: bool,
    pub failed: bool,
    pub groups: u64,
}

/// A local disk holding extent group files under `<root>/groups/`.
#[derive(Debug)]
pub struct DiskStore {
    id: String,
    root: PathBuf,
    capacity: u64,
    reserve: u64,
    groups: Mutex<HashMap<u64, Arc<Group>>>,
    used: AtomicU64,
    /// Bytes superseded since the last [`Self::sync_dirty`] (they are
    /// punched once their successors are durable).
    buried: AtomicU64,
    /// The disk's folder is the root of its filesystem, which then holds
    /// nothing but this disk: a `syncfs` writes back only Cairn's data.
    own_fs: bool,
    full: AtomicBool,
    failed: AtomicBool,
    /// When the fault marker and the free space were last looked at, and
    /// what was found: (at, EIO injected, below the shared-filesystem reserve).
    fault: Mutex<(Instant, bool, bool)>,
    /// Free bytes appends leave to others (0 on a filesystem of its own).
    keep_free: u64,
    /// [`CATCH_UP_CHECKPOINTS`] (a field so that tests can make it small).
    catch_up_checkpoints: usize,
}

impl DiskStore {
    /// Opens (creating if new) the disk at `root`. Its id is stored in
    /// `<root>/DISK-ID` so it survives restarts; `capacity` 0 means the file
    /// system's size. Every extent group file is opened and scanned; a file
    /// that cannot be read is logged and skipped (its replica counts as lost
    /// and is repaired from the others), never served.
    pub fn open(root: &Path, capacity: u64) -> Result<Self, DataError> {
        let io = |e| DataError::io(root, e);
        std::fs::create_dir_all(root.join("groups")).map_err(io)?;
        let id_path = root.join("DISK-ID");
        let id = match std::fs::read_to_string(&id_path) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            Ok(_) | Err(_) => {
                let id = format!("disk-{:016x}", rand_u64());
                cairn_util::durable::write_file_durable(&id_path, id.as_bytes(), 0o644)
                    .map_err(|e| DataError::io(&id_path, e))?;
                id
            }
        };
        let fs_total = statvfs(root).map(|s| s.0).unwrap_or(0);
        let capacity = if capacity == 0 { fs_total } else { capacity };
        let own_fs = is_mount_point(root);
        let keep_free = if own_fs {
            0
        } else {
            SHARED_FS_RESERVE.min(fs_total / 10)
        };
        let me = Self {
            id,
            root: root.to_path_buf(),
            capacity,
            // Placement stops no later than appends do.
            reserve: DEFAULT_RESERVE.min(capacity / 10).max(keep_free),
            groups: Mutex::new(HashMap::new()),
            used: AtomicU64::new(0),
            buried: AtomicU64::new(0),
            own_fs,
            full: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            fault: Mutex::new((Instant::now() - Duration::from_secs(1), false, false)),
            keep_free,
            catch_up_checkpoints: CATCH_UP_CHECKPOINTS,
        };
        me.load()?;
        Ok(me)
    }

    /// Opens every group file, several at a time (a cold start waits on the
    /// disk, one small read after another), from their index checkpoints
    /// where they have valid ones.
    fn load(&self) -> Result<(), DataError> {
        let started = Instant::now();
        // One walk finds the group files and the checkpoints whose group
        // file is gone (deleted by a version that predates checkpoints, or
        // a crash between the two deletes): no second walk, no stat each.
        let (paths, checkpoints): (Vec<PathBuf>, Vec<PathBuf>) =
            files_under(&self.root.join("groups"), |p| {
                p.extension().is_some_and(|x| x == "ceg" || x == "idx")
            })
            .into_iter()
            .partition(|p| p.extension().is_some_and(|x| x == "ceg"));
        let next = AtomicUsize::new(0);
        let threads = LOAD_THREADS.min(paths.len().div_ceil(64)).max(1);
        let opened: Vec<(PathBuf, Result<ExtentGroupFile, DataError>)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(path) = paths.get(i) else {
                                break;
                            };
                            out.push((path.clone(), ExtentGroupFile::open_indexed(path, true)));
                        }
                        out
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect()
        });
        if opened.len() != paths.len() {
            return Err(DataError::io(
                &self.root,
                std::io::Error::other("a thread opening extent group files panicked"),
            ));
        }
        let mut used = 0;
        let mut records = 0;
        let mut whole = 0;
        let mut groups = lock(&self.groups);
        for (path, res) in opened {
            match res {
                Ok(f) => {
                    records += f.report().records - f.report().from_checkpoint;
                    if f.report().from_checkpoint == 0 && f.report().records > 0 {
                        whole += 1;
                    }
                    used += f.allocated_bytes();
                    let id = f.header().extent_group_id;
                    if f.report().damage.is_some() {
                        tracing::error!(disk = %self.id, group = id, path = %path.display(),
                            "extent group replica is damaged; it will be repaired from its peers");
                    }
                    groups.insert(id, Arc::new(Group::new(f)?));
                }
                Err(e) => {
                    // Keep the bytes for inspection, but out of the way: the
                    // group id must be free for a fresh copy from the peers.
                    let aside =
                        path.with_extension(format!("ceg.bad-{}", cairn_util::now_unix_ms()));
                    let moved = std::fs::rename(&path, &aside).is_ok();
                    let _ = std::fs::remove_file(checkpoint::path_for(&path));
                    tracing::error!(disk = %self.id, path = %path.display(), error = %e,
                        moved_to = %if moved { aside.display().to_string() } else { "(not moved)".into() },
                        "cannot open extent group file; treating this replica as lost");
                }
            }
        }
        for p in checkpoints {
            // `paths` is sorted; `X.ceg.idx` belongs to `X.ceg`.
            if paths.binary_search(&p.with_extension("")).is_err() {
                let _ = std::fs::remove_file(&p);
            }
        }
        self.used.store(used, Ordering::Relaxed);
        tracing::info!(disk = %self.id, root = %self.root.display(), groups = groups.len(),
            used_bytes = used, records_read = records, scanned_whole = whole,
            ms = started.elapsed().as_millis() as u64, "disk opened");
        Ok(())
    }

    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn group_path(&self, id: u64) -> PathBuf {
        self.root
            .join("groups")
            .join(format!("{:02x}", id & 0xff))
            .join(format!("{id:016x}.ceg"))
    }

    /// Fails with EIO while the fault marker exists (see the module doc).
    fn check_fault(&self) -> Result<(), DataError> {
        self.check(false)
    }

    /// [`Self::check_fault`], and for a write that grows a file, "no
    /// space" below the shared-filesystem reserve ([`SHARED_FS_RESERVE`]).
    /// Both are looked at most every 200 ms.
    fn check(&self, grows: bool) -> Result<(), DataError> {
        let mut f = lock(&self.fault);
        if f.0.elapsed() > Duration::from_millis(200) {
            let low = self.keep_free > 0
                && statvfs(&self.root).is_some_and(|(_, free)| free < self.keep_free);
            *f = (Instant::now(), self.root.join(FAULT_EIO_FILE).exists(), low);
        }
        let (eio, low) = (f.1, f.2);
        drop(f);
        if eio {
            return Err(self.note(DataError::io(
                &self.root,
                std::io::Error::from_raw_os_error(libc::EIO),
            )));
        }
        if grows && low {
            return Err(self.note(DataError::NoSpace {
                path: self.root.clone(),
            }));
        }
        Ok(())
    }

    fn note(&self, e: DataError) -> DataError {
        match &e {
            DataError::NoSpace { .. } if !self.full.swap(true, Ordering::Relaxed) => {
                tracing::warn!(disk = %self.id, "disk is full; taken out of placement");
            }
            DataError::Io { source, .. }
                if is_device_error(source) && !self.failed.swap(true, Ordering::Relaxed) =>
            {
                tracing::error!(disk = %self.id, error = %e, "disk I/O error; taken out of placement");
            }
            _ => {}
        }
        e
    }

    /// Current usage; also re-evaluates fullness from the file system.
    pub fn usage(&self) -> DiskUsage {
        let free = statvfs(&self.root).map(|s| s.1).unwrap_or(0);
        let used = self.used.load(Ordering::Relaxed);
        let full = free < self.reserve || used >= self.capacity;
        if self.full.swap(full, Ordering::Relaxed) != full {
            if full {
                tracing::warn!(disk = %self.id, free_bytes = free, used_bytes = used,
                    "disk is full; taken out of placement");
            } else {
                tracing::info!(disk = %self.id, free_bytes = free, "disk has room again; back in placement");
            }
        }
        DiskUsage {
            capacity_bytes: self.capacity,
            used_bytes: used,
            free_fs_bytes: free,
            full,
            failed: self.failed.load(Ordering::Relaxed),
            groups: lock(&self.groups).len() as u64,
        }
    }

    /// Whether new extent groups may be placed here.
    pub fn accepts_new_groups(&self) -> bool {
        !self.failed.load(Ordering::Relaxed) && !self.usage().full
    }

    pub fn group(&self, id: u64) -> Option<Arc<Group>> {
        lock(&self.groups).get(&id).cloned()
    }

    pub fn group_ids(&self) -> Vec<u64> {
        let mut v: Vec<u64> = lock(&self.groups).keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Creates a group file (or returns the existing one).
    pub fn create_group(&self, header: ExtentGroupHeader) -> Result<Arc<Group>, DataError> {
        self.check(true)?;
        let id = header.extent_group_id;
        if let Some(g) = self.group(id) {
            return Ok(g);
        }
        let path = self.group_path(id);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.note(DataError::io(dir, e)))?;
        }
        let f = ExtentGroupFile::create(&path, header).map_err(|e| self.note(e))?;
        self.used.fetch_add(f.allocated_bytes(), Ordering::Relaxed);
        let g = Arc::new(Group::new(f)?);
        lock(&self.groups).insert(id, g.clone());
        Ok(g)
    }

    /// Appends a record; returns once it is durable when `rec.durable`
    /// (group commit: concurrent writers share one sync), else once it is in
    /// the page cache, where it survives a crash of this process but not of
    /// the machine until [`Self::sync_group`] or the syncer runs.
    pub fn write(&self, group: &Group, rec: Append<'_>) -> Result<(), DataError> {
        self.check(true)?;
        let end = {
            let mut f = lock(&group.file);
            if rec.epoch < f.epoch() {
                return Err(DataError::StaleEpoch {
                    group: f.header().extent_group_id,
                    got: rec.epoch,
                    have: f.epoch(),
                });
            }
            let before = f.file_len();
            let buried = f.buried_bytes();
            f.append_summed(
                rec.kind,
                rec.sequence,
                rec.epoch,
                rec.first_block,
                rec.block_count,
                rec.data,
                rec.compress,
                rec.crcs,
                rec.direct,
            )
            .map_err(|e| self.note(e))?;
            self.used
                .fetch_add(f.file_len() - before, Ordering::Relaxed);
            let superseded = f.buried_bytes().saturating_sub(buried);
            if superseded > 0 {
                self.buried.fetch_add(superseded, Ordering::Relaxed);
            }
            f.end()
        };
        if rec.durable {
            self.sync_to(group, end)?;
        }
        Ok(())
    }

    /// Whether enough was superseded since the last [`Self::sync_dirty`]
    /// that it should run now rather than at its next period.
    pub fn reclaim_due(&self) -> bool {
        self.buried.load(Ordering::Relaxed) >= RECLAIM_AFTER
    }

    /// Makes everything appended to a group so far durable.
    pub fn sync_group(&self, group: &Group) -> Result<(), DataError> {
        let end = lock(&group.file).end();
        self.sync_to(group, end)
    }

    /// Syncs every group holding records that are not durable yet; returns
    /// how many it synced.
    pub fn sync_dirty(&self) -> Result<usize, DataError> {
        self.buried.store(0, Ordering::Relaxed);
        let groups: Vec<Arc<Group>> = lock(&self.groups).values().cloned().collect();
        self.sync_groups(&groups)
    }

    /// Makes everything appended to these groups so far durable; returns how
    /// many needed it. Many at once share one `syncfs` of the disk's
    /// filesystem: a `fdatasync` per file is a journal commit and a cache
    /// flush each, and after random writes the 1 s syncer found ~1,000
    /// groups dirty every second. Only on a filesystem of its own: on a
    /// shared one `syncfs` also wrote back (and waited for) every other
    /// program's dirty pages, which after 1 GiB written by another program
    /// cut 1 MiB overwrites by 15-25 %; there, 1,000 `fdatasync`s took
    /// ~200 ms (~50 ms of CPU) on the test VM.
    pub fn sync_groups(&self, groups: &[Arc<Group>]) -> Result<usize, DataError> {
        let mut checkpoints = self.catch_up_checkpoints;
        let dirty: Vec<(&Arc<Group>, u64, Arc<File>)> = groups
            .iter()
            .filter_map(|g| {
                // The handle before the end: compaction swaps both under
                // the file's lock, so an end read after the handle is the
                // handle's file's or a newer one's, and a newer file shows
                // as a changed handle below.
                let fd = lock(&g.fd).clone();
                let mut f = lock(&g.file);
                let end = f.end();
                let dirty = g.synced.load(Ordering::Acquire) < end;
                if !dirty && f.catch_up_mark(checkpoints > 0) {
                    checkpoints -= 1;
                }
                dirty.then_some((g, end, fd))
            })
            .collect();
        if dirty.len() < SYNCFS_FROM || !self.own_fs {
            for (g, end, _) in &dirty {
                self.sync_to(g, *end)?;
            }
            return Ok(dirty.len());
        }
        let Some((_, _, fd)) = dirty.first() else {
            return Ok(0);
        };
        if let Err(e) = rustix::fs::syncfs(&**fd) {
            // Which files lost pages is not known: none of these may call
            // its unsynced writes durable later.
            for (g, _, _) in &dirty {
                g.sync_failed.store(true, Ordering::SeqCst);
            }
            return Err(self.note(DataError::io(&self.root, e.into())));
        }
        for (g, end, fd) in &dirty {
            let _turn = lock(&g.sync_lock);
            // Compacted meanwhile: the new file is durable by itself, and
            // `end` is an offset in the old one.
            if !Arc::ptr_eq(&lock(&g.fd), fd) {
                continue;
            }
            g.synced.fetch_max(*end, Ordering::AcqRel);
            let freed = lock(&g.file).mark_synced(*end);
            self.release_bytes(freed);
        }
        Ok(dirty.len())
    }

    /// Saves an index checkpoint of every group indexed further than its
    /// last one (at stop, after [`Self::sync_dirty`]: the next start then
    /// reads no record at all). Returns how many it wrote.
    pub fn checkpoint_all(&self) -> usize {
        let groups: Vec<Arc<Group>> = lock(&self.groups).values().cloned().collect();
        groups
            .iter()
            .filter(|g| lock(&g.file).write_checkpoint(1))
            .count()
    }

    /// Whether [`Self::maybe_compact`] has work to do.
    pub fn needs_compaction(&self, group: &Group) -> bool {
        lock(&group.file).needs_compaction()
    }

    /// Compacts a group whose file is mostly superseded records. Blocks:
    /// call it where blocking is allowed.
    ///
    /// The group's file lock, which every write and read of the group takes
    /// (some on the runtime's own threads), is held only for short steps:
    /// the snapshot of the index, and at the end the copy of the blocks
    /// written during the compaction and the rename. Its sync lock is held
    /// throughout: a sync punches superseded records into holes, which the
    /// copy may still be reading, and no write may be called durable between
    /// the rename and the new file's sync.
    pub fn maybe_compact(&self, group: &Group) -> Result<(), DataError> {
        if !lock(&group.file).needs_compaction() {
            return Ok(());
        }
        let started = Instant::now();
        let turn = lock(&group.sync_lock);
        // Delete and quarantine set this under the sync lock, which is held
        // from here to the rename: checked once, it holds throughout.
        if group.removed.load(Ordering::SeqCst) || group.sync_failed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let begun = {
            let f = lock(&group.file);
            if !f.needs_compaction() {
                return Ok(());
            }
            f.begin_compaction()
        };
        // Writes that came during the copy are copied once more without the
        // file lock (and synced), so that the pass under it has little left.
        let copied = begun.and_then(|mut c| {
            c.copy()?;
            if lock(&group.file).compaction_catch_up(&mut c)? > 0 {
                c.sync()?;
            }
            Ok(c)
        });
        let mut c = match copied {
            Ok(c) => c,
            Err(e) => return self.compaction_skipped(group, e),
        };
        let swap = Instant::now();
        let (fd, end, freed, dir, retired) = {
            let mut f = lock(&group.file);
            let before = f.allocated_bytes();
            if let Err(e) = f.compaction_catch_up(&mut c) {
                drop(f);
                return self.compaction_skipped(group, e);
            }
            let (fd, retired) = match f.finish_compaction(c) {
                Ok((fd, retired)) => (Arc::new(fd), retired),
                Err(e) => {
                    drop(f);
                    return self.compaction_skipped(group, e);
                }
            };
            let old_fd = std::mem::replace(&mut *lock(&group.fd), fd.clone());
            // Offsets in the old file mean nothing in the new one, and
            // nothing is durable until the sync below: a writer checking
            // `synced` meanwhile waits for this sync lock.
            group.synced.store(0, Ordering::SeqCst);
            let dir = f.path().parent().map(Path::to_path_buf);
            let freed = before.saturating_sub(f.allocated_bytes());
            (fd, f.end(), freed, dir, (retired, old_fd))
        };
        let locked = swap.elapsed();
        // The catch-up's copies of acknowledged writes live only in the new
        // file now, and until the directory is synced a power loss may bring
        // the old file back at the path: either failing, the group can no
        // longer call anything durable.
        let durable = fd
            .sync_data()
            .map_err(|e| DataError::io(&self.root, e))
            .and_then(|()| match &dir {
                Some(dir) => cairn_util::durable::sync_dir(dir).map_err(|e| DataError::io(dir, e)),
                None => Ok(()),
            });
        if let Err(e) = durable {
            group.sync_failed.store(true, Ordering::SeqCst);
            self.release_bytes(freed);
            tracing::error!(disk = %self.id, error = %e,
                "a compacted extent group file could not be made durable; its replica refuses \
                 durable writes from now on and is replaced");
            return Err(self.note(e));
        }
        group.synced.fetch_max(end, Ordering::AcqRel);
        {
            let mut f = lock(&group.file);
            let punched = f.mark_synced(end);
            // The old file's checkpoint names the old instance; this one
            // describes the new file whole.
            f.write_checkpoint(1);
            self.release_bytes(freed + punched);
        }
        drop(turn);
        let closed = Instant::now();
        drop(retired);
        tracing::debug!(disk = %self.id, took_ms = started.elapsed().as_millis() as u64,
            locked_us = locked.as_micros() as u64, close_us = closed.elapsed().as_micros() as u64,
            "extent group compaction done");
        Ok(())
    }

    /// Not fatal: the old file is intact; a repair or a later try fixes it.
    fn compaction_skipped(&self, group: &Group, e: DataError) -> Result<(), DataError> {
        // A device error still takes the disk out of placement.
        let e = self.note(e);
        let path = group.with(|f| f.path().to_path_buf());
        tracing::warn!(disk = %self.id, path = %path.display(), error = %e, "compaction skipped");
        Ok(())
    }

    /// Takes bytes the filesystem got back off the disk's usage.
    fn release_bytes(&self, n: u64) {
        if n > 0 {
            self.used
                .fetch_sub(n.min(self.used.load(Ordering::Relaxed)), Ordering::Relaxed);
        }
    }

    fn sync_to(&self, group: &Group, end: u64) -> Result<(), DataError> {
        if group.synced.load(Ordering::Acquire) >= end {
            return Ok(());
        }
        let _turn = lock(&group.sync_lock);
        if group.synced.load(Ordering::Acquire) >= end {
            return Ok(());
        }
        let path = || group.with(|f| f.path().to_path_buf());
        if group.sync_failed.load(Ordering::SeqCst) {
            return Err(DataError::io(
                &path(),
                std::io::Error::other(
                    "an earlier sync of this extent group file failed: nothing written to it \
                     can be called durable any more",
                ),
            ));
        }
        // Everything appended up to now rides on this one sync.
        let target = lock(&group.file).end();
        let fd = lock(&group.fd).clone();
        fd.sync_data().map_err(|e| {
            group.sync_failed.store(true, Ordering::SeqCst);
            self.note(DataError::io(&path(), e))
        })?;
        group.synced.fetch_max(target, Ordering::AcqRel);
        let freed = lock(&group.file).mark_synced(target);
        self.release_bytes(freed);
        Ok(())
    }

    /// Reads verified blocks; see [`ExtentGroupFile::read`].
    pub fn read(&self, group: &Group, first: u32, count: u32) -> Result<Vec<u8>, DataError> {
        self.check_fault()?;
        lock(&group.file)
            .read(first, count)
            .map_err(|e| self.note(e))
    }

    /// Reads verified blocks if they are all in the page cache; see
    /// [`ExtentGroupFile::read_cached`].
    pub fn read_cached(
        &self,
        group: &Group,
        first: u32,
        count: u32,
    ) -> Result<Option<Vec<u8>>, DataError> {
        self.check_fault()?;
        lock(&group.file)
            .read_cached(first, count)
            .map_err(|e| self.note(e))
    }

    /// Per-block state (mapped, sequence) of a range.
    pub fn slots(&self, group: &Group, first: u32, count: u32) -> Vec<Slot> {
        let f = lock(&group.file);
        let s = f.slots();
        let end = (first as usize + count as usize).min(s.len());
        s.get(first as usize..end)
            .map(|x| x.to_vec())
            .unwrap_or_default()
    }

    /// Deletes a group's file (after the metadata no longer references it).
    pub fn delete_group(&self, id: u64) -> Result<(), DataError> {
        let Some(g) = lock(&self.groups).remove(&id) else {
            return Ok(());
        };
        // A compaction under way would put the file back; one queued
        // finds it removed.
        let _turn = lock(&g.sync_lock);
        g.removed.store(true, Ordering::SeqCst);
        let (path, len) = g.with(|f| (f.path().to_path_buf(), f.allocated_bytes()));
        std::fs::remove_file(&path).map_err(|e| DataError::io(&path, e))?;
        // A new file of this id gets a new instance anyway; this is tidiness.
        let _ = std::fs::remove_file(checkpoint::path_for(&path));
        if let Some(dir) = path.parent() {
            let _ = cairn_util::durable::sync_dir(dir);
        }
        self.release_bytes(len);
        Ok(())
    }

    /// Drops a replica that failed verification so it can be re-created by
    /// a copy: its file is renamed aside (kept for inspection, not served).
    pub fn quarantine_group(&self, id: u64) -> Result<(), DataError> {
        let Some(g) = lock(&self.groups).remove(&id) else {
            return Ok(());
        };
        let _turn = lock(&g.sync_lock);
        g.removed.store(true, Ordering::SeqCst);
        let path = g.with(|f| f.path().to_path_buf());
        let aside = path.with_extension(format!("ceg.bad-{}", cairn_util::now_unix_ms()));
        std::fs::rename(&path, &aside).map_err(|e| DataError::io(&path, e))?;
        let _ = std::fs::remove_file(checkpoint::path_for(&path));
        tracing::warn!(disk = %self.id, group = id, aside = %aside.display(),
            "quarantined a damaged extent group replica");
        Ok(())
    }

    /// Bytes a group of `blocks` blocks may grow to before compaction.
    pub fn block_bytes(blocks: u32) -> u64 {
        u64::from(blocks) * BLOCK_SIZE as u64
    }
}

/// Errors that mean the device itself is failing (not a bad path or a race).
fn is_device_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO) | Some(libc::EROFS) | Some(libc::ENODEV) | Some(libc::ENXIO)
    )
}

/// Every `*.ceg` file under `dir`, recursively, in path order.
pub fn group_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir, |p| p.extension().is_some_and(|x| x == "ceg"))
}

/// Every file under `dir` that `keep` accepts, recursively, in path order.
fn files_under(dir: &Path, keep: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if keep(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// (total, available) bytes of the file system holding `path`.
fn statvfs(path: &Path) -> Option<(u64, u64)> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some((s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize))
}

/// Whether `path` is where a filesystem is mounted (its parent is on
/// another device, or it is its own parent: `/`).
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Ok(up)) = (std::fs::metadata(path), std::fs::metadata(path.join(".."))) else {
        return false;
    };
    me.dev() != up.dev() || me.ino() == up.ino()
}

fn rand_u64() -> u64 {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DATA record of `data` (whole blocks) from `first_block`, epoch 1.
    fn data_rec(sequence: u64, first_block: u32, data: &[u8], durable: bool) -> Append<'_> {
        Append {
            kind: RecordKind::RecordData,
            sequence,
            epoch: 1,
            first_block,
            block_count: (data.len() / BLOCK_SIZE) as u32,
            data,
            compress: false,
            durable,
            crcs: None,
            direct: false,
        }
    }

    fn header(id: u64) -> ExtentGroupHeader {
        ExtentGroupHeader {
            format_version: 1,
            cluster_id: "c".into(),
            extent_group_id: id,
            vdisk_id: "v".into(),
            vdisk_generation: 0,
            first_vblock: id,
            vblock_count: 1,
            vblock_size: 1 << 20,
            block_size: BLOCK_SIZE as u32,
            codec: 0,
            checksum: 0,
            epoch: 1,
            created_unix_ms: 0,
            ..Default::default()
        }
    }

    /// After a start from whole scans, the syncer saves the groups' index
    /// checkpoints a bounded number per pass.
    #[test]
    fn the_syncer_catches_up_on_checkpoints_a_few_per_pass() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 0).unwrap();
        for id in 1..=5u64 {
            let g = store.create_group(header(id)).unwrap();
            for seq in 1..=64u64 {
                let b = (seq % 8) as u32;
                store
                    .write(&g, data_rec(seq, b, &[seq as u8; BLOCK_SIZE], false))
                    .unwrap();
            }
        }
        store.sync_dirty().unwrap();
        drop(store);
        for g in group_files(dir.path()) {
            let _ = std::fs::remove_file(checkpoint::path_for(&g));
        }
        let mut store = DiskStore::open(dir.path(), 0).unwrap();
        store.catch_up_checkpoints = 2;
        let saved = |d: &Path| {
            group_files(d)
                .iter()
                .filter(|g| checkpoint::path_for(g).exists())
                .count()
        };
        assert_eq!(saved(dir.path()), 0);
        for want in [2, 4, 5, 5] {
            assert_eq!(store.sync_dirty().unwrap(), 0, "nothing to sync");
            assert_eq!(saved(dir.path()), want);
        }
    }

    /// A checkpoint whose group file is gone is removed at start; one whose
    /// file is there stays.
    #[test]
    fn orphan_checkpoints_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 0).unwrap();
        let g = store.create_group(header(3)).unwrap();
        store
            .write(&g, data_rec(1, 0, &[1u8; BLOCK_SIZE], true))
            .unwrap();
        assert_eq!(store.checkpoint_all(), 1);
        let kept = checkpoint::path_for(&group_files(dir.path())[0]);
        let orphan = kept.with_file_name("00000000000000ff.ceg.idx");
        std::fs::write(&orphan, b"left by a version that predates checkpoints").unwrap();
        drop((store, g));
        let store = DiskStore::open(dir.path(), 0).unwrap();
        assert!(!orphan.exists());
        assert!(kept.exists());
        assert!(store.group(3).unwrap().with(|f| f.report().from_checkpoint) > 0);
    }

    #[test]
    fn concurrent_writers_share_syncs_and_everything_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskStore::open(dir.path(), 0).unwrap());
        let g = store.create_group(header(9)).unwrap();
        let threads: Vec<_> = (0..8u32)
            .map(|t| {
                let (store, g) = (store.clone(), g.clone());
                std::thread::spawn(move || {
                    // Eight rounds of overwrites: enough garbage to compact
                    // while the other writers keep going.
                    for round in 0..8u32 {
                        for i in 0..16u32 {
                            let b = t * 16 + i;
                            let data = vec![(b + round) as u8; BLOCK_SIZE];
                            // Half the writers wait for durability, half
                            // leave it to a later sync.
                            let seq = u64::from(round * 1000 + b) + 1;
                            let rec = data_rec(seq, b, &data, t % 2 == 0);
                            store.write(&g, rec).unwrap();
                            store.maybe_compact(&g).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // One more deferred write (the threads' last sync may have covered theirs).
        let last = data_rec(100_000, 0, &[7u8; BLOCK_SIZE], false);
        store.write(&g, last).unwrap();
        assert!(g.synced.load(Ordering::Acquire) < lock(&g.file).end());
        assert_eq!(store.sync_dirty().unwrap(), 1, "the deferred record");
        assert_eq!(store.sync_dirty().unwrap(), 0, "nothing left to sync");
        let id = store.id().to_string();
        let check = |store: &DiskStore| {
            let g = store.group(9).unwrap();
            for b in 0..128u32 {
                assert_eq!(
                    store.read(&g, b, 1).unwrap(),
                    vec![(b + 7) as u8; BLOCK_SIZE]
                );
            }
            g.with(|f| f.report().from_checkpoint)
        };
        // A stop saves the index, and the next start reads it.
        // (The last sync may have saved it already.)
        assert!(store.checkpoint_all() <= 1);
        assert_eq!(store.checkpoint_all(), 0, "nothing new since");
        drop((store, g));
        let store = DiskStore::open(dir.path(), 0).unwrap();
        assert_eq!(store.id(), id, "disk id is stable");
        assert!(check(&store) > 0, "opened from its checkpoint");
        // Without it, the same from a whole scan.
        drop(store);
        std::fs::remove_file(checkpoint::path_for(&group_files(dir.path())[0])).unwrap();
        let store = DiskStore::open(dir.path(), 0).unwrap();
        assert_eq!(check(&store), 0);
        let g = store.group(9).unwrap();
        assert!(
            g.with(|f| f.file_len()) < 3 << 20,
            "never compacted: {}",
            g.with(|f| f.file_len())
        );
    }

    /// Overwrites ask for an early sync once [`RECLAIM_AFTER`] bytes are
    /// superseded, and that sync punches them.
    #[test]
    fn superseded_data_asks_for_an_early_sync_that_punches_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 0).unwrap();
        let g = store.create_group(header(5)).unwrap();
        let data = vec![3u8; 256 * BLOCK_SIZE];
        let whole = |seq| data_rec(seq, 0, &data, false);
        let per_record = data.len() as u64;
        // The first record supersedes nothing; each later one a whole
        // record (what of it can become a hole: its whole blocks).
        let mut seq = 0;
        while !store.reclaim_due() {
            seq += 1;
            assert!(seq <= RECLAIM_AFTER / per_record + 2, "never due");
            store.write(&g, whole(seq)).unwrap();
        }
        assert!(seq > RECLAIM_AFTER / per_record, "due after {seq} records");
        assert!(g.with(|f| f.buried_bytes()) >= RECLAIM_AFTER);
        assert_eq!(store.sync_dirty().unwrap(), 1);
        assert!(!store.reclaim_due());
        assert_eq!(g.with(|f| f.buried_bytes()), 0, "punched by the sync");
        assert!(
            g.with(|f| f.allocated_bytes()) < 2 * per_record,
            "{} bytes still allocated",
            g.with(|f| f.allocated_bytes())
        );
        assert_eq!(store.read(&g, 0, 256).unwrap(), data);
    }

    /// On a shared filesystem appends stop short of its last bytes, with
    /// the same "no space" error as a full disk; reads go on.
    #[test]
    fn a_shared_filesystem_keeps_its_reserve_free() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = DiskStore::open(dir.path(), 0).unwrap();
        assert!(
            store.keep_free > 0,
            "a temporary folder is on a shared filesystem"
        );
        let g = store.create_group(header(3)).unwrap();
        let data = vec![4u8; BLOCK_SIZE];
        let rec = |seq| data_rec(seq, 0, &data, true);
        store.write(&g, rec(1)).unwrap();
        // As if the filesystem had less than the reserve left.
        store.keep_free = u64::MAX;
        lock(&store.fault).0 = Instant::now() - Duration::from_secs(1);
        let e = store.write(&g, rec(2)).unwrap_err();
        assert!(matches!(e, DataError::NoSpace { .. }), "{e}");
        assert!(e.to_string().contains("no space left"), "{e}");
        assert!(matches!(
            store.create_group(header(4)),
            Err(DataError::NoSpace { .. })
        ));
        assert_eq!(store.read(&g, 0, 1).unwrap(), data);
        store.keep_free = 1;
        lock(&store.fault).0 = Instant::now() - Duration::from_secs(1);
        store.write(&g, rec(3)).unwrap();
    }

    /// Many dirty groups share one syncfs: each is then marked durable up
    /// to what it held, and its superseded records become holes.
    #[test]
    fn many_dirty_groups_are_synced_together() {
        sync_many_dirty_groups(true);
    }

    /// The same on a shared filesystem (a folder, as in tests and the
    /// demo), where each group gets its own `fdatasync` instead.
    #[test]
    fn many_dirty_groups_on_a_shared_filesystem_are_synced_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!DiskStore::open(dir.path(), 0).unwrap().own_fs);
        assert!(is_mount_point(Path::new("/")));
        sync_many_dirty_groups(false);
    }

    fn sync_many_dirty_groups(own_fs: bool) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = DiskStore::open(dir.path(), 0).unwrap();
        store.own_fs = own_fs;
        let groups: Vec<_> = (0..3 * SYNCFS_FROM as u64)
            .map(|id| store.create_group(header(100 + id)).unwrap())
            .collect();
        let data = vec![9u8; 256 * BLOCK_SIZE];
        for (i, g) in groups.iter().enumerate() {
            // Two generations of the whole group: the first becomes a hole.
            for seq in 1..=2 {
                store.write(g, data_rec(seq, 0, &data, false)).unwrap();
            }
            assert!(
                g.synced.load(Ordering::Acquire) < lock(&g.file).end(),
                "group {i}"
            );
        }
        let used = store.used.load(Ordering::Relaxed);
        assert_eq!(store.sync_dirty().unwrap(), groups.len());
        for g in &groups {
            assert_eq!(g.synced.load(Ordering::Acquire), lock(&g.file).end());
            let (synced, end) = g.with(|f| (f.synced_end(), f.end()));
            assert_eq!(synced, end);
            assert!(g.with(|f| f.allocated_bytes()) < (1 << 20) + (64 << 10));
        }
        assert!(
            store.used.load(Ordering::Relaxed) < used - groups.len() as u64 * (900 << 10),
            "the holes are off the disk's usage"
        );
        assert_eq!(store.sync_dirty().unwrap(), 0, "nothing left to sync");
    }

    /// A compaction queued for a group (an `Arc` of it held) that is then
    /// quarantined and created again as a fresh replica must not rename
    /// its copy of the old file over the new one.
    #[test]
    fn a_compaction_queued_before_a_quarantine_leaves_the_new_replica_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 0).unwrap();
        let old = store.create_group(header(9)).unwrap();
        // Random single-block overwrites: partly superseded records that
        // only a compaction gets back.
        let mut seq = 0;
        while !store.needs_compaction(&old) {
            seq += 1;
            assert!(seq < 100_000, "never needed a compaction");
            let b = (seq * 37 % 256) as u32;
            store
                .write(&old, data_rec(seq, b, &[1u8; BLOCK_SIZE], false))
                .unwrap();
        }
        store.quarantine_group(9).unwrap();
        let new = store.create_group(header(9)).unwrap();
        let fresh = vec![2u8; BLOCK_SIZE];
        store.write(&new, data_rec(1, 0, &fresh, true)).unwrap();
        store.maybe_compact(&old).unwrap();
        assert_eq!(store.read(&new, 0, 1).unwrap(), fresh);
        drop((old, new, store));
        let store = DiskStore::open(dir.path(), 0).unwrap();
        let g = store.group(9).unwrap();
        assert_eq!(store.read(&g, 0, 1).unwrap(), fresh, "after a reopen");
        assert_eq!(
            store.read(&g, 1, 1).unwrap(),
            vec![0u8; BLOCK_SIZE],
            "the old replica's blocks came back"
        );
    }

    #[test]
    fn stale_epoch_is_refused_and_eio_fault_is_injected() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 0).unwrap();
        let g = store.create_group(header(1)).unwrap();
        store.write(&g, Append::epoch(5)).unwrap();
        let rec = Append {
            epoch: 4,
            ..data_rec(1, 0, &[0; BLOCK_SIZE], true)
        };
        let err = store.write(&g, rec).unwrap_err();
        assert!(
            matches!(err, DataError::StaleEpoch { have: 5, .. }),
            "{err}"
        );
        std::fs::write(dir.path().join(FAULT_EIO_FILE), b"").unwrap();
        std::thread::sleep(Duration::from_millis(250));
        let err = store.read(&g, 0, 1).unwrap_err();
        assert!(err.to_string().contains("Input/output error"), "{err}");
        assert!(!store.accepts_new_groups());
    }
}
