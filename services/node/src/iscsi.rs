//! The iSCSI server's view of the targets, read from the metadata records
//! (`t/<iqn>`, see `cairn_metadata::iscsi`). It lives in the composition
//! root so that the iSCSI crate knows no metadata and the metadata crate no
//! iSCSI types.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cairn_api::metadata::v1::IscsiTargetRecord;
use cairn_iscsi::target::{
    ChapCredentials, DirectoryError, LunMapping, TargetConfig, TargetDirectory,
};
use cairn_metadata::MetadataHandle;

/// How long a login waits for a linearizable read before it settles for
/// this node's applied state.
const FRESH_READ_WAIT: Duration = Duration::from_millis(500);

/// Targets as stored in metadata, looked up at every login.
pub struct MetaTargetDirectory {
    pub meta: MetadataHandle,
}

impl MetaTargetDirectory {
    pub fn new(meta: MetadataHandle) -> Arc<Self> {
        Arc::new(Self { meta })
    }

    /// A ReadIndex barrier first, so that a target created through any node
    /// a moment ago is seen here; but never waiting long for it: hosts must
    /// be able to log in (and re-log-in after a path failure) while the
    /// metadata quorum is lost, and the local copy is at most that stale.
    async fn settle(&self) {
        match tokio::time::timeout(FRESH_READ_WAIT, self.meta.read_barrier()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "iSCSI target lookup uses local metadata (no read barrier)")
            }
            Err(_) => {
                tracing::debug!("iSCSI target lookup uses local metadata (read barrier slow)")
            }
        }
    }

    fn config(&self, t: IscsiTargetRecord) -> Result<TargetConfig, DirectoryError> {
        let mut luns = Vec::with_capacity(t.luns.len());
        for l in t.luns {
            let vdisk = self.meta.vdisk_by_id(&l.vdisk_id).map_err(err)?;
            luns.push(LunMapping {
                lun: l.lun,
                // A vdisk cannot be deleted while mapped; an empty name only
                // means a record from a mixed-version window.
                vdisk_name: vdisk.map(|v| v.name).unwrap_or_default(),
                vdisk_id: l.vdisk_id,
            });
        }
        let pair = |user: String, secret: String| {
            (!user.is_empty() && !secret.is_empty()).then_some(ChapCredentials { user, secret })
        };
        let chap = pair(t.chap_user, t.chap_secret);
        // Mutual CHAP only ever with one-way CHAP (the state machine enforces it too).
        let mutual_chap = chap
            .as_ref()
            .and_then(|_| pair(t.mutual_user, t.mutual_secret));
        Ok(TargetConfig {
            iqn: t.iqn,
            luns,
            chap,
            mutual_chap,
            allowed_initiators: t.allowed_initiators,
        })
    }
}

fn err(e: cairn_metadata::MetaError) -> DirectoryError {
    DirectoryError(e.to_string())
}

#[async_trait]
impl TargetDirectory for MetaTargetDirectory {
    async fn targets(&self) -> Result<Vec<TargetConfig>, DirectoryError> {
        self.settle().await;
        self.meta
            .iscsi_targets()
            .map_err(err)?
            .into_iter()
            .map(|t| self.config(t))
            .collect()
    }

    async fn target(&self, iqn: &str) -> Result<Option<TargetConfig>, DirectoryError> {
        self.settle().await;
        let iqn = cairn_metadata::iscsi::normalize_name(iqn);
        match self.meta.iscsi_target(&iqn).map_err(err)? {
            Some(t) => self.config(t).map(Some),
            None => Ok(None),
        }
    }
}
