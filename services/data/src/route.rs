//! The handle a front end holds for a vdisk: it follows the vdisk's owner.
//!
//! A front end opens a vdisk once per session (an iSCSI login) and keeps the
//! device for as long as the session lasts, which may be months. The owner
//! can move in that time (failover of a dead owner, an operator's move), so
//! the handle must not pin the node it found at open: [`Routed`] sends each
//! call to the local [`Volume`] while this node owns the vdisk and to a
//! [`Forwarded`] device otherwise, and looks again when the owner refuses
//! or cannot be reached, and every [`RECHECK`] in any case.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::frontend::{BlockDevice, Bytes, Extent};
use crate::volume::{lock, DataService, Forwarded, Volume};
use crate::DataError;

/// How long a route is used before it is checked again: this node's own
/// ownership is a local metadata read; an owner elsewhere costs a read
/// barrier (see `DataService::route`).
const RECHECK: Duration = Duration::from_secs(2);

/// Where I/O for a vdisk goes.
#[derive(Clone)]
pub(crate) enum Via {
    /// This node owns it.
    Here(Arc<Volume>),
    /// Another node does.
    Owner(Arc<Forwarded>),
}

impl Via {
    fn dev(&self) -> Arc<dyn BlockDevice> {
        match self {
            Via::Here(v) => v.clone(),
            Via::Owner(f) => f.clone(),
        }
    }
}

pub(crate) struct Routed {
    svc: Arc<DataService>,
    vdisk_id: String,
    /// The route in use and when it was last confirmed; `None` after a
    /// refusal (the next call looks the owner up again).
    route: Mutex<Option<(Via, Instant)>>,
    /// The size last seen (`BlockDevice::size` cannot wait for a lookup).
    size: AtomicU64,
}

impl Routed {
    /// Opens `vdisk_id`, failing now if it cannot be reached at all.
    pub(crate) async fn open(svc: Arc<DataService>, vdisk_id: &str) -> Result<Self, DataError> {
        let via = svc.route(vdisk_id).await?;
        Ok(Routed {
            size: AtomicU64::new(via.dev().size()),
            route: Mutex::new(Some((via, Instant::now()))),
            svc,
            vdisk_id: vdisk_id.to_string(),
        })
    }

    async fn via(&self) -> Result<Via, DataError> {
        let cached = lock(&self.route).clone();
        if let Some((via, at)) = &cached {
            if at.elapsed() < RECHECK {
                return Ok(via.clone());
            }
        }
        match self.svc.route(&self.vdisk_id).await {
            Ok(via) => {
                self.size.store(via.dev().size(), Ordering::Relaxed);
                *lock(&self.route) = Some((via.clone(), Instant::now()));
                Ok(via)
            }
            // The lookup needs the metadata quorum when the owner is
            // elsewhere; losing it must not stop I/O to an owner that still
            // serves (it refuses if it no longer owns the vdisk).
            Err(e) if !matches!(e, DataError::NotFound(_)) => match cached {
                Some((via, _)) => {
                    tracing::debug!(vdisk_id = %self.vdisk_id, error = %e,
                        "owner lookup failed; keeping the current route");
                    Ok(via)
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    async fn dev(&self) -> Result<Arc<dyn BlockDevice>, DataError> {
        self.via().await.map(|v| v.dev())
    }

    /// Drops the route when the call says the owner is gone or refused.
    fn settle<T>(&self, r: Result<T, DataError>) -> Result<T, DataError> {
        if matches!(r, Err(DataError::Unavailable(_) | DataError::NotFound(_))) {
            *lock(&self.route) = None;
        }
        r
    }
}

#[async_trait]
impl BlockDevice for Routed {
    fn size(&self) -> u64 {
        match lock(&self.route).as_ref() {
            Some((Via::Here(v), _)) => v.size(),
            _ => self.size.load(Ordering::Relaxed),
        }
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, DataError> {
        let d = self.dev().await?;
        self.settle(d.read(offset, len).await)
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DataError> {
        let d = self.dev().await?;
        self.settle(d.write(offset, data, fua).await)
    }
    async fn flush(&self) -> Result<(), DataError> {
        let d = self.dev().await?;
        self.settle(d.flush().await)
    }
    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DataError> {
        let d = self.dev().await?;
        self.settle(d.unmap(offset, len).await)
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DataError> {
        let d = self.dev().await?;
        self.settle(d.write_zeroes(offset, len, unmap).await)
    }
    async fn compare_and_write(
        &self,
        offset: u64,
        expected: &[u8],
        data: &[u8],
    ) -> Result<(), DataError> {
        let d = self.dev().await?;
        self.settle(d.compare_and_write(offset, expected, data).await)
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DataError> {
        let d = self.dev().await?;
        self.settle(d.block_status(offset, len).await)
    }

    fn served_elsewhere(&self) -> bool {
        let cached = lock(&self.route).clone();
        match cached {
            Some((Via::Owner(_), _)) => true,
            Some((Via::Here(_), at)) if at.elapsed() < RECHECK => false,
            // Unknown or due for a check: this node's metadata says (a local
            // read; `command` settles any doubt).
            _ => !matches!(
                self.svc.meta.vdisk_by_id(&self.vdisk_id),
                Ok(Some(vd)) if vd.owner_node_id == self.svc.node_id
            ),
        }
    }

    fn state_era(&self) -> u64 {
        match lock(&self.route).as_ref() {
            Some((Via::Here(v), _)) => v.state_era(),
            // Served elsewhere or unknown: no state is kept here.
            _ => 0,
        }
    }

    async fn load_state(&self, key: &str) -> Result<Option<Vec<u8>>, DataError> {
        let d = self.dev().await?;
        self.settle(d.load_state(key).await)
    }

    async fn save_state(&self, key: &str, value: Vec<u8>) -> Result<(), DataError> {
        let d = self.dev().await?;
        self.settle(d.save_state(key, value).await)
    }

    async fn command(
        &self,
        protocol: &str,
        command: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, DataError> {
        let via = self.via().await?;
        match via {
            Via::Here(_) => Ok(None),
            Via::Owner(f) => self.settle(f.command(protocol, command).await),
        }
    }
}
