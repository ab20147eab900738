//! Transport security for everything that crosses the network: the cluster CA
//! and node certificates ([`pki`]), rustls configurations ([`tls`]), and one
//! accept loop that serves an axum/tonic router over TLS ([`serve`]) plus the
//! dialer for mTLS gRPC channels ([`dial`]), and the length-prefixed framing
//! of the raw protocols chosen by ALPN on the RPC port ([`frame`]), and the
//! socket options every connection gets ([`sock`]: keepalive).
//!
//! Node-to-node RPC requires a client certificate signed by the cluster CA;
//! the REST API uses server-side TLS and bearer tokens (checked by the
//! management service).

pub mod dial;
pub mod frame;

// HTTP/2 flow control, both directions: with h2's 64 KiB defaults a 1 MiB
// replica write waited for 16 window updates, a round trip each, and RF2
// writes ran at a quarter of RF1's speed.
/// Per-stream receive window (one replica write or read in flight).
pub const STREAM_WINDOW: u32 = 4 << 20;
/// Per-connection receive window (all streams to or from one peer).
pub const CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame accepted (fewer frames per megabyte).
pub const MAX_FRAME: u32 = 1 << 20;
pub mod pki;
pub mod serve;
pub mod sock;
pub mod tls;

/// Errors from certificate handling and TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{what} in {path}: {detail}")]
    Pem {
        what: &'static str,
        path: String,
        detail: String,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid endpoint address {0}")]
    BadAddress(String),
}
