//! This node's disks as one pool of replicas: finds which disk holds a
//! group, places new groups on the disk with the most room, and carries out
//! the replica operations that primaries ask for (the same code serves the
//! primary's own local replica and remote primaries over RPC).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cairn_api::data::v1::{
    BlockState, RecordKind, ReplicaEpochReply, ReplicaInfo, ReplicaListReply, ReplicaRead,
    ReplicaReadReply, ReplicaWrite, ReplicaWriteReply,
};

use crate::egroup::Slot;
use crate::format::{self, BLOCK_SIZE};
use crate::store::{Append, DiskStore, Group};
use crate::DataError;

/// All local disks of this node.
#[derive(Debug, Clone)]
pub struct LocalPool {
    disks: Vec<Arc<DiskStore>>,
    /// Wakes the syncer early when a disk holds enough superseded data
    /// ([`DiskStore::reclaim_due`]).
    reclaim: Arc<tokio::sync::Notify>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DataError> + Send + 'static,
) -> Result<T, DataError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DataError::Unavailable(format!("disk worker: {e}")))?
}

impl LocalPool {
    /// Opens every disk (`(root, capacity)`; capacity 0 = the file system's).
    pub fn open(disks: &[(PathBuf, u64)]) -> Result<Self, DataError> {
        let disks = disks
            .iter()
            .map(|(p, c)| DiskStore::open(p, *c).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            disks,
            reclaim: Arc::new(tokio::sync::Notify::new()),
        })
    }

    pub fn disks(&self) -> &[Arc<DiskStore>] {
        &self.disks
    }

    /// The disk and open group holding extent group `id`.
    pub fn find(&self, id: u64) -> Option<(Arc<DiskStore>, Arc<Group>)> {
        self.disks
            .iter()
            .find_map(|d| d.group(id).map(|g| (d.clone(), g)))
    }

    /// The disk new groups go to: healthy, not full, most free bytes.
    pub fn place(&self) -> Result<Arc<DiskStore>, DataError> {
        self.disks
            .iter()
            .filter(|d| d.accepts_new_groups())
            .max_by_key(|d| {
                let u = d.usage();
                u.capacity_bytes
                    .saturating_sub(u.used_bytes)
                    .min(u.free_fs_bytes)
            })
            .cloned()
            .ok_or_else(|| DataError::NoSpace {
                path: self
                    .disks
                    .first()
                    .map(|d| d.root().to_path_buf())
                    .unwrap_or_default(),
            })
    }

    /// Whether any disk can take a new group.
    pub fn has_room(&self) -> bool {
        self.disks.iter().any(|d| d.accepts_new_groups())
    }

    /// Whether a write is applied on the calling thread: a deferred write
    /// that stays buffered is only a copy into the page cache. A durable one
    /// or one that may go direct (`direct`: another node's, large enough)
    /// waits for the disk and goes to a blocking thread; the replica fast
    /// path's reader hands it to a task.
    pub fn applies_inline(req: &ReplicaWrite, direct: bool) -> bool {
        req.deferred_sync && !(direct && req.data.len() >= crate::egroup::DIRECT_WRITE_MIN)
    }

    /// Applies one replicated write (creating the group when asked to).
    pub async fn write(&self, req: ReplicaWrite) -> Result<ReplicaWriteReply, DataError> {
        self.write_checked(req, true).await
    }

    /// [`Self::write`] for the primary's own replica: its checksums were
    /// computed from this very buffer, in this process, a moment ago, so
    /// the end-to-end check that guards the network is skipped.
    pub async fn write_local(&self, req: ReplicaWrite) -> Result<ReplicaWriteReply, DataError> {
        self.write_checked(req, false).await
    }

    async fn write_checked(
        &self,
        req: ReplicaWrite,
        verify: bool,
    ) -> Result<ReplicaWriteReply, DataError> {
        let kind = RecordKind::try_from(req.kind)
            .map_err(|_| DataError::Invalid(format!("record kind {}", req.kind)))?;
        if kind == RecordKind::RecordData {
            let want = req.block_count as usize * BLOCK_SIZE;
            if req.data.len() != want {
                return Err(DataError::Invalid(format!(
                    "{} data bytes for {} blocks",
                    req.data.len(),
                    req.block_count
                )));
            }
            // End-to-end check: the primary's checksums must match what
            // arrived (the record then stores them as they are).
            if verify
                && !req.block_crc32c.is_empty()
                && format::block_checksums(&req.data) != req.block_crc32c
            {
                return Err(DataError::Invalid(
                    "block checksums do not match the data sent".into(),
                ));
            }
        }
        let (disk, group) = match self.find(req.extent_group_id) {
            Some(x) => x,
            None => match &req.create {
                Some(h) => {
                    let disk = self.place()?;
                    let h = h.clone();
                    let d = disk.clone();
                    let g = blocking(move || d.create_group(h)).await?;
                    (disk, g)
                }
                None => {
                    return Err(DataError::NotFound(format!(
                        "extent group {} on this node",
                        req.extent_group_id
                    )))
                }
            },
        };
        let compress = req
            .create
            .as_ref()
            .map(|h| h.codec == cairn_api::data::v1::Codec::Zstd as i32)
            .unwrap_or_else(|| {
                group.with(|f| f.header().codec == cairn_api::data::v1::Codec::Zstd as i32)
            });
        let (d, g) = (disk.clone(), group.clone());
        // Another node's write (`verify`): this node holds a copy that reads
        // do not come to while the writer owns the vdisk.
        let direct = verify && !compress;
        let inline = Self::applies_inline(&req, direct);
        let append = move || {
            let rec = Append {
                kind,
                sequence: req.sequence,
                epoch: req.epoch,
                first_block: req.first_block,
                block_count: req.block_count,
                data: &req.data,
                compress,
                durable: !req.deferred_sync,
                crcs: Some(&req.block_crc32c)
                    .filter(|c| !c.is_empty())
                    .map(|c| &c[..]),
                direct,
            };
            d.write(&g, rec)
        };
        if inline {
            // Only a copy into the page cache: cheaper here than the two
            // thread hand-offs a blocking task costs.
            append()?;
        } else {
            blocking(append).await?;
        }
        if disk.reclaim_due() {
            self.reclaim.notify_one();
        }
        // Compaction rewrites the file: off the write's path, one at a time.
        if disk.needs_compaction(&group) && !group.compacting.swap(true, Ordering::AcqRel) {
            let g = group.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = disk.maybe_compact(&g) {
                    tracing::warn!(error = %e, "compaction failed");
                }
                g.compacting.store(false, Ordering::Release);
            });
        }
        Ok(ReplicaWriteReply {
            epoch: group.with(|f| f.epoch()),
        })
    }

    /// Reads verified blocks and their states.
    pub async fn read(&self, req: ReplicaRead) -> Result<ReplicaReadReply, DataError> {
        let (disk, group) = self.find(req.extent_group_id).ok_or_else(|| {
            DataError::NotFound(format!("extent group {} on this node", req.extent_group_id))
        })?;
        // A damaged file stopped indexing at the damage: blocks rewritten
        // after it would read as their older version. Never serve it.
        if let Some((path, why)) = group.with(|f| {
            f.report()
                .damage
                .clone()
                .map(|d| (f.path().to_path_buf(), d))
        }) {
            return Err(DataError::Corrupt { path, reason: why });
        }
        let epoch = group.with(|f| f.epoch());
        if req.epoch != 0 && req.epoch < epoch {
            return Err(DataError::StaleEpoch {
                group: req.extent_group_id,
                got: req.epoch,
                have: epoch,
            });
        }
        let (first, count) = (req.first_block, req.block_count);
        if req.states_only {
            return Ok(ReplicaReadReply {
                data: Vec::new(),
                blocks: block_states(&disk, &group, first, count),
                versions: true,
            });
        }
        // From the page cache without leaving this thread when it can be.
        if let Some(data) = disk.read_cached(&group, first, count)? {
            return Ok(ReplicaReadReply {
                data,
                blocks: block_states(&disk, &group, first, count),
                versions: true,
            });
        }
        blocking(move || {
            let data = disk.read(&group, first, count)?;
            let blocks = block_states(&disk, &group, first, count);
            Ok(ReplicaReadReply {
                data,
                blocks,
                versions: true,
            })
        })
        .await
    }

    /// Raises a group's epoch (fencing older primaries) and reports its
    /// highest sequence.
    pub async fn set_epoch(&self, id: u64, epoch: u64) -> Result<ReplicaEpochReply, DataError> {
        let (disk, group) = self
            .find(id)
            .ok_or_else(|| DataError::NotFound(format!("extent group {id} on this node")))?;
        let g = group.clone();
        blocking(move || {
            // A new primary takes over from here: what the old one wrote
            // without a sync becomes durable first.
            disk.sync_group(&g)?;
            if g.with(|f| f.epoch()) < epoch {
                disk.write(&g, Append::epoch(epoch))?;
            }
            Ok(())
        })
        .await?;
        Ok(group.with(|f| ReplicaEpochReply {
            epoch: f.epoch(),
            max_sequence: f.max_sequence(),
            sequence_digest: f.sequence_digest(),
        }))
    }

    /// Makes every record appended to these groups durable. A group this
    /// node does not hold is an error: the caller believed it did.
    pub async fn sync(&self, ids: &[u64]) -> Result<(), DataError> {
        let mut found = Vec::with_capacity(ids.len());
        for &id in ids {
            found.push(
                self.find(id).ok_or_else(|| {
                    DataError::NotFound(format!("extent group {id} on this node"))
                })?,
            );
        }
        blocking(move || {
            // Grouped by disk: many groups of one disk share a syncfs.
            let mut by_disk: Vec<(Arc<DiskStore>, Vec<Arc<Group>>)> = Vec::new();
            for (disk, group) in found {
                match by_disk.iter_mut().find(|(d, _)| Arc::ptr_eq(d, &disk)) {
                    Some((_, v)) => v.push(group),
                    None => by_disk.push((disk, vec![group])),
                }
            }
            for (disk, groups) in by_disk {
                disk.sync_groups(&groups)?;
            }
            Ok(())
        })
        .await
    }

    /// Returns when a disk asks for an early [`Self::sync_dirty`] (at once
    /// if one asked since the last call).
    pub async fn reclaim_wanted(&self) {
        self.reclaim.notified().await
    }

    /// Syncs every group with records not yet durable, on every disk (the
    /// background syncer: it bounds how long a deferred write stays
    /// volatile). Returns how many groups it synced.
    pub async fn sync_dirty(&self) -> Result<usize, DataError> {
        let disks = self.disks.clone();
        blocking(move || {
            let mut n = 0;
            for d in disks {
                n += d.sync_dirty()?;
            }
            Ok(n)
        })
        .await
    }

    /// Saves an index checkpoint of every group that needs one, on every
    /// disk (at stop: see [`DiskStore::checkpoint_all`]). Returns how many.
    pub async fn checkpoint_all(&self) -> usize {
        let disks = self.disks.clone();
        blocking(move || Ok(disks.iter().map(|d| d.checkpoint_all()).sum()))
            .await
            .unwrap_or(0)
    }

    pub async fn delete(&self, id: u64) -> Result<(), DataError> {
        let disks = self.disks.clone();
        blocking(move || {
            for d in disks {
                d.delete_group(id)?;
            }
            Ok(())
        })
        .await
    }

    /// Moves a damaged replica aside so a fresh copy can take its place.
    pub async fn quarantine(&self, id: u64) -> Result<(), DataError> {
        let disks = self.disks.clone();
        blocking(move || {
            for d in disks {
                d.quarantine_group(id)?;
            }
            Ok(())
        })
        .await
    }

    /// Every replica on this node.
    pub fn list(&self) -> ReplicaListReply {
        let mut replicas = Vec::new();
        for d in &self.disks {
            for id in d.group_ids() {
                if let Some(g) = d.group(id) {
                    replicas.push(g.with(|f| ReplicaInfo {
                        extent_group_id: id,
                        disk_id: d.id().to_string(),
                        epoch: f.epoch(),
                        max_sequence: f.max_sequence(),
                        damaged: f.report().damage.is_some(),
                        bytes: f.allocated_bytes(),
                    }));
                }
            }
        }
        ReplicaListReply { replicas }
    }

    /// Per-block state of a local replica (for block status and repair).
    pub fn slots(&self, id: u64) -> Option<Vec<Slot>> {
        self.find(id).map(|(_, g)| g.with(|f| f.slots().to_vec()))
    }
}

/// Mapped or not, the sequence and the checksum of each block of a range.
fn block_states(disk: &DiskStore, group: &Group, first: u32, count: u32) -> Vec<BlockState> {
    disk.slots(group, first, count)
        .iter()
        .map(crate::catchup::block_state)
        .collect()
}
