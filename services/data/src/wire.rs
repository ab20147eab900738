//! The replica fast path: replica writes and reads between nodes over one
//! mutually authenticated TLS connection per peer, chosen by ALPN
//! ([`ALPN`]) on the node's RPC port, beside the `DataReplica` gRPC service.
//!
//! Why: a gRPC call crosses about six tasks (tower buffer, hyper dispatch,
//! the h2 connection, a task per stream, and back); on a 2-core VM a 4 KiB
//! replica write took ~350 µs round trip that way, which made every RF2
//! write four times slower than RF1. Here a request is written straight to
//! the socket by its caller, and a page-cache write is applied by the
//! connection's reader as it arrives, which also sends its answer once no
//! further request is waiting (several answers per send under load).
//!
//! Frames, both ways: `u32` big-endian length of the rest, `u8` kind, `u64`
//! big-endian request id, then a protobuf message. Requests: [`KIND_WRITE`]
//! (`ReplicaWrite`), [`KIND_READ`] (`ReplicaRead`), [`KIND_FORWARD`]
//! (`VdiskIo`, front-end I/O a non-owner passes to the owner) and, from
//! version 2, [`KIND_COMMAND`] (`FrontendCommand`, a front end's protocol
//! command for the owner). Answers: [`KIND_OK`] with the reply message, or
//! [`KIND_ERR`] with a `WireError`. Bodies are the versioned messages of
//! `cairn.data.v1`; the ALPN id versions the framing and the kinds
//! ([`ALPNS`]): a client learns from the handshake what the peer
//! understands. A version 2 server answers a request kind it does not know
//! with an UNIMPLEMENTED error (a version 1 server drops the connection, so
//! clients never send it one). A peer that predates the protocol refuses
//! the ALPN ids and callers use gRPC. A malformed frame or message drops
//! the connection, logged; other connections are not disturbed.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cairn_api::data::v1::{
    FrontendCommand, FrontendReply, ReplicaRead, ReplicaReadReply, ReplicaWrite, ReplicaWriteReply,
    VdiskIo, VdiskIoReply, WireError,
};
use cairn_rpc::frame::{send_parts, FrameError};
use cairn_rpc::serve::{RawProtocol, ServerStream};
use cairn_util::sync::lock;
use prost::Message;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::frontend::BlockService;
use crate::pool::LocalPool;
use crate::rpc::{from_status, serve_command, serve_forward, to_status, MAX_DATA_MESSAGE};
use crate::DataError;

/// Version 1: writes, reads and forwarded I/O.
pub const ALPN_V1: &[u8] = b"cairn-replica/1";
/// Version 2: adds [`KIND_COMMAND`], and unknown request kinds get an error
/// answer instead of a dropped connection.
pub const ALPN_V2: &[u8] = b"cairn-replica/2";
/// The versions this build speaks, newest first (the order the RPC
/// listener offers them in, and the client asks for them).
pub const ALPNS: &[&[u8]] = &[ALPN_V2, ALPN_V1];
pub const KIND_WRITE: u8 = 1;
pub const KIND_READ: u8 = 2;
pub const KIND_FORWARD: u8 = 3;
pub const KIND_COMMAND: u8 = 4;
pub const KIND_OK: u8 = 0x80;
pub const KIND_ERR: u8 = 0x81;
/// The field number of `ReplicaWrite.data` (see [`Outbox::put`]); a test
/// checks it against the generated code.
const REPLICA_WRITE_DATA_FIELD: u32 = 8;
/// Kind and request id, after the length.
const HEAD: usize = 1 + 8;
/// The largest frame accepted: a whole extent group's data and its header.
const MAX_FRAME: usize = MAX_DATA_MESSAGE + (1 << 20);

/// Reads one frame of this protocol: kind, request id, body.
async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R) -> Result<(u8, u64, Bytes), FrameError> {
    let mut buf = cairn_rpc::frame::read_frame(rd, HEAD..=MAX_FRAME).await?;
    let kind = buf[0];
    let id = u64::from_be_bytes([
        buf[1], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7], buf[8],
    ]);
    Ok((kind, id, buf.split_off(HEAD)))
}

fn frame(kind: u8, id: u64, body: &impl Message) -> Vec<u8> {
    let mut out = Vec::new();
    put_frame(&mut out, kind, id, body);
    out
}

/// Appends a frame to `out`.
fn put_frame(out: &mut Vec<u8>, kind: u8, id: u64, body: &impl Message) {
    put_frame_head(out, kind, id, body, 0);
}

/// Appends a frame whose body is `body` followed by `tail` more bytes the
/// caller writes next.
fn put_frame_head(out: &mut Vec<u8>, kind: u8, id: u64, body: &impl Message, tail: usize) {
    let n = HEAD + body.encoded_len() + tail;
    out.reserve(4 + n - tail);
    out.extend_from_slice(&(n as u32).to_be_bytes());
    out.push(kind);
    out.extend_from_slice(&id.to_be_bytes());
    // A Vec grows as needed: encoding into it cannot fail.
    let _ = body.encode(out);
}

/// A bytes field at least this large leaves as the caller's shared buffer
/// instead of being copied into the frame.
const SHARE_FROM: usize = 16 << 10;

/// Frames waiting for the socket: small ones gathered in one buffer (one
/// TLS write carries many), large payloads as the callers' own buffers.
#[derive(Default)]
struct Outbox {
    parts: Vec<Bytes>,
    small: Vec<u8>,
}

impl Outbox {
    /// Queues a frame whose message is `body` with the bytes field
    /// `field` = `data` added at its end. Protobuf fields may come in any
    /// order, so the peer decodes exactly what encoding the whole message
    /// would have sent; the data itself is not copied.
    fn put(&mut self, kind: u8, id: u64, body: &impl Message, field: u32, data: &Bytes) {
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
        if data.is_empty() {
            put_frame(&mut self.small, kind, id, body);
            return;
        }
        let tail = key_len(field) + encoded_len_varint(data.len() as u64) + data.len();
        put_frame_head(&mut self.small, kind, id, body, tail);
        encode_key(field, WireType::LengthDelimited, &mut self.small);
        encode_varint(data.len() as u64, &mut self.small);
        if data.len() < SHARE_FROM {
            self.small.extend_from_slice(data);
        } else {
            self.parts
                .push(Bytes::from(std::mem::take(&mut self.small)));
            self.parts.push(data.clone());
        }
    }

    /// Queues a whole frame: a small one into the shared buffer, a large
    /// one (read data) as its own part rather than copied.
    fn push_frame(&mut self, frame: Vec<u8>) {
        if frame.len() < BATCH_BYTES {
            self.small.extend_from_slice(&frame);
        } else {
            if !self.small.is_empty() {
                self.parts
                    .push(Bytes::from(std::mem::take(&mut self.small)));
            }
            self.parts.push(Bytes::from(frame));
        }
    }

    fn is_empty(&self) -> bool {
        self.parts.is_empty() && self.small.is_empty()
    }

    /// Everything queued, in order.
    fn take(&mut self) -> Vec<Bytes> {
        if !self.small.is_empty() {
            self.parts
                .push(Bytes::from(std::mem::take(&mut self.small)));
        }
        std::mem::take(&mut self.parts)
    }
}

/// Answers smaller than this are gathered into one buffer; a larger one
/// (read data) is sent from its own rather than copied.
const BATCH_BYTES: usize = 64 << 10;

// ---- server ----------------------------------------------------------------

/// Serves the fast path on the RPC listener (see
/// [`cairn_rpc::serve::serve_tls_with`]).
pub struct WireServer {
    pool: Arc<LocalPool>,
    frontend: Arc<dyn BlockService>,
}

impl WireServer {
    pub fn new(pool: Arc<LocalPool>, frontend: Arc<dyn BlockService>) -> Arc<Self> {
        Arc::new(Self { pool, frontend })
    }
}

impl RawProtocol for WireServer {
    fn alpns(&self) -> &'static [&'static [u8]] {
        ALPNS
    }
    fn serve(
        &self,
        stream: ServerStream,
        peer: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        Box::pin(serve_conn(
            self.pool.clone(),
            self.frontend.clone(),
            stream,
            peer,
        ))
    }
}

/// The answering side of a connection, shared by the reader and the tasks
/// it spawned. An answer is queued, then sent by whoever finds the socket
/// free, together with everything queued behind it: no task hand-off on
/// the way out (a writer task was one more wakeup per replica write, which
/// at queue depth 1 is most of its cost on a 2-core VM), and under load one
/// TLS record and one syscall still carry many answers. Each answer carries
/// its request's in-flight permit, released once the answer has left (see
/// [`MAX_IN_FLIGHT`]).
#[derive(Clone)]
struct Writer(Arc<WriterShared>);

struct WriterShared {
    queue: Mutex<Answers>,
    socket: tokio::sync::Mutex<Pin<Box<dyn AsyncWrite + Send>>>,
    /// An answer could not leave: the connection was shut down.
    dead: AtomicBool,
    peer: SocketAddr,
}

/// Answers waiting for the socket, and the permits they release.
#[derive(Default)]
struct Answers {
    out: Outbox,
    permits: Vec<OwnedSemaphorePermit>,
}

impl Writer {
    fn new(socket: impl AsyncWrite + Send + 'static, peer: SocketAddr) -> Self {
        Self(Arc::new(WriterShared {
            queue: Mutex::new(Answers::default()),
            socket: tokio::sync::Mutex::new(Box::pin(socket)),
            dead: AtomicBool::new(false),
            peer,
        }))
    }

    /// Queues one answer frame and sends what is queued unless another
    /// task is sending (it then sends this one too); false when the
    /// connection is gone.
    async fn queue(&self, frame: Vec<u8>, permit: OwnedSemaphorePermit) -> bool {
        self.push(frame, permit) && self.flush().await
    }

    /// Queues one answer frame without sending it: the reader, which sends
    /// once no further request is waiting (see [`serve_conn`]).
    fn push(&self, frame: Vec<u8>, permit: OwnedSemaphorePermit) -> bool {
        let me = &self.0;
        if me.dead.load(Ordering::Acquire) {
            return false;
        }
        let mut q = lock(&me.queue);
        q.out.push_frame(frame);
        q.permits.push(permit);
        true
    }

    /// Sends what is queued unless another task is sending (it then sends
    /// all of it); false when the connection is gone.
    async fn flush(&self) -> bool {
        let me = &self.0;
        loop {
            let Ok(mut socket) = me.socket.try_lock() else {
                // The sender re-checks the queue after letting go.
                return !me.dead.load(Ordering::Acquire);
            };
            loop {
                let (parts, permits) = {
                    let mut q = lock(&me.queue);
                    (q.out.take(), std::mem::take(&mut q.permits))
                };
                if parts.is_empty() {
                    break;
                }
                let sent =
                    tokio::time::timeout(ANSWER_TIMEOUT, send_parts(&mut *socket, &parts)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    // A half-sent answer must not be followed by another:
                    // the peer sees the connection end instead.
                    me.dead.store(true, Ordering::Release);
                    tracing::warn!(peer = %me.peer,
                        "replica fast path: an answer could not be sent; closing");
                    let _ = tokio::time::timeout(Duration::from_secs(1), socket.shutdown()).await;
                    return false;
                }
                // These answers have left: their requests no longer count.
                drop(permits);
            }
            drop(socket);
            // An answer queued while we held the socket found it taken.
            if lock(&me.queue).out.is_empty() {
                return !me.dead.load(Ordering::Acquire);
            }
        }
    }
}

/// Requests of one connection read but not yet answered on the wire. At the
/// limit the reader stops reading, so a peer that sends without reading its
/// answers meets TCP backpressure instead of growing this node's memory
/// (tasks and queued answers). Far above what a client keeps in flight: a
/// primary's iSCSI queue depth per connection.
const MAX_IN_FLIGHT: usize = 1024;

async fn serve_conn<S>(
    pool: Arc<LocalPool>,
    frontend: Arc<dyn BlockService>,
    stream: S,
    peer: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let wr = Writer::new(wr, peer);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let why = loop {
        // Taken before the next frame is read: at the limit, nothing more
        // is. Answers the reader queued go first: they release permits.
        let permit = match in_flight.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !wr.flush().await {
                    return;
                }
                match in_flight.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                }
            }
        };
        // The reader's own answers leave once no request is waiting behind
        // them: one at a time at queue depth 1, many per send under load.
        let next = read_frame(&mut rd);
        tokio::pin!(next);
        let frame = match futures::poll!(next.as_mut()) {
            std::task::Poll::Ready(f) => f,
            std::task::Poll::Pending => {
                if !wr.flush().await {
                    return;
                }
                next.await
            }
        };
        let (kind, id, body) = match frame {
            Ok(f) => f,
            Err(FrameError::Closed) => {
                wr.flush().await;
                return;
            }
            Err(e) => break format!("bad frame: {e}"),
        };
        match kind {
            KIND_WRITE => {
                let req = match ReplicaWrite::decode(body) {
                    Ok(r) => r,
                    Err(e) => break format!("malformed ReplicaWrite: {e}"),
                };
                // Another node's write: large ones may go direct.
                if LocalPool::applies_inline(&req, true) {
                    // A copy into the page cache: done here, in order, no
                    // task hand-off.
                    let r = pool.write(req).await;
                    if !wr.push(answer_frame(id, r), permit) {
                        return;
                    }
                } else {
                    let pool = pool.clone();
                    spawn_answer(&wr, id, permit, async move { pool.write(req).await });
                }
            }
            KIND_READ => {
                let req = match ReplicaRead::decode(body) {
                    Ok(r) => r,
                    Err(e) => break format!("malformed ReplicaRead: {e}"),
                };
                let pool = pool.clone();
                spawn_answer(&wr, id, permit, async move { pool.read(req).await });
            }
            KIND_FORWARD => {
                let req = match VdiskIo::decode(body) {
                    Ok(r) => r,
                    Err(e) => break format!("malformed VdiskIo: {e}"),
                };
                let frontend = frontend.clone();
                spawn_answer(&wr, id, permit, async move {
                    serve_forward(frontend.as_ref(), req).await
                });
            }
            KIND_COMMAND => {
                let req = match FrontendCommand::decode(body) {
                    Ok(r) => r,
                    Err(e) => break format!("malformed FrontendCommand: {e}"),
                };
                let frontend = frontend.clone();
                spawn_answer(&wr, id, permit, async move {
                    serve_command(frontend.as_ref(), req).await
                });
            }
            KIND_OK | KIND_ERR => break format!("answer kind {kind} sent as a request"),
            other => {
                // A newer peer's request: the frame was read whole, so the
                // connection is still in step; say we cannot serve it.
                tracing::debug!(%peer, kind = other, "unknown fast-path request kind");
                let e = error_frame(
                    id,
                    tonic::Code::Unimplemented,
                    format!("unknown request kind {other}"),
                );
                if !wr.push(e, permit) {
                    return;
                }
            }
        }
    };
    // The answers to the requests before the bad one still leave.
    wr.flush().await;
    tracing::warn!(%peer, reason = %why, "dropping replica fast-path connection");
}

/// Runs a request that may wait (a disk, a sync, another node) on its own
/// task, so the requests behind it on the connection are not held up.
fn spawn_answer<M>(
    wr: &Writer,
    id: u64,
    permit: OwnedSemaphorePermit,
    work: impl Future<Output = Result<M, DataError>> + Send + 'static,
) where
    M: Message + 'static,
{
    let wr = wr.clone();
    tokio::spawn(async move {
        let r = work.await;
        wr.queue(answer_frame(id, r), permit).await;
    });
}

/// How long an answer may take to leave before the connection is given up
/// (a client that stopped reading).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The answer frame to request `id`.
fn answer_frame<M: Message>(id: u64, r: Result<M, DataError>) -> Vec<u8> {
    match r {
        Ok(m) => frame(KIND_OK, id, &m),
        Err(e) => {
            if !matches!(
                e,
                DataError::StaleEpoch { .. }
                    | DataError::NotFound(_)
                    | DataError::Miscompare { .. }
            ) {
                tracing::warn!(error = %e, "replica request failed");
            }
            let s = to_status(&e);
            error_frame(id, s.code(), s.message().to_string())
        }
    }
}

fn error_frame(id: u64, code: tonic::Code, message: String) -> Vec<u8> {
    frame(
        KIND_ERR,
        id,
        &WireError {
            code: code as i32,
            message,
        },
    )
}

// ---- client ----------------------------------------------------------------

type Pending = Mutex<HashMap<u64, oneshot::Sender<(u8, Bytes)>>>;

/// One connection to a peer's fast path; calls from many tasks share it.
pub struct WireClient {
    node: u64,
    wr: tokio::sync::Mutex<WriteHalf<cairn_rpc::dial::ClientStream>>,
    /// Frames waiting for the socket. A caller queues its frame, then takes
    /// `wr` and sends everything queued: with many calls in flight one TLS
    /// write and one syscall carry several requests (a write per request
    /// was a tenth of an RF2 primary's CPU).
    outbox: Mutex<Outbox>,
    pending: Arc<Pending>,
    next_id: AtomicU64,
    dead: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
    /// The peer chose version 2 or later: it serves [`KIND_COMMAND`].
    commands: bool,
}

impl Drop for WireClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl WireClient {
    /// Connects to node `node` at `addr`; `Ok(None)` when it does not speak
    /// the protocol (use gRPC).
    pub async fn connect(
        node: u64,
        addr: &str,
        tls: &ClientConfig,
        timeout: Duration,
    ) -> Result<Option<Arc<Self>>, DataError> {
        let Some(stream) = cairn_rpc::dial::connect_alpn(addr, tls, ALPNS, timeout)
            .await
            .map_err(|e| DataError::Unavailable(format!("node {node} at {addr}: {e}")))?
        else {
            return Ok(None);
        };
        let commands = stream.get_ref().1.alpn_protocol() != Some(ALPN_V1);
        let (rd, wr) = tokio::io::split(stream);
        let pending: Arc<Pending> = Arc::new(Mutex::new(HashMap::new()));
        let dead = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_answers(node, rd, pending.clone(), dead.clone()));
        Ok(Some(Arc::new(Self {
            node,
            wr: tokio::sync::Mutex::new(wr),
            outbox: Mutex::new(Outbox::default()),
            pending,
            next_id: AtomicU64::new(1),
            dead,
            reader,
            commands,
        })))
    }

    /// Gives the connection up: every call waiting for an answer fails now
    /// ("connection lost"), and no call uses it again.
    pub fn fail_all(&self) {
        self.dead.store(true, Ordering::Release);
        self.reader.abort();
        // Dropping the senders fails the waiting calls.
        lock(&self.pending).clear();
    }

    /// Whether the connection failed (a new one is needed).
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    async fn call<M: Message + Default>(
        &self,
        kind: u8,
        body: &impl Message,
        timeout: Duration,
    ) -> Result<M, DataError> {
        self.call_with_data(kind, body, 0, &Bytes::new(), timeout)
            .await
    }

    /// [`Self::call`] for a message whose bytes field `field` holds `data`
    /// (and `body` holds it empty): see [`Outbox::put`].
    async fn call_with_data<M: Message + Default>(
        &self,
        kind: u8,
        body: &impl Message,
        field: u32,
        data: &Bytes,
        timeout: Duration,
    ) -> Result<M, DataError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        lock(&self.outbox).put(kind, id, body, field, data);
        let gone = || DataError::Unavailable(format!("node {}: connection lost", self.node));
        let deadline = tokio::time::Instant::now() + timeout;
        // The deadline covers the send too: a peer that stopped reading (a
        // partition) must fail the call in time, as a gRPC timeout would.
        let sent = tokio::time::timeout_at(deadline, async {
            let mut wr = self.wr.lock().await;
            let out = lock(&self.outbox).take();
            if out.is_empty() {
                // The caller before us sent ours with its own.
                return Ok(());
            }
            send_parts(&mut *wr, &out).await
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) || self.is_dead() {
            // A frame may be half sent: the connection cannot be reused,
            // and the calls whose frames went (or not) with it fail now
            // rather than at their deadlines.
            self.dead.store(true, Ordering::Release);
            lock(&self.pending).clear();
            return Err(match sent {
                Err(_) => DataError::Unavailable(format!(
                    "node {}: could not send in {timeout:?}",
                    self.node
                )),
                _ => gone(),
            });
        }
        let (kind, body) = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(a)) => a,
            Ok(Err(_)) => return Err(gone()),
            Err(_) => {
                lock(&self.pending).remove(&id);
                return Err(DataError::Unavailable(format!(
                    "node {}: no answer in {timeout:?}",
                    self.node
                )));
            }
        };
        let bad = |e: prost::DecodeError| {
            self.dead.store(true, Ordering::Release);
            DataError::Unavailable(format!("node {}: malformed answer: {e}", self.node))
        };
        match kind {
            KIND_OK => M::decode(body).map_err(bad),
            _ => {
                let e = WireError::decode(body).map_err(bad)?;
                let status = tonic::Status::new(tonic::Code::from(e.code), e.message);
                Err(from_status(&status, self.node))
            }
        }
    }

    pub async fn write(
        &self,
        mut req: ReplicaWrite,
        timeout: Duration,
    ) -> Result<ReplicaWriteReply, DataError> {
        // Field 8 of `ReplicaWrite`: the data, sent from the caller's buffer.
        let data = std::mem::take(&mut req.data);
        self.call_with_data(KIND_WRITE, &req, REPLICA_WRITE_DATA_FIELD, &data, timeout)
            .await
    }

    pub async fn read(
        &self,
        req: &ReplicaRead,
        timeout: Duration,
    ) -> Result<ReplicaReadReply, DataError> {
        self.call(KIND_READ, req, timeout).await
    }

    pub async fn forward(
        &self,
        req: &VdiskIo,
        timeout: Duration,
    ) -> Result<VdiskIoReply, DataError> {
        self.call(KIND_FORWARD, req, timeout).await
    }

    /// Whether the peer serves [`Self::command`] (version 2 or later).
    pub fn speaks_commands(&self) -> bool {
        self.commands
    }

    /// A front end's command for the vdisk's owner. Only for a peer that
    /// [`Self::speaks_commands`]: a version 1 server drops the connection.
    pub async fn command(
        &self,
        req: &FrontendCommand,
        timeout: Duration,
    ) -> Result<FrontendReply, DataError> {
        self.call(KIND_COMMAND, req, timeout).await
    }
}

/// Hands each answer to its caller; on any error marks the connection dead
/// and fails every call still waiting.
async fn read_answers<R: AsyncRead>(
    node: u64,
    mut rd: ReadHalf<R>,
    pending: Arc<Pending>,
    dead: Arc<AtomicBool>,
) {
    loop {
        match read_frame(&mut rd).await {
            Ok((kind @ (KIND_OK | KIND_ERR), id, body)) => {
                let waiting = lock(&pending).remove(&id);
                if let Some(tx) = waiting {
                    let _ = tx.send((kind, body));
                }
            }
            Ok((kind, _, _)) => {
                tracing::warn!(
                    node,
                    kind,
                    "replica fast path: unknown answer kind; reconnecting"
                );
                break;
            }
            Err(FrameError::Closed) => break,
            Err(e) => {
                tracing::warn!(node, error = %e, "replica fast path: bad answer; reconnecting");
                break;
            }
        }
    }
    dead.store(true, Ordering::Release);
    // Dropping the senders fails the waiting calls.
    lock(&pending).clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::BLOCK_SIZE;
    use cairn_api::data::v1::RecordKind;

    fn write_req(seq: u64, fill: u8, create: bool) -> ReplicaWrite {
        let data = vec![fill; BLOCK_SIZE];
        ReplicaWrite {
            format_version: 1,
            extent_group_id: 7,
            epoch: 1,
            sequence: seq,
            kind: RecordKind::RecordData as i32,
            first_block: 3,
            block_count: 1,
            block_crc32c: crate::format::block_checksums(&data),
            data: data.into(),
            create: create.then(|| crate::egroup::tests::header(7)),
            copy: false,
            deferred_sync: true,
        }
    }

    /// A write's data leaves as its own part yet the frame decodes to the
    /// whole message, for small data (copied in), large (shared) and none.
    #[test]
    fn a_frame_with_shared_data_decodes_to_the_whole_message() {
        let mut one = ReplicaWrite {
            data: Bytes::from_static(&[1]),
            ..Default::default()
        };
        let encoded = one.encode_to_vec();
        assert_eq!(
            encoded[0] >> 3,
            REPLICA_WRITE_DATA_FIELD as u8,
            "the data's field number"
        );
        for (n, len) in [(0u64, 0usize), (1, 4096), (2, 1 << 20)] {
            let mut req = write_req(n + 1, n as u8 + 1, n == 1);
            req.data = Bytes::from(vec![0xA5 ^ n as u8; len]);
            req.block_count = (len / BLOCK_SIZE) as u32;
            let mut body = req.clone();
            let data = std::mem::take(&mut body.data);
            let mut out = Outbox::default();
            out.put(KIND_WRITE, 40 + n, &body, REPLICA_WRITE_DATA_FIELD, &data);
            let parts = out.take();
            if len >= SHARE_FROM {
                assert!(
                    parts.iter().any(|p| p.as_ptr() == data.as_ptr()),
                    "large data is sent from its own buffer"
                );
            }
            let wire: Vec<u8> = parts.concat();
            let mut rd = &wire[..];
            let (kind, id, msg) = futures::executor::block_on(read_frame(&mut rd)).unwrap();
            assert_eq!((kind, id), (KIND_WRITE, 40 + n));
            assert!(rd.is_empty(), "the length prefix covers the shared part");
            assert_eq!(ReplicaWrite::decode(msg).unwrap(), req);
        }
        one.data = Bytes::new();
        assert!(one.encode_to_vec().is_empty());
    }

    /// Front ends with one 1 MiB memory vdisk, "m".
    fn no_frontend() -> Arc<dyn BlockService> {
        cairn_blockdev::mem::MemService::with([(
            "m".to_string(),
            cairn_blockdev::mem::MemDevice::new(1 << 20),
        )])
    }

    async fn answer_of(c: &mut tokio::io::DuplexStream) -> (u8, u64, Bytes) {
        read_frame(c).await.unwrap()
    }

    /// A server on one end of an in-memory pipe, with a pool on a temp dir.
    fn server() -> (tokio::io::DuplexStream, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let pool = Arc::new(LocalPool::open(&[(dir.path().to_path_buf(), 0)]).unwrap());
        let (client, srv) = tokio::io::duplex(1 << 20);
        tokio::spawn(serve_conn(
            pool,
            no_frontend(),
            srv,
            "127.0.0.1:1".parse().unwrap(),
        ));
        (client, dir)
    }

    #[tokio::test]
    async fn writes_and_reads_answer_by_request_id() {
        let (mut c, _dir) = server();
        c.write_all(&frame(KIND_WRITE, 41, &write_req(1, 0xAB, true)))
            .await
            .unwrap();
        let (kind, id, body) = answer_of(&mut c).await;
        assert_eq!((kind, id), (KIND_OK, 41));
        ReplicaWriteReply::decode(body).unwrap();
        let read = ReplicaRead {
            format_version: 1,
            extent_group_id: 7,
            first_block: 3,
            block_count: 1,
            epoch: 0,
            states_only: false,
        };
        c.write_all(&frame(KIND_READ, 42, &read)).await.unwrap();
        let (kind, id, body) = answer_of(&mut c).await;
        assert_eq!((kind, id), (KIND_OK, 42));
        let r = ReplicaReadReply::decode(body).unwrap();
        assert_eq!(r.data, vec![0xAB; BLOCK_SIZE]);
        assert!(r.blocks[0].mapped);
        // An error travels as a status code the client maps back.
        let mut missing = read;
        missing.extent_group_id = 8;
        c.write_all(&frame(KIND_READ, 43, &missing)).await.unwrap();
        let (kind, id, body) = answer_of(&mut c).await;
        assert_eq!((kind, id), (KIND_ERR, 43));
        let e = WireError::decode(body).unwrap();
        let status = tonic::Status::new(tonic::Code::from(e.code), e.message);
        assert!(matches!(from_status(&status, 2), DataError::NotFound(_)));
        // Front-end I/O forwarded to the owner.
        let mut io = VdiskIo {
            format_version: 1,
            vdisk_id: "m".into(),
            op: cairn_api::data::v1::vdisk_io::Op::Write as i32,
            offset: 8192,
            length: 4096,
            data: vec![0x5A; 4096].into(),
            fua: false,
            forwarded: true,
            cached: true,
        };
        c.write_all(&frame(KIND_FORWARD, 44, &io)).await.unwrap();
        assert_eq!(answer_of(&mut c).await.0, KIND_OK);
        io.op = cairn_api::data::v1::vdisk_io::Op::Read as i32;
        io.data.clear();
        c.write_all(&frame(KIND_FORWARD, 45, &io)).await.unwrap();
        let (kind, id, body) = answer_of(&mut c).await;
        assert_eq!((kind, id), (KIND_OK, 45));
        assert_eq!(VdiskIoReply::decode(body).unwrap().data, vec![0x5A; 4096]);
        // A request kind from a newer version: refused, the connection stays.
        c.write_all(&frame(9, 46, &io)).await.unwrap();
        let (kind, id, body) = answer_of(&mut c).await;
        assert_eq!((kind, id), (KIND_ERR, 46));
        assert_eq!(
            tonic::Code::from(WireError::decode(body).unwrap().code),
            tonic::Code::Unimplemented
        );
        // A front-end command for a vdisk whose front end has no handler
        // here: a clear error, the connection stays.
        let cmd = FrontendCommand {
            format_version: 1,
            vdisk_id: "m".into(),
            protocol: "scsi".into(),
            payload: vec![1, 2, 3],
        };
        c.write_all(&frame(KIND_COMMAND, 47, &cmd)).await.unwrap();
        let (kind, id, body) = answer_of(&mut c).await;
        assert_eq!((kind, id), (KIND_ERR, 47));
        assert!(WireError::decode(body).unwrap().message.contains("scsi"));
        c.write_all(&frame(KIND_FORWARD, 48, &io)).await.unwrap();
        assert_eq!(answer_of(&mut c).await.0, KIND_OK);
    }

    #[tokio::test]
    async fn bad_frames_drop_only_their_connection() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Arc::new(LocalPool::open(&[(dir.path().to_path_buf(), 0)]).unwrap());
        let bad: Vec<Vec<u8>> = vec![
            // Longer than any frame may be.
            (u32::MAX).to_be_bytes().to_vec(),
            // Shorter than kind + id.
            3u32.to_be_bytes().to_vec(),
            // An answer where a request belongs.
            frame(KIND_OK, 1, &write_req(1, 1, true)),
            // A body that is not a ReplicaWrite.
            {
                let mut f = frame(KIND_WRITE, 1, &write_req(1, 1, true));
                let n = f.len();
                f[n - 1] = 0xFF;
                f[20] = 0xFF;
                f
            },
        ];
        for b in bad {
            let (mut c, srv) = tokio::io::duplex(1 << 20);
            let task = tokio::spawn(serve_conn(
                pool.clone(),
                no_frontend(),
                srv,
                "127.0.0.1:1".parse().unwrap(),
            ));
            c.write_all(&b).await.unwrap();
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("the server drops the connection")
                .unwrap();
        }
        // A good connection still works, on the same pool.
        let (mut c, srv) = tokio::io::duplex(1 << 20);
        tokio::spawn(serve_conn(
            pool,
            no_frontend(),
            srv,
            "127.0.0.1:1".parse().unwrap(),
        ));
        c.write_all(&frame(KIND_WRITE, 5, &write_req(1, 2, true)))
            .await
            .unwrap();
        assert_eq!(answer_of(&mut c).await.0, KIND_OK);
    }

    /// Writes that arrive together are applied by the reader, which sends
    /// their answers once no request waits behind them; a bad frame after
    /// them still lets those answers leave before the connection ends.
    #[tokio::test]
    async fn pipelined_writes_are_answered_before_a_bad_frame_ends_the_connection() {
        let (mut c, _dir) = server();
        let mut burst = Vec::new();
        for seq in 1..=8u64 {
            burst.extend(frame(
                KIND_WRITE,
                100 + seq,
                &write_req(seq, seq as u8, seq == 1),
            ));
        }
        burst.extend(frame(KIND_OK, 1, &write_req(9, 9, false)));
        c.write_all(&burst).await.unwrap();
        for seq in 1..=8u64 {
            let (kind, id, _) = tokio::time::timeout(Duration::from_secs(5), answer_of(&mut c))
                .await
                .expect("every write before the bad frame is answered");
            assert_eq!((kind, id), (KIND_OK, 100 + seq), "answers in request order");
        }
        let end = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut c))
            .await
            .expect("the connection ends");
        assert!(matches!(end, Err(FrameError::Closed)), "{end:?}");
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_its_answers_meets_backpressure() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Arc::new(LocalPool::open(&[(dir.path().to_path_buf(), 0)]).unwrap());
        // Small pipe buffers: unread answers soon fill the server's side.
        let (c, srv) = tokio::io::duplex(4096);
        tokio::spawn(serve_conn(
            pool,
            no_frontend(),
            srv,
            "127.0.0.1:1".parse().unwrap(),
        ));
        let read = ReplicaRead {
            format_version: 1,
            extent_group_id: 8,
            first_block: 0,
            block_count: 1,
            epoch: 0,
            states_only: false,
        };
        let total = MAX_IN_FLIGHT as u64 * 3;
        let requests: Vec<u8> = (0..total)
            .flat_map(|id| frame(KIND_READ, id, &read))
            .collect();
        let (mut rd, mut wr) = tokio::io::split(c);
        let writer = tokio::spawn(async move {
            wr.write_all(&requests).await.unwrap();
            wr
        });
        // Without reading answers, the server stops taking requests: the
        // writer cannot finish.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !writer.is_finished(),
            "the server kept reading past its limit"
        );
        // Once the answers are read, every request is answered.
        let mut seen = std::collections::HashSet::new();
        while (seen.len() as u64) < total {
            let (kind, id, _) = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut rd))
                .await
                .expect("answers keep coming")
                .unwrap();
            assert_eq!(kind, KIND_ERR);
            seen.insert(id);
        }
        writer.await.unwrap();
    }
}
