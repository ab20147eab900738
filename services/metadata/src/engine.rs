//! The RocksDB engine under the metadata service: one database per node with
//! two column families, `raft` (log entries, hard state, conf state,
//! truncation point) and `state` (the state machine). Opening verifies every
//! block's checksum, so a corrupt or truncated file stops the node with an
//! error naming it instead of serving wrong metadata.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, IteratorMode, Options, ReadOptions, WriteBatch,
    WriteOptions, DB,
};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::state::{Pairs, StateView};

/// Values of several keys, in the order asked (`None`: absent).
pub type Values = Vec<Option<Vec<u8>>>;
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

    /// The values of `keys` and every pair of column family `cf`, all as
    /// of one moment (a RocksDB snapshot), however long the reading takes
    /// and whatever is written meanwhile.
    pub fn read_consistent(&self, cf: &str, keys: &[&[u8]]) -> Result<(Values, Pairs), MetaError> {
        let handle = self.cf(cf)?;
        let snap = self.db.snapshot();
        let mut values = Vec::with_capacity(keys.len());
        for k in keys {
            values.push(snap.get_cf(handle, k)?);
        }
        let mut out = Vec::new();
        for item in snap.iterator_cf(handle, IteratorMode::Start) {
            let (k, v) = item?;
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok((values, out))
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
