//! The one door from the protocol front ends (iSCSI, NFS) into the data
//! service. Front ends see a vdisk as a byte-addressed device and nothing
//! else: no extent groups, no replicas, no metadata.
//!
//! Every write is durable on all live replicas before it returns, so `fua`
//! needs no extra work and `flush` is a barrier with nothing to flush; both
//! are kept in the contract so that a later write-back cache cannot forget
//! them.

use std::sync::Arc;

use async_trait::async_trait;

use crate::DataError;

/// A run of blocks that are all mapped or all unmapped (thin provisioning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub mapped: bool,
}

/// A vdisk as the front ends see it. Offsets and lengths are in bytes and
/// must be multiples of [`BlockDevice::sector_size`]; sub-block writes are
/// read-modify-written by the implementation.
#[async_trait]
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Smallest addressable unit (512).
    fn sector_size(&self) -> u32 {
        512
    }
    /// Preferred I/O unit (the 4 KiB checksum block).
    fn block_size(&self) -> u32 {
        crate::BLOCK_SIZE as u32
    }
    /// Reads `len` bytes; unwritten ranges read as zeros.
    async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, DataError>;
    /// Writes `data`; durable on every live replica when it returns.
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DataError>;
    /// Makes every completed write durable (a barrier: writes already are).
    async fn flush(&self) -> Result<(), DataError>;
    /// Deallocates a range; it reads as zeros afterwards.
    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DataError>;
    /// Writes zeros, deallocating whole blocks when `unmap` allows it.
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DataError>;
    /// Atomically: if the range equals `expected`, writes `data` there;
    /// otherwise fails with [`DataError::Miscompare`] naming the first
    /// differing byte and writes nothing.
    async fn compare_and_write(
        &self,
        offset: u64,
        expected: &[u8],
        data: &[u8],
    ) -> Result<(), DataError>;
    /// Which parts of a range hold data.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DataError>;
}

/// Finds the device behind a vdisk id (front ends hold no other handle).
#[async_trait]
pub trait BlockService: Send + Sync {
    async fn open(&self, vdisk_id: &str) -> Result<Arc<dyn BlockDevice>, DataError>;
    /// Opens only a vdisk this node serves itself (for requests another
    /// node already forwarded: never forward twice).
    async fn open_owned(&self, vdisk_id: &str) -> Result<Arc<dyn BlockDevice>, DataError> {
        self.open(vdisk_id).await
    }
}

/// Checks that a byte range is sector-aligned and inside the device.
pub fn check_range(dev_size: u64, offset: u64, len: u64) -> Result<(), DataError> {
    if !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
        return Err(DataError::Invalid(format!(
            "range {offset}+{len} is not aligned to 512 bytes"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= dev_size => Ok(()),
        _ => Err(DataError::Invalid(format!(
            "range {offset}+{len} is beyond the device's {dev_size} bytes"
        ))),
    }
}
