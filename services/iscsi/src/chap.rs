//! CHAP (RFC 1994 with RFC 7143 12.1.3): MD5 only (CHAP_A=5), one-way and
//! mutual. Secrets come from the target's configuration and never leave
//! this module except inside an MD5 digest.

use md5::{Digest, Md5};
use rand::RngCore;

/// The only algorithm RFC 7143 requires, and the one every initiator has.
pub const ALGORITHM_MD5: &str = "5";
/// Challenge length: RFC 7143 asks for enough to be unpredictable; 16 bytes
/// is what Linux's target uses.
const CHALLENGE_LEN: usize = 16;

/// The challenge this target issued.
#[derive(Clone)]
pub struct Challenge {
    pub id: u8,
    pub challenge: Vec<u8>,
}

impl Challenge {
    pub fn new() -> Self {
        let mut rng = rand::thread_rng();
        let mut challenge = vec![0u8; CHALLENGE_LEN];
        rng.fill_bytes(&mut challenge);
        Challenge {
            id: (rng.next_u32() & 0xff) as u8,
            challenge,
        }
    }
    pub fn challenge_hex(&self) -> String {
        format!("0x{}", hex::encode(&self.challenge))
    }
}

impl Default for Challenge {
    fn default() -> Self {
        Self::new()
    }
}

/// MD5(id || secret || challenge).
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Decodes a CHAP binary value: `0x` hex or `0b` base64 (RFC 7143 6.1).
pub fn decode_binary(v: &str) -> Result<Vec<u8>, String> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        let h = if h.len() % 2 == 1 {
            format!("0{h}")
        } else {
            h.to_string()
        };
        return hex::decode(h).map_err(|_| "invalid hex CHAP value".to_string());
    }
    if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        return base64_decode(b).ok_or_else(|| "invalid base64 CHAP value".to_string());
    }
    Err("CHAP value must start with 0x or 0b".to_string())
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    }
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in s {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Compares without an early exit, so timing does not tell how many bytes
/// of a guessed response were right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1994_style_response() {
        // Known answer: MD5(0x01 || "secret" || 0x0102) computed independently.
        let r = response(1, b"secret", &[1, 2]);
        let mut h = Md5::new();
        h.update([1u8, b's', b'e', b'c', b'r', b'e', b't', 1, 2]);
        let want: [u8; 16] = h.finalize().into();
        assert_eq!(r, want);
    }

    #[test]
    fn binary_encodings() {
        assert_eq!(decode_binary("0x0a0B").unwrap(), vec![10, 11]);
        assert_eq!(decode_binary("0xabc").unwrap(), vec![0x0a, 0xbc]);
        assert_eq!(decode_binary("0bAQID").unwrap(), vec![1, 2, 3]);
        assert_eq!(decode_binary("0bAQI=").unwrap(), vec![1, 2]);
        assert!(decode_binary("abc").is_err());
        assert!(decode_binary("0xzz").is_err());
        assert!(decode_binary("0b*").is_err());
        assert!(constant_time_eq(b"ab", b"ab"));
        assert!(!constant_time_eq(b"ab", b"ac"));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
