//! Targets as the iSCSI server sees them: a name, its LUNs, who may log in
//! and with which CHAP secrets. Where they are stored (the metadata
//! service) is the composition root's business, behind [`TargetDirectory`].

use async_trait::async_trait;

/// A CHAP name and secret (RFC 7143 12.1.3). The secret never reaches a log:
/// `Debug` prints it redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    pub user: String,
    pub secret: String,
}

impl std::fmt::Debug for ChapCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapCredentials")
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// One LUN of a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunMapping {
    pub lun: u64,
    pub vdisk_id: String,
    /// The vdisk's name, for INQUIRY's product and the operator.
    pub vdisk_name: String,
}

/// One iSCSI target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// iqn.YYYY-MM.reversed.domain:name
    pub iqn: String,
    pub luns: Vec<LunMapping>,
    /// When set, initiators must authenticate with CHAP as this user.
    pub chap: Option<ChapCredentials>,
    /// When set (and `chap` too), the target proves itself to the initiator
    /// with these (mutual CHAP).
    pub mutual_chap: Option<ChapCredentials>,
    /// Initiator names allowed to log in; empty allows any.
    pub allowed_initiators: Vec<String>,
}

impl TargetConfig {
    /// Whether `initiator` may log in (names compare case-insensitively:
    /// the management side stores them normalised).
    pub fn admits(&self, initiator: &str) -> bool {
        self.allowed_initiators.is_empty()
            || self
                .allowed_initiators
                .iter()
                .any(|i| i.eq_ignore_ascii_case(initiator))
    }
}

/// Why the directory could not answer.
#[derive(Debug, thiserror::Error)]
#[error("target directory unavailable: {0}")]
pub struct DirectoryError(pub String);

/// Where the server looks targets up: at every login, so a change made
/// through the management API takes effect at the next login.
#[async_trait]
pub trait TargetDirectory: Send + Sync {
    async fn targets(&self) -> Result<Vec<TargetConfig>, DirectoryError>;
    async fn target(&self, iqn: &str) -> Result<Option<TargetConfig>, DirectoryError> {
        Ok(self.targets().await?.into_iter().find(|t| t.iqn == iqn))
    }
}

/// A fixed list of targets (tests and development targets).
pub struct StaticTargets(pub Vec<TargetConfig>);

#[async_trait]
impl TargetDirectory for StaticTargets {
    async fn targets(&self) -> Result<Vec<TargetConfig>, DirectoryError> {
        Ok(self.0.clone())
    }
}
