//! Raft snapshots as files, so the state machine never has to fit in one
//! RPC message or in memory (TiKV ships its region snapshots the same way:
//! the raft message carries a descriptor, the state follows as files).
//!
//! - The leader writes the state as of one RocksDB snapshot into
//!   `sent-<index>-<term>.snap` ([`build`]); the raft snapshot it hands to
//!   raft-rs holds only a [`SnapshotFile`] descriptor.
//! - The transport streams the file after the raft message
//!   (`RaftTransport.InstallSnapshot`); the receiver checks its length and
//!   crc32c, syncs it as `received-<index>-<term>.snap` and only then hands
//!   the message to raft ([`Receiving`]).
//! - Installing replaces the state column family in one SST ingestion
//!   ([`install_state`]): readers on this node see the old state or the
//!   new one, never a mix. A node that stops between the raft half of an
//!   install and the state half finishes it at start
//!   (`log::finish_interrupted_install`), from the received file.
//! - A peer without `InstallSnapshot` (an older version) is sent the state
//!   inline ([`read_inline`]), as before, while it fits one message.
//!
//! File format: frames of `u32 length (LE) | u32 crc32c of the body (LE) |
//! SnapshotData body`, each body holding a run of entries, keys strictly
//! ascending across the file. The two bookkeeping keys (`m/...`) are not
//! in it: the receiver writes its own from the raft snapshot's metadata.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use cairn_api::metadata::v1::{KeyValue, SnapshotData, SnapshotFile};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Snapshot};

use crate::engine::{Engine, Replacement, CF_STATE};
use crate::log::{decode_pair, encode_pair};
use crate::state::{KEY_APPLIED, KEY_CONF_STATE};
use crate::MetaError;

/// Entries per frame are cut at about this many bytes.
const FRAME_FILL: usize = 1 << 20;
/// A frame longer than this is damage, not data (keys and values are small).
const MAX_FRAME: u32 = 64 << 20;
/// Keys starting with this are a node's own bookkeeping, never shipped.
const LOCAL_PREFIX: &[u8] = b"m/";

fn storage(what: &str, path: &Path, e: impl std::fmt::Display) -> MetaError {
    MetaError::Storage(format!("{what} {}: {e}", path.display()))
}

/// The folder of a node's snapshot files, beside its RocksDB folder.
#[derive(Debug, Clone)]
pub struct SnapDir {
    path: PathBuf,
}

impl SnapDir {
    /// `<db>-snapshots`, created if missing.
    pub fn beside(db_path: &Path) -> Result<Self, MetaError> {
        let mut name = db_path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "metadata".into());
        name.push("-snapshots");
        let path = db_path.with_file_name(name);
        std::fs::create_dir_all(&path).map_err(|e| storage("cannot create", &path, e))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file this node built for its followers at (index, term).
    pub fn sent(&self, index: u64, term: u64) -> PathBuf {
        self.path.join(format!("sent-{index}-{term}.snap"))
    }

    /// The file this node received from a leader at (index, term).
    pub fn received(&self, index: u64, term: u64) -> PathBuf {
        self.path.join(format!("received-{index}-{term}.snap"))
    }

    /// A new name for a file being written (or an SST being built).
    fn temp(&self, what: &str) -> PathBuf {
        self.path
            .join(format!("{what}-{:016x}.tmp", rand::random::<u64>()))
    }

    /// Removes every file but `keep`: at start (nothing is being sent or
    /// received then), and after an install.
    pub fn clean(&self, keep: Option<&Path>) {
        let Ok(dir) = std::fs::read_dir(&self.path) else {
            return;
        };
        for entry in dir.flatten() {
            let p = entry.path();
            if Some(p.as_path()) != keep {
                if let Err(e) = std::fs::remove_file(&p) {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove an old snapshot file");
                }
            }
        }
    }

    /// Removes received files of indexes below `index`: raft will not
    /// install them once it has a newer one.
    pub fn remove_received_below(&self, index: u64) {
        let Ok(dir) = std::fs::read_dir(&self.path) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(rest) = name
                .to_str()
                .and_then(|n| n.strip_prefix("received-"))
                .and_then(|n| n.strip_suffix(".snap"))
            else {
                continue;
            };
            let older = rest
                .split('-')
                .next()
                .and_then(|i| i.parse::<u64>().ok())
                .is_some_and(|i| i < index);
            if older {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Removes the sent file of (index, term); a transfer that has it open
    /// reads on.
    pub fn remove_sent(&self, index: u64, term: u64) {
        let _ = std::fs::remove_file(self.sent(index, term));
    }
}

/// Writes frames of entries and keeps the file's length and crc32c.
struct FrameWriter {
    out: BufWriter<File>,
    index: u64,
    term: u64,
    pending: Vec<KeyValue>,
    fill: usize,
    bytes: u64,
    crc: u32,
    keys: u64,
}

impl FrameWriter {
    fn push(&mut self, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        self.fill += key.len() + value.len() + 8;
        self.pending.push(KeyValue {
            key: key.to_vec(),
            value: value.to_vec(),
        });
        self.keys += 1;
        if self.fill >= FRAME_FILL {
            self.flush_frame()?;
        }
        Ok(())
    }

    fn flush_frame(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let body = SnapshotData {
            format_version: cairn_api::FORMAT_VERSION,
            applied_index: self.index,
            applied_term: self.term,
            entries: std::mem::take(&mut self.pending),
            file: None,
        }
        .encode_to_vec();
        self.fill = 0;
        let len = u32::try_from(body.len())
            .ok()
            .filter(|l| *l <= MAX_FRAME)
            .ok_or_else(|| std::io::Error::other("a snapshot frame is too long"))?;
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&len.to_le_bytes());
        head[4..].copy_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        self.out.write_all(&head)?;
        self.out.write_all(&body)?;
        self.crc = crc32c::crc32c_append(self.crc, &head);
        self.crc = crc32c::crc32c_append(self.crc, &body);
        self.bytes += (head.len() + body.len()) as u64;
        Ok(())
    }
}

/// Writes the state machine as of one moment into a snapshot file in
/// `dir` and returns the raft snapshot that describes it. `truncated` and
/// `conf_state` stand in for a node that has applied nothing yet.
pub(crate) fn build(
    engine: &Engine,
    dir: &SnapDir,
    truncated: (u64, u64),
    conf_state: &ConfState,
) -> Result<Snapshot, MetaError> {
    let view = engine.consistent_view(CF_STATE)?;
    let (index, term) = match view.get(KEY_APPLIED)? {
        Some(b) => decode_pair(&b)?,
        None => truncated,
    };
    let conf_state = match view.get(KEY_CONF_STATE)? {
        Some(b) => ConfState::parse_from_bytes(&b)?,
        None => conf_state.clone(),
    };
    let tmp = dir.temp("sent");
    let written = write_file(&view, &tmp, index, term);
    let described = match written {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let path = dir.sent(index, term);
    std::fs::rename(&tmp, &path).map_err(|e| storage("cannot rename", &tmp, e))?;
    let data = SnapshotData {
        format_version: cairn_api::FORMAT_VERSION,
        applied_index: index,
        applied_term: term,
        entries: Vec::new(),
        file: Some(described),
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

/// The file is a cache the leader can build again: it is not synced.
fn write_file(
    view: &crate::engine::ConsistentView<'_>,
    path: &Path,
    index: u64,
    term: u64,
) -> Result<SnapshotFile, MetaError> {
    let file = File::create(path).map_err(|e| storage("cannot create", path, e))?;
    let mut w = FrameWriter {
        out: BufWriter::with_capacity(1 << 20, file),
        index,
        term,
        pending: Vec::new(),
        fill: 0,
        bytes: 0,
        crc: 0,
        keys: 0,
    };
    view.for_each(&mut |k, v| {
        if k.starts_with(LOCAL_PREFIX) {
            return Ok(());
        }
        w.push(k, v).map_err(|e| storage("cannot write", path, e))
    })?;
    w.flush_frame()
        .and_then(|()| w.out.flush())
        .map_err(|e| storage("cannot write", path, e))?;
    Ok(SnapshotFile {
        bytes: w.bytes,
        crc32c: w.crc,
        keys: w.keys,
    })
}

/// Reads a snapshot file's entries frame by frame, checking each frame's
/// crc, that it belongs to (index, term) and that keys only ascend.
pub(crate) struct FrameReader {
    input: BufReader<File>,
    path: PathBuf,
    index: u64,
    term: u64,
    last_key: Option<Vec<u8>>,
}

impl FrameReader {
    pub(crate) fn open(path: &Path, index: u64, term: u64) -> Result<Self, MetaError> {
        let file = File::open(path).map_err(|e| storage("cannot open", path, e))?;
        Ok(Self {
            input: BufReader::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
            index,
            term,
            last_key: None,
        })
    }

    fn bad(&self, why: impl std::fmt::Display) -> MetaError {
        MetaError::Storage(format!(
            "snapshot file {} is malformed: {why}",
            self.path.display()
        ))
    }

    /// The next frame's entries; `None` at the end of the file.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Vec<KeyValue>>, MetaError> {
        let mut head = [0u8; 8];
        let mut got = 0;
        while got < head.len() {
            let n = self
                .input
                .read(&mut head[got..])
                .map_err(|e| storage("cannot read", &self.path, e))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 {
            return Ok(None);
        }
        if got < head.len() {
            return Err(self.bad("it ends inside a frame header"));
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_FRAME {
            return Err(self.bad(format!("a frame claims {len} bytes")));
        }
        let mut body = vec![0u8; len as usize];
        self.input
            .read_exact(&mut body)
            .map_err(|e| self.bad(format!("a frame is cut short ({e})")))?;
        if crc32c::crc32c(&body) != crc {
            return Err(self.bad("a frame's checksum does not match"));
        }
        let data = SnapshotData::decode(body.as_slice()).map_err(|e| self.bad(e))?;
        if data.format_version > cairn_api::FORMAT_VERSION {
            return Err(self.bad(format!(
                "format version {} is newer than this node's {}",
                data.format_version,
                cairn_api::FORMAT_VERSION
            )));
        }
        if (data.applied_index, data.applied_term) != (self.index, self.term) {
            return Err(self.bad(format!(
                "a frame belongs to index {} term {}, not {} {}",
                data.applied_index, data.applied_term, self.index, self.term
            )));
        }
        for kv in &data.entries {
            if kv.key.starts_with(LOCAL_PREFIX) {
                return Err(self.bad("it holds a node's own bookkeeping key"));
            }
            if self.last_key.as_ref().is_some_and(|l| *l >= kv.key) {
                return Err(self.bad("its keys are not in ascending order"));
            }
            self.last_key = Some(kv.key.clone());
        }
        Ok(Some(data.entries))
    }
}

/// The whole state of a snapshot file in one message, for a peer of an
/// older version (it takes snapshots only inline). Refused past `limit`
/// bytes of entries: such a peer cannot take it at all; it has to be
/// upgraded (or replaced) to catch up.
pub(crate) fn read_inline(
    path: &Path,
    index: u64,
    term: u64,
    limit: usize,
) -> Result<SnapshotData, MetaError> {
    let mut reader = FrameReader::open(path, index, term)?;
    let mut entries = Vec::new();
    let mut size = 0usize;
    while let Some(frame) = reader.next_frame()? {
        for kv in frame {
            size += kv.key.len() + kv.value.len() + 8;
            if size > limit {
                return Err(MetaError::Storage(format!(
                    "the metadata snapshot at index {index} is larger than the {limit} bytes an \
                     older node takes in one message; upgrade that node to let it catch up"
                )));
            }
            entries.push(kv);
        }
    }
    Ok(SnapshotData {
        format_version: cairn_api::FORMAT_VERSION,
        applied_index: index,
        applied_term: term,
        entries,
        file: None,
    })
}

/// Replaces this node's state column family with the received file's state
/// at (index, term) in one ingestion, the bookkeeping keys included.
/// Returns the number of entries installed.
pub(crate) fn install_state(
    engine: &Engine,
    dir: &SnapDir,
    index: u64,
    term: u64,
    conf_state: &ConfState,
) -> Result<u64, MetaError> {
    let prepared = prepare_state(engine, dir, index, term, conf_state)?;
    install_prepared(engine, prepared)
}

/// Swaps in what [`prepare_state`] wrote; returns the number of entries.
pub(crate) fn install_prepared(engine: &Engine, prepared: Replacement) -> Result<u64, MetaError> {
    // The count includes the two bookkeeping keys.
    Ok(engine.apply_replacement(prepared)?.saturating_sub(2))
}

/// Reads the whole received file (every frame checked) into the SST that
/// will replace the state column family, changing nothing yet: a damaged
/// file fails here, before the install has begun.
pub(crate) fn prepare_state(
    engine: &Engine,
    dir: &SnapDir,
    index: u64,
    term: u64,
    conf_state: &ConfState,
) -> Result<Replacement, MetaError> {
    let path = dir.received(index, term);
    if !path.exists() {
        return Err(MetaError::Storage(format!(
            "the snapshot file for index {index} term {term} is missing ({})",
            path.display()
        )));
    }
    let mut reader = FrameReader::open(&path, index, term)?;
    // The two bookkeeping keys sort together ("m/a..." < "m/c..."), and the
    // file holds no key starting with "m/": they go in before the first
    // entry above them.
    let mut own = vec![
        (KEY_APPLIED.to_vec(), encode_pair(index, term)),
        (KEY_CONF_STATE.to_vec(), conf_state.write_to_bytes()?),
    ]
    .into_iter()
    .peekable();
    let mut frame = Vec::<KeyValue>::new().into_iter();
    let mut failed = false;
    let mut pairs = std::iter::from_fn(|| loop {
        if failed {
            return None;
        }
        let own_first = match (frame.as_slice().first(), own.peek()) {
            (Some(kv), Some((k, _))) => Some(*k < kv.key),
            (Some(_), None) => Some(false),
            (None, _) => None,
        };
        match own_first {
            Some(true) => return own.next().map(Ok),
            Some(false) => return frame.next().map(|kv| Ok((kv.key, kv.value))),
            None => {}
        }
        match reader.next_frame() {
            Ok(Some(f)) => frame = f.into_iter(),
            Ok(None) => return own.next().map(Ok),
            Err(e) => {
                failed = true;
                return Some(Err(e));
            }
        }
    });
    let sst = dir.temp("ingest");
    let prepared = engine.prepare_replacement(CF_STATE, &mut pairs, &sst);
    if prepared.is_err() {
        let _ = std::fs::remove_file(&sst);
    }
    prepared
}

/// Test state: `n` pairs `v/<i>` of `value_len` bytes of `i % 251`, in
/// batches, applied at `applied`.
#[cfg(test)]
pub(crate) fn fill_test_state(engine: &Engine, n: u64, value_len: usize, applied: (u64, u64)) {
    for from in (0..n).step_by(50_000) {
        let mut b = engine.batch();
        for i in from..(from + 50_000).min(n) {
            b.put(
                CF_STATE,
                format!("v/{i:012}").as_bytes(),
                &vec![(i % 251) as u8; value_len],
            )
            .unwrap();
        }
        b.commit(false).unwrap();
    }
    let mut b = engine.batch();
    b.put(CF_STATE, KEY_APPLIED, &encode_pair(applied.0, applied.1))
        .unwrap();
    b.commit(false).unwrap();
}

/// Why a snapshot file was not taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReceiveError {
    /// What arrived does not match its descriptor: the sender's fault.
    #[error("{0}")]
    Malformed(String),
    /// This node could not store it (a full or failing disk).
    #[error("{0}")]
    Io(String),
}

/// A snapshot file arriving from a leader: written under a temporary name,
/// checked against its descriptor, synced, then named for its index.
pub(crate) struct Receiving {
    tmp: PathBuf,
    out: tokio::fs::File,
    expect: SnapshotFile,
    index: u64,
    term: u64,
    bytes: u64,
    crc: u32,
    done: bool,
}

impl Receiving {
    pub(crate) async fn start(
        dir: &SnapDir,
        expect: SnapshotFile,
        index: u64,
        term: u64,
    ) -> Result<Self, MetaError> {
        let tmp = dir.temp("received");
        let out = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| storage("cannot create", &tmp, e))?;
        Ok(Self {
            tmp,
            out,
            expect,
            index,
            term,
            bytes: 0,
            crc: 0,
            done: false,
        })
    }

    /// Appends one chunk; refuses bytes past the announced length.
    pub(crate) async fn write(&mut self, data: &[u8]) -> Result<(), ReceiveError> {
        use tokio::io::AsyncWriteExt as _;
        if self.bytes + data.len() as u64 > self.expect.bytes {
            return Err(ReceiveError::Malformed(format!(
                "the snapshot file is longer than the {} bytes announced",
                self.expect.bytes
            )));
        }
        self.out
            .write_all(data)
            .await
            .map_err(|e| ReceiveError::Io(format!("cannot write {}: {e}", self.tmp.display())))?;
        self.crc = crc32c::crc32c_append(self.crc, data);
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Checks length and checksum, syncs and names the file for raft to
    /// install.
    pub(crate) async fn finish(mut self, dir: &SnapDir) -> Result<PathBuf, ReceiveError> {
        use tokio::io::AsyncWriteExt as _;
        if self.bytes != self.expect.bytes || self.crc != self.expect.crc32c {
            return Err(ReceiveError::Malformed(format!(
                "the snapshot file arrived with {} bytes and crc32c {:08x}, not {} and {:08x}",
                self.bytes, self.crc, self.expect.bytes, self.expect.crc32c
            )));
        }
        let io =
            |e: std::io::Error| ReceiveError::Io(format!("cannot store the snapshot file: {e}"));
        self.out.flush().await.map_err(io)?;
        self.out.sync_all().await.map_err(io)?;
        let path = dir.received(self.index, self.term);
        tokio::fs::rename(&self.tmp, &path).await.map_err(io)?;
        self.done = true;
        let dir_path = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || cairn_util::durable::sync_dir(&dir_path))
            .await
            .map_err(|e| ReceiveError::Io(e.to_string()))?
            .map_err(io)?;
        // Older received files stay: the driver may be installing one, and
        // a start may need it to finish that; an install or a start
        // removes them.
        Ok(path)
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn engine_with(dir: &Path, pairs: &[(String, Vec<u8>)], applied: (u64, u64)) -> Arc<Engine> {
        let engine = Engine::open(&dir.join("metadata")).unwrap();
        let mut b = engine.batch();
        for (k, v) in pairs {
            b.put(CF_STATE, k.as_bytes(), v).unwrap();
        }
        b.put(CF_STATE, KEY_APPLIED, &encode_pair(applied.0, applied.1))
            .unwrap();
        b.commit(false).unwrap();
        engine
    }

    fn voters() -> ConfState {
        ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        }
    }

    /// Every pair of the state but the bookkeeping keys.
    fn state(engine: &Engine) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut all = engine.scan(CF_STATE, b"").unwrap();
        all.retain(|(k, _)| !k.starts_with(LOCAL_PREFIX));
        all
    }

    /// A leader with 30,000 pairs (several frames) at index 42, a follower
    /// with older values, keys the leader no longer has, keys on both sides
    /// of the bookkeeping keys.
    fn leader_and_follower(root: &Path) -> (Arc<Engine>, SnapDir, Arc<Engine>, SnapDir) {
        let leader_pairs: Vec<_> = (0..30_000)
            .map(|i| (format!("v/{i:08}"), vec![(i % 251) as u8; 100]))
            .chain([
                ("a".to_string(), b"before m/".to_vec()),
                ("z".into(), b"after".to_vec()),
            ])
            .collect();
        let leader = engine_with(&root.join("l"), &leader_pairs, (42, 3));
        let follower_pairs: Vec<_> = (0..40_000)
            .step_by(3)
            .map(|i| (format!("v/{i:08}"), b"stale".to_vec()))
            .chain([
                ("b".to_string(), b"gone".to_vec()),
                ("zz".into(), b"gone".to_vec()),
            ])
            .collect();
        let follower = engine_with(&root.join("f"), &follower_pairs, (7, 2));
        let ld = SnapDir::beside(leader.path()).unwrap();
        let fd = SnapDir::beside(follower.path()).unwrap();
        (leader, ld, follower, fd)
    }

    #[test]
    fn a_snapshot_file_replaces_the_whole_state_at_once() {
        let root = tempfile::tempdir().unwrap();
        let (leader, ld, follower, fd) = leader_and_follower(root.path());
        let snap = build(&leader, &ld, (0, 0), &voters()).unwrap();
        let meta = snap.get_metadata();
        assert_eq!((meta.index, meta.term), (42, 3));
        let desc = crate::log::decode_snapshot(&snap).unwrap().file.unwrap();
        assert_eq!(desc.keys, 30_002);
        assert!(
            desc.bytes > 3 * FRAME_FILL as u64,
            "several frames: {}",
            desc.bytes
        );
        std::fs::copy(ld.sent(42, 3), fd.received(42, 3)).unwrap();

        let keys = install_state(&follower, &fd, 42, 3, &voters()).unwrap();
        assert_eq!(keys, 30_002);
        assert_eq!(state(&follower), state(&leader));
        assert_eq!(
            decode_pair(&follower.get(CF_STATE, KEY_APPLIED).unwrap().unwrap()).unwrap(),
            (42, 3)
        );
        let cs =
            ConfState::parse_from_bytes(&follower.get(CF_STATE, KEY_CONF_STATE).unwrap().unwrap())
                .unwrap();
        assert_eq!(cs.voters, vec![1, 2, 3]);
        // Survives a restart (the ingested file is durable without a flush).
        let path = follower.path().to_path_buf();
        drop(follower);
        let again = Engine::open(&path).unwrap();
        assert_eq!(state(&again), state(&leader));
    }

    #[test]
    fn a_damaged_snapshot_file_is_refused_and_the_state_left_as_it_was() {
        let root = tempfile::tempdir().unwrap();
        let (leader, ld, follower, fd) = leader_and_follower(root.path());
        build(&leader, &ld, (0, 0), &voters()).unwrap();
        let before = state(&follower);
        let bytes = std::fs::read(ld.sent(42, 3)).unwrap();
        for (what, at) in [("first frame", 100usize), ("last frame", bytes.len() - 10)] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            std::fs::write(fd.received(42, 3), &bad).unwrap();
            let err = install_state(&follower, &fd, 42, 3, &voters()).unwrap_err();
            assert!(err.to_string().contains("checksum"), "{what}: {err}");
            assert_eq!(state(&follower), before, "{what}: nothing installed");
        }
        std::fs::write(fd.received(42, 3), &bytes[..bytes.len() - 3]).unwrap();
        let err = install_state(&follower, &fd, 42, 3, &voters()).unwrap_err();
        assert!(err.to_string().contains("cut short"), "{err}");
        // A file of another snapshot is refused by its frames.
        std::fs::write(fd.received(43, 3), &bytes).unwrap();
        let err = install_state(&follower, &fd, 43, 3, &voters()).unwrap_err();
        assert!(err.to_string().contains("belongs to index 42"), "{err}");
        assert_eq!(state(&follower), before);
        let left: Vec<_> = std::fs::read_dir(fd.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "no SST left behind: {left:?}");
    }

    #[test]
    fn an_older_peer_gets_the_state_inline_while_it_fits_one_message() {
        let root = tempfile::tempdir().unwrap();
        let (leader, ld, _, _) = leader_and_follower(root.path());
        build(&leader, &ld, (0, 0), &voters()).unwrap();
        let inline = read_inline(&ld.sent(42, 3), 42, 3, 64 << 20).unwrap();
        assert_eq!(inline.entries.len(), 30_002);
        assert!(inline.file.is_none());
        let err = read_inline(&ld.sent(42, 3), 42, 3, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("upgrade that node"), "{err}");
    }

    #[tokio::test]
    async fn a_received_file_must_match_its_descriptor() {
        let root = tempfile::tempdir().unwrap();
        let (leader, ld, _, fd) = leader_and_follower(root.path());
        let snap = build(&leader, &ld, (0, 0), &voters()).unwrap();
        let desc = crate::log::decode_snapshot(&snap).unwrap().file.unwrap();
        let bytes = std::fs::read(ld.sent(42, 3)).unwrap();
        let tmp_files = || {
            std::fs::read_dir(fd.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "tmp")
                })
                .count()
        };

        let mut r = Receiving::start(&fd, desc, 42, 3).await.unwrap();
        r.write(&bytes[..bytes.len() - 1]).await.unwrap();
        let err = r.finish(&fd).await.unwrap_err().to_string();
        assert!(err.contains("arrived with"), "{err}");
        assert_eq!(tmp_files(), 0, "a refused file is removed");

        let mut r = Receiving::start(&fd, desc, 42, 3).await.unwrap();
        let err = r
            .write(&[bytes.as_slice(), b"x"].concat())
            .await
            .unwrap_err();
        assert!(matches!(err, ReceiveError::Malformed(_)), "{err}");
        assert!(err.to_string().contains("longer than"), "{err}");
        drop(r);
        assert_eq!(tmp_files(), 0);

        let mut bad = bytes.clone();
        bad[5] ^= 1;
        let mut r = Receiving::start(&fd, desc, 42, 3).await.unwrap();
        r.write(&bad).await.unwrap();
        assert!(
            r.finish(&fd).await.is_err(),
            "a flipped bit is caught by the crc"
        );

        std::fs::write(fd.received(41, 3), b"older").unwrap();
        let mut r = Receiving::start(&fd, desc, 42, 3).await.unwrap();
        for c in bytes.chunks(70_000) {
            r.write(c).await.unwrap();
        }
        let path = r.finish(&fd).await.unwrap();
        assert_eq!(std::fs::read(path).unwrap(), bytes);
        assert!(
            fd.received(41, 3).exists(),
            "an older received file stays (an install may still need it)"
        );
    }
}
