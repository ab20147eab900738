//! Creating a node's data folder: `cluster init` (a new cluster, CA, token,
//! first voter) and `cluster join` (an identity issued by a member).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use cairn_api::metadata::v1::{ClusterRecord, NodeRecord};
use cairn_rpc::pki::{ClusterCa, TlsPaths};
use cairn_util::durable::write_file_durable;
use serde_json::json;

use crate::client::{Api, ApiError};
use crate::config::{JoinConfig, NodeConfig, RaftConfig, CONFIG_FILE, TOKEN_FILE};

fn prepare_dir(data_dir: &Path) -> anyhow::Result<()> {
    if data_dir.join(CONFIG_FILE).exists() {
        bail!(
            "{} already holds a Cairn node ({}); use another --data-dir or remove it",
            data_dir.display(),
            CONFIG_FILE
        );
    }
    std::fs::create_dir_all(data_dir.join("tls"))
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    Ok(())
}

fn write_tls(
    data_dir: &Path,
    ca_pem: &str,
    ca_key: &str,
    cert: &str,
    key: &str,
) -> anyhow::Result<()> {
    let p = TlsPaths::new(data_dir);
    write_file_durable(&p.ca_cert(), ca_pem.as_bytes(), 0o644)?;
    write_file_durable(&p.ca_key(), ca_key.as_bytes(), 0o600)?;
    write_file_durable(&p.node_cert(), cert.as_bytes(), 0o644)?;
    write_file_durable(&p.node_key(), key.as_bytes(), 0o600)?;
    Ok(())
}

/// `cairn cluster init`: a new cluster whose first node lives in `data_dir`.
pub fn init(
    data_dir: &Path,
    name: &str,
    rpc_addr: SocketAddr,
    api_addr: SocketAddr,
    iscsi_addr: SocketAddr,
) -> anyhow::Result<NodeConfig> {
    prepare_dir(data_dir)?;
    let cluster_id = uuid::Uuid::new_v4().to_string();
    let ca = ClusterCa::generate(&cluster_id)?;
    let node_id = 1;
    let ips = [rpc_addr.ip(), api_addr.ip()];
    let ident = ca.issue_node(node_id, &ips)?;
    write_tls(
        data_dir,
        &ca.cert_pem,
        &ca.key_pem,
        &ident.cert_pem,
        &ident.key_pem,
    )?;
    let token = cairn_util::random_token();
    write_file_durable(
        &data_dir.join(TOKEN_FILE),
        format!("{token}\n").as_bytes(),
        0o600,
    )?;
    let cfg = NodeConfig {
        node_id,
        cluster_id: cluster_id.clone(),
        data_dir: data_dir.to_path_buf(),
        rpc_addr,
        api_addr,
        iscsi_addr: Some(iscsi_addr),
        admin_token_sha256: cairn_util::sha256_hex(token.as_bytes()),
        join: None,
        raft: RaftConfig::default(),
        disks: Vec::new(),
        data: Default::default(),
        iscsi: Default::default(),
    };
    cairn_metadata::bootstrap::bootstrap_first_node(
        &cfg.db_path(),
        ClusterRecord {
            format_version: cairn_api::FORMAT_VERSION,
            cluster_id,
            name: name.to_string(),
            created_unix_ms: cairn_util::now_unix_ms(),
            next_node_id: 2,
        },
        NodeRecord {
            format_version: cairn_api::FORMAT_VERSION,
            id: node_id,
            rpc_addr: rpc_addr.to_string(),
            api_addr: api_addr.to_string(),
            iscsi_addr: iscsi_addr.to_string(),
            added_unix_ms: cairn_util::now_unix_ms(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        },
    )?;
    cfg.save()?;
    Ok(cfg)
}

/// `cairn cluster join`: asks a member for an identity and writes the folder.
/// The node becomes a member when it first runs (learner, then voter).
pub fn join(
    data_dir: &Path,
    seed: &str,
    ca_pem: &str,
    token: &str,
    rpc_addr: SocketAddr,
    api_addr: SocketAddr,
    iscsi_addr: SocketAddr,
) -> anyhow::Result<NodeConfig> {
    prepare_dir(data_dir)?;
    let api = Api::new(seed, ca_pem, token.to_string(), Duration::from_secs(30))?;
    let body = json!({ "rpc_addr": rpc_addr.to_string(), "api_addr": api_addr.to_string() });
    // A seed that just started may not have elected a leader yet: retry what is transient.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let resp = loop {
        match api.post("/v1/nodes", &body) {
            Ok(v) => break v,
            Err(ApiError::Problem { status: 503, .. } | ApiError::Unreachable { .. })
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let field = |k: &str| -> anyhow::Result<String> {
        resp[k]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("seed answered without {k}"))
    };
    let node_id = resp["node_id"]
        .as_u64()
        .context("seed answered without node_id")?;
    write_tls(
        data_dir,
        &field("ca_pem")?,
        &field("ca_key_pem")?,
        &field("cert_pem")?,
        &field("key_pem")?,
    )?;
    write_file_durable(
        &data_dir.join(TOKEN_FILE),
        format!("{token}\n").as_bytes(),
        0o600,
    )?;
    let cfg = NodeConfig {
        node_id,
        cluster_id: field("cluster_id")?,
        data_dir: data_dir.to_path_buf(),
        rpc_addr,
        api_addr,
        iscsi_addr: Some(iscsi_addr),
        admin_token_sha256: cairn_util::sha256_hex(token.as_bytes()),
        join: Some(JoinConfig {
            seed_api: seed.to_string(),
        }),
        raft: RaftConfig::default(),
        disks: Vec::new(),
        data: Default::default(),
        iscsi: Default::default(),
    };
    cfg.save()?;
    Ok(cfg)
}
