//! Tests of the SCSI emulation on an in-memory thin-provisioned device.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;

type MemDisk = cairn_blockdev::mem::MemDevice;

const BS: usize = 512;

fn nexus(name: &str) -> Nexus {
    Nexus {
        initiator_name: name.to_string(),
        initiator_port: format!("{name},i,0x000000000001"),
        target_name: "iqn.2024-01.io.cairn:t1".to_string(),
        target_port: 1,
    }
}

fn lu_with(disk: Arc<MemDisk>) -> LogicalUnit {
    LogicalUnit::new(
        disk,
        LunIdentity {
            vdisk_id: "vd-0001".to_string(),
            vdisk_name: "boot disk".to_string(),
        },
    )
}

fn setup() -> (Arc<MemDisk>, LogicalUnit) {
    let disk = MemDisk::new(4 << 20);
    (disk.clone(), lu_with(disk))
}

fn cdb10(opcode: u8, flags: u8, lba: u32, len: u16) -> Vec<u8> {
    let mut c = vec![opcode, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&len.to_be_bytes());
    c.push(0);
    c
}

fn cdb16(opcode: u8, flags: u8, lba: u64, len: u32) -> Vec<u8> {
    let mut c = vec![opcode, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&len.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

fn sense_of(r: &ScsiResponse) -> (u8, u8, u8) {
    assert_eq!(r.status, status::CHECK_CONDITION, "{r:?}");
    (r.sense[2] & 0x0F, r.sense[12], r.sense[13])
}

/// PERSISTENT RESERVE OUT with the basic 24-byte parameter list.
pub(crate) fn pr_out(sa: u8, ty: u8, key: u64, sa_key: u64) -> (Vec<u8>, Vec<u8>) {
    let cdb = vec![0x5F, sa, ty, 0, 0, 0, 0, 0, 24, 0];
    let mut p = key.to_be_bytes().to_vec();
    p.extend_from_slice(&sa_key.to_be_bytes());
    p.extend_from_slice(&[0u8; 8]);
    (cdb, p)
}

async fn pr(lu: &LogicalUnit, n: &Nexus, sa: u8, ty: u8, key: u64, sa_key: u64) -> u8 {
    let (c, p) = pr_out(sa, ty, key, sa_key);
    lu.execute(n, &c, &p).await.status
}

#[tokio::test]
async fn write_then_read_round_trips() {
    let (_, lu) = setup();
    let a = nexus("iqn.a");
    let data: Vec<u8> = (0..4 * BS).map(|i| (i % 251) as u8).collect();
    let r = lu.execute(&a, &cdb10(0x2A, 0x08, 10, 4), &data).await;
    assert_eq!(r.status, status::GOOD);
    let r = lu.execute(&a, &cdb16(0x88, 0, 10, 4), &[]).await;
    assert_eq!(r.status, status::GOOD);
    assert_eq!(r.data_in, data);
    let r = lu.execute(&a, &[0x08, 0, 0, 11, 1, 0], &[]).await;
    assert_eq!(r.data_in, data[BS..2 * BS]);
    assert_eq!(lu.data_out_len(&cdb10(0x2A, 0, 10, 4)), 4 * BS as u32);
}

#[tokio::test]
async fn out_of_range_and_bad_fields_have_proper_sense() {
    let (disk, lu) = setup();
    let a = nexus("iqn.a");
    let blocks = (4 << 20) / BS as u32;
    let r = lu.execute(&a, &cdb10(0x28, 0, blocks - 1, 2), &[]).await;
    assert_eq!(sense_of(&r), (5, 0x21, 0));
    let r = lu.execute(&a, &cdb10(0x28, 0x20, 0, 1), &[]).await;
    assert_eq!(sense_of(&r), (5, 0x24, 0));
    // SKSV, C/D, field pointer byte 1.
    assert_eq!(r.sense[15] & 0xC0, 0xC0);
    assert_eq!(u16::from_be_bytes([r.sense[16], r.sense[17]]), 1);
    let r = lu.execute(&a, &[0xC5, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(sense_of(&r), (5, 0x20, 0));
    disk.fail_reads.store(true, Ordering::Relaxed);
    let r = lu.execute(&a, &cdb10(0x28, 0, 0, 1), &[]).await;
    assert_eq!(sense_of(&r), (3, 0x11, 0));
}

#[tokio::test]
async fn compare_and_write_reports_miscompare_offset() {
    let (_, lu) = setup();
    let a = nexus("iqn.a");
    lu.execute(&a, &cdb10(0x2A, 0, 0, 2), &vec![b'A'; 2 * BS])
        .await;
    let mut buf = vec![b'A'; 2 * BS];
    buf[2 * BS - 27] = b'C';
    buf.extend(vec![b'B'; 2 * BS]);
    let caw = |n: u8| {
        let mut c = cdb16(0x89, 0, 0, 0);
        c[13] = n;
        c
    };
    assert_eq!(lu.data_out_len(&caw(2)), 4 * BS as u32);
    let r = lu.execute(&a, &caw(2), &buf).await;
    assert_eq!(sense_of(&r), (0x0E, 0x1D, 0));
    assert_eq!(r.sense[0], 0xF0, "VALID set");
    let info = u32::from_be_bytes([r.sense[3], r.sense[4], r.sense[5], r.sense[6]]);
    assert_eq!(info as usize, 2 * BS - 27);
    let r = lu.execute(&a, &cdb10(0x28, 0, 0, 2), &[]).await;
    assert!(r.data_in.iter().all(|b| *b == b'A'));
    buf[2 * BS - 27] = b'A';
    assert_eq!(lu.execute(&a, &caw(2), &buf).await.status, status::GOOD);
    let r = lu.execute(&a, &cdb10(0x28, 0, 0, 2), &[]).await;
    assert!(r.data_in.iter().all(|b| *b == b'B'));
    // Data-Out that does not match the CDB is refused.
    let r = lu.execute(&a, &caw(1), &buf).await;
    assert_eq!(sense_of(&r), (5, 0x24, 0));
}

#[tokio::test]
async fn unmap_then_get_lba_status() {
    let (_, lu) = setup();
    let a = nexus("iqn.a");
    lu.execute(&a, &cdb10(0x2A, 0, 0, 32), &vec![7u8; 32 * BS])
        .await;
    let mut param = vec![0, 22, 0, 16, 0, 0, 0, 0];
    param.extend_from_slice(&8u64.to_be_bytes());
    param.extend_from_slice(&8u32.to_be_bytes());
    param.extend_from_slice(&[0; 4]);
    let unmap = [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0];
    assert_eq!(lu.data_out_len(&unmap), 24);
    assert_eq!(lu.execute(&a, &unmap, &param).await.status, status::GOOD);
    let r = lu.execute(&a, &cdb10(0x28, 0, 8, 8), &[]).await;
    assert!(r.data_in.iter().all(|b| *b == 0));

    let mut gls = cdb16(0x9E, 0x12, 0, 4096);
    let r = lu.execute(&a, &gls, &[]).await;
    assert_eq!(r.status, status::GOOD);
    let d = &r.data_in;
    let desc = |i: usize| {
        let at = 8 + 16 * i;
        (
            u64::from_be_bytes(d[at..at + 8].try_into().unwrap()),
            u32::from_be_bytes(d[at + 8..at + 12].try_into().unwrap()),
            d[at + 12],
        )
    };
    assert_eq!(desc(0), (0, 8, 0));
    assert_eq!(desc(1), (8, 8, 1));
    assert_eq!(desc(2), (16, 16, 0));
    // Starting inside a run: the first descriptor starts at the LBA asked.
    gls[9] = 10;
    let r = lu.execute(&a, &gls, &[]).await;
    assert_eq!(u64::from_be_bytes(r.data_in[8..16].try_into().unwrap()), 10);
    let r = lu.execute(&a, &cdb16(0x9E, 0x12, u64::MAX, 24), &[]).await;
    assert_eq!(sense_of(&r), (5, 0x21, 0));
}

#[tokio::test]
async fn write_same_unmap_reads_zero_and_checks_sizes() {
    let (_, lu) = setup();
    let a = nexus("iqn.a");
    lu.execute(&a, &cdb10(0x2A, 0, 0, 16), &vec![0xFFu8; 16 * BS])
        .await;
    let r = lu.execute(&a, &cdb10(0x41, 0x08, 0, 16), &[0u8; BS]).await;
    assert_eq!(r.status, status::GOOD);
    let r = lu.execute(&a, &cdb10(0x28, 0, 0, 16), &[]).await;
    assert!(r.data_in.iter().all(|b| *b == 0));
    let r = lu.execute(&a, &cdb10(0x41, 0, 0, 3), &[0xA5u8; BS]).await;
    assert_eq!(r.status, status::GOOD);
    let r = lu.execute(&a, &cdb10(0x28, 0, 0, 3), &[]).await;
    assert!(r.data_in.iter().all(|b| *b == 0xA5));
    // WSNZ, and Data-Out of the wrong size.
    assert_eq!(
        sense_of(&lu.execute(&a, &cdb10(0x41, 0, 0, 0), &[0u8; BS]).await).1,
        0x24
    );
    assert_ne!(
        lu.execute(&a, &cdb10(0x41, 0x08, 0, 1), &[0u8; BS / 2])
            .await
            .status,
        status::GOOD
    );
    assert_ne!(
        lu.execute(&a, &cdb10(0x41, 0x08, 0, 1), &[0u8; 2 * BS])
            .await
            .status,
        status::GOOD
    );
}

#[tokio::test]
async fn persistent_reservations_follow_the_conflict_rules() {
    let (_, lu) = setup();
    let (a, b) = (nexus("iqn.a"), nexus("iqn.b"));
    let read = cdb10(0x28, 0, 1, 1);
    let write = cdb10(0x2A, 0, 1, 1);
    let blk = vec![1u8; BS];
    assert_eq!(pr(&lu, &a, 6, 0, 0, 0xAA).await, status::GOOD);
    assert_eq!(pr(&lu, &b, 6, 0, 0, 0xBB).await, status::GOOD);
    // RESERVE with the wrong key conflicts.
    assert_eq!(
        pr(&lu, &a, 1, 1, 0xBB, 0).await,
        status::RESERVATION_CONFLICT
    );
    // Write Exclusive: others read, only the holder writes.
    assert_eq!(pr(&lu, &a, 1, 1, 0xAA, 0).await, status::GOOD);
    assert_eq!(lu.execute(&b, &read, &[]).await.status, status::GOOD);
    assert_eq!(
        lu.execute(&b, &write, &blk).await.status,
        status::RESERVATION_CONFLICT
    );
    assert_eq!(lu.execute(&a, &write, &blk).await.status, status::GOOD);
    // Releasing with another type is an invalid release.
    let (c, p) = pr_out(2, 3, 0xAA, 0);
    assert_eq!(sense_of(&lu.execute(&a, &c, &p).await), (5, 0x26, 4));
    assert_eq!(pr(&lu, &a, 2, 1, 0xAA, 0).await, status::GOOD);
    // Exclusive Access: others can not even read.
    assert_eq!(pr(&lu, &a, 1, 3, 0xAA, 0).await, status::GOOD);
    assert_eq!(
        lu.execute(&b, &read, &[]).await.status,
        status::RESERVATION_CONFLICT
    );
    // Holder unregisters: the reservation goes with it.
    assert_eq!(pr(&lu, &a, 0, 0, 0xAA, 0).await, status::GOOD);
    assert_eq!(lu.execute(&b, &read, &[]).await.status, status::GOOD);
    // Registrants only: registered nexuses may write.
    assert_eq!(pr(&lu, &a, 6, 0, 0, 0xAA).await, status::GOOD);
    assert_eq!(pr(&lu, &a, 1, 5, 0xAA, 0).await, status::GOOD);
    assert_eq!(lu.execute(&b, &write, &blk).await.status, status::GOOD);
    let c = nexus("iqn.c");
    assert_eq!(
        lu.execute(&c, &write, &blk).await.status,
        status::RESERVATION_CONFLICT
    );
    assert_eq!(lu.execute(&c, &read, &[]).await.status, status::GOOD);

    // READ KEYS, then PREEMPT of a's key by b bumps the generation.
    let rk = [0x5E, 0, 0, 0, 0, 0, 0, 0x40, 0, 0];
    let r = lu.execute(&a, &rk, &[]).await;
    let gen = u32::from_be_bytes(r.data_in[0..4].try_into().unwrap());
    assert_eq!(u32::from_be_bytes(r.data_in[4..8].try_into().unwrap()), 16);
    assert_eq!(pr(&lu, &b, 4, 5, 0xBB, 0xAA).await, status::GOOD);
    // a was preempted: it sees a unit attention first.
    assert_eq!(
        sense_of(&lu.execute(&a, &[0, 0, 0, 0, 0, 0], &[]).await),
        (6, 0x2A, 5)
    );
    let r = lu.execute(&a, &rk, &[]).await;
    assert_eq!(
        u32::from_be_bytes(r.data_in[0..4].try_into().unwrap()),
        gen + 1
    );
    assert_eq!(r.data_in[8..16], 0xBBu64.to_be_bytes());
    // Service actions 4.. of PERSISTENT RESERVE IN are refused.
    let r = lu
        .execute(&a, &[0x5E, 4, 0, 0, 0, 0, 0, 0x40, 0, 0], &[])
        .await;
    assert_eq!(sense_of(&r).1, 0x24);
    // SPEC_I_PT and ALL_TG_PT are not supported.
    for flag in [0x08u8, 0x04] {
        let (c, mut p) = pr_out(6, 0, 0, 0xCC);
        p[20] = flag;
        assert_eq!(sense_of(&lu.execute(&a, &c, &p).await).1, 0x26);
    }
}

#[tokio::test]
async fn aptpl_follows_the_last_register_and_is_kept_with_the_vdisk() {
    let (disk, lu) = setup();
    let (a, b) = (nexus("iqn.a"), nexus("iqn.b"));
    let caps = [0x5E, 2, 0, 0, 0, 0, 0, 0, 8, 0];
    let ptpl = |r: &ScsiResponse| (r.data_in[2] & 1, r.data_in[3] & 1);
    assert_eq!(
        ptpl(&lu.execute(&a, &caps, &[]).await),
        (1, 0),
        "capable, not active"
    );
    let register = |n: &Nexus, key: u64, sa_key: u64, aptpl: bool| {
        let (c, mut p) = pr_out(if key == 0 { 6 } else { 0 }, 0, key, sa_key);
        p[20] = u8::from(aptpl);
        let lu = &lu;
        let n = n.clone();
        async move { lu.execute(&n, &c, &p).await.status }
    };
    assert_eq!(register(&a, 0, 0xAA, true).await, status::GOOD);
    assert_eq!(ptpl(&lu.execute(&a, &caps, &[]).await), (1, 1));
    // Other service actions ignore the bit.
    let (c, mut p) = pr_out(1, 1, 0xAA, 0);
    p[20] = 1;
    assert_eq!(lu.execute(&a, &c, &p).await.status, status::GOOD);
    let (c, p) = pr_out(2, 1, 0xAA, 0);
    assert_eq!(lu.execute(&a, &c, &p).await.status, status::GOOD);
    assert_eq!(ptpl(&lu.execute(&a, &caps, &[]).await), (1, 1));
    // The last REGISTER that sets a key decides, for everyone...
    assert_eq!(register(&b, 0, 0xBB, false).await, status::GOOD);
    assert_eq!(ptpl(&lu.execute(&a, &caps, &[]).await), (1, 0));
    assert_eq!(register(&b, 0xBB, 0xBC, true).await, status::GOOD);
    assert_eq!(ptpl(&lu.execute(&b, &caps, &[]).await), (1, 1));
    // ...and it is saved with the registrations.
    use cairn_blockdev::BlockDevice as _;
    use prost::Message as _;
    let saved = disk
        .load_state(crate::scsi::lu::PR_STATE_KEY)
        .await
        .unwrap()
        .unwrap();
    let saved = cairn_api::iscsi::v1::PersistentReservations::decode(saved.as_slice()).unwrap();
    assert!(saved.aptpl);
    assert_eq!(saved.registrations.len(), 2);
    // Unregistering one leaves it; the last one gone clears it.
    assert_eq!(register(&a, 0xAA, 0, false).await, status::GOOD);
    assert_eq!(ptpl(&lu.execute(&b, &caps, &[]).await), (1, 1));
    assert_eq!(register(&b, 0xBC, 0, false).await, status::GOOD);
    assert_eq!(ptpl(&lu.execute(&b, &caps, &[]).await), (1, 0));
}

#[tokio::test]
async fn spc2_reservations_and_unit_attentions() {
    let (_, lu) = setup();
    let (a, b) = (nexus("iqn.a"), nexus("iqn.b"));
    let tur = [0u8, 0, 0, 0, 0, 0];
    let mode_sense = [0x1A, 0, 0x3F, 0, 0xFF, 0];
    assert_eq!(
        lu.execute(&a, &[0x16, 0, 0, 0, 0, 0], &[]).await.status,
        status::GOOD
    );
    assert_eq!(
        lu.execute(&a, &[0x16, 0, 0, 0, 0, 0], &[]).await.status,
        status::GOOD
    );
    assert_eq!(
        lu.execute(&b, &[0x16, 0, 0, 0, 0, 0], &[]).await.status,
        status::RESERVATION_CONFLICT
    );
    assert_eq!(
        lu.execute(&b, &[0x17, 0, 0, 0, 0, 0], &[]).await.status,
        status::GOOD
    );
    assert_eq!(lu.execute(&a, &mode_sense, &[]).await.status, status::GOOD);
    assert_eq!(
        lu.execute(&b, &mode_sense, &[]).await.status,
        status::RESERVATION_CONFLICT
    );
    assert_eq!(
        lu.execute(&b, &[0x12, 0, 0, 0, 96, 0], &[]).await.status,
        status::GOOD
    );

    // A LUN reset drops the reservation and tells each known nexus once.
    lu.reset(&a).await;
    let r = lu.execute(&b, &[0x12, 0, 0, 0, 96, 0], &[]).await;
    assert_eq!(r.status, status::GOOD, "INQUIRY does not report it");
    assert_eq!(sense_of(&lu.execute(&b, &tur, &[]).await), (6, 0x29, 0));
    assert_eq!(lu.execute(&b, &tur, &[]).await.status, status::GOOD);
    let r = lu.execute(&a, &[0x03, 0, 0, 0, 18, 0], &[]).await;
    assert_eq!(
        (r.status, r.data_in[2], r.data_in[12]),
        (status::GOOD, 6, 0x29)
    );
    assert_eq!(lu.execute(&a, &tur, &[]).await.status, status::GOOD);
    // A new nexus sees no unit attention.
    assert_eq!(
        lu.execute(&nexus("iqn.c"), &tur, &[]).await.status,
        status::GOOD
    );
    assert_eq!(
        lu.execute(&b, &[0x16, 0, 0, 0, 0, 0], &[]).await.status,
        status::GOOD
    );
    // The holder's session ends: the reservation goes.
    lu.nexus_gone(&b).await;
    assert_eq!(
        lu.execute(&a, &[0x16, 0, 0, 0, 0, 0], &[]).await.status,
        status::GOOD
    );
}

#[tokio::test]
async fn inquiry_pages() {
    let (_, lu) = setup();
    let a = nexus("iqn.a");
    let r = lu.execute(&a, &[0x12, 0, 0, 0x01, 0x04, 0], &[]).await;
    let d = &r.data_in;
    assert_eq!((d[0], d[2], d[3] & 0x0F, d[7] & 0x02), (0, 6, 2, 2));
    assert_eq!(d[4] as usize, d.len() - 5);
    assert_eq!(&d[8..16], b"CAIRN   ");
    assert_eq!(&d[16..32], b"boot disk       ");
    assert_eq!(
        sense_of(&lu.execute(&a, &[0x12, 0, 0x80, 0, 255, 0], &[]).await).1,
        0x24
    );
    let r = lu.execute(&a, &[0x12, 1, 0, 0, 255, 0], &[]).await;
    assert_eq!(r.data_in[4..], [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    let r = lu.execute(&a, &[0x12, 1, 0xB0, 0, 255, 0], &[]).await;
    assert_eq!(r.data_in.len(), r.data_in[3] as usize + 4);
    // The NAA designator depends on the vdisk id only.
    let page83 = |n: &Nexus| {
        let lu2 = lu_with(MemDisk::new(1 << 20));
        let n = n.clone();
        async move {
            lu2.execute(&n, &[0x12, 1, 0x83, 1, 0, 0], &[])
                .await
                .data_in
        }
    };
    let mut other_port = a.clone();
    other_port.target_port = 2;
    let (p1, p2) = (page83(&a).await, page83(&other_port).await);
    assert_eq!(p1[4..24], p2[4..24]);
    assert_eq!(p1[8] >> 4, 6);
    assert_ne!(p1, p2, "relative target port differs");
    // Allocation length truncates.
    assert_eq!(
        lu.execute(&a, &[0x12, 0, 0, 0, 5, 0], &[])
            .await
            .data_in
            .len(),
        5
    );
}

#[tokio::test]
async fn read_capacity_and_mode_pages() {
    let (_, lu) = setup();
    let a = nexus("iqn.a");
    let r = lu
        .execute(&a, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[])
        .await;
    assert_eq!(r.data_in, [0, 0, 0x1F, 0xFF, 0, 0, 2, 0]);
    let r = lu.execute(&a, &cdb16(0x9E, 0x10, 0, 32), &[]).await;
    assert_eq!(r.data_in.len(), 32);
    assert_eq!((r.data_in[13], r.data_in[14]), (3, 0xC0));

    let r = lu.execute(&a, &[0x1A, 0x08, 0x3F, 0, 255, 0], &[]).await;
    assert_eq!(r.data_in[0] as usize, r.data_in.len() - 1);
    assert_eq!(r.data_in[2], 0x10, "DPOFUA, not write protected");
    let r = lu.execute(&a, &[0x1A, 0x08, 0xFF, 0, 255, 0], &[]).await;
    assert_eq!(sense_of(&r), (5, 0x39, 0));
    // Setting SWP through MODE SELECT write-protects the LU.
    let r = lu.execute(&a, &[0x1A, 0x08, 0x0A, 0, 255, 0], &[]).await;
    let mut page = r.data_in[4..].to_vec();
    page[4] |= 0x08;
    let mut param = vec![0, 0, 0, 0];
    param.extend(page);
    let select = [0x15, 0x10, 0, 0, param.len() as u8, 0];
    assert_eq!(lu.execute(&a, &select, &param).await.status, status::GOOD);
    let r = lu.execute(&a, &cdb10(0x2A, 0, 0, 1), &[0u8; BS]).await;
    assert_eq!(sense_of(&r), (7, 0x27, 2));
    // Changing what is not changeable is refused.
    param[6] ^= 0x01;
    assert_eq!(
        sense_of(&lu.execute(&a, &select, &param).await),
        (5, 0x26, 0)
    );
}

#[tokio::test]
async fn report_luns_and_missing_luns() {
    let r = report_luns(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[0, 3, 300]);
    assert_eq!(r.status, status::GOOD);
    assert_eq!(r.data_in[0..4], 24u32.to_be_bytes());
    assert_eq!(r.data_in[8..10], [0, 0]);
    assert_eq!(r.data_in[16..18], [0, 3]);
    assert_eq!(r.data_in[24..26], [0x41, 0x2C]);
    let r = report_luns(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], &[0, 3, 300]);
    assert_eq!(r.data_in.len(), 16);
    assert_eq!(r.data_in[0..4], 24u32.to_be_bytes(), "length not truncated");
    let r = report_luns(&[0xA0, 0, 7, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[0]);
    assert_eq!(sense_of(&r), (5, 0x24, 0));

    let r = no_such_lun(&[0x12, 0, 0, 0, 36, 0]);
    assert_eq!(
        (r.status, r.data_in[0], r.data_in.len()),
        (status::GOOD, 0x7F, 36)
    );
    assert_eq!(
        sense_of(&no_such_lun(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])),
        (5, 0x25, 0)
    );
}

#[tokio::test]
async fn report_supported_opcodes() {
    let (_, lu) = setup();
    let a = nexus("iqn.a");
    let rsoc = |rctd: u8, opt: u8, opcode: u8, sa: u16| {
        let mut c = vec![0xA3, 0x0C, rctd | opt, opcode];
        c.extend_from_slice(&sa.to_be_bytes());
        c.extend_from_slice(&65535u32.to_be_bytes());
        c.extend_from_slice(&[0, 0]);
        c
    };
    let r = lu.execute(&a, &rsoc(0, 0, 0, 0), &[]).await;
    let d = &r.data_in;
    let len = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
    assert_eq!(len, d.len() - 4);
    assert_eq!(len % 8, 0);
    for desc in d[4..].chunks(8) {
        let (opcode, sa, servactv) = (desc[0], u16::from_be_bytes([desc[2], desc[3]]), desc[5] & 1);
        let cdb_len = u16::from_be_bytes([desc[6], desc[7]]) as usize;
        if servactv == 0 {
            assert_eq!(sa, 0);
            let one = lu.execute(&a, &rsoc(0, 1, opcode, 0), &[]).await;
            assert_eq!(one.status, status::GOOD);
            assert_eq!(one.data_in[1] & 7, 3);
            assert_eq!(one.data_in[4], opcode);
            assert_eq!(one.data_in.len(), 4 + cdb_len);
            let bad = lu.execute(&a, &rsoc(0, 2, opcode, 0), &[]).await;
            assert_eq!(sense_of(&bad).1, 0x24);
        } else {
            let one = lu.execute(&a, &rsoc(0, 2, opcode, sa), &[]).await;
            assert_eq!(one.status, status::GOOD);
            assert_eq!(one.data_in[5] & 0x1F, sa as u8);
            let bad = lu.execute(&a, &rsoc(0, 1, opcode, sa), &[]).await;
            assert_eq!(sense_of(&bad).1, 0x24);
        }
    }
    // WRITE(10) reports DPO and FUA as used.
    let one = lu.execute(&a, &rsoc(0, 1, 0x2A, 0), &[]).await;
    assert_eq!(one.data_in[5] & 0x18, 0x18);
    // RCTD: every descriptor carries a 12-byte timeout descriptor.
    let r = lu.execute(&a, &rsoc(0x80, 0, 0, 0), &[]).await;
    assert_eq!((r.data_in.len() - 4) % 20, 0);
    assert!(r.data_in[4..]
        .chunks(20)
        .all(|d| d[5] & 2 == 2 && d[8..10] == [0, 0x0A]));
    // Unknown service actions of MAINTENANCE IN point at byte 1.
    let r = lu
        .execute(&a, &[0xA3, 0x05, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[])
        .await;
    assert_eq!(sense_of(&r).1, 0x24);
    assert_eq!(r.sense[17], 1);
}

#[tokio::test]
async fn verify_and_orwrite() {
    let (_, lu) = setup();
    let a = nexus("iqn.a");
    let data = vec![0x0Fu8; 2 * BS];
    lu.execute(&a, &cdb10(0x2A, 0, 4, 2), &data).await;
    assert_eq!(
        lu.execute(&a, &cdb10(0x2F, 0x02, 4, 2), &data).await.status,
        status::GOOD
    );
    let mut other = data.clone();
    other[700] = 0;
    let r = lu.execute(&a, &cdb10(0x2F, 0x02, 4, 2), &other).await;
    assert_eq!(sense_of(&r), (0x0E, 0x1D, 0));
    assert_eq!(
        lu.execute(&a, &cdb10(0x2F, 0, 4, 2), &other).await.status,
        status::GOOD
    );
    let r = lu
        .execute(&a, &cdb16(0x8B, 0, 4, 2), &vec![0xF0u8; 2 * BS])
        .await;
    assert_eq!(r.status, status::GOOD);
    let r = lu.execute(&a, &cdb10(0x28, 0, 4, 2), &[]).await;
    assert!(r.data_in.iter().all(|b| *b == 0xFF));
}

#[test]
fn execute_future_is_send() {
    fn assert_send<T: Send>(_: T) {}
    let (_, lu) = setup();
    let n = nexus("iqn.a");
    assert_send(lu.execute(&n, &[0], &[]));
}

fn known_status(s: u8) -> bool {
    matches!(
        s,
        status::GOOD
            | status::CHECK_CONDITION
            | status::CONDITION_MET
            | status::BUSY
            | status::RESERVATION_CONFLICT
            | status::TASK_SET_FULL
    )
}

/// Opcodes worth aiming at: every supported one plus a few that are not.
fn opcode() -> impl Strategy<Value = u8> {
    let known: Vec<u8> = opcodes::COMMANDS.iter().map(|c| c.opcode).collect();
    prop_oneof![proptest::sample::select(known), any::<u8>()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn arbitrary_cdbs_never_panic(
        op in opcode(),
        rest in proptest::collection::vec(any::<u8>(), 0..16),
        data in proptest::collection::vec(any::<u8>(), 0..1600),
        second in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let lu = lu_with(MemDisk::new(1 << 20));
        let mut cdb = vec![op];
        cdb.extend(rest);
        let n = nexus(if second { "iqn.b" } else { "iqn.a" });
        let _ = lu.data_out_len(&cdb);
        let r = rt.block_on(lu.execute(&n, &cdb, &data));
        prop_assert!(known_status(r.status));
        if r.status == status::CHECK_CONDITION {
            prop_assert!(r.sense.len() >= 18);
            prop_assert_eq!(r.sense[0] & 0x7F, 0x70);
            prop_assert!(r.data_in.is_empty());
        } else {
            prop_assert!(r.sense.is_empty());
        }
        let _ = report_luns(&cdb, &[0, 1]);
        let _ = no_such_lun(&cdb);
    }
}

#[test]
fn lun_encoding_round_trips() {
    for lun in [0u64, 1, 255, 256, 16383] {
        assert_eq!(decode_lun(encode_lun(lun)), Some(lun));
    }
    assert_eq!(decode_lun([1, 0, 0, 0, 0, 0, 0, 0]), None); // bus 1
    assert_eq!(decode_lun([0, 0, 0, 0, 0, 0, 0, 1]), None); // second level
}

#[tokio::test]
async fn write_cache_flushes_when_the_initiator_needs_it_to() {
    let (disk, lu) = setup();
    let a = nexus("iqn.a");
    let read = |lba: u32| cdb10(0x28, 0, lba, 1);
    let block = |b: u8| vec![b; BS];
    // The caching page reports WCE=1 (a write-back cache), changeable.
    let r = lu.execute(&a, &[0x1A, 0x08, 0x08, 0, 255, 0], &[]).await;
    assert_eq!(r.data_in[4], 0x08, "caching page");
    assert_eq!(r.data_in[6] & 0x04, 0x04, "WCE on by default");
    let r = lu.execute(&a, &[0x1A, 0x08, 0x48, 0, 255, 0], &[]).await;
    assert_eq!(r.data_in[6] & 0x04, 0x04, "WCE changeable");

    // Without FUA a write may be lost by a power loss (the model is real)...
    assert_eq!(
        lu.execute(&a, &cdb10(0x2A, 0, 1, 1), &block(1))
            .await
            .status,
        status::GOOD
    );
    disk.lose_power();
    assert_eq!(lu.execute(&a, &read(1), &[]).await.data_in, block(0));
    // ...SYNCHRONIZE CACHE makes it durable...
    lu.execute(&a, &cdb10(0x2A, 0, 1, 1), &block(2)).await;
    assert_eq!(
        lu.execute(&a, &cdb10(0x35, 0, 0, 0), &[]).await.status,
        status::GOOD
    );
    disk.lose_power();
    assert_eq!(lu.execute(&a, &read(1), &[]).await.data_in, block(2));
    // ...and so does FUA.
    lu.execute(&a, &cdb10(0x2A, 0x08, 2, 1), &block(3)).await;
    disk.lose_power();
    assert_eq!(lu.execute(&a, &read(2), &[]).await.data_in, block(3));

    // With the cache turned off, every write and unmap is durable at once.
    let r = lu.execute(&a, &[0x1A, 0x08, 0x08, 0, 255, 0], &[]).await;
    let mut page = r.data_in[4..].to_vec();
    page[2] &= !0x04;
    let mut param = vec![0, 0, 0, 0];
    param.extend(page);
    let select = [0x15, 0x10, 0, 0, param.len() as u8, 0];
    assert_eq!(lu.execute(&a, &select, &param).await.status, status::GOOD);
    let r = lu.execute(&a, &[0x1A, 0x08, 0x08, 0, 255, 0], &[]).await;
    assert_eq!(r.data_in[6] & 0x04, 0, "WCE now off");
    lu.execute(&a, &cdb10(0x2A, 0, 3, 1), &block(4)).await;
    let same = cdb16(0x93, 0, 4, 1);
    lu.execute(&a, &same, &block(5)).await;
    disk.lose_power();
    assert_eq!(lu.execute(&a, &read(3), &[]).await.data_in, block(4));
    assert_eq!(lu.execute(&a, &read(4), &[]).await.data_in, block(5));
}

/// READ RESERVATION: (key, type) when reserved.
async fn reservation_of(lu: &LogicalUnit, n: &Nexus) -> Option<(u64, u8)> {
    let r = lu
        .execute(n, &[0x5E, 1, 0, 0, 0, 0, 0, 0, 255, 0], &[])
        .await;
    assert_eq!(r.status, status::GOOD);
    let d = r.data_in;
    (u32::from_be_bytes([d[4], d[5], d[6], d[7]]) != 0).then(|| {
        (
            u64::from_be_bytes(d[8..16].try_into().unwrap()),
            d[21] & 0x0f,
        )
    })
}

#[tokio::test]
async fn persistent_reservations_outlive_the_logical_unit_that_took_them() {
    let (disk, first) = setup();
    let (a, b) = (nexus("iqn.a"), nexus("iqn.b"));
    let write = cdb10(0x2A, 0, 0, 1);
    assert_eq!(pr(&first, &a, 0, 0, 0, 0xA).await, status::GOOD);
    assert_eq!(pr(&first, &a, 1, 1, 0xA, 0).await, status::GOOD);
    // An SPC-2 reservation is not kept (a power loss releases it).
    assert_eq!(
        first.execute(&b, &[0x16, 0, 0, 0, 0, 0], &[]).await.status,
        status::RESERVATION_CONFLICT
    );

    // A new owner's unit on the same vdisk starts with them.
    let second = lu_with(disk.clone());
    assert_eq!(reservation_of(&second, &b).await, Some((0xA, 1)));
    assert_eq!(
        second.execute(&b, &write, &[0u8; BS]).await.status,
        status::RESERVATION_CONFLICT
    );
    assert_eq!(
        second.execute(&a, &write, &[0u8; BS]).await.status,
        status::GOOD
    );

    // The owner changes again (a new era): the first unit, stale, loads what
    // the second saved (the release) before it runs anything.
    assert_eq!(pr(&second, &a, 2, 1, 0xA, 0).await, status::GOOD);
    assert_eq!(
        first.execute(&b, &write, &[0u8; BS]).await.status,
        status::RESERVATION_CONFLICT
    );
    disk.era.fetch_add(1, Ordering::Relaxed);
    assert_eq!(reservation_of(&first, &b).await, None);
    assert_eq!(
        first.execute(&b, &write, &[0u8; BS]).await.status,
        status::GOOD
    );

    // A change that cannot be saved does not happen: the command fails
    // (NOT READY, retried as BUSY by the transport) and nothing changed.
    disk.fail_state_saves.store(true, Ordering::Relaxed);
    let (c, p) = pr_out(1, 1, 0xA, 0);
    let r = first.execute(&a, &c, &p).await;
    assert_eq!(sense_of(&r), (2, 0x04, 0x01));
    assert_eq!(reservation_of(&first, &b).await, None);
    assert_eq!(
        first.execute(&b, &write, &[0u8; BS]).await.status,
        status::GOOD
    );
    disk.fail_state_saves.store(false, Ordering::Relaxed);
    assert_eq!(first.execute(&a, &c, &p).await.status, status::GOOD);
    assert_eq!(reservation_of(&lu_with(disk), &b).await, Some((0xA, 1)));
}
