//! Small pieces every Cairn service shares: the one durable-file-write helper,
//! the stable error-code convention, and time helpers. Nothing here knows about
//! RocksDB, raft, the network or any protocol.

pub mod durable;
pub mod error_code;
pub mod sync;

pub use error_code::{ErrorCode, HasErrorCode};

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Hex SHA-256 of a secret, so that secrets are compared and stored only as hashes.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// A fresh random token (256 bits, hex).
pub fn random_token() -> String {
    use rand::RngCore;
    let mut buf = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// Constant-time comparison of two byte strings (for secrets).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
