//! INQUIRY (SPC-4 6.6): standard data and the vital product data pages
//! (supported pages, unit serial number, device identification, block
//! limits, block device characteristics, logical block provisioning).
//!
//! Everything that names the LU derives from the vdisk id alone, so every
//! node's portal reports the same identity and multipath merges the paths.

use md5::{Digest, Md5};

use super::cdb::{truncate, Cdb};
use super::sense::Sense;
use super::{LunIdentity, Nexus};

pub const VENDOR: &[u8; 8] = b"CAIRN   ";
/// IEEE company id in the NAA designator. Cairn has no registered OUI
/// yet; zero keeps the designator well-formed, and uniqueness among LUs
/// comes from the vdisk id hash in the vendor-specific part.
const COMPANY_ID: u32 = 0x00_0000;

/// Block limits we report and enforce (VPD page 0xB0), in logical blocks.
pub const MAX_TRANSFER_BLOCKS: u32 = 16384;
pub const OPTIMAL_TRANSFER_BLOCKS: u32 = 2048;
/// One 4 KiB checksum block.
pub const OPTIMAL_GRANULARITY: u16 = 8;
pub const MAX_UNMAP_LBA_COUNT: u32 = 1 << 20;
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// The largest WRITE SAME (also the largest a 10-byte CDB can express).
pub const MAX_WRITE_SAME_BLOCKS: u64 = 0xFFFF;
/// COMPARE AND WRITE: NUMBER OF LOGICAL BLOCKS is one byte.
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 255;

/// Pages of VPD page 0x00, ascending.
const SUPPORTED_VPD: [u8; 6] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];

/// Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
const VERSION_DESCRIPTORS: [u16; 4] = [0x00A0, 0x0960, 0x0460, 0x04C0];

/// What the INQUIRY pages need to know about the LU.
pub struct InquiryCtx<'a> {
    pub ident: &'a LunIdentity,
    pub nexus: &'a Nexus,
}

/// Executes INQUIRY.
pub fn inquiry(cdb: &Cdb, ctx: &InquiryCtx<'_>) -> Result<Vec<u8>, Sense> {
    let evpd = cdb.u8(1) & 0x01 != 0;
    // CMDDT (obsolete since SPC-3) must be refused.
    if cdb.u8(1) & 0x02 != 0 {
        return Err(Sense::invalid_cdb(1, Some(1)));
    }
    let page = cdb.u8(2);
    let alloc = usize::from(cdb.u16(3));
    let data = if !evpd {
        if page != 0 {
            return Err(Sense::invalid_cdb(2, None));
        }
        standard(ctx.ident, 0x00)
    } else {
        match page {
            0x00 => vpd(0x00, SUPPORTED_VPD.to_vec()),
            0x80 => vpd(0x80, ascii(ctx.ident.vdisk_id.as_bytes())),
            0x83 => vpd(0x83, device_identification(ctx)),
            0xB0 => vpd(0xB0, block_limits()),
            0xB1 => vpd(0xB1, block_device_characteristics()),
            0xB2 => vpd(0xB2, logical_block_provisioning()),
            _ => return Err(Sense::invalid_cdb(2, None)),
        }
    };
    Ok(truncate(data, alloc))
}

/// Standard INQUIRY data; `peripheral` is byte 0 (qualifier and type).
pub fn standard(ident: &LunIdentity, peripheral: u8) -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = peripheral;
    // SPC-4.
    d[2] = 0x06;
    // HISUP, RESPONSE DATA FORMAT 2.
    d[3] = 0x12;
    d[4] = (d.len() - 5) as u8;
    // CMDQUE: tasks are queued and run concurrently.
    d[7] = 0x02;
    d[8..16].copy_from_slice(VENDOR);
    d[16..32].copy_from_slice(&padded::<16>(ident.vdisk_name.as_bytes()));
    d[32..36].copy_from_slice(&padded::<4>(revision().as_bytes()));
    for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
        let at = 58 + 2 * i;
        d[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
    d
}

fn revision() -> String {
    env!("CARGO_PKG_VERSION").replace('.', "")
}

/// Printable ASCII only (SPC-4 4.3.1), anything else replaced by '_'.
fn ascii(raw: &[u8]) -> Vec<u8> {
    raw.iter()
        .map(|&c| if (0x20..=0x7E).contains(&c) { c } else { b'_' })
        .collect()
}

/// Left-aligned, space padded, truncated ASCII field.
fn padded<const N: usize>(raw: &[u8]) -> [u8; N] {
    let mut out = [b' '; N];
    for (dst, src) in out.iter_mut().zip(ascii(raw)) {
        *dst = src;
    }
    out
}

fn vpd(page: u8, body: Vec<u8>) -> Vec<u8> {
    let mut d = Vec::with_capacity(body.len() + 4);
    d.push(0x00);
    d.push(page);
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    d.extend_from_slice(&len.to_be_bytes());
    d.extend(body.into_iter().take(usize::from(u16::MAX)));
    d
}

fn designator(byte0: u8, byte1: u8, value: &[u8]) -> Vec<u8> {
    let mut d = vec![byte0, byte1, 0, value.len().min(255) as u8];
    d.extend(value.iter().take(255));
    d
}

/// A SCSI name string: NUL terminated, padded to a multiple of four.
fn name_string(name: &str) -> Vec<u8> {
    let mut v: Vec<u8> = name.as_bytes().iter().take(250).copied().collect();
    v.push(0);
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
    v
}

/// The NAA IEEE Registered Extended identifier (type 6h) of a vdisk: a
/// hash of the vdisk id, so every node computes the same one.
pub fn naa_id(vdisk_id: &str) -> [u8; 16] {
    let h = Md5::digest(vdisk_id.as_bytes());
    let mut id = [0u8; 16];
    id[0] = 0x60 | ((COMPANY_ID >> 20) & 0x0F) as u8;
    id[1] = (COMPANY_ID >> 12) as u8;
    id[2] = (COMPANY_ID >> 4) as u8;
    id[3] = ((COMPANY_ID & 0x0F) << 4) as u8;
    for (i, dst) in id.iter_mut().enumerate().skip(3) {
        let b = h.get(i - 3).copied().unwrap_or(0);
        if i == 3 {
            *dst |= b & 0x0F;
        } else {
            *dst = b;
        }
    }
    id
}

fn device_identification(ctx: &InquiryCtx<'_>) -> Vec<u8> {
    let mut d = Vec::new();
    // NAA, binary, associated with the LU.
    d.extend(designator(0x01, 0x03, &naa_id(&ctx.ident.vdisk_id)));
    // T10 vendor id, ASCII, LU.
    let mut t10 = VENDOR.to_vec();
    t10.extend(ascii(ctx.ident.vdisk_id.as_bytes()));
    d.extend(designator(0x02, 0x01, &t10));
    // Relative target port: iSCSI, binary, PIV, target port.
    let mut rtp = vec![0u8, 0];
    rtp.extend_from_slice(&ctx.nexus.target_port.to_be_bytes());
    d.extend(designator(0x51, 0x94, &rtp));
    // SCSI name string of the target port: iSCSI, UTF-8, PIV, port.
    let port = format!(
        "{},t,0x{:04x}",
        ctx.nexus.target_name, ctx.nexus.target_port
    );
    d.extend(designator(0x53, 0x98, &name_string(&port)));
    // SCSI name string of the target device.
    d.extend(designator(0x53, 0xA8, &name_string(&ctx.nexus.target_name)));
    d
}

fn block_limits() -> Vec<u8> {
    let mut b = vec![0u8; 0x3C];
    // WSNZ: a WRITE SAME of zero blocks is refused rather than meaning
    // "to the end of the LU".
    b[0] = 0x01;
    b[1] = MAX_COMPARE_AND_WRITE_BLOCKS;
    b[2..4].copy_from_slice(&OPTIMAL_GRANULARITY.to_be_bytes());
    b[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
    b[8..12].copy_from_slice(&OPTIMAL_TRANSFER_BLOCKS.to_be_bytes());
    b[16..20].copy_from_slice(&MAX_UNMAP_LBA_COUNT.to_be_bytes());
    b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
    b[24..28].copy_from_slice(&u32::from(OPTIMAL_GRANULARITY).to_be_bytes());
    // UGAVALID, alignment 0.
    b[28] = 0x80;
    b[32..40].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
    b
}

fn block_device_characteristics() -> Vec<u8> {
    let mut b = vec![0u8; 0x3C];
    // MEDIUM ROTATION RATE 1: non-rotating medium.
    b[0..2].copy_from_slice(&1u16.to_be_bytes());
    b
}

fn logical_block_provisioning() -> Vec<u8> {
    // LBPU, LBPWS, LBPWS10, LBPRZ=001b; no anchored state (ANC_SUP=0);
    // PROVISIONING TYPE 2: thin.
    vec![0x00, 0xE0 | 0x04, 0x02, 0x00]
}
