//! A vdisk in memory: bytes plus the set of mapped 4 KiB blocks, with the
//! write-back cache contract of [`BlockDevice`] modelled: what was written
//! without FUA since the last flush is lost by [`MemDevice::lose_power`].
//! For the front ends' own tests (do they flush when they must?) and
//! development targets, where a cluster would only add start-up time;
//! everything else that claims durability is tested on the real data
//! service.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cairn_util::sync::lock;

use crate::{check_range, BlockDevice, BlockService, Bytes, DataError, Extent, BLOCK_SIZE};

/// The unit the undo log keeps (the smallest write a front end makes).
const SECTOR: u64 = 512;

pub struct MemDevice {
    data: Mutex<Vec<u8>>,
    mapped: Mutex<BTreeSet<u64>>,
    /// The durable content of each 512-byte sector changed since the last
    /// flush without FUA (an undo log: a power loss puts it back).
    volatile: Mutex<HashMap<u64, Vec<u8>>>,
    /// Makes every read fail with a checksum error (to test error paths).
    pub fail_reads: AtomicBool,
    /// Front-end state (`save_state`): it survives `lose_power`, as the
    /// data service's replicated metadata does.
    state: Mutex<HashMap<String, Vec<u8>>>,
    /// `state_era`: a test bumps it to model an owner change.
    pub era: std::sync::atomic::AtomicU64,
    /// Makes `save_state` fail as a lost metadata quorum would.
    pub fail_state_saves: AtomicBool,
}

impl MemDevice {
    pub fn new(size: usize) -> Arc<MemDevice> {
        Arc::new(MemDevice {
            data: Mutex::new(vec![0; size]),
            mapped: Mutex::new(BTreeSet::new()),
            volatile: Mutex::new(HashMap::new()),
            fail_reads: AtomicBool::new(false),
            state: Mutex::new(HashMap::new()),
            era: std::sync::atomic::AtomicU64::new(0),
            fail_state_saves: AtomicBool::new(false),
        })
    }

    /// A power loss: every change not yet durable is undone.
    pub fn lose_power(&self) {
        let mut d = lock(&self.data);
        for (sector, old) in lock(&self.volatile).drain() {
            d[Self::range(sector * SECTOR, SECTOR)].copy_from_slice(&old);
        }
    }

    /// Writes `bytes` at `offset` (under the data lock), keeping the durable
    /// version of each sector it changes unless `durable`.
    fn store(&self, d: &mut [u8], offset: u64, bytes: &[u8], durable: bool) {
        let mut v = lock(&self.volatile);
        for sector in offset / SECTOR..(offset + bytes.len() as u64).div_ceil(SECTOR) {
            if durable {
                v.remove(&sector);
            } else {
                v.entry(sector)
                    .or_insert_with(|| d[Self::range(sector * SECTOR, SECTOR)].to_vec());
            }
        }
        d[Self::range(offset, bytes.len() as u64)].copy_from_slice(bytes);
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), DataError> {
        check_range(self.size(), offset, len)
    }

    /// Every 4 KiB block the range touches now holds data.
    fn mark_mapped(&self, offset: u64, len: u64) {
        let bs = BLOCK_SIZE as u64;
        lock(&self.mapped).extend(offset / bs..(offset + len).div_ceil(bs));
    }

    fn range(offset: u64, len: u64) -> std::ops::Range<usize> {
        offset as usize..(offset + len) as usize
    }
}

#[async_trait]
impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        lock(&self.data).len() as u64
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, DataError> {
        self.check(offset, len)?;
        if self.fail_reads.load(Ordering::Relaxed) {
            return Err(DataError::Checksum {
                path: "mem".into(),
                group: 0,
                block: 0,
            });
        }
        Ok(lock(&self.data)[Self::range(offset, len)].to_vec())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DataError> {
        self.check(offset, data.len() as u64)?;
        self.store(&mut lock(&self.data), offset, &data, fua);
        self.mark_mapped(offset, data.len() as u64);
        Ok(())
    }

    async fn flush(&self) -> Result<(), DataError> {
        lock(&self.volatile).clear();
        Ok(())
    }

    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DataError> {
        self.check(offset, len)?;
        self.store(&mut lock(&self.data), offset, &vec![0; len as usize], false);
        let bs = BLOCK_SIZE as u64;
        let mut m = lock(&self.mapped);
        for b in offset.div_ceil(bs)..(offset + len) / bs {
            m.remove(&b);
        }
        Ok(())
    }

    async fn compare_and_write(
        &self,
        offset: u64,
        expected: &[u8],
        data: &[u8],
    ) -> Result<(), DataError> {
        self.check(offset, expected.len().max(data.len()) as u64)?;
        {
            // One lock for compare and write: that is the atomicity.
            let mut d = lock(&self.data);
            let cur = &d[Self::range(offset, expected.len() as u64)];
            if let Some(i) = cur.iter().zip(expected).position(|(a, b)| a != b) {
                return Err(DataError::Miscompare { offset: i as u64 });
            }
            // Durable at once: the trait has no FUA for it.
            self.store(&mut d, offset, data, true);
        }
        self.mark_mapped(offset, data.len() as u64);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DataError> {
        self.check(offset, len)?;
        let bs = BLOCK_SIZE as u64;
        let m = lock(&self.mapped);
        let mut out: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let b = at / bs;
            let next = ((b + 1) * bs).min(end);
            let mapped = m.contains(&b);
            match out.last_mut() {
                Some(e) if e.mapped == mapped => e.length += next - at,
                _ => out.push(Extent {
                    offset: at,
                    length: next - at,
                    mapped,
                }),
            }
            at = next;
        }
        Ok(out)
    }

    fn state_era(&self) -> u64 {
        self.era.load(Ordering::Relaxed)
    }

    async fn load_state(&self, key: &str) -> Result<Option<Vec<u8>>, DataError> {
        Ok(lock(&self.state).get(key).cloned())
    }

    async fn save_state(&self, key: &str, value: Vec<u8>) -> Result<(), DataError> {
        if self.fail_state_saves.load(Ordering::Relaxed) {
            return Err(DataError::Unavailable("metadata quorum lost".into()));
        }
        let mut st = lock(&self.state);
        if value.is_empty() {
            st.remove(key);
        } else {
            st.insert(key.to_string(), value);
        }
        Ok(())
    }
}

/// Memory vdisks by id.
#[derive(Default)]
pub struct MemService {
    pub devices: Mutex<HashMap<String, Arc<MemDevice>>>,
}

impl MemService {
    pub fn with(devices: impl IntoIterator<Item = (String, Arc<MemDevice>)>) -> Arc<Self> {
        Arc::new(MemService {
            devices: Mutex::new(devices.into_iter().collect()),
        })
    }
}

#[async_trait]
impl BlockService for MemService {
    async fn open(&self, vdisk_id: &str) -> Result<Arc<dyn BlockDevice>, DataError> {
        lock(&self.devices)
            .get(vdisk_id)
            .cloned()
            .map(|d| d as Arc<dyn BlockDevice>)
            .ok_or_else(|| DataError::NotFound(format!("vdisk {vdisk_id}")))
    }
}
