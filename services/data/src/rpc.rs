//! The data service on the wire: the `DataReplica` gRPC server every node
//! runs (replica operations for remote primaries, and forwarded vdisk I/O),
//! the client side with its error mapping, and the cache of peer channels.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_api::data::v1::data_replica_client::DataReplicaClient;
use cairn_api::data::v1::data_replica_server::{DataReplica, DataReplicaServer};
use cairn_api::data::v1::{
    vdisk_io, FrontendCommand, FrontendReply, ReplicaDelete, ReplicaDeleteReply, ReplicaEpochReply,
    ReplicaListReply, ReplicaListRequest, ReplicaRead, ReplicaReadReply, ReplicaSetEpoch,
    ReplicaSync, ReplicaSyncReply, ReplicaWrite, ReplicaWriteReply, VdiskIo, VdiskIoReply,
};
use rustls::ClientConfig;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::frontend::BlockService;
use crate::pool::LocalPool;
use crate::wire::WireClient;
use crate::DataError;

/// Largest data RPC: a whole extent group in one copy.
pub const MAX_DATA_MESSAGE: usize = 64 << 20;

/// Maps an error to a status whose code the client maps back.
pub fn to_status(e: &DataError) -> Status {
    let code = match e {
        DataError::StaleEpoch { .. } => Code::FailedPrecondition,
        DataError::NotFound(_) => Code::NotFound,
        DataError::Checksum { .. } | DataError::Corrupt { .. } => Code::DataLoss,
        DataError::NoSpace { .. } => Code::ResourceExhausted,
        DataError::Invalid(_) => Code::InvalidArgument,
        DataError::Miscompare { .. } => Code::Aborted,
        DataError::Io { .. } => Code::Internal,
        DataError::Unavailable(_) => Code::Unavailable,
    };
    Status::new(code, e.to_string())
}

/// Maps a status from a peer back to an error (`peer` names it in messages).
pub fn from_status(s: &Status, peer: u64) -> DataError {
    let msg = format!("node {peer}: {}", s.message());
    match s.code() {
        Code::FailedPrecondition => DataError::StaleEpoch {
            group: 0,
            got: 0,
            have: 0,
        },
        Code::NotFound => DataError::NotFound(msg),
        Code::DataLoss => DataError::Corrupt {
            path: format!("node {peer}").into(),
            reason: s.message().to_string(),
        },
        Code::ResourceExhausted => DataError::NoSpace {
            path: format!("node {peer}").into(),
        },
        Code::InvalidArgument => DataError::Invalid(msg),
        Code::Aborted => DataError::Miscompare {
            offset: s
                .message()
                .rsplit(' ')
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or(0),
        },
        _ => DataError::Unavailable(msg),
    }
}

/// The server side of `DataReplica`.
pub struct ReplicaServer {
    pool: Arc<LocalPool>,
    frontend: Arc<dyn BlockService>,
}

/// The data service's gRPC server, to add to the node's RPC routes.
pub fn service(
    pool: Arc<LocalPool>,
    frontend: Arc<dyn BlockService>,
) -> DataReplicaServer<ReplicaServer> {
    DataReplicaServer::new(ReplicaServer { pool, frontend })
        .max_decoding_message_size(MAX_DATA_MESSAGE)
        .max_encoding_message_size(MAX_DATA_MESSAGE)
}

fn logged(op: &'static str, e: DataError) -> Status {
    match &e {
        DataError::StaleEpoch { .. } | DataError::NotFound(_) | DataError::Miscompare { .. } => {
            tracing::debug!(op, error = %e, "replica request refused")
        }
        _ => tracing::warn!(op, error = %e, "replica request failed"),
    }
    to_status(&e)
}

#[tonic::async_trait]
impl DataReplica for ReplicaServer {
    async fn ping(
        &self,
        _: Request<cairn_api::data::v1::PingRequest>,
    ) -> Result<Response<cairn_api::data::v1::PingReply>, Status> {
        Ok(Response::new(cairn_api::data::v1::PingReply { node_id: 0 }))
    }
    async fn write(&self, r: Request<ReplicaWrite>) -> Result<Response<ReplicaWriteReply>, Status> {
        self.pool
            .write(r.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| logged("write", e))
    }
    async fn read(&self, r: Request<ReplicaRead>) -> Result<Response<ReplicaReadReply>, Status> {
        self.pool
            .read(r.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| logged("read", e))
    }
    async fn set_epoch(
        &self,
        r: Request<ReplicaSetEpoch>,
    ) -> Result<Response<ReplicaEpochReply>, Status> {
        let r = r.into_inner();
        self.pool
            .set_epoch(r.extent_group_id, r.epoch)
            .await
            .map(Response::new)
            .map_err(|e| logged("set_epoch", e))
    }
    async fn delete(
        &self,
        r: Request<ReplicaDelete>,
    ) -> Result<Response<ReplicaDeleteReply>, Status> {
        self.pool
            .delete(r.into_inner().extent_group_id)
            .await
            .map(|_| Response::new(ReplicaDeleteReply {}))
            .map_err(|e| logged("delete", e))
    }
    async fn sync(&self, r: Request<ReplicaSync>) -> Result<Response<ReplicaSyncReply>, Status> {
        self.pool
            .sync(&r.into_inner().extent_group_ids)
            .await
            .map(|_| Response::new(ReplicaSyncReply {}))
            .map_err(|e| logged("sync", e))
    }
    async fn list(
        &self,
        _: Request<ReplicaListRequest>,
    ) -> Result<Response<ReplicaListReply>, Status> {
        Ok(Response::new(self.pool.list()))
    }
    async fn forward(&self, r: Request<VdiskIo>) -> Result<Response<VdiskIoReply>, Status> {
        serve_forward(self.frontend.as_ref(), r.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(&e))
    }
    async fn command(
        &self,
        r: Request<FrontendCommand>,
    ) -> Result<Response<FrontendReply>, Status> {
        serve_command(self.frontend.as_ref(), r.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(&e))
    }
}

/// Serves one front end's command for a vdisk this node owns (gRPC
/// `Command` and the fast path).
pub(crate) async fn serve_command(
    frontend: &dyn BlockService,
    r: FrontendCommand,
) -> Result<FrontendReply, DataError> {
    frontend
        .serve_command(&r.vdisk_id, &r.protocol, r.payload)
        .await
        .map(|payload| FrontendReply { payload })
}

/// Serves one forwarded front-end call (gRPC `Forward` and the fast path).
pub(crate) async fn serve_forward(
    frontend: &dyn BlockService,
    r: VdiskIo,
) -> Result<VdiskIoReply, DataError> {
    let dev = if r.forwarded {
        frontend.open_owned(&r.vdisk_id).await
    } else {
        frontend.open(&r.vdisk_id).await
    }?;
    let op = vdisk_io::Op::try_from(r.op)
        .map_err(|_| DataError::Invalid(format!("unknown vdisk I/O op {}", r.op)))?;
    let res = match op {
        vdisk_io::Op::Read => dev.read(r.offset, r.length).await.map(|data| VdiskIoReply {
            data,
            extents: Vec::new(),
        }),
        // A sender that predates `cached` promised its clients
        // durable writes: without the field, every write is FUA.
        vdisk_io::Op::Write => dev
            .write(r.offset, r.data.clone(), r.fua || !r.cached)
            .await
            .map(|_| VdiskIoReply::default()),
        vdisk_io::Op::Flush => dev.flush().await.map(|_| VdiskIoReply::default()),
        vdisk_io::Op::Unmap | vdisk_io::Op::WriteZeroes => {
            let done = if op == vdisk_io::Op::Unmap {
                dev.unmap(r.offset, r.length).await
            } else {
                dev.write_zeroes(r.offset, r.length, false).await
            };
            match done {
                Ok(()) if !r.cached => dev.flush().await,
                other => other,
            }
            .map(|_| VdiskIoReply::default())
        }
        vdisk_io::Op::BlockStatus => {
            dev.block_status(r.offset, r.length)
                .await
                .map(|ex| VdiskIoReply {
                    data: Vec::new(),
                    extents: ex
                        .into_iter()
                        .map(|e| cairn_api::data::v1::ExtentRun {
                            offset: e.offset,
                            length: e.length,
                            mapped: e.mapped,
                        })
                        .collect(),
                })
        }
        vdisk_io::Op::CompareAndWrite => {
            if !r.data.len().is_multiple_of(2) {
                return Err(DataError::Invalid("compare and write halves differ".into()));
            }
            let (expected, data) = r.data.split_at(r.data.len() / 2);
            dev.compare_and_write(r.offset, expected, data)
                .await
                .map(|_| VdiskIoReply::default())
        }
    };
    res
}

/// Channels to peer nodes' data services, by node id, and which peers
/// looked down lately (placement avoids them for a while).
pub struct Peers {
    tls: Arc<ClientConfig>,
    timeout: Duration,
    clients: Mutex<HashMap<(u64, String), DataReplicaClient<Channel>>>,
    down: Mutex<HashMap<u64, Instant>>,
    wire: Mutex<HashMap<u64, Wire>>,
    /// Nodes the liveness monitor found silent ([`crate::repair::DEAD_AFTER`]):
    /// calls to them fail at once instead of each waiting out its timeout.
    dead: Mutex<HashSet<u64>>,
}

/// What we know of a peer's replica fast path.
enum Wire {
    Up(String, Arc<WireClient>),
    /// It does not speak it (an older version): gRPC until this time.
    Unsupported(Instant),
    /// Connecting failed: gRPC until this time (it gives the real error).
    Failed(Instant),
}

/// How long a peer without the fast path is not asked again.
const WIRE_RECHECK: Duration = Duration::from_secs(60);
/// How long after a failed fast-path connect calls go by gRPC.
const WIRE_RETRY: Duration = Duration::from_secs(1);

/// How long a peer that failed with a transport error is avoided for placement.
pub const DOWN_FOR: Duration = Duration::from_secs(15);

impl Peers {
    pub fn new(tls: Arc<ClientConfig>, timeout: Duration) -> Self {
        Self {
            tls,
            timeout,
            clients: Mutex::new(HashMap::new()),
            down: Mutex::new(HashMap::new()),
            wire: Mutex::new(HashMap::new()),
            dead: Mutex::new(HashSet::new()),
        }
    }

    /// The request timeout of replica calls.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The fast-path connection to node `id` at `addr`, connecting if
    /// needed; `None` when calls should use gRPC instead.
    pub async fn wire(&self, id: u64, addr: &str) -> Option<Arc<WireClient>> {
        {
            let m = cairn_util::sync::lock(&self.wire);
            match m.get(&id) {
                Some(Wire::Up(a, c)) if a == addr && !c.is_dead() => return Some(c.clone()),
                Some(Wire::Unsupported(until)) | Some(Wire::Failed(until))
                    if Instant::now() < *until =>
                {
                    return None
                }
                _ => {}
            }
        }
        let state = match WireClient::connect(id, addr, &self.tls, Duration::from_secs(2)).await {
            Ok(Some(c)) => Wire::Up(addr.to_string(), c),
            Ok(None) => {
                tracing::info!(node = id, addr, "peer has no replica fast path; using gRPC");
                Wire::Unsupported(Instant::now() + WIRE_RECHECK)
            }
            Err(e) => {
                tracing::debug!(node = id, error = %e, "replica fast path unavailable");
                Wire::Failed(Instant::now() + WIRE_RETRY)
            }
        };
        let c = match &state {
            Wire::Up(_, c) => Some(c.clone()),
            _ => None,
        };
        cairn_util::sync::lock(&self.wire).insert(id, state);
        c
    }

    /// The liveness monitor's verdict on node `id`. A node found dead has
    /// its fast-path calls in flight failed now: without that, a write to
    /// each extent group with a replica there waited out its own timeout
    /// (10 s) before dropping it, one group after another, for as long as
    /// writes met groups that still listed the node.
    pub fn set_dead(&self, id: u64, dead: bool) {
        if !dead {
            if cairn_util::sync::lock(&self.dead).remove(&id) {
                tracing::info!(node = id, "node answers pings again");
            }
            return;
        }
        if !cairn_util::sync::lock(&self.dead).insert(id) {
            return;
        }
        tracing::warn!(
            node = id,
            "node does not answer pings; calls to it fail at once until it does"
        );
        let wire = cairn_util::sync::lock(&self.wire).remove(&id);
        if let Some(Wire::Up(_, c)) = wire {
            c.fail_all();
        }
    }

    /// An error when the liveness monitor found node `id` dead.
    pub fn check_alive(&self, id: u64) -> Result<(), DataError> {
        if cairn_util::sync::lock(&self.dead).contains(&id) {
            return Err(DataError::Unavailable(format!(
                "node {id} does not answer pings"
            )));
        }
        Ok(())
    }

    fn down(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        cairn_util::sync::lock(&self.down)
    }

    /// Records the outcome of a call to `id`.
    pub fn observe<T>(&self, id: u64, r: &Result<T, DataError>) {
        match r {
            Err(DataError::Unavailable(_)) => {
                self.down().insert(id, Instant::now());
            }
            Ok(_) => {
                self.down().remove(&id);
            }
            Err(_) => {}
        }
    }

    /// Whether `id` cannot be reached now: its last call failed for that,
    /// or the liveness monitor found it dead.
    pub fn unreachable(&self, id: u64) -> bool {
        self.down().contains_key(&id) || cairn_util::sync::lock(&self.dead).contains(&id)
    }

    /// Whether `id` answered the last call (or failed long enough ago to retry).
    pub fn is_up(&self, id: u64) -> bool {
        self.down().get(&id).is_none_or(|t| t.elapsed() > DOWN_FOR)
    }

    /// A client for node `id` at `addr` (cached; reconnects by itself).
    pub fn client(&self, id: u64, addr: &str) -> Result<DataReplicaClient<Channel>, DataError> {
        let mut m = cairn_util::sync::lock(&self.clients);
        if let Some(c) = m.get(&(id, addr.to_string())) {
            return Ok(c.clone());
        }
        let ch = cairn_rpc::dial::mtls_channel(addr, self.tls.clone(), Some(self.timeout))
            .map_err(|e| DataError::Unavailable(format!("node {id} at {addr}: {e}")))?;
        let c = DataReplicaClient::new(ch)
            .max_decoding_message_size(MAX_DATA_MESSAGE)
            .max_encoding_message_size(MAX_DATA_MESSAGE);
        m.insert((id, addr.to_string()), c.clone());
        Ok(c)
    }
}
