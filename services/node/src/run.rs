//! `cairn node run`: composes the services of one node and runs them until
//! SIGINT/SIGTERM (clean stop, RocksDB flushed) or until the metadata engine
//! fails (the process exits non-zero rather than serve stale metadata).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cairn_management::ApiState;
use cairn_metadata::handle::MetaConfig;
use cairn_metadata::node::RaftSettings;
use cairn_metadata::MetadataHandle;
use cairn_rpc::pki::TlsPaths;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::client::{Api, ApiError};
use crate::config::{read_token, NodeConfig};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// At most this long between SIGTERM and the metadata stop for iSCSI
/// initiators to log out (below the test harness's 20 s SIGTERM patience).
const ISCSI_STOP_WAIT: Duration = Duration::from_secs(15);

pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let cfg = NodeConfig::load(config_path)?;
    let tls_paths = TlsPaths::new(&cfg.data_dir);
    let identity = tls_paths
        .load_identity()
        .with_context(|| format!("node {} has no usable TLS identity", cfg.node_id))?;
    let meta_cfg = MetaConfig {
        node_id: cfg.node_id,
        db_path: cfg.db_path(),
        rpc_addr: cfg.rpc_addr.to_string(),
        raft: RaftSettings {
            tick: Duration::from_millis(cfg.raft.tick_ms),
            election_tick: cfg.raft.election_tick,
            heartbeat_tick: cfg.raft.heartbeat_tick,
            compact_threshold: cfg.raft.compact_threshold,
            compact_retain: cfg.raft.compact_retain,
        },
        request_timeout: Duration::from_millis(cfg.raft.request_timeout_ms),
    };
    let (meta, raft_task) =
        MetadataHandle::start(meta_cfg, &identity, tokio::runtime::Handle::current())
            .context("cannot start the metadata service")?;

    let rpc_listener = TcpListener::bind(cfg.rpc_addr)
        .await
        .with_context(|| format!("cannot listen for RPC on {}", cfg.rpc_addr))?;
    let api_listener = TcpListener::bind(cfg.api_addr)
        .await
        .with_context(|| format!("cannot listen for the REST API on {}", cfg.api_addr))?;
    let iscsi_addr = cfg.iscsi_addr();
    let iscsi_listener = TcpListener::bind(iscsi_addr).await.with_context(|| {
        format!(
            "cannot listen for iSCSI on {iscsi_addr} (ports below 1024 need root or \
             CAP_NET_BIND_SERVICE; set iscsi_addr in the config to use another)"
        )
    })?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let pool = Arc::new(
        cairn_data::pool::LocalPool::open(&cfg.data_disks())
            .context("cannot open the data disks")?,
    );
    let data = cairn_data::volume::DataService::new(
        cfg.node_id,
        cfg.cluster_id.clone(),
        meta.clone(),
        pool.clone(),
        cairn_rpc::tls::mtls_client_config(&identity)?,
    );
    let frontend: Arc<dyn cairn_data::frontend::BlockService> =
        Arc::new(cairn_data::volume::Frontend(data.clone()));
    let rpc_router = cairn_metadata::service::rpc_router(
        meta.clone(),
        cfg.cluster_id.clone(),
        VERSION.to_string(),
        |routes| routes.add_service(cairn_data::rpc::service(pool.clone(), frontend.clone())),
    );
    let iscsi = cairn_iscsi::server::Shared::new(
        cairn_iscsi::server::ServerConfig {
            portal: portal_addr(iscsi_addr, cfg.rpc_addr),
            // The node id is unique in the cluster, so every node is its own
            // portal group (tag 0 is reserved: clamp to 1..=65535).
            portal_group_tag: u16::try_from(cfg.node_id).unwrap_or(u16::MAX).max(1),
            nop_interval: Duration::from_secs(cfg.iscsi.nop_interval_secs),
            nop_timeout: Duration::from_secs(cfg.iscsi.nop_timeout_secs),
        },
        frontend.clone(),
        crate::iscsi::MetaTargetDirectory::new(meta.clone()),
    );
    // Before the RPC listener starts: other nodes' portals send SCSI
    // commands for the vdisks this node owns from the first moment.
    data.set_command_handler(cairn_iscsi::remote::PROTOCOL, iscsi.unit_host());
    let iscsi_task = tokio::spawn(cairn_iscsi::server::serve(
        iscsi_listener,
        iscsi,
        stop_rx.clone(),
    ));
    tokio::spawn(data.clone().run_monitor(
        cairn_data::repair::MonitorConfig {
            rebuild_bytes_per_sec: cfg.data.rebuild_bytes_per_sec.max(1 << 20),
            rebuild_wait: cfg.data.rebuild_wait(),
            scrub_bytes_per_sec: cfg.data.scrub_bytes_per_sec,
            ..Default::default()
        },
        stop_rx.clone(),
    ));
    tokio::spawn(cairn_data::maintenance::sync_deferred(
        pool.clone(),
        cfg.data.deferred_sync(),
        stop_rx.clone(),
    ));
    tokio::spawn(cairn_data::maintenance::register_disks(
        meta.clone(),
        pool.clone(),
        cfg.node_id,
        stop_rx.clone(),
    ));
    // The RPC port also speaks the raft stream and the replica fast path,
    // chosen by ALPN.
    let raw: Vec<Arc<dyn cairn_rpc::serve::RawProtocol>> = vec![
        cairn_metadata::wire::RaftStreamServer::new(meta.clone()),
        cairn_data::wire::WireServer::new(pool.clone(), frontend.clone()),
    ];
    let mut rpc_tls = (*cairn_rpc::tls::server_config(&identity, true)?).clone();
    for r in &raw {
        rpc_tls
            .alpn_protocols
            .extend(r.alpns().iter().map(|a| a.to_vec()));
    }
    tokio::spawn(cairn_rpc::serve::serve_tls_with(
        rpc_listener,
        Arc::new(rpc_tls),
        rpc_router,
        raw,
        "rpc",
        stop_rx.clone(),
    ));
    let api_router = cairn_management::router(ApiState {
        meta: meta.clone(),
        token_sha256: Arc::from(cfg.admin_token_sha256.as_str()),
        tls: tls_paths,
        version: Arc::from(VERSION),
        node_stats: {
            let data = data.clone();
            let node_id = cfg.node_id;
            Arc::new(move || node_stats(node_id, &data))
        },
    });
    tokio::spawn(cairn_rpc::serve::serve_tls(
        api_listener,
        cairn_rpc::tls::server_config(&identity, false)?,
        api_router,
        "api",
        stop_rx,
    ));
    tracing::info!(node = cfg.node_id, rpc = %cfg.rpc_addr, api = %cfg.api_addr,
        iscsi = %iscsi_addr, version = VERSION, "cairn node serving");

    if cfg.join.is_some() {
        let status = meta.status().await?;
        if !status.voters.contains(&cfg.node_id) {
            tokio::spawn(auto_join(cfg.clone(), identity.ca_pem.clone()));
        }
    }

    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; stopping"),
        _ = term.recv() => tracing::info!("SIGTERM received; stopping"),
        r = raft_task => {
            let _ = stop_tx.send(true);
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::anyhow!("metadata engine failed, stopping the node: {e}")),
                Err(e) => Err(anyhow::anyhow!("metadata driver task failed: {e}")),
            };
        }
    }
    let _ = stop_tx.send(true);
    // The iSCSI server asks its initiators to log out and lets them finish
    // (bounded inside `serve`); their last writes may still need metadata,
    // so metadata stops only after it, or after this cap.
    if tokio::time::timeout(ISCSI_STOP_WAIT, iscsi_task)
        .await
        .is_err()
    {
        tracing::warn!("iSCSI sessions did not end in time; stopping anyway");
    }
    // Writes acknowledged into the page cache become durable before we go.
    if let Err(e) = pool.sync_dirty().await {
        tracing::error!(error = %e, "cannot sync deferred writes at stop");
    }
    // So that the next start reads each group's index, not its records.
    let saved = pool.checkpoint_all().await;
    tracing::info!(groups = saved, "saved extent group index checkpoints");
    meta.shutdown();
    // Give the raft driver a moment to flush RocksDB.
    for _ in 0..50 {
        if meta.status().await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// The address SendTargets reports: the iSCSI listener's, unless it listens
/// on every interface, in which case the RPC address's IP (the one the
/// cluster already knows this node by).
fn portal_addr(listen: SocketAddr, rpc: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::new(rpc.ip(), listen.port())
    } else {
        listen
    }
}

/// The JSON of `GET /v1/node/stats`.
fn node_stats(node_id: u64, data: &cairn_data::volume::DataService) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &data.stats;
    let disks: Vec<_> = data
        .pool()
        .disks()
        .iter()
        .map(|d| {
            let u = d.usage();
            json!({
                "id": d.id(),
                "path": d.root().display().to_string(),
                "capacity_bytes": u.capacity_bytes,
                "used_bytes": u.used_bytes,
                "free_fs_bytes": u.free_fs_bytes,
                "full": u.full,
                "failed": u.failed,
                "extent_groups": u.groups,
            })
        })
        .collect();
    json!({
        "node_id": node_id,
        "data": {
            "checksum_repairs": s.checksum_repairs.load(Relaxed),
            "replicas_dropped": s.replicas_dropped.load(Relaxed),
            "bytes_written": s.bytes_written.load(Relaxed),
            "bytes_read": s.bytes_read.load(Relaxed),
        },
        "disks": disks,
    })
}

/// Asks the seed to make this node a member, until it succeeds.
async fn auto_join(cfg: NodeConfig, ca_pem: String) {
    let Some(join) = cfg.join.clone() else { return };
    let token = match read_token(&cfg.data_dir) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot join: no token");
            return;
        }
    };
    let body = json!({
        "node_id": cfg.node_id,
        "rpc_addr": cfg.rpc_addr.to_string(),
        "api_addr": cfg.api_addr.to_string(),
        "iscsi_addr": cfg.iscsi_addr().to_string(),
        "version": VERSION,
    });
    loop {
        let (seed, ca, tok, b) = (
            join.seed_api.clone(),
            ca_pem.clone(),
            token.clone(),
            body.clone(),
        );
        let res = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let api =
                Api::new(&seed, &ca, tok, Duration::from_secs(180)).map_err(|e| e.to_string())?;
            api.post("/v1/cluster/members", &b)
                .map(|_| ())
                .map_err(|e: ApiError| e.to_string())
        })
        .await;
        match res {
            Ok(Ok(())) => {
                tracing::info!(node = cfg.node_id, seed = %join.seed_api, "joined the cluster as a voter");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(node = cfg.node_id, seed = %join.seed_api, error = %e, "join attempt failed; retrying")
            }
            Err(e) => tracing::warn!(error = %e, "join task failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
