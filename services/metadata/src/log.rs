//! raft-rs [`Storage`] over the engine's `raft` column family.
//!
//! Keys: `e<index be64>` entries, `hs` hard state, `cs` conf state,
//! `tr` truncation point (index, term of the last compacted entry or the
//! installed snapshot). Errors map to raft's `StorageError` precisely
//! (Compacted / Unavailable); anything else is surfaced as `Other` and stops
//! the node.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use cairn_api::metadata::v1::SnapshotData;
use prost::Message as _;

use crate::engine::{Batch, Engine, CF_RAFT, CF_STATE};
use crate::snapfile::{self, SnapDir};
use crate::state::{KEY_APPLIED, KEY_CONF_STATE};
use crate::MetaError;

const KEY_HS: &[u8] = b"hs";
const KEY_CS: &[u8] = b"cs";
const KEY_TRUNCATED: &[u8] = b"tr";
/// (index, term) of a snapshot whose raft half is installed and whose state
/// may not be yet; see [`finish_interrupted_install`].
const KEY_INSTALLING: &[u8] = b"si";

fn entry_key(index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'e';
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

pub(crate) fn encode_pair(a: u64, b: u64) -> Vec<u8> {
    [a.to_be_bytes(), b.to_be_bytes()].concat()
}

pub(crate) fn decode_pair(bytes: &[u8]) -> Result<(u64, u64), MetaError> {
    let bad = || MetaError::Storage("malformed index/term pair".into());
    let a = bytes.get(0..8).ok_or_else(bad)?;
    let b = bytes.get(8..16).ok_or_else(bad)?;
    let mut x = [0u8; 8];
    let mut y = [0u8; 8];
    x.copy_from_slice(a);
    y.copy_from_slice(b);
    Ok((u64::from_be_bytes(x), u64::from_be_bytes(y)))
}

fn other(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

/// A snapshot built for a follower is reused for this long (for the next
/// follower, or the next try), as long as the log still holds every entry
/// after it.
const SNAPSHOT_REUSE: Duration = Duration::from_secs(30);

/// The raft log of one node.
pub struct RaftLog {
    engine: Arc<Engine>,
    hard_state: HardState,
    conf_state: ConfState,
    truncated: (u64, u64),
    last_index: u64,
    snapshots: Mutex<SnapshotJob>,
    dir: SnapDir,
}

/// The snapshot being built in the background, or the last one built.
#[derive(Default)]
struct SnapshotJob {
    building: Option<std::thread::JoinHandle<Result<Snapshot, MetaError>>>,
    ready: Option<(Snapshot, Instant)>,
}

impl RaftLog {
    /// Loads the log's bookkeeping from the engine.
    pub fn load(engine: Arc<Engine>) -> Result<Self, MetaError> {
        let dir = SnapDir::beside(engine.path())?;
        let hard_state = match engine.get(CF_RAFT, KEY_HS)? {
            Some(b) => HardState::parse_from_bytes(&b)?,
            None => HardState::default(),
        };
        let conf_state = match engine.get(CF_RAFT, KEY_CS)? {
            Some(b) => ConfState::parse_from_bytes(&b)?,
            None => ConfState::default(),
        };
        let truncated = match engine.get(CF_RAFT, KEY_TRUNCATED)? {
            Some(b) => decode_pair(&b)?,
            None => (0, 0),
        };
        let last = engine.range(CF_RAFT, &entry_key(0), &entry_key(u64::MAX))?;
        let last_index = match last.last() {
            Some((k, _)) => decode_pair(&[&k[1..], &[0u8; 8][..]].concat())?.0,
            None => truncated.0,
        };
        Ok(Self {
            engine,
            hard_state,
            conf_state,
            truncated,
            last_index,
            snapshots: Mutex::new(SnapshotJob::default()),
            dir,
        })
    }

    /// Whether this node has ever been part of a cluster.
    pub fn is_initialized(&self) -> bool {
        !self.conf_state.voters.is_empty() || self.truncated.0 > 0
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn truncated_index(&self) -> u64 {
        self.truncated.0
    }

    pub fn last_index_now(&self) -> u64 {
        self.last_index
    }

    /// Appends entries (truncating any conflicting suffix) into `batch`.
    pub fn append(&mut self, ents: &[Entry], batch: &mut Batch<'_>) -> Result<(), MetaError> {
        let Some(first) = ents.first() else {
            return Ok(());
        };
        if first.index <= self.last_index {
            batch.delete_range(
                CF_RAFT,
                &entry_key(first.index),
                &entry_key(self.last_index + 1),
            )?;
        }
        for e in ents {
            batch.put(CF_RAFT, &entry_key(e.index), &e.write_to_bytes()?)?;
        }
        self.last_index = ents.last().map_or(self.last_index, |e| e.index);
        Ok(())
    }

    pub fn set_hard_state(
        &mut self,
        hs: &HardState,
        batch: &mut Batch<'_>,
    ) -> Result<(), MetaError> {
        self.hard_state = hs.clone();
        batch.put(CF_RAFT, KEY_HS, &hs.write_to_bytes()?)
    }

    /// At start: the state machine is applied up to `applied`, so those
    /// entries were committed, but the stored commit index may say less.
    /// Applies are written without the WAL (`node::apply_entries`) and the
    /// commit index rides in them, and the state column family may have
    /// been flushed while the raft one was not before a crash. raft-rs
    /// refuses an applied index beyond the commit index, so the commit index
    /// is raised (and synced) here. Returns whether it was.
    pub fn recover_commit(&mut self, applied: u64) -> Result<bool, MetaError> {
        if applied <= self.hard_state.commit {
            return Ok(false);
        }
        let engine = self.engine.clone();
        let mut batch = engine.batch();
        self.set_commit(applied, &mut batch)?;
        batch.commit(true)?;
        Ok(true)
    }

    /// Raises the stored commit index to at least `commit`.
    pub fn set_commit(&mut self, commit: u64, batch: &mut Batch<'_>) -> Result<(), MetaError> {
        if commit > self.hard_state.commit {
            let mut hs = self.hard_state.clone();
            hs.commit = commit;
            self.set_hard_state(&hs, batch)?;
        }
        Ok(())
    }

    pub fn set_conf_state(
        &mut self,
        cs: &ConfState,
        batch: &mut Batch<'_>,
    ) -> Result<(), MetaError> {
        self.conf_state = cs.clone();
        batch.put(CF_RAFT, KEY_CS, &cs.write_to_bytes()?)
    }

    /// Discards entries below `compact_index` (they are in the state machine).
    pub fn compact(&mut self, compact_index: u64, batch: &mut Batch<'_>) -> Result<(), MetaError> {
        if compact_index <= self.truncated.0 + 1 || compact_index > self.last_index + 1 {
            return Ok(());
        }
        let term = self
            .term(compact_index - 1)
            .map_err(|e| MetaError::Storage(e.to_string()))?;
        batch.delete_range(CF_RAFT, &entry_key(0), &entry_key(compact_index))?;
        self.truncated = (compact_index - 1, term);
        batch.put(
            CF_RAFT,
            KEY_TRUNCATED,
            &encode_pair(compact_index - 1, term),
        )
    }

    /// The folder of this node's snapshot files.
    pub fn snap_dir(&self) -> &SnapDir {
        &self.dir
    }

    /// Replaces the log with a received snapshot, in `batch`: truncation
    /// point, configuration, term and commit. The state is the caller's
    /// ([`Self::install_inline_state`] into the same batch, or
    /// [`Self::mark_installing`] and [`snapfile::install_state`]).
    pub fn install_snapshot_log(
        &mut self,
        snap: &Snapshot,
        batch: &mut Batch<'_>,
    ) -> Result<(), MetaError> {
        let meta = snap.get_metadata();
        batch.delete_range(CF_RAFT, &entry_key(0), &entry_key(u64::MAX))?;
        self.truncated = (meta.index, meta.term);
        self.last_index = meta.index;
        batch.put(CF_RAFT, KEY_TRUNCATED, &encode_pair(meta.index, meta.term))?;
        self.set_conf_state(meta.get_conf_state(), batch)?;
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        self.set_hard_state(&hs, batch)
    }

    /// Notes, in the batch that installs the log half of a snapshot that
    /// came as a file, that its state is still to be installed: a start
    /// finds the note and finishes the install from the received file.
    pub fn mark_installing(snap: &Snapshot, batch: &mut Batch<'_>) -> Result<(), MetaError> {
        let meta = snap.get_metadata();
        batch.put(CF_RAFT, KEY_INSTALLING, &encode_pair(meta.index, meta.term))
    }

    /// Removes the note once the state is installed.
    pub fn clear_installing(batch: &mut Batch<'_>) -> Result<(), MetaError> {
        batch.delete(CF_RAFT, KEY_INSTALLING)
    }

    /// Replaces the state machine with an inline snapshot's entries, in
    /// `batch` (a snapshot from a node of an older version, or the first
    /// node's bootstrap).
    pub fn install_inline_state(
        snap: &Snapshot,
        data: &SnapshotData,
        batch: &mut Batch<'_>,
    ) -> Result<(), MetaError> {
        let meta = snap.get_metadata();
        batch.delete_range(CF_STATE, b"", &[0xff])?;
        for kv in &data.entries {
            batch.put(CF_STATE, &kv.key, &kv.value)?;
        }
        batch.put(CF_STATE, KEY_APPLIED, &encode_pair(meta.index, meta.term))?;
        batch.put(
            CF_STATE,
            KEY_CONF_STATE,
            &meta.get_conf_state().write_to_bytes()?,
        )
    }

    /// Replaces log and state machine with an inline snapshot, in `batch`.
    pub fn install_snapshot(
        &mut self,
        snap: &Snapshot,
        batch: &mut Batch<'_>,
    ) -> Result<SnapshotData, MetaError> {
        let data = decode_snapshot(snap)?;
        if data.file.is_some() {
            return Err(MetaError::Storage(
                "a snapshot that came as a file cannot be installed inline".into(),
            ));
        }
        self.install_snapshot_log(snap, batch)?;
        Self::install_inline_state(snap, &data, batch)?;
        Ok(data)
    }
}

/// What a raft snapshot carries: the state inline, or a file's descriptor.
pub fn decode_snapshot(snap: &Snapshot) -> Result<SnapshotData, MetaError> {
    SnapshotData::decode(snap.data.as_ref())
        .map_err(|e| MetaError::Storage(format!("received snapshot is malformed: {e}")))
}

/// At start, before anything reads the state: finishes a snapshot install
/// that stopped between its log half and its state half (see
/// [`RaftLog::mark_installing`]), and removes snapshot files no install
/// needs any more. Run after [`RaftLog::load`] (which reads only the raft
/// column family, whose half of the install is complete) and before
/// anything reads the state.
pub fn finish_interrupted_install(engine: &Engine, dir: &SnapDir) -> Result<(), MetaError> {
    let Some(b) = engine.get(CF_RAFT, KEY_INSTALLING)? else {
        dir.clean(None);
        return Ok(());
    };
    let (index, term) = decode_pair(&b)?;
    let applied = match engine.get(CF_STATE, KEY_APPLIED)? {
        Some(b) => decode_pair(&b)?.0,
        None => 0,
    };
    if applied < index {
        let conf_state = match engine.get(CF_RAFT, KEY_CS)? {
            Some(b) => ConfState::parse_from_bytes(&b)?,
            None => ConfState::default(),
        };
        let keys = snapfile::install_state(engine, dir, index, term, &conf_state).map_err(|e| {
            MetaError::Corrupt {
                path: engine.path().display().to_string(),
                detail: format!(
                    "a metadata snapshot install (index {index}) was interrupted and cannot be \
                     finished: {e}"
                ),
            }
        })?;
        engine.bump_catalog_era();
        tracing::info!(
            index,
            term,
            keys,
            "finished an interrupted metadata snapshot install"
        );
    }
    let mut batch = engine.batch();
    RaftLog::clear_installing(&mut batch)?;
    batch.commit(true)?;
    dir.clean(None);
    Ok(())
}

impl Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let rows = self
            .engine
            .range(CF_RAFT, &entry_key(low), &entry_key(high))
            .map_err(other)?;
        let mut out = Vec::with_capacity(rows.len());
        let mut size = 0u64;
        let mut cut_by_size = false;
        for (_, v) in rows {
            size += v.len() as u64;
            if !out.is_empty() && size > max_size {
                cut_by_size = true;
                break;
            }
            out.push(Entry::parse_from_bytes(&v).map_err(other)?);
        }
        if !cut_by_size && out.len() as u64 != high - low {
            // A hole in the log means the engine lost entries it acknowledged.
            return Err(other(format!("raft log has a gap in [{low}, {high})")));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated.0 {
            return Ok(self.truncated.1);
        }
        if idx < self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self.engine.get(CF_RAFT, &entry_key(idx)).map_err(other)? {
            Some(b) => Ok(Entry::parse_from_bytes(&b).map_err(other)?.term),
            None => Err(other(format!("raft log entry {idx} missing"))),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    /// raft-rs asks for this inside `step`, on the runtime worker the raft
    /// driver runs on. Reading a large state there held up the driver:
    /// no heartbeats went out while it read, and followers could start an
    /// election. So the snapshot is built on a thread of its own, and until
    /// it is ready the answer is "temporarily unavailable": raft-rs tries
    /// again at the follower's next heartbeat response.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let mut job = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        if job.building.as_ref().is_some_and(|h| h.is_finished()) {
            match job.building.take().map(std::thread::JoinHandle::join) {
                Some(Ok(Ok(snap))) => {
                    let meta = snap.get_metadata();
                    tracing::info!(
                        index = meta.index,
                        bytes = decode_snapshot(&snap)
                            .ok()
                            .and_then(|d| d.file)
                            .map_or(0, |f| f.bytes),
                        "metadata snapshot built"
                    );
                    job.ready = Some((snap, Instant::now()))
                }
                Some(Ok(Err(e))) => {
                    tracing::error!(error = %e, "cannot build a metadata snapshot");
                }
                _ => tracing::error!("the metadata snapshot builder panicked"),
            }
        }
        if let Some((snap, at)) = &job.ready {
            let meta = snap.get_metadata();
            let cs = meta.get_conf_state();
            // Entries after it must still be in the log, or the follower
            // would need another snapshot right after installing this one;
            // and it must list the follower (one built before the follower
            // joined is ignored by it: raft-rs restores only a snapshot
            // whose configuration holds the node).
            let lists_to = cs.voters.contains(&to)
                || cs.learners.contains(&to)
                || cs.voters_outgoing.contains(&to)
                || cs.learners_next.contains(&to);
            if meta.index >= request_index
                && meta.index >= self.truncated.0
                && lists_to
                && at.elapsed() < SNAPSHOT_REUSE
            {
                return Ok(snap.clone());
            }
        }
        if job.building.is_none() {
            if let Some((old, _)) = job.ready.take() {
                let meta = old.get_metadata();
                self.dir.remove_sent(meta.index, meta.term);
            }
            let engine = self.engine.clone();
            let (truncated, conf_state) = (self.truncated, self.conf_state.clone());
            let dir = self.dir.clone();
            let spawned = std::thread::Builder::new()
                .name("raft-snapshot".into())
                .spawn(move || snapfile::build(&engine, &dir, truncated, &conf_state));
            match spawned {
                Ok(h) => {
                    tracing::info!(to, "building a metadata snapshot for a follower");
                    job.building = Some(h);
                }
                Err(e) => return Err(other(format!("cannot start a snapshot builder: {e}"))),
            }
        }
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asks until the background builder has one (raft-rs asks again at
    /// each heartbeat response).
    fn snapshot_when_ready(log: &RaftLog, request_index: u64) -> Snapshot {
        loop {
            match log.snapshot(request_index, 2) {
                Ok(s) => return s,
                Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)) => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn snapshots_are_built_in_the_background_and_reused_while_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let log = RaftLog::load(engine.clone()).unwrap();
        let put_state = |from: u32, to: u32, applied: u64| {
            let mut b = engine.batch();
            for i in from..to {
                b.put(CF_STATE, format!("v/{i:08}").as_bytes(), &[7u8; 100])
                    .unwrap();
            }
            b.put(CF_STATE, KEY_APPLIED, &encode_pair(applied, 3))
                .unwrap();
            b.commit(false).unwrap();
        };
        let keys = |s: &Snapshot| {
            let d = decode_snapshot(s).unwrap();
            assert_eq!(d.applied_index, s.get_metadata().index);
            assert!(d.entries.is_empty(), "the state travels as a file");
            let (index, term) = (s.get_metadata().index, s.get_metadata().term);
            let mut r =
                snapfile::FrameReader::open(&log.dir.sent(index, term), index, term).unwrap();
            let mut n = 0;
            while let Some(f) = r.next_frame().unwrap() {
                n += f.iter().filter(|kv| kv.key.starts_with(b"v/")).count();
            }
            assert_eq!(n as u64, d.file.unwrap().keys);
            n
        };
        put_state(0, 20_000, 42);
        let mut b = engine.batch();
        let cs = ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        };
        b.put(CF_STATE, KEY_CONF_STATE, &cs.write_to_bytes().unwrap())
            .unwrap();
        b.commit(false).unwrap();
        // The driver is never kept waiting: the first ask starts a build.
        assert!(matches!(
            log.snapshot(0, 2),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        ));
        let s = snapshot_when_ready(&log, 0);
        assert_eq!((s.get_metadata().index, keys(&s)), (42, 20_000));
        // Reused for the next follower, even after more was applied...
        put_state(20_000, 20_100, 50);
        let again = log.snapshot(0, 3).unwrap();
        assert_eq!(again.get_metadata().index, 42);
        // ...but not for a node its configuration does not list (it would
        // ignore it), nor...
        assert!(matches!(
            log.snapshot(0, 4),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        ));
        let s = snapshot_when_ready(&log, 0);
        assert_eq!(s.get_metadata().index, 50);
        // ...for one that needs a newer one: that is built anew, and sees
        // the state as of one applied index.
        put_state(20_100, 20_200, 60);
        let s = snapshot_when_ready(&log, 60);
        assert_eq!((s.get_metadata().index, keys(&s)), (60, 20_200));
    }

    /// A leader's engine with `n` state keys applied at (index, 3), and the
    /// snapshot file it builds, copied where a follower at `to` receives it.
    fn leader_snapshot(n: u64, index: u64, to: &SnapDir) -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&dir.path().join("metadata")).unwrap();
        snapfile::fill_test_state(&engine, n, 100, (index, 3));
        let cs = ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        };
        let sd = SnapDir::beside(engine.path()).unwrap();
        let snap = snapfile::build(&engine, &sd, (0, 0), &cs).unwrap();
        std::fs::copy(sd.sent(index, 3), to.received(index, 3)).unwrap();
        snap
    }

    /// A node at `path` whose state holds `v/old` at index 5 receives a
    /// leader's snapshot of `n` pairs at `index` (its file removed unless
    /// `keep_file`), installs the log half and its note, synced, and dies.
    fn interrupted_install(path: &std::path::Path, n: u64, index: u64, keep_file: bool) {
        let engine = Engine::open(path).unwrap();
        let mut log = RaftLog::load(engine.clone()).unwrap();
        let mut b = engine.batch();
        b.put(CF_STATE, b"v/old", b"gone after the install")
            .unwrap();
        b.put(CF_STATE, KEY_APPLIED, &encode_pair(5, 1)).unwrap();
        b.commit(true).unwrap();
        let snap = leader_snapshot(n, index, log.snap_dir());
        if !keep_file {
            std::fs::remove_file(log.snap_dir().received(index, 3)).unwrap();
        }
        let mut batch = engine.batch();
        log.install_snapshot_log(&snap, &mut batch).unwrap();
        RaftLog::mark_installing(&snap, &mut batch).unwrap();
        batch.commit(true).unwrap();
    }

    #[test]
    fn an_install_interrupted_between_its_halves_is_finished_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata");
        interrupted_install(&path, 3_000, 77, true);
        let engine = Engine::open(&path).unwrap();
        assert_eq!(
            engine.get(CF_STATE, b"v/old").unwrap().as_deref(),
            Some(&b"gone after the install"[..])
        );
        finish_interrupted_install(&engine, &SnapDir::beside(engine.path()).unwrap()).unwrap();
        assert_eq!(engine.get(CF_STATE, b"v/old").unwrap(), None);
        assert_eq!(engine.scan(CF_STATE, b"v/").unwrap().len(), 3_000);
        assert_eq!(
            decode_pair(&engine.get(CF_STATE, KEY_APPLIED).unwrap().unwrap()).unwrap(),
            (77, 3)
        );
        assert_eq!(engine.get(CF_RAFT, KEY_INSTALLING).unwrap(), None);
        let dir = SnapDir::beside(engine.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "files cleaned up"
        );
        // Starting again finds nothing to finish.
        finish_interrupted_install(&engine, &SnapDir::beside(engine.path()).unwrap()).unwrap();
        let log = RaftLog::load(engine.clone()).unwrap();
        assert_eq!(log.truncated_index(), 77);
    }

    #[test]
    fn an_interrupted_install_without_its_file_stops_the_start_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata");
        interrupted_install(&path, 10, 9, false);
        let engine = Engine::open(&path).unwrap();
        let err = finish_interrupted_install(&engine, &SnapDir::beside(engine.path()).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("interrupted") && err.contains("missing"),
            "{err}"
        );
    }

    #[test]
    fn a_commit_index_behind_the_applied_state_is_raised_durably() {
        let dir = tempfile::tempdir().unwrap();
        {
            let engine = Engine::open(dir.path()).unwrap();
            let mut log = RaftLog::load(engine.clone()).unwrap();
            let mut batch = engine.batch();
            let hs = HardState {
                term: 3,
                vote: 2,
                commit: 5,
                ..Default::default()
            };
            log.set_hard_state(&hs, &mut batch).unwrap();
            batch.commit(true).unwrap();
            assert!(!log.recover_commit(4).unwrap(), "5 already covers 4");
            assert!(log.recover_commit(9).unwrap());
            assert_eq!(log.hard_state().commit, 9);
        }
        let engine = Engine::open(dir.path()).unwrap();
        let log = RaftLog::load(engine).unwrap();
        assert_eq!(log.hard_state().commit, 9, "the raised commit is on disk");
        assert_eq!((log.hard_state().term, log.hard_state().vote), (3, 2));
    }
}
