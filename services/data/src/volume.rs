//! The primary side: a vdisk served by its owner node, implementing
//! [`BlockDevice`] on top of replicated extent groups.
//!
//! One write, end to end: split by vblock; find (or allocate, or
//! copy-on-write) the vblock's extent group at the vdisk's current
//! generation; take the group's next sequence number; send the record to
//! every replica in the group's replica set at once (the local one through
//! [`LocalPool`], the others over mTLS RPC); each replica appends it and
//! fdatasyncs (group commit); acknowledge when all have. A replica that
//! fails is removed from the set by a compare-and-set on the group's epoch
//! in metadata, and the remaining replicas are told the new epoch, before
//! the write is acknowledged: the set never names a replica that lacks an
//! acknowledged write.
//!
//! Invariants enforced here:
//! - durability before ack: `GroupState::replicate` returns only when every
//!   replica of the current set has the record on disk;
//! - checksum before return: `Volume::read_group` returns only data a
//!   replica verified, and rewrites a local copy that failed verification;
//! - epoch fencing: a primary takes over a group (`ensure_ready`) by raising
//!   its epoch in metadata and on every replica, which then refuse the older
//!   epoch, so a stale primary can no longer complete a write.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cairn_api::data::v1::{
    vdisk_io, Codec, ExtentGroupHeader, FrontendCommand, RecordKind, ReplicaRead, ReplicaReadReply,
    ReplicaWrite, VdiskIo,
};
use cairn_api::metadata::v1::{
    command::Op, AllocateExtentGroup, AwayReplica, DeleteExtentGroup, DeleteKv, ExtentGroupRecord,
    PutKv, ReplicaLocation, SetVdiskFrontendState, UpdateExtentGroup, VblockMapping, VdiskRecord,
};
use cairn_api::record::Record;
use cairn_metadata::MetadataHandle;
use cairn_util::error_code::codes as meta_codes;
use futures::future::join_all;
use prost::Message as _;

use crate::format::{self, BLOCK_SIZE};
use crate::frontend::{check_range, BlockDevice, BlockService, Bytes, CommandHandler, Extent};
use crate::pool::LocalPool;
use crate::route::{Routed, Via};
use crate::rpc::{from_status, Peers};
use crate::DataError;

pub(crate) use cairn_util::sync::lock;
use cairn_util::sync::{read, write};

pub(crate) fn meta_err(e: cairn_metadata::MetaError) -> DataError {
    DataError::Unavailable(format!("metadata: {e}"))
}

/// Counters of the data service (exported by the management API).
#[derive(Debug, Default)]
pub struct Stats {
    /// Blocks that failed verification and were rewritten from another replica.
    pub checksum_repairs: AtomicU64,
    /// Replicas dropped from a group's set after a failed write or read.
    pub replicas_dropped: AtomicU64,
    pub bytes_written: AtomicU64,
    pub bytes_read: AtomicU64,
}

/// The data service of one node.
pub struct DataService {
    pub(crate) node_id: u64,
    cluster_id: String,
    pub(crate) meta: MetadataHandle,
    pool: Arc<LocalPool>,
    pub(crate) peers: Peers,
    vblock_size: u32,
    pub(crate) groups: Mutex<HashMap<u64, Arc<GroupState>>>,
    pub(crate) volumes: Mutex<HashMap<String, Arc<Volume>>>,
    forwarders: Mutex<HashMap<String, (Arc<Forwarded>, Instant)>>,
    /// The front ends' handlers of [`BlockDevice::command`], by protocol.
    commands: Mutex<HashMap<String, Arc<dyn CommandHandler>>>,
    /// Peers' RPC addresses at a catalog era (looked up once per replica
    /// request otherwise).
    addrs: Mutex<EraCache<String>>,
    pub stats: Stats,
    /// Replicas of groups this node owns that were dropped while their node
    /// could not be reached, by (group, node), and when: their copies are
    /// likely intact, so the group waits for the node to come back and be
    /// caught up before it is rebuilt elsewhere
    /// ([`crate::repair::MonitorConfig::rebuild_wait`]). Since when, in
    /// unix ms; also kept in metadata (`away/<group>/<node>`), which is
    /// what an owner that restarted, or a new one, goes by.
    pub(crate) away: Mutex<HashMap<(u64, u64), u64>>,
}

/// Blocks in a group of this record's vblock size.
pub(crate) fn group_block_count(rec: &ExtentGroupRecord) -> u32 {
    rec.vblock_size.max(BLOCK_SIZE as u32) / BLOCK_SIZE as u32
}

/// What a primary knows about one group it writes.
pub(crate) struct GroupState {
    pub(crate) id: u64,
    rec: RwLock<ExtentGroupRecord>,
    next_seq: AtomicU64,
    /// The vdisk owner epoch + 1 under which this node fenced older
    /// primaries (or created the group); 0 when not ready. Tied to the
    /// owner epoch because this state outlives an ownership: a node that
    /// lost a vdisk and later got it back kept "ready" groups whose record
    /// (replicas, epoch) was from its first tenure, and read its own stale
    /// copies as current (found by flapping partitions: an acknowledged
    /// write read back older). Cleared when another node raised the epoch.
    ready: AtomicU64,
    /// Serializes replica-set changes and takeovers.
    pub(crate) change: tokio::sync::Mutex<()>,
    /// Header to send with writes while replicas may not have the file yet.
    create: RwLock<Option<ExtentGroupHeader>>,
    /// Writes hold it shared; adding a replica takes it exclusively to wait
    /// until no write that skipped the newcomer is still in flight.
    pub(crate) gate: tokio::sync::RwLock<()>,
}

pub(crate) enum Target {
    Local,
    Remote(u64, String),
}

impl DataService {
    pub fn new(
        node_id: u64,
        cluster_id: String,
        meta: MetadataHandle,
        pool: Arc<LocalPool>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Arc<Self> {
        Arc::new(Self {
            node_id,
            cluster_id,
            meta,
            pool,
            peers: Peers::new(tls, Duration::from_secs(10)),
            vblock_size: crate::DEFAULT_VBLOCK_SIZE,
            groups: Mutex::new(HashMap::new()),
            volumes: Mutex::new(HashMap::new()),
            forwarders: Mutex::new(HashMap::new()),
            commands: Mutex::new(HashMap::new()),
            addrs: Mutex::new(EraCache::default()),
            stats: Stats::default(),
            away: Mutex::new(HashMap::new()),
        })
    }

    pub fn pool(&self) -> &Arc<LocalPool> {
        &self.pool
    }
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    pub(crate) fn target(&self, node: u64) -> Result<Target, DataError> {
        if node == self.node_id {
            return Ok(Target::Local);
        }
        let era = self.meta.catalog_era();
        let cached = lock(&self.addrs).get(era, node);
        if let Some(addr) = cached {
            return Ok(Target::Remote(node, addr));
        }
        let rec = self
            .meta
            .node(node)
            .map_err(meta_err)?
            .ok_or_else(|| DataError::Unavailable(format!("node {node} is not a member")))?;
        lock(&self.addrs).put(era, node, rec.rpc_addr.clone());
        Ok(Target::Remote(node, rec.rpc_addr))
    }

    pub(crate) async fn replica_write(
        &self,
        node: u64,
        req: ReplicaWrite,
    ) -> Result<(), DataError> {
        match self.target(node)? {
            Target::Local => self.pool.write_local(req).await.map(|_| ()),
            Target::Remote(id, addr) => {
                self.peers.check_alive(id)?;
                if let Some(w) = self.peers.wire(id, &addr).await {
                    let r = w.write(req, self.peers.timeout()).await.map(|_| ());
                    self.peers.observe(id, &r);
                    return r;
                }
                let mut c = self.peers.client(id, &addr)?;
                let r = c
                    .write(req)
                    .await
                    .map(|_| ())
                    .map_err(|s| from_status(&s, id));
                self.peers.observe(id, &r);
                r
            }
        }
    }

    /// Reads verified blocks `[first, first + count)` of a group from `node`.
    pub(crate) async fn replica_read(
        &self,
        node: u64,
        group: u64,
        first: u32,
        count: u32,
        states_only: bool,
    ) -> Result<ReplicaReadReply, DataError> {
        let req = ReplicaRead {
            format_version: cairn_api::FORMAT_VERSION,
            extent_group_id: group,
            first_block: first,
            block_count: count,
            epoch: 0,
            states_only,
        };
        match self.target(node)? {
            Target::Local => self.pool.read(req).await,
            Target::Remote(id, addr) => {
                self.peers.check_alive(id)?;
                if let Some(w) = self.peers.wire(id, &addr).await {
                    let r = w.read(&req, self.peers.timeout()).await;
                    self.peers.observe(id, &r);
                    return r;
                }
                let mut c = self.peers.client(id, &addr)?;
                let r = c
                    .read(req)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| from_status(&s, id));
                self.peers.observe(id, &r);
                r
            }
        }
    }

    /// Raises a replica's epoch (after syncing it); returns its highest
    /// sequence and its [`ExtentGroupFile::sequence_digest`] (0 from a
    /// version before digests).
    ///
    /// [`ExtentGroupFile::sequence_digest`]: crate::egroup::ExtentGroupFile::sequence_digest
    pub(crate) async fn replica_set_epoch(
        &self,
        node: u64,
        group: u64,
        epoch: u64,
    ) -> Result<(u64, u64), DataError> {
        let reply = match self.target(node)? {
            Target::Local => self.pool.set_epoch(group, epoch).await?,
            Target::Remote(id, addr) => {
                self.peers.check_alive(id)?;
                let mut c = self.peers.client(id, &addr)?;
                c.set_epoch(cairn_api::data::v1::ReplicaSetEpoch {
                    extent_group_id: group,
                    epoch,
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| from_status(&s, id))?
            }
        };
        Ok((reply.max_sequence, reply.sequence_digest))
    }

    /// Proposes `replicas` as group `rec.id`'s replica set under the next
    /// epoch, a compare-and-set on `rec.epoch` (the record `gs` holds).
    /// Applied: `gs` holds the new record, which is returned. Refused
    /// (another change came first): `Ok(Err(why))`, and the caller decides
    /// whether to re-read and retry. Raising the replicas' own epochs is
    /// left to the caller.
    pub(crate) async fn propose_replica_set(
        &self,
        gs: &GroupState,
        rec: &ExtentGroupRecord,
        replicas: Vec<ReplicaLocation>,
    ) -> Result<Result<ExtentGroupRecord, String>, DataError> {
        let res = self
            .meta
            .propose_raw(Op::UpdateExtentGroup(UpdateExtentGroup {
                id: rec.id,
                expect_epoch: rec.epoch,
                new_epoch: rec.epoch + 1,
                replicas: replicas.clone(),
            }))
            .await
            .map_err(meta_err)?;
        if !res.error_code.is_empty() {
            return Ok(Err(res.error_message));
        }
        let mut new = rec.clone();
        new.epoch += 1;
        new.replicas = replicas;
        gs.set_rec(new.clone());
        Ok(Ok(new))
    }

    /// Records in metadata that `node`'s replica of `group` was dropped at
    /// `since` while the node could not be reached. Best effort: without it
    /// this owner still waits (its memory), only a restarted or new owner
    /// would not.
    pub(crate) async fn note_away(&self, group: u64, node: u64, since: u64) {
        let mark = AwayReplica {
            format_version: cairn_api::FORMAT_VERSION,
            extent_group_id: group,
            node_id: node,
            since_unix_ms: since,
        };
        let r = self
            .meta
            .propose(Op::PutKv(PutKv {
                key: cairn_metadata::handle::away_key(group, node),
                value: mark.encode_to_vec(),
            }))
            .await;
        if let Err(e) = r {
            tracing::warn!(group, node, error = %e, "cannot record an awaited replica in metadata");
        }
    }

    /// Forgets an away mark in metadata (best effort: a stale one is only
    /// read for a group short of replicas, and is removed by a later pass).
    pub(crate) async fn forget_away(&self, group: u64, node: u64) {
        let r = self
            .meta
            .propose(Op::DeleteKv(DeleteKv {
                key: cairn_metadata::handle::away_key(group, node),
            }))
            .await;
        if let Err(e) = r {
            tracing::debug!(group, node, error = %e, "cannot remove an away mark");
        }
    }

    /// Raises every replica of `rec` to its epoch, one after another; a
    /// replica that cannot be reached is only logged (it refuses the old
    /// primary's writes once it hears of the epoch, and the monitor drops
    /// it if it stays away).
    pub(crate) async fn raise_replica_epochs(&self, rec: &ExtentGroupRecord) {
        for r in &rec.replicas {
            if let Err(e) = self.replica_set_epoch(r.node_id, rec.id, rec.epoch).await {
                tracing::warn!(group = rec.id, node = r.node_id, error = %e, "cannot raise a replica's epoch");
            }
        }
    }

    /// Makes `groups` durable on `node`.
    pub(crate) async fn replica_sync(&self, node: u64, groups: Vec<u64>) -> Result<(), DataError> {
        match self.target(node)? {
            Target::Local => self.pool.sync(&groups).await,
            Target::Remote(id, addr) => {
                self.peers.check_alive(id)?;
                let mut c = self.peers.client(id, &addr)?;
                let r = match c
                    .sync(cairn_api::data::v1::ReplicaSync {
                        extent_group_ids: groups,
                    })
                    .await
                {
                    Ok(_) => Ok(()),
                    // A replica that predates Sync wrote every record durably.
                    Err(s) if s.code() == tonic::Code::Unimplemented => Ok(()),
                    Err(s) => Err(from_status(&s, id)),
                };
                self.peers.observe(id, &r);
                r
            }
        }
    }

    pub(crate) async fn replica_delete(&self, node: u64, group: u64) -> Result<(), DataError> {
        match self.target(node)? {
            Target::Local => self.pool.delete(group).await,
            Target::Remote(id, addr) => {
                self.peers.check_alive(id)?;
                let mut c = self.peers.client(id, &addr)?;
                c.delete(cairn_api::data::v1::ReplicaDelete {
                    extent_group_id: group,
                })
                .await
                .map(|_| ())
                .map_err(|s| from_status(&s, id))
            }
        }
    }

    /// The cached state of an existing group (groups this node creates
    /// are cached by `Volume` as it makes them).
    pub(crate) fn group_state(&self, rec: ExtentGroupRecord) -> Arc<GroupState> {
        let mut m = lock(&self.groups);
        m.entry(rec.id)
            .or_insert_with(|| {
                Arc::new(GroupState {
                    id: rec.id,
                    rec: RwLock::new(rec),
                    // Learned, and the group made ready, by the takeover
                    // of the first write or live read.
                    next_seq: AtomicU64::new(0),
                    ready: AtomicU64::new(0),
                    change: tokio::sync::Mutex::new(()),
                    create: RwLock::new(None),
                    gate: tokio::sync::RwLock::new(()),
                })
            })
            .clone()
    }

    pub(crate) async fn load_group(&self, id: u64) -> Result<Arc<GroupState>, DataError> {
        if let Some(g) = lock(&self.groups).get(&id) {
            return Ok(g.clone());
        }
        let rec = self
            .meta
            .extent_group(id)
            .map_err(meta_err)?
            .ok_or_else(|| DataError::NotFound(format!("extent group {id}")))?;
        Ok(self.group_state(rec))
    }

    /// Chooses `rf` nodes for a new group: this node first (reads stay
    /// local), then the members whose disks have the most room.
    fn place(&self, rf: u32, exclude: &[u64]) -> Result<Vec<ReplicaLocation>, DataError> {
        let mut out = Vec::new();
        if rf == 0 {
            return Ok(out);
        }
        if self.pool.has_room() && !exclude.contains(&self.node_id) {
            out.push(ReplicaLocation {
                node_id: self.node_id,
                disk_id: String::new(),
            });
        }
        let disks = self.meta.disks().map_err(meta_err)?;
        let mut candidates: Vec<(u64, u64)> = Vec::new();
        for n in self.meta.nodes().map_err(meta_err)? {
            if n.id == self.node_id || !self.peers.is_up(n.id) || exclude.contains(&n.id) {
                continue;
            }
            let free: u64 = disks
                .iter()
                .filter(|d| d.node_id == n.id && d.health <= 1)
                .map(|d| d.capacity_bytes.saturating_sub(d.used_bytes))
                .sum();
            let known = disks.iter().any(|d| d.node_id == n.id);
            if known && free < 64 << 20 {
                continue;
            }
            candidates.push((free, n.id));
        }
        // Spread load: every node within 10 % of the emptiest one is as
        // good as it; pick among those at random, then the rest by room.
        // Nodes in maintenance last: they are about to go away (a replica
        // there would run short at once), but still better than too few.
        use rand::seq::SliceRandom as _;
        let marked = crate::drain::current_marks(&self.meta);
        let best = candidates.iter().map(|c| c.0).max().unwrap_or(0);
        candidates.shuffle(&mut rand::thread_rng());
        candidates.sort_by_key(|(free, id)| {
            (
                marked.contains_key(id),
                std::cmp::Reverse(*free >= best - best / 10),
            )
        });
        for (_, id) in candidates {
            if out.len() as u32 >= rf {
                break;
            }
            out.push(ReplicaLocation {
                node_id: id,
                disk_id: String::new(),
            });
        }
        if out.len() as u32 != rf {
            return Err(DataError::Unavailable(format!(
                "only {} of {rf} replicas can be placed (nodes down or disks full)",
                out.len()
            )));
        }
        Ok(out)
    }
}

/// The front ends' view of the data service (see [`BlockService`]).
#[derive(Clone)]
pub struct Frontend(pub Arc<DataService>);

#[async_trait]
impl BlockService for Frontend {
    /// A handle that follows the vdisk's owner: front ends hold it for as
    /// long as a session lasts, across owner failovers.
    async fn open(&self, vdisk_id: &str) -> Result<Arc<dyn BlockDevice>, DataError> {
        Ok(Arc::new(Routed::open(self.0.clone(), vdisk_id).await?))
    }
    async fn open_owned(&self, vdisk_id: &str) -> Result<Arc<dyn BlockDevice>, DataError> {
        self.0.open_owned(vdisk_id).await
    }
    async fn serve_command(
        &self,
        vdisk_id: &str,
        protocol: &str,
        command: Vec<u8>,
    ) -> Result<Vec<u8>, DataError> {
        let handler = lock(&self.0.commands).get(protocol).cloned();
        let Some(handler) = handler else {
            return Err(DataError::Invalid(format!(
                "no front end on node {} handles {protocol:?} commands",
                self.0.node_id
            )));
        };
        // Only the owner: the sender looks the owner up again on refusal.
        self.0.open_owned(vdisk_id).await?;
        handler.handle(vdisk_id, command).await
    }
}

/// How long a non-owner trusts its knowledge of a vdisk's owner.
pub const FORWARDER_TTL: Duration = Duration::from_secs(2);

impl DataService {
    /// Registers the handler of a front end's [`BlockDevice::command`]s
    /// (before the RPC listener starts: a command that finds no handler is
    /// refused).
    pub fn set_command_handler(&self, protocol: &str, handler: Arc<dyn CommandHandler>) {
        lock(&self.commands).insert(protocol.to_string(), handler);
    }

    /// The device for `vdisk_id`: the volume itself when this node owns
    /// it, otherwise a forwarder to the owner.
    pub async fn open_volume(
        self: &Arc<Self>,
        vdisk_id: &str,
    ) -> Result<Arc<dyn BlockDevice>, DataError> {
        let via = self.route(vdisk_id).await?;
        Ok(match via {
            Via::Here(v) => v,
            Via::Owner(f) => f,
        })
    }

    /// Where I/O for `vdisk_id` goes now.
    pub(crate) async fn route(self: &Arc<Self>, vdisk_id: &str) -> Result<Via, DataError> {
        // Each lookup is its own statement: a guard taken in an `if let`
        // lives to the end of its block, and taking the same lock again in
        // there deadlocked the runtime worker (an owner that lost its
        // vdisk in a partition hung on the next I/O for it).
        let cached = lock(&self.volumes).get(vdisk_id).cloned();
        if let Some(v) = cached {
            if v.owned() {
                return Ok(Via::Here(v));
            }
            let mut volumes = lock(&self.volumes);
            if volumes.get(vdisk_id).is_some_and(|c| Arc::ptr_eq(c, &v)) {
                volumes.remove(vdisk_id);
            }
        }
        // A forwarder is trusted for a short while; the owner refuses
        // requests for vdisks it no longer owns, which drops it sooner.
        let forwarder = lock(&self.forwarders).get(vdisk_id).cloned();
        if let Some((f, at)) = forwarder {
            if at.elapsed() < FORWARDER_TTL {
                return Ok(Via::Owner(f));
            }
        }
        self.meta.read_barrier().await.map_err(meta_err)?;
        let vd = self
            .meta
            .vdisk_by_id(vdisk_id)
            .map_err(meta_err)?
            .ok_or_else(|| DataError::NotFound(format!("vdisk {vdisk_id}")))?;
        if vd.owner_node_id != self.node_id {
            let owner = self.target(vd.owner_node_id)?;
            let Target::Remote(id, addr) = owner else {
                return Err(DataError::Unavailable("owner lookup".into()));
            };
            let f = Arc::new(Forwarded {
                vdisk_id: vdisk_id.to_string(),
                size: vd.size_bytes,
                node: id,
                addr: addr.clone(),
                client: self.peers.client(id, &addr)?,
                svc: Arc::downgrade(self),
            });
            lock(&self.forwarders).insert(vdisk_id.to_string(), (f.clone(), Instant::now()));
            return Ok(Via::Owner(f));
        }
        Ok(Via::Here(self.local_volume(vd)?))
    }

    /// Like [`Self::open_volume`], but only for a vdisk this node owns: a
    /// forwarded request is never forwarded again (two nodes with different
    /// views of the owner must not bounce a request between them).
    pub async fn open_owned(
        self: &Arc<Self>,
        vdisk_id: &str,
    ) -> Result<Arc<dyn BlockDevice>, DataError> {
        let via = self.route(vdisk_id).await?;
        match via {
            Via::Here(v) => Ok(v),
            Via::Owner(_) => {
                lock(&self.forwarders).remove(vdisk_id);
                Err(DataError::Unavailable(format!(
                    "node {} does not own vdisk {vdisk_id}",
                    self.node_id
                )))
            }
        }
    }

    /// The volume of a vdisk this node owns (cached).
    pub(crate) fn local_volume(
        self: &Arc<Self>,
        vd: VdiskRecord,
    ) -> Result<Arc<Volume>, DataError> {
        let vdisk_id = vd.id.clone();
        if let Some(v) = lock(&self.volumes).get(&vdisk_id) {
            return Ok(v.clone());
        }
        let ds = self
            .meta
            .datastores()
            .map_err(meta_err)?
            .into_iter()
            .find(|d| d.id == vd.datastore_id)
            .ok_or_else(|| DataError::NotFound(format!("datastore of vdisk {vdisk_id}")))?;
        let v = Arc::new(Volume {
            svc: self.clone(),
            vdisk: RwLock::new(Arc::new(vd)),
            rf: ds.replication_factor.clamp(1, 3),
            compression: ds.compression,
            caw: tokio::sync::RwLock::new(()),
            alloc: Mutex::new(HashMap::new()),
            dirty: Mutex::new(HashSet::new()),
            // Not read at any era yet: the first I/O reads the record again.
            era: AtomicU64::new(u64::MAX),
            live: Mutex::new(EraCache::default()),
        });
        lock(&self.volumes).insert(vdisk_id, v.clone());
        Ok(v)
    }
}

/// A vdisk owned by this node.
pub struct Volume {
    svc: Arc<DataService>,
    /// Shared, not copied: it is read several times per I/O, and it carries
    /// the front ends' saved state.
    vdisk: RwLock<Arc<VdiskRecord>>,
    pub(crate) rf: u32,
    compression: bool,
    /// Normal writes share it; compare-and-write takes it alone (atomicity).
    caw: tokio::sync::RwLock<()>,
    /// One allocation per vblock at a time.
    alloc: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    /// Groups with acknowledged writes that may not be durable yet (the
    /// write-back cache a flush empties).
    dirty: Mutex<HashSet<u64>>,
    /// The metadata catalog era `vdisk` was read at (see
    /// `MetadataHandle::catalog_era`): a snapshot, resize or owner change
    /// applied on this node is seen by the next I/O, not at the next
    /// route check.
    era: AtomicU64,
    /// vblock -> the group the current generation writes, as resolved at
    /// its era: one RocksDB iterator per I/O was the largest cost of a
    /// 4 KiB write on the owner. Only the live generation's own mappings are
    /// kept: those change only through catalog changes that move the era.
    live: Mutex<EraCache<u64>>,
}

/// Values read from metadata, good while the catalog era they were read at
/// (see `MetadataHandle::catalog_era`) has not moved.
#[derive(Default)]
struct EraCache<V> {
    era: u64,
    map: HashMap<u64, V>,
}

impl<V: Clone> EraCache<V> {
    fn get(&self, era: u64, key: u64) -> Option<V> {
        (self.era == era).then(|| self.map.get(&key).cloned())?
    }

    /// Keeps `value`, read after seeing `era`; older entries go if it moved.
    fn put(&mut self, era: u64, key: u64, value: V) {
        if self.era != era {
            self.map.clear();
            self.era = era;
        }
        self.map.insert(key, value);
    }
}

/// One vblock-sized piece of a request.
struct Piece {
    vblock: u64,
    /// Byte offset inside the vblock.
    off: u64,
    len: u64,
    /// Offset of the piece inside the request's buffer.
    buf_off: usize,
}

impl Volume {
    /// The vdisk's record, read again when the catalog era moved.
    pub(crate) fn rec(&self) -> Arc<VdiskRecord> {
        if self.era.load(Ordering::Acquire) != self.svc.meta.catalog_era() {
            // A vdisk that is gone keeps its last record: its I/O fails on
            // the groups' side, and the route check closes it.
            self.refresh();
        }
        read(&self.vdisk).clone()
    }

    /// Whether this node owns the vdisk, as its local metadata says (a
    /// stale owner is fenced by the group epochs anyway). Cheap unless the
    /// catalog moved: every forwarded request asks.
    pub(crate) fn owned(&self) -> bool {
        if self.era.load(Ordering::Acquire) != self.svc.meta.catalog_era() {
            return self.refresh().unwrap_or(false);
        }
        read(&self.vdisk).owner_node_id == self.svc.node_id
    }

    /// Reads the record again; whether this node owns it, `None` when it is
    /// gone or cannot be read (then the next call tries again).
    fn refresh(&self) -> Option<bool> {
        let era = self.svc.meta.catalog_era();
        let id = read(&self.vdisk).id.clone();
        match self.svc.meta.vdisk_by_id(&id) {
            Ok(Some(vd)) => {
                let owned = vd.owner_node_id == self.svc.node_id;
                *write(&self.vdisk) = Arc::new(vd);
                self.era.store(era, Ordering::Release);
                Some(owned)
            }
            _ => None,
        }
    }

    fn vbs(&self) -> u64 {
        u64::from(self.svc.vblock_size)
    }

    fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let vbs = self.vbs();
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let vblock = pos / vbs;
            let off = pos % vbs;
            let n = (vbs - off).min(end - pos);
            out.push(Piece {
                vblock,
                off,
                len: n,
                buf_off: (pos - offset) as usize,
            });
            pos += n;
        }
        out
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), DataError> {
        let size = self.rec().size_bytes;
        if check_range(size, offset, len).is_err() {
            // Maybe it grew: look again before refusing.
            self.owned();
        }
        check_range(self.rec().size_bytes, offset, len)
    }

    /// The group holding `vblock` as this vdisk sees it now, following
    /// snapshots (older generations) and clone parents.
    fn resolve(&self, vblock: u64) -> Result<Option<VblockMapping>, DataError> {
        let era = self.svc.meta.catalog_era();
        let vd = self.rec();
        let cached = lock(&self.live).get(era, vblock);
        if let Some(g) = cached {
            return Ok(Some(VblockMapping {
                format_version: cairn_api::FORMAT_VERSION,
                vdisk_id: vd.id.clone(),
                vblock,
                extent_group_id: g,
                extent_index: 0,
                generation: vd.generation,
            }));
        }
        let found = self.resolve_stored(&vd, vblock)?;
        if let Some(m) = &found {
            if m.vdisk_id == vd.id && m.generation == vd.generation {
                lock(&self.live).put(era, vblock, m.extent_group_id);
            }
        }
        Ok(found)
    }

    /// [`Self::resolve`] from the metadata store.
    fn resolve_stored(
        &self,
        vd: &VdiskRecord,
        vblock: u64,
    ) -> Result<Option<VblockMapping>, DataError> {
        let mut vdisk = vd.id.clone();
        let mut gen = vd.generation;
        let mut parent = (vd.parent_vdisk_id.clone(), vd.parent_generation);
        for _ in 0..64 {
            let maps = self
                .svc
                .meta
                .vblock_mappings(&vdisk, vblock)
                .map_err(meta_err)?;
            if let Some(m) = maps.into_iter().rev().find(|m| m.generation <= gen) {
                return Ok(Some(m));
            }
            if parent.0.is_empty() {
                return Ok(None);
            }
            vdisk = parent.0.clone();
            gen = parent.1;
            parent = match self.svc.meta.vdisk_by_id(&vdisk).map_err(meta_err)? {
                Some(p) => (p.parent_vdisk_id, p.parent_generation),
                None => (String::new(), 0),
            };
        }
        Ok(None)
    }

    pub(crate) fn header_for(&self, g: &ExtentGroupRecord) -> ExtentGroupHeader {
        let vd = self.rec();
        ExtentGroupHeader {
            format_version: cairn_api::FORMAT_VERSION,
            cluster_id: self.svc.cluster_id.clone(),
            extent_group_id: g.id,
            vdisk_id: g.vdisk_id.clone(),
            vdisk_generation: g.generation,
            first_vblock: g.vblock,
            vblock_count: 1,
            vblock_size: self.svc.vblock_size,
            block_size: BLOCK_SIZE as u32,
            codec: if g.compression {
                Codec::Zstd as i32
            } else {
                Codec::None as i32
            },
            checksum: 0,
            epoch: g.epoch,
            created_unix_ms: g.created_unix_ms,
            vdisk_size_bytes: vd.size_bytes,
            parent_vdisk_id: vd.parent_vdisk_id.clone(),
            parent_generation: vd.parent_generation,
            // Each file gets its own when it is written.
            file_instance: 0,
        }
    }

    /// The group to write `vblock` into: the current generation's, or a new
    /// one (copying the older version of the vblock first when a snapshot
    /// or a clone parent still shares it).
    async fn group_for_write(&self, vblock: u64) -> Result<Arc<GroupState>, DataError> {
        let gen = self.rec().generation;
        if let Some(m) = self.resolve(vblock)? {
            if m.vdisk_id == self.rec().id && m.generation == gen {
                return self.svc.load_group(m.extent_group_id).await;
            }
        }
        let slot = {
            let mut a = lock(&self.alloc);
            a.entry(vblock).or_default().clone()
        };
        let _one = slot.lock().await;
        // Someone may have allocated while we waited.
        let source = self.resolve(vblock)?;
        if let Some(m) = &source {
            if m.vdisk_id == self.rec().id && m.generation == gen {
                return self.svc.load_group(m.extent_group_id).await;
            }
        }
        let vd = self.rec();
        let rec = ExtentGroupRecord {
            format_version: cairn_api::FORMAT_VERSION,
            id: rand::random::<u64>() >> 1,
            vdisk_id: vd.id.clone(),
            epoch: 1,
            replicas: self.svc.place(self.rf, &[])?,
            created_unix_ms: cairn_util::now_unix_ms(),
            vblock,
            generation: gen,
            vblock_size: self.svc.vblock_size,
            compression: self.compression,
        };
        let header = self.header_for(&rec);
        let gs = Arc::new(GroupState {
            id: rec.id,
            rec: RwLock::new(rec.clone()),
            next_seq: AtomicU64::new(1),
            ready: AtomicU64::new(self.rec().owner_epoch + 1),
            change: tokio::sync::Mutex::new(()),
            create: RwLock::new(Some(header.clone())),
            gate: tokio::sync::RwLock::new(()),
        });
        // Create the replicas (and copy the shared version) before the
        // mapping exists, so no reader ever sees a half-made group.
        self.create_replicas(&gs).await?;
        if let Some(src) = source {
            let src_gs = self.svc.load_group(src.extent_group_id).await?;
            let blocks = self.vbs() as u32 / BLOCK_SIZE as u32;
            let (data, states) = self.read_group(&src_gs, 0, blocks, false).await?;
            let mut b = 0u32;
            while b < blocks {
                if !states.get(b as usize).copied().unwrap_or(false) {
                    b += 1;
                    continue;
                }
                let start = b;
                while b < blocks
                    && states.get(b as usize).copied().unwrap_or(false)
                    && b - start < 64
                {
                    b += 1;
                }
                let bytes = Bytes::copy_from_slice(
                    &data[start as usize * BLOCK_SIZE..b as usize * BLOCK_SIZE],
                );
                self.replicate(&gs, RecordKind::RecordData, start, b - start, bytes, true)
                    .await?;
            }
        }
        let res = self
            .svc
            .meta
            .propose_raw(Op::AllocateExtentGroup(AllocateExtentGroup {
                group: Some(gs.rec_snapshot()),
            }))
            .await
            .map_err(meta_err)?;
        if res.error_code.is_empty() {
            lock(&self.svc.groups).insert(gs.id, gs.clone());
            return Ok(gs);
        }
        // Lost a race (or the generation moved): drop our replicas, retry via metadata.
        for r in gs.rec_snapshot().replicas {
            let _ = self.svc.replica_delete(r.node_id, gs.id).await;
        }
        if res.error_code == meta_codes::CONFLICT.code && !res.record.is_empty() {
            let winner = Record::<ExtentGroupRecord>::decode(&res.record)
                .map_err(|e| DataError::Unavailable(e.to_string()))?;
            return self.svc.load_group(winner.msg.id).await;
        }
        self.owned();
        Err(DataError::Unavailable(format!(
            "allocating vblock {vblock}: {}",
            res.error_message
        )))
    }

    /// Creates a new group's files on its replicas; a node that cannot
    /// (full disk, I/O error, down) is replaced by another before the group
    /// is committed, so a group starts life with its full replica set.
    async fn create_replicas(&self, gs: &Arc<GroupState>) -> Result<(), DataError> {
        let mut excluded: Vec<u64> = Vec::new();
        for _attempt in 0..4 {
            let rec = gs.rec_snapshot();
            let header = read(&gs.create).clone();
            let sends = rec.replicas.iter().map(|r| {
                let req = ReplicaWrite {
                    format_version: cairn_api::FORMAT_VERSION,
                    extent_group_id: gs.id,
                    epoch: rec.epoch,
                    sequence: 0,
                    kind: RecordKind::RecordEpoch as i32,
                    first_block: 0,
                    block_count: 0,
                    data: bytes::Bytes::new(),
                    block_crc32c: Vec::new(),
                    create: header.clone(),
                    copy: false,
                    deferred_sync: false,
                };
                let node = r.node_id;
                async move { (node, self.svc.replica_write(node, req).await) }
            });
            let results = join_all(sends).await;
            let mut kept = Vec::new();
            let mut last = None;
            for (node, r) in results {
                match r {
                    Ok(()) => kept.push(ReplicaLocation {
                        node_id: node,
                        disk_id: String::new(),
                    }),
                    Err(e) => {
                        tracing::warn!(group = gs.id, node, error = %e,
                            "cannot create a replica there; placing it elsewhere");
                        excluded.push(node);
                        last = Some(e);
                    }
                }
            }
            if kept.len() == rec.replicas.len() {
                return Ok(());
            }
            let mut avoid = excluded.clone();
            avoid.extend(kept.iter().map(|r| r.node_id));
            let more = match self.svc.place(self.rf - kept.len() as u32, &avoid) {
                Ok(m) => m,
                Err(e) => {
                    for r in &kept {
                        let _ = self.svc.replica_delete(r.node_id, gs.id).await;
                    }
                    return Err(last.unwrap_or(e));
                }
            };
            let mut new = rec.clone();
            new.replicas = kept;
            new.replicas.extend(more);
            gs.set_rec(new);
        }
        Err(DataError::Unavailable(format!(
            "extent group {}: no replicas could be created",
            gs.id
        )))
    }

    /// Sends one record to every replica of the group; returns when all
    /// replicas of the (possibly shrunk) set have it durable.
    async fn replicate(
        &self,
        gs: &Arc<GroupState>,
        kind: RecordKind,
        first: u32,
        count: u32,
        data: Bytes,
        durable: bool,
    ) -> Result<(), DataError> {
        self.ensure_ready(gs).await?;
        let crcs = if kind == RecordKind::RecordData {
            format::block_checksums(&data)
        } else {
            Vec::new()
        };
        for _attempt in 0..3 {
            let _gate = gs.gate.read().await;
            let rec = gs.rec_snapshot();
            let seq = if kind == RecordKind::RecordEpoch {
                0
            } else {
                gs.next_seq.fetch_add(1, Ordering::SeqCst)
            };
            let create = read(&gs.create).clone();
            // Remote copies first: `join_all` starts its futures in order,
            // and the local copy is written within its first poll (a copy
            // into the page cache), which would hold the requests to the
            // other nodes back by that long.
            let local = self.svc.node_id;
            let order = rec
                .replicas
                .iter()
                .filter(|r| r.node_id != local)
                .chain(rec.replicas.iter().filter(|r| r.node_id == local));
            let sends = order.map(|r| {
                let req = ReplicaWrite {
                    format_version: cairn_api::FORMAT_VERSION,
                    extent_group_id: gs.id,
                    epoch: rec.epoch,
                    sequence: seq,
                    kind: kind as i32,
                    first_block: first,
                    block_count: count,
                    data: data.clone(),
                    block_crc32c: crcs.clone(),
                    create: create.clone(),
                    copy: false,
                    deferred_sync: !durable,
                };
                let node = r.node_id;
                async move { (node, self.svc.replica_write(node, req).await) }
            });
            let results = join_all(sends).await;
            let failed: Vec<(u64, DataError)> = results
                .into_iter()
                .filter_map(|(n, r)| r.err().map(|e| (n, e)))
                .collect();
            drop(_gate);
            if !durable && failed.len() < rec.replicas.len() {
                // Acknowledged, not yet durable: the next flush syncs it.
                lock(&self.dirty).insert(gs.id);
            }
            if failed.is_empty() {
                if create.is_some() {
                    *write(&gs.create) = None;
                }
                self.svc
                    .stats
                    .bytes_written
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                return Ok(());
            }
            if failed
                .iter()
                .any(|(_, e)| matches!(e, DataError::StaleEpoch { .. }))
            {
                // Another primary raised the epoch. Never adopt its epoch
                // blindly: only a confirmed owner takes the group over again.
                self.svc.meta.read_barrier().await.map_err(meta_err)?;
                if !self.owned() {
                    return Err(DataError::Unavailable(format!(
                        "vdisk {} moved to another node",
                        self.rec().id
                    )));
                }
                gs.ready.store(0, Ordering::SeqCst);
                self.ensure_ready(gs).await?;
                continue;
            }
            if failed.len() == rec.replicas.len() {
                let (_, e) = failed
                    .into_iter()
                    .next()
                    .ok_or_else(|| DataError::Unavailable("no replicas".into()))?;
                return Err(e);
            }
            for (n, e) in &failed {
                tracing::warn!(group = gs.id, node = n, error = %e,
                    "replica write failed; dropping the replica from the group");
            }
            let drop: Vec<u64> = failed.iter().map(|(n, _)| *n).collect();
            self.drop_replicas(gs, &drop).await?;
            return Ok(());
        }
        Err(DataError::Unavailable(format!(
            "extent group {}: epoch keeps moving",
            gs.id
        )))
    }

    pub(crate) async fn refresh_group(&self, gs: &Arc<GroupState>) -> Result<(), DataError> {
        self.svc.meta.read_barrier().await.map_err(meta_err)?;
        let rec = self
            .svc
            .meta
            .extent_group(gs.id)
            .map_err(meta_err)?
            .ok_or_else(|| DataError::NotFound(format!("extent group {}", gs.id)))?;
        gs.set_rec(rec);
        Ok(())
    }

    /// Removes replicas from the set (epoch + 1) and fences them.
    pub(crate) async fn drop_replicas(
        &self,
        gs: &Arc<GroupState>,
        nodes: &[u64],
    ) -> Result<(), DataError> {
        let _c = gs.change.lock().await;
        for _ in 0..5 {
            let rec = gs.rec_snapshot();
            let keep: Vec<ReplicaLocation> = rec
                .replicas
                .iter()
                .filter(|r| !nodes.contains(&r.node_id))
                .cloned()
                .collect();
            if keep.len() == rec.replicas.len() {
                return Ok(());
            }
            if keep.is_empty() {
                return Err(DataError::Unavailable(format!(
                    "extent group {}: no replica left",
                    gs.id
                )));
            }
            let Ok(new) = self.svc.propose_replica_set(gs, &rec, keep).await? else {
                self.refresh_group(gs).await?;
                continue;
            };
            self.svc
                .stats
                .replicas_dropped
                .fetch_add(nodes.len() as u64, Ordering::Relaxed);
            self.svc.raise_replica_epochs(&new).await;
            let now = cairn_util::now_unix_ms();
            for n in nodes.iter().filter(|n| self.svc.peers.unreachable(**n)) {
                lock(&self.svc.away).entry((gs.id, *n)).or_insert(now);
                self.svc.note_away(gs.id, *n, now).await;
            }
            tracing::warn!(group = gs.id, dropped = ?nodes, epoch = new.epoch,
                replicas = new.replicas.len(), "extent group runs with fewer replicas until re-replication");
            return Ok(());
        }
        Err(DataError::Unavailable(format!(
            "extent group {}: replica set keeps changing",
            gs.id
        )))
    }

    /// First use of a group by this primary since it started (or since the
    /// vdisk moved here): raise the epoch (fencing any older primary), learn
    /// the highest sequence, and bring replicas that missed an unacknowledged
    /// write into agreement.
    async fn ensure_ready(&self, gs: &Arc<GroupState>) -> Result<(), DataError> {
        let tenure = self.rec().owner_epoch + 1;
        if gs.ready.load(Ordering::SeqCst) == tenure {
            return Ok(());
        }
        let c = gs.change.lock().await;
        if gs.ready.load(Ordering::SeqCst) == tenure {
            return Ok(());
        }
        self.refresh_group(gs).await?;
        let rec = gs.rec_snapshot();
        let new = self
            .svc
            .propose_replica_set(gs, &rec, rec.replicas.clone())
            .await?
            .map_err(|why| {
                DataError::Unavailable(format!("taking over extent group {}: {why}", gs.id))
            })?;
        let new_epoch = new.epoch;
        let mut max = 0;
        let mut seqs = Vec::new();
        let mut dead = Vec::new();
        // All replicas at once: each syncs the group and makes the new
        // epoch durable, and a group's first write after a takeover waits
        // for the slowest of them, not their sum.
        let raised = join_all(new.replicas.iter().map(|r| {
            let node = r.node_id;
            async move {
                let res = self.svc.replica_set_epoch(node, gs.id, new_epoch).await;
                (node, res)
            }
        }))
        .await;
        for (node, res) in raised {
            match res {
                Ok((s, digest)) => {
                    max = max.max(s);
                    seqs.push((node, s, digest));
                }
                Err(e) => {
                    tracing::warn!(group = gs.id, node, error = %e,
                        "replica unavailable at takeover");
                    dead.push(node);
                }
            }
        }
        if seqs.is_empty() {
            return Err(DataError::Unavailable(format!(
                "extent group {}: no replica reachable",
                gs.id
            )));
        }
        gs.next_seq.fetch_max(max + 1, Ordering::SeqCst);
        // Equal highest sequences are not enough: replicas get writes in
        // different orders, and a power loss cuts each tail at its own
        // first torn record. Digests compare what each block holds (a
        // version before them reports 0: only sequences count then).
        let digests_differ =
            seqs.iter().all(|(_, _, d)| *d != 0) && seqs.windows(2).any(|w| w[0].2 != w[1].2);
        if seqs.iter().any(|(_, s, _)| *s != max) || digests_differ {
            self.reconcile(gs).await?;
        }
        gs.ready.store(tenure, Ordering::SeqCst);
        drop(c);
        tracing::info!(
            group = gs.id,
            epoch = new_epoch,
            next_sequence = max + 1,
            "took over extent group"
        );
        if !dead.is_empty() {
            self.drop_replicas(gs, &dead).await?;
        }
        Ok(())
    }

    /// Gives every replica the newest version of every block any of them has.
    async fn reconcile(&self, gs: &Arc<GroupState>) -> Result<(), DataError> {
        let rec = gs.rec_snapshot();
        let blocks = group_block_count(&rec);
        let mut views = Vec::new();
        for r in &rec.replicas {
            if let Ok(v) = self
                .svc
                .replica_read(r.node_id, gs.id, 0, blocks, false)
                .await
            {
                views.push((r.node_id, v));
            }
        }
        for b in 0..blocks as usize {
            let Some((_, best)) = views
                .iter()
                .filter_map(|(n, v)| v.blocks.get(b).map(|s| (n, s.sequence, s.mapped, v)))
                .max_by_key(|x| x.1)
                .map(|(n, seq, mapped, v)| (*n, (seq, mapped, v)))
            else {
                continue;
            };
            let (seq, mapped, src) = best;
            for (n, v) in &views {
                if v.blocks.get(b).map(|s| s.sequence) == Some(seq) {
                    continue;
                }
                let data = if mapped {
                    src.data[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE].to_vec()
                } else {
                    Vec::new()
                };
                let req = ReplicaWrite {
                    format_version: cairn_api::FORMAT_VERSION,
                    extent_group_id: gs.id,
                    epoch: rec.epoch,
                    sequence: seq,
                    kind: if mapped {
                        RecordKind::RecordData as i32
                    } else {
                        RecordKind::RecordTrim as i32
                    },
                    first_block: b as u32,
                    block_count: 1,
                    block_crc32c: if mapped {
                        format::block_checksums(&data)
                    } else {
                        Vec::new()
                    },
                    data: data.into(),
                    create: None,
                    copy: true,
                    deferred_sync: false,
                };
                self.svc.replica_write(*n, req).await?;
            }
        }
        tracing::info!(group = gs.id, "replicas reconciled after takeover");
        Ok(())
    }

    /// Reads verified blocks of a group: the local replica first, then the
    /// others; a local copy that failed verification is rewritten from the
    /// good one. Returns the data and which blocks are mapped.
    async fn read_group(
        &self,
        gs: &Arc<GroupState>,
        first: u32,
        count: u32,
        live: bool,
    ) -> Result<(Vec<u8>, Vec<bool>), DataError> {
        self.query_group(gs, first, count, live, false).await
    }

    /// Which blocks of a group are mapped, from the first replica that
    /// answers (every replica in the record is current), without reading
    /// their data: allocation queries come before most large reads.
    async fn group_states(
        &self,
        gs: &Arc<GroupState>,
        first: u32,
        count: u32,
        live: bool,
    ) -> Result<Vec<bool>, DataError> {
        Ok(self.query_group(gs, first, count, live, true).await?.1)
    }

    async fn query_group(
        &self,
        gs: &Arc<GroupState>,
        first: u32,
        count: u32,
        live: bool,
        states_only: bool,
    ) -> Result<(Vec<u8>, Vec<bool>), DataError> {
        if live {
            self.ensure_ready(gs).await?;
        }
        let rec = gs.rec_snapshot();
        let mut order: Vec<u64> = rec.replicas.iter().map(|r| r.node_id).collect();
        order.sort_by_key(|n| *n != self.svc.node_id);
        let mut bad_local: Option<DataError> = None;
        let mut last = None;
        for node in order {
            match self
                .svc
                .replica_read(node, gs.id, first, count, states_only)
                .await
            {
                Ok(reply) => {
                    if let Some(e) = bad_local.take().filter(|_| !states_only) {
                        self.repair_local(gs, first, &reply, &e).await;
                    }
                    self.svc
                        .stats
                        .bytes_read
                        .fetch_add(reply.data.len() as u64, Ordering::Relaxed);
                    let mapped = reply.blocks.iter().map(|b| b.mapped).collect();
                    return Ok((reply.data, mapped));
                }
                Err(e) => {
                    tracing::warn!(group = gs.id, node, error = %e, "replica read failed; trying another replica");
                    if node == self.svc.node_id && e.is_replica_fault() {
                        bad_local = Some(e);
                    } else {
                        last = Some(e);
                    }
                }
            }
        }
        Err(last.or(bad_local).unwrap_or_else(|| {
            DataError::Unavailable(format!("extent group {}: no replica", gs.id))
        }))
    }

    async fn repair_local(
        &self,
        gs: &Arc<GroupState>,
        first: u32,
        good: &ReplicaReadReply,
        why: &DataError,
    ) {
        let epoch = gs.rec_snapshot().epoch;
        let mut repaired = 0u64;
        for (i, st) in good.blocks.iter().enumerate() {
            let data = if st.mapped {
                good.data[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE].to_vec()
            } else {
                continue;
            };
            let req = ReplicaWrite {
                format_version: cairn_api::FORMAT_VERSION,
                extent_group_id: gs.id,
                epoch,
                sequence: st.sequence,
                kind: RecordKind::RecordData as i32,
                first_block: first + i as u32,
                block_count: 1,
                block_crc32c: format::block_checksums(&data),
                data: data.into(),
                create: None,
                copy: true,
                deferred_sync: false,
            };
            match self.svc.pool.write(req).await {
                Ok(_) => repaired += 1,
                Err(e) => {
                    tracing::error!(group = gs.id, error = %e, "cannot rewrite a bad local block");
                    return;
                }
            }
        }
        self.svc
            .stats
            .checksum_repairs
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(group = gs.id, first_block = first, blocks = repaired, cause = %why,
            "checksum mismatch on the local replica; rewrote the blocks from a healthy replica");
    }

    /// Reads a whole group through the repairing read path (the scrubber).
    pub(crate) async fn scrub_repair(
        &self,
        gs: &Arc<GroupState>,
        blocks: u32,
    ) -> Result<(), DataError> {
        self.read_group(gs, 0, blocks, false).await.map(|_| ())
    }

    /// Reads part of one vblock.
    async fn read_piece(&self, p: &Piece) -> Result<Vec<u8>, DataError> {
        let Some(m) = self.resolve(p.vblock)? else {
            return Ok(vec![0u8; p.len as usize]);
        };
        let gs = self.svc.load_group(m.extent_group_id).await?;
        let live = m.vdisk_id == self.rec().id && m.generation == self.rec().generation;
        let first = (p.off / BLOCK_SIZE as u64) as u32;
        let last = (p.off + p.len).div_ceil(BLOCK_SIZE as u64) as u32;
        let (mut data, _) = self.read_group(&gs, first, last - first, live).await?;
        let skip = (p.off - u64::from(first) * BLOCK_SIZE as u64) as usize;
        // Block-aligned pieces (nearly all) are handed on without a copy.
        if skip > 0 {
            data.drain(..skip);
        }
        data.truncate(p.len as usize);
        Ok(data)
    }

    /// Writes part of one vblock (read-modify-write at the block edges).
    async fn write_piece(&self, p: &Piece, buf: Bytes, durable: bool) -> Result<(), DataError> {
        let first = (p.off / BLOCK_SIZE as u64) as u32;
        let last = (p.off + p.len).div_ceil(BLOCK_SIZE as u64) as u32;
        let aligned =
            p.off.is_multiple_of(BLOCK_SIZE as u64) && p.len.is_multiple_of(BLOCK_SIZE as u64);
        let data = if aligned {
            buf
        } else {
            let whole = Piece {
                vblock: p.vblock,
                off: u64::from(first) * BLOCK_SIZE as u64,
                len: u64::from(last - first) * BLOCK_SIZE as u64,
                buf_off: 0,
            };
            let mut d = self.read_piece(&whole).await?;
            let skip = (p.off - whole.off) as usize;
            d[skip..skip + buf.len()].copy_from_slice(&buf);
            Bytes::from(d)
        };
        let gs = self.group_for_write(p.vblock).await?;
        self.replicate(
            &gs,
            RecordKind::RecordData,
            first,
            last - first,
            data,
            durable,
        )
        .await
    }

    async fn unmap_piece(&self, p: &Piece) -> Result<(), DataError> {
        let first = p.off.div_ceil(BLOCK_SIZE as u64);
        let last = (p.off + p.len) / BLOCK_SIZE as u64;
        // Partial blocks at the edges become zeros.
        let head = (first * BLOCK_SIZE as u64).min(p.off + p.len) - p.off;
        if head > 0 {
            let z = Piece {
                vblock: p.vblock,
                off: p.off,
                len: head,
                buf_off: 0,
            };
            self.write_piece(&z, Bytes::from(vec![0u8; head as usize]), false)
                .await?;
        }
        let tail_start = (last * BLOCK_SIZE as u64).max(p.off + head);
        if tail_start < p.off + p.len {
            let n = p.off + p.len - tail_start;
            let z = Piece {
                vblock: p.vblock,
                off: tail_start,
                len: n,
                buf_off: 0,
            };
            self.write_piece(&z, Bytes::from(vec![0u8; n as usize]), false)
                .await?;
        }
        if last <= first {
            return Ok(());
        }
        let Some(m) = self.resolve(p.vblock)? else {
            return Ok(()); // never written: already reads as zeros
        };
        let vd = self.rec();
        let whole = p.off == 0 && p.len == self.vbs();
        if whole && m.vdisk_id == vd.id && m.generation == vd.generation {
            let older = self
                .svc
                .meta
                .vblock_mappings(&vd.id, p.vblock)
                .map_err(meta_err)?
                .iter()
                .any(|x| x.generation < vd.generation);
            if !older && vd.parent_vdisk_id.is_empty() {
                // Nothing else can show through: free the whole group.
                let gs = self.svc.load_group(m.extent_group_id).await?;
                self.svc
                    .meta
                    .propose(Op::DeleteExtentGroup(DeleteExtentGroup { id: gs.id }))
                    .await
                    .map_err(meta_err)?;
                lock(&self.svc.groups).remove(&gs.id);
                lock(&self.dirty).remove(&gs.id);
                for r in gs.rec_snapshot().replicas {
                    if let Err(e) = self.svc.replica_delete(r.node_id, gs.id).await {
                        tracing::warn!(group = gs.id, node = r.node_id, error = %e,
                            "cannot delete a freed replica; the scrubber will");
                    }
                }
                return Ok(());
            }
        }
        let gs = self.group_for_write(p.vblock).await?;
        self.replicate(
            &gs,
            RecordKind::RecordTrim,
            first as u32,
            (last - first) as u32,
            Bytes::new(),
            false,
        )
        .await
    }
}

impl GroupState {
    pub(crate) fn rec_snapshot(&self) -> ExtentGroupRecord {
        read(&self.rec).clone()
    }
    pub(crate) fn set_rec(&self, r: ExtentGroupRecord) {
        *write(&self.rec) = r;
    }
}

#[async_trait]
impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        self.rec().size_bytes
    }

    fn state_era(&self) -> u64 {
        self.rec().owner_epoch
    }

    async fn load_state(&self, key: &str) -> Result<Option<Vec<u8>>, DataError> {
        // No read barrier needed: this node applied the SetVdiskOwner that
        // made it owner, and with it every save of the owners before it
        // (they were fenced by that owner epoch); later saves are its own.
        if !self.owned() {
            return Err(DataError::Unavailable(format!(
                "vdisk {} moved to another node",
                self.rec().id
            )));
        }
        Ok(self.rec().frontend_state.get(key).cloned())
    }

    async fn save_state(&self, key: &str, value: Vec<u8>) -> Result<(), DataError> {
        let rec = self.rec();
        let res = self
            .svc
            .meta
            .propose_raw(Op::SetVdiskFrontendState(SetVdiskFrontendState {
                vdisk_id: rec.id.clone(),
                owner_node_id: self.svc.node_id,
                owner_epoch: rec.owner_epoch,
                key: key.to_string(),
                value,
            }))
            .await
            .map_err(meta_err)?;
        // Applied here before the proposal returns: the local copy has it.
        let still_owner = self.owned();
        if res.error_code.is_empty() {
            return Ok(());
        }
        if res.error_code == meta_codes::CONFLICT.code || !still_owner {
            return Err(DataError::Unavailable(format!(
                "vdisk {}: {}",
                rec.id, res.error_message
            )));
        }
        Err(DataError::Invalid(res.error_message))
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, DataError> {
        self.check(offset, len)?;
        let pieces = self.pieces(offset, len);
        if let [p] = pieces.as_slice() {
            return self.read_piece(p).await;
        }
        let parts = join_all(pieces.iter().map(|p| self.read_piece(p))).await;
        let mut out = Vec::with_capacity(len as usize);
        for p in parts {
            out.extend_from_slice(&p?);
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DataError> {
        self.check(offset, data.len() as u64)?;
        let _shared = self.caw.read().await;
        self.write_locked(offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), DataError> {
        self.sync_dirty().await
    }

    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DataError> {
        self.check(offset, len)?;
        let _shared = self.caw.read().await;
        let pieces = self.pieces(offset, len);
        for r in join_all(pieces.iter().map(|p| self.unmap_piece(p))).await {
            r?;
        }
        Ok(())
    }

    async fn compare_and_write(
        &self,
        offset: u64,
        expected: &[u8],
        data: &[u8],
    ) -> Result<(), DataError> {
        if expected.len() != data.len() {
            return Err(DataError::Invalid(
                "compare and write buffers differ in length".into(),
            ));
        }
        self.check(offset, data.len() as u64)?;
        let _alone = self.caw.write().await;
        let current = self.read(offset, data.len() as u64).await?;
        if let Some(i) = current.iter().zip(expected).position(|(a, b)| a != b) {
            return Err(DataError::Miscompare { offset: i as u64 });
        }
        self.write_locked(offset, Bytes::copy_from_slice(data), true)
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DataError> {
        self.check(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |offset: u64, length: u64, mapped: bool| match out.last_mut() {
            Some(l) if l.mapped == mapped && l.offset + l.length == offset => l.length += length,
            _ => out.push(Extent {
                offset,
                length,
                mapped,
            }),
        };
        for p in self.pieces(offset, len) {
            let base = p.vblock * self.vbs();
            match self.resolve(p.vblock)? {
                None => push(base + p.off, p.len, false),
                Some(m) => {
                    let gs = self.svc.load_group(m.extent_group_id).await?;
                    // A live group's replicas are known only once this
                    // owner has taken it over (as for reads): an older
                    // record may list a copy that missed writes.
                    let live = m.vdisk_id == self.rec().id && m.generation == self.rec().generation;
                    let first = (p.off / BLOCK_SIZE as u64) as u32;
                    let last = (p.off + p.len).div_ceil(BLOCK_SIZE as u64) as u32;
                    let mapped = self.group_states(&gs, first, last - first, live).await?;
                    for (i, m) in mapped.iter().enumerate() {
                        let bstart = base + u64::from(first + i as u32) * BLOCK_SIZE as u64;
                        let s = bstart.max(base + p.off);
                        let e = (bstart + BLOCK_SIZE as u64).min(base + p.off + p.len);
                        push(s, e - s, *m);
                    }
                }
            }
        }
        Ok(out)
    }
}

impl Volume {
    /// The flush: makes every write acknowledged so far durable on every
    /// replica. A replica that cannot sync is dropped from its group like
    /// one that failed a write, as long as another replica synced; when
    /// none did, the flush fails and the groups stay dirty.
    async fn sync_dirty(&self) -> Result<(), DataError> {
        let ids: Vec<u64> = std::mem::take(&mut *lock(&self.dirty))
            .into_iter()
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let mut groups = Vec::with_capacity(ids.len());
        let mut by_node: HashMap<u64, Vec<u64>> = HashMap::new();
        for id in ids {
            let gs = match self.svc.load_group(id).await {
                Ok(g) => g,
                Err(DataError::NotFound(_)) => continue, // freed since: nothing to keep
                Err(e) => {
                    lock(&self.dirty).insert(id);
                    return Err(e);
                }
            };
            for r in gs.rec_snapshot().replicas {
                by_node.entry(r.node_id).or_default().push(id);
            }
            groups.push(gs);
        }
        let results = join_all(by_node.into_iter().map(|(node, ids)| async move {
            let r = self.svc.replica_sync(node, ids.clone()).await;
            (node, ids, r)
        }))
        .await;
        let mut failed: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut errors: HashMap<u64, DataError> = HashMap::new();
        let mut synced: HashSet<u64> = HashSet::new();
        for (node, ids, r) in results {
            match r {
                Ok(()) => synced.extend(ids),
                Err(e) => {
                    tracing::warn!(node, groups = ids.len(), error = %e, "replica cannot sync");
                    for id in ids {
                        failed.entry(id).or_default().push(node);
                    }
                    errors.insert(node, e);
                }
            }
        }
        let mut first_err = None;
        for gs in groups {
            let Some(nodes) = failed.remove(&gs.id) else {
                continue;
            };
            if !synced.contains(&gs.id) {
                lock(&self.dirty).insert(gs.id);
                if first_err.is_none() {
                    first_err = nodes.first().and_then(|n| errors.remove(n));
                }
                continue;
            }
            tracing::warn!(group = gs.id, nodes = ?nodes,
                "dropping replicas that cannot sync from the group");
            self.drop_replicas(&gs, &nodes).await?;
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn write_locked(&self, offset: u64, data: Bytes, durable: bool) -> Result<(), DataError> {
        let pieces = self.pieces(offset, data.len() as u64);
        let results = join_all(pieces.iter().map(|p| {
            let part = data.slice(p.buf_off..p.buf_off + p.len as usize);
            self.write_piece(p, part, durable)
        }))
        .await;
        for r in results {
            r?;
        }
        Ok(())
    }
}

/// A vdisk owned by another node: every call is forwarded to the owner.
pub(crate) struct Forwarded {
    vdisk_id: String,
    size: u64,
    node: u64,
    /// The owner's RPC address (its replica fast path too).
    addr: String,
    svc: std::sync::Weak<DataService>,
    client: cairn_api::data::v1::data_replica_client::DataReplicaClient<tonic::transport::Channel>,
}

impl Forwarded {
    async fn call(
        &self,
        op: vdisk_io::Op,
        offset: u64,
        length: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<Vec<u8>, DataError> {
        self.call_reply(op, offset, length, data, fua)
            .await
            .map(|r| r.data)
    }

    /// Sends a front end's command to the owner; `Ok(None)` when the owner
    /// predates commands (the front end then serves it itself).
    pub(crate) async fn command(
        &self,
        protocol: &str,
        payload: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, DataError> {
        let req = FrontendCommand {
            format_version: cairn_api::FORMAT_VERSION,
            vdisk_id: self.vdisk_id.clone(),
            protocol: protocol.to_string(),
            payload,
        };
        let svc = self.svc.upgrade();
        let res = match self.fast_path(svc.as_deref()).await {
            Some((w, timeout)) if w.speaks_commands() => {
                w.command(&req, timeout).await.map(|r| Some(r.payload))
            }
            _ => {
                let mut c = self.client.clone();
                match c.command(req).await {
                    Ok(r) => Ok(Some(r.into_inner().payload)),
                    Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
                    Err(s) => Err(from_status(&s, self.node)),
                }
            }
        };
        self.forget_on_refusal(res, svc.as_deref())
    }

    /// The owner's replica fast path and the call timeout (`None`: use
    /// gRPC, the owner predates it or the service is stopping).
    async fn fast_path(
        &self,
        svc: Option<&DataService>,
    ) -> Option<(Arc<crate::wire::WireClient>, Duration)> {
        let svc = svc?;
        let w = svc.peers.wire(self.node, &self.addr).await?;
        Some((w, svc.peers.timeout()))
    }

    /// The owner moved, died or refused: look it up again next time.
    fn forget_on_refusal<T>(
        &self,
        res: Result<T, DataError>,
        svc: Option<&DataService>,
    ) -> Result<T, DataError> {
        if let (Err(DataError::Unavailable(_) | DataError::NotFound(_)), Some(svc)) = (&res, svc) {
            lock(&svc.forwarders).remove(&self.vdisk_id);
        }
        res
    }

    /// Sends one call to the owner; forgets the owner when it refuses.
    async fn call_reply(
        &self,
        op: vdisk_io::Op,
        offset: u64,
        length: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<cairn_api::data::v1::VdiskIoReply, DataError> {
        let req = VdiskIo {
            format_version: cairn_api::FORMAT_VERSION,
            vdisk_id: self.vdisk_id.clone(),
            op: op as i32,
            offset,
            length,
            data,
            fua,
            forwarded: true,
            // Our front ends flush: writes may sit in the owner's write-back
            // cache until then.
            cached: true,
        };
        let svc = self.svc.upgrade();
        let res = match self.fast_path(svc.as_deref()).await {
            Some((w, timeout)) => w.forward(&req, timeout).await,
            None => {
                let mut c = self.client.clone();
                c.forward(req)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| from_status(&s, self.node))
            }
        };
        self.forget_on_refusal(res, svc.as_deref())
    }
}

#[async_trait]
impl BlockDevice for Forwarded {
    fn size(&self) -> u64 {
        self.size
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, DataError> {
        self.call(vdisk_io::Op::Read, offset, len, Bytes::new(), false)
            .await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DataError> {
        self.call(vdisk_io::Op::Write, offset, data.len() as u64, data, fua)
            .await
            .map(|_| ())
    }
    async fn flush(&self) -> Result<(), DataError> {
        self.call(vdisk_io::Op::Flush, 0, 0, Bytes::new(), false)
            .await
            .map(|_| ())
    }
    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DataError> {
        self.call(vdisk_io::Op::Unmap, offset, len, Bytes::new(), false)
            .await
            .map(|_| ())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DataError> {
        if unmap {
            return self.unmap(offset, len).await;
        }
        self.call(vdisk_io::Op::WriteZeroes, offset, len, Bytes::new(), false)
            .await
            .map(|_| ())
    }
    async fn compare_and_write(
        &self,
        offset: u64,
        expected: &[u8],
        data: &[u8],
    ) -> Result<(), DataError> {
        if expected.len() != data.len() {
            return Err(DataError::Invalid(
                "compare and write buffers differ in length".into(),
            ));
        }
        // Forwarded whole: the owner's lock makes it atomic.
        let both = Bytes::from([expected, data].concat());
        self.call(
            vdisk_io::Op::CompareAndWrite,
            offset,
            data.len() as u64,
            both,
            true,
        )
        .await
        .map(|_| ())
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DataError> {
        let reply = self
            .call_reply(vdisk_io::Op::BlockStatus, offset, len, Bytes::new(), false)
            .await?;
        Ok(reply
            .extents
            .into_iter()
            .map(|e| Extent {
                offset: e.offset,
                length: e.length,
                mapped: e.mapped,
            })
            .collect())
    }
}
