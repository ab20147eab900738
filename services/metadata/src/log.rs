//! raft-rs [`Storage`] over the engine's `raft` column family.
//!
//! Keys: `e<index be64>` entries, `hs` hard state, `cs` conf state,
//! `tr` truncation point (index, term of the last compacted entry or the
//! installed snapshot). Errors map to raft's `StorageError` precisely
//! (Compacted / Unavailable); anything else is surfaced as `Other` and stops
//! the node.

use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use cairn_api::metadata::v1::{KeyValue, SnapshotData};
use prost::Message as _;

use crate::engine::{Batch, Engine, CF_RAFT, CF_STATE};
use crate::state::{KEY_APPLIED, KEY_CONF_STATE};
use crate::MetaError;

const KEY_HS: &[u8] = b"hs";
const KEY_CS: &[u8] = b"cs";
const KEY_TRUNCATED: &[u8] = b"tr";

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

/// The raft log of one node.
pub struct RaftLog {
    engine: Arc<Engine>,
    hard_state: HardState,
    conf_state: ConfState,
    truncated: (u64, u64),
    last_index: u64,
}

impl RaftLog {
    /// Loads the log's bookkeeping from the engine.
    pub fn load(engine: Arc<Engine>) -> Result<Self, MetaError> {
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

    /// Replaces log and state machine with a received snapshot, in `batch`.
    pub fn install_snapshot(
        &mut self,
        snap: &Snapshot,
        batch: &mut Batch<'_>,
    ) -> Result<SnapshotData, MetaError> {
        let meta = snap.get_metadata();
        let data = SnapshotData::decode(snap.data.as_ref())
            .map_err(|e| MetaError::Storage(format!("received snapshot is malformed: {e}")))?;
        batch.delete_range(CF_RAFT, &entry_key(0), &entry_key(u64::MAX))?;
        self.truncated = (meta.index, meta.term);
        self.last_index = meta.index;
        batch.put(CF_RAFT, KEY_TRUNCATED, &encode_pair(meta.index, meta.term))?;
        self.set_conf_state(meta.get_conf_state(), batch)?;
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        self.set_hard_state(&hs, batch)?;

        batch.delete_range(CF_STATE, b"", &[0xff])?;
        for kv in &data.entries {
            batch.put(CF_STATE, &kv.key, &kv.value)?;
        }
        batch.put(CF_STATE, KEY_APPLIED, &encode_pair(meta.index, meta.term))?;
        batch.put(
            CF_STATE,
            KEY_CONF_STATE,
            &meta.get_conf_state().write_to_bytes()?,
        )?;
        Ok(data)
    }

    fn build_snapshot(&self) -> Result<Snapshot, MetaError> {
        let (index, term) = match self.engine.get(CF_STATE, KEY_APPLIED)? {
            Some(b) => decode_pair(&b)?,
            None => self.truncated,
        };
        let conf_state = match self.engine.get(CF_STATE, KEY_CONF_STATE)? {
            Some(b) => ConfState::parse_from_bytes(&b)?,
            None => self.conf_state.clone(),
        };
        let entries = self
            .engine
            .scan(CF_STATE, b"")?
            .into_iter()
            .filter(|(k, _)| !k.starts_with(b"m/"))
            .map(|(key, value)| KeyValue { key, value })
            .collect();
        let data = SnapshotData {
            format_version: cairn_api::FORMAT_VERSION,
            applied_index: index,
            applied_term: term,
            entries,
        };
        let mut snap = Snapshot {
            data: data.encode_to_vec().into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf_state);
        Ok(snap)
    }
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

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // raft-rs asks for this inside `step`, i.e. on the runtime worker the
        // raft driver runs on; a large state machine takes a while to read.
        let snap = blocking_in_place(|| self.build_snapshot()).map_err(other)?;
        if snap.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snap)
    }
}

/// Runs `f`, which reads or writes the disk for a long time, without holding
/// up the other tasks of the runtime worker it is called on: on a
/// multi-threaded runtime they move to another thread meanwhile. Outside a
/// runtime, or on a current-thread one (unit tests), it simply runs `f`.
fn blocking_in_place<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
