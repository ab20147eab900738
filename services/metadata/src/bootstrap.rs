//! Creating a cluster: the first node's log starts from a snapshot at index 1
//! holding the cluster record and the node itself as the only voter. Nodes
//! that join later start empty and receive a snapshot from the leader.

use std::path::Path;

use cairn_api::metadata::v1::{ClusterRecord, KeyValue, NodeRecord, NodeRole, SnapshotData};
use prost::Message as _;
use raft::eraftpb::{ConfState, Snapshot};

use crate::engine::Engine;
use crate::log::RaftLog;
use crate::state::{node_key, KEY_CLUSTER};
use crate::MetaError;

/// Initialises an empty metadata store at `db_path` as a one-voter cluster.
pub fn bootstrap_first_node(
    db_path: &Path,
    mut cluster: ClusterRecord,
    mut node: NodeRecord,
) -> Result<(), MetaError> {
    let engine = Engine::open(db_path)?;
    let mut log = RaftLog::load(engine.clone())?;
    if log.is_initialized() {
        return Err(MetaError::Rejected {
            code: cairn_util::error_code::codes::CONFLICT,
            message: format!(
                "metadata store {} already belongs to a cluster",
                db_path.display()
            ),
        });
    }
    node.role = NodeRole::Voter as i32;
    cluster.next_node_id = node.id + 1;
    let data = SnapshotData {
        format_version: cairn_api::FORMAT_VERSION,
        applied_index: 1,
        applied_term: 1,
        entries: vec![
            KeyValue {
                key: KEY_CLUSTER.to_vec(),
                value: cluster.encode_to_vec(),
            },
            KeyValue {
                key: node_key(node.id),
                value: node.encode_to_vec(),
            },
        ],
        file: None,
    };
    let mut snap = Snapshot {
        data: data.encode_to_vec().into(),
        ..Default::default()
    };
    let meta = snap.mut_metadata();
    meta.index = 1;
    meta.term = 1;
    meta.set_conf_state(ConfState {
        voters: vec![node.id],
        ..Default::default()
    });
    let mut batch = engine.batch();
    log.install_snapshot(&snap, &mut batch)?;
    batch.commit(true)?;
    engine.flush()
}
