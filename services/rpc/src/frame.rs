//! Length-prefixed frames on a byte stream: the framing of the raw protocols
//! on the RPC port (the replica fast path and the raft stream). A frame is a
//! `u32` big-endian length of what follows, then that many bytes; what they
//! mean is the protocol's business.

use std::io::IoSlice;
use std::ops::RangeInclusive;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the stream between frames (a clean end).
    #[error("connection closed")]
    Closed,
    #[error("frame of {len} bytes (allowed {min}..={max})")]
    Length { len: usize, min: usize, max: usize },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Frames at least this long end on an [`ALIGN`]-aligned address.
pub const ALIGN_FROM: usize = 64 << 10;
/// The alignment of a large frame's end (a disk block).
pub const ALIGN: usize = 4096;

/// Reads one frame whose length must lie in `allowed`; the length is checked
/// before anything is allocated, so a hostile length costs nothing.
pub async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    allowed: RangeInclusive<usize>,
) -> Result<Bytes, FrameError> {
    let mut len = [0u8; 4];
    match rd.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if !allowed.contains(&len) {
        return Err(FrameError::Length {
            len,
            min: *allowed.start(),
            max: *allowed.end(),
        });
    }
    // Filled straight from the socket: no zeroing of what is overwritten.
    let mut buf = if len >= ALIGN_FROM {
        // A large frame ends on a block-aligned address: a block-sized
        // payload carried last (a replica write's data) is then aligned as
        // direct I/O needs, and goes to the disk without a copy.
        let mut whole = BytesMut::with_capacity(len + ALIGN - 1);
        let off = (ALIGN - (whole.as_ptr() as usize + len) % ALIGN) % ALIGN;
        whole.resize(off, 0);
        whole.split_off(off)
    } else {
        BytesMut::with_capacity(len)
    };
    while buf.len() < len {
        let mut part = (&mut *rd).take((len - buf.len()) as u64);
        if part.read_buf(&mut buf).await? == 0 {
            return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(buf.freeze())
}

/// Writes a frame and flushes it: TLS may hold written bytes back until a
/// flush (rustls buffers a record the socket could not take yet), and an
/// unflushed frame is one the peer waits for forever.
pub async fn send_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> std::io::Result<()> {
    w.write_all(frame).await?;
    w.flush().await
}

/// At most this many parts go to one vectored write (Linux refuses more
/// than 1,024 in one `writev`).
const MAX_SLICES: usize = 64;

/// [`send_frame`] for frames in parts (several frames may be given at once).
///
/// The parts go out by vectored writes: over TLS, rustls then seals them
/// into one record and hands the socket one `writev`, where a write per
/// part cost a record and a `sendto` each (two per replica write, a header
/// and its data), and on loopback each send also runs the receiver's TCP
/// input and wakes it.
pub async fn send_parts<W: AsyncWrite + Unpin>(w: &mut W, parts: &[Bytes]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let take = rest.len().min(MAX_SLICES);
        let n = w.write_vectored(&rest[..take]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn large_frames_end_block_aligned_and_arrive_whole() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        for len in [ALIGN_FROM - 1, ALIGN_FROM, ALIGN_FROM + 17, 1 << 20] {
            let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut f = (len as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&body);
            let sender = tokio::spawn(async move {
                send_frame(&mut a, &f).await.unwrap();
                a
            });
            let got = read_frame(&mut b, 1..=2 << 20).await.unwrap();
            a = sender.await.unwrap();
            assert_eq!(&got[..], &body[..], "frame of {len} bytes");
            if len >= ALIGN_FROM {
                assert_eq!((got.as_ptr() as usize + len) % ALIGN, 0, "{len}");
            }
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_bad_lengths_are_refused_before_reading() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let mut f = 5u32.to_be_bytes().to_vec();
        f.extend_from_slice(b"hello");
        send_frame(&mut a, &f).await.unwrap();
        send_parts(
            &mut a,
            &[Bytes::from_static(&[0, 0, 0, 2]), Bytes::from_static(b"ok")],
        )
        .await
        .unwrap();
        assert_eq!(&read_frame(&mut b, 1..=16).await.unwrap()[..], b"hello");
        assert_eq!(&read_frame(&mut b, 1..=16).await.unwrap()[..], b"ok");

        send_frame(&mut a, &1000u32.to_be_bytes()).await.unwrap();
        match read_frame(&mut b, 1..=16).await {
            Err(FrameError::Length { len: 1000, .. }) => {}
            other => panic!("expected a length error, got {other:?}"),
        }
        drop(a);
        assert!(matches!(
            read_frame(&mut b, 1..=16).await,
            Err(FrameError::Closed)
        ));
    }

    #[tokio::test]
    async fn many_parts_arrive_whole_and_in_order_through_short_writes() {
        // More parts than one vectored write takes, empty ones among them,
        // through a pipe that takes a few hundred bytes at a time: every
        // partial write must resume inside the right part.
        let (mut a, mut b) = tokio::io::duplex(300);
        let mut parts = Vec::new();
        let mut frames = Vec::new();
        for i in 0..200usize {
            let body: Vec<u8> = (0..(i * 7) % 1000 + 1).map(|j| (i + j) as u8).collect();
            parts.push(Bytes::from((body.len() as u32).to_be_bytes().to_vec()));
            parts.push(Bytes::new());
            parts.push(Bytes::from(body.clone()));
            frames.push(body);
        }
        let sender = tokio::spawn(async move { send_parts(&mut a, &parts).await });
        for body in &frames {
            assert_eq!(&read_frame(&mut b, 1..=1000).await.unwrap()[..], &body[..]);
        }
        sender.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_frame_cut_short_is_an_error_not_a_clean_close() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        send_frame(&mut a, &[0, 0, 0, 8, 1, 2, 3]).await.unwrap();
        drop(a);
        assert!(matches!(
            read_frame(&mut b, 1..=16).await,
            Err(FrameError::Io(_))
        ));
    }
}
