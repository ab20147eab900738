//! The async face of the metadata service: start a node, propose commands,
//! linearizable reads, membership changes, and typed queries of the state.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_api::metadata::v1::{
    command::Op, ClusterRecord, Command, CommandResult, ConfChangeContext, DatastoreRecord,
    DiskRecord, ExtentGroupRecord, NodeRecord, SnapshotRecord, VblockMapping, VdiskRecord,
};
use cairn_rpc::pki::NodeIdentity;
use cairn_util::error_code::codes;
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState};
use raft::RawNode;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use crate::engine::{Engine, CF_STATE};
use crate::log::{decode_pair, RaftLog};
use crate::node::{Driver, Msg, RaftSettings};
use crate::state::{self, KEY_APPLIED, KEY_CLUSTER, KEY_CONF_STATE, PREFIX_DATASTORE, PREFIX_NODE};
use crate::transport::Transport;
use crate::MetaError;

/// Key-value prefix of node maintenance marks
/// ([`cairn_api::metadata::v1::NodeMaintenance`]); the node id follows.
pub const MAINTENANCE_PREFIX: &str = "maintenance/";

/// The key-value key (without the key-value space's own prefix) of node
/// `id`'s maintenance mark: what `PutKv`/`DeleteKv` take.
pub fn maintenance_key(id: u64) -> Vec<u8> {
    format!("{MAINTENANCE_PREFIX}{id:020}").into_bytes()
}

/// The id of the task (`drain`) that shows the drain of node `id` for its
/// maintenance mark that started at `mark_started_unix_ms`: one per mark,
/// whichever leader writes it.
pub fn drain_task_id(id: u64, mark_started_unix_ms: u64) -> String {
    format!("drain-{id}-{mark_started_unix_ms}")
}

/// Key-value prefix of replicas awaited after their node went away
/// ([`cairn_api::metadata::v1::AwayReplica`]); group and node ids follow.
pub const AWAY_PREFIX: &str = "away/";

/// The key-value key of the away mark of `node`'s replica of `group`.
pub fn away_key(group: u64, node: u64) -> Vec<u8> {
    format!("{AWAY_PREFIX}{group:020}/{node:020}").into_bytes()
}

/// Raft status of one node.
#[derive(Debug, Clone, Serialize, Default)]
pub struct NodeStatus {
    pub node_id: u64,
    pub role: String,
    pub leader_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// (node, matched index), on the leader only.
    pub progress: Vec<(u64, u64)>,
}

/// How to start the metadata service of a node.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    pub node_id: u64,
    /// RocksDB folder.
    pub db_path: PathBuf,
    /// This node's RPC address as peers reach it.
    pub rpc_addr: String,
    pub raft: RaftSettings,
    /// How long a client waits for a proposal or read before giving up.
    pub request_timeout: Duration,
}

struct Inner {
    node_id: u64,
    inbox: UnboundedSender<Msg>,
    engine: Arc<Engine>,
    snap_dir: crate::snapfile::SnapDir,
    transport: Arc<Transport>,
    timeout: Duration,
}

/// Handle to a running metadata service; cheap to clone.
#[derive(Clone)]
pub struct MetadataHandle {
    inner: Arc<Inner>,
}

/// Logs raft-rs's slog records through `tracing`.
struct TracingDrain;

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        self.0.push_str(&format!(" {key}={val}"));
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;
    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        use slog::KV;
        // raft-rs logs several debug lines per message, with protobuf
        // text-format arguments: format only what the subscriber will keep.
        let enabled = match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::enabled!(target: "raft", tracing::Level::ERROR)
            }
            slog::Level::Warning => tracing::enabled!(target: "raft", tracing::Level::WARN),
            slog::Level::Info => tracing::enabled!(target: "raft", tracing::Level::INFO),
            _ => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
        };
        if !enabled {
            return Ok(());
        }
        let mut kv = KvText(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = format!("{}{}", record.msg(), kv.0);
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{msg}"),
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}"),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}"),
            _ => tracing::debug!(target: "raft", "{msg}"),
        }
        Ok(())
    }
}

impl MetadataHandle {
    /// Opens the node's RocksDB, starts the raft driver task and the
    /// transport on `rt`. The returned task ends with `Err` if the engine
    /// fails.
    pub fn start(
        cfg: MetaConfig,
        identity: &NodeIdentity,
        rt: tokio::runtime::Handle,
    ) -> Result<(Self, tokio::task::JoinHandle<Result<(), MetaError>>), MetaError> {
        let engine = Engine::open(&cfg.db_path)?;
        let mut log = RaftLog::load(engine.clone())?;
        let snap_dir = log.snap_dir().clone();
        crate::log::finish_interrupted_install(&engine, &snap_dir)?;
        let applied = match engine.get(CF_STATE, KEY_APPLIED)? {
            Some(b) => decode_pair(&b)?,
            None => (log.truncated_index(), 0),
        };
        if log.recover_commit(applied.0)? {
            tracing::info!(
                node = cfg.node_id,
                commit = applied.0,
                "commit index raised to the applied state found on disk"
            );
        }
        let conf_state = match engine.get(CF_STATE, KEY_CONF_STATE)? {
            Some(b) => ConfState::parse_from_bytes(&b)?,
            None => ConfState::default(),
        };
        let raft_cfg = raft::Config {
            id: cfg.node_id,
            election_tick: cfg.raft.election_tick,
            heartbeat_tick: cfg.raft.heartbeat_tick,
            applied: applied.0,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            read_only_option: raft::ReadOnlyOption::Safe,
            ..Default::default()
        };
        raft_cfg.validate()?;
        let logger = slog::Logger::root(TracingDrain, slog::o!());
        let raw = RawNode::new(&raft_cfg, log, &logger)?;
        let tls = cairn_rpc::tls::mtls_client_config(identity)
            .map_err(|e| MetaError::Rpc(e.to_string()))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let transport = Arc::new(Transport::new(
            cfg.node_id,
            cfg.rpc_addr.clone(),
            tls,
            snap_dir.clone(),
            tx.clone(),
            rt.clone(),
        ));
        let driver = Driver::new(
            cfg.node_id,
            raw,
            engine.clone(),
            rx,
            transport.clone(),
            cfg.raft,
            applied,
            conf_state,
        );
        let task = rt.spawn(driver.run());
        tracing::info!(node = cfg.node_id, db = %cfg.db_path.display(), applied = applied.0, "metadata service started");
        Ok((
            Self {
                inner: Arc::new(Inner {
                    node_id: cfg.node_id,
                    inbox: tx,
                    engine,
                    snap_dir,
                    transport,
                    timeout: cfg.request_timeout,
                }),
            },
            task,
        ))
    }

    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    /// The folder snapshot files from leaders are received into.
    pub(crate) fn snap_dir(&self) -> &crate::snapfile::SnapDir {
        &self.inner.snap_dir
    }

    pub(crate) fn send(&self, msg: Msg) -> Result<(), MetaError> {
        self.inner.inbox.send(msg).map_err(|_| MetaError::Stopped)
    }

    /// Learns a peer's return address from a message it sent (see RaftBatch.from_addr).
    pub(crate) fn learn_peer(&self, id: u64, addr: &str) {
        if id != self.inner.node_id && !addr.is_empty() && !self.inner.transport.knows(id) {
            self.inner.transport.set_peer(id, addr);
        }
    }

    async fn wait<T>(&self, rx: oneshot::Receiver<Result<T, MetaError>>) -> Result<T, MetaError> {
        match tokio::time::timeout(self.inner.timeout, rx).await {
            Err(_) => Err(MetaError::Timeout(self.inner.timeout)),
            Ok(Err(_)) => Err(MetaError::Stopped),
            Ok(Ok(r)) => r,
        }
    }

    /// Stops the raft driver (it flushes RocksDB on the way out).
    pub fn shutdown(&self) {
        let _ = self.send(Msg::Shutdown);
    }

    /// Replicates `op` and returns its result once applied on this node,
    /// including refusals (their code is in `error_code`, and some carry the
    /// record that caused them, e.g. the group that won an allocation race).
    pub async fn propose_raw(&self, op: Op) -> Result<CommandResult, MetaError> {
        let cmd = Command {
            format_version: cairn_api::FORMAT_VERSION,
            origin_node: self.inner.node_id,
            request_id: rand::random(),
            proposed_unix_ms: cairn_util::now_unix_ms(),
            op: Some(op),
        };
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Propose { cmd, reply: tx })?;
        self.wait(rx).await
    }

    /// Replicates `op` and returns its result once applied on this node.
    pub async fn propose(&self, op: Op) -> Result<CommandResult, MetaError> {
        let cmd = Command {
            format_version: cairn_api::FORMAT_VERSION,
            origin_node: self.inner.node_id,
            request_id: rand::random(),
            proposed_unix_ms: cairn_util::now_unix_ms(),
            op: Some(op),
        };
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Propose { cmd, reply: tx })?;
        let res = self.wait(rx).await?;
        if res.error_code.is_empty() {
            Ok(res)
        } else {
            Err(MetaError::Rejected {
                code: codes::by_name(&res.error_code),
                message: res.error_message,
            })
        }
    }

    /// Returns once this node's state reflects every write acknowledged
    /// before the call (ReadIndex); reads after it are linearizable.
    pub async fn read_barrier(&self) -> Result<(), MetaError> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::ReadIndex { reply: tx })?;
        self.wait(rx).await.map(|_| ())
    }

    /// Asks this node, if it leads, to hand raft leadership to voter `to`
    /// (raft's leader transfer: `to` is brought up to date, then told to
    /// campaign at once; proposals meanwhile are refused and retried by
    /// their callers). Returns at once: [`Self::status`] shows the outcome.
    /// For a node about to go away, so that its stop costs no election.
    pub fn transfer_leadership(&self, to: u64) -> Result<(), MetaError> {
        self.send(Msg::TransferLeader(to))
    }

    pub async fn status(&self) -> Result<NodeStatus, MetaError> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Status { reply: tx })?;
        match tokio::time::timeout(self.inner.timeout, rx).await {
            Err(_) => Err(MetaError::Timeout(self.inner.timeout)),
            Ok(Err(_)) => Err(MetaError::Stopped),
            Ok(Ok(s)) => Ok(s),
        }
    }

    async fn conf_change(&self, change: ConfChangeType, node: NodeRecord) -> Result<(), MetaError> {
        let request_id = rand::random();
        let ctx = ConfChangeContext {
            format_version: cairn_api::FORMAT_VERSION,
            origin_node: self.inner.node_id,
            request_id,
            node: Some(node.clone()),
        };
        let mut cc = ConfChange::default();
        cc.set_change_type(change);
        cc.node_id = node.id;
        cc.context = ctx.encode_to_vec().into();
        let (tx, rx) = oneshot::channel();
        self.send(Msg::ConfChange {
            cc,
            request_id,
            reply: tx,
        })?;
        self.wait(rx).await.map(|_| ())
    }

    /// Adds a node: first as a learner, then, once it has caught up with the
    /// log, as a voter, so that it never weakens the quorum while it syncs.
    pub async fn add_member(
        &self,
        mut node: NodeRecord,
        catch_up_timeout: Duration,
    ) -> Result<(), MetaError> {
        node.added_unix_ms = cairn_util::now_unix_ms();
        let status = self.status().await?;
        if status.voters.contains(&node.id) {
            return Ok(());
        }
        if !status.learners.contains(&node.id) {
            self.conf_change(ConfChangeType::AddLearnerNode, node.clone())
                .await?;
        }
        let deadline = Instant::now() + catch_up_timeout;
        loop {
            self.read_barrier().await?;
            let target = self.status().await?.commit_index;
            match self.inner.transport.peer_status(&node.rpc_addr).await {
                Ok(peer) if peer.applied_index >= target => break,
                Ok(peer) => tracing::info!(
                    node = node.id,
                    applied = peer.applied_index,
                    target,
                    "waiting for learner to catch up"
                ),
                Err(e) => {
                    tracing::info!(node = node.id, error = %e, "waiting for learner to answer")
                }
            }
            if Instant::now() > deadline {
                return Err(MetaError::Timeout(catch_up_timeout));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.conf_change(ConfChangeType::AddNode, node).await
    }

    /// Removes node `id` from the raft group.
    pub async fn remove_member(&self, id: u64) -> Result<(), MetaError> {
        let node = self.node(id)?.ok_or_else(|| MetaError::Rejected {
            code: codes::NOT_FOUND,
            message: format!("node {id} not found"),
        })?;
        self.conf_change(ConfChangeType::RemoveNode, node).await
    }

    /// Asks the node at `addr` for its raft status over mTLS.
    pub async fn peer_status(
        &self,
        addr: &str,
    ) -> Result<cairn_api::rpc::v1::NodeStatusReply, MetaError> {
        self.inner.transport.peer_status(addr).await
    }

    // ---- Queries of the local state (call read_barrier first for linearizability) ----

    fn get<M: prost::Message + Default>(&self, key: &[u8]) -> Result<Option<M>, MetaError> {
        match self.inner.engine.get(CF_STATE, key)? {
            Some(b) => Ok(Some(
                M::decode(b.as_slice()).map_err(cairn_api::record::RecordError::from)?,
            )),
            None => Ok(None),
        }
    }

    fn list<M: prost::Message + Default>(&self, prefix: &[u8]) -> Result<Vec<M>, MetaError> {
        self.inner
            .engine
            .scan(CF_STATE, prefix)?
            .into_iter()
            .map(|(_, v)| {
                M::decode(v.as_slice())
                    .map_err(|e| MetaError::from(cairn_api::record::RecordError::from(e)))
            })
            .collect()
    }

    pub fn cluster(&self) -> Result<Option<ClusterRecord>, MetaError> {
        self.get(KEY_CLUSTER)
    }
    pub fn node(&self, id: u64) -> Result<Option<NodeRecord>, MetaError> {
        self.get(&state::node_key(id))
    }
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, MetaError> {
        self.list(PREFIX_NODE)
    }
    pub fn datastores(&self) -> Result<Vec<DatastoreRecord>, MetaError> {
        self.list(PREFIX_DATASTORE)
    }
    pub fn datastore(&self, name: &str) -> Result<Option<DatastoreRecord>, MetaError> {
        self.get(&state::datastore_key(name))
    }
    pub fn vdisks(&self, datastore: &str) -> Result<Vec<VdiskRecord>, MetaError> {
        self.list(&state::vdisk_prefix(datastore))
    }
    pub fn vdisk(&self, datastore: &str, name: &str) -> Result<Option<VdiskRecord>, MetaError> {
        self.get(&state::vdisk_key(datastore, name))
    }
    pub fn kv_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        self.inner.engine.get(CF_STATE, &state::kv_key(key))
    }

    // ---- Queries of the data service (local state; call `read_barrier`
    // first when the answer must reflect every acknowledged change) ----

    /// See [`Engine::catalog_era`]: read it before reading what a cache
    /// keeps; the cache is good while it has not moved.
    pub fn catalog_era(&self) -> u64 {
        self.inner.engine.catalog_era()
    }
    pub fn vdisk_by_id(&self, id: &str) -> Result<Option<VdiskRecord>, MetaError> {
        match self.inner.engine.get(CF_STATE, &state::vdisk_id_key(id))? {
            Some(key) => self.get(&key),
            None => Ok(None),
        }
    }
    /// Every vdisk of every datastore.
    pub fn all_vdisks(&self) -> Result<Vec<VdiskRecord>, MetaError> {
        self.list(state::PREFIX_VDISK)
    }
    pub fn disks(&self) -> Result<Vec<DiskRecord>, MetaError> {
        self.list(state::PREFIX_DISK)
    }
    pub fn extent_group(&self, id: u64) -> Result<Option<ExtentGroupRecord>, MetaError> {
        self.get(&state::group_key(id))
    }
    pub fn extent_groups(&self) -> Result<Vec<ExtentGroupRecord>, MetaError> {
        self.list(state::PREFIX_GROUP)
    }
    /// Every mapping of one vblock of a vdisk, oldest generation first.
    pub fn vblock_mappings(
        &self,
        vdisk_id: &str,
        vblock: u64,
    ) -> Result<Vec<VblockMapping>, MetaError> {
        self.list(&state::mapping_vblock_prefix(vdisk_id, vblock))
    }
    /// Every mapping of a vdisk, in (vblock, generation) order.
    pub fn mappings(&self, vdisk_id: &str) -> Result<Vec<VblockMapping>, MetaError> {
        self.list(&state::mapping_prefix(vdisk_id))
    }
    /// Long-running operations, from the key-value entries `tasks/<id>`.
    pub fn tasks(&self) -> Result<Vec<cairn_api::metadata::v1::TaskRecord>, MetaError> {
        self.list(&state::kv_key(b"tasks/"))
    }
    /// Maintenance marks of nodes (`maintenance/<id>`), expired ones
    /// included: the reader compares `until_unix_ms` with its clock.
    pub fn maintenance(&self) -> Result<Vec<cairn_api::metadata::v1::NodeMaintenance>, MetaError> {
        self.list(&state::kv_key(MAINTENANCE_PREFIX.as_bytes()))
    }
    /// Replicas awaited after their node went away (`away/<group>/<node>`).
    pub fn away_replicas(&self) -> Result<Vec<cairn_api::metadata::v1::AwayReplica>, MetaError> {
        self.list(&state::kv_key(AWAY_PREFIX.as_bytes()))
    }
    pub fn snapshots(&self, vdisk_id: &str) -> Result<Vec<SnapshotRecord>, MetaError> {
        self.list(&state::snapshot_prefix(vdisk_id))
    }
    /// Every iSCSI target, in name order (records hold CHAP secrets: never
    /// hand them to a client as they are).
    pub fn iscsi_targets(
        &self,
    ) -> Result<Vec<cairn_api::metadata::v1::IscsiTargetRecord>, MetaError> {
        self.list(crate::iscsi::PREFIX_ISCSI_TARGET)
    }
    /// One iSCSI target by its normalised name.
    pub fn iscsi_target(
        &self,
        iqn: &str,
    ) -> Result<Option<cairn_api::metadata::v1::IscsiTargetRecord>, MetaError> {
        self.get(&crate::iscsi::target_key(iqn))
    }
}
