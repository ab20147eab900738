//! The block front-end contract: the one door from the protocol front ends
//! (iSCSI, NFS) into the data service. Front ends see a vdisk as a
//! byte-addressed device and nothing else: no extent groups, no replicas, no
//! metadata. Keeping it in its own small crate keeps the front ends from
//! reaching into the data service's internals (and keeps them quick to build
//! and test on their own).
//!
//! Writes reach every live replica before they return and become durable
//! with `fua` or at the next `flush` (a write-back cache, see
//! [`BlockDevice::write`]). Protocol state that must have one home per vdisk
//! (SCSI reservations) travels as opaque commands to the serving node
//! ([`BlockDevice::command`], [`CommandHandler`]).

pub mod mem;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
pub use bytes::Bytes;
use cairn_util::error_code::{ErrorCode, HasErrorCode};

/// The checksum block: the preferred I/O unit.
pub const BLOCK_SIZE: usize = 4096;

/// Stable codes of the data path.
pub mod codes {
    use cairn_util::error_code::ErrorCode;
    pub const IO: ErrorCode = ErrorCode::new("CAIRN:DATA:Io", 500);
    pub const NO_SPACE: ErrorCode = ErrorCode::new("CAIRN:DATA:NoSpace", 507);
    pub const CORRUPT: ErrorCode = ErrorCode::new("CAIRN:DATA:Corrupt", 500);
    pub const CHECKSUM: ErrorCode = ErrorCode::new("CAIRN:DATA:Checksum", 500);
    pub const STALE_EPOCH: ErrorCode = ErrorCode::new("CAIRN:DATA:StaleEpoch", 409);
    pub const NOT_FOUND: ErrorCode = ErrorCode::new("CAIRN:DATA:NotFound", 404);
    pub const INVALID: ErrorCode = ErrorCode::new("CAIRN:DATA:Invalid", 400);
    pub const MISCOMPARE: ErrorCode = ErrorCode::new("CAIRN:DATA:Miscompare", 409);
    pub const UNAVAILABLE: ErrorCode = ErrorCode::new("CAIRN:DATA:Unavailable", 503);
}

/// Errors of the data path, as the data service and the front ends see them.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no space left on the disk")]
    NoSpace { path: PathBuf },
    #[error("{path}: corrupt extent group file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: checksum mismatch in extent group {group} block {block}")]
    Checksum {
        path: PathBuf,
        group: u64,
        block: u32,
    },
    #[error("extent group {group}: epoch {got} is older than this replica's {have}")]
    StaleEpoch { group: u64, got: u64, have: u64 },
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("compare failed at byte {offset}")]
    Miscompare { offset: u64 },
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl DataError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return DataError::NoSpace {
                path: path.to_path_buf(),
            };
        }
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn corrupt(path: &Path, reason: impl std::fmt::Display) -> Self {
        DataError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
    /// Whether this replica's copy is unusable (repair from another replica).
    pub fn is_replica_fault(&self) -> bool {
        matches!(
            self,
            DataError::Io { .. } | DataError::Corrupt { .. } | DataError::Checksum { .. }
        )
    }
}

impl HasErrorCode for DataError {
    fn error_code(&self) -> ErrorCode {
        match self {
            DataError::Io { .. } => codes::IO,
            DataError::NoSpace { .. } => codes::NO_SPACE,
            DataError::Corrupt { .. } => codes::CORRUPT,
            DataError::Checksum { .. } => codes::CHECKSUM,
            DataError::StaleEpoch { .. } => codes::STALE_EPOCH,
            DataError::NotFound(_) => codes::NOT_FOUND,
            DataError::Invalid(_) => codes::INVALID,
            DataError::Miscompare { .. } => codes::MISCOMPARE,
            DataError::Unavailable(_) => codes::UNAVAILABLE,
        }
    }
}

/// A run of blocks that are all mapped or all unmapped (thin provisioning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub mapped: bool,
}

/// A vdisk as the front ends see it. Offsets and lengths are in bytes and
/// must be multiples of [`BlockDevice::sector_size`]; sub-block writes are
/// read-modify-written by the implementation.
#[async_trait]
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Smallest addressable unit (512).
    fn sector_size(&self) -> u32 {
        512
    }
    /// Preferred I/O unit (the 4 KiB checksum block).
    fn block_size(&self) -> u32 {
        BLOCK_SIZE as u32
    }
    /// Reads `len` bytes; unwritten ranges read as zeros.
    async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, DataError>;
    /// Writes `data`. When it returns the data is on every live replica
    /// and survives a crash of any process; with `fua` it is also durable
    /// on their disks, otherwise only after [`Self::flush`] (a write-back
    /// cache, as SCSI WCE=1 and NFS UNSTABLE writes expect).
    /// `data` is shared, not copied, on its way to the replicas: a front
    /// end hands over the buffer it received the data into.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DataError>;
    /// Makes every write completed before it durable on every replica.
    async fn flush(&self) -> Result<(), DataError>;
    /// Deallocates a range; it reads as zeros afterwards.
    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DataError>;
    /// Writes zeros, deallocating whole blocks when `unmap` allows it.
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DataError> {
        if unmap {
            return self.unmap(offset, len).await;
        }
        self.write(offset, Bytes::from(vec![0; len as usize]), false)
            .await
    }
    /// Atomically: if the range equals `expected`, writes `data` there;
    /// otherwise fails with [`DataError::Miscompare`] naming the first
    /// differing byte and writes nothing.
    async fn compare_and_write(
        &self,
        offset: u64,
        expected: &[u8],
        data: &[u8],
    ) -> Result<(), DataError>;
    /// Which parts of a range hold data.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DataError>;

    /// Whether another node serves this device now. A front end keeps
    /// per-device protocol state (SCSI reservations, unit attentions, mode
    /// pages) in one place, the serving node, so that every path to the
    /// device sees the same state: when this is true it sends its commands
    /// there whole with [`Self::command`]. A hint: the answer may change
    /// at any time, and `command` has the last word.
    fn served_elsewhere(&self) -> bool {
        false
    }

    /// Runs a front end's opaque `command` (encoded by that front end, for
    /// `protocol`) on the node serving this device, through its
    /// [`CommandHandler`]. `Ok(None)`: serve it here instead (this node
    /// serves the device after all, or the serving node predates commands).
    async fn command(
        &self,
        protocol: &str,
        command: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, DataError> {
        let _ = (protocol, command);
        Ok(None)
    }

    /// Changes whenever the device's serving node changes (the vdisk's
    /// owner epoch): state loaded with [`Self::load_state`] in another era
    /// may be stale and must be loaded again.
    fn state_era(&self) -> u64 {
        0
    }

    /// Front-end state kept with the vdisk (SCSI persistent reservations),
    /// so that it survives an owner failover and restarts: the value last
    /// saved under `key`, if any.
    async fn load_state(&self, key: &str) -> Result<Option<Vec<u8>>, DataError> {
        let _ = key;
        Ok(None)
    }

    /// Saves `value` under `key` durably (replicated metadata) before it
    /// returns; an empty value removes the key. Only the serving node
    /// saves: `Unavailable` when this node no longer serves the device.
    async fn save_state(&self, key: &str, value: Vec<u8>) -> Result<(), DataError> {
        let _ = (key, value);
        Ok(())
    }
}

/// The serving node's side of [`BlockDevice::command`]: a front end
/// registers one per protocol with the data service, which calls it only
/// for vdisks this node serves.
#[async_trait]
pub trait CommandHandler: Send + Sync {
    async fn handle(&self, vdisk_id: &str, command: Vec<u8>) -> Result<Vec<u8>, DataError>;
}

/// Finds the device behind a vdisk id (front ends hold no other handle).
#[async_trait]
pub trait BlockService: Send + Sync {
    async fn open(&self, vdisk_id: &str) -> Result<Arc<dyn BlockDevice>, DataError>;
    /// Opens only a vdisk this node serves itself (for requests another
    /// node already forwarded: never forward twice).
    async fn open_owned(&self, vdisk_id: &str) -> Result<Arc<dyn BlockDevice>, DataError> {
        self.open(vdisk_id).await
    }
    /// Serves a command another node sent with [`BlockDevice::command`]:
    /// `Unavailable` when this node does not serve the vdisk (the sender
    /// looks for the owner again), `Invalid` when no front end here handles
    /// `protocol`.
    async fn serve_command(
        &self,
        vdisk_id: &str,
        protocol: &str,
        command: Vec<u8>,
    ) -> Result<Vec<u8>, DataError> {
        let _ = (vdisk_id, command);
        Err(DataError::Invalid(format!(
            "no front end here handles {protocol:?} commands"
        )))
    }
}

/// Checks that a byte range is sector-aligned and inside the device.
pub fn check_range(dev_size: u64, offset: u64, len: u64) -> Result<(), DataError> {
    if !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
        return Err(DataError::Invalid(format!(
            "range {offset}+{len} is not aligned to 512 bytes"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= dev_size => Ok(()),
        _ => Err(DataError::Invalid(format!(
            "range {offset}+{len} is beyond the device's {dev_size} bytes"
        ))),
    }
}
