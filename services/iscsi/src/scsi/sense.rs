//! Sense data (SPC-4 4.5): the fixed format (response code 0x70) every
//! CHECK CONDITION carries, the handful of sense keys and additional sense
//! codes this emulation reports, and how data path errors map onto them.

use cairn_blockdev::DataError;

/// Sense keys (SPC-4 table 48).
pub mod key {
    pub const NO_SENSE: u8 = 0x00;
    pub const NOT_READY: u8 = 0x02;
    pub const MEDIUM_ERROR: u8 = 0x03;
    pub const HARDWARE_ERROR: u8 = 0x04;
    pub const ILLEGAL_REQUEST: u8 = 0x05;
    pub const UNIT_ATTENTION: u8 = 0x06;
    pub const DATA_PROTECT: u8 = 0x07;
    pub const ABORTED_COMMAND: u8 = 0x0B;
    pub const MISCOMPARE: u8 = 0x0E;
}

/// Length of the fixed-format sense data we produce.
pub const SENSE_LEN: usize = 18;

/// Where in the CDB or parameter list an ILLEGAL REQUEST points
/// (SPC-4 4.5.2.4.2); initiators and libiscsi use it to tell "command not
/// supported" from "field not supported".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    pub in_cdb: bool,
    pub byte: u16,
    pub bit: Option<u8>,
}

/// One sense condition, before encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field (sets VALID).
    pub info: Option<u32>,
    pub field: Option<FieldPointer>,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense {
            key,
            asc,
            ascq,
            info: None,
            field: None,
        }
    }

    /// 05/20/00 INVALID COMMAND OPERATION CODE.
    pub fn invalid_opcode() -> Self {
        Self::new(key::ILLEGAL_REQUEST, 0x20, 0x00).at_cdb(0, None)
    }

    /// 05/24/00 INVALID FIELD IN CDB, pointing at `byte` (and `bit`).
    pub fn invalid_cdb(byte: u16, bit: Option<u8>) -> Self {
        Self::new(key::ILLEGAL_REQUEST, 0x24, 0x00).at_cdb(byte, bit)
    }

    /// 05/24/00 without a field pointer: the CDB is fine on its own but
    /// does not match the data the initiator sent.
    pub fn invalid_cdb_no_pointer() -> Self {
        Self::new(key::ILLEGAL_REQUEST, 0x24, 0x00)
    }

    /// 05/26/00 INVALID FIELD IN PARAMETER LIST.
    pub fn invalid_param(byte: u16, bit: Option<u8>) -> Self {
        let mut s = Self::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
        s.field = Some(FieldPointer {
            in_cdb: false,
            byte,
            bit,
        });
        s
    }

    /// 05/1A/00 PARAMETER LIST LENGTH ERROR.
    pub fn param_list_length() -> Self {
        Self::new(key::ILLEGAL_REQUEST, 0x1A, 0x00)
    }

    /// 05/21/00 LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub fn lba_out_of_range() -> Self {
        Self::new(key::ILLEGAL_REQUEST, 0x21, 0x00)
    }

    /// 05/25/00 LOGICAL UNIT NOT SUPPORTED.
    pub fn lun_not_supported() -> Self {
        Self::new(key::ILLEGAL_REQUEST, 0x25, 0x00)
    }

    /// 05/39/00 SAVING PARAMETERS NOT SUPPORTED.
    pub fn saving_not_supported(byte: u16, bit: Option<u8>) -> Self {
        Self::new(key::ILLEGAL_REQUEST, 0x39, 0x00).at_cdb(byte, bit)
    }

    /// 05/26/04 INVALID RELEASE OF PERSISTENT RESERVATION.
    pub fn invalid_release() -> Self {
        Self::new(key::ILLEGAL_REQUEST, 0x26, 0x04)
    }

    /// 0E/1D/00 MISCOMPARE DURING VERIFY OPERATION; `offset` is the byte
    /// offset of the first difference from the start of the compared data.
    pub fn miscompare(offset: u64) -> Self {
        let mut s = Self::new(key::MISCOMPARE, 0x1D, 0x00);
        s.info = Some(u32::try_from(offset).unwrap_or(u32::MAX));
        s
    }

    /// 07/27/02 WRITE PROTECTED (software: the SWP mode bit).
    pub fn write_protected() -> Self {
        Self::new(key::DATA_PROTECT, 0x27, 0x02)
    }

    /// 06/29/00 POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    pub fn reset_occurred() -> Self {
        Self::new(key::UNIT_ATTENTION, 0x29, 0x00)
    }

    /// 06/2A/01 MODE PARAMETERS CHANGED.
    pub fn mode_parameters_changed() -> Self {
        Self::new(key::UNIT_ATTENTION, 0x2A, 0x01)
    }

    /// 06/2A/03 RESERVATIONS PREEMPTED.
    pub fn reservations_preempted() -> Self {
        Self::new(key::UNIT_ATTENTION, 0x2A, 0x03)
    }

    /// 06/2A/04 RESERVATIONS RELEASED.
    pub fn reservations_released() -> Self {
        Self::new(key::UNIT_ATTENTION, 0x2A, 0x04)
    }

    /// 06/2A/05 REGISTRATIONS PREEMPTED.
    pub fn registrations_preempted() -> Self {
        Self::new(key::UNIT_ATTENTION, 0x2A, 0x05)
    }

    fn at_cdb(mut self, byte: u16, bit: Option<u8>) -> Self {
        self.field = Some(FieldPointer {
            in_cdb: true,
            byte,
            bit,
        });
        self
    }

    /// Fixed-format sense data, 18 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; SENSE_LEN];
        b[0] = 0x70;
        b[2] = self.key & 0x0F;
        if let Some(info) = self.info {
            b[0] |= 0x80;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        // ADDITIONAL SENSE LENGTH: the bytes after byte 7.
        b[7] = (SENSE_LEN - 8) as u8;
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some(fp) = self.field {
            let mut sks = 0x80u8;
            if fp.in_cdb {
                sks |= 0x40;
            }
            if let Some(bit) = fp.bit {
                sks |= 0x08 | (bit & 0x07);
            }
            b[15] = sks;
            b[16..18].copy_from_slice(&fp.byte.to_be_bytes());
        }
        b
    }

    /// Whether this is a unit attention condition.
    pub fn is_unit_attention(&self) -> bool {
        self.key == key::UNIT_ATTENTION
    }
}

/// Whether a failed device call was reading or writing: the same fault is
/// an unrecovered read error on one side and a write error on the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDir {
    Read,
    Write,
}

/// Maps a data path error onto sense data.
pub fn from_data_error(err: &DataError, dir: IoDir) -> Sense {
    match err {
        DataError::Io { .. } | DataError::Corrupt { .. } | DataError::Checksum { .. } => {
            match dir {
                IoDir::Read => Sense::new(key::MEDIUM_ERROR, 0x11, 0x00),
                IoDir::Write => Sense::new(key::MEDIUM_ERROR, 0x0C, 0x00),
            }
        }
        // Thin provisioning ran out of room: SBC-3 4.7.3.6.
        DataError::NoSpace { .. } => Sense::new(key::DATA_PROTECT, 0x27, 0x07),
        DataError::Miscompare { offset } => Sense::miscompare(*offset),
        // "becoming ready": initiators retry it for a while, which is what
        // an owner failover or a stale epoch needs.
        DataError::Unavailable(_) | DataError::StaleEpoch { .. } => {
            Sense::new(key::NOT_READY, 0x04, 0x01)
        }
        // The vdisk was deleted under a mapped LUN.
        DataError::NotFound(_) => Sense::lun_not_supported(),
        // Ranges are checked before the device is called, so the device
        // refusing one is our bug, not the initiator's.
        DataError::Invalid(_) => Sense::new(key::HARDWARE_ERROR, 0x44, 0x00),
    }
}
