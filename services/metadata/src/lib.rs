//! The metadata service: Cairn's linearizable store of cluster configuration,
//! membership, datastores, vdisks and the vblock → extent-group map.
//!
//! - [`state`]: the replicated state machine, pure (no I/O); [`iscsi`]: its
//!   iSCSI target rules and commands.
//! - [`engine`] / [`log`]: RocksDB storage of the raft log and the state;
//!   [`snapfile`]: raft snapshots as files (built, streamed, ingested).
//! - [`node`]: the raft-rs driver task (Ready loop, apply, ReadIndex,
//!   snapshots, compaction, membership changes).
//! - [`transport`] / [`wire`]: raft messages to peers over mTLS, on a raw
//!   stream of their own (gRPC for snapshots and older peers).
//! - [`handle`]: the async API other services use.
//! - [`service`]: the gRPC services a node exposes to its peers.

pub mod bootstrap;
pub mod engine;
pub mod handle;
pub mod iscsi;
pub mod log;
pub mod node;
pub mod service;
pub mod snapfile;
pub mod state;
pub mod transport;
pub mod wire;

use std::time::Duration;

use cairn_util::error_code::{codes, ErrorCode, HasErrorCode};

pub use handle::{MetadataHandle, NodeStatus};

/// Errors of the metadata service.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The RocksDB files failed to open or verify.
    #[error("metadata store {path} is corrupt or unreadable: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("metadata storage engine failed: {0}")]
    Storage(String),
    /// The state machine refused the command (conflict, not found, invalid).
    #[error("{message}")]
    Rejected { code: ErrorCode, message: String },
    #[error("no metadata leader is reachable from this node; retry shortly")]
    NoLeader,
    #[error("timed out after {0:?} waiting for the metadata service; the outcome is unknown")]
    Timeout(Duration),
    #[error("the metadata service is stopped")]
    Stopped,
    #[error("raft: {0}")]
    Raft(String),
    #[error(transparent)]
    Record(#[from] cairn_api::record::RecordError),
    #[error("peer RPC failed: {0}")]
    Rpc(String),
}

impl From<rocksdb::Error> for MetaError {
    fn from(e: rocksdb::Error) -> Self {
        MetaError::Storage(e.to_string())
    }
}

impl From<protobuf::ProtobufError> for MetaError {
    fn from(e: protobuf::ProtobufError) -> Self {
        MetaError::Storage(format!("raft record encoding: {e}"))
    }
}

impl From<raft::Error> for MetaError {
    fn from(e: raft::Error) -> Self {
        match e {
            raft::Error::ProposalDropped => MetaError::NoLeader,
            other => MetaError::Raft(other.to_string()),
        }
    }
}

impl HasErrorCode for MetaError {
    fn error_code(&self) -> ErrorCode {
        match self {
            MetaError::Corrupt { .. } | MetaError::Storage(_) => codes::STORAGE,
            MetaError::Rejected { code, .. } => *code,
            MetaError::NoLeader => codes::NO_LEADER,
            MetaError::Timeout(_) => codes::TIMEOUT,
            MetaError::Stopped => codes::STOPPED,
            MetaError::Raft(_) | MetaError::Record(_) | MetaError::Rpc(_) => codes::INTERNAL,
        }
    }
}
