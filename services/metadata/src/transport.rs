//! Raft messages to peers: one task and one bounded queue per peer, batching
//! whatever is queued into one frame of the raft stream ([`crate::wire`]),
//! or into one message of a gRPC stream for a peer without it; snapshots
//! and oversized messages go by gRPC call. A slow or partitioned peer only
//! fills its own queue; when it is full, messages are dropped and raft
//! retransmits (raft tolerates loss, not unbounded memory).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_api::rpc::v1::raft_transport_client::RaftTransportClient;
use cairn_api::rpc::v1::{NodeStatusReply, NodeStatusRequest, RaftBatch, SnapshotChunk};
use cairn_rpc::dial::ClientStream;
use cairn_rpc::frame::send_frame;
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{Message as RaftMessage, MessageType};
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, WriteHalf};
use tokio::sync::mpsc;
use tokio::sync::mpsc::UnboundedSender;
use tonic::transport::Channel;

use crate::node::Msg;
use crate::snapfile::SnapDir;
use crate::wire;
use crate::MetaError;

const PEER_QUEUE: usize = 4096;
const MAX_BATCH: usize = 512;
/// Largest RPC message: snapshots of the whole state machine travel in one.
pub const MAX_RPC_MESSAGE: usize = 512 << 20;

struct Peer {
    addr: String,
    tx: mpsc::Sender<RaftMessage>,
    /// Set by [`Transport::reconnect`]: the next batch opens a new link.
    reset: Arc<std::sync::atomic::AtomicBool>,
}

/// Outbound raft transport of one node.
pub struct Transport {
    self_id: u64,
    self_addr: String,
    tls: Arc<ClientConfig>,
    snap_dir: SnapDir,
    peers: Mutex<HashMap<u64, Peer>>,
    inbox: UnboundedSender<Msg>,
    rt: tokio::runtime::Handle,
}

impl Transport {
    pub(crate) fn new(
        self_id: u64,
        self_addr: String,
        tls: Arc<ClientConfig>,
        snap_dir: SnapDir,
        inbox: UnboundedSender<Msg>,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Self {
            self_id,
            self_addr,
            tls,
            snap_dir,
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
        let reset = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let client = RaftTransportClient::new(channel)
            .max_decoding_message_size(MAX_RPC_MESSAGE)
            .max_encoding_message_size(MAX_RPC_MESSAGE);
        self.rt.spawn(peer_loop(
            id,
            addr.to_string(),
            rx,
            client,
            self.tls.clone(),
            self.snap_dir.clone(),
            self.inbox(),
            self.self_id,
            self.self_addr.clone(),
            reset.clone(),
        ));
        tracing::info!(peer = id, addr, "raft peer address set");
        peers.insert(
            id,
            Peer {
                addr: addr.to_string(),
                tx,
                reset,
            },
        );
    }

    /// Makes the next batch to `id` go on a new connection. For a peer
    /// the driver has not heard from for a while: after a partition heals,
    /// the old connection's unacknowledged data waits for TCP's backed-off
    /// retransmission (seconds, up to two minutes after a long cut) while
    /// the peer, hearing no leader, keeps campaigning.
    pub(crate) fn reconnect(&self, id: u64) {
        if let Some(p) = self.peers().get(&id) {
            p.reset.store(true, std::sync::atomic::Ordering::Release);
        }
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
/// Bound on connecting to a peer's raft stream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on writing one frame: a peer that stops reading (or a partition
/// that swallows packets) gets a new connection instead of a stuck one.
const FRAME_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a peer that answered without the raft stream and without the
/// gRPC stream (one call per batch) is taken at its word before it is
/// asked again. A restart of the peer (an upgrade) fails a call and asks
/// at once; this catches one that came back between two batches.
const REPROBE_AFTER: Duration = Duration::from_secs(60);
/// How often a snapshot that keeps failing to reach a peer is logged as a
/// warning (raft asks again after each failure).
const SNAPSHOT_WARN_EVERY: Duration = Duration::from_secs(60);

/// The task driving a peer's gRPC raft stream; it ends when the stream does.
type StreamCall =
    tokio::task::JoinHandle<Result<tonic::Response<cairn_api::rpc::v1::RaftAck>, tonic::Status>>;

/// A connection carrying the raft stream ([`crate::wire`]) to a peer.
struct RawLink {
    wr: WriteHalf<ClientStream>,
    /// Reads the (silent) other direction, so a peer that closed the
    /// connection is noticed before the next frame is lost in it.
    watch: tokio::task::JoinHandle<()>,
}

impl Drop for RawLink {
    fn drop(&mut self) {
        // The watcher holds the read half: the connection closes with it.
        self.watch.abort();
    }
}

/// How ordinary messages to a peer travel.
enum Link {
    /// Not connected: the next batch connects, trying the raft stream first.
    Down,
    Raw(RawLink),
    /// A peer without the raft stream (an older version): a gRPC stream.
    Grpc(mpsc::Sender<RaftBatch>, StreamCall),
}

/// What a peer (an older version) said it does not serve; forgotten when
/// it may have been upgraded since.
#[derive(Default)]
struct Refused {
    /// The last connection was answered without the raft stream; asked
    /// again whenever its gRPC stream ends.
    raw: bool,
    /// Since when it refused the gRPC stream too: every batch goes by
    /// one call.
    grpc_stream: Option<Instant>,
}

impl Refused {
    fn any(&self) -> bool {
        self.raw || self.grpc_stream.is_some()
    }
}

/// The batch that carries `messages` from this node, whichever way it goes.
fn raft_batch(from_node: u64, from_addr: &str, messages: Vec<Vec<u8>>) -> RaftBatch {
    RaftBatch {
        format_version: cairn_api::FORMAT_VERSION,
        from_node,
        messages,
        from_addr: from_addr.to_string(),
    }
}

/// Splits encoded messages into raft stream frames of at most
/// [`wire::FRAME_FILL`] bytes of messages each (at least one message).
fn frames(messages: Vec<Vec<u8>>, from_node: u64, from_addr: &str) -> Vec<bytes::Bytes> {
    let mut out = Vec::new();
    let mut chunk: Vec<Vec<u8>> = Vec::new();
    let mut fill = 0;
    let mut flush = |chunk: &mut Vec<Vec<u8>>| {
        out.push(wire::encode_frame(&raft_batch(
            from_node,
            from_addr,
            std::mem::take(chunk),
        )))
    };
    for m in messages {
        if !chunk.is_empty() && fill + m.len() > wire::FRAME_FILL {
            flush(&mut chunk);
            fill = 0;
        }
        fill += m.len();
        chunk.push(m);
    }
    if !chunk.is_empty() {
        flush(&mut chunk);
    }
    out
}

// One task per peer owns everything about reaching it; splitting its state
// into a struct would only move these arguments.
#[allow(clippy::too_many_arguments)]
async fn peer_loop(
    id: u64,
    addr: String,
    mut rx: mpsc::Receiver<RaftMessage>,
    mut client: RaftTransportClient<Channel>,
    tls: Arc<ClientConfig>,
    snap_dir: SnapDir,
    inbox: UnboundedSender<Msg>,
    from_node: u64,
    from_addr: String,
    reset: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut last_warn: Option<Instant> = None;
    let mut warn = |what: &str, err: &str| {
        if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            tracing::warn!(peer = id, addr = %addr, error = %err, "{what}");
            last_warn = Some(Instant::now());
        }
    };
    let mut link = Link::Down;
    let mut refused = Refused::default();
    let snap_warned: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        // Snapshots go on their own, beside the ordinary messages: a large
        // one takes a while, and heartbeats must keep flowing meanwhile.
        let (snapshots, batch): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|m| m.get_msg_type() == MessageType::MsgSnapshot);
        for snap in snapshots {
            let (client, dir, inbox) = (client.clone(), snap_dir.clone(), inbox.clone());
            let (from_addr, snap_warned) = (from_addr.clone(), snap_warned.clone());
            tokio::spawn(async move {
                let to = snap.to;
                let sent = send_snapshot(client, snap, &dir, from_node, &from_addr).await;
                if let Err(e) = &sent {
                    // Raft asks again after each failure: one line a minute
                    // says it as well as one per attempt.
                    let mut last = cairn_util::sync::lock(&snap_warned);
                    if last.is_none_or(|t| t.elapsed() > SNAPSHOT_WARN_EVERY) {
                        tracing::warn!(peer = to, error = %e, "metadata snapshot not sent");
                        *last = Some(Instant::now());
                    } else {
                        tracing::debug!(peer = to, error = %e, "metadata snapshot not sent");
                    }
                    drop(last);
                    let _ = inbox.send(Msg::Unreachable(to));
                }
                let _ = inbox.send(Msg::SnapshotDone {
                    to,
                    ok: sent.is_ok(),
                });
            });
        }
        if batch.is_empty() {
            continue;
        }
        let mut messages = Vec::with_capacity(batch.len());
        for m in &batch {
            match m.write_to_bytes() {
                Ok(b) => messages.push(b),
                Err(e) => tracing::error!(peer = id, error = %e, "cannot encode raft message"),
            }
        }
        let oversized = messages.iter().any(|m| m.len() > wire::MAX_STREAM_MESSAGE);
        if reset.swap(false, std::sync::atomic::Ordering::AcqRel) {
            match std::mem::replace(&mut link, Link::Down) {
                Link::Raw(raw) => raw.watch.abort(),
                Link::Grpc(_, call) => call.abort(),
                Link::Down => {}
            }
            refused.raw = false;
        }

        // Ordinary messages ride a stream; oversized messages (and peers
        // without any stream) use a call.
        if refused
            .grpc_stream
            .is_some_and(|t| t.elapsed() > REPROBE_AFTER)
        {
            // The peer may have been upgraded since it last said no.
            refused = Refused::default();
        }
        if !oversized {
            match &link {
                Link::Raw(raw) if raw.watch.is_finished() => link = Link::Down,
                Link::Grpc(_, call) if call.is_finished() => {
                    if let Link::Grpc(_, call) = std::mem::replace(&mut link, Link::Down) {
                        match call.await {
                            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                                tracing::info!(
                                    peer = id,
                                    "peer has no raft stream; using one call per batch"
                                );
                                refused.grpc_stream = Some(Instant::now());
                            }
                            Ok(Err(s)) => {
                                warn("raft stream to peer ended (peer unreachable?)", s.message())
                            }
                            _ => {}
                        }
                    }
                    refused.raw = false;
                    let _ = inbox.send(Msg::Unreachable(id));
                }
                _ => {}
            }
            if matches!(link, Link::Down) && !refused.raw {
                match cairn_rpc::dial::connect_alpn(&addr, &tls, wire::ALPNS, CONNECT_TIMEOUT).await
                {
                    Ok(Some(stream)) => {
                        let (mut rd, wr) = tokio::io::split(stream);
                        let watch = tokio::spawn(async move {
                            let mut buf = [0u8; 64];
                            // The receiver never writes: anything, or the
                            // end, means the connection is over.
                            let _ = rd.read(&mut buf).await;
                        });
                        link = Link::Raw(RawLink { wr, watch });
                    }
                    Ok(None) => {
                        tracing::info!(peer = id, "peer has no raft stream; using gRPC");
                        refused.raw = true;
                    }
                    Err(e) => {
                        warn("cannot connect to raft peer", &e.to_string());
                        let _ = inbox.send(Msg::Unreachable(id));
                        // Drop what queued up meanwhile: raft resends what still matters.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        while rx.try_recv().is_ok() {}
                        continue;
                    }
                }
            }
            if matches!(link, Link::Down) && refused.grpc_stream.is_none() {
                let (tx, brx) = mpsc::channel::<RaftBatch>(256);
                let body =
                    futures::stream::unfold(
                        brx,
                        |mut r| async move { r.recv().await.map(|b| (b, r)) },
                    );
                let mut c = client.clone();
                let call = tokio::spawn(async move { c.stream(body).await });
                link = Link::Grpc(tx, call);
            }
            match &mut link {
                Link::Raw(raw) => {
                    for frame in frames(messages, from_node, &from_addr) {
                        let sent = tokio::time::timeout(
                            FRAME_WRITE_TIMEOUT,
                            send_frame(&mut raw.wr, &frame),
                        )
                        .await;
                        let err = match sent {
                            Ok(Ok(())) => continue,
                            Ok(Err(e)) => e.to_string(),
                            Err(_) => "writing a frame timed out".to_string(),
                        };
                        warn("raft stream to peer broke (peer unreachable?)", &err);
                        link = Link::Down;
                        let _ = inbox.send(Msg::Unreachable(id));
                        break;
                    }
                    continue;
                }
                Link::Grpc(tx, _) => {
                    if tx
                        .try_send(raft_batch(from_node, &from_addr, messages))
                        .is_err()
                    {
                        // Full or closed: drop this batch (raft resends) and reopen.
                        link = Link::Down;
                        let _ = inbox.send(Msg::Unreachable(id));
                    }
                    continue;
                }
                Link::Down => {}
            }
        }
        let req = raft_batch(from_node, &from_addr, messages);
        let sent = match tokio::time::timeout(RAFT_CALL_TIMEOUT, client.send(req)).await {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded("raft call timed out")),
        };
        match sent {
            Ok(ack) => {
                if ack.into_inner().raft_stream && refused.any() {
                    // Upgraded since it said no (restarted between two
                    // batches, so no call failed).
                    tracing::info!(peer = id, "peer now offers the raft stream");
                    refused = Refused::default();
                }
            }
            Err(status) => {
                warn(
                    "raft messages to peer dropped (peer unreachable?)",
                    status.message(),
                );
                let _ = inbox.send(Msg::Unreachable(id));
                // It may be restarting as a newer version: the next batch
                // asks for the streams again.
                refused = Refused::default();
                // Drop what queued up meanwhile: raft resends what still matters.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while rx.try_recv().is_ok() {}
            }
        }
    }
}

/// Bytes of a snapshot file per stream message.
const SNAPSHOT_CHUNK: usize = 1 << 20;

/// Sends one snapshot and returns once the peer has it (or not). One that
/// names a file goes by `InstallSnapshot`: the message, then the file. A
/// peer without that call (an older version) gets the state inline by
/// `Send`, as long as it fits one message.
async fn send_snapshot(
    mut client: RaftTransportClient<Channel>,
    mut msg: RaftMessage,
    dir: &SnapDir,
    from_node: u64,
    from_addr: &str,
) -> Result<(), String> {
    let data = crate::log::decode_snapshot(msg.get_snapshot()).map_err(|e| e.to_string())?;
    let meta = msg.get_snapshot().get_metadata();
    let (index, term) = (meta.index, meta.term);
    if data.file.is_some() {
        let path = dir.sent(index, term);
        // Opened before anything is sent: a newer build may remove the
        // name, never the open file.
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let head = raft_batch(
            from_node,
            from_addr,
            vec![msg.write_to_bytes().map_err(|e| e.to_string())?],
        );
        match stream_file(client.clone(), head, file).await {
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                let limit = MAX_RPC_MESSAGE - (1 << 20);
                if data.file.as_ref().is_some_and(|f| f.bytes > limit as u64) {
                    // Refused before reading: the inline message would be
                    // about as large as the file, and raft asks again soon.
                    return Err(format!(
                        "the metadata snapshot at index {index} is larger than the {limit} \
                         bytes an older node takes in one message; upgrade that node to let \
                         it catch up"
                    ));
                }
                tracing::info!(
                    peer = msg.to,
                    "peer has no InstallSnapshot (an older version); sending the state inline"
                );
                let inline = tokio::task::spawn_blocking(move || {
                    crate::snapfile::read_inline(&path, index, term, limit)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
                msg.mut_snapshot().set_data(inline.encode_to_vec().into());
            }
            Err(s) => return Err(s.message().to_string()),
            Ok(()) => return Ok(()),
        }
    }
    let req = raft_batch(
        from_node,
        from_addr,
        vec![msg.write_to_bytes().map_err(|e| e.to_string())?],
    );
    match tokio::time::timeout(RAFT_CALL_TIMEOUT, client.send(req)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err("sending the snapshot timed out".into()),
    }
}

/// `InstallSnapshot`: `head`, then the file in chunks. Each chunk must be
/// taken within [`RAFT_CALL_TIMEOUT`], and the answer must come within it
/// after the last one; no bound on the whole, which grows with the state.
async fn stream_file(
    mut client: RaftTransportClient<Channel>,
    head: RaftBatch,
    mut file: tokio::fs::File,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
    let body = futures::stream::unfold(rx, |mut r| async move { r.recv().await.map(|c| (c, r)) });
    let call = tokio::spawn(async move { client.install_snapshot(body).await });
    let mut chunk = SnapshotChunk {
        format_version: cairn_api::FORMAT_VERSION,
        head: Some(head),
        data: Vec::new(),
    };
    let fed: Result<(), String> = async {
        loop {
            let mut buf = vec![0u8; SNAPSHOT_CHUNK];
            let mut n = 0;
            while n < buf.len() {
                let got = file.read(&mut buf[n..]).await.map_err(|e| e.to_string())?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            buf.truncate(n);
            let last = n < SNAPSHOT_CHUNK;
            chunk.data = buf;
            match tokio::time::timeout(RAFT_CALL_TIMEOUT, tx.send(std::mem::take(&mut chunk))).await
            {
                Ok(Ok(())) => {}
                // The call ended early: its answer says why.
                Ok(Err(_)) => return Ok(()),
                Err(_) => return Err("the peer stopped taking the snapshot file".into()),
            }
            if last {
                return Ok(());
            }
        }
    }
    .await;
    drop(tx);
    if let Err(e) = fed {
        call.abort();
        return Err(tonic::Status::unavailable(e));
    }
    match tokio::time::timeout(RAFT_CALL_TIMEOUT, call).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err(s))) => Err(s),
        Ok(Err(e)) => Err(tonic::Status::internal(e.to_string())),
        Err(_) => Err(tonic::Status::deadline_exceeded(
            "no answer after the snapshot file was sent",
        )),
    }
}

#[cfg(test)]
mod tests {
    //! Both ways a peer is reached, over real mTLS on loopback: the raft
    //! stream when the peer offers it, the gRPC stream when it does not (a
    //! node of an older version), and a snapshot by unary call either way.

    use super::*;
    use cairn_api::rpc::v1::raft_transport_server::{RaftTransport, RaftTransportServer};
    use cairn_api::rpc::v1::RaftAck;
    use cairn_rpc::serve::{RawProtocol, ServerStream};
    use std::future::Future;
    use std::net::SocketAddr;
    use std::pin::Pin;

    type Seen = Arc<Mutex<Vec<RaftBatch>>>;
    /// Snapshot streams that arrived: the head and the file's bytes.
    type Installed = Arc<Mutex<Vec<(RaftBatch, Vec<u8>)>>>;

    /// A peer's gRPC service: records what arrives, and how. Without
    /// `knows_install` it is an older version's.
    #[derive(Default, Clone)]
    struct Grpc {
        streamed: Seen,
        called: Seen,
        knows_install: bool,
        /// An older version still: no gRPC stream either (one call per batch).
        no_stream: bool,
        /// Says in its answers that it serves the raft stream.
        offers_raw: bool,
        installed: Installed,
    }

    #[tonic::async_trait]
    impl RaftTransport for Grpc {
        async fn send(
            &self,
            r: tonic::Request<RaftBatch>,
        ) -> Result<tonic::Response<RaftAck>, tonic::Status> {
            self.called.lock().unwrap().push(r.into_inner());
            Ok(tonic::Response::new(RaftAck {
                raft_stream: self.offers_raw,
            }))
        }
        async fn stream(
            &self,
            r: tonic::Request<tonic::Streaming<RaftBatch>>,
        ) -> Result<tonic::Response<RaftAck>, tonic::Status> {
            if self.no_stream {
                return Err(tonic::Status::unimplemented("an older version"));
            }
            let mut s = r.into_inner();
            while let Some(b) = s.message().await? {
                self.streamed.lock().unwrap().push(b);
            }
            Ok(tonic::Response::new(RaftAck::default()))
        }
        async fn install_snapshot(
            &self,
            r: tonic::Request<tonic::Streaming<SnapshotChunk>>,
        ) -> Result<tonic::Response<RaftAck>, tonic::Status> {
            if !self.knows_install {
                return Err(tonic::Status::unimplemented("an older version"));
            }
            let mut s = r.into_inner();
            let mut head = None;
            let mut data = Vec::new();
            while let Some(c) = s.message().await? {
                head = head.or(c.head);
                data.extend_from_slice(&c.data);
            }
            self.installed.lock().unwrap().push((head.unwrap(), data));
            Ok(tonic::Response::new(RaftAck::default()))
        }
        async fn status(
            &self,
            _: tonic::Request<NodeStatusRequest>,
        ) -> Result<tonic::Response<NodeStatusReply>, tonic::Status> {
            Err(tonic::Status::unimplemented("not in this test"))
        }
    }

    struct RawSink(Seen);

    impl RawProtocol for RawSink {
        fn alpns(&self) -> &'static [&'static [u8]] {
            wire::ALPNS
        }
        fn serve(
            &self,
            stream: ServerStream,
            peer: SocketAddr,
        ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
            let seen = self.0.clone();
            Box::pin(wire::serve_conn(stream, peer, move |b| {
                seen.lock().unwrap().push(b);
                Ok(())
            }))
        }
    }

    fn message(t: MessageType) -> RaftMessage {
        let mut m = RaftMessage::default();
        m.set_msg_type(t);
        m.from = 1;
        m.to = 2;
        m.term = 7;
        m
    }

    /// The types of the messages that arrived, in order.
    fn types(seen: &Seen) -> Vec<MessageType> {
        seen.lock()
            .unwrap()
            .iter()
            .flat_map(|b| b.messages.clone())
            .map(|m| RaftMessage::parse_from_bytes(&m).unwrap().get_msg_type())
            .collect()
    }

    /// Waits (at most 5 s) until `n` messages arrived.
    async fn wait_for(seen: &Seen, n: usize) -> Vec<MessageType> {
        for _ in 0..500 {
            if types(seen).len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        types(seen)
    }

    /// Node 2's and node 1's certificates, from one cluster CA.
    fn identities() -> (cairn_rpc::pki::NodeIdentity, cairn_rpc::pki::NodeIdentity) {
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        let ca = cairn_rpc::pki::ClusterCa::generate("transport-test").unwrap();
        (
            ca.issue_node(2, &[ip]).unwrap(),
            ca.issue_node(1, &[ip]).unwrap(),
        )
    }

    /// Serves node 2's gRPC service, plus the raft stream if `raw`, on
    /// `listener`, on the current runtime, for as long as that runtime runs.
    fn serve_peer<S: RaftTransport>(
        grpc: S,
        raw: Option<Seen>,
        listener: tokio::net::TcpListener,
        id: &cairn_rpc::pki::NodeIdentity,
    ) {
        let mut tls = (*cairn_rpc::tls::server_config(id, true).unwrap()).clone();
        let mut raws: Vec<Arc<dyn RawProtocol>> = Vec::new();
        if let Some(seen) = raw {
            tls.alpn_protocols
                .extend(wire::ALPNS.iter().map(|a| a.to_vec()));
            raws.push(Arc::new(RawSink(seen)));
        }
        let router = tonic::service::Routes::new(RaftTransportServer::new(grpc)).into_axum_router();
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        // The listener lives as long as the runtime.
        std::mem::forget(stop_tx);
        tokio::spawn(cairn_rpc::serve::serve_tls_with(
            listener,
            Arc::new(tls),
            router,
            raws,
            "test",
            stop,
        ));
    }

    /// Node 1's transport, pointed at node 2 at `addr`.
    fn sender(
        id: &cairn_rpc::pki::NodeIdentity,
        addr: &str,
        snap_dir: SnapDir,
    ) -> (Transport, tokio::sync::mpsc::UnboundedReceiver<Msg>) {
        let (inbox, rx) = tokio::sync::mpsc::unbounded_channel();
        let t = Transport::new(
            1,
            "127.0.0.1:1".into(),
            cairn_rpc::tls::mtls_client_config(id).unwrap(),
            snap_dir,
            inbox,
            tokio::runtime::Handle::current(),
        );
        t.set_peer(2, addr);
        (t, rx)
    }

    /// Node 2 serving the gRPC service, plus the raft stream if `raw`;
    /// returns a transport of node 1 pointed at it.
    async fn peer_and_sender<S: RaftTransport>(
        grpc: S,
        raw: Option<Seen>,
        snap_dir: SnapDir,
    ) -> (Transport, tokio::sync::mpsc::UnboundedReceiver<Msg>) {
        let (server_id, client_id) = identities();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        serve_peer(grpc, raw, listener, &server_id);
        sender(&client_id, &addr, snap_dir)
    }

    async fn snapshot_done(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Msg>) -> bool {
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Some(m)) = tokio::time::timeout_at(until, rx.recv()).await {
            if let Msg::SnapshotDone { to: 2, ok } = m {
                return ok;
            }
        }
        false
    }

    #[tokio::test]
    async fn a_peer_offering_the_raft_stream_gets_frames_on_it() {
        let grpc = Grpc::default();
        let raw: Seen = Arc::default();
        let (t, mut rx) = peer_and_sender(grpc.clone(), Some(raw.clone()), scratch_dir()).await;
        t.send(vec![message(MessageType::MsgHeartbeat)]);
        t.send(vec![message(MessageType::MsgAppend)]);
        assert_eq!(
            wait_for(&raw, 2).await,
            vec![MessageType::MsgHeartbeat, MessageType::MsgAppend]
        );
        assert_eq!(raw.lock().unwrap()[0].from_node, 1);
        assert!(types(&grpc.streamed).is_empty(), "nothing by gRPC stream");

        t.send(vec![message(MessageType::MsgSnapshot)]);
        assert!(snapshot_done(&mut rx).await, "a snapshot goes by call");
        assert_eq!(types(&grpc.called), vec![MessageType::MsgSnapshot]);
    }

    #[tokio::test]
    async fn a_peer_without_the_raft_stream_gets_the_grpc_stream() {
        let grpc = Grpc::default();
        let (t, mut rx) = peer_and_sender(grpc.clone(), None, scratch_dir()).await;
        t.send(vec![message(MessageType::MsgHeartbeat)]);
        t.send(vec![message(MessageType::MsgAppend)]);
        assert_eq!(
            wait_for(&grpc.streamed, 2).await,
            vec![MessageType::MsgHeartbeat, MessageType::MsgAppend],
            "an older peer must still get raft messages, in order"
        );

        t.send(vec![message(MessageType::MsgSnapshot)]);
        assert!(snapshot_done(&mut rx).await, "a snapshot goes by call");
        assert_eq!(types(&grpc.called), vec![MessageType::MsgSnapshot]);
    }

    #[tokio::test]
    async fn a_peer_upgraded_from_one_call_per_batch_gets_the_raft_stream() {
        // Node 2 first runs a version with neither stream, on a runtime of
        // its own: shutting that runtime down is its process ending.
        let (server_id, client_id) = identities();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let old = Grpc {
            no_stream: true,
            ..Default::default()
        };
        let old_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        {
            let _in = old_rt.enter();
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            serve_peer(old.clone(), None, listener, &server_id);
        }
        let (t, _rx) = sender(&client_id, &addr.to_string(), scratch_dir());
        // Raft resends heartbeats; the first batches find out what the
        // peer speaks (the one on the refused gRPC stream is lost).
        let beat_until = |seen: Seen| {
            let t = &t;
            async move {
                for _ in 0..200 {
                    if !types(&seen).is_empty() {
                        return true;
                    }
                    t.send(vec![message(MessageType::MsgHeartbeat)]);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                false
            }
        };
        assert!(beat_until(old.called.clone()).await, "one call per batch");
        assert!(types(&old.streamed).is_empty());

        // Upgraded: the same address now offers the raft stream.
        old_rt.shutdown_background();
        let mut listener = None;
        for _ in 0..100 {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        // Whether a call fails while it restarts or the first call reaches
        // the new version (which says it serves the stream), the next
        // batch asks again.
        let raw: Seen = Arc::default();
        serve_peer(
            Grpc {
                offers_raw: true,
                ..Default::default()
            },
            Some(raw.clone()),
            listener.expect("the old peer's port comes free"),
            &server_id,
        );
        assert!(
            beat_until(raw.clone()).await,
            "the restarted peer must be asked for the raft stream again"
        );
    }

    /// A snapshot folder for tests that send no file.
    fn scratch_dir() -> SnapDir {
        let dir = tempfile::tempdir().unwrap().keep();
        SnapDir::beside(&dir.join("metadata")).unwrap()
    }

    /// A leader's state of `n` pairs and the raft message of its snapshot
    /// file to node 2; returns the message, the file's bytes and its folder.
    fn file_snapshot(n: u64) -> (RaftMessage, Vec<u8>, SnapDir) {
        let dir = tempfile::tempdir().unwrap().keep();
        let engine = crate::engine::Engine::open(&dir.join("metadata")).unwrap();
        crate::snapfile::fill_test_state(&engine, n, 200, (500, 4));
        let sd = SnapDir::beside(engine.path()).unwrap();
        let cs = raft::eraftpb::ConfState {
            voters: vec![1, 2],
            ..Default::default()
        };
        let snap = crate::snapfile::build(&engine, &sd, (0, 0), &cs).unwrap();
        let mut m = message(MessageType::MsgSnapshot);
        m.set_snapshot(snap);
        let bytes = std::fs::read(sd.sent(500, 4)).unwrap();
        (m, bytes, sd)
    }

    #[tokio::test]
    async fn a_snapshot_file_streams_after_its_message() {
        let grpc = Grpc {
            knows_install: true,
            ..Default::default()
        };
        let (m, bytes, sd) = file_snapshot(20_000);
        assert!(
            bytes.len() > 3 * SNAPSHOT_CHUNK,
            "several chunks: {}",
            bytes.len()
        );
        let (t, mut rx) = peer_and_sender(grpc.clone(), None, sd).await;
        t.send(vec![m, message(MessageType::MsgHeartbeat)]);
        assert!(snapshot_done(&mut rx).await, "the peer took it");
        let installed = grpc.installed.lock().unwrap().clone();
        assert_eq!(installed.len(), 1);
        let (head, data) = &installed[0];
        assert_eq!(
            types(&Arc::new(Mutex::new(vec![head.clone()]))),
            vec![MessageType::MsgSnapshot]
        );
        assert!(data == &bytes, "the file arrives whole");
        assert!(types(&grpc.called).is_empty(), "nothing inline");
        assert_eq!(
            wait_for(&grpc.streamed, 1).await,
            vec![MessageType::MsgHeartbeat],
            "the other messages of the batch go their usual way"
        );
    }

    #[tokio::test]
    async fn an_older_peer_gets_the_snapshot_inline() {
        let grpc = Grpc::default();
        let (m, _, sd) = file_snapshot(5_000);
        let (t, mut rx) = peer_and_sender(grpc.clone(), None, sd).await;
        t.send(vec![m]);
        assert!(snapshot_done(&mut rx).await, "the peer took it");
        let called = grpc.called.lock().unwrap().clone();
        assert_eq!(called.len(), 1);
        let msg = RaftMessage::parse_from_bytes(&called[0].messages[0]).unwrap();
        let data = crate::log::decode_snapshot(msg.get_snapshot()).unwrap();
        assert!(data.file.is_none(), "an older node does not know files");
        assert_eq!(data.entries.len(), 5_000);
        assert_eq!(
            (data.applied_index, msg.get_snapshot().get_metadata().index),
            (500, 500)
        );
    }

    #[tokio::test]
    async fn an_older_peer_is_refused_a_state_too_large_for_one_message_without_reading_it() {
        let grpc = Grpc::default();
        let (mut m, _, sd) = file_snapshot(100);
        // The descriptor says what the file holds: past one message, the
        // file is not read into memory only to be refused.
        let mut data = crate::log::decode_snapshot(m.get_snapshot()).unwrap();
        if let Some(f) = data.file.as_mut() {
            f.bytes = MAX_RPC_MESSAGE as u64;
        }
        m.mut_snapshot().set_data(data.encode_to_vec().into());
        let (t, mut rx) = peer_and_sender(grpc.clone(), None, sd).await;
        t.send(vec![m]);
        assert!(!snapshot_done(&mut rx).await, "raft hears it failed");
        assert!(
            grpc.called.lock().unwrap().is_empty(),
            "nothing sent inline"
        );
    }

    #[tokio::test]
    async fn a_snapshot_whose_file_is_gone_is_reported_failed() {
        let grpc = Grpc {
            knows_install: true,
            ..Default::default()
        };
        let (m, _, sd) = file_snapshot(10);
        std::fs::remove_file(sd.sent(500, 4)).unwrap();
        let (t, mut rx) = peer_and_sender(grpc.clone(), None, sd).await;
        t.send(vec![m]);
        assert!(!snapshot_done(&mut rx).await, "raft hears it failed");
        assert!(grpc.installed.lock().unwrap().is_empty());
    }

    /// Peer side of the measurement below: takes the file the way the
    /// node's service does (`snapfile::Receiving`), without raft.
    #[derive(Clone)]
    struct FileSink(SnapDir);

    #[tonic::async_trait]
    impl RaftTransport for FileSink {
        async fn send(
            &self,
            _: tonic::Request<RaftBatch>,
        ) -> Result<tonic::Response<RaftAck>, tonic::Status> {
            Err(tonic::Status::internal("the state must not come inline"))
        }
        async fn stream(
            &self,
            r: tonic::Request<tonic::Streaming<RaftBatch>>,
        ) -> Result<tonic::Response<RaftAck>, tonic::Status> {
            let mut s = r.into_inner();
            while s.message().await?.is_some() {}
            Ok(tonic::Response::new(RaftAck::default()))
        }
        async fn install_snapshot(
            &self,
            r: tonic::Request<tonic::Streaming<SnapshotChunk>>,
        ) -> Result<tonic::Response<RaftAck>, tonic::Status> {
            let mut s = r.into_inner();
            let first = s.message().await?.unwrap();
            let m = RaftMessage::parse_from_bytes(&first.head.unwrap().messages[0]).unwrap();
            let desc = crate::log::decode_snapshot(m.get_snapshot())
                .unwrap()
                .file
                .unwrap();
            let meta = m.get_snapshot().get_metadata();
            let mut f = crate::snapfile::Receiving::start(&self.0, desc, meta.index, meta.term)
                .await
                .unwrap();
            f.write(&first.data).await.unwrap();
            while let Some(c) = s.message().await? {
                f.write(&c.data).await.unwrap();
            }
            f.finish(&self.0)
                .await
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
            Ok(tonic::Response::new(RaftAck::default()))
        }
        async fn status(
            &self,
            _: tonic::Request<NodeStatusRequest>,
        ) -> Result<tonic::Response<NodeStatusReply>, tonic::Status> {
            Err(tonic::Status::unimplemented("not in this test"))
        }
    }

    fn peak_rss_mib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            / 1024
    }

    /// A state larger than the largest RPC message goes from a leader's
    /// engine to a follower's: built, streamed over mTLS, installed. Prints
    /// the times and the process's peak memory. By hand (writes ~2.5 GiB):
    /// `CAIRN_SNAPSHOT_MIB=640 cargo test -p cairn-metadata --lib -- --ignored --nocapture
    /// a_state_larger_than_one_rpc_message`
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement: writes gigabytes"]
    async fn a_state_larger_than_one_rpc_message_streams_and_installs() {
        use crate::engine::{Engine, CF_STATE};
        let mib: u64 = std::env::var("CAIRN_SNAPSHOT_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(640);
        let root =
            tempfile::tempdir_in(std::env::var("CAIRN_SNAPSHOT_DIR").unwrap_or("/tmp".into()))
                .unwrap();
        let leader = Engine::open(&root.path().join("l/metadata")).unwrap();
        let n = mib * (1 << 20) / 216;
        let t = Instant::now();
        crate::snapfile::fill_test_state(&leader, n, 200, (900, 5));
        leader.flush().unwrap();
        eprintln!(
            "filled {n} pairs ({mib} MiB of keys and values) in {:?}; peak RSS {} MiB",
            t.elapsed(),
            peak_rss_mib()
        );

        let ld = SnapDir::beside(leader.path()).unwrap();
        let cs = raft::eraftpb::ConfState {
            voters: vec![1, 2],
            ..Default::default()
        };
        let t = Instant::now();
        let snap = crate::snapfile::build(&leader, &ld, (0, 0), &cs).unwrap();
        let desc = crate::log::decode_snapshot(&snap).unwrap().file.unwrap();
        eprintln!(
            "built: {} MiB file, {} keys, in {:?}; peak RSS {} MiB",
            desc.bytes >> 20,
            desc.keys,
            t.elapsed(),
            peak_rss_mib()
        );
        assert!(
            desc.bytes > MAX_RPC_MESSAGE as u64,
            "larger than one RPC message"
        );

        let follower = Engine::open(&root.path().join("f/metadata")).unwrap();
        let fd = SnapDir::beside(follower.path()).unwrap();
        let (tr, mut rx) = peer_and_sender(FileSink(fd.clone()), None, ld).await;
        let mut m = message(MessageType::MsgSnapshot);
        m.set_snapshot(snap);
        let t = Instant::now();
        tr.send(vec![m]);
        let ok = loop {
            match rx.recv().await {
                Some(Msg::SnapshotDone { ok, .. }) => break ok,
                Some(_) => {}
                None => break false,
            }
        };
        assert!(ok, "the peer took the file");
        eprintln!(
            "streamed over mTLS in {:?}; peak RSS {} MiB",
            t.elapsed(),
            peak_rss_mib()
        );

        let t = Instant::now();
        let keys = crate::snapfile::install_state(&follower, &fd, 900, 5, &cs).unwrap();
        eprintln!(
            "installed {keys} keys in {:?}; peak RSS {} MiB",
            t.elapsed(),
            peak_rss_mib()
        );
        assert_eq!(keys, n);
        let probe = format!("v/{:012}", n - 1);
        assert_eq!(
            follower.get(CF_STATE, probe.as_bytes()).unwrap(),
            Some(vec![((n - 1) % 251) as u8; 200])
        );
    }
}
