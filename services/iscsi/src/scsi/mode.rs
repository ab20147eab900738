//! MODE SENSE and MODE SELECT (SPC-4 6.11-6.14, 7.5): the caching,
//! control and informational exceptions pages. Two bits can change: WCE
//! (write cache enable) in the caching page, on by default — writes are
//! acknowledged once on every replica but durable only after SYNCHRONIZE
//! CACHE or with FUA, as on any disk with a write-back cache; with WCE off
//! every write is durable when it completes — and SWP (software write
//! protect) in the control page. The rest reports what is true of the
//! device and accepts exactly those values back.

use super::cdb::{op, truncate, Cdb};
use super::sense::Sense;

const CACHING: u8 = 0x08;
const CONTROL: u8 = 0x0A;
const INFO_EXCEPTIONS: u8 = 0x1C;
const ALL_PAGES: u8 = 0x3F;
/// SWP: byte 4, bit 3 of the control page.
const SWP_BYTE: usize = 4;
const SWP_BIT: u8 = 0x08;
/// WCE: byte 2, bit 2 of the caching page.
const WCE_BYTE: usize = 2;
const WCE_BIT: u8 = 0x04;

/// The mode parameters that can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeState {
    pub swp: bool,
    /// Write-back cache: writes without FUA may be volatile until
    /// SYNCHRONIZE CACHE.
    pub wce: bool,
}

impl Default for ModeState {
    fn default() -> Self {
        ModeState {
            swp: false,
            wce: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pc {
    Current,
    Changeable,
    Default,
}

fn page(code: u8, pc: Pc, state: ModeState) -> Vec<u8> {
    let mut p = match code {
        // Caching: WCE per the state (on by default), RCD=0.
        CACHING => {
            let mut p = vec![0u8; 20];
            let on = match pc {
                Pc::Current => state.wce,
                _ => ModeState::default().wce,
            };
            if on {
                p[WCE_BYTE] = WCE_BIT;
            }
            p
        }
        CONTROL => {
            let mut p = vec![0u8; 12];
            // GLTSD: no log parameters are saved.
            p[2] = 0x02;
            // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering.
            p[3] = 0x10;
            // BUSY TIMEOUT PERIOD: unlimited.
            p[8] = 0xFF;
            p[9] = 0xFF;
            p
        }
        _ => {
            let mut p = vec![0u8; 12];
            // DEXCPT: informational exceptions are disabled.
            p[2] = 0x08;
            p
        }
    };
    p[0] = code;
    p[1] = (p.len() - 2) as u8;
    match pc {
        Pc::Changeable => {
            for b in p.iter_mut().skip(2) {
                *b = 0;
            }
            if code == CONTROL {
                p[SWP_BYTE] = SWP_BIT;
            }
            if code == CACHING {
                p[WCE_BYTE] = WCE_BIT;
            }
        }
        Pc::Current if code == CONTROL && state.swp => p[SWP_BYTE] |= SWP_BIT,
        _ => {}
    }
    p
}

fn pages(code: u8, pc: Pc, state: ModeState) -> Option<Vec<u8>> {
    match code {
        CACHING | CONTROL | INFO_EXCEPTIONS => Some(page(code, pc, state)),
        ALL_PAGES => Some(
            [CACHING, CONTROL, INFO_EXCEPTIONS]
                .iter()
                .flat_map(|&c| page(c, pc, state))
                .collect(),
        ),
        _ => None,
    }
}

/// Executes MODE SENSE(6) and MODE SENSE(10).
pub fn mode_sense(
    cdb: &Cdb,
    num_blocks: u64,
    block: u32,
    state: ModeState,
) -> Result<Vec<u8>, Sense> {
    let ten = cdb.opcode() == op::MODE_SENSE10;
    let dbd = cdb.u8(1) & 0x08 != 0;
    let llbaa = ten && cdb.u8(1) & 0x10 != 0;
    let pc = match cdb.u8(2) >> 6 {
        0 => Pc::Current,
        1 => Pc::Changeable,
        2 => Pc::Default,
        _ => return Err(Sense::saving_not_supported(2, Some(7))),
    };
    let code = cdb.u8(2) & 0x3F;
    let subpage = cdb.u8(3);
    // No subpages: 0xFF with "all pages" asks for pages and subpages,
    // which is just the pages.
    if subpage != 0 && !(subpage == 0xFF && code == ALL_PAGES) {
        return Err(Sense::invalid_cdb(3, None));
    }
    let body = pages(code, pc, state).ok_or_else(|| Sense::invalid_cdb(2, Some(5)))?;
    let alloc = if ten {
        usize::from(cdb.u16(7))
    } else {
        usize::from(cdb.u8(4))
    };

    let mut desc = Vec::new();
    if !dbd {
        if llbaa {
            desc.extend_from_slice(&num_blocks.to_be_bytes());
            desc.extend_from_slice(&[0, 0, 0, 0]);
            desc.extend_from_slice(&block.to_be_bytes());
        } else {
            let n = u32::try_from(num_blocks).unwrap_or(u32::MAX);
            desc.extend_from_slice(&n.to_be_bytes());
            desc.push(0);
            desc.extend_from_slice(&block.to_be_bytes()[1..4]);
        }
    }
    // WP follows SWP; DPOFUA: DPO and FUA are accepted.
    let dev_specific = if state.swp && pc == Pc::Current {
        0x90
    } else {
        0x10
    };
    let mut out = if ten {
        let mut h = vec![0u8; 8];
        h[3] = dev_specific;
        if llbaa && !dbd {
            h[4] = 0x01;
        }
        h[6..8].copy_from_slice(&(desc.len() as u16).to_be_bytes());
        h
    } else {
        vec![0, 0, dev_specific, desc.len() as u8]
    };
    out.extend(desc);
    out.extend(body);
    if ten {
        let len = (out.len() - 2) as u16;
        out[0..2].copy_from_slice(&len.to_be_bytes());
    } else {
        out[0] = (out.len() - 1).min(255) as u8;
    }
    Ok(truncate(out, alloc))
}

/// Executes MODE SELECT(6) and MODE SELECT(10): checks the parameter list
/// and returns the new state (the caller applies it).
pub fn mode_select(
    cdb: &Cdb,
    data: &[u8],
    block: u32,
    state: ModeState,
) -> Result<ModeState, Sense> {
    let ten = cdb.opcode() == op::MODE_SELECT10;
    // PF=0 would mean vendor-specific pages; we have none.
    if cdb.u8(1) & 0x10 == 0 {
        return Err(Sense::invalid_cdb(1, Some(4)));
    }
    if cdb.u8(1) & 0x01 != 0 {
        return Err(Sense::invalid_cdb(1, Some(0)));
    }
    let list_len = if ten {
        usize::from(cdb.u16(7))
    } else {
        usize::from(cdb.u8(4))
    };
    if list_len == 0 {
        return Ok(state);
    }
    let hdr_len = if ten { 8 } else { 4 };
    if list_len < hdr_len || data.len() < list_len {
        return Err(Sense::param_list_length());
    }
    let data = data.get(..list_len).ok_or_else(Sense::param_list_length)?;
    let bd_len = if ten {
        usize::from(u16::from_be_bytes([byte(data, 6), byte(data, 7)]))
    } else {
        usize::from(byte(data, 3))
    };
    let long = ten && byte(data, 4) & 0x01 != 0;
    check_block_descriptors(data, hdr_len, bd_len, long, block)?;
    let mut at = hdr_len + bd_len;
    let mut next = state;
    while at < data.len() {
        let code = byte(data, at) & 0x3F;
        // SPF (subpage format) pages: we have none.
        if byte(data, at) & 0x40 != 0 {
            return Err(Sense::invalid_param(at as u16, Some(6)));
        }
        let len = usize::from(byte(data, at + 1)) + 2;
        let Some(sent) = data.get(at..at + len) else {
            return Err(Sense::param_list_length());
        };
        let current = pages(code, Pc::Current, state)
            .filter(|_| code != ALL_PAGES)
            .ok_or_else(|| Sense::invalid_param(at as u16, Some(5)))?;
        if current.len() != len {
            return Err(Sense::invalid_param((at + 1) as u16, None));
        }
        let changeable = page(code, Pc::Changeable, state);
        for (i, ((s, c), m)) in sent
            .iter()
            .zip(&current)
            .zip(&changeable)
            .enumerate()
            .skip(2)
        {
            if (s ^ c) & !m != 0 {
                return Err(Sense::invalid_param((at + i) as u16, None));
            }
        }
        if code == CONTROL {
            next.swp = byte(sent, SWP_BYTE) & SWP_BIT != 0;
        }
        if code == CACHING {
            next.wce = byte(sent, WCE_BYTE) & WCE_BIT != 0;
        }
        at += len;
    }
    Ok(next)
}

fn byte(data: &[u8], i: usize) -> u8 {
    data.get(i).copied().unwrap_or(0)
}

/// Block descriptors may only restate the block length we have.
fn check_block_descriptors(
    data: &[u8],
    at: usize,
    len: usize,
    long: bool,
    block: u32,
) -> Result<(), Sense> {
    let size = if long { 16 } else { 8 };
    if !len.is_multiple_of(size) || data.len() < at + len {
        return Err(Sense::param_list_length());
    }
    let mut d = at;
    while d < at + len {
        let bl_at = if long { d + 12 } else { d + 5 };
        let bl = if long {
            u32::from_be_bytes([
                byte(data, bl_at),
                byte(data, bl_at + 1),
                byte(data, bl_at + 2),
                byte(data, bl_at + 3),
            ])
        } else {
            u32::from_be_bytes([
                0,
                byte(data, bl_at),
                byte(data, bl_at + 1),
                byte(data, bl_at + 2),
            ])
        };
        if bl != block {
            return Err(Sense::invalid_param(bl_at as u16, None));
        }
        d += size;
    }
    Ok(())
}
