//! SCSI emulation (SPC-4, SBC-3) of one logical unit on a
//! [`cairn_blockdev::BlockDevice`].
//!
//! The transport (iSCSI) hands over a CDB, the Data-Out bytes it collected
//! and the I_T nexus; it gets back a status, sense data and Data-In bytes.
//! Residual accounting against the initiator's expected length is the
//! transport's job.
//!
//! Layout: [`cdb`] decodes CDBs, [`sense`] encodes sense data,
//! [`opcodes`] is the table of supported commands (dispatch and REPORT
//! SUPPORTED OPERATION CODES both read it), [`inquiry`] and [`mode`] build
//! the INQUIRY and mode pages, [`pr`] holds reservations, and [`lu`]
//! executes commands on the device (or relays them to the node that serves
//! it, see `crate::remote`).
//!
//! INTERFACE CONTRACT with the transport (crate::conn) — keep these signatures:
//!   Nexus, ScsiResponse, LunIdentity
//!   LogicalUnit::new(dev, ident) -> LogicalUnit
//!   LogicalUnit::execute(&self, &Nexus, cdb: &[u8], data_out: &[u8]) -> ScsiResponse  (async)
//!   LogicalUnit::data_out_len(&self, cdb: &[u8]) -> u32
//!   LogicalUnit::reset(&self, &Nexus)              (LUN RESET / TARGET WARM RESET; async)
//!   LogicalUnit::nexus_gone(&self, &Nexus)         (session ended; async)
//!   report_luns(cdb: &[u8], luns: &[u64]) -> ScsiResponse
//!   no_such_lun(cdb: &[u8]) -> ScsiResponse
//!   status::{GOOD, CHECK_CONDITION, CONDITION_MET, BUSY, RESERVATION_CONFLICT, TASK_SET_FULL}
//!
//! What the transport must do around `execute`: pass every Data-Out byte
//! it received (up to the initiator's expected length, even beyond
//! `data_out_len`): WRITE-type commands use the whole blocks that arrived,
//! while WRITE SAME and COMPARE AND WRITE refuse Data-Out of the wrong
//! size; answer REPORT LUNS itself with [`report_luns`]; call
//! [`LogicalUnit::reset`] on LUN RESET and TARGET WARM/COLD RESET and
//! [`LogicalUnit::nexus_gone`] when a session ends.

pub mod cdb;
pub mod inquiry;
pub mod lu;
mod luns;
pub mod mode;
pub mod opcodes;
pub mod pr;
pub mod sense;
#[cfg(test)]
pub(crate) mod tests;

pub use lu::LogicalUnit;
pub use luns::{decode_lun, encode_lun, no_such_lun, report_luns};

/// SAM status codes.
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
}

/// The I_T nexus a command arrives on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// The initiator's iSCSI name (iqn...).
    pub initiator_name: String,
    /// SCSI initiator port name: `<name>,i,0x<isid as 12 hex digits>`.
    pub initiator_port: String,
    /// The target's iSCSI name.
    pub target_name: String,
    /// Relative target port identifier (this node's portal group tag, ≥ 1).
    pub target_port: u16,
}

impl From<&Nexus> for cairn_api::iscsi::v1::Nexus {
    fn from(n: &Nexus) -> Self {
        cairn_api::iscsi::v1::Nexus {
            initiator_name: n.initiator_name.clone(),
            initiator_port: n.initiator_port.clone(),
            target_name: n.target_name.clone(),
            target_port: u32::from(n.target_port),
        }
    }
}

impl TryFrom<cairn_api::iscsi::v1::Nexus> for Nexus {
    /// What is wrong with it.
    type Error = String;
    fn try_from(n: cairn_api::iscsi::v1::Nexus) -> Result<Self, String> {
        Ok(Nexus {
            target_port: u16::try_from(n.target_port)
                .map_err(|_| format!("target port {}", n.target_port))?,
            initiator_name: n.initiator_name,
            initiator_port: n.initiator_port,
            target_name: n.target_name,
        })
    }
}

/// What a command produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScsiResponse {
    pub status: u8,
    /// Sense data (fixed format, 0x70) when `status` is CHECK CONDITION.
    pub sense: Vec<u8>,
    /// Data-In, at the length the CDB asked for (the transport truncates
    /// to the initiator's expected length and reports the residual).
    pub data_in: Vec<u8>,
}

impl ScsiResponse {
    /// CHECK CONDITION with `sense`, no data.
    pub fn check(sense: &sense::Sense) -> Self {
        ScsiResponse {
            status: status::CHECK_CONDITION,
            sense: sense.to_bytes(),
            data_in: Vec::new(),
        }
    }
}

/// What identifies a LUN to initiators. The same vdisk must look the same
/// through every node's portal (multipath merges paths by the NAA id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunIdentity {
    pub vdisk_id: String,
    pub vdisk_name: String,
}
