//! One SCSI device per vdisk, however many portals export it.
//!
//! Every node's portal exports every vdisk (multipath), but SPC-4 state —
//! persistent and SPC-2 reservations, unit attentions, the caching mode
//! page — must be one device's state, or two initiators on two paths would
//! each hold "the" reservation. Its home is the logical unit on the node
//! that serves the vdisk. A portal on another node sends every command
//! there whole, with its I_T nexus (the relative target port names the
//! receiving node), through [`BlockDevice::command`]; the owner's
//! [`UnitHost`] runs it on its logical unit and the answer is relayed
//! unchanged. Messages: `cairn.iscsi.v1` (`api/proto`).
//!
//! Why whole commands rather than shared state: the owner already does the
//! I/O of a forwarded command, so relaying the command costs the same one
//! round trip, and every SPC-4 rule (reservation conflicts, unit attention
//! order, mode pages) is enforced in one place by one piece of code.

use std::sync::Arc;

use async_trait::async_trait;
use cairn_api::iscsi::v1::{self as pb, unit_call::Call};
use cairn_blockdev::{BlockService, CommandHandler, DataError};
use prost::Message;
use tracing::warn;

use crate::scsi::sense::{from_data_error, IoDir, Sense};
use crate::scsi::{LogicalUnit, LunIdentity, Nexus, ScsiResponse};
use crate::session::Registry;

/// The protocol name of SCSI unit calls in `FrontendCommand`.
pub const PROTOCOL: &str = "scsi";

/// Sends `call` to the serving node's unit: `None` to serve it here.
async fn call(
    lu: &LogicalUnit,
    nexus: &Nexus,
    call: Call,
) -> Option<Result<ScsiResponse, DataError>> {
    let msg = pb::UnitCall {
        format_version: cairn_api::FORMAT_VERSION,
        vdisk_name: lu.identity().vdisk_name.clone(),
        nexus: Some(nexus.into()),
        call: Some(call),
    };
    match lu.device().command(PROTOCOL, msg.encode_to_vec()).await {
        Ok(None) => None,
        Ok(Some(bytes)) => Some(
            pb::UnitReply::decode(bytes.as_slice())
                .map_err(|e| DataError::Invalid(format!("malformed SCSI unit reply: {e}")))
                .and_then(|r| {
                    Ok(ScsiResponse {
                        status: u8::try_from(r.status)
                            .map_err(|_| DataError::Invalid(format!("SCSI status {}", r.status)))?,
                        sense: r.sense,
                        data_in: r.data_in,
                    })
                }),
        ),
        Err(e) => Some(Err(e)),
    }
}

/// Runs a command on the serving node's unit; `None`: run it here.
pub(crate) async fn execute(
    lu: &LogicalUnit,
    nexus: &Nexus,
    cdb: &[u8],
    data_out: &[u8],
) -> Option<ScsiResponse> {
    let exec = Call::Execute(pb::Execute {
        cdb: cdb.to_vec(),
        data_out: data_out.to_vec(),
    });
    match call(lu, nexus, exec).await? {
        Ok(r) => Some(r),
        Err(e) => {
            // Unreachable or moved owner: NOT READY, which the transport
            // turns into BUSY; the initiator retries and the device finds
            // the new owner.
            let s: Sense = from_data_error(&e, IoDir::Read);
            warn!(vdisk_id = %lu.identity().vdisk_id, error = %e,
                "SCSI command not relayed to the vdisk's owner");
            Some(ScsiResponse::check(&s))
        }
    }
}

pub(crate) async fn reset(lu: &LogicalUnit, nexus: &Nexus) {
    if let Some(Err(e)) = call(lu, nexus, Call::Reset(pb::Reset {})).await {
        warn!(vdisk_id = %lu.identity().vdisk_id, error = %e,
            "LUN reset not relayed to the vdisk's owner");
    }
}

pub(crate) async fn nexus_gone(lu: &LogicalUnit, nexus: &Nexus) {
    if let Some(Err(e)) = call(lu, nexus, Call::NexusGone(pb::NexusGone {})).await {
        warn!(vdisk_id = %lu.identity().vdisk_id, error = %e,
            "end of session not relayed to the vdisk's owner");
    }
}

/// A vdisk's logical unit, as every node makes it.
pub(crate) fn new_unit(
    dev: Arc<dyn cairn_blockdev::BlockDevice>,
    ident: LunIdentity,
) -> Arc<LogicalUnit> {
    // Physical block exponent 0: libiscsi 1.19's GET LBA STATUS test
    // assumes one logical block per physical block; the 4 KiB granularity
    // is still advertised as the optimal transfer/unmap granularity (VPD B0).
    Arc::new(LogicalUnit::new(dev, ident).with_physical_block_exponent(0))
}

/// The serving node's side: runs unit calls from other nodes' portals on
/// this node's logical units (registered with the data service, which
/// passes only calls for vdisks this node owns).
pub struct UnitHost {
    blocks: Arc<dyn BlockService>,
    registry: Arc<Registry>,
}

impl UnitHost {
    pub fn new(blocks: Arc<dyn BlockService>, registry: Arc<Registry>) -> Arc<Self> {
        Arc::new(Self { blocks, registry })
    }

    async fn unit(
        &self,
        vdisk_id: &str,
        vdisk_name: String,
    ) -> Result<Arc<LogicalUnit>, DataError> {
        if let Some(u) = self.registry.hosted(vdisk_id) {
            return Ok(u);
        }
        let dev = self.blocks.open(vdisk_id).await?;
        let ident = LunIdentity {
            vdisk_id: vdisk_id.to_string(),
            vdisk_name,
        };
        Ok(self.registry.host(vdisk_id, || new_unit(dev, ident)))
    }
}

#[async_trait]
impl CommandHandler for UnitHost {
    async fn handle(&self, vdisk_id: &str, command: Vec<u8>) -> Result<Vec<u8>, DataError> {
        let bad = |what: String| DataError::Invalid(format!("SCSI unit call: {what}"));
        let msg = pb::UnitCall::decode(command.as_slice()).map_err(|e| bad(e.to_string()))?;
        let nexus: Nexus = msg
            .nexus
            .ok_or_else(|| bad("no nexus".into()))?
            .try_into()
            .map_err(bad)?;
        let unit = self.unit(vdisk_id, msg.vdisk_name).await?;
        let r = match msg.call.ok_or_else(|| bad("no call".into()))? {
            Call::Execute(e) => {
                let data_out = cairn_blockdev::Bytes::from(e.data_out);
                unit.execute_here(&nexus, &e.cdb, &data_out).await
            }
            Call::Reset(_) => {
                unit.reset_here();
                ScsiResponse::default()
            }
            Call::NexusGone(_) => {
                unit.nexus_gone_here(&nexus);
                ScsiResponse::default()
            }
        };
        Ok(pb::UnitReply {
            status: u32::from(r.status),
            sense: r.sense,
            data_in: r.data_in,
        }
        .encode_to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::status;
    use crate::scsi::tests::pr_out;
    use cairn_blockdev::mem::{MemDevice, MemService};
    use cairn_blockdev::{BlockDevice, Extent};

    /// A non-owner's device: no I/O of its own (every command must reach
    /// the owner whole), and commands go straight to the owner's host, as
    /// the data service would carry them.
    struct Relay {
        host: Arc<UnitHost>,
        size: u64,
    }

    fn no_io() -> DataError {
        DataError::Unavailable("a relayed unit does no I/O itself".into())
    }

    #[async_trait]
    impl BlockDevice for Relay {
        fn size(&self) -> u64 {
            self.size
        }
        async fn read(&self, _: u64, _: u64) -> Result<Vec<u8>, DataError> {
            Err(no_io())
        }
        async fn write(&self, _: u64, _: cairn_blockdev::Bytes, _: bool) -> Result<(), DataError> {
            Err(no_io())
        }
        async fn flush(&self) -> Result<(), DataError> {
            Err(no_io())
        }
        async fn unmap(&self, _: u64, _: u64) -> Result<(), DataError> {
            Err(no_io())
        }
        async fn compare_and_write(&self, _: u64, _: &[u8], _: &[u8]) -> Result<(), DataError> {
            Err(no_io())
        }
        async fn block_status(&self, _: u64, _: u64) -> Result<Vec<Extent>, DataError> {
            Err(no_io())
        }
        fn served_elsewhere(&self) -> bool {
            true
        }
        async fn command(&self, protocol: &str, c: Vec<u8>) -> Result<Option<Vec<u8>>, DataError> {
            assert_eq!(protocol, PROTOCOL);
            self.host.handle("vd", c).await.map(Some)
        }
    }

    fn nexus(name: &str, port: u16) -> Nexus {
        Nexus {
            initiator_name: name.to_string(),
            initiator_port: format!("{name},i,0x000000000001"),
            target_name: "iqn.2026-11.io.cairn:t".to_string(),
            target_port: port,
        }
    }

    fn ident() -> LunIdentity {
        LunIdentity {
            vdisk_id: "vd".into(),
            vdisk_name: "disk".into(),
        }
    }

    #[tokio::test]
    async fn a_non_owner_portal_shares_the_owners_reservations_and_unit_attentions() {
        let disk = MemDevice::new(1 << 20);
        let blocks = MemService::with([("vd".to_string(), disk.clone())]);
        let registry = Arc::new(Registry::default());
        let host = UnitHost::new(blocks, registry.clone());
        // The owner's own session maps the vdisk; another node's does too.
        let at_owner = registry.unit("vd", || new_unit(disk.clone(), ident()));
        let elsewhere = new_unit(
            Arc::new(Relay {
                host,
                size: 1 << 20,
            }),
            ident(),
        );
        let (a, b) = (nexus("iqn.a", 2), nexus("iqn.b", 1));
        let tur = [0u8; 6];
        let write = [0x2A, 0, 0, 0, 0, 8, 0, 0, 1, 0];
        let block = vec![0x5A; 512];

        // Data through the other portal lands on the owner's device.
        assert_eq!(
            elsewhere.execute(&a, &write, &block).await.status,
            status::GOOD
        );
        assert_eq!(&disk.read(8 * 512, 512).await.unwrap(), &block);

        // A persistent reservation taken through the other portal binds the
        // owner's initiators: register, then WRITE EXCLUSIVE.
        let (c, p) = pr_out(0, 0, 0, 0xA);
        assert_eq!(elsewhere.execute(&a, &c, &p).await.status, status::GOOD);
        let (c, p) = pr_out(1, 1, 0xA, 0);
        assert_eq!(elsewhere.execute(&a, &c, &p).await.status, status::GOOD);
        assert_eq!(
            at_owner.execute(&b, &write, &block).await.status,
            status::RESERVATION_CONFLICT
        );
        assert_eq!(
            elsewhere.execute(&a, &write, &block).await.status,
            status::GOOD
        );
        // READ RESERVATION at the owner names the key and, in the full
        // status, the other node's relative target port.
        let r = at_owner
            .execute(&b, &[0x5E, 1, 0, 0, 0, 0, 0, 0, 255, 0], &[])
            .await;
        assert_eq!(r.status, status::GOOD);
        assert_eq!(&r.data_in[8..16], &0xAu64.to_be_bytes());
        let full = at_owner
            .execute(&b, &[0x5E, 3, 0, 0, 0, 0, 0, 0, 255, 0], &[])
            .await;
        assert_eq!(full.status, status::GOOD);
        assert_eq!(&full.data_in[8 + 18..8 + 20], &2u16.to_be_bytes());
        let (c, p) = pr_out(2, 1, 0xA, 0);
        assert_eq!(elsewhere.execute(&a, &c, &p).await.status, status::GOOD);
        assert_eq!(
            at_owner.execute(&b, &write, &block).await.status,
            status::GOOD
        );

        // A LUN reset through the other portal tells the owner's nexus.
        elsewhere.reset(&a).await;
        let r = at_owner.execute(&b, &tur, &[]).await;
        assert_eq!(r.status, status::CHECK_CONDITION);
        assert_eq!((r.sense[2] & 0x0f, r.sense[12]), (6, 0x29));
        // ... and the other portal's nexus, once.
        let r = elsewhere.execute(&a, &tur, &[]).await;
        assert_eq!(
            (r.status, r.sense.get(12).copied()),
            (status::CHECK_CONDITION, Some(0x29))
        );
        assert_eq!(elsewhere.execute(&a, &tur, &[]).await.status, status::GOOD);

        // An SPC-2 reservation through the other portal goes with its
        // session's end there.
        assert_eq!(
            elsewhere
                .execute(&a, &[0x16, 0, 0, 0, 0, 0], &[])
                .await
                .status,
            status::GOOD
        );
        assert_eq!(
            at_owner.execute(&b, &write, &block).await.status,
            status::RESERVATION_CONFLICT
        );
        elsewhere.nexus_gone(&a).await;
        assert_eq!(
            at_owner.execute(&b, &write, &block).await.status,
            status::GOOD
        );

        // The write cache turned off through one portal is off for all:
        // MODE SENSE of the caching page at the owner shows WCE = 0.
        let sense_page = [0x1A, 0x08, 0x08, 0, 255, 0];
        let r = elsewhere.execute(&a, &sense_page, &[]).await;
        assert_eq!(r.status, status::GOOD);
        let mut page = r.data_in.clone();
        assert_ne!(page[4 + 2] & 0x04, 0, "WCE starts on");
        page[0] = 0;
        page[4 + 2] &= !0x04;
        let len = page.len() as u8;
        let select = [0x15, 0x10, 0, 0, len, 0];
        assert_eq!(
            elsewhere.execute(&a, &select, &page).await.status,
            status::GOOD
        );
        // The owner queued "mode parameters changed" for its other nexus.
        let r = at_owner.execute(&b, &sense_page, &[]).await;
        assert_eq!(r.status, status::CHECK_CONDITION);
        let r = at_owner.execute(&b, &sense_page, &[]).await;
        assert_eq!(r.status, status::GOOD);
        assert_eq!(r.data_in[4 + 2] & 0x04, 0, "WCE is off at the owner");
    }

    #[tokio::test]
    async fn malformed_unit_calls_are_refused() {
        let blocks = MemService::with([("vd".to_string(), MemDevice::new(1 << 20))]);
        let host = UnitHost::new(blocks, Arc::new(Registry::default()));
        for bad in [
            vec![0xFF, 0xFF, 0xFF],
            pb::UnitCall::default().encode_to_vec(),
        ] {
            assert!(matches!(
                host.handle("vd", bad).await,
                Err(DataError::Invalid(_))
            ));
        }
        let no_call = pb::UnitCall {
            nexus: Some((&nexus("iqn.a", 2)).into()),
            ..Default::default()
        };
        assert!(matches!(
            host.handle("vd", no_call.encode_to_vec()).await,
            Err(DataError::Invalid(_))
        ));
        let wrong_vdisk = pb::UnitCall {
            nexus: Some((&nexus("iqn.a", 2)).into()),
            call: Some(Call::Reset(pb::Reset {})),
            ..Default::default()
        };
        assert!(matches!(
            host.handle("nope", wrong_vdisk.encode_to_vec()).await,
            Err(DataError::NotFound(_))
        ));
    }
}
