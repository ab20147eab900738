//! Transport security for everything that crosses the network: the cluster CA
//! and node certificates ([`pki`]), rustls configurations ([`tls`]), and one
//! accept loop that serves an axum/tonic router over TLS ([`serve`]) plus the
//! dialer for mTLS gRPC channels ([`dial`]).
//!
//! Node-to-node RPC requires a client certificate signed by the cluster CA;
//! the REST API uses server-side TLS and bearer tokens (checked by the
//! management service).

pub mod dial;
pub mod pki;
pub mod serve;
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
