//! Forward-compatible record handling.
//!
//! prost drops fields it does not know when it decodes. A node of version N
//! that read-modify-writes a record written by version N+1 would then silently
//! erase the newer fields. [`Record`] keeps the raw bytes of every field the
//! current schema does not know and writes them back first, so that the
//! current code's own fields (encoded after them) win where both exist.

use std::collections::HashSet;
use std::ops::Range;

use prost::Message;

/// Errors from decoding a stored or received record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The bytes are not a valid encoding of the expected message.
    #[error("malformed record: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The protobuf wire format itself is broken (truncated varint, bad length).
    #[error("malformed protobuf wire format: {0}")]
    Wire(&'static str),
}

/// A decoded message plus the encoded fields its schema does not know.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Record<M> {
    /// The fields this build understands.
    pub msg: M,
    unknown: Vec<u8>,
}

impl<M: Message + Default> Record<M> {
    /// Wraps a message created by this build (no unknown fields).
    pub fn new(msg: M) -> Self {
        Self {
            msg,
            unknown: Vec::new(),
        }
    }

    /// Decodes `bytes`, keeping any field this build does not know.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let msg = M::decode(bytes)?;
        let reencoded = msg.encode_to_vec();
        let known: HashSet<u32> = fields(&reencoded)?.into_iter().map(|(n, _)| n).collect();
        let mut unknown = Vec::new();
        for (number, range) in fields(bytes)? {
            if !known.contains(&number) {
                unknown.extend_from_slice(&bytes[range]);
            }
        }
        Ok(Self { msg, unknown })
    }

    /// Encodes the record: preserved unknown fields first, then the known ones.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.unknown.len() + self.msg.encoded_len());
        out.extend_from_slice(&self.unknown);
        self.msg.encode_raw(&mut out);
        out
    }

    /// Whether fields unknown to this build were preserved.
    pub fn has_unknown_fields(&self) -> bool {
        !self.unknown.is_empty()
    }
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, RecordError> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).ok_or(RecordError::Wire("truncated varint"))?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(RecordError::Wire("varint longer than 10 bytes"))
}

/// Splits an encoded message into (field number, byte range of the whole field).
fn fields(buf: &[u8]) -> Result<Vec<(u32, Range<usize>)>, RecordError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let key = read_varint(buf, &mut pos)?;
        let number =
            u32::try_from(key >> 3).map_err(|_| RecordError::Wire("field number too large"))?;
        let skip = match key & 7 {
            0 => {
                read_varint(buf, &mut pos)?;
                0
            }
            1 => 8,
            2 => usize::try_from(read_varint(buf, &mut pos)?)
                .map_err(|_| RecordError::Wire("length too large"))?,
            5 => 4,
            _ => return Err(RecordError::Wire("unsupported wire type (groups)")),
        };
        pos = pos
            .checked_add(skip)
            .filter(|end| *end <= buf.len())
            .ok_or(RecordError::Wire("field runs past the end"))?;
        out.push((number, start..pos));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::v1::DatastoreRecord;

    /// What a newer Cairn might write: DatastoreRecord plus a field we do not know.
    #[derive(Clone, PartialEq, prost::Message)]
    struct DatastoreRecordV2 {
        #[prost(uint32, tag = "1")]
        format_version: u32,
        #[prost(string, tag = "2")]
        id: String,
        #[prost(string, tag = "3")]
        name: String,
        #[prost(uint32, tag = "4")]
        replication_factor: u32,
        #[prost(bool, tag = "5")]
        compression: bool,
        #[prost(string, tag = "100")]
        erasure_profile: String,
        #[prost(uint64, repeated, tag = "101")]
        future_list: Vec<u64>,
    }

    #[test]
    fn newer_field_survives_read_modify_write() -> Result<(), RecordError> {
        let v2 = DatastoreRecordV2 {
            format_version: 2,
            id: "ds-1".into(),
            name: "gold".into(),
            replication_factor: 2,
            compression: false,
            erasure_profile: "4+2".into(),
            future_list: vec![7, 8, 9],
        };
        let bytes = v2.encode_to_vec();

        let mut rec = Record::<DatastoreRecord>::decode(&bytes)?;
        assert_eq!(rec.msg.name, "gold");
        assert_eq!(rec.msg.replication_factor, 2);
        assert!(rec.has_unknown_fields());

        rec.msg.replication_factor = 3;
        rec.msg.compression = true;
        let written = rec.encode();

        let back = DatastoreRecordV2::decode(written.as_slice())?;
        assert_eq!(back.replication_factor, 3);
        assert!(back.compression);
        assert_eq!(back.erasure_profile, "4+2");
        assert_eq!(back.future_list, vec![7, 8, 9]);
        assert_eq!(back.format_version, 2);
        Ok(())
    }

    #[test]
    fn known_field_set_back_to_default_wins_over_explicit_old_value() -> Result<(), RecordError> {
        let mut rec = Record::new(DatastoreRecord {
            name: "a".into(),
            compression: true,
            ..Default::default()
        });
        let bytes = rec.encode();
        rec = Record::decode(&bytes)?;
        rec.msg.compression = false;
        let back = DatastoreRecord::decode(rec.encode().as_slice())?;
        assert!(!back.compression);
        Ok(())
    }

    #[test]
    fn malformed_bytes_are_errors_not_panics() {
        for bad in [
            &[0x0a, 0xff][..],
            &[0xff; 12][..],
            &[0x0b][..],
            &[0x12, 0x05, 0x01][..],
        ] {
            assert!(Record::<DatastoreRecord>::decode(bad).is_err(), "{bad:?}");
        }
    }
}
