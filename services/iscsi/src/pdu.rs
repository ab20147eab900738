//! The iSCSI wire format (RFC 7143 section 11): a 48-byte basic header
//! segment, optional additional headers, an optional CRC32C header digest, a
//! data segment padded to 4 bytes and an optional CRC32C data digest.
//!
//! The parser never trusts a length from the wire: the data segment is
//! refused before it is read when it exceeds what this side declared it can
//! receive, so a hostile peer cannot make us allocate more than that.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Length of the basic header segment.
pub const BHS_LEN: usize = 48;
/// The "reserved" initiator/target task tag.
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Opcodes sent by initiators.
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_CMD: u8 = 0x01;
    pub const TASK_MGMT: u8 = 0x02;
    pub const LOGIN: u8 = 0x03;
    pub const TEXT: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    // Target opcodes.
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESP: u8 = 0x21;
    pub const TASK_MGMT_RESP: u8 = 0x22;
    pub const LOGIN_RESP: u8 = 0x23;
    pub const TEXT_RESP: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESP: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 11.17.1).
pub mod reject {
    pub const DATA_DIGEST: u8 = 0x02;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
}

/// Why a PDU could not be read. Every variant but `Io`/`Closed` means the
/// peer broke the protocol: the connection is dropped after a log line.
#[derive(Debug, thiserror::Error)]
pub enum PduError {
    #[error("connection closed")]
    Closed,
    #[error("connection closed in the middle of a PDU (truncated header or data)")]
    Truncated,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("data segment of {len} bytes exceeds the {max} bytes this target accepts")]
    DataTooLong { len: u32, max: u32 },
    #[error("header digest mismatch (got {got:#010x}, computed {want:#010x})")]
    HeaderDigest { got: u32, want: u32 },
}

/// One PDU. The header is kept as bytes with typed accessors: every opcode
/// lays its fields out differently, and copying them into structs would
/// only add a place for the two views to disagree.
#[derive(Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
    /// Set by the reader when the data digest did not match (the caller
    /// rejects the PDU; the header itself is trustworthy).
    pub data_digest_bad: bool,
    /// A Data-Out from [`read_pdu_head`] whose data segment is still in the
    /// stream, for [`read_data_into`].
    pub data_pending: bool,
    /// The data segment went into the buffer its write gathers in, not
    /// into `data`.
    pub gathered: bool,
}

impl std::fmt::Debug for Pdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the data: it may hold CHAP secrets' responses or user data.
        f.debug_struct("Pdu")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("itt", &format_args!("{:#010x}", self.itt()))
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// DataSegmentLength of a basic header segment (bytes 5..8).
fn segment_len(bhs: &[u8]) -> u32 {
    u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(s) => u32::from_be_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

impl Pdu {
    /// A target PDU with the given opcode and flags byte, everything else 0.
    pub fn new(opcode: u8, flags: u8) -> Self {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode & 0x3f;
        bhs[1] = flags;
        Pdu {
            bhs,
            ahs: Vec::new(),
            data: Vec::new(),
            data_digest_bad: false,
            data_pending: false,
            gathered: false,
        }
    }

    /// DataSegmentLength, from the header.
    pub fn data_segment_len(&self) -> u32 {
        segment_len(&self.bhs)
    }

    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    /// The I bit: an immediate command (does not advance CmdSN).
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }
    /// The F (final) bit.
    pub fn final_bit(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }
    pub fn u32_at(&self, at: usize) -> u32 {
        be32(&self.bhs, at)
    }
    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.bhs[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.bhs[at], self.bhs[at + 1]])
    }
    pub fn set_u16(&mut self, at: usize, v: u16) {
        self.bhs[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
    /// The LUN field, as encoded on the wire (`scsi::decode_lun`).
    pub fn lun(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bhs[8..16]);
        b
    }
    pub fn set_lun(&mut self, lun: [u8; 8]) {
        self.bhs[8..16].copy_from_slice(&lun);
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    pub fn set_itt(&mut self, v: u32) {
        self.set_u32(16, v)
    }
    /// CmdSN of initiator PDUs (bytes 24..28).
    pub fn cmdsn(&self) -> u32 {
        self.u32_at(24)
    }
    /// ExpStatSN of initiator PDUs (bytes 28..32).
    pub fn exp_statsn(&self) -> u32 {
        self.u32_at(28)
    }

    /// Serialises the PDU, with digests when negotiated.
    pub fn encode(&self, header_digest: bool, data_digest: bool) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out, header_digest, data_digest);
        out
    }

    /// Appends the serialised PDU to `out` (the writer batches several PDUs
    /// into one buffer without an intermediate copy each).
    pub fn encode_into(&self, out: &mut Vec<u8>, header_digest: bool, data_digest: bool) {
        let dlen = self.data.len();
        let pad = (4 - dlen % 4) % 4;
        out.reserve(BHS_LEN + self.ahs.len() + dlen + pad + 8);
        let head = out.len();
        out.extend_from_slice(&self.bhs);
        // The lengths are derived from the contents so they cannot disagree.
        out[head + 4] = (self.ahs.len() / 4) as u8;
        let d = (dlen as u32).to_be_bytes();
        out[head + 5..head + 8].copy_from_slice(&d[1..4]);
        out.extend_from_slice(&self.ahs);
        if header_digest {
            let crc = crc32c::crc32c(&out[head..]);
            out.extend_from_slice(&crc.to_le_bytes());
        }
        if dlen > 0 {
            let start = out.len();
            out.extend_from_slice(&self.data);
            out.extend(std::iter::repeat_n(0u8, pad));
            if data_digest {
                let crc = crc32c::crc32c(&out[start..]);
                out.extend_from_slice(&crc.to_le_bytes());
            }
        }
    }
}

/// Reads exactly `buf.len()` bytes; a clean EOF before the first byte is
/// `Closed` when `first` is set, anything else short is `Truncated`.
async fn read_full<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    first: bool,
) -> Result<(), PduError> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(if first && got == 0 {
                PduError::Closed
            } else {
                PduError::Truncated
            });
        }
        got += n;
    }
    Ok(())
}

/// Appends exactly `n` bytes to `buf`, read straight into its spare
/// capacity (no zeroing of what the socket overwrites anyway).
async fn read_into<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    n: usize,
) -> Result<(), PduError> {
    buf.reserve(n);
    let want = buf.len() + n;
    while buf.len() < want {
        let left = (want - buf.len()) as u64;
        if (&mut *r).take(left).read_buf(buf).await? == 0 {
            return Err(PduError::Truncated);
        }
    }
    Ok(())
}

/// The most a write command's first PDU reserves for the data still to
/// come (a larger transfer grows its buffer as it arrives).
const PREALLOCATE_WRITE: usize = 4 << 20;

/// What a reader accepts on one connection.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Our declared MaxRecvDataSegmentLength.
    pub max_data: u32,
    pub header_digest: bool,
    pub data_digest: bool,
}

/// Whether `buf` starts with a whole PDU (header, AHS, digests, padded
/// data): reading it then takes no wait on the socket.
pub fn starts_with_whole_pdu(buf: &[u8], limits: ReadLimits) -> bool {
    if buf.len() < BHS_LEN {
        return false;
    }
    let ahs = usize::from(buf[4]) * 4;
    let dlen = segment_len(buf) as usize;
    let digest = |on: bool, present: bool| if on && present { 4 } else { 0 };
    let total = BHS_LEN
        + ahs
        + digest(limits.header_digest, true)
        + dlen.div_ceil(4) * 4
        + digest(limits.data_digest, dlen > 0);
    buf.len() >= total
}

/// Reads one PDU.
pub async fn read_pdu<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: ReadLimits,
) -> Result<Pdu, PduError> {
    read_pdu_opts(r, limits, false).await
}

/// Reads one PDU, but leaves a Data-Out's data segment in the stream
/// (`Pdu::data_pending`): the caller reads it with [`read_data_into`]
/// straight into the buffer its write gathers in. Gathering segments read
/// into PDUs of their own copied every written byte once more (5 % of an
/// owner's CPU on 1 MiB writes).
pub async fn read_pdu_head<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: ReadLimits,
) -> Result<Pdu, PduError> {
    read_pdu_opts(r, limits, true).await
}

/// Reads the data segment of a PDU from [`read_pdu_head`], appending it to
/// `into` (its digest checked as [`read_pdu`] does).
pub async fn read_data_into<R: AsyncRead + Unpin>(
    r: &mut R,
    p: &mut Pdu,
    into: &mut Vec<u8>,
    limits: ReadLimits,
) -> Result<(), PduError> {
    p.data_digest_bad = read_segment(r, into, p.data_segment_len() as usize, limits).await?;
    p.data_pending = false;
    Ok(())
}

/// Appends a data segment of `dlen` bytes to `into` (its padding read and
/// dropped); returns whether its data digest, when negotiated, was wrong.
async fn read_segment<R: AsyncRead + Unpin>(
    r: &mut R,
    into: &mut Vec<u8>,
    dlen: usize,
    limits: ReadLimits,
) -> Result<bool, PduError> {
    let padded = dlen.div_ceil(4) * 4;
    let start = into.len();
    read_into(r, into, padded).await?;
    let mut bad = false;
    if limits.data_digest {
        let mut d = [0u8; 4];
        read_full(r, &mut d, false).await?;
        bad = u32::from_le_bytes(d) != crc32c::crc32c(&into[start..start + padded]);
    }
    into.truncate(start + dlen);
    Ok(bad)
}

async fn read_pdu_opts<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: ReadLimits,
    defer_data_out: bool,
) -> Result<Pdu, PduError> {
    let mut bhs = [0u8; BHS_LEN];
    read_full(r, &mut bhs, true).await?;
    // Refuse an oversized PDU before reading any more of it.
    let dlen = segment_len(&bhs);
    if dlen > limits.max_data {
        return Err(PduError::DataTooLong {
            len: dlen,
            max: limits.max_data,
        });
    }
    let ahs_len = usize::from(bhs[4]) * 4;
    let mut ahs = vec![0u8; ahs_len];
    read_full(r, &mut ahs, false).await?;
    if limits.header_digest {
        let mut d = [0u8; 4];
        read_full(r, &mut d, false).await?;
        let got = u32::from_le_bytes(d);
        let mut hasher_input = Vec::with_capacity(BHS_LEN + ahs_len);
        hasher_input.extend_from_slice(&bhs);
        hasher_input.extend_from_slice(&ahs);
        let want = crc32c::crc32c(&hasher_input);
        if got != want {
            return Err(PduError::HeaderDigest { got, want });
        }
    }
    let mut data = Vec::new();
    let mut data_digest_bad = false;
    let data_pending = defer_data_out && dlen > 0 && bhs[0] & 0x3f == op::DATA_OUT;
    if dlen > 0 && !data_pending {
        let padded = (dlen as usize).div_ceil(4) * 4;
        // A write command's immediate data starts the buffer its whole
        // transfer is gathered in: room for the rest avoids a copy later.
        let whole = if bhs[0] & 0x3f == 0x01 && bhs[1] & 0x20 != 0 {
            (be32(&bhs, 20) as usize).min(PREALLOCATE_WRITE)
        } else {
            0
        };
        data = Vec::with_capacity(padded.max(whole));
        data_digest_bad = read_segment(r, &mut data, dlen as usize, limits).await?;
    }
    Ok(Pdu {
        bhs,
        ahs,
        data,
        data_digest_bad,
        data_pending,
        gathered: false,
    })
}

/// Parses `key=value\0` pairs of a text or login data segment. Malformed
/// entries (no `=`, not UTF-8) are an error: the login is refused.
pub fn parse_text(data: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in data.split(|b| *b == 0) {
        if item.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(item).map_err(|_| "text key is not UTF-8".to_string())?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("text item without '=': {:.64}", s))?;
        if k.is_empty() || k.len() > 63 {
            return Err(format!("invalid text key {:.64}", k));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Builds a `key=value\0...` data segment.
pub fn build_text(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: ReadLimits = ReadLimits {
        max_data: 8192,
        header_digest: true,
        data_digest: true,
    };

    /// A PDU counts as buffered only with its last digest byte: with and
    /// without digests, with AHS, with and without data.
    #[test]
    fn whole_pdu_is_told_from_a_partial_one() {
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            let limits = ReadLimits {
                header_digest: hd,
                data_digest: dd,
                ..LIMITS
            };
            for data in [&b""[..], b"hello", b"four"] {
                let mut p = Pdu::new(op::SCSI_CMD, 0x80);
                p.ahs = vec![1; 8];
                p.data = data.to_vec();
                let mut wire = p.encode(hd, dd);
                for cut in 0..wire.len() {
                    assert!(
                        !starts_with_whole_pdu(&wire[..cut], limits),
                        "{hd} {dd} {cut}"
                    );
                }
                assert!(starts_with_whole_pdu(&wire, limits));
                wire.extend_from_slice(&[0; 7]);
                assert!(starts_with_whole_pdu(&wire, limits));
            }
        }
    }

    #[tokio::test]
    async fn round_trip_with_digests() {
        let mut p = Pdu::new(op::SCSI_RESP, 0x80);
        p.set_itt(7);
        p.data = b"hello".to_vec();
        let wire = p.encode(true, true);
        assert_eq!(wire.len(), 48 + 4 + 8 + 4);
        let got = read_pdu(&mut &wire[..], LIMITS).await.unwrap();
        assert_eq!(got.itt(), 7);
        assert_eq!(got.data, b"hello");
        assert!(!got.data_digest_bad);
    }

    #[tokio::test]
    async fn bad_digests_are_detected() {
        let mut p = Pdu::new(op::NOP_OUT, 0x80);
        p.data = vec![1, 2, 3, 4];
        let mut wire = p.encode(true, true);
        let n = wire.len();
        wire[n - 5] ^= 1; // data
        assert!(
            read_pdu(&mut &wire[..], LIMITS)
                .await
                .unwrap()
                .data_digest_bad
        );
        wire[3] ^= 1; // header
        assert!(matches!(
            read_pdu(&mut &wire[..], LIMITS).await,
            Err(PduError::HeaderDigest { .. })
        ));
    }

    /// A Data-Out's segment (padded, with a data digest) stays in the
    /// stream for `read_data_into`, which appends it where it belongs; the
    /// PDU after it reads as usual, and a bad digest is still caught.
    #[tokio::test]
    async fn data_out_segments_are_read_into_the_callers_buffer() {
        let mut d = Pdu::new(op::DATA_OUT, 0x80);
        d.set_itt(3);
        d.data = (0..4093u32).map(|i| i as u8).collect();
        let mut nop = Pdu::new(op::NOP_OUT, 0x80);
        nop.data = vec![9; 6];
        let mut wire = d.encode(true, true);
        wire.extend_from_slice(&nop.encode(true, true));
        let mut r = &wire[..];
        let mut got = read_pdu_head(&mut r, LIMITS).await.unwrap();
        assert!(got.data_pending && got.data.is_empty());
        assert_eq!(got.data_segment_len(), 4093);
        let mut buf = vec![7u8; 100];
        read_data_into(&mut r, &mut got, &mut buf, LIMITS)
            .await
            .unwrap();
        assert!(!got.data_pending && !got.data_digest_bad);
        assert_eq!(&buf[..100], &[7u8; 100][..]);
        assert_eq!(&buf[100..], &d.data[..]);
        let next = read_pdu_head(&mut r, LIMITS).await.unwrap();
        assert_eq!(
            (next.opcode(), &next.data[..]),
            (op::NOP_OUT, &[9u8; 6][..])
        );
        assert!(!next.data_pending);

        let n = d.encode(true, true).len();
        let mut bad = d.encode(true, true);
        bad[n - 10] ^= 1;
        let mut r = &bad[..];
        let mut got = read_pdu_head(&mut r, LIMITS).await.unwrap();
        let mut buf = Vec::new();
        read_data_into(&mut r, &mut got, &mut buf, LIMITS)
            .await
            .unwrap();
        assert!(got.data_digest_bad);
        // Without deferral the same PDU reads whole.
        let whole = read_pdu(&mut &wire[..], LIMITS).await.unwrap();
        assert_eq!(whole.data, d.data);
    }

    #[tokio::test]
    async fn oversize_and_truncated_are_refused() {
        let mut p = Pdu::new(op::NOP_OUT, 0x80);
        p.data = vec![0; 9000];
        let wire = p.encode(false, false);
        let limits = ReadLimits {
            header_digest: false,
            data_digest: false,
            ..LIMITS
        };
        assert!(matches!(
            read_pdu(&mut &wire[..], limits).await,
            Err(PduError::DataTooLong { .. })
        ));
        assert!(matches!(
            read_pdu(&mut &wire[..20], limits).await,
            Err(PduError::Truncated)
        ));
        assert!(matches!(
            read_pdu(&mut &wire[..0], limits).await,
            Err(PduError::Closed)
        ));
    }

    #[test]
    fn text_round_trip_and_errors() {
        let pairs = vec![
            ("A".to_string(), "1".to_string()),
            ("B".into(), "x=y".into()),
        ];
        assert_eq!(parse_text(&build_text(&pairs)).unwrap(), pairs);
        assert!(parse_text(b"novalue\0").is_err());
        assert!(parse_text(b"=v\0").is_err());
        assert!(parse_text(&[0xff, b'=', 0]).is_err());
    }

    proptest! {
        // Arbitrary bytes never panic the reader, and whatever it accepts
        // respects the declared limit.
        #[test]
        fn reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                               hd in any::<bool>(), dd in any::<bool>()) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let limits = ReadLimits { max_data: 256, header_digest: hd, data_digest: dd };
            if let Ok(p) = rt.block_on(read_pdu(&mut &bytes[..], limits)) {
                prop_assert!(p.data.len() <= 256);
            }
            let _ = parse_text(&bytes);
        }
    }
}
