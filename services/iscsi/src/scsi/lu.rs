//! One logical unit: dispatch (unit attentions, reservations, the command
//! table), the SBC-3 block commands on a [`BlockDevice`], and the state the
//! sessions of this node share through one `Arc<LogicalUnit>`.
//!
//! That state has one home per vdisk, the node that serves it: while the
//! device says it is served elsewhere, [`LogicalUnit::execute`],
//! [`LogicalUnit::reset`] and [`LogicalUnit::nexus_gone`] send the call to
//! that node's logical unit (`crate::remote`), whose `*_here` twins run it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use cairn_blockdev::{BlockDevice, Bytes, DataError};
use cairn_util::sync::lock;
use prost::Message;
use tracing::{debug, warn};

use super::cdb::{self, block_range, bytchk, group_len, op, sa, truncate, BlockRange, Cdb};
use super::inquiry::{self, InquiryCtx};
use super::mode::{self, ModeState};
use super::opcodes::{self, CmdInfo};
use super::pr::{PrError, Reservations};
use super::sense::{self, from_data_error, IoDir, Sense};
use super::{status, LunIdentity, Nexus, ScsiResponse};

/// Pending unit attentions kept per nexus; older ones beyond this are
/// dropped (SAM-5 allows reporting only the most important).
const MAX_PENDING_UA: usize = 8;
/// WRITE SAME with a non-zero pattern is written in pieces this large.
const WRITE_SAME_CHUNK_BLOCKS: u64 = 2048;
/// GET LBA STATUS looks at most this many blocks per command.
const LBA_STATUS_SPAN_BLOCKS: u64 = 1 << 20;

/// Why a command did not complete with GOOD.
#[derive(Debug)]
enum Fail {
    Check(Sense),
    Conflict,
}

impl From<Sense> for Fail {
    fn from(s: Sense) -> Self {
        Fail::Check(s)
    }
}

impl From<PrError> for Fail {
    fn from(e: PrError) -> Self {
        match e {
            PrError::Conflict => Fail::Conflict,
            PrError::Check(s) => Fail::Check(s),
        }
    }
}

type CmdResult = Result<Vec<u8>, Fail>;

#[derive(Debug, Default)]
struct LuState {
    pr: Reservations,
    /// The device's state era `pr` was loaded in (`None`: not yet).
    pr_era: Option<u64>,
    mode: ModeState,
    /// Nexuses that sent a command since they appeared: the ones a reset
    /// or a mode change must tell.
    known: HashSet<Nexus>,
    ua: HashMap<Nexus, VecDeque<Sense>>,
}

impl LuState {
    fn queue_ua(&mut self, n: &Nexus, s: Sense) {
        if !self.known.contains(n) {
            return;
        }
        let q = self.ua.entry(n.clone()).or_default();
        if !q.contains(&s) && q.len() < MAX_PENDING_UA {
            q.push_back(s);
        }
    }

    fn pop_ua(&mut self, n: &Nexus) -> Option<Sense> {
        let q = self.ua.get_mut(n)?;
        let s = q.pop_front();
        if q.is_empty() {
            self.ua.remove(n);
        }
        s
    }
}

/// A vdisk as a SCSI logical unit (peripheral device type 0, SBC-3).
pub struct LogicalUnit {
    dev: Arc<dyn BlockDevice>,
    ident: LunIdentity,
    /// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT of READ CAPACITY(16).
    lbppbe: u8,
    state: Mutex<LuState>,
    /// ORWRITE reads, merges and writes; it takes this exclusively and
    /// every other writer shares it, so no write lands in between.
    write_gate: tokio::sync::RwLock<()>,
    /// Loading and saving the persistent reservations, one at a time (a
    /// save must not overtake an older one).
    pr_gate: tokio::sync::Mutex<()>,
}

/// Where the persistent reservations are kept with the vdisk
/// (`BlockDevice::save_state`).
pub const PR_STATE_KEY: &str = "scsi.pr";

impl std::fmt::Debug for LogicalUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicalUnit")
            .field("ident", &self.ident)
            .finish()
    }
}

impl LogicalUnit {
    pub fn new(dev: Arc<dyn BlockDevice>, ident: LunIdentity) -> LogicalUnit {
        let ratio = (dev.block_size() / dev.sector_size().max(1)).max(1);
        LogicalUnit {
            dev,
            ident,
            lbppbe: ratio.ilog2().min(15) as u8,
            state: Mutex::new(LuState::default()),
            write_gate: tokio::sync::RwLock::new(()),
            pr_gate: tokio::sync::Mutex::new(()),
        }
    }

    /// Overrides the physical block exponent READ CAPACITY(16) reports
    /// (by default the device's block size over its sector size: 3).
    pub fn with_physical_block_exponent(mut self, exponent: u8) -> LogicalUnit {
        self.lbppbe = exponent.min(15);
        self
    }

    pub fn identity(&self) -> &LunIdentity {
        &self.ident
    }

    pub(crate) fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// Bytes of Data-Out the CDB asks for (0 for commands without any).
    pub fn data_out_len(&self, cdb: &[u8]) -> u32 {
        let len = cdb::data_out_len(&Cdb::new(cdb), self.block());
        u32::try_from(len).unwrap_or(u32::MAX)
    }

    /// LUN RESET / TARGET WARM RESET: SPC-2 reservations are released and
    /// every nexus that has talked to this LU gets one unit attention, on
    /// whichever node serves the vdisk.
    pub async fn reset(&self, nexus: &Nexus) {
        if self.dev.served_elsewhere() {
            crate::remote::reset(self, nexus).await;
        }
        self.reset_here();
    }

    /// [`Self::reset`] of this node's state only.
    pub(crate) fn reset_here(&self) {
        let mut st = lock(&self.state);
        st.pr.reset();
        let known: Vec<Nexus> = st.known.iter().cloned().collect();
        for n in known {
            st.ua.remove(&n);
            st.queue_ua(&n, Sense::reset_occurred());
        }
        debug!(vdisk_id = %self.ident.vdisk_id, "logical unit reset");
    }

    /// The session of `nexus` ended: its SPC-2 reservation and pending unit
    /// attentions go; persistent reservations stay.
    pub async fn nexus_gone(&self, nexus: &Nexus) {
        if self.dev.served_elsewhere() {
            crate::remote::nexus_gone(self, nexus).await;
        }
        self.nexus_gone_here(nexus);
    }

    /// [`Self::nexus_gone`] of this node's state only.
    pub(crate) fn nexus_gone_here(&self, nexus: &Nexus) {
        let mut st = lock(&self.state);
        st.known.remove(nexus);
        st.ua.remove(nexus);
        st.pr.nexus_gone(nexus);
    }

    /// Executes one command, on the node that serves the vdisk.
    pub async fn execute(&self, nexus: &Nexus, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        self.execute_owned(nexus, cdb, Bytes::copy_from_slice(data_out))
            .await
    }

    /// [`Self::execute`] taking over the buffer the data arrived in: a
    /// write's data goes on to the replicas without a copy.
    pub async fn execute_owned(&self, nexus: &Nexus, cdb: &[u8], data_out: Bytes) -> ScsiResponse {
        if self.dev.served_elsewhere() {
            if let Some(r) = crate::remote::execute(self, nexus, cdb, &data_out).await {
                return r;
            }
        }
        self.execute_here(nexus, cdb, &data_out).await
    }

    /// Executes one command on this node's logical unit.
    pub(crate) async fn execute_here(
        &self,
        nexus: &Nexus,
        cdb: &[u8],
        data_out: &Bytes,
    ) -> ScsiResponse {
        match self.run(nexus, cdb, data_out).await {
            Ok(data_in) => ScsiResponse {
                status: status::GOOD,
                sense: Vec::new(),
                data_in,
            },
            Err(Fail::Check(s)) => {
                debug!(
                    vdisk_id = %self.ident.vdisk_id,
                    opcode = cdb.first().copied().unwrap_or(0),
                    key = s.key,
                    asc = s.asc,
                    ascq = s.ascq,
                    "check condition"
                );
                ScsiResponse::check(&s)
            }
            Err(Fail::Conflict) => ScsiResponse {
                status: status::RESERVATION_CONFLICT,
                sense: Vec::new(),
                data_in: Vec::new(),
            },
        }
    }

    fn block(&self) -> u64 {
        u64::from(self.dev.sector_size().max(1))
    }

    fn num_blocks(&self) -> u64 {
        self.dev.size() / self.block()
    }

    /// Loads the saved persistent reservations when this unit has not yet
    /// in the device's current era (first use, or the vdisk's owner changed
    /// since): the owner before may have changed them.
    async fn ensure_pr_loaded(&self) -> Result<(), Fail> {
        let era = self.dev.state_era();
        if lock(&self.state).pr_era == Some(era) {
            return Ok(());
        }
        let _gate = self.pr_gate.lock().await;
        if lock(&self.state).pr_era == Some(era) {
            return Ok(());
        }
        let saved = self
            .dev
            .load_state(PR_STATE_KEY)
            .await
            .map_err(|e| self.dev_err(&e, IoDir::Read))?;
        let pr = match saved {
            None => Reservations::default(),
            Some(bytes) => cairn_api::iscsi::v1::PersistentReservations::decode(bytes.as_slice())
                .map_err(|e| e.to_string())
                .and_then(Reservations::from_saved)
                .map_err(|e| {
                    // Never run without the reservations a host relies on.
                    warn!(vdisk_id = %self.ident.vdisk_id, error = %e,
                        "saved persistent reservations are unreadable");
                    Sense::new(sense::key::HARDWARE_ERROR, 0x44, 0x00)
                })?,
        };
        let mut st = lock(&self.state);
        st.pr = pr;
        st.pr_era = Some(era);
        Ok(())
    }

    async fn run(&self, nexus: &Nexus, raw: &[u8], data_out: &Bytes) -> CmdResult {
        self.ensure_pr_loaded().await?;
        let c = Cdb::new(raw);
        let opcode = c.opcode();
        let ua_exempt = matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE);
        {
            let mut st = lock(&self.state);
            if st.known.insert(nexus.clone()) {
                debug!(vdisk_id = %self.ident.vdisk_id, initiator = %nexus.initiator_port, "new nexus");
            }
            if !ua_exempt {
                if let Some(ua) = st.pop_ua(nexus) {
                    return Err(ua.into());
                }
            }
        }
        if raw.is_empty() {
            return Err(Sense::invalid_opcode().into());
        }
        let info = opcodes::lookup(&c)?;
        let len = group_len(opcode).ok_or_else(Sense::invalid_opcode)?;
        if c.len() < len {
            return Err(Sense::invalid_cdb(0, None).into());
        }
        // NACA: ACA is not supported (SAM-5 5.9.1.4).
        if c.u8(len - 1) & 0x04 != 0 {
            return Err(Sense::invalid_cdb((len - 1) as u16, Some(2)).into());
        }
        if lock(&self.state).pr.conflicts(nexus, info.pr, info.spc2_ok) {
            return Err(Fail::Conflict);
        }
        self.dispatch(nexus, &c, info, data_out).await
    }

    async fn dispatch(
        &self,
        nexus: &Nexus,
        c: &Cdb,
        info: &CmdInfo,
        data_out: &Bytes,
    ) -> CmdResult {
        match c.opcode() {
            op::TEST_UNIT_READY | op::START_STOP_UNIT => Ok(Vec::new()),
            op::REQUEST_SENSE => self.request_sense(nexus, c),
            op::INQUIRY => Ok(inquiry::inquiry(
                c,
                &InquiryCtx {
                    ident: &self.ident,
                    nexus,
                },
            )?),
            op::MODE_SENSE6 | op::MODE_SENSE10 => self.mode_sense(c),
            op::MODE_SELECT6 | op::MODE_SELECT10 => self.mode_select(nexus, c, data_out),
            op::RESERVE6 | op::RESERVE10 => self.reserve(nexus, c).await,
            op::RELEASE6 | op::RELEASE10 => self.release(nexus),
            op::PREVENT_ALLOW => match c.u8(4) & 0x03 {
                0 | 1 => Ok(Vec::new()),
                _ => Err(Sense::invalid_cdb(4, Some(1)).into()),
            },
            op::READ_CAPACITY10 => Ok(self.read_capacity10()),
            op::PR_IN => self.persistent_in(c),
            op::PR_OUT => self.persistent_out(nexus, c, data_out).await,
            op::SERVICE_ACTION_IN16 => match info.sa {
                Some(sa::READ_CAPACITY16) => Ok(self.read_capacity16(c)),
                _ => self.get_lba_status(c).await,
            },
            op::MAINTENANCE_IN => Ok(opcodes::report_supported_opcodes(c)?),
            op::REPORT_LUNS => {
                warn!(vdisk_id = %self.ident.vdisk_id, "REPORT LUNS reached a logical unit; the transport answers it");
                Err(Sense::new(sense::key::HARDWARE_ERROR, 0x44, 0x00).into())
            }
            _ => self.block_command(c, data_out).await,
        }
    }

    async fn block_command(&self, c: &Cdb, data_out: &Bytes) -> CmdResult {
        match c.opcode() {
            op::READ6 | op::READ10 | op::READ12 | op::READ16 => self.read(c).await,
            op::WRITE6 | op::WRITE10 | op::WRITE12 | op::WRITE16 => self.write(c, data_out).await,
            op::WRITE_VERIFY10 | op::WRITE_VERIFY12 | op::WRITE_VERIFY16 => {
                if bytchk(c) > 1 {
                    return Err(Sense::invalid_cdb(1, Some(2)).into());
                }
                self.write(c, data_out).await
            }
            op::VERIFY10 | op::VERIFY12 | op::VERIFY16 => self.verify(c, data_out).await,
            op::PRE_FETCH10 | op::PRE_FETCH16 => {
                self.check_range(block_range(c))?;
                Ok(Vec::new())
            }
            op::SYNC_CACHE10 | op::SYNC_CACHE16 => {
                self.check_range(block_range(c))?;
                self.dev
                    .flush()
                    .await
                    .map_err(|e| self.dev_err(&e, IoDir::Write))?;
                Ok(Vec::new())
            }
            op::WRITE_SAME10 | op::WRITE_SAME16 => self.write_same(c, data_out).await,
            op::UNMAP => self.unmap(c, data_out).await,
            op::COMPARE_AND_WRITE => self.compare_and_write(c, data_out).await,
            op::ORWRITE16 => self.orwrite(c, data_out).await,
            _ => Err(Sense::invalid_opcode().into()),
        }
    }

    /// Whether the write-back cache is on (MODE SELECT can turn it off).
    fn write_cache(&self) -> bool {
        lock(&self.state).mode.wce
    }

    /// With the write cache off, a command that changed blocks completes
    /// only once the change is durable (unmaps and zeroing carry no FUA).
    async fn durable_unless_cached(&self) -> CmdResult {
        if !self.write_cache() {
            self.dev
                .flush()
                .await
                .map_err(|e| self.dev_err(&e, IoDir::Write))?;
        }
        Ok(Vec::new())
    }

    fn dev_err(&self, e: &DataError, dir: IoDir) -> Sense {
        let s = from_data_error(e, dir);
        if !matches!(e, DataError::Miscompare { .. }) {
            warn!(vdisk_id = %self.ident.vdisk_id, error = %e, key = s.key, asc = s.asc, "device error");
        }
        s
    }

    fn check_range(&self, r: BlockRange) -> Result<(), Sense> {
        match r.lba.checked_add(r.blocks) {
            Some(end) if end <= self.num_blocks() => Ok(()),
            _ => Err(Sense::lba_out_of_range()),
        }
    }

    /// The checks every READ/WRITE/VERIFY-like command starts with:
    /// protection information is not supported, the range must fit and the
    /// transfer must not exceed the block limits page.
    fn check_io(&self, c: &Cdb, r: BlockRange) -> Result<(), Sense> {
        let has_protect = !matches!(c.opcode(), op::READ6 | op::WRITE6);
        if has_protect && c.u8(1) >> 5 != 0 {
            return Err(Sense::invalid_cdb(1, Some(7)));
        }
        self.check_range(r)?;
        if r.blocks > u64::from(inquiry::MAX_TRANSFER_BLOCKS) {
            return Err(Sense::invalid_cdb(r.len_byte, None));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), Sense> {
        if lock(&self.state).mode.swp {
            return Err(Sense::write_protected());
        }
        Ok(())
    }

    /// Whole blocks of Data-Out that can be used: a short Data-Out (an
    /// initiator whose expected length is smaller than the CDB's) writes
    /// only what arrived; the transport reports the residual.
    fn usable(&self, r: BlockRange, data_out: &[u8]) -> usize {
        let want = r.blocks.saturating_mul(self.block());
        let have = (data_out.len() as u64).min(want);
        (have - have % self.block()) as usize
    }

    async fn read(&self, c: &Cdb) -> CmdResult {
        let r = block_range(c);
        self.check_io(c, r)?;
        if r.blocks == 0 {
            return Ok(Vec::new());
        }
        self.dev
            .read(r.lba * self.block(), r.blocks * self.block())
            .await
            .map_err(|e| self.dev_err(&e, IoDir::Read).into())
    }

    /// The checked range and the whole blocks of Data-Out to write, or
    /// `None` when there is nothing to write (a zero-length transfer).
    fn write_data<'a>(
        &self,
        c: &Cdb,
        data_out: &'a [u8],
    ) -> Result<Option<(BlockRange, &'a [u8])>, Sense> {
        let r = block_range(c);
        self.check_io(c, r)?;
        if r.blocks == 0 {
            return Ok(None);
        }
        self.check_writable()?;
        let n = self.usable(r, data_out);
        Ok(data_out.get(..n).filter(|d| !d.is_empty()).map(|d| (r, d)))
    }

    /// Whether a write must be durable when it completes: the CDB's FUA
    /// bit (WRITE(6) has none), or the write cache turned off.
    fn fua(&self, c: &Cdb) -> bool {
        (c.opcode() != op::WRITE6 && c.u8(1) & 0x08 != 0) || !self.write_cache()
    }

    async fn write(&self, c: &Cdb, data_out: &Bytes) -> CmdResult {
        let Some((r, data)) = self.write_data(c, data_out)? else {
            return Ok(Vec::new());
        };
        // The part of the received buffer to write, shared rather than copied.
        let data = data_out.slice(..data.len());
        let fua = self.fua(c);
        let _gate = self.write_gate.read().await;
        self.dev
            .write(r.lba * self.block(), data, fua)
            .await
            .map_err(|e| self.dev_err(&e, IoDir::Write))?;
        Ok(Vec::new())
    }

    async fn verify(&self, c: &Cdb, data_out: &[u8]) -> CmdResult {
        let r = block_range(c);
        let check = bytchk(c);
        if check == 2 {
            return Err(Sense::invalid_cdb(1, Some(2)).into());
        }
        self.check_io(c, r)?;
        if r.blocks == 0 {
            return Ok(Vec::new());
        }
        let bs = self.block() as usize;
        let (blocks, expected): (u64, Vec<u8>) = match check {
            0 => (r.blocks, Vec::new()),
            1 => {
                let n = self.usable(r, data_out);
                (
                    n as u64 / self.block(),
                    data_out.get(..n).unwrap_or_default().to_vec(),
                )
            }
            _ => {
                let one = data_out
                    .get(..bs)
                    .ok_or_else(Sense::invalid_cdb_no_pointer)?;
                (r.blocks, one.repeat(r.blocks as usize))
            }
        };
        if blocks == 0 {
            return Ok(Vec::new());
        }
        let have = self
            .dev
            .read(r.lba * self.block(), blocks * self.block())
            .await
            .map_err(|e| self.dev_err(&e, IoDir::Read))?;
        if check == 0 {
            return Ok(Vec::new());
        }
        match have.iter().zip(&expected).position(|(a, b)| a != b) {
            Some(at) => Err(Sense::miscompare(at as u64).into()),
            None => Ok(Vec::new()),
        }
    }

    async fn write_same(&self, c: &Cdb, data_out: &[u8]) -> CmdResult {
        let flags = c.u8(1);
        if flags >> 5 != 0 {
            return Err(Sense::invalid_cdb(1, Some(7)).into());
        }
        // ANCHOR: no anchored state (ANC_SUP=0).
        if flags & 0x10 != 0 {
            return Err(Sense::invalid_cdb(1, Some(4)).into());
        }
        let unmap = flags & 0x08 != 0;
        let ndob = c.opcode() == op::WRITE_SAME16 && flags & 0x01 != 0;
        let r = block_range(c);
        // WSNZ=1, and the block limits page's maximum.
        if r.blocks == 0 || r.blocks > inquiry::MAX_WRITE_SAME_BLOCKS {
            return Err(Sense::invalid_cdb(r.len_byte, None).into());
        }
        self.check_range(r)?;
        let bs = self.block() as usize;
        let pattern: Vec<u8> = if ndob {
            vec![0u8; bs]
        } else if data_out.len() == bs {
            data_out.to_vec()
        } else {
            return Err(Sense::invalid_cdb_no_pointer().into());
        };
        self.check_writable()?;
        let _gate = self.write_gate.read().await;
        let offset = r.lba * self.block();
        if pattern.iter().all(|b| *b == 0) {
            self.dev
                .write_zeroes(offset, r.blocks * self.block(), unmap)
                .await
                .map_err(|e| self.dev_err(&e, IoDir::Write))?;
            return self.durable_unless_cached().await;
        }
        let fua = !self.write_cache();
        let mut done = 0u64;
        while done < r.blocks {
            let n = (r.blocks - done).min(WRITE_SAME_CHUNK_BLOCKS);
            let buf = Bytes::from(pattern.repeat(n as usize));
            self.dev
                .write(offset + done * self.block(), buf, fua)
                .await
                .map_err(|e| self.dev_err(&e, IoDir::Write))?;
            done += n;
        }
        Ok(Vec::new())
    }

    async fn unmap(&self, c: &Cdb, data_out: &[u8]) -> CmdResult {
        if c.u8(1) & 0x01 != 0 {
            return Err(Sense::invalid_cdb(1, Some(0)).into());
        }
        let plen = usize::from(c.u16(7));
        if plen == 0 {
            return Ok(Vec::new());
        }
        let Some(p) = data_out.get(..plen).filter(|_| plen >= 8) else {
            return Err(Sense::param_list_length().into());
        };
        let bd_len = usize::from(u16::from_be_bytes([p[2], p[3]]));
        let count = bd_len.min(plen - 8) / 16;
        if count as u64 > u64::from(inquiry::MAX_UNMAP_DESCRIPTORS) {
            return Err(Sense::invalid_param(2, None).into());
        }
        let mut ranges = Vec::with_capacity(count);
        let mut total = 0u64;
        for d in p
            .get(8..8 + count * 16)
            .unwrap_or_default()
            .chunks_exact(16)
        {
            let lba = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
            let blocks = u64::from(u32::from_be_bytes([d[8], d[9], d[10], d[11]]));
            self.check_range(BlockRange {
                lba,
                blocks,
                len_byte: 0,
            })?;
            total += blocks;
            if blocks > 0 {
                ranges.push((lba, blocks));
            }
        }
        if total > u64::from(inquiry::MAX_UNMAP_LBA_COUNT) {
            return Err(Sense::invalid_param(8, None).into());
        }
        self.check_writable()?;
        let _gate = self.write_gate.read().await;
        for (lba, blocks) in ranges {
            self.dev
                .unmap(lba * self.block(), blocks * self.block())
                .await
                .map_err(|e| self.dev_err(&e, IoDir::Write))?;
        }
        self.durable_unless_cached().await
    }

    async fn compare_and_write(&self, c: &Cdb, data_out: &[u8]) -> CmdResult {
        if c.u8(1) >> 5 != 0 {
            return Err(Sense::invalid_cdb(1, Some(7)).into());
        }
        let r = block_range(c);
        self.check_range(r)?;
        let half = r.blocks * self.block();
        // The Data-Out must be exactly the compare and the write buffers;
        // anything else means CDB and data disagree.
        if data_out.len() as u64 != 2 * half {
            return Err(Sense::invalid_cdb(r.len_byte, None).into());
        }
        if r.blocks == 0 {
            return Ok(Vec::new());
        }
        self.check_writable()?;
        let (expected, data) = data_out.split_at(half as usize);
        let _gate = self.write_gate.read().await;
        self.dev
            .compare_and_write(r.lba * self.block(), expected, data)
            .await
            .map_err(|e| self.dev_err(&e, IoDir::Write))?;
        Ok(Vec::new())
    }

    async fn orwrite(&self, c: &Cdb, data_out: &[u8]) -> CmdResult {
        let Some((r, data)) = self.write_data(c, data_out)? else {
            return Ok(Vec::new());
        };
        let n = data.len();
        let offset = r.lba * self.block();
        let _gate = self.write_gate.write().await;
        let mut cur = self
            .dev
            .read(offset, n as u64)
            .await
            .map_err(|e| self.dev_err(&e, IoDir::Read))?;
        for (dst, src) in cur.iter_mut().zip(data) {
            *dst |= *src;
        }
        let fua = self.fua(c);
        self.dev
            .write(offset, Bytes::from(cur), fua)
            .await
            .map_err(|e| self.dev_err(&e, IoDir::Write))?;
        Ok(Vec::new())
    }

    async fn get_lba_status(&self, c: &Cdb) -> CmdResult {
        let lba = c.u64(2);
        let alloc = c.u32(10) as usize;
        let total = self.num_blocks();
        if lba >= total {
            return Err(Sense::lba_out_of_range().into());
        }
        let span = (total - lba).min(LBA_STATUS_SPAN_BLOCKS);
        let bs = self.block();
        let mut extents = self
            .dev
            .block_status(lba * bs, span * bs)
            .await
            .map_err(|e| self.dev_err(&e, IoDir::Read))?;
        extents.sort_by_key(|e| e.offset);
        // (start, end, deallocated); gaps the device did not describe are
        // reported mapped, the answer that can never lose data.
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut at = lba;
        let end = lba + span;
        for e in extents {
            let s = (e.offset / bs).max(at);
            let t = e.offset.saturating_add(e.length).div_ceil(bs).min(end);
            if s >= t {
                continue;
            }
            if s > at {
                push_run(&mut runs, at, s, false);
            }
            push_run(&mut runs, s, t, !e.mapped);
            at = t;
        }
        if at < end {
            push_run(&mut runs, at, end, false);
        }
        let max_desc = (alloc.saturating_sub(8) / 16).clamp(1, 512);
        let mut out = vec![0u8; 8];
        for (s, t, dealloc) in runs.into_iter().take(max_desc) {
            out.extend_from_slice(&s.to_be_bytes());
            let n = u32::try_from(t - s).unwrap_or(u32::MAX);
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(&[u8::from(dealloc), 0, 0, 0]);
        }
        let len = (out.len() - 4) as u32;
        out[0..4].copy_from_slice(&len.to_be_bytes());
        Ok(truncate(out, alloc))
    }

    fn read_capacity10(&self) -> Vec<u8> {
        let last = self.num_blocks().saturating_sub(1);
        let mut d = u32::try_from(last)
            .unwrap_or(u32::MAX)
            .to_be_bytes()
            .to_vec();
        d.extend_from_slice(&(self.block() as u32).to_be_bytes());
        d
    }

    fn read_capacity16(&self, c: &Cdb) -> Vec<u8> {
        let alloc = c.u32(10) as usize;
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&self.num_blocks().saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&(self.block() as u32).to_be_bytes());
        d[13] = self.lbppbe & 0x0F;
        // LBPME (thin provisioned) and LBPRZ (unmapped blocks read zero).
        d[14] = 0xC0;
        truncate(d, alloc)
    }

    fn request_sense(&self, nexus: &Nexus, c: &Cdb) -> CmdResult {
        // DESC: only fixed format sense data is produced.
        if c.u8(1) & 0x01 != 0 {
            return Err(Sense::invalid_cdb(1, Some(0)).into());
        }
        let pending = lock(&self.state).pop_ua(nexus);
        let s = pending.unwrap_or_else(|| Sense::new(sense::key::NO_SENSE, 0, 0));
        Ok(truncate(s.to_bytes(), usize::from(c.u8(4))))
    }

    fn mode_select(&self, nexus: &Nexus, c: &Cdb, data_out: &[u8]) -> CmdResult {
        let mut st = lock(&self.state);
        let next = mode::mode_select(c, data_out, self.dev.sector_size(), st.mode)?;
        if next != st.mode {
            st.mode = next;
            let others: Vec<Nexus> = st.known.iter().filter(|n| *n != nexus).cloned().collect();
            for n in others {
                st.queue_ua(&n, Sense::mode_parameters_changed());
            }
            debug!(vdisk_id = %self.ident.vdisk_id, swp = next.swp, wce = next.wce,
                "mode parameters changed");
        }
        Ok(Vec::new())
    }

    // The helpers below lock the state; they are plain functions so that
    // no mutex guard can live across an await of the dispatching future.

    fn mode_sense(&self, c: &Cdb) -> CmdResult {
        let st = lock(&self.state).mode;
        Ok(mode::mode_sense(
            c,
            self.num_blocks(),
            self.dev.sector_size(),
            st,
        )?)
    }

    async fn reserve(&self, nexus: &Nexus, c: &Cdb) -> CmdResult {
        // Third-party and long-id reservations are not supported.
        if c.opcode() == op::RESERVE10 && c.u8(1) & 0x12 != 0 {
            return Err(Sense::invalid_cdb(1, Some(4)).into());
        }
        // Not while a persistent change is being saved (see persistent_out).
        let _gate = self.pr_gate.lock().await;
        lock(&self.state).pr.reserve_spc2(nexus)?;
        Ok(Vec::new())
    }

    fn release(&self, nexus: &Nexus) -> CmdResult {
        lock(&self.state).pr.release_spc2(nexus);
        Ok(Vec::new())
    }

    fn persistent_in(&self, c: &Cdb) -> CmdResult {
        Ok(lock(&self.state).pr.persistent_in(c)?)
    }

    /// A change of the persistent reservations takes effect only once it
    /// is saved with the vdisk (it must survive an owner failover): it is
    /// made on a copy, saved, then installed; if it cannot be saved the
    /// command fails and nothing changed. The gate keeps every other change
    /// that reads the persistent part (SPC-2 RESERVE) out meanwhile.
    async fn persistent_out(&self, nexus: &Nexus, c: &Cdb, data_out: &[u8]) -> CmdResult {
        let _gate = self.pr_gate.lock().await;
        let (next, notices) = {
            let st = lock(&self.state);
            let mut next = st.pr.clone();
            let notices = next.persistent_out(nexus, c, data_out)?;
            let changed = next.persistent_differs(&st.pr);
            (changed.then_some(next), notices)
        };
        if let Some(mut next) = next {
            self.dev
                .save_state(PR_STATE_KEY, next.saved().encode_to_vec())
                .await
                .map_err(|e| self.dev_err(&e, IoDir::Write))?;
            let mut st = lock(&self.state);
            // A reset or an ended session may have released an SPC-2
            // reservation meanwhile: keep that.
            next.take_spc2_from(&st.pr);
            st.pr = next;
        }
        let mut st = lock(&self.state);
        for (n, s) in notices {
            st.queue_ua(&n, s);
        }
        Ok(Vec::new())
    }
}

fn push_run(runs: &mut Vec<(u64, u64, bool)>, s: u64, t: u64, dealloc: bool) {
    if let Some(last) = runs.last_mut() {
        if last.1 == s && last.2 == dealloc {
            last.1 = t;
            return;
        }
    }
    runs.push((s, t, dealloc));
}
