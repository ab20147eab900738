//! Raft messages to peers: one task and one bounded queue per peer, batching
//! whatever is queued into a single mTLS gRPC call. A slow or partitioned peer
//! only fills its own queue; when it is full, messages are dropped and raft
//! retransmits (raft tolerates loss, not unbounded memory).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_api::rpc::v1::raft_transport_client::RaftTransportClient;
use cairn_api::rpc::v1::{NodeStatusReply, NodeStatusRequest, RaftBatch};
use protobuf::Message as _;
use raft::eraftpb::{Message as RaftMessage, MessageType};
use rustls::ClientConfig;
use tokio::sync::mpsc;
use tokio::sync::mpsc::UnboundedSender;
use tonic::transport::Channel;

use crate::node::Msg;
use crate::MetaError;

const PEER_QUEUE: usize = 4096;
const MAX_BATCH: usize = 512;
/// Largest RPC message: snapshots of the whole state machine travel in one.
pub const MAX_RPC_MESSAGE: usize = 512 << 20;

struct Peer {
    addr: String,
    tx: mpsc::Sender<RaftMessage>,
}

/// Outbound raft transport of one node.
pub struct Transport {
    self_id: u64,
    self_addr: String,
    tls: Arc<ClientConfig>,
    peers: Mutex<HashMap<u64, Peer>>,
    inbox: UnboundedSender<Msg>,
    rt: tokio::runtime::Handle,
}

impl Transport {
    pub(crate) fn new(
        self_id: u64,
        self_addr: String,
        tls: Arc<ClientConfig>,
        inbox: UnboundedSender<Msg>,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Self {
            self_id,
            self_addr,
            tls,
            peers: Mutex::new(HashMap::new()),
            inbox,
            rt,
        }
    }

    fn inbox(&self) -> UnboundedSender<Msg> {
        self.inbox.clone()
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Peer>> {
        cairn_util::sync::lock(&self.peers)
    }

    /// A gRPC channel to `addr` with this node's client certificate.
    pub fn channel(&self, addr: &str, timeout: Option<Duration>) -> Result<Channel, MetaError> {
        // Called from the raft driver too: tonic needs the runtime to build a channel.
        let _rt = self.rt.enter();
        cairn_rpc::dial::mtls_channel(addr, self.tls.clone(), timeout)
            .map_err(|e| MetaError::Rpc(e.to_string()))
    }

    /// Queues messages to their peers; never blocks.
    pub(crate) fn send(&self, msgs: Vec<RaftMessage>) {
        if msgs.is_empty() {
            return;
        }
        let peers = self.peers();
        for m in msgs {
            let to = m.to;
            match peers.get(&to) {
                Some(p) => {
                    if p.tx.try_send(m).is_err() {
                        tracing::debug!(peer = to, "raft queue to peer full; dropping a message");
                        let _ = self.inbox().send(Msg::Unreachable(to));
                    }
                }
                None => tracing::debug!(peer = to, "no address for raft peer; dropping a message"),
            }
        }
    }

    /// Whether `id` has a known address.
    pub(crate) fn knows(&self, id: u64) -> bool {
        self.peers().contains_key(&id)
    }

    /// Sets (or changes) the address of peer `id`.
    pub(crate) fn set_peer(&self, id: u64, addr: &str) {
        if id == self.self_id {
            return;
        }
        let mut peers = self.peers();
        if peers.get(&id).is_some_and(|p| p.addr == addr) {
            return;
        }
        // No channel-wide timeout: the raft stream is one call that lasts
        // (with one, it was cut every 10 s and the peer marked unreachable);
        // peer_loop bounds its unary calls itself.
        let channel = match self.channel(addr, None) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(peer = id, addr, error = %e, "cannot dial raft peer");
                return;
            }
        };
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let client = RaftTransportClient::new(channel)
            .max_decoding_message_size(MAX_RPC_MESSAGE)
            .max_encoding_message_size(MAX_RPC_MESSAGE);
        self.rt.spawn(peer_loop(
            id,
            addr.to_string(),
            rx,
            client,
            self.inbox(),
            self.self_id,
            self.self_addr.clone(),
        ));
        tracing::info!(peer = id, addr, "raft peer address set");
        peers.insert(
            id,
            Peer {
                addr: addr.to_string(),
                tx,
            },
        );
    }

    pub(crate) fn remove_peer(&self, id: u64) {
        if self.peers().remove(&id).is_some() {
            tracing::info!(peer = id, "raft peer removed");
        }
    }

    /// Asks the node at `addr` for its raft status.
    pub async fn peer_status(&self, addr: &str) -> Result<NodeStatusReply, MetaError> {
        let mut client =
            RaftTransportClient::new(self.channel(addr, Some(Duration::from_secs(3)))?);
        client
            .status(NodeStatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| MetaError::Rpc(format!("{addr}: {}", s.message())))
    }
}

/// Bound on one unary raft call (a batch, or a snapshot being installed).
const RAFT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The task driving a peer's raft stream; it ends when the stream does.
type StreamCall =
    tokio::task::JoinHandle<Result<tonic::Response<cairn_api::rpc::v1::RaftAck>, tonic::Status>>;

async fn peer_loop(
    id: u64,
    addr: String,
    mut rx: mpsc::Receiver<RaftMessage>,
    mut client: RaftTransportClient<Channel>,
    inbox: UnboundedSender<Msg>,
    from_node: u64,
    from_addr: String,
) {
    let mut last_warn: Option<Instant> = None;
    let mut warn = |what: &str, err: &str| {
        if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            tracing::warn!(peer = id, addr = %addr, error = %err, "{what}");
            last_warn = Some(Instant::now());
        }
    };
    // The open stream to the peer: its sender and the call driving it.
    let mut stream: Option<(mpsc::Sender<RaftBatch>, StreamCall)> = None;
    let mut streaming_supported = true;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let snapshots: Vec<u64> = batch
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .map(|m| m.to)
            .collect();
        let mut messages = Vec::with_capacity(batch.len());
        for m in &batch {
            match m.write_to_bytes() {
                Ok(b) => messages.push(b),
                Err(e) => tracing::error!(peer = id, error = %e, "cannot encode raft message"),
            }
        }
        let req = RaftBatch {
            format_version: cairn_api::FORMAT_VERSION,
            from_node,
            messages,
            from_addr: from_addr.clone(),
        };

        // Ordinary messages ride the stream; snapshots (and peers without
        // Stream) use a call whose answer says the batch arrived.
        if snapshots.is_empty() && streaming_supported {
            if let Some((_, call)) = &stream {
                if call.is_finished() {
                    if let Some((_, call)) = stream.take() {
                        match call.await {
                            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                                tracing::info!(
                                    peer = id,
                                    "peer has no raft stream; using one call per batch"
                                );
                                streaming_supported = false;
                            }
                            Ok(Err(s)) => {
                                warn("raft stream to peer ended (peer unreachable?)", s.message())
                            }
                            _ => {}
                        }
                    }
                    let _ = inbox.send(Msg::Unreachable(id));
                }
            }
            if streaming_supported {
                if stream.is_none() {
                    let (tx, brx) = mpsc::channel::<RaftBatch>(256);
                    let body = futures::stream::unfold(brx, |mut r| async move {
                        r.recv().await.map(|b| (b, r))
                    });
                    let mut c = client.clone();
                    let call = tokio::spawn(async move { c.stream(body).await });
                    stream = Some((tx, call));
                }
                if let Some((tx, _)) = &stream {
                    if tx.try_send(req).is_err() {
                        // Full or closed: drop this batch (raft resends) and reopen.
                        stream = None;
                        let _ = inbox.send(Msg::Unreachable(id));
                    }
                }
                continue;
            }
        }
        let sent = match tokio::time::timeout(RAFT_CALL_TIMEOUT, client.send(req)).await {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded("raft call timed out")),
        };
        match sent {
            Ok(_) => {
                for to in snapshots {
                    let _ = inbox.send(Msg::SnapshotDone { to, ok: true });
                }
            }
            Err(status) => {
                warn(
                    "raft messages to peer dropped (peer unreachable?)",
                    status.message(),
                );
                let _ = inbox.send(Msg::Unreachable(id));
                for to in snapshots {
                    let _ = inbox.send(Msg::SnapshotDone { to, ok: false });
                }
                // Drop what queued up meanwhile: raft resends what still matters.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while rx.try_recv().is_ok() {}
            }
        }
    }
}
