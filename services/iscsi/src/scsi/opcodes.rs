//! The table of supported commands: what dispatch accepts, how each command
//! fares under reservations, and REPORT SUPPORTED OPERATION CODES
//! (SPC-4 6.35), which is generated from the same table so that the two
//! cannot disagree.

use super::cdb::{op, sa, Cdb};
use super::sense::Sense;

/// How a command is treated when another I_T nexus holds a persistent
/// reservation (SPC-4 5.13.1, table "SPC commands that are allowed in the
/// presence of various reservations", and its SBC-3 counterpart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrClass {
    /// Never conflicts (INQUIRY, READ CAPACITY, TEST UNIT READY ...).
    Allowed,
    /// Reads the medium: allowed under the Write Exclusive types.
    ReadLike,
    /// Conflicts with every reservation type the nexus does not share.
    Conflict,
    /// PERSISTENT RESERVE IN/OUT and RESERVE/RELEASE: their own rules.
    Own,
}

/// One supported command (or one service action of it).
#[derive(Debug)]
pub struct CmdInfo {
    pub opcode: u8,
    /// The service action, for commands that have them.
    pub sa: Option<u16>,
    /// CDB USAGE DATA: the bits this emulation interprets. Its length is
    /// the CDB length.
    pub usage: &'static [u8],
    pub pr: PrClass,
    /// Allowed from another nexus while an SPC-2 RESERVE is held.
    pub spc2_ok: bool,
    /// RCTD timeouts, seconds: nominal and recommended.
    pub timeouts: (u32, u32),
}

const IO_T: (u32, u32) = (1, 30);
const BIG_T: (u32, u32) = (5, 120);
const NONE_T: (u32, u32) = (0, 10);

const fn cmd(opcode: u8, usage: &'static [u8], pr: PrClass, timeouts: (u32, u32)) -> CmdInfo {
    CmdInfo {
        opcode,
        sa: None,
        usage,
        pr,
        spc2_ok: false,
        timeouts,
    }
}

const fn sa_cmd(
    opcode: u8,
    sa: u16,
    usage: &'static [u8],
    pr: PrClass,
    timeouts: (u32, u32),
) -> CmdInfo {
    CmdInfo {
        opcode,
        sa: Some(sa),
        usage,
        pr,
        spc2_ok: false,
        timeouts,
    }
}

/// Marks a command allowed under another nexus's SPC-2 reservation.
const fn spc2_ok(mut c: CmdInfo) -> CmdInfo {
    c.spc2_ok = true;
    c
}

const B16: u8 = 0xFF;
const PR_OUT_USAGE: &[u8] = &[op::PR_OUT, 0x1F, 0xFF, 0, 0, B16, B16, B16, B16, 0];
const PR_IN_USAGE: &[u8] = &[op::PR_IN, 0x1F, 0, 0, 0, 0, 0, B16, B16, 0];

use PrClass::{Allowed, Conflict, Own, ReadLike};

/// Every command dispatch accepts, in opcode order.
pub static COMMANDS: &[CmdInfo] = &[
    cmd(
        op::TEST_UNIT_READY,
        &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0],
        Allowed,
        NONE_T,
    ),
    spc2_ok(cmd(
        op::REQUEST_SENSE,
        &[op::REQUEST_SENSE, 0, 0, 0, 0xFF, 0],
        Allowed,
        NONE_T,
    )),
    cmd(
        op::READ6,
        &[op::READ6, 0x1F, 0xFF, 0xFF, 0xFF, 0],
        ReadLike,
        IO_T,
    ),
    cmd(
        op::WRITE6,
        &[op::WRITE6, 0x1F, 0xFF, 0xFF, 0xFF, 0],
        Conflict,
        IO_T,
    ),
    spc2_ok(cmd(
        op::INQUIRY,
        &[op::INQUIRY, 0x01, 0xFF, 0xFF, 0xFF, 0],
        Allowed,
        NONE_T,
    )),
    cmd(
        op::MODE_SELECT6,
        &[op::MODE_SELECT6, 0x10, 0, 0, 0xFF, 0],
        Conflict,
        NONE_T,
    ),
    cmd(op::RESERVE6, &[op::RESERVE6, 0, 0, 0, 0, 0], Own, NONE_T),
    spc2_ok(cmd(
        op::RELEASE6,
        &[op::RELEASE6, 0, 0, 0, 0, 0],
        Own,
        NONE_T,
    )),
    cmd(
        op::MODE_SENSE6,
        &[op::MODE_SENSE6, 0x08, 0xFF, 0xFF, 0xFF, 0],
        Conflict,
        NONE_T,
    ),
    cmd(
        op::START_STOP_UNIT,
        &[op::START_STOP_UNIT, 0x01, 0, 0x0F, 0xF7, 0],
        Allowed,
        NONE_T,
    ),
    cmd(
        op::PREVENT_ALLOW,
        &[op::PREVENT_ALLOW, 0, 0, 0, 0x01, 0],
        Conflict,
        NONE_T,
    ),
    cmd(
        op::READ_CAPACITY10,
        &[op::READ_CAPACITY10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        Allowed,
        NONE_T,
    ),
    cmd(
        op::READ10,
        &[op::READ10, 0x18, B16, B16, B16, B16, 0, B16, B16, 0],
        ReadLike,
        IO_T,
    ),
    cmd(
        op::WRITE10,
        &[op::WRITE10, 0x18, B16, B16, B16, B16, 0, B16, B16, 0],
        Conflict,
        IO_T,
    ),
    cmd(
        op::WRITE_VERIFY10,
        &[op::WRITE_VERIFY10, 0x12, B16, B16, B16, B16, 0, B16, B16, 0],
        Conflict,
        IO_T,
    ),
    cmd(
        op::VERIFY10,
        &[op::VERIFY10, 0x16, B16, B16, B16, B16, 0, B16, B16, 0],
        ReadLike,
        IO_T,
    ),
    cmd(
        op::PRE_FETCH10,
        &[op::PRE_FETCH10, 0x02, B16, B16, B16, B16, 0, B16, B16, 0],
        ReadLike,
        NONE_T,
    ),
    cmd(
        op::SYNC_CACHE10,
        &[op::SYNC_CACHE10, 0x02, B16, B16, B16, B16, 0, B16, B16, 0],
        Conflict,
        IO_T,
    ),
    cmd(
        op::WRITE_SAME10,
        &[op::WRITE_SAME10, 0x08, B16, B16, B16, B16, 0, B16, B16, 0],
        Conflict,
        BIG_T,
    ),
    cmd(
        op::UNMAP,
        &[op::UNMAP, 0, 0, 0, 0, 0, 0, B16, B16, 0],
        Conflict,
        BIG_T,
    ),
    cmd(
        op::MODE_SELECT10,
        &[op::MODE_SELECT10, 0x10, 0, 0, 0, 0, 0, B16, B16, 0],
        Conflict,
        NONE_T,
    ),
    cmd(
        op::RESERVE10,
        &[op::RESERVE10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        Own,
        NONE_T,
    ),
    spc2_ok(cmd(
        op::RELEASE10,
        &[op::RELEASE10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        Own,
        NONE_T,
    )),
    cmd(
        op::MODE_SENSE10,
        &[op::MODE_SENSE10, 0x18, 0xFF, 0xFF, 0, 0, 0, B16, B16, 0],
        Conflict,
        NONE_T,
    ),
    sa_cmd(op::PR_IN, 0, PR_IN_USAGE, Own, NONE_T),
    sa_cmd(op::PR_IN, 1, PR_IN_USAGE, Own, NONE_T),
    sa_cmd(op::PR_IN, 2, PR_IN_USAGE, Own, NONE_T),
    sa_cmd(op::PR_IN, 3, PR_IN_USAGE, Own, NONE_T),
    sa_cmd(op::PR_OUT, 0, PR_OUT_USAGE, Own, NONE_T),
    sa_cmd(op::PR_OUT, 1, PR_OUT_USAGE, Own, NONE_T),
    sa_cmd(op::PR_OUT, 2, PR_OUT_USAGE, Own, NONE_T),
    sa_cmd(op::PR_OUT, 3, PR_OUT_USAGE, Own, NONE_T),
    sa_cmd(op::PR_OUT, 4, PR_OUT_USAGE, Own, NONE_T),
    sa_cmd(op::PR_OUT, 5, PR_OUT_USAGE, Own, NONE_T),
    sa_cmd(op::PR_OUT, 6, PR_OUT_USAGE, Own, NONE_T),
    cmd(
        op::READ16,
        &[
            op::READ16,
            0x18,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
        ],
        ReadLike,
        IO_T,
    ),
    cmd(
        op::COMPARE_AND_WRITE,
        &[
            op::COMPARE_AND_WRITE,
            0x18,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
            0,
            B16,
            0,
            0,
        ],
        Conflict,
        IO_T,
    ),
    cmd(
        op::WRITE16,
        &[
            op::WRITE16,
            0x18,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
        ],
        Conflict,
        IO_T,
    ),
    cmd(
        op::ORWRITE16,
        &[
            op::ORWRITE16,
            0x18,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
        ],
        Conflict,
        IO_T,
    ),
    cmd(
        op::WRITE_VERIFY16,
        &[
            op::WRITE_VERIFY16,
            0x12,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
        ],
        Conflict,
        IO_T,
    ),
    cmd(
        op::VERIFY16,
        &[
            op::VERIFY16,
            0x16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
        ],
        ReadLike,
        IO_T,
    ),
    cmd(
        op::PRE_FETCH16,
        &[
            op::PRE_FETCH16,
            0x02,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
        ],
        ReadLike,
        NONE_T,
    ),
    cmd(
        op::SYNC_CACHE16,
        &[
            op::SYNC_CACHE16,
            0x02,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
        ],
        Conflict,
        IO_T,
    ),
    cmd(
        op::WRITE_SAME16,
        &[
            op::WRITE_SAME16,
            0x09,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
        ],
        Conflict,
        BIG_T,
    ),
    sa_cmd(
        op::SERVICE_ACTION_IN16,
        sa::READ_CAPACITY16,
        &[
            op::SERVICE_ACTION_IN16,
            0x1F,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
        ],
        Allowed,
        NONE_T,
    ),
    sa_cmd(
        op::SERVICE_ACTION_IN16,
        sa::GET_LBA_STATUS,
        &[
            op::SERVICE_ACTION_IN16,
            0x1F,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
        ],
        ReadLike,
        IO_T,
    ),
    spc2_ok(cmd(
        op::REPORT_LUNS,
        &[op::REPORT_LUNS, 0, 0xFF, 0, 0, 0, B16, B16, B16, B16, 0, 0],
        Allowed,
        NONE_T,
    )),
    sa_cmd(
        op::MAINTENANCE_IN,
        sa::REPORT_SUPPORTED_OPCODES,
        &[
            op::MAINTENANCE_IN,
            0x1F,
            0x87,
            0xFF,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
        ],
        Allowed,
        NONE_T,
    ),
    cmd(
        op::READ12,
        &[
            op::READ12,
            0x18,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
        ],
        ReadLike,
        IO_T,
    ),
    cmd(
        op::WRITE12,
        &[
            op::WRITE12,
            0x18,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
        ],
        Conflict,
        IO_T,
    ),
    cmd(
        op::WRITE_VERIFY12,
        &[
            op::WRITE_VERIFY12,
            0x12,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
        ],
        Conflict,
        IO_T,
    ),
    cmd(
        op::VERIFY12,
        &[
            op::VERIFY12,
            0x16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            B16,
            0,
            0,
        ],
        ReadLike,
        IO_T,
    ),
];

/// Whether an operation code has service actions in our table.
pub fn has_service_actions(opcode: u8) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.opcode == opcode && c.sa.is_some())
}

/// Looks a CDB up in the table. `Err` carries the sense data for an
/// unsupported command: INVALID COMMAND OPERATION CODE, or for an
/// unsupported service action INVALID FIELD IN CDB pointing at byte 1
/// (which libiscsi also reads as "not implemented").
pub fn lookup(cdb: &Cdb) -> Result<&'static CmdInfo, Sense> {
    let opcode = cdb.opcode();
    if has_service_actions(opcode) {
        let want = cdb.service_action();
        return COMMANDS
            .iter()
            .find(|c| c.opcode == opcode && c.sa == Some(want))
            .ok_or_else(|| Sense::invalid_cdb(1, Some(4)));
    }
    COMMANDS
        .iter()
        .find(|c| c.opcode == opcode)
        .ok_or_else(Sense::invalid_opcode)
}

fn timeout_descriptor(c: &CmdInfo) -> [u8; 12] {
    let mut d = [0u8; 12];
    d[1] = 0x0A;
    d[4..8].copy_from_slice(&c.timeouts.0.to_be_bytes());
    d[8..12].copy_from_slice(&c.timeouts.1.to_be_bytes());
    d
}

/// REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN, service action 0x0C).
pub fn report_supported_opcodes(cdb: &Cdb) -> Result<Vec<u8>, Sense> {
    let rctd = cdb.u8(2) & 0x80 != 0;
    let options = cdb.u8(2) & 0x07;
    let opcode = cdb.u8(3);
    let req_sa = cdb.u16(4);
    let alloc = cdb.u32(6) as usize;
    let data = match options {
        0 => all_commands(rctd),
        1 => {
            if has_service_actions(opcode) {
                return Err(Sense::invalid_cdb(2, Some(2)));
            }
            one_command(COMMANDS.iter().find(|c| c.opcode == opcode), rctd)
        }
        2 => {
            if !has_service_actions(opcode) {
                return Err(Sense::invalid_cdb(2, Some(2)));
            }
            one_command(
                COMMANDS
                    .iter()
                    .find(|c| c.opcode == opcode && c.sa == Some(req_sa)),
                rctd,
            )
        }
        3 => {
            let found = if has_service_actions(opcode) {
                COMMANDS
                    .iter()
                    .find(|c| c.opcode == opcode && c.sa == Some(req_sa))
            } else if req_sa == 0 {
                COMMANDS.iter().find(|c| c.opcode == opcode)
            } else {
                None
            };
            one_command(found, rctd)
        }
        _ => return Err(Sense::invalid_cdb(2, Some(2))),
    };
    Ok(super::cdb::truncate(data, alloc))
}

fn all_commands(rctd: bool) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    for c in COMMANDS {
        let sa = c.sa.unwrap_or(0);
        let mut flags = 0u8;
        if c.sa.is_some() {
            flags |= 0x01;
        }
        if rctd {
            flags |= 0x02;
        }
        out.push(c.opcode);
        out.push(0);
        out.extend_from_slice(&sa.to_be_bytes());
        out.push(0);
        out.push(flags);
        out.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
        if rctd {
            out.extend_from_slice(&timeout_descriptor(c));
        }
    }
    let len = u32::try_from(out.len() - 4).unwrap_or(u32::MAX);
    out[0..4].copy_from_slice(&len.to_be_bytes());
    out
}

fn one_command(found: Option<&CmdInfo>, rctd: bool) -> Vec<u8> {
    let Some(c) = found else {
        // SUPPORT 001b: not supported; no usage data follows.
        return vec![0, 0x01, 0, 0];
    };
    let mut out = vec![0u8, 0x03];
    if rctd {
        out[1] |= 0x80;
    }
    out.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(c.usage);
    // SPC-4 6.35.3: a service action is shown in place of its field.
    if let (Some(sa), Some(b1)) = (c.sa, out.get_mut(start + 1)) {
        *b1 = (*b1 & !0x1F) | (sa as u8 & 0x1F);
    }
    if rctd {
        out.extend_from_slice(&timeout_descriptor(c));
    }
    out
}
