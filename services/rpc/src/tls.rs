//! rustls configurations built from a [`NodeIdentity`]. One crypto provider
//! (ring) for the whole process, TLS 1.3 and 1.2 only.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::pki::NodeIdentity;
use crate::TlsError;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: "<pem>".into(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            path: "<pem>".into(),
            detail: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| TlsError::Pem {
            what: "private key",
            path: "<pem>".into(),
            detail: e.to_string(),
        })?
        .ok_or_else(|| TlsError::Pem {
            what: "private key",
            path: "<pem>".into(),
            detail: "no private key found".into(),
        })
}

/// Trust store holding only the cluster CA.
pub fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem, "CA certificate")? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// Server config. With `require_client_cert`, only clients presenting a
/// certificate signed by the cluster CA complete the handshake (node RPC).
pub fn server_config(
    id: &NodeIdentity,
    require_client_cert: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = if require_client_cert {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&id.ca_pem)?), provider())
                .build()?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut cfg =
        builder.with_single_cert(certs(&id.cert_pem, "node certificate")?, key(&id.key_pem)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client config presenting this node's certificate (node-to-node RPC).
pub fn mtls_client_config(id: &NodeIdentity) -> Result<Arc<ClientConfig>, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots(&id.ca_pem)?)
        .with_client_auth_cert(certs(&id.cert_pem, "node certificate")?, key(&id.key_pem)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client config trusting only the cluster CA, without a client certificate
/// (the CLI talking to the REST API).
pub fn api_client_config(ca_pem: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots(ca_pem)?)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
