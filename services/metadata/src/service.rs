//! The gRPC services a node serves to its peers (over mTLS): the raft
//! transport (also reached by the raw raft stream, [`crate::wire`]), node
//! status, and the key-value interface. Malformed requests
//! are refused with a gRPC error and a log line; the connection and every
//! other request carry on.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use cairn_api::metadata::v1::SnapshotFile;
use cairn_api::metadata::v1::{command::Op, PutKv};
use cairn_api::rpc::v1::kv_server::{Kv, KvServer};
use cairn_api::rpc::v1::raft_transport_server::{RaftTransport, RaftTransportServer};
use cairn_api::rpc::v1::SnapshotChunk;
use cairn_api::rpc::v1::{
    KvGetReply, KvGetRequest, KvPutReply, KvPutRequest, NodeStatusReply, NodeStatusRequest,
    RaftAck, RaftBatch,
};
use cairn_util::error_code::HasErrorCode;
use protobuf::Message as _;
use raft::eraftpb::{Message as RaftMessage, MessageType};
use tonic::{Request as TonicRequest, Response as TonicResponse, Status};

use crate::node::Msg;
use crate::snapfile::{ReceiveError, Receiving};
use crate::transport::MAX_RPC_MESSAGE;
use crate::{MetaError, MetadataHandle};

/// Maps a metadata error to a gRPC status carrying its stable code.
pub fn to_status(e: &MetaError) -> Status {
    let code = e.error_code();
    let msg = format!("{}: {e}", code.code);
    match code.http_status {
        404 => Status::not_found(msg),
        409 => Status::already_exists(msg),
        400 | 422 => Status::invalid_argument(msg),
        503 => Status::unavailable(msg),
        _ => Status::internal(msg),
    }
}

struct RaftService {
    handle: MetadataHandle,
    cluster_id: String,
    version: String,
}

/// Why a batch of raft messages was not delivered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    /// The batch itself is wrong: its sender is broken or hostile.
    #[error("{0}")]
    Malformed(String),
    /// This node's driver could not take it.
    #[error(transparent)]
    Driver(MetaError),
}

/// Decodes one batch and hands its messages to the raft driver: all of them
/// or, if one is malformed or addressed to another node, none.
pub(crate) fn deliver(handle: &MetadataHandle, batch: RaftBatch) -> Result<(), Refused> {
    let me = handle.node_id();
    let mut decoded = Vec::with_capacity(batch.messages.len());
    for bytes in &batch.messages {
        let m = RaftMessage::parse_from_bytes(bytes)
            .map_err(|e| Refused::Malformed(format!("malformed raft message: {e}")))?;
        if m.to != me {
            return Err(Refused::Malformed(format!(
                "raft message addressed to node {} arrived at node {me}",
                m.to
            )));
        }
        decoded.push(m);
    }
    handle.learn_peer(batch.from_node, &batch.from_addr);
    for m in decoded {
        handle
            .send(Msg::Raft(Box::new(m)))
            .map_err(Refused::Driver)?;
    }
    Ok(())
}

/// A bad file is the sender's fault; a full disk is this node's.
fn receive_status(e: ReceiveError) -> Status {
    match e {
        ReceiveError::Malformed(m) => Status::invalid_argument(m),
        ReceiveError::Io(m) => Status::unavailable(m),
    }
}

/// The descriptor, index and term of the one snapshot message a snapshot
/// stream starts with.
fn snapshot_file_of(head: &RaftBatch, me: u64) -> Result<(SnapshotFile, u64, u64), Refused> {
    let bad = |m: &str| Refused::Malformed(m.to_string());
    let [bytes] = head.messages.as_slice() else {
        return Err(bad("a snapshot stream carries exactly one raft message"));
    };
    let m = RaftMessage::parse_from_bytes(bytes)
        .map_err(|e| Refused::Malformed(format!("malformed raft message: {e}")))?;
    if m.get_msg_type() != MessageType::MsgSnapshot || m.to != me {
        return Err(bad(
            "a snapshot stream's message must be a snapshot for this node",
        ));
    }
    let snap = m.get_snapshot();
    let data = crate::log::decode_snapshot(snap).map_err(|e| Refused::Malformed(e.to_string()))?;
    let file = data
        .file
        .ok_or_else(|| bad("a snapshot stream's message must describe a file"))?;
    let meta = snap.get_metadata();
    Ok((file, meta.index, meta.term))
}

impl RaftService {
    /// [`deliver`] for the gRPC handlers.
    // tonic handlers return `Status` by value; boxing it here only to unbox it
    // in both callers would buy nothing.
    #[allow(clippy::result_large_err)]
    fn deliver(&self, batch: RaftBatch) -> Result<(), Status> {
        deliver(&self.handle, batch).map_err(|e| match e {
            Refused::Malformed(m) => Status::invalid_argument(m),
            Refused::Driver(e) => to_status(&e),
        })
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn send(
        &self,
        request: TonicRequest<RaftBatch>,
    ) -> Result<TonicResponse<RaftAck>, Status> {
        self.deliver(request.into_inner())?;
        Ok(TonicResponse::new(RaftAck { raft_stream: true }))
    }

    async fn stream(
        &self,
        request: TonicRequest<tonic::Streaming<RaftBatch>>,
    ) -> Result<TonicResponse<RaftAck>, Status> {
        let mut stream = request.into_inner();
        // A malformed batch ends this stream with an error (the peer
        // reconnects); nothing else is disturbed.
        while let Some(batch) = stream.message().await? {
            self.deliver(batch)?;
        }
        Ok(TonicResponse::new(RaftAck { raft_stream: true }))
    }

    async fn install_snapshot(
        &self,
        request: TonicRequest<tonic::Streaming<SnapshotChunk>>,
    ) -> Result<TonicResponse<RaftAck>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let head = first.head.ok_or_else(|| {
            Status::invalid_argument("a snapshot stream must start with its raft message")
        })?;
        let (expect, index, term) = snapshot_file_of(&head, self.handle.node_id())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut file = Receiving::start(self.handle.snap_dir(), expect, index, term)
            .await
            .map_err(|e| to_status(&e))?;
        file.write(&first.data).await.map_err(receive_status)?;
        while let Some(chunk) = stream.message().await? {
            if chunk.head.is_some() {
                return Err(Status::invalid_argument(
                    "a snapshot stream carries one raft message",
                ));
            }
            file.write(&chunk.data).await.map_err(receive_status)?;
        }
        file.finish(self.handle.snap_dir())
            .await
            .map_err(receive_status)?;
        tracing::info!(
            index,
            term,
            from = head.from_node,
            "metadata snapshot file received"
        );
        self.deliver(head)?;
        Ok(TonicResponse::new(RaftAck { raft_stream: true }))
    }

    async fn status(
        &self,
        _: TonicRequest<NodeStatusRequest>,
    ) -> Result<TonicResponse<NodeStatusReply>, Status> {
        let s = self.handle.status().await.map_err(|e| to_status(&e))?;
        Ok(TonicResponse::new(NodeStatusReply {
            node_id: s.node_id,
            leader_id: s.leader_id,
            term: s.term,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            role: s.role,
            version: self.version.clone(),
            cluster_id: self.cluster_id.clone(),
        }))
    }
}

struct KvService {
    handle: MetadataHandle,
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn put(
        &self,
        request: TonicRequest<KvPutRequest>,
    ) -> Result<TonicResponse<KvPutReply>, Status> {
        let r = request.into_inner();
        if r.key.is_empty() {
            return Err(Status::invalid_argument("empty key"));
        }
        self.handle
            .propose(Op::PutKv(PutKv {
                key: r.key,
                value: r.value,
            }))
            .await
            .map_err(|e| to_status(&e))?;
        Ok(TonicResponse::new(KvPutReply { index: 0 }))
    }

    async fn get(
        &self,
        request: TonicRequest<KvGetRequest>,
    ) -> Result<TonicResponse<KvGetReply>, Status> {
        let r = request.into_inner();
        if r.linearizable {
            self.handle
                .read_barrier()
                .await
                .map_err(|e| to_status(&e))?;
        }
        let v = self.handle.kv_get(&r.key).map_err(|e| to_status(&e))?;
        Ok(TonicResponse::new(KvGetReply {
            found: v.is_some(),
            value: v.unwrap_or_default(),
        }))
    }
}

/// Logs every RPC that ended in a gRPC error (malformed input included).
async fn log_rpc_errors(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    if let Some(code) = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
    {
        if code != "0" {
            let message = resp
                .headers()
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            tracing::warn!(rpc = %path, grpc_status = code, message, "RPC refused");
        }
    }
    resp
}

/// The node's RPC router (serve it with `cairn_rpc::serve::serve_tls`, mTLS).
/// The node's RPC router: the metadata services plus whatever `extend` adds
/// (other services' gRPC servers; one router, since routers with fallbacks
/// cannot be merged).
pub fn rpc_router(
    handle: MetadataHandle,
    cluster_id: String,
    version: String,
    extend: impl FnOnce(tonic::service::Routes) -> tonic::service::Routes,
) -> axum::Router {
    let raft = RaftTransportServer::new(RaftService {
        handle: handle.clone(),
        cluster_id,
        version,
    })
    .max_decoding_message_size(MAX_RPC_MESSAGE)
    .max_encoding_message_size(MAX_RPC_MESSAGE);
    let kv = KvServer::new(KvService { handle });
    extend(tonic::service::Routes::new(raft).add_service(kv))
        .into_axum_router()
        .layer(axum::middleware::from_fn(log_rpc_errors))
}
