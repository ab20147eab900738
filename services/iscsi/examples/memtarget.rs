//! A development target: one LUN on a memory vdisk, no cluster. For
//! running initiators (iscsi-test-cu, qemu) against the protocol code
//! alone: `cargo run -p cairn-iscsi --example memtarget -- 127.0.0.1:3260`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use cairn_blockdev::mem::{MemDevice, MemService};
use cairn_iscsi::server::{serve, ServerConfig, Shared};
use cairn_iscsi::target::{ChapCredentials, LunMapping, StaticTargets, TargetConfig};

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3260".into())
        .parse()
        .expect("listen address");
    let size: usize = std::env::var("SIZE_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024)
        << 20;
    let blocks = MemService::with([("mem0".to_string(), MemDevice::new(size))]);
    let chap = std::env::var("CHAP").ok().and_then(|s| {
        s.split_once(':').map(|(u, p)| ChapCredentials {
            user: u.into(),
            secret: p.into(),
        })
    });
    let targets = StaticTargets(vec![TargetConfig {
        iqn: "iqn.2026-11.io.cairn:mem".into(),
        luns: vec![LunMapping {
            lun: 0,
            vdisk_id: "mem0".into(),
            vdisk_name: "mem0".into(),
        }],
        chap,
        mutual_chap: None,
        allowed_initiators: Vec::new(),
    }]);
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let (_tx, rx) = tokio::sync::watch::channel(false);
    serve(
        listener,
        Shared::new(
            ServerConfig {
                portal: addr,
                portal_group_tag: 1,
                nop_interval: ServerConfig::NOP_INTERVAL,
                nop_timeout: ServerConfig::NOP_TIMEOUT,
            },
            blocks,
            Arc::new(targets),
        ),
        rx,
    )
    .await;
}
