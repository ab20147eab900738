//! A connection's outgoing PDUs: stamped with StatSN, ExpCmdSN and MaxCmdSN
//! at the moment they go out (so the numbers on the wire are always in
//! order) and written in the order they were sent.
//!
//! Whoever sends while nothing is queued writes straight to the socket,
//! without waiting: at queue depth 1 a command is read, run from the page
//! cache and answered in one poll of the connection's task. Handing every
//! PDU to a writer task instead cost a task wakeup per response, and often
//! a wakeup of the runtime's other thread. What the socket does not take at
//! once, and everything sent after it, goes to the writer task, which waits
//! for the socket; senders queue until it has caught up. While more commands
//! are already buffered the connection's task holds the answers back
//! ([`Outbox::hold`]), so at queue depth 32 a batch still leaves in one
//! write rather than one per command.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::{Arc, Mutex};

use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::pdu::Pdu;
use crate::session::{Params, Session};
use cairn_util::sync::lock;

/// When a PDU carries StatSN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stat {
    /// Not a status PDU (Data-In without S).
    None,
    /// Carries the current StatSN without consuming it (R2T, NOP-In ping).
    Current,
    /// Consumes a StatSN (responses).
    Advance,
}

pub(crate) enum Out {
    Pdu(Box<Pdu>, Stat),
    /// Flush what is queued, then end the connection's sending side.
    Close,
}

/// Batches gathered by the writer task stop growing at this size.
const BATCH: usize = 1 << 20;

pub(crate) struct Outbox {
    wr: OwnedWriteHalf,
    session: Arc<Session>,
    params: Params,
    state: Mutex<State>,
    /// Wakes the writer task: set whenever `busy` becomes true.
    kick: Notify,
}

struct State {
    statsn: u32,
    /// Set while the writer task owns the socket (it has bytes to write or
    /// PDUs queued): senders only queue. Queue non-empty implies busy.
    busy: bool,
    queue: VecDeque<Out>,
    /// Encoded, not yet written, and ours to write (never while busy).
    pending: Vec<u8>,
    /// Set by [`Outbox::hold`]: `pending` waits for [`Outbox::release`].
    held: bool,
    /// Bytes for the writer task to write before its queue.
    backlog: Vec<u8>,
    /// Closed or failed: later PDUs are dropped.
    done: bool,
}

impl Outbox {
    pub(crate) fn new(
        wr: OwnedWriteHalf,
        session: Arc<Session>,
        params: Params,
        statsn: u32,
    ) -> Arc<Self> {
        Arc::new(Self {
            wr,
            session,
            params,
            state: Mutex::new(State {
                statsn,
                busy: false,
                queue: VecDeque::new(),
                pending: Vec::new(),
                held: false,
                backlog: Vec::new(),
                done: false,
            }),
            kick: Notify::new(),
        })
    }

    /// Sends `o` after everything sent before it; never waits.
    pub(crate) fn send(&self, o: Out) {
        self.send_all([o]);
    }

    /// Sends `outs` in order after everything sent before them, in one
    /// write when the socket takes it; never waits.
    pub(crate) fn send_all(&self, outs: impl IntoIterator<Item = Out>) {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if st.done {
            return;
        }
        for o in outs {
            match o {
                Out::Pdu(p, stat) if !st.busy => {
                    self.encode(&mut st.statsn, *p, stat, &mut st.pending)
                }
                o => {
                    if !st.busy {
                        self.hand_over(st);
                    }
                    st.queue.push_back(o);
                }
            }
        }
        if !st.busy && !st.held {
            self.flush(st);
        }
    }

    /// Keeps what is sent from now on in memory until [`Self::release`]:
    /// the connection's task holds its answers while more commands are
    /// already buffered, so a batch of them goes out in one write.
    pub(crate) fn hold(&self) {
        lock(&self.state).held = true;
    }

    /// Ends [`Self::hold`], writing what it kept.
    pub(crate) fn release(&self) {
        let mut st = lock(&self.state);
        st.held = false;
        if !st.busy && !st.done {
            self.flush(&mut st);
        }
    }

    /// Writes `pending` while the socket is ours; what it does not take
    /// goes to the writer task.
    fn flush(&self, st: &mut State) {
        if st.pending.is_empty() {
            return;
        }
        match try_write_all(&self.wr, &st.pending) {
            Ok(n) if n == st.pending.len() => st.pending.clear(),
            Ok(n) => {
                st.pending.drain(..n);
                self.hand_over(st);
            }
            Err(e) => {
                tracing::debug!(tsih = self.session.tsih, error = %e, "iSCSI send failed");
                st.done = true;
                st.pending.clear();
                self.kick.notify_one();
            }
        }
    }

    /// Gives the socket to the writer task, `pending` first.
    fn hand_over(&self, st: &mut State) {
        st.backlog.append(&mut st.pending);
        st.busy = true;
        self.kick.notify_one();
    }

    /// Stamps `p` (StatSN from `statsn`, the session's command window) and
    /// appends its bytes to `buf`.
    fn encode(&self, statsn: &mut u32, mut p: Pdu, stat: Stat, buf: &mut Vec<u8>) {
        tracing::trace!(
            opcode = p.opcode(),
            flags = p.flags(),
            itt = p.itt(),
            data = p.data.len(),
            "PDU out"
        );
        match stat {
            Stat::None => {}
            Stat::Current => p.set_u32(24, *statsn),
            Stat::Advance => {
                p.set_u32(24, *statsn);
                *statsn = statsn.wrapping_add(1);
            }
        }
        {
            let w = lock(&self.session.window);
            p.set_u32(28, w.exp_cmdsn);
            p.set_u32(32, w.max_cmdsn);
        }
        p.encode_into(buf, self.params.header_digest, self.params.data_digest);
    }

    /// The writer task: writes what direct sends left behind, until the
    /// connection closes or the socket fails.
    pub(crate) async fn run_writer(self: Arc<Self>) {
        let mut buf = Vec::new();
        loop {
            self.kick.notified().await;
            loop {
                let close = {
                    let mut guard = lock(&self.state);
                    let st = &mut *guard;
                    // Closing empties the queue; a failed send happens
                    // only with nothing queued.
                    if st.done {
                        return;
                    }
                    buf.clear();
                    std::mem::swap(&mut buf, &mut st.backlog);
                    let mut close = false;
                    while buf.len() < BATCH {
                        match st.queue.pop_front() {
                            Some(Out::Pdu(p, stat)) => {
                                self.encode(&mut st.statsn, *p, stat, &mut buf)
                            }
                            Some(Out::Close) => {
                                close = true;
                                st.done = true;
                                st.queue.clear();
                                break;
                            }
                            None => break,
                        }
                    }
                    if buf.is_empty() && !close {
                        st.busy = false;
                        break;
                    }
                    close
                };
                if let Err(e) = write_all(&self.wr, &buf).await {
                    tracing::debug!(tsih = self.session.tsih, error = %e, "iSCSI send failed");
                    lock(&self.state).done = true;
                    return;
                }
                if close {
                    // The socket may outlive this task (commands still
                    // running hold the outbox): the initiator must see the
                    // end now.
                    let _ = socket2::SockRef::from(self.wr.as_ref())
                        .shutdown(std::net::Shutdown::Write);
                    return;
                }
            }
        }
    }
}

/// Writes as much of `buf` as the socket takes without waiting.
fn try_write_all(wr: &OwnedWriteHalf, buf: &[u8]) -> std::io::Result<usize> {
    let mut off = 0;
    while off < buf.len() {
        match wr.try_write(&buf[off..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(off)
}

async fn write_all(wr: &OwnedWriteHalf, buf: &[u8]) -> std::io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        wr.writable().await?;
        off += try_write_all(wr, &buf[off..])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::{op, BHS_LEN};
    use crate::session::SessionKind;
    use tokio::io::AsyncReadExt;

    fn response(itt: u32, data: usize) -> Out {
        let mut p = Pdu::new(op::DATA_IN, 0x81);
        p.set_itt(itt);
        p.data = vec![itt as u8; data];
        Out::Pdu(Box::new(p), Stat::Advance)
    }

    /// Reads PDUs (no digests) until `n` arrived; (ITT, StatSN, data ok).
    async fn read_pdus(rd: &mut tokio::net::TcpStream, n: usize) -> Vec<(u32, u32)> {
        let mut got = Vec::new();
        while got.len() < n {
            let mut bhs = [0u8; BHS_LEN];
            rd.read_exact(&mut bhs).await.unwrap();
            let be = |o: usize| u32::from_be_bytes(bhs[o..o + 4].try_into().unwrap());
            let len = (be(4) & 0xff_ffff) as usize;
            let mut data = vec![0u8; len.div_ceil(4) * 4];
            rd.read_exact(&mut data).await.unwrap();
            assert!(data[..len].iter().all(|&b| b == be(16) as u8));
            got.push((be(16), be(24)));
        }
        got
    }

    /// Sends that find the socket full queue behind what it did not take;
    /// once the writer task has caught up, sends go straight out again.
    /// Every PDU arrives once, in send order, with consecutive StatSNs, and
    /// Close ends the stream after the last of them.
    #[tokio::test]
    async fn full_socket_keeps_order_and_numbering() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (_rd, wr) = server.into_split();
        let session = Arc::new(Session::new(
            1,
            [0; 6],
            SessionKind::Normal,
            "i".into(),
            "t".into(),
            1,
            Params::default(),
            0,
            Default::default(),
        ));
        let out = Outbox::new(wr, session, Params::default(), 100);
        let writer = tokio::spawn(out.clone().run_writer());
        // ~16 MiB unread: far more than loopback socket buffers hold.
        for itt in 0..128 {
            if itt % 2 == 0 {
                out.send(response(itt, 128 << 10));
            } else {
                out.send_all([response(itt, 100 << 10)]);
            }
        }
        assert!(lock(&out.state).busy, "the socket never filled up");
        let got = read_pdus(&mut client, 128).await;
        let want: Vec<(u32, u32)> = (0..128).map(|i| (i, 100 + i)).collect();
        assert_eq!(got, want);
        // Caught up: the writer hands the socket back.
        for _ in 0..100 {
            if !lock(&out.state).busy {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!lock(&out.state).busy);
        out.send_all([response(500, 10), response(501, 0)]);
        assert!(
            !lock(&out.state).busy,
            "a small send should go straight out"
        );
        assert_eq!(
            read_pdus(&mut client, 2).await,
            vec![(500, 228), (501, 229)]
        );
        // Held answers stay in memory until released, then leave together.
        out.hold();
        out.send(response(502, 10));
        out.send(response(503, 10));
        assert!(
            !lock(&out.state).pending.is_empty(),
            "held answers were written"
        );
        out.release();
        assert!(lock(&out.state).pending.is_empty());
        assert_eq!(
            read_pdus(&mut client, 2).await,
            vec![(502, 230), (503, 231)]
        );
        // Close flushes what is held first.
        out.hold();
        out.send(response(504, 10));
        out.send(Out::Close);
        out.send(response(505, 10)); // after Close: dropped
        assert_eq!(read_pdus(&mut client, 1).await, vec![(504, 232)]);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{} bytes after Close", rest.len());
        writer.await.unwrap();
    }
}
