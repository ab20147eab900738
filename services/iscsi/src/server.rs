//! The listener: a task per connection (login, then the full feature
//! phase), the sessions they share, and the asynchronous logout of every
//! session when the node stops (rolling upgrades: initiators log out and
//! fail over to another node's portal instead of timing out).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cairn_blockdev::BlockService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::session::Registry;
use crate::target::TargetDirectory;

/// This node's portal.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The address initiators reach (reported by SendTargets).
    pub portal: SocketAddr,
    /// This node's target portal group tag (≥ 1; the node id fits).
    pub portal_group_tag: u16,
    /// A connection the initiator has sent nothing on for this long gets a
    /// NOP-In ping (RFC 7143 11.19); zero turns pings off.
    pub nop_interval: Duration,
    /// A pinged connection still silent after this long is dropped: its
    /// initiator is gone (a crashed host, a pulled cable) and would
    /// otherwise keep its session, and any reservation it holds, forever.
    pub nop_timeout: Duration,
}

impl ServerConfig {
    /// The defaults a node runs with (those of Linux LIO: ping after 15 s
    /// of silence, drop 30 s after the ping).
    pub const NOP_INTERVAL: Duration = Duration::from_secs(15);
    pub const NOP_TIMEOUT: Duration = Duration::from_secs(30);
}

/// What every connection of this server shares.
pub struct Shared {
    pub cfg: ServerConfig,
    pub blocks: Arc<dyn BlockService>,
    pub targets: Arc<dyn TargetDirectory>,
    pub registry: Arc<Registry>,
}

impl Shared {
    pub fn new(
        cfg: ServerConfig,
        blocks: Arc<dyn BlockService>,
        targets: Arc<dyn TargetDirectory>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            cfg,
            blocks,
            targets,
            registry: Arc::new(Registry::default()),
        })
    }

    /// The handler of SCSI commands other nodes' portals send for vdisks
    /// this node serves: register it with the data service under
    /// [`crate::remote::PROTOCOL`].
    pub fn unit_host(&self) -> Arc<crate::remote::UnitHost> {
        crate::remote::UnitHost::new(self.blocks.clone(), self.registry.clone())
    }
}

/// A login that has not finished in this time is dropped (a peer cannot
/// hold a connection slot open by saying nothing).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Serves iSCSI on `listener` until `stop` turns true; then asks every
/// initiator to log out and waits (bounded) for the connections to end.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    tracing::info!(portal = %shared.cfg.portal, tpgt = shared.cfg.portal_group_tag,
        "iSCSI target listening");
    let mut conns = JoinSet::new();
    let mut stop_wait = stop.clone();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(connection(shared.clone(), stream, peer, stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "iSCSI accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = async { stop_wait.wait_for(|s| *s).await.is_ok() } => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let grace = Duration::from_secs(u64::from(crate::conn::ASYNC_LOGOUT_SECS) + 3);
    let _ = tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    conns.shutdown().await;
}

async fn connection(
    shared: Arc<Shared>,
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    let login =
        tokio::time::timeout(LOGIN_TIMEOUT, crate::login::login(&shared, &mut stream)).await;
    let logged = match login {
        Err(_) => {
            tracing::warn!(peer = %peer, "iSCSI login timed out; connection dropped");
            return;
        }
        Ok(Err(f)) => {
            tracing::warn!(peer = %peer, status = ?f.status.map(|s| format!("{s:#06x}")),
                reason = %f.reason, "iSCSI login refused");
            return;
        }
        Ok(Ok(l)) => l,
    };
    tracing::info!(peer = %peer, initiator = %logged.session.initiator_name,
        target = %logged.session.target_name, tsih = logged.session.tsih, cid = logged.cid,
        kind = ?logged.session.kind, header_digest = logged.params.header_digest,
        data_digest = logged.params.data_digest, "iSCSI login");
    crate::conn::run(shared, stream, logged, peer.to_string(), stop).await;
}
