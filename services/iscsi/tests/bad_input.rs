//! Hostile and broken initiators against a live server (on loopback, a
//! memory LUN): each bad connection is answered with the protocol's reject
//! or dropped, while a well-behaved session on the same server keeps
//! working and what it wrote before stays intact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use cairn_blockdev::mem::{MemDevice, MemService};
use cairn_iscsi::pdu::{self, op, Pdu, ReadLimits};
use cairn_iscsi::server::{serve, ServerConfig, Shared};
use cairn_iscsi::target::{LunMapping, StaticTargets, TargetConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const IQN: &str = "iqn.2026-11.io.cairn.test:bad";
const LIMITS: ReadLimits = ReadLimits {
    max_data: 1 << 24,
    header_digest: false,
    data_digest: false,
};

async fn start() -> std::net::SocketAddr {
    start_with(Duration::ZERO, Duration::ZERO).await
}

/// A server that pings silent initiators after `nop_interval` and drops
/// them `nop_timeout` after an unanswered ping.
async fn start_with(nop_interval: Duration, nop_timeout: Duration) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let blocks = MemService::with([("d0".to_string(), MemDevice::new(16 << 20))]);
    let targets = StaticTargets(vec![TargetConfig {
        iqn: IQN.into(),
        luns: vec![LunMapping {
            lun: 0,
            vdisk_id: "d0".into(),
            vdisk_name: "d0".into(),
        }],
        chap: None,
        mutual_chap: None,
        allowed_initiators: Vec::new(),
    }]);
    let (tx, rx) = tokio::sync::watch::channel(false);
    std::mem::forget(tx); // the server lives for the whole test
    tokio::spawn(serve(
        listener,
        Shared::new(
            ServerConfig {
                portal: addr,
                portal_group_tag: 1,
                nop_interval,
                nop_timeout,
            },
            blocks,
            Arc::new(targets),
        ),
        rx,
    ));
    addr
}

/// A minimal initiator: enough to log in and run SCSI commands.
struct Initiator {
    s: TcpStream,
    itt: u32,
    cmdsn: u32,
    isid: [u8; 6],
}

impl Initiator {
    /// Connects and sends the security stage (no authentication), asking
    /// to go on to stage `next`; returns the target's (successful) answer.
    async fn security(addr: std::net::SocketAddr, isid_tail: u8, next: u8) -> (Initiator, Pdu) {
        let s = TcpStream::connect(addr).await.unwrap();
        let mut i = Initiator {
            s,
            itt: 1,
            cmdsn: 1,
            isid: [0x80, 0, 0, 0, 0, isid_tail],
        };
        let mut p = Pdu::new(op::LOGIN, 0x80 | next);
        p.bhs[0] |= 0x40;
        p.bhs[8..14].copy_from_slice(&i.isid);
        p.set_itt(0);
        p.set_u32(24, 1);
        p.data = pdu::build_text(&[
            (
                "InitiatorName".into(),
                "iqn.2026-11.io.cairn.test:host".into(),
            ),
            ("TargetName".into(), IQN.into()),
            ("SessionType".into(), "Normal".into()),
            ("AuthMethod".into(), "None".into()),
        ]);
        i.send(&p).await;
        let r = i.recv().await;
        assert_eq!(r.opcode(), op::LOGIN_RESP);
        assert_eq!(r.u16_at(36), 0, "login refused");
        (i, r)
    }

    /// Security stage with no authentication, straight to full feature.
    async fn login(addr: std::net::SocketAddr, isid_tail: u8) -> Initiator {
        let (i, r) = Self::security(addr, isid_tail, 3).await;
        assert_eq!(r.flags() & 0x83, 0x83, "login did not complete");
        i
    }

    /// Logs in through the operational stage, offering `keys` there.
    async fn login_with(
        addr: std::net::SocketAddr,
        isid_tail: u8,
        keys: &[(&str, &str)],
    ) -> Initiator {
        let (mut i, r) = Self::security(addr, isid_tail, 1).await;
        let mut p = Pdu::new(op::LOGIN, 0x80 | (1 << 2) | 3);
        p.bhs[0] |= 0x40;
        p.bhs[8..14].copy_from_slice(&i.isid);
        p.bhs[14..16].copy_from_slice(&r.bhs[14..16]);
        p.set_u32(24, 1);
        p.data = pdu::build_text(
            &keys
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
        );
        i.send(&p).await;
        let r = i.recv().await;
        assert_eq!(r.opcode(), op::LOGIN_RESP);
        assert_eq!(r.u16_at(36), 0, "login refused");
        assert_eq!(r.flags() & 0x83, 0x83, "login did not complete");
        i
    }

    async fn send(&mut self, p: &Pdu) {
        self.s.write_all(&p.encode(false, false)).await.unwrap();
    }

    async fn recv(&mut self) -> Pdu {
        tokio::time::timeout(Duration::from_secs(5), pdu::read_pdu(&mut self.s, LIMITS))
            .await
            .expect("no answer in 5 s")
            .expect("connection broke")
    }

    fn command(&mut self, cdb: &[u8], flags: u8, edtl: u32) -> Pdu {
        let mut p = Pdu::new(op::SCSI_CMD, 0x80 | flags);
        p.set_itt(self.itt);
        p.set_u32(20, edtl);
        p.set_u32(24, self.cmdsn);
        p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        self.itt += 1;
        self.cmdsn += 1;
        p
    }

    /// WRITE(10) with immediate data; returns the SCSI status.
    async fn write(&mut self, lba: u32, data: &[u8]) -> u8 {
        let blocks = (data.len() / 512) as u16;
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        let mut p = self.command(&cdb, 0x20, data.len() as u32);
        p.data = data.to_vec();
        self.send(&p).await;
        let r = self.recv().await;
        assert_eq!(r.opcode(), op::SCSI_RESP);
        r.bhs[3]
    }

    async fn read(&mut self, lba: u32, blocks: u16) -> Vec<u8> {
        let p = self.command(&read10(lba, blocks), 0x40, u32::from(blocks) * 512);
        self.send(&p).await;
        let mut out = Vec::new();
        loop {
            let r = self.recv().await;
            match r.opcode() {
                op::DATA_IN => {
                    out.extend_from_slice(&r.data);
                    if r.flags() & 0x01 != 0 {
                        assert_eq!(r.bhs[3], 0);
                        return out;
                    }
                }
                op::SCSI_RESP => {
                    assert_eq!(r.bhs[3], 0, "read failed");
                    return out;
                }
                o => panic!("unexpected opcode {o:#x}"),
            }
        }
    }

    /// Sends the final Data-Out of task `itt` for the R2T tagged `ttt`.
    async fn data_out(&mut self, itt: u32, ttt: u32, datasn: u32, offset: u32, data: Vec<u8>) {
        let mut d = Pdu::new(op::DATA_OUT, 0x80);
        d.set_itt(itt);
        d.set_u32(20, ttt);
        d.set_u32(36, datasn);
        d.set_u32(40, offset);
        d.data = data;
        self.send(&d).await;
    }

    /// The next PDU is a CHECK CONDITION response, and the 8 blocks at
    /// `lba` the failed 4 KiB write was for still read as zeros.
    async fn expect_failed_and_unwritten(&mut self, lba: u32, what: &str) {
        let r = self.recv().await;
        assert_eq!((r.opcode(), r.bhs[3]), (op::SCSI_RESP, 0x02));
        assert_eq!(self.read(lba, 8).await, vec![0u8; 4096], "{what}");
    }

    /// Waits for the target's next PDU, which must be a NOP-In ping; returns
    /// its target transfer tag and StatSN.
    async fn ping(&mut self) -> (u32, u32) {
        let p = self.recv().await;
        assert_eq!(p.opcode(), op::NOP_IN, "not a NOP-In");
        assert_eq!(
            p.itt(),
            pdu::RESERVED_TAG,
            "a ping carries the reserved ITT"
        );
        let ttt = p.u32_at(20);
        assert_ne!(ttt, pdu::RESERVED_TAG, "a ping asks for an answer");
        (ttt, p.u32_at(24))
    }

    /// The NOP-Out a ping asks for (immediate, reserved ITT, its TTT).
    async fn answer_ping(&mut self, ttt: u32) {
        let mut p = Pdu::new(op::NOP_OUT, 0x80);
        p.bhs[0] |= 0x40;
        p.set_itt(pdu::RESERVED_TAG);
        p.set_u32(20, ttt);
        p.set_u32(24, self.cmdsn);
        self.send(&p).await;
    }

    /// True when the server closed the connection (EOF) within 5 s.
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue, // a reject or response first is fine
                Err(_) => return false,
            }
        }
    }
}

/// A READ(10) CDB.
fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[tokio::test]
async fn bad_initiators_do_not_disturb_a_good_session() {
    let addr = start().await;
    let mut good = Initiator::login(addr, 1).await;
    assert_eq!(good.write(8, &pattern(1)).await, 0);

    // 1. A truncated header, then the connection closes.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0x43, 0x87, 0, 0, 0, 0]).await.unwrap();
    drop(s);

    // 2. A command before login: a login reject, then the close.
    let mut bad = Initiator {
        s: TcpStream::connect(addr).await.unwrap(),
        itt: 1,
        cmdsn: 1,
        isid: [0; 6],
    };
    let p = bad.command(&[0x00; 6], 0, 0);
    bad.send(&p).await;
    let r = bad.recv().await;
    assert_eq!(r.opcode(), op::LOGIN_RESP);
    assert_eq!(r.bhs[36], 2, "initiator error class expected");
    assert!(bad.closed().await);

    // 3. A data segment longer than negotiated: dropped.
    let mut bad = Initiator::login(addr, 2).await;
    let mut p = bad.command(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0x20, 512);
    p.data = vec![0u8; (1 << 20) + 4];
    bad.send(&p).await;
    assert!(bad.closed().await, "oversized data segment not dropped");

    // 4. An unknown opcode: a reject, and the connection still works.
    let mut odd = Initiator::login(addr, 3).await;
    let mut p = Pdu::new(0x1c, 0x80);
    p.set_itt(77);
    odd.send(&p).await;
    let r = odd.recv().await;
    assert_eq!(r.opcode(), op::REJECT);
    assert_eq!(r.bhs[2], pdu::reject::COMMAND_NOT_SUPPORTED);
    assert_eq!(&r.data[..4], &p.bhs[..4]);
    assert_eq!(odd.write(16, &pattern(3)).await, 0);

    // 5. A CmdSN outside the window: ignored (no answer), then normal again.
    let mut p = odd.command(&[0u8; 6], 0, 0);
    p.set_u32(24, odd.cmdsn.wrapping_add(100_000));
    odd.cmdsn -= 1;
    odd.send(&p).await;
    let p = odd.command(&[0u8; 6], 0, 0); // TEST UNIT READY in the window
    let itt = p.itt();
    odd.send(&p).await;
    let r = odd.recv().await;
    assert_eq!((r.opcode(), r.itt()), (op::SCSI_RESP, itt));

    // 6. Garbage after login: a random header with a huge AHS/data length.
    let mut junk = Initiator::login(addr, 4).await;
    let mut raw = [0xffu8; 48];
    raw[0] = 0x01;
    junk.s.write_all(&raw).await.unwrap();
    assert!(junk.closed().await, "garbage header not dropped");

    // 7. A Data-Out sequence error fails only that command.
    let mut seq = Initiator::login(addr, 5).await;
    // WRITE(10) of 8 blocks, no immediate data: the target must R2T.
    let p = seq.command(&[0x2a, 0, 0, 0, 0, 64, 0, 0, 8, 0], 0x20, 4096);
    let itt = p.itt();
    seq.send(&p).await;
    let r2t = seq.recv().await;
    assert_eq!(r2t.opcode(), op::R2T);
    let wrong_datasn = 5;
    seq.data_out(itt, r2t.u32_at(20), wrong_datasn, 0, vec![9u8; 4096])
        .await;
    seq.expect_failed_and_unwritten(64, "bad write left data")
        .await;

    // 8. Data-Out for a later R2T before an earlier one is complete: with
    // DataSequenceInOrder=Yes sequences may not interleave, and gathering
    // such data in arrival order would put it at the wrong offsets. Only
    // that command fails.
    let mut order = Initiator::login_with(
        addr,
        6,
        &[
            ("MaxOutstandingR2T", "2"),
            ("MaxBurstLength", "512"),
            ("FirstBurstLength", "512"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "No"),
        ],
    )
    .await;
    let p = order.command(&[0x2a, 0, 0, 0, 0, 80, 0, 0, 8, 0], 0x20, 4096);
    let itt = p.itt();
    order.send(&p).await;
    let (first, second) = (order.recv().await, order.recv().await);
    assert_eq!((first.opcode(), second.opcode()), (op::R2T, op::R2T));
    assert_eq!((first.u32_at(40), second.u32_at(40)), (0, 512));
    order
        .data_out(itt, second.u32_at(20), 0, 512, vec![5u8; 512])
        .await;
    order
        .expect_failed_and_unwritten(80, "out-of-order write left data")
        .await;

    // The good session never noticed, and its data is intact.
    assert_eq!(good.read(8, 8).await, pattern(1));
    assert_eq!(good.read(16, 8).await, pattern(3));
    assert_eq!(good.write(24, &pattern(7)).await, 0);
    assert_eq!(good.read(24, 8).await, pattern(7));
}

/// A silent initiator is pinged (NOP-In with a target transfer tag; StatSN
/// not consumed). One that answers keeps its session for as long as it
/// answers; one that stops answering (a crashed host) is dropped, and
/// what it wrote stays.
#[tokio::test]
async fn silent_initiators_are_pinged_and_dead_ones_dropped() {
    let interval = Duration::from_millis(300);
    let addr = start_with(interval, Duration::from_millis(600)).await;
    let mut live = Initiator::login(addr, 1).await;
    let mut dead = Initiator::login(addr, 2).await;
    assert_eq!(dead.write(8, &pattern(2)).await, 0);
    let started = std::time::Instant::now();
    dead.ping().await;
    assert!(
        started.elapsed() >= interval - Duration::from_millis(50),
        "pinged after {:?}, before the interval",
        started.elapsed()
    );
    let mut statsn = None;
    let mut last_ttt = None;
    for _ in 0..4 {
        let (ttt, sn) = live.ping().await;
        assert_ne!(Some(ttt), last_ttt, "every ping has a tag of its own");
        assert!(
            statsn.is_none() || statsn == Some(sn),
            "a ping consumed a StatSN"
        );
        statsn = Some(sn);
        last_ttt = Some(ttt);
        live.answer_ping(ttt).await;
    }
    // 4 answered pings took > 1.2 s: `dead` stayed silent past its timeout.
    assert!(
        dead.closed().await,
        "an initiator that never answered was kept"
    );
    // The live session still works, and its next response takes the
    // StatSN the pings showed.
    let p = live.command(&[0u8; 6], 0, 0); // TEST UNIT READY
    live.send(&p).await;
    let r = live.recv().await;
    assert_eq!((r.opcode(), r.bhs[3]), (op::SCSI_RESP, 0));
    assert_eq!(Some(r.u32_at(24)), statsn, "the pings consumed StatSNs");
    assert_eq!(
        live.read(8, 8).await,
        pattern(2),
        "the dropped session's write"
    );
}

/// An initiator that stops reading (and sending) is dropped by the ping
/// timeout, and then loses its socket too: the answers queued for it are
/// thrown away after 5 s instead of waiting for it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initiator_that_stops_reading_loses_its_socket() {
    let addr = start_with(Duration::from_millis(300), Duration::from_millis(300)).await;
    let mut stuck = Initiator::login(addr, 3).await;
    // 32 reads of 2 MiB: far more than loopback socket buffers hold.
    let (reads, blocks) = (32u32, 4096u16);
    for i in 0..reads {
        let cdb = read10(i % 8 * u32::from(blocks), blocks);
        let p = stuck.command(&cdb, 0x40, u32::from(blocks) * 512);
        stuck.send(&p).await;
    }
    // Ping after 0.3 s, dropped 0.3 s later, writer given up 5 s after that.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut total = 0u64;
    let mut b = vec![0u8; 1 << 20];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stuck.s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => total += n as u64,
            Err(_) => panic!("socket still open after {total} bytes"),
        }
    }
    let queued = u64::from(reads) * u64::from(blocks) * 512;
    assert!(
        total < queued,
        "all {queued} bytes were delivered: the writer was not stopped"
    );
    // The server itself is fine.
    let mut fresh = Initiator::login(addr, 4).await;
    assert_eq!(fresh.read(0, 8).await.len(), 4096);
}
