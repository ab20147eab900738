//! The data service: what turns each node's local disks into thin,
//! replicated vdisks.
//!
//! It owns:
//! - the extent group file format ([`format`], [`egroup`]): self-describing,
//!   append-only, a crc32c per 4 KiB block, optional zstd per record;
//! - the local disks ([`store`]): placement across them, free space, group
//!   commit (concurrent writes to a group share one fdatasync);
//! - the front-end trait ([`frontend::BlockDevice`]), the only way iSCSI and
//!   NFS reach data.
//!
//! Invariants enforced here: a write is durable (fdatasync) before it is
//! acknowledged ([`store::DiskStore::write`]); a block whose checksum fails is
//! never returned ([`egroup::ExtentGroupFile::read`] returns an error instead).

pub mod egroup;
pub mod format;
pub mod frontend;
pub mod inspect;
pub mod maintenance;
pub mod pool;
pub mod repair;
pub mod rpc;
pub mod store;
pub mod volume;

use std::path::{Path, PathBuf};

use cairn_util::error_code::{ErrorCode, HasErrorCode};

pub use format::BLOCK_SIZE;

/// Default vblock: the unit of thin allocation, copy-on-write and placement.
pub const DEFAULT_VBLOCK_SIZE: u32 = 1 << 20;

/// Stable codes of the data service.
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

/// Errors of the data service.
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
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
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
    pub(crate) fn corrupt(path: &Path, reason: impl std::fmt::Display) -> Self {
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
