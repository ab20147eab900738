//! The full feature phase of one connection (RFC 7143 4.2, 11): SCSI
//! commands with their Data-Out (immediate, unsolicited, solicited by R2T)
//! and Data-In, task management, NOP, text (SendTargets), logout, and the
//! asynchronous logout request sent when the node is going down.
//!
//! One task per connection reads PDUs (the read in progress is one future
//! kept across its loop, so waiting for a PDU can be cancelled without
//! losing framing) and owns the per-command state. A small read, or a small
//! write while no other command runs, that completes without waiting runs
//! on that task; the rest (and whatever has to wait for the disk or another
//! node) run as tasks of their own, so commands still overlap. Everything
//! goes out through the connection's [`Outbox`], which stamps StatSN,
//! ExpCmdSN and MaxCmdSN as it writes, so they are always in order.

use std::collections::HashMap;
use std::future::Future as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::outbox::{Out, Outbox, Stat};
use crate::pdu::{self, op, reject, Pdu, PduError, ReadLimits, RESERVED_TAG};
use crate::scsi::sense::Sense;
use crate::scsi::{self, status, LogicalUnit, ScsiResponse};
use crate::server::Shared;
use crate::session::{CmdSnCheck, Params, Session, SessionKind};
use cairn_util::sync::lock;

/// The largest single transfer buffered for one command (the block limits
/// VPD page advertises less).
pub const MAX_TRANSFER: u32 = 64 * 1024 * 1024;
/// How long initiators get to log out after an asynchronous logout request.
pub const ASYNC_LOGOUT_SECS: u16 = 5;

/// A command that has started running.
struct Running {
    lun: u64,
    aborted: Arc<AtomicBool>,
    done: watch::Receiver<bool>,
}

/// A write still collecting its Data-Out.
struct PendingWrite {
    lun: u64,
    cdb: Vec<u8>,
    edtl: u32,
    immediate: bool,
    buf: Vec<u8>,
    /// Open sequences: unsolicited (TTT reserved) or one per R2T.
    seqs: Vec<Seq>,
    /// Offset of the next R2T to issue.
    next_r2t: u32,
    r2tsn: u32,
}

struct Seq {
    ttt: u32,
    offset: u32,
    len: u32,
    received: u32,
    next_datasn: u32,
}

/// Reads of at most this many bytes are first polled on the connection's
/// own task (see [`Conn::start`]).
const INLINE_MAX: u32 = 64 << 10;

/// A connection error that ends the connection after a log line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Fatal(String);

fn fatal(s: impl Into<String>) -> Fatal {
    Fatal(s.into())
}

struct Conn {
    shared: Arc<Shared>,
    session: Arc<Session>,
    params: Params,
    cid: u16,
    out: Arc<Outbox>,
    running: Arc<Mutex<HashMap<u32, Running>>>,
    writes: HashMap<u32, PendingWrite>,
    next_ttt: u32,
    /// Text answers too long for one PDU, by target transfer tag.
    text_rest: Option<(u32, Vec<u8>)>,
    peer: String,
}

type PduReader = tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>;

/// Reads the next PDU, handing the reader back with it.
async fn read_next(mut rd: PduReader, limits: ReadLimits) -> (PduReader, Result<Pdu, PduError>) {
    let r = pdu::read_pdu_head(&mut rd, limits).await;
    (rd, r)
}

/// Runs a logged-in connection to its end.
pub async fn run(
    shared: Arc<Shared>,
    stream: TcpStream,
    login: crate::login::LoggedIn,
    peer: String,
    mut stop: watch::Receiver<bool>,
) {
    let crate::login::LoggedIn {
        session,
        params,
        cid,
        statsn,
    } = login;
    let (rd, wr) = stream.into_split();
    let out = Outbox::new(wr, session.clone(), params, statsn);
    let writer = tokio::spawn(out.clone().run_writer());
    let limits = ReadLimits {
        max_data: params.max_recv_data_segment,
        header_digest: params.header_digest,
        data_digest: params.data_digest,
    };
    // Buffered: with 32 commands in flight one read takes many PDUs (it was
    // a read for each header, each data segment, and an EAGAIN). Data
    // segments larger than the buffer bypass it.
    let rd = tokio::io::BufReader::with_capacity(64 << 10, rd);
    // PDUs are read by this task, not a reader task of their own: that
    // hand-off was a task wakeup (often a thread wakeup) per PDU. The read
    // in progress is one future kept across the loop, so the other branches
    // of the select never cancel it halfway through a PDU.
    let mut next = Box::pin(read_next(rd, limits));
    let mut conn = Conn {
        shared: shared.clone(),
        session: session.clone(),
        params,
        cid,
        out,
        running: Arc::new(Mutex::new(HashMap::new())),
        writes: HashMap::new(),
        next_ttt: 1,
        text_rest: None,
        peer,
    };
    let mut closing = session.closing.subscribe();
    let mut logout_deadline: Option<tokio::time::Instant> = None;
    // Liveness: when the initiator last sent a PDU, and when we pinged it
    // since. One timer, moved only when it fires: resetting it for every
    // PDU would cost a timer-wheel update per command.
    let (nop_interval, nop_timeout) = (shared.cfg.nop_interval, shared.cfg.nop_timeout);
    let mut heard = tokio::time::Instant::now();
    let mut pinged = false;
    let mut ping_timer = Box::pin(tokio::time::sleep_until(heard + nop_interval));
    let reason = loop {
        let deadline = async {
            match logout_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            (rd, r) = &mut next => match r {
                Ok(mut p) => {
                    heard = tokio::time::Instant::now();
                    pinged = false;
                    let mut rd = rd;
                    if p.data_pending {
                        if let Err(e) = conn.read_data_out(&mut rd, &mut p, limits).await {
                            break format!("bad PDU: {e}");
                        }
                    }
                    // More commands already here (queue depth > 1): their
                    // answers go out with this one's, in one write.
                    let more = pdu::starts_with_whole_pdu(rd.buffer(), limits);
                    // Same future type: the box is reused, not reallocated.
                    next.set(read_next(rd, limits));
                    if more {
                        conn.out.hold();
                    }
                    let r = conn.handle(p).await;
                    if !more {
                        conn.out.release();
                    }
                    match r {
                        Ok(true) => continue,
                        Ok(false) => break "logged out".to_string(),
                        Err(e) => break format!("protocol error: {e}"),
                    }
                }
                Err(PduError::Closed) => break "closed by the initiator".to_string(),
                Err(e) => break format!("bad PDU: {e}"),
            },
            _ = async { stop.wait_for(|s| *s).await.is_ok() }, if logout_deadline.is_none() => {
                if session.kind == SessionKind::Discovery {
                    break "node stopping".to_string();
                }
                conn.send_async_logout();
                logout_deadline = Some(tokio::time::Instant::now()
                    + Duration::from_secs(u64::from(ASYNC_LOGOUT_SECS) + 1));
            },
            _ = deadline => break "no logout after the asynchronous logout request".to_string(),
            () = &mut ping_timer, if !nop_interval.is_zero() => {
                let now = tokio::time::Instant::now();
                if pinged {
                    break format!("no answer to a NOP-In ping in {} s", nop_timeout.as_secs_f32());
                }
                if now < heard + nop_interval {
                    ping_timer.as_mut().reset(heard + nop_interval);
                } else {
                    conn.ping();
                    pinged = true;
                    ping_timer.as_mut().reset(now + nop_timeout);
                }
            },
            _ = async { closing.wait_for(|c| *c).await.is_ok() } => break "session closed".to_string(),
        }
    };
    tracing::info!(peer = %conn.peer, initiator = %session.initiator_name,
        target = %session.target_name, tsih = session.tsih, cid, reason = %reason,
        "iSCSI connection ended");
    drop(next);
    for r in lock(&conn.running).values() {
        r.aborted.store(true, Ordering::SeqCst);
    }
    conn.out.send(Out::Close);
    drop(conn);
    let abort = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .is_err()
    {
        // An initiator that stopped reading: left alone, the writer task
        // would keep the socket (and its buffers) open for good.
        abort.abort();
        tracing::warn!(
            tsih = session.tsih,
            "iSCSI writer did not finish in 5 s; stopped"
        );
    }
    if shared.registry.detach(&session) {
        for lu in session.luns.values() {
            lu.nexus_gone(&session.nexus).await;
        }
    }
}

impl Conn {
    fn send(&self, p: Pdu, stat: Stat) {
        self.out.send(Out::Pdu(Box::new(p), stat));
    }

    fn reject(&self, req: &Pdu, reason: u8) {
        let mut p = Pdu::new(op::REJECT, 0x80);
        p.bhs[2] = reason;
        p.set_itt(RESERVED_TAG);
        p.data = req.bhs.to_vec();
        self.send(p, Stat::Advance);
    }

    fn send_async_logout(&self) {
        let mut p = Pdu::new(op::ASYNC, 0x80);
        p.set_itt(RESERVED_TAG);
        p.bhs[36] = 1; // the target requests a logout
        p.set_u16(38, 0);
        p.set_u16(40, 0);
        p.set_u16(42, ASYNC_LOGOUT_SECS);
        self.send(p, Stat::Advance);
        tracing::info!(initiator = %self.session.initiator_name, tsih = self.session.tsih,
            "node stopping: asked the initiator to log out");
    }

    /// Window check for a non-immediate PDU; false means ignore it.
    fn accept_cmdsn(&self, p: &Pdu) -> bool {
        if p.immediate() {
            return true;
        }
        let (check, exp, max) = {
            let mut w = lock(&self.session.window);
            let c = w.receive(p.cmdsn());
            (c, w.exp_cmdsn, w.max_cmdsn)
        };
        if check == CmdSnCheck::Ignore {
            tracing::warn!(peer = %self.peer, cmdsn = p.cmdsn(), exp_cmdsn = exp, max_cmdsn = max,
                opcode = p.opcode(), "PDU outside the command window ignored");
            return false;
        }
        true
    }

    /// Handles one PDU; Ok(false) ends the connection cleanly.
    async fn handle(&mut self, p: Pdu) -> Result<bool, Fatal> {
        tracing::trace!(
            opcode = p.opcode(),
            flags = p.flags(),
            itt = p.itt(),
            cmdsn = p.cmdsn(),
            data = p.data.len(),
            "PDU in"
        );
        if p.data_digest_bad {
            tracing::warn!(peer = %self.peer, opcode = p.opcode(), itt = p.itt(),
                "data digest error: PDU rejected");
            if p.opcode() == op::DATA_OUT {
                // At ErrorRecoveryLevel 0 a lost Data-Out cannot be asked
                // for again: the connection (and the command) must go.
                return Err(fatal("data digest error in Data-Out"));
            }
            self.reject(&p, reject::DATA_DIGEST);
            return Ok(true);
        }
        if self.session.kind == SessionKind::Discovery
            && !matches!(p.opcode(), op::TEXT | op::LOGOUT | op::NOP_OUT)
        {
            self.reject(&p, reject::PROTOCOL_ERROR);
            return Err(fatal(format!(
                "opcode {:#04x} in a discovery session",
                p.opcode()
            )));
        }
        match p.opcode() {
            op::SCSI_CMD => self.scsi_command(p),
            op::DATA_OUT => self.data_out(p),
            op::NOP_OUT => {
                self.nop_out(p);
                Ok(true)
            }
            op::TASK_MGMT => {
                self.task_mgmt(p);
                Ok(true)
            }
            op::TEXT => {
                self.text(p).await;
                Ok(true)
            }
            op::LOGOUT => self.logout(p).await,
            op::LOGIN => {
                self.reject(&p, reject::PROTOCOL_ERROR);
                Err(fatal("login request in the full feature phase"))
            }
            op::SNACK => {
                // ErrorRecoveryLevel 0: nothing to resend.
                self.reject(&p, reject::COMMAND_NOT_SUPPORTED);
                Ok(true)
            }
            other => {
                tracing::warn!(peer = %self.peer, opcode = other, "unknown opcode rejected");
                self.reject(&p, reject::COMMAND_NOT_SUPPORTED);
                Ok(true)
            }
        }
    }

    /// A fresh target transfer tag: never 0 or the reserved 0xffffffff.
    fn take_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        t
    }

    /// A NOP-In ping (RFC 7143 11.19.2): a valid target transfer tag asks
    /// the initiator for a NOP-Out; StatSN is not consumed.
    fn ping(&mut self) {
        let mut p = Pdu::new(op::NOP_IN, 0x80);
        p.set_itt(RESERVED_TAG);
        p.set_u32(20, self.take_ttt());
        self.send(p, Stat::Current);
        tracing::debug!(peer = %self.peer, tsih = self.session.tsih, "NOP-In ping");
    }

    fn nop_out(&self, p: Pdu) {
        if !self.accept_cmdsn(&p) {
            return;
        }
        if p.itt() == RESERVED_TAG {
            return; // an answer to a ping of ours
        }
        let mut r = Pdu::new(op::NOP_IN, 0x80);
        r.set_lun(p.lun());
        r.set_itt(p.itt());
        r.set_u32(20, RESERVED_TAG);
        let n = p.data.len().min(self.params.max_xmit_data_segment as usize);
        r.data = p.data[..n].to_vec();
        self.send(r, Stat::Advance);
    }

    fn scsi_command(&mut self, mut p: Pdu) -> Result<bool, Fatal> {
        if !self.accept_cmdsn(&p) {
            return Ok(true);
        }
        let itt = p.itt();
        let flags = p.flags();
        let (read, write) = (flags & 0x40 != 0, flags & 0x20 != 0);
        let edtl = p.u32_at(20);
        let mut cdb = p.bhs[32..48].to_vec();
        // Extended CDB AHS (type 1): the bytes beyond the first 16.
        if let (Some(len), Some(1)) = (
            p.ahs
                .get(0..2)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))),
            p.ahs.get(2),
        ) {
            if let Some(ext) = p.ahs.get(4..4 + len.saturating_sub(1)) {
                cdb.extend_from_slice(ext);
            }
        }
        let lun = scsi::decode_lun(p.lun()).unwrap_or(u64::MAX);
        if lock(&self.running).contains_key(&itt) || self.writes.contains_key(&itt) {
            self.reject(&p, reject::PROTOCOL_ERROR);
            return Err(fatal(format!("task tag {itt:#x} already in use")));
        }
        if !write {
            if !p.data.is_empty() {
                self.reject(&p, reject::PROTOCOL_ERROR);
                return Err(fatal("immediate data on a command without the W bit"));
            }
            self.start(itt, lun, cdb, edtl, read, Vec::new(), p.immediate());
            return Ok(true);
        }
        let imm = p.data.len() as u32;
        if imm > edtl || (imm > 0 && !self.params.immediate_data) || imm > self.params.first_burst {
            self.reject(&p, reject::PROTOCOL_ERROR);
            return Err(fatal(format!(
                "immediate data of {imm} bytes not allowed (EDTL {edtl}, FirstBurstLength {})",
                self.params.first_burst
            )));
        }
        if edtl > MAX_TRANSFER {
            return Err(fatal(format!(
                "write of {edtl} bytes exceeds the {MAX_TRANSFER}-byte transfer limit"
            )));
        }
        // The immediate data starts the buffer (the reader made room for
        // the rest): not copied.
        let mut buf = std::mem::take(&mut p.data);
        buf.reserve_exact((edtl as usize).saturating_sub(buf.len()));
        let mut w = PendingWrite {
            lun,
            cdb,
            edtl,
            immediate: p.immediate(),
            buf,
            seqs: Vec::new(),
            next_r2t: imm,
            r2tsn: 0,
        };
        let unsolicited = !self.params.initial_r2t && !p.final_bit();
        if unsolicited {
            let end = edtl.min(self.params.first_burst);
            if end > imm {
                w.seqs.push(Seq {
                    ttt: RESERVED_TAG,
                    offset: imm,
                    len: end - imm,
                    received: 0,
                    next_datasn: 0,
                });
                w.next_r2t = end;
            }
        }
        if w.buf.len() as u32 == edtl {
            self.start(itt, w.lun, w.cdb, edtl, read, w.buf, w.immediate);
            return Ok(true);
        }
        self.issue_r2ts(itt, &mut w);
        self.writes.insert(itt, w);
        Ok(true)
    }

    fn issue_r2ts(&mut self, itt: u32, w: &mut PendingWrite) {
        let solicited = w.seqs.iter().filter(|s| s.ttt != RESERVED_TAG).count() as u32;
        // Unsolicited data comes first; R2Ts follow once it is in.
        if w.seqs.iter().any(|s| s.ttt == RESERVED_TAG) {
            return;
        }
        let mut outstanding = solicited;
        while outstanding < self.params.max_outstanding_r2t && w.next_r2t < w.edtl {
            let len = (w.edtl - w.next_r2t).min(self.params.max_burst);
            let ttt = self.take_ttt();
            let mut r = Pdu::new(op::R2T, 0x80);
            r.set_lun(scsi::encode_lun(w.lun));
            r.set_itt(itt);
            r.set_u32(20, ttt);
            r.set_u32(36, w.r2tsn);
            r.set_u32(40, w.next_r2t);
            r.set_u32(44, len);
            self.send(r, Stat::Current);
            w.seqs.push(Seq {
                ttt,
                offset: w.next_r2t,
                len,
                received: 0,
                next_datasn: 0,
            });
            w.r2tsn += 1;
            w.next_r2t += len;
            outstanding += 1;
        }
    }

    /// Reads a Data-Out's data segment: into the buffer of its write when
    /// it is that buffer's next piece (no copy), else into the PDU (for
    /// [`Self::data_out`] to judge). Data gathered for a Data-Out that then
    /// breaks a rule goes with its failed write.
    async fn read_data_out(
        &mut self,
        rd: &mut PduReader,
        p: &mut Pdu,
        limits: ReadLimits,
    ) -> Result<(), PduError> {
        let at = p.u32_at(40) as usize;
        let len = p.data_segment_len() as usize;
        match self.writes.get_mut(&p.itt()) {
            Some(w) if at == w.buf.len() && at + len <= w.edtl as usize => {
                pdu::read_data_into(rd, p, &mut w.buf, limits).await?;
                p.gathered = true;
            }
            _ => {
                let mut data = Vec::new();
                pdu::read_data_into(rd, p, &mut data, limits).await?;
                p.data = data;
            }
        }
        Ok(())
    }

    fn data_out(&mut self, p: Pdu) -> Result<bool, Fatal> {
        let itt = p.itt();
        let Some(mut w) = self.writes.remove(&itt) else {
            // Data for a task that was aborted (or never existed): the
            // initiator may still be sending it; drop it quietly.
            tracing::debug!(peer = %self.peer, itt, "Data-Out for no pending write dropped");
            return Ok(true);
        };
        let ttt = p.u32_at(20);
        let datasn = p.u32_at(36);
        let offset = p.u32_at(40);
        let len = if p.gathered {
            p.data_segment_len()
        } else {
            p.data.len() as u32
        };
        // What the buffer held before this PDU.
        let have = w.buf.len() - if p.gathered { len as usize } else { 0 };
        let Some(si) = w.seqs.iter().position(|s| s.ttt == ttt) else {
            return Ok(self.fail_write(itt, w, &format!("Data-Out with unknown TTT {ttt:#x}")));
        };
        let s = &mut w.seqs[si];
        let problem = if datasn != s.next_datasn {
            Some(format!(
                "Data-Out DataSN {datasn}, expected {}",
                s.next_datasn
            ))
        } else if offset != s.offset + s.received || s.received + len > s.len {
            Some(format!(
                "Data-Out at offset {offset}+{len} outside its sequence {}+{} (received {})",
                s.offset, s.len, s.received
            ))
        } else if offset as usize != have {
            // DataSequenceInOrder=Yes: sequences do not interleave, and the
            // buffer is gathered in arrival order, so data for a later R2T
            // before an earlier one is complete would land at the wrong
            // offset.
            Some(format!(
                "Data-Out at offset {offset} while the data before it is incomplete ({have} bytes)"
            ))
        } else {
            let complete = s.received + len == s.len;
            // F ends a sequence; unsolicited data may end early.
            (p.final_bit() != complete && !(p.final_bit() && s.ttt == RESERVED_TAG))
                .then(|| "Data-Out F bit disagrees with the sequence length".to_string())
        };
        if let Some(problem) = problem {
            return Ok(self.fail_write(itt, w, &problem));
        }
        s.next_datasn += 1;
        s.received += len;
        if !p.gathered {
            w.buf.extend_from_slice(&p.data);
        }
        if p.final_bit() {
            let s = w.seqs.remove(si);
            if s.ttt == RESERVED_TAG && s.received < s.len {
                // The initiator ended unsolicited data early: solicit the rest.
                w.next_r2t = s.offset + s.received;
            }
        }
        if w.buf.len() as u32 == w.edtl {
            let PendingWrite {
                lun,
                cdb,
                edtl,
                immediate,
                buf,
                ..
            } = w;
            self.start(itt, lun, cdb, edtl, false, buf, immediate);
            return Ok(true);
        }
        self.issue_r2ts(itt, &mut w);
        self.writes.insert(itt, w);
        Ok(true)
    }

    /// A write dropped before it ran: its CmdSN slot is free again.
    fn release_slot(&self, w: &PendingWrite) {
        if !w.immediate {
            lock(&self.session.window).complete();
        }
    }

    /// Ends a write whose Data-Out broke the sequence rules: the command
    /// fails with ABORTED COMMAND / DATA PHASE ERROR and the connection
    /// stays (what else the initiator still sends for it is dropped). Other
    /// commands, and the data of earlier writes, are untouched.
    fn fail_write(&mut self, itt: u32, w: PendingWrite, problem: &str) -> bool {
        tracing::warn!(peer = %self.peer, itt, problem, "write failed: bad Data-Out");
        self.release_slot(&w);
        // ABORTED COMMAND / DATA PHASE ERROR
        let resp = ScsiResponse::check(&Sense::new(0x0b, 0x4b, 0x00));
        self.out
            .send_all(respond(itt, w.lun, w.edtl, false, resp, 0, &self.params));
        true
    }

    /// Runs a command whose Data-Out is complete.
    #[allow(clippy::too_many_arguments)]
    fn start(
        &self,
        itt: u32,
        lun: u64,
        cdb: Vec<u8>,
        edtl: u32,
        read: bool,
        data_out: Vec<u8>,
        immediate: bool,
    ) {
        let aborted = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = watch::channel(false);
        let alone = {
            let mut running = lock(&self.running);
            running.insert(
                itt,
                Running {
                    lun,
                    aborted: aborted.clone(),
                    done: done_rx,
                },
            );
            running.len() == 1
        };
        let session = self.session.clone();
        let out = self.out.clone();
        let running = self.running.clone();
        let params = self.params;
        let write = !data_out.is_empty() || (!read && edtl > 0);
        let inline = edtl <= INLINE_MAX && (!write || alone);
        let mut task = Box::pin(async move {
            let (resp, residual) = execute(&session, lun, &cdb, edtl, read, write, data_out).await;
            // The slot frees before the status goes out, so the MaxCmdSN the
            // initiator reads already counts it (and never runs ahead of us).
            if !immediate {
                lock(&session.window).complete();
            }
            // Whoever claims the task first wins: this response, or an abort.
            if !aborted.swap(true, Ordering::SeqCst) {
                out.send_all(respond(itt, lun, edtl, read, resp, residual, &params));
            }
            lock(&running).remove(&itt);
            let _ = done_tx.send(true);
        });
        // A read from the page cache is done on its first poll: run that
        // here rather than in a task of its own, and with the answers held
        // while more commands are buffered, a batch of reads is answered in
        // one write (4 KiB reads at queue depth 32 on an RF1 owner: 60-66k
        // -> 110-125k IOPS). A command that has to wait moves on to a task,
        // which polls it again with its own waker (a future must only wake
        // the waker of its latest poll, so the no-op one here loses
        // nothing). A write runs here only when no other command of the
        // connection is running: with several, its copy into the page cache
        // and its replica sends held up the reading of the next PDUs (RF2
        // 4 KiB writes at queue depth 32 lost 10-25 %); alone, it saves the
        // task (RF1 4 KiB writes at queue depth 4: 18.5-25.2k -> 24.9-28.6k
        // IOPS; depth 1 and 32, and RF2, unchanged). Large reads and writes
        // always get a task.
        if inline {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if task.as_mut().poll(&mut cx).is_ready() {
                return;
            }
        }
        tokio::spawn(task);
    }

    fn task_mgmt(&mut self, p: Pdu) {
        if !self.accept_cmdsn(&p) {
            return;
        }
        let function = p.flags() & 0x7f;
        let lun = scsi::decode_lun(p.lun()).unwrap_or(u64::MAX);
        let reference = p.u32_at(20);
        let lun_known = self.session.luns.contains_key(&lun);
        // Tasks still collecting data are dropped here (we own them);
        // running ones are waited for in the background.
        // Logical units to reset before the response leaves (on the node
        // that serves each, which may mean a round trip).
        let mut resets: Vec<Arc<LogicalUnit>> = Vec::new();
        let (response, waits): (u8, Vec<watch::Receiver<bool>>) = match function {
            1 => {
                if let Some(w) = self.writes.remove(&reference) {
                    self.release_slot(&w);
                    (0, Vec::new())
                } else if let Some(r) = lock(&self.running)
                    .get(&reference)
                    .filter(|r| !r.aborted.swap(true, Ordering::SeqCst))
                {
                    (0, vec![r.done.clone()])
                } else {
                    // RFC 7143 11.5.1: a command not received yet (RefCmdSN
                    // still ahead in the window) counts as aborted; one that
                    // already answered no longer exists.
                    let ahead = lock(&self.session.window).in_window(p.u32_at(32));
                    (if ahead { 0 } else { 1 }, Vec::new())
                }
            }
            2 | 4 | 5 | 6 | 7 => {
                let all_luns = function >= 6;
                if !all_luns && !lun_known {
                    (2, Vec::new())
                } else {
                    let dropped: Vec<u32> = self
                        .writes
                        .iter()
                        .filter(|(_, w)| all_luns || w.lun == lun)
                        .map(|(k, _)| *k)
                        .collect();
                    for k in dropped {
                        if let Some(w) = self.writes.remove(&k) {
                            self.release_slot(&w);
                        }
                    }
                    let waits = lock(&self.running)
                        .values()
                        .filter(|r| all_luns || r.lun == lun)
                        .map(|r| {
                            r.aborted.store(true, Ordering::SeqCst);
                            r.done.clone()
                        })
                        .collect();
                    match function {
                        5 => resets.extend(self.session.luns.get(&lun).cloned()),
                        6 | 7 => resets.extend(self.session.luns.values().cloned()),
                        _ => {}
                    }
                    (0, waits)
                }
            }
            8 => (4, Vec::new()), // task reassignment needs ErrorRecoveryLevel 2
            3 => (5, Vec::new()), // CLEAR ACA: we never set NACA
            _ => (255, Vec::new()),
        };
        tracing::info!(peer = %self.peer, function, lun, reference, response,
            "task management function");
        let mut r = Pdu::new(op::TASK_MGMT_RESP, 0x80);
        r.bhs[2] = response;
        r.set_itt(p.itt());
        let out = self.out.clone();
        let close_after = function == 7 && response == 0;
        let session = self.session.clone();
        tokio::spawn(async move {
            for lu in resets {
                lu.reset(&session.nexus).await;
            }
            for mut w in waits {
                let _ = w.wait_for(|d| *d).await;
            }
            out.send(Out::Pdu(Box::new(r), Stat::Advance));
            if close_after {
                out.send(Out::Close);
            }
        });
    }

    async fn text(&mut self, p: Pdu) {
        if !self.accept_cmdsn(&p) {
            return;
        }
        let ttt = p.u32_at(20);
        let answer = match (&self.text_rest, ttt) {
            (Some((t, _)), x) if x == *t => {
                self.text_rest.take().map(|(_, d)| d).unwrap_or_default()
            }
            _ => {
                self.text_rest = None;
                let keys = pdu::parse_text(&p.data).unwrap_or_default();
                let mut out = Vec::new();
                for (k, v) in keys {
                    if k == "SendTargets" {
                        out.extend(self.send_targets(&v).await);
                    } else {
                        out.push((k, "NotUnderstood".to_string()));
                    }
                }
                pdu::build_text(&out)
            }
        };
        let max = self.params.max_xmit_data_segment as usize;
        let mut r = Pdu::new(op::TEXT_RESP, 0x80);
        r.set_itt(p.itt());
        if answer.len() > max {
            let t = self.take_ttt();
            r.bhs[1] = 0x40; // C: more follows
            r.set_u32(20, t);
            r.data = answer[..max].to_vec();
            self.text_rest = Some((t, answer[max..].to_vec()));
        } else {
            r.set_u32(20, RESERVED_TAG);
            r.data = answer;
        }
        self.send(r, Stat::Advance);
    }

    async fn send_targets(&self, which: &str) -> Vec<(String, String)> {
        let portal = format!(
            "{},{}",
            self.shared.cfg.portal, self.shared.cfg.portal_group_tag
        );
        let targets = match self.shared.targets.targets().await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "SendTargets: target directory unavailable");
                return Vec::new();
            }
        };
        let initiator = &self.session.initiator_name;
        targets
            .into_iter()
            .filter(|t| match which {
                "All" => true,
                "" => t.iqn == self.session.target_name,
                name => t.iqn == name,
            })
            .filter(|t| t.admits(initiator))
            .flat_map(|t| {
                [
                    ("TargetName".to_string(), t.iqn),
                    ("TargetAddress".to_string(), portal.clone()),
                ]
            })
            .collect()
    }

    async fn logout(&mut self, p: Pdu) -> Result<bool, Fatal> {
        if !self.accept_cmdsn(&p) {
            return Ok(true);
        }
        let reason = p.flags() & 0x7f;
        let cid = p.u16_at(20);
        let response = match reason {
            0 => 0,
            1 if cid == self.cid => 0,
            1 => 1, // only this connection can be closed from here
            _ => 2, // recovery needs ErrorRecoveryLevel 2
        };
        if response == 0 {
            // Outstanding commands finish before the response (RFC 7143 11.14).
            let waits: Vec<_> = lock(&self.running)
                .values()
                .map(|r| r.done.clone())
                .collect();
            for mut w in waits {
                let _ = w.wait_for(|d| *d).await;
            }
            for (_, w) in std::mem::take(&mut self.writes) {
                self.release_slot(&w);
            }
        }
        let mut r = Pdu::new(op::LOGOUT_RESP, 0x80);
        r.bhs[2] = response;
        r.set_itt(p.itt());
        r.set_u16(40, 2);
        r.set_u16(42, 0);
        self.send(r, Stat::Advance);
        if response != 0 {
            return Ok(true);
        }
        if reason == 0 {
            let _ = self.session.closing.send(true);
        }
        Ok(false)
    }
}

/// Runs one SCSI command on the session's LUN, with the residual against
/// the initiator's expected length: (response, residual) where a positive
/// residual is an underflow and a negative one an overflow.
async fn execute(
    session: &Session,
    lun: u64,
    cdb: &[u8],
    edtl: u32,
    read: bool,
    write: bool,
    mut data_out: Vec<u8>,
) -> (ScsiResponse, i64) {
    let unit: Option<&Arc<LogicalUnit>> = session.luns.get(&lun);
    if cdb.first() == Some(&0xa0) {
        let mut luns: Vec<u64> = session.luns.keys().copied().collect();
        luns.sort_unstable();
        let r = scsi::report_luns(cdb, &luns);
        return data_in_residual(r, edtl, read);
    }
    let Some(unit) = unit else {
        return data_in_residual(scsi::no_such_lun(cdb), edtl, read);
    };
    // The CDB decides whether data flows out: with an expected length of 0
    // the initiator sets no W bit, yet the residual must say what was missing.
    if write || unit.data_out_len(cdb) > 0 {
        // The emulation takes what arrived: a write whose expected length
        // is shorter than the CDB's writes the whole blocks it got (FCP-4
        // "process the command normally except that data beyond the
        // expected length is not transferred"); the residual says so.
        let wanted = unit.data_out_len(cdb);
        data_out.truncate(edtl as usize);
        let data_out = cairn_blockdev::Bytes::from(data_out);
        let r = busy_if_transient(unit.execute_owned(&session.nexus, cdb, data_out).await);
        return (r, i64::from(edtl) - i64::from(wanted));
    }
    let r = busy_if_transient(unit.execute(&session.nexus, cdb, &[]).await);
    data_in_residual(r, edtl, read)
}

/// A vdisk that is failing over (owner change, replica set change, stale
/// epoch) answers NOT READY / BECOMING READY. QEMU's initiator turns that
/// into an I/O error in the guest, while every initiator retries BUSY: so a
/// transient state goes out as BUSY.
fn busy_if_transient(mut r: ScsiResponse) -> ScsiResponse {
    let becoming_ready = r.status == status::CHECK_CONDITION
        && r.sense.get(2).map(|k| k & 0x0f) == Some(0x02)
        && r.sense.get(12..14) == Some(&[0x04, 0x01][..]);
    if becoming_ready {
        r.status = status::BUSY;
        r.sense.clear();
        r.data_in.clear();
    }
    r
}

fn data_in_residual(mut r: ScsiResponse, edtl: u32, read: bool) -> (ScsiResponse, i64) {
    let expected = if read { edtl as usize } else { 0 };
    let n = r.data_in.len();
    if n > expected {
        r.data_in.truncate(expected);
        (r, -((n - expected) as i64))
    } else {
        let residual = if read { expected - n } else { 0 };
        (r, residual as i64)
    }
}

/// The Data-In PDUs and the status of a finished command.
fn respond(
    itt: u32,
    lun: u64,
    edtl: u32,
    read: bool,
    resp: ScsiResponse,
    residual: i64,
    params: &Params,
) -> Vec<Out> {
    let _ = edtl;
    let mut outs = Vec::new();
    let res_flags = match residual {
        r if r > 0 => 0x02,
        r if r < 0 => 0x04,
        _ => 0,
    };
    let res_count = residual.unsigned_abs().min(u64::from(u32::MAX)) as u32;
    let good = resp.status == status::GOOD || resp.status == status::CONDITION_MET;
    let data = if read && good {
        resp.data_in
    } else {
        Vec::new()
    };
    let max_pdu = params.max_xmit_data_segment.max(512) as usize;
    let burst = params.max_burst.max(512) as usize;
    let mut datasn = 0u32;
    let mut offset = 0usize;
    // Phase collapse: the last Data-In carries a GOOD status without sense.
    let collapse = !data.is_empty() && resp.sense.is_empty() && good;
    while offset < data.len() {
        let burst_end = (offset / burst + 1) * burst;
        let end = (offset + max_pdu).min(data.len()).min(burst_end);
        let last = end == data.len();
        let mut flags = 0u8;
        if last || end == burst_end {
            flags |= 0x80;
        }
        let mut p = Pdu::new(op::DATA_IN, 0);
        let mut stat = Stat::None;
        if last && collapse {
            flags |= 0x01 | res_flags;
            p.bhs[3] = resp.status;
            p.set_u32(44, res_count);
            stat = Stat::Advance;
        }
        p.bhs[1] = flags;
        p.set_lun(scsi::encode_lun(lun));
        p.set_itt(itt);
        p.set_u32(20, RESERVED_TAG);
        p.set_u32(36, datasn);
        p.set_u32(40, offset as u32);
        p.data = data[offset..end].to_vec();
        outs.push(Out::Pdu(Box::new(p), stat));
        datasn += 1;
        offset = end;
    }
    if !collapse {
        let mut p = Pdu::new(op::SCSI_RESP, 0x80 | res_flags);
        p.bhs[2] = 0;
        p.bhs[3] = resp.status;
        p.set_itt(itt);
        p.set_u32(36, datasn);
        p.set_u32(44, res_count);
        if !resp.sense.is_empty() {
            let mut d = Vec::with_capacity(resp.sense.len() + 2);
            d.extend_from_slice(&(resp.sense.len() as u16).to_be_bytes());
            d.extend_from_slice(&resp.sense);
            p.data = d;
        }
        outs.push(Out::Pdu(Box::new(p), Stat::Advance));
    }
    outs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn becoming_ready_goes_out_as_busy() {
        let r = busy_if_transient(ScsiResponse::check(&Sense::new(0x02, 0x04, 0x01)));
        assert_eq!((r.status, r.sense.len()), (status::BUSY, 0));
        let r = busy_if_transient(ScsiResponse::check(&Sense::new(0x03, 0x11, 0x00)));
        assert_eq!(r.status, status::CHECK_CONDITION);
    }

    #[test]
    fn data_in_is_split_and_collapsed() {
        let params = Params {
            max_xmit_data_segment: 1000,
            max_burst: 2000,
            ..Params::default()
        };
        let resp = ScsiResponse {
            status: status::GOOD,
            sense: Vec::new(),
            data_in: vec![7; 4500],
        };
        let outs = respond(5, 0, 4500, true, resp, 0, &params);
        assert_eq!(outs.len(), 5); // 1000,1000 | 1000,1000 | 500
        let mut total = 0;
        for (i, o) in outs.iter().enumerate() {
            let Out::Pdu(p, stat) = o else { panic!() };
            assert_eq!(p.opcode(), op::DATA_IN);
            assert_eq!(p.u32_at(36), i as u32);
            assert_eq!(p.u32_at(40), total);
            total += p.data.len() as u32;
            let last = i == outs.len() - 1;
            assert_eq!(p.flags() & 0x01 != 0, last);
            assert_eq!(*stat == Stat::Advance, last);
            assert_eq!(p.flags() & 0x80 != 0, last || i % 2 == 1);
        }
        assert_eq!(total, 4500);
    }

    #[test]
    fn check_condition_goes_in_a_response_with_sense() {
        let resp = ScsiResponse::check(&Sense::invalid_opcode());
        let outs = respond(9, 0, 512, true, resp, 512, &Params::default());
        assert_eq!(outs.len(), 1);
        let Out::Pdu(p, _) = &outs[0] else { panic!() };
        assert_eq!(p.opcode(), op::SCSI_RESP);
        assert_eq!(p.bhs[3], status::CHECK_CONDITION);
        assert_eq!(p.flags() & 0x02, 0x02);
        assert_eq!(p.u32_at(44), 512);
        assert_eq!(&p.data[..2], &[0, 18]);
    }
}
