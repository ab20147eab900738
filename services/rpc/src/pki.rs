//! The cluster CA and node identities.
//!
//! `cairn cluster init` creates a CA per cluster; every node gets a key pair
//! and a certificate signed by it, valid both as TLS server (RPC and REST) and
//! as TLS client (RPC to peers). Peers accept only certificates chaining to
//! the cluster CA, so a node of another cluster, or no certificate at all, is
//! refused at the handshake.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::TlsError;

/// Name every node certificate carries, used as TLS server name between nodes.
pub const NODE_SERVER_NAME: &str = "cairn-node";

/// PEM files of one node's identity, as stored under `<data>/tls/`.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// File layout of a node's TLS folder.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub dir: PathBuf,
}

impl TlsPaths {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("tls"),
        }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn node_cert(&self) -> PathBuf {
        self.dir.join("node.pem")
    }
    pub fn node_key(&self) -> PathBuf {
        self.dir.join("node.key")
    }

    fn read(path: &Path) -> Result<String, TlsError> {
        std::fs::read_to_string(path).map_err(|source| TlsError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Loads the node identity.
    pub fn load_identity(&self) -> Result<NodeIdentity, TlsError> {
        Ok(NodeIdentity {
            ca_pem: Self::read(&self.ca_cert())?,
            cert_pem: Self::read(&self.node_cert())?,
            key_pem: Self::read(&self.node_key())?,
        })
    }

    /// Loads the CA (certificate and key), present on every member node.
    pub fn load_ca(&self) -> Result<ClusterCa, TlsError> {
        Ok(ClusterCa {
            cert_pem: Self::read(&self.ca_cert())?,
            key_pem: Self::read(&self.ca_key())?,
        })
    }
}

/// A cluster certificate authority.
#[derive(Debug, Clone)]
pub struct ClusterCa {
    pub cert_pem: String,
    pub key_pem: String,
}

impl ClusterCa {
    /// Creates a new CA for `cluster_id`.
    pub fn generate(cluster_id: &str) -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Cairn cluster CA {cluster_id}"));
        dn.push(DnType::OrganizationName, "Cairn");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate for node `node_id`, valid for the given addresses.
    pub fn issue_node(&self, node_id: u64, ips: &[IpAddr]) -> Result<NodeIdentity, TlsError> {
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let ca_params = CertificateParams::from_ca_cert_pem(&self.cert_pem)?;
        let ca_cert = ca_params.self_signed(&ca_key)?;

        let mut params =
            CertificateParams::new(vec![NODE_SERVER_NAME.to_string(), "localhost".to_string()])?;
        let mut ips = ips.to_vec();
        ips.sort_unstable();
        ips.dedup();
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(ip));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("cairn-node-{node_id}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        Ok(NodeIdentity {
            ca_pem: self.cert_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_cert_chains_to_its_ca_only() -> Result<(), Box<dyn std::error::Error>> {
        let ca = ClusterCa::generate("a")?;
        let other = ClusterCa::generate("b")?;
        let node = ca.issue_node(1, &["127.0.0.1".parse()?])?;
        let server = crate::tls::server_config(&node, true)?;
        let _ = server;
        // Reissuing from the stored PEMs keeps the same issuer.
        let again = ca.issue_node(2, &[])?;
        assert_ne!(again.cert_pem, node.cert_pem);
        assert_ne!(other.cert_pem, ca.cert_pem);
        Ok(())
    }
}
