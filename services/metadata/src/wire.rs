//! The raft stream: raft messages from one node to another as
//! length-prefixed `RaftBatch` frames ([`cairn_rpc::frame`]) on a mutually
//! authenticated TLS connection of their own, chosen by ALPN ([`ALPN_V1`])
//! on the node's RPC port. It is one-way: the receiver never writes, and
//! raft's answers travel on the receiver's own stream back.
//!
//! Why not the gRPC stream it replaces: a message crossed the peer task, the
//! request-body task and the HTTP/2 connection task on the sender, then the
//! connection task and the stream's handler task on the receiver. On a
//! 2-vCPU VM every crossing that lands on a parked worker is a thread wakeup,
//! and a put waits for two messages (the append and its answer). Here the
//! sender's peer task writes the frame itself and the receiver's connection
//! task hands the messages to the raft driver.
//!
//! A peer that does not offer the ALPN id (a node of an older version)
//! makes the sender fall back to the gRPC stream; snapshots and oversized
//! messages always use a gRPC call, whose answer says they arrived. A
//! malformed frame or batch drops its connection with a log line; the
//! sender reconnects, raft resends what mattered, and nothing else is
//! disturbed.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;
use cairn_api::rpc::v1::RaftBatch;
use cairn_rpc::frame::{read_frame, FrameError};
use cairn_rpc::serve::{RawProtocol, ServerStream};
use prost::Message as _;
use tokio::io::AsyncRead;

use crate::service::{deliver, Refused};
use crate::MetadataHandle;

/// Version 1 of the raft stream.
pub const ALPN_V1: &[u8] = b"cairn-raft/1";
/// The versions this build speaks, newest first (offered by the RPC
/// listener, asked for by the sender).
pub const ALPNS: &[&[u8]] = &[ALPN_V1];

/// A message larger than this goes by gRPC call instead (raft entries are
/// small records; only an unusual proposal gets near it).
pub(crate) const MAX_STREAM_MESSAGE: usize = 8 << 20;
/// A frame is closed once it holds this much, so a frame stays below
/// twice this plus the batch's own fields.
pub(crate) const FRAME_FILL: usize = 8 << 20;
/// The largest frame a receiver accepts.
pub const MAX_FRAME: usize = MAX_STREAM_MESSAGE + FRAME_FILL + (1 << 20);

/// Encodes `batch` as one frame: its length, then the message.
pub(crate) fn encode_frame(batch: &RaftBatch) -> Bytes {
    let len = batch.encoded_len();
    let mut out = Vec::with_capacity(4 + len);
    // `len` is below MAX_FRAME by construction (see `FRAME_FILL`).
    out.extend_from_slice(&(len as u32).to_be_bytes());
    batch.encode_raw(&mut out);
    out.into()
}

/// The receiving end, served on the RPC port.
pub struct RaftStreamServer {
    handle: MetadataHandle,
}

impl RaftStreamServer {
    pub fn new(handle: MetadataHandle) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self { handle })
    }
}

impl RawProtocol for RaftStreamServer {
    fn alpns(&self) -> &'static [&'static [u8]] {
        ALPNS
    }

    fn serve(
        &self,
        stream: ServerStream,
        peer: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let handle = self.handle.clone();
        Box::pin(serve_conn(stream, peer, move |b| deliver(&handle, b)))
    }
}

/// Reads frames until the peer closes the connection or sends something
/// wrong, handing each batch to `sink`.
pub(crate) async fn serve_conn<R, F>(mut rd: R, peer: SocketAddr, sink: F)
where
    R: AsyncRead + Unpin,
    F: Fn(RaftBatch) -> Result<(), Refused>,
{
    let why = loop {
        let frame = match read_frame(&mut rd, 1..=MAX_FRAME).await {
            Ok(f) => f,
            Err(FrameError::Closed) => return,
            Err(e) => break format!("bad frame: {e}"),
        };
        let batch = match RaftBatch::decode(frame) {
            Ok(b) => b,
            Err(e) => break format!("malformed RaftBatch: {e}"),
        };
        match sink(batch) {
            Ok(()) => {}
            Err(Refused::Malformed(m)) => break m,
            Err(Refused::Driver(e)) => {
                tracing::debug!(%peer, error = %e, "raft stream: the driver is gone; closing");
                return;
            }
        }
    };
    tracing::warn!(%peer, reason = %why, "dropping raft stream connection");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncWriteExt;

    fn batch(from: u64, messages: Vec<Vec<u8>>) -> RaftBatch {
        RaftBatch {
            format_version: cairn_api::FORMAT_VERSION,
            from_node: from,
            messages,
            from_addr: "127.0.0.9:1".into(),
        }
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 9], 1))
    }

    type Seen = Arc<Mutex<Vec<RaftBatch>>>;

    fn collecting() -> (Seen, impl Fn(RaftBatch) -> Result<(), Refused>) {
        let seen: Seen = Arc::default();
        let s = seen.clone();
        (seen, move |b: RaftBatch| {
            if b.messages.iter().any(|m| m == b"bad") {
                return Err(Refused::Malformed("bad message".into()));
            }
            s.lock().unwrap().push(b);
            Ok(())
        })
    }

    #[tokio::test]
    async fn frames_arrive_as_batches_in_order() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let (seen, sink) = collecting();
        let server = tokio::spawn(serve_conn(rx, peer(), sink));
        for i in 0..3u8 {
            let f = encode_frame(&batch(2, vec![vec![i; 100], vec![i; 3]]));
            tx.write_all(&f).await.unwrap();
        }
        drop(tx);
        server.await.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        for (i, b) in seen.iter().enumerate() {
            assert_eq!(b.from_node, 2);
            assert_eq!(b.messages, vec![vec![i as u8; 100], vec![i as u8; 3]]);
        }
    }

    #[tokio::test]
    async fn bad_frames_drop_only_their_connection() {
        let (seen, sink) = collecting();
        let sink = Arc::new(sink);
        // Three bad connections: a length over the limit, bytes that are not
        // a RaftBatch, a batch the sink refuses. None delivers anything
        // after the bad frame; a good connection beside them is unaffected.
        let mut bad_frames: Vec<Vec<u8>> = vec![((MAX_FRAME + 1) as u32).to_be_bytes().to_vec()];
        let mut garbage = 3u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
        bad_frames.push(garbage);
        bad_frames.push(encode_frame(&batch(3, vec![b"bad".to_vec()])).to_vec());
        for bad in bad_frames {
            let (mut tx, rx) = tokio::io::duplex(1 << 16);
            let s = sink.clone();
            let server = tokio::spawn(serve_conn(rx, peer(), move |b| s(b)));
            tx.write_all(&bad).await.unwrap();
            // The server gives up on its own; this frame is never read.
            let _ = tx
                .write_all(&encode_frame(&batch(3, vec![b"after".to_vec()])))
                .await;
            tokio::time::timeout(std::time::Duration::from_secs(5), server)
                .await
                .expect("a bad frame must end its connection")
                .unwrap();
        }
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let s = sink.clone();
        let server = tokio::spawn(serve_conn(rx, peer(), move |b| s(b)));
        tx.write_all(&encode_frame(&batch(2, vec![b"good".to_vec()])))
            .await
            .unwrap();
        drop(tx);
        server.await.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "only the good connection's batch arrives");
        assert_eq!(seen[0].messages, vec![b"good".to_vec()]);
    }
}
