//! The RocksDB engine under the metadata service: one database per node with
//! two column families, `raft` (log entries, hard state, conf state,
//! truncation point) and `state` (the state machine). Opening verifies every
//! block's checksum, so a corrupt or truncated file stops the node with an
//! error naming it instead of serving wrong metadata.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, IngestExternalFileOptions, IteratorMode, Options,
    ReadOptions, SstFileWriter, WriteBatch, WriteOptions, DB,
};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::state::{Pairs, StateView};

use crate::MetaError;

pub const CF_RAFT: &str = "raft";
pub const CF_STATE: &str = "state";

/// The metadata database of one node.
pub struct Engine {
    db: DB,
    path: PathBuf,
    /// See [`Engine::catalog_era`].
    catalog_era: AtomicU64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("path", &self.path).finish()
    }
}

impl Engine {
    /// Opens (or creates) the database at `path` and verifies it end to end.
    pub fn open(path: &Path) -> Result<Arc<Self>, MetaError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_paranoid_checks(true);
        opts.set_max_open_files(256);
        opts.set_keep_log_file_num(4);
        let cfs = [CF_RAFT, CF_STATE].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| MetaError::Corrupt {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        let engine = Self {
            db,
            path: path.to_path_buf(),
            catalog_era: AtomicU64::new(0),
        };
        engine.verify()?;
        Ok(Arc::new(engine))
    }

    /// Reads every key of every column family with checksum verification.
    fn verify(&self) -> Result<(), MetaError> {
        for name in [CF_RAFT, CF_STATE] {
            let cf = self.cf(name)?;
            let mut ro = ReadOptions::default();
            ro.set_verify_checksums(true);
            ro.fill_cache(false);
            for item in self.db.iterator_cf_opt(cf, ro, IteratorMode::Start) {
                item.map_err(|e| MetaError::Corrupt {
                    path: self.path.display().to_string(),
                    detail: e.to_string(),
                })?;
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves whenever this node applies a change that can invalidate what a
    /// data path caches from the state: a node, datastore, vdisk or snapshot
    /// record written or removed, a vblock mapping removed, or a whole
    /// snapshot of the state installed. New mappings and extent-group or
    /// disk updates leave it alone (caches hold only mappings that exist;
    /// groups have their own epochs). Read before reading the state: a
    /// cache filled after seeing era `e` is good while the era is still `e`.
    pub fn catalog_era(&self) -> u64 {
        self.catalog_era.load(Ordering::Acquire)
    }

    /// Called after the change is committed, so a reader that sees the new
    /// era also sees the new state.
    pub(crate) fn bump_catalog_era(&self) {
        self.catalog_era.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn cf(&self, name: &str) -> Result<&ColumnFamily, MetaError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| MetaError::Storage(format!("column family {name} missing")))
    }

    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        Ok(self.db.get_cf(self.cf(cf)?, key)?)
    }

    pub fn scan(&self, cf: &str, prefix: &[u8]) -> Result<Pairs, MetaError> {
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(cf)?,
            IteratorMode::From(prefix, rocksdb::Direction::Forward),
        );
        for item in it {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    /// Column family `cf` as of this moment (a RocksDB snapshot), however
    /// long the reading takes and whatever is written meanwhile.
    pub fn consistent_view(&self, cf: &str) -> Result<ConsistentView<'_>, MetaError> {
        Ok(ConsistentView {
            snap: self.db.snapshot(),
            cf: self.cf(cf)?,
        })
    }

    /// Prepares replacing the whole of column family `cf` with `pairs`
    /// (strictly ascending keys): writes one SST file at `sst`, a put per
    /// pair and a delete per key only the current contents have, and
    /// changes nothing yet. [`Engine::apply_replacement`] then swaps it in
    /// at once: readers see the old contents or the new, never a mix,
    /// however many pairs there are (a batch of that size would sit in
    /// memory whole). Only for a column family nothing else writes until
    /// then. Every pair is read here, so bad input fails before anything
    /// changed.
    pub(crate) fn prepare_replacement(
        &self,
        cf: &str,
        pairs: &mut dyn Iterator<Item = Result<(Vec<u8>, Vec<u8>), MetaError>>,
        sst: &Path,
    ) -> Result<Replacement, MetaError> {
        let handle = self.cf(cf)?;
        let opts = Options::default();
        let mut writer = SstFileWriter::create(&opts);
        writer.open(sst)?;
        let snap = self.db.snapshot();
        let mut old = snap.iterator_cf(handle, IteratorMode::Start);
        let mut next_old = || -> Result<Option<Box<[u8]>>, MetaError> {
            Ok(old.next().transpose()?.map(|(k, _)| k))
        };
        let mut old_key = next_old()?;
        let mut last: Option<Vec<u8>> = None;
        let mut written = 0u64;
        let mut count = 0u64;
        for pair in pairs {
            let (k, v) = pair?;
            if last.as_ref().is_some_and(|l| l.as_slice() >= k.as_slice()) {
                return Err(MetaError::Storage(
                    "a replacement of the metadata state is not in ascending key order".into(),
                ));
            }
            while let Some(ok) = old_key.take() {
                match ok.as_ref().cmp(k.as_slice()) {
                    std::cmp::Ordering::Less => {
                        writer.delete(&ok)?;
                        written += 1;
                        old_key = next_old()?;
                    }
                    std::cmp::Ordering::Equal => {
                        old_key = next_old()?;
                        break;
                    }
                    std::cmp::Ordering::Greater => {
                        old_key = Some(ok);
                        break;
                    }
                }
            }
            writer.put(&k, &v)?;
            written += 1;
            count += 1;
            last = Some(k);
        }
        while let Some(ok) = old_key.take() {
            writer.delete(&ok)?;
            written += 1;
            old_key = next_old()?;
        }
        let sst = if written == 0 {
            // Nothing before, nothing after (RocksDB refuses an empty file).
            None
        } else {
            writer.finish()?;
            Some(sst.to_path_buf())
        };
        Ok(Replacement {
            cf: cf.to_string(),
            sst,
            pairs: count,
        })
    }

    /// Swaps in a prepared replacement (one SST ingestion, durable when
    /// it returns). Returns the number of pairs.
    pub(crate) fn apply_replacement(&self, mut r: Replacement) -> Result<u64, MetaError> {
        if let Some(sst) = r.sst.take() {
            let mut ingest = IngestExternalFileOptions::default();
            ingest.set_move_files(true);
            let ingested =
                self.db
                    .ingest_external_file_cf_opts(self.cf(&r.cf)?, &ingest, vec![&sst]);
            let _ = std::fs::remove_file(&sst);
            ingested?;
        }
        Ok(r.pairs)
    }

    /// Range `[from, to)` of one column family.
    pub fn range(&self, cf: &str, from: &[u8], to: &[u8]) -> Result<Pairs, MetaError> {
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(cf)?,
            IteratorMode::From(from, rocksdb::Direction::Forward),
        );
        for item in it {
            let (k, v) = item?;
            if &*k >= to {
                break;
            }
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    /// Writes a batch; `sync` makes it durable (fsync of the WAL) before return.
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), MetaError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        Ok(self.db.write_opt(batch, &wo)?)
    }

    /// Writes a batch without logging it to the WAL: it is in the memtable
    /// (read by everyone at once) and reaches disk only with the next flush
    /// of its column families, so a crash loses it. Only for writes that
    /// can be redone from what is durable (see `node::apply_entries`).
    pub fn write_unlogged(&self, batch: WriteBatch) -> Result<(), MetaError> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        Ok(self.db.write_opt(batch, &wo)?)
    }

    /// Flushes memtables to SST files (at clean shutdown).
    pub fn flush(&self) -> Result<(), MetaError> {
        for name in [CF_RAFT, CF_STATE] {
            self.db.flush_cf(self.cf(name)?)?;
        }
        Ok(())
    }

    /// A batch builder bound to this engine's column families.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            engine: self,
            wb: WriteBatch::default(),
        }
    }
}

/// A column family's new contents, written and not yet swapped in
/// ([`Engine::prepare_replacement`]); dropping it removes its file.
#[derive(Debug)]
pub struct Replacement {
    cf: String,
    sst: Option<PathBuf>,
    pairs: u64,
}

impl Drop for Replacement {
    fn drop(&mut self) {
        if let Some(sst) = self.sst.take() {
            let _ = std::fs::remove_file(sst);
        }
    }
}

/// Called with each key and value in turn; an error stops the walk.
pub type PairVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), MetaError> + 'a;

/// One column family as of one moment ([`Engine::consistent_view`]).
pub struct ConsistentView<'a> {
    snap: rocksdb::Snapshot<'a>,
    cf: &'a ColumnFamily,
}

impl ConsistentView<'_> {
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        Ok(self.snap.get_cf(self.cf, key)?)
    }

    /// Hands every pair to `visit`, in key order.
    pub fn for_each(&self, visit: &mut PairVisitor<'_>) -> Result<(), MetaError> {
        for item in self.snap.iterator_cf(self.cf, IteratorMode::Start) {
            let (k, v) = item?;
            visit(&k, &v)?;
        }
        Ok(())
    }
}

/// A write batch across the engine's column families.
pub struct Batch<'a> {
    engine: &'a Engine,
    pub(crate) wb: WriteBatch,
}

impl Batch<'_> {
    pub fn put(&mut self, cf: &str, k: &[u8], v: &[u8]) -> Result<(), MetaError> {
        self.wb.put_cf(self.engine.cf(cf)?, k, v);
        Ok(())
    }
    pub fn delete(&mut self, cf: &str, k: &[u8]) -> Result<(), MetaError> {
        self.wb.delete_cf(self.engine.cf(cf)?, k);
        Ok(())
    }
    pub fn delete_range(&mut self, cf: &str, from: &[u8], to: &[u8]) -> Result<(), MetaError> {
        self.wb.delete_range_cf(self.engine.cf(cf)?, from, to);
        Ok(())
    }
    pub fn is_empty(&self) -> bool {
        self.wb.is_empty()
    }
    pub fn commit(self, sync: bool) -> Result<(), MetaError> {
        if self.wb.is_empty() {
            return Ok(());
        }
        self.engine.write(self.wb, sync)
    }

    /// [`Engine::write_unlogged`].
    pub fn commit_unlogged(self) -> Result<(), MetaError> {
        if self.wb.is_empty() {
            return Ok(());
        }
        self.engine.write_unlogged(self.wb)
    }

    /// The batch's writes, for committing them on another thread
    /// ([`Engine::write`]).
    pub(crate) fn into_write_batch(self) -> WriteBatch {
        self.wb
    }
}

/// The state machine column family as a [`StateView`].
pub struct StateCf<'a>(pub &'a Engine);

impl StateView for StateCf<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        self.0.get(CF_STATE, key)
    }
    fn scan(&self, prefix: &[u8]) -> Result<Pairs, MetaError> {
        self.0.scan(CF_STATE, prefix)
    }
}
