//! One extent group file: an append-only log of records after a superblock,
//! and the in-memory index (block -> newest record) rebuilt by scanning it.
//!
//! Why a log: writes are appends (sequential on flash, no read-modify-write
//! of a checksummed block), a crash can only tear the tail, and every record
//! carries its own sequence and checksums, so the file describes itself.
//! For each block the record with the highest sequence wins, whatever order
//! records were appended in; so replicas that receive concurrent writes in
//! different orders still agree, and a copy can be streamed under live writes.
//!
//! Why a sync mark: a power loss may leave the unsynced end of the file
//! torn anywhere, not just cut short (pages are written back in any order,
//! and some filesystems extend the size before the data). The superblock
//! records how far the file was durable after its syncs (`format::SyncMark`,
//! at most every 100 ms, so that a sync per write does not write it twice);
//! opening cuts off the first record after that point that fails its checks
//! and everything after it (none of it was ever acknowledged as durable),
//! while a bad record before it is damage, as it always was.
//!
//! Why holes: a record none of whose blocks is the newest any more gives its
//! payload's whole filesystem blocks back (`fallocate` PUNCH_HOLE) once the
//! records that superseded it are durable. Its header stays, so a scan still
//! walks the file, and a sequential overwrite (every record superseded whole)
//! keeps the file at its live size without compaction, which would copy every
//! live byte again. Compaction remains for partly superseded records (small
//! random writes) and bounds the file's logical length.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cairn_api::data::v1::{Codec, ExtentGroupHeader, RecordHeader, RecordKind};

use crate::checkpoint;
use crate::format::{self, FormatError, BLOCK_SIZE, RECORD_PREFIX, SUPERBLOCK_SIZE};
use crate::DataError;

/// Payloads at least this large are written with their own call instead of
/// being copied behind the record header.
const SEPARATE_PAYLOAD_WRITE: usize = 64 << 10;

/// Payloads at least this large may bypass the page cache (`O_DIRECT`) when
/// the caller asks for it: a replica that serves no reads gains nothing from
/// caching them, and copying into new page-cache pages was about half of such
/// a replica's CPU on 1 MiB writes. Smaller ones stay buffered: a direct
/// write waits for the device, a buffered one only for a copy.
pub const DIRECT_WRITE_MIN: usize = 64 << 10;

// A replica's payload is written direct from the frame it arrived in when
// that is block-aligned (`write_direct`); the RPC crate aligns large frames
// by its own constants, as it does not know the block size. Held together
// here, where both are known: a change to either fails the build.
const _: () = assert!(
    cairn_rpc::frame::ALIGN.is_multiple_of(BLOCK_SIZE)
        && cairn_rpc::frame::ALIGN_FROM <= DIRECT_WRITE_MIN
);

/// The file's second handle, opened with `O_DIRECT` on first use.
#[derive(Debug, Default)]
enum Direct {
    #[default]
    Untried,
    Open(File),
    /// The filesystem or device refused direct I/O: buffered from now on.
    Unsupported,
}

/// Where the newest version of one block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Never written: reads as zeros.
    Empty,
    /// Unmapped by a trim record with this sequence: reads as zeros.
    Trimmed {
        seq: u64,
    },
    Data(BlockLoc),
}

impl Slot {
    pub fn seq(&self) -> u64 {
        match self {
            Slot::Empty => 0,
            Slot::Trimmed { seq } => *seq,
            Slot::Data(l) => l.seq,
        }
    }
    pub fn is_mapped(&self) -> bool {
        matches!(self, Slot::Data(_))
    }
}

/// A block's place inside a data record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLoc {
    pub seq: u64,
    /// File offset of the record's payload.
    pub payload_off: u64,
    pub payload_len: u32,
    pub payload_crc: u32,
    pub compressed: bool,
    /// Index of this block within the record.
    pub index: u32,
    pub crc: u32,
}

/// What scanning a file found besides its records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Records in the file: found by the scan (or in the checkpoint), and
    /// appended since.
    pub records: u64,
    /// Bytes at the end that a crash tore before they were synced (never
    /// acknowledged as durable): an incomplete last record, or records
    /// after the sync mark that fail their checks, and whatever follows
    /// them. Cut off when opened writable.
    pub torn_tail_bytes: u64,
    /// The file's sync mark: how far it was known durable. `None` for a file
    /// from before marks, whose bad records all count as damage.
    pub durable_end: Option<u64>,
    /// Set when a complete record is unreadable: the replica may have lost
    /// writes after it and must be treated as lost by its primary.
    pub damage: Option<String>,
    /// Of `records`, how many an index checkpoint described (not read).
    pub from_checkpoint: u64,
}

/// Compaction reads the old file and gathers the new one in memory up to
/// this size each (the default 1 MiB groups take about 3 MiB).
const COMPACT_IN_MEMORY: u64 = 32 << 20;

/// Compaction also runs once the file's logical length (holes included)
/// passes this many times its live data plus 1 MiB: each superseded record
/// keeps its header, which a scan at start reads.
const MAX_SPARSE_FACTOR: u64 = 64;

/// An index checkpoint is saved once a sync leaves nothing unsynced and at
/// least this many records were indexed since the last one: a new
/// checkpoint of a 1 MiB group is at most ~10 KiB (random 4 KiB records;
/// one run per record), against the 256 KiB those records wrote, and an
/// open after a crash reads at most this many records more per group.
pub const CHECKPOINT_AFTER: u64 = 64;

/// Sync marks are written at most this often (see `write_mark`).
const MARK_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The filesystem block a hole is made of: only whole ones are given back.
const HOLE_ALIGN: u64 = 4096;

/// The whole filesystem blocks of a payload `[payload_off, rec_end)`: what
/// becomes a hole once none of its blocks is the newest; `None` if there is
/// not one whole block.
fn hole_span(payload_off: u64, rec_end: u64) -> Option<(u64, u64)> {
    let from = payload_off.div_ceil(HOLE_ALIGN) * HOLE_ALIGN;
    let to = rec_end / HOLE_ALIGN * HOLE_ALIGN;
    (to > from).then_some((from, to))
}

/// A data record some of whose blocks are still the newest, and the part of
/// its payload (whole filesystem blocks) that becomes a hole when none is.
#[derive(Debug, Clone, Copy)]
struct LiveRecord {
    live: u32,
    from: u64,
    to: u64,
}

/// A superseded record's payload waiting to become a hole: only once the
/// file is durable up to `after` (the end of the record that superseded
/// it), or a crash could lose the new version after the old one is gone.
#[derive(Debug, Clone, Copy)]
struct DeadRange {
    from: u64,
    to: u64,
    after: u64,
}

/// Where a read takes a file's bytes from.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    Disk,
    /// The page cache only: the read gives up rather than wait for the disk.
    PageCache,
    /// A copy of the file from offset 0, read in one call (compaction).
    Image(&'a [u8]),
}

/// An open extent group file.
#[derive(Debug)]
pub struct ExtentGroupFile {
    path: PathBuf,
    file: File,
    header: ExtentGroupHeader,
    slots: Vec<Slot>,
    /// How many slots hold data (kept by `index_record`, the one place
    /// slots change: counting them on every write showed in profiles).
    mapped: usize,
    epoch: u64,
    max_seq: u64,
    end: u64,
    synced_end: u64,
    report: ScanReport,
    /// The whole file from offset 0, gathered in memory (see
    /// [`Self::create_staged`]); `None` for files written in place.
    staged: Option<Vec<u8>>,
    /// Data records with whole filesystem blocks to give back, by payload
    /// offset (records written since the file was opened or compacted).
    records: HashMap<u64, LiveRecord>,
    /// Superseded payloads not punched yet.
    dead: Vec<DeadRange>,
    /// Their total length: read on every append, so kept rather than summed.
    dead_bytes: u64,
    /// Bytes of `[0, end)` that are holes.
    holes: u64,
    /// The filesystem refused a hole once: superseded records wait for
    /// compaction instead.
    no_holes: bool,
    direct: Direct,
    /// The highest sync mark written, the slot the next one goes to, and
    /// when the last one was written.
    mark_written: u64,
    mark_slot: usize,
    mark_at: Option<std::time::Instant>,
    /// Writing a sync mark failed once (logged once; the older mark stays,
    /// which only makes the next open check more).
    mark_failed: bool,
    /// Start and header crc32c of the last record (what an index
    /// checkpoint names so that opening can check the file still holds it).
    last_record: Option<(u64, u32)>,
    /// Records indexed since the last index checkpoint (or the open).
    since_checkpoint: u64,
    /// Writing a checkpoint failed once (logged once; opening scans more).
    checkpoint_failed: bool,
}

impl ExtentGroupFile {
    /// Creates a new file (fails if it exists) and makes its superblock durable.
    pub fn create(path: &Path, header: ExtentGroupHeader) -> Result<Self, DataError> {
        let io = |e| DataError::io(path, e);
        let (file, sb, header) = Self::new_file(path, header)?;
        file.write_all_at(&sb, 0).map_err(io)?;
        file.sync_all().map_err(io)?;
        if let Some(dir) = path.parent() {
            cairn_util::durable::sync_dir(dir).map_err(io)?;
        }
        Ok(Self::unindexed(path, file, header))
    }

    /// A new file whose records are gathered in memory until
    /// [`Self::finish_staged`], which writes them in one call and makes the
    /// whole file durable: for compaction, whose output only counts once it
    /// is renamed over the old file.
    /// With `stage` `None` the records are written as they come, still
    /// without syncing until the end (a group too large to hold in memory).
    fn create_staged(
        path: &Path,
        header: ExtentGroupHeader,
        stage: Option<usize>,
    ) -> Result<Self, DataError> {
        let (file, sb, header) = Self::new_file(path, header)?;
        let mut me = Self::unindexed(path, file, header);
        match stage {
            Some(capacity) => {
                let mut staged = Vec::with_capacity(capacity.max(sb.len()));
                staged.extend_from_slice(&sb);
                me.staged = Some(staged);
            }
            None => me
                .file
                .write_all_at(&sb, 0)
                .map_err(|e| DataError::io(path, e))?,
        }
        Ok(me)
    }

    /// Writes what [`Self::create_staged`] gathered and syncs it. The sync
    /// mark goes in before that sync: the file counts only once renamed
    /// into place after it, so a mark saying "all of it" is true by then,
    /// and the first open after a power loss does not check it all again.
    fn finish_staged(&mut self) -> Result<(), DataError> {
        if let Some(mut staged) = self.staged.take() {
            format::put_sync_mark(&mut staged, 0, self.end);
            self.file
                .write_all_at(&staged, 0)
                .map_err(|e| DataError::io(&self.path, e))?;
            self.mark_written = self.end;
            self.mark_slot = 1;
        } else {
            self.write_mark(self.end, true);
        }
        self.sync()
    }

    /// Creates the file (failing if it exists) and encodes its superblock,
    /// validated with the reader's own rules before anything is written.
    /// The header gets a new `file_instance`: this file is not the one any
    /// existing index checkpoint describes, even if it has the same path.
    fn new_file(
        path: &Path,
        mut header: ExtentGroupHeader,
    ) -> Result<(File, Vec<u8>, ExtentGroupHeader), DataError> {
        header.file_instance = rand::random::<u64>().max(1);
        let sb = format::encode_new_superblock(&header).map_err(|e| DataError::corrupt(path, e))?;
        format::decode_superblock(&sb).map_err(|e| DataError::corrupt(path, e))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| DataError::io(path, e))?;
        Ok((file, sb, header))
    }

    /// A file as seen before any record is indexed: what `create` makes, and
    /// what `open` scans its records into.
    fn unindexed(path: &Path, file: File, header: ExtentGroupHeader) -> Self {
        let blocks = format::group_blocks(&header) as usize;
        Self {
            path: path.to_path_buf(),
            file,
            epoch: header.epoch,
            header,
            slots: vec![Slot::Empty; blocks],
            mapped: 0,
            max_seq: 0,
            end: SUPERBLOCK_SIZE,
            synced_end: SUPERBLOCK_SIZE,
            report: ScanReport::default(),
            staged: None,
            records: HashMap::new(),
            dead: Vec::new(),
            dead_bytes: 0,
            holes: 0,
            no_holes: false,
            direct: Direct::Untried,
            // `new_file` put this first mark into slot 0.
            mark_written: SUPERBLOCK_SIZE,
            mark_slot: 1,
            mark_at: None,
            mark_failed: false,
            last_record: None,
            since_checkpoint: 0,
            checkpoint_failed: false,
        }
    }

    /// Opens and scans a file. `writable` also cuts off a torn tail so new
    /// records follow the last good one.
    ///
    /// Only what the sync mark covers counts as durable afterwards: the rest
    /// may be in the page cache only (the process crashed, not the machine),
    /// so the next sync of the group, not this open, makes it durable.
    ///
    /// Every record is read: see [`Self::open_indexed`] for the start of a
    /// node, which reads the index checkpoint instead where it can.
    pub fn open(path: &Path, writable: bool) -> Result<Self, DataError> {
        Self::open_with(path, writable, false)
    }

    /// [`Self::open`], starting from the file's index checkpoint when there
    /// is a valid one, so that only the records written after it are read.
    /// A record the checkpoint covers is not read at all: damage to its
    /// header shows at the next whole scan (compaction reads its blocks, a
    /// scrub verifies them), not here; its blocks are verified on every read.
    pub fn open_indexed(path: &Path, writable: bool) -> Result<Self, DataError> {
        Self::open_with(path, writable, true)
    }

    fn open_with(path: &Path, writable: bool, use_checkpoint: bool) -> Result<Self, DataError> {
        let io = |e| DataError::io(path, e);
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        let len = meta.len();
        if len < SUPERBLOCK_SIZE {
            return Err(DataError::corrupt(
                path,
                FormatError::InvalidSuperblock(format!(
                    "file is {len} bytes, shorter than its superblock"
                )),
            ));
        }
        let mut sb = vec![0u8; SUPERBLOCK_SIZE as usize];
        file.read_exact_at(&mut sb, 0).map_err(io)?;
        let header = format::decode_superblock(&sb).map_err(|e| DataError::corrupt(path, e))?;
        let marks = format::sync_marks(&sb);
        let mut me = Self::unindexed(path, file, header);
        let ckpt = if use_checkpoint {
            me.load_checkpoint(len)
        } else {
            None
        };
        // Records a checkpoint covers were durable when it was written, so
        // it moves the durable end as a mark would.
        let on_disk = marks[0].max(marks[1]);
        let mark = match &ckpt {
            Some(c) => Some(on_disk.unwrap_or(0).max(c.covered_end)),
            None => on_disk,
        };
        me.report.durable_end = mark;
        me.mark_written = on_disk.unwrap_or(0);
        // The next mark goes over the older one.
        me.mark_slot = if marks[1].is_some() && marks[1] == on_disk {
            0
        } else {
            1
        };
        let mut starts = Vec::new();
        let from = me.apply_checkpoint(ckpt.as_ref());
        me.scan(from, len, mark, &mut starts)?;
        if let Some(m) = mark {
            if len < m {
                me.damaged(
                    len,
                    len,
                    FormatError::InvalidRecord {
                        offset: len,
                        reason: format!("the file ends before its durable end {m}"),
                    },
                );
            }
            // A record after the mark whose live blocks fail their checksums
            // was torn by a power loss: cut there and scan again, since
            // blocks it superseded count again (at most once per record).
            while let Some(cut) = me.first_torn_record(m, &starts)? {
                me.clear_index();
                starts.clear();
                let from = me.apply_checkpoint(ckpt.as_ref());
                me.scan(from, cut, mark, &mut starts)?;
                me.report.torn_tail_bytes = len - cut;
            }
        }
        if writable && me.report.torn_tail_bytes > 0 {
            me.file.set_len(me.end).map_err(io)?;
            me.file.sync_all().map_err(io)?;
            tracing::warn!(path = %path.display(), bytes = me.report.torn_tail_bytes,
                durable_end = ?mark, end = me.end,
                "cut off the torn end of an extent group (written after its last sync, never acknowledged as durable)");
            me.synced_end = me.end;
            me.write_mark(me.end, true);
        } else {
            me.synced_end = mark.map_or(SUPERBLOCK_SIZE, |m| m.clamp(SUPERBLOCK_SIZE, me.end));
        }
        // What the scan found superseded may have been punched already, or
        // its successor may be in the page cache only (a crash of the
        // process, not the machine): punching it now could outrun that
        // successor to the disk. Compaction reclaims it instead.
        me.dead.clear();
        me.dead_bytes = 0;
        me.holes = me.end.saturating_sub(meta.blocks() * 512);
        Ok(me)
    }

    /// The file's index checkpoint, if there is one that describes this
    /// file: see [`checkpoint`]. Anything else (none, torn, stale, another
    /// file's) is `None`, and the file is scanned whole.
    fn load_checkpoint(&self, len: u64) -> Option<checkpoint::Checkpoint> {
        if self.header.file_instance == 0 {
            return None;
        }
        let at = checkpoint::path_for(&self.path);
        // Debug, not info: after a power loss most of a disk's may be torn.
        let refuse = |why: String| {
            tracing::debug!(path = %at.display(), reason = %why,
                "index checkpoint not used; scanning the whole extent group file");
            None
        };
        let buf = match std::fs::File::open(&at) {
            Ok(f) => {
                let mut buf = Vec::new();
                match std::io::Read::read_to_end(
                    &mut std::io::Read::take(f, checkpoint::MAX_BYTES),
                    &mut buf,
                ) {
                    Ok(_) => buf,
                    Err(e) => return refuse(e.to_string()),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => return refuse(e.to_string()),
        };
        let c = match checkpoint::decode(&buf, &self.header, len) {
            Ok(c) => c,
            Err(why) => return refuse(why),
        };
        // The file must still hold the last record it covers, ending where
        // the checkpoint ends.
        let (off, crc) = c.last_record;
        let mut prefix = [0u8; RECORD_PREFIX];
        if self.file.read_exact_at(&mut prefix, off).is_err() {
            return refuse(format!("cannot read its last record at {off}"));
        }
        let held = format::decode_record_prefix(&prefix, off)
            .ok()
            .filter(|&(_, hcrc)| hcrc == crc)
            .and_then(|(hlen, hcrc)| {
                let mut body = vec![0u8; hlen];
                self.file
                    .read_exact_at(&mut body, off + RECORD_PREFIX as u64)
                    .ok()?;
                let rh = format::decode_record_header(&body, hcrc, off, &self.header).ok()?;
                let end = off + (RECORD_PREFIX + hlen) as u64 + u64::from(rh.payload_len);
                (end == c.covered_end).then_some(())
            });
        if held.is_none() {
            return refuse(format!("the file does not hold its last record at {off}"));
        }
        Some(c)
    }

    /// Starts the index from a checkpoint (or from nothing); returns where
    /// the scan goes on from.
    fn apply_checkpoint(&mut self, c: Option<&checkpoint::Checkpoint>) -> u64 {
        let Some(c) = c else {
            return SUPERBLOCK_SIZE;
        };
        self.slots.clone_from(&c.slots);
        self.max_seq = c.max_seq;
        self.epoch = self.epoch.max(c.epoch);
        self.report.records = c.records;
        self.report.from_checkpoint = c.records;
        self.last_record = Some(c.last_record);
        self.mapped = 0;
        // Which records still hold live blocks, so that superseding their
        // last one later buries them, as a scan would have left them.
        let mut live: HashMap<u64, (u32, u64)> = HashMap::new();
        for s in &self.slots {
            if let Slot::Data(l) = s {
                self.mapped += 1;
                let e = live
                    .entry(l.payload_off)
                    .or_insert((0, l.payload_off + u64::from(l.payload_len)));
                e.0 += 1;
            }
        }
        if !self.no_holes {
            for (payload_off, (n, rec_end)) in live {
                if let Some((from, to)) = hole_span(payload_off, rec_end) {
                    self.records
                        .insert(payload_off, LiveRecord { live: n, from, to });
                }
            }
        }
        self.end = c.covered_end;
        self.since_checkpoint = 0;
        c.covered_end
    }

    /// Saves the index as an index checkpoint ([`checkpoint`]) if at least
    /// `min_new` records were indexed since the last one and every record is
    /// durable (a checkpoint must not cover what a power loss could tear).
    /// Not synced: it is a cache. A failure is logged once; the next open
    /// then reads more. Returns whether it wrote one.
    pub fn write_checkpoint(&mut self, min_new: u64) -> bool {
        let Some(last_record) = self.last_record else {
            return false;
        };
        if self.since_checkpoint < min_new.max(1)
            || self.synced_end < self.end
            || self.staged.is_some()
            || self.report.damage.is_some()
            || self.header.file_instance == 0
        {
            return false;
        }
        let c = checkpoint::Checkpoint {
            covered_end: self.end,
            last_record,
            max_seq: self.max_seq,
            epoch: self.epoch,
            records: self.report.records,
            slots: self.slots.clone(),
        };
        let buf = checkpoint::encode(&self.header, &c);
        let at = checkpoint::path_for(&self.path);
        let res = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&at)
            .and_then(|f| {
                f.write_all_at(&buf, 0)?;
                f.set_len(buf.len() as u64)
            });
        match res {
            Ok(()) => {
                self.since_checkpoint = 0;
                true
            }
            Err(e) => {
                if !self.checkpoint_failed {
                    self.checkpoint_failed = true;
                    tracing::warn!(path = %at.display(), error = %e,
                        "cannot write an extent group's index checkpoint; its next open scans more");
                }
                false
            }
        }
    }

    /// Indexes the records in `[from, len)`. A bad record header at or
    /// after the sync mark `mark` ends the file there (torn); before it, or
    /// with no mark, it is damage. `starts` gets (payload offset, record
    /// start) of each record ending after the mark.
    fn scan(
        &mut self,
        from: u64,
        len: u64,
        mark: Option<u64>,
        starts: &mut Vec<(u64, u64)>,
    ) -> Result<(), DataError> {
        let torn_from = mark.unwrap_or(u64::MAX);
        let mut off = from;
        while off < len {
            if len - off < RECORD_PREFIX as u64 {
                self.report.torn_tail_bytes = len - off;
                break;
            }
            let mut prefix = [0u8; RECORD_PREFIX];
            self.file
                .read_exact_at(&mut prefix, off)
                .map_err(|e| DataError::io(&self.path, e))?;
            let (hlen, hcrc) = match format::decode_record_prefix(&prefix, off) {
                Ok(x) => x,
                Err(_) if off >= torn_from => {
                    self.report.torn_tail_bytes = len - off;
                    break;
                }
                Err(e) => {
                    self.damaged(off, len, e);
                    break;
                }
            };
            let head_end = off + (RECORD_PREFIX + hlen) as u64;
            if head_end > len {
                self.report.torn_tail_bytes = len - off;
                break;
            }
            let mut body = vec![0u8; hlen];
            self.file
                .read_exact_at(&mut body, off + RECORD_PREFIX as u64)
                .map_err(|e| DataError::io(&self.path, e))?;
            let rh = match format::decode_record_header(&body, hcrc, off, &self.header) {
                Ok(rh) => rh,
                Err(FormatError::UnknownVersion(v)) => {
                    // A newer node wrote a record this build cannot read:
                    // refuse the whole file rather than serve a partial view.
                    return Err(DataError::corrupt(
                        &self.path,
                        FormatError::UnknownVersion(v),
                    ));
                }
                Err(_) if off >= torn_from => {
                    self.report.torn_tail_bytes = len - off;
                    break;
                }
                Err(e) => {
                    self.damaged(off, len, e);
                    break;
                }
            };
            let rec_end = head_end + u64::from(rh.payload_len);
            if rec_end > len {
                self.report.torn_tail_bytes = len - off;
                break;
            }
            if rec_end > torn_from {
                starts.push((head_end, off));
            }
            self.index_record(&rh, head_end);
            self.last_record = Some((off, hcrc));
            off = rec_end;
        }
        self.end = off;
        Ok(())
    }

    /// The start of the first record at or after `mark` that holds a live
    /// block failing its checksum (a payload torn by a power loss), if any.
    /// `starts` maps payload offsets to record starts, in file order.
    fn first_torn_record(
        &self,
        mark: u64,
        starts: &[(u64, u64)],
    ) -> Result<Option<u64>, DataError> {
        let mut first: Option<u64> = None;
        let n = self.slots.len();
        let mut b = 0usize;
        while b < n {
            let Slot::Data(loc) = self.slots[b] else {
                b += 1;
                continue;
            };
            let run = b;
            b += 1;
            while b < n
                && matches!(self.slots[b], Slot::Data(l) if l.payload_off == loc.payload_off)
            {
                b += 1;
            }
            let Ok(i) = starts.binary_search_by_key(&loc.payload_off, |s| s.0) else {
                continue;
            };
            let start = starts[i].1;
            if start < mark || first.is_some_and(|f| f <= start) {
                continue;
            }
            match self.read_from(run as u32, (b - run) as u32, Source::Disk) {
                Ok(_) => {}
                Err(DataError::Checksum { .. }) => first = Some(start),
                Err(e) => return Err(e),
            }
        }
        Ok(first)
    }

    /// Forgets every indexed record (before scanning again).
    fn clear_index(&mut self) {
        self.slots.fill(Slot::Empty);
        self.mapped = 0;
        self.epoch = self.header.epoch;
        self.max_seq = 0;
        self.end = SUPERBLOCK_SIZE;
        self.report.records = 0;
        self.report.from_checkpoint = 0;
        self.last_record = None;
        self.since_checkpoint = 0;
        self.records.clear();
        self.dead.clear();
        self.dead_bytes = 0;
    }

    /// Records in the superblock that the file is durable up to `end`.
    /// Called after the sync that made it so, never before: the mark itself
    /// becomes durable with the next sync, so a mark on the disk never
    /// claims more than was durable (it may claim less, which only makes
    /// the next open check more records).
    ///
    /// At most every [`MARK_EVERY`] unless `now`: with a sync per write (FUA,
    /// or the write cache off) a mark per sync put a second block into
    /// every `fdatasync`. [`Self::catch_up_mark`] writes what was skipped.
    fn write_mark(&mut self, end: u64, now: bool) {
        if end <= self.mark_written || self.staged.is_some() {
            return;
        }
        if !now && self.mark_at.is_some_and(|t| t.elapsed() < MARK_EVERY) {
            return;
        }
        self.mark_at = Some(std::time::Instant::now());
        let slot = self.mark_slot;
        match self.file.write_all_at(
            &format::encode_sync_mark(end),
            format::SYNC_MARK_SLOTS[slot],
        ) {
            Ok(()) => {
                self.mark_written = end;
                self.mark_slot = 1 - slot;
            }
            Err(e) if !self.mark_failed => {
                self.mark_failed = true;
                tracing::warn!(path = %self.path.display(), error = %e,
                    "cannot write an extent group's sync mark; its older mark stays");
            }
            Err(_) => {}
        }
    }

    /// Writes a sync mark [`Self::write_mark`] skipped, if any (the
    /// background syncer calls it for groups with nothing left to sync).
    /// With `checkpoint` it also saves an index checkpoint if enough was
    /// indexed since the last one, and says whether it did.
    pub fn catch_up_mark(&mut self, checkpoint: bool) -> bool {
        if self.mark_written < self.synced_end {
            self.write_mark(self.synced_end, true);
        }
        checkpoint && self.write_checkpoint(CHECKPOINT_AFTER)
    }

    fn damaged(&mut self, off: u64, len: u64, e: FormatError) {
        tracing::error!(path = %self.path.display(), offset = off, error = %e,
            "extent group record unreadable; this replica is damaged");
        self.report.damage = Some(format!(
            "{e} ({} bytes from there on not indexed)",
            len - off
        ));
    }

    fn index_record(&mut self, rh: &RecordHeader, payload_off: u64) {
        self.report.records += 1;
        self.since_checkpoint += 1;
        self.max_seq = self.max_seq.max(rh.sequence);
        self.epoch = self.epoch.max(rh.epoch);
        let kind = RecordKind::try_from(rh.kind).unwrap_or(RecordKind::RecordEpoch);
        if kind == RecordKind::RecordEpoch {
            return;
        }
        let compressed = rh.codec == Codec::Zstd as i32;
        let rec_end = payload_off + u64::from(rh.payload_len);
        let mut kept = 0u32;
        for i in 0..rh.block_count {
            let b = (rh.first_block + i) as usize;
            let Some(&old) = self.slots.get(b) else {
                continue;
            };
            if old.seq() > rh.sequence {
                continue;
            }
            let new = if kind == RecordKind::RecordTrim {
                Slot::Trimmed { seq: rh.sequence }
            } else {
                kept += 1;
                Slot::Data(BlockLoc {
                    seq: rh.sequence,
                    payload_off,
                    payload_len: rh.payload_len,
                    payload_crc: rh.payload_crc32c,
                    compressed,
                    index: i,
                    crc: rh.block_crc32c.get(i as usize).copied().unwrap_or(0),
                })
            };
            self.slots[b] = new;
            match (old, new.is_mapped()) {
                (Slot::Data(o), mapped) => {
                    if !mapped {
                        self.mapped -= 1;
                    }
                    self.release(o.payload_off, rec_end);
                }
                (_, true) => self.mapped += 1,
                _ => {}
            }
        }
        if kind == RecordKind::RecordData && !self.no_holes {
            if let Some((from, to)) = hole_span(payload_off, rec_end) {
                if kept == 0 {
                    // Older than what the file holds for every block (a
                    // copy or a replay arriving late): dead on arrival.
                    self.bury(from, to, rec_end);
                } else {
                    self.records.insert(
                        payload_off,
                        LiveRecord {
                            live: kept,
                            from,
                            to,
                        },
                    );
                }
            }
        }
    }

    /// One block of the record at `payload_off` was superseded by a record
    /// ending at `after`.
    fn release(&mut self, payload_off: u64, after: u64) {
        let Some(r) = self.records.get_mut(&payload_off) else {
            return;
        };
        r.live = r.live.saturating_sub(1);
        if r.live == 0 {
            let (from, to) = (r.from, r.to);
            self.records.remove(&payload_off);
            self.bury(from, to, after);
        }
    }

    fn bury(&mut self, from: u64, to: u64, after: u64) {
        self.dead.push(DeadRange { from, to, after });
        self.dead_bytes += to - from;
    }

    /// Bytes of superseded payloads waiting for their successors to be
    /// durable before they are punched.
    pub fn buried_bytes(&self) -> u64 {
        self.dead_bytes
    }

    /// Turns superseded payloads into holes once the records superseding
    /// them are durable; returns the bytes given back to the filesystem.
    fn punch_synced(&mut self) -> u64 {
        if self.dead.is_empty() {
            return 0;
        }
        let synced = self.synced_end;
        let mut freed = 0;
        let mut i = 0;
        while i < self.dead.len() {
            let d = self.dead[i];
            if d.after > synced {
                i += 1;
                continue;
            }
            self.dead.swap_remove(i);
            self.dead_bytes -= d.to - d.from;
            if self.no_holes {
                continue;
            }
            let flags =
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
            match rustix::fs::fallocate(&self.file, flags, d.from, d.to - d.from) {
                Ok(()) => freed += d.to - d.from,
                Err(e) => {
                    // Not fatal: the bytes stay until compaction drops them.
                    self.no_holes = true;
                    self.records.clear();
                    tracing::warn!(path = %self.path.display(), error = %e,
                        "cannot punch holes in an extent group file; superseded records wait for compaction");
                }
            }
        }
        self.holes += freed;
        freed
    }

    pub fn header(&self) -> &ExtentGroupHeader {
        &self.header
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    pub fn max_sequence(&self) -> u64 {
        self.max_seq
    }
    pub fn report(&self) -> &ScanReport {
        &self.report
    }
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }
    /// The file's logical length (holes included).
    pub fn file_len(&self) -> u64 {
        self.end
    }
    /// Bytes the file takes on its filesystem (holes excluded).
    pub fn allocated_bytes(&self) -> u64 {
        self.end.saturating_sub(self.holes)
    }
    /// A digest (FNV-1a) of which sequence holds each block, data or trim:
    /// two replicas with the same records have the same one. Never 0 (the
    /// RPC's "not reported").
    pub fn sequence_digest(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |x: u64| {
            for byte in x.to_le_bytes() {
                h = (h ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for (b, slot) in self.slots.iter().enumerate() {
            let (kind, seq) = match slot {
                Slot::Empty => continue,
                Slot::Trimmed { seq } => (1, *seq),
                Slot::Data(l) => (0, l.seq),
            };
            eat((b as u64) << 1 | kind);
            eat(seq);
        }
        h.max(1)
    }

    /// Bytes of address space holding data (not counting trims or zeros).
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped as u64 * BLOCK_SIZE as u64
    }

    /// Appends a record. `data` holds `block_count` uncompressed blocks for
    /// DATA records and nothing otherwise; it is compressed with zstd when
    /// `compress` and worth it. Not durable until [`Self::sync`].
    // The arguments are the record header's fields, one to one.
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        kind: RecordKind,
        sequence: u64,
        epoch: u64,
        first_block: u32,
        block_count: u32,
        data: &[u8],
        compress: bool,
    ) -> Result<(), DataError> {
        self.append_summed(
            kind,
            sequence,
            epoch,
            first_block,
            block_count,
            data,
            compress,
            None,
            false,
        )
    }

    /// [`Self::append`] with the blocks' checksums when the caller already
    /// has them (a replica verified what arrived against them): one pass
    /// over the data less. Wrong checksums make the record unreadable, never
    /// wrong: readers verify every block. `direct` writes a large raw
    /// payload past the page cache (see [`DIRECT_WRITE_MIN`]).
    #[allow(clippy::too_many_arguments)]
    pub fn append_summed(
        &mut self,
        kind: RecordKind,
        sequence: u64,
        epoch: u64,
        first_block: u32,
        block_count: u32,
        data: &[u8],
        compress: bool,
        crcs: Option<&[u32]>,
        direct: bool,
    ) -> Result<(), DataError> {
        let (codec, payload, crcs, payload_crc) = match kind {
            RecordKind::RecordData => {
                if data.len() != block_count as usize * BLOCK_SIZE {
                    return Err(DataError::Invalid(format!(
                        "{} bytes for {block_count} blocks",
                        data.len()
                    )));
                }
                let crcs = match crcs {
                    Some(c) if c.len() == block_count as usize => c.to_vec(),
                    _ => format::block_checksums(data),
                };
                let packed = if compress {
                    compress_payload(data)
                } else {
                    None
                };
                match packed {
                    Some(z) => {
                        let crc = crc32c::crc32c(&z);
                        (Codec::Zstd, Cow::Owned(z), crcs, crc)
                    }
                    None => (Codec::None, Cow::Borrowed(data), crcs, 0),
                }
            }
            _ => (Codec::None, Cow::Borrowed(&[][..]), Vec::new(), 0),
        };
        let rh = RecordHeader {
            format_version: cairn_api::FORMAT_VERSION,
            kind: kind as i32,
            sequence,
            epoch,
            first_block,
            block_count,
            codec: codec as i32,
            block_crc32c: crcs,
            payload_len: payload.len() as u32,
            payload_crc32c: payload_crc,
            padding: Vec::new(),
        };
        let direct = direct
            && codec == Codec::None
            && payload.len() >= DIRECT_WRITE_MIN
            && self.staged.is_none()
            && !matches!(self.direct, Direct::Unsupported);
        // The reader's checks guard the writer too: never write what we could not read back.
        let mut rec = if direct {
            format::encode_record_head_block_aligned(&rh, self.end)
        } else {
            format::encode_record_head(&rh)
        };
        format::decode_record_header(
            &rec[RECORD_PREFIX..],
            crc32c::crc32c(&rec[RECORD_PREFIX..]),
            self.end,
            &self.header,
        )
        .map_err(|e| DataError::Invalid(e.to_string()))?;
        let payload_off = self.end + rec.len() as u64;
        if let Some(staged) = &mut self.staged {
            debug_assert_eq!(
                staged.len() as u64,
                self.end,
                "staged bytes start at offset 0"
            );
            staged.extend_from_slice(&rec);
            staged.extend_from_slice(&payload);
        } else if direct && self.write_direct(&rec, &payload)? {
            // Written past the page cache.
        } else {
            // Large payloads go in a second write rather than a copy.
            if payload.len() < SEPARATE_PAYLOAD_WRITE {
                rec.extend_from_slice(&payload);
            }
            self.file
                .write_all_at(&rec, self.end)
                .map_err(|e| DataError::io(&self.path, e))?;
            if payload.len() >= SEPARATE_PAYLOAD_WRITE {
                self.file
                    .write_all_at(&payload, payload_off)
                    .map_err(|e| DataError::io(&self.path, e))?;
            }
        }
        let head_crc = u32::from_le_bytes([rec[8], rec[9], rec[10], rec[11]]);
        self.last_record = Some((self.end, head_crc));
        self.end = payload_off + payload.len() as u64;
        self.index_record(&rh, payload_off);
        Ok(())
    }

    /// Writes a record (head, then payload) at the end with `O_DIRECT`, from
    /// the start of the block holding the end, so every offset and length is
    /// block-aligned: the head was padded to end on a block, and the bytes
    /// of that block before the end (the previous record's tail) are read
    /// back and written again unchanged. `Ok(false)`: direct I/O is not
    /// available here, nothing was written, write buffered instead.
    fn write_direct(&mut self, head: &[u8], payload: &[u8]) -> Result<bool, DataError> {
        let block = BLOCK_SIZE as u64;
        let lead = (self.end % block) as usize;
        let start = self.end - lead as u64;
        let len = lead + head.len() + payload.len();
        debug_assert_eq!(len % BLOCK_SIZE, 0, "padded head and whole blocks");
        if matches!(self.direct, Direct::Untried) {
            self.direct = match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&self.path)
            {
                Ok(f) => Direct::Open(f),
                Err(e) => {
                    tracing::info!(path = %self.path.display(), error = %e,
                        "no direct I/O on this filesystem; replica writes stay buffered");
                    Direct::Unsupported
                }
            };
        }
        let Direct::Open(fd) = &self.direct else {
            return Ok(false);
        };
        // The payload goes from where it is when it is aligned (a large
        // replica frame ends on a block: `cairn_rpc::frame::ALIGN_FROM`),
        // else through the staging buffer with the head.
        let in_place = (payload.as_ptr() as usize).is_multiple_of(BLOCK_SIZE);
        let staged = if in_place { lead + head.len() } else { len };
        let written = DIRECT_BUF.with_borrow_mut(|buf| -> std::io::Result<usize> {
            let b = aligned(buf, staged);
            self.file.read_exact_at(&mut b[..lead], start)?;
            b[lead..lead + head.len()].copy_from_slice(head);
            let n = if in_place {
                let parts = [std::io::IoSlice::new(b), std::io::IoSlice::new(payload)];
                rustix::io::pwritev(fd, &parts, start).map_err(std::io::Error::from)
            } else {
                b[lead + head.len()..].copy_from_slice(payload);
                fd.write_at(b, start)
            };
            if buf.len() > DIRECT_BUF_KEEP {
                *buf = Vec::new();
            }
            n
        });
        match written {
            Ok(n) if n == len => Ok(true),
            Ok(n) => Err(DataError::io(
                &self.path,
                std::io::Error::other(format!("direct write of {len} bytes wrote {n}")),
            )),
            // Refused before writing anything (an alignment the device does not take).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(path = %self.path.display(), error = %e,
                    "direct write refused; replica writes stay buffered");
                self.direct = Direct::Unsupported;
                Ok(false)
            }
            Err(e) => Err(DataError::io(&self.path, e)),
        }
    }

    /// Offset up to which records are written (sync target for group commit).
    pub fn end(&self) -> u64 {
        self.end
    }
    pub fn synced_end(&self) -> u64 {
        self.synced_end
    }
    /// A handle for syncing without holding the group's lock.
    pub fn sync_handle(&self) -> Result<File, DataError> {
        self.file
            .try_clone()
            .map_err(|e| DataError::io(&self.path, e))
    }
    /// Records that the file is durable up to `upto` (synced through a
    /// [`Self::sync_handle`]) and punches what that allows; returns the
    /// bytes given back to the filesystem.
    pub fn mark_synced(&mut self, upto: u64) -> u64 {
        self.synced_end = self.synced_end.max(upto);
        self.write_mark(self.synced_end, false);
        self.write_checkpoint(CHECKPOINT_AFTER);
        self.punch_synced()
    }

    /// Makes every appended record durable (and punches what that allows).
    pub fn sync(&mut self) -> Result<(), DataError> {
        if self.synced_end < self.end {
            self.file
                .sync_data()
                .map_err(|e| DataError::io(&self.path, e))?;
            self.synced_end = self.end;
        }
        self.write_mark(self.synced_end, false);
        self.punch_synced();
        Ok(())
    }

    /// Reads blocks `[first, first + count)`, verified; unmapped blocks are
    /// zeros. A checksum mismatch is an error naming the block, never data.
    pub fn read(&self, first: u32, count: u32) -> Result<Vec<u8>, DataError> {
        self.read_from(first, count, Source::Disk)?
            .ok_or_else(|| DataError::Unavailable("blocking read would block".into()))
    }

    /// [`Self::read`] from the page cache only: `None` when some of the data
    /// would have to come from the disk (the caller then reads on a thread
    /// that may block). Lets cached reads skip the hop to a blocking thread.
    pub fn read_cached(&self, first: u32, count: u32) -> Result<Option<Vec<u8>>, DataError> {
        self.read_from(first, count, Source::PageCache)
    }

    /// The file and index as a reader sees them.
    fn view(&self) -> View<'_> {
        View {
            file: &self.file,
            path: &self.path,
            group: self.header.extent_group_id,
            slots: &self.slots,
        }
    }

    fn read_from(
        &self,
        first: u32,
        count: u32,
        src: Source<'_>,
    ) -> Result<Option<Vec<u8>>, DataError> {
        self.view().read_from(first, count, src)
    }

    /// Whether superseded records take more room than the live ones (not
    /// counting those about to become holes) by this group's factor
    /// ([`Self::compaction_factor_x8`]), or their headers alone make the
    /// file long.
    pub fn needs_compaction(&self) -> bool {
        // A damaged replica is kept as it is until a repair replaces it: a
        // compaction would write a file with a clean report, serving blocks
        // past the damage as their older versions.
        if self.report.damage.is_some() {
            return false;
        }
        let live = self.mapped_bytes() + SUPERBLOCK_SIZE;
        let dead = self.buried_bytes();
        let kept = self.allocated_bytes().saturating_sub(dead);
        kept * 8 > live * self.compaction_factor_x8() + (8 << 20)
            || self.end > MAX_SPARSE_FACTOR * (live + (1 << 20))
    }

    /// How many times its live data a group may hold before it is
    /// compacted, in eighths: 1.5 to 2.5 (2 on average), by group id. Random
    /// overwrites of a vdisk fill its groups at the same pace; with one
    /// factor for all they reached it together, and the run that met that
    /// wave of compactions wrote at half speed.
    fn compaction_factor_x8(&self) -> u64 {
        12 + self.header.extent_group_id % 9
    }

    /// Rewrites the file with only the newest version of each block (same
    /// sequences, the current epoch), then atomically replaces it and makes
    /// it durable. A block that fails verification aborts the compaction:
    /// the old file, which may still be repaired from peers, is kept as it
    /// is. The store runs the same steps with the group's lock released for
    /// the long part ([`Self::begin_compaction`]).
    pub fn compact(&mut self) -> Result<(), DataError> {
        let mut c = self.begin_compaction()?;
        c.copy()?;
        self.compaction_catch_up(&mut c)?;
        drop(self.finish_compaction(c)?);
        self.sync()?;
        if let Some(dir) = self.path.parent() {
            cairn_util::durable::sync_dir(dir).map_err(|e| DataError::io(dir, e))?;
        }
        // The old file's checkpoint names the old instance; this one
        // describes the new file whole.
        self.write_checkpoint(1);
        Ok(())
    }

    /// Starts a compaction from the index as it is now. The copy
    /// ([`Compaction::copy`]) needs no lock on this file: records are never
    /// rewritten in place, and the caller keeps syncs (which punch
    /// superseded records into holes) away until
    /// [`Self::finish_compaction`]. Blocks written meanwhile are copied
    /// again by [`Self::compaction_catch_up`].
    pub fn begin_compaction(&self) -> Result<Compaction, DataError> {
        let tmp = self.path.with_extension("ceg.compact");
        let _ = std::fs::remove_file(&tmp);
        let mut header = self.header.clone();
        header.epoch = self.epoch;
        // The live blocks and a record header for each at most.
        let out_bytes = self.mapped_bytes() + SUPERBLOCK_SIZE + self.slots.len() as u64 * 256;
        let stage = (out_bytes <= COMPACT_IN_MEMORY).then_some(out_bytes as usize);
        let file = self.sync_handle()?;
        let out = Self::create_staged(&tmp, header, stage)?;
        Ok(Compaction {
            file,
            path: self.path.clone(),
            tmp: TmpFile(Some(tmp)),
            group: self.header.extent_group_id,
            compress: self.header.codec == Codec::Zstd as i32,
            slots: self.slots.clone(),
            epoch: self.epoch,
            max_seq: self.max_seq,
            end: self.end,
            holes: self.holes,
            out,
        })
    }

    /// Copies into the compaction what changed in this file since its
    /// snapshot (or its last catch-up): blocks written or trimmed, a raised
    /// epoch, a higher sequence. Returns how many blocks that was. Run with
    /// the group's lock held: the last one, just before
    /// [`Self::finish_compaction`], leaves nothing behind.
    pub fn compaction_catch_up(&self, c: &mut Compaction) -> Result<usize, DataError> {
        if c.slots.len() != self.slots.len() {
            return Err(DataError::Invalid("compaction of a different group".into()));
        }
        if c.slots
            .iter()
            .zip(&self.slots)
            .any(|(then, now)| *now == Slot::Empty && *then != Slot::Empty)
        {
            // Nothing unmaps a block (a trim is a record): not this file.
            return Err(DataError::Unavailable(
                "a block was unmapped during compaction".into(),
            ));
        }
        let changed = |b: usize| self.slots[b] != c.slots[b];
        let n = copy_blocks(
            self.view(),
            &mut c.out,
            changed,
            self.epoch,
            c.compress,
            Source::Disk,
        )?;
        if self.epoch > c.out.epoch() || self.max_seq > c.out.max_sequence() {
            c.out.append(
                RecordKind::RecordEpoch,
                self.max_seq,
                self.epoch,
                0,
                0,
                &[],
                false,
            )?;
        }
        c.slots.copy_from_slice(&self.slots);
        c.epoch = self.epoch;
        c.max_seq = self.max_seq;
        Ok(n)
    }

    /// Puts a caught-up compaction's file in place of this one (a rename)
    /// and becomes it. Returns a handle for syncing it: neither the records
    /// of the last catch-up nor the rename are durable until the caller
    /// syncs that handle and the directory, and the caller must not claim
    /// any write durable before. Also returns the old file, to be dropped
    /// away from the group's lock.
    pub fn finish_compaction(&mut self, c: Compaction) -> Result<(File, Retired), DataError> {
        let Compaction {
            mut out,
            mut tmp,
            file,
            ..
        } = c;
        let fd = out.sync_handle()?;
        let from = tmp
            .0
            .take()
            .ok_or_else(|| DataError::Invalid("compaction already finished".into()))?;
        if let Err(e) = std::fs::rename(&from, &self.path) {
            tmp.0 = Some(from);
            return Err(DataError::io(&self.path, e));
        }
        // The new file's index was built as its records were appended: no
        // need to scan it again.
        out.path = self.path.clone();
        let old = std::mem::replace(self, out);
        Ok((
            fd,
            Retired {
                _old: Box::new(old),
                _handle: file,
            },
        ))
    }

    /// Verifies every mapped block; returns the ones that fail.
    pub fn verify(&self) -> Vec<u32> {
        (0..self.slots.len() as u32)
            .filter(|&b| self.slots[b as usize].is_mapped() && self.read(b, 1).is_err())
            .collect()
    }
}

/// A compaction under way: the new file being written from a snapshot of
/// the old one's index (see [`ExtentGroupFile::begin_compaction`]).
#[derive(Debug)]
pub struct Compaction {
    /// The old file (a second handle), read without its group's lock.
    file: File,
    path: PathBuf,
    tmp: TmpFile,
    group: u64,
    compress: bool,
    /// The old file's index as copied so far.
    slots: Vec<Slot>,
    epoch: u64,
    max_seq: u64,
    end: u64,
    holes: u64,
    out: ExtentGroupFile,
}

impl Compaction {
    /// Writes the newest version of every block of the snapshot into the
    /// new file and makes that durable. The long part, run without the
    /// group's lock: one read of the old file and one write of the new (block
    /// by block a compaction after random 4 KiB writes took ~1,300
    /// syscalls), unless holes make up much of the old file (reading them is
    /// copying zeros).
    pub fn copy(&mut self) -> Result<(), DataError> {
        let image = if self.end <= COMPACT_IN_MEMORY && self.holes < self.end / 2 {
            let mut image = vec![0u8; self.end as usize];
            self.file
                .read_exact_at(&mut image, 0)
                .map_err(|e| DataError::io(&self.path, e))?;
            Some(image)
        } else {
            None
        };
        let src = image.as_deref().map_or(Source::Disk, Source::Image);
        let view = View {
            file: &self.file,
            path: &self.path,
            group: self.group,
            slots: &self.slots,
        };
        copy_blocks(
            view,
            &mut self.out,
            |_| true,
            self.epoch,
            self.compress,
            src,
        )?;
        // Keep the highest sequence even if no block carries it any more.
        if self.out.max_sequence() < self.max_seq {
            self.out.append(
                RecordKind::RecordEpoch,
                self.max_seq,
                self.epoch,
                0,
                0,
                &[],
                false,
            )?;
        }
        self.out.finish_staged()
    }

    /// Makes what catch-ups added to the new file durable, so that the
    /// one run under the group's lock has only a few blocks to add.
    pub fn sync(&mut self) -> Result<(), DataError> {
        self.out.sync()
    }
}

/// The handles of a file compaction replaced. The last close of a file
/// renamed over frees all its blocks, which took up to ~190 ms on the test
/// VM (a journal transaction): dropped under the group's lock it stalled
/// every write to the group, and the runtime threads those run on.
#[derive(Debug)]
pub struct Retired {
    _old: Box<ExtentGroupFile>,
    _handle: File,
}

/// A compaction's new file until it is renamed into place: removed if the
/// compaction stops before that.
#[derive(Debug)]
struct TmpFile(Option<PathBuf>);

impl Drop for TmpFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Appends to `out` the newest version (as `from` indexes it) of the blocks
/// `pick` chooses: one record per run of picked blocks from one record (at
/// most 256 blocks), a trim record per run of trimmed ones, each with its
/// own sequence and `epoch`. Returns how many blocks it copied. Data is read
/// back verified, so the checksums in the slots are the data's: the copy
/// reuses them; a block that fails aborts the copy.
fn copy_blocks(
    from: View<'_>,
    out: &mut ExtentGroupFile,
    pick: impl Fn(usize) -> bool,
    epoch: u64,
    compress: bool,
    src: Source<'_>,
) -> Result<usize, DataError> {
    let slots = from.slots;
    let n = slots.len();
    let mut copied = 0;
    let mut b = 0usize;
    while b < n {
        let start = b;
        let slot = slots[b];
        b += 1;
        if !pick(start) {
            continue;
        }
        match slot {
            Slot::Empty => continue,
            Slot::Trimmed { seq } => {
                while b < n && pick(b) && slots[b] == (Slot::Trimmed { seq }) {
                    b += 1;
                }
                out.append(
                    RecordKind::RecordTrim,
                    seq,
                    epoch,
                    start as u32,
                    (b - start) as u32,
                    &[],
                    false,
                )?;
            }
            Slot::Data(loc) => {
                while b < n
                    && b - start < 256
                    && pick(b)
                    && matches!(slots[b], Slot::Data(l) if l.seq == loc.seq)
                {
                    b += 1;
                }
                let data = from
                    .read_from(start as u32, (b - start) as u32, src)?
                    .ok_or_else(|| DataError::Unavailable("compaction read".into()))?;
                let crcs: Vec<u32> = slots[start..b]
                    .iter()
                    .filter_map(|s| match s {
                        Slot::Data(l) => Some(l.crc),
                        _ => None,
                    })
                    .collect();
                out.append_summed(
                    RecordKind::RecordData,
                    loc.seq,
                    epoch,
                    start as u32,
                    (b - start) as u32,
                    &data,
                    compress,
                    Some(&crcs),
                    false,
                )?;
            }
        }
        copied += b - start;
    }
    Ok(copied)
}

/// A group file's blocks read through an index: the open file's own, or a
/// compaction's copy of it, which reads the old file outside the group's
/// lock.
#[derive(Clone, Copy)]
struct View<'a> {
    file: &'a File,
    path: &'a Path,
    group: u64,
    slots: &'a [Slot],
}

impl View<'_> {
    /// Fills `buf` from `at`; false when `src` is the page cache and the
    /// data is not all there (RWF_NOWAIT).
    fn pread(&self, buf: &mut [u8], at: u64, src: Source<'_>) -> Result<bool, DataError> {
        match src {
            Source::Disk => {
                self.file
                    .read_exact_at(buf, at)
                    .map_err(|e| DataError::io(self.path, e))?;
                return Ok(true);
            }
            Source::Image(image) => {
                let part = usize::try_from(at)
                    .ok()
                    .and_then(|a| image.get(a..a.checked_add(buf.len())?))
                    .ok_or_else(|| {
                        DataError::io(self.path, std::io::ErrorKind::UnexpectedEof.into())
                    })?;
                buf.copy_from_slice(part);
                return Ok(true);
            }
            Source::PageCache => {}
        }
        let mut done = 0usize;
        while done < buf.len() {
            let mut iov = [std::io::IoSliceMut::new(&mut buf[done..])];
            match rustix::io::preadv2(
                self.file,
                &mut iov,
                at + done as u64,
                rustix::io::ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) => {
                    return Err(DataError::io(
                        self.path,
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ))
                }
                Ok(n) => done += n,
                Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::OPNOTSUPP) => {
                    return Ok(false)
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(DataError::io(self.path, e.into())),
            }
        }
        Ok(true)
    }

    fn read_from(
        &self,
        first: u32,
        count: u32,
        src: Source<'_>,
    ) -> Result<Option<Vec<u8>>, DataError> {
        let end = first as usize + count as usize;
        if end > self.slots.len() {
            return Err(DataError::Invalid(format!(
                "blocks {first}..{end} outside the group's {}",
                self.slots.len()
            )));
        }
        let mut out = vec![0u8; count as usize * BLOCK_SIZE];
        let mut cache: Option<(u64, Vec<u8>)> = None;
        let slots = &self.slots[first as usize..end];
        // Blocks already fetched by one pread covering a run of a record.
        let mut fetched_until = 0usize;
        for (i, slot) in slots.iter().enumerate() {
            let Slot::Data(loc) = slot else { continue };
            let block = first + i as u32;
            if !loc.compressed && i >= fetched_until {
                // One pread for the run of blocks stored back to back in
                // the same raw record (a sequential write reads back whole).
                let mut run = i + 1;
                while let Some(Slot::Data(next)) = slots.get(run) {
                    let consecutive = !next.compressed
                        && next.payload_off == loc.payload_off
                        && u64::from(next.index) == u64::from(loc.index) + (run - i) as u64;
                    if !consecutive {
                        break;
                    }
                    run += 1;
                }
                let at = loc.payload_off + u64::from(loc.index) * BLOCK_SIZE as u64;
                if !self.pread(&mut out[i * BLOCK_SIZE..run * BLOCK_SIZE], at, src)? {
                    return Ok(None);
                }
                fetched_until = run;
            }
            let dst = &mut out[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            if loc.compressed {
                if cache.as_ref().map(|c| c.0) != Some(loc.payload_off) {
                    let Some(raw) = self.read_compressed(loc, block, src)? else {
                        return Ok(None);
                    };
                    cache = Some((loc.payload_off, raw));
                }
                let Some((_, raw)) = cache.as_ref() else {
                    continue;
                };
                let at = loc.index as usize * BLOCK_SIZE;
                let src = raw
                    .get(at..at + BLOCK_SIZE)
                    .ok_or_else(|| self.mismatch(block))?;
                dst.copy_from_slice(src);
            }
            if crc32c::crc32c(dst) != loc.crc {
                return Err(self.mismatch(block));
            }
        }
        Ok(Some(out))
    }

    fn read_compressed(
        &self,
        loc: &BlockLoc,
        block: u32,
        src: Source<'_>,
    ) -> Result<Option<Vec<u8>>, DataError> {
        let mut z = vec![0u8; loc.payload_len as usize];
        if !self.pread(&mut z, loc.payload_off, src)? {
            return Ok(None);
        }
        if crc32c::crc32c(&z) != loc.payload_crc {
            return Err(self.mismatch(block));
        }
        zstd::bulk::decompress(&z, format::MAX_GROUP_BYTES as usize)
            .map(Some)
            .map_err(|_| self.mismatch(block))
    }

    fn mismatch(&self, block: u32) -> DataError {
        DataError::Checksum {
            path: self.path.to_path_buf(),
            group: self.group,
            block,
        }
    }
}

thread_local! {
    /// Staging for direct writes, kept per thread: a fresh allocation each
    /// time would fault in new pages, the cost direct I/O is there to avoid.
    static DIRECT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Larger staging buffers are not kept between writes.
const DIRECT_BUF_KEEP: usize = 4 << 20;

/// `len` bytes of `buf` starting at a block-aligned address (what `O_DIRECT`
/// needs of memory), growing `buf` as needed.
fn aligned(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len + BLOCK_SIZE {
        buf.resize(len + BLOCK_SIZE, 0);
    }
    let off = buf.as_ptr().align_offset(BLOCK_SIZE).min(BLOCK_SIZE);
    &mut buf[off..off + len]
}

fn compress_payload(data: &[u8]) -> Option<Vec<u8>> {
    let z = zstd::bulk::compress(data, 1).ok()?;
    // Keep the raw form unless compression saves at least an eighth: reads
    // of uncompressed records can fetch single blocks.
    (z.len() < data.len() - data.len() / 8).then_some(z)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn header(id: u64) -> ExtentGroupHeader {
        ExtentGroupHeader {
            format_version: 1,
            cluster_id: "cluster".into(),
            extent_group_id: id,
            vdisk_id: "vd".into(),
            vdisk_generation: 0,
            first_vblock: 2,
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

    fn pattern(block: u32, gen: u8) -> Vec<u8> {
        let mut b = vec![gen; BLOCK_SIZE];
        b[..4].copy_from_slice(&block.to_le_bytes());
        b
    }

    /// Appends one uncompressed block, `pattern(block, gen)`, at epoch 1.
    fn put_block(g: &mut ExtentGroupFile, seq: u64, block: u32, gen: u8) {
        g.append(
            RecordKind::RecordData,
            seq,
            1,
            block,
            1,
            &pattern(block, gen),
            false,
        )
        .unwrap();
    }

    #[test]
    fn newest_sequence_wins_in_any_order_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("1.ceg");
        let mut g = ExtentGroupFile::create(&p, header(1)).unwrap();
        put_block(&mut g, 2, 5, 2);
        put_block(&mut g, 1, 5, 1);
        g.append(
            RecordKind::RecordData,
            3,
            1,
            6,
            2,
            &[pattern(6, 3), pattern(7, 3)].concat(),
            true,
        )
        .unwrap();
        g.append(RecordKind::RecordTrim, 4, 1, 7, 1, &[], false)
            .unwrap();
        g.sync().unwrap();
        for g in [g, ExtentGroupFile::open(&p, true).unwrap()] {
            assert_eq!(g.read(5, 1).unwrap(), pattern(5, 2));
            assert_eq!(g.read(6, 1).unwrap(), pattern(6, 3));
            assert_eq!(g.read(7, 1).unwrap(), vec![0u8; BLOCK_SIZE]);
            assert_eq!(g.max_sequence(), 4);
            assert_eq!(g.mapped_bytes(), 2 * BLOCK_SIZE as u64);
        }
    }

    fn blocks(first: u32, count: u32, gen: u8) -> Vec<u8> {
        (first..first + count)
            .flat_map(|b| pattern(b, gen))
            .collect()
    }

    #[test]
    fn direct_records_between_buffered_ones_read_back_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.ceg");
        let odirect = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.path().join("probe"))
            .is_ok();
        let mut g = ExtentGroupFile::create(&p, header(1)).unwrap();
        let big = DIRECT_WRITE_MIN as u32 / BLOCK_SIZE as u32;
        let put = |g: &mut ExtentGroupFile, seq, first, count, direct| {
            // Odd sequences' data sits at an aligned address (written in
            // place), even ones' wherever the allocator put it (copied).
            let mut store = Vec::new();
            let data = aligned(&mut store, count as usize * BLOCK_SIZE);
            data.copy_from_slice(&blocks(first, count, seq as u8));
            let unaligned;
            let data: &[u8] = if seq % 2 == 1 {
                data
            } else {
                unaligned = data.to_vec();
                &unaligned[..]
            };
            g.append_summed(
                RecordKind::RecordData,
                seq,
                1,
                first,
                count,
                data,
                false,
                None,
                direct,
            )
            .unwrap();
        };
        // Buffered, direct (the end is off a block: its tail block is
        // rewritten), buffered again, then a direct overwrite.
        put(&mut g, 1, 0, 1, false);
        put(&mut g, 2, 1, big, true);
        put(&mut g, 3, 2, 1, false);
        put(&mut g, 4, 10, big + 3, true);
        put(&mut g, 7, 100, big, true);
        // Small payloads and compressible groups never go direct.
        put(&mut g, 5, 200, 2, true);
        let want = |b: u32| match b {
            0 => pattern(0, 1),
            2 => pattern(2, 3),
            200 | 201 => pattern(b, 5),
            b if (100..100 + big).contains(&b) => pattern(b, 7),
            b if (10..10 + big + 3).contains(&b) => pattern(b, 4),
            b if (1..1 + big).contains(&b) => pattern(b, 2),
            _ => vec![0u8; BLOCK_SIZE],
        };
        if odirect {
            assert!(matches!(g.direct, Direct::Open(_)), "{:?}", g.direct);
            for b in [1, 10, 10 + big + 2, 100] {
                let Slot::Data(l) = g.slots()[b as usize] else {
                    panic!("block {b} unmapped");
                };
                assert_eq!(l.payload_off % BLOCK_SIZE as u64, 0, "block {b}");
            }
            let Slot::Data(l) = g.slots()[200] else {
                panic!("block 200 unmapped");
            };
            assert_ne!(l.payload_off % BLOCK_SIZE as u64, 0, "small record padded");
        }
        g.sync().unwrap();
        for g in [g, ExtentGroupFile::open(&p, true).unwrap()] {
            assert_eq!(g.report().damage, None);
            for b in 0..256 {
                assert_eq!(g.read(b, 1).unwrap(), want(b), "block {b}");
            }
            assert_eq!(g.max_sequence(), 7);
        }
    }

    #[test]
    fn compressed_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("2.ceg");
        let mut g = ExtentGroupFile::create(&p, header(2)).unwrap();
        let data: Vec<u8> = (0..16).flat_map(|b| pattern(b, 9)).collect();
        g.append(RecordKind::RecordData, 1, 1, 0, 16, &data, true)
            .unwrap();
        g.sync().unwrap();
        assert!(
            g.file_len() < SUPERBLOCK_SIZE + data.len() as u64 / 4,
            "not compressed"
        );
        let g = ExtentGroupFile::open(&p, false).unwrap();
        assert_eq!(g.read(0, 16).unwrap(), data);
        assert!(g.verify().is_empty());
    }

    #[test]
    fn flipped_data_byte_is_a_checksum_error_never_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("3.ceg");
        let mut g = ExtentGroupFile::create(&p, header(3)).unwrap();
        g.append(
            RecordKind::RecordData,
            1,
            1,
            0,
            4,
            &[0u8; 4 * BLOCK_SIZE].map(|_| 7),
            false,
        )
        .unwrap();
        g.sync().unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0x55], len - BLOCK_SIZE as u64 - 100)
            .unwrap();
        let g = ExtentGroupFile::open(&p, false).unwrap();
        assert_eq!(g.read(0, 2).unwrap().len(), 2 * BLOCK_SIZE);
        let err = g.read(0, 4).unwrap_err();
        assert!(matches!(err, DataError::Checksum { block: 2, .. }), "{err}");
        assert!(err.to_string().contains("3.ceg"), "{err}");
        assert_eq!(g.verify(), vec![2]);
    }

    #[test]
    fn torn_tail_is_cut_and_damage_in_the_middle_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("4.ceg");
        let mut g = ExtentGroupFile::create(&p, header(4)).unwrap();
        let mut starts = Vec::new();
        for s in 1..=3u64 {
            starts.push(g.end());
            put_block(&mut g, s, s as u32, s as u8);
            if s == 2 {
                g.sync().unwrap();
            }
        }
        let full = std::fs::metadata(&p).unwrap().len();
        drop(g);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(full - 10).unwrap();
        let g = ExtentGroupFile::open(&p, true).unwrap();
        assert!(g.report().torn_tail_bytes > 0);
        assert!(g.report().damage.is_none());
        assert_eq!(g.max_sequence(), 2);
        assert_eq!(g.read(2, 1).unwrap(), pattern(2, 2));
        drop(g);
        // Now flip a byte of the second record's header, which a sync
        // covered: damage, not a torn tail.
        f.write_all_at(&[0xff, 0xff], starts[1] + RECORD_PREFIX as u64 + 2)
            .unwrap();
        let g = ExtentGroupFile::open(&p, false).unwrap();
        assert!(g.report().damage.is_some(), "{:?}", g.report());
        assert_eq!(g.read(1, 1).unwrap(), pattern(1, 1));
    }

    /// A group file of blocks 0..64 written eight times over, one record
    /// each (`pattern(b, 8)` last), and its last sequence.
    fn eight_generations(id: u64) -> (tempfile::TempDir, ExtentGroupFile, u64) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(format!("{id}.ceg"));
        let mut g = ExtentGroupFile::create(&p, header(id)).unwrap();
        let mut seq = 0;
        for gen in 1..=8u8 {
            for b in 0..64u32 {
                seq += 1;
                put_block(&mut g, seq, b, gen);
            }
        }
        (dir, g, seq)
    }

    #[test]
    fn compaction_keeps_the_newest_version_and_frees_the_rest() {
        let (_dir, mut g, seq) = eight_generations(6);
        let p = g.path().to_path_buf();
        g.append(RecordKind::RecordTrim, seq + 1, 2, 10, 5, &[], false)
            .unwrap();
        assert!(g.needs_compaction());
        let before = g.file_len();
        g.compact().unwrap();
        assert!(g.file_len() < before / 4, "{} -> {}", before, g.file_len());
        assert_eq!(g.max_sequence(), seq + 1);
        assert_eq!(g.epoch(), 2);
        assert_eq!(g.synced_end(), g.end(), "the compacted file is durable");
        // The compacted file takes new records where its index says it ends.
        g.append(
            RecordKind::RecordData,
            seq + 2,
            2,
            20,
            1,
            &pattern(20, 9),
            false,
        )
        .unwrap();
        g.sync().unwrap();
        for g in [g, ExtentGroupFile::open(&p, true).unwrap()] {
            assert_eq!(g.report().torn_tail_bytes, 0);
            for b in 0..64u32 {
                let want = if (10..15).contains(&b) {
                    vec![0u8; BLOCK_SIZE]
                } else if b == 20 {
                    pattern(20, 9)
                } else {
                    pattern(b, 8)
                };
                assert_eq!(g.read(b, 1).unwrap(), want, "block {b}");
            }
            assert!(matches!(g.slots()[12], Slot::Trimmed { .. }));
        }
    }

    /// What the group takes while a compaction copies it (single blocks, a
    /// run, a trim, a raised epoch, and a write between the catch-ups) ends
    /// up in the compacted file, and nothing older comes back.
    #[test]
    fn writes_during_a_compaction_are_in_the_compacted_file() {
        let (_dir, mut g, mut seq) = eight_generations(7);
        let p = g.path().to_path_buf();
        g.sync().unwrap();
        let mut c = g.begin_compaction().unwrap();
        // During the copy: overwrites (one a run of three blocks), a trim
        // over a rewritten block, a higher epoch.
        for b in [3u32, 40] {
            seq += 1;
            put_block(&mut g, seq, b, 9);
        }
        seq += 1;
        let run: Vec<u8> = (50..53).flat_map(|b| pattern(b, 9)).collect();
        g.append(RecordKind::RecordData, seq, 1, 50, 3, &run, false)
            .unwrap();
        seq += 1;
        g.append(RecordKind::RecordTrim, seq, 3, 40, 2, &[], false)
            .unwrap();
        c.copy().unwrap();
        assert_eq!(g.compaction_catch_up(&mut c).unwrap(), 6);
        c.sync().unwrap();
        // After the first catch-up, before the last: another overwrite.
        seq += 1;
        put_block(&mut g, seq, 3, 10);
        assert_eq!(g.compaction_catch_up(&mut c).unwrap(), 1);
        assert_eq!(g.compaction_catch_up(&mut c).unwrap(), 0, "caught up");
        let before = g.file_len();
        g.finish_compaction(c).unwrap();
        assert!(g.file_len() < before / 4, "{} -> {}", before, g.file_len());
        assert!(!p.with_extension("ceg.compact").exists());
        assert_eq!(g.epoch(), 3);
        assert_eq!(g.max_sequence(), seq);
        g.sync().unwrap();
        for g in [g, ExtentGroupFile::open(&p, true).unwrap()] {
            assert_eq!(g.report().torn_tail_bytes, 0);
            assert!(g.report().damage.is_none());
            assert_eq!(g.epoch(), 3);
            for b in 0..64u32 {
                let want = match b {
                    3 => pattern(3, 10),
                    40 | 41 => vec![0u8; BLOCK_SIZE],
                    50..=52 => pattern(b, 9),
                    _ => pattern(b, 8),
                };
                assert_eq!(g.read(b, 1).unwrap(), want, "block {b}");
            }
        }
    }

    /// A compaction that stops before its rename leaves the old file as it
    /// was and no new file behind.
    #[test]
    fn an_abandoned_compaction_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("8.ceg");
        let mut g = ExtentGroupFile::create(&p, header(8)).unwrap();
        for seq in 1..=64u64 {
            put_block(&mut g, seq, (seq % 4) as u32, seq as u8);
        }
        let mut c = g.begin_compaction().unwrap();
        c.copy().unwrap();
        assert!(p.with_extension("ceg.compact").exists());
        drop(c);
        assert!(!p.with_extension("ceg.compact").exists());
        assert_eq!(g.read(1, 1).unwrap(), pattern(1, 61));
    }

    fn whole_group(gen: u8) -> Vec<u8> {
        (0..256).flat_map(|b| pattern(b, gen)).collect()
    }

    /// Appends generation `gen` of every block of the group, as sequence `gen`.
    fn append_whole(g: &mut ExtentGroupFile, gen: u8) {
        let seq = u64::from(gen);
        g.append(
            RecordKind::RecordData,
            seq,
            1,
            0,
            256,
            &whole_group(gen),
            false,
        )
        .unwrap();
    }

    fn on_disk(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().blocks() * 512
    }

    #[test]
    fn sequential_overwrites_leave_holes_not_garbage_once_durable() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("10.ceg");
        let mut g = ExtentGroupFile::create(&p, header(10)).unwrap();
        append_whole(&mut g, 1);
        g.sync().unwrap();
        let first_payload = match g.slots()[0] {
            Slot::Data(l) => l.payload_off,
            other => panic!("{other:?}"),
        };
        append_whole(&mut g, 2);
        // The successor is in the page cache only: the old version must
        // stay on disk until it is durable.
        let mut old = vec![0u8; BLOCK_SIZE];
        g.file
            .read_exact_at(&mut old, first_payload + 8192)
            .unwrap();
        assert_eq!(
            old,
            pattern(2, 1),
            "punched before its successor was durable"
        );
        assert_eq!(g.allocated_bytes(), g.file_len());
        let waiting: u64 = g.dead.iter().map(|d| d.to - d.from).sum();
        // The first version's whole blocks (its payload is not aligned).
        assert!(waiting >= (1 << 20) - 2 * BLOCK_SIZE as u64, "{waiting}");
        assert_eq!(g.buried_bytes(), waiting);
        g.sync().unwrap();
        assert_eq!(g.buried_bytes(), 0, "punched, no longer waiting");
        g.file
            .read_exact_at(&mut old, first_payload + 8192)
            .unwrap();
        assert_eq!(
            old,
            vec![0u8; BLOCK_SIZE],
            "a superseded payload became a hole"
        );
        for gen in 3..=20u8 {
            append_whole(&mut g, gen);
            g.sync().unwrap();
            assert!(
                !g.needs_compaction(),
                "generation {gen}: holes, not garbage"
            );
        }
        assert!(g.file_len() > 20 << 20, "{}", g.file_len());
        assert!(
            on_disk(&p) < (2 << 20) + (64 << 10),
            "{} bytes on disk",
            on_disk(&p)
        );
        assert!(g.allocated_bytes() < (2 << 20), "{}", g.allocated_bytes());
        for g in [g, ExtentGroupFile::open(&p, true).unwrap()] {
            assert_eq!(g.report().damage, None);
            assert_eq!(g.report().torn_tail_bytes, 0);
            assert_eq!(g.read(0, 256).unwrap(), whole_group(20));
            assert!(g.verify().is_empty());
            assert!(
                g.allocated_bytes() < (2 << 20) + (64 << 10),
                "{}",
                g.allocated_bytes()
            );
        }
        assert_eq!(
            ExtentGroupFile::open(&p, false).unwrap().report().records,
            20
        );
    }

    #[test]
    fn a_record_older_than_every_block_it_holds_is_a_hole_at_the_next_sync() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("11.ceg");
        let mut g = ExtentGroupFile::create(&p, header(11)).unwrap();
        append_whole(&mut g, 5);
        // A late copy of an older version: indexed nowhere.
        append_whole(&mut g, 3);
        g.sync().unwrap();
        assert!(on_disk(&p) < (1 << 20) + (64 << 10), "{}", on_disk(&p));
        assert_eq!(g.read(0, 256).unwrap(), whole_group(5));
        // Partly superseded: the record keeps its blocks.
        g.append(
            RecordKind::RecordData,
            6,
            1,
            0,
            128,
            &whole_group(6)[..128 * BLOCK_SIZE],
            false,
        )
        .unwrap();
        g.sync().unwrap();
        let g = ExtentGroupFile::open(&p, false).unwrap();
        assert_eq!(g.read(0, 128).unwrap(), whole_group(6)[..128 * BLOCK_SIZE]);
        assert_eq!(
            g.read(128, 128).unwrap(),
            whole_group(5)[128 * BLOCK_SIZE..]
        );
    }

    #[test]
    fn headers_of_many_superseded_records_are_compacted_away() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("12.ceg");
        let mut g = ExtentGroupFile::create(&p, header(12)).unwrap();
        let mut gen = 0u8;
        while !g.needs_compaction() {
            gen += 1;
            assert!(gen < 200, "never asked for compaction");
            append_whole(&mut g, gen);
            g.sync().unwrap();
        }
        assert!(g.file_len() > MAX_SPARSE_FACTOR << 20);
        g.compact().unwrap();
        assert!(g.file_len() < (1 << 20) + 8192, "{}", g.file_len());
        assert_eq!(g.read(0, 256).unwrap(), whole_group(gen));
    }

    /// Random byte flips and truncations: opening and reading never panic,
    /// and a replica that opens clean never returns wrong data.
    #[test]
    fn random_damage_never_panics_or_returns_wrong_data() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("7.ceg");
        let mut g = ExtentGroupFile::create(&good, header(7)).unwrap();
        let mut seq = 0;
        for gen in 1..=3u8 {
            for b in (0..32u32).step_by(gen as usize) {
                seq += 1;
                g.append(
                    RecordKind::RecordData,
                    seq,
                    1,
                    b,
                    1,
                    &pattern(b, gen),
                    gen == 2,
                )
                .unwrap();
            }
        }
        g.sync().unwrap();
        let want: Vec<Vec<u8>> = (0..32).map(|b| g.read(b, 1).unwrap()).collect();
        drop(g);
        let bytes = std::fs::read(&good).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let p = dir.path().join("x.ceg");
        for round in 0..300 {
            let mut b = bytes.clone();
            if round % 3 == 0 {
                b.truncate(rng.gen_range(0..bytes.len()));
            } else {
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..b.len());
                    b[i] ^= rng.gen_range(1..=255u8);
                }
            }
            std::fs::write(&p, &b).unwrap();
            let Ok(f) = ExtentGroupFile::open(&p, false) else {
                continue;
            };
            let clean = f.report().damage.is_none() && f.report().torn_tail_bytes == 0;
            for blk in 0..32u32 {
                match f.read(blk, 1) {
                    // A clean, complete file must give exactly the data.
                    Ok(d) if clean => {
                        assert_eq!(d, want[blk as usize], "round {round} block {blk}")
                    }
                    _ => {}
                }
            }
        }
    }

    /// A power loss after random writes and syncs (the LazyFS model: every
    /// byte written since the last sync may or may not have reached the
    /// disk, page by page, and the file may end anywhere after what was
    /// synced). Oracle: the file opens undamaged and every block reads back
    /// a version at least as new as the one the last sync covered, never an
    /// error, never data that was not written.
    #[test]
    fn power_loss_keeps_every_synced_write_and_cuts_what_it_tore() {
        use rand::{Rng, SeedableRng};
        const BLOCKS: u32 = 64;
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut cut_rounds = 0;
        let mut used_checkpoints = 0;
        for round in 0..120u64 {
            let p = dir.path().join(format!("{round}.ceg"));
            let mut g = ExtentGroupFile::create(&p, header(round)).unwrap();
            // Every version of every block: (sequence, content or None for zeros).
            let mut versions: Vec<Vec<(u64, Option<Vec<u8>>)>> = vec![vec![(0, None)]; 64];
            let mut newest = vec![0u64; BLOCKS as usize];
            let mut floor = vec![0u64; BLOCKS as usize];
            let mut durable_sb = std::fs::read(&p).unwrap()[..SUPERBLOCK_SIZE as usize].to_vec();
            let ckpt = checkpoint::path_for(&p);
            let mut checkpoints = Vec::new();
            let ops = rng.gen_range(5..60);
            for seq in 1..=ops {
                let first = rng.gen_range(0..BLOCKS);
                let count = rng.gen_range(1..=(BLOCKS - first).min(24));
                if rng.gen_bool(0.1) {
                    g.append(RecordKind::RecordTrim, seq, 1, first, count, &[], false)
                        .unwrap();
                    for b in first..first + count {
                        versions[b as usize].push((seq, None));
                        newest[b as usize] = seq;
                    }
                } else {
                    let gen = (seq % 251) as u8 + 1;
                    let data: Vec<u8> = (first..first + count)
                        .flat_map(|b| pattern(b, gen))
                        .collect();
                    let (zstd, direct) = (rng.gen_bool(0.3), rng.gen_bool(0.2));
                    g.append_summed(
                        RecordKind::RecordData,
                        seq,
                        1,
                        first,
                        count,
                        &data,
                        zstd,
                        None,
                        direct && !zstd,
                    )
                    .unwrap();
                    for b in first..first + count {
                        versions[b as usize].push((seq, Some(pattern(b, gen))));
                        newest[b as usize] = seq;
                    }
                }
                // Only a sync that leaves nothing unsynced may save one.
                if rng.gen_bool(0.1) && g.write_checkpoint(1) {
                    checkpoints.push(std::fs::read(&ckpt).unwrap());
                }
                if rng.gen_bool(0.2) {
                    // The superblock as this sync writes it (its page holds
                    // the previous mark; the new one is written after).
                    durable_sb = std::fs::read(&p).unwrap()[..SUPERBLOCK_SIZE as usize].to_vec();
                    g.sync().unwrap();
                    floor.clone_from(&newest);
                    if rng.gen_bool(0.5) && g.write_checkpoint(1) {
                        checkpoints.push(std::fs::read(&ckpt).unwrap());
                    }
                }
            }
            let synced = g.synced_end() as usize;
            drop(g);
            // Checkpoints are never synced: the newest, an older one, none
            // or a torn one may be what the disk has.
            if let Some(newest_ckpt) = checkpoints.last() {
                let mut c = checkpoints[rng.gen_range(0..checkpoints.len())].clone();
                match rng.gen_range(0..4) {
                    0 => c.clone_from(newest_ckpt),
                    1 => {
                        let at = rng.gen_range(0..c.len());
                        c[at..].fill(0);
                    }
                    _ => {}
                }
                if rng.gen_bool(0.1) {
                    std::fs::remove_file(&ckpt).unwrap();
                } else {
                    std::fs::write(&ckpt, &c).unwrap();
                }
            }

            let mut bytes = std::fs::read(&p).unwrap();
            let mark = format::durable_end(&bytes).unwrap() as usize;
            assert!(
                mark <= synced,
                "round {round}: the mark {mark} claims more than was synced ({synced})"
            );
            // Unsynced pages fall back to what the disk had: nothing
            // (zeros), page by page, all at once, or the file cut short.
            match rng.gen_range(0..4) {
                0 => {
                    let mut page = synced / 4096 * 4096;
                    while page < bytes.len() {
                        if rng.gen_bool(0.5) {
                            let end = (page + 4096).min(bytes.len());
                            bytes[page.max(synced)..end].fill(0);
                        }
                        page += 4096;
                    }
                }
                1 => bytes[synced..].fill(0),
                2 => bytes.truncate(rng.gen_range(synced..=bytes.len())),
                _ => {}
            }
            // The superblock page itself may not have been written back.
            if rng.gen_bool(0.5) {
                bytes[..SUPERBLOCK_SIZE as usize].copy_from_slice(&durable_sb);
            }
            std::fs::write(&p, &bytes).unwrap();
            let disk_mark = format::durable_end(&bytes).unwrap();

            // Whatever checkpoint survived, the index is the one a whole
            // scan builds.
            let whole = ExtentGroupFile::open(&p, false).unwrap();
            let indexed = ExtentGroupFile::open_indexed(&p, false).unwrap();
            assert!(
                whole.slots() == indexed.slots(),
                "round {round}: the checkpoint's index differs"
            );
            assert_eq!(
                (whole.end(), whole.max_sequence(), whole.epoch()),
                (indexed.end(), indexed.max_sequence(), indexed.epoch()),
                "round {round}"
            );
            assert_eq!(whole.report().records, indexed.report().records);
            used_checkpoints += u32::from(indexed.report().from_checkpoint > 0);
            drop((whole, indexed));
            let mut g = ExtentGroupFile::open_indexed(&p, true)
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(g.report().damage, None, "round {round}");
            if g.report().torn_tail_bytes > 0 {
                cut_rounds += 1;
                assert_eq!(g.synced_end(), g.end(), "the cut is synced");
            } else if g.report().from_checkpoint == 0 {
                // What the mark does not cover may be in the page cache only.
                assert_eq!(g.synced_end(), disk_mark.min(g.end()), "round {round}");
            }
            let check = |g: &ExtentGroupFile, when: &str| {
                for b in 0..BLOCKS {
                    let got = g
                        .read(b, 1)
                        .unwrap_or_else(|e| panic!("round {round} {when} block {b}: {e}"));
                    let found = versions[b as usize].iter().find(|(seq, v)| {
                        *seq >= floor[b as usize]
                            && v.as_deref()
                                .map_or(got.iter().all(|&x| x == 0), |v| v == got)
                    });
                    assert!(
                        found.is_some(),
                        "round {round} {when} block {b}: not a version since the last sync ({})",
                        floor[b as usize]
                    );
                }
            };
            check(&g, "after the power loss");
            // What the open kept is durable after the next sync, and stays.
            g.sync().unwrap();
            assert_eq!(
                format::durable_end(&std::fs::read(&p).unwrap()),
                Some(g.end())
            );
            let before: Vec<Vec<u8>> = (0..BLOCKS).map(|b| g.read(b, 1).unwrap()).collect();
            drop(g);
            let g = ExtentGroupFile::open(&p, false).unwrap();
            assert_eq!(g.report().torn_tail_bytes, 0, "round {round}");
            let after: Vec<Vec<u8>> = (0..BLOCKS).map(|b| g.read(b, 1).unwrap()).collect();
            assert!(before == after, "round {round}: reopening changed the data");
        }
        assert!(cut_rounds > 20, "only {cut_rounds} rounds tore anything");
        assert!(
            used_checkpoints > 20,
            "only {used_checkpoints} rounds opened from a checkpoint"
        );
    }

    /// Replicas holding the same records, appended in any order, have one
    /// digest; a replica missing a record has another, even with the same
    /// highest sequence (what a takeover used to compare alone).
    #[test]
    fn sequence_digest_tells_replicas_apart_by_content_not_order() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, seqs: &[u64]| {
            let mut g = ExtentGroupFile::create(&dir.path().join(name), header(6)).unwrap();
            for &seq in seqs {
                let b = (seq % 5) as u32;
                if seq == 4 {
                    g.append(RecordKind::RecordTrim, seq, 1, b, 1, &[], false)
                        .unwrap();
                } else {
                    put_block(&mut g, seq, b, seq as u8);
                }
            }
            g
        };
        let a = write("a.ceg", &[1, 2, 3, 4, 8, 9, 10]);
        let b = write("b.ceg", &[4, 3, 1, 2, 10, 9, 8]);
        let c = write("c.ceg", &[1, 2, 3, 4, 8, 10]);
        assert_eq!(a.sequence_digest(), b.sequence_digest());
        assert_eq!(a.max_sequence(), c.max_sequence());
        assert_ne!(a.sequence_digest(), c.sequence_digest());
        let empty = write("e.ceg", &[]);
        assert_ne!(empty.sequence_digest(), 0, "0 means not reported");
    }

    /// An index checkpoint describes one file: after a compaction (a new
    /// file) the old one is refused, the new file has its own, and a file
    /// that no longer holds the last record a checkpoint covers is scanned
    /// whole.
    #[test]
    fn a_checkpoint_is_used_only_for_the_file_it_describes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("5.ceg");
        let ckpt = checkpoint::path_for(&p);
        let mut g = ExtentGroupFile::create(&p, header(5)).unwrap();
        for seq in 1..=100u64 {
            let b = (seq * 7 % 64) as u32;
            put_block(&mut g, seq, b, seq as u8);
        }
        assert!(!g.write_checkpoint(1), "nothing is synced yet");
        g.sync().unwrap();
        assert!(!g.write_checkpoint(101), "fewer new records than asked");
        assert!(g.write_checkpoint(1));
        assert!(!g.write_checkpoint(1), "nothing new since");
        let whole = |p: &Path| ExtentGroupFile::open(p, false).unwrap();
        let ix = ExtentGroupFile::open_indexed(&p, false).unwrap();
        assert_eq!(ix.report().from_checkpoint, 100);
        assert!(ix.slots() == whole(&p).slots());
        let old = std::fs::read(&ckpt).unwrap();

        g.compact().unwrap();
        let ix = ExtentGroupFile::open_indexed(&p, false).unwrap();
        assert!(ix.report().from_checkpoint > 0, "compaction saves one");
        assert!(ix.slots() == whole(&p).slots());
        let new = std::fs::read(&ckpt).unwrap();
        std::fs::write(&ckpt, &old).unwrap();
        let ix = ExtentGroupFile::open_indexed(&p, false).unwrap();
        assert_eq!(ix.report().from_checkpoint, 0, "the old file's is refused");
        assert!(ix.slots() == whole(&p).slots());
        drop(g);

        // The last record it covers changed under it (one byte of its
        // header): refused, whatever else still matches.
        std::fs::write(&ckpt, &new).unwrap();
        let c = checkpoint::decode(&new, ix.header(), ix.file_len()).unwrap();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff], c.last_record.0 + RECORD_PREFIX as u64 + 2)
            .unwrap();
        let ix = ExtentGroupFile::open_indexed(&p, false).unwrap();
        assert_eq!(ix.report().from_checkpoint, 0);
        assert!(ix.report().damage.is_some(), "the whole scan finds it");
    }

    /// Files written before sync marks: every bad record stays damage (they
    /// say nothing about what was synced), and the first sync adds a mark.
    #[test]
    fn a_file_from_before_sync_marks_gets_one_at_its_first_sync() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("8.ceg");
        let mut g = ExtentGroupFile::create(&p, header(8)).unwrap();
        let mut starts = Vec::new();
        for s in 1..=3u64 {
            starts.push(g.end());
            put_block(&mut g, s, s as u32, 1);
        }
        let end = g.end();
        drop(g);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        let unmark = || {
            for at in format::SYNC_MARK_SLOTS {
                f.write_all_at(&[0u8; 512], at).unwrap();
            }
        };
        unmark();
        let mut g = ExtentGroupFile::open(&p, true).unwrap();
        assert_eq!(g.report().durable_end, None);
        assert!(
            g.synced_end() < g.end(),
            "nothing counts as durable without a mark"
        );
        g.sync().unwrap();
        let sb = std::fs::read(&p).unwrap();
        assert_eq!(format::durable_end(&sb), Some(end));
        drop(g);
        unmark();
        f.write_all_at(&[0u8; 4], starts[2]).unwrap();
        let g = ExtentGroupFile::open(&p, false).unwrap();
        assert!(g.report().damage.is_some(), "{:?}", g.report());
        assert_eq!(g.report().torn_tail_bytes, 0);
    }

    #[test]
    fn bad_superblock_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("5.ceg");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let err = ExtentGroupFile::open(&p, false).unwrap_err();
        assert!(err.to_string().contains("5.ceg"), "{err}");
        std::fs::write(&p, b"short").unwrap();
        let err = ExtentGroupFile::open(&p, false).unwrap_err();
        assert!(
            err.to_string().contains("shorter than its superblock"),
            "{err}"
        );
    }
}
