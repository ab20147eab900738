//! Background work of the data service: keeping the disks' records in
//! metadata current (placement reads them), so that a full or failed disk
//! is taken out of placement cluster-wide.
//!
//! Disk records are written when something placement cares about changes
//! (health, or used space by more than 1 % of capacity), never per write.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cairn_api::metadata::v1::{command::Op, DiskHealth, DiskRecord, PutDisk};
use cairn_metadata::MetadataHandle;
use tokio::sync::watch;

use crate::pool::LocalPool;

/// How often disk usage is looked at.
pub const DISK_REPORT_INTERVAL: Duration = Duration::from_secs(3);

/// Keeps this node's disk records in metadata up to date until `stop`.
pub async fn register_disks(
    meta: MetadataHandle,
    pool: Arc<LocalPool>,
    node_id: u64,
    mut stop: watch::Receiver<bool>,
) {
    let mut sent: HashMap<String, DiskRecord> = HashMap::new();
    loop {
        for d in pool.disks() {
            let u = d.usage();
            let health = if u.failed {
                DiskHealth::Failed
            } else if u.full {
                DiskHealth::Full
            } else {
                DiskHealth::Ok
            };
            let rec = DiskRecord {
                format_version: cairn_api::FORMAT_VERSION,
                id: d.id().to_string(),
                node_id,
                path: d.root().display().to_string(),
                capacity_bytes: u.capacity_bytes,
                used_bytes: u.used_bytes,
                health: health as i32,
            };
            let changed = match sent.get(d.id()) {
                None => true,
                Some(old) => {
                    old.health != rec.health
                        || old.capacity_bytes != rec.capacity_bytes
                        || old.used_bytes.abs_diff(rec.used_bytes) > rec.capacity_bytes / 100
                }
            };
            if !changed {
                continue;
            }
            match meta
                .propose(Op::PutDisk(PutDisk {
                    disk: Some(rec.clone()),
                }))
                .await
            {
                Ok(_) => {
                    if sent.get(d.id()).is_none_or(|o| o.health != rec.health) {
                        tracing::info!(disk = %rec.id, path = %rec.path, health = ?health,
                            capacity = rec.capacity_bytes, used = rec.used_bytes, "disk registered");
                    }
                    sent.insert(rec.id.clone(), rec);
                }
                Err(e) => tracing::debug!(disk = %rec.id, error = %e, "cannot register disk yet"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(DISK_REPORT_INTERVAL) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The longest an acknowledged write stays in the page cache only (when
/// its client did not ask for durability), by default: the syncer's period
/// (`[data] deferred_sync_ms` in the node's config).
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Makes deferred writes durable every `every`, and sooner when a disk
/// holds [`crate::store::RECLAIM_AFTER`] of superseded data, until `stop`
/// (the node syncs once more after its front ends have stopped).
pub async fn sync_deferred(pool: Arc<LocalPool>, every: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = pool.reclaim_wanted() => {}
            _ = stop.changed() => return,
        }
        match pool.sync_dirty().await {
            Ok(0) => {}
            Ok(n) => tracing::trace!(groups = n, "synced deferred writes"),
            Err(e) => tracing::error!(error = %e, "cannot sync deferred writes"),
        }
    }
}
