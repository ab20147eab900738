//! CDB decoding: operation codes, the length each group implies, and
//! panic-free field access (a CDB is whatever bytes the initiator sent).

/// Operation codes this emulation knows.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ6: u8 = 0x08;
    pub const WRITE6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT6: u8 = 0x15;
    pub const RESERVE6: u8 = 0x16;
    pub const RELEASE6: u8 = 0x17;
    pub const MODE_SENSE6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW: u8 = 0x1E;
    pub const READ_CAPACITY10: u8 = 0x25;
    pub const READ10: u8 = 0x28;
    pub const WRITE10: u8 = 0x2A;
    pub const WRITE_VERIFY10: u8 = 0x2E;
    pub const VERIFY10: u8 = 0x2F;
    pub const PRE_FETCH10: u8 = 0x34;
    pub const SYNC_CACHE10: u8 = 0x35;
    pub const WRITE_SAME10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT10: u8 = 0x55;
    pub const RESERVE10: u8 = 0x56;
    pub const RELEASE10: u8 = 0x57;
    pub const MODE_SENSE10: u8 = 0x5A;
    pub const PR_IN: u8 = 0x5E;
    pub const PR_OUT: u8 = 0x5F;
    pub const READ16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE16: u8 = 0x8A;
    pub const ORWRITE16: u8 = 0x8B;
    pub const WRITE_VERIFY16: u8 = 0x8E;
    pub const VERIFY16: u8 = 0x8F;
    pub const PRE_FETCH16: u8 = 0x90;
    pub const SYNC_CACHE16: u8 = 0x91;
    pub const WRITE_SAME16: u8 = 0x93;
    pub const SERVICE_ACTION_IN16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ12: u8 = 0xA8;
    pub const WRITE12: u8 = 0xAA;
    pub const WRITE_VERIFY12: u8 = 0xAE;
    pub const VERIFY12: u8 = 0xAF;
}

/// Service actions of SERVICE ACTION IN(16) and MAINTENANCE IN.
pub mod sa {
    pub const READ_CAPACITY16: u16 = 0x10;
    pub const GET_LBA_STATUS: u16 = 0x12;
    pub const REPORT_SUPPORTED_OPCODES: u16 = 0x0C;
}

/// A CDB copied into a fixed buffer: reads past what the initiator sent
/// yield zeros, so decoders never index out of bounds.
#[derive(Debug, Clone, Copy)]
pub struct Cdb {
    bytes: [u8; 16],
    len: usize,
}

impl Cdb {
    pub fn new(raw: &[u8]) -> Self {
        let mut bytes = [0u8; 16];
        let len = raw.len().min(16);
        for (dst, src) in bytes.iter_mut().zip(raw) {
            *dst = *src;
        }
        Cdb { bytes, len }
    }

    /// Length the initiator sent (at most 16).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn opcode(&self) -> u8 {
        self.u8(0)
    }

    pub fn u8(&self, i: usize) -> u8 {
        self.bytes.get(i).copied().unwrap_or(0)
    }

    pub fn u16(&self, i: usize) -> u16 {
        u16::from_be_bytes([self.u8(i), self.u8(i + 1)])
    }

    pub fn u24(&self, i: usize) -> u32 {
        u32::from_be_bytes([0, self.u8(i), self.u8(i + 1), self.u8(i + 2)])
    }

    pub fn u32(&self, i: usize) -> u32 {
        u32::from_be_bytes([self.u8(i), self.u8(i + 1), self.u8(i + 2), self.u8(i + 3)])
    }

    pub fn u64(&self, i: usize) -> u64 {
        (u64::from(self.u32(i)) << 32) | u64::from(self.u32(i + 4))
    }

    /// The service action field (byte 1, bits 4-0) of the 16/12-byte
    /// service action commands.
    pub fn service_action(&self) -> u16 {
        u16::from(self.u8(1) & 0x1F)
    }
}

/// The CDB length an operation code's group implies (SPC-4 4.2.5.1), or
/// `None` for the reserved, variable-length and vendor groups.
pub fn group_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// LBA, transfer length and flags of the READ/WRITE/VERIFY family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    pub lba: u64,
    pub blocks: u64,
    /// Byte of the TRANSFER LENGTH field (for field pointers).
    pub len_byte: u16,
}

/// Decodes LBA and length where every block command family keeps them.
pub fn block_range(cdb: &Cdb) -> BlockRange {
    match cdb.opcode() {
        op::READ6 | op::WRITE6 => {
            let blocks = match cdb.u8(4) {
                0 => 256,
                n => u64::from(n),
            };
            BlockRange {
                lba: u64::from(cdb.u24(1) & 0x1F_FFFF),
                blocks,
                len_byte: 4,
            }
        }
        op::READ12 | op::WRITE12 | op::WRITE_VERIFY12 | op::VERIFY12 => BlockRange {
            lba: u64::from(cdb.u32(2)),
            blocks: u64::from(cdb.u32(6)),
            len_byte: 6,
        },
        op::READ16
        | op::WRITE16
        | op::ORWRITE16
        | op::WRITE_VERIFY16
        | op::VERIFY16
        | op::PRE_FETCH16
        | op::SYNC_CACHE16
        | op::WRITE_SAME16 => BlockRange {
            lba: cdb.u64(2),
            blocks: u64::from(cdb.u32(10)),
            len_byte: 10,
        },
        op::COMPARE_AND_WRITE => BlockRange {
            lba: cdb.u64(2),
            blocks: u64::from(cdb.u8(13)),
            len_byte: 13,
        },
        // The 10-byte forms: READ/WRITE/VERIFY/WRITE AND VERIFY/PRE-FETCH/
        // SYNCHRONIZE CACHE/WRITE SAME.
        _ => BlockRange {
            lba: u64::from(cdb.u32(2)),
            blocks: u64::from(cdb.u16(7)),
            len_byte: 7,
        },
    }
}

/// The BYTCHK field of VERIFY and WRITE AND VERIFY.
pub fn bytchk(cdb: &Cdb) -> u8 {
    (cdb.u8(1) >> 1) & 0x03
}

/// How many Data-Out bytes a CDB asks for, given the logical block size.
pub fn data_out_len(cdb: &Cdb, block: u64) -> u64 {
    let blocks = |r: BlockRange| r.blocks.saturating_mul(block);
    match cdb.opcode() {
        op::WRITE6
        | op::WRITE10
        | op::WRITE12
        | op::WRITE16
        | op::ORWRITE16
        | op::WRITE_VERIFY10
        | op::WRITE_VERIFY12
        | op::WRITE_VERIFY16 => blocks(block_range(cdb)),
        op::VERIFY10 | op::VERIFY12 | op::VERIFY16 => match bytchk(cdb) {
            1 => blocks(block_range(cdb)),
            3 => block,
            _ => 0,
        },
        op::WRITE_SAME10 => block,
        op::WRITE_SAME16 if cdb.u8(1) & 0x01 != 0 => 0,
        op::WRITE_SAME16 => block,
        op::COMPARE_AND_WRITE => blocks(block_range(cdb)).saturating_mul(2),
        op::UNMAP => u64::from(cdb.u16(7)),
        op::MODE_SELECT6 => u64::from(cdb.u8(4)),
        op::MODE_SELECT10 => u64::from(cdb.u16(7)),
        op::PR_OUT => u64::from(cdb.u32(5)),
        _ => 0,
    }
}

/// Truncates `data` to the allocation length of the CDB.
pub fn truncate(mut data: Vec<u8>, alloc: usize) -> Vec<u8> {
    data.truncate(alloc);
    data
}
