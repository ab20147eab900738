//! Commands answered for the target rather than by one logical unit:
//! REPORT LUNS (SPC-4 6.33) and whatever arrives for a LUN that does not
//! exist (SPC-4 4.6.4 / SAM-5 5.9.6).

use super::cdb::{op, truncate, Cdb};
use super::inquiry;
use super::sense::Sense;
use super::{status, LunIdentity, ScsiResponse};

/// SAM-5 single level LUN: peripheral addressing below 256, flat space
/// below 16384; larger values are taken as already encoded. The same
/// encoding goes into REPORT LUNS and the LUN field of target PDUs.
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else if lun < 0x4000 {
        b[0] = 0x40 | (lun >> 8) as u8;
        b[1] = (lun & 0xFF) as u8;
    } else {
        b = lun.to_be_bytes();
    }
    b
}

/// Decodes a LUN field (SAM-5 peripheral or flat space addressing, single
/// level); `None` for anything else.
pub fn decode_lun(raw: [u8; 8]) -> Option<u64> {
    if raw[2..].iter().any(|x| *x != 0) {
        return None;
    }
    match raw[0] >> 6 {
        0 if raw[0] & 0x3f == 0 => Some(u64::from(raw[1])),
        1 => Some((u64::from(raw[0] & 0x3f) << 8) | u64::from(raw[1])),
        _ => None,
    }
}

fn good(data_in: Vec<u8>) -> ScsiResponse {
    ScsiResponse {
        status: status::GOOD,
        sense: Vec::new(),
        data_in,
    }
}

fn check(s: Sense) -> ScsiResponse {
    ScsiResponse::check(&s)
}

/// REPORT LUNS over the LUNs of the target the nexus logged in to.
pub fn report_luns(cdb: &[u8], luns: &[u64]) -> ScsiResponse {
    let c = Cdb::new(cdb);
    if c.len() < 12 {
        return check(Sense::invalid_cdb(0, None));
    }
    let alloc = c.u32(6) as usize;
    let listed: &[u64] = match c.u8(2) {
        // All LUNs (0x02 also asks for well-known ones, of which there are
        // none).
        0x00 | 0x02 => luns,
        // Well-known LUNs only, administrative and subsidiary LUNs: none.
        0x01 | 0x10 | 0x11 | 0x12 => &[],
        _ => return check(Sense::invalid_cdb(2, None)),
    };
    let mut out = Vec::with_capacity(8 + 8 * listed.len());
    let len = u32::try_from(listed.len() * 8).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    for &l in listed {
        out.extend_from_slice(&encode_lun(l));
    }
    good(truncate(out, alloc))
}

/// The answer for a LUN the target does not have: INQUIRY reports
/// "no logical unit here" (qualifier 011b, type 1Fh), REQUEST SENSE
/// returns LOGICAL UNIT NOT SUPPORTED as data, anything else fails with it.
pub fn no_such_lun(cdb: &[u8]) -> ScsiResponse {
    let c = Cdb::new(cdb);
    match c.opcode() {
        op::INQUIRY if c.u8(1) & 0x03 == 0 && c.u8(2) == 0 && !cdb.is_empty() => {
            let none = LunIdentity {
                vdisk_id: String::new(),
                vdisk_name: String::new(),
            };
            let data = inquiry::standard(&none, 0x7F);
            good(truncate(data, usize::from(c.u16(3))))
        }
        op::REQUEST_SENSE if !cdb.is_empty() => good(truncate(
            Sense::lun_not_supported().to_bytes(),
            usize::from(c.u8(4)),
        )),
        _ => check(Sense::lun_not_supported()),
    }
}
