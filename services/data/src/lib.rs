//! The data service: what turns each node's local disks into thin,
//! replicated vdisks.
//!
//! It owns:
//! - the extent group file format ([`format`], [`egroup`]): self-describing,
//!   append-only, a crc32c per 4 KiB block, optional zstd per record, and
//!   the index checkpoints beside each file ([`checkpoint`]);
//! - re-replication that copies only what a returning replica missed
//!   ([`catchup`]), and draining a node announced for maintenance
//!   ([`drain`]);
//! - the local disks ([`store`]): placement across them, free space, group
//!   commit (concurrent writes to a group share one fdatasync);
//! - the front-end trait ([`frontend::BlockDevice`]), the only way iSCSI and
//!   NFS reach data.
//!
//! Invariants enforced here: a write is on every live replica before it is
//! acknowledged, and durable (fdatasync) before a FUA write or a flush is
//! ([`store::DiskStore::write`], [`store::DiskStore::sync_dirty`]); a block
//! whose checksum fails is never returned ([`egroup::ExtentGroupFile::read`]
//! returns an error instead).

pub mod catchup;
pub mod checkpoint;
pub mod drain;
pub mod egroup;
pub mod format;
pub mod frontend;
pub mod inspect;
pub mod maintenance;
pub mod pool;
pub mod repair;
mod route;
pub mod rpc;
pub mod store;
pub mod volume;
pub mod wire;

pub use format::BLOCK_SIZE;

/// Default vblock: the unit of thin allocation, copy-on-write and placement.
pub const DEFAULT_VBLOCK_SIZE: u32 = 1 << 20;

pub use cairn_blockdev::{codes, DataError};
