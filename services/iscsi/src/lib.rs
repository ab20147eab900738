//! The iSCSI target: every vdisk a LUN a hypervisor can log in to and boot
//! from, on any node.
//!
//! It owns:
//! - the wire format ([`pdu`]): basic header segments, digests, text keys;
//! - login ([`login`]): discovery, CHAP ([`chap`]), operational negotiation;
//! - the full feature phase ([`conn`], [`session`]): command windows, R2T,
//!   Data-In/Out, task management, NOP, logout and asynchronous logout;
//! - SCSI emulation ([`scsi`]): the SPC-4/SBC-3 commands, sense data and
//!   reservations, on top of [`cairn_blockdev::BlockDevice`] and nothing else;
//! - which targets exist ([`target`]): read through the narrow
//!   [`target::TargetDirectory`] trait, so this crate knows no metadata;
//! - one SCSI device per vdisk across nodes ([`remote`]): a portal on a node
//!   that does not serve the vdisk relays each command to the one that does.

pub mod chap;
pub mod conn;
pub mod login;
mod outbox;
pub mod pdu;
pub mod remote;
pub mod scsi;
pub mod server;
pub mod session;
pub mod target;
