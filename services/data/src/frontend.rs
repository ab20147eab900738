//! The front-end contract lives in `cairn-blockdev` (so the protocol servers
//! need not depend on this crate); re-exported here for the data service's
//! own implementations.

pub use cairn_blockdev::{check_range, BlockDevice, BlockService, Bytes, CommandHandler, Extent};
