//! The byte layout of an extent group file. Pure functions, no I/O, so the
//! layout can be tested exhaustively and read by the offline tool.
//!
//! ```text
//! offset 0     superblock (SUPERBLOCK_SIZE bytes)
//!              "CAIRNEXT" | u32 header_len | u32 crc32c(header) | ExtentGroupHeader | zero pad
//!   offset 3072  sync mark slot 0: "CAIRNSYN" | u32 len | u32 crc32c | SyncMark | zero pad
//!   offset 3584  sync mark slot 1 (the same; the newest valid one counts)
//! offset 4096  record, record, ...   (appended; never rewritten in place)
//!              u32 RECORD_MAGIC | u32 header_len | u32 crc32c(header) | RecordHeader | payload
//! ```
//!
//! The payload of a record no block points to any more may be a hole
//! (zeros): scanning reads headers only, and no slot points into it.
//!
//! All integers are little-endian. Every field that can be wrong on disk is
//! bounded before it is used to size an allocation.

use cairn_api::data::v1::{ExtentGroupHeader, RecordHeader, RecordKind, SyncMark};
use prost::Message as _;

/// First bytes of every extent group file.
pub const SUPERBLOCK_MAGIC: &[u8; 8] = b"CAIRNEXT";
/// Bytes reserved for the superblock; records start here.
pub const SUPERBLOCK_SIZE: u64 = 4096;
/// First bytes of a sync mark ([`encode_sync_mark`]).
pub const SYNC_MARK_MAGIC: &[u8; 8] = b"CAIRNSYN";
/// Where the two sync marks live: each in a 512-byte sector of its own at
/// the superblock's end, written in turn, so a torn write of one (a sector
/// is the unit a disk writes whole) leaves the other.
pub const SYNC_MARK_SLOTS: [u64; 2] = [SUPERBLOCK_SIZE - 1024, SUPERBLOCK_SIZE - 512];
/// Bytes one sync mark slot spans.
const SYNC_MARK_SLOT_BYTES: usize = 512;
/// Sync mark versions this build reads.
const SYNC_MARK_VERSION: u32 = 1;
/// First bytes of every record ("CRC1" read as little-endian bytes).
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"CRC1");
/// Bytes before a record's header: magic, header length, header checksum.
pub const RECORD_PREFIX: usize = 12;
/// The block size every format version so far uses.
pub const BLOCK_SIZE: usize = cairn_blockdev::BLOCK_SIZE;
/// Format versions this build reads.
pub const READABLE_VERSIONS: std::ops::RangeInclusive<u32> = 1..=1;
/// Largest record header accepted (a 64 MiB group's block checksums fit).
pub const MAX_RECORD_HEADER: usize = 256 << 10;
/// Largest extent group accepted.
pub const MAX_GROUP_BYTES: u64 = 256 << 20;

/// Why bytes are not a valid superblock or record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not an extent group file (bad magic)")]
    BadMagic,
    #[error("superblock header checksum mismatch")]
    SuperblockChecksum,
    #[error("superblock header does not decode: {0}")]
    SuperblockDecode(String),
    #[error("unknown format version {0} (this build reads {min}..={max})", min = READABLE_VERSIONS.start(), max = READABLE_VERSIONS.end())]
    UnknownVersion(u32),
    #[error("invalid superblock: {0}")]
    InvalidSuperblock(String),
    #[error("bad record magic at offset {0}")]
    RecordMagic(u64),
    #[error("record header at offset {0} fails its checksum")]
    RecordChecksum(u64),
    #[error("record at offset {offset} is invalid: {reason}")]
    InvalidRecord { offset: u64, reason: String },
}

/// Encodes the superblock, padded to [`SUPERBLOCK_SIZE`].
pub fn encode_superblock(h: &ExtentGroupHeader) -> Vec<u8> {
    let mut out = framed(SUPERBLOCK_MAGIC, &h.encode_to_vec());
    out.resize(SUPERBLOCK_SIZE as usize, 0);
    out
}

/// `magic | u32 len | u32 crc32c(body) | body`: how the superblock, each
/// sync mark and each record header are laid out.
pub(crate) fn framed(magic: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(magic.len() + 8 + body.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The body of a [`framed`] buffer (8-byte magic), if its magic, length
/// and checksum are right; `None` says only that it is not valid.
pub(crate) fn unframe<'a>(magic: &[u8; 8], buf: &'a [u8]) -> Option<&'a [u8]> {
    if buf.len() < 16 || &buf[..8] != magic {
        return None;
    }
    let len = le_u32(&buf[8..12]) as usize;
    let body = buf.get(16..16usize.checked_add(len)?)?;
    (crc32c::crc32c(body) == le_u32(&buf[12..16])).then_some(body)
}

/// [`encode_superblock`] for a new file: its first sync mark says nothing
/// after the superblock is durable yet. An error if the header would reach
/// into the marks.
pub fn encode_new_superblock(h: &ExtentGroupHeader) -> Result<Vec<u8>, FormatError> {
    let mut sb = encode_superblock(h);
    let len = 16 + h.encoded_len();
    if len > SYNC_MARK_SLOTS[0] as usize {
        return Err(FormatError::InvalidSuperblock(format!(
            "header of {len} bytes reaches into the sync marks at {}",
            SYNC_MARK_SLOTS[0]
        )));
    }
    put_sync_mark(&mut sb, 0, SUPERBLOCK_SIZE);
    Ok(sb)
}

/// Encodes a sync mark saying the file is durable up to `durable_end`.
pub fn encode_sync_mark(durable_end: u64) -> Vec<u8> {
    let body = SyncMark {
        format_version: SYNC_MARK_VERSION,
        durable_end,
    }
    .encode_to_vec();
    framed(SYNC_MARK_MAGIC, &body)
}

/// Puts a sync mark into slot `slot` of a superblock being built.
pub fn put_sync_mark(superblock: &mut [u8], slot: usize, durable_end: u64) {
    let mark = encode_sync_mark(durable_end);
    let at = SYNC_MARK_SLOTS[slot % 2] as usize;
    if let Some(dst) = superblock.get_mut(at..at + mark.len()) {
        dst.copy_from_slice(&mark);
    }
}

/// One slot's sync mark; `None` for zeros (a file from before marks), a
/// torn write or a version this build does not know.
fn decode_sync_mark(slot: &[u8]) -> Option<u64> {
    let m = SyncMark::decode(unframe(SYNC_MARK_MAGIC, slot)?).ok()?;
    (m.format_version == SYNC_MARK_VERSION).then_some(m.durable_end)
}

/// The file's sync marks, by slot.
pub fn sync_marks(superblock: &[u8]) -> [Option<u64>; 2] {
    SYNC_MARK_SLOTS.map(|at| {
        let at = at as usize;
        superblock
            .get(at..at + SYNC_MARK_SLOT_BYTES)
            .and_then(decode_sync_mark)
    })
}

/// How far the file is known durable: the higher of its two marks (they
/// only grow), or `None` for a file written before marks.
pub fn durable_end(superblock: &[u8]) -> Option<u64> {
    let [a, b] = sync_marks(superblock);
    a.max(b)
}

/// Decodes and validates a superblock.
pub fn decode_superblock(buf: &[u8]) -> Result<ExtentGroupHeader, FormatError> {
    if buf.len() < 16 || &buf[..8] != SUPERBLOCK_MAGIC {
        return Err(FormatError::BadMagic);
    }
    let len = le_u32(&buf[8..12]) as usize;
    let crc = le_u32(&buf[12..16]);
    if len > SUPERBLOCK_SIZE as usize - 16 || buf.len() < 16 + len {
        return Err(FormatError::SuperblockDecode(format!(
            "header length {len} out of range"
        )));
    }
    let body = &buf[16..16 + len];
    if crc32c::crc32c(body) != crc {
        return Err(FormatError::SuperblockChecksum);
    }
    let h = ExtentGroupHeader::decode(body)
        .map_err(|e| FormatError::SuperblockDecode(e.to_string()))?;
    if !READABLE_VERSIONS.contains(&h.format_version) {
        return Err(FormatError::UnknownVersion(h.format_version));
    }
    validate_group(&h)?;
    Ok(h)
}

fn validate_group(h: &ExtentGroupHeader) -> Result<(), FormatError> {
    let bad = |m: &str| Err(FormatError::InvalidSuperblock(m.to_string()));
    if h.block_size as usize != BLOCK_SIZE {
        return bad("block size is not 4096");
    }
    if h.vblock_size == 0 || !(h.vblock_size as usize).is_multiple_of(BLOCK_SIZE) {
        return bad("vblock size is not a multiple of the block size");
    }
    if h.vblock_count == 0 || group_bytes(h) > MAX_GROUP_BYTES {
        return bad("extent group size out of range");
    }
    Ok(())
}

/// Bytes of vdisk address space one group covers.
pub fn group_bytes(h: &ExtentGroupHeader) -> u64 {
    u64::from(h.vblock_size) * u64::from(h.vblock_count)
}

/// Number of blocks one group covers.
pub fn group_blocks(h: &ExtentGroupHeader) -> u32 {
    (group_bytes(h) / BLOCK_SIZE as u64) as u32
}

/// Encodes a record prefix and header; the payload follows it on disk.
pub fn encode_record_head(rh: &RecordHeader) -> Vec<u8> {
    framed(&RECORD_MAGIC.to_le_bytes(), &rh.encode_to_vec())
}

/// [`encode_record_head`] with the header padded (`RecordHeader.padding`)
/// so that, written at file offset `at`, it ends on a block boundary: the
/// payload after it can then go to the disk with direct I/O.
pub fn encode_record_head_block_aligned(rh: &RecordHeader, at: u64) -> Vec<u8> {
    let mut rh = RecordHeader {
        padding: Vec::new(),
        ..rh.clone()
    };
    let base = RECORD_PREFIX + rh.encoded_len();
    let block = BLOCK_SIZE as u64;
    // The padding field costs its tag (1 byte), its length (1 or 2 bytes)
    // and the zeros; at least one zero, or proto3 would not encode it.
    let mut want = base + 3;
    loop {
        let end = at + want as u64;
        let total = want + ((block - end % block) % block) as usize;
        let extra = total - base;
        let fits = [extra.saturating_sub(2), extra.saturating_sub(3)]
            .into_iter()
            .find(|&n| n >= 1 && 1 + prost::length_delimiter_len(n) + n == extra);
        if let Some(n) = fits {
            rh.padding = vec![0; n];
            return encode_record_head(&rh);
        }
        // No padding length fills exactly this gap (a 1-byte length for 127
        // zeros is 2 short of 130 bytes, a 2-byte one 1 over): next block.
        want = total + 1;
    }
}

/// Reads a record prefix: returns the header length and its checksum.
pub fn decode_record_prefix(
    buf: &[u8; RECORD_PREFIX],
    offset: u64,
) -> Result<(usize, u32), FormatError> {
    if le_u32(&buf[0..4]) != RECORD_MAGIC {
        return Err(FormatError::RecordMagic(offset));
    }
    let len = le_u32(&buf[4..8]) as usize;
    if len == 0 || len > MAX_RECORD_HEADER {
        return Err(FormatError::InvalidRecord {
            offset,
            reason: format!("header length {len} out of range"),
        });
    }
    Ok((len, le_u32(&buf[8..12])))
}

/// Decodes and validates a record header against its group.
pub fn decode_record_header(
    body: &[u8],
    crc: u32,
    offset: u64,
    group: &ExtentGroupHeader,
) -> Result<RecordHeader, FormatError> {
    if crc32c::crc32c(body) != crc {
        return Err(FormatError::RecordChecksum(offset));
    }
    let rh = RecordHeader::decode(body).map_err(|e| FormatError::InvalidRecord {
        offset,
        reason: e.to_string(),
    })?;
    let bad = |reason: String| Err(FormatError::InvalidRecord { offset, reason });
    if !READABLE_VERSIONS.contains(&rh.format_version) {
        return Err(FormatError::UnknownVersion(rh.format_version));
    }
    let blocks = group_blocks(group);
    let end = u64::from(rh.first_block) + u64::from(rh.block_count);
    match RecordKind::try_from(rh.kind) {
        Ok(RecordKind::RecordEpoch) => {
            if rh.payload_len != 0 {
                return bad("epoch record with a payload".into());
            }
        }
        Ok(RecordKind::RecordTrim) => {
            if rh.block_count == 0 || end > u64::from(blocks) || rh.payload_len != 0 {
                return bad("trim record out of the group's range".into());
            }
        }
        Ok(RecordKind::RecordData) => {
            if rh.block_count == 0 || end > u64::from(blocks) {
                return bad(format!(
                    "blocks {}..{end} outside the group's {blocks}",
                    rh.first_block
                ));
            }
            if rh.block_crc32c.len() != rh.block_count as usize {
                return bad("block checksum count differs from block count".into());
            }
            if u64::from(rh.payload_len) > u64::from(rh.block_count) * BLOCK_SIZE as u64 + 4096 {
                return bad("payload longer than its blocks".into());
            }
        }
        Err(_) => return bad(format!("unknown record kind {}", rh.kind)),
    }
    Ok(rh)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// crc32c of each [`BLOCK_SIZE`] block of `data` (whose length is a multiple of it).
pub fn block_checksums(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK_SIZE).map(crc32c::crc32c).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_api::data::v1::Codec;

    #[test]
    fn sync_marks_take_the_newest_valid_slot() {
        let mut sb = encode_new_superblock(&group()).unwrap();
        assert_eq!(
            decode_superblock(&sb).unwrap(),
            group(),
            "marks leave the header alone"
        );
        assert_eq!(durable_end(&sb), Some(SUPERBLOCK_SIZE));
        put_sync_mark(&mut sb, 1, 9000);
        assert_eq!(sync_marks(&sb), [Some(SUPERBLOCK_SIZE), Some(9000)]);
        put_sync_mark(&mut sb, 0, 12000);
        assert_eq!(durable_end(&sb), Some(12000));
        // A torn write of the newer slot leaves the older one.
        sb[SYNC_MARK_SLOTS[0] as usize + 20] ^= 0xff;
        assert_eq!(durable_end(&sb), Some(9000));
        // A file from before marks has none.
        assert_eq!(durable_end(&encode_superblock(&group())), None);
        // Neither does a length running off the slot.
        let mut sb = encode_new_superblock(&group()).unwrap();
        let at = SYNC_MARK_SLOTS[1] as usize + 8;
        sb[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(sync_marks(&sb)[1], None);
    }

    #[test]
    fn a_header_reaching_into_the_marks_is_refused() {
        let h = ExtentGroupHeader {
            vdisk_id: "v".repeat(3100),
            ..group()
        };
        assert!(matches!(
            encode_new_superblock(&h),
            Err(FormatError::InvalidSuperblock(_))
        ));
    }

    fn group() -> ExtentGroupHeader {
        ExtentGroupHeader {
            format_version: 1,
            cluster_id: "c".into(),
            extent_group_id: 7,
            vdisk_id: "v".into(),
            vdisk_generation: 0,
            first_vblock: 3,
            vblock_count: 1,
            vblock_size: 1 << 20,
            block_size: BLOCK_SIZE as u32,
            codec: Codec::None as i32,
            checksum: 0,
            epoch: 1,
            created_unix_ms: 0,
            ..Default::default()
        }
    }

    #[test]
    fn superblock_round_trip_and_every_flip_detected() {
        let sb = encode_superblock(&group());
        assert_eq!(sb.len() as u64, SUPERBLOCK_SIZE);
        assert_eq!(decode_superblock(&sb), Ok(group()));
        let used = 16 + group().encoded_len();
        for i in 0..used {
            let mut bad = sb.clone();
            bad[i] ^= 0x40;
            assert!(
                decode_superblock(&bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn unknown_version_is_named() {
        let mut g = group();
        g.format_version = 9;
        let err = decode_superblock(&encode_superblock(&g));
        assert_eq!(err, Err(FormatError::UnknownVersion(9)));
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("unknown format version 9"));
    }

    /// A raw DATA record header of two blocks.
    fn two_blocks(sequence: u64, epoch: u64, first_block: u32, crcs: [u32; 2]) -> RecordHeader {
        RecordHeader {
            format_version: 1,
            kind: RecordKind::RecordData as i32,
            sequence,
            epoch,
            first_block,
            block_count: 2,
            codec: 0,
            block_crc32c: crcs.to_vec(),
            payload_len: 8192,
            payload_crc32c: 0,
            padding: Vec::new(),
        }
    }

    /// The header length and checksum in the prefix of an encoded head
    /// found at `at` ((0, 0) when the prefix does not decode).
    fn prefix_of(head: &[u8], at: u64) -> (usize, u32) {
        let mut prefix = [0u8; RECORD_PREFIX];
        prefix.copy_from_slice(&head[..RECORD_PREFIX]);
        decode_record_prefix(&prefix, at).unwrap_or((0, 0))
    }

    #[test]
    fn record_bounds_are_checked() {
        let g = group();
        let head = encode_record_head(&two_blocks(1, 1, 255, [0, 0]));
        let (len, crc) = prefix_of(&head, 4096);
        let err = decode_record_header(&head[RECORD_PREFIX..RECORD_PREFIX + len], crc, 4096, &g);
        assert!(
            matches!(err, Err(FormatError::InvalidRecord { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn block_aligned_heads_end_on_a_block_and_decode_as_written() {
        let g = group();
        let rh = two_blocks(9, 3, 0, [7, 8]);
        for at in (4096..8192 + 1).chain([1 << 30, (1 << 30) + 4095]) {
            let head = encode_record_head_block_aligned(&rh, at);
            assert_eq!(
                (at + head.len() as u64) % BLOCK_SIZE as u64,
                0,
                "head at {at} ends off a block"
            );
            assert!(head.len() <= 2 * BLOCK_SIZE, "{} bytes at {at}", head.len());
            let (len, crc) = prefix_of(&head, at);
            assert_eq!(RECORD_PREFIX + len, head.len());
            let back = decode_record_header(&head[RECORD_PREFIX..], crc, at, &g);
            let back = back.map(|b| RecordHeader {
                padding: Vec::new(),
                ..b
            });
            assert_eq!(back, Ok(rh.clone()), "at {at}");
        }
    }
}
